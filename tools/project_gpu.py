"""Projected time of the paper-scale configs (``configs/{beauty,sports,toys}.yaml``) on one
GPU, from FLOPs and kernel counts measured here on CPU.

Measured, per dataset, with the config's own model: the FLOPs (``torch.utils.flop_counter``)
and the number of ATen ops (~ GPU kernels in eager mode) of one OCN training step at the
config's batch size, on histories as wide as the dataset's length-bucketed batches are on
average; and the FLOPs and ops of CPD for one batch of users at the validation and test
beams, on a random catalogue of the dataset's size. The step count comes from the dataset
(training windows / batch x epochs), validation from the config (every epoch from
``valid_start_epoch``, all users); early stopping (patience 15) can only shorten it.

Projection, per phase: max(FLOPs / (peak x MFU), ops x launch), i.e. a matmul-bound and a
launch-bound estimate, the larger winning. Defaults: H200 bf16 dense peak 989 TFLOP/s,
MFU 10% (a 5.6M-parameter model's matmuls are small), 8 us per eager op (launch plus
Python dispatch). All three are flags; the JSON keeps the measured counts so any other
assumption can be applied to them.

    python tools/project_gpu.py                  # writes results/gpu_projection.{json,md}
    python tools/project_gpu.py --mfu 0.3 --launch-us 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, device_string, git_info  # noqa: E402

DATASETS = ("beauty", "sports", "toys")
BUCKET_BATCHES = 16
PROBE_BATCH = 64  # samples per measured step (FLOPs and ops scale linearly with it)
PROBE_USERS = 8   # users per measured CPD batch


def window_lengths(cfg) -> tuple[np.ndarray, int, int]:
    """History lengths of the dataset's training windows (t = min_history .. n-3, capped),
    the number of users and of distinct items."""
    path = Path(cfg.data.path) / "user_sequence.txt"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (the projection reads the dataset's sequences)")
    out, items = [], set()
    with path.open() as f:
        for line in f:
            seq = line.split()[1:]
            if len(seq) >= cfg.data.min_user_items:
                items.update(seq)
                out.append(np.minimum(np.arange(cfg.prepare.min_history, len(seq) - 2), cfg.prepare.max_history))
    return np.concatenate(out), len(out), len(items)


def mean_bucketed_width(lengths: np.ndarray, batch: int, seed: int = 0) -> float:
    shuffled = np.random.default_rng(seed).permutation(lengths)
    count = len(shuffled) // batch
    chunk = BUCKET_BATCHES * batch
    shuffled = np.concatenate([np.sort(shuffled[i:i + chunk]) for i in range(0, count * batch, chunk)])
    return float(shuffled[:count * batch].reshape(count, batch).max(1).mean())


class OpCounter:
    """Counts ATen ops dispatched inside the block (each is one or a few kernels on GPU)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops += 1
                return func(*args, **(kwargs or {}))

        self.ops, self._mode = 0, Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def measure(dataset: str) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffgrm_dist.core.config import load_config
    from diffgrm_dist.decode.catalogue import Catalogue
    from diffgrm_dist.decode.search import cpd
    from diffgrm_dist.evaluate.ranking import MAX_BATCH_USERS
    from diffgrm_dist.model.network import SidSpec
    from diffgrm_dist.train.engine import build_model, build_objective

    cfg = load_config(ROOT / "configs" / f"{dataset}.yaml")
    torch.manual_seed(0)
    lengths, users, items = window_lengths(cfg)
    batch = cfg.train.batch_size
    width = int(round(mean_bucketed_width(lengths, batch)))
    n, k = cfg.tokenize.digits, cfg.tokenize.codebook_size
    spec = SidSpec((k,) * n, cfg.prepare.max_history)
    model = build_model(cfg.model, spec)
    objective = build_objective(model, cfg).train()
    params = sum(p.numel() for p in model.parameters())
    history = torch.randint(0, k, (PROBE_BATCH, width, n))
    mask = torch.ones(PROBE_BATCH, width, dtype=torch.bool)
    targets = torch.randint(0, k, (PROBE_BATCH, n))
    with FlopCounterMode(display=False) as flops, OpCounter() as ops:
        loss = objective(history, mask, targets)
        loss.backward()
    scale = batch / PROBE_BATCH
    step = {"flops": flops.get_total_flops() * scale, "ops": ops.ops, "history_width": width, "batch": batch}
    # The optimiser: fused AdamW is a handful of kernels over all parameters, ~16 FLOPs each.
    step["flops"] += 16 * params
    step["ops"] += 4 * len(list(model.parameters()))  # unfused: ~4 ops per tensor

    codes = np.random.default_rng(0).integers(0, k, (items, n))
    catalogue = Catalogue(codes, (k,) * n)
    model.eval()
    decode = {}
    for name, beam in (("valid", cfg.eval.valid_beam_size), ("test", cfg.eval.beam_size)):
        h = torch.randint(0, k, (PROBE_USERS, width, n))
        m = torch.ones(PROBE_USERS, width, dtype=torch.bool)
        with torch.no_grad(), FlopCounterMode(display=False) as f, OpCounter() as o:
            cpd(model, model.encode(h, m), catalogue, beam)
        decode[name] = {"beam": beam, "flops_per_user": f.get_total_flops() / PROBE_USERS,
                        "ops_per_batch": o.ops, "users": users}
    steps_per_epoch = len(lengths) // batch
    valid_epochs = max(0, cfg.train.epochs - cfg.train.valid_start_epoch + 1)
    return {"dataset": dataset, "config": f"configs/{dataset}.yaml", "parameters": params, "items": items,
            "train_windows": int(len(lengths)), "steps_per_epoch": steps_per_epoch, "epochs": cfg.train.epochs,
            "steps": steps_per_epoch * cfg.train.epochs, "valid_epochs": valid_epochs, "step": step,
            # eval.batch_size 0: the GPU's own choice, at most MAX_BATCH_USERS users
            "decode": decode, "eval_batch": cfg.eval.batch_size or MAX_BATCH_USERS}


