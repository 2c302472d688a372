"""Non-learned baselines every model is judged against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from diffgrm_dist.metrics import KS, per_user, popularity_ranking, summarise


def popularity_baseline(prepare_dir: Path, split: str) -> dict[str, float]:
    """Recall/NDCG@5/10 of recommending the most popular training targets to everyone."""
    train = pq.read_table(prepare_dir / "train.parquet", columns=["target"])["target"].to_numpy()
    truth = pq.read_table(prepare_dir / f"{split}.parquet", columns=["target"])["target"].to_numpy()
    n_items = pq.read_metadata(prepare_dir / "items.parquet").num_rows
    ranked = np.broadcast_to(popularity_ranking(train, n_items, max(KS)), (len(truth), max(KS)))
    return summarise({k: float(v.sum()) for k, v in per_user(ranked, truth).items()}, len(truth))
