"""tokenize stage (Parallel Semantic Encoding): item text -> n-digit semantic IDs.

1. Embed every catalogue item's text on a Ray actor pool (``embed.py``); shards are cached
   under ``RUN_DIR/embeddings/<key>/`` so a restart embeds only what is missing.
2. Fit the quantiser (``quantize.py``: whitened PCA + OPQ + PQ, or RQ-KMeans) on the items
   seen in training, and encode every item.
3. Apply the collision rule and write ``RUN_DIR/tokenize/``: ``sids.parquet`` (``item``,
   ``d0..d{n-1}`` [+ the extra digit], ``collision_rank``, ``train_count``: how often the
   item is a training target), ``quantizer/`` and ``stats.json``.

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

from diffgrm_dist.config import ExperimentConfig
from diffgrm_dist.embed import embed_catalogue
from diffgrm_dist.errors import DataError
from diffgrm_dist.quantize import Quantizer, assign_sids, code_stats, gpu_count
from diffgrm_dist.readers import iter_lines
from diffgrm_dist.rundir import RunDir, atomic_file
from diffgrm_dist.sids import load_sids
from diffgrm_dist.text import render_text, template_fields

log = logging.getLogger(__name__)


def digit_columns(n: int) -> list[str]:
    return [f"d{i}" for i in range(n)]


def train_items(prepare_dir: Path, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Items that occur in any training window (history or target), and how often each
    is a training target (its popularity)."""
    train = pq.read_table(prepare_dir / "train.parquet", columns=["history", "target"])
    seen = np.zeros(n_items, dtype=bool)
    seen[pc.list_flatten(train["history"]).to_numpy()] = True
    targets = train["target"].to_numpy()
    seen[targets] = True
    return seen, np.bincount(targets, minlength=n_items)


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


def run_tokenize(cfg: ExperimentConfig, run_dir: RunDir, out: Path) -> dict[str, Any]:
    tcfg = cfg.tokenize
    prepare_dir = run_dir.stage_path("prepare")
    items = pq.read_table(prepare_dir / "items.parquet", columns=["item", "text"])
    texts = items["text"].to_pylist()

    embeddings, report = embed_catalogue(texts, embedding_cache(cfg, run_dir), tcfg)
    seen, popularity = train_items(prepare_dir, len(texts))
    if not seen.any():  # no training windows at all (every user has exactly 3 items)
        seen[:] = True

    start = time.perf_counter()
    quantizer = Quantizer.fit(embeddings[seen], tcfg)
    codes = quantizer.encode(embeddings)
    quantize_s = time.perf_counter() - start
    assignment = assign_sids(codes, tcfg.collision, priority=popularity)
    quantizer.save(out / "quantizer", extra={"model": tcfg.model, "collision": tcfg.collision,
                                             "pca_dim": tcfg.pca_dim})
    pq.write_table(sid_table(items["item"].to_numpy(), assignment.codes, assignment.collision_rank,
                             popularity), out / "sids.parquet")
    stats = {
        **code_stats(codes, assignment, tcfg.codebook_size),
        "quantizer": tcfg.quantizer,
        "collision_rule": tcfg.collision,
        "sid_digits": int(assignment.codes.shape[1]),
        "extra_digit_size": int(assignment.group_size.max()) if tcfg.collision == "extra_digit" else 0,
        "train_items": int(seen.sum()),
        "embedding_dim": report.dim,
        "embedding": {k: v for k, v in vars(report).items() if k != "cache_dir"},
        "embedding_s": report.seconds,
        "quantizer_s": round(quantize_s, 3),
        "quantizer_device": "gpu" if gpu_count() else "cpu",
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("tokenize: %d items -> %d distinct codes, %d colliding items", stats["items"],
             stats["distinct_codes"], stats["colliding_items"])
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
    ids, texts = _read_new_items(path, cfg.data.text_template)
    if not ids:
        raise DataError(path, "no items to encode")
    tcfg = cfg.tokenize
    tcfg.model = meta["model"]
    embeddings, _ = embed_catalogue(texts, embedding_cache(cfg, run_dir), tcfg)
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
