import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import CONFIGS, ROOT


def diffgrm_exe() -> str:
    return str(Path(sys.executable).parent / "diffgrm")


def test_console_script_runs_prepare_and_stops_at_unbuilt_stages(tmp_path):
    result = subprocess.run([diffgrm_exe(), "pipeline", "-c", str(CONFIGS / "demo.yaml"),
                             "-o", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "users=943" in result.stdout and "items=1,682" in result.stdout
    stats = json.loads((tmp_path / "prepare" / "stats.json").read_text())
    assert stats["interactions"] == 100_000


def test_unbuilt_stage_is_a_clear_error(tmp_path, run_cli):
    code, _, err = run_cli("recommend", "-c", CONFIGS / "tiny.yaml", "-o", tmp_path)
    assert code == 3 and "not implemented" in err


def test_help_lists_every_stage():
    result = subprocess.run([diffgrm_exe(), "--help"], capture_output=True, text=True)
    for stage in ("prepare", "tokenize", "shard", "train", "evaluate", "recommend", "pipeline"):
        assert stage in result.stdout
