"""A real two-node Ray cluster on this machine: `diffgrm submit` runs the demo pipeline as
a Ray Job on an s3:// run directory (a local S3 server), its actors and training ranks land
on both nodes, and each node reads the artifacts from S3 into its own mirror.
Deselect with `-m "not cluster"`."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers.paths import ROOT
from helpers.s3 import S3_ENV, s3_uri
from pyarrow import fs as pafs

from diffgrm_dist.cluster.raycluster import free_port

VENV_BIN = Path(sys.executable).parent
STAGES = ("prepare", "tokenize", "shard", "train", "evaluate")


def read_json(fs: pafs.FileSystem, path: str) -> dict:
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read())


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(1800)  # its own steps are bounded (start 180 s, job 1,200 s, stop 120 s)
def test_submit_demo_pipeline_to_a_two_node_local_cluster(s3_endpoint):
    ray_tmp = tempfile.mkdtemp(prefix="dgr-", dir="/tmp")  # short: Ray's socket paths
    dashboard = free_port()
    # The nodes get no S3 credentials of their own: the job brings them (--env).
    env = {k: v for k, v in os.environ.items() if k not in S3_ENV}
    env.update({"DIFFGRM_RAY_TMP": ray_tmp, "DIFFGRM_RAY_PORT": str(free_port()),
                "DIFFGRM_DASHBOARD_PORT": str(dashboard), "RAY": str(VENV_BIN / "ray"),
                "PATH": f"{VENV_BIN}:{os.environ['PATH']}"})
    script = str(ROOT / "tools" / "local_cluster.sh")
    started = subprocess.run(["bash", script, "start"], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        status = subprocess.run(["bash", script, "status"], env=env, cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        assert "node_head" in status.stdout and "node_worker" in status.stdout
        credentials = [f"--env={name}={value}" for name, value in S3_ENV.items()]
        # The demo config, cut to one epoch; two of everything (4 embedding shards for the
        # 1,682 items, 2 ranking chunks for the 943 users), so one of each per node.
        job = subprocess.run(
            [str(VENV_BIN / "diffgrm"), "submit", "pipeline", "-c", "configs/demo.yaml",
             "-o", s3_uri(s3_endpoint, "demo"), "--address", f"http://127.0.0.1:{dashboard}",
             *credentials, "tokenize.num_actors=2", "tokenize.shard_items=512", "train.num_workers=2",
             "eval.num_actors=2", "eval.chunk_users=512", "train.epochs=1", "train.wandb_mode=disabled",
             "eval.beam_size=32"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
        assert job.returncode == 0, job.stdout[-6000:] + job.stderr[-2000:]
        assert "SUCCEEDED" in job.stdout
        # Credentials travel as job environment, whose secret values are never printed. (The
        # URI itself is echoed by Ray's job log as part of the entrypoint: no secrets in it.)
        assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in job.stdout + job.stderr
        assert "AWS_SECRET_ACCESS_KEY': '***'" in job.stdout

        fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http")
        manifests = {s: read_json(fs, f"runs/demo/{s}/manifest.json") for s in STAGES}
        assert all(m["stage"] == s for s, m in manifests.items())
        prepared = read_json(fs, "runs/demo/prepare/stats.json")
        assert (prepared["users"], prepared["items"], prepared["interactions"]) == (943, 1682, 100000)
        # Embedding actors, training ranks and ranking actors: one on each node.
        tokenized = read_json(fs, "runs/demo/tokenize/stats.json")
        assert len(set(tokenized["embedding"]["nodes"])) == 2
        trained = read_json(fs, "runs/demo/train/stats.json")
        assert len(trained["nodes"]) == 2 and trained["epochs"] == 1
        metrics = read_json(fs, "runs/demo/evaluate/metrics.json")
        assert metrics["actors"] == 2 and len(metrics["nodes"]) == 2 and metrics["users"] == 943
        # Both nodes see the driver's stage folder (one host): each actor wrote its own part.
        assert metrics["parts"] == 2 and metrics["parts_by_driver"] == 0
        assert 0.0 < metrics["item"]["recall@10"] <= 1.0
        # The worker node never saw the head's files: its training rank pulled the small
        # stages (SIDs) and read the shards in place on S3, never copying one; its ranking
        # actor pulled the model into its own mirror.
        worker_mirror = Path(ray_tmp) / "worker" / "cache" / "runs"
        assert next(worker_mirror.glob("demo-*/tokenize/manifest.json"), None) is not None
        assert not list(worker_mirror.glob("demo-*/shard")) and not list(worker_mirror.rglob("*.tar"))
        assert next(worker_mirror.glob("demo-*/train/model.safetensors"), None) is not None
    finally:
        stopped = subprocess.run(["bash", script, "stop"], env=env, cwd=ROOT, capture_output=True,
                                 text=True, timeout=120)
        left = subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert left.stdout.strip() == "", f"processes left behind: {left.stdout}"
