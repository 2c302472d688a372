"""CPU-scale reproduction of the paper's claims on Beauty, Sports and Toys: one command,
one table.

Every (dataset, variant) pair runs the whole pipeline on ``configs/cpu/<dataset>.yaml``
plus the variant's overrides, in its own run directory ``--work/<dataset>/<variant>``.
Variants of one dataset share the embedding cache, and every stage another run of that
dataset already holds for the same config and inputs (tokenize, shards, a trained model:
the stage manifests decide; ``diffgrm_dist.variants.run_variant``); an evaluation-only
variant (``paired_with``) must adopt every stage up to train from its paired run. A pair whose ``results/cpu/<dataset>/<variant>.json`` exists
is skipped, so the command resumes where it stopped. ``results/README.md`` (the table,
next to the paper's numbers) and ``results/cpu/ndcg10.png`` are regenerated from all
result files at the end of every run, or alone with ``--table-only``.

    python tools/reproduce.py                                 # everything, in queue order
    python tools/reproduce.py --datasets beauty --variants diffgrm ar
    python tools/reproduce.py --table-only
    python tools/reproduce.py --check beauty/diffgrm          # re-run a row at HEAD, compare

``--check DATASET/VARIANT...`` re-runs the named rows at HEAD in a fresh work folder (no
stage adopted from runs of older code), prints each next to its committed value with the
95% interval of the difference, and writes ``results/checks/<dataset>/<variant>.json``;
with ``--replace`` the HEAD run becomes the row and the committed one moves to
``results/cpu/<dataset>/history/<variant>@<commit>.json``. The table marks every row made
before the last change to quality-bearing code (``QUALITY_CODE``) with its commit; a
change shown to leave every output the same is listed in ``results/neutral_commits.txt``.

Never part of CI: one run takes 20-60 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import device_string, git_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("beauty", "sports", "toys")
RESULTS = ROOT / "results"
METRICS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")


@dataclass(frozen=True)
class Variant:
    """One row of the table: overrides on the CPU config, and where the paper has a number."""

    name: str
    overrides: tuple[str, ...]
    what: str
    datasets: tuple[str, ...] = DATASETS
    paper: str = ""  # key into PAPER_ABLATIONS: the paper's NDCG@10 for this ablation
    paired_with: str = ""  # evaluation only: the variant whose trained model (and stages) it reuses
    tune_group: str = ""  # rows tuned together: the table shows the one best on validation


VARIANTS = (
    Variant("diffgrm", (), "DiffGRM: PSE (OPQ) SIDs + OCN + CPD", paper="full"),
    Variant("ar", ("model.decoder=autoregressive",), "AR baseline: same SIDs, causal decoder, beam search"),
    Variant("dense", ("model.decoder=dense",), "dense next-item baseline (SASRec-style item softmax)"),
    Variant("diffgrm_b1024", ("train.batch_size=1024", "train.warmup_steps=200"),
            "DiffGRM at batch 1024, warm-up 200: 4x fewer updates"),
    Variant("dense_b1024", ("model.decoder=dense", "train.batch_size=1024", "train.warmup_steps=200"),
            "dense baseline at batch 1024, warm-up 200", ("beauty",)),
    Variant("diffgrm_e16", ("train.epochs=16",), "DiffGRM, 16 epochs: 2x the training budget", ("sports",)),
    Variant("extra_digit", ("tokenize.collision=extra_digit",),
            "DiffGRM, unique SIDs: the collision rank as a 5th digit, decoded like the others"),
    Variant("diffgrm_cf", ("tokenize.collaborative_dim=64",),
            "DiffGRM, SIDs from text + co-occurrence vectors (tokenize.collaborative_dim=64)"),
    Variant("diffgrm_seed1", ("train.seed=1",), "DiffGRM, training seed 1", ("beauty",)),
    Variant("random_fill", ("train.seed=1", "eval.fill_order=random"),
            "ablation: CPD -> a fixed random fill order (seed 1's model)", ("beauty",),
            paper="random_fill", paired_with="diffgrm_seed1"),
    Variant("cpd_m2", ("eval.fill_digits=2",), "CPD filling 2 digits per decoder pass (2 passes, not 4)",
            ("beauty",), paired_with="diffgrm"),
    Variant("cpd_m4", ("eval.fill_digits=4",), "CPD filling all 4 digits from one decoder pass",
            ("beauty",), paired_with="diffgrm"),
    Variant("diffgrm_seed2", ("train.seed=2",), "DiffGRM, training seed 2", ("beauty",)),
    Variant("diffgrm_tok1", ("tokenize.seed=1",), "DiffGRM, tokenization seed 1 (OPQ / PQ k-means seeds)",
            ("beauty",)),
    Variant("diffgrm_tok2", ("tokenize.seed=2",), "DiffGRM, tokenization seed 2 (OPQ / PQ k-means seeds)",
            ("beauty",)),
    Variant("random_masking", ("train.objective=random",), "ablation: random masking instead of OCN",
            ("beauty",), paper="random_masking"),
    Variant("random_order", ("train.objective=random_order",), "ablation: OCN without the on-policy order",
            ("beauty",), paper="random_order"),
    Variant("rq_kmeans", ("tokenize.quantizer=rq_kmeans",), "ablation: RQ-KMeans SIDs instead of PSE (OPQ)",
            ("beauty",), paper="rq_kmeans"),
    Variant("ar_seed1", ("model.decoder=autoregressive", "train.seed=1"), "AR baseline, training seed 1", ("beauty",)),
    Variant("ar_seed2", ("model.decoder=autoregressive", "train.seed=2"), "AR baseline, training seed 2", ("beauty",)),
    Variant("cpd_paper", ("eval.cpd_prune=final", "eval.merge_states=false"),
            "the paper's CPD: codes no item has dropped at the end, states never merged", ("beauty",),
            paired_with="diffgrm"),
    Variant("cpd_final_merged", ("eval.cpd_prune=final",), "CPD pruned at the end, states merged", ("beauty",),
            paired_with="diffgrm"),
    Variant("cpd_step_unmerged", ("eval.merge_states=false",), "CPD pruned every step, states never merged",
            ("beauty",), paired_with="diffgrm"),
    Variant("no_digit_pos", ("model.digit_pos=false",), "ablation: no digit-position embedding (the released decoder)",
            ("beauty",)),
    *(Variant(f"dense_do{int(dropout * 10)}_wd{int(wd * 100)}",
              ("model.decoder=dense", f"model.dropout={dropout}", f"train.weight_decay={wd}"),
              f"dense baseline, dropout {dropout}, weight decay {wd}", ("beauty",), tune_group="dense")
      for dropout in (0.1, 0.3, 0.5) for wd in (0.0, 0.01)),
)
# Rows where this code departs from the paper, and what the row measures of that departure.
DEPARTURES = {"cpd_paper": "Our CPD (prune every step, merge equal states) vs the paper's",
              "no_digit_pos": "Our digit-position embedding vs the released decoder's none"}
# Options of ours the paper does not have (item-level rules, other SIDs): what "What the
# table says" reads off each against the main row.
OPTIONS = {"extra_digit": "Unique SIDs (the collision rank as a 5th digit) vs expanding a code to all its items",
           "diffgrm_cf": "Collaborative SIDs (text + co-occurrence vectors) vs text-only PSE"}
SEEDS = ("diffgrm", "diffgrm_seed1", "diffgrm_seed2")  # training seeds, one set of SIDs
AR_SEEDS = ("ar", "ar_seed1", "ar_seed2")  # the AR baseline's training seeds, on the same SIDs
TOKENIZE_SEEDS = ("diffgrm", "diffgrm_tok1", "diffgrm_tok2")  # tokenization seeds, training seed 0
# Code and configs whose change can move a row's numbers: a row made before the last commit
# touching any of them is marked in the table with the commit it came from.
QUALITY_CODE = tuple(f"diffgrm_dist/{m}" for m in (
    "data/prepare.py", "data/rawdata.py", "data/readers.py", "data/synthetic.py", "data/text.py", "data/splits.py",
    "data/shardformat.py", "data/shard.py", "data/loaders.py", "tokenize", "model", "train", "decode",
    "evaluate/ranking.py", "evaluate/stage.py", "evaluate/metrics.py")) + tuple(
    # the same modules before the subpackage layout (rows made then are dated by these paths)
    f"diffgrm_dist/{m}.py" for m in (
        "prepare", "rawdata", "readers", "synthetic", "text", "splits", "embed", "quantize", "tokenize",
        "collaborative", "shardformat", "shard", "loaders", "model", "objectives", "train", "catalogue",
        "decode", "ranking", "evaluate", "metrics")) + (
    "configs/beauty.yaml", "configs/sports.yaml", "configs/toys.yaml", "configs/cpu")
Z95 = 1.96

# ../shared/docs/diffgrm-reference.md, "Reported results" and "Ablations" (SID level, paper scale).
PAPER = {  # R@5, N@5, R@10, N@10
    "beauty": (0.0603, 0.0414, 0.0876, 0.0502),
    "sports": (0.0363, 0.0245, 0.0550, 0.0305),
    "toys": (0.0618, 0.0455, 0.0834, 0.0524),
}
PAPER_TIGER = {"beauty": (0.0454, 0.0321, 0.0648, 0.0384), "sports": (0.0264, 0.0181, 0.0400, 0.0225),
               "toys": (0.0521, 0.0371, 0.0712, 0.0432)}
# Published dense next-item baselines on Beauty (item level: leave-one-out, full-catalogue
# ranking), cited as published, never re-run here: (source, R@10, N@10 or a range).
PUBLISHED_DENSE = {"beauty": (
    ("SASRec (binary cross-entropy, one negative), as reported in the TIGER paper (Rajput et al., 2023, Table 2)",
     "0.0605", "0.0318"),
    ("SASRec with full cross-entropy loss (the range issue 26 quotes from later papers, not re-checked here)",
     "-", "0.040-0.053"),
)}
PAPER_ABLATIONS = {  # NDCG@10
    "full": {"sports": 0.0305, "beauty": 0.0502, "toys": 0.0524},
    "rq_kmeans": {"sports": 0.0200, "beauty": 0.0305, "toys": 0.0368},
    "random_masking": {"sports": 0.0250, "beauty": 0.0385, "toys": 0.0430},
    "random_order": {"sports": 0.0263, "beauty": 0.0430},
    "random_fill": {"sports": 0.0273, "beauty": 0.0496, "toys": 0.0499},
}


def result_path(dataset: str, variant: str, root: Path = RESULTS) -> Path:
    return root / "cpu" / dataset / f"{variant}.json"


def config_path(dataset: str) -> Path:
    return ROOT / "configs" / "cpu" / f"{dataset}.yaml"


def eval_only_overrides(variant: Variant) -> list[str]:
    """What an evaluation-only variant changes over its paired variant: must be eval.* keys."""
    paired = next(v for v in VARIANTS if v.name == variant.paired_with)
    return [o for o in variant.overrides if o not in paired.overrides]


def run_pair(dataset: str, variant: Variant, work: Path) -> dict:
    """Runs one variant's pipeline through ``diffgrm_dist.variants.run_variant`` (adopting what
    the dataset's other runs already hold; an evaluation-only variant must adopt its paired
    run's model) and returns the row's JSON."""
    from diffgrm_dist.core.config import section_hash, to_dict
    from diffgrm_dist.evaluate.paired import sparse_ranks, target_ranks
    from diffgrm_dist.variants import Variant as RunnerVariant
    from diffgrm_dist.variants import run_variant

    source = git_info(ROOT)  # the code the run starts from
    done = run_variant(config_path(dataset), RunnerVariant(variant.name, variant.overrides, variant.paired_with or None),
                       work / dataset)
    cfg = done.cfg
    hashed = {k: v for k, v in to_dict(cfg).items() if k != "name"}
    return {
        "dataset": dataset, "variant": variant.name, "what": variant.what, "overrides": list(variant.overrides),
        "config": str(config_path(dataset).relative_to(ROOT)),
        "config_hash": section_hash(cfg.seed, cfg.data, cfg.prepare, cfg.tokenize, cfg.shard, cfg.model,
                                    cfg.train, cfg.eval),
        "command": shlex.join(["python", "tools/reproduce.py", "--datasets", dataset, "--variants", variant.name]),
        "pipeline_command": done.command,
        "commit": source["commit"], "dirty": source["dirty"],
        "package_dirty": bool(source["changed_package_files"]),
        "machine": device_string(), "adopted_stages": done.adopted,
        "wall_s": {"pipeline": done.wall_s, "train": done.train.get("wall_s"), "evaluate": done.metrics.get("decode_s")},
        "model": {"d_model": hashed["model"]["d_model"], "parameters": done.train.get("parameters"),
                  "epochs": hashed["train"]["epochs"], "batch_size": hashed["train"]["batch_size"]},
        "metrics": done.metrics, "train": done.train, "tokenize": done.tokenize,
        # where the run ranked each test user's true item (top 10): paired intervals between rows
        "target_ranks": sparse_ranks(target_ranks(done.run, cfg.eval.split), cfg.eval.top_k),
    }


def load_results(root: Path = RESULTS) -> dict[str, dict[str, dict]]:
    """The table's rows: ``results/cpu/<dataset>/<variant>.json``."""
    found: dict[str, dict[str, dict]] = {}
    for dataset in DATASETS:
        for path in sorted((root / "cpu" / dataset).glob("*.json")):
            found.setdefault(dataset, {})[path.stem] = json.loads(path.read_text())
    return found


