"""Global per-epoch reshuffle: the shard index, random access, the epoch plan and its loader."""

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from diffgrm_dist.core.rundir import file_sha256
from diffgrm_dist.data.loaders import (
    BalancedBatches,
    IndexedWindows,
    ShardSet,
    ShardStream,
    ShuffledBatches,
    collate,
    epoch_batches,
)
from diffgrm_dist.data.shard import write_split

N, PER_SHARD, MAX_HISTORY, DIGITS = 1003, 64, 48, 3  # 1,003: nothing divides evenly


def write_train(out: Path, n: int = N) -> ShardSet:
    """``n`` windows with histories of 1-40 items in shards of 64, through the real writer;
    user ids are unique, so they identify samples."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 41, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = 50
    table = pa.table({"user": pa.array(np.arange(n, dtype=np.int32)),
                      "history": pa.LargeListArray.from_arrays(
                          pa.array(offsets), pa.array(rng.integers(0, items, offsets[-1]).astype(np.int32))),
                      "target": pa.array(np.arange(n, dtype=np.int32) % items)})
    sids = rng.integers(0, 16, (items, DIGITS))
    manifest = {"digit_sizes": [16] * DIGITS, "max_history": MAX_HISTORY,
                "splits": {"train": write_split(table, sids, out / "train", "train", PER_SHARD, 0)}}
    (out / "shards.json").write_text(json.dumps(manifest))
    return ShardSet.load(out, "train")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> ShardSet:
    return write_train(tmp_path_factory.mktemp("shuffle"))


@pytest.fixture(scope="module")
def sample_of_user(shards) -> np.ndarray:
    """Sample id (position in the shards) of every user, read by random access."""
    users = np.array([s["user"] for s in IndexedWindows(shards).read(np.arange(N))])
    assert sorted(users) == list(range(N))
    return np.argsort(users)


def epoch(shards, epoch, world=1, batch=32, workers=0, bucket=0, seed=0) -> list[list[list[int]]]:
    """Every rank's batches of one epoch, as lists of users; checks the batch shapes."""
    ranks = []
    for rank in range(world):
        loader = ShuffledBatches(shards, rank, world, seed, batch, workers, bucket)
        loader.set_epoch(epoch)
        batches = []
        for b in loader:
            lengths = b["history_mask"].sum(1)
            assert b["history"].shape[1:] == (min(MAX_HISTORY, int(lengths.max())), DIGITS)
            assert b["history_mask"][:, -1].all()  # every history here is non-empty
            batches.append(b["users"].tolist())
        assert len(batches) == len(loader)
        ranks.append(batches)
    return ranks


def test_index_points_at_every_sample_and_is_deterministic(shards, tmp_path):
    """Random access reads exactly what the tar reader reads, in the same order; the index
    is listed with its checksum and rewriting the same data gives the same bytes."""
    stream = list(ShardStream(shards, 0, 1, seed=0, shuffle=False))
    direct = IndexedWindows(shards).read(np.arange(N))
    assert [s["user"] for s in direct] == [s["user"] for s in stream]
    for a, b in zip(direct, stream):
        assert a["item"] == b["item"] and np.array_equal(a["tgt"], b["tgt"])
        assert np.array_equal(a["hist"], b["hist"])
    assert shards.index["length"].tolist() == [len(s["hist"]) for s in stream]
    assert np.bincount(shards.index["shard"]).tolist() == list(shards.counts)

    out = Path(shards.paths[0]).parents[1]
    entry = json.loads((out / "shards.json").read_text())["splits"]["train"]
    assert entry["index"]["sha256"] == file_sha256(out / "train" / entry["index"]["name"])
    again = tmp_path / "again"
    write_train(again)
    assert (again / "train" / "index.npy").read_bytes() == (out / "train" / "index.npy").read_bytes()


def test_random_access_pickles_and_caps_open_files(shards, sample_of_user):
    """A spawned worker gets the reader by pickle (open files cannot travel); a capped reader
    closes files and reopens them and still reads the same samples."""
    ids = np.random.default_rng(3).permutation(N)[:300]
    reader = IndexedWindows(shards)
    expected = [s["user"] for s in reader.read(ids)]
    assert [s["user"] for s in pickle.loads(pickle.dumps(reader)).read(ids)] == expected
    capped = IndexedWindows(shards, max_open=2)
    assert [s["user"] for s in capped.read(ids)] == expected and len(capped._files) == 2
    assert np.array_equal(sample_of_user[expected], ids)


def test_missing_index_is_a_clear_error(shards, tmp_path):
    out = Path(shards.paths[0]).parents[1]
    manifest = json.loads((out / "shards.json").read_text())
    del manifest["splits"]["train"]["index"]
    (tmp_path / "shards.json").write_text(json.dumps(manifest))
    (tmp_path / "train").symlink_to(out / "train")
    old = ShardSet.load(tmp_path, "train")
    assert old.index is None and old.samples == N
    with pytest.raises(ValueError, match="index"):
        ShuffledBatches(old, 0, 1, 0, 32, 0)


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 2), (2, 0)])
def test_every_sample_once_per_epoch_and_equal_steps(shards, world, workers):
    for e in (0, 1):
        ranks = epoch(shards, e, world=world, workers=workers)
        users = [u for batches in ranks for b in batches for u in b]
        assert sorted(users) == list(range(N)), "a sample was skipped or repeated"
        assert len({len(batches) for batches in ranks}) == 1, "ranks ran different step counts"
        sizes = [len(b) for batches in ranks for b in batches]
        assert max(sizes) - min(sizes) <= 1


