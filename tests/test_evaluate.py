"""evaluate + recommend on the tiny run: chunks read and written by the actors == the whole
split ranked at once, Ray actor pool == single process, outputs, CLI."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.paths import CONFIGS

TINY = CONFIGS / "tiny.yaml"


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    from diffgrm_dist.cli import main

    run = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(tiny_run, run)
    assert main(["train", "-c", str(TINY), "-o", str(run), "train.launcher=local", "train.epochs=2",
                 "train.wandb_mode=disabled"]) == 0
    return run


GROUP = 64  # row groups of the regrouped run's prepared files
CHUNKED = ["eval.batch_size=16", "eval.chunk_users=32"]  # 2 chunks a row group, 2 batches a chunk


@pytest.fixture(scope="module")
def regrouped(trained, tmp_path_factory):
    """The trained run with its split and sequence files rewritten in row groups of 64
    rows (same rows), so chunks, sequence reads and the popularity baseline each cross
    several row groups."""
    run = tmp_path_factory.mktemp("regrouped") / "run"
    shutil.copytree(trained, run)
    for name in ("sequences", "train", "test"):
        path = run / "prepare" / f"{name}.parquet"
        pq.write_table(pq.read_table(path), path, row_group_size=GROUP)
    return run


def test_read_rows_and_chunks_follow_row_groups(regrouped):
    from diffgrm_dist.data.splits import read_rows
    from diffgrm_dist.evaluate.ranking import Queries
    from diffgrm_dist.evaluate.stage import chunk_bounds

    path = regrouped / "prepare" / "test.parquet"
    whole = pq.read_table(path)
    assert pq.ParquetFile(path).num_row_groups > 2
    queries = Queries.from_split(path.parent, "test")
    for start, end in ((0, 1), (60, 70), (5, 2 * GROUP + 3), (whole.num_rows - 3, whole.num_rows)):
        assert read_rows(path, start, end).equals(whole.slice(start, end - start))
        got, want = Queries.from_table(read_rows(path, start, end)), queries.chunk(start, end)
        for field in ("users", "offsets", "history", "targets"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    bounds = chunk_bounds(path, 40)
    assert bounds[0] == (0, 40) and bounds[1] == (40, GROUP) and bounds[2] == (GROUP, GROUP + 40)
    assert [s for s, _ in bounds[1:]] == [e for _, e in bounds[:-1]] and bounds[-1][1] == whole.num_rows


def test_chunked_parts_equal_ranking_the_whole_split_at_once(regrouped, tmp_path, run_cli):
    from diffgrm_dist.core.config import load_config
    from diffgrm_dist.core.rundir import RunDir
    from diffgrm_dist.evaluate.metrics import most_frequent, per_user
    from diffgrm_dist.evaluate.ranking import Queries
    from diffgrm_dist.evaluate.stage import Ranker, ranker_args

    run = tmp_path / "run"
    shutil.copytree(regrouped, run)
    code, _, err = run_cli("evaluate", "-c", TINY, "-o", run, "eval.launcher=local", *CHUNKED)
    assert code == 0, err
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    users = pq.read_metadata(run / "prepare" / "test.parquet").num_rows
    parts = sorted(p.name for p in (run / "evaluate" / "rankings").iterdir())
    want_parts = 2 * (users // GROUP) + -(-(users % GROUP) // 32)
    assert parts == [f"part-{c:06d}.parquet" for c in range(want_parts)] and want_parts > 4
    assert metrics["parts"] == want_parts and metrics["parts_by_driver"] == 0 and metrics["users"] == users

    # The reference: rank_queries on the whole split in one call, mapped to ids here.
    cfg = load_config(TINY, CHUNKED)
    queries = Queries.from_split(run / "prepare", "test")
    want = Ranker(**ranker_args(cfg, RunDir(run))).decode(queries, cfg.eval.beam_size)
    levels = {key for key in want if "/" in key}
    assert {f"{level}/{name}" for level in ("item", "sid", "item.code_prob", "item.expand")
            for name in metrics[level]} == levels
    for key in levels:
        level, name = key.split("/")
        assert metrics[level][name] == pytest.approx(want[key].mean(), abs=1e-9)
    items, scores = want["items"][:, :cfg.eval.top_k], want["scores"][:, :cfg.eval.top_k]
    rows, ranks = np.nonzero(items >= 0)
    user_ids = np.asarray(pq.read_table(run / "prepare" / "sequences.parquet")["user_id"].to_pylist(), object)
    item_ids = np.asarray(pq.read_table(run / "prepare" / "items.parquet")["item_id"].to_pylist(), object)
    got = pq.read_table(run / "evaluate" / "rankings")  # the parts, in name order
    assert got["user"].to_pylist() == user_ids[queries.users[rows]].tolist()
    assert got["rank"].to_pylist() == (ranks + 1).tolist()
    assert got["item"].to_pylist() == item_ids[items[rows, ranks]].tolist()
    np.testing.assert_array_equal(got["score"].to_numpy(), scores[rows, ranks].astype(np.float32))

    # Popularity, streamed over row groups, equals the baseline over whole columns.
    train = pq.read_table(run / "prepare" / "train.parquet")["target"].to_numpy()
    ranked = np.broadcast_to(most_frequent(np.bincount(train, minlength=len(item_ids)), 10), (users, 10))
    for name, values in per_user(ranked, queries.targets).items():
        assert metrics["popularity"][name] == pytest.approx(values.mean(), abs=1e-12)


def test_a_part_comes_back_as_bytes_where_the_folder_is_not_visible(regrouped, tmp_path):
    import pyarrow as pa

    from diffgrm_dist.core.config import load_config
    from diffgrm_dist.core.rundir import RunDir
    from diffgrm_dist.evaluate.stage import Ranker, part_name, ranker_args

    cfg = load_config(TINY, CHUNKED)
    ranker = Ranker(**ranker_args(cfg, RunDir(regrouped)))
    (tmp_path / "rankings").mkdir()
    written = ranker.rank(3, GROUP + 32, 2 * GROUP, cfg.eval.beam_size, str(tmp_path))
    sent = ranker.rank(3, GROUP + 32, 2 * GROUP, cfg.eval.beam_size, str(tmp_path / "elsewhere"))
    assert written.data is None and sent.data is not None and not (tmp_path / "elsewhere").exists()
    assert [p.name for p in (tmp_path / "rankings").iterdir()] == [part_name(3)]  # no temp file left
    table = pq.read_table(tmp_path / "rankings" / part_name(3))
    assert pq.read_table(pa.BufferReader(sent.data)).equals(table)
    assert (written.users, written.rows, written.sums) == (sent.users, sent.rows, sent.sums)
    assert written.users == 32 and written.rows == table.num_rows > 0
    assert 0 <= written.sums["item/recall@10"] <= 32


@pytest.mark.slow
def test_ray_actor_pool_equals_single_process(regrouped, tmp_path, run_cli):
    runs = {}
    for name, overrides in (("local", ["eval.launcher=local", *CHUNKED]),
                            ("ray", ["eval.launcher=ray", "eval.num_actors=2", *CHUNKED])):
        run = tmp_path / name
        shutil.copytree(regrouped, run)
        code, out, err = run_cli("evaluate", "-c", TINY, "-o", run, *overrides)
        assert code == 0, err
        runs[name] = run
    a = json.loads((runs["local"] / "evaluate" / "metrics.json").read_text())
    b = json.loads((runs["ray"] / "evaluate" / "metrics.json").read_text())
    assert a["item"] == b["item"] and a["sid"] == b["sid"]
    assert b["actors"] == 2 and a["actors"] == 0
    assert len(b["nodes"]) == 1 and a["nodes"] == []  # one local Ray node; no Ray at all
    # On one machine the actors write their parts themselves, the same parts as one process.
    assert a["parts"] == b["parts"] > 4 and a["parts_by_driver"] == b["parts_by_driver"] == 0
    names = sorted(p.name for p in (runs["ray"] / "evaluate" / "rankings").iterdir())
    assert names == sorted(p.name for p in (runs["local"] / "evaluate" / "rankings").iterdir())
    ra = pq.read_table(runs["local"] / "evaluate" / "rankings").to_pydict()
    rb = pq.read_table(runs["ray"] / "evaluate" / "rankings").to_pydict()
    for column in ("user", "rank", "item"):
        assert ra[column] == rb[column]
    # Actors run with fewer threads: float sums may differ in the last bits, never the ranking.
    np.testing.assert_allclose(ra["score"], rb["score"], rtol=1e-5)


def test_outputs(trained, tmp_path, run_cli):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    code, out, err = run_cli("evaluate", "-c", TINY, "-o", run, "eval.launcher=local")
    assert code == 0, err
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    for level in ("item", "sid", "popularity", "item.code_prob", "item.expand"):
        assert set(metrics[level]) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
        assert all(0 <= v <= 1 for v in metrics[level].values())
    assert metrics["item_rule"] == "code_prob" and metrics["item"] == metrics["item.code_prob"]
    # expand ranks only the top-10 codes' items: a SID hit is looser than its item hit.
    assert metrics["sid"]["recall@10"] >= metrics["item.expand"]["recall@10"]
    assert metrics["users_per_s"] > 0 and metrics["decode_s"] > 0
    rankings = pq.read_table(run / "evaluate" / "rankings")
    assert rankings.column_names == ["user", "rank", "item", "score"]
    items = set(pq.read_table(run / "prepare" / "items.parquet")["item_id"].to_pylist())
    users = set(pq.read_table(run / "prepare" / "sequences.parquet")["user_id"].to_pylist())
    rows = rankings.to_pylist()
    assert {r["item"] for r in rows} <= items and {r["user"] for r in rows} <= users  # external ids
    by_user = {}
    for r in rows:
        by_user.setdefault(r["user"], []).append(r)
    assert len(by_user) == metrics["users"]
    for ranked in by_user.values():
        assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
        scores = [r["score"] for r in ranked]
        assert scores == sorted(scores, reverse=True)
        assert len({r["item"] for r in ranked}) == len(ranked) <= 10
    # Recall@10 recomputed from the written rankings equals the reported one.
    test = pq.read_table(run / "prepare" / "test.parquet").to_pylist()
    seqs = pq.read_table(run / "prepare" / "sequences.parquet")["user_id"].to_pylist()
    item_ids = pq.read_table(run / "prepare" / "items.parquet")["item_id"].to_pylist()
    hits = [item_ids[t["target"]] in {r["item"] for r in by_user.get(seqs[t["user"]], [])} for t in test]
    assert np.mean(hits) == pytest.approx(metrics["item"]["recall@10"])

    # The paired comparison reads the same rankings: its per-user ranks give the reported metrics.
    from diffgrm_dist.evaluate.paired import dense_ranks, ndcg_at, paired_interval, sparse_ranks, target_ranks

    ranks = target_ranks(run)
    assert len(ranks) == metrics["users"] and (ranks > 0).mean() == pytest.approx(metrics["item"]["recall@10"])
    assert ndcg_at(ranks).mean() == pytest.approx(metrics["item"]["ndcg@10"])
    np.testing.assert_array_equal(dense_ranks(json.loads(json.dumps(sparse_ranks(ranks)))), ranks)
    assert paired_interval(ranks, ranks) == (0.0, 0.0, 0.0)


def test_recommend_cli(trained, run_cli):
    items = pq.read_table(trained / "prepare" / "items.parquet").to_pylist()
    history = [items[0]["item_id"], items[1]["item_id"]]
    code, out, err = run_cli("recommend", "-c", TINY, "-o", trained, "--history", *history)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert 1 <= len(lines) <= 10 and "Title:" in lines[0]
    code, _, err = run_cli("recommend", "-c", TINY, "-o", trained, "--history", "no-such-item")
    assert code == 2 and "unknown item id 'no-such-item'" in err


@pytest.mark.slow
def test_dense_baseline_trains_and_ranks_the_catalogue(tiny_run, tmp_path, run_cli):
    """model.decoder=dense: the same encoder with a full softmax over items, through the
    same train and evaluate stages (validation on a seeded sample of users)."""
    run = tmp_path / "dense"
    shutil.copytree(tiny_run, run)
    overrides = ["model.decoder=dense", "train.launcher=local", "train.epochs=3", "train.lr=0.01",
                 "train.wandb_mode=disabled", "eval.valid_users=40", "eval.launcher=local"]
    for stage in ("train", "evaluate"):
        code, _, err = run_cli(stage, "-c", TINY, "-o", run, *overrides)
        assert code == 0, err
    history = [json.loads(line) for line in (run / "train" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["loss"] < history[0]["loss"]
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert metrics["decoder"] == "dense" and "item.expand" not in metrics
    assert metrics["users"] == pq.read_metadata(run / "prepare" / "test.parquet").num_rows
    assert metrics["sid"]["recall@10"] >= metrics["item"]["recall@10"]  # items' own codes
    rankings = pq.read_table(run / "evaluate" / "rankings").to_pylist()
    assert len(rankings) == 10 * metrics["users"]  # a full softmax always fills the top 10
