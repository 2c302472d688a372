"""Training checkpoints: per-rank partial state (RNG, progress) with checksums, which
checkpoint is the newest intact one, and the reporters that hand a checkpoint to the
launcher (a local folder, or Ray Train's storage)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from diffgrm_dist.core.rundir import file_sha256

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
CHECKSUMS_PREFIX = "checksums.rank"
PARTIAL_PREFIX = "partial.rank"


# --------------------------------------------------------------------------- checkpoints


def write_checksums(folder: Path, rank: int) -> None:
    """sha256 of every file this rank put in its checkpoint folder, so a resume can tell a
    complete checkpoint from a truncated or corrupt one (Ray merges the ranks' folders)."""
    sums = {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / f"{CHECKSUMS_PREFIX}{rank}.json").write_text(json.dumps(sums, indent=1) + "\n")


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random number generators training draws from: torch's CPU generator and, on a
    GPU, that device's (dropout and noising masks are drawn there)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_partial(folder: Path, rank: int, progress: dict[str, Any] | None,
                 device: torch.device | None = None) -> None:
    """This rank's RNG (dropout, noising; CPU and GPU) and, mid-epoch, its progress: a resumed
    run continues with the very random numbers and windows the uninterrupted one would use."""
    from safetensors.torch import save_file

    save_file(rng_state(device or torch.device("cpu")), str(folder / f"rng.rank{rank}.safetensors"))
    if progress is not None:
        (folder / f"{PARTIAL_PREFIX}{rank}.json").write_text(json.dumps(progress))


def load_partial(folder: Path, rank: int, device: torch.device | None = None) -> dict[str, Any] | None:
    """Restores this rank's RNG from a checkpoint; returns its mid-epoch progress, if any."""
    from safetensors.torch import load_file

    rng = folder / f"rng.rank{rank}.safetensors"
    if rng.is_file():
        restore_rng(load_file(str(rng)), device or torch.device("cpu"))
    path = folder / f"{PARTIAL_PREFIX}{rank}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_problem(root: str, filesystem: Any = None) -> str | None:
    """Why the checkpoint folder ``root`` cannot be resumed from (None: complete and intact).
    Reads through a pyarrow filesystem, so it works on a bucket as on a local disk."""
    from pyarrow import fs as pafs

    filesystem = filesystem or pafs.LocalFileSystem()
    if filesystem.get_file_info(f"{root}/{STATE_FILE}").type != pafs.FileType.File:
        return f"no {STATE_FILE}"
    listed = [i for i in filesystem.get_file_info(pafs.FileSelector(root)) if i.base_name.startswith(CHECKSUMS_PREFIX)]
    if not listed:
        return "no checksums (written by an older version or cut short)"
    for info in listed:
        try:
            with filesystem.open_input_stream(info.path) as fh:
                sums = json.loads(fh.read())
        except (OSError, ValueError):
            return f"{info.base_name} unreadable"
        for name, expected in sums.items():
            digest = hashlib.sha256()
            try:
                with filesystem.open_input_stream(f"{root}/{name}") as fh:
                    while block := fh.read(1 << 20):
                        digest.update(block)
            except (OSError, FileNotFoundError):
                return f"{name} missing"
            if digest.hexdigest() != expected:
                return f"{name} does not match its sha256 (truncated or corrupt)"
    return None


def newest_intact(candidates: list[str], filesystem: Any = None) -> str | None:
    """The newest of ``candidates`` (sorted oldest first) that ``checkpoint_problem``
    accepts; each one skipped is logged as a warning."""
    for path in reversed(candidates):
        problem = checkpoint_problem(path, filesystem)
        if problem is None:
            return path
        log.warning("checkpoint %s skipped: %s; trying the previous one", path, problem)
    return None


class Reporter(Protocol):
    """How a rank reports an epoch (and its checkpoint folder) and finds one to resume."""

    def latest(self) -> Path | None: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None: ...


class LocalReporter:
    """Checkpoints as numbered folders under ``root`` (single process)."""

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root, self.keep = root, keep
        root.mkdir(parents=True, exist_ok=True)

    def _epochs(self) -> list[Path]:
        return sorted(p for p in self.root.glob("epoch-*") if p.is_dir())

    def latest(self) -> Path | None:
        found = newest_intact([str(p) for p in self._epochs()])
        return Path(found) if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        # Completed epochs, then steps into the next: names sort in training order.
        step = f".step-{metrics['step']:07d}" if "step" in metrics else ""
        target = self.root / f"epoch-{metrics['epoch']:05d}{step}"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(checkpoint_dir, target)
        for old in self._epochs()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


class RayReporter:
    """Ray Train's checkpointing: every rank reports its folder; Ray merges and persists."""

    def __init__(self) -> None:
        import ray.train

        self._train = ray.train
        self._resume = ray.train.get_checkpoint()
        self._resume_dir: contextlib.ExitStack | None = None

    def latest(self) -> Path | None:
        if self._resume is None:
            return None
        self._resume_dir = contextlib.ExitStack()
        return Path(self._resume_dir.enter_context(self._resume.as_directory()))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        self._train.report(metrics, checkpoint=self._train.Checkpoint.from_directory(str(checkpoint_dir)))


def latest_ray_checkpoint(storage: str, filesystem: Any, run_name: str) -> str | None:
    """Newest complete, intact checkpoint a previous (interrupted) Ray Train run persisted.

    Ray names checkpoints ``checkpoint_<timestamp>``, so the last name is the newest; a
    truncated or corrupt one is skipped for the one before it."""
    from pyarrow import fs as pafs

    filesystem = filesystem or pafs.LocalFileSystem()
    root = f"{storage}/{run_name}"
    found = [info.path for info in filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
             if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")]
    return newest_intact(sorted(found, key=lambda path: path.rsplit("/", 1)[-1]), filesystem)
