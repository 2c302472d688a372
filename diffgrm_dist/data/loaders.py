"""The training loaders of the shard stage's output, both exactly once per epoch across
ranks, with the same number of steps on every rank (ranks with different counts would hang
collective ops at epoch end):

* ``ShardStream`` + ``BalancedBatches``: the epoch's sample order is a seeded permutation of
  the shards; ranks, and the DataLoader workers inside each rank, take contiguous,
  near-equal ranges of that order (a range may start or end inside a shard, which is read
  and cut with WebDataset's tar reader), mixed by a small shuffle buffer. Sequential reads.
* ``ShuffledBatches``: every epoch is a fresh seeded permutation of all samples
  (``epoch_batches``), read by random access through the index (``IndexedWindows``), with
  optional length bucketing so batches pad less.

Both read a URI run's shards in place through its pyarrow filesystem (``ShardSet.open``):
training never copies the shard stage to the node.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import os
import random
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import webdataset as wds
from pyarrow import fs as pafs
from webdataset.tariterators import group_by_keys, tar_file_expander

from diffgrm_dist.core.errors import DataError
from diffgrm_dist.core.ragged import left_pad_index
from diffgrm_dist.core.rundir import RunDir, file_sha256
from diffgrm_dist.data.shardformat import INDEX_DTYPE, INDEX_NAME, decode_window


def verify_sha256(path: Path, expected: str) -> None:
    """DataError naming the file unless it exists and its sha256 is ``expected``."""
    if not path.is_file():
        raise DataError(path, "shard listed in shards.json is missing (re-run `diffgrm shard`)")
    found = file_sha256(path)
    if found != expected:
        raise DataError(path, f"sha256 {found[:12]}... does not match shards.json ({expected[:12]}...): "
                              "the shard is corrupt or half-copied (re-run `diffgrm shard`)")


def verify_sizes(fs: pafs.FileSystem, folder: str, shown: str, expected: dict[str, int]) -> None:
    """DataError naming the first shard in ``expected`` (name -> size, from the stage
    manifest's ``outputs``) that is missing from ``folder`` or has another size. One
    listing for the whole set: on an object store, hashing every shard on every rank
    would read the whole stage each time training starts."""
    found = {info.base_name: info.size for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
             if info.type == pafs.FileType.File}
    for name, size in expected.items():
        if name not in found:
            raise DataError(f"{shown}/{name}", "shard listed in shards.json is missing (re-run `diffgrm shard`)")
        if found[name] != size:
            raise DataError(f"{shown}/{name}", f"{found[name]} bytes, the shard stage wrote {size}: the shard "
                                               "is truncated or half-copied (re-run `diffgrm shard`)")


@dataclass(frozen=True)
class ShardSet:
    """One split's shards: paths and sample counts, from shards.json, and the split's sample
    index (``index_shards``) where the shard stage wrote one.

    ``fs`` is the pyarrow filesystem the paths are on: None for local files, the run's
    filesystem for a run directory given as a URI, whose shards are read in place."""

    paths: tuple[str, ...]
    counts: tuple[int, ...]
    digit_sizes: tuple[int, ...]
    max_history: int
    index: np.ndarray | None = field(default=None, compare=False, repr=False)
    fs: pafs.FileSystem | None = field(default=None, compare=False, repr=False)

    @classmethod
    def load(cls, shard_dir: Path, split: str, verify: bool = True) -> ShardSet:
        """A local shard stage folder. ``verify``: every shard (and the index) must match
        its sha256 in shards.json, so a half-copied or corrupt shard is named here instead
        of failing mid-epoch."""
        manifest = json.loads((shard_dir / "shards.json").read_text())
        entry = manifest["splits"][split]
        if verify:
            for e in entry["shards"] + ([entry["index"]] if "index" in entry else []):
                verify_sha256(shard_dir / split / e["name"], e["sha256"])
        index = None
        if "index" in entry:
            index = np.load(shard_dir / split / entry["index"]["name"], allow_pickle=False)
        return cls._build(manifest, split, str(shard_dir / split), str(shard_dir / split), index, None)

    @classmethod
    def open(cls, run_dir: RunDir, split: str, verify: bool = True) -> ShardSet:
        """The split of ``run_dir``'s shard stage, where the run keeps it: a local run as
        ``load``; a URI run reads only shards.json, the stage manifest and the index, and
        its shards stay in the bucket (``verify`` checks their sizes with one listing)."""
        if run_dir.remote is None:
            return cls.load(run_dir.stage_path("shard"), split, verify)
        shown = f"{run_dir.display}/shard"
        text = run_dir.read_text("shard", "shards.json")
        stage = run_dir.manifest("shard")
        if text is None or stage is None:
            raise DataError(f"{shown}/shards.json", "missing: run `diffgrm shard` first")
        manifest = json.loads(text)
        entry = manifest["splits"][split]
        if verify:
            outputs = stage.get("outputs", {})
            for e in entry["shards"]:
                if f"{split}/{e['name']}" not in outputs:
                    raise DataError(f"{shown}/{split}/{e['name']}", "listed in shards.json but not in the "
                                    "stage's manifest outputs (re-run `diffgrm shard`)")
            verify_sizes(run_dir.remote.fs, run_dir.remote.path(f"shard/{split}"), f"{shown}/{split}",
                         {e["name"]: int(outputs[f"{split}/{e['name']}"]) for e in entry["shards"]})
        index = None
        if "index" in entry:
            name = entry["index"]["name"]
            data = run_dir.remote.read_bytes(f"shard/{split}/{name}")
            if data is None:
                raise DataError(f"{shown}/{split}/{name}", "listed in shards.json but missing (re-run `diffgrm shard`)")
            if verify and hashlib.sha256(data).hexdigest() != entry["index"]["sha256"]:
                raise DataError(f"{shown}/{split}/{name}", "does not match its sha256 in shards.json: "
                                                           "corrupt or half-copied (re-run `diffgrm shard`)")
            index = np.load(io.BytesIO(data), allow_pickle=False)
        return cls._build(manifest, split, run_dir.remote.path(f"shard/{split}"), f"{shown}/{split}", index,
                          run_dir.remote.fs)

    @classmethod
    def _build(cls, manifest: dict[str, Any], split: str, folder: str, shown: str, index: np.ndarray | None,
               fs: pafs.FileSystem | None) -> ShardSet:
        entry = manifest["splits"][split]
        counts = tuple(int(e["samples"]) for e in entry["shards"])
        if index is not None:
            per_shard = np.bincount(index["shard"], minlength=len(counts))
            if index.dtype != INDEX_DTYPE or per_shard.tolist() != list(counts):
                raise ValueError(f"{shown}: index does not match shards.json")
        return cls(tuple(f"{folder}/{e['name']}" for e in entry["shards"]), counts,
                   tuple(manifest["digit_sizes"]), int(manifest["max_history"]), index, fs)

    @property
    def samples(self) -> int:
        return sum(self.counts)

    @property
    def remote(self) -> bool:
        """Whether the shards are read over a network filesystem rather than from local files."""
        return self.fs is not None and not isinstance(self.fs, pafs.LocalFileSystem)

    def filesystem(self) -> pafs.FileSystem:
        """Where ``paths`` are: ``fs``, or the local disk."""
        return self.fs if self.fs is not None else pafs.LocalFileSystem()


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part ``index`` when ``total`` items are cut into near-equal parts."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def split_bounds(total: int, parts: int) -> np.ndarray:
    """All of ``split_range``'s cuts at once: part i is [bounds[i], bounds[i + 1])."""
    base, extra = divmod(total, parts)
    i = np.arange(parts + 1)
    return i * base + np.minimum(i, extra)


def epoch_steps(total: int, world: int, batch_size: int) -> int:
    """Steps per epoch, the same on every rank: enough for the largest rank's share."""
    return max(1, -(-total // (world * batch_size)))


STREAM_BUFFER = 4 << 20  # bytes per read of a streamed shard: one ranged GET on an object store


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
        """Each piece's shard streamed front to back through WebDataset's tar reader, on
        the set's filesystem: local files and object stores alike, never a whole copy."""
        digits = len(self.shards.digit_sizes)
        fs = self.shards.filesystem()
        for path, skip, take in pieces:
            with fs.open_input_stream(path, compression=None, buffer_size=STREAM_BUFFER) as stream:
                files = tar_file_expander([{"url": path, "stream": stream}])
                # Raw bytes, decoded here: no pickle-capable decoder ever sees shard contents.
                for sample in itertools.islice(group_by_keys(files), skip, skip + take):
                    yield {**decode_window(sample["win"], digits), "key": sample["__key__"]}


def collate(samples: list[dict[str, Any]], max_history: int, digits: int) -> dict[str, torch.Tensor]:
    """Left-pads histories to the batch's longest (at most ``max_history``, at least one
    slot), the most recent item in the last slot. The model counts positions back from that
    slot, so this equals padding to ``max_history`` without computing on the padding."""
    b = len(samples)
    full = np.array([len(s["hist"]) for s in samples], dtype=np.int64)
    width = max(1, min(max_history, int(full.max(initial=0))))
    history = np.zeros((b, width, digits), dtype=np.int64)
    mask = np.zeros((b, width), dtype=bool)
    rows, slots, source = left_pad_index(np.cumsum(full), np.minimum(full, width), width)
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

    def __init__(self, stream: ShardStream, batch_size: int, loader_workers: int,
                 pin_memory: bool = False) -> None:
        self.stream, self.batch_size = stream, batch_size
        self.workers, self.pin_memory = loader_workers, pin_memory
        self.steps = epoch_steps(stream.shards.samples, stream.world, batch_size)
        self.skip, self.digest = 0, ""

    def set_epoch(self, epoch: int, skip: int = 0, digest: str = "") -> None:
        """As ``ShuffledBatches.set_epoch``; a stream has no random access, so the first
        ``skip`` batches are read past (never collated or handed to the model)."""
        self.stream.set_epoch(epoch)
        self.skip, self.digest = skip, digest

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(self.stream, batch_size=None, num_workers=self.workers,
                                             collate_fn=_as_is)
        n = self.stream.rank_samples()
        sizes = [hi - lo for lo, hi in (split_range(n, self.steps, i) for i in range(self.steps))]
        it = iter(loader)
        digits = len(self.stream.shards.digit_sizes)
        for step, size in enumerate(sizes):
            batch = [next(it) for _ in range(size)]
            if step < self.skip:
                continue
            keys = "\n".join(sample["key"] for sample in batch)
            self.digest = hashlib.sha256((self.digest + keys).encode()).hexdigest()
            collated = collate(batch, self.stream.shards.max_history, digits)
            yield {key: value.pin_memory() for key, value in collated.items()} if self.pin_memory else collated
        for leftover in it:  # the stream and the plan disagree: a bug, not a data problem
            raise RuntimeError(f"rank {self.stream.rank}: sample {leftover['key']} beyond the plan")


# --------------------------------------------------------------------------- global shuffle


class IndexedWindows(torch.utils.data.Dataset):
    """One split's windows by sample id (their order in the shards), read through the index.

    Each sample is one ranged read of its bytes: local shards with ``pread`` (not memory
    maps, whose pages, read around every random sample, would count as the reader's memory
    and grow with the shards), shards on a URI run's filesystem opened in place, so on an
    object store every sample is one ranged GET (``train.shuffle=shards`` is the sequential
    streaming reader for buckets).
    Files are opened on first use in each process, so DataLoader workers open their own
    rather than share a parent's (forked or spawned); at most ``max_open`` stay open (each
    holds a file descriptor or a connection). Samples are decoded by ``decode_window``: no
    pickle ever touches shard contents.
    """

    def __init__(self, shards: ShardSet, max_open: int = 256) -> None:
        if shards.index is None:
            raise ValueError(f"{Path(shards.paths[0]).parent}: no {INDEX_NAME}; rerun the shard stage")
        self.shards, self.max_open = shards, max_open
        self.digits = len(shards.digit_sizes)
        self._files: OrderedDict[int, pa.NativeFile] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.shards.index)

    def __getstate__(self) -> dict[str, Any]:
        """Open files do not pickle; a spawned worker opens its own."""
        return {**self.__dict__, "_files": OrderedDict()}

    def _file(self, shard: int) -> pa.NativeFile:
        if self._pid != os.getpid():  # a forked worker: drop the parent's files
            self._files, self._pid = OrderedDict(), os.getpid()
        if shard in self._files:
            self._files.move_to_end(shard)
        else:
            if len(self._files) >= self.max_open:
                self._files.popitem(last=False)[1].close()
            path = self.shards.paths[shard]
            self._files[shard] = (self.shards.fs.open_input_file(path) if self.shards.remote
                                  else pa.OSFile(path, "r"))
        return self._files[shard]

    def read(self, ids: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
        """The samples with these ids, in this order."""
        rows = self.shards.index[np.asarray(ids, dtype=np.int64)]
        return [decode_window(self._file(shard).read_at(size, offset), self.digits)
                for shard, offset, size in zip(rows["shard"].tolist(), rows["offset"].tolist(),
                                               rows["size"].tolist())]

    __getitems__ = read  # DataLoader fetches a whole batch in one call

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.read([i])[0]


def epoch_batches(lengths: np.ndarray, seed: int, epoch: int, rank: int, world: int,
                  batch_size: int, bucket_batches: int = 0) -> list[np.ndarray]:
    """Rank ``rank``'s batches (sample ids) of epoch ``epoch``: a fresh permutation of all
    samples each epoch, cut into ranks by ``split_range`` and into ``epoch_steps`` batches
    whose sizes differ by at most one, so every sample is used once and every rank runs the
    same number of steps.

    With ``bucket_batches`` > 0, each run of that many batches' samples is sorted by history
    length (``lengths``, one per sample) before it is cut, so batches pad less, and the
    batches of a run are then put in a seeded random order. Sizes and the sample set stay
    as without bucketing.
    """
    n = len(lengths)
    steps = epoch_steps(n, world, batch_size)
    start, end = split_range(n, world, rank)
    ids = np.random.default_rng([seed, epoch]).permutation(n)[start:end]
    bounds = split_bounds(len(ids), steps)
    if not bucket_batches:
        return np.split(ids, bounds[1:-1])
    run = np.arange(steps) // bucket_batches
    ids = ids[np.lexsort((np.asarray(lengths)[ids], np.repeat(run, np.diff(bounds))))]
    batches = np.split(ids, bounds[1:-1])
    order = np.lexsort((np.random.default_rng([seed, epoch, rank]).random(steps), run))
    return [batches[i] for i in order]


class ShuffledBatches:
    """One rank's batches of an epoch-wide reshuffle of every window (``epoch_batches``),
    iterated like ``BalancedBatches``. With ``loader_workers`` > 0, DataLoader workers each
    read and collate whole batches, handed out in the plan's order."""

    def __init__(self, shards: ShardSet, rank: int, world: int, seed: int, batch_size: int,
                 loader_workers: int, bucket_batches: int = 0, pin_memory: bool = False) -> None:
        self.windows = IndexedWindows(shards)
        self.pin_memory = pin_memory  # page-locked batches: asynchronous copies to a GPU
        self.rank, self.world, self.seed, self.batch_size = rank, world, seed, batch_size
        self.workers, self.bucket_batches = loader_workers, bucket_batches
        self.epoch, self.skip = 0, 0
        self.digest = ""
        self.steps = epoch_steps(shards.samples, world, batch_size)

    def set_epoch(self, epoch: int, skip: int = 0, digest: str = "") -> None:
        """Epoch ``epoch``'s plan, starting after its first ``skip`` batches (a resumed
        epoch: those windows are never read again); ``digest`` is the windows digest of the
        batches skipped, as ``self.digest`` read after them."""
        self.epoch, self.skip, self.digest = epoch, skip, digest

    def plan(self) -> list[np.ndarray]:
        """This epoch's batches of sample ids, in order."""
        return epoch_batches(self.windows.shards.index["length"], self.seed, self.epoch,
                             self.rank, self.world, self.batch_size, self.bucket_batches)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        shards = self.windows.shards
        batcher = functools.partial(collate, max_history=shards.max_history,
                                    digits=len(shards.digit_sizes))
        plan = self.plan()[self.skip:]
        loader = torch.utils.data.DataLoader(self.windows, batch_sampler=plan, num_workers=self.workers,
                                             collate_fn=batcher, pin_memory=self.pin_memory)
        for ids, batch in zip(plan, loader):
            # A chained digest of the window ids handed out, batch by batch: the same after a
            # resume as without one, and carried across the resume as a string.
            self.digest = hashlib.sha256(self.digest.encode() + np.asarray(ids, np.int64).tobytes()).hexdigest()
            yield batch
