"""Runs named variants of one experiment side by side and tabulates item- and SID-level
metrics against popularity.

Each variant is a list of ``section.key=value`` overrides on one config. Variants run in
their own run directories under ``--work`` and share what they can: the embedding cache
always, and every stage a variant does not change, copied from ``--seed-run`` (default:
the first variant's run); each stage's manifest decides, so a copied stage whose config
and inputs match is skipped and one that differs re-runs with everything after it.
A variant whose result already exists is not re-run. Results (metrics, train stats, the
overrides, the command and the git commit) go to ``--out/<variant>.json`` and the table to
``--out/README.md``.

    python tools/run_variants.py -c configs/demo.yaml --work /tmp/variants --out results/demo \\
        --variant "diffgrm=" --variant "dense=model.decoder=dense" \\
        --variant "extra_digit=tokenize.collision=extra_digit"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "tokenize", "shard", "train", "evaluate")


def git_commit() -> str:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head + ("-dirty" if dirty else "")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=key=value key=value ...")
    return name, shlex.split(rest)


def run_variant(config: Path, name: str, overrides: list[str], work: Path, seed_run: Path | None,
                cache: Path) -> dict:
    run = work / name
    if seed_run is not None and not run.exists():
        run.mkdir(parents=True)
        for stage in STAGES:  # the pipeline skips those whose manifest still matches
            if (seed_run / stage / "manifest.json").is_file():
                shutil.copytree(seed_run / stage, run / stage)
    command = [str(Path(sys.executable).parent / "diffgrm"), "pipeline", "-c", str(config), "-o", str(run),
               f"tokenize.embedding_cache={cache}", *overrides]
    start = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    return {"variant": name, "overrides": overrides, "config": str(config.relative_to(ROOT)),
            "command": " ".join(shlex.quote(c) for c in ["diffgrm", *command[1:]]), "commit": git_commit(),
            "wall_s": round(wall, 1), "metrics": metrics,
            "train": json.loads((run / "train" / "stats.json").read_text()),
            "tokenize": {k: v for k, v in json.loads((run / "tokenize" / "stats.json").read_text()).items()
                         if k in ("distinct_codes", "colliding_items", "max_items_per_code", "items")}}


def table(results: list[dict]) -> str:
    head = ("| variant | item rule | item R@5 | item N@5 | item R@10 | item N@10 | SID R@10 | SID N@10 "
            "| colliding items | train s | overrides |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        m = r["metrics"]
        rules = [("", "item")] if m["decoder"] == "dense" else [
            (rule, f"item.{rule}") for rule in ("code_prob", "expand") if f"item.{rule}" in m]
        for rule, key in rules:
            i, s = m[key], m["sid"]
            rows.append(f"| {r['variant']} | {rule or 'dense'} | {i['recall@5']:.4f} | {i['ndcg@5']:.4f} | "
                        f"{i['recall@10']:.4f} | {i['ndcg@10']:.4f} | {s['recall@10']:.4f} | {s['ndcg@10']:.4f} | "
                        f"{r['tokenize']['colliding_items']} | {r['train']['wall_s']:.0f} | "
                        f"`{' '.join(r['overrides']) or '(config as is)'}` |")
    pop = results[0]["metrics"]["popularity"]
    rows.append(f"| popularity | - | {pop['recall@5']:.4f} | {pop['ndcg@5']:.4f} | {pop['recall@10']:.4f} | "
                f"{pop['ndcg@10']:.4f} | - | - | - | - | |")
    return head + "\n" + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, type=Path)
    parser.add_argument("--work", required=True, type=Path, help="run directories (never inside the repo)")
    parser.add_argument("--out", required=True, type=Path, help="folder for <variant>.json and README.md")
    parser.add_argument("--variant", action="append", required=True, help="NAME=key=value key=value ...")
    parser.add_argument("--seed-run", type=Path, help="run directory whose stages variants start from")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.work / "embeddings"
    if args.seed_run is not None and (args.seed_run / "embeddings").is_dir() and not cache.exists():
        shutil.copytree(args.seed_run / "embeddings", cache)  # the seed run's own cache
    results, seed_run = [], args.seed_run
    for text in args.variant:
        name, overrides = parse_variant(text)
        target = args.out / f"{name}.json"
        if target.is_file():
            result = json.loads(target.read_text())
            print(f"{name}: result exists, skipped")
        else:
            print(f"{name}: running {' '.join(overrides) or '(config as is)'}", flush=True)
            result = run_variant(args.config.resolve(), name, overrides, args.work, seed_run, cache)
            target.write_text(json.dumps(result, indent=2) + "\n")
            m = result["metrics"]
            print(f"{name}: item N@10 {m['item']['ndcg@10']:.4f} R@10 {m['item']['recall@10']:.4f} "
                  f"(popularity {m['popularity']['ndcg@10']:.4f} / {m['popularity']['recall@10']:.4f}), "
                  f"{result['wall_s']:.0f} s", flush=True)
        seed_run = seed_run or args.work / name
        results.append(result)
    text = table(results)
    title = args.title or f"Variants of {args.config}"
    (args.out / "README.md").write_text(
        f"# {title}\n\nTest split, all users; generated by `tools/run_variants.py` "
        f"(commands and commits in each `<variant>.json`).\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
