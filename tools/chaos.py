"""Chaos run: kill (SIGKILL) a random training rank, embedding actor or ranking actor at a
random moment of its stage, many times, and check each outcome against an uninterrupted
run of the same tiny pipeline.

Reference: ``configs/tiny.yaml`` through every stage, uninterrupted, with 2 embedding
actors, step checkpoints every ``--every`` steps under Ray Train and 2 ranking actors.
Each trial copies the reference's upstream stages, re-runs one stage (``--force``) and kills
one of its Ray workers (only descendants of that stage's own process, so nothing else on
the machine is touched) after a random delay drawn from [0, the stage's reference
duration): embedding and ranking actors while they run a task (a shard, a chunk of users),
training ranks at any moment (start-up, mid-epoch, validation). Checked per trial:
- the stage finished on its own (exit code 0, no re-launch);
- ``embed``: the SIDs are byte-identical to the reference's;
- ``train``: every epoch's windows digest (which windows, in which order, on every rank)
  and loss equal the reference's, and the exported weights are byte-identical;
- ``rank``: the rankings hold every user once, with the reference's items in order.
A trial whose stage ended before the kill counts as "not injected" and is redrawn.

    python tools/chaos.py --kills 24          # table + tools/results/chaos.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import device_string, git_info, write_json  # noqa: E402
from faultlib import DIFFGRM, run_with_one_kill  # noqa: E402

TINY = ROOT / "configs" / "tiny.yaml"
KINDS = {  # kind -> (stage, Ray process title of the workers to kill)
    "train": ("train", "ray::RayTrainWorker"),  # any moment: start-up, an epoch, validation
    "embed": ("tokenize", "ray::EmbedWorker.embed"),  # while it embeds a shard (not while loading)
    "rank": ("evaluate", "ray::Ranker.rank"),  # while it ranks a chunk of users
}
STAGES = ("prepare", "tokenize", "shard", "train", "evaluate")


def overrides(work: Path, every: int) -> list[str]:
    return [f"tokenize.embedding_cache={work / 'no-cache'}", "tokenize.num_actors=2", "tokenize.shard_items=50",
            "train.epochs=3", "train.patience=10", "train.valid_start_epoch=1", "train.wandb_mode=disabled",
            f"train.checkpoint_every_steps={every}", "train.max_failures=3", "eval.num_actors=2",
            "eval.batch_size=8"]


def stage_args(stage: str, run: Path, extra: list[str]) -> list[str]:
    return [stage, "-c", str(TINY), "-o", str(run), *extra, "--force"]


def clear_cache(work: Path) -> None:
    shutil.rmtree(work / "no-cache", ignore_errors=True)  # every trial embeds afresh


def reference_run(work: Path, extra: list[str]) -> tuple[Path, dict[str, float]]:
    run = work / "reference"
    shutil.rmtree(run, ignore_errors=True)
    seconds = {}
    clear_cache(work)
    for stage in STAGES:
        start = time.perf_counter()
        done = subprocess.run([DIFFGRM, *stage_args(stage, run, extra)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"reference {stage} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        seconds[stage] = time.perf_counter() - start
    return run, seconds


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train" / "history.jsonl").read_text().splitlines()]


def rankings(run: Path) -> dict:
    import pyarrow.parquet as pq

    return pq.read_table(run / "evaluate" / "rankings", columns=["user", "rank", "item"]).to_pydict()


def check(kind: str, run: Path, reference: Path) -> dict:
    if kind == "embed":
        same = (run / "tokenize" / "sids.parquet").read_bytes() == (reference / "tokenize" / "sids.parquet").read_bytes()
        return {"identical": same}
    if kind == "train":
        a, b = history(reference), history(run)
        digests = sum(x["windows_digest"] == y["windows_digest"] for x, y in zip(a, b))
        losses = all(abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"]) for x, y in zip(a, b))
        weights = (run / "train" / "model.safetensors").read_bytes() == \
            (reference / "train" / "model.safetensors").read_bytes()
        return {"epochs": len(b), "epochs_same_digest": digests, "losses_equal": losses, "identical": weights
                and digests == len(a) == len(b) and losses}
    got, want = rankings(run), rankings(reference)
    users_once = len(set(zip(got["user"], got["rank"]))) == len(got["user"])
    return {"identical": got == want and users_once}


def trial(kind: str, reference: Path, seconds: dict[str, float], work: Path, extra: list[str],
          rng: random.Random, index: int) -> dict:
    stage, title = KINDS[kind]
    run = work / f"trial-{index:03d}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    for upstream in STAGES[:STAGES.index(stage)]:
        shutil.copytree(reference / upstream, run / upstream)
    clear_cache(work)
    delay = rng.uniform(0.0, 0.9 * seconds[stage])
    start = time.perf_counter()
    began = time.time()
    done, report = run_with_one_kill(stage_args(stage, run, extra), title,
                                     when=lambda: time.time() - began >= delay)
    out = {"kind": kind, "stage": stage, "delay_s": round(delay, 2), "wall_s": round(time.perf_counter() - start, 1),
           "killed": report["killed"], "finished": done.returncode == 0,
           "resumed": "resumed from" in done.stdout}
    if report["killed"] is not None and done.returncode == 0:
        out.update(check(kind, run, reference))
    elif done.returncode != 0:
        out["tail"] = done.stdout[-1500:]
    shutil.rmtree(run, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=24, help="kills to inject, spread evenly over the kinds")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--every", type=int, default=5, help="train.checkpoint_every_steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/diffgrm-chaos"))
    parser.add_argument("--out", type=Path, default=ROOT / "tools" / "results" / "chaos.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    extra = overrides(args.work, args.every)
    reference, seconds = reference_run(args.work, extra)
    print(f"reference run: {', '.join(f'{s} {t:.0f} s' for s, t in seconds.items())}", flush=True)
    trials, attempts = [], 0
    wanted = [args.kinds[i % len(args.kinds)] for i in range(args.kills)]
    for kind in wanted:
        while True:  # redraw a trial whose stage ended before its kill
            attempts += 1
            result = trial(kind, reference, seconds, args.work, extra, rng, attempts)
            if result["killed"] is not None or not result["finished"]:
                break
            print(f"  {kind}: stage ended before the kill at {result['delay_s']} s; redrawn", flush=True)
        trials.append(result)
        print(f"{len(trials):>3}. {kind:<5} kill at {result['delay_s']:>5.1f} s: "
              f"{'finished' if result['finished'] else 'FAILED'}, "
              f"{'identical' if result.get('identical') else 'DIFFERENT'}", flush=True)
    rows = []
    for kind in args.kinds:
        mine = [t for t in trials if t["kind"] == kind]
        row = {"kind": kind, "kills": sum(t["killed"] is not None for t in mine),
               "finished_on_their_own": sum(t["finished"] for t in mine),
               "identical_outcome": sum(bool(t.get("identical")) for t in mine)}
        if kind == "train":  # killed after a checkpoint: the restart resumed from it
            row["resumed_from_checkpoint"] = sum(bool(t.get("resumed")) for t in mine)
            row["epochs_same_digest"] = f"{sum(t.get('epochs_same_digest', 0) for t in mine)}/" \
                                        f"{sum(t.get('epochs', 0) for t in mine)}"
        rows.append(row)
    print("\n| kind | kills | finished on their own | identical outcome | epochs with the reference's windows "
          "digest | resumed from a checkpoint |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['kind']} | {row['kills']} | {row['finished_on_their_own']} | {row['identical_outcome']} | "
              f"{row.get('epochs_same_digest', '-')} | {row.get('resumed_from_checkpoint', '-')} |")
    write_json(args.out, {"device": device_string(), "commit": git_info(ROOT)["commit"], "seed": args.seed,
                          "every": args.every, "reference_s": seconds, "attempts": attempts, "rows": rows,
                          "trials": trials})
    print(f"wrote {args.out}")
    if any(r["identical_outcome"] != r["kills"] or r["finished_on_their_own"] != r["kills"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
