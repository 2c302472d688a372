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
theory: CPD decoder work O(B * n^2 * d), AR with a KV cache O(B * n * d)).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffgrm_dist.config import apply_override, load_typed, section_hash
from diffgrm_dist.errors import ConfigError

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- a point, in its child


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(point: DecodePoint | TrainPoint, history: int):
    from diffgrm_dist.config import ModelConfig
    from diffgrm_dist.model import DiffGRM, SidSpec

    decoder = "autoregressive" if point.decoder.startswith("autoregressive") else "diffusion"
    cfg = ModelConfig(decoder=decoder, d_model=point.d_model, heads=heads_for(point.d_model),
                      ffn=4 * point.d_model, encoder_layers=1, decoder_layers=point.decoder_layers, dropout=0.0)
    return cfg, DiffGRM(cfg, SidSpec((point.codebook_size,) * point.digits, history))


def measure_decode(point: DecodePoint, users: int, history: int, seed: int, threads: int) -> dict[str, Any]:
    """Users/s of beam search on a random model and catalogue (decoding cost does not
    depend on the weights), after one warm-up batch."""
    import torch

    from diffgrm_dist.catalogue import build_catalogue
    from diffgrm_dist.decode import ar_beam_search, cpd, distinct_sids

    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, point.codebook_size, (point.items, point.digits), dtype=np.int64)
    start = time.perf_counter()
    catalogue = build_catalogue(codes, (point.codebook_size,) * point.digits)
    index_s = time.perf_counter() - start
    _, model = _model(point, history)
    model = model.eval().to(device)
    histories = torch.from_numpy(codes[rng.integers(0, point.items, (users + point.users_per_batch, history))])
    mask = torch.ones(histories.shape[:2], dtype=torch.bool)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=point.dtype == "bfloat16")

    def batch(lo: int, hi: int) -> float:
        with torch.no_grad(), autocast:
            memory = model.encode(histories[lo:hi].to(device), mask[lo:hi].to(device))
            if point.decoder == "diffusion":
                beams = cpd(model, memory, catalogue, point.beam, fill_digits=point.fill_digits)
            else:
                beams = ar_beam_search(model, memory, catalogue, point.beam,
                                       kv_cache=point.decoder == "autoregressive")
        groups, _ = distinct_sids(beams, point.beam)
        return float((groups >= 0).sum(1).mean())

    batch(users, users + point.users_per_batch)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, start_cpu = time.perf_counter(), time.process_time()
    distinct = [batch(lo, min(lo + point.users_per_batch, users)) for lo in range(0, users, point.users_per_batch)]
    if device == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    passes = math.ceil(point.digits / point.fill_digits) if point.decoder == "diffusion" else point.digits
    batches = math.ceil(users / point.users_per_batch)
    return {"users_per_s": users / seconds, "seconds": seconds, "cpu_s": cpu_s, "timed_users": users,
            "decoder_passes": passes,
            "pass_latency_ms": 1000 * seconds / (batches * passes),
            "distinct_codes_per_user": float(np.mean(distinct)), "index_build_s": index_s,
            "index_mib": catalogue.nbytes / 2 ** 20, "parameters": model.num_parameters(),
            "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else 0.0,
            "device": device}


def measure_train(point: TrainPoint, steps: int, history: int, seed: int, threads: int) -> dict[str, Any]:
    """Samples/s of DeepSpeed training steps, one process per rank (spawned here)."""
    import torch.multiprocessing as mp

    from diffgrm_dist.raycluster import free_port

    result = Path(tempfile.gettempdir()) / f"diffgrm-stress-{uuid.uuid4().hex[:8]}.json"
    try:
        mp.spawn(_train_rank, args=(point, steps, history, seed, threads, free_port(), str(result)),
                 nprocs=point.world_size, join=True)
        return json.loads(result.read_text())
    finally:
        result.unlink(missing_ok=True)


