"""RUN_DIR as a URI: stages are uploaded manifest-last and pulled into each node's mirror.

The S3 tests run against a real S3 API (moto's server on 127.0.0.1) through pyarrow's
S3 filesystem, the same code path as Amazon S3; file:// URIs exercise it without one."""

from __future__ import annotations

import json
import logging

import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from conftest import CONFIGS, s3_uri
from diffgrm_dist.errors import ConfigError
from diffgrm_dist.rundir import MANIFEST, RunDir, StageRecord, display_uri
from diffgrm_dist.submit import entrypoint_for


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
    from diffgrm_dist.train import STATE_FILE, _latest_ray_checkpoint, write_checksums

    run_dir = RunDir((tmp_path / "remote").as_uri(), cache_dir=tmp_path / "cache")
    storage, filesystem = run_dir.storage("train.work/key/ray")
    assert _latest_ray_checkpoint(storage, filesystem, "train") is None  # nothing yet
    root = tmp_path / "remote" / "train.work" / "key" / "ray" / "train"
    for name, complete in (("checkpoint_2026-11-23_10-00-00.000", True),
                           ("checkpoint_2026-11-23_11-00-00.000", True),
                           ("checkpoint_2026-11-23_12-00-00.000", False)):  # upload cut short
        (root / name).mkdir(parents=True)
        if complete:  # a complete checkpoint: its state and the checksums of its files
            (root / name / STATE_FILE).write_text("{}")
            write_checksums(root / name, rank=0)
    latest = _latest_ray_checkpoint(storage, filesystem, "train")
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
