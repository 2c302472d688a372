"""Shared fixtures: project paths, the shared data folder, and an in-process CLI runner."""

from __future__ import annotations

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
