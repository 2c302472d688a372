#!/usr/bin/env python
"""One command for anyone with a GPU: train and evaluate on it, and write what it measured.

Two modes, because the first two stages need packages a bare GPU box may lack:

``stage``  makes the prepare and tokenize stages (sentence-transformers, faiss, Ray) of the
           tiny and the Beauty configs into ``--out DIR/<dataset>``; copy DIR to the GPU box.
``run``    copies each dataset's stages from ``--stages DIR`` into a work folder and runs
           shard, train and evaluate there, each stage by name with the ``diffgrm`` CLI (never
           ``pipeline``: its prepare record hashes the raw data files, which the GPU box does
           not hold, and the absolute ``data.path``, which differs in another checkout, so it
           would re-run prepare and fail). It needs only torch, deepspeed, webdataset,
           pyarrow, numpy, scipy, safetensors and pyyaml (no Ray, faiss, sentence-transformers,
           matplotlib or wandb), and is bounded by one global deadline (default 8 minutes):

  1. tiny train + evaluate on the device with the local launcher; then with the Ray launcher
     when ``import ray`` works;
  2. (without ``--tiny``) the paper-size Beauty model (5.6M parameters, batch 1024) for
     ``--epochs`` epochs as DiffGRM, AR and dense, three trainings at once on the one GPU
     (separate processes, one run directory each), validation on ``--valid-users`` sampled
     users, then the test split on all users at beam ``--beam``.

Results: ``--results DIR`` (default results/gpu) ``<dataset>.json`` and ``<dataset>.md``
(``<dataset>.cpu.*`` with ``--device cpu``). Exit status 1 if any check failed or timed out
(its log's tail is printed), 2 for bad arguments or missing stages.

  python tools/gpu_check.py stage --out runs/gpu-stages                 # where the full install is
  python tools/gpu_check.py run --stages runs/gpu-stages                # on the GPU box
  python tools/gpu_check.py run --stages runs/gpu-stages --device cpu --tiny   # CPU smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, device_string, git_info, write_json  # noqa: E402

if importlib.util.find_spec("diffgrm_dist") is None:  # a GPU box may run the checkout uninstalled
    sys.path.append(str(ROOT))
from diffgrm_dist.core.errors import DiffGRMError  # noqa: E402  (light: no third-party imports)

CONFIGS = {"tiny": ROOT / "configs" / "tiny.yaml", "beauty": ROOT / "configs" / "beauty.yaml"}
COPIED_STAGES = ("prepare", "tokenize")  # made by `stage`, copied by `run`
MODELS = {"DiffGRM": "diffusion", "AR": "autoregressive", "dense": "dense"}
TINY_OVERRIDES = ["train.epochs=2", "eval.beam_size=16", "train.wandb_mode=disabled"]
# The paper-size runs: the learning rate and warm-up of the reference measurement.
BEAUTY_OVERRIDES = ["train.launcher=local", "train.lr=3.0e-3", "train.warmup_steps=600",
                    "train.wandb_mode=disabled"]
GPU_OVERRIDES = ["train.use_gpu=true", "train.bf16=true", "train.autocast_bf16=true", "eval.autocast_bf16=true"]
CPU_OVERRIDES = ["train.use_gpu=false", "train.bf16=false", "train.autocast_bf16=false", "eval.autocast_bf16=false"]
TARGETS = {"train_samples_per_s": 50_000, "diffgrm_test_users_per_s": 3_000}  # one H200, Beauty
LOG_TAIL = 40
KILL_GRACE_S = 10.0


def log(message: str) -> None:
    """One line of progress, flushed (the tool's own log: one line per stage)."""
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- processes


class Deadline:
    """The global time limit every stage process runs under."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def diffgrm_command() -> list[str]:
    """The ``diffgrm`` console script beside this interpreter, else ``python -m diffgrm_dist.cli``."""
    script = Path(sys.executable).parent / "diffgrm"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "diffgrm_dist.cli"]


def child_env(hide_gpu: bool) -> dict[str, str]:
    """The stage processes' environment: offline, no DeepSpeed op builds, the checkout importable
    (a GPU box may not have it installed), and with ``hide_gpu`` no visible GPU."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("DS_BUILD_OPS", "0")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # without .pyc files every process re-parses torch
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(ROOT)) if p)
    if hide_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_logged(cmd: list[str], log_path: Path, env: dict[str, str], deadline: Deadline) -> int | None:
    """Runs ``cmd`` in its own process group, appending its output to ``log_path``; returns its
    exit code, or None when the deadline came first (the group is then terminated, then killed)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        if deadline.left() <= 0:
            out.write("not started: the deadline had passed\n")
            return None
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=max(deadline.left(), 0.1))
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            out.write(f"\nkilled: the global deadline ({deadline.seconds:.0f} s) passed\n")
            return None


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this tool started, then SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int = LOG_TAIL) -> str:
    """The last ``lines`` lines of a log ('' if it does not exist)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def copy_tree(src: Path, dst: Path, link: bool) -> None:
    """Copies a stage folder; ``link``: by hard links where the filesystem allows (stage
    folders are replaced whole, never written in place, so links are safe)."""
    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy if link else shutil.copy2)


