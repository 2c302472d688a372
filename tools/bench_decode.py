"""Benchmark of decoding: CPD vs AR beam search by beam width, and by catalogue size.

1. CPD and AR beam search at beam 32 / 128 / 256 on one catalogue and one model size
   (the reference d=256, 1 encoder / 4 decoder layers, 4 x 256 codes): users/s and peak
   RSS growth, each configuration in its own subprocess.
2. CPD users/s for catalogues of 10k, 100k, 1M and 10M items (random 4 x 256 codes), with
   index build time and size, against the foil: exhaustive dense scoring (the user's
   encoder state against every item's embedding, then top-K), whose cost grows with the
   catalogue. A smaller model (d=64) keeps the foil's 10M x d embedding matrix in memory.
Models are untrained: decoding cost does not depend on the weights.

    python tools/bench_decode.py [--users 64] [--sizes 10000 100000 1000000 10000000]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import peak_rss_mib, run_isolated

from diffgrm_dist.config import ModelConfig
from diffgrm_dist.decode import Catalogue, ar_beam_search, cpd, distinct_sids, top_items
from diffgrm_dist.model import DiffGRM, SidSpec

SIZES = (256, 256, 256, 256)


def users_batch(users: int, length: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, 256, (users, length, 4), generator=g)
    mask = torch.ones(users, length, dtype=torch.bool)
    return history, mask


def random_codes(items: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (items, 4), dtype=np.int64)


def decode_run(decoder: str, beam: int, users: int, items: int, d_model: int, batch: int) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    layers = 4 if d_model >= 256 else 2
    model = DiffGRM(ModelConfig(d_model=d_model, heads=4, ffn=4 * d_model, decoder_layers=layers,
                                dropout=0.0), SidSpec(SIZES, 20)).eval()
    codes = random_codes(items)
    before = peak_rss_mib()
    start = time.perf_counter()
    catalogue = Catalogue(codes, SIZES)
    build_s = time.perf_counter() - start
    history, mask = users_batch(users)
    with torch.no_grad():  # warm-up on a few users
        memory = model.encode(history[:2], mask[:2])
        (cpd if decoder == "cpd" else ar_beam_search)(model, memory, catalogue, beam)
        start = time.perf_counter()
        for lo in range(0, users, batch):
            memory = model.encode(history[lo:lo + batch], mask[lo:lo + batch])
            if decoder == "cpd":
                beams = cpd(model, memory, catalogue, beam)
            else:
                beams = ar_beam_search(model, memory, catalogue, beam)
            groups, scores = distinct_sids(beams, 10)
            top_items(groups, scores, catalogue, 10)
        seconds = time.perf_counter() - start
    return {"decoder": decoder, "beam": beam, "items": items, "users": users, "d_model": d_model,
            "users_per_s": users / seconds, "seconds": seconds, "index_build_s": build_s,
            "index_mib": catalogue.nbytes / 2**20, "peak_rss_mib": peak_rss_mib(),
            "rss_growth_mib": peak_rss_mib() - before}


def dense_run(users: int, items: int, d_model: int, batch: int) -> dict:
    """Foil: score every item embedding (item MLP over its code embeddings) for each user."""
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = DiffGRM(ModelConfig(d_model=d_model, heads=4, ffn=4 * d_model, decoder_layers=2,
                                dropout=0.0), SidSpec(SIZES, 20)).eval()
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
            "rss_growth_mib": peak_rss_mib() - before}


def plot(beam_rows: list[dict], size_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for decoder in ("cpd", "ar"):
        rows = [r for r in beam_rows if r["decoder"] == decoder]
        a.plot([r["beam"] for r in rows], [r["users_per_s"] for r in rows], marker="o", label=decoder)
    a.set(xscale="log", xlabel="beam", ylabel="users/s", title="CPD vs AR (d=256, 4 dec layers)")
    a.legend()
    for decoder in ("cpd", "dense"):
        rows = [r for r in size_rows if r["decoder"] == decoder]
        b.plot([r["items"] for r in rows], [r["users_per_s"] for r in rows], marker="o",
               label="CPD beam 32" if decoder == "cpd" else "exhaustive dense scoring")
    b.set(xscale="log", yscale="log", xlabel="catalogue items", ylabel="users/s", title="catalogue size (d=64)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--beam-items", type=int, default=100_000)
    parser.add_argument("--beams", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    parser.add_argument("--out", default="tools/results/bench_decode.json")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, *rest = args.one
        if kind == "dense":
            print(json.dumps(dense_run(*map(int, rest))))
        else:
            beam, users, items, d, batch = map(int, rest)
            print(json.dumps(decode_run(kind, beam, users, items, d, batch)))
        return

    beam_rows = [run_isolated(__file__, decoder, beam, args.users, args.beam_items, 256, 16)
                 for beam in args.beams for decoder in ("cpd", "ar")]
    print(f"1) beam width: {args.users} users, {args.beam_items:,} items, d=256 model, CPU x{os.cpu_count()}")
    print(f"{'decoder':<8} {'beam':>5} {'users/s':>9} {'peak RSS MiB':>13} {'CPD/AR':>7}")
    for r in beam_rows:
        ar = next(x for x in beam_rows if x["decoder"] == "ar" and x["beam"] == r["beam"])
        r["ratio_vs_ar"] = r["users_per_s"] / ar["users_per_s"]
        print(f"{r['decoder']:<8} {r['beam']:>5} {r['users_per_s']:>9.2f} {r['peak_rss_mib']:>13.0f} "
              f"{r['ratio_vs_ar']:>6.2f}x")

    size_rows = []
    for items in args.sizes:
        size_rows.append(run_isolated(__file__, "cpd", 32, args.users, items, 64, 64))
        size_rows.append(run_isolated(__file__, "dense", args.users, items, 64, 64))
    base = {d: next(r for r in size_rows if r["decoder"] == d)["users_per_s"] for d in ("cpd", "dense")}
    print(f"\n2) catalogue size: {args.users} users, beam 32, d=64 model; baseline = the 10k catalogue")
    print(f"{'items':>11} {'decoder':<7} {'users/s':>9} {'vs 10k':>7} {'index MiB':>10} {'build s':>8} {'peak RSS MiB':>13}")
    for r in size_rows:
        r["ratio_vs_smallest"] = r["users_per_s"] / base[r["decoder"]]
        print(f"{r['items']:>11,} {r['decoder']:<7} {r['users_per_s']:>9.2f} {r['ratio_vs_smallest']:>6.2f}x "
              f"{r['index_mib']:>10.1f} {r['index_build_s']:>8.2f} {r['peak_rss_mib']:>13.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "decode", "beam_rows": beam_rows, "size_rows": size_rows},
                              indent=2) + "\n")
    plot(beam_rows, size_rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
