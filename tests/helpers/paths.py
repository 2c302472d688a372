"""Project paths, the shared data folder (``DIFFGRM_SHARED_DATA``, default ../shared/data)
and the skip for tests that need it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
SHARED_DATA = Path(os.environ.get("DIFFGRM_SHARED_DATA", ROOT.parent / "shared" / "data"))
AMAZON = SHARED_DATA / "amazon2014"


def require_amazon(name: str) -> Path:
    """The dataset's folder, or a skip when ../shared/data is not beside the project."""
    folder = AMAZON / name
    if not (folder / "user_sequence.txt").is_file():
        pytest.skip(f"{folder} not present")
    return folder
