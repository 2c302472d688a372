"""Shared fixtures: an in-process CLI runner, the tiny run, a local S3 server. Everything
else tests share lives in ``tests/helpers``."""

from __future__ import annotations

import logging
import os
import sys

import pytest
from helpers.paths import CONFIGS, ROOT
from helpers.s3 import S3_ENV

from diffgrm_dist.cli import main

sys.path.insert(0, str(ROOT / "tools"))  # tests import the tools they check (reproduce, chaos's faultlib)


@pytest.fixture
def run_cli(capsys):
    """Runs ``diffgrm ARGS`` in this process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """configs/tiny.yaml through prepare, tokenize (real model on Ray, real faiss) and shard,
    once per test session; tests that change it use a copy."""
    run = tmp_path_factory.mktemp("tiny")
    for stage in ("prepare", "tokenize", "shard"):
        assert main([stage, "-c", str(CONFIGS / "tiny.yaml"), "-o", str(run)]) == 0, stage
    return run


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
