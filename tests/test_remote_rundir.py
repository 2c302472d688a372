"""RUN_DIR as a URI: stages are uploaded manifest-last and pulled into each node's mirror,
except the training shards, which are read in place.

The S3 tests run against a real S3 API (moto's server on 127.0.0.1) through pyarrow's
S3 filesystem, the same code path as Amazon S3; file:// URIs exercise it without one."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.paths import CONFIGS
from helpers.s3 import s3_uri
from pyarrow import fs as pafs
from test_shuffle import write_train

from diffgrm_dist.cluster.submit import entrypoint_for
from diffgrm_dist.core.errors import ConfigError, DataError
from diffgrm_dist.core.rundir import MANIFEST, RemoteStore, RunDir, StageRecord, display_uri
from diffgrm_dist.data.loaders import BalancedBatches, IndexedWindows, ShardSet, ShardStream, ShuffledBatches


def write_demo_stage(run_dir: RunDir, text: str, fail: bool = False) -> None:
    with run_dir.write_stage(StageRecord("demo", text), {}) as out:
        (out / "data").mkdir()
        (out / "data" / "part-0.txt").write_text(text)
        (out / "stats.json").write_text(json.dumps({"text": text}))
        if fail:
            raise RuntimeError("stage body failed")


def test_file_uri_stage_is_uploaded_and_pulled_by_another_mirror(tmp_path):
    uri = (tmp_path / "remote").as_uri()
    writer = RunDir(uri, cache_dir=tmp_path / "node-a")
    write_demo_stage(writer, "one")
    remote = tmp_path / "remote" / "demo"
    assert (remote / "data" / "part-0.txt").read_text() == "one"
    assert json.loads((remote / MANIFEST).read_text())["outputs"] == {"data/part-0.txt": 3, "stats.json": 15}

    reader = RunDir(uri, cache_dir=tmp_path / "node-b")
    assert reader.manifest("demo")["config_hash"] == "one"
    assert reader.read_text("demo", "stats.json") == '{"text": "one"}'
    assert not (reader.root / "demo").exists()  # manifests and small reads pull nothing
    assert (reader.stage_path("demo") / "data" / "part-0.txt").read_text() == "one"
    assert reader.manifest_hash("demo") == writer.manifest_hash("demo")

    # The writer re-runs the stage; a new reader of the stale mirror pulls the new copy.
    write_demo_stage(writer, "two")
    again = RunDir(uri, cache_dir=tmp_path / "node-b")
    assert (again.stage_path("demo") / "data" / "part-0.txt").read_text() == "two"
    assert not [p for p in again.root.iterdir() if p.name.startswith(".demo")]


def test_a_stage_read_in_place_is_not_kept_in_the_writers_mirror(tmp_path):
    """``mirror=False`` (the shard stage): uploaded whole, manifest last; the writer's mirror
    keeps no copy, not even a stale one, and pulls it afresh if asked for its folder."""
    uri = (tmp_path / "remote").as_uri()
    writer = RunDir(uri, cache_dir=tmp_path / "node-a")
    write_demo_stage(writer, "one")
    assert (writer.root / "demo").is_dir()  # mirrored (the default): kept
    with writer.write_stage(StageRecord("demo", "two"), {}, mirror=False) as out:
        (out / "part-0.txt").write_text("two")
    assert (tmp_path / "remote" / "demo" / "part-0.txt").read_text() == "two"
    assert writer.manifest("demo")["config_hash"] == "two"
    assert not [p for p in writer.root.iterdir() if "demo" in p.name]  # stale copy and temp gone
    assert (writer.stage_path("demo") / "part-0.txt").read_text() == "two"


def test_failed_stage_never_publishes_a_manifest(tmp_path):
    uri = (tmp_path / "remote").as_uri()
    run_dir = RunDir(uri, cache_dir=tmp_path / "cache")
    with pytest.raises(RuntimeError, match="stage body failed"):
        write_demo_stage(run_dir, "one", fail=True)
    assert run_dir.manifest("demo") is None
    assert not (tmp_path / "remote" / "demo").exists()
    assert not [p for p in run_dir.root.iterdir() if p.name != ".pull.lock"]


def test_uri_display_hides_credentials_and_submit_accepts_uris():
    uri = "s3://key:secret@bucket/runs/x?access_key=AK&secret_key=SK&region=eu-west-1"
    shown = display_uri(uri)
    assert shown == "s3://key:***@bucket/runs/x"
    assert "SK" not in shown and "secret" not in shown
    assert "s3://bucket/runs/x" in entrypoint_for("train", "configs/demo.yaml", "s3://bucket/runs/x")
    with pytest.raises(ValueError, match="URI"):
        entrypoint_for("train", "configs/demo.yaml", "runs/x")


def test_resume_finds_the_newest_complete_ray_checkpoint_on_a_uri(tmp_path):
    from diffgrm_dist.train.checkpoints import STATE_FILE, latest_ray_checkpoint, write_checksums

    run_dir = RunDir((tmp_path / "remote").as_uri(), cache_dir=tmp_path / "cache")
    storage, filesystem = run_dir.storage("train.work/key/ray")
    assert latest_ray_checkpoint(storage, filesystem, "train") is None  # nothing yet
    root = tmp_path / "remote" / "train.work" / "key" / "ray" / "train"
    for name, complete in (("checkpoint_2026-11-23_10-00-00.000", True),
                           ("checkpoint_2026-11-23_11-00-00.000", True),
                           ("checkpoint_2026-11-23_12-00-00.000", False)):  # upload cut short
        (root / name).mkdir(parents=True)
        if complete:  # a complete checkpoint: its state and the checksums of its files
            (root / name / STATE_FILE).write_text("{}")
            write_checksums(root / name, rank=0)
    latest = latest_ray_checkpoint(storage, filesystem, "train")
    assert latest.endswith("checkpoint_2026-11-23_11-00-00.000")
    assert filesystem.get_file_info(f"{latest}/{STATE_FILE}").size == 2


def test_unreachable_filesystem_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nosuchscheme://bucket/x"):
        RunDir("nosuchscheme://bucket/x?token=abc", cache_dir=tmp_path)


@pytest.mark.slow
def test_pipeline_on_an_s3_run_dir(tmp_path, s3_endpoint, run_cli, monkeypatch, caplog):
    """The whole tiny pipeline on s3://; a second machine (a fresh mirror) finds every stage
    current, pulls only what it reads, and recommends from the uploaded model."""
    caplog.set_level(logging.INFO)
    uri = s3_uri(s3_endpoint, "tiny")
    monkeypatch.setenv("DIFFGRM_CACHE_DIR", str(tmp_path / "machine-a"))
    args = ("pipeline", "-c", CONFIGS / "tiny.yaml", "-o", uri, "train.epochs=1", "train.wandb_mode=disabled")
    code, out, err = run_cli(*args)
    assert code == 0, out + err

    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http")
    for stage in ("prepare", "tokenize", "shard", "train", "evaluate"):
        with fs.open_input_stream(f"runs/tiny/{stage}/{MANIFEST}") as fh:
            manifest = json.loads(fh.read())
        for rel, size in manifest["outputs"].items():
            assert fs.get_file_info(f"runs/tiny/{stage}/{rel}").size == size, (stage, rel)
    top = {info.base_name for info in fs.get_file_info(pafs.FileSelector("runs/tiny"))}
    assert top == {"prepare", "tokenize", "shard", "train", "evaluate"}  # checkpoints cleaned up
    assert "endpoint_override" not in caplog.text  # the URI's query is never logged

    caplog.clear()
    machine_b = tmp_path / "machine-b"
    monkeypatch.setenv("DIFFGRM_CACHE_DIR", str(machine_b))
    code, out, err = run_cli(*args)
    assert code == 0, out + err
    assert caplog.text.count("up to date, skipped") == 5
    assert not any(p.is_dir() for p in machine_b.rglob("*") if p.name in ("shard", "train"))

    items = pq.read_table(RunDir(uri).stage_path("prepare") / "items.parquet", columns=["item_id"])
    history = items["item_id"].to_pylist()[:3]
    code, out, err = run_cli("recommend", "-c", CONFIGS / "tiny.yaml", "-o", uri, "train.epochs=1",
                             "train.wandb_mode=disabled", "--history", *history)
    assert code == 0, out + err
    assert out.count("\n  ") >= 5  # ranked rows under the history line
    pulled = next(machine_b.glob("runs/*/train/model.safetensors"))
    with fs.open_input_stream("runs/tiny/train/model.safetensors") as fh:
        assert pulled.read_bytes() == fh.read()


# --------------------------------------------------------------------------- shards read in place


def write_shard_stage(run_dir: RunDir) -> ShardSet:
    """A train split of 1,003 windows in 16 shards as the shard stage of ``run_dir`` (uploaded
    for a URI run); returns the writer's local copy, read as a local run would."""
    with run_dir.write_stage(StageRecord("shard", "demo"), {}) as out:
        write_train(out)
    return ShardSet.load(run_dir.root / "shard", "train")