def ray_importable(env: dict[str, str]) -> bool:
    """Whether ``import ray`` works in the stage processes' environment."""
    found = subprocess.run([sys.executable, "-c", "import ray"], env=env, cwd=ROOT, capture_output=True)
    return found.returncode == 0


# --------------------------------------------------------------------------- checks


@dataclass
class Check:
    """One train + evaluate run in its own run directory."""

    name: str  # e.g. "tiny/local", "beauty/DiffGRM"
    dataset: str
    run_dir: Path
    log_path: Path
    overrides: list[str]  # train and evaluate
    eval_overrides: list[str] = field(default_factory=list)  # evaluate only
    status: str = "pending"  # passed | failed | timed out | skipped
    reason: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)

    def fail(self, status: str, reason: str) -> None:
        self.status, self.reason = status, reason


def run_stage(check: Check, stage: str, overrides: list[str], env: dict[str, str], deadline: Deadline) -> bool:
    """One ``diffgrm STAGE`` of a check; records its time, or the failure, and logs one line."""
    cmd = [*diffgrm_command(), stage, "-c", str(CONFIGS[check.dataset]), "-o", str(check.run_dir), *overrides]
    start = time.perf_counter()
    code = run_logged(cmd, check.log_path, env, deadline)
    check.seconds[stage] = round(time.perf_counter() - start, 1)
    if code is None:
        check.fail("timed out", f"{stage} did not finish before the global deadline")
    elif code != 0:
        check.fail("failed", f"{stage} exited with code {code}")
    log(f"{check.name} {stage}: {'ok' if code == 0 else check.status} in {check.seconds[stage]:.1f} s")
    return code == 0


def run_chain(check: Check, env: dict[str, str], deadline: Deadline) -> None:
    """train, then evaluate, then read and check the numbers."""
    check.status = "running"
    if not run_stage(check, "train", check.overrides, env, deadline):
        return
    if not run_stage(check, "evaluate", [*check.overrides, *check.eval_overrides], env, deadline):
        return
    try:
        check.result = read_results(check.run_dir)
    except (OSError, KeyError, ValueError, StopIteration) as exc:
        check.fail("failed", f"could not read the run's results: {exc!r}")
        return
    bad = [k for k, v in flat_numbers(check.result).items() if not math.isfinite(v)]
    if bad:
        check.fail("failed", f"non-finite values: {', '.join(bad)}")
        return
    check.status = "passed"


@dataclass
class Base:
    """A dataset's copied stages plus its shard stage, which every check of it starts from."""

    dataset: str
    run_dir: Path
    log_path: Path
    ok: bool = False
    status: str = "failed"  # of the failure: failed | timed out
    reason: str = ""
    warnings: list[str] = field(default_factory=list)

    def fail_check(self, check: Check) -> None:
        """Marks a check that cannot run because its base failed (pointing at the base's log)."""
        check.fail(self.status, f"{self.dataset} base: {self.reason}")
        check.log_path = self.log_path


