"""shard stage: training windows -> WebDataset tar shards, plus the streaming reader.

Writing: every window (user, history of item SIDs, target SID, target item) becomes one
WebDataset sample; training windows are shuffled once (seeded) so every shard is a mix of
users, then cut into shards of ``shard.samples_per_shard``. Validation and test examples go
to their own shard sets. ``shards.json`` lists each set's shards with sample counts and
sha256 checksums.

Reading (``ShardStream``): the epoch's sample order is a seeded permutation of the shards;
ranks, and the DataLoader workers inside each rank, take contiguous, near-equal ranges of
that order (a range may start or end inside a shard, which is read and cut with
WebDataset's tar reader). So per epoch every sample is read exactly once across all ranks
and workers, and ``BalancedBatches`` gives every rank the same number of steps: splitting
by whole shards, as ``wds.split_by_node`` does, would leave ranks with different sample
counts and hang collective ops at epoch end.
"""

from __future__ import annotations

import json
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import webdataset as wds

from diffgrm_dist.rundir import file_sha256

SPLITS = ("train", "valid", "test")


# --------------------------------------------------------------------------- writing


def load_sid_matrix(tokenize_dir: Path) -> tuple[np.ndarray, list[int], np.ndarray]:
    """(items, digits) SID matrix in item order, codes per digit, and each item's rank
    among the items sharing its code."""
    sids = pq.read_table(tokenize_dir / "sids.parquet")
    digits = [c for c in sids.column_names if c.startswith("d") and c[1:].isdigit()]
    matrix = np.stack([sids[c].to_numpy() for c in digits], axis=1).astype(np.int16)
    order = np.argsort(sids["item"].to_numpy())
    meta = json.loads((tokenize_dir / "quantizer" / "quantizer.json").read_text())
    stats = json.loads((tokenize_dir / "stats.json").read_text())
    sizes = [meta["codebook_size"]] * meta["digits"]
    if len(digits) > meta["digits"]:
        sizes.append(int(stats["extra_digit_size"]))
    return matrix[order], sizes, sids["collision_rank"].to_numpy()[order]


_HEADER = np.dtype([("user", "<i4"), ("item", "<i4"), ("length", "<i4")])


def encode_window(user: int, item: int, target: np.ndarray, history: np.ndarray) -> bytes:
    """One window as a single tar member: (user, item, length) int32, then int16 target
    digits and history digits. One small member per sample keeps a shard near 1 KB/sample
    (tar pads every member to 512 bytes)."""
    header = np.array([(user, item, len(history))], dtype=_HEADER).tobytes()
    return header + target.astype("<i2").tobytes() + history.astype("<i2").tobytes()


def decode_window(data: bytes, digits: int) -> dict[str, Any]:
    header = np.frombuffer(data, dtype=_HEADER, count=1)[0]
    codes = np.frombuffer(data, dtype="<i2", offset=_HEADER.itemsize)
    return {"user": int(header["user"]), "item": int(header["item"]), "tgt": codes[:digits],
            "hist": codes[digits:].reshape(int(header["length"]), digits)}


def write_split(table: pa.Table, sids: np.ndarray, out: Path, split: str,
                samples_per_shard: int, shuffle_seed: int | None) -> list[dict[str, Any]]:
    """Writes one split's windows as tar shards; returns their manifest entries."""
    out.mkdir(parents=True, exist_ok=True)
    n = table.num_rows
    order = (np.random.default_rng(shuffle_seed).permutation(n) if shuffle_seed is not None
             else np.arange(n))
    offsets = table["history"].combine_chunks().offsets.to_numpy()
    flat = pc.list_flatten(table["history"]).to_numpy()
    users = table["user"].to_numpy()
    targets = table["target"].to_numpy()
    pattern = str(out / f"{split}-%06d.tar")
    # mtime fixed so the same data gives byte-identical shards.
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, mtime=0,
                         format=tarfile.USTAR_FORMAT) as sink:
        for position, row in enumerate(order):
            history = flat[offsets[row]:offsets[row + 1]]
            sink.write({"__key__": f"{position:010d}",
                        "win": encode_window(users[row], targets[row], sids[targets[row]],
                                             sids[history])})
    shards = sorted(out.glob(f"{split}-*.tar"))
    counts = [min(samples_per_shard, n - i * samples_per_shard) for i in range(len(shards))]
    return [{"name": p.name, "samples": c, "sha256": file_sha256(p)} for p, c in zip(shards, counts)]


def run_shard(cfg, run_dir, out: Path) -> dict[str, Any]:
    prepare_dir, tokenize_dir = run_dir.stage_path("prepare"), run_dir.stage_path("tokenize")
    sids, sizes, _ = load_sid_matrix(tokenize_dir)
    manifest: dict[str, Any] = {"digit_sizes": sizes, "max_history": cfg.prepare.max_history,
                                "splits": {}}
    for split in SPLITS:
        table = pq.read_table(prepare_dir / f"{split}.parquet")
        seed = cfg.shard.seed + cfg.seed if split == "train" else None
        entries = write_split(table, sids, out / split, split, cfg.shard.samples_per_shard, seed)
        manifest["splits"][split] = {"samples": table.num_rows, "shards": entries}
    (out / "shards.json").write_text(json.dumps(manifest, indent=2) + "\n")
    stats = {f"{s}_samples": manifest["splits"][s]["samples"] for s in SPLITS}
    stats.update({f"{s}_shards": len(manifest["splits"][s]["shards"]) for s in SPLITS})
    stats["bytes"] = sum(p.stat().st_size for p in out.rglob("*.tar"))
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ShardSet:
    """One split's shards: paths and sample counts, from shards.json."""

    paths: tuple[str, ...]
    counts: tuple[int, ...]
    digit_sizes: tuple[int, ...]
    max_history: int

    @classmethod
    def load(cls, shard_dir: Path, split: str) -> ShardSet:
        manifest = json.loads((shard_dir / "shards.json").read_text())
        entries = manifest["splits"][split]["shards"]
        return cls(tuple(str(shard_dir / split / e["name"]) for e in entries),
                   tuple(int(e["samples"]) for e in entries), tuple(manifest["digit_sizes"]),
                   int(manifest["max_history"]))

    @property
    def samples(self) -> int:
        return sum(self.counts)


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part ``index`` when ``total`` items are cut into near-equal parts."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


