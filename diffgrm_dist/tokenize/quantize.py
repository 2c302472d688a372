"""Quantisers that turn item embeddings into n-digit codes, and collision handling.

``opq`` (Parallel Semantic Encoding): optional whitened PCA, then an OPQ rotation and a
product quantiser with n sub-spaces of K centroids each. The rotation balances the
sub-spaces so digits are roughly independent, which a parallel (any-order) decoder can
exploit. ``rq_kmeans``: residual k-means, digit k quantising what digits < k left over;
the paper's ablation. Both are fitted with faiss on the items seen in training, and saved
as faiss/NumPy files so new items can be encoded later without refitting.

Devices: every nearest-centroid search (the k-means/PQ assignment of the fit, and
``encode``) goes through ``flat_l2_index``, which puts it on the GPU where faiss-gpu sees
one. The rest stays on the CPU in faiss wherever it runs: training and applying the PCA,
and the OPQ rotation's update and ``apply``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from diffgrm_dist.core.config import TokenizeConfig
from diffgrm_dist.core.errors import ConfigError

log = logging.getLogger(__name__)


def gpu_count() -> int:
    """GPUs faiss can use: 0 with faiss-cpu, which lacks the GPU classes."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def assignment_device() -> str:
    """Where ``flat_l2_index``'s searches run in this process: "gpu" or "cpu"."""
    return "gpu" if gpu_count() else "cpu"


@functools.cache
def gpu_resources() -> Any:
    """This process's one ``faiss.StandardGpuResources``, shared by all its GPU indexes: it
    owns the GPU's scratch memory and streams (one per index would set them up again per
    search), and GPU indexes hold it by raw pointer, so it lives as long as the process.
    faiss allows sharing it between indexes used by one thread at a time, as here (the fit
    in the driver; ``encode`` in an actor that takes one call at a time)."""
    return faiss.StandardGpuResources()


def flat_l2_index(dim: int) -> Any:
    """The exact L2 index every nearest-centroid search uses: a ``GpuIndexFlatL2`` on GPU 0
    (the actor's own GPU under Ray) when faiss sees a GPU, else ``faiss.IndexFlatL2``,
    which is also what faiss uses when given no index (so CPU codes do not change)."""
    if assignment_device() == "gpu":
        return faiss.GpuIndexFlatL2(gpu_resources(), dim)
    return faiss.IndexFlatL2(dim)