def history_path(dataset: str, variant: str, commit: str, root: Path = RESULTS) -> Path:
    return root / "cpu" / dataset / "history" / f"{variant}@{commit[:7]}.json"


def load_history(root: Path = RESULTS) -> dict[str, dict[str, list[dict]]]:
    """Rows a ``--check --replace`` superseded, per dataset and variant."""
    found: dict[str, dict[str, list[dict]]] = {}
    for dataset in DATASETS:
        for path in sorted((root / "cpu" / dataset / "history").glob("*@*.json")):
            found.setdefault(dataset, {}).setdefault(path.stem.split("@")[0], []).append(json.loads(path.read_text()))
    return found


def sid_fingerprint(result: dict) -> tuple[int, ...]:
    """Distinct codes, colliding items, most items per code: which SIDs a run trained on."""
    return tuple(result["tokenize"].get(k, -1) for k in ("distinct_codes", "colliding_items", "max_items_per_code"))


def counterpart(base: str, result: dict, results: dict[str, dict], history: dict[str, list[dict]]) -> dict | None:
    """The run of ``base`` that ``result`` is compared with: the current row where both
    trained on the same SIDs, else the superseded ``base`` run (``--check --replace``
    history) on ``result``'s SIDs, the run it was made beside; else the current row, and
    without a ``base`` row, the main one."""
    current = results.get(base)
    same = [r for r in (current, *history.get(base, [])) if r is not None and sid_fingerprint(r) == sid_fingerprint(result)]
    return same[0] if same else current or results.get("diffgrm")


