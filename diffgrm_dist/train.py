"""train stage: DiffGRM under DeepSpeed ZeRO, launched by Ray Train (or in-process).

``Trainer`` is the per-rank loop (``setup``, ``resume``, then per epoch ``train_epoch``,
``validate``, ``save``), the same for both launchers (``train_worker`` runs it): it reads its
share of the WebDataset shards (every window reshuffled each epoch, exactly once across
ranks; a URI run's shards in place on its filesystem, never copied to the node), lets the
DeepSpeed engine own the optimiser (AdamW), the warm-up + cosine schedule, gradient
clipping, ZeRO stage and bf16 (optionally the forward under bf16 autocast), validates
from ``train.valid_start_epoch`` with the same ranking code as the evaluate stage (metrics
summed across ranks; all validation users or a seeded sample),
checkpoints every epoch (and every ``train.checkpoint_every_steps`` steps: a resumed epoch
skips the windows already trained on and restores each rank's RNG, so it trains exactly as
an uninterrupted one), resumes from the newest intact checkpoint, keeps the best model by
0.8*NDCG@10 + 0.2*Recall@10 at ``train.select_on``'s level, and stops early after
``patience`` validations without improvement.

Launchers:
- ``ray`` (default): ``TorchTrainer`` with ``ScalingConfig(num_workers, use_gpu)``, gloo on
  CPU and nccl on GPU; at each checkpoint every rank saves its DeepSpeed state into a folder
  it reports with ``ray.train.report``; a rank that dies makes Ray Train restart the group
  from the newest one (``train.max_failures``), as does a re-run of the stage.
- ``local``: one process, no Ray, for debugging; checkpoints under the work folder.

Outputs (``RUN_DIR/train/``): ``model.safetensors`` + ``model_config.json`` (best epoch),
``history.jsonl``, ``curves.png``, ``stats.json``, and wandb's offline run folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from diffgrm_dist.baselines import popularity_baseline
from diffgrm_dist.config import ExperimentConfig, ModelConfig, TrainConfig
from diffgrm_dist.catalogue import CatalogueIndex, catalogue_for
from diffgrm_dist.decode import SearchOptions
from diffgrm_dist.export import EXPORT_CONFIG, EXPORT_WEIGHTS, export_weights, load_exported
from diffgrm_dist.metrics import selection_score, summarise
from diffgrm_dist.model import DiffGRM, SidSpec
from diffgrm_dist.objectives import AutoregressiveObjective, DenseObjective, DiffusionObjective, no_dropout
from diffgrm_dist.ranking import Queries, rank_queries
from diffgrm_dist.raycluster import ClusterResources, cpus_per_worker, free_port, quiet_library_logs
from diffgrm_dist.rundir import RunDir, file_sha256
from diffgrm_dist.loaders import BalancedBatches, ShardSet, ShardStream, ShuffledBatches, split_range
from diffgrm_dist.sids import load_sids

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
CHECKSUMS_PREFIX = "checksums.rank"
PARTIAL_PREFIX = "partial.rank"


# --------------------------------------------------------------------------- building


def build_model(model_cfg: ModelConfig, spec: SidSpec) -> DiffGRM:
    return DiffGRM(model_cfg, spec)


def build_objective(model: DiffGRM, cfg: ExperimentConfig) -> torch.nn.Module:
    t = cfg.train
    if cfg.model.decoder == "autoregressive":
        return AutoregressiveObjective(model, t.label_smoothing)
    if cfg.model.decoder == "dense":
        return DenseObjective(model, t.label_smoothing)
    if cfg.model.decoder != "diffusion":
        raise ValueError(f"model.decoder: {cfg.model.decoder!r} is not diffusion, autoregressive or dense")
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
        "zero_optimization": zero_optimization(t),
        "zero_force_ds_cpu_optimizer": False,  # offload with the torch AdamW: no compiled CPU Adam
        "bf16": {"enabled": t.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def zero_optimization(t: TrainConfig) -> dict[str, Any]:
    """The ZeRO section: stage, optimizer offload and, when set, one bucket size for every
    DeepSpeed buffer that otherwise defaults to 5e8-1e9 elements."""
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if t.zero_bucket_elements:
        zero.update({key: t.zero_bucket_elements for key in (
            "reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
            "stage3_max_live_parameters", "stage3_max_reuse_distance")})
    return zero


def build_engine(cfg: ExperimentConfig, spec: SidSpec, world: int, total_steps: int):
    """(DeepSpeed engine around the training objective, the bare model, LR scheduler)."""
    import deepspeed

    model = build_model(cfg.model, spec)
    objective = build_objective(model, cfg)
    if cfg.train.zero_stage == 3:
        # Weights read outside their own module's forward (tied output table, position and
        # mask embeddings) must be gathered for the wrapper's whole forward.
        external = [model.codes.weight, model.history_pos.weight, model.mask_emb, model.digit_pos, model.bos]
        if model.item_emb is not None:  # the dense head's output table
            external.append(model.item_emb.weight)
        for param in external:
            deepspeed.zero.register_external_parameter(objective, param)
    engine, _, _, scheduler = deepspeed.initialize(
        model=objective, model_parameters=[p for p in objective.parameters() if p.requires_grad],
        config=deepspeed_config(cfg, world, total_steps))
    return engine, model, scheduler


def training_device(cfg: ExperimentConfig, launcher: str) -> torch.device:
    """This rank's device: its GPU with ``train.use_gpu`` (Ray Train's assignment, or GPU 0 of
    the local process), else the CPU, even on a host with GPUs."""
    if not cfg.train.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        log.warning("train.use_gpu=true but torch sees no GPU here: training on the CPU")
        return torch.device("cpu")
    if launcher == "ray":
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def use_device(device: torch.device) -> None:
    """Points DeepSpeed (and torch's current CUDA device) at ``device`` before the engine is
    built: DeepSpeed picks CUDA whenever torch sees a GPU, so a CPU run on a GPU host must say
    so; on the CPU it also skips the shared-memory op DeepSpeed would compile (40 s of g++)."""
    os.environ["DS_ACCELERATOR"] = device.type  # read when DeepSpeed first resolves it
    accelerator = importlib.import_module("deepspeed.accelerator.real_accelerator")
    current = accelerator.ds_accelerator
    if current is not None and current.device_name() != device.type:  # resolved earlier in this process
        if device.type == "cuda":
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
        else:
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
        accelerator.set_accelerator(Accelerator())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def init_local_process_group(device: torch.device | None = None) -> None:
    """A one-rank process group, as DeepSpeed needs, without a launcher: gloo for CPU tensors
    and, on a GPU, NCCL for CUDA tensors in the same group."""
    import deepspeed

    device = device or torch.device("cpu")
    use_device(device)
    if not dist.is_initialized():
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


# --------------------------------------------------------------------------- checkpoints


def write_checksums(folder: Path, rank: int) -> None:
    """sha256 of every file this rank put in its checkpoint folder, so a resume can tell a
    complete checkpoint from a truncated or corrupt one (Ray merges the ranks' folders)."""
    sums = {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / f"{CHECKSUMS_PREFIX}{rank}.json").write_text(json.dumps(sums, indent=1) + "\n")


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random number generators training draws from: torch's CPU generator and, on a
    GPU, that device's (dropout and noising masks are drawn there)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_partial(folder: Path, rank: int, progress: dict[str, Any] | None,
                 device: torch.device | None = None) -> None:
    """This rank's RNG (dropout, noising; CPU and GPU) and, mid-epoch, its progress: a resumed
    run continues with the very random numbers and windows the uninterrupted one would use."""
    from safetensors.torch import save_file

    save_file(rng_state(device or torch.device("cpu")), str(folder / f"rng.rank{rank}.safetensors"))
    if progress is not None:
        (folder / f"{PARTIAL_PREFIX}{rank}.json").write_text(json.dumps(progress))


def load_partial(folder: Path, rank: int, device: torch.device | None = None) -> dict[str, Any] | None:
    """Restores this rank's RNG from a checkpoint; returns its mid-epoch progress, if any."""
    from safetensors.torch import load_file

    rng = folder / f"rng.rank{rank}.safetensors"
    if rng.is_file():
        restore_rng(load_file(str(rng)), device or torch.device("cpu"))
    path = folder / f"{PARTIAL_PREFIX}{rank}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_problem(root: str, filesystem: Any = None) -> str | None:
    """Why the checkpoint folder ``root`` cannot be resumed from (None: complete and intact).
    Reads through a pyarrow filesystem, so it works on a bucket as on a local disk."""
    from pyarrow import fs as pafs

    filesystem = filesystem or pafs.LocalFileSystem()
    if filesystem.get_file_info(f"{root}/{STATE_FILE}").type != pafs.FileType.File:
        return f"no {STATE_FILE}"
    listed = [i for i in filesystem.get_file_info(pafs.FileSelector(root)) if i.base_name.startswith(CHECKSUMS_PREFIX)]
    if not listed:
        return "no checksums (written by an older version or cut short)"
    for info in listed:
        try:
            with filesystem.open_input_stream(info.path) as fh:
                sums = json.loads(fh.read())
        except (OSError, ValueError):
            return f"{info.base_name} unreadable"
        for name, expected in sums.items():
            digest = hashlib.sha256()
            try:
                with filesystem.open_input_stream(f"{root}/{name}") as fh:
                    while block := fh.read(1 << 20):
                        digest.update(block)
            except (OSError, FileNotFoundError):
                return f"{name} missing"
            if digest.hexdigest() != expected:
                return f"{name} does not match its sha256 (truncated or corrupt)"
    return None


def newest_intact(candidates: list[str], filesystem: Any = None) -> str | None:
    """The newest of ``candidates`` (sorted oldest first) that ``checkpoint_problem``
    accepts; each one skipped is logged as a warning."""
    for path in reversed(candidates):
        problem = checkpoint_problem(path, filesystem)
        if problem is None:
            return path
        log.warning("checkpoint %s skipped: %s; trying the previous one", path, problem)
    return None


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
        return sorted(p for p in self.root.glob("epoch-*") if p.is_dir())

    def latest(self) -> Path | None:
        found = newest_intact([str(p) for p in self._epochs()])
        return Path(found) if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        # Completed epochs, then steps into the next: names sort in training order.
        step = f".step-{metrics['step']:07d}" if "step" in metrics else ""
        target = self.root / f"epoch-{metrics['epoch']:05d}{step}"
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
def validate(model: DiffGRM, queries: Queries, sids: torch.Tensor, catalogue: CatalogueIndex,
             cfg: ExperimentConfig, beam: int) -> dict[str, float]:
    """Item- and SID-level Recall/NDCG@5/10 of this rank's users (ranked on the model's
    device), summed over all ranks."""
    with no_dropout(model):
        options = SearchOptions(beam, cfg.model.decoder, cfg.eval.final_step)  # no test-time options
        values = rank_queries(model, queries, sids, catalogue, cfg.eval, options)
    names = sorted(k for k in values if "/" in k)
    totals = sum_over_ranks([len(queries), *[float(values[k].sum()) for k in names]],
                            next(model.parameters()).device)
    return summarise(dict(zip(names, totals[1:])), int(totals[0]))


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over all ranks, as float64 on ``device``: an NCCL group reduces only
    CUDA tensors, gloo only CPU ones, so the tensor goes where the rank trains."""
    totals = torch.as_tensor(values, dtype=torch.float64).to(device)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return totals.cpu().tolist()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch on the training device; from pinned memory the copies overlap compute."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def train_step(engine: Any, batch: dict[str, torch.Tensor], autocast: torch.autocast) -> torch.Tensor:
    """One optimiser step on a batch; returns the loss, detached and left on the device (reading
    it would make the host wait for the step)."""
    batch = to_device(batch, engine.device)
    with autocast:
        loss = engine(batch["history"], batch["history_mask"], batch["targets"], batch["items"])
    engine.backward(loss)
    engine.step()
    return loss.detach()


def master_weights(model: DiffGRM) -> dict[str, torch.Tensor]:
    """The model's weights for export, in fp32 on the CPU: DeepSpeed's fp32 master copies where
    it keeps them (bf16 training, ZeRO 1-3), not the bf16 copies the forward runs on. Every
    rank must call it: assembling a partitioned master copy is a collective."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(model.named_parameters())
    out = {}
    for name, value in model.state_dict().items():
        master = safe_get_full_fp32_param(params[name]) if name in params else None
        out[name] = (value if master is None else master).detach().float().cpu().clone()
    return out


PAPER_EPOCHS = 100  # the paper's cap (the released code: 200)
RELEASED_WARMUP = 10_000  # the released recipe's warm-up steps


def schedule_warning(cfg: TrainConfig, total_steps: int) -> str | None:
    """One line when the learning-rate schedule is not the one the recipe's peak assumes: a
    warm-up longer than the run, or a run cut short of the paper's epochs."""
    problems = []
    if cfg.warmup_steps > total_steps:
        problems.append(f"train.warmup_steps={cfg.warmup_steps} is more than the run's {total_steps} steps, "
                        f"so the learning rate never reaches train.lr={cfg.lr:g}")
    if cfg.epochs < PAPER_EPOCHS:
        problems.append(f"train.epochs={cfg.epochs} cuts the schedule short of the paper's {PAPER_EPOCHS} "
                        f"(the cosine decay is compressed into {total_steps} steps)")
    if not problems:
        return None
    return ("; ".join(problems) + f". The released recipe warms up {RELEASED_WARMUP:,} steps; a peak of 1e-2 "
            "needs that long warm-up (with 400 steps it diverged on Beauty), a short one a lower train.lr (3e-3)")


def training_batches(train_set: ShardSet, cfg: ExperimentConfig, rank: int, world: int,
                     pin_memory: bool = False) -> ShuffledBatches | BalancedBatches:
    """This rank's batches of training windows for the epoch set by ``set_epoch``:
    ``windows`` reshuffles every window each epoch (random access through the shard index),
    ``shards`` streams the epoch's shard order through a shuffle buffer."""
    seed = cfg.shard.seed + cfg.seed + cfg.train.seed
    batch = max(1, cfg.train.batch_size // world)
    if cfg.train.shuffle == "shards":
        return BalancedBatches(ShardStream(train_set, rank, world, seed=seed, shuffle=True), batch,
                               cfg.train.loader_workers, pin_memory=pin_memory)
    return ShuffledBatches(train_set, rank, world, seed=seed, batch_size=batch,
                           loader_workers=cfg.train.loader_workers, bucket_batches=cfg.train.bucket_batches,
                           pin_memory=pin_memory)


def validation_queries(prepare_dir: Path, cfg: ExperimentConfig, rank: int, world: int) -> Queries:
    """This rank's share of the (sampled) validation users; the same users every epoch."""
    queries = Queries.sample_split(prepare_dir, "valid", cfg.eval.valid_users, cfg.eval.seed)
    return queries.chunk(*split_range(len(queries), world, rank))


# --------------------------------------------------------------------------- the loop


class Trainer:
    """One rank's training (a Ray Train worker or the local process), in steps a reader can
    follow: ``setup`` (device, process group, data, DeepSpeed engine), ``resume`` (the latest
    checkpoint, if any), then per epoch ``train_epoch``, ``validate`` and ``save``, until the
    last epoch or early stopping (``fit`` runs them all)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg: ExperimentConfig = config["cfg"]
        self.run_dir = RunDir(config["run_dir"])  # on another node: pulls the small stages it reads
        self.out_dir = Path(config["out_dir"])
        self.launcher = config["launcher"]
        self.work_dir = Path(config["work_dir"])
        self.threads = max(1, int(config.get("threads", 1)))
        self.state: dict[str, Any] = {"epoch": 0, "best_score": -1.0, "best_epoch": -1, "bad_epochs": 0,
                                      "history": []}
        self.best_weights: dict[str, torch.Tensor] | None = None  # rank 0: the best epoch's weights
        self.partial: dict[str, Any] | None = None  # this rank's progress into an unfinished epoch

    def setup(self) -> None:
        cfg = self.cfg
        self.device = device = training_device(cfg, self.launcher)
        use_device(device)
        import deepspeed  # noqa: F401  (it sets its logger's level on import: quiet it after that)

        quiet_library_logs()
        torch.set_num_threads(self.threads)
        if self.launcher == "local":
            init_local_process_group(device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.nodes: list[str | None] = [None] * self.world
        dist.all_gather_object(self.nodes, _node_id(self.launcher))  # where the ranks run, for the stats
        self.reporter: Reporter = RayReporter() if self.launcher == "ray" else LocalReporter(self.work_dir)

        # train.seed varies only training (init, window order, noise): SIDs and shards stay put.
        torch.manual_seed(cfg.seed + cfg.train.seed)
        np.random.seed(cfg.seed + cfg.train.seed)
        train_set = ShardSet.open(self.run_dir, "train")  # a URI run's shards stay where they are
        if self.rank == 0 and train_set.remote and cfg.train.shuffle == "windows":
            log.info("train.shuffle=windows reads %s's shards by one ranged GET per sample; "
                     "train.shuffle=shards streams them sequentially", self.run_dir.display)
        sid_table = load_sids(self.run_dir.stage_path("tokenize"))
        self.spec = SidSpec(train_set.digit_sizes, train_set.max_history, items=len(sid_table.codes))
        self.catalogue, self.sids = catalogue_for(sid_table), torch.from_numpy(sid_table.codes.astype(np.int64))
        self.batches = training_batches(train_set, cfg, self.rank, self.world, pin_memory=device.type == "cuda")
        self.valid_queries = validation_queries(self.run_dir.stage_path("prepare"), cfg, self.rank, self.world)
        self.steps_per_epoch = min(len(self.batches), cfg.train.steps_per_epoch or len(self.batches))
        total_steps = self.steps_per_epoch * cfg.train.epochs
        self.engine, self.model, self.scheduler = build_engine(cfg, self.spec, self.world, total_steps)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.autocast_bf16)
        self.total_steps = total_steps

    def resume(self) -> None:
        """Loads the latest checkpoint the reporter holds: engine, run state, this rank's
        progress into an unfinished epoch and (rank 0) the best weights so far."""
        resume = self.reporter.latest()
        if resume is not None:
            self.engine.load_checkpoint(str(resume), tag="ds", load_module_strict=True)
            self.state = json.loads((resume / STATE_FILE).read_text())
            self.partial = load_partial(resume, self.rank, self.device)
            if self.rank == 0:
                from safetensors.torch import load_file

                if (resume / "best" / EXPORT_WEIGHTS).is_file():
                    self.best_weights = load_file(str(resume / "best" / EXPORT_WEIGHTS))
                where = f"epoch {self.state['epoch']}" + (f" + {self.partial['steps']} steps" if self.partial else "")
                log.warning("resumed from %s after %s", resume, where)
        if self.rank == 0 and resume is None and (warning := schedule_warning(self.cfg.train, self.total_steps)):
            log.warning("schedule: %s", warning)

    def save(self, record: dict[str, Any], progress: dict[str, Any] | None) -> None:
        """Every rank's DeepSpeed state, its RNG and progress into the epoch; rank 0's run state
        and best weights; checksums; one report (all ranks report together)."""
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp)
            self.engine.save_checkpoint(str(ckpt), tag="ds")
            save_partial(ckpt, self.rank, progress, self.device)
            if self.rank == 0:
                (ckpt / STATE_FILE).write_text(json.dumps(self.state))
                if self.best_weights is not None:  # none yet inside the first epoch
                    export_weights(self.best_weights, self.cfg.model, self.spec, ckpt / "best")
            write_checksums(ckpt, self.rank)
            self.reporter.report(record, ckpt)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch's steps (from where a resumed checkpoint left it), with a checkpoint every
        ``train.checkpoint_every_steps``; returns the epoch's record, summed over ranks."""
        engine, device, every = self.engine, self.device, self.cfg.train.checkpoint_every_steps
        engine.train()
        start = time.perf_counter()
        # The epoch's loss is summed on the device: reading it every step would make the host
        # wait for each step before queueing the next.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        partial = self.partial
        if partial is not None and partial["epoch"] == epoch:  # resume inside this epoch
            steps, samples, spent = partial["steps"], partial["samples"], partial["seconds"]
            loss_sum += partial["loss_sum"]
            self.batches.set_epoch(epoch, skip=steps, digest=partial["digest"])
        else:
            steps, samples, spent = 0, 0, 0.0
            self.batches.set_epoch(epoch)
        self.partial = None
        bar = _progress(self.steps_per_epoch, f"epoch {epoch}", self.rank)
        for batch in self.batches:
            if steps >= self.steps_per_epoch:
                break
            loss = train_step(engine, batch, self.autocast)
            loss_sum += loss
            steps += 1
            samples += len(batch["targets"])
            if bar is not None:
                if steps % 20 == 0:  # a terminal only: reading the loss waits for the step
                    bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                bar.update(1)
            if every and steps % every == 0 and steps < self.steps_per_epoch:
                self.save({"epoch": epoch - 1, "step": steps}, {
                    "epoch": epoch, "steps": steps, "loss_sum": float(loss_sum), "samples": samples,
                    "seconds": spent + time.perf_counter() - start, "digest": self.batches.digest})
        if bar is not None:
            bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the epoch's time includes its last queued steps
        seconds = spent + time.perf_counter() - start
        totals = sum_over_ranks([float(loss_sum), steps, samples, seconds], device)
        digests: list[str | None] = [None] * self.world
        dist.all_gather_object(digests, self.batches.digest)
        return {"epoch": epoch, "steps": steps, "loss": totals[0] / max(totals[1], 1),
                "lr": self.scheduler.get_last_lr()[0], "epoch_s": seconds,
                "samples_per_s": totals[2] / max(totals[3] / self.world, 1e-9),
                # which windows this epoch trained on, in which order, on every rank
                "windows_digest": hashlib.sha256("".join(map(str, digests)).encode()).hexdigest()[:16]}

    def validate(self, epoch: int, record: dict[str, Any]) -> bool:
        """Validation from ``train.valid_start_epoch`` (and always after the last epoch) into
        ``record``; the selection score reads ``train.select_on``'s level and patience counts
        validations. Whether this epoch's weights are the best so far (rank 0 keeps them)."""
        cfg, state = self.cfg, self.state
        eval_model = _full_model(self.engine, self.model, cfg)
        if epoch >= cfg.train.valid_start_epoch or epoch == cfg.train.epochs:
            valid_start = time.perf_counter()
            metrics = validate(eval_model, self.valid_queries, self.sids, self.catalogue, cfg,
                               cfg.eval.valid_beam_size)
            level = f"{cfg.train.select_on}/"
            score = selection_score({k[len(level):]: v for k, v in metrics.items() if k.startswith(level)})
            record.update(score=score, valid_s=time.perf_counter() - valid_start, **metrics)
            improved = score > state["best_score"]
            if improved:
                state.update(best_score=score, best_epoch=epoch, bad_epochs=0)
            else:
                state["bad_epochs"] += 1
        else:
            improved = state["best_epoch"] < 0  # nothing validated yet: keep the latest weights
        if improved:  # every rank: gathering partitioned fp32 master weights is a collective
            weights = master_weights(self.model)
            self.best_weights = weights if self.rank == 0 else None
        return improved

    def log_epoch(self, record: dict[str, Any], wandb_run: Any) -> None:
        valid = ("" if "score" not in record else
                 ", valid item R@10 %.4f N@10 %.4f, sid R@10 %.4f N@10 %.4f (%.0f s)" % (
                     record["item/recall@10"], record["item/ndcg@10"], record["sid/recall@10"],
                     record["sid/ndcg@10"], record["valid_s"]))
        log.info("epoch %d: loss %.4f, lr %.2e, %.0f samples/s%s", record["epoch"], record["loss"],
                 record["lr"], record["samples_per_s"], valid)
        if wandb_run is not None:
            wandb_run.log(record, step=record["epoch"])

    def fit(self) -> None:
        self.setup()
        self.resume()
        wandb_run = _wandb(self.cfg, self.out_dir) if self.rank == 0 else None
        for epoch in range(self.state["epoch"] + 1, self.cfg.train.epochs + 1):
            record = self.train_epoch(epoch)
            self.validate(epoch, record)
            self.state["epoch"] = epoch
            self.state["history"].append(record)
            self.state["nodes"] = sorted(set(map(str, self.nodes)))
            self.save(record, None)
            if self.rank == 0:
                self.log_epoch(record, wandb_run)
            if self.state["bad_epochs"] >= self.cfg.train.patience:
                if self.rank == 0:
                    log.info("early stop: %d epochs without improvement", self.state["bad_epochs"])
                break
        if wandb_run is not None:
            wandb_run.finish()


def train_worker(config: dict[str, Any]) -> None:
    """One rank's training loop: the entry point of a Ray Train worker and of the local process."""
    Trainer(config).fit()


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
    return copy.to(engine.device)


def _progress(total: int, desc: str, rank: int):
    """A step bar on rank 0 only on a terminal (relayed through Ray it is one line per step)."""
    if rank != 0 or not sys.stderr.isatty():
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

    from diffgrm_dist.raycluster import check_resources, ray_session, verbose

    with ray_session() as resources:
        workers, cpus, use_gpu = worker_layout(cfg.train, resources)
        check_resources(resources, workers, cpus, int(use_gpu), f"train.num_workers={workers}"
                        f"{' train.use_gpu=true' if use_gpu else ''}")
        config["threads"] = cpus
        storage, filesystem = run_dir.storage(f"{work_rel}/ray")
        run_name = "train"
        latest = _latest_ray_checkpoint(storage, filesystem, run_name)
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


def _latest_ray_checkpoint(storage: str, filesystem: Any, run_name: str) -> str | None:
    """Newest complete, intact checkpoint a previous (interrupted) Ray Train run persisted.

    Ray names checkpoints ``checkpoint_<timestamp>``, so the last name is the newest; a
    truncated or corrupt one is skipped for the one before it."""
    from pyarrow import fs as pafs

    filesystem = filesystem or pafs.LocalFileSystem()
    root = f"{storage}/{run_name}"
    found = [info.path for info in filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
             if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")]
    return newest_intact(sorted(found, key=lambda path: path.rsplit("/", 1)[-1]), filesystem)


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
