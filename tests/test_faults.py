"""Faults of files and disks: each one gets one clear error naming the file, and nothing of
the failed stage is published (the previous output stays)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.paths import CONFIGS

from diffgrm_dist.core.config import ModelConfig
from diffgrm_dist.core.errors import DataError, DiffGRMError
from diffgrm_dist.core.rundir import RunDir
from diffgrm_dist.data.loaders import ShardSet
from diffgrm_dist.model.export import EXPORT_WEIGHTS, export_weights, load_exported
from diffgrm_dist.model.network import DiffGRM, SidSpec

pytestmark = pytest.mark.faults
TINY = CONFIGS / "tiny.yaml"


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


def _flip_byte(path, offset: int = 600) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_shard_is_named_before_it_is_read(run_copy):
    shard = sorted((run_copy / "shard" / "train").glob("*.tar"))[0]
    assert ShardSet.load(run_copy / "shard", "train").samples > 0  # intact: loads
    _flip_byte(shard)
    with pytest.raises(DataError, match=rf"{shard.name}: sha256 .* does not match shards.json"):
        ShardSet.load(run_copy / "shard", "train")
    shard.unlink()
    with pytest.raises(DataError, match=rf"{shard.name}: shard listed in shards.json is missing"):
        ShardSet.load(run_copy / "shard", "train")


def test_training_on_a_corrupt_shard_stops_with_one_clear_error(run_copy, run_cli):
    shard = sorted((run_copy / "shard" / "train").glob("*.tar"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # half-copied
    code, _, err = run_cli("train", "-c", TINY, "-o", run_copy, "train.launcher=local", "train.epochs=1",
                           "train.wandb_mode=disabled")
    assert code == 2 and shard.name in err and "half-copied" in err
    assert not (run_copy / "train").exists()


def test_an_edited_or_truncated_manifest_is_one_clear_error(run_copy, run_cli):
    path = run_copy / "tokenize" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert RunDir(run_copy).manifest("tokenize") == manifest  # as written: accepted
    manifest["config_hash"] = "0" * 16  # an edit that would make a stale stage look current
    path.write_text(json.dumps(manifest))
    code, _, err = run_cli("shard", "-c", TINY, "-o", run_copy, "--force")
    assert code == 2 and "tokenize/manifest.json: edited after the stage wrote it" in err
    path.write_text(path.read_text()[:40])
    code, _, err = run_cli("shard", "-c", TINY, "-o", run_copy)
    assert code == 2 and "tokenize/manifest.json: not valid JSON" in err


def test_a_corrupt_model_file_is_one_clear_error(tmp_path):
    spec = SidSpec((16, 16), 8, items=40)
    cfg = ModelConfig(d_model=32, heads=2, ffn=64, encoder_layers=1, decoder_layers=1)
    torch.manual_seed(0)
    export_weights(DiffGRM(cfg, spec).state_dict(), cfg, spec, tmp_path)
    assert isinstance(load_exported(tmp_path), DiffGRM)
    weights = tmp_path / EXPORT_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(DiffGRMError, match=rf"{EXPORT_WEIGHTS}: corrupt or not this model's weights"):
        load_exported(tmp_path)
    weights.unlink()
    with pytest.raises(DiffGRMError, match=rf"{EXPORT_WEIGHTS}: missing"):
        load_exported(tmp_path)


def test_a_full_disk_publishes_nothing_and_keeps_the_previous_output(run_copy):
    """The shard stage re-runs (forced) under a file-size limit of 16 KiB, so its first
    large write fails as a full disk would; the previous shards must stay untouched."""
    before = {p.relative_to(run_copy).as_posix(): p.read_bytes()
              for p in (run_copy / "shard").rglob("*") if p.is_file()}
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))
        from diffgrm_dist.cli import main
        sys.exit(main(["shard", "-c", {str(TINY)!r}, "-o", {str(run_copy)!r}, "--force",
                       "shard.samples_per_shard=100000"]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "out of disk space" in done.stderr and "published nothing" in done.stderr
    after = {p.relative_to(run_copy).as_posix(): p.read_bytes()
             for p in (run_copy / "shard").rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".shard.tmp")]


def test_a_corrupt_checkpoint_is_skipped_for_the_previous_complete_one(run_copy, tmp_path, caplog):
    """Two epochs leave two checkpoints; the newest is truncated; the next run resumes from
    the first (with a warning), trains epochs 2 and 3, and its history has each epoch once."""
    from diffgrm_dist.core.config import load_config
    from diffgrm_dist.train.checkpoints import LocalReporter
    from diffgrm_dist.train.trainer import train_worker

    work = tmp_path / "work"
    out = tmp_path / "out"
    out.mkdir()

    def train(epochs: int) -> None:
        cfg = load_config(TINY, ["train.launcher=local", f"train.epochs={epochs}", "train.wandb_mode=disabled",
                                 "train.valid_start_epoch=1", "train.patience=10"])
        train_worker({"cfg": cfg, "run_dir": str(run_copy), "out_dir": str(out), "work_dir": str(work),
                      "launcher": "local", "threads": 1})

    train(2)
    reporter = LocalReporter(work)
    assert [p.name for p in reporter._epochs()] == ["epoch-00001", "epoch-00002"]
    assert reporter.latest().name == "epoch-00002"
    newest = work / "epoch-00002"
    biggest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 3])
    with caplog.at_level("WARNING", logger="diffgrm_dist.train.checkpoints"):
        assert reporter.latest().name == "epoch-00001"
    assert "epoch-00002 skipped" in caplog.text and "truncated or corrupt" in caplog.text

    train(3)
    state = json.loads((reporter.latest() / "train_state.json").read_text())
    assert [r["epoch"] for r in state["history"]] == [1, 2, 3]


def test_the_newest_intact_ray_checkpoint_is_chosen(tmp_path):
    """The Ray launcher's resume point, on the same rule: a checkpoint folder whose files
    do not match its checksums (or that has none) is passed over."""
    from diffgrm_dist.train.checkpoints import STATE_FILE, latest_ray_checkpoint, write_checksums

    root = tmp_path / "ray" / "train"
    for stamp in ("2026-01-01_00-00-01", "2026-01-01_00-00-02", "2026-01-01_00-00-03"):
        folder = root / f"checkpoint_{stamp}"
        (folder / "ds").mkdir(parents=True)
        (folder / STATE_FILE).write_text("{}")
        (folder / "ds" / "weights.pt").write_bytes(bytes(range(256)) * 8)
        write_checksums(folder, rank=0)
    assert latest_ray_checkpoint(str(tmp_path / "ray"), None, "train").endswith("00-00-03")
    _flip_byte(root / "checkpoint_2026-01-01_00-00-03" / "ds" / "weights.pt")
    (root / "checkpoint_2026-01-01_00-00-02" / "checksums.rank0.json").unlink()
    assert latest_ray_checkpoint(str(tmp_path / "ray"), None, "train").endswith("00-00-01")
    _flip_byte(root / "checkpoint_2026-01-01_00-00-01" / STATE_FILE, offset=0)
    assert latest_ray_checkpoint(str(tmp_path / "ray"), None, "train") is None


# --------------------------------------------------------------------------- killed workers


@pytest.mark.slow
def test_a_killed_ranking_actor_is_retried_and_every_user_is_ranked_once(tiny_run, tmp_path):
    import pyarrow.parquet as pq
    from faultlib import run_with_one_kill

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    base = ["-c", str(TINY), "-o", str(run), "train.launcher=local", "train.epochs=1", "train.wandb_mode=disabled"]
    assert subprocess.run([sys.executable, "-m", "diffgrm_dist.cli", "train", *base],
                          capture_output=True).returncode == 0
    args = ["evaluate", *base, "eval.num_actors=2", "eval.batch_size=8"]
    reference = subprocess.run([sys.executable, "-m", "diffgrm_dist.cli", *args], capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-2000:]
    want = pq.read_table(run / "evaluate" / "rankings").to_pydict()
    done, report = run_with_one_kill([*args, "--force"], "ray::Ranker.rank", delay_s=0.5)
    assert done.returncode == 0, done.stdout[-3000:]
    assert report["killed"] is not None, "the ranking finished before the kill: nothing was tested"
    got = pq.read_table(run / "evaluate" / "rankings").to_pydict()
    assert got["user"] == want["user"] and got["item"] == want["item"]  # each user once, same order


@pytest.mark.slow
def test_a_killed_embedding_actor_is_retried_and_the_sids_are_the_same(tiny_run, tmp_path):
    from faultlib import run_with_one_kill

    runs = {}
    for name in ("reference", "killed"):
        runs[name] = tmp_path / name
        shutil.copytree(tiny_run, runs[name])
    def args(name: str) -> list[str]:  # an empty cache each: every shard is embedded again
        return ["tokenize", "-c", str(TINY), "-o", str(runs[name]), f"tokenize.embedding_cache={tmp_path / name}.cache",
                "tokenize.num_actors=2", "tokenize.shard_items=50", "--force"]
    reference = subprocess.run([sys.executable, "-m", "diffgrm_dist.cli", *args("reference")],
                               capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert reference.returncode == 0, reference.stderr[-2000:]
    done, report = run_with_one_kill(args("killed"), "ray::EmbedWorker.embed")
    assert done.returncode == 0, done.stdout[-3000:]
    assert report["killed"] is not None, "the embedding finished before the kill: nothing was tested"
    want = (runs["reference"] / "tokenize" / "sids.parquet").read_bytes()
    assert (runs["killed"] / "tokenize" / "sids.parquet").read_bytes() == want


@pytest.mark.slow
def test_a_killed_training_rank_is_restarted_and_the_job_finishes(tiny_run, tmp_path):
    from faultlib import run_with_one_kill

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    args = ["train", "-c", str(TINY), "-o", str(run), "train.epochs=4", "train.wandb_mode=disabled",
            "train.max_failures=2"]

    def after_first_checkpoint() -> bool:
        return any((run / "train.work").rglob("checkpoint_*/train_state.json"))

    done, report = run_with_one_kill(args, "ray::RayTrainWorker", when=after_first_checkpoint)
    assert report["killed"] is not None, "training finished before the kill: nothing was tested"
    assert done.returncode == 0, done.stdout[-3000:]
    history = [json.loads(line) for line in (run / "train" / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]  # each epoch once in the kept history


# --------------------------------------------------------------------------- impossible resources


@pytest.mark.parametrize("stage,override,what", [
    ("train", "train.num_workers=64", "train.num_workers=64"),
    ("tokenize", "tokenize.num_actors=64", "tokenize.num_actors"),
])
def test_a_request_the_cluster_can_never_satisfy_fails_at_once(tiny_run, tmp_path, run_cli, stage, override, what):
    import time

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    extra = [f"tokenize.embedding_cache={tmp_path / 'empty-cache'}", "tokenize.shard_items=4"] \
        if stage == "tokenize" else ["train.wandb_mode=disabled"]
    start = time.perf_counter()
    code, _, err = run_cli(stage, "-c", TINY, "-o", run, override, *extra, "--force")
    assert code == 2 and what in err and "can never run this" in err and "the cluster has" in err
    assert time.perf_counter() - start < 120
    before = tiny_run / stage / "manifest.json"  # nothing published: the earlier output, or none
    assert (run / stage / "manifest.json").read_bytes() == before.read_bytes() if before.is_file() \
        else not (run / stage).exists()


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_at_the_exact_window(tiny_run, tmp_path):
    """Step checkpoints: a SIGKILL between two of them loses only the steps since the last;
    the resumed run skips the windows already trained on, and every epoch's windows (their
    digest), loss and validation equal those of a run that was never interrupted."""
    import signal
    import time

    from faultlib import DIFFGRM

    def args(run) -> list[str]:
        return [DIFFGRM, "train", "-c", str(TINY), "-o", str(run), "train.launcher=local", "train.epochs=2",
                "train.patience=10", "train.wandb_mode=disabled", "train.checkpoint_every_steps=4",
                "train.valid_start_epoch=1"]

    runs = {name: tmp_path / name for name in ("whole", "killed")}
    for run in runs.values():
        shutil.copytree(tiny_run, run)
    whole = subprocess.run(args(runs["whole"]), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    proc = subprocess.Popen(args(runs["killed"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill after a mid-epoch-2 checkpoint
        if list(runs["killed"].glob("train.work/*/local/epoch-00001.step-*/checksums.rank0.json")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(args(runs["killed"]), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "+ " in resumed.stderr and " steps" in resumed.stderr

    def history(run) -> list[dict]:
        return [json.loads(line) for line in (run / "train" / "history.jsonl").read_text().splitlines()]

    a, b = history(runs["whole"]), history(runs["killed"])
    assert [r["epoch"] for r in b] == [1, 2]
    assert [r["windows_digest"] for r in a] == [r["windows_digest"] for r in b]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6)
    assert [r["item/ndcg@10"] for r in b] == pytest.approx([r["item/ndcg@10"] for r in a], rel=1e-6)
    assert a[0]["windows_digest"] != a[1]["windows_digest"]  # each epoch reshuffles
