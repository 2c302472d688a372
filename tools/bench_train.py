"""Benchmark of the training step, before/after in one run: the baseline tree's package vs
this checkout's, plain PyTorch and DeepSpeed ZeRO-1, and what batch padding and bf16 do.

The reference model (d=256, 4 heads, FFN 1024, 1 encoder / 4 decoder layers, 4 x 256 codes,
50 history slots, ~5.6M parameters) trains with the OCN objective on random codes whose
history lengths are those of the Amazon Beauty training windows (window t of a sequence
of n items has min(t, 50) history items, t = 2..n-3; from
``../shared/data/amazon2014/beauty/user_sequence.txt``, or ``$DIFFGRM_SHARED_DATA``, or
``--sequences``; a geometric distribution with mean 8 if the file is absent). Each
configuration runs in a fresh subprocess (peak RSS is its own), ``PYTHONPATH`` selecting
the package (``benchlib.run_isolated``). Loop kinds: ``plain`` (torch AdamW,
clip_grad_norm_) and ``zero1`` (DeepSpeed ZeRO-1 in a one-rank gloo group). Rows per kind:

- ``before``: the baseline tree (``--baseline-tree``, default /tmp/base), batches padded
  to 50 slots, fp32: what the old code did. Ratios are against this row.
- ``after: fixed-50 fp32``: this checkout, the same batches (the code change alone).
- ``after: batch-padded (random)``: each batch left padded only to its longest history,
  batches drawn at random: what padding alone buys without bucketing.
- ``after: batch-padded (bucketed)``: the same, batches formed as a length-bucketing loader
  does (shuffle, chunks of 16 batches sorted by length, cut into batches).
- ``after: bf16 autocast``: forward under ``torch.autocast("cpu", dtype=torch.bfloat16)``
  (backward and optimiser step outside it), fixed 50 slots.
- ``after: both``: bucketed batch padding + bf16 autocast.
Batch padding and bf16 run on this checkout only (the old model indexes positions from
the first slot, so narrower tensors would change its results); the child is told so
(``current``) and refuses them otherwise.

Timed batches are a stratified sample of the epoch's batches (one per quantile of tensor
width), so a few steps estimate an epoch's mean step time; ``--warmup`` steps (default 1,
the widest batches) are not timed. Reported: step seconds (wall and this process's CPU;
the machine's load average is recorded: on a shared machine, read ratios with it),
samples/s, ratio vs ``before``, peak RSS, and
the loss of every step (warm-up included): a bf16 row's losses against the fp32 row with
the same init and batches (a sanity check that the curves agree within noise), ``before``
against fixed-50 fp32 (the same computation in both trees), and batch-padded (random)
against fixed-50 fp32: the same samples, but dropout (0.1) draws its masks over the
narrower tensors, so they agree within noise rather than exactly.

    python tools/bench_train.py                                   # before/after, batch 1024
    python tools/bench_train.py --batch 128 --steps 1             # quick check
    python tools/bench_train.py --kinds plain --rows before bucketed both
    python tools/bench_train.py --rows --stages 0 1 2 3           # only the ZeRO-stage table
    python tools/bench_train.py --baseline-tree ''                # no before rows

``--stages S...`` adds the earlier table (plain vs ZeRO stages S, OCN vs random masking;
this checkout, fixed 50 slots, fp32). Writes ``tools/results/bench_train.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from benchlib import (
    ROOT,
    add_baseline_arg,
    baseline_tree,
    fmt_ratio,
    package_info,
    package_module,
    peak_rss_mib,
    print_provenance,
    provenance,
    ratio,
    run_isolated,
    timing,
    write_json,
)

MAX_HISTORY = 50
DIGITS, CODES = 4, 256
BUCKET_BATCHES = 16
SEQUENCES = (Path(os.environ.get("DIFFGRM_SHARED_DATA", ROOT.parent / "shared" / "data"))
             / "amazon2014" / "beauty" / "user_sequence.txt")

# name -> (label, padding, bf16); padding other than fixed and bf16 run on the current tree only
ROWS = {
    "before": ("before", "fixed", False),
    "fixed": ("after: fixed-50 fp32", "fixed", False),
    "random": ("after: batch-padded (random)", "random", False),
    "bucketed": ("after: batch-padded (bucketed)", "bucketed", False),
    "bf16": ("after: bf16 autocast", "fixed", True),
    "both": ("after: both (bucketed + bf16)", "bucketed", True),
}
# (row, its fp32 reference for the loss check)
LOSS_PAIRS = (("bf16", "fixed"), ("both", "bucketed"), ("before", "fixed"), ("random", "fixed"))


# --------------------------------------------------------------------------- data


def window_lengths(sequences: str) -> tuple[np.ndarray, str]:
    """History lengths of all training windows, and where they came from."""
    path = Path(sequences)
    if path.is_file():
        out = []
        with path.open() as f:
            for line in f:
                n = len(line.split()) - 1  # USER ITEM ITEM ...
                if n >= 5:
                    out.append(np.minimum(np.arange(2, n - 2), MAX_HISTORY))
        lengths = np.concatenate(out) if out else np.zeros(0, np.int64)
        return lengths.astype(np.int64), f"Amazon Beauty training windows ({path})"
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.geometric(1 / 8, 100_000), MAX_HISTORY)
    return lengths.astype(np.int64), f"geometric, mean 8, clipped to {MAX_HISTORY} ({path} absent)"


def epoch_plan(lengths: np.ndarray, batch: int, padding: str, seed: int = 0) -> list[np.ndarray]:
    """One epoch's full batches of history lengths. ``bucketed``: shuffle, chunks of
    ``BUCKET_BATCHES`` batches each sorted by length, cut into batches; otherwise random."""
    shuffled = np.random.default_rng(seed).permutation(lengths)
    count = len(shuffled) // batch
    if count == 0:
        raise SystemExit(f"--batch {batch}: more than the {len(lengths)} windows")
    shuffled = shuffled[:count * batch]
    if padding == "bucketed":
        chunk = BUCKET_BATCHES * batch
        shuffled = np.concatenate([np.sort(shuffled[i:i + chunk]) for i in range(0, len(shuffled), chunk)])
    return list(shuffled.reshape(count, batch))


def width_of(lengths: np.ndarray, padding: str) -> int:
    return MAX_HISTORY if padding == "fixed" else max(1, int(lengths.max()))


def timed_batches(plan: list[np.ndarray], padding: str, steps: int, warmup: int = 1) -> list[int]:
    """Indices of ``warmup`` batches (the widest) and ``steps`` batches, one per width
    quantile of the epoch, so that their mean step time estimates the epoch's. ``fixed``
    picks by the widths its batches would have batch-padded, so it times the very batches
    of ``random`` (same plan): their losses must agree."""
    widths = np.array([width_of(b, "random" if padding == "fixed" else padding) for b in plan])
    order = np.lexsort((np.arange(len(plan)), widths))
    picks = [int(order[min(len(plan) - 1, int((i + 0.5) * len(plan) / steps))]) for i in range(steps)]
    return [int(order[-1 - i % len(plan)]) for i in range(warmup)] + picks


def make_batch(lengths: np.ndarray, padding: str, index: int, seed: int = 0):
    """(history, mask, targets) of batch ``index``: random codes, left padded to 50 slots
    (``fixed``) or to the longest history; the same codes either way."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    full = torch.randint(0, CODES, (len(lengths), MAX_HISTORY, DIGITS), generator=g)
    targets = torch.randint(0, CODES, (len(lengths), DIGITS), generator=g)
    width = width_of(lengths, padding)
    mask = torch.arange(width)[None] >= width - torch.from_numpy(lengths)[:, None]
    return full[:, MAX_HISTORY - width:].contiguous(), mask, targets


