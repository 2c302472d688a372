"""The grid of ``diffgrm stress``: sweeps of decode, train and largest-model points, their
limits, loading with overrides, and expansion into points."""

from __future__ import annotations

import dataclasses
import itertools
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffgrm_dist.core.config import EvalConfig, ModelConfig, TrainConfig, apply_override, load_typed
from diffgrm_dist.core.errors import ConfigError

KINDS = ("decode", "train", "largest")
DECODERS = ("diffusion", "autoregressive")


def _stress_model() -> ModelConfig:
    """A point's model: heads and FFN 0 are derived from d_model (heads of about 64 dims, FFN
    4 x d_model, see ``resolved``), so a d_model sweep stays a sensible model; no dropout."""
    return ModelConfig(d_model=128, heads=0, ffn=0, encoder_layers=1, decoder_layers=2, dropout=0.0)


@dataclass
class SidShape:
    """The random codes a point decodes or trains on: ``digits`` digits of ``codebook_size`` values."""

    digits: int = 4
    codebook_size: int = 256


@dataclass
class DecodePoint:
    """One decoding measurement: a random model over a random catalogue. ``model`` and
    ``eval`` are the experiment's own sections (``eval.beam_size``, ``eval.fill_digits``,
    ``eval.batch_size`` = users per batch, ``eval.autocast_bf16``)."""

    model: ModelConfig = field(default_factory=_stress_model)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(beam_size=32, batch_size=16))
    sids: SidShape = field(default_factory=SidShape)
    items: int = 100_000  # catalogue size
    kv_cache: bool = True  # autoregressive: keys/values of decoded digits kept (false: prefix recomputed)


@dataclass
class TrainPoint:
    """One training measurement: DeepSpeed steps of the OCN objective on random windows.
    ``train`` is the experiment's own section (``batch_size`` is global, split over the
    ranks; ``zero_stage``, ``offload_optimizer``, ``zero_bucket_elements``, ``bf16``)."""

    model: ModelConfig = field(default_factory=_stress_model)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=64, zero_stage=0, warmup_steps=1,
                                                                   lr=1e-3))
    sids: SidShape = field(default_factory=SidShape)
    world_size: int = 1


@dataclass
class SweepConfig:
    """A base point and the axes varied around it."""

    name: str = ""
    kind: str = "decode"  # decode | train | largest
    vary: dict[str, list[str]] = field(default_factory=dict)  # axis -> values (cartesian product)
    decode: DecodePoint = field(default_factory=DecodePoint)
    train: TrainPoint = field(default_factory=TrainPoint)
    search: str = "model.decoder_layers"  # largest: the size axis grown until the memory limit
    search_start: int = 1
    search_max: int = 1024
    search_step: int = 1  # bisection stops when the last fit and the first failure are this close
    timeout_s: float = 0.0  # 0: limits.timeout_s
    memory_gib: float = 0.0  # 0: limits.memory_gib


@dataclass
class LimitsConfig:
    """What one point may use; going over is recorded, not fatal."""

    timeout_s: float = 300.0
    memory_gib: float = 8.0  # the point's whole process tree (RSS), all ranks together
    cpus_per_rank: int = 1  # CPU points: CPUs per decode point or per training rank
    gpus: str = "auto"  # auto: one GPU per decode point / rank where the cluster has GPUs | none


@dataclass
class StressConfig:
    name: str = "stress"
    seed: int = 0
    users: int = 64  # users timed per decode point, after one warm-up batch
    history: int = 20  # history slots per user / window
    train_steps: int = 4  # timed steps per train point, after one warm-up step
    local_cpus: int = 0  # CPUs of the local Ray instance when no cluster is named (0: all)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    sweeps: list[SweepConfig] = field(default_factory=list)

    def validate(self) -> None:
        if not self.sweeps:
            raise ConfigError("sweeps: the grid names no sweep")
        names = [s.name for s in self.sweeps]
        if "" in names or len(set(names)) != len(names):
            raise ConfigError(f"sweeps: every sweep needs a distinct name, got {names}")
        for sweep in self.sweeps:
            if sweep.kind not in KINDS:
                raise ConfigError(f"sweeps.{sweep.name}.kind: {sweep.kind!r} is not one of {KINDS}")
            axes = set(flatten(base_point(sweep)))
            for axis, values in sweep.vary.items():
                if axis not in axes:
                    raise ConfigError(f"sweeps.{sweep.name}.vary: {axis!r} is not an axis of a "
                                      f"{sweep.kind} point (axes: {', '.join(sorted(axes))})")
                if not values:
                    raise ConfigError(f"sweeps.{sweep.name}.vary.{axis}: no values")
            if sweep.kind == "largest" and sweep.search not in SEARCH_AXES:
                raise ConfigError(f"sweeps.{sweep.name}.search: {sweep.search!r} is not one of {SEARCH_AXES}")
            for point in expand(sweep):
                check_point(resolved(point), f"sweeps.{sweep.name}")


