"""evaluate + recommend on the tiny run: Ray actor pool == single process, outputs, CLI."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import CONFIGS

TINY = CONFIGS / "tiny.yaml"


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    from diffgrm_dist.cli import main

    run = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(tiny_run, run)
    assert main(["train", "-c", str(TINY), "-o", str(run), "train.launcher=local", "train.epochs=2",
                 "train.wandb_mode=disabled"]) == 0
    return run


@pytest.mark.slow
def test_ray_actor_pool_equals_single_process(trained, tmp_path, run_cli):
    runs = {}
    for name, overrides in (("local", ["eval.launcher=local", "eval.batch_size=16"]),
                            ("ray", ["eval.launcher=ray", "eval.num_actors=2", "eval.batch_size=16"])):
        run = tmp_path / name
        shutil.copytree(trained, run)
        code, out, err = run_cli("evaluate", "-c", TINY, "-o", run, *overrides)
        assert code == 0, err
        runs[name] = run
    a = json.loads((runs["local"] / "evaluate" / "metrics.json").read_text())
    b = json.loads((runs["ray"] / "evaluate" / "metrics.json").read_text())
    assert a["item"] == b["item"] and a["sid"] == b["sid"]
    assert b["actors"] == 2 and a["actors"] == 0
    assert len(b["nodes"]) == 1 and a["nodes"] == []  # one local Ray node; no Ray at all
    ra = pq.read_table(runs["local"] / "evaluate" / "rankings.parquet").to_pydict()
    rb = pq.read_table(runs["ray"] / "evaluate" / "rankings.parquet").to_pydict()
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
    rankings = pq.read_table(run / "evaluate" / "rankings.parquet")
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
    rankings = pq.read_table(run / "evaluate" / "rankings.parquet").to_pylist()
    assert len(rankings) == 10 * metrics["users"]  # a full softmax always fills the top 10
