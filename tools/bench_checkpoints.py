"""Wall-clock cost of step checkpoints: the demo's train stage without them (epoch
checkpoints only, the baseline) and with ``train.checkpoint_every_steps`` = each of
``--every``, in the same run on the same prepared, tokenized and sharded run directory.
Each configuration trains from scratch in a fresh ``diffgrm train`` process (Ray Train
launcher, as ``make demo``). Reported: train-stage seconds, ratio to the baseline,
checkpoints written, and whether the trained weights equal the baseline's (they must:
checkpoints change when state is saved, never what is computed).

    python tools/bench_checkpoints.py                       # demo config, 2 epochs, every 50 / 20 steps
    python tools/bench_checkpoints.py --epochs 1 --every 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchlib import ROOT, device_string, git_info, write_json

DIFFGRM = str(Path(sys.executable).parent / "diffgrm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--every", type=int, nargs="+", default=[50, 20])
    parser.add_argument("--work", type=Path, default=Path("/tmp/diffgrm-bench-checkpoints"))
    parser.add_argument("--out", type=Path, default=ROOT / "tools" / "results" / "bench_checkpoints.json")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = args.work / "base"
    common = [f"train.epochs={args.epochs}", "train.wandb_mode=disabled"]
    for stage in ("prepare", "tokenize", "shard"):
        done = subprocess.run([DIFFGRM, stage, "-c", str(args.config), "-o", str(base), *common],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{stage} failed:\n{done.stderr[-2000:]}")
    from diffgrm_dist.core.config import load_config

    batch = load_config(args.config).train.batch_size
    samples = json.loads((base / "shard" / "shards.json").read_text())["splits"]["train"]["samples"]
    steps = -(-samples // batch)
    rows, weights = [], {}
    for every in [0, *args.every]:
        run = args.work / f"every-{every}"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        for stage in ("prepare", "tokenize", "shard"):
            shutil.copytree(base / stage, run / stage)
        done = subprocess.run([DIFFGRM, "train", "-c", str(args.config), "-o", str(run), *common,
                               f"train.checkpoint_every_steps={every}"], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"train (every {every}) failed:\n{done.stderr[-2000:]}")
        stats = json.loads((run / "train" / "stats.json").read_text())
        weights[every] = (run / "train" / "model.safetensors").read_bytes()
        mid_epoch = sum(1 for k in range(1, steps) if k % every == 0) if every else 0
        rows.append({"checkpoint_every_steps": every, "train_stage_s": stats["wall_s"],
                     "checkpoints": args.epochs * (1 + mid_epoch), "same_weights": weights[every] == weights[0]})
    for row in rows:
        row["ratio"] = round(row["train_stage_s"] / rows[0]["train_stage_s"], 3)
    print(f"{device_string()}\n{args.config.name}: {args.epochs} epochs of {steps} steps; "
          "baseline = epoch checkpoints only\n")
    print("| checkpoints | train stage s | ratio | checkpoints written | weights = baseline's |")
    print("|---|---|---|---|---|")
    for row in rows:
        every = row["checkpoint_every_steps"]
        print(f"| {'epoch only' if not every else f'every {every} steps'} | {row['train_stage_s']:.1f} | "
              f"{row['ratio']:.3f} | {row['checkpoints']} | {row['same_weights']} |")
    write_json(args.out, {"device": device_string(), "commit": git_info(ROOT)["commit"], "config": str(args.config),
                          "epochs": args.epochs, "steps_per_epoch": steps, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
