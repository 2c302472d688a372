"""One stress point: measured in a child process (decode or DeepSpeed training steps),
watched for memory and time by the Ray task that runs it; over a limit it is killed and
recorded with the limit it hit."""

from __future__ import annotations

import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from diffgrm_dist.core.timing import no_sync, time_calls
from diffgrm_dist.stress.config import DecodePoint, TrainPoint, heads_for

# --------------------------------------------------------------------------- a point, in its child


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(point: DecodePoint | TrainPoint, history: int):
    from diffgrm_dist.core.config import ModelConfig
    from diffgrm_dist.model.network import DiffGRM, SidSpec

    decoder = "autoregressive" if point.decoder.startswith("autoregressive") else "diffusion"
    cfg = ModelConfig(decoder=decoder, d_model=point.d_model, heads=heads_for(point.d_model),
                      ffn=4 * point.d_model, encoder_layers=1, decoder_layers=point.decoder_layers, dropout=0.0)
    return cfg, DiffGRM(cfg, SidSpec((point.codebook_size,) * point.digits, history))


def measure_decode(point: DecodePoint, users: int, history: int, seed: int, threads: int) -> dict[str, Any]:
    """Users/s of beam search on a random model and catalogue (decoding cost does not
    depend on the weights), after one warm-up batch."""
    import torch

    from diffgrm_dist.decode.catalogue import build_catalogue
    from diffgrm_dist.decode.search import ar_beam_search, cpd, distinct_sids

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

    sync = torch.cuda.synchronize if device == "cuda" else no_sync
    calls = [lambda: batch(users, users + point.users_per_batch)]  # warm-up, on users not timed
    if device == "cuda":
        calls.append(torch.cuda.reset_peak_memory_stats)
    warmup = len(calls)
    calls += [lambda lo=lo: batch(lo, min(lo + point.users_per_batch, users))
              for lo in range(0, users, point.users_per_batch)]
    timed = time_calls(calls, warmup, sync)
    seconds, cpu_s, distinct = timed.seconds, timed.cpu_seconds, timed.timed_results
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

    from diffgrm_dist.cluster.raycluster import free_port

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

    from diffgrm_dist.core.config import ExperimentConfig, TrainConfig
    from diffgrm_dist.model.network import SidSpec
    from diffgrm_dist.train.engine import build_engine, use_device

    gpu = torch.cuda.is_available()
    if threads:
        torch.set_num_threads(threads)
    if not gpu:  # gloo needs no shared-memory op: skip DeepSpeed's 40 s compile of it
        use_device(torch.device("cpu"))
    import deepspeed

    from diffgrm_dist.cluster.raycluster import quiet_library_logs

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
    dist.barrier()
    timed = time_calls([step] * steps, warmup=0, sync=torch.cuda.synchronize if gpu else no_sync)
    losses, seconds = timed.results, timed.seconds
    cpu_all = torch.tensor([timed.cpu_seconds], dtype=torch.float64, device=device)
    dist.all_reduce(cpu_all)  # CPU seconds of all ranks
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
    """Child entry: ``python -m diffgrm_dist.stress.point --point JSON``; prints one JSON line."""
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
        child = subprocess.Popen([sys.executable, "-m", "diffgrm_dist.stress.point", "--point", json.dumps(spec)],
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


def point_task(spec: dict[str, Any], timeout_s: float, memory_gib: float) -> dict[str, Any]:
    """Body of the Ray task of one point: where it ran, and what it measured."""
    import ray

    record = run_point_watched(spec, timeout_s, memory_gib)
    record.update({"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()})
    return record

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--point":
        # Through the package, so that spawned training ranks unpickle its classes by name.
        from diffgrm_dist.stress.point import point_main as package_point_main

        package_point_main(sys.argv[2])
    else:
        raise SystemExit("usage: python -m diffgrm_dist.stress.point --point JSON (children of diffgrm stress)")
