"""Run directory: each stage writes ``RUN_DIR/<stage>/`` atomically, with a manifest.

A stage builds its output in a temporary sibling folder and renames it into place only
when everything is written, so a crash or a bad input never leaves a half-written stage.
``manifest.json`` records what the output was made from (config hash, input hashes),
with which versions, and how long it took. A stage whose recorded config hash and input
hashes equal the current ones is skipped; anything else re-runs it, and since each stage
lists its upstream manifests among its inputs, everything after it re-runs too.

``RUN_DIR`` may also be a URI on any pyarrow filesystem (``s3://bucket/runs/x``,
``gs://...``, ``hdfs://...``, ``file:///...``), so that every node of a cluster reads and
writes the same artifacts without a shared mount. The URI is then the source of truth
and each process keeps a local mirror (``$DIFFGRM_CACHE_DIR``, default
``~/.cache/diffgrm/runs``): a stage is built locally as above, uploaded file by file with
its manifest last (object stores have no atomic rename: a stage without a manifest has
not run), and pulled into a node's mirror the first time that node reads it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
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
from urllib.parse import urlsplit, urlunsplit

from diffgrm_dist.core.errors import ConfigError, DiffGRMError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_VERSIONED_PACKAGES = ("diffgrm-dist", "numpy", "pyarrow", "torch", "deepspeed", "ray",
                       "sentence-transformers", "faiss-cpu", "faiss-gpu", "webdataset")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, a local path or a pyarrow filesystem URI, streamed ``chunk`` at a time."""
    digest = hashlib.sha256()
    if is_uri(path):
        from pyarrow import fs as pafs

        filesystem, inner = pafs.FileSystem.from_uri(str(path))
        opened = filesystem.open_input_stream(inner)
    else:
        opened = open(path, "rb")
    with opened as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's fields other than ``digest``, in canonical JSON: detects edits."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed onto ``path`` only when the block
    succeeds, so readers see the old file or the whole new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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

    @property
    def key(self) -> str:
        """One hash of everything the output depends on: names a stage's work in progress
        (e.g. training checkpoints), so a changed config or input never resumes stale state."""
        payload = json.dumps([self.stage, self.config_hash, sorted(self.inputs.items())])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def is_uri(root: str | Path) -> bool:
    """Whether a run directory names a filesystem URI (``scheme://...``) rather than a path."""
    return isinstance(root, str) and "://" in root


def display_uri(uri: str) -> str:
    """The URI without its query and password, which may carry credentials: safe to log."""
    parts = urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if parts.username:
        netloc = f"{parts.username}:***@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFFGRM_CACHE_DIR") or Path.home() / ".cache" / "diffgrm") / "runs"


class RemoteStore:
    """A run folder on a pyarrow filesystem; paths are relative to the run's root."""

    def __init__(self, uri: str) -> None:
        import pyarrow
        from pyarrow import fs as pafs

        try:
            self.fs, root = pafs.FileSystem.from_uri(uri)
        except (pyarrow.ArrowInvalid, OSError) as exc:
            raise ConfigError(f"run directory {display_uri(uri)}: {exc}") from exc
        self.base = root.rstrip("/")

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def read_bytes(self, rel: str) -> bytes | None:
        from pyarrow import fs as pafs

        if self.fs.get_file_info(self.path(rel)).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(self.path(rel)) as fh:
            return fh.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.fs.open_output_stream(self.path(rel)) as fh:
            fh.write(data)

    def delete(self, rel: str) -> None:
        from pyarrow import fs as pafs

        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))
        elif info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))

    def upload(self, local: Path, rel: str) -> None:
        from pyarrow import fs as pafs

        self.fs.create_dir(self.path(rel), recursive=True)
        pafs.copy_files(str(local), self.path(rel), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def download(self, rel: str, local: Path) -> None:
        from pyarrow import fs as pafs

        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(rel), str(local), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())

    def list_dirs(self, rel: str) -> list[str]:
        """Names of the folders directly under ``rel`` (none if it does not exist)."""
        from pyarrow import fs as pafs

        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.Directory)


