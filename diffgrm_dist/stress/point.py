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
from diffgrm_dist.stress.config import DecodePoint, TrainPoint

# --------------------------------------------------------------------------- a point, in its child


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(point: DecodePoint | TrainPoint, history: int):
    from diffgrm_dist.model.network import DiffGRM, SidSpec

    sids = point.sids
    return DiffGRM(point.model, SidSpec((sids.codebook_size,) * sids.digits, history))


def measure_decode(point: DecodePoint, users: int, history: int, seed: int, threads: int) -> dict[str, Any]:
    """Users/s of beam search on a random model and catalogue (decoding cost does not
    depend on the weights), after one warm-up batch."""
    import torch

    from diffgrm_dist.decode.catalogue import build_catalogue
    from diffgrm_dist.decode.search import SearchOptions, decode_beams, distinct_sids

    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    digits, codebook, ev = point.sids.digits, point.sids.codebook_size, point.eval
    per_batch, decoder = ev.batch_size, point.model.decoder
    options = SearchOptions(ev.beam_size, decoder, ev.final_step, None, ev.fill_digits, ev.cpd_prune,
                            ev.merge_states, point.kv_cache)
    codes = rng.integers(0, codebook, (point.items, digits), dtype=np.int64)
    start = time.perf_counter()
    catalogue = build_catalogue(codes, (codebook,) * digits)
    index_s = time.perf_counter() - start
    model = _model(point, history).eval().to(device)
    histories = torch.from_numpy(codes[rng.integers(0, point.items, (users + per_batch, history))])
    mask = torch.ones(histories.shape[:2], dtype=torch.bool)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=ev.autocast_bf16)

    def batch(lo: int, hi: int) -> float:
        with torch.no_grad(), autocast:
            beams = decode_beams(model, histories[lo:hi].to(device), mask[lo:hi].to(device), catalogue, options)
        groups, _ = distinct_sids(beams, ev.beam_size)
        return float((groups >= 0).sum(1).mean())

    sync = torch.cuda.synchronize if device == "cuda" else no_sync
    calls = [lambda: batch(users, users + per_batch)]  # warm-up, on users not timed
    if device == "cuda":
        calls.append(torch.cuda.reset_peak_memory_stats)
    warmup = len(calls)
    calls += [lambda lo=lo: batch(lo, min(lo + per_batch, users)) for lo in range(0, users, per_batch)]
    timed = time_calls(calls, warmup, sync)
    seconds, cpu_s, distinct = timed.seconds, timed.cpu_seconds, timed.timed_results
    passes = math.ceil(digits / ev.fill_digits) if decoder == "diffusion" else digits
    batches = math.ceil(users / per_batch)
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

    from diffgrm_dist.core.config import ExperimentConfig
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
    cfg = ExperimentConfig(seed=seed, model=point.model, train=point.train)
    codebook, digits = point.sids.codebook_size, point.sids.digits
    spec = SidSpec((codebook,) * digits, history)
    torch.manual_seed(seed)
    engine, model, _ = build_engine(cfg, spec, point.world_size, steps + 1)
    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    batch = point.train.batch_size
    micro = batch // point.world_size
    g = torch.Generator().manual_seed(seed + rank)
    history_codes = torch.randint(0, codebook, (micro, history, digits), generator=g).to(device)
    mask = torch.ones(micro, history, dtype=torch.bool, device=device)
    targets = torch.randint(0, codebook, (micro, digits), generator=g).to(device)

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
            "samples_per_s": batch * steps / seconds, "seconds": seconds, "timed_samples": batch * steps,
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
    from diffgrm_dist.core.config import build_typed

    spec = json.loads(payload)
    kind, values = spec["kind"], spec["point"]
    if kind == "decode":
        point = build_typed(DecodePoint, values, "stress point")
        out = measure_decode(point, spec["users"], spec["history"], spec["seed"], spec["threads"])
    else:
        point = build_typed(TrainPoint, values, "stress point")
        out = measure_train(point, spec["steps"], spec["history"], spec["seed"], spec["threads"])
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
