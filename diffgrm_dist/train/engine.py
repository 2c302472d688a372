"""The DeepSpeed side of training: model and objective, the DeepSpeed config (ZeRO, bf16,
schedule), the engine, the device and process group a rank trains on, and one step."""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from diffgrm_dist.cluster.raycluster import free_port
from diffgrm_dist.core.config import ExperimentConfig, ModelConfig, TrainConfig
from diffgrm_dist.model.network import DiffGRM, SidSpec
from diffgrm_dist.model.objectives import AutoregressiveObjective, DenseObjective, DiffusionObjective

log = logging.getLogger(__name__)

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
        external = [model.codes.weight, model.history_pos.weight, model.mask_emb, model.bos]
        if model.digit_pos is not None:
            external.append(model.digit_pos)
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


def full_model(engine: Any, model: DiffGRM, cfg: ExperimentConfig) -> DiffGRM:
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
