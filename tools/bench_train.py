"""Benchmark of one training step loop: DeepSpeed ZeRO 0/1/2/3 vs plain PyTorch, OCN vs random.

The reference model (d=256, 4 heads, FFN 1024, 1 encoder / 4 decoder layers, 4 x 256 codes,
50 history slots) is trained on fixed random batches in one process (a one-rank gloo group
for DeepSpeed). The baseline is a plain PyTorch loop (torch AdamW, clip_grad_norm_) of the
same model and objective in the same run. Reported: samples/s, ratio to the baseline, and
peak RSS growth of each configuration (run in a fresh subprocess so peaks are its own).
OCN's extra cost is the ratio of its step time to random masking's (both plain PyTorch).

    python tools/bench_train.py [--batch 1024] [--steps 3] [--stages 0 1 2 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from benchlib import peak_rss_mib, run_isolated

from diffgrm_dist.config import ExperimentConfig, ModelConfig
from diffgrm_dist.model import DiffGRM, SidSpec
from diffgrm_dist.objectives import DiffusionObjective

SPEC = SidSpec((256,) * 4, 50)


def batches(batch: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        history = torch.randint(0, 256, (batch, 50, 4), generator=g)
        lengths = torch.randint(1, 51, (batch, 1), generator=g)
        mask = torch.arange(50)[None] >= 50 - lengths  # left padded
        out.append((history, mask, torch.randint(0, 256, (batch, 4), generator=g)))
    return out


def run_one(kind: str, objective: str, batch: int, steps: int) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    data = batches(batch, steps + 1)
    before = peak_rss_mib()
    if kind == "plain":
        model = DiffGRM(ModelConfig(), SPEC)
        obj = DiffusionObjective(model, objective, "max_prob", 0.1, "view").train()
        opt = torch.optim.AdamW(obj.parameters(), lr=1e-3, weight_decay=0.0)

        def step(b):
            loss = obj(*b)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(obj.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        from diffgrm_dist.train import build_engine, init_local_process_group

        init_local_process_group()
        cfg = ExperimentConfig()
        cfg.train.objective, cfg.train.zero_stage, cfg.train.batch_size = objective, int(kind[4:]), batch
        cfg.train.warmup_steps = 1
        engine, model, _ = build_engine(cfg, SPEC, world=1, total_steps=steps + 1)

        def step(b):
            loss = engine(*b)
            engine.backward(loss)
            engine.step()
            return loss

    step(data[0])  # warm-up (allocations, first-call overheads)
    start = time.perf_counter()
    for b in data[1:]:
        loss = step(b)
    seconds = time.perf_counter() - start
    return {"config": kind, "objective": objective, "batch": batch, "steps": steps,
            "step_s": seconds / steps, "samples_per_s": batch * steps / seconds,
            "peak_rss_mib": peak_rss_mib(), "rss_growth_mib": peak_rss_mib() - before,
            "loss": float(loss), "parameters": model.num_parameters()}


def in_subprocess(kind: str, objective: str, batch: int, steps: int) -> dict:
    return run_isolated(__file__, kind, objective, batch, steps,
                        env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--out", default="tools/results/bench_train.json")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, objective, batch, steps = args.one
        print(json.dumps(run_one(kind, objective, int(batch), int(steps))))
        return

    plain = in_subprocess("plain", "ocn", args.batch, args.steps)
    rows = [plain] + [in_subprocess(f"zero{s}", "ocn", args.batch, args.steps) for s in args.stages]
    random_mask = in_subprocess("plain", "random", args.batch, args.steps)
    device = "cuda" if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    print(f"reference model ({plain['parameters']:,} parameters), batch {args.batch}, {args.steps} timed "
          f"steps, {device}; baseline = plain PyTorch loop, OCN objective")
    print(f"{'config':<10} {'step s':>8} {'samples/s':>10} {'vs plain':>9} {'peak RSS MiB':>13}")
    for r in rows:
        r["ratio_vs_plain"] = r["samples_per_s"] / plain["samples_per_s"]
        print(f"{r['config']:<10} {r['step_s']:>8.2f} {r['samples_per_s']:>10.1f} "
              f"{r['ratio_vs_plain']:>8.2f}x {r['peak_rss_mib']:>13.0f}")
    ocn_cost = plain["step_s"] / random_mask["step_s"]
    print(f"\nOCN vs random masking (plain loop): {plain['step_s']:.2f} s vs {random_mask['step_s']:.2f} s "
          f"per step -> OCN costs {ocn_cost:.2f}x (probe pass + nested views)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "train_step", "device": device, "baseline": "plain PyTorch",
                               "rows": rows, "random_masking": random_mask,
                               "ocn_over_random_step_time": ocn_cost}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
