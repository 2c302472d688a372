"""Training under DeepSpeed: checkpoint/resume, ZeRO 1/2/3 on 2 Ray Train workers, kill + restart."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.paths import CONFIGS
from safetensors.torch import load_file

from diffgrm_dist.core.config import load_config
from diffgrm_dist.core.errors import ConfigError
from diffgrm_dist.data.loaders import BalancedBatches, ShardSet, ShardStream
from diffgrm_dist.model.export import load_exported
from diffgrm_dist.model.network import SidSpec
from diffgrm_dist.train.engine import build_engine, deepspeed_config, init_local_process_group

TINY = CONFIGS / "tiny.yaml"
DIFFGRM = str(Path(sys.executable).parent / "diffgrm")



def read_history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train" / "history.jsonl").read_text().splitlines()]


def train_locally(tiny_run: Path, tmp_path: Path, run_cli, *overrides: str) -> tuple[Path, list[dict]]:
    """The train stage in this process on a copy of the tiny run; the copy and its history."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, _, err = run_cli("train", "-c", TINY, "-o", run, "train.launcher=local", *overrides)
    assert code == 0, err
    return run, read_history(run)

def test_deepspeed_config_maps_the_train_section():
    cfg = load_config(TINY, ["train.zero_stage=2", "train.bf16=true", "train.batch_size=64",
                             "train.grad_clip=0.5", "train.lr=0.01", "train.warmup_steps=7"])
    ds = deepspeed_config(cfg, world=2, total_steps=100)
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["train_batch_size"] == 64
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 0.01
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 7
    assert ds["scheduler"]["params"]["total_num_steps"] == 100
    assert set(ds["zero_optimization"]) == {"stage"}  # DeepSpeed's own buckets unless set
    tuned = deepspeed_config(load_config(TINY, ["train.zero_stage=3", "train.zero_bucket_elements=4096"]), 1, 10)
    assert tuned["zero_optimization"]["stage3_max_live_parameters"] == 4096
    assert tuned["zero_optimization"]["reduce_bucket_size"] == 4096
    with pytest.raises(ConfigError, match="train.zero_bucket_elements: must be 0"):
        load_config(TINY, ["train.zero_bucket_elements=-2"])


def test_checkpoint_resume_gives_the_same_next_step_loss(tiny_run, tmp_path):
    cfg = load_config(TINY, ["model.dropout=0.0"])
    init_local_process_group()
    train_set = ShardSet.load(tiny_run / "shard", "train")
    spec = SidSpec(train_set.digit_sizes, train_set.max_history)
    batches = list(BalancedBatches(ShardStream(train_set, 0, 1, seed=0, shuffle=False), 64, 0))[:6]

    def step(engine, b):
        loss = engine(b["history"], b["history_mask"], b["targets"])
        engine.backward(loss)
        engine.step()
        return loss.item()

    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, spec, world=1, total_steps=50)
    for b in batches[:3]:
        step(engine, b)
    engine.save_checkpoint(str(tmp_path), tag="t")
    continued = [step(engine, b) for b in batches[3:]]

    torch.manual_seed(1234)  # a different initialisation, overwritten by the checkpoint
    resumed_engine, _, _ = build_engine(cfg, spec, world=1, total_steps=50)
    resumed_engine.load_checkpoint(str(tmp_path), tag="t")
    resumed = [step(resumed_engine, b) for b in batches[3:]]
    assert resumed == pytest.approx(continued, rel=1e-6, abs=1e-7)
    assert continued[0] > 0


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module (ray_session reuses it)."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_on_two_ray_train_workers(tiny_run, tmp_path, run_cli, ray_local, stage):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, out, err = run_cli("train", "-c", TINY, "-o", run, "train.num_workers=2",
                             f"train.zero_stage={stage}", "train.epochs=1", "train.wandb_mode=disabled",
                             # ZeRO-3 with buckets far smaller than the model: many reduce and prefetch rounds
                             f"train.zero_bucket_elements={4096 if stage == 3 else 0}")
    assert code == 0, err
    stats = json.loads((run / "train" / "stats.json").read_text())
    assert stats["epochs"] == 1 and np.isfinite(stats["final_loss"])
    history = read_history(run)
    assert history[0]["samples_per_s"] > 0
    # Every rank ran the same number of steps over disjoint halves of the data, and the
    # exported weights are complete (ZeRO-3 partitions are gathered before export).
    model = load_exported(run / "train")
    weights = load_file(str(run / "train" / "model.safetensors"))
    assert weights["codes.weight"].shape == model.codes.weight.shape
    assert not (run / "train.work").exists() or not any((run / "train.work").iterdir())


@pytest.mark.slow
def test_local_launcher_trains_and_loss_falls(tiny_run, tmp_path, run_cli):
    run, history = train_locally(tiny_run, tmp_path, run_cli, "train.epochs=4", "train.patience=10",
                                 "train.lr=0.01", "train.wandb_mode=offline")
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < history[0]["loss"]
    assert (run / "train" / "curves.png").stat().st_size > 10_000
    assert list((run / "train" / "wandb").glob("offline-run-*"))
    stats = json.loads((run / "train" / "stats.json").read_text())
    best = history[stats["best_epoch"] - 1]
    assert stats["best_score"] == pytest.approx(max(r["score"] for r in history))
    assert stats["best_valid"]["item/recall@10"] == best["item/recall@10"]


@pytest.mark.slow
def test_killed_training_resumes_from_the_latest_checkpoint(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    args = [DIFFGRM, "train", "-c", str(TINY), "-o", str(run), "train.launcher=local",
            "train.epochs=5", "train.patience=10", "train.wandb_mode=disabled"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list(run.glob("train.work/*/local/epoch-00002/train_state.json")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = json.loads(next(run.glob("train.work/*/local/epoch-00002/train_state.json")).read_text())
    assert not (run / "train").exists()

    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    history = read_history(run)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    assert history[:2] == saved["history"][:2]  # the epochs before the kill were not redone


def test_steps_per_epoch_cuts_every_epoch_short(tiny_run, tmp_path, run_cli):
    """train.steps_per_epoch: each epoch stops after that many steps, the schedule sized to it."""
    run, history = train_locally(tiny_run, tmp_path, run_cli, "train.epochs=2", "train.steps_per_epoch=3",
                                 "train.warmup_steps=1", "train.wandb_mode=disabled")
    full = json.loads((run / "shard" / "stats.json").read_text())["train_samples"] // 64
    assert [r["steps"] for r in history] == [3, 3] and full > 3
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine reached its end after 6 steps
