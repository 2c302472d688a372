"""evaluate and recommend stages: CPD (or AR) beam search over Ray actors, Recall/NDCG@K.

Test (or validation) users are cut into chunks; a pool of Ray actors, each holding one
model replica (one GPU each where the cluster has GPUs) and the catalogue index, decodes
them; the driver gathers rankings and per-user metric values in chunk order, so the
result is identical to the single-process run (``eval.num_actors=1`` with
``eval.launcher=local``). Nothing item x item is ever built: the catalogue index is linear
in items and beams score n x K candidates per step whatever the catalogue size.

Outputs (``RUN_DIR/evaluate/``): ``rankings.parquet`` (``user``, ``rank`` from 1, ``item``,
``score``; the dataset's own ids), ``metrics.json`` (``{"item": {...}, "sid": {...},
"item.code_prob": {...}, "item.expand": {...}, "popularity": {...}}``: ``item`` is the
configured ``eval.item_rule``, ``item.<rule>`` every rule from the same beams; plus decode
wall time and users/s), ``stats.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from diffgrm_dist.baselines import popularity_baseline
from diffgrm_dist.config import EvalConfig, ExperimentConfig
from diffgrm_dist.decode import catalogue_for
from diffgrm_dist.errors import DataError
from diffgrm_dist.export import load_exported
from diffgrm_dist.ranking import Queries, rank_queries
from diffgrm_dist.sids import SidTable, load_sids

log = logging.getLogger(__name__)


class Ranker:
    """One model replica + the catalogue index; ranks chunks of users. Also a Ray actor body."""

    def __init__(self, run_dir: str, sids: SidTable, eval_cfg: EvalConfig, decoder: str,
                 threads: int = 0) -> None:
        from diffgrm_dist.rundir import RunDir

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # The run's spec, not a local path: on another node this pulls the trained model.
        self.model = load_exported(RunDir(run_dir).stage_path("train"), self.device)
        self.sids = torch.from_numpy(sids.codes.astype(np.int64))
        self.catalogue = catalogue_for(sids)
        self.cfg, self.decoder = eval_cfg, decoder
        self.fill_order = (torch.from_numpy(np.random.default_rng(eval_cfg.seed).permutation(len(sids.sizes)))
                           if eval_cfg.fill_order == "random" else None)

    def node(self) -> str:
        from diffgrm_dist.raycluster import node_id

        return node_id()

    def rank(self, queries: Queries, beam: int) -> dict[str, np.ndarray]:
        """Top-K items (and SIDs) per user, with per-user metric values when targets are known."""
        return rank_queries(self.model, queries, self.sids, self.catalogue, self.cfg, beam,
                            self.decoder, self.fill_order, self.device, self.cfg.fill_digits)


def _rank_everywhere(queries: Queries, make_ranker: dict[str, Any], cfg: ExperimentConfig,
                     beam: int) -> tuple[dict[str, np.ndarray], int, list[str]]:
    """Runs ``Ranker.rank`` over chunks, on a Ray actor pool or in this process; returns the
    merged results, the number of actors and the Ray node ids they ran on."""

    def chunks(parts: int) -> list[tuple[int, int]]:
        # At most 4 batches a chunk, and at least one chunk per actor.
        size = max(1, min(cfg.eval.batch_size * 4, -(-len(queries) // parts)))
        return [(s, min(s + size, len(queries))) for s in range(0, len(queries), size)]

    if cfg.eval.launcher == "local":
        bounds = chunks(1)
        ranker = Ranker(**make_ranker)
        parts = [ranker.rank(queries.chunk(s, e), beam) for s, e in bounds]
        actors, nodes = 0, []
    else:
        import ray
        from ray.util import ActorPool

        from diffgrm_dist.raycluster import ray_session, replica_actor

        with ray_session() as resources:
            actors = cfg.eval.num_actors or max(1, resources.gpus or resources.cpus)
            bounds = chunks(actors)
            actors = max(1, min(actors, len(bounds)))
            # A killed actor is restarted and its chunk retried; pool.map keeps chunk order, so
            # every user is ranked exactly once.
            remote, _, threads = replica_actor(Ranker, resources, actors, f"eval.num_actors={actors}")
            shared = {key: ray.put(value) if isinstance(value, SidTable) else value
                      for key, value in make_ranker.items()}
            shared["threads"] = threads
            pool_actors = [remote.remote(**shared) for _ in range(actors)]
            nodes = sorted(set(ray.get([a.node.remote() for a in pool_actors])))
            log.info("evaluating on %d actor(s) on %d node(s): %s", actors, len(nodes), nodes)
            try:
                pool = ActorPool(pool_actors)
                parts = list(pool.map(lambda a, b: a.rank.remote(queries.chunk(*b), beam), bounds))
            finally:
                for actor in pool_actors:
                    ray.kill(actor)
    merged = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]} if parts else {}
    return merged, actors, nodes


def ranker_args(cfg: ExperimentConfig, run_dir: Any) -> dict[str, Any]:
    decoder = json.loads((run_dir.stage_path("train") / "model_config.json").read_text())["model"]["decoder"]
    return {"run_dir": run_dir.spec, "sids": load_sids(run_dir.stage_path("tokenize")),
            "eval_cfg": cfg.eval, "decoder": decoder}


def run_evaluate(cfg: ExperimentConfig, run_dir: Any, out: Path) -> dict[str, Any]:
    prepare_dir = run_dir.stage_path("prepare")
    queries = Queries.from_split(prepare_dir, cfg.eval.split)
    args = ranker_args(cfg, run_dir)
    start = time.perf_counter()
    result, actors, nodes = _rank_everywhere(queries, args, cfg, cfg.eval.beam_size)
    decode_s = time.perf_counter() - start
    metrics: dict[str, Any] = {"item": {}, "sid": {}}
    for key in sorted(k for k in result if "/" in k):
        level, name = key.split("/")
        metrics.setdefault(level, {})[name] = float(result[key].sum()) / len(queries)
    metrics["popularity"] = popularity_baseline(prepare_dir, cfg.eval.split)
    metrics.update({"split": cfg.eval.split, "users": len(queries), "beam": cfg.eval.beam_size,
                    "decoder": args["decoder"], "item_rule": cfg.eval.item_rule,
                    "final_step": cfg.eval.final_step,
                    "fill_order": cfg.eval.fill_order, "fill_digits": cfg.eval.fill_digits,
                    "actors": actors, "nodes": nodes,
                    "decode_s": round(decode_s, 3), "users_per_s": round(len(queries) / decode_s, 2)})
    write_rankings(out / "rankings.parquet", queries.users, result["items"][:, :cfg.eval.top_k],
                   result["scores"][:, :cfg.eval.top_k], prepare_dir)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    stats = {"users": len(queries), "users_per_s": metrics["users_per_s"], "decode_s": metrics["decode_s"],
             **{f"item_{k}": v for k, v in metrics["item"].items()},
             **{f"sid_{k}": v for k, v in metrics["sid"].items()},
             **{f"popularity_{k}": v for k, v in metrics["popularity"].items()}}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("evaluate (%s, %d users, beam %d):\n%s", cfg.eval.split, len(queries), cfg.eval.beam_size,
             metrics_table(metrics))
    return stats


def metrics_table(metrics: dict[str, Any]) -> str:
    """Item level per item rule, SID level and popularity, one row each, for the log."""
    rows = [(f"item ({rule})", metrics[f"item.{rule}"]) for rule in ("code_prob", "expand")
            if f"item.{rule}" in metrics] or [("item", metrics["item"])]
    rows += [("sid", metrics["sid"]), ("popularity", metrics["popularity"])]
    lines = [f"  {'':<18}{'R@5':>8}{'N@5':>8}{'R@10':>8}{'N@10':>8}"]
    lines += [f"  {name:<18}" + "".join(f"{m[k]:>8.4f}" for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10"))
              for name, m in rows]
    return "\n".join(lines)


def write_rankings(path: Path, users: np.ndarray, items: np.ndarray, scores: np.ndarray,
                   prepare_dir: Path) -> None:
    """Long table, one row per (user, rank), with the dataset's own user and item ids."""
    user_ids = pq.read_table(prepare_dir / "sequences.parquet", columns=["user_id"])["user_id"]
    item_ids = pq.read_table(prepare_dir / "items.parquet", columns=["item_id"])["item_id"]
    valid = items >= 0
    rows, ranks = np.nonzero(valid)
    table = pa.table({"user": pc.take(user_ids, pa.array(users[rows])),
                      "rank": pa.array((ranks + 1).astype(np.int32)),
                      "item": pc.take(item_ids, pa.array(items[rows, ranks])),
                      "score": pa.array(scores[rows, ranks].astype(np.float32))})
    pq.write_table(table, path)