def _train_rank(rank: int, point: TrainPoint, steps: int, history: int, seed: int, threads: int,
                port: int, result: str) -> None:
    import torch
    import torch.distributed as dist

    from diffgrm_dist.config import ExperimentConfig, TrainConfig
    from diffgrm_dist.model import SidSpec
    from diffgrm_dist.train import build_engine, use_device

    gpu = torch.cuda.is_available()
    if threads:
        torch.set_num_threads(threads)
    if not gpu:  # gloo needs no shared-memory op: skip DeepSpeed's 40 s compile of it
        use_device(torch.device("cpu"))
    import deepspeed

    from diffgrm_dist.raycluster import quiet_library_logs

    quiet_library_logs()
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(point.world_size)})
    if gpu:
        torch.cuda.set_device(rank)
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", auto_mpi_discovery=False, verbose=False,
                               init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=point.world_size)
    model_cfg, _ = _model(point, 1)  # sizes only; build_engine makes the model
    cfg = ExperimentConfig(seed=seed, model=model_cfg, train=TrainConfig(
        batch_size=point.batch_size, zero_stage=point.zero_stage, offload_optimizer=point.offload,
        zero_bucket_elements=point.zero_bucket_elements,
        bf16=point.dtype == "bfloat16", warmup_steps=1, lr=1e-3))
    spec = SidSpec((point.codebook_size,) * point.digits, history)
    torch.manual_seed(seed)
    engine, model, _ = build_engine(cfg, spec, point.world_size, steps + 1)
    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    micro = point.batch_size // point.world_size
    g = torch.Generator().manual_seed(seed + rank)
    history_codes = torch.randint(0, point.codebook_size, (micro, history, point.digits), generator=g).to(device)
    mask = torch.ones(micro, history, dtype=torch.bool, device=device)
    targets = torch.randint(0, point.codebook_size, (micro, point.digits), generator=g).to(device)

    def step() -> float:
        loss = engine(history_codes, mask, targets)
        engine.backward(loss)
        engine.step()
        return float(loss)

    step()  # warm-up
    if gpu:
        torch.cuda.synchronize()
    dist.barrier()
    start, start_cpu = time.perf_counter(), time.process_time()
    losses = [step() for _ in range(steps)]
    if gpu:
        torch.cuda.synchronize()
    cpu_all = torch.tensor([time.process_time() - start_cpu], dtype=torch.float64, device=device)
    dist.all_reduce(cpu_all)  # CPU seconds of all ranks
    seconds = time.perf_counter() - start
    if rank == 0:
        Path(result).write_text(json.dumps({
            "samples_per_s": point.batch_size * steps / seconds, "seconds": seconds,
            "timed_samples": point.batch_size * steps,
            "step_ms": 1000 * seconds / steps, "cpu_s": float(cpu_all.item()), "loss": losses[-1], "parameters": _numel(model),
            "decoder_parameters": _numel(model.decoder),
            "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2 ** 20 if gpu else 0.0,
            "device": str(device)}))
    dist.destroy_process_group()


