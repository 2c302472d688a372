"""train stage: DiffGRM under DeepSpeed ZeRO, launched by Ray Train (or in-process).

``train_worker`` is the per-rank loop and is the same for both launchers: it streams its
share of the WebDataset shards, lets the DeepSpeed engine own the optimiser (AdamW), the
warm-up + cosine schedule, gradient clipping, ZeRO stage and bf16, validates every epoch
with CPD beam search (metrics summed across ranks), checkpoints every epoch and resumes
from the latest checkpoint, keeps the best model by 0.8*NDCG@10 + 0.2*Recall@10, and
stops early after ``patience`` epochs without improvement.

Launchers:
- ``ray`` (default): ``TorchTrainer`` with ``ScalingConfig(num_workers, use_gpu)``, gloo on
  CPU and nccl on GPU; each epoch every rank saves its DeepSpeed checkpoint into a folder
  it reports with ``ray.train.report``; a restarted run resumes from the newest one.
- ``local``: one process, no Ray, for debugging; checkpoints under the work folder.

Outputs (``RUN_DIR/train/``): ``model.safetensors`` + ``model_config.json`` (best epoch),
``history.jsonl``, ``curves.png``, ``stats.json``, and wandb's offline run folder.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from diffgrm_dist.config import ExperimentConfig, ModelConfig
from diffgrm_dist.decode import Catalogue, recommend_batch
from diffgrm_dist.metrics import KS, item_and_sid_metrics, per_user, selection_score, summarise
from diffgrm_dist.model import DiffGRM, SidSpec
from diffgrm_dist.objectives import AutoregressiveObjective, DiffusionObjective, no_dropout
from diffgrm_dist.rundir import RunDir
from diffgrm_dist.shard import BalancedBatches, ShardSet, ShardStream, load_sid_matrix

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "model_config.json"


# --------------------------------------------------------------------------- building


def build_model(model_cfg: ModelConfig, spec: SidSpec) -> DiffGRM:
    return DiffGRM(model_cfg, spec)


def build_objective(model: DiffGRM, cfg: ExperimentConfig) -> torch.nn.Module:
    t = cfg.train
    if cfg.model.decoder == "autoregressive":
        return AutoregressiveObjective(model, t.label_smoothing)
    if cfg.model.decoder != "diffusion":
        raise ValueError(f"model.decoder: {cfg.model.decoder!r} is not diffusion or autoregressive")
    return DiffusionObjective(model, t.objective, t.confidence, t.label_smoothing, t.loss_mean)


def deepspeed_config(cfg: ExperimentConfig, world: int, total_steps: int) -> dict[str, Any]:
    """The DeepSpeed JSON config that the train section maps onto."""
    t = cfg.train
    micro = max(1, t.batch_size // world)
    return {
        "train_batch_size": micro * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": t.weight_decay,
                                                   "betas": [0.9, 0.999], "eps": 1e-8,
                                                   "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(total_steps, t.warmup_steps + 1),
            "warmup_num_steps": t.warmup_steps, "warmup_min_ratio": 0.0,
            "cos_min_ratio": 0.0, "warmup_type": "linear"}},
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: ExperimentConfig, spec: SidSpec, world: int, total_steps: int):
    """(DeepSpeed engine around the training objective, the bare model, LR scheduler)."""
    import deepspeed

    model = build_model(cfg.model, spec)
    objective = build_objective(model, cfg)
    if cfg.train.zero_stage == 3:
        # Weights read outside their own module's forward (tied output table, position and
        # mask embeddings) must be gathered for the wrapper's whole forward.
        for param in (model.codes.weight, model.history_pos.weight, model.mask_emb, model.digit_pos, model.bos):
            deepspeed.zero.register_external_parameter(objective, param)
    engine, _, _, scheduler = deepspeed.initialize(
        model=objective, model_parameters=[p for p in objective.parameters() if p.requires_grad],
        config=deepspeed_config(cfg, world, total_steps))
    return engine, model, scheduler


def init_local_process_group() -> None:
    """A one-rank gloo process group, as DeepSpeed needs, without a launcher."""
    import deepspeed

    _skip_cpu_shm_build()
    if not dist.is_initialized():
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False,
                                   init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)


def _skip_cpu_shm_build() -> None:
    """DeepSpeed compiles a shared-memory comm op (40 s of g++) on first CPU init; gloo
    does not need it."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- checkpoints