def prepare_base(dataset: str, stages: Path, work: Path, env: dict[str, str], deadline: Deadline,
                 log_dir: Path) -> Base:
    """``work/<dataset>/base``: the stages copied from ``stages/<dataset>`` and a shard stage
    made here (shard reads only the upstream manifests: prepare and tokenize are not re-run)."""
    source = stages / dataset
    base = Base(dataset, work / dataset / "base", log_dir / f"{dataset}.shard.log")
    missing = [s for s in COPIED_STAGES if not (source / s / "manifest.json").is_file()]
    if missing:
        base.reason = (f"{source}: no {', '.join(missing)} stage: make it with `python tools/gpu_check.py "
                       f"stage --out DIR --datasets {dataset}` and copy DIR/{dataset} here")
        log(f"{dataset}: {base.reason}")
        return base
    shutil.rmtree(work / dataset, ignore_errors=True)
    base.run_dir.mkdir(parents=True)
    for stage in COPIED_STAGES:
        copy_tree(source / stage, base.run_dir / stage, link=False)
    if (source / "shard" / "manifest.json").is_file():  # made beside them: its manifest decides
        copy_tree(source / "shard", base.run_dir / "shard", link=False)
    try:
        base.warnings = copied_stage_warnings(dataset, base.run_dir)
    except DiffGRMError as exc:  # an edited or truncated manifest, a config that does not load
        base.reason = f"the copied stages cannot be read: {exc}"
        log(f"{dataset}: {base.reason}")
        return base
    probe = Check(f"{dataset}/base", dataset, base.run_dir, base.log_path, [])
    base.ok = run_stage(probe, "shard", [], env, deadline)
    base.status, base.reason = (probe.status, probe.reason) if not base.ok else ("passed", "")
    return base


def copied_stage_warnings(dataset: str, run_dir: Path) -> list[str]:
    """Whether the copied prepare/tokenize stages were made from this checkout's config.
    prepare: the config values its manifest recorded, but for ``data.path`` (resolved to an
    absolute path, so it differs on another machine) and the raw files (absent here);
    tokenize: its config hash and inputs (the prepare manifest), as the pipeline would."""
    from diffgrm_dist.core.config import load_config, to_dict
    from diffgrm_dist.core.rundir import RunDir
    from diffgrm_dist.stages import STAGES, stage_record

    cfg, run = load_config(str(CONFIGS[dataset]), []), RunDir(run_dir)
    warnings = []
    recorded = json.loads(json.dumps((run.manifest("prepare") or {}).get("config", {})))
    current = json.loads(json.dumps({"seed": cfg.seed, "data": to_dict(cfg.data), "prepare": to_dict(cfg.prepare)},
                                    default=str))
    for values in (recorded, current):
        values.get("data", {}).pop("path", None)
    if recorded != current:
        warnings.append(f"{dataset}: the copied prepare stage was made with other data/prepare settings "
                        f"than {CONFIGS[dataset].relative_to(ROOT)} here")
    if not run.is_current(stage_record(STAGES["tokenize"], cfg, run)):
        warnings.append(f"{dataset}: the copied tokenize stage was made with other tokenize settings "
                        f"(or another prepare stage) than {CONFIGS[dataset].relative_to(ROOT)} here")
    for warning in warnings:
        log(f"warning: {warning}")
    return warnings


def stages_reused(check: Check, base: Path) -> bool:
    """Whether the check ran on the copied prepare/tokenize stages (their manifests unchanged)."""
    return all((check.run_dir / s / "manifest.json").read_bytes() == (base / s / "manifest.json").read_bytes()
               for s in COPIED_STAGES if (check.run_dir / s / "manifest.json").is_file())


def start_check(check: Check, base: Path) -> None:
    """The check's run directory: hard-linked copies of the base's stages."""
    shutil.rmtree(check.run_dir, ignore_errors=True)
    check.run_dir.mkdir(parents=True)
    for stage in (*COPIED_STAGES, "shard"):
        copy_tree(base / stage, check.run_dir / stage, link=True)
    check.log_path.unlink(missing_ok=True)


def finish_check(check: Check, base: Path) -> None:
    """Fails a check whose prepare/tokenize stages were re-made instead of read."""
    if check.status == "passed" and not stages_reused(check, base):
        check.fail("failed", "prepare/tokenize were re-run instead of reading the copied stages")
    check.result["stages_reused"] = stages_reused(check, base)


# --------------------------------------------------------------------------- results


