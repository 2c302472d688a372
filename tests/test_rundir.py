import json
import logging

import pytest
from helpers.paths import CONFIGS

from diffgrm_dist.core.rundir import RunDir, StageRecord, file_sha256


def test_second_run_is_skipped_and_changed_config_reruns(tmp_path, run_cli, caplog):
    caplog.set_level(logging.INFO)
    args = ("prepare", "-c", CONFIGS / "tiny.yaml", "-o", tmp_path)
    assert run_cli(*args)[0] == 0
    first = json.loads((tmp_path / "prepare" / "manifest.json").read_text())
    caplog.clear()
    assert run_cli(*args)[0] == 0
    assert "up to date, skipped" in caplog.text
    assert json.loads((tmp_path / "prepare" / "manifest.json").read_text()) == first

    assert run_cli(*args, "prepare.max_history=5")[0] == 0
    second = json.loads((tmp_path / "prepare" / "manifest.json").read_text())
    assert second["config_hash"] != first["config_hash"]
    assert second["config"]["prepare"]["max_history"] == 5


def test_failed_stage_leaves_previous_output_and_no_temp(tmp_path):
    run_dir = RunDir(tmp_path)
    record = StageRecord("demo", "h1")
    with run_dir.write_stage(record, {}) as out:
        (out / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with run_dir.write_stage(StageRecord("demo", "h2"), {}) as out:
            (out / "a.txt").write_text("two")
            raise RuntimeError("boom")
    assert (tmp_path / "demo" / "a.txt").read_text() == "one"
    assert run_dir.is_current(record)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_upstream_change_invalidates_downstream(tmp_path):
    run_dir = RunDir(tmp_path)
    with run_dir.write_stage(StageRecord("up", "a"), {}) as out:
        (out / "x").write_text("1")
    down = StageRecord("down", "d", {"stage:up": run_dir.manifest_hash("up")})
    with run_dir.write_stage(down, {}):
        pass
    assert run_dir.is_current(down)
    with run_dir.write_stage(StageRecord("up", "b"), {}) as out:
        (out / "x").write_text("2")
    again = StageRecord("down", "d", {"stage:up": run_dir.manifest_hash("up")})
    assert not run_dir.is_current(again)


def test_relative_run_dir_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RunDir("runs/x").root == tmp_path / "runs" / "x"


def test_file_sha256_of_a_path_and_of_its_uri_agree(tmp_path):
    import hashlib

    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 5000  # several chunks at chunk=4096
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert file_sha256(path, chunk=4096) == file_sha256(path.as_uri(), chunk=4096) == expected
