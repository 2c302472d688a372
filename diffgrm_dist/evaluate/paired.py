"""Two runs compared user by user: where each ranked every user's true item (from the
rankings the evaluate stage wrote), and the paired bootstrap interval of their difference
in NDCG@k. Paired, because both runs rank the same users: the users' own difficulty
cancels, so the interval is far tighter than one read against seed-to-seed spread.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def target_ranks(run: Path, split: str = "test") -> np.ndarray:
    """Per user row of the split: the 1-based rank at which the run's rankings hold the
    user's true item, 0 where they do not hold it."""
    truth = pq.read_table(run / "prepare" / f"{split}.parquet", columns=["user", "target"])
    user_ids = pq.read_table(run / "prepare" / "sequences.parquet", columns=["user_id"])["user_id"]
    item_ids = pq.read_table(run / "prepare" / "items.parquet", columns=["item_id"])["item_id"]
    ranked = pq.read_table(run / "evaluate" / "rankings", columns=["user", "rank", "item"])
    split_users = pc.take(user_ids, truth["user"])  # the split's rows, as user ids
    rows = pc.index_in(ranked["user"], value_set=split_users).to_numpy(zero_copy_only=False)
    if np.isnan(rows.astype(float)).any():
        raise ValueError(f"{run / 'evaluate' / 'rankings'}: ranks users that are not in the {split} split")
    rows = rows.astype(np.int64)
    target_item = pc.take(item_ids, truth["target"])
    hit = pc.equal(ranked["item"], pc.take(target_item, pa.array(rows))).to_numpy(zero_copy_only=False)
    ranks = np.zeros(truth.num_rows, dtype=np.int32)
    ranks[rows[hit]] = ranked["rank"].to_numpy()[hit]
    return ranks


def ndcg_at(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-user NDCG@k of one true item at ``ranks`` (1-based; 0 = not ranked)."""
    inside = (ranks >= 1) & (ranks <= k)
    return np.where(inside, 1.0 / np.log2(np.maximum(ranks, 1) + 1.0), 0.0)


def sparse_ranks(ranks: np.ndarray, k: int = 10) -> dict:
    """The ranks within the top k, as a small JSON record: the rows that hit, and where."""
    rows = np.nonzero((ranks >= 1) & (ranks <= k))[0]
    return {"users": int(len(ranks)), "k": k, "rows": rows.tolist(), "ranks": ranks[rows].tolist()}


def dense_ranks(record: dict) -> np.ndarray:
    ranks = np.zeros(record["users"], dtype=np.int32)
    ranks[np.asarray(record["rows"], dtype=np.int64)] = record["ranks"]
    return ranks


def paired_interval(ranks_a: np.ndarray, ranks_b: np.ndarray, k: int = 10, resamples: int = 2000,
                    seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean per-user NDCG@k of a minus b, and the percentile bootstrap interval of it
    (users resampled with replacement, the same users for both runs; seeded)."""
    if ranks_a.shape != ranks_b.shape:
        raise ValueError(f"paired comparison needs the same users: {ranks_a.shape} vs {ranks_b.shape}")
    diff = ndcg_at(ranks_a, k) - ndcg_at(ranks_b, k)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(0, resamples, 100):  # blocks of resamples: bounded memory at any user count
        picks = rng.integers(0, len(diff), (min(100, resamples - i), len(diff)))
        means[i:i + len(picks)] = diff[picks].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(diff.mean()), float(lo), float(hi)
