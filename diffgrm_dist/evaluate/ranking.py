"""Ranking users: packed histories from a split's Parquet file, cut into padded batches,
decoded, and scored at item and SID level.

Validation (inside training) and evaluation (on Ray actors) both call ``rank_queries``, so
they rank the same histories the same way; a seeded sample of users serves quick
per-epoch validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from diffgrm_dist.core.config import EvalConfig
from diffgrm_dist.core.ragged import left_pad_index
from diffgrm_dist.data.splits import row_group_starts
from diffgrm_dist.decode.catalogue import CatalogueIndex
from diffgrm_dist.decode.search import ITEM_RULES, SearchOptions, recommend_batch
from diffgrm_dist.evaluate.metrics import KS, item_and_sid_metrics
from diffgrm_dist.model.network import DiffGRM, SidSpec, autocast_type


@dataclass
class Queries:
    """Packed histories (item indices, oldest first) and optional targets, one row per user."""

    users: np.ndarray
    offsets: np.ndarray
    history: np.ndarray
    targets: np.ndarray | None

    def __len__(self) -> int:
        return len(self.users)

    def chunk(self, start: int, end: int) -> Queries:
        lo, hi = self.offsets[start], self.offsets[end]
        return Queries(self.users[start:end], self.offsets[start:end + 1] - lo, self.history[lo:hi],
                       None if self.targets is None else self.targets[start:end])

    def take(self, rows: np.ndarray) -> Queries:
        """The users at ``rows`` (in that order)."""
        lengths = np.diff(self.offsets)[rows]
        starts = self.offsets[rows]
        flat = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
        return Queries(self.users[rows], np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                       self.history[flat], None if self.targets is None else self.targets[rows])

    def sample(self, count: int, seed: int) -> Queries:
        """A seeded sample of ``count`` users (all when count is 0 or covers them), kept in
        their original order so the same seed gives the same sample every epoch."""
        if count <= 0 or count >= len(self):
            return self
        return self.take(sample_rows(len(self), count, seed))

    @classmethod
    def from_split(cls, prepare_dir: Path, split: str) -> Queries:
        return cls.from_table(pq.read_table(prepare_dir / f"{split}.parquet"))

    @classmethod
    def sample_split(cls, prepare_dir: Path, split: str, count: int, seed: int) -> Queries:
        """``from_split(...).sample(count, seed)`` read one row group at a time: memory
        follows the sample and one row group, not the whole split (10M validation users)."""
        file = pq.ParquetFile(prepare_dir / f"{split}.parquet")
        total = file.metadata.num_rows
        if count <= 0 or count >= total:
            return cls.from_table(file.read())
        rows = sample_rows(total, count, seed)
        starts = row_group_starts(file.metadata)
        group_of = np.searchsorted(starts, rows, side="right") - 1
        parts = [file.read_row_group(int(g)).take(pa.array(rows[group_of == g] - starts[g]))
                 for g in np.unique(group_of)]
        return cls.from_table(pa.concat_tables(parts))

    @classmethod
    def from_table(cls, table: pa.Table) -> Queries:
        """From rows of a split's table (``user``, ``history``, ``target``), which may be a
        slice: offsets are rebased and only the slice's values taken."""
        history = table["history"].combine_chunks()
        offsets = history.offsets.to_numpy().astype(np.int64)
        return cls(table["user"].to_numpy(), offsets - offsets[0],
                   history.flatten().to_numpy().astype(np.int64), table["target"].to_numpy())

    def padded(self, sids: torch.Tensor, max_history: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, n) history codes left padded to the longest history here (at most
        ``max_history``), the most recent item last, and the (B, L) mask of real slots."""
        b, n = len(self), sids.shape[1]
        lengths = np.minimum(np.diff(self.offsets), max_history)
        width = max(1, int(lengths.max()) if b else 1)
        history = torch.zeros(b, width, n, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.bool)
        rows, slot, take = left_pad_index(self.offsets[1:], lengths, width)
        history[rows, slot] = sids[self.history[take]]
        mask[rows, slot] = True
        return history, mask


def sample_rows(total: int, count: int, seed: int) -> np.ndarray:
    """A seeded sample of ``count`` of ``total`` rows, sorted (original order kept)."""
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


CPU_BATCH_USERS = 256
MAX_BATCH_USERS = 4096


def batch_users(cfg: EvalConfig, device: torch.device, beam: int, spec: SidSpec) -> int:
    """Users per decoding batch: ``eval.batch_size``, or when it is 0, 256 on a CPU and on a
    GPU the largest power of two (at most 4096) whose beam search tensors (about 32 bytes per
    beam x digit x code, or per catalogue item for the dense head) fit a third of free memory."""
    if cfg.batch_size:
        return cfg.batch_size
    if device.type != "cuda":
        return CPU_BATCH_USERS
    free, _ = torch.cuda.mem_get_info(device)
    per_user = 32 * max(beam * spec.digits * max(spec.sizes), spec.items)
    fits = max(1, free // 3 // per_user)
    return int(min(MAX_BATCH_USERS, 1 << (fits.bit_length() - 1)))


@torch.no_grad()
def rank_queries(model: DiffGRM, queries: Queries, sids: torch.Tensor, catalogue: CatalogueIndex,
                 cfg: EvalConfig, options: SearchOptions) -> dict[str, np.ndarray]:
    """Top-k items (under ``cfg.item_rule``), their scores and the top distinct SIDs per user;
    with targets, per-user metric values keyed ``item/…`` (the configured rule), ``sid/…``,
    and ``item.<rule>/…`` for every item rule (one beam search serves them all).
    Batches are decoded on the model's device (GPU, CPU), whatever device the caller is on."""
    device = next(model.parameters()).device
    pinned = device.type == "cuda"
    size = batch_users(cfg, device, options.beam, model.spec)
    k = max(cfg.top_k, max(KS))
    rules = (cfg.item_rule,) if options.decoder == "dense" else ITEM_RULES
    parts: dict[str, list[np.ndarray]] = {}
    options = options.to(device)
    for start in range(0, len(queries), size):
        part = queries.chunk(start, min(start + size, len(queries)))
        history, mask = (t.pin_memory() if pinned else t for t in part.padded(sids, model.spec.max_history))
        with torch.autocast(autocast_type(device), dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
            ranked = recommend_batch(model, history.to(device, non_blocking=True),
                                     mask.to(device, non_blocking=True), catalogue, options, k, rules)
        main = ranked[cfg.item_rule]
        for key, value in (("items", main.items), ("scores", main.scores), ("groups", main.groups)):
            parts.setdefault(key, []).append(value)
        if part.targets is None:
            continue
        for key, value in item_and_sid_metrics(main.items, main.groups, part.targets,
                                               catalogue.item_group).items():
            parts.setdefault(key, []).append(value)
        if options.decoder != "dense":
            for rule, r in ranked.items():
                for key, value in item_and_sid_metrics(r.items, r.groups, part.targets,
                                                       catalogue.item_group).items():
                    if key.startswith("item/"):
                        parts.setdefault(f"item.{rule}/{key[5:]}", []).append(value)
    return {key: np.concatenate(values) for key, values in parts.items()}
