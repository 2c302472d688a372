"""Benchmark of decoding, before/after in one run: CPD users/s of the baseline tree's package
vs this checkout's, fp32 and bf16, by beam width; optionally CPD vs AR and catalogue size.

Default: CPD on the reference model (d=256, 1 encoder / 4 decoder layers; `--d-model` for another), 4 x 256 codes,
100k random items, beams 32 / 128 / 256, three rows per beam, each in a fresh subprocess
(peak RSS is its own; ``PYTHONPATH`` selects the package, see ``benchlib.run_isolated``):

- ``before``: the baseline tree (``--baseline-tree``, default /tmp/base), fp32. Ratios
  are against this row of the same beam.
- ``after``: this checkout, fp32.
- ``after bf16``: this checkout, encode + CPD under ``torch.autocast("cpu", bfloat16)``
  (current tree only: the child is told which tree it runs and refuses bf16 otherwise).
Each row times ``--users`` users in batches of ``--batch`` (encode, CPD, distinct SIDs,
top items) after a warm-up batch; it also records this process's CPU time and the
machine's load average (on a shared machine, read ratios with it), and the top-10 items
of the first users, so the JSON tells whether before and after recommend the same items.
Models are untrained: decoding cost does not depend on the weights.

Optional sections (this checkout, fp32):
- ``--ar``: AR beam search at the same beams, and CPD/AR users/s (the earlier table 1).
- ``--sizes N...``: CPD users/s for catalogues of N random items (index build time and
  size) against the foil, exhaustive dense scoring (the user's encoder state against
  every item's embedding, then top-K); a d=64 model keeps a 10M x d matrix in memory.
  The earlier default was ``--sizes 10000 100000 1000000 10000000``.

    python tools/bench_decode.py                      # before/after, 64 users
    python tools/bench_decode.py --users 8            # quick check
    python tools/bench_decode.py --ar --sizes 10000 100000 1000000 10000000
    python tools/bench_decode.py --baseline-tree ''   # no before rows

Writes ``tools/results/bench_decode.json`` (and ``bench_decode.png`` with ``--ar`` or
``--sizes``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from benchlib import (
    ROOT,
    add_baseline_arg,
    baseline_tree,
    catalogue_module,
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

SIZES = (256, 256, 256, 256)
HISTORY = 20
SHOW_USERS = 4  # users whose top-10 items each row records


def users_batch(users: int, length: int = HISTORY, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, 256, (users, length, 4), generator=g)
    mask = torch.ones(users, length, dtype=torch.bool)
    return history, mask


def random_codes(items: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (items, 4), dtype=np.int64)


def reference_model(d_model: int):
    import torch

    ModelConfig = package_module("core.config").ModelConfig  # noqa: N806 (classes)
    network = package_module("model.network")
    DiffGRM, SidSpec = network.DiffGRM, network.SidSpec  # noqa: N806

    torch.manual_seed(0)
    layers = 4 if d_model >= 256 else 2
    return DiffGRM(ModelConfig(d_model=d_model, heads=4, ffn=4 * d_model, decoder_layers=layers,
                               dropout=0.0), SidSpec(SIZES, HISTORY)).eval()


def decode_run(cfg: dict) -> dict:
    """One decoder / beam / catalogue / precision, in this process (a ``--one`` child)."""
    import torch

    search = package_module("decode.search")
    ar_beam_search, cpd, distinct_sids, top_items = search.ar_beam_search, search.cpd, search.distinct_sids, search.top_items
    Catalogue = catalogue_module().Catalogue  # noqa: N806 (a class)

    decoder, beam, users, items = cfg["decoder"], cfg["beam"], cfg["users"], cfg["items"]
    d_model, batch, bf16 = cfg["d_model"], cfg["batch"], cfg["bf16"]
    if bf16 and not cfg["current"]:
        raise SystemExit("bf16 autocast is an option of the current tree only")
    torch.set_num_threads(os.cpu_count() or 1)
    model = reference_model(d_model)
    codes = random_codes(items)
    before = peak_rss_mib()
    start = time.perf_counter()
    catalogue = Catalogue(codes, SIZES)
    build_s = time.perf_counter() - start
    history, mask = users_batch(users)
    search = cpd if decoder == "cpd" else ar_beam_search
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def recommend(lo: int, hi: int) -> np.ndarray:
        with autocast:
            memory = model.encode(history[lo:hi], mask[lo:hi])
            beams = search(model, memory, catalogue, beam)
        groups, scores = distinct_sids(beams, 10)
        return top_items(groups, scores, catalogue, 10)[0]

    with torch.no_grad():
        calls = [lambda: recommend(0, min(users, cfg["warmup_users"]))]  # warm-up (allocations, first calls)
        calls += [lambda lo=lo: recommend(lo, lo + batch) for lo in range(0, users, batch)]
        timed = timing().time_calls(calls, warmup=1)
        tops, seconds, cpu_s = timed.timed_results, timed.seconds, timed.cpu_seconds
    return {"decoder": decoder, "beam": beam, "items": items, "users": users, "d_model": d_model,
            "batch": batch, "bf16": bf16, "users_per_s": users / seconds, "seconds": seconds,
            "cpu_s": cpu_s, "load_avg_1m": os.getloadavg()[0], "index_build_s": build_s,
            "index_mib": catalogue.nbytes / 2**20, "peak_rss_mib": peak_rss_mib(),
            "rss_growth_mib": peak_rss_mib() - before,
            "top10_first_users": np.concatenate(tops)[:SHOW_USERS].tolist(), **package_info()}


def dense_run(cfg: dict) -> dict:
    """Foil: score every item embedding (item MLP over its code embeddings) for each user."""
    import torch

    users, items, d_model, batch = cfg["users"], cfg["items"], cfg["d_model"], cfg["batch"]
    torch.set_num_threads(os.cpu_count() or 1)
    model = reference_model(d_model)
    codes = torch.from_numpy(random_codes(items))
    before = peak_rss_mib()
    with torch.no_grad():
        start = time.perf_counter()
        table = torch.empty(items, d_model)
        for lo in range(0, items, 1 << 20):  # item embeddings, computed once
            chunk = codes[lo:lo + (1 << 20)] + model.offsets
            table[lo:lo + len(chunk)] = model.item_mlp(model.codes(chunk).flatten(1))
        build_s = time.perf_counter() - start
        history, mask = users_batch(users)
        start = time.perf_counter()
        for lo in range(0, users, batch):
            memory = model.encode(history[lo:lo + batch], mask[lo:lo + batch])
            (memory.last @ table.T).topk(10, dim=1)
        seconds = time.perf_counter() - start
    return {"decoder": "dense", "items": items, "users": users, "d_model": d_model,
            "users_per_s": users / seconds, "seconds": seconds, "index_build_s": build_s,
            "index_mib": table.numel() * 4 / 2**20, "peak_rss_mib": peak_rss_mib(),
            "rss_growth_mib": peak_rss_mib() - before, "load_avg_1m": os.getloadavg()[0], **package_info()}


def measure(args, tree: Path | None, label: str, decoder: str = "cpd", beam: int = 32,
            items: int | None = None, d_model: int = 256, batch: int | None = None,
            bf16: bool = False) -> dict:
    cfg = {"decoder": decoder, "beam": beam, "users": args.users,
           "items": args.beam_items if items is None else items, "d_model": d_model,
           "batch": args.batch if batch is None else batch, "bf16": bf16, "current": tree is None}
    cfg["warmup_users"] = cfg["batch"]
    result = run_isolated(__file__, json.dumps(cfg), tree=tree)
    print(f"  {label:<11} {decoder:<5} beam {beam:>3} {cfg['items']:>11,} items d={d_model:<3} "
          f"{result['users_per_s']:8.2f} users/s (load {result['load_avg_1m']:.1f})", flush=True)
    return {"label": label, "tree": str(tree or ROOT), **result}


# --------------------------------------------------------------------------- sections


def compare(args, base_tree: Path | None) -> list[dict]:
    """CPD before / after / after bf16 at each beam; ratios vs before of the same beam."""
    rows = []
    for beam in args.beams:
        mine = []
        if base_tree is not None:
            mine.append(measure(args, base_tree, "before", beam=beam, d_model=args.d_model))
        mine.append(measure(args, None, "after", beam=beam, d_model=args.d_model))
        if not args.no_bf16:
            mine.append(measure(args, None, "after bf16", beam=beam, d_model=args.d_model, bf16=True))
        for r in mine:
            r["baseline_row"] = mine[0]["label"]
            r["ratio_vs_before"] = ratio(r["users_per_s"], mine[0]["users_per_s"])
            r["cpu_ratio_vs_before"] = ratio(mine[0]["cpu_s"], r["cpu_s"])
            r["same_top10_as_baseline_row"] = r["top10_first_users"] == mine[0]["top10_first_users"]
        rows += mine
    print(f"\nCPD by beam: {args.users} users (batches of {args.batch}), {args.beam_items:,} random items, "
          f"d={args.d_model} / {4 if args.d_model >= 256 else 2} decoder layers, 4 x 256 codes")
    print(f"{'beam':>5} {'row':<11} {'users/s':>9} {'vs before':>9} {'cpu s':>7} {'cpu vs before':>13} "
          f"{'peak RSS MiB':>13} {'same top-10':>11} {'load':>5}")
    for r in rows:
        same = "base" if r["label"] == r["baseline_row"] else ("yes" if r["same_top10_as_baseline_row"] else "no")
        print(f"{r['beam']:>5} {r['label']:<11} {r['users_per_s']:>9.2f} {fmt_ratio(r['ratio_vs_before']):>9} "
              f"{r['cpu_s']:>7.2f} {fmt_ratio(r['cpu_ratio_vs_before']):>13} {r['peak_rss_mib']:>13.0f} "
              f"{same:>11} {r['load_avg_1m']:>5.1f}")
    if rows and rows[0]["baseline_row"] != "before":
        print(f"(no before rows: ratios are against '{rows[0]['baseline_row']}')")
    print(f"(users/s and vs before: wall clock; cpu s: the process's CPU time for all users, and cpu vs "
          "before its ratio (before / row): steadier than wall clock when the machine is shared;\n"
          f" same top-10: the first {SHOW_USERS} users' top-10 items equal the baseline row's; bf16 may "
          "legitimately reorder near-ties)")
    return rows


def ar_table(args, cpd_rows: list[dict]) -> list[dict]:
    """CPD (this checkout, fp32) vs AR beam search at each beam."""
    rows = []
    for beam in args.beams:
        cpd_row = next((r for r in cpd_rows if r["label"] == "after" and r["beam"] == beam), None)
        rows.append(cpd_row or measure(args, None, "after", beam=beam))
        rows.append(measure(args, None, "after", decoder="ar", beam=beam))
    print(f"\nCPD vs AR: {args.users} users, {args.beam_items:,} items, d=256 model, this checkout, fp32")
    print(f"{'decoder':<8} {'beam':>5} {'users/s':>9} {'peak RSS MiB':>13} {'CPD/AR':>7}")
    for r in rows:
        ar = next(x for x in rows if x["decoder"] == "ar" and x["beam"] == r["beam"])
        r["ratio_vs_ar"] = r["users_per_s"] / ar["users_per_s"]
        print(f"{r['decoder']:<8} {r['beam']:>5} {r['users_per_s']:>9.2f} {r['peak_rss_mib']:>13.0f} "
              f"{r['ratio_vs_ar']:>6.2f}x")
    return rows


def size_table(args) -> list[dict]:
    rows = []
    for items in args.sizes:
        rows.append(measure(args, None, "after", beam=32, items=items, d_model=64, batch=64))
        cfg = {"dense": True, "users": args.users, "items": items, "d_model": 64, "batch": 64}
        rows.append({"label": "dense", "tree": str(ROOT), **run_isolated(__file__, json.dumps(cfg))})
        print(f"  {'dense':<11} {'':<5} {'':>8} {items:>11,} items d=64  {rows[-1]['users_per_s']:8.2f} users/s "
              f"(load {rows[-1]['load_avg_1m']:.1f})", flush=True)
    base = {d: next(r for r in rows if r["decoder"] == d)["users_per_s"] for d in ("cpd", "dense")}
    smallest = f"{args.sizes[0]:,}"
    print(f"\ncatalogue size: {args.users} users, beam 32, d=64 model; baseline = the {smallest} catalogue")
    print(f"{'items':>11} {'decoder':<7} {'users/s':>9} {'vs first':>8} {'index MiB':>10} {'build s':>8} "
          f"{'peak RSS MiB':>13}")
    for r in rows:
        r["ratio_vs_smallest"] = r["users_per_s"] / base[r["decoder"]]
        print(f"{r['items']:>11,} {r['decoder']:<7} {r['users_per_s']:>9.2f} {r['ratio_vs_smallest']:>7.2f}x "
              f"{r['index_mib']:>10.1f} {r['index_build_s']:>8.2f} {r['peak_rss_mib']:>13.0f}")
    return rows


def plot(beam_rows: list[dict], size_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("beam", "size") if (beam_rows if p == "beam" else size_rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "beam":
            for decoder in ("cpd", "ar"):
                rows = [r for r in beam_rows if r["decoder"] == decoder]
                ax.plot([r["beam"] for r in rows], [r["users_per_s"] for r in rows], marker="o", label=decoder)
            ax.set(xscale="log", xlabel="beam", ylabel="users/s", title="CPD vs AR (d=256, 4 dec layers)")
        else:
            for decoder in ("cpd", "dense"):
                rows = [r for r in size_rows if r["decoder"] == decoder]
                ax.plot([r["items"] for r in rows], [r["users_per_s"] for r in rows], marker="o",
                        label="CPD beam 32" if decoder == "cpd" else "exhaustive dense scoring")
            ax.set(xscale="log", yscale="log", xlabel="catalogue items", ylabel="users/s",
                   title="catalogue size (d=64)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="users per decoding batch (beam rows)")
    parser.add_argument("--beam-items", type=int, default=100_000)
    parser.add_argument("--beams", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--d-model", type=int, default=256,
                        help="model width of the beam rows (below 256: 2 decoder layers); a small model "
                             "leaves the catalogue look-ups a larger share of the time")
    parser.add_argument("--no-bf16", action="store_true", help="skip the 'after bf16' rows")
    parser.add_argument("--ar", action="store_true", help="also AR beam search vs CPD at the same beams")
    parser.add_argument("--sizes", type=int, nargs="*", default=[],
                        help="also the catalogue-size sweep (CPD vs dense scoring) at these sizes")
    add_baseline_arg(parser)
    parser.add_argument("--out", default="tools/results/bench_decode.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        cfg = json.loads(args.one)
        print(json.dumps(dense_run(cfg) if cfg.get("dense") else decode_run(cfg)))
        return

    base_tree = baseline_tree(args)
    print("measuring (each row in a fresh process):")
    rows = compare(args, base_tree)
    ar_rows = ar_table(args, rows) if args.ar else []
    size_rows = size_table(args) if args.sizes else []
    meta = provenance(base_tree)
    print_provenance(meta)
    out = write_json(args.out, {
        "benchmark": "decode", **meta, "baseline_row": "before" if base_tree else None,
        "settings": {"users": args.users, "batch": args.batch, "beam_items": args.beam_items,
                     "beams": args.beams, "history": HISTORY},
        "rows": rows, "beam_rows": ar_rows, "size_rows": size_rows})
    wrote = [str(out)]
    if ar_rows or size_rows:
        plot(ar_rows, size_rows, out.with_suffix(".png"))
        wrote.append(str(out.with_suffix(".png")))
    print(f"wrote {' and '.join(wrote)}")


if __name__ == "__main__":
    main()