def read_results(run_dir: Path) -> dict[str, Any]:
    """Training throughput, epochs and test metrics of a finished run directory."""
    history = [json.loads(line) for line in (run_dir / "train" / "history.jsonl").read_text().splitlines()
               if line.strip()]
    stats = json.loads((run_dir / "train" / "stats.json").read_text())
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    steady = history[1:] or history  # the first epoch carries start-up (CUDA init, allocator warm-up)
    rates = [float(r["samples_per_s"]) for r in steady]
    step_ms = [1000.0 * float(r["epoch_s"]) / max(int(r["steps"]), 1) for r in steady]
    return {
        "train": {"samples_per_s": statistics.median(rates), "samples_per_s_min": min(rates),
                  "samples_per_s_max": max(rates), "ms_per_step": statistics.median(step_ms),
                  "epochs": int(stats["epochs"]), "best_epoch": int(stats["best_epoch"]),
                  "parameters": int(stats["parameters"]), "wall_s": float(stats["wall_s"]),
                  "final_loss": float(stats["final_loss"])},
        "test": {"users": int(metrics["users"]), "beam": int(metrics["beam"]),
                 "users_per_s": float(metrics["users_per_s"]), "decode_s": float(metrics["decode_s"]),
                 "item_ndcg@10": float(metrics["item"]["ndcg@10"]),
                 "item_recall@10": float(metrics["item"]["recall@10"]),
                 "sid_ndcg@10": float(metrics["sid"]["ndcg@10"]),
                 "popularity_ndcg@10": float(metrics["popularity"]["ndcg@10"])},
    }