def epoch_of(shards: ShardSet, shuffle: str, workers: int) -> tuple[list[int], str]:
    """Users of epoch 1 of one rank in batch order, and the windows digest."""
    batches = (ShuffledBatches(shards, 0, 1, seed=0, batch_size=32, loader_workers=workers) if shuffle == "windows"
               else BalancedBatches(ShardStream(shards, 0, 1, seed=0, shuffle=True, shuffle_buffer=100), 32, workers))
    batches.set_epoch(1)
    users = [u for batch in batches for u in batch["users"].tolist()]
    return users, batches.digest


def test_a_shard_set_on_a_file_uri_is_read_in_place(tmp_path):
    uri = (tmp_path / "remote").as_uri()
    local = write_shard_stage(RunDir(uri, cache_dir=tmp_path / "writer"))
    reader = RunDir(uri, cache_dir=tmp_path / "reader")
    shards = ShardSet.open(reader, "train")
    assert isinstance(shards.fs, pafs.LocalFileSystem) and not shards.remote
    assert shards.paths[0] == str(tmp_path / "remote" / "shard" / "train" / "train-000000.tar")
    assert shards.counts == local.counts and np.array_equal(shards.index, local.index)

    def stream(s: ShardSet) -> list[dict]:
        return list(ShardStream(s, 0, 1, seed=0, shuffle=False))
    got, want = stream(shards), stream(local)
    assert [(s["key"], s["user"], s["item"]) for s in got] == [(s["key"], s["user"], s["item"]) for s in want]
    assert all(np.array_equal(a["hist"], b["hist"]) for a, b in zip(got, want))
    ids = np.random.default_rng(0).permutation(local.samples)
    assert [s["user"] for s in IndexedWindows(shards).read(ids)] == [s["user"] for s in IndexedWindows(local).read(ids)]
    assert not (tmp_path / "reader").exists()  # nothing was mirrored

    shard = tmp_path / "remote" / "shard" / "train" / "train-000003.tar"
    shard.write_bytes(shard.read_bytes()[:-512])  # cut short by one tar block
    with pytest.raises(DataError, match=r"shard/train/train-000003.tar: \d+ bytes, the shard stage wrote \d+: "
                                        r"the shard is truncated"):
        ShardSet.open(reader, "train")
    shard.unlink()
    with pytest.raises(DataError, match=r"train-000003.tar: shard listed in shards.json is missing"):
        ShardSet.open(reader, "train")


