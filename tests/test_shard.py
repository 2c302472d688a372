"""shard stage and the streaming reader: exactly once per epoch, same steps on every rank."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from diffgrm_dist.data.loaders import BalancedBatches, ShardSet, ShardStream, split_range
from diffgrm_dist.data.shard import write_split
from diffgrm_dist.data.shardformat import decode_window, encode_window


def test_window_round_trip():
    hist = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    out = decode_window(encode_window(7, 9, np.array([3, 2, 1]), hist), 3)
    assert out["user"] == 7 and out["item"] == 9
    assert out["tgt"].tolist() == [3, 2, 1] and out["hist"].tolist() == hist.tolist()
    empty = decode_window(encode_window(1, 2, np.array([0, 0, 0]), np.zeros((0, 3))), 3)
    assert empty["hist"].shape == (0, 3)


def test_split_range_covers_everything_once():
    for total in (0, 1, 7, 100):
        for parts in (1, 2, 3, 8):
            ranges = [split_range(total, parts, i) for i in range(parts)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """1,003 windows (a prime: nothing divides evenly) in shards of 64."""
    out = tmp_path_factory.mktemp("shards")
    n, items = 1003, 50
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 6, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    table = pa.table({"user": pa.array(np.arange(n, dtype=np.int32)),
                      "history": pa.LargeListArray.from_arrays(pa.array(offsets),
                                                               pa.array(rng.integers(0, items, offsets[-1]).astype(np.int32))),
                      "target": pa.array(np.arange(n, dtype=np.int32) % items)})
    sids = rng.integers(0, 16, (items, 3))
    manifest = {"digit_sizes": [16, 16, 16], "max_history": 5,
                "splits": {"train": write_split(table, sids, out / "train", "train", 64, shuffle_seed=0)}}
    (out / "shards.json").write_text(json.dumps(manifest))
    return ShardSet.load(out, "train")


@pytest.mark.parametrize("world", [1, 2])
def test_every_sample_once_per_epoch_and_equal_steps(shards, world):
    per_epoch = []
    for epoch in (1, 2):
        users, steps = [], []
        for rank in range(world):
            stream = ShardStream(shards, rank, world, seed=0, shuffle=True, shuffle_buffer=100)
            stream.set_epoch(epoch)
            batches = BalancedBatches(stream, batch_size=32, loader_workers=2)
            count = 0
            for batch in batches:
                users += batch["users"].tolist()
                count += 1
                longest = int(batch["history_mask"].sum(1).max())
                assert batch["history"].shape[1:] == (max(1, longest), 3)  # padded to the longest
            steps.append(count)
            assert count == len(batches)
        assert sorted(users) == list(range(1003)), "a sample was skipped or repeated"
        assert len(set(steps)) == 1, f"ranks ran different step counts: {steps}"
        per_epoch.append(users)
    assert per_epoch[0] != per_epoch[1], "the epoch seed did not change the order"


def test_same_seed_same_order(shards):
    def read(seed):
        stream = ShardStream(shards, 0, 1, seed=seed, shuffle=True, shuffle_buffer=100)
        stream.set_epoch(3)
        return [u for b in BalancedBatches(stream, 50, 2) for u in b["users"].tolist()]

    assert read(5) == read(5)
    assert read(5) != read(6)


def test_collate_left_pads_and_masks(shards):
    stream = ShardStream(shards, 0, 1, seed=0, shuffle=False)
    batch = next(iter(BalancedBatches(stream, 8, 0)))
    mask = batch["history_mask"]
    width = mask.shape[1]
    assert mask.dtype == torch.bool and mask[:, -1].all()  # most recent item in the last slot
    lengths = mask.sum(1)
    assert width == lengths.max()  # padded only as far as the longest history
    assert all(mask[i, width - lengths[i]:].all() and not mask[i, :width - lengths[i]].any()
               for i in range(8))
    assert (batch["history"][~mask] == 0).all()


def test_shard_manifest_checksums(shards):
    from pathlib import Path

    from diffgrm_dist.core.rundir import file_sha256

    manifest = json.loads((Path(shards.paths[0]).parents[1] / "shards.json").read_text())
    entries = manifest["splits"]["train"]["shards"]
    assert sum(e["samples"] for e in entries) == 1003 and len(entries) == 16
    for path, entry in zip(shards.paths, entries):
        assert file_sha256(path) == entry["sha256"]


def test_a_split_streamed_from_parquet_gives_the_same_shards_as_the_table(tmp_path):
    """write_split reads a Parquet split a batch at a time and shuffles through spill files:
    the shards are byte-identical to writing the table whole, and no spill file is left."""
    import pyarrow.parquet as pq

    from diffgrm_dist.data import shard

    rng = np.random.default_rng(3)
    n, items = 2500, 40
    offsets = np.concatenate([[0], np.cumsum(rng.integers(0, 7, n))])
    table = pa.table({"user": pa.array(rng.integers(0, 300, n).astype(np.int32)),
                      "history": pa.LargeListArray.from_arrays(
                          pa.array(offsets), pa.array(rng.integers(0, items, offsets[-1]).astype(np.int32))),
                      "target": pa.array(rng.integers(0, items, n).astype(np.int32))})
    sids = rng.integers(0, 16, (items, 3))
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=300)
    whole = write_split(table, sids, tmp_path / "a" / "train", "train", 128, shuffle_seed=5)
    streamed = write_split(tmp_path / "train.parquet", sids, tmp_path / "b" / "train", "train", 128, shuffle_seed=5)
    assert streamed == whole and len(whole["shards"]) == 20
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["train"]  # spill folder gone
    # Against the plain definition: position p of the shards holds window permutation(n)[p].
    order = np.random.default_rng(5).permutation(n)
    windows = [decode_window(w, 3) for w in shard._in_position_order(table, sids, n, 5, tmp_path / "spill")]
    assert [w["user"] for w in windows] == table["user"].to_numpy()[order].tolist()