def seed_groups(results: dict[str, dict], history: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The runs each spread is measured on. Training seeds must share one set of SIDs (the
    fingerprint of ``diffgrm_seed1``; a superseded ``diffgrm`` row from history where the
    current one was re-run on other SIDs); tokenization seeds are the current rows."""
    groups: dict[str, list[dict]] = {"training seeds": [], "tokenization seeds": []}
    if SEEDS[1] in results:
        sids = sid_fingerprint(results[SEEDS[1]])
        for name in SEEDS:
            match = [r for r in [results.get(name), *history.get(name, [])] if r and sid_fingerprint(r) == sids]
            if match:
                groups["training seeds"].append(match[0])
    groups["tokenization seeds"] = [results[n] for n in TOKENIZE_SEEDS if n in results]
    return {k: v for k, v in groups.items() if len(v) > 1}


def run_to_run_sd(groups: dict[str, list[dict]], value, reference: dict | None = None,
                  borrowed: tuple[float, str] | None = None) -> tuple[float, dict[str, float]]:
    """The larger of the spreads (sample sd of ``value(result)``) over the seed groups, and
    each spread: what a difference between two single runs is read against. A dataset
    without seed groups borrows another's relative sd (``borrowed``: sd / mean and where it
    was measured), scaled to ``value(reference)``."""
    if not groups and borrowed and reference:
        sd = borrowed[0] * value(reference)
        return sd, {f"{borrowed[1]}'s relative spread": sd}
    spreads = {name: statistics.stdev([value(r) for r in runs]) for name, runs in groups.items()}
    return max(spreads.values(), default=float("nan")), spreads


def neutral_commits(root: Path = ROOT) -> dict[str, str]:
    """Commits that touch quality-bearing code but were shown to leave every output the same
    (``results/neutral_commits.txt``: one ``<full sha> <the evidence>`` per line, e.g. a pure
    move with byte-identical SIDs, shards, weights and rankings on tiny and demo)."""
    path = root / "results" / "neutral_commits.txt"
    lines = path.read_text().splitlines() if path.is_file() else []
    pairs = (line.split(maxsplit=1) for line in lines if line.strip() and not line.startswith("#"))
    return {sha: why for sha, *rest in pairs for why in [rest[0] if rest else ""]}


def quality_changes_since(commit: str, root: Path = ROOT) -> list[str] | None:
    """Commits after ``commit`` up to HEAD that touch ``QUALITY_CODE``, less the neutral
    ones; None when ``commit`` is not in this clone."""
    out = subprocess.run(["git", "-C", str(root), "rev-list", f"{commit}..HEAD", "--", *QUALITY_CODE],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return None
    neutral = neutral_commits(root)
    return [sha for sha in out.stdout.split() if sha not in neutral]


def stale_mark(result: dict, root: Path = ROOT) -> str:
    """`` [at <commit>]`` when quality-bearing code changed after the row's commit (``*``:
    its package code had uncommitted changes); empty for a row current at HEAD."""
    commit = result.get("commit")
    if not commit:
        return " [commit unknown]"
    changes = quality_changes_since(commit, root)
    dirty = result.get("package_dirty", result.get("dirty"))
    if changes is None:
        return f" [at {commit[:7]}{'*' if dirty else ''}, not in this clone]"
    if changes or dirty:
        return f" [at {commit[:7]}{'*' if dirty else ''}]"
    return ""


def last_quality_change(root: Path = ROOT) -> str:
    """The newest commit touching ``QUALITY_CODE`` that is not listed as neutral."""
    out = subprocess.run(["git", "-C", str(root), "log", "--format=%H %h %s", "--", *QUALITY_CODE],
                         capture_output=True, text=True)
    neutral = neutral_commits(root)
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        sha, short_and_subject = line.split(" ", 1)
        if sha not in neutral:
            return short_and_subject[:120]
    return "unknown"


def _fmt(values: tuple[float, ...] | list[float]) -> str:
    return " | ".join(f"{v:.4f}" for v in values)


def machine_of(result: dict) -> str:
    """The CPU/GPU a result ran on, less the note that back-filled rows carry (the machine
    type, recorded when the result was filed rather than when it ran)."""
    return str(result.get("machine") or "unknown").split(" (this machine type", 1)[0]


def _item(result: dict) -> tuple[float, ...]:
    return tuple(result["metrics"]["item"][m] for m in METRICS)


def _sid(result: dict) -> tuple[float, float]:
    return result["metrics"]["sid"]["recall@10"], result["metrics"]["sid"]["ndcg@10"]


def tuned_best(results: dict[str, dict]) -> dict[str, str]:
    """Per tune group, the row whose training reached the best validation score."""
    best: dict[str, str] = {}
    for v in VARIANTS:
        r = results.get(v.name)
        if v.tune_group and r is not None:
            current = results.get(best.get(v.tune_group, ""))
            if current is None or r["train"]["best_score"] > current["train"]["best_score"]:
                best[v.tune_group] = v.name
    return best


def paired_difference(result: dict, main: dict) -> tuple[float, float, float] | None:
    """Item N@10 of ``result`` minus ``main`` over the same users, with its paired bootstrap
    interval, where both rows carry their per-user ranks (None otherwise)."""
    from diffgrm_dist.evaluate.paired import dense_ranks, paired_interval

    a, b = result.get("target_ranks"), main.get("target_ranks")
    if not a or not b or a["users"] != b["users"]:
        return None
    return paired_interval(dense_ranks(a), dense_ranks(b))


def seeds_difference(first: list[dict], second: list[dict]) -> tuple[float, float, float, int, int] | None:
    """Mean item N@10 of one set of training seeds minus another's, with Welch's 95% interval
    (each side's seed-to-seed spread); None with fewer than 2 runs a side."""
    from scipy import stats

    if len(first) < 2 or len(second) < 2:
        return None
    a, b = [_item(r)[3] for r in first], [_item(r)[3] for r in second]
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff, se = statistics.mean(a) - statistics.mean(b), math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else 1.0
    half = float(stats.t.ppf(0.975, df)) * se
    return diff, diff - half, diff + half, len(a), len(b)


def item_n10_sd(results: dict[str, dict], groups: dict[str, list[dict]],
                spread_from: tuple[float, str] | None) -> tuple[float, str]:
    """The run-to-run sd of item N@10 single-run differences are read against, and where it
    comes from: the larger of the dataset's seed spreads, else another dataset's relative
    spread scaled to this main row."""
    sd, spreads = run_to_run_sd(groups, lambda r: _item(r)[3], results.get("diffgrm"), spread_from)
    if not groups and spreads:  # borrowed: one entry naming where it was measured
        return sd, next(iter(spreads))
    return sd, f"larger of {', '.join(f'{k} {v:.4f}' for k, v in spreads.items())}"


def dataset_table(dataset: str, results: dict[str, dict], history: dict[str, list[dict]] | None = None,
                  spread_from: tuple[float, str] | None = None) -> list[str]:
    """Markdown lines of one dataset's table: every variant that has a result (marked with
    its commit when quality-bearing code changed since), its difference from DiffGRM (or
    from the row it pairs with) with a 95% interval, paired over users where both rows
    wrote their ranks, else from the run-to-run spread; popularity, the seed spreads, and the
    paper's rows (SID level, paper scale). ``spread_from``: a relative sd (sd / mean) and
    where it was measured, for a dataset without seed runs of its own."""
    pop = next(iter(results.values()))["metrics"]["popularity"]
    pop_n10 = pop["ndcg@10"]
    groups = seed_groups(results, history or {})
    main = results.get("diffgrm")
    other_machines: set[str] = set()
    sd, sd_note = item_n10_sd(results, groups, spread_from)
    lines = [f"### {dataset.capitalize()}", "",
             "| row | item R@5 | item N@5 | item R@10 | item N@10 | x pop. | "
             "vs DiffGRM (or the row named): item N@10 diff (95%) | "
             "SID R@10 | SID N@10 | paper N@10 (SID) | train min | colliding items |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    best_tuned = tuned_best(results)
    paired_used = False
    for variant in VARIANTS:
        r = results.get(variant.name)
        if r is None or (variant.tune_group and best_tuned.get(variant.tune_group) != variant.name):
            continue
        item = _item(r)
        sid_r, sid_n = _sid(r)
        paper = PAPER_ABLATIONS.get(variant.paper, {}).get(dataset) if variant.paper else None
        if variant.name == "ar":
            paper = PAPER_TIGER[dataset][3]  # TIGER's own paper: RQ-VAE codes, not these SIDs
        base = variant.paired_with or "diffgrm"
        against = counterpart(base, r, results, history or {})
        label = variant.what
        if against is not None and against is not results.get(against["variant"]):  # a superseded run
            label += f" (vs {against['variant']} at {against['commit'][:7]}: the same SIDs)"
        elif against is not None and variant.paired_with:
            label += f" (vs {against['variant']})"
        label += stale_mark(r)
        if variant.tune_group:
            tried = sum(v.tune_group == variant.tune_group and v.name in results for v in VARIANTS)
            label += f" (best of {tried} settings on validation)"
        if against is not None and machine_of(r) != machine_of(against):
            label += " †"
            other_machines.update((machine_of(r), machine_of(against)))
        diff = "-"
        if main is not None and variant.name != "diffgrm":
            d, lo, hi, how = _interval(r, against, sd)
            if how == "paired":
                paired_used = True
                diff = f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}] paired"
            elif sd == sd:
                diff = f"{d:+.4f} ± {Z95 * math.sqrt(2) * sd:.4f}"
        lines.append(f"| {label} | {_fmt(item)} | {item[3] / pop_n10:.2f}x | {diff} | {sid_r:.4f} | {sid_n:.4f} | "
                     f"{f'{paper:.4f}' if paper else '-'} | {r['train']['wall_s'] / 60:.0f} | "
                     f"{r['tokenize']['colliding_items']} |")
    for name, runs in groups.items():
        n10 = [_item(r)[3] for r in runs]
        r10 = [_item(r)[2] for r in runs]
        sid = [_sid(r)[1] for r in runs]
        lines.append(f"| DiffGRM, {len(runs)} {name}: mean ± sd | - | - | {statistics.mean(r10):.4f} ± "
                     f"{statistics.stdev(r10):.4f} | {statistics.mean(n10):.4f} ± {statistics.stdev(n10):.4f} | "
                     f"{statistics.mean(n10) / pop_n10:.2f}x | - | - | {statistics.mean(sid):.4f} ± "
                     f"{statistics.stdev(sid):.4f} | - | - | - |")
    versus_ar = seeds_difference([r for r in groups.get("training seeds", [])],
                                 [results[n] for n in AR_SEEDS if n in results])
    if versus_ar is not None:
        d, lo, hi, na, nb = versus_ar
        lines.append(f"| DiffGRM ({na} seeds) - AR ({nb} seeds): item N@10, Welch 95% interval | - | - | - | "
                     f"{d:+.4f} | - | [{lo:+.4f}, {hi:+.4f}] | - | - | - | - | - |")
    lines.append(f"| popularity | {_fmt([pop[m] for m in METRICS])} | 1.00x | - | - | - | - | - | - |")
    for label, paper in (("*paper: DiffGRM (SID level, paper scale)*", PAPER[dataset]),
                         ("*paper: TIGER, from its own paper (SID level)*", PAPER_TIGER[dataset])):
        lines.append(f"| {label} | - | - | - | - | - | - | {paper[2]:.4f} | {paper[3]:.4f} | {paper[3]:.4f} | - | - |")
    if paired_used:
        lines += ["", "*paired*: the difference in item N@10 over the same test users and its 95% paired "
                      "bootstrap interval (2,000 resamples of users), from the rankings both runs wrote."]
    if other_machines:
        lines += ["", f"† made on another machine than the row it is compared with (machines: "
                      f"{'; '.join(sorted(other_machines))}). Embeddings, SIDs and bf16 training differ in their "
                      "low bits from one CPU to another, so such a difference includes the machine's."]
    if main is not None and sd == sd:
        lines += ["", f"Differences from DiffGRM are read against a run-to-run sd of {sd:.4f} item N@10 ({sd_note}); "
                      f"the interval is ± {Z95} x sqrt(2) x sd, for two single runs."]
    missing = [v.name for v in VARIANTS if dataset in v.datasets and v.name not in results]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)} (`python tools/reproduce.py --datasets {dataset}`)."]
    return lines + [""]