class RunDir:
    """A run's folder; hands out atomic stage folders and reads their manifests.

    ``spec`` is what the user named (an absolute path or a URI) and what workers on other
    nodes get to open the same run; ``root`` is the local folder stage code reads and
    writes: the run itself, or this machine's mirror of a remote run.
    """

    def __init__(self, root: str | Path, cache_dir: Path | None = None) -> None:
        self.remote: RemoteStore | None = None
        self._pulled: dict[str, bytes] = {}  # stage -> manifest bytes of the mirrored copy
        if is_uri(root):
            self.spec = str(root).rstrip("/")
            self.remote = RemoteStore(self.spec)
            key = hashlib.sha256(self.spec.encode()).hexdigest()[:12]
            name = Path(urlsplit(self.spec).path).name or "run"
            self.root = (cache_dir or default_cache_dir()) / f"{name}-{key}"
        else:
            # Absolute: Ray workers and actors run in their own working directories.
            self.root = Path(root).resolve()
            self.spec = str(self.root)

    @property
    def display(self) -> str:
        return display_uri(self.spec) if self.remote else self.spec

    def stage_path(self, stage: str) -> Path:
        """The stage's local folder; for a remote run, pulled first if this mirror is stale."""
        local = self.root / stage
        if self.remote is not None and stage not in self._pulled:
            self._pull(stage)
        return local

    def _pull(self, stage: str) -> None:
        assert self.remote is not None
        wanted = self.remote.read_bytes(f"{stage}/{MANIFEST}")
        if wanted is None:
            return  # not run yet: callers find no manifest and say so
        self.root.mkdir(parents=True, exist_ok=True)
        local = self.root / stage
        # One puller per mirror at a time: actors of one node share it.
        with open(self.root / ".pull.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = local / MANIFEST
            if not (current.is_file() and current.read_bytes() == wanted):
                log.info("pulling %s/%s into %s", self.display, stage, local)
                tmp = self.root / f".{stage}.pull-{uuid.uuid4().hex[:8]}"
                try:
                    self.remote.download(stage, tmp)
                    wanted = (tmp / MANIFEST).read_bytes()
                    replace_dir(tmp, local)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
        self._pulled[stage] = wanted

    def _manifest_bytes(self, stage: str) -> bytes | None:
        if self.remote is not None:
            return self.remote.read_bytes(f"{stage}/{MANIFEST}")
        path = self.root / stage / MANIFEST
        return path.read_bytes() if path.is_file() else None

    def manifest(self, stage: str) -> dict[str, Any] | None:
        """The stage's manifest, None if the stage has not run; one clear error if it is
        not valid JSON or was edited after the stage wrote it (its digest no longer matches)."""
        found = self._manifest_bytes(stage)
        return None if found is None else self._parse_manifest(stage, found)

    def _parse_manifest(self, stage: str, found: bytes) -> dict[str, Any]:
        where = f"{self.display}/{stage}/{MANIFEST}"
        try:
            manifest = json.loads(found)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DiffGRMError(f"{where}: not valid JSON ({exc}); the manifest is truncated or edited: "
                               f"re-run `diffgrm {stage}`") from None
        if not isinstance(manifest, dict):
            raise DiffGRMError(f"{where}: not a manifest (a JSON object); re-run `diffgrm {stage}`")
        digest = manifest.get("digest")
        if digest is not None and digest != manifest_digest(manifest):
            raise DiffGRMError(f"{where}: edited after the stage wrote it (its digest no longer matches); "
                               f"re-run `diffgrm {stage}`")
        return manifest

    def read_text(self, stage: str, name: str) -> str | None:
        """One small file of a finished stage, read without pulling the whole stage."""
        if self.remote is not None:
            found = self.remote.read_bytes(f"{stage}/{name}")
            return None if found is None else found.decode()
        path = self.root / stage / name
        return path.read_text() if path.is_file() else None

    def manifest_hash(self, stage: str) -> str:
        """Hash of a finished stage's manifest, used as an input hash by later stages."""
        found = self._manifest_bytes(stage)
        if found is None:
            raise DiffGRMError(f"{self.display}/{stage}: stage {stage!r} has not run yet "
                               f"(run `diffgrm {stage}` or `diffgrm pipeline` first)")
        self._parse_manifest(stage, found)  # a later stage never builds on an edited one
        return hashlib.sha256(found).hexdigest()[:16]

    def storage(self, rel: str) -> tuple[str, Any]:
        """``(path, filesystem)`` of a folder inside the run, for Ray Train's storage_path;
        the filesystem is None for a local run."""
        if self.remote is None:
            return str(self.root / rel), None
        return self.remote.path(rel), self.remote.fs

    def delete(self, rel: str) -> None:
        """Removes a folder of the run (and of the local mirror)."""
        shutil.rmtree(self.root / rel, ignore_errors=True)
        if self.remote is not None:
            self.remote.delete(rel)

    def list_dirs(self, rel: str) -> list[str]:
        """Names of the folders directly under ``rel`` in the run."""
        if self.remote is not None:
            return self.remote.list_dirs(rel)
        folder = self.root / rel
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def is_current(self, record: StageRecord) -> bool:
        found = self.manifest(record.stage)
        return (found is not None and found.get("config_hash") == record.config_hash
                and found.get("inputs") == record.inputs)

    @contextlib.contextmanager
    def write_stage(self, record: StageRecord, config: dict[str, Any], mirror: bool = True) -> Iterator[Path]:
        """Yields a temporary folder; on success writes the manifest and renames it into place.
        For a URI run with ``mirror=False`` (stages read in place in the bucket: shards) the
        local copy is dropped once uploaded, so the writing machine keeps no TBs of tars."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / record.stage  # replaced whole: a remote run's old copy is not pulled first
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
            manifest["digest"] = manifest_digest(manifest)
            text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
            if self.remote is not None:
                # Manifest last: readers take a stage without one as not run.
                self.remote.delete(record.stage)
                self.remote.upload(tmp, record.stage)
                self.remote.write_bytes(f"{record.stage}/{MANIFEST}", text.encode())
                if not mirror:
                    shutil.rmtree(tmp)
                    shutil.rmtree(final, ignore_errors=True)  # a stale mirrored copy
                    self._pulled.pop(record.stage, None)  # a local reader would pull it afresh
                    return
                self._pulled[record.stage] = text.encode()
            (tmp / MANIFEST).write_text(text)
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def replace_dir(new: Path, final: Path) -> None:
    """Puts ``new`` in the place of ``final`` (which may exist) with renames only."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
