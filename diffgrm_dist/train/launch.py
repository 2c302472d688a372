"""The train stage's entry: runs the ``Trainer`` on every rank through Ray Train (or
in-process with the ``local`` launcher), resuming from the newest intact checkpoint, and
writes the stage's outputs (best model, history, curves, stats).

Launchers:
- ``ray`` (default): ``TorchTrainer`` with ``ScalingConfig(num_workers, use_gpu)``, gloo on
  CPU and nccl on GPU; at each checkpoint every rank saves its DeepSpeed state into a folder
  it reports with ``ray.train.report``; a rank that dies makes Ray Train restart the group
  from the newest one (``train.max_failures``), as does a re-run of the stage.
- ``local``: one process, no Ray, for debugging; checkpoints under the work folder.

Outputs (``RUN_DIR/train/``): ``model.safetensors`` + ``model_config.json`` (best epoch),
``history.jsonl``, ``curves.png``, ``stats.json``, and wandb's offline run folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from diffgrm_dist.cluster.raycluster import ClusterResources, cpus_per_worker
from diffgrm_dist.core.config import ExperimentConfig, TrainConfig
from diffgrm_dist.core.rundir import RunDir
from diffgrm_dist.evaluate.baselines import popularity_baseline
from diffgrm_dist.model.export import EXPORT_CONFIG, EXPORT_WEIGHTS, load_exported
from diffgrm_dist.train.checkpoints import STATE_FILE, LocalReporter, latest_ray_checkpoint
from diffgrm_dist.train.trainer import train_worker

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- stage


def run_train(cfg: ExperimentConfig, run_dir: RunDir, out: Path, work_key: str) -> dict[str, Any]:
    """``work_key`` (the stage record's key) names where checkpoints of an interrupted run
    live until the stage completes: a changed config or input never resumes stale state."""
    work_rel = f"train.work/{work_key}"
    work = run_dir.root / work_rel
    config = {"cfg": cfg, "run_dir": run_dir.spec, "out_dir": str(out),
              "work_dir": str(work / "local"), "launcher": cfg.train.launcher}
    start = time.perf_counter()
    if cfg.train.launcher == "local":
        config["threads"] = os.cpu_count() or 1
        train_worker(config)  # the one-rank group stays: DeepSpeed keeps a handle on it
        final = LocalReporter(work / "local").latest()
    elif cfg.train.launcher == "ray":
        final = launch_ray(cfg, config, run_dir, work_rel)
    else:
        raise ValueError(f"train.launcher: {cfg.train.launcher!r} is not ray or local")
    if final is None:
        raise RuntimeError("training produced no checkpoint")
    state = json.loads((final / STATE_FILE).read_text())
    for name in (EXPORT_WEIGHTS, EXPORT_CONFIG):
        shutil.copy2(final / "best" / name, out / name)
    with open(out / "history.jsonl", "w") as fh:
        for record in state["history"]:
            fh.write(json.dumps(record) + "\n")
    plot_history(state["history"], out / "curves.png")
    best = next(r for r in state["history"] if r["epoch"] == state["best_epoch"])
    stats = {"epochs": state["epoch"], "best_epoch": state["best_epoch"],
             "best_score": state["best_score"], "parameters": load_exported(out).num_parameters(),
             "final_loss": state["history"][-1]["loss"], "first_loss": state["history"][0]["loss"],
             "wall_s": round(time.perf_counter() - start, 2), "nodes": state.get("nodes", []),
             "best_valid": {k: v for k, v in best.items() if "/" in k}}
    stats["popularity_valid"] = popularity_baseline(run_dir.stage_path("prepare"), "valid")
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    run_dir.delete(work_rel)
    if not run_dir.list_dirs("train.work"):  # other keys: interrupted runs of other configs
        run_dir.delete("train.work")
    return stats


def launch_ray(cfg: ExperimentConfig, config: dict[str, Any], run_dir: RunDir, work_rel: str) -> Path | None:
    """Ray Train run; its checkpoints persist under the run directory (local or a URI)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from diffgrm_dist.cluster.raycluster import check_resources, ray_session, verbose

    with ray_session() as resources:
        workers, cpus, use_gpu = worker_layout(cfg.train, resources)
        check_resources(resources, workers, cpus, int(use_gpu), f"train.num_workers={workers}"
                        f"{' train.use_gpu=true' if use_gpu else ''}")
        config["threads"] = cpus
        storage, filesystem = run_dir.storage(f"{work_rel}/ray")
        run_name = "train"
        latest = latest_ray_checkpoint(storage, filesystem, run_name)
        trainer = TorchTrainer(
            train_worker, train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                   resources_per_worker={"CPU": cpus}),
            # A rank that dies leaves the others in a collective: they give up after
            # collective_timeout_s (not gloo/NCCL's 30 min) and Ray Train restarts the group.
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=cfg.train.collective_timeout_s),
            run_config=ray.train.RunConfig(name=run_name, storage_path=storage, storage_filesystem=filesystem,
                                           checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                           failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
                                           # Ray Train's per-report INFO lines: only with --verbose
                                           logging_config=ray.train.LoggingConfig(
                                               log_level="INFO" if verbose() else "WARNING")),
            resume_from_checkpoint=ray.train.Checkpoint(latest, filesystem=filesystem) if latest else None)
        result = trainer.fit()
        if result.checkpoint is None:
            return None
        with result.checkpoint.as_directory() as folder:
            final = run_dir.root / work_rel / "final"
            if final.exists():
                shutil.rmtree(final)
            shutil.copytree(folder, final)
        return final


def worker_layout(t: TrainConfig, resources: ClusterResources) -> tuple[int, int, bool]:
    """(Ray Train ranks, CPUs per rank, whether they use GPUs): ``train.num_workers`` or, when
    0, one rank per GPU of the cluster with ``train.use_gpu`` (else one); a CPU rank gets an
    even share of the CPUs, a GPU rank one core for itself and one per DataLoader worker."""
    use_gpu = t.use_gpu and resources.gpus > 0
    if t.use_gpu and not use_gpu:
        log.warning("train.use_gpu=true but the cluster has no GPU: training on CPUs")
    workers = t.num_workers or (resources.gpus if use_gpu else 1)
    cpus = cpus_per_worker(resources, workers)
    if use_gpu:
        cpus = min(cpus, t.loader_workers + 1)
    return workers, cpus, use_gpu


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Loss, learning rate and validation curves (skipped, with a note, without matplotlib:
    a GPU box may have only what training needs)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        log.info("matplotlib is not installed: no %s", path.name)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r["loss"] for r in history], marker="o")
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].plot(epochs, [r["lr"] for r in history], marker="o")
    axes[1].set(title="learning rate (end of epoch)", xlabel="epoch")
    validated = [r for r in history if "score" in r]
    for name in ("item/recall@10", "item/ndcg@10", "sid/recall@10", "sid/ndcg@10"):
        axes[2].plot([r["epoch"] for r in validated], [r[name] for r in validated], marker="o", label=name)
    axes[2].set(title="validation", xlabel="epoch")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
