"""The pipeline's stages, what each depends on, and the runner that skips current ones."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffgrm_dist.core.config import ExperimentConfig, section_hash, to_dict, validation_view
from diffgrm_dist.core.rundir import RunDir, StageRecord, file_sha256

log = logging.getLogger(__name__)


def whole(section: Any) -> Any:
    return section


def no_files(cfg: ExperimentConfig) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Stage:
    """A named step and everything its output depends on: the config sections it reads
    (through ``views``, where it reads only part of one), the files outside the run
    directory it reads (``files``: name -> content hash), the stages it reads, and its
    body, which gets the stage's record (``StageRecord.key`` names its work in progress)."""

    name: str
    sections: tuple[str, ...]
    upstream: tuple[str, ...]
    run: Callable[[ExperimentConfig, RunDir, Path, StageRecord], dict[str, Any]]
    views: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    files: Callable[[ExperimentConfig], dict[str, str]] = no_files
    mirrored: bool = True  # False: a URI run's copy stays in the bucket only (read in place)


def raw_data_files(cfg: ExperimentConfig) -> dict[str, str]:
    """Content hashes of the raw files prepare will read."""
    from diffgrm_dist.data.readers import source_files

    return {f"file:{p.name}": file_sha256(p)[:16] for p in source_files(cfg.data) if p.is_file()}


def embeddings_file(cfg: ExperimentConfig) -> dict[str, str]:
    """The content hash of a team's own embeddings file, when tokenize reads one."""
    return {"file:embeddings": embeddings_hash(cfg.tokenize.embeddings)} if cfg.tokenize.embeddings else {}


def _run_prepare(cfg: ExperimentConfig, run_dir: RunDir, out: Path, record: StageRecord) -> dict[str, Any]:
    from diffgrm_dist.data.prepare import prepare, write_prepared

    prepared = prepare(cfg)
    write_prepared(prepared, out)
    return prepared.stats


def _run_tokenize(cfg: ExperimentConfig, run_dir: RunDir, out: Path, record: StageRecord) -> dict[str, Any]:
    from diffgrm_dist.tokenize.stage import run_tokenize

    return run_tokenize(cfg, run_dir, out)


def _run_shard(cfg: ExperimentConfig, run_dir: RunDir, out: Path, record: StageRecord) -> dict[str, Any]:
    from diffgrm_dist.data.shard import run_shard

    return run_shard(cfg, run_dir, out)


def _run_train(cfg: ExperimentConfig, run_dir: RunDir, out: Path, record: StageRecord) -> dict[str, Any]:
    from diffgrm_dist.train.launch import run_train

    return run_train(cfg, run_dir, out, work_key=record.key)


def _run_evaluate(cfg: ExperimentConfig, run_dir: RunDir, out: Path, record: StageRecord) -> dict[str, Any]:
    from diffgrm_dist.evaluate.stage import run_evaluate

    return run_evaluate(cfg, run_dir, out)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare", ("data", "prepare"), (), _run_prepare, files=raw_data_files),
    Stage("tokenize", ("tokenize",), ("prepare",), _run_tokenize, files=embeddings_file),
    Stage("shard", ("shard",), ("prepare", "tokenize"), _run_shard, mirrored=False),
    # Training validates with part of the eval section: only that part decides whether it re-runs.
    Stage("train", ("model", "train", "eval"), ("shard", "tokenize"), _run_train, views={"eval": validation_view}),
    Stage("evaluate", ("eval",), ("train", "tokenize", "prepare"), _run_evaluate),
)}
PIPELINE = tuple(STAGES)


def embeddings_hash(path: str) -> str:
    """sha256 of a ``tokenize.embeddings`` file (path or URI), streamed; "missing" if absent,
    so the stage runs and names the file in its error."""
    from pyarrow import fs as pafs

    from diffgrm_dist.core.rundir import is_uri

    filesystem, inner = pafs.FileSystem.from_uri(path) if is_uri(path) else (pafs.LocalFileSystem(), path)
    if filesystem.get_file_info(inner).type != pafs.FileType.File:
        return "missing"
    return file_sha256(path, chunk=1 << 22)[:16]


def stage_record(stage: Stage, cfg: ExperimentConfig, run_dir: RunDir) -> StageRecord:
    """Config hash of the stage's sections; input hashes of raw files and upstream manifests."""
    sections = [stage.views.get(s, whole)(getattr(cfg, s)) for s in stage.sections]
    inputs = stage.files(cfg)
    for up in stage.upstream:
        inputs[f"stage:{up}"] = run_dir.manifest_hash(up)
    return StageRecord(stage.name, section_hash(cfg.seed, *sections), inputs)


def run_stage(name: str, cfg: ExperimentConfig, run_dir: RunDir, force: bool = False) -> dict[str, Any]:
    """Runs one stage unless its manifest is current; returns its stats."""
    stage = STAGES[name]
    record = stage_record(stage, cfg, run_dir)
    if not force and run_dir.is_current(record):
        log.info("%s: up to date, skipped (%s/%s)", name, run_dir.display, name)
        stats = run_dir.read_text(name, "stats.json")
        return json.loads(stats) if stats else {}
    config = {"seed": cfg.seed, **{s: to_dict(getattr(cfg, s)) for s in stage.sections}}
    with run_dir.write_stage(record, config, mirror=stage.mirrored) as out:
        stats = stage.run(cfg, run_dir, out, record)
    log.info("%s: written to %s/%s", name, run_dir.display, name)
    return stats


def adopt_current_stages(cfg: ExperimentConfig, run_dir: RunDir, donors: list[RunDir]) -> list[str]:
    """Copies into a local ``run_dir`` every stage, in pipeline order, that some donor run
    holds for exactly this config and these upstream stages (the manifest decides), and
    stops at the first stage none holds: that one and all after it run afresh. Variants of
    one experiment share tokenize, shards or a trained model this way. Returns the stages
    adopted."""
    import shutil

    adopted = []
    for name in PIPELINE:
        if run_dir.manifest(name) is not None:
            if run_dir.is_current(stage_record(STAGES[name], cfg, run_dir)):
                adopted.append(name)
                continue
            break
        record = stage_record(STAGES[name], cfg, run_dir)
        donor = next((d for d in donors if d.remote is None and d.is_current(record)), None)
        if donor is None:
            break
        run_dir.root.mkdir(parents=True, exist_ok=True)
        tmp = run_dir.root / f".{name}.adopting"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(donor.stage_path(name), tmp)
        tmp.rename(run_dir.stage_path(name))
        adopted.append(name)
    return adopted