def _numel(module) -> int:
    """Parameters of a module, also when ZeRO-3 has partitioned them away from this rank."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def point_main(payload: str) -> None:
    """Child entry: ``python -m diffgrm_dist.stress --point JSON``; prints one JSON line."""
    spec = json.loads(payload)
    kind, values = spec["kind"], spec["point"]
    if kind == "decode":
        out = measure_decode(DecodePoint(**values), spec["users"], spec["history"], spec["seed"], spec["threads"])
    else:
        out = measure_train(TrainPoint(**values), spec["steps"], spec["history"], spec["seed"], spec["threads"])
    out["child_peak_rss_mib"] = _peak_rss_mib()
    print("STRESS-RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- a point, in its task


def run_point_watched(spec: dict[str, Any], timeout_s: float, memory_gib: float) -> dict[str, Any]:
    """Runs one point in a child process tree; kills it at the memory or time limit.
    Returns status (ok | oom | timeout | error), the limit hit, the peak tree RSS and the
    child's measurements."""
    import psutil

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    peak, status, limit = 0.0, "ok", ""
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen([sys.executable, "-m", "diffgrm_dist.stress", "--point", json.dumps(spec)],
                                 stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        proc = psutil.Process(child.pid)
        while child.poll() is None:
            try:
                tree = [proc, *proc.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in tree if p.is_running()) / 2 ** 20
            except psutil.Error:
                rss = 0.0
            peak = max(peak, rss)
            if rss > memory_gib * 1024:
                status, limit = "oom", f"memory_gib={memory_gib:g} (process tree RSS {rss / 1024:.1f} GiB)"
            elif time.perf_counter() - start > timeout_s:
                status, limit = "timeout", f"timeout_s={timeout_s:g}"
            if status != "ok":
                _kill_tree(proc)
                break
            time.sleep(0.05)
        child.wait()
        out.seek(0)
        text = out.read()
    measured: dict[str, Any] = {}
    lines = [line for line in text.splitlines() if line.startswith("STRESS-RESULT ")]
    if status == "ok" and lines:
        measured = json.loads(lines[-1][len("STRESS-RESULT "):])
    elif status == "ok":
        tail = [line for line in text.splitlines() if line.strip()][-1:] or [f"exit {child.returncode}"]
        if "OutOfMemoryError" in text or "MemoryError" in text or child.returncode in (-9, 137):
            status, limit = "oom", "device or host memory (the point's own allocation failed)"
        else:
            status, limit = "error", tail[0][-300:]
    return {"status": status, "limit": limit, "wall_s": time.perf_counter() - start,
            "peak_mem_mib": max(peak, measured.get("child_peak_rss_mib", 0.0)), **measured}


def _kill_tree(proc) -> None:
    import psutil

    procs = [proc]
    try:
        procs += proc.children(recursive=True)
    except psutil.Error:
        pass
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def _task(spec: dict[str, Any], timeout_s: float, memory_gib: float) -> dict[str, Any]:
    """Body of the Ray task of one point: where it ran, and what it measured."""
    import ray

    record = run_point_watched(spec, timeout_s, memory_gib)
    record.update({"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()})
    return record


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
    import pandas as pd
    import ray

    from diffgrm_dist.raycluster import check_resources, ray_session

    out = Path(out)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with ray_session(cfg.local_cpus or None) as resources:
        use_gpu = cfg.limits.gpus == "auto" and resources.gpus > 0
        remote = ray.remote(max_retries=0)(_task)
        pending: dict[Any, tuple[SweepConfig, dict[str, Any], _Search | None]] = {}

        def submit(sweep: SweepConfig, point: DecodePoint | TrainPoint, search: _Search | None = None) -> None:
            kind = "decode" if isinstance(point, DecodePoint) else "train"
            ranks = point.world_size if kind == "train" else 1
            options = ({"num_gpus": ranks, "num_cpus": ranks} if use_gpu
                       else {"num_cpus": ranks * cfg.limits.cpus_per_rank})
            check_resources(resources, 1, options["num_cpus"], options.get("num_gpus", 0),
                            f"stress point {sweep.name} {dataclasses.asdict(point)}")
            spec = {"kind": kind, "point": dataclasses.asdict(point), "users": cfg.users, "history": cfg.history,
                    "steps": cfg.train_steps, "seed": cfg.seed, "threads": 0 if use_gpu else cfg.limits.cpus_per_rank}
            ref = remote.options(**options).remote(spec, sweep.timeout_s or cfg.limits.timeout_s,
                                                   sweep.memory_gib or cfg.limits.memory_gib)
            pending[ref] = (sweep, {"sweep": sweep.name, "kind": sweep.kind, **dataclasses.asdict(point),
                                    "resources": json.dumps(options)}, search)

        for sweep in cfg.sweeps:
            for point in expand(sweep):
                if sweep.kind == "largest":
                    search = _Search(point, sweep.search, sweep.search_start, sweep.search_max,
                                     max(1, sweep.search_step))
                    submit(sweep, dataclasses.replace(point, **{sweep.search: search.value}), search)
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
                    submit(sweep, dataclasses.replace(search.point, **{search.axis: value}), search)
    table = pd.DataFrame(rows)
    if "timed_users" in table:
        table["cpu_ms_per_user"] = 1000 * table["cpu_s"] / table["timed_users"]
    if "timed_samples" in table:
        table["cpu_ms_per_sample"] = 1000 * table["cpu_s"] / table["timed_samples"]
    order = ("decoder", "digits", "beam", "items", "d_model", "decoder_layers", "zero_stage", "world_size",
             "offload", "zero_bucket_elements", "fill_digits", "dtype")
    table = table.sort_values(["sweep", *[c for c in order if c in table]], kind="stable").reset_index(drop=True)
    stats = publish(cfg, table, out, time.perf_counter() - start)
    return stats


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


def _log_row(row: dict[str, Any]) -> None:
    names = ("decoder", "digits", "beam", "items", "d_model", "decoder_layers", "fill_digits", "zero_stage",
             "world_size", "offload", "zero_bucket_elements", "dtype")
    axes = {k: row[k] for k in names if k in row}
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

    from diffgrm_dist.config import build_typed

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
    from diffgrm_dist.rundir import package_versions, replace_dir

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
                 "error": int((table["status"] == "error").sum()), "nodes": len(_node_ids(table)),
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


# --------------------------------------------------------------------------- report

# Theory of decoding cost per user along each axis (exponent of the axis), as the paper
# states it (decoder work O(B * n^2 * d) for CPD, O(B * n * d) for AR with a KV cache);
# the d exponent counts attention work, the MLPs' FLOPs grow with d^2.
THEORY = {
    "diffusion": {"beam": 1.0, "digits": 2.0, "d_model": 1.0, "items": 0.0, "decoder_layers": 1.0},
    "autoregressive": {"beam": 1.0, "digits": 1.0, "d_model": 1.0, "items": 0.0, "decoder_layers": 1.0},
    "autoregressive_nocache": {"beam": 1.0, "digits": 2.0, "d_model": 1.0, "items": 0.0, "decoder_layers": 1.0},
}
# Training cost per sample: FLOPs grow with d^2 and with layers; ranks split the samples
# (ideal data parallelism: cost per sample of the whole job falls as 1/world, exponent 0 in
# CPU seconds per sample, since every rank's CPU time is counted).
TRAIN_THEORY = {"d_model": 2.0, "decoder_layers": 1.0, "digits": 1.0, "batch_size": 0.0, "world_size": 0.0}
NUMERIC_AXES = ("beam", "digits", "items", "d_model", "decoder_layers", "users_per_batch", "codebook_size",
                "batch_size", "world_size", "fill_digits")


def _cost(row) -> float:
    """What the exponents are fitted to: CPU seconds per user (decode) or per sample (train)
    for points that ran on CPU (robust to other load on a shared machine: time spent waiting
    for a core is not counted), wall seconds on GPU."""
    units = row["timed_users"] if row["kind"] == "decode" else row["timed_samples"]
    if str(row.get("device", "cpu")).startswith("cpu") and row.get("cpu_s", 0) > 0:
        return row["cpu_s"] / units
    return row["seconds"] / units


def growth_fits(cfg: StressConfig, table) -> list[dict[str, Any]]:
    """For every sweep, varied numeric axis and group of the other varied axes: the slope
    of log(cost) against log(axis) over the points that ran (least squares)."""
    fits = []
    ok = table[table["status"] == "ok"]
    for sweep in cfg.sweeps:
        if sweep.kind == "largest":
            continue
        rows = ok[ok["sweep"] == sweep.name]
        for axis in (a for a in sweep.vary if a in NUMERIC_AXES and len(sweep.vary[a]) > 1):
            others = [a for a in sweep.vary if a != axis]
            groups = rows.groupby(others, dropna=False) if others else [((), rows)]
            for key, group in groups:
                group = group.sort_values(axis)
                if group[axis].nunique() < 2:
                    continue
                x = np.log(group[axis].to_numpy(dtype=float))
                y = np.log([_cost(r) for _, r in group.iterrows()])
                slope = float(np.polyfit(x, y, 1)[0])
                key = key if isinstance(key, tuple) else (key,)
                decoder = dict(zip(others, key)).get("decoder", group["decoder"].iloc[0])
                theory = (THEORY.get(decoder, {}).get(axis) if sweep.kind == "decode"
                          else TRAIN_THEORY.get(axis))
                fits.append({"sweep": sweep.name, "axis": axis, "group": dict(zip(others, map(_plain, key))),
                             "exponent": round(slope, 3), "theory": theory, "points": int(len(group)),
                             "range": [_plain(group[axis].min()), _plain(group[axis].max())]})
    return fits


def _plain(value: Any) -> Any:
    """numpy scalars as Python ones; whole floats (ints that met a NaN in the table) as ints."""
    value = value.item() if hasattr(value, "item") else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def write_plots(cfg: StressConfig, table, folder: Path) -> list[str]:
    """One PNG per sweep: cost (and peak memory) against its first numeric axis, a line per
    combination of the other axes; failed points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for sweep in cfg.sweeps:
        rows = table[table["sweep"] == sweep.name]
        numeric = [a for a in sweep.vary if a in NUMERIC_AXES and len(sweep.vary[a]) > 1]
        if sweep.kind == "largest":
            numeric = [sweep.search]
        if rows.empty or not sweep.vary and not numeric:
            continue
        if not numeric:  # categorical axes only (ZeRO stage, dtype, decoder): bars
            written.append(_bar_plot(sweep, rows, folder))
            continue
        axis = numeric[0]
        others = [a for a in sweep.vary if a != axis]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        groups = rows.groupby(others, dropna=False) if others else [((), rows)]
        metric = "users_per_s" if sweep.kind == "decode" else "samples_per_s"
        for key, group in groups:
            key = key if isinstance(key, tuple) else (key,)
            label = ", ".join(f"{a}={_plain(v)}" for a, v in zip(others, key)) or sweep.name
            group = group.sort_values(axis)
            good = group[group["status"] == "ok"]
            if metric in good:
                left.plot(good[axis], good[metric], marker="o", label=label)
            right.plot(group[axis], group["peak_mem_mib"] / 1024, marker="o", label=label)
            bad = group[group["status"] != "ok"]
            right.scatter(bad[axis], bad["peak_mem_mib"] / 1024, marker="x", color="red", zorder=3)
        left.set(xscale="log", yscale="log", xlabel=axis, ylabel=metric.replace("_", " "), title=sweep.name)
        right.set(xscale="log", xlabel=axis, ylabel="peak memory GiB (x: over a limit)", title=f"{sweep.name}: memory")
        for ax in (left, right):
            if ax.lines:
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"{sweep.name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(f"plots/{path.name}")
    return written


def _bar_plot(sweep: SweepConfig, rows, folder: Path) -> str:
    import matplotlib.pyplot as plt

    metric = "users_per_s" if sweep.kind == "decode" else "samples_per_s"
    labels = [", ".join(f"{a}={_plain(r[a])}" for a in sweep.vary) for _, r in rows.iterrows()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    values = [float(r[metric]) if r["status"] == "ok" else 0.0 for _, r in rows.iterrows()]
    left.bar(range(len(rows)), values, color=["tab:blue" if r["status"] == "ok" else "tab:red"
                                              for _, r in rows.iterrows()])
    right.bar(range(len(rows)), rows["peak_mem_mib"] / 1024, color="tab:gray")
    for ax, title in ((left, metric.replace("_", " ")), (right, "peak memory GiB")):
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
        ax.set(title=f"{sweep.name}: {title}")
    fig.tight_layout()
    path = folder / f"{sweep.name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plots/{path.name}"


def largest_table(cfg: StressConfig, table) -> list[dict[str, Any]]:
    """For each combination of each ``largest`` sweep: the largest size that fit, its
    parameters, and the first size that did not (with the limit it hit)."""
    found = []
    for sweep in (s for s in cfg.sweeps if s.kind == "largest"):
        rows = table[table["sweep"] == sweep.name]
        others = list(sweep.vary)
        groups = rows.groupby(others, dropna=False) if others else [((), rows)]
        for key, group in groups:
            key = key if isinstance(key, tuple) else (key,)
            good, bad = group[group["status"] == "ok"], group[group["status"] != "ok"]
            best = good.loc[good[sweep.search].idxmax()] if len(good) else None
            first_bad = bad.loc[bad[sweep.search].idxmin()] if len(bad) else None
            found.append({"sweep": sweep.name, **dict(zip(others, map(_plain, key))), "axis": sweep.search,
                          "largest": None if best is None else _plain(best[sweep.search]),
                          "parameters": None if best is None else _plain(best.get("parameters")),
                          "decoder_parameters": None if best is None else _plain(best.get("decoder_parameters")),
                          "peak_mem_gib": None if best is None else round(best["peak_mem_mib"] / 1024, 2),
                          "samples_per_s": None if best is None else round(float(best["samples_per_s"]), 1),
                          "first_failure": None if first_bad is None else _plain(first_bad[sweep.search]),
                          "failure": None if first_bad is None else f"{first_bad['status']}: {first_bad['limit']}",
                          "probes": int(len(group))})
    return found


def _node_ids(table) -> list[str]:
    """The Ray nodes the points ran on; "" is a point Ray failed before it named a node."""
    return sorted(set(table["node_id"]) - {""})


def report(cfg: StressConfig, table, fits: list[dict[str, Any]], plots: list[str], wall_s: float) -> str:
    nodes = _node_ids(table)
    lines = [f"# Stress report: {cfg.name}", "",
             f"{len(table)} points on {len(nodes)} Ray node id(s) (a node's id is new in every Ray session) "
             f"in {wall_s / 60:.1f} min; "
             f"{int((table['status'] == 'ok').sum())} ran, "
             f"{int((table['status'] == 'oom').sum())} over the memory limit, "
             f"{int((table['status'] == 'timeout').sum())} over the time limit, "
             f"{int((table['status'] == 'error').sum())} failed otherwise. Limits per point: "
             f"{cfg.limits.memory_gib:g} GiB (process tree RSS), {cfg.limits.timeout_s:g} s, unless a sweep sets its own. "
             f"Decode points time {cfg.users} users after a warm-up batch, {cfg.history} history slots; "
             f"train points time {cfg.train_steps} steps after a warm-up step. Random weights and codes: "
             "cost does not depend on them.", ""]
    if fits:
        lines += ["## Growth exponents", "",
                  "Slope of log(cost) against log(axis), cost = CPU seconds (all threads and ranks; wall seconds "
                  "on GPU) per user (decode) or per sample (train): waiting for a core on a shared machine is not "
                  "counted. "
                  "Theory (decode, per user): CPD decoder work O(B * n^2 * d), AR with a KV cache O(B * n * d), "
                  "AR re-running its prefix O(B * n^2 * d); catalogue size 0 (O(1) look-ups). The d exponent "
                  "counts attention work; the MLP FLOPs grow with d^2, so expect 1-2 there.", "",
                  "| sweep | axis | other axes | range | points | exponent | theory |", "|---|---|---|---|---|---|---|"]
        for f in fits:
            other = ", ".join(f"{k}={v}" for k, v in f["group"].items()) or "-"
            theory = "-" if f["theory"] is None else f"{f['theory']:g}"
            lines.append(f"| {f['sweep']} | {f['axis']} | {other} | {f['range'][0]}-{f['range'][1]} | "
                         f"{f['points']} | {f['exponent']:.2f} | {theory} |")
        lines.append("")
    largest = largest_table(cfg, table)
    if largest:
        lines += ["## Largest model that trains within the memory limit", "",
                  "| sweep | setting | axis | largest | parameters | decoder params | peak GiB | samples/s | "
                  "first failure | failure | probes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in largest:
            setting = ", ".join(f"{k}={r[k]}" for k in r if k not in (
                "sweep", "axis", "largest", "parameters", "decoder_parameters", "peak_mem_gib", "samples_per_s",
                "first_failure", "failure", "probes"))
            lines.append(f"| {r['sweep']} | {setting or '-'} | {r['axis']} | {r['largest']} | "
                         f"{_num(r['parameters'])} | {_num(r['decoder_parameters'])} | {r['peak_mem_gib']} | "
                         f"{r['samples_per_s']} | {r['first_failure']} | {r['failure']} | {r['probes']} |")
        lines.append("")
    for sweep in cfg.sweeps:
        rows = table[table["sweep"] == sweep.name]
        if rows.empty:
            continue
        varied = list(sweep.vary) + ([sweep.search] if sweep.kind == "largest" else [])
        metrics = (["users_per_s", "cpu_ms_per_user", "pass_latency_ms", "distinct_codes_per_user", "index_mib"]
                   if sweep.kind == "decode" else ["samples_per_s", "cpu_ms_per_sample", "step_ms", "parameters"])
        lines += [f"## {sweep.name} ({sweep.kind})", "",
                  "| " + " | ".join([*varied, *metrics, "peak MiB", "status", "node"]) + " |",
                  "|" + "---|" * (len(varied) + len(metrics) + 3)]
        for _, r in rows.iterrows():
            cells = [str(_plain(r[a])) for a in varied]
            cells += [_fmt(r.get(m)) if r["status"] == "ok" else "-" for m in metrics]
            status = r["status"] if r["status"] == "ok" else f"{r['status']} ({r['limit']})"
            cells += [f"{r['peak_mem_mib']:.0f}", status, str(r["node_id"])[:8]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()):
        return f"{int(value):,}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"


def _num(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{int(value):,}"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--point":
        # Through the package, so that spawned training ranks unpickle its classes by name.
        from diffgrm_dist.stress import point_main as package_point_main

        package_point_main(sys.argv[2])
    else:
        raise SystemExit("usage: python -m diffgrm_dist.stress --point JSON (children of diffgrm stress)")