def load_stress_config(path: str | Path, overrides: list[str] | None = None) -> StressConfig:
    cfg = load_typed(StressConfig, path)
    for item in overrides or []:
        apply_override(cfg, item)
    cfg.validate()
    return cfg


SEARCH_AXES = ("model.decoder_layers", "model.d_model")


def base_point(sweep: SweepConfig) -> DecodePoint | TrainPoint:
    return sweep.decode if sweep.kind == "decode" else sweep.train


def flatten(point: Any, prefix: str = "") -> dict[str, Any]:
    """A point as ``section.key -> value`` (the axis names of ``vary`` and the columns of
    ``stress.parquet``)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(point):
        value = getattr(point, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def with_value(point: DecodePoint | TrainPoint, axis: str, value: Any) -> DecodePoint | TrainPoint:
    """A copy of ``point`` with one axis set (value as YAML text or a number, typed by the field)."""
    copy = deepcopy(point)
    apply_override(copy, f"{axis}={value}")
    return copy


def resolved(point: DecodePoint | TrainPoint) -> DecodePoint | TrainPoint:
    """The point as it runs: heads and FFN of 0 derived from its d_model; ``kv_cache`` only
    means something to the autoregressive decoder (true for the others)."""
    model = point.model
    model = dataclasses.replace(model, heads=model.heads or heads_for(model.d_model), ffn=model.ffn or 4 * model.d_model)
    if isinstance(point, DecodePoint) and model.decoder != "autoregressive":
        return dataclasses.replace(point, model=model, kv_cache=True)
    return dataclasses.replace(point, model=model)


def method(point: DecodePoint | TrainPoint) -> str:
    """What decodes or trains: diffusion (CPD) | autoregressive (KV cache) | autoregressive_nocache."""
    if point.model.decoder == "autoregressive" and isinstance(point, DecodePoint) and not point.kv_cache:
        return "autoregressive_nocache"
    return point.model.decoder


def expand(sweep: SweepConfig) -> list[DecodePoint | TrainPoint]:
    """The sweep's points: its base point with every combination of the varied values
    (values are YAML text, typed by the point's field), each once as it runs (``resolved``:
    ``kv_cache: ["true", "false"]`` beside ``model.decoder: [diffusion, autoregressive]`` is one
    diffusion point and two autoregressive ones)."""
    axes = list(sweep.vary)
    points, seen = [], []
    for values in itertools.product(*(sweep.vary[a] for a in axes)):
        point = base_point(sweep)
        for axis, value in zip(axes, values):
            point = with_value(point, axis, value)
        runs_as = resolved(point)
        if runs_as not in seen:
            seen.append(runs_as)
            points.append(point)
    return points


def check_point(point: DecodePoint | TrainPoint, where: str) -> None:
    model, sids = point.model, point.sids
    if model.decoder not in DECODERS:
        raise ConfigError(f"{where}.model.decoder: {model.decoder!r} is not one of {DECODERS}")
    if model.d_model < 1 or model.decoder_layers < 1 or sids.digits < 1 or sids.codebook_size < 2:
        raise ConfigError(f"{where}: sizes must be positive (model.d_model, model.decoder_layers, sids.digits; "
                          "sids.codebook_size >= 2)")
    if model.d_model % model.heads:
        raise ConfigError(f"{where}.model.heads: {model.heads} does not divide model.d_model {model.d_model}")
    if isinstance(point, TrainPoint):
        train = point.train
        if train.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{where}.train.zero_stage: {train.zero_stage} is not 0-3")
        if train.offload_optimizer and train.zero_stage == 0:
            raise ConfigError(f"{where}: train.offload_optimizer needs train.zero_stage 1-3")
        if train.zero_bucket_elements < 0 or train.zero_bucket_elements % 2:
            raise ConfigError(f"{where}.train.zero_bucket_elements: must be 0 or a positive even number")
        if point.world_size < 1 or train.batch_size % point.world_size:
            raise ConfigError(f"{where}.train.batch_size: {train.batch_size} does not split over "
                              f"{point.world_size} ranks")
    elif point.eval.beam_size < 1 or point.eval.fill_digits < 1 or point.eval.batch_size < 1 or point.items < 1:
        raise ConfigError(f"{where}: eval.beam_size, eval.fill_digits, eval.batch_size and items must be positive")


def heads_for(d_model: int) -> int:
    """Heads of about 64 dims (1 to 16, dividing d_model), as the paper's sizes have."""
    return next(h for h in range(max(1, min(16, d_model // 64)), 0, -1) if d_model % h == 0)
