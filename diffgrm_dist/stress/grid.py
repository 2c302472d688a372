"""``diffgrm stress``: how decoding and training cost grow, and where they break, on a Ray cluster.

A grid (``configs/stress.yaml``) is a list of sweeps. Each sweep fixes a base point and
names the axes it varies (their cartesian product):

- ``decode`` points time CPD or AR beam search on a random model and a random catalogue:
  users/s, latency per decoder pass, peak memory, distinct codes per user.
- ``train`` points time DeepSpeed training steps (the OCN objective) at a ZeRO stage and
  world size: samples/s, peak memory.
- ``largest`` sweeps search, for each combination of their axes, the largest value of one
  size axis (decoder layers, d_model) whose training steps fit the memory limit: doubling,
  then bisection.

Every point runs as its own Ray task with declared resources (CPUs, or one GPU per rank
where the cluster has GPUs), so a grid spreads over every node. Inside the task the point
runs in a child process watched for memory (its whole process tree's RSS) and time; a
point over a limit is killed and recorded as ``oom`` or ``timeout`` with the limit it hit,
and the sweep goes on. Output, published atomically into ``OUT`` with a manifest:
``stress.parquet`` (one row per point, with the node it ran on), ``plots/<sweep>.png`` and
``report.md`` (tables, and the fitted growth exponent of cost along each axis next to the
theory: CPD decoder work O(B * n^2 * d), AR with a KV cache O(B * n * d))."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffgrm_dist.core.config import section_hash
from diffgrm_dist.core.errors import ConfigError
from diffgrm_dist.stress.config import (
    DecodePoint,
    StressConfig,
    SweepConfig,
    TrainPoint,
    expand,
    flatten,
    method,
    resolved,
    with_value,
)
from diffgrm_dist.stress.point import point_task
from diffgrm_dist.stress.report import growth_fits, node_ids, report, write_plots

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the grid, in the driver


@dataclass
class _Search:
    """One combination of a ``largest`` sweep: grows the size axis until it fails, then
    bisects between the last fit and the first failure."""

    point: TrainPoint
    axis: str
    value: int
    maximum: int
    step: int = 1
    good: int = 0
    bad: int = 0

    def next_value(self) -> int | None:
        if self.bad == 0:
            return self.value if self.value <= self.maximum else None
        if self.bad - self.good <= self.step:
            return None
        mid = (self.good + self.bad) // 2
        return max(self.good + self.step, mid - mid % self.step)

    def record(self, value: int, fits: bool) -> None:
        if fits:
            self.good = max(self.good, value)
            if self.bad == 0:
                self.value = value * 2
        else:
            self.bad = value if self.bad == 0 else min(self.bad, value)


def run_stress(cfg: StressConfig, out: Path) -> dict[str, Any]:
    """Runs the grid on the Ray cluster (local when none is named); publishes OUT."""
    import ray

    from diffgrm_dist.cluster.raycluster import check_resources, ray_session

    out = Path(out)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with ray_session(cfg.local_cpus or None) as resources:
        use_gpu = cfg.limits.gpus == "auto" and resources.gpus > 0
        remote = ray.remote(max_retries=0)(point_task)
        pending: dict[Any, tuple[SweepConfig, dict[str, Any], _Search | None]] = {}

        def submit(sweep: SweepConfig, point: DecodePoint | TrainPoint, search: _Search | None = None) -> None:
            point = resolved(point)
            kind = "decode" if isinstance(point, DecodePoint) else "train"
            ranks = point.world_size if kind == "train" else 1
            options = ({"num_gpus": ranks, "num_cpus": ranks} if use_gpu
                       else {"num_cpus": ranks * cfg.limits.cpus_per_rank})
            check_resources(resources, 1, options["num_cpus"], options.get("num_gpus", 0),
                            f"stress point {sweep.name} {_varied(sweep, point)}")
            spec = {"kind": kind, "point": dataclasses.asdict(point), "users": cfg.users, "history": cfg.history,
                    "steps": cfg.train_steps, "seed": cfg.seed, "threads": 0 if use_gpu else cfg.limits.cpus_per_rank}
            ref = remote.options(**options).remote(spec, sweep.timeout_s or cfg.limits.timeout_s,
                                                   sweep.memory_gib or cfg.limits.memory_gib)
            pending[ref] = (sweep, {"sweep": sweep.name, "kind": sweep.kind, "method": method(point),
                                    "varied": json.dumps(_varied(sweep, point)), **flatten(point),
                                    "resources": json.dumps(options)}, search)

        for sweep in cfg.sweeps:
            for point in expand(sweep):
                if sweep.kind == "largest":
                    search = _Search(point, sweep.search, sweep.search_start, sweep.search_max,
                                     max(1, sweep.search_step))
                    submit(sweep, with_value(point, sweep.search, search.value), search)
                else:
                    submit(sweep, point)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            sweep, row, search = pending.pop(ref)
            row.update(_result(ref))
            rows.append(row)
            _log_row(row)
            if search is not None:
                search.record(row[search.axis], row["status"] == "ok")
                value = search.next_value()
                if value is not None:
                    submit(sweep, with_value(search.point, search.axis, value), search)
    return publish(cfg, _table(rows), out, time.perf_counter() - start)


def _table(rows: list[dict[str, Any]]):
    """The points' rows as one table, with CPU cost per unit, sorted by sweep and main axes."""
    import pandas as pd

    table = pd.DataFrame(rows)
    if "timed_users" in table:
        table["cpu_ms_per_user"] = 1000 * table["cpu_s"] / table["timed_users"]
    if "timed_samples" in table:
        table["cpu_ms_per_sample"] = 1000 * table["cpu_s"] / table["timed_samples"]
    order = ("method", "sids.digits", "eval.beam_size", "items", "model.d_model", "model.decoder_layers",
             "train.zero_stage", "world_size", "train.offload_optimizer", "train.zero_bucket_elements",
             "eval.fill_digits", "eval.autocast_bf16", "train.bf16")
    return table.sort_values(["sweep", *[c for c in order if c in table]], kind="stable").reset_index(drop=True)


