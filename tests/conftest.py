"""Shared fixtures: project paths, the shared data folder, and an in-process CLI runner."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from diffgrm_dist.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHARED_DATA = Path(os.environ.get("DIFFGRM_SHARED_DATA", ROOT.parent / "shared" / "data"))
AMAZON = SHARED_DATA / "amazon2014"


@pytest.fixture
def run_cli(capsys):
    """Runs ``diffgrm ARGS`` in this process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def require_amazon(name: str) -> Path:
    """The dataset's folder, or a skip when ../shared/data is not beside the project."""
    folder = AMAZON / name
    if not (folder / "user_sequence.txt").is_file():
        pytest.skip(f"{folder} not present")
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """configs/tiny.yaml through prepare, tokenize (real model on Ray, real faiss) and shard,
    once per test session; tests that change it use a copy."""
    run = tmp_path_factory.mktemp("tiny")
    for stage in ("prepare", "tokenize", "shard"):
        assert main([stage, "-c", str(CONFIGS / "tiny.yaml"), "-o", str(run)]) == 0, stage
    return run


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "moto-secret-value",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3_endpoint():
    """A local S3 server (moto) with one bucket; yields host:port."""
    from moto.server import ThreadedMotoServer
    from pyarrow import fs as pafs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    saved = {name: os.environ.get(name) for name in S3_ENV}
    os.environ.update(S3_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"{host}:{port}"
    pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir("runs")
    try:
        yield endpoint
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def s3_uri(endpoint: str, name: str) -> str:
    return f"s3://runs/{name}?endpoint_override={endpoint}&scheme=http&region=us-east-1"
