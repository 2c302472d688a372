"""`diffgrm stress`: a tiny grid on a local Ray instance (every point a real Ray task, real
DeepSpeed steps, real limits), its validation, and the grid spread over a real two-node
cluster (marked `cluster`)."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers.paths import CONFIGS, ROOT

from diffgrm_dist.cluster.raycluster import free_port
from diffgrm_dist.core.errors import ConfigError
from diffgrm_dist.stress.config import expand, flatten, load_stress_config, method, resolved
from diffgrm_dist.stress.report import growth_fits

VENV_BIN = Path(sys.executable).parent
TINY = {
    "name": "tiny", "users": 8, "history": 8, "train_steps": 2,
    "limits": {"timeout_s": 420, "memory_gib": 4},  # DeepSpeed points on a loaded 2-core machine
    "sweeps": [
        {"name": "beam", "kind": "decode", "decode": {"items": 2000, "model": {"d_model": 32, "decoder_layers": 1},
                                                       "eval": {"batch_size": 4}},
         "vary": {"eval.beam_size": [4, 16], "model.decoder": ["diffusion", "autoregressive"]}},
        {"name": "starved", "kind": "decode", "memory_gib": 0.05, "decode": {"items": 2000, "model": {"d_model": 32}}},
        {"name": "slow", "kind": "decode", "timeout_s": 0.5, "decode": {"items": 2000, "model": {"d_model": 32}}},
        {"name": "zero", "kind": "train",
         "train": {"model": {"d_model": 32, "decoder_layers": 1}, "train": {"batch_size": 8}},
         "vary": {"train.zero_stage": [0, 3]}},
        {"name": "largest", "kind": "largest", "memory_gib": 1.5,
         "train": {"model": {"d_model": 512}, "train": {"batch_size": 4}},
         "search": "model.decoder_layers", "search_start": 2, "search_max": 1024, "search_step": 2},
    ],
}


def write_grid(tmp_path: Path, grid: dict) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.mark.slow
def test_stress_grid_measures_records_limits_and_fits_growth(tmp_path, run_cli):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("stress", "-c", write_grid(tmp_path, TINY), "-o", out)
    assert code == 0, stderr
    table = pd.read_parquet(out / "stress.parquet")
    by_sweep = {name: rows for name, rows in table.groupby("sweep")}
    beam = by_sweep["beam"]
    assert len(beam) == 4 and (beam["status"] == "ok").all() and (beam["users_per_s"] > 0).all()
    assert (beam["distinct_codes_per_user"] <= beam["eval.beam_size"]).all() and (beam["distinct_codes_per_user"] >= 1).all()
    # Over a limit: killed, recorded with the limit it hit, and the sweep went on.
    starved, slow = by_sweep["starved"].iloc[0], by_sweep["slow"].iloc[0]
    assert starved["status"] == "oom" and "memory_gib=0.05" in starved["limit"]
    assert slow["status"] == "timeout" and "timeout_s=0.5" in slow["limit"]
    zero = by_sweep["zero"]
    assert (zero["status"] == "ok").all() and (zero["samples_per_s"] > 0).all(), zero[["status", "limit"]].to_string()
    assert zero["parameters"].nunique() == 1  # ZeRO-3 partitions the weights; the count is the model's
    # The search grew the decoder until it no longer fit, then closed in (64 MiB of weights
    # and optimizer state a layer: sampled RSS noise cannot reorder sizes 2 layers apart).
    largest = by_sweep["largest"]
    fits, fails = largest[largest["status"] == "ok"], largest[largest["status"] == "oom"]
    assert len(fits) >= 2 and len(fails) >= 1 and len(largest) == len(fits) + len(fails)
    assert 0 < fails["model.decoder_layers"].min() - fits["model.decoder_layers"].max() <= 2
    assert (largest["model.heads"] == 8).all() and (largest["model.ffn"] == 2048).all()  # derived from d_model 512
    assert table["node_id"].str.len().gt(0).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stats"]["points"] == len(table) and manifest["stats"]["oom"] >= 2
    beam_fits = [f for f in manifest["fits"] if f["sweep"] == "beam" and f["axis"] == "eval.beam_size"]
    assert {f["group"]["model.decoder"] for f in beam_fits} == {"diffusion", "autoregressive"}
    # The fitted exponent is the log-log slope of the measured CPU seconds per user (its sign
    # on a 2-point tiny grid is timing noise, so the test checks the fit, not the machine).
    for fit in beam_fits:
        points = beam[beam["model.decoder"] == fit["group"]["model.decoder"]].sort_values("eval.beam_size")
        slope = np.polyfit(np.log(points["eval.beam_size"]), np.log(points["cpu_s"] / points["timed_users"]), 1)[0]
        assert fit["points"] == 2 and fit["exponent"] == pytest.approx(slope, abs=1e-3)
    report = (out / "report.md").read_text()
    assert "## Growth exponents" in report and "## Largest model" in report and "oom (memory_gib=0.05" in report
    assert (out / "plots" / "beam.png").stat().st_size > 0 and (out / "plots" / "zero.png").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]  # published by rename


def test_growth_fits_recover_known_exponents_per_group(tmp_path):
    """Cost per user built as c * beam^k for each decoder: the fit returns k for each group,
    with the paper's theory next to it; failed points are left out of the fit."""
    cfg = load_stress_config(write_grid(tmp_path, TINY))
    rows = [{"sweep": "beam", "kind": "decode", "status": "ok", "device": "cpu", "method": decoder,
             "model.decoder": decoder, "eval.beam_size": beam, "timed_users": 8, "seconds": 1.0,
             "cpu_s": 8 * 0.01 * beam ** exponent}
            for decoder, exponent in (("diffusion", 1.5), ("autoregressive", 0.5)) for beam in (4, 16, 64)]
    rows.append({**rows[0], "eval.beam_size": 256, "status": "oom", "cpu_s": 1e9})
    fits = {f["group"]["model.decoder"]: f for f in growth_fits(cfg, pd.DataFrame(rows))}
    assert fits["diffusion"]["exponent"] == pytest.approx(1.5) and fits["diffusion"]["points"] == 3
    assert fits["autoregressive"]["exponent"] == pytest.approx(0.5)
    assert fits["diffusion"]["theory"] == 1.0 and fits["diffusion"]["range"] == [4, 64]


