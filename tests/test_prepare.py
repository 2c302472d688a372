import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.datafiles import write_sequence_dataset
from helpers.paths import CONFIGS

from diffgrm_dist.core.config import ExperimentConfig, PrepareConfig, load_config
from diffgrm_dist.data.prepare import leave_one_out, prepare


def packed(seqs):
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    return offsets, np.concatenate([np.asarray(s) for s in seqs]).astype(np.int64)


def test_leave_one_out_by_hand():
    offsets, seq = packed([[10, 11, 12, 13, 14], [20, 21, 22]])
    train, valid, test = leave_one_out(offsets, seq, PrepareConfig(max_history=50, min_history=1))
    assert train.to_pylist() == [
        {"user": 0, "history": [10], "target": 11},
        {"user": 0, "history": [10, 11], "target": 12},
    ]
    assert valid.to_pylist() == [{"user": 0, "history": [10, 11, 12], "target": 13},
                                 {"user": 1, "history": [20], "target": 21}]
    assert test.to_pylist() == [{"user": 0, "history": [10, 11, 12, 13], "target": 14},
                                {"user": 1, "history": [20, 21], "target": 22}]


def test_history_keeps_most_recent_items():
    offsets, seq = packed([list(range(100, 110))])
    train, valid, test = leave_one_out(offsets, seq, PrepareConfig(max_history=3, min_history=1))
    assert test.to_pylist() == [{"user": 0, "history": [106, 107, 108], "target": 109}]
    assert train.to_pylist()[-1] == {"user": 0, "history": [104, 105, 106], "target": 107}
    assert all(len(h) <= 3 for h in train["history"].to_pylist())


def synthetic_cfg(**over) -> ExperimentConfig:
    cfg = load_config(CONFIGS / "tiny.yaml", [f"data.synthetic.{k}={v}" for k, v in over.items()])
    return cfg


def test_split_counts_and_no_leakage():
    cfg = synthetic_cfg(items=500, interactions=20000)
    p = prepare(cfg)
    seqs = p.sequences["items"].to_pylist()
    lengths = np.array([len(s) for s in seqs])
    assert p.stats["interactions"] == lengths.sum() == 20000
    assert p.train.num_rows == (lengths - 3).sum() == p.stats["train_samples"]
    assert p.valid.num_rows == p.test.num_rows == len(seqs) == p.stats["users"]

    # Every training window lies inside seq[:n-2] of its user: reconstruct each window from
    # the user's sequence and the target position, and check it is never at n-2 or n-1.
    train = p.train.to_pydict()
    pos_in_user = {}
    for user, hist, target in zip(train["user"], train["history"], train["target"]):
        t = pos_in_user.get(user, 0) + 1
        pos_in_user[user] = t
        seq = seqs[user]
        assert t <= len(seq) - 3, "training target at the valid or test position"
        assert seq[t] == target and seq[max(0, t - 20):t] == hist
    assert all(pos_in_user.get(u, 0) == len(s) - 3 for u, s in enumerate(seqs))
    # Valid/test targets are the last two items; their histories the prefixes before them.
    for s, v, te in zip(seqs, p.valid.to_pylist(), p.test.to_pylist()):
        assert v["target"] == s[-2] and te["target"] == s[-1]
        assert v["history"] == s[:-2][-20:] and te["history"] == s[:-1][-20:]


def test_items_dense_and_texts_cleaned(tmp_path):
    root = write_sequence_dataset(tmp_path / "seq")
    cfg = ExperimentConfig()
    cfg.data.format, cfg.data.path = "sequence", str(root)
    cfg.data.text_template = ["Title: {title}", "Categories: {categories}"]
    p = prepare(cfg)
    items = p.items.to_pylist()
    assert [r["item"] for r in items] == list(range(8))  # Z was never bought
    assert items[0] == {"item": 0, "item_id": "A",
                        "text": "Title: Rose & Oud Perfume; Categories: Beauty, Makeup, Skin"}
    assert p.stats["dropped"]["short_users"] == 1  # u5 has 2 items
    assert p.stats["dropped"]["items_without_interactions"] == 1
    assert p.stats["users"] == 4 and p.stats["interactions"] == 17


def test_prepare_is_deterministic(tmp_path, run_cli):
    for out in ("a", "b"):
        code, _, _ = run_cli("prepare", "-c", CONFIGS / "tiny.yaml", "-o", tmp_path / out)
        assert code == 0
    for name in ("items", "sequences", "train", "valid", "test"):
        a = (tmp_path / "a" / "prepare" / f"{name}.parquet").read_bytes()
        b = (tmp_path / "b" / "prepare" / f"{name}.parquet").read_bytes()
        assert a == b, name
    stats = json.loads((tmp_path / "a" / "prepare" / "stats.json").read_text())
    assert stats["users"] > 0 and stats["interactions"] == 3000


def test_cli_writes_parquet_stats_and_manifest(tmp_path, run_cli):
    code, out, _ = run_cli("prepare", "-c", CONFIGS / "tiny.yaml", "-o", tmp_path)
    assert code == 0 and "users=" in out
    stage = tmp_path / "prepare"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["stage"] == "prepare" and manifest["wall_time_s"] >= 0
    assert set(manifest["outputs"]) >= {"items.parquet", "train.parquet", "stats.json"}
    assert "pyarrow" in manifest["versions"]
    schema = pq.read_schema(stage / "train.parquet")
    assert schema.names == ["user", "history", "target"]
    stats = json.loads((stage / "stats.json").read_text())
    for key in ("users", "items", "interactions", "train_samples", "valid_users", "test_users"):
        assert stats[key] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["prepare"]  # no temp folders left


@pytest.mark.parametrize("max_history", [1, 50])
def test_min_and_max_history_respected(max_history):
    cfg = synthetic_cfg()
    cfg.prepare.max_history = max_history
    p = prepare(cfg)
    lengths = [len(h) for h in p.train["history"].to_pylist()]
    assert min(lengths) >= 1 and max(lengths) <= max_history


def test_splits_written_in_blocks_of_users_equal_the_whole(tmp_path):
    """write_prepared builds the splits a block of users at a time: same rows, same order."""
    from diffgrm_dist.data.prepare import ROW_GROUP_SIZE, write_prepared

    p = prepare(synthetic_cfg(items=300, interactions=6000))
    whole = leave_one_out(p.offsets, p.seq, p.split_cfg)
    write_prepared(p, tmp_path, users_per_block=37)
    for name, table in zip(("train", "valid", "test"), whole):
        written = pq.read_table(tmp_path / f"{name}.parquet")
        assert written.equals(table.cast(written.schema)), name
        assert pq.ParquetFile(tmp_path / f"{name}.parquet").metadata.num_row_groups > 1
    assert all(pq.ParquetFile(tmp_path / "train.parquet").metadata.row_group(g).num_rows <= ROW_GROUP_SIZE
               for g in range(3))
    assert json.loads((tmp_path / "stats.json").read_text())["train_samples"] == whole[0].num_rows
