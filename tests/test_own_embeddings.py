"""Bring your own embeddings (``tokenize.embeddings``): SIDs from a team's own vectors,
no text model, and one clear error per kind of bad file. Real faiss and real Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.paths import CONFIGS

from diffgrm_dist.core.errors import DataError
from diffgrm_dist.tokenize.embed import ParquetEmbeddings
from diffgrm_dist.tokenize.quantize import Quantizer

TINY = CONFIGS / "tiny.yaml"
DIM = 48


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from diffgrm_dist.cli import main

    run = tmp_path_factory.mktemp("own-embeddings")
    assert main(["prepare", "-c", str(TINY), "-o", str(run)]) == 0
    return run


def item_ids(run) -> list[str]:
    return pq.read_table(run / "prepare" / "items.parquet", columns=["item_id"])["item_id"].to_pylist()


def clustered_vectors(n: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 12 random centres: something a quantiser can find structure in."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, DIM))
    x = centres[rng.integers(0, 12, n)] + 0.3 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embeddings(path, ids, vectors, fixed: bool = True) -> None:
    flat = pa.array(np.asarray(vectors, dtype=np.float32).reshape(-1))
    column = (pa.FixedSizeListArray.from_arrays(flat, DIM) if fixed
              else pa.ListArray.from_arrays(pa.array(np.arange(0, len(ids) * DIM + 1, DIM, dtype=np.int32)), flat))
    pq.write_table(pa.table({"item_id": pa.array(ids), "embedding": column}), path, row_group_size=64)


def tokenize(run_cli, run, path, *extra):
    return run_cli("tokenize", "-c", TINY, "-o", run, f"tokenize.embeddings={path}", "tokenize.block_items=64",
                   "tokenize.num_actors=2", *extra)


def sid_codes(run) -> np.ndarray:
    sids = pq.read_table(run / "tokenize" / "sids.parquet")
    return np.stack([sids[f"d{i}"].to_numpy() for i in range(3)], axis=1)


def test_sids_come_from_the_file_in_any_row_order(prepared, tmp_path, run_cli):
    ids = item_ids(prepared)
    vectors = clustered_vectors(len(ids))
    path = tmp_path / "emb.parquet"
    write_embeddings(path, ids, vectors)
    code, out, err = tokenize(run_cli, prepared, path)
    assert code == 0, out + err
    stats = json.loads((prepared / "tokenize" / "stats.json").read_text())
    assert stats["embedding"]["source"] == "file" and stats["embedding_dim"] == DIM
    assert stats["encode_blocks"] == -(-len(ids) // 64) and stats["encode_actors"] == 2
    assert not (prepared / "embeddings").exists()  # the text model never ran
    quantizer, meta = Quantizer.load(prepared / "tokenize" / "quantizer")
    codes = sid_codes(prepared)
    assert np.array_equal(quantizer.encode(vectors), codes)
    assert stats["distinct_codes"] > len(ids) // 4  # the vectors' structure, not one code
    assert pq.ParquetFile(prepared / "tokenize" / "sids.parquet").metadata.num_row_groups == stats["encode_blocks"]

    # Rows shuffled, as variable-length lists, with items outside the catalogue: the same SIDs.
    order = np.random.default_rng(1).permutation(len(ids))
    shuffled = tmp_path / "shuffled.parquet"
    write_embeddings(shuffled, [ids[i] for i in order] + ["not-in-catalogue"],
                     np.concatenate([vectors[order], clustered_vectors(1, seed=9)]), fixed=False)
    code, out, err = tokenize(run_cli, prepared, shuffled, "--force")
    assert code == 0, out + err
    assert np.array_equal(sid_codes(prepared), codes)
    assert json.loads((prepared / "tokenize" / "stats.json").read_text())["embedding"]["extra_rows"] == 1


def test_fit_on_a_sample_then_encode_everything(prepared, tmp_path, run_cli):
    ids = item_ids(prepared)
    path = tmp_path / "emb.parquet"
    vectors = clustered_vectors(len(ids))
    write_embeddings(path, ids, vectors)
    code, out, err = tokenize(run_cli, prepared, path, "tokenize.fit_items=120", "--force")
    assert code == 0, out + err
    stats = json.loads((prepared / "tokenize" / "stats.json").read_text())
    assert stats["fit_items"] == 120 < stats["train_items"]
    quantizer, _ = Quantizer.load(prepared / "tokenize" / "quantizer")
    assert np.array_equal(quantizer.encode(vectors), sid_codes(prepared))


@pytest.mark.slow
def test_changing_the_file_reruns_the_stage(prepared, tmp_path, run_cli, caplog):
    ids = item_ids(prepared)
    path = tmp_path / "emb.parquet"
    write_embeddings(path, ids, clustered_vectors(len(ids)))
    assert tokenize(run_cli, prepared, path, "--force")[0] == 0
    caplog.set_level("INFO")
    assert tokenize(run_cli, prepared, path)[0] == 0
    assert "up to date, skipped" in caplog.text
    caplog.clear()
    write_embeddings(path, ids, clustered_vectors(len(ids), seed=5))  # same path, new content
    assert tokenize(run_cli, prepared, path)[0] == 0
    assert "up to date, skipped" not in caplog.text


def _bad(tmp_path, ids, kind: str):
    """A file with one kind of problem; returns its path and what the error must say."""
    path = tmp_path / f"{kind}.parquet"
    vectors = clustered_vectors(len(ids))
    if kind == "no_item_id":
        pq.write_table(pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.reshape(-1)), DIM)}), path)
        return path, r"field 'item_id'.*missing column"
    if kind == "no_embedding":
        pq.write_table(pa.table({"item_id": ids}), path)
        return path, r"field 'embedding'.*missing column"
    if kind == "strings":
        pq.write_table(pa.table({"item_id": ids, "embedding": ["0.1 0.2"] * len(ids)}), path)
        return path, r"field 'embedding'.*list of floats"
    if kind == "missing_item":
        write_embeddings(path, ids[:-1], vectors[:-1])
        return path, rf"1 catalogue item\(s\) have no embedding, e.g. '{ids[-1]}'"
    if kind == "duplicate":
        write_embeddings(path, ids + [ids[7]], np.concatenate([vectors, vectors[7:8]]))
        return path, rf"item_id '{ids[7]}' appears more than once"
    if kind == "nan":
        vectors[41, 3] = np.nan
        write_embeddings(path, ids, vectors)
        return path, r":42 \(field 'embedding'\): holds a NaN"
    if kind == "ragged":
        flat = [list(v) for v in vectors]
        flat[10] = flat[10][:-1]
        pq.write_table(pa.table({"item_id": ids, "embedding": pa.array(flat, pa.list_(pa.float32()))}), path)
        return path, r":11 \(field 'embedding'\): has 47 values where the file's other rows have 48"
    if kind == "null":
        column = pa.array([list(v) for v in vectors[:-1]] + [None], pa.list_(pa.float32()))
        pq.write_table(pa.table({"item_id": ids, "embedding": column}), path)
        return path, rf":{len(ids)} \(field 'embedding'\): null value"
    if kind == "not_parquet":
        path.write_text("item_id,embedding\n")
        return path, "not a readable Parquet file"
    assert kind == "absent"
    return tmp_path / "nowhere.parquet", "file not found"


BAD_KINDS = ["absent", "not_parquet", "no_item_id", "no_embedding", "strings", "missing_item",
             "duplicate", "nan", "ragged", "null"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_each_bad_file_is_one_clear_error(prepared, tmp_path, kind):
    ids = item_ids(prepared)
    path, message = _bad(tmp_path, ids, kind)
    with pytest.raises(DataError, match=message) as caught:
        ParquetEmbeddings(str(path), pa.array(ids), block_items=64)
    assert str(path) in str(caught.value)


def test_a_bad_file_fails_the_stage_and_writes_nothing(tmp_path, run_cli):
    run = tmp_path / "run"
    assert run_cli("prepare", "-c", TINY, "-o", run)[0] == 0
    path, _ = _bad(tmp_path, item_ids(run), "nan")
    code, out, err = tokenize(run_cli, run, path)
    assert code != 0
    assert "holds a NaN or infinite value" in err and str(path) in err
    assert not (run / "tokenize").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".tokenize")]
