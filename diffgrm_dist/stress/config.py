"""The grid of ``diffgrm stress``: sweeps of decode, train and largest-model points, their
limits, loading with overrides, and expansion into points."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from diffgrm_dist.core.config import apply_override, load_typed
from diffgrm_dist.core.errors import ConfigError

KINDS = ("decode", "train", "largest")
DECODERS = ("diffusion", "autoregressive", "autoregressive_nocache")
DTYPES = ("float32", "bfloat16")


@dataclass
class DecodePoint:
    """One decoding measurement: a random model over a random catalogue."""

    decoder: str = "diffusion"  # diffusion (CPD) | autoregressive (KV cache) | autoregressive_nocache
    digits: int = 4
    codebook_size: int = 256
    beam: int = 32
    items: int = 100_000
    users_per_batch: int = 16
    d_model: int = 128
    decoder_layers: int = 2
    fill_digits: int = 1  # CPD digits per decoder pass
    dtype: str = "float32"


@dataclass
class TrainPoint:
    """One training measurement: DeepSpeed steps of the OCN objective on random windows."""

    decoder: str = "diffusion"  # diffusion | autoregressive
    digits: int = 4
    codebook_size: int = 256
    d_model: int = 128
    decoder_layers: int = 2
    batch_size: int = 64  # global, split over the ranks
    zero_stage: int = 0
    world_size: int = 1
    offload: bool = False  # ZeRO-Offload of the optimizer state (stages 1-3)
    zero_bucket_elements: int = 0  # train.zero_bucket_elements (0: DeepSpeed's buckets)
    dtype: str = "float32"


@dataclass
class SweepConfig:
    """A base point and the axes varied around it."""

    name: str = ""
    kind: str = "decode"  # decode | train | largest
    vary: dict[str, list[str]] = field(default_factory=dict)  # axis -> values (cartesian product)
    decode: DecodePoint = field(default_factory=DecodePoint)
    train: TrainPoint = field(default_factory=TrainPoint)
    search: str = "decoder_layers"  # largest: the size axis grown until the memory limit
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
            base = sweep.decode if sweep.kind == "decode" else sweep.train
            axes = {f.name for f in dataclasses.fields(base)}
            for axis, values in sweep.vary.items():
                if axis not in axes:
                    raise ConfigError(f"sweeps.{sweep.name}.vary: {axis!r} is not an axis of a "
                                      f"{sweep.kind} point (axes: {', '.join(sorted(axes))})")
                if not values:
                    raise ConfigError(f"sweeps.{sweep.name}.vary.{axis}: no values")
            if sweep.kind == "largest" and sweep.search not in ("decoder_layers", "d_model"):
                raise ConfigError(f"sweeps.{sweep.name}.search: {sweep.search!r} is not decoder_layers or d_model")
            for point in expand(sweep):
                check_point(point, f"sweeps.{sweep.name}")


def load_stress_config(path: str | Path, overrides: list[str] | None = None) -> StressConfig:
    cfg = load_typed(StressConfig, path)
    for item in overrides or []:
        apply_override(cfg, item)
    cfg.validate()
    return cfg


def expand(sweep: SweepConfig) -> list[DecodePoint | TrainPoint]:
    """The sweep's points: its base point with every combination of the varied values
    (values are YAML text, typed by the point's field)."""
    base = sweep.decode if sweep.kind == "decode" else sweep.train
    axes = list(sweep.vary)
    points = []
    for values in itertools.product(*(sweep.vary[a] for a in axes)):
        point = dataclasses.replace(base)
        for axis, value in zip(axes, values):
            apply_override(point, f"{axis}={value}")
        points.append(point)
    return points


def check_point(point: DecodePoint | TrainPoint, where: str) -> None:
    if point.decoder not in DECODERS or (isinstance(point, TrainPoint) and point.decoder == "autoregressive_nocache"):
        raise ConfigError(f"{where}.decoder: {point.decoder!r} is not one of {DECODERS}")
    if point.dtype not in DTYPES:
        raise ConfigError(f"{where}.dtype: {point.dtype!r} is not one of {DTYPES}")
    if point.d_model < 1 or point.decoder_layers < 1 or point.digits < 1 or point.codebook_size < 2:
        raise ConfigError(f"{where}: sizes must be positive (d_model, decoder_layers, digits, codebook_size >= 2)")
    if isinstance(point, TrainPoint):
        if point.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{where}.zero_stage: {point.zero_stage} is not 0-3")
        if point.offload and point.zero_stage == 0:
            raise ConfigError(f"{where}: offload needs zero_stage 1-3")
        if point.zero_bucket_elements < 0 or point.zero_bucket_elements % 2:
            raise ConfigError(f"{where}.zero_bucket_elements: must be 0 or a positive even number")
        if point.batch_size % point.world_size:
            raise ConfigError(f"{where}.batch_size: {point.batch_size} does not split over {point.world_size} ranks")


def heads_for(d_model: int) -> int:
    """Heads of about 64 dims (1 to 16, dividing d_model), as the paper's sizes have."""
    return next(h for h in range(max(1, min(16, d_model // 64)), 0, -1) if d_model % h == 0)
