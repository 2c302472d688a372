"""The per-rank training loop of DiffGRM under DeepSpeed ZeRO (launched by ``launch``).

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
``patience`` validations without improvement."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from diffgrm_dist.cluster.raycluster import quiet_library_logs
from diffgrm_dist.core.config import ExperimentConfig
from diffgrm_dist.core.rundir import RunDir
from diffgrm_dist.data.loaders import BalancedBatches, ShardSet, ShardStream, ShuffledBatches, split_range
from diffgrm_dist.data.sids import load_sids
from diffgrm_dist.decode.catalogue import CatalogueIndex, catalogue_for
from diffgrm_dist.decode.search import SearchOptions
from diffgrm_dist.evaluate.metrics import selection_score, summarise
from diffgrm_dist.evaluate.ranking import Queries, rank_queries
from diffgrm_dist.model.export import EXPORT_WEIGHTS, export_weights
from diffgrm_dist.model.network import DiffGRM, SidSpec
from diffgrm_dist.model.objectives import no_dropout
from diffgrm_dist.train.checkpoints import (
    STATE_FILE,
    LocalReporter,
    RayReporter,
    Reporter,
    load_partial,
    save_partial,
    write_checksums,
)
from diffgrm_dist.train.engine import (
    build_engine,
    full_model,
    init_local_process_group,
    master_weights,
    schedule_warning,
    sum_over_ranks,
    train_step,
    training_device,
    use_device,
)

log = logging.getLogger(__name__)

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
        dist.all_gather_object(self.nodes, rank_node(self.launcher))  # where the ranks run, for the stats
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
        bar = progress_bar(self.steps_per_epoch, f"epoch {epoch}", self.rank)
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
        eval_model = full_model(self.engine, self.model, cfg)
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
        wandb_run = wandb_run_for(self.cfg, self.out_dir) if self.rank == 0 else None
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


def rank_node(launcher: str) -> str:
    if launcher == "ray":
        from diffgrm_dist.cluster.raycluster import node_id

        return node_id()
    return socket.gethostname()


def progress_bar(total: int, desc: str, rank: int):
    """A step bar on rank 0 only on a terminal (relayed through Ray it is one line per step)."""
    if rank != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False)


def wandb_run_for(cfg: ExperimentConfig, out_dir: Path):
    if cfg.train.wandb_mode == "disabled":
        return None
    import wandb

    out_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(project="diffgrm-dist", name=cfg.name, mode=cfg.train.wandb_mode,
                      dir=str(out_dir), config=asdict(cfg), reinit="finish_previous")
