"""Non-learned baselines every model is judged against."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from diffgrm_dist.evaluate.metrics import KS, most_frequent, per_user, summarise


def popularity_baseline(prepare_dir: Path, split: str) -> dict[str, float]:
    """Recall/NDCG@5/10 of recommending the most popular training targets to everyone.
    Both files are read one row group of ``target`` at a time: memory is O(items + row group)."""
    n_items = pq.read_metadata(prepare_dir / "items.parquet").num_rows
    counts = np.zeros(n_items, dtype=np.int64)
    for targets in _targets(prepare_dir / "train.parquet"):
        np.add.at(counts, targets, 1)  # O(row group), not O(items) per row group
    top = most_frequent(counts, max(KS))
    sums: dict[str, float] = {}
    users = 0
    for truth in _targets(prepare_dir / f"{split}.parquet"):
        for name, values in per_user(np.broadcast_to(top, (len(truth), len(top))), truth).items():
            sums[name] = sums.get(name, 0.0) + float(values.sum())
        users += len(truth)
    return summarise(sums, users)


def _targets(path: Path) -> Iterator[np.ndarray]:
    file = pq.ParquetFile(path)
    for group in range(file.num_row_groups):
        yield file.read_row_group(group, columns=["target"])["target"].to_numpy()