def _verdict(lo: float, hi: float, above: str, below: str, neither: str) -> str:
    return above if lo > 0 else below if hi < 0 else neither


def _interval(result: dict, against: dict, sd: float) -> tuple[float, float, float, str]:
    """Item N@10 of ``result`` minus ``against``: paired over users where both carry their
    ranks, else read against the run-to-run sd (two single runs)."""
    paired = paired_difference(result, against)
    if paired is not None:
        return (*paired, "paired")
    diff = _item(result)[3] - _item(against)[3]
    half = Z95 * math.sqrt(2) * sd if sd == sd else float("nan")
    return diff, diff - half, diff + half, "seed sd"


def findings(dataset: str, results: dict[str, dict], history: dict[str, list[dict]] | None = None,
             spread_from: tuple[float, str] | None = None) -> list[str]:
    """Bullets of "What the table says" for one dataset, every claim with its 95% interval:
    DiffGRM against AR (Welch over training seeds where both sides have two or more, and
    seed by seed paired over users), each paper ablation and each of our departures from the
    paper against the row it changes, and the tuned dense baseline next to published SASRec."""
    main = results.get("diffgrm")
    if main is None:
        return []
    sd, _ = item_n10_sd(results, seed_groups(results, history or {}), spread_from)
    names = {v.name: v for v in VARIANTS}
    out: list[str] = []
    diffgrm_seeds = [results[n] for n in SEEDS if n in results and sid_fingerprint(results[n]) == sid_fingerprint(main)]
    ar_seeds = [results[n] for n in AR_SEEDS if n in results and sid_fingerprint(results[n]) == sid_fingerprint(main)]
    versus = seeds_difference(diffgrm_seeds, ar_seeds)
    if versus is not None:
        d, lo, hi, na, nb = versus
        pairs = [(s, a) for s, a in zip(SEEDS, AR_SEEDS) if s in results and a in results]
        by_seed = "; ".join(f"seed {i}: {p[0]:+.4f} [{p[1]:+.4f}, {p[2]:+.4f}]" for i, (s, a) in enumerate(pairs)
                            if (p := paired_difference(results[s], results[a])) is not None)
        sid_d = statistics.mean(_sid(r)[1] for r in diffgrm_seeds)
        sid_a = statistics.mean(_sid(r)[1] for r in ar_seeds)
        out.append(f"- **DiffGRM vs AR** ({na} + {nb} training seeds, the same SIDs): "
                   f"{_verdict(lo, hi, 'DiffGRM beats AR', 'AR beats DiffGRM', 'neither beats the other')} at this "
                   f"budget. Item N@10 {statistics.mean(_item(r)[3] for r in diffgrm_seeds):.4f} vs "
                   f"{statistics.mean(_item(r)[3] for r in ar_seeds):.4f}: difference {d:+.4f}, Welch 95% "
                   f"[{lo:+.4f}, {hi:+.4f}]" + (f"; seed by seed, paired over users: {by_seed}" if by_seed else "")
                   + f". SID N@10 {sid_d:.4f} vs {sid_a:.4f} (the paper, at its scale: "
                     f"{PAPER[dataset][3]:.4f} vs TIGER's {PAPER_TIGER[dataset][3]:.4f}).")
    elif "ar" in results:
        d, lo, hi, how = _interval(counterpart("diffgrm", results["ar"], results, history or {}), results["ar"], sd)
        out.append(f"- **DiffGRM vs AR** (one run each{stale_mark(results['ar'])}): "
                   f"{_verdict(lo, hi, 'DiffGRM beats AR', 'AR beats DiffGRM', 'neither beats the other')}: "
                   f"item N@10 difference {d:+.4f} [{lo:+.4f}, {hi:+.4f}] ({how}).")
    for variant in VARIANTS:
        r = results.get(variant.name)
        if r is None:
            continue
        against = counterpart(variant.paired_with or "diffgrm", r, results, history or {})
        d, lo, hi, how = _interval(r, against, sd)
        machines = ", made on another machine" if machine_of(r) != machine_of(against) else ""
        where = f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}] item N@10 ({how}{stale_mark(r)}{machines})"
        if variant.paper and variant.paper != "full" and dataset in PAPER_ABLATIONS[variant.paper]:
            paper_d = PAPER_ABLATIONS[variant.paper][dataset] - PAPER_ABLATIONS["full"][dataset]
            way = _verdict(lo, hi, "the other way (better than the full method)",
                           "the paper's way, resolved", "inside the noise")
            out.append(f"- **{variant.what}**: {where}; the paper: {paper_d:+.4f} SID N@10. Here: {way}.")
        elif variant.name in DEPARTURES:
            verdict = _verdict(lo, hi, "the paper's form scores higher", "ours scores higher", "no difference resolved")
            out.append(f"- **{DEPARTURES[variant.name]}**: {variant.what}: {where}; {verdict}.")
        elif variant.name in OPTIONS:
            verdict = _verdict(lo, hi, "higher with it", "lower with it", "no difference resolved")
            out.append(f"- **{OPTIONS[variant.name]}**: {where}; {verdict}.")
    best = tuned_best(results).get("dense")
    if best is not None:
        r = results[best]
        tried = sum(v.tune_group == "dense" and v.name in results for v in VARIANTS)
        d, lo, hi, how = _interval(r, main, sd)
        published = "; ".join(f"{src}: R@10 {r10}, N@10 {n10}" for src, r10, n10 in PUBLISHED_DENSE.get(dataset, ()))
        out.append(f"- **Dense baseline**, best of {tried} settings on validation ({names[best].what}"
                   f"{stale_mark(r)}): item N@10 {_item(r)[3]:.4f}, R@10 {_item(r)[2]:.4f}, "
                   f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}] over DiffGRM ({how})."
                   + (f" Published, item level at paper scale: {published}." if published else ""))
    return out


