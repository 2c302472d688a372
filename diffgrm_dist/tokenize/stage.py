"""tokenize stage (Parallel Semantic Encoding): item embeddings -> n-digit semantic IDs.

1. Embeddings: the team's own (``tokenize.embeddings``: Parquet ``item_id``, ``embedding``,
   validated in one streaming pass), or item text embedded on a Ray actor pool
   (``embed.py``) into shards cached under ``RUN_DIR/embeddings/<key>/``, so a restart
   embeds only what is missing. Neither is ever held whole in memory.
2. Fit the quantiser (``quantize.py``: whitened PCA + OPQ + PQ, or RQ-KMeans) on the items
   seen in training, or a seeded sample of them (``tokenize.fit_items``).
3. Encode every item with the fitted quantiser, ``tokenize.block_items`` at a time, on a
   Ray actor pool (one GPU each where there are GPUs). ``stats.json`` says where the
   nearest-centroid searches ran: ``quantizer_fit_assign_device`` (the fit's k-means/PQ
   assignment, in the driver) and ``encode_assign_devices`` (what the actors reported);
   PCA and the OPQ rotation run on the CPU in faiss either way.
4. Apply the collision rule and write ``RUN_DIR/tokenize/``: ``sids.parquet`` (``item``,
   ``d0..d{n-1}`` [+ the extra digit], ``collision_rank``, ``train_count``: how often the
   item is a training target; one row group per block), ``quantizer/`` and ``stats.json``.
   Memory: a few blocks of embeddings, the fit sample, and a few int32 per item.

``encode_new_items`` assigns SIDs to items outside the catalogue with the saved quantiser
(cold start) without refitting anything.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from diffgrm_dist.core.config import ExperimentConfig, TokenizeConfig
from diffgrm_dist.core.errors import DataError
from diffgrm_dist.core.rundir import RunDir, atomic_file
from diffgrm_dist.data.readers import iter_lines
from diffgrm_dist.data.sids import load_sids
from diffgrm_dist.data.text import render_text, template_fields
from diffgrm_dist.tokenize.collaborative import JoinedEmbeddings, join, with_collaborative
from diffgrm_dist.tokenize.embed import CachedEmbeddings, ParquetEmbeddings, embed_catalogue, embed_to_cache
from diffgrm_dist.tokenize.quantize import Quantizer, assign_sids, code_stats

log = logging.getLogger(__name__)

# Where item embeddings come from: gather (the fit sample) and blocks (every item).
EmbeddingSource = CachedEmbeddings | ParquetEmbeddings | JoinedEmbeddings


def digit_columns(n: int) -> list[str]:
    return [f"d{i}" for i in range(n)]


def train_items(prepare_dir: Path, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Items that occur in any training window (history or target), and how often each
    is a training target (its popularity); read batch by batch, not as one table."""
    seen = np.zeros(n_items, dtype=bool)
    popularity = np.zeros(n_items, dtype=np.int64)
    train = pq.ParquetFile(prepare_dir / "train.parquet")
    for batch in train.iter_batches(batch_size=1 << 16, columns=["history", "target"]):
        seen[pc.list_flatten(batch.column("history")).to_numpy()] = True
        targets = batch.column("target").to_numpy()
        seen[targets] = True
        np.add.at(popularity, targets, 1)  # O(batch), not O(items) per batch
    return seen, popularity


def embedding_cache(cfg: ExperimentConfig, run_dir: RunDir) -> Path:
    """Content-addressed shard cache; shareable between runs of the same catalogue."""
    return Path(cfg.tokenize.embedding_cache) if cfg.tokenize.embedding_cache else run_dir.root / "embeddings"


def sid_table(items: np.ndarray, codes: np.ndarray, rank: np.ndarray, train_count: np.ndarray) -> pa.Table:
    columns: dict[str, Any] = {"item": pa.array(items.astype(np.int32))}
    for name, column in zip(digit_columns(codes.shape[1]), codes.T):
        columns[name] = pa.array(column.astype(np.int32))
    columns["collision_rank"] = pa.array(rank.astype(np.int32))
    columns["train_count"] = pa.array(train_count.astype(np.int64))
    return pa.table(columns)