@pytest.mark.parametrize("shuffle", ["windows", "shards"])
def test_shards_on_s3_are_read_in_place_by_forked_loader_workers(tmp_path, s3_endpoint, shuffle):
    """Both readers over real S3 calls, in DataLoader workers forked from the process that
    opened the set: the very samples, order and digest of the local copy."""
    uri = s3_uri(s3_endpoint, f"inplace-{shuffle}")
    local = write_shard_stage(RunDir(uri, cache_dir=tmp_path / "writer"))
    shards = ShardSet.open(RunDir(uri, cache_dir=tmp_path / "reader"), "train")
    assert shards.remote and shards.paths[0] == f"runs/inplace-{shuffle}/shard/train/train-000000.tar"
    users, digest = epoch_of(shards, shuffle, workers=2)
    assert sorted(users) == list(range(local.samples))
    assert (users, digest) == epoch_of(local, shuffle, workers=2)
    assert not (tmp_path / "reader").exists()

    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http")
    key = f"runs/inplace-{shuffle}/shard/train/train-000002.tar"
    with fs.open_input_stream(key) as fh:
        data = fh.read()
    with fs.open_output_stream(key) as fh:  # a half-finished upload
        fh.write(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"s3://runs/inplace-{shuffle}/shard/train/train-000002.tar: .*truncated"):
        ShardSet.open(RunDir(uri, cache_dir=tmp_path / "reader"), "train")