def relative_spread(found: dict[str, dict[str, dict]], history: dict[str, dict[str, list[dict]]],
                    value=lambda r: _item(r)[3]) -> tuple[float, str] | None:
    """The largest relative run-to-run sd of ``value`` (default item N@10; sd / mean) any
    dataset measured."""
    best = None
    for dataset, results in found.items():
        for runs in seed_groups(results, history.get(dataset, {})).values():
            n10 = [value(r) for r in runs]
            rel = statistics.stdev(n10) / statistics.mean(n10)
            if best is None or rel > best[0]:
                best = (rel, dataset.capitalize())
    return best


def write_table(found: dict[str, dict[str, dict]], root: Path = RESULTS) -> Path:
    from diffgrm_dist.core.config import load_config

    history = load_history(root)
    spread = relative_spread(found, history)
    cfg = load_config(config_path("beauty"))
    m, t, e = cfg.model, cfg.train, cfg.eval
    params = {r["train"].get("parameters") for rs in found.values() for r in rs.values()
              if r["metrics"]["decoder"] == "diffusion"}
    commits = sorted({r["commit"][:7] for rs in found.values() for r in rs.values() if r.get("commit")})
    machines = sorted({machine_of(r) for rs in found.values() for r in rs.values() if r.get("machine")})
    lines = [
        "# Results", "",
        "Generated by `python tools/reproduce.py --table-only` from `results/cpu/<dataset>/<variant>.json`; "
        "each JSON holds its command, config hash, commit, machine and wall times. Other folders: "
        "`demo/` (ML-100K demo), `bench/` (speed), `faults/`, `stress/` (`diffgrm stress`), `scale/` (the pipeline at "
        "growing data sizes, `tools/bench_scale.py`), `beauty_cpu/` (the first Beauty CPU runs, now under `cpu/beauty/`).", "",
        "## CPU-scale reproduction (Beauty, Sports, Toys)", "",
        f"**Scale.** The paper's data, protocol and method (leave-one-out, full-catalogue ranking, all test "
        f"users) with a model and budget sized for 2 CPU cores (`configs/cpu/scale.yaml` over each paper "
        f"config): d_model {m.d_model}, {m.heads} heads, FFN {m.ffn}, {m.encoder_layers} encoder / "
        f"{m.decoder_layers} decoder layers ({', '.join(str(p) for p in sorted(p for p in params if p)) or '?'} "
        f"parameters for DiffGRM; paper 5.6M), batch {t.batch_size}, {t.epochs} epochs (paper up to 200), "
        f"LR {t.lr} after {t.warmup_steps} warm-up steps, validation on {e.valid_users} sampled users from "
        f"epoch {t.valid_start_epoch}, test beam {e.beam_size} (paper 128-256). About 20-60 min per run.", "",
        "**Levels.** *Item level* is the honest metric: a hit only if the true item is ranked (items of "
        "one code ranked by log p(code) + log p(item | code)). *SID level* is the paper's scoring (a hit if "
        "the true item's code is ranked; items sharing a code count as one). The paper's rows are SID "
        "level at paper scale: compare them with the SID columns, and expect the gap a 1M-parameter, "
        "8-epoch model leaves.", "",
        "**Collaborative SIDs** (row *SIDs from text + co-occurrence vectors*, not in the paper): the same "
        "model, objective and decoding, on SIDs quantised from each item's text embedding joined with a "
        "64-dim PPMI + SVD vector of its training co-occurrences (`tokenize.collaborative_dim=64`). "
        "Sports ships a short phrase per item as its only text (the paper had title, brand, categories "
        "and description); there, text alone leaves 2,526 colliding items and codes that say little "
        "about what users take next.", "",
        f"**Which code made a row.** A row marked *[at <commit>]* was made before the last change to "
        f"quality-bearing code (`QUALITY_CODE` in `tools/reproduce.py`; now: {last_quality_change()}), *\\** "
        f"where its package code had uncommitted changes; `python tools/reproduce.py --check DATASET/VARIANT` "
        f"re-runs it at HEAD and prints the difference with its interval. Unmarked rows were made by the "
        f"code at HEAD.", "",
        f"Commits: {', '.join(commits)}. Machine: {'; '.join(machines)}.", "",
    ]
    said = {d: findings(d, found[d], history.get(d, {}), spread) for d in DATASETS if d in found}
    if any(said.values()):
        lines += ["## What the table says", "",
                  "Differences in item N@10 with their 95% intervals: *paired* over the same test users "
                  "(bootstrap) where both rows wrote their rankings, else read against the run-to-run sd; "
                  "a claim holds only where its interval excludes 0.", ""]
        for dataset, bullets in said.items():
            if bullets:
                lines += [f"**{dataset.capitalize()}**", "", *bullets, ""]
    for dataset in DATASETS:
        if dataset in found:
            lines += dataset_table(dataset, found[dataset], history.get(dataset, {}), spread)
    lines.append("![item-level NDCG@10 per variant](cpu/ndcg10.png)")
    out = root / "README.md"
    out.write_text("\n".join(lines) + "\n")
    plot(found, root / "cpu" / "ndcg10.png")
    return out