def _result(ref) -> dict[str, Any]:
    """A point's record; a point whose task Ray itself killed (its memory monitor acts when
    the node passes RAY_memory_usage_threshold, before a limit near the node's size) is
    recorded as such, and the sweep goes on."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.OutOfMemoryError as err:
        # Ray names the node it killed on and how full it was: "... (IP: .., ID: <hex>) was 22.4GB used / 23.5GB limit"
        text = str(err)
        node = re.search(r"ID: ([0-9a-f]+)\)", text)
        used = re.search(r"was ([\d.]+\s*\w+ used / [\d.]+\s*\w+ limit)", text)
        node_id = node.group(1) if node else ""
        hosts = {n["NodeID"]: n["NodeManagerHostname"] for n in ray.nodes()}
        return {"status": "oom", "limit": "Ray's memory monitor (node memory over RAY_memory_usage_threshold"
                + (f": {used.group(1)})" if used else ")"),
                "node_id": node_id, "hostname": hosts.get(node_id, ""), "wall_s": math.nan, "peak_mem_mib": math.nan}
    except ray.exceptions.RayError as err:
        return {"status": "error", "limit": str(err).strip().splitlines()[0][-300:], "node_id": "", "hostname": "",
                "wall_s": math.nan, "peak_mem_mib": math.nan}


def _varied(sweep: SweepConfig, point: DecodePoint | TrainPoint) -> dict[str, Any]:
    """The point's values of the axes its sweep varies (and searches)."""
    flat = flatten(point)
    names = [*sweep.vary, *([sweep.search] if sweep.kind == "largest" else [])]
    return {name: flat[name] for name in names}


def _log_row(row: dict[str, Any]) -> None:
    axes = json.loads(row["varied"])
    what = (f"{row['users_per_s']:.1f} users/s" if "users_per_s" in row and row["status"] == "ok" else
            f"{row['samples_per_s']:.1f} samples/s" if "samples_per_s" in row and row["status"] == "ok" else
            f"{row['status']}: {row['limit']}")
    log.info("stress %s %s: %s, peak %.0f MiB, %.1f s", row["sweep"], axes, what, row["peak_mem_mib"], row["wall_s"])


def _commit() -> str:
    """The git commit of the package that ran the grid ("" outside a checkout)."""
    done = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def merge_outputs(outputs: list[Path], out: Path, name: str = "merged") -> dict[str, Any]:
    """One report over several ``diffgrm stress`` outputs (e.g. the full sweeps, run one
    config at a time): their tables and sweeps side by side, published as one output."""
    import pandas as pd

    from diffgrm_dist.core.config import build_typed

    tables, sweeps, wall = [], [], 0.0
    first: StressConfig | None = None
    for path in outputs:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        cfg = build_typed(StressConfig, manifest["config"], origin=str(Path(path) / "manifest.json"))
        first = first or cfg
        clash = {s.name for s in cfg.sweeps} & {s.name for s in sweeps}
        if clash:
            raise ConfigError(f"{path}: sweep names {sorted(clash)} also occur in an earlier output")
        sweeps += cfg.sweeps
        tables.append(pd.read_parquet(Path(path) / "stress.parquet"))
        wall += manifest["stats"]["wall_s"]
    merged = dataclasses.replace(first, name=name, sweeps=sweeps)
    return publish(merged, pd.concat(tables, ignore_index=True), Path(out), wall)


def publish(cfg: StressConfig, table, out: Path, wall_s: float) -> dict[str, Any]:
    """stress.parquet, plots and report.md into a temp folder beside OUT, then renamed."""
    from diffgrm_dist.core.rundir import package_versions, replace_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        table.to_parquet(tmp / "stress.parquet", index=False)
        fits = growth_fits(cfg, table)
        plots = write_plots(cfg, table, tmp / "plots")
        (tmp / "report.md").write_text(report(cfg, table, fits, plots, wall_s))
        stats = {"points": len(table), "ok": int((table["status"] == "ok").sum()),
                 "oom": int((table["status"] == "oom").sum()), "timeout": int((table["status"] == "timeout").sum()),
                 "error": int((table["status"] == "error").sum()), "nodes": len(node_ids(table)),
                 "wall_s": round(wall_s, 1)}
        manifest = {"stage": "stress", "config_hash": section_hash(cfg), "stats": stats, "fits": fits,
                    "config": dataclasses.asdict(cfg), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "host": platform.node(), "packages": package_versions(), "commit": _commit(),
                    "outputs": sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats
