"""Benchmark of the synthetic data generator: wall time and peak memory per size.

Each size runs in a fresh subprocess so its peak RSS is its own. The baseline, in the
same run, is a straightforward pure-Python generator (per-interaction ``random.choices``
inside each category) at the smaller sizes; the table shows the vectorised generator's
interactions/s and its speed-up over that baseline.

    python tools/bench_synthetic.py            # 10k/100k ... 1M items / 10M interactions
    python tools/bench_synthetic.py --quick    # smaller sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from benchlib import peak_rss_mib, run_isolated

SIZES = [(10_000, 100_000), (100_000, 1_000_000), (1_000_000, 10_000_000)]
QUICK_SIZES = [(10_000, 100_000), (100_000, 1_000_000)]
BASELINE_MAX_INTERACTIONS = 1_000_000


def run_vectorised(items: int, interactions: int) -> dict:
    from diffgrm_dist.core.config import SyntheticConfig
    from diffgrm_dist.data.synthetic import generate

    before = peak_rss_mib()
    start = time.perf_counter()
    raw = generate(SyntheticConfig(items=items, interactions=interactions,
                                   categories=max(10, items // 2000), seed=0))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mib": peak_rss_mib(), "rss_before_mib": before,
            "users": len(raw.user_ids), "interactions": int(raw.offsets[-1])}


def run_baseline(items: int, interactions: int) -> dict:
    """The obvious loop: per user, per session, per item, sample by popularity."""
    before = peak_rss_mib()
    start = time.perf_counter()
    rng = random.Random(0)
    n_cat = max(10, items // 2000)
    cat_items: list[list[int]] = [[] for _ in range(n_cat)]
    for item in range(items):
        cat_items[rng.randrange(n_cat)].append(item)
    weights = [[(r + 1) ** -1.1 for r in range(len(c))] for c in cat_items]
    sequences: list[list[int]] = []
    produced = 0
    while produced < interactions:
        length = max(3, int(rng.expovariate(1 / 10)))
        home = rng.randrange(n_cat)
        seq: list[int] = []
        while len(seq) < length:
            cat = home if rng.random() < 0.7 else rng.randrange(n_cat)
            if cat_items[cat]:
                seq.extend(rng.choices(cat_items[cat], weights[cat], k=min(4, length - len(seq))))
        sequences.append(seq)
        produced += length
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mib": peak_rss_mib(), "rss_before_mib": before,
            "users": len(sequences), "interactions": produced}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="tools/results/bench_synthetic.json")
    parser.add_argument("--one", nargs=3, metavar=("KIND", "ITEMS", "INTERACTIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, items, interactions = args.one[0], int(args.one[1]), int(args.one[2])
        fn = run_vectorised if kind == "vectorised" else run_baseline
        print(json.dumps(fn(items, interactions)))
        return

    rows = []
    for items, interactions in (QUICK_SIZES if args.quick else SIZES):
        row = {"items": items, "interactions": interactions,
               "vectorised": run_isolated(__file__, "vectorised", items, interactions)}
        if interactions <= BASELINE_MAX_INTERACTIONS:
            row["baseline_python_loop"] = run_isolated(__file__, "baseline", items, interactions)
            row["speedup_vs_baseline"] = (row["baseline_python_loop"]["seconds"]
                                          / row["vectorised"]["seconds"])
        rows.append(row)

    print(f"{'items':>10} {'interactions':>13} {'seconds':>8} {'inter/s':>12} {'peak MiB':>9} "
          f"{'baseline s':>11} {'speed-up':>9}")
    for r in rows:
        v = r["vectorised"]
        base = r.get("baseline_python_loop")
        base_s = f"{base['seconds']:.2f}" if base else "-"
        speedup = f"{r['speedup_vs_baseline']:.1f}x" if base else "-"
        print(f"{r['items']:>10,} {r['interactions']:>13,} {v['seconds']:>8.2f} "
              f"{r['interactions'] / v['seconds']:>12,.0f} {v['peak_rss_mib']:>9.0f} "
              f"{base_s:>11} {speedup:>9}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "synthetic_generator", "baseline": "pure-Python loop",
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