@contextlib.contextmanager
def faiss_threads(threads: int) -> Iterator[None]:
    """faiss's OpenMP thread count set to ``threads`` inside the block, restored after."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@dataclass
class Quantizer:
    """A fitted quantiser: ``encode`` maps (N, dim) float32 to (N, digits) int64 codes."""

    kind: str
    digits: int
    codebook_size: int
    dim: int
    pca: Any = None  # faiss.PCAMatrix
    opq: Any = None  # faiss.OPQMatrix
    centroids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (digits, K, dsub)
    keep_alive: list[Any] = field(default_factory=list)  # faiss objects referenced by pointer
    # Where the nearest-centroid searches ran ("gpu"/"cpu"): the fit's k-means/PQ
    # assignment ("" for a quantiser loaded from files), and the last ``encode``'s. PCA and
    # the OPQ rotation always run on the CPU.
    fit_device: str = ""
    encode_device: str = ""

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, train: np.ndarray, cfg: TokenizeConfig) -> Quantizer:
        """Fitted on ``cfg.fit_threads`` OpenMP threads, whatever the machine has: faiss's
        PCA, OPQ and k-means reduce in a thread-count-dependent order, and the codes of a
        fit on 2 threads differ from those of a fit on 1 for most items."""
        if cfg.fit_threads < 1:
            raise ConfigError(f"tokenize.fit_threads: {cfg.fit_threads} must be at least 1")
        with faiss_threads(cfg.fit_threads):
            return cls._fit(train, cfg)

    @classmethod
    def _fit(cls, train: np.ndarray, cfg: TokenizeConfig) -> Quantizer:
        if cfg.codebook_size < 2 or cfg.codebook_size & (cfg.codebook_size - 1):
            raise ConfigError(f"tokenize.codebook_size: {cfg.codebook_size} must be a power of 2")
        if len(train) < cfg.codebook_size:
            raise ConfigError(f"tokenize: {len(train)} training items are fewer than "
                              f"codebook_size={cfg.codebook_size}")
        train = np.ascontiguousarray(train, dtype=np.float32)
        q = cls(kind=cfg.quantizer, digits=cfg.digits, codebook_size=cfg.codebook_size,
                dim=train.shape[1], fit_device=assignment_device())
        if cfg.pca_dim:
            if cfg.pca_dim > train.shape[1]:
                raise ConfigError(f"tokenize.pca_dim: {cfg.pca_dim} exceeds the embedding "
                                  f"dimension {train.shape[1]}")
            q.pca = faiss.PCAMatrix(train.shape[1], cfg.pca_dim, -0.5)  # whitened
            q.pca.train(train)
        x = q._reduce(train)
        if cfg.quantizer == "opq":
            q._fit_opq(x, cfg)
        elif cfg.quantizer == "rq_kmeans":
            q._fit_rq(x, cfg)
        else:
            raise ConfigError(f"tokenize.quantizer: {cfg.quantizer!r} is not opq or rq_kmeans")
        return q

    def _fit_opq(self, x: np.ndarray, cfg: TokenizeConfig) -> None:
        d = x.shape[1]
        if d % self.digits:
            raise ConfigError(f"tokenize.digits: {self.digits} does not divide the dimension {d}; "
                              f"set tokenize.pca_dim to a multiple of it")
        if len(x) <= d:  # faiss's OPQ solve crashes on fewer points than dimensions
            raise ConfigError(f"tokenize: OPQ needs more training items ({len(x)}) than "
                              f"dimensions ({d}); set tokenize.pca_dim below {len(x)}")
        nbits = int(np.log2(self.codebook_size))
        self.opq = faiss.OPQMatrix(d, self.digits)
        self.opq.niter = cfg.opq_iters
        self.opq.niter_pq = cfg.kmeans_iters
        self.opq.niter_pq_0 = cfg.kmeans_iters
        # OPQ's own PQ must have our codebook size; OPQMatrix keeps only a raw pointer to
        # it, so it is kept alive here for as long as the quantiser lives.
        inner = faiss.ProductQuantizer(d, self.digits, nbits)
        inner.cp.seed = cfg.seed
        self.keep_alive += [inner, _route_assignment(inner, d // self.digits)]
        self.opq.pq = inner
        self.opq.train(x)
        rotated = self.opq.apply(x)
        pq = faiss.ProductQuantizer(d, self.digits, nbits)
        pq.cp.seed = cfg.seed
        pq.cp.niter = cfg.kmeans_iters
        self.keep_alive.append(_route_assignment(pq, d // self.digits))
        pq.train(rotated)
        self.centroids = faiss.vector_to_array(pq.centroids).reshape(
            self.digits, self.codebook_size, d // self.digits).copy()

    def _fit_rq(self, x: np.ndarray, cfg: TokenizeConfig) -> None:
        residual = x.copy()
        levels = []
        for level in range(self.digits):
            km = faiss.Kmeans(x.shape[1], self.codebook_size, niter=cfg.kmeans_iters,
                              seed=cfg.seed + level, verbose=False)
            km.index = flat_l2_index(x.shape[1])  # the index Kmeans.train assigns with
            km.train(residual)
            levels.append(km.centroids.copy())
            residual -= km.centroids[_nearest(km.centroids, residual)]
        self.centroids = np.stack(levels)

    # ------------------------------------------------------------------ encoding
    def _reduce(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.pca is None:
            return x
        reduced = self.pca.apply(x)
        faiss.normalize_L2(reduced)
        return reduced

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        self.encode_device = assignment_device()
        x = self._reduce(vectors)
        codes = np.empty((len(x), self.digits), dtype=np.int64)
        if self.kind == "opq":
            x = self.opq.apply(x)
            dsub = x.shape[1] // self.digits
            for m in range(self.digits):
                codes[:, m] = _nearest(self.centroids[m], x[:, m * dsub:(m + 1) * dsub])
        else:
            residual = x.copy()
            for level in range(self.digits):
                codes[:, level] = _nearest(self.centroids[level], residual)
                residual -= self.centroids[level][codes[:, level]]
        return codes

    # ------------------------------------------------------------------ files
    def save(self, folder: Path, extra: dict[str, Any] | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if self.pca is not None:
            faiss.write_VectorTransform(self.pca, str(folder / "pca.faiss"))
        if self.opq is not None:
            faiss.write_VectorTransform(self.opq, str(folder / "opq.faiss"))
        np.save(folder / "centroids.npy", self.centroids)
        meta = {"kind": self.kind, "digits": self.digits, "codebook_size": self.codebook_size,
                "dim": self.dim, **(extra or {})}
        (folder / "quantizer.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> tuple[Quantizer, dict[str, Any]]:
        meta = json.loads((folder / "quantizer.json").read_text())
        q = cls(kind=meta["kind"], digits=meta["digits"], codebook_size=meta["codebook_size"],
                dim=meta["dim"], centroids=np.load(folder / "centroids.npy", allow_pickle=False))
        if (folder / "pca.faiss").is_file():
            q.pca = faiss.read_VectorTransform(str(folder / "pca.faiss"))
        if (folder / "opq.faiss").is_file():
            q.opq = faiss.read_VectorTransform(str(folder / "opq.faiss"))
        return q, meta


def _nearest(centroids: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (L2) for each row of ``x``."""
    index = flat_l2_index(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, nearest = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return nearest[:, 0].astype(np.int64)


def _route_assignment(pq: Any, dsub: int) -> Any:
    """Routes a PQ's k-means assignment through ``flat_l2_index`` (the GPU where there is
    one); returns the index, which the PQ holds only by raw pointer, to be kept alive."""
    index = flat_l2_index(dsub)
    pq.assign_index = index
    return index


# ---------------------------------------------------------------------- collisions


@dataclass
class SidAssignment:
    """Codes per item after the collision rule, and how crowded the codes are."""

    codes: np.ndarray  # (N, digits) or (N, digits + 1) with extra_digit
    collision_rank: np.ndarray  # (N,) order of the item among items sharing its base code
    group_size: np.ndarray  # (N,) number of items sharing its base code


def assign_sids(codes: np.ndarray, rule: str, priority: np.ndarray | None = None) -> SidAssignment:
    """``expand``: codes as they are (a SID can name several items); ``extra_digit``:
    append the collision rank as one more digit so every item's SID is unique.

    Items sharing a code are ranked by descending ``priority`` (e.g. training popularity,
    so an expanded SID lists its most likely item first), ties by item index."""
    if rule not in ("expand", "extra_digit"):
        raise ConfigError(f"tokenize.collision: {rule!r} is not expand or extra_digit")
    _, inverse, counts = np.unique(code_keys(codes), return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if priority is None:
        priority = np.zeros(len(codes))
    order = np.lexsort((np.arange(len(codes)), -np.asarray(priority, dtype=np.float64), inverse))
    group_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - group_start[inverse[order]]
    out = np.concatenate([codes, rank[:, None]], axis=1) if rule == "extra_digit" else codes
    return SidAssignment(out, rank, counts[inverse])


def code_keys(codes: np.ndarray) -> np.ndarray:
    """One int64 per row, ordered as the rows are lexicographically (digits packed, first
    digit highest), so grouping 10M codes is a 1-D sort; rows as void scalars where the
    digits do not fit 63 bits."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2 or not codes.size:
        return np.zeros(len(codes), dtype=np.int64)
    bits = max(1, int(codes.max()).bit_length())
    if codes.min() < 0 or bits * codes.shape[1] > 63:
        rows = np.ascontiguousarray(codes)
        return rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    keys = np.zeros(len(codes), dtype=np.int64)
    for column in codes.T:
        keys = (keys << bits) | column
    return keys


def code_stats(codes: np.ndarray, assignment: SidAssignment, codebook_size: int) -> dict[str, Any]:
    """Distinct codes, collisions, and per-digit usage and entropy (bits)."""
    usage, entropy = [], []
    for m in range(codes.shape[1]):
        counts = np.bincount(codes[:, m], minlength=codebook_size)
        p = counts[counts > 0] / len(codes)
        usage.append(int((counts > 0).sum()))
        entropy.append(round(float(-(p * np.log2(p)).sum()), 4))
    return {
        "items": int(len(codes)),
        "distinct_codes": int(len(np.unique(code_keys(codes)))),
        "colliding_items": int((assignment.group_size > 1).sum()),
        "max_items_per_code": int(assignment.group_size.max()) if len(codes) else 0,
        "digit_usage": usage,
        "digit_entropy_bits": entropy,
        "max_entropy_bits": round(float(np.log2(codebook_size)), 4),
    }
