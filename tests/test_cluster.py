"""A real two-node Ray cluster on this machine: `diffgrm submit` runs the pipeline as a Ray
Job, and its actors land on both nodes. Deselect with `-m "not cluster"`."""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.cluster
@pytest.mark.slow
def test_submit_pipeline_to_a_two_node_local_cluster(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="dgr-", dir="/tmp")  # short: Ray's socket paths
    dashboard = free_port()
    env = {**os.environ, "DIFFGRM_RAY_TMP": ray_tmp, "DIFFGRM_RAY_PORT": str(free_port()),
           "DIFFGRM_DASHBOARD_PORT": str(dashboard), "RAY": str(VENV_BIN / "ray"),
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    script = str(ROOT / "tools" / "local_cluster.sh")
    started = subprocess.run(["bash", script, "start"], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        status = subprocess.run(["bash", script, "status"], env=env, cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        assert "node_head" in status.stdout and "node_worker" in status.stdout
        run = tmp_path / "run"
        job = subprocess.run(
            [str(VENV_BIN / "diffgrm"), "submit", "pipeline", "-c", "configs/tiny.yaml", "-o", str(run),
             "--address", f"http://127.0.0.1:{dashboard}", "tokenize.num_actors=2", "eval.num_actors=2",
             "train.epochs=1", "train.wandb_mode=disabled"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        assert "SUCCEEDED" in job.stdout
        # Two embedding actors with one CPU each: one per node, as the stats record.
        stats = json.loads((run / "tokenize" / "stats.json").read_text())
        assert len(set(stats["embedding"]["nodes"])) == 2
        assert "on 2 node(s)" in job.stdout  # the evaluator's actors too
        metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
        assert metrics["actors"] == 2 and metrics["users"] > 0
    finally:
        stopped = subprocess.run(["bash", script, "stop"], env=env, cwd=ROOT, capture_output=True,
                                 text=True, timeout=120)
        left = subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert left.stdout.strip() == "", f"processes left behind: {left.stdout}"
