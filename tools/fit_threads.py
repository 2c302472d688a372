"""How faiss's quantiser fit depends on its OpenMP thread count: the SIDs of one run's
embeddings fitted on 1, 2, 3, 4 threads (``tokenize.fit_threads``), side by side.

Why ``tokenize.fit_threads`` exists: before it, the fit ran on the machine's cores, and
the same config gave other SIDs on another machine, or in another process state. Needs a
run directory with a finished ``prepare`` stage and the embedding cache complete (run
``diffgrm tokenize`` once); no Ray, no text model.

    python tools/fit_threads.py -c configs/cpu/beauty.yaml -o RUN [--threads 1 2 3 4] [overrides]

Writes ``results/tokenize/fit_threads.json`` (``--out``): per thread count the distinct
codes / colliding items / most items per code, fit seconds, and how many items' codes
differ from the first thread count's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import device_string, git_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("-o", "--run-dir", required=True, type=Path)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "tokenize" / "fit_threads.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from diffgrm_dist.core.config import load_config
    from diffgrm_dist.core.rundir import RunDir
    from diffgrm_dist.tokenize.quantize import Quantizer, assign_sids, code_stats
    from diffgrm_dist.tokenize.stage import fit_sample, open_embeddings, train_items

    cfg = load_config(args.config, args.overrides)
    run_dir = RunDir(args.run_dir)
    prepare = run_dir.stage_path("prepare")
    items = pq.read_table(prepare / "items.parquet", columns=["item", "text"])
    source, embedding = open_embeddings(cfg, run_dir, items)
    if embedding.get("embedded_shards"):
        print(f"embedded {embedding['embedded_shards']} missing shard(s) first", flush=True)
    seen, popularity = train_items(prepare, source.items)
    train = source.gather(fit_sample(seen, cfg.tokenize.fit_items, cfg.tokenize.seed))
    everything = source.gather(np.arange(source.items))
    rows, first = [], None
    for threads in args.threads:
        start = time.perf_counter()
        quantizer = Quantizer.fit(train, dataclasses.replace(cfg.tokenize, fit_threads=threads))
        fit_s = time.perf_counter() - start
        codes = quantizer.encode(everything)
        stats = code_stats(codes, assign_sids(codes, cfg.tokenize.collision, popularity), cfg.tokenize.codebook_size)
        first = codes if first is None else first
        row = {"fit_threads": threads, "distinct_codes": stats["distinct_codes"],
               "colliding_items": stats["colliding_items"], "max_items_per_code": stats["max_items_per_code"],
               "items_with_other_codes_than_first": int((codes != first).any(axis=1).sum()),
               "fit_s": round(fit_s, 2)}
        rows.append(row)
        print(f"fit_threads={threads}: {row['distinct_codes']:,} distinct / {row['colliding_items']:,} colliding / "
              f"{row['max_items_per_code']} max per code; {row['items_with_other_codes_than_first']:,} of "
              f"{source.items:,} items coded otherwise than on {args.threads[0]} thread(s); fit {fit_s:.1f} s",
              flush=True)
    out = {"command": " ".join(["python", "tools/fit_threads.py", *sys.argv[1:]]), "config": args.config,
           "overrides": args.overrides, "items": int(source.items), "fit_items": int(len(train)),
           "provenance": {"device": device_string(), "current": git_info(ROOT)}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