def test_stress_config_errors_name_the_sweep_and_field(tmp_path):
    bad_axis = {**TINY, "sweeps": [{"name": "b", "kind": "decode", "vary": {"beams": [4]}}]}
    with pytest.raises(ConfigError, match=r"sweeps.b.vary: 'beams' is not an axis"):
        load_stress_config(write_grid(tmp_path, bad_axis))
    offload = {**TINY, "sweeps": [{"name": "o", "kind": "train",
                                   "train": {"train": {"offload_optimizer": True, "zero_stage": 0}}}]}
    with pytest.raises(ConfigError, match="sweeps.o: train.offload_optimizer needs train.zero_stage 1-3"):
        load_stress_config(write_grid(tmp_path, offload))
    buckets = {**TINY, "sweeps": [{"name": "z", "kind": "train", "train": {"train": {"zero_bucket_elements": 3}}}]}
    with pytest.raises(ConfigError, match="sweeps.z.train.zero_bucket_elements: must be 0 or a positive even"):
        load_stress_config(write_grid(tmp_path, buckets))
    decoder = {**TINY, "sweeps": [{"name": "d", "kind": "decode", "vary": {"model.decoder": ["dense"]}}]}
    with pytest.raises(ConfigError, match="sweeps.d.model.decoder: 'dense'"):
        load_stress_config(write_grid(tmp_path, decoder))
    with pytest.raises(ConfigError, match="distinct name"):
        load_stress_config(write_grid(tmp_path, {**TINY, "sweeps": [TINY["sweeps"][0]] * 2}))