def test_order_is_a_new_permutation_each_epoch_and_repeats_for_the_seed(shards):
    flat = [u for b in epoch(shards, 3)[0] for u in b]
    assert flat == [u for b in epoch(shards, 3)[0] for u in b]
    assert epoch(shards, 3, workers=2) == epoch(shards, 3)  # workers keep the plan's order
    assert flat != [u for b in epoch(shards, 4)[0] for u in b]
    assert flat != [u for b in epoch(shards, 3, seed=1)[0] for u in b]


def test_a_batch_draws_from_many_shards(shards, sample_of_user):
    """Not one shard (or a few neighbouring ones) at a time: the first batch of 32 from 16
    shards of 64 should touch most shards; the shard-order stream touches few."""
    def shards_in_first_batch(batches) -> int:
        first = next(iter(batches))["users"].numpy()
        return len(np.unique(shards.index["shard"][sample_of_user[first]]))

    assert shards_in_first_batch(ShuffledBatches(shards, 0, 1, 0, 32, 0)) >= 10
    stream = ShardStream(shards, 0, 1, seed=0, shuffle=True, shuffle_buffer=100)
    assert shards_in_first_batch(BalancedBatches(stream, 32, 0)) <= 3


@pytest.mark.parametrize("world", [1, 2])
def test_length_bucketing_keeps_once_and_steps_and_pads_less(shards, sample_of_user, world):
    plain, bucketed = epoch(shards, 2, world=world), epoch(shards, 2, world=world, bucket=8)
    assert [len(b) for b in plain] == [len(b) for b in bucketed]
    users = [u for batches in bucketed for b in batches for u in b]
    assert sorted(users) == list(range(N))
    sizes = [len(b) for batches in bucketed for b in batches]
    assert max(sizes) - min(sizes) <= 1

    lengths = shards.index["length"][sample_of_user]

    def mean_width(ranks) -> float:
        return float(np.mean([lengths[b].max() for batches in ranks for b in batches]))
    assert mean_width(bucketed) < 0.75 * mean_width(plain), (mean_width(bucketed), mean_width(plain))


def test_epoch_plan_is_pure_and_balanced_at_scale():
    lengths = np.random.default_rng(1).integers(0, 100, 10_007)
    for world, batch, bucket in [(3, 64, 0), (3, 64, 5), (4, 5000, 2), (2, 5003, 0), (1, 1, 0)]:
        plans = [epoch_batches(lengths, 7, 2, r, world, batch, bucket) for r in range(world)]
        assert all(np.array_equal(a, b) for r in range(world) for a, b in
                   zip(plans[r], epoch_batches(lengths, 7, 2, r, world, batch, bucket)))
        ids = np.concatenate([b for plan in plans for b in plan])
        assert np.array_equal(np.sort(ids), np.arange(len(lengths)))
        assert len({len(p) for p in plans}) == 1 and len(plans[0]) == -(-10_007 // (world * batch))
        sizes = [len(b) for plan in plans for b in plan]
        assert max(sizes) - min(sizes) <= 1


def test_bucketing_sorts_within_runs_of_batches_only():
    """Each run of ``bucket_batches`` batches holds the same samples as without bucketing,
    sorted by length across the run's batches, whose order is then shuffled."""
    lengths = np.random.default_rng(1).integers(0, 100, 10_007)
    plain, bucketed = epoch_batches(lengths, 7, 2, 1, 2, 64, 0), epoch_batches(lengths, 7, 2, 1, 2, 64, 4)
    assert len(plain) == len(bucketed) == 79
    for start in range(0, 79, 4):
        run = bucketed[start:start + 4]
        assert np.array_equal(np.sort(np.concatenate(run)), np.sort(np.concatenate(plain[start:start + 4])))
        ranges = sorted((lengths[b].min(), lengths[b].max()) for b in run)
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:])), "a run is not sorted by length"
    widths = [lengths[b].max() for b in bucketed]
    assert any(widths[i:i + 4] != sorted(widths[i:i + 4]) for i in range(0, 79, 4)), \
        "batch order within runs is not shuffled"


def test_collate_pads_to_the_longest_history_most_recent_last():
    def sample(hist):
        return {"user": 0, "item": 0, "tgt": np.zeros(2, np.int16),
                "hist": np.array(hist, np.int16).reshape(-1, 2)}

    batch = collate([sample([[1, 1], [2, 2]]), sample([]), sample([[3, 3], [4, 4], [5, 5]])], 4, 2)
    assert batch["history"][:, :, 0].tolist() == [[0, 1, 2], [0, 0, 0], [3, 4, 5]]
    assert batch["history_mask"].tolist() == [[False, True, True], [False] * 3, [True] * 3]
    long = collate([sample([[i, i] for i in range(1, 7)]), sample([[9, 9]])], 4, 2)
    assert long["history"][:, :, 0].tolist() == [[3, 4, 5, 6], [0, 0, 0, 9]]  # the last 4 kept
    empty = collate([sample([]), sample([])], 4, 2)
    assert empty["history"].shape == (2, 1, 2) and not empty["history_mask"].any()
