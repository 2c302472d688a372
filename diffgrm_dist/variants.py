"""Named variants of one experiment, run side by side: the one runner behind ``make demo``'s
second table, ``tools/run_variants.py`` and ``tools/reproduce.py``.

A variant is a list of ``section.key=value`` overrides on one config. Each runs in its own
run directory under a shared home and first adopts every stage that another run of the
home already holds for exactly its config and inputs (``stages.adopt_current_stages``: the
manifests decide), so variants share prepare, tokenize, shards or a trained model, and the
first stage none holds re-runs with everything after it. All variants of a home share one
embedding cache. The pipeline itself runs as a ``diffgrm pipeline`` child process, its log
beside the run directory.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffgrm_dist.core.config import ExperimentConfig, load_config
from diffgrm_dist.core.errors import ConfigError
from diffgrm_dist.core.rundir import RunDir
from diffgrm_dist.stages import PIPELINE, adopt_current_stages

EMBEDDINGS = "embeddings"  # the home's shared embedding cache, not a run


@dataclass(frozen=True)
class Variant:
    """``model_of``: a variant that only re-evaluates another variant's trained model (test-time
    settings); it must adopt every stage up to train from that run, or it is an error rather
    than a silent retraining."""

    name: str
    overrides: tuple[str, ...] = ()
    model_of: str | None = None


@dataclass
class VariantRun:
    """What one variant's run measured, and how it ran."""

    variant: Variant
    run: Path
    cfg: ExperimentConfig
    adopted: list[str]
    command: str
    wall_s: float
    metrics: dict[str, Any]
    train: dict[str, Any]
    tokenize: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """The JSON record of the run (results files)."""
        return {"variant": self.variant.name, "overrides": list(self.variant.overrides),
                "adopted_stages": self.adopted, "pipeline_command": self.command, "wall_s": self.wall_s,
                "metrics": self.metrics, "train": self.train, "tokenize": self.tokenize}


def parse_variant(text: str) -> Variant:
    """``NAME=key=value key=value ...`` (the CLI form)."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise ConfigError(f"--variant {text!r}: expected NAME=key=value key=value ...")
    return Variant(name, tuple(shlex.split(rest)))


def donors_for(home: Path, variant: Variant, extra: list[Path] | None = None) -> list[RunDir]:
    """The runs a variant may adopt from: the run whose model it re-evaluates first, then any
    ``extra`` (e.g. a seed run outside the home), then the home's other runs by name."""
    first = [home / variant.model_of] if variant.model_of else []
    others = sorted(p for p in home.iterdir() if p.is_dir() and p.name not in (variant.name, EMBEDDINGS)) \
        if home.is_dir() else []
    ordered = [*first, *(extra or []), *(p for p in others if p not in first)]
    return [RunDir(p) for p in ordered if p.is_dir()]


def run_variant(config: Path, variant: Variant, home: Path, extra_donors: list[Path] | None = None) -> VariantRun:
    """Runs one variant (adopting what it can) and returns what it measured."""
    run = home / variant.name
    overrides = [f"tokenize.embedding_cache={home / EMBEDDINGS}", *variant.overrides]
    cfg = load_config(config, overrides)
    adopted = adopt_current_stages(cfg, RunDir(run), donors_for(home, variant, extra_donors))
    if variant.model_of and "train" not in adopted:
        raise ConfigError(f"variant {variant.name}: re-evaluates the model of {variant.model_of}, but "
                          f"{home / variant.model_of} holds no trained model for this config (run it first; "
                          f"only test-time eval settings may differ)")
    command = [str(Path(sys.executable).parent / "diffgrm"), "pipeline", "-c", str(config), "-o", str(run), *overrides]
    print(f"{variant.name}: running ({', '.join(adopted) or 'no stage'} adopted; "
          f"{', '.join(s for s in PIPELINE if s not in adopted) or 'nothing'} to run); log in {run}.log", flush=True)
    start = time.perf_counter()
    with open(f"{run}.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"variant {variant.name}: pipeline failed (exit {done.returncode}); see {run}.log")
    wall = time.perf_counter() - start

    def stage_json(stage: str, name: str) -> dict[str, Any]:
        return json.loads((run / stage / name).read_text())

    tokenize = stage_json("tokenize", "stats.json")
    return VariantRun(variant, run, cfg, adopted, shlex.join(["diffgrm", *command[1:]]), round(wall, 1),
                      stage_json("evaluate", "metrics.json"), stage_json("train", "stats.json"),
                      {k: tokenize[k] for k in ("items", "distinct_codes", "colliding_items", "max_items_per_code")
                       if k in tokenize})