class ShardStream(torch.utils.data.IterableDataset):
    """Samples of one rank's share of an epoch, split again across DataLoader workers."""

    def __init__(self, shards: ShardSet, rank: int, world: int, seed: int, shuffle: bool,
                 shuffle_buffer: int = 2000) -> None:
        super().__init__()
        self.shards, self.rank, self.world = shards, rank, world
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_samples(self) -> int:
        start, end = split_range(self.shards.samples, self.world, self.rank)
        return end - start

    def _pieces(self, start: int, end: int) -> list[tuple[str, int, int]]:
        """(shard path, skip, take) covering positions [start, end) of the epoch order."""
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards.paths))
                 if self.shuffle else np.arange(len(self.shards.paths)))
        pieces, position = [], 0
        for shard in order:
            count = self.shards.counts[shard]
            lo, hi = max(start, position), min(end, position + count)
            if lo < hi:
                pieces.append((self.shards.paths[shard], lo - position, hi - lo))
            position += count
        return pieces

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank_start, rank_end = split_range(self.shards.samples, self.world, self.rank)
        w_start, w_end = split_range(rank_end - rank_start, workers, worker)
        pieces = self._pieces(rank_start + w_start, rank_start + w_end)
        samples = self._read(pieces)
        if self.shuffle:
            rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
            samples = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer // 4, rng=rng)(samples)
        yield from samples

    def _read(self, pieces: list[tuple[str, int, int]]) -> Iterator[dict[str, Any]]:
        digits = len(self.shards.digit_sizes)
        for path, skip, take in pieces:
            # Raw bytes, decoded here: no pickle-capable decoder ever sees shard contents.
            source = wds.WebDataset(path, shardshuffle=False, nodesplitter=None,
                                    workersplitter=None, empty_check=False)
            for i, sample in enumerate(source):
                if i >= skip + take:
                    break
                if i >= skip:
                    yield {**decode_window(sample["win"], digits), "key": sample["__key__"]}


def ragged_positions(lengths: np.ndarray) -> np.ndarray:
    """Rows of these lengths laid end to end: each element's position within its row."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def left_pad_index(ends: np.ndarray, lengths: np.ndarray, width: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows of a flat array ending at ``ends``, where their last ``lengths`` elements go
    in a (rows, width) left-padded batch, the most recent in the last slot:
    (batch row, slot, position in the flat array) of every element placed."""
    lengths = np.asarray(lengths, dtype=np.int64)
    within = ragged_positions(lengths)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    slots = width - np.repeat(lengths, lengths) + within
    source = np.repeat(np.asarray(ends, dtype=np.int64) - lengths, lengths) + within
    return rows, slots, source


def collate(samples: list[dict[str, Any]], max_history: int, digits: int) -> dict[str, torch.Tensor]:
    """Left-pads histories so the most recent item always sits in the last slot."""
    b = len(samples)
    history = np.zeros((b, max_history, digits), dtype=np.int64)
    mask = np.zeros((b, max_history), dtype=bool)
    full = np.array([len(s["hist"]) for s in samples], dtype=np.int64)
    rows, slots, source = left_pad_index(np.cumsum(full), np.minimum(full, max_history), max_history)
    history[rows, slots] = np.concatenate([s["hist"] for s in samples])[source]
    mask[rows, slots] = True
    return {"history": torch.from_numpy(history), "history_mask": torch.from_numpy(mask),
            "targets": torch.from_numpy(np.stack([s["tgt"] for s in samples]).astype(np.int64)),
            "users": torch.tensor([s["user"] for s in samples]),
            "items": torch.tensor([s["item"] for s in samples])}


def _as_is(sample: dict[str, Any]) -> dict[str, Any]:
    """Leaves samples as NumPy; ``collate`` builds the batch tensors."""
    return sample


class BalancedBatches:
    """Batches of one rank's samples: exactly ``steps`` batches on every rank.

    ``steps = ceil(total / (world * batch))`` is the same everywhere; a rank's samples are
    spread over those steps as evenly as possible (sizes differ by at most one), so no rank
    runs out before the others and no sample is dropped or repeated.
    """

    def __init__(self, stream: ShardStream, batch_size: int, loader_workers: int) -> None:
        self.stream, self.batch_size = stream, batch_size
        self.workers = loader_workers
        total = stream.shards.samples
        self.steps = max(1, -(-total // (stream.world * batch_size)))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(self.stream, batch_size=None, num_workers=self.workers,
                                             collate_fn=_as_is)
        n = self.stream.rank_samples()
        sizes = [hi - lo for lo, hi in (split_range(n, self.steps, i) for i in range(self.steps))]
        it = iter(loader)
        digits = len(self.stream.shards.digit_sizes)
        for size in sizes:
            batch = [next(it) for _ in range(size)]
            yield collate(batch, self.stream.shards.max_history, digits)
        for leftover in it:  # the stream and the plan disagree: a bug, not a data problem
            raise RuntimeError(f"rank {self.stream.rank}: sample {leftover['key']} beyond the plan")
