"""prepare stage: raw interactions + item text -> catalogue and leave-one-out splits.

Per user (items oldest first, ``n`` of them): test target ``seq[n-1]`` with history
``seq[:n-1]``, validation target ``seq[n-2]`` with history ``seq[:n-2]``, and training
windows ``seq[:t] -> seq[t]`` for ``min_history <= t <= n-3``. Every history keeps at most
the ``max_history`` most recent items. Windows are built with numpy offset arithmetic,
not a loop over users, so ten million interactions split in seconds; they are built and
written ``USERS_PER_BLOCK`` users at a time, so the splits (up to ``max_history`` times the
interactions) are never whole in memory.

Outputs (``RUN_DIR/prepare/``):
- ``items.parquet``: ``item`` (dense index), ``item_id`` (the dataset's id), ``text``.
- ``sequences.parquet``: ``user`` (dense index), ``user_id``, ``items`` (list of ``item``).
- ``train.parquet`` / ``valid.parquet`` / ``test.parquet``: ``user``, ``history`` (list of
  ``item``, oldest first), ``target``.
- ``stats.json``: counts, drops and timings.

Tables are written in row groups of ``ROW_GROUP_SIZE`` rows, so a reader of a row range
(an evaluation chunk) decodes a bounded slice of the file, not all of it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from diffgrm_dist.core.config import ExperimentConfig, PrepareConfig
from diffgrm_dist.core.errors import DataError
from diffgrm_dist.data.readers import read_raw
from diffgrm_dist.data.text import render_text

log = logging.getLogger(__name__)

ROW_GROUP_SIZE = 65536


# Users per block when the splits are built and written: what bounds the stage's memory
# beyond the packed sequences themselves (about 10 bytes an interaction).
USERS_PER_BLOCK = 1 << 18


@dataclass
class Prepared:
    """The prepared dataset: items and sequences as tables, the splits as the packed
    sequences they are cut from (``split_blocks`` builds them a block of users at a time)."""

    items: pa.Table
    sequences: pa.Table
    offsets: np.ndarray  # (users + 1,) into seq
    seq: np.ndarray  # dense item index of every interaction, user by user
    split_cfg: PrepareConfig
    stats: dict[str, Any]

    def split_blocks(self, users_per_block: int = USERS_PER_BLOCK) -> Iterator[tuple[pa.Table, pa.Table, pa.Table]]:
        """(train, valid, test) of consecutive blocks of users, user indices global."""
        users = len(self.offsets) - 1
        for lo in range(0, users, users_per_block):
            hi = min(users, lo + users_per_block)
            block = self.offsets[lo:hi + 1]
            tables = leave_one_out(block - block[0], self.seq[block[0]:block[-1]], self.split_cfg)
            yield tuple(t.set_column(0, "user", pc.add(t["user"], np.int32(lo))) for t in tables)

    def _split(self, which: int) -> pa.Table:
        return pa.concat_tables([blocks[which] for blocks in self.split_blocks()])

    @property
    def train(self) -> pa.Table:
        return self._split(0)

    @property
    def valid(self) -> pa.Table:
        return self._split(1)

    @property
    def test(self) -> pa.Table:
        return self._split(2)


def prepare(cfg: ExperimentConfig) -> Prepared:
    """Reads, filters, renders text and splits; raises DataError on bad input."""
    start = time.perf_counter()
    raw = read_raw(cfg.data)
    read_s = time.perf_counter() - start
    drops = dict(raw.drops)

    # Users too short for leave-one-out are dropped (counted), then items nobody touched.
    lengths = np.diff(raw.offsets)
    keep_user = lengths >= cfg.data.min_user_items
    drops["short_users"] = int((~keep_user).sum())
    offsets, seq = _select_users(raw.offsets, raw.seq, keep_user)
    user_ids = raw.user_ids.filter(pa.array(keep_user))
    if len(user_ids) == 0:
        raise DataError(raw.item_source if not raw.sources else raw.sources[0],
                        f"no user has at least {cfg.data.min_user_items} items")

    # Dense item index in order of first appearance; items never interacted with are dropped.
    used_rows, first_pos = np.unique(seq, return_index=True)
    order = used_rows[np.argsort(first_pos, kind="stable")]
    drops["items_without_interactions"] = raw.items.num_rows - len(order)
    new_index = np.full(raw.items.num_rows, -1, dtype=np.int64)
    new_index[order] = np.arange(len(order))
    seq = new_index[seq]
    item_rows = raw.items.take(pa.array(order))

    text = render_text(item_rows, cfg.data.text_template, cfg.data.text_separator,
                       cfg.data.max_text_chars)
    empty = pc.indices_nonzero(pc.equal(text, "")).to_numpy()
    if len(empty):
        first = int(empty[0])
        raise DataError(raw.item_source, f"item {item_rows['item_id'][first].as_py()!r} has no "
                        f"text for template {cfg.data.text_template} ({len(empty)} such items)",
                        line=int(item_rows["line"][first].as_py()), field="text")

    items = pa.table({"item": pa.array(np.arange(len(order), dtype=np.int32)),
                      "item_id": item_rows["item_id"], "text": text})
    user_index = pa.array(np.arange(len(user_ids), dtype=np.int32))
    sequences = pa.table({"user": user_index, "user_id": user_ids,
                          "items": _list_array(offsets, seq.astype(np.int32))})
    lengths = np.diff(offsets)
    stats = {
        "users": len(user_ids),
        "items": len(order),
        "interactions": int(offsets[-1]),
        "train_samples": int(np.maximum(lengths - 2 - cfg.prepare.min_history, 0).sum()),
        "valid_users": len(user_ids),
        "test_users": len(user_ids),
        "mean_user_items": round(float(offsets[-1]) / len(user_ids), 3),
        "dropped": drops,
        "read_s": round(read_s, 3),
        "prepare_s": round(time.perf_counter() - start, 3),
    }
    for name, count in drops.items():
        if count:
            log.warning("dropped %d %s", count, name.replace("_", " "))
    return Prepared(items, sequences, offsets, seq, cfg.prepare, stats)


def leave_one_out(offsets: np.ndarray, seq: np.ndarray,
                  cfg: PrepareConfig) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Training windows, validation and test examples from packed sequences."""
    n_users = len(offsets) - 1
    lengths = np.diff(offsets)
    users = np.arange(n_users)
    # Validation/test: target at n-2 / n-1 (positions relative to each user's start).
    valid = _windows(offsets, seq, users, lengths - 2, cfg.max_history)
    test = _windows(offsets, seq, users, lengths - 1, cfg.max_history)
    # Training: every t in [min_history, n-3].
    per_user = np.maximum(lengths - 2 - cfg.min_history, 0)
    train_users = np.repeat(users, per_user)
    first = np.concatenate([[0], np.cumsum(per_user)[:-1]])
    t = cfg.min_history + np.arange(int(per_user.sum())) - np.repeat(first, per_user)
    train = _windows(offsets, seq, train_users, t, cfg.max_history)
    return train, valid, test