def project(m: dict, peak: float, mfu: float, launch: float) -> dict:
    def seconds(flops: float, ops: float) -> float:
        return max(flops / (peak * mfu), ops * launch)

    train = m["steps"] * seconds(m["step"]["flops"], m["step"]["ops"])
    out = {"train_h": train / 3600}
    for name, d in m["decode"].items():
        batches = -(-d["users"] // m["eval_batch"])
        per_pass = batches * seconds(d["flops_per_user"] * m["eval_batch"], d["ops_per_batch"])
        out[f"{name}_h"] = per_pass * (m["valid_epochs"] if name == "valid" else 1) / 3600
    out["total_h"] = sum(out.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H200: 989)")
    parser.add_argument("--mfu", type=float, default=0.10)
    parser.add_argument("--launch-us", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_projection")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rows, lines = [], [
        "# Paper-scale configs on one GPU: projected time", "",
        f"Generated by `python tools/project_gpu.py` (commit {git_info(ROOT)['commit'][:7]}; counted on "
        f"{device_string()}). Assumptions: {args.peak_tflops:.0f} TFLOP/s bf16 peak, MFU {args.mfu:.0%}, "
        f"{args.launch_us:.0f} us per eager op; each phase is the larger of its FLOP-bound and launch-bound "
        "time. Upper bound on epochs: early stopping (patience 15) can only shorten training.", "",
        "| dataset | params | steps (epochs) | GFLOP/step | ops/step | train h | valid h | test h | total h "
        f"| total h at MFU {args.mfu / 2:.0%}, {3 * args.launch_us:.0f} us/op |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for dataset in args.datasets:
        m = measure(dataset)
        p = project(m, args.peak_tflops * 1e12, args.mfu, args.launch_us * 1e-6)
        slow = project(m, args.peak_tflops * 1e12, args.mfu / 2, 3 * args.launch_us * 1e-6)
        rows.append({**m, "projection": p, "projection_slow": slow})
        lines.append(f"| {dataset} | {m['parameters'] / 1e6:.1f}M | {m['steps']:,} ({m['epochs']}) | "
                     f"{m['step']['flops'] / 1e9:.0f} | {m['step']['ops']:,} | {p['train_h']:.2f} | "
                     f"{p['valid_h']:.2f} | {p['test_h']:.2f} | {p['total_h']:.2f} | {slow['total_h']:.2f} |")
        print(lines[-1], flush=True)
    lines += ["", "Command a GPU user runs (one GPU; the cluster configs under `cluster/` scale it out):", "",
              "```", *[f"diffgrm pipeline -c configs/{d}.yaml -o runs/{d} train.use_gpu=true train.bf16=true eval.autocast_bf16=true" for d in args.datasets],
              "```"]
    payload = {"assumptions": {"peak_tflops": args.peak_tflops, "mfu": args.mfu, "launch_us": args.launch_us},
               "commit": git_info(ROOT)["commit"], "device": device_string(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
