"""shard stage: training windows -> WebDataset tar shards (read back by ``loaders.py``).

Every window (user, history of item SIDs, target SID, target item) becomes one
WebDataset sample (``shardformat.py``); training windows are shuffled once (seeded) so
every shard is a mix of users, then cut into shards of ``shard.samples_per_shard``. The
split is read a batch of rows at a time and the shuffle is external (windows spilled to
files by position range, each sorted on reading back), so memory does not grow with the
split. Validation and test examples go to their own shard sets. Each set also gets
``index.npy``: where every sample's bytes sit in its tar and its history length, for
random access. ``shards.json`` lists each set's shards with sample counts and sha256
checksums, and its index with its checksum.
"""

from __future__ import annotations

import json
import struct
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from diffgrm_dist.core.rundir import file_sha256
from diffgrm_dist.data.shardformat import HEADER, INDEX_DTYPE, INDEX_NAME, SPLITS, encode_window
from diffgrm_dist.data.sids import load_sids

SPILL_BUCKETS = 64  # temporary files of the external shuffle, each a contiguous range of positions
_RECORD = struct.Struct("<qi")  # a spilled window: its position in the split, its length


def _window_batches(source: pa.Table | Path, sids: np.ndarray, rows: int = 1 << 16) -> Iterator[list[bytes]]:
    """The split's windows, encoded (``encode_window``), a batch of rows at a time."""
    batches = (source.to_batches(max_chunksize=rows) if isinstance(source, pa.Table)
               else pq.ParquetFile(source).iter_batches(batch_size=rows))
    for batch in batches:
        history = batch.column("history")
        offsets = history.offsets.to_numpy()
        flat = history.values.to_numpy()
        users, targets = batch.column("user").to_numpy(), batch.column("target").to_numpy()
        yield [encode_window(users[i], targets[i], sids[targets[i]], sids[flat[offsets[i]:offsets[i + 1]]])
               for i in range(len(targets))]


def _in_position_order(source: pa.Table | Path, sids: np.ndarray, n: int, seed: int | None,
                       spill_dir: Path) -> Iterator[bytes]:
    """Encoded windows in the order they go into the shards: file order, or a seeded
    permutation. The permutation is an external shuffle: windows are spilled to
    ``SPILL_BUCKETS`` files by position range, then each bucket is sorted and read back,
    so memory is one bucket and a batch of rows, not the split."""
    if seed is None:
        for encoded in _window_batches(source, sids):
            yield from encoded
        return
    order = np.random.default_rng(seed).permutation(n)  # position p holds window order[p]
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    del order
    width = -(-n // SPILL_BUCKETS) if n else 1
    spill_dir.mkdir(parents=True, exist_ok=True)
    files = [open(spill_dir / f"{b:03d}.bin", "wb") for b in range(SPILL_BUCKETS)]
    try:
        row = 0
        for encoded in _window_batches(source, sids):
            for pos, data in zip(position[row:row + len(encoded)].tolist(), encoded):
                files[pos // width].write(_RECORD.pack(pos, len(data)) + data)
            row += len(encoded)
    finally:
        for fh in files:
            fh.close()
    del position
    for b in range(SPILL_BUCKETS):
        path = spill_dir / f"{b:03d}.bin"
        data, records, at = path.read_bytes(), [], 0
        while at < len(data):
            pos, size = _RECORD.unpack_from(data, at)
            at += _RECORD.size
            records.append((pos, data[at:at + size]))
            at += size
        path.unlink()
        records.sort()
        yield from (window for _, window in records)
    spill_dir.rmdir()


def write_split(source: pa.Table | Path, sids: np.ndarray, out: Path, split: str,
                samples_per_shard: int, shuffle_seed: int | None) -> dict[str, Any]:
    """Writes one split's windows (a table, or a Parquet file read a batch at a time) as tar
    shards plus their index; returns the split's manifest entry: ``samples``, ``shards``
    (name, samples, sha256 each) and ``index``."""
    out.mkdir(parents=True, exist_ok=True)
    n = source.num_rows if isinstance(source, pa.Table) else pq.ParquetFile(source).metadata.num_rows
    pattern = str(out / f"{split}-%06d.tar")
    windows = _in_position_order(source, sids, n, shuffle_seed, out.parent / f".{split}.spill")
    # mtime fixed so the same data gives byte-identical shards.
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, mtime=0,
                         format=tarfile.USTAR_FORMAT) as sink:
        for position, window in enumerate(windows):
            sink.write({"__key__": f"{position:010d}", "win": window})
    shards = sorted(out.glob(f"{split}-*.tar"))
    counts = [min(samples_per_shard, n - i * samples_per_shard) for i in range(len(shards))]
    index_path = out / INDEX_NAME
    index_shards(shards, sids.shape[1], index_path, n)
    return {"samples": n,
            "shards": [{"name": p.name, "samples": c, "sha256": file_sha256(p)}
                       for p, c in zip(shards, counts)],
            "index": {"name": INDEX_NAME, "sha256": file_sha256(index_path)}}


def index_shards(paths: Sequence[Path], digits: int, out: Path, samples: int) -> None:
    """Scans finished tars for every sample's data offset and size, so training can seek to
    any sample without reading tar headers; history lengths follow from the sizes. Writes
    ``out`` (.npy, as ``np.save`` would) a shard at a time: memory is one shard's headers."""
    header = {"descr": np.lib.format.dtype_to_descr(INDEX_DTYPE), "fortran_order": False, "shape": (samples,)}
    at = 0
    with open(out, "wb") as sink:
        np.lib.format.write_array_header_1_0(sink, header)
        for number, path in enumerate(paths):
            with tarfile.open(path) as tar:
                members = [m for m in tar if m.name.endswith(".win")]
            if at + len(members) > samples:
                break
            rows = np.zeros(len(members), dtype=INDEX_DTYPE)
            rows["shard"] = number
            rows["offset"] = np.fromiter((m.offset_data for m in members), np.int64, len(members))
            rows["size"] = np.fromiter((m.size for m in members), np.int64, len(members))
            # header, then ``digits`` target codes and ``length * digits`` history codes, int16 each
            rows["length"] = (rows["size"] - HEADER.itemsize) // (2 * digits) - 1
            sink.write(rows.tobytes())
            at += len(members)
    if at != samples:
        raise ValueError(f"{out.parent}: the shards hold more or fewer than the {samples} samples written")


def run_shard(cfg, run_dir, out: Path) -> dict[str, Any]:
    prepare_dir, tokenize_dir = run_dir.stage_path("prepare"), run_dir.stage_path("tokenize")
    table = load_sids(tokenize_dir)
    sids, sizes = table.codes, list(table.sizes)
    manifest: dict[str, Any] = {"digit_sizes": sizes, "max_history": cfg.prepare.max_history,
                                "splits": {}}
    for split in SPLITS:
        seed = cfg.shard.seed + cfg.seed if split == "train" else None
        manifest["splits"][split] = write_split(prepare_dir / f"{split}.parquet", sids, out / split, split,
                                                cfg.shard.samples_per_shard, seed)
    (out / "shards.json").write_text(json.dumps(manifest, indent=2) + "\n")
    stats = {f"{s}_samples": manifest["splits"][s]["samples"] for s in SPLITS}
    stats.update({f"{s}_shards": len(manifest["splits"][s]["shards"]) for s in SPLITS})
    stats["bytes"] = sum(p.stat().st_size for p in out.rglob("*.tar"))
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