def padding_stats(lengths: np.ndarray, batch: int) -> dict:
    out = {"windows": len(lengths), "mean_length": float(lengths.mean()),
           "share_at_max": float((lengths == MAX_HISTORY).mean())}
    for padding in ("fixed", "random", "bucketed"):
        widths = [width_of(b, padding) for b in epoch_plan(lengths, batch, padding)]
        out[f"mean_width_{padding}"] = float(np.mean(widths))
    return out


# --------------------------------------------------------------------------- one measurement


def run_one(cfg: dict) -> dict:
    """One loop kind / padding / precision, in this process (a ``--one`` child)."""
    import torch

    config, network = package_module("core.config"), package_module("model.network")
    ExperimentConfig, ModelConfig = config.ExperimentConfig, config.ModelConfig  # noqa: N806 (classes)
    DiffGRM, SidSpec = network.DiffGRM, network.SidSpec  # noqa: N806
    DiffusionObjective = package_module("model.objectives").DiffusionObjective  # noqa: N806

    kind, objective, batch, steps = cfg["kind"], cfg["objective"], cfg["batch"], cfg["steps"]
    padding, bf16 = cfg["padding"], cfg["bf16"]
    if (padding != "fixed" or bf16) and not cfg["current"]:
        raise SystemExit("batch padding and bf16 are options of the current tree only")
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    lengths, _ = window_lengths(cfg["sequences"])
    plan = epoch_plan(lengths, batch, padding)
    warmup = cfg["warmup"]
    picks = timed_batches(plan, padding, steps, warmup)
    data = [make_batch(plan[i], padding, i) for i in picks]
    spec = SidSpec((CODES,) * DIGITS, MAX_HISTORY)
    before = peak_rss_mib()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    if kind == "plain":
        model = DiffGRM(ModelConfig(), spec)
        obj = DiffusionObjective(model, objective, "max_prob", 0.1, "view").train()
        opt = torch.optim.AdamW(obj.parameters(), lr=1e-3, weight_decay=0.0)

        def step(b):
            with autocast:
                loss = obj(*b)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(obj.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        engine = package_module("train.engine")
        build_engine, init_local_process_group = engine.build_engine, engine.init_local_process_group

        init_local_process_group()
        ecfg = ExperimentConfig()
        ecfg.train.objective, ecfg.train.zero_stage, ecfg.train.batch_size = objective, int(kind[4:]), batch
        ecfg.train.warmup_steps = 1
        engine, model, _ = build_engine(ecfg, spec, world=1, total_steps=steps + 1)

        def step(b):
            with autocast:
                loss = engine(*b)
            engine.backward(loss)
            engine.step()
            return loss

    # The first ``warmup`` steps: allocations, first-call overheads; not timed.
    timed = timing().time_calls([lambda b=b: float(step(b).detach().float()) for b in data], warmup)
    losses, seconds = timed.results, timed.seconds
    times, cpu = [*timed.warmup_s, *timed.wall_s], [0.0] * warmup + timed.cpu_s
    return {"kind": kind, "objective": objective, "batch": batch, "steps": steps, "warmup": warmup,
            "padding": padding, "bf16": bf16, "widths": [int(b[0].shape[1]) for b in data[warmup:]],
            "step_s": seconds / steps, "step_times_s": times[warmup:], "warmup_s": times[:warmup],
            "step_cpu_s": sum(cpu[warmup:]) / steps, "load_avg_1m": os.getloadavg()[0],
            "samples_per_s": batch * steps / seconds, "peak_rss_mib": peak_rss_mib(),
            "rss_growth_mib": peak_rss_mib() - before, "losses": losses, "loss": losses[-1],
            "parameters": model.num_parameters(), **package_info()}


def measure(kind: str, row: str | None, args, tree: Path | None, objective: str = "ocn",
            padding: str = "fixed", bf16: bool = False) -> dict:
    if row is not None:
        _, padding, bf16 = ROWS[row]
    cfg = {"kind": kind, "objective": objective, "batch": args.batch, "steps": args.steps,
           "warmup": args.warmup, "padding": padding, "bf16": bf16, "current": tree is None,
           "sequences": args.sequences}
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    result = run_isolated(__file__, json.dumps(cfg), env=env, tree=tree)
    label = ROWS[row][0] if row is not None else kind
    print(f"  {kind:<6} {label:<32} {result['step_s']:7.2f} s/step (load {result['load_avg_1m']:.1f})",
          flush=True)
    return {"row": row, "label": label, "tree": str(tree or ROOT), **result}


# --------------------------------------------------------------------------- reports


def compare(args, base_tree: Path | None) -> list[dict]:
    rows = []
    wanted = [r for r in args.rows if r != "before" or base_tree is not None]
    for kind in args.kinds:
        for row in wanted:
            rows.append(measure(kind, row, args, base_tree if row == "before" else None))
    for kind in args.kinds:
        mine = [r for r in rows if r["kind"] == kind]
        base = next((r for r in mine if r["row"] == "before"), mine[0] if mine else None)
        for r in mine:
            r["baseline_row"] = base["label"]
            r["ratio_vs_before"] = ratio(r["samples_per_s"], base["samples_per_s"])
            r["cpu_ratio_vs_before"] = ratio(base["step_cpu_s"], r["step_cpu_s"])
    return rows


def print_compare(rows: list[dict], args, stats: dict, source: str) -> None:
    if not rows:
        return
    print(f"\nreference model ({rows[0]['parameters']:,} parameters), OCN, batch {args.batch}, "
          f"{args.steps} timed step(s) + {args.warmup} warm-up")
    print(f"history lengths: {source}: {stats['windows']:,} windows, mean {stats['mean_length']:.1f}, "
          f"{stats['share_at_max']:.1%} at {MAX_HISTORY}; epoch mean tensor width: fixed "
          f"{stats['mean_width_fixed']:.0f}, batch-padded random {stats['mean_width_random']:.1f}, "
          f"bucketed {stats['mean_width_bucketed']:.1f}")
    print(f"{'kind':<6} {'row':<32} {'widths':<14} {'step s':>7} {'samples/s':>10} {'vs before':>9} "
          f"{'cpu s':>7} {'cpu vs before':>13} {'peak RSS MiB':>13} {'load':>5}")
    for r in rows:
        widths = ",".join(map(str, r["widths"]))
        print(f"{r['kind']:<6} {r['label']:<32} {widths:<14} {r['step_s']:>7.2f} {r['samples_per_s']:>10.1f} "
              f"{fmt_ratio(r['ratio_vs_before']):>9} {r['step_cpu_s']:>7.2f} "
              f"{fmt_ratio(r['cpu_ratio_vs_before']):>13} {r['peak_rss_mib']:>13.0f} {r['load_avg_1m']:>5.1f}")
    print("(step s, samples/s, vs before: wall clock per timed step; cpu s: this process's CPU time per "
          "step, cpu vs before its ratio (before / row), steadier than wall clock on a shared machine; "
          "load: the 1-min load average when the row ended; widths: tensor widths of the timed batches)")
    if rows[0]["baseline_row"] != "before":
        print(f"(no before rows: ratios are against '{rows[0]['baseline_row']}')")


def loss_checks(rows: list[dict]) -> list[dict]:
    """Each listed row's losses against its fp32 reference (same kind, init and batches)."""
    out = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        by = {r["row"]: r for r in rows if r["kind"] == kind}
        for row, ref in LOSS_PAIRS:
            if row in by and ref in by:
                a, b = np.array(by[row]["losses"]), np.array(by[ref]["losses"])
                out.append({"kind": kind, "row": by[row]["label"], "reference": by[ref]["label"],
                            "losses": a.tolist(), "reference_losses": b.tolist(),
                            "max_abs_diff": float(np.abs(a - b).max()),
                            "last_rel_diff": float(abs(a[-1] - b[-1]) / abs(b[-1]))})
    return out


def print_losses(checks: list[dict]) -> None:
    if not checks:
        return
    print("\nloss per step (warm-up first), same init and batches (batch-padded vs fixed-50: dropout "
          "masks differ with the tensor width, so within noise):")
    for c in checks:
        fmt = lambda xs: " ".join(f"{x:.4f}" for x in xs)  # noqa: E731
        print(f"  {c['kind']:<6} {c['row']:<32} {fmt(c['losses'])}\n"
              f"  {'':<6} {'vs ' + c['reference']:<32} {fmt(c['reference_losses'])}"
              f"   max |diff| {c['max_abs_diff']:.2e}, last rel {c['last_rel_diff']:.2e}")


def stage_table(args) -> dict:
    """The earlier comparison: plain vs ZeRO stages, OCN vs random masking (current tree)."""
    plain = measure("plain", None, args, None)
    rows = [plain] + [measure(f"zero{s}", None, args, None) for s in args.stages]
    random_mask = measure("plain", None, args, None, objective="random")
    print(f"\nZeRO stages: reference model ({plain['parameters']:,} parameters), batch {args.batch}, "
          f"{args.steps} timed steps, current tree, fixed {MAX_HISTORY} slots, fp32; baseline = plain "
          f"PyTorch loop, OCN objective")
    print(f"{'config':<10} {'step s':>8} {'samples/s':>10} {'vs plain':>9} {'peak RSS MiB':>13}")
    for r in rows:
        r["config"] = r["kind"]
        r["ratio_vs_plain"] = r["samples_per_s"] / plain["samples_per_s"]
        print(f"{r['config']:<10} {r['step_s']:>8.2f} {r['samples_per_s']:>10.1f} "
              f"{r['ratio_vs_plain']:>8.2f}x {r['peak_rss_mib']:>13.0f}")
    ocn_cost = plain["step_s"] / random_mask["step_s"]
    print(f"\nOCN vs random masking (plain loop): {plain['step_s']:.2f} s vs {random_mask['step_s']:.2f} s "
          f"per step -> OCN costs {ocn_cost:.2f}x (probe pass + nested views)")
    return {"stage_rows": rows, "random_masking": random_mask, "ocn_over_random_step_time": ocn_cost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (+1 warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per row (widest batches)")
    parser.add_argument("--kinds", nargs="+", default=["plain", "zero1"],
                        help="training loops: plain and/or zeroN (DeepSpeed ZeRO stage N)")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS),
                        help="before/after rows (none: skip the comparison)")
    parser.add_argument("--stages", type=int, nargs="*", default=[],
                        help="also the ZeRO-stage table for these stages, with OCN vs random masking")
    parser.add_argument("--sequences", default=str(SEQUENCES),
                        help="user_sequence.txt whose training windows give the history lengths")
    add_baseline_arg(parser)
    parser.add_argument("--out", default="tools/results/bench_train.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    base_tree = baseline_tree(args) if "before" in args.rows else None
    lengths, source = window_lengths(args.sequences)
    print(f"history lengths: {source}")
    stats = padding_stats(lengths, args.batch)
    print(f"measuring ({len(args.kinds)} kind(s) x {len(args.rows)} row(s), each in a fresh process):")
    rows = compare(args, base_tree)
    checks = loss_checks(rows)
    stages = stage_table(args) if args.stages else {}
    print_compare(rows, args, stats, source)
    print_losses(checks)
    meta = provenance(base_tree)
    print_provenance(meta)
    out = write_json(args.out, {
        "benchmark": "train_step", **meta, "baseline_row": "before" if base_tree else None,
        "settings": {"batch": args.batch, "steps": args.steps, "warmup": args.warmup, "kinds": args.kinds,
                     "rows": args.rows,
                     "bucket_batches": BUCKET_BATCHES, "max_history": MAX_HISTORY},
        "history_lengths": {"source": source, **stats}, "rows": rows, "loss_checks": checks, **stages})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