def test_points_nest_the_experiment_sections_with_stress_defaults(tmp_path):
    """A point's model / eval / train are the experiment's own sections: a grid sets a few
    keys, the rest keep the point's defaults (not the experiment's), heads and FFN follow
    d_model, and kv_cache multiplies only the autoregressive points."""
    from diffgrm_dist.core.config import ModelConfig
    from diffgrm_dist.model.network import DiffGRM, SidSpec

    grid = {**TINY, "sweeps": [{"name": "n", "kind": "decode", "decode": {"model": {"d_model": 256}},
                                "vary": {"model.decoder": ["diffusion", "autoregressive"],
                                         "kv_cache": ["true", "false"], "eval.beam_size": [8]}}]}
    sweep = load_stress_config(write_grid(tmp_path, grid)).sweeps[0]
    points = [resolved(p) for p in expand(sweep)]
    assert [method(p) for p in points] == ["diffusion", "autoregressive", "autoregressive_nocache"]
    model = points[0].model
    assert isinstance(model, ModelConfig) and (model.decoder_layers, model.heads, model.ffn) == (2, 4, 1024)
    assert points[0].eval.beam_size == 8 and points[0].eval.fill_digits == 1
    flat = flatten(points[1])
    assert flat["model.d_model"] == 256 and flat["eval.beam_size"] == 8 and flat["kv_cache"] is True
    net = DiffGRM(model, SidSpec((256,) * 4, 8))  # the point's section builds the experiment's model
    assert net.num_parameters() == DiffGRM(ModelConfig(d_model=256, heads=4, ffn=1024, encoder_layers=1,
                                                       decoder_layers=2, dropout=0.0),
                                           SidSpec((256,) * 4, 8)).num_parameters()


@pytest.mark.parametrize("path", [CONFIGS / "stress.yaml", *sorted((CONFIGS / "stress").glob("*.yaml"))],
                         ids=lambda p: p.name)
def test_shipped_stress_grids_load(path):
    cfg = load_stress_config(path)
    points = [p for sweep in cfg.sweeps for p in expand(sweep)]
    assert points and all(resolved(p).model.d_model % resolved(p).model.heads == 0 for p in points)


@pytest.mark.slow
def test_a_point_that_rays_memory_monitor_kills_is_recorded_and_the_sweep_goes_on(tmp_path):
    """Near a node's size Ray's own memory monitor, not the point's limit, kills the task;
    the sweep must record that point and finish. A threshold below what the node already
    uses makes the monitor kill every task it sees."""
    grid = {**TINY, "sweeps": [{"name": "killed", "kind": "decode", "decode": {"items": 2000, "model": {"d_model": 32}}}]}
    out = tmp_path / "out"
    env = {**os.environ, "RAY_memory_usage_threshold": "0.01", "RAY_memory_monitor_refresh_ms": "100"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "diffgrm_dist.cli", "stress", "-c", str(write_grid(tmp_path, grid)),
                           "-o", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    row = pd.read_parquet(out / "stress.parquet").iloc[0]
    assert row["status"] == "oom" and "Ray's memory monitor" in row["limit"] and "GB used" in row["limit"]
    assert len(row["node_id"]) == 56 and row["hostname"]  # Ray names the node it killed the task on
    assert "oom (Ray's memory monitor" in (out / "report.md").read_text()


@pytest.mark.cluster
@pytest.mark.slow
def test_stress_grid_spreads_over_both_nodes_of_a_local_cluster(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="dgs-", dir="/tmp")  # short: Ray's socket paths
    port = free_port()
    env = {**os.environ, "DIFFGRM_RAY_TMP": ray_tmp, "DIFFGRM_RAY_PORT": str(port),
           "DIFFGRM_DASHBOARD_PORT": str(free_port()), "RAY": str(VENV_BIN / "ray"),
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # single-host mode, set by in-process Ray sessions
    script = str(ROOT / "tools" / "local_cluster.sh")
    started = subprocess.run(["bash", script, "start"], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=180)
    grid = {"name": "spread", "users": 4, "history": 4, "limits": {"timeout_s": 180, "memory_gib": 4},
            "sweeps": [{"name": "beam", "kind": "decode",
                        "decode": {"items": 1000, "model": {"d_model": 32, "decoder_layers": 1},
                                   "eval": {"batch_size": 4}},
                        "vary": {"eval.beam_size": [2, 4, 8, 16, 32, 64]}}]}
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        run = subprocess.run([str(VENV_BIN / "diffgrm"), "stress", "-c", str(write_grid(tmp_path, grid)),
                              "-o", str(tmp_path / "out")], env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        table = pd.read_parquet(tmp_path / "out" / "stress.parquet")
        assert (table["status"] == "ok").all() and len(table) == 6
        assert table["node_id"].nunique() == 2  # 1 CPU a node, 1 CPU a point: the grid used both
    finally:
        stopped = subprocess.run(["bash", script, "stop"], env=env, cwd=ROOT, capture_output=True, text=True,
                                 timeout=120)
        left = subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert left.stdout.strip() == "", f"processes left behind: {left.stdout}"
