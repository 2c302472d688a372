"""Collaborative item vectors for the tokenize stage: what users put next to each other.

Semantic IDs from text alone give items with the same text the same code, and place items
that users take together far apart when their texts differ. That hurts most where the text
is thin (Sports ships a short phrase per item, not title, brand and description). With
``tokenize.collaborative_dim > 0`` each item's text embedding is joined by a vector read off
its training co-occurrences, and the quantiser (whitened PCA + OPQ + PQ, unchanged) codes
the joined vector:

1. Co-occurrence counts: item pairs at most ``collaborative_window`` positions apart in a
   user's validation history (``valid.parquet``: the whole training sequence, validation
   and test targets excluded), weighted 1/distance; a sparse items x items matrix built a
   row group at a time.
2. Positive pointwise mutual information, then a truncated SVD (``U * sqrt(S)``, rows
   normalised): the classic count-based item2vec.
3. Joined: ``[sqrt(1 - w) * text / |text|, sqrt(w) * cf]`` with ``w`` the
   ``collaborative_weight``; items with no co-occurrence (and new items at cold start) have a
   zero collaborative part, so their code comes from text alone.

Memory: the sparse counts (about 2 * window non-zeros per interaction at most) and
(items, dim) float32; opt-in, since the text-only path needs neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from diffgrm_dist.core.config import TokenizeConfig
from diffgrm_dist.core.errors import ConfigError


class EmbeddingRows(Protocol):
    """What tokenize reads embeddings through (CachedEmbeddings, ParquetEmbeddings)."""

    items: int
    dim: int

    def gather(self, rows: np.ndarray) -> np.ndarray: ...

    def blocks(self, block_items: int) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


def cooccurrence(histories: Path, items: int, window: int, batch_rows: int = 1 << 16) -> sp.csr_matrix:
    """Symmetric (items, items) counts of item pairs within ``window`` positions of each
    other in one history, weighted 1/distance; read ``batch_rows`` histories at a time."""
    if window < 1:
        raise ConfigError(f"tokenize.collaborative_window: {window} must be at least 1")
    counts = sp.csr_matrix((items, items), dtype=np.float64)
    for batch in pq.ParquetFile(histories).iter_batches(batch_size=batch_rows, columns=["history"]):
        column = batch.column("history")
        flat = pc.list_flatten(column).to_numpy().astype(np.int64)
        row = np.repeat(np.arange(len(column)), pc.list_value_length(column).to_numpy())
        left, right, weight = [], [], []
        for distance in range(1, min(window, len(flat) - 1) + 1):
            same = row[distance:] == row[:-distance]
            left.append(flat[:-distance][same])
            right.append(flat[distance:][same])
            weight.append(np.full(int(same.sum()), 1.0 / distance))
        if not left:
            continue
        a, b, w = np.concatenate(left), np.concatenate(right), np.concatenate(weight)
        counts = counts + sp.coo_matrix((np.concatenate([w, w]), (np.concatenate([a, b]), np.concatenate([b, a]))),
                                        shape=(items, items)).tocsr()
    return counts


def ppmi_svd(counts: sp.csr_matrix, dim: int, seed: int) -> np.ndarray:
    """(items, dim) float32 unit rows: truncated SVD of the positive PMI of ``counts``.
    Rows of items that co-occur with nothing are zero."""
    items = counts.shape[0]
    out = np.zeros((items, dim), dtype=np.float32)
    coo = counts.tocoo()
    if coo.nnz == 0:
        return out
    marginal = np.asarray(counts.sum(axis=1)).ravel()
    pmi = np.log(coo.data * counts.sum() / (marginal[coo.row] * marginal[coo.col]))
    keep = pmi > 0
    ppmi = sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=counts.shape)
    rank = min(dim, items - 1)
    if ppmi.nnz == 0 or rank < 1:
        return out
    v0 = np.random.default_rng(seed).standard_normal(items)  # arpack's start: seeded, so SIDs repeat
    u, s, _ = svds(ppmi, k=rank, v0=v0)
    order = np.argsort(-s)  # largest singular value first, whatever order arpack returns
    u, s = u[:, order], s[order]
    u *= np.sign(u[np.abs(u).argmax(axis=0), np.arange(rank)])  # one sign per direction
    vectors = u * np.sqrt(s)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    out[:, :rank] = np.where(norms > 1e-12, vectors / np.maximum(norms, 1e-12), 0.0)
    return out


def join(text: np.ndarray, collaborative: np.ndarray, weight: float) -> np.ndarray:
    """``[sqrt(1 - w) * text / |text|, sqrt(w) * collaborative]`` as float32."""
    norms = np.linalg.norm(text, axis=1, keepdims=True)
    text = text / np.maximum(norms, 1e-12)
    return np.hstack([np.sqrt(1.0 - weight) * text, np.sqrt(weight) * collaborative]).astype(np.float32)


@dataclass
class JoinedEmbeddings:
    """An embedding source with each item's collaborative vector appended (``join``)."""

    source: EmbeddingRows
    collaborative: np.ndarray  # (items, collaborative_dim)
    weight: float

    @property
    def items(self) -> int:
        return self.source.items

    @property
    def dim(self) -> int:
        return self.source.dim + self.collaborative.shape[1]

    def gather(self, rows: np.ndarray) -> np.ndarray:
        return join(self.source.gather(rows), self.collaborative[rows], self.weight)

    def blocks(self, block_items: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for rows, vectors in self.source.blocks(block_items):
            yield rows, join(vectors, self.collaborative[rows], self.weight)


def with_collaborative(source: EmbeddingRows, histories: Path, cfg: TokenizeConfig) -> JoinedEmbeddings:
    """``source`` joined with co-occurrence vectors from ``histories`` (see the module doc)."""
    if not 0.0 < cfg.collaborative_weight < 1.0:
        raise ConfigError(f"tokenize.collaborative_weight: {cfg.collaborative_weight} must be in (0, 1)")
    counts = cooccurrence(histories, source.items, cfg.collaborative_window)
    return JoinedEmbeddings(source, ppmi_svd(counts, cfg.collaborative_dim, cfg.seed), cfg.collaborative_weight)