class Reporter(Protocol):
    """How a rank reports an epoch (and its checkpoint folder) and finds one to resume."""

    def latest(self) -> Path | None: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None: ...


class LocalReporter:
    """Checkpoints as numbered folders under ``root`` (single process)."""

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root, self.keep = root, keep
        root.mkdir(parents=True, exist_ok=True)

    def _epochs(self) -> list[Path]:
        return sorted(p for p in self.root.glob("epoch-*") if (p / STATE_FILE).is_file())

    def latest(self) -> Path | None:
        found = self._epochs()
        return found[-1] if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        target = self.root / f"epoch-{metrics['epoch']:05d}"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(checkpoint_dir, target)
        for old in self._epochs()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


class RayReporter:
    """Ray Train's checkpointing: every rank reports its folder; Ray merges and persists."""

    def __init__(self) -> None:
        import ray.train

        self._train = ray.train
        self._resume = ray.train.get_checkpoint()
        self._resume_dir: contextlib.ExitStack | None = None

    def latest(self) -> Path | None:
        if self._resume is None:
            return None
        self._resume_dir = contextlib.ExitStack()
        return Path(self._resume_dir.enter_context(self._resume.as_directory()))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        self._train.report(metrics, checkpoint=self._train.Checkpoint.from_directory(str(checkpoint_dir)))