# --------------------------------------------------------------------------- recommend


def recommend(cfg: ExperimentConfig, run_dir: Any, histories: list[list[str]]) -> list[list[dict[str, Any]]]:
    """Top-K items (id, text, score) for each history of the dataset's own item ids."""
    prepare_dir = run_dir.stage_path("prepare")
    for stage in ("prepare", "tokenize", "train"):
        if run_dir.manifest(stage) is None:
            raise DataError(run_dir.stage_path(stage), f"run the {stage} stage first")
    items = pq.read_table(prepare_dir / "items.parquet")
    index = {item_id: i for i, item_id in enumerate(items["item_id"].to_pylist())}
    flat, offsets = [], [0]
    for h, history in enumerate(histories):
        for item_id in history:
            if item_id not in index:
                raise DataError("--history", f"unknown item id {item_id!r} (history {h + 1})")
            flat.append(index[item_id])
        offsets.append(len(flat))
    queries = Queries(np.arange(len(histories)), np.asarray(offsets, np.int64),
                      np.asarray(flat, np.int64), None)
    ranker = Ranker(**ranker_args(cfg, run_dir))
    result = ranker.rank(queries, cfg.eval.beam_size)
    texts, ids = items["text"].to_pylist(), items["item_id"].to_pylist()
    return [[{"rank": r + 1, "item_id": ids[i], "score": float(s), "text": texts[i]}
             for r, (i, s) in enumerate(zip(row_items[:cfg.eval.top_k], row_scores)) if i >= 0]
            for row_items, row_scores in zip(result["items"], result["scores"])]


def read_history_file(path: Path) -> list[list[str]]:
    """One history per line: item ids separated by spaces (blank lines skipped)."""
    if not path.is_file():
        raise DataError(path, "file not found")
    return [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