def flat_numbers(result: dict[str, Any]) -> dict[str, float]:
    """Every number of a result, keyed section.name (for the finiteness check)."""
    return {f"{section}.{k}": float(v) for section, values in result.items() if isinstance(values, dict)
            for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def environment(device: str) -> dict[str, Any]:
    """The device, library versions and commit the results were measured with."""
    import torch

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    return {"device": device, "gpu": gpu, "cuda": torch.version.cuda if device == "cuda" else None,
            "torch": torch.__version__, "deepspeed": version("deepspeed"), "host_cpu": device_string(),
            "commit": git_info(ROOT), "python": sys.version.split()[0]}


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def markdown(dataset: str, payload: dict[str, Any]) -> str:
    """The results table of one dataset's checks, with device, versions and commit."""
    env = payload["environment"]
    commit = env["commit"]
    lines = [f"# gpu_check: {dataset}", "",
             f"Device: {env['gpu'] or 'CPU'} ({env['device']}); torch {env['torch']}, "
             f"DeepSpeed {env['deepspeed']}; commit {commit['commit'] or 'unknown'}"
             f"{' (dirty)' if commit.get('dirty') else ''}; {payload['created']}.",
             f"Command: `{payload['command']}`", ""]
    for check in payload.get("tiny_checks", []):
        lines.append(f"- tiny check `{check['name']}`: **{check['status'].upper()}**"
                     + (f" ({check['reason']})" if check["reason"] else ""))
    for warning in payload.get("warnings", []):
        lines.append(f"- warning: {warning}")
    first = "launcher" if dataset == "tiny" else "model"
    lines += ["", f"| {first} | status | train samples/s (range) | ms/step | test users/s | item N@10 | item R@10 | "
                  "SID N@10 | popularity N@10 | epochs | wall s (train + test) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for check in payload["checks"]:
        train, test = check["result"].get("train", {}), check["result"].get("test", {})
        rate = (f"{_fmt(train['samples_per_s'])} ({_fmt(train['samples_per_s_min'])}-"
                f"{_fmt(train['samples_per_s_max'])})" if train else "-")
        ran = [check["seconds"][s] for s in ("train", "evaluate") if s in check["seconds"]]
        lines.append("| " + " | ".join([
            check["model"], check["status"], rate, _fmt(train.get("ms_per_step"), 1),
            _fmt(test.get("users_per_s")), _fmt(test.get("item_ndcg@10"), 4), _fmt(test.get("item_recall@10"), 4),
            _fmt(test.get("sid_ndcg@10"), 4), _fmt(test.get("popularity_ndcg@10"), 4),
            str(train.get("epochs", "-")), _fmt(sum(ran), 0) if ran else "-"]) + " |")
    lines += ["", payload["settings_text"], ""]
    if payload.get("targets"):
        lines += [f"Targets on one H200: {payload['targets']}", ""]
    failed = [c for c in payload["checks"] if c["status"] not in ("passed", "skipped")]
    for check in failed:
        lines.append(f"- `{check['name']}` {check['status']}: {check['reason']} (log `{check['log']}`)")
    return "\n".join(lines).rstrip() + "\n"


def check_record(check: Check, model: str) -> dict[str, Any]:
    return {"name": check.name, "model": model, "status": check.status, "reason": check.reason,
            "run_dir": str(check.run_dir), "log": str(check.log_path), "overrides": check.overrides,
            "eval_overrides": check.eval_overrides, "seconds": check.seconds, "result": check.result}


def targets_text(checks: list[Check]) -> tuple[str, dict[str, Any]]:
    """The H200 targets against the measured Beauty numbers (informative: never a failure)."""
    best_rate = max((c.result["train"]["samples_per_s"] for c in checks if c.status == "passed"), default=None)
    diffgrm = next((c for c in checks if c.name.endswith("/DiffGRM") and c.status == "passed"), None)
    users = diffgrm.result["test"]["users_per_s"] if diffgrm else None
    met = {"train_samples_per_s": {"target": TARGETS["train_samples_per_s"], "best_measured": best_rate},
           "diffgrm_test_users_per_s": {"target": TARGETS["diffgrm_test_users_per_s"], "measured": users}}
    text = (f">= {TARGETS['train_samples_per_s']:,} training samples/s (best measured {_fmt(best_rate)}, "
            "three trainings sharing the GPU) and "
            f">= {TARGETS['diffgrm_test_users_per_s']:,} CPD users/s at beam 256 (measured {_fmt(users)})")
    return text, met


# --------------------------------------------------------------------------- modes


def cmd_stage(args: argparse.Namespace) -> int:
    """prepare + tokenize of each dataset into ``--out DIR/<dataset>``, plus DIR/stages.json."""
    out = Path(args.out).resolve()
    env = child_env(hide_gpu=False)
    deadline = Deadline(float("inf"))
    for dataset in args.datasets:
        run_dir = out / dataset
        # The embedding cache stays out of the folder to copy (it is not read after tokenize).
        overrides = [f"tokenize.embedding_cache={out / '.embeddings' / dataset}"]
        check = Check(f"{dataset}/stage", dataset, run_dir, out / ".logs" / f"{dataset}.log", overrides)
        for stage in COPIED_STAGES:
            if not run_stage(check, stage, overrides, env, deadline):
                print(f"{dataset} {stage} failed; the tail of {check.log_path}:\n{tail(check.log_path)}",
                      file=sys.stderr)
                return 1
    record_path = out / "stages.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record.update({dataset: {"config": str(CONFIGS[dataset].relative_to(ROOT)), "commit": git_info(ROOT),
                             "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                   for dataset in args.datasets})
    write_json(record_path, record)
    log(f"stages ready in {out}: copy {' '.join(f'{out.name}/{d}' for d in args.datasets)} (and stages.json) "
        f"to the GPU box, then `python tools/gpu_check.py run --stages {out.name}`")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The tiny checks, then (without ``--tiny``) the three concurrent Beauty trainings."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: --device cuda but torch sees no GPU (torch "
              f"{torch.__version__}); use --device cpu --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    stages, results = Path(args.stages).resolve(), Path(args.results).resolve()
    work = Path(args.work).resolve()
    if not stages.is_dir():
        print(f"gpu_check: error: --stages {stages}: no such folder (make it with "
              "`python tools/gpu_check.py stage --out DIR`)", file=sys.stderr)
        return 2
    deadline = Deadline(args.deadline_min * 60)
    env = child_env(hide_gpu=args.device == "cpu")
    log_dir = work / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    device_overrides = GPU_OVERRIDES if args.device == "cuda" else CPU_OVERRIDES
    suffix = "" if args.device == "cuda" else ".cpu"
    command = "python tools/gpu_check.py " + " ".join(sys.argv[1:])
    environ = environment(args.device)
    log(f"device {environ['gpu'] or 'cpu'}, torch {environ['torch']}, deepspeed {environ['deepspeed']}, "
        f"commit {(environ['commit']['commit'] or 'unknown')[:12]}; deadline {args.deadline_min:g} min")
    stage_info = json.loads((stages / "stages.json").read_text()) if (stages / "stages.json").is_file() else {}

    # 1. tiny: the local launcher, then Ray when it is importable
    tiny: list[Check] = []
    launchers = ["local"]
    ray_note = ""
    if args.no_ray:
        ray_note = "--no-ray"
    elif ray_importable(env):
        launchers.append("ray")
    else:
        ray_note = "`import ray` fails here"
    base = prepare_base("tiny", stages, work, env, deadline, log_dir)
    tiny_warnings = base.warnings
    for launcher in launchers:
        check = Check(f"tiny/{launcher}", "tiny", work / "tiny" / launcher, log_dir / f"tiny.{launcher}.log",
                      [f"train.launcher={launcher}", *device_overrides, *TINY_OVERRIDES],
                      [f"eval.launcher={launcher}"])
        tiny.append(check)
        if not base.ok:
            base.fail_check(check)
            continue
        start_check(check, base.run_dir)
        run_chain(check, env, deadline)
        finish_check(check, base.run_dir)
    tiny_records = [check_record(c, c.name.split("/")[1]) for c in tiny]
    if ray_note:
        tiny_records.append({"name": "tiny/ray", "model": "ray", "status": "skipped", "reason": ray_note,
                             "seconds": {}, "result": {}, "log": ""})
    tiny_lines = [{"name": r["name"], "status": r["status"], "reason": r["reason"]} for r in tiny_records]
    tiny_settings = (f"Tiny: configs/tiny.yaml, {' '.join(TINY_OVERRIDES)}, {' '.join(device_overrides)}; "
                     "train and evaluate with the launcher named in the row.")
    tiny_payload = {"dataset": "tiny", "created": _now(), "command": command, "environment": environ,
                    "stages": stage_info.get("tiny"), "warnings": tiny_warnings, "tiny_checks": tiny_lines,
                    "checks": tiny_records, "settings_text": tiny_settings,
                    "settings": {"overrides": [*device_overrides, *TINY_OVERRIDES], "deadline_s": deadline.seconds}}
    written = write_outputs(results, f"tiny{suffix}", tiny_payload)
    checks = list(tiny)

    # 2. Beauty at paper size: three trainings sharing the device
    if not args.tiny:
        base = prepare_base("beauty", stages, work, env, deadline, log_dir)
        warnings = base.warnings
        common = [*BEAUTY_OVERRIDES, *device_overrides, f"train.epochs={args.epochs}",
                  f"eval.valid_users={args.valid_users}", *args.set]
        beauty: list[Check] = []
        for model in args.models:
            eval_only = ["eval.launcher=local", f"eval.beam_size={args.beam}"]
            if model == "AR" and args.ar_test_batch:
                eval_only.append(f"eval.batch_size={args.ar_test_batch}")
            check = Check(f"beauty/{model}", "beauty", work / "beauty" / model, log_dir / f"beauty.{model}.log",
                          [f"model.decoder={MODELS[model]}", *common], eval_only)
            beauty.append(check)
            if base.ok:
                start_check(check, base.run_dir)
            else:
                base.fail_check(check)
        threads = [threading.Thread(target=run_chain, args=(c, env, deadline), name=c.name)
                   for c in beauty if c.status == "pending"]
        log(f"beauty: {len(threads)} trainings at once, {args.epochs} epochs each (--epochs), "
            f"validation on {args.valid_users} users, test on all users at beam {args.beam}")
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for check in beauty:
            if base.ok:
                finish_check(check, base.run_dir)
        target_text, target_values = targets_text(beauty)
        settings = (f"Beauty: configs/beauty.yaml (5.6M parameters, batch 1024), {len(beauty)} trainings sharing "
                    f"the device, {args.epochs} epochs each, {' '.join(common)}; validation on "
                    f"{args.valid_users} sampled users from train.valid_start_epoch and after the last epoch; "
                    f"test on all users at beam {args.beam} (`eval.launcher=local`"
                    + (f"; AR at eval.batch_size={args.ar_test_batch}" if "AR" in args.models and args.ar_test_batch
                       else "") + "). train samples/s: median over epochs after the first (range); "
                    "ms/step: median epoch_s/steps over the same epochs.")
        payload = {"dataset": "beauty", "created": _now(), "command": command, "environment": environ,
                   "stages": stage_info.get("beauty"), "warnings": warnings, "tiny_checks": tiny_lines,
                   "checks": [check_record(c, c.name.split("/")[1]) for c in beauty],
                   "settings_text": settings, "targets": target_text if args.device == "cuda" else "",
                   "target_values": target_values,
                   "settings": {"epochs": args.epochs, "valid_users": args.valid_users, "beam": args.beam,
                                "overrides": common, "deadline_s": deadline.seconds}}
        written += write_outputs(results, f"beauty{suffix}", payload)
        checks += beauty

    bad = [c for c in checks if c.status != "passed"]
    for check in bad:
        print(f"\nFAILED {check.name}: {check.status}: {check.reason}\n--- tail of {check.log_path} ---\n"
              f"{tail(check.log_path)}", file=sys.stderr)
    for line in tiny_lines:
        log(f"{line['name']}: {line['status']}" + (f" ({line['reason']})" if line["reason"] else ""))
    for path in written:
        log(f"wrote {path}")
    log(f"{len(checks) - len(bad)}/{len(checks)} checks passed in {deadline.seconds - deadline.left():.0f} s")
    return 1 if bad else 0


def write_outputs(results: Path, name: str, payload: dict[str, Any]) -> list[Path]:
    """``name.json`` and ``name.md`` under ``results``; prints the table."""
    table = markdown(payload["dataset"], payload)
    json_path = write_json(results / f"{name}.json", payload)
    md_path = results / f"{name}.md"
    md_path.write_text(table)
    print(table, flush=True)
    return [json_path, md_path]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    s = sub.add_parser("stage", help="make the prepare + tokenize stages to copy to the GPU box "
                                     "(needs the full install: sentence-transformers, faiss, Ray)")
    s.add_argument("--out", required=True, help="folder for the stages: OUT/<dataset>/{prepare,tokenize}")
    s.add_argument("--datasets", nargs="+", choices=sorted(CONFIGS), default=["tiny", "beauty"],
                   help="datasets to stage (default: tiny beauty)")
    r = sub.add_parser("run", help="shard, train and evaluate on the device from copied stages")
    r.add_argument("--stages", required=True, help="folder made by the stage mode (holds tiny/ and beauty/)")
    r.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default): the GPU with bf16; cpu: no GPU, fp32 (with --tiny: the smoke run)")
    r.add_argument("--tiny", action="store_true", help="run only the tiny checks")
    r.add_argument("--no-ray", action="store_true", help="skip the tiny Ray-launcher check even if Ray imports")
    r.add_argument("--epochs", type=int, default=8,
                   help="Beauty training epochs per model (default 8: with three trainings on one H200 "
                        "everything fits in 8 minutes)")
    r.add_argument("--valid-users", type=int, default=2048, help="Beauty validation sample (eval.valid_users)")
    r.add_argument("--beam", type=int, default=256, help="Beauty test beam (eval.beam_size, default 256)")
    r.add_argument("--ar-test-batch", type=int, default=0,
                   help="AR test eval.batch_size (default 0: from the device; attention is sliced below "
                        "the size cuDNN failed at, 256 users x beam 256 on an H200, so none is needed)")
    r.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                   help="Beauty models to train at once (default: all three)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for the Beauty runs (repeatable), e.g. train.valid_start_epoch=1")
    r.add_argument("--deadline-min", type=float, default=8.0,
                   help="global limit in minutes (default 8); what is still running then is killed "
                        "and reported as timed out")
    r.add_argument("--results", default=str(ROOT / "results" / "gpu"),
                   help="folder for <dataset>.json and <dataset>.md (default results/gpu)")
    r.add_argument("--work", default=str(ROOT / "runs" / "gpu-check"),
                   help="folder for the run directories and logs (default runs/gpu-check; its "
                        "tiny/ and beauty/ are replaced)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return cmd_stage(args) if args.mode == "stage" else cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
