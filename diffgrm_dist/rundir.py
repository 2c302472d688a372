"""Run directory: each stage writes ``RUN_DIR/<stage>/`` atomically, with a manifest.

A stage builds its output in a temporary sibling folder and renames it into place only
when everything is written, so a crash or a bad input never leaves a half-written stage.
``manifest.json`` records what the output was made from (config hash, input hashes),
with which versions, and how long it took. A stage whose recorded config hash and input
hashes equal the current ones is skipped; anything else re-runs it, and since each stage
lists its upstream manifests among its inputs, everything after it re-runs too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from diffgrm_dist.errors import DiffGRMError

MANIFEST = "manifest.json"
_VERSIONED_PACKAGES = ("diffgrm-dist", "numpy", "pyarrow", "torch", "deepspeed", "ray",
                       "sentence-transformers", "faiss-cpu", "faiss-gpu", "webdataset")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


@dataclass
class StageRecord:
    """What a stage's output depends on; compared with the manifest to decide skipping."""

    stage: str
    config_hash: str
    inputs: dict[str, str] = field(default_factory=dict)  # name -> content hash


class RunDir:
    """A run's folder; hands out atomic stage folders and reads their manifests."""

    def __init__(self, root: str | Path) -> None:
        # Absolute: Ray workers and actors run in their own working directories.
        self.root = Path(root).resolve()

    def stage_path(self, stage: str) -> Path:
        return self.root / stage

    def manifest(self, stage: str) -> dict[str, Any] | None:
        path = self.stage_path(stage) / MANIFEST
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def manifest_hash(self, stage: str) -> str:
        """Hash of a finished stage's manifest, used as an input hash by later stages."""
        path = self.stage_path(stage) / MANIFEST
        if not path.is_file():
            raise DiffGRMError(f"{self.stage_path(stage)}: stage {stage!r} has not run yet "
                               f"(run `diffgrm {stage}` or `diffgrm pipeline` first)")
        return file_sha256(path)[:16]

    def is_current(self, record: StageRecord) -> bool:
        found = self.manifest(record.stage)
        return (found is not None and found.get("config_hash") == record.config_hash
                and found.get("inputs") == record.inputs)

    @contextlib.contextmanager
    def write_stage(self, record: StageRecord, config: dict[str, Any]) -> Iterator[Path]:
        """Yields a temporary folder; on success writes the manifest and renames it into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.stage_path(record.stage)
        tmp = self.root / f".{record.stage}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        start = time.perf_counter()
        try:
            yield tmp
            outputs = {p.relative_to(tmp).as_posix(): p.stat().st_size
                       for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {
                "stage": record.stage,
                "config_hash": record.config_hash,
                "inputs": record.inputs,
                "config": config,
                "outputs": outputs,
                "versions": package_versions(),
                "wall_time_s": round(time.perf_counter() - start, 3),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            old = None
            if final.exists():
                old = self.root / f".{record.stage}.old-{uuid.uuid4().hex[:8]}"
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
