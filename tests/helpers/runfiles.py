"""Readers of a finished run's tokenize inputs and outputs, for tests that recompute SIDs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def cached_text_embeddings(cache_root: Path, items_parquet: Path, dim: int = 384) -> np.ndarray:
    """(items, dim) text embeddings in item order, from an embedding cache's shards (which
    hold the items sorted by text length, stably)."""
    cache = next(cache_root.iterdir())
    texts = pq.read_table(items_parquet, columns=["text"])["text"].to_pylist()
    by_length = np.argsort([len(t) for t in texts], kind="stable")
    emb = np.empty((len(texts), dim), dtype=np.float32)
    emb[by_length] = np.concatenate([np.load(p) for p in sorted(cache.glob("shard-*.npy"))])
    return emb


def sid_codes(sids_parquet: Path, digits: int) -> np.ndarray:
    """(items, digits) codes of a ``sids.parquet``."""
    sids = pq.read_table(sids_parquet)
    return np.stack([sids[f"d{i}"].to_numpy() for i in range(digits)], axis=1)
