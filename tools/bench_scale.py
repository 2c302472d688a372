"""The whole pipeline on synthetic data at growing sizes: each stage's wall time and peak
memory, and how they grow from one size to the next.

Sizes are interactions (default 100k, 1M, 10M); items and users grow with them (items =
interactions / 10, ~10 interactions a user). Item embeddings are synthetic (seeded unit
vectors, written block by block to Parquet) and enter through ``tokenize.embeddings``, so
no text model runs; the model is tiny and trains one short epoch (``train.max_steps``),
and evaluation ranks every test user. Each stage runs as its own ``diffgrm <stage>``
process; its memory is the peak, sampled every 0.2 s, of the summed proportional set size
(PSS: shared pages split between the processes that map them) of that process and all its
children, the Ray workers it starts included; its CPU time is the user + system seconds of
that tree (steadier than wall time on a shared machine). The baseline of every growth ratio is the
same stage at the previous size, in the same run.

    python tools/bench_scale.py                          # 100k, 1M, 10M interactions
    python tools/bench_scale.py --sizes 100000 1000000   # quicker
    python tools/bench_scale.py --prepare-only 100000000 # prepare alone at 100M
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml
from benchlib import ROOT, device_string, git_info, write_json

STAGES = ("prepare", "tokenize", "shard", "train", "evaluate")
DIM = 32


def experiment(interactions: int, embeddings: Path, max_steps: int) -> dict:
    """The bench's config: synthetic data of this size, a tiny model, one short epoch."""
    items = max(1000, interactions // 10)
    return {
        "name": f"scale-{interactions}",
        "data": {"format": "synthetic", "text_template": ["{title}"],
                 "synthetic": {"items": items, "interactions": interactions,
                               "categories": max(10, min(items // 500, 4000)), "mean_user_items": 10.0, "seed": 0}},
        "prepare": {"max_history": 20},
        "tokenize": {"embeddings": str(embeddings), "pca_dim": 0, "digits": 4, "codebook_size": 256,
                     "fit_items": 50_000, "block_items": 65_536, "opq_iters": 5, "kmeans_iters": 10},
        "shard": {"samples_per_shard": 50_000},
        "model": {"d_model": 32, "heads": 2, "ffn": 64, "encoder_layers": 1, "decoder_layers": 1,
                  "dropout": 0.0},
        "train": {"batch_size": 1024, "epochs": 1, "steps_per_epoch": max_steps, "warmup_steps": 10,
                  "valid_start_epoch": 2, "loader_workers": 0, "wandb_mode": "disabled",
                  "autocast_bf16": True},
        # Two ranking actors at every size (chunks of 4,096 users: at least two even at 100k).
        "eval": {"beam_size": 8, "valid_beam_size": 8, "batch_size": 1024, "chunk_users": 4096,
                 "num_actors": 2, "valid_users": 1000},
    }


def write_embeddings(path: Path, items: int, block: int = 262_144) -> None:
    """Seeded unit vectors for items ``i0 .. i{items-1}`` (the synthetic catalogue's ids)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_file() and pq.ParquetFile(path).metadata.num_rows == items:
        return
    schema = pa.schema([("item_id", pa.string()), ("embedding", pa.list_(pa.float32(), DIM))])
    tmp = path.with_suffix(".tmp")
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(tmp, schema) as sink:
        for lo in range(0, items, block):
            hi = min(items, lo + block)
            x = rng.normal(size=(hi - lo, DIM)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            ids = pa.array([f"i{i}" for i in range(lo, hi)])
            sink.write_table(pa.table({"item_id": ids,
                                       "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM)},
                                      schema=schema))
    tmp.rename(path)


class TreeSampler:
    """Peak summed PSS of a process and its descendants, and their CPU seconds (the last
    reading of each process seen), sampled in a thread. CPU time, unlike wall time, hardly
    depends on what else the machine runs."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.root, self.every_s, self.peak = psutil.Process(pid), every_s, 0
        self.cpu: dict[tuple[int, float], float] = {}  # (pid, start time) -> user + system s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_full_info().pss
                    times = proc.cpu_times()
                    self.cpu[(proc.pid, proc.create_time())] = times.user + times.system
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(self.every_s)

    def stop(self) -> tuple[float, float]:
        """(peak PSS in MiB, CPU seconds)."""
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20, sum(self.cpu.values())


def run_stage(stage: str, config: Path, run_dir: Path, log: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_BUILD_OPS": "0"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # Ray workers start twice as slowly without .pyc files
    cmd = [str(Path(sys.executable).parent / "diffgrm"), stage, "-c", str(config), "-o", str(run_dir), "--force"]
    start = time.perf_counter()
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(proc.pid)
        code = proc.wait()
    peak, cpu_s = sampler.stop()
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{stage} failed (exit {code}); see {log}")
    stats = json.loads((run_dir / stage / "stats.json").read_text())
    return {"wall_s": round(seconds, 2), "cpu_s": round(cpu_s, 1), "peak_pss_mib": round(peak, 1),
            "stats": stats}


def one_size(interactions: int, work: Path, max_steps: int, stages: tuple[str, ...]) -> dict:
    folder = work / f"n{interactions}"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = experiment(interactions, folder / "embeddings.parquet", max_steps)
    start = time.perf_counter()
    if "tokenize" in stages:
        write_embeddings(folder / "embeddings.parquet", cfg["data"]["synthetic"]["items"])
    embed_s = time.perf_counter() - start
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    row = {"interactions": interactions, "items": cfg["data"]["synthetic"]["items"],
           "synthetic_embeddings_s": round(embed_s, 2), "stages": {}}
    for stage in stages:
        row["stages"][stage] = result = run_stage(stage, config, folder / "run", folder / "log.txt")
        print(f"  {interactions:>11,} {stage:<9} {result['wall_s']:>8.1f} s {result['cpu_s']:>8.1f} cpu-s "
              f"{result['peak_pss_mib']:>9.0f} MiB",
              flush=True)
    prepare = row["stages"].get("prepare")
    if prepare:
        row["users"] = prepare["stats"]["users"]
        row["prepare_bytes_per_interaction"] = round(prepare["peak_pss_mib"] * 2**20 / interactions, 1)
    return row


def growth(rows: list[dict]) -> list[dict]:
    """Time and memory ratio of each stage between consecutive sizes."""
    out = []
    for small, big in zip(rows, rows[1:]):
        entry = {"from": small["interactions"], "to": big["interactions"],
                 "size_ratio": big["interactions"] / small["interactions"]}
        for stage in big["stages"]:
            if stage in small["stages"]:
                a, b = small["stages"][stage], big["stages"][stage]
                entry[stage] = {"time": round(b["wall_s"] / a["wall_s"], 2),
                                "cpu": round(b["cpu_s"] / a["cpu_s"], 2) if a.get("cpu_s") and "cpu_s" in b else None,
                                "memory": round(b["peak_pss_mib"] / a["peak_pss_mib"], 2)}
        if "prepare" in entry:  # memory each further interaction costs, fixed overhead aside
            extra = big["stages"]["prepare"]["peak_pss_mib"] - small["stages"]["prepare"]["peak_pss_mib"]
            entry["prepare_bytes_per_interaction"] = round(extra * 2**20 / (big["interactions"] - small["interactions"]), 1)
        out.append(entry)
    return out


def markdown(result: dict) -> str:
    """The scale table: per stage, time and peak memory at each size, then the growth."""
    rows = result["sizes"]
    head = "| stage | " + " | ".join(f"{r['interactions']:,} interactions ({r['items']:,} items, "
                                     f"{r.get('users', 0):,} users)" for r in rows) + " |"
    lines = [f"`{result['command']}` at commit {str(result['git']['commit'])[:7]} on {result['device']}, "
             f"{result['memory_gib']} GiB. Each cell: wall time (CPU seconds of the stage's process "
             "tree), peak PSS of that tree (Ray workers included)."]
    if rows:
        lines += ["", head, "|---|" + "---|" * len(rows)]
        for stage in STAGES:
            cells = [f"{r['stages'][stage]['wall_s']:.1f} s ({r['stages'][stage].get('cpu_s', float('nan')):,.0f} "
                     f"cpu-s), {r['stages'][stage]['peak_pss_mib']:,.0f} MiB" if stage in r["stages"] else "-"
                     for r in rows]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    if result["growth"]:
        lines += ["", "| growth | " + " | ".join(f"x{g['size_ratio']:g}: {g['from']:,} -> {g['to']:,}"
                                               for g in result["growth"]) + " |",
                  "|---|" + "---|" * len(result["growth"])]
        for stage in STAGES:
            lines.append(f"| {stage} | " + " | ".join(
                f"time x{g[stage]['time']:.2f} (cpu x{g[stage].get('cpu') or float('nan'):.2f}), "
                f"memory x{g[stage]['memory']:.2f}" if stage in g else "-"
                for g in result["growth"]) + " |")
    for r in result["prepare_only"]:
        p = r["stages"]["prepare"]
        lines.append(f"\nprepare alone at {r['interactions']:,} interactions: {p['wall_s']:.0f} s, "
                     f"{p['peak_pss_mib']:,.0f} MiB")
    for g in result["prepare_growth"]:
        lines.append(f"\nprepare, {g['from']:,} -> {g['to']:,} interactions: "
                     f"{g['prepare_bytes_per_interaction']:.0f} bytes of peak memory per further interaction")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["interactions"] for r in rows]
    for stage in STAGES:
        if all(stage in r["stages"] for r in rows):
            axes[0].plot(x, [r["stages"][stage]["wall_s"] for r in rows], marker="o", label=stage)
            axes[1].plot(x, [r["stages"][stage]["peak_pss_mib"] / 1024 for r in rows], marker="o", label=stage)
    for ax, label in zip(axes, ("wall time (s)", "peak memory, PSS (GiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("interactions")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.suptitle("diffgrm pipeline on synthetic data (2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--prepare-only", type=int, nargs="*", default=[],
                        help="further sizes at which only the prepare stage runs")
    parser.add_argument("--max-steps", type=int, default=100, help="training steps (batches of 1024)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/diffgrm-scale"))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "scale")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'interactions':>13} {'stage':<9} {'wall':>10} {'cpu':>14} {'peak':>13}")
    rows = [one_size(n, args.work, args.max_steps, STAGES) for n in args.sizes]
    prepare_only = [one_size(n, args.work, args.max_steps, ("prepare",)) for n in args.prepare_only]
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "git": git_info(ROOT),
              "device": device_string(), "cpus": os.cpu_count(),
              "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
              "sizes": rows, "growth": growth(rows), "prepare_only": prepare_only,
              "prepare_growth": growth([r for r in rows + prepare_only if "prepare" in r["stages"]])}
    write_json(args.out / "bench_scale.json", result)
    (args.out / "bench_scale.md").write_text(markdown(result))
    if len(rows) > 1:
        plot(rows, args.out / "bench_scale.png")
    for entry in result["growth"]:
        print(f"x{entry['size_ratio']:g} ({entry['from']:,} -> {entry['to']:,}): " + ", ".join(
            f"{s} time x{entry[s]['time']:.2f} mem x{entry[s]['memory']:.2f}" for s in STAGES if s in entry))
    print(f"wrote {args.out / 'bench_scale.json'}")


if __name__ == "__main__":
    main()
