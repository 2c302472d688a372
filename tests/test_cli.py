import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.paths import CONFIGS, ROOT


def diffgrm_exe() -> str:
    return str(Path(sys.executable).parent / "diffgrm")


@pytest.mark.slow
def test_console_script_runs_the_whole_pipeline(tmp_path):
    """`diffgrm pipeline` end to end on the tiny config (Ray, DeepSpeed, faiss, the model)."""
    result = subprocess.run([diffgrm_exe(), "pipeline", "-c", str(CONFIGS / "tiny.yaml"), "-o", str(tmp_path),
                             "train.epochs=2", "train.wandb_mode=offline"],
                            capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # A log for people: one line per epoch, no progress bars off a terminal, no library chatter.
    log = result.stdout + result.stderr
    assert [line.split("epoch ")[1].split(":")[0] for line in log.splitlines() if " epoch " in line
            and ": loss " in line] == ["1", "2"]
    for chatter in ("Failed to query Ray Train Controller", "Reporting training result", "it/s]", "item/s]",
                    "wandb: ", "Attempting to get learning rate"):
        assert chatter not in log, chatter
    for stage in ("prepare", "tokenize", "shard", "train", "evaluate"):
        manifest = json.loads((tmp_path / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage
        assert f"[{stage}]" in result.stdout
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert metrics["users"] == json.loads((tmp_path / "prepare" / "stats.json").read_text())["test_users"]
    assert pq.read_table(tmp_path / "evaluate" / "rankings").num_rows > 0
    # A second run finds every stage current and skips them all.
    again = subprocess.run([diffgrm_exe(), "pipeline", "-c", str(CONFIGS / "tiny.yaml"), "-o", str(tmp_path),
                            "train.epochs=2", "train.wandb_mode=offline"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0 and again.stderr.count("up to date, skipped") == 5


def test_missing_upstream_stage_is_a_clear_error(tmp_path, run_cli):
    code, _, err = run_cli("shard", "-c", CONFIGS / "tiny.yaml", "-o", tmp_path)
    assert code == 2 and "stage 'prepare' has not run yet" in err


def test_help_lists_every_stage():
    result = subprocess.run([diffgrm_exe(), "--help"], capture_output=True, text=True)
    for stage in ("prepare", "tokenize", "shard", "train", "evaluate", "recommend", "pipeline"):
        assert stage in result.stdout