# --------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(model: DiffGRM, batches: BalancedBatches, catalogue: Catalogue, item_group: np.ndarray,
             cfg: ExperimentConfig, beam: int) -> dict[str, float]:
    """Item- and SID-level Recall/NDCG@5/10 of this rank's users, summed over all ranks."""
    k = max(KS)
    sums: dict[str, float] = {}
    users = 0
    with no_dropout(model):
        for batch in batches:
            items, _, groups = recommend_batch(model, batch["history"], batch["history_mask"], catalogue,
                                               beam, k, cfg.model.decoder, cfg.eval.final_step)
            truth = batch["items"].numpy()
            for key, values in item_and_sid_metrics(items, groups, truth, item_group).items():
                sums[key] = sums.get(key, 0.0) + float(values.sum())
            users += len(truth)
    totals = torch.tensor([users, *[sums[k] for k in sorted(sums)]], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    names = sorted(sums)
    return summarise(dict(zip(names, totals[1:].tolist())), int(totals[0]))


# --------------------------------------------------------------------------- the loop


def train_worker(config: dict[str, Any]) -> None:
    """One rank's training loop (Ray Train worker or the local process)."""
    cfg: ExperimentConfig = config["cfg"]
    run_dir = RunDir(config["run_dir"])  # on another node: pulls the stages it reads
    shard_dir, out_dir = run_dir.stage_path("shard"), Path(config["out_dir"])
    launcher = config["launcher"]
    _skip_cpu_shm_build()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    if launcher == "local":
        init_local_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    nodes: list[str | None] = [None] * world
    dist.all_gather_object(nodes, _node_id(launcher))  # where the ranks run, for the stats
    reporter: Reporter = RayReporter() if launcher == "ray" else LocalReporter(Path(config["work_dir"]))

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    train_set = ShardSet.load(shard_dir, "train")
    valid_set = ShardSet.load(shard_dir, "valid")
    spec = SidSpec(train_set.digit_sizes, train_set.max_history)
    catalogue, item_group = load_catalogue(run_dir.stage_path("tokenize"))
    train_stream = ShardStream(train_set, rank, world, seed=cfg.shard.seed + cfg.seed, shuffle=True)
    train_batches = BalancedBatches(train_stream, max(1, cfg.train.batch_size // world), cfg.train.loader_workers)
    valid_batches = BalancedBatches(ShardStream(valid_set, rank, world, seed=0, shuffle=False),
                                    cfg.eval.batch_size, 0)
    engine, model, scheduler = build_engine(cfg, spec, world, len(train_batches) * cfg.train.epochs)

    state = {"epoch": 0, "best_score": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": []}
    best_weights: dict[str, torch.Tensor] | None = None  # rank 0: the best epoch's weights
    resume = reporter.latest()
    if resume is not None:
        engine.load_checkpoint(str(resume), tag="ds", load_module_strict=True)
        state = json.loads((resume / STATE_FILE).read_text())
        if rank == 0:
            from safetensors.torch import load_file

            best_weights = load_file(str(resume / "best" / EXPORT_WEIGHTS))
            log.info("resumed from %s after epoch %d", resume, state["epoch"])
    wandb_run = _wandb(cfg, out_dir) if rank == 0 else None
    for epoch in range(state["epoch"] + 1, cfg.train.epochs + 1):
        train_stream.set_epoch(epoch)
        engine.train()
        start = time.perf_counter()
        loss_sum, steps, samples = 0.0, 0, 0
        bar = _progress(len(train_batches), f"epoch {epoch}", rank)
        for batch in train_batches:
            loss = engine(batch["history"], batch["history_mask"], batch["targets"])
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
            steps += 1
            samples += len(batch["targets"])
            if bar is not None:
                bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                bar.update(1)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        totals = torch.tensor([loss_sum, steps, samples, seconds], dtype=torch.float64)
        dist.all_reduce(totals)
        eval_model = _full_model(engine, model, cfg)
        metrics = validate(eval_model, valid_batches, catalogue, item_group, cfg, cfg.eval.valid_beam_size)
        score = selection_score({k.split("/")[1]: v for k, v in metrics.items() if k.startswith("item/")})
        improved = score > state["best_score"]
        if improved and rank == 0:
            best_weights = {k: v.detach().cpu().clone() for k, v in eval_model.state_dict().items()}
        record = {"epoch": epoch, "loss": totals[0].item() / max(totals[1].item(), 1),
                  "lr": scheduler.get_last_lr()[0], "epoch_s": seconds,
                  "samples_per_s": totals[2].item() / max(totals[3].item() / world, 1e-9),
                  "score": score, **metrics}
        if improved:
            state.update(best_score=score, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["history"].append(record)
        state["nodes"] = sorted(set(map(str, nodes)))
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp)
            engine.save_checkpoint(str(ckpt), tag="ds")
            if rank == 0:
                (ckpt / STATE_FILE).write_text(json.dumps(state))
                export_weights(best_weights, cfg.model, spec, ckpt / "best")
            reporter.report(record, ckpt)
        if rank == 0:
            log.info("epoch %d: loss %.4f, item recall@10 %.4f ndcg@10 %.4f, %.0f samples/s",
                     epoch, record["loss"], record["item/recall@10"], record["item/ndcg@10"],
                     record["samples_per_s"])
            if wandb_run is not None:
                wandb_run.log(record, step=epoch)
        if state["bad_epochs"] >= cfg.train.patience:
            if rank == 0:
                log.info("early stop: %d epochs without improvement", state["bad_epochs"])
            break
    if wandb_run is not None:
        wandb_run.finish()


def _node_id(launcher: str) -> str:
    if launcher == "ray":
        from diffgrm_dist.raycluster import node_id

        return node_id()
    return socket.gethostname()


def _full_model(engine: Any, model: DiffGRM, cfg: ExperimentConfig) -> DiffGRM:
    """The model with all its weights on this rank, for validation and export.

    Under ZeRO-3 parameters are partitioned and only gathered inside the engine's forward,
    so a plain copy is built from the gathered weights; otherwise the model itself is used."""
    if cfg.train.zero_stage != 3:
        return model
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    copy = DiffGRM(cfg.model, model.spec)
    copy.load_state_dict(weights)
    return copy


def _progress(total: int, desc: str, rank: int):
    if rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False)


def _wandb(cfg: ExperimentConfig, out_dir: Path):
    if cfg.train.wandb_mode == "disabled":
        return None
    import wandb

    out_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(project="diffgrm-dist", name=cfg.name, mode=cfg.train.wandb_mode,
                      dir=str(out_dir), config=asdict(cfg), reinit="finish_previous")


# --------------------------------------------------------------------------- export / load


def export_weights(weights: dict[str, torch.Tensor], model_cfg: ModelConfig, spec: SidSpec,
                   folder: Path) -> None:
    """safetensors weights + a JSON config: everything needed to rebuild the model."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / EXPORT_WEIGHTS))
    (folder / EXPORT_CONFIG).write_text(json.dumps(
        {"model": asdict(model_cfg), "sizes": list(spec.sizes), "max_history": spec.max_history},
        indent=2) + "\n")


def load_exported(folder: Path, device: str = "cpu") -> DiffGRM:
    """Loads safetensors weights (no code is executed)."""
    from safetensors.torch import load_file

    meta = json.loads((folder / EXPORT_CONFIG).read_text())
    model = DiffGRM(ModelConfig(**meta["model"]), SidSpec(tuple(meta["sizes"]), meta["max_history"]))
    model.load_state_dict(load_file(str(folder / EXPORT_WEIGHTS), device=device))
    return model.to(device).eval()


def load_catalogue(tokenize_dir: Path) -> tuple[Catalogue, np.ndarray]:
    """Catalogue of all items' SIDs, and each item's code group (for SID-level metrics)."""
    codes, sizes, collision_rank = load_sid_matrix(tokenize_dir)
    catalogue = Catalogue(codes, tuple(sizes), collision_rank)
    return catalogue, catalogue.item_groups()


# --------------------------------------------------------------------------- stage


def popularity_baseline(prepare_dir: Path, split: str) -> dict[str, float]:
    """Recall/NDCG@5/10 of recommending the most popular training targets to everyone."""
    import pyarrow.parquet as pq

    from diffgrm_dist.metrics import popularity_ranking

    train = pq.read_table(prepare_dir / "train.parquet", columns=["target"])["target"].to_numpy()
    truth = pq.read_table(prepare_dir / f"{split}.parquet", columns=["target"])["target"].to_numpy()
    n_items = pq.read_metadata(prepare_dir / "items.parquet").num_rows
    ranked = np.broadcast_to(popularity_ranking(train, n_items, max(KS)), (len(truth), max(KS)))
    return summarise({k: float(v.sum()) for k, v in per_user(ranked, truth).items()}, len(truth))


def run_train(cfg: ExperimentConfig, run_dir: RunDir, out: Path) -> dict[str, Any]:
    from diffgrm_dist.config import section_hash

    # Checkpoints of an interrupted run live here until the stage completes; the key ties
    # them to this config and these shards, so a changed config never resumes stale state.
    key = section_hash(cfg.seed, cfg.model, cfg.train, cfg.eval, run_dir.manifest_hash("shard"))
    work_rel = f"train.work/{key}"
    work = run_dir.root / work_rel
    config = {"cfg": cfg, "run_dir": run_dir.spec, "out_dir": str(out),
              "work_dir": str(work / "local"), "launcher": cfg.train.launcher}
    start = time.perf_counter()
    if cfg.train.launcher == "local":
        config["threads"] = os.cpu_count() or 1
        train_worker(config)  # the one-rank group stays: DeepSpeed keeps a handle on it
        final = LocalReporter(work / "local").latest()
    elif cfg.train.launcher == "ray":
        final = _launch_ray(cfg, config, run_dir, work_rel)
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


def _launch_ray(cfg: ExperimentConfig, config: dict[str, Any], run_dir: RunDir, work_rel: str) -> Path | None:
    """Ray Train run; its checkpoints persist under the run directory (local or a URI)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from diffgrm_dist.raycluster import cpus_per_worker, ray_session

    with ray_session() as resources:
        use_gpu = cfg.train.use_gpu and resources.gpus > 0
        workers = cfg.train.num_workers or max(1, resources.gpus if use_gpu else 1)
        cpus = cpus_per_worker(resources, workers) if not use_gpu else 1
        config["threads"] = cpus
        storage, filesystem = run_dir.storage(f"{work_rel}/ray")
        run_name = "train"
        latest = _latest_ray_checkpoint(storage, filesystem, run_name)
        trainer = TorchTrainer(
            train_worker, train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                   resources_per_worker={"CPU": cpus}),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=ray.train.RunConfig(name=run_name, storage_path=storage, storage_filesystem=filesystem,
                                           checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
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


def _latest_ray_checkpoint(storage: str, filesystem: Any, run_name: str) -> str | None:
    """Newest complete checkpoint a previous (interrupted) Ray Train run persisted.

    Ray names checkpoints ``checkpoint_<timestamp>``, so the last name is the newest."""
    from pyarrow import fs as pafs

    filesystem = filesystem or pafs.LocalFileSystem()
    root = f"{storage}/{run_name}"
    found = [info.path for info in filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
             if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
             and filesystem.get_file_info(f"{info.path}/{STATE_FILE}").type == pafs.FileType.File]
    return sorted(found, key=lambda path: path.rsplit("/", 1)[-1])[-1] if found else None


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r["loss"] for r in history], marker="o")
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].plot(epochs, [r["lr"] for r in history], marker="o")
    axes[1].set(title="learning rate (end of epoch)", xlabel="epoch")
    for name in ("item/recall@10", "item/ndcg@10", "sid/recall@10", "sid/ndcg@10"):
        axes[2].plot(epochs, [r[name] for r in history], marker="o", label=name)
    axes[2].set(title="validation", xlabel="epoch")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