def _windows(offsets: np.ndarray, seq: np.ndarray, users: np.ndarray, t: np.ndarray,
             max_history: int) -> pa.Table:
    """Rows ``(user, seq_u[max(0, t-max_history):t], seq_u[t])`` for each (user, t)."""
    target_at = offsets[users] + t
    history_from = np.maximum(offsets[users], target_at - max_history)
    lengths = target_at - history_from
    list_offsets = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(lengths, out=list_offsets[1:])
    within = np.arange(int(list_offsets[-1])) - np.repeat(list_offsets[:-1], lengths)
    values = seq[np.repeat(history_from, lengths) + within].astype(np.int32)
    return pa.table({"user": pa.array(users.astype(np.int32)),
                     "history": _list_array(list_offsets, values),
                     "target": pa.array(seq[target_at].astype(np.int32))})


def _select_users(offsets: np.ndarray, seq: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.diff(offsets)
    mask = np.repeat(keep, lengths)
    new_offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(lengths[keep], out=new_offsets[1:])
    return new_offsets, seq[mask]


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.LargeListArray:
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values))


def write_prepared(prepared: Prepared, out: Path, users_per_block: int = USERS_PER_BLOCK) -> None:
    """Writes the Parquet tables and stats.json into ``out`` (a stage temp folder); the
    splits a block of users at a time, so they are never whole in memory."""
    for name in ("items", "sequences"):
        pq.write_table(getattr(prepared, name), out / f"{name}.parquet", compression="zstd",
                       row_group_size=ROW_GROUP_SIZE)
    writers: dict[str, pq.ParquetWriter] = {}
    try:
        for tables in prepared.split_blocks(users_per_block):
            for name, table in zip(("train", "valid", "test"), tables):
                if name not in writers:
                    writers[name] = pq.ParquetWriter(out / f"{name}.parquet", table.schema, compression="zstd")
                writers[name].write_table(table, row_group_size=ROW_GROUP_SIZE)
    finally:
        for writer in writers.values():
            writer.close()
    (out / "stats.json").write_text(json.dumps(prepared.stats, indent=2) + "\n")