def plot(found: dict[str, dict[str, dict]], path: Path) -> None:
    """Grouped bars: item-level NDCG@10 of each variant per dataset, popularity as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v.name for v in VARIANTS if any(v.name in rs for rs in found.values())]
    datasets = [d for d in DATASETS if d in found]
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        rs = found[dataset]
        shown = [n for n in names if n in rs]
        ax.bar(range(len(shown)), [_item(rs[n])[3] for n in shown], color="tab:blue")
        ax.axhline(next(iter(rs.values()))["metrics"]["popularity"]["ndcg@10"], color="tab:red", ls="--",
                   label="popularity")
        ax.set_xticks(range(len(shown)), shown, rotation=45, ha="right", fontsize=8)
        ax.set_title(dataset.capitalize())
        ax.set_ylabel("item NDCG@10 (test)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(committed: dict | None, fresh: dict, groups: dict[str, list[dict]],
            found: dict[str, dict[str, dict]] | None = None,
            history: dict[str, dict[str, list[dict]]] | None = None) -> dict:
    """HEAD's run next to the committed row: each metric's difference and its 95% interval
    (± 1.96 x sqrt(2) x the larger run-to-run sd of that metric over the seed groups; a
    dataset without seed runs borrows the largest relative sd ``found`` measured, scaled to
    the committed value, as its table does)."""
    metrics = {"item N@10": lambda r: _item(r)[3], "item R@10": lambda r: _item(r)[2],
               "SID N@10": lambda r: _sid(r)[1]}
    out: dict = {"committed_commit": committed.get("commit") if committed else None,
                 "head_commit": fresh["commit"], "committed_machine": machine_of(committed) if committed else None,
                 "head_machine": machine_of(fresh), "sids": {}, "metrics": {}}
    out["sids"] = {"committed": sid_fingerprint(committed) if committed else None, "head": sid_fingerprint(fresh)}
    for name, value in metrics.items():
        borrowed = relative_spread(found, history or {}, value) if found and not groups else None
        sd, spreads = run_to_run_sd(groups, value, committed or fresh, borrowed)
        row = {"head": value(fresh), "sd": sd, "spreads": spreads}
        if committed is not None:
            diff = value(fresh) - value(committed)
            half = Z95 * math.sqrt(2) * sd
            row |= {"committed": value(committed), "diff": diff, "interval": [diff - half, diff + half]}
        out["metrics"][name] = row
    return out


def format_check(row: str, check: dict) -> list[str]:
    head = check["head_commit"][:7]
    lines = [f"{row}: committed at {(check['committed_commit'] or 'none')[:7]}, re-run at HEAD {head}"]
    if check.get("committed_machine") != check.get("head_machine"):
        lines.append(f"  machines differ: committed on {check.get('committed_machine')}; "
                     f"HEAD on {check.get('head_machine')}")
    for name, m in check["metrics"].items():
        if "committed" not in m:
            lines.append(f"  {name:10s} HEAD {m['head']:.4f} (no committed row)")
            continue
        lo, hi = m["interval"]
        inside = "inside" if lo <= 0 <= hi else "OUTSIDE"
        lines.append(f"  {name:10s} committed {m['committed']:.4f}  HEAD {m['head']:.4f}  diff {m['diff']:+.4f}  "
                     f"95% interval [{lo:+.4f}, {hi:+.4f}] (0 {inside}; sd {m['sd']:.4f} = larger of "
                     + ", ".join(f"{k} {v:.4f}" for k, v in m["spreads"].items()) + ")")
    fmt = lambda f: " / ".join(f"{v:,}" for v in f) if f else "-"  # noqa: E731
    lines.append(f"  SIDs (distinct / colliding / max per code): committed {fmt(check['sids']['committed'])}, "
                 f"HEAD {fmt(check['sids']['head'])}")
    return lines


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.rename(path)


def check_groups(results: dict[str, dict], history: dict[str, list[dict]], name: str,
                 committed: dict | None, fresh: dict) -> dict[str, list[dict]]:
    """The spreads as they would be with HEAD's run in the table: its own seed group included,
    and the committed row still counted (as history) where it shares SIDs with other seeds."""
    earlier = [*history.get(name, []), *([committed] if committed else [])]
    return seed_groups({**results, name: fresh}, {**history, name: earlier})


def check_rows(rows: list[str], work: Path, replace: bool) -> None:
    """Re-runs each DATASET/VARIANT at HEAD (a fresh work folder per commit, so no stage made
    by older code is adopted) and prints it against the committed row."""
    head = git_info(ROOT)
    if not head["commit"] or head["changed_package_files"]:
        raise SystemExit("--check: commit the package first, so the re-run names the code it ran")
    work = work / f"check-{head['commit'][:7]}"
    names = {v.name: v for v in VARIANTS}
    for row in rows:
        dataset, _, name = row.partition("/")
        if dataset not in DATASETS or name not in names or dataset not in names[name].datasets:
            raise SystemExit(f"--check {row}: not a DATASET/VARIANT of this table")
        (work / dataset).mkdir(parents=True, exist_ok=True)
        fresh = run_pair(dataset, names[name], work.resolve())
        found, history = load_results(), load_history()
        committed = found.get(dataset, {}).get(name)
        check = compare(committed, fresh, check_groups(found.get(dataset, {}), history.get(dataset, {}),
                                                       name, committed, fresh), found, history)
        print("\n".join(format_check(row, check)), flush=True)
        write_json(RESULTS / "checks" / dataset / f"{name}.json", {"row": row, **check, "head_result": fresh})
        if replace:
            if committed is not None:
                write_json(history_path(dataset, name, committed.get("commit") or "unknown"), committed)
            write_json(result_path(dataset, name), fresh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS],
                        default=[v.name for v in VARIANTS], help="run in this table's order")
    parser.add_argument("--work", type=Path, default=Path("/tmp/diffgrm-repro"),
                        help="run directories (outside the repo; keep it to reuse stages)")
    parser.add_argument("--table-only", action="store_true", help="only regenerate the table and plot")
    parser.add_argument("--check", nargs="+", metavar="DATASET/VARIANT",
                        help="re-run these rows at HEAD and print them against the committed values")
    parser.add_argument("--replace", action="store_true", help="with --check: HEAD's runs become the rows")
    args = parser.parse_args()
    if args.check:
        check_rows(args.check, args.work, args.replace)
    elif not args.table_only:
        chosen = [v for v in VARIANTS if v.name in args.variants]
        for variant in chosen:
            for dataset in args.datasets:
                target = result_path(dataset, variant.name)
                if dataset not in variant.datasets:
                    continue
                if target.is_file():
                    print(f"{dataset}/{variant.name}: result exists, skipped")
                    continue
                (args.work / dataset).mkdir(parents=True, exist_ok=True)
                result = run_pair(dataset, variant, args.work.resolve())
                write_json(target, result)
                item, pop = result["metrics"]["item"], result["metrics"]["popularity"]
                print(f"{dataset}/{variant.name}: item N@10 {item['ndcg@10']:.4f} R@10 {item['recall@10']:.4f} "
                      f"({item['ndcg@10'] / pop['ndcg@10']:.2f}x popularity N@10), "
                      f"{result['wall_s']['pipeline'] / 60:.0f} min", flush=True)
    print(f"table: {write_table(load_results())}")


if __name__ == "__main__":
    main()
