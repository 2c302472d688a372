"""tools/gpu_check.py, so that the one command for GPU owners cannot rot: its stage mode makes
the tiny stages, then its run mode trains and evaluates them on the CPU in a process that
cannot import Ray, faiss, sentence-transformers, transformers, matplotlib, wandb or recbole
(what a bare GPU box lacks); and its global deadline kills what is still running."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import gpu_check
import pytest
from helpers.paths import ROOT

TOOL = ROOT / "tools" / "gpu_check.py"
BLOCKED = ("ray", "faiss", "sentence_transformers", "transformers", "matplotlib", "wandb", "recbole")

# Installed as sitecustomize on PYTHONPATH: every meta path finder is wrapped so that the
# blocked top-level packages are not found, exactly as if they were not installed (`import X`
# raises ModuleNotFoundError, importlib.util.find_spec returns None). Each attempt is logged
# with its stack, to name the import when the run mode fails.
BLOCKER = '''
import os
import sys
import traceback

BLOCKED = frozenset(os.environ["GPU_CHECK_BLOCKED"].split(","))
LOG = os.environ.get("GPU_CHECK_BLOCKED_LOG")


class _Hidden:
    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            if LOG:
                with open(LOG, "a") as fh:
                    fh.write(f"pid {os.getpid()} tried {name}:\\n" + "".join(traceback.format_stack()[:-1]) + "\\n")
            return None
        find = getattr(self._finder, "find_spec", None)
        return find(name, path, target) if find is not None else None

    def __getattr__(self, attr):
        return getattr(self._finder, attr)


sys.meta_path[:] = [_Hidden(finder) for finder in sys.meta_path]
'''


def blocking_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose Python processes cannot import the BLOCKED packages, and the log of
    the attempts."""
    folder = tmp_path / "blocker"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(BLOCKER)
    log = tmp_path / "blocked_imports.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p),
               GPU_CHECK_BLOCKED=",".join(BLOCKED), GPU_CHECK_BLOCKED_LOG=str(log),
               HF_HUB_OFFLINE="1", DS_BUILD_OPS="0")
    return env, log


@pytest.mark.slow
def test_the_cpu_tiny_check_runs_without_the_stage_only_packages(tmp_path):
    stages, results, work = tmp_path / "stages", tmp_path / "results", tmp_path / "work"
    made = subprocess.run([sys.executable, str(TOOL), "stage", "--out", str(stages), "--datasets", "tiny"],
                          capture_output=True, text=True, cwd=ROOT, timeout=400,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", DS_BUILD_OPS="0"))
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    for stage in ("prepare", "tokenize"):
        assert (stages / "tiny" / stage / "manifest.json").is_file()
    assert json.loads((stages / "stages.json").read_text())["tiny"]["config"] == "configs/tiny.yaml"

    env, blocked_log = blocking_env(tmp_path)
    for name in BLOCKED:  # the blocker works in a child like the tool's
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert probe.returncode != 0 and f"No module named '{name}'" in probe.stderr, name

    run = subprocess.run([sys.executable, str(TOOL), "run", "--device", "cpu", "--tiny", "--stages", str(stages),
                          "--results", str(results), "--work", str(work), "--deadline-min", "5"],
                         capture_output=True, text=True, cwd=ROOT, timeout=400, env=env)
    attempts = blocked_log.read_text() if blocked_log.is_file() else "none"
    assert run.returncode == 0, (f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}\n"
                                 f"blocked imports attempted:\n{attempts[-6000:]}")
    assert "tiny/local train: ok" in run.stdout and "tiny/local evaluate: ok" in run.stdout

    payload = json.loads((results / "tiny.cpu.json").read_text())
    checks = {c["name"]: c for c in payload["checks"]}
    assert checks["tiny/local"]["status"] == "passed"
    assert checks["tiny/ray"]["status"] == "skipped"  # Ray is blocked: only the local launcher ran
    result = checks["tiny/local"]["result"]
    assert result["stages_reused"] is True  # prepare/tokenize read as copied, never re-made
    for stage in ("prepare", "tokenize"):
        assert ((work / "tiny" / "local" / stage / "manifest.json").read_bytes()
                == (stages / "tiny" / stage / "manifest.json").read_bytes())
    numbers = {f"{s}.{k}": v for s in ("train", "test") for k, v in result[s].items()}
    assert all(math.isfinite(v) for v in numbers.values()), numbers
    assert result["train"]["samples_per_s"] > 0 and result["train"]["ms_per_step"] > 0
    assert result["train"]["epochs"] == 2 and result["test"]["beam"] == 16
    assert 0 <= result["test"]["item_ndcg@10"] <= 1 and result["test"]["users"] > 0
    assert payload["environment"]["device"] == "cpu" and payload["environment"]["gpu"] is None

    table = (results / "tiny.cpu.md").read_text()
    assert "tiny check `tiny/local`: **PASSED**" in table
    assert "| local | passed |" in table


def test_the_deadline_kills_the_stage_process_group(tmp_path):
    """A stage still running at the deadline is killed with the processes it started."""
    child = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    log = tmp_path / "stage.log"
    start = time.monotonic()
    code = gpu_check.run_logged([sys.executable, "-c", script], log, dict(os.environ), gpu_check.Deadline(2.0))
    assert code is None and time.monotonic() - start < 2.0 + gpu_check.KILL_GRACE_S + 5
    assert "killed: the global deadline" in log.read_text()
    pid = int(child.read_text())
    for _ in range(50):  # reparented to init once its parent died: gone, or a zombie until reaped
        stat = Path(f"/proc/{pid}/stat")
        if not stat.exists() or stat.read_text().split(") ")[1].startswith("Z"):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {pid} started by the stage outlived the deadline")
    assert gpu_check.run_logged([sys.executable, "-c", "pass"], log, dict(os.environ), gpu_check.Deadline(0)) is None