def s3_history(fs: pafs.FileSystem, run: str) -> list[dict]:
    with fs.open_input_stream(f"runs/{run}/train/history.jsonl") as fh:
        return [json.loads(line) for line in fh.read().decode().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 390 s on a loaded 2-core machine
def test_training_on_s3_reads_the_shards_in_place_exactly_once(tmp_path, s3_endpoint, run_cli, monkeypatch):
    """prepare, tokenize and shard on s3://; then a training node with an empty mirror trains
    with each reader: no shard is ever copied to it, and the windows (their digest) and
    losses equal those of the same config trained on a local copy of the run."""
    uri = s3_uri(s3_endpoint, "inplace")
    monkeypatch.setenv("DIFFGRM_CACHE_DIR", str(tmp_path / "builder"))
    for stage in ("prepare", "tokenize", "shard"):
        code, out, err = run_cli(stage, "-c", CONFIGS / "tiny.yaml", "-o", uri)
        assert code == 0, out + err
    # The machine that wrote the shards keeps none: they are read in place in the bucket.
    (built,) = (tmp_path / "builder" / "runs").iterdir()
    assert {p.name for p in built.iterdir() if p.is_dir()} == {"embeddings", "prepare", "tokenize"}
    local = tmp_path / "local"
    for stage in ("prepare", "tokenize", "shard"):
        RemoteStore(uri).download(stage, local / stage)

    trainer = tmp_path / "trainer"
    monkeypatch.setenv("DIFFGRM_CACHE_DIR", str(trainer))
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http")
    for shuffle in ("windows", "shards"):
        args = ("-c", CONFIGS / "tiny.yaml", "train.epochs=1", "train.wandb_mode=disabled", f"train.shuffle={shuffle}")
        code, out, err = run_cli("train", "-o", uri, *args)
        assert code == 0, out + err
        copied = [p for p in trainer.rglob("*") if p.suffix == ".tar" or p.name == "shard"]
        assert not copied, f"shards copied to the training node: {copied[:3]}"
        code, out, err = run_cli("train", "-o", local, *args)
        assert code == 0, out + err
        remote_history = s3_history(fs, "inplace")
        local_history = [json.loads(line) for line in (local / "train" / "history.jsonl").read_text().splitlines()]
        assert [r["windows_digest"] for r in remote_history] == [r["windows_digest"] for r in local_history]
        assert [r["loss"] for r in remote_history] == pytest.approx([r["loss"] for r in local_history], rel=1e-6)
    # The training node's mirror is the one checked above: it holds what training pulled.
    (mirror,) = (trainer / "runs").iterdir()
    assert {p.name for p in mirror.iterdir() if p.is_dir()} == {"prepare", "tokenize", "train"}
