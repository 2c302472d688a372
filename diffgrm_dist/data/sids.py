"""Reading the tokenize stage's semantic IDs: every later stage reads them this way."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


@dataclass(frozen=True)
class SidTable:
    """Every catalogue item's SID, in item order.

    ``collision_rank``: order among the items sharing the code (most popular first);
    ``train_count``: how often the item is a training target, which estimates
    p(item | code) when a code names several items."""

    codes: np.ndarray  # (items, digits) int16
    sizes: tuple[int, ...]  # codes per digit (an extra digit may have fewer)
    collision_rank: np.ndarray  # (items,) int64
    train_count: np.ndarray  # (items,) int64


def load_sids(tokenize_dir: Path) -> SidTable:
    sids = pq.read_table(tokenize_dir / "sids.parquet")
    digits = [c for c in sids.column_names if c.startswith("d") and c[1:].isdigit()]
    matrix = np.stack([sids[c].to_numpy() for c in digits], axis=1).astype(np.int16)
    order = np.argsort(sids["item"].to_numpy())
    meta = json.loads((tokenize_dir / "quantizer" / "quantizer.json").read_text())
    stats = json.loads((tokenize_dir / "stats.json").read_text())
    sizes = [meta["codebook_size"]] * meta["digits"]
    if len(digits) > meta["digits"]:
        sizes.append(int(stats["extra_digit_size"]))
    return SidTable(matrix[order], tuple(sizes),
                    sids["collision_rank"].to_numpy().astype(np.int64)[order],
                    sids["train_count"].to_numpy().astype(np.int64)[order])
