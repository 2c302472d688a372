"""Queries: packed histories, seeded validation samples, batches padded to their longest history."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from diffgrm_dist.evaluate.ranking import Queries


def queries():
    lengths = np.array([3, 1, 4, 2, 5, 2])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return Queries(np.arange(6) * 10, offsets, np.arange(offsets[-1]) + 100, np.arange(6) + 1000)


def test_take_keeps_each_users_own_history():
    q = queries()
    picked = q.take(np.array([4, 0, 3]))
    assert picked.users.tolist() == [40, 0, 30] and picked.targets.tolist() == [1004, 1000, 1003]
    assert picked.offsets.tolist() == [0, 5, 8, 10]
    assert picked.history.tolist() == [110, 111, 112, 113, 114, 100, 101, 102, 108, 109]


def test_valid_sample_is_seeded_and_the_same_every_time():
    q = queries()
    a, b = q.sample(3, seed=7), q.sample(3, seed=7)
    assert a.users.tolist() == b.users.tolist() and len(a) == 3
    assert sorted(a.users.tolist()) == a.users.tolist()  # original order kept
    assert any(q.sample(3, seed=s).users.tolist() != a.users.tolist() for s in range(8, 20))
    assert q.sample(0, seed=7) is q and q.sample(99, seed=7) is q  # 0 / too many: everyone


def test_sampled_split_reads_row_groups_and_equals_sampling_the_whole_split(tmp_path):
    """Training validation samples the split row group by row group (bounded memory); it
    must pick the same users, histories and targets as sampling the split read whole."""
    rng = np.random.default_rng(0)
    histories = [rng.integers(0, 50, rng.integers(1, 9)).tolist() for _ in range(100)]
    pq.write_table(pa.table({"user": pa.array(np.arange(100)), "history": pa.array(histories, pa.large_list(pa.int64())),
                             "target": pa.array(rng.integers(0, 50, 100))}), tmp_path / "valid.parquet",
                   row_group_size=7)
    whole = Queries.from_split(tmp_path, "valid")
    for count in (1, 13, 60, 99):
        expected, got = whole.sample(count, seed=3), Queries.sample_split(tmp_path, "valid", count, seed=3)
        for name in ("users", "offsets", "history", "targets"):
            assert getattr(got, name).tolist() == getattr(expected, name).tolist(), (count, name)
    everyone = Queries.sample_split(tmp_path, "valid", 0, seed=3)
    assert everyone.users.tolist() == list(range(100)) and everyone.history.tolist() == whole.history.tolist()


def test_padded_to_the_longest_history_most_recent_last():
    q = queries().chunk(0, 4)  # lengths 3, 1, 4, 2
    sids = torch.arange(200).repeat(2, 1).T.contiguous()  # item i -> code (i, i)
    history, mask = q.padded(sids, max_history=3)
    assert history.shape == (4, 3, 2)  # longest is 4, capped at max_history 3
    assert mask.tolist() == [[True] * 3, [False, False, True], [True] * 3, [False, True, True]]
    assert history[2, :, 0].tolist() == [105, 106, 107]  # the 3 most recent of 104..107
    assert history[1, -1, 0].item() == 103
    wide, _ = q.padded(sids, max_history=50)
    assert wide.shape[1] == 4
