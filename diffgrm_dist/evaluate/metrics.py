"""Ranking metrics, vectorised: Recall@K and NDCG@K with one relevant item per user.

``per_user`` returns each user's values so they can be summed across ranks or actors and
averaged once (the mean of a gathered sum equals the single-process mean exactly).
"""

from __future__ import annotations

import numpy as np

KS = (5, 10)


def per_user(ranked: np.ndarray, truth: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, np.ndarray]:
    """ranked (U, K) ids (-1 = empty slot), truth (U,) -> {"recall@k": (U,), "ndcg@k": (U,)}."""
    hits = (ranked == truth[:, None]) & (truth[:, None] >= 0)
    any_hit = hits.any(axis=1)
    position = np.where(any_hit, hits.argmax(axis=1), ranked.shape[1])
    gain = 1.0 / np.log2(position + 2.0)
    out = {}
    for k in ks:
        inside = position < k
        out[f"recall@{k}"] = inside.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(inside, gain, 0.0)
    return out


def item_and_sid_metrics(items: np.ndarray, groups: np.ndarray, targets: np.ndarray,
                         item_group: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user values keyed ``item/<metric>`` (the target item ranked) and ``sid/<metric>``
    (the target's SID ranked: any item sharing its code counts)."""
    out = {}
    for level, ranked, truth in (("item", items, targets), ("sid", groups, item_group[targets])):
        for name, values in per_user(ranked, truth).items():
            out[f"{level}/{name}"] = values
    return out


def summarise(sums: dict[str, float], users: int) -> dict[str, float]:
    """Means from summed per-user values."""
    return {name: value / max(users, 1) for name, value in sorted(sums.items())}


def selection_score(metrics: dict[str, float]) -> float:
    """Model selection score of the released code: 0.8 NDCG@10 + 0.2 Recall@10."""
    return 0.8 * metrics["ndcg@10"] + 0.2 * metrics["recall@10"]


def most_frequent(counts: np.ndarray, k: int) -> np.ndarray:
    """The k indices with the largest counts, ties by index: with training-target counts,
    the popularity baseline's ranking."""
    return np.argsort(-counts, kind="stable")[:k]