def fit_sample(seen: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Catalogue rows the quantiser is fitted on: the training items, or a seeded sample
    of ``count`` of them (sorted, so the fit sees them in catalogue order)."""
    rows = np.flatnonzero(seen)
    if 0 < count < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=count, replace=False))
    return rows


class QuantizeWorker:
    """Ray actor body: the fitted quantiser (shipped as its files' bytes, so any node can
    hold it), encoding one block of embeddings per call."""

    def __init__(self, files: dict[str, bytes], threads: int) -> None:
        import tempfile

        import faiss

        if threads:
            faiss.omp_set_num_threads(threads)
        with tempfile.TemporaryDirectory() as folder:
            for name, data in files.items():
                (Path(folder) / name).write_bytes(data)
            self.quantizer, _ = Quantizer.load(Path(folder))

    def encode(self, block: int, vectors: np.ndarray) -> tuple[int, np.ndarray, str]:
        """The block's codes and where their assignment ran: an actor holding a GPU still
        encodes on the CPU when its faiss is faiss-cpu, and the stats should say so."""
        codes = self.quantizer.encode(vectors).astype(np.int32)
        return block, codes, self.quantizer.encode_device


def encode_catalogue(quantizer_dir: Path, source: EmbeddingSource, cfg: TokenizeConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Codes of every catalogue item, block by block on a Ray actor pool (one GPU each
    where there are GPUs); at most two blocks per actor are in flight, so the driver holds
    a few blocks of embeddings and the (items, digits) int32 codes, nothing more."""
    import ray

    from diffgrm_dist.cluster.raycluster import ray_session, replica_actor

    start = time.perf_counter()
    files = {p.name: p.read_bytes() for p in sorted(quantizer_dir.iterdir())}
    codes = np.full((source.items, cfg.digits), -1, dtype=np.int32)
    blocks = source.blocks(cfg.block_items)
    with ray_session() as resources:
        actors = cfg.num_actors or max(1, resources.gpus or resources.cpus)
        remote, _, threads = replica_actor(QuantizeWorker, resources, actors, f"tokenize.num_actors={actors}")
        shared = ray.put(files)
        pool = [remote.remote(shared, threads) for _ in range(actors)]
        rows_of: dict[int, np.ndarray] = {}
        pending: dict[Any, Any] = {}
        devices: set[str] = set()
        try:
            for number, (rows, vectors) in enumerate(blocks):
                while len(pending) >= 2 * actors:
                    _drain(pending, rows_of, codes, devices, wait_for=1)
                rows_of[number] = rows
                actor = pool[number % actors]
                pending[actor.encode.remote(number, vectors)] = actor
            _drain(pending, rows_of, codes, devices, wait_for=len(pending))
        finally:
            for actor in pool:
                ray.kill(actor)
    if (codes < 0).any():
        raise RuntimeError(f"tokenize: {int((codes[:, 0] < 0).sum())} items were never encoded")
    return codes, {"encode_s": round(time.perf_counter() - start, 3), "encode_actors": actors,
                   "encode_threads": threads,
                   "encode_blocks": number + 1 if source.items else 0,
                   "encode_assign_devices": sorted(devices)}


def _drain(pending: dict[Any, Any], rows_of: dict[int, np.ndarray], codes: np.ndarray, devices: set[str],
           wait_for: int) -> None:
    import ray

    if not pending:
        return
    done, _ = ray.wait(list(pending), num_returns=wait_for)
    for ref in done:
        del pending[ref]
        block, block_codes, device = ray.get(ref)
        codes[rows_of.pop(block)] = block_codes
        devices.add(device)


def open_embeddings(cfg: ExperimentConfig, run_dir: RunDir, items: pa.Table) -> tuple[EmbeddingSource, dict[str, Any]]:
    """The catalogue's embeddings: the team's own file (``tokenize.embeddings``), or the
    text model's, embedded into the shard cache where it lacks them."""
    tcfg = cfg.tokenize
    if tcfg.embeddings:
        start = time.perf_counter()
        source = ParquetEmbeddings(tcfg.embeddings, items["item_id"], tcfg.block_items)
        log.info("embeddings: %d items of %d dims from %s (%d rows outside the catalogue ignored)",
                 source.items, source.dim, tcfg.embeddings, source.extra_rows)
        return source, {"source": "file", "dim": source.dim, "extra_rows": source.extra_rows,
                        "seconds": round(time.perf_counter() - start, 3)}
    cached, report = embed_to_cache(items["text"].to_pylist(), embedding_cache(cfg, run_dir), tcfg)
    return cached, {"source": "text_model", **{k: v for k, v in vars(report).items() if k != "cache_dir"}}


def write_sids(path: Path, codes: np.ndarray, rank: np.ndarray, popularity: np.ndarray,
               block_items: int) -> None:
    """``sids.parquet`` written one row group (block) at a time."""
    with pq.ParquetWriter(path, sid_table(np.zeros(0, np.int32), codes[:0], rank[:0], popularity[:0]).schema) as sink:
        for lo in range(0, len(codes), block_items):
            hi = min(lo + block_items, len(codes))
            sink.write_table(sid_table(np.arange(lo, hi), codes[lo:hi], rank[lo:hi], popularity[lo:hi]))


def run_tokenize(cfg: ExperimentConfig, run_dir: RunDir, out: Path) -> dict[str, Any]:
    tcfg = cfg.tokenize
    prepare_dir = run_dir.stage_path("prepare")
    columns = ["item", "item_id"] if tcfg.embeddings else ["item", "text"]
    items = pq.read_table(prepare_dir / "items.parquet", columns=columns)
    if not np.array_equal(items["item"].to_numpy(), np.arange(items.num_rows)):
        raise DataError(prepare_dir / "items.parquet", "items are not numbered 0..n-1 in order; "
                        "re-run `diffgrm prepare`", field="item")
    source, embedding = open_embeddings(cfg, run_dir, items)
    del items
    if tcfg.collaborative_dim:
        start = time.perf_counter()
        source = with_collaborative(source, prepare_dir / "valid.parquet", tcfg)
        covered = int(source.collaborative.any(axis=1).sum())
        embedding["collaborative"] = {"dim": tcfg.collaborative_dim, "weight": tcfg.collaborative_weight,
                                      "window": tcfg.collaborative_window, "items_with_vector": covered,
                                      "seconds": round(time.perf_counter() - start, 3)}
        log.info("collaborative: %d-dim co-occurrence vectors for %d of %d items in %.1f s",
                 tcfg.collaborative_dim, covered, source.items, embedding["collaborative"]["seconds"])
    seen, popularity = train_items(prepare_dir, source.items)
    if not seen.any():  # no training windows at all (every user has exactly 3 items)
        seen[:] = True

    start = time.perf_counter()
    rows = fit_sample(seen, tcfg.fit_items, tcfg.seed)
    quantizer = Quantizer.fit(source.gather(rows), tcfg)
    fit_s = time.perf_counter() - start
    quantizer.save(out / "quantizer", extra={"model": "" if tcfg.embeddings else tcfg.model,
                                             "collision": tcfg.collision, "pca_dim": tcfg.pca_dim,
                                             "collaborative_dim": tcfg.collaborative_dim,
                                             "collaborative_weight": tcfg.collaborative_weight})
    codes, encoding = encode_catalogue(out / "quantizer", source, tcfg)
    assignment = assign_sids(codes, tcfg.collision, priority=popularity)
    write_sids(out / "sids.parquet", assignment.codes, assignment.collision_rank, popularity, tcfg.block_items)
    stats = {
        **code_stats(codes, assignment, tcfg.codebook_size),
        "quantizer": tcfg.quantizer,
        "collision_rule": tcfg.collision,
        "sid_digits": int(assignment.codes.shape[1]),
        "extra_digit_size": int(assignment.group_size.max()) if tcfg.collision == "extra_digit" else 0,
        "train_items": int(seen.sum()),
        "fit_items": int(len(rows)),
        "fit_threads": tcfg.fit_threads,
        "embedding_dim": int(source.dim),
        "embedding": embedding,
        "embedding_s": embedding["seconds"],
        "quantizer_s": round(fit_s, 3),
        "quantizer_fit_assign_device": quantizer.fit_device,
        **encoding,
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("tokenize: %d items -> %d distinct codes, %d colliding items (fit on %d items in %.1f s, "
             "encoded in %d blocks on %d actors in %.1f s)", stats["items"], stats["distinct_codes"],
             stats["colliding_items"], len(rows), fit_s, encoding["encode_blocks"],
             encoding["encode_actors"], encoding["encode_s"])
    return stats


# ---------------------------------------------------------------------- cold start


def _read_new_items(path: Path, template: list[str]) -> tuple[list[str], list[str]]:
    """``item_id`` and text of each new item, from JSONL (``text`` or template fields) or Parquet."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)
    else:
        rows = []
        for number, line in iter_lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, f"not valid JSON: {exc.msg}", line=number) from None
            if not isinstance(record, dict) or not record.get("item_id"):
                raise DataError(path, "missing", line=number, field="item_id")
            rows.append({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in record.items()})
        columns = list(dict.fromkeys(["item_id", *(k for row in rows for k in row)]))  # all rows' keys
        table = pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in columns]))
    if "item_id" not in table.column_names:
        raise DataError(path, "missing column", field="item_id")
    given = table["text"].to_pylist() if "text" in table.column_names else [None] * table.num_rows
    rendered: list[str | None] = [None] * table.num_rows
    if not all(given) and all(f in table.column_names for f in template_fields(template)):
        rendered = render_text(table, template, " ", 0).to_pylist()
    ids = [str(v) for v in table["item_id"].to_pylist()]
    texts_list = [g or r or "" for g, r in zip(given, rendered)]  # `text`, else the template
    for i, text in enumerate(texts_list):
        if not text.strip():
            raise DataError(path, f"item {ids[i]!r} has no text", line=i + 1, field="text")
    return ids, texts_list


def encode_new_items(cfg: ExperimentConfig, run_dir: RunDir, path: Path) -> Path:
    """Assigns SIDs to items outside the catalogue with the saved quantiser; returns the file.

    New items are ranked after the catalogue's items with the same code, so the catalogue's
    SIDs never change.
    """
    stage = run_dir.stage_path("tokenize")
    if run_dir.manifest("tokenize") is None:
        raise DataError(stage, "run the tokenize stage first")
    quantizer, meta = Quantizer.load(stage / "quantizer")
    if not meta.get("model"):
        raise DataError(stage, "this catalogue's SIDs were made from tokenize.embeddings, not item "
                               "text: new items need embeddings from the same model, not text")
    ids, texts = _read_new_items(path, cfg.data.text_template)
    if not ids:
        raise DataError(path, "no items to encode")
    tcfg = cfg.tokenize
    tcfg.model = meta["model"]
    embeddings, _ = embed_catalogue(texts, embedding_cache(cfg, run_dir), tcfg)
    if meta.get("collaborative_dim"):  # new items have no co-occurrence yet: text alone
        embeddings = join(embeddings, np.zeros((len(embeddings), meta["collaborative_dim"]), np.float32),
                          meta["collaborative_weight"])
    codes = quantizer.encode(embeddings)
    base = load_sids(stage).codes[:, :quantizer.digits].astype(np.int64)  # without an extra digit
    combined = assign_sids(np.concatenate([base, codes]), meta["collision"])
    new_codes = combined.codes[len(base):]
    table = sid_table(np.arange(len(ids)), new_codes, combined.collision_rank[len(base):],
                      np.zeros(len(ids), np.int64))
    table = table.drop(["item"]).add_column(0, "item_id", pa.array(ids, pa.string()))
    table = table.append_column("catalogue_items_with_code",
                                pa.array((combined.group_size[len(base):]
                                          - _new_per_code(codes)).astype(np.int32)))
    folder = run_dir.root / "cold_start"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{path.stem}.parquet"
    with atomic_file(target) as tmp:
        pq.write_table(table, tmp)
    if run_dir.remote is not None:
        run_dir.remote.upload(folder, "cold_start")
    return target


def _new_per_code(codes: np.ndarray) -> np.ndarray:
    """For each new item, how many new items (itself included) share its code."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)]
