"""Collaborative SIDs (``tokenize.collaborative_dim``): co-occurrence counts, PPMI + SVD
vectors, and the tokenize stage joining them with the text embeddings. Real faiss, real
Ray, the real text model (through the shared tiny run's embedding cache)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.paths import CONFIGS
from helpers.runfiles import cached_text_embeddings, sid_codes

from diffgrm_dist.core.errors import ConfigError
from diffgrm_dist.tokenize.collaborative import cooccurrence, join, ppmi_svd
from diffgrm_dist.tokenize.quantize import Quantizer

TINY = CONFIGS / "tiny.yaml"


def write_histories(path, histories: list[list[int]]) -> None:
    pq.write_table(pa.table({"user": pa.array(np.arange(len(histories))),
                             "history": pa.array(histories, pa.large_list(pa.int64())),
                             "target": pa.array(np.zeros(len(histories), np.int64))}), path, row_group_size=2)


def test_cooccurrence_counts_pairs_within_the_window_of_one_history(tmp_path):
    histories = [[0, 1, 2], [2, 3], [4], [1, 0, 1, 5]]
    path = tmp_path / "valid.parquet"
    write_histories(path, histories)  # 2 rows per row group: batches never join users
    expected = np.zeros((6, 6))
    for h in histories:
        for i in range(len(h)):
            for j in range(i + 1, min(i + 3, len(h))):
                expected[h[i], h[j]] += 1 / (j - i)
                expected[h[j], h[i]] += 1 / (j - i)
    counts = cooccurrence(path, 6, window=2, batch_rows=2).toarray()
    np.testing.assert_allclose(counts, expected)
    assert counts[3, 4] == counts[2, 4] == 0  # never across users: 3 ends one history, 4 starts the next
    with pytest.raises(ConfigError, match="collaborative_window"):
        cooccurrence(path, 6, window=0)


def test_ppmi_vectors_put_items_taken_together_close():
    """Two groups of items that only co-occur within their group; item 8 with nothing."""
    rng = np.random.default_rng(0)
    rows, cols = [], []
    for group in (np.arange(0, 4), np.arange(4, 8)):
        for _ in range(200):
            a, b = rng.choice(group, 2, replace=False)
            rows += [a, b]
            cols += [b, a]
    import scipy.sparse as sp

    counts = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(9, 9))
    vectors = ppmi_svd(counts, dim=4, seed=0)
    assert vectors.shape == (9, 4) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors[:8], axis=1), 1.0, atol=1e-5)
    assert not vectors[8].any()  # no co-occurrence: no vector
    cosine = vectors[:8] @ vectors[:8].T
    within = np.mean([cosine[i, j] for i in range(8) for j in range(8) if i != j and i // 4 == j // 4])
    across = np.mean([cosine[i, j] for i in range(8) for j in range(8) if i // 4 != j // 4])
    assert within > across + 0.5
    np.testing.assert_array_equal(vectors, ppmi_svd(counts, dim=4, seed=0))  # seeded: repeatable


def test_join_weights_the_parts_by_squared_norm():
    text = np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)
    cf = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    joined = join(text, cf, weight=0.36)
    np.testing.assert_allclose(joined[0], [0.8 * 0.6, 0.8 * 0.8, 0.6, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(joined[1], [0.0, 0.8, 0.0, 0.0, 0.0], atol=1e-6)  # no vector: text alone


@pytest.mark.slow
def test_tokenize_codes_the_joined_vectors(tiny_run, tmp_path, run_cli):
    run = tmp_path / "cf"
    overrides = ["tokenize.collaborative_dim=8", "tokenize.collaborative_window=3",
                 f"tokenize.embedding_cache={tiny_run / 'embeddings'}"]
    assert run_cli("prepare", "-c", TINY, "-o", run)[0] == 0
    code, out, err = run_cli("tokenize", "-c", TINY, "-o", run, *overrides)
    assert code == 0, out + err
    stats = json.loads((run / "tokenize" / "stats.json").read_text())
    info = stats["embedding"]["collaborative"]
    assert stats["embedding_dim"] == 384 + 8 and (info["dim"], info["window"]) == (8, 3)
    assert 0 < info["items_with_vector"] <= stats["items"]
    assert stats["embedding"]["reused_shards"] == 3  # the text model did not run again

    # The SIDs are the saved quantiser's codes of [text, co-occurrence] vectors built from
    # the validation histories, recomputed here from scratch.
    quantizer, meta = Quantizer.load(run / "tokenize" / "quantizer")
    assert quantizer.dim == 392 and meta["collaborative_dim"] == 8
    text = cached_text_embeddings(tiny_run / "embeddings", run / "prepare" / "items.parquet")
    cf = ppmi_svd(cooccurrence(run / "prepare" / "valid.parquet", len(text), 3), 8, seed=0)
    codes = sid_codes(run / "tokenize" / "sids.parquet", 3)
    np.testing.assert_array_equal(codes, quantizer.encode(join(text, cf, 0.5)))
    assert not np.array_equal(codes, sid_codes(tiny_run / "tokenize" / "sids.parquet", 3))

    again = tmp_path / "cf-again"
    assert run_cli("prepare", "-c", TINY, "-o", again)[0] == 0
    assert run_cli("tokenize", "-c", TINY, "-o", again, *overrides)[0] == 0
    assert (again / "tokenize" / "sids.parquet").read_bytes() == (run / "tokenize" / "sids.parquet").read_bytes()

    # Cold start: a new item has no co-occurrence yet, so its code comes from its text alone.
    # (Its text is embedded into this run's own cache: the shared run's cache stays as it is.)
    new = tmp_path / "new.jsonl"
    first_text = pq.read_table(run / "prepare" / "items.parquet")["text"][0].as_py()
    new.write_text(json.dumps({"item_id": "copy-of-0", "text": first_text}) + "\n")
    code, out, err = run_cli("tokenize", "-c", TINY, "-o", run, *overrides[:2], "--encode", new)
    assert code == 0, out + err
    assert len(list((tiny_run / "embeddings").iterdir())) == 1
    row = pq.read_table(run / "cold_start" / "new.parquet").to_pylist()[0]
    alone = quantizer.encode(join(text[:1], np.zeros((1, 8), np.float32), 0.5))[0]
    assert [row["d0"], row["d1"], row["d2"]] == alone.tolist()
