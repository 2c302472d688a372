"""evaluate and recommend stages: CPD (or AR) beam search over Ray actors, Recall/NDCG@K.

The driver never holds the split. It cuts ``prepare/<split>.parquet`` into row ranges of
``eval.chunk_users`` users that never cross a row group (fixed by the file, so the same
for any number of actors); a pool of Ray actors, each holding one model replica (one GPU
each where the cluster has GPUs) and the catalogue index, reads and decodes each range
itself and writes it as one part of the rankings. The actor writes the part where the
stage's temporary folder is visible from its node (one machine, a shared filesystem) and
returns its bytes for the driver to write elsewhere. Each chunk sends back only its sums
of per-user metric values, added in chunk order, so memory is bounded by the chunk and
the result equals the single-process run (``eval.launcher=local``). Nothing item x item
is ever built: the catalogue index is linear in items and beams score n x K candidates
per step whatever the catalogue size.

Outputs (``RUN_DIR/evaluate/``): ``rankings/part-<chunk>.parquet``, one Parquet dataset
(``pq.read_table`` of the folder reads it in user order, then rank) with ``user``,
``rank`` from 1, ``item``, ``score`` in the dataset's own ids; ``metrics.json``
(``{"item": {...}, "sid": {...}, "item.code_prob": {...}, "item.expand": {...},
"popularity": {...}}``: ``item`` is the configured ``eval.item_rule``, ``item.<rule>``
every rule from the same beams; plus decode wall time, users/s and parts), ``stats.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from diffgrm_dist.core.config import EvalConfig, ExperimentConfig
from diffgrm_dist.core.errors import ConfigError, DataError
from diffgrm_dist.core.rundir import atomic_file
from diffgrm_dist.data.sids import SidTable, load_sids
from diffgrm_dist.data.splits import read_rows, row_group_starts
from diffgrm_dist.decode.catalogue import catalogue_for
from diffgrm_dist.decode.search import SearchOptions
from diffgrm_dist.evaluate.baselines import popularity_baseline
from diffgrm_dist.evaluate.ranking import CPU_BATCH_USERS, MAX_BATCH_USERS, Queries, rank_queries
from diffgrm_dist.model.export import load_exported

log = logging.getLogger(__name__)

RANKINGS = "rankings"


def part_name(chunk: int) -> str:
    return f"part-{chunk:06d}.parquet"


@dataclass
class Part:
    """What ranking one chunk sends back: metric sums rather than per-user values, and the
    part file's bytes only when the actor could not write it into the driver's folder."""

    chunk: int
    users: int
    rows: int
    sums: dict[str, float]
    data: bytes | None


class Ranker:
    """One model replica + the catalogue index; ranks chunks of users. Also a Ray actor body."""

    def __init__(self, run_dir: str, sids: SidTable, eval_cfg: EvalConfig, decoder: str,
                 threads: int = 0) -> None:
        from diffgrm_dist.core.rundir import RunDir

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # The run's spec, not a local path: on another node this pulls the model and the splits.
        run = RunDir(run_dir)
        self.model = load_exported(run.stage_path("train"), self.device)
        self.prepare_dir = run.stage_path("prepare")
        self.sids = torch.from_numpy(sids.codes.astype(np.int64))
        self.catalogue = catalogue_for(sids)
        self.cfg, self.decoder = eval_cfg, decoder
        self.fill_order = (torch.from_numpy(np.random.default_rng(eval_cfg.seed).permutation(len(sids.sizes)))
                           if eval_cfg.fill_order == "random" else None)
        self.item_ids: pa.Array | None = None  # O(items), read by the first chunk

    def node(self) -> str:
        from diffgrm_dist.cluster.raycluster import node_id

        return node_id()

    def decode(self, queries: Queries, beam: int) -> dict[str, np.ndarray]:
        """Top-K items (and SIDs) per user, with per-user metric values when targets are known."""
        options = SearchOptions(beam, self.decoder, self.cfg.final_step, self.fill_order, self.cfg.fill_digits,
                                self.cfg.cpd_prune, self.cfg.merge_states)
        return rank_queries(self.model, queries, self.sids, self.catalogue, self.cfg, options)

    def rank(self, chunk: int, start: int, end: int, beam: int, out_dir: str) -> Part:
        """Ranks rows ``[start, end)`` of the split into part ``chunk``: written atomically
        (a retried chunk replaces it) under ``out_dir`` if this node sees that folder,
        returned as bytes otherwise."""
        queries = Queries.from_table(read_rows(self.prepare_dir / f"{self.cfg.split}.parquet", start, end))
        result = self.decode(queries, beam)
        table = self._rankings(queries.users, result["items"][:, :self.cfg.top_k],
                               result["scores"][:, :self.cfg.top_k])
        sums = {key: float(values.sum()) for key, values in result.items() if "/" in key}
        folder, data = Path(out_dir) / RANKINGS, None
        if folder.is_dir():
            with atomic_file(folder / part_name(chunk)) as tmp:
                pq.write_table(table, tmp)
        else:
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            data = sink.getvalue().to_pybytes()
        return Part(chunk, len(queries), table.num_rows, sums, data)

    def _rankings(self, users: np.ndarray, items: np.ndarray, scores: np.ndarray) -> pa.Table:
        """Long table, one row per (user, rank), with the dataset's own user and item ids.
        Row u of sequences.parquet is user u and a chunk's users are ascending: only the rows
        from its first user to its last are read."""
        if self.item_ids is None:
            self.item_ids = pq.read_table(self.prepare_dir / "items.parquet", columns=["item_id"])["item_id"]
        first = int(users[0])
        user_ids = read_rows(self.prepare_dir / "sequences.parquet", first, int(users[-1]) + 1,
                             ["user_id"])["user_id"]
        rows, ranks = np.nonzero(items >= 0)
        return pa.table({"user": pc.take(user_ids, pa.array(users[rows] - first)),
                         "rank": pa.array((ranks + 1).astype(np.int32)),
                         "item": pc.take(self.item_ids, pa.array(items[rows, ranks])),
                         "score": pa.array(scores[rows, ranks].astype(np.float32))})


def chunk_users(cfg: EvalConfig) -> int:
    """Users per chunk: ``eval.chunk_users``, else 4 batches (with ``eval.batch_size`` 0, of
    the largest GPU batch when this process sees a GPU, else of the CPU batch)."""
    if cfg.chunk_users:
        return cfg.chunk_users
    return 4 * (cfg.batch_size or (MAX_BATCH_USERS if torch.cuda.is_available() else CPU_BATCH_USERS))


def chunk_bounds(split_path: Path, size: int) -> list[tuple[int, int]]:
    """Row ranges of at most ``size`` rows, none across a row group (a chunk decodes one)."""
    starts = row_group_starts(pq.read_metadata(split_path))
    return [(s, min(s + size, int(hi))) for lo, hi in zip(starts[:-1], starts[1:])
            for s in range(int(lo), int(hi), size)]


def _rank_everywhere(bounds: list[tuple[int, int]], make_ranker: dict[str, Any], cfg: ExperimentConfig,
                     beam: int, out: Path) -> tuple[list[Part], int, list[str], int]:
    """Runs ``Ranker.rank`` over the chunks, on a Ray actor pool or in this process, writing
    the parts the actors send back; returns the parts (in chunk order, without bytes), the
    number of actors, the Ray node ids they ran on and how many parts this process wrote."""
    folder = out / RANKINGS
    folder.mkdir()
    jobs = [(chunk, s, e, beam, str(out)) for chunk, (s, e) in enumerate(bounds)]
    if cfg.eval.launcher == "local":
        ranker = Ranker(**make_ranker)
        return [ranker.rank(*job) for job in jobs], 0, [], 0

    import ray
    from ray.util import ActorPool

    from diffgrm_dist.cluster.raycluster import ray_session, replica_actor

    parts: list[Part] = []
    written = 0
    with ray_session() as resources:
        actors = cfg.eval.num_actors or max(1, resources.gpus or resources.cpus)
        actors = max(1, min(actors, len(bounds)))
        # A killed actor is restarted and its chunk retried (its part rewritten whole):
        # every user is ranked exactly once.
        remote, _, threads = replica_actor(Ranker, resources, actors, f"eval.num_actors={actors}")
        shared = {key: ray.put(value) if isinstance(value, SidTable) else value
                  for key, value in make_ranker.items()}
        shared["threads"] = threads
        pool_actors = [remote.remote(**shared) for _ in range(actors)]
        nodes = sorted(set(ray.get([a.node.remote() for a in pool_actors])))
        log.info("evaluating on %d actor(s) on %d node(s): %s", actors, len(nodes), nodes)
        try:
            for part in ActorPool(pool_actors).map_unordered(lambda a, job: a.rank.remote(*job), jobs):
                if part.data is not None:
                    (folder / part_name(part.chunk)).write_bytes(part.data)
                    written += 1
                parts.append(replace(part, data=None))
        finally:
            for actor in pool_actors:
                ray.kill(actor)
    # Left by actors killed while writing: readers skip dot files, but the manifest would list them.
    for stale in folder.glob(".*.tmp"):
        stale.unlink()
    return sorted(parts, key=lambda p: p.chunk), actors, nodes, written


def ranker_args(cfg: ExperimentConfig, run_dir: Any) -> dict[str, Any]:
    decoder = json.loads((run_dir.stage_path("train") / "model_config.json").read_text())["model"]["decoder"]
    return {"run_dir": run_dir.spec, "sids": load_sids(run_dir.stage_path("tokenize")),
            "eval_cfg": cfg.eval, "decoder": decoder}


def run_evaluate(cfg: ExperimentConfig, run_dir: Any, out: Path) -> dict[str, Any]:
    if cfg.eval.chunk_users < 0:
        raise ConfigError(f"eval.chunk_users: must be >= 0 (0: 4 batches), got {cfg.eval.chunk_users}")
    prepare_dir = run_dir.stage_path("prepare")
    bounds = chunk_bounds(prepare_dir / f"{cfg.eval.split}.parquet", chunk_users(cfg.eval))
    args = ranker_args(cfg, run_dir)
    start = time.perf_counter()
    parts, actors, nodes, by_driver = _rank_everywhere(bounds, args, cfg, cfg.eval.beam_size, out)
    decode_s = time.perf_counter() - start
    users = sum(p.users for p in parts)
    sums: dict[str, float] = {}
    for part in parts:  # chunk order: the same float sums for any number of actors
        for key, value in part.sums.items():
            sums[key] = sums.get(key, 0.0) + value
    metrics: dict[str, Any] = {"item": {}, "sid": {}}
    for key in sorted(sums):
        level, name = key.split("/")
        metrics.setdefault(level, {})[name] = sums[key] / users
    metrics["popularity"] = popularity_baseline(prepare_dir, cfg.eval.split)
    metrics.update({"split": cfg.eval.split, "users": users, "beam": cfg.eval.beam_size,
                    "decoder": args["decoder"], "item_rule": cfg.eval.item_rule,
                    "final_step": cfg.eval.final_step,
                    "fill_order": cfg.eval.fill_order, "fill_digits": cfg.eval.fill_digits,
                    "cpd_prune": cfg.eval.cpd_prune, "merge_states": cfg.eval.merge_states,
                    "actors": actors, "nodes": nodes, "parts": len(parts), "parts_by_driver": by_driver,
                    "decode_s": round(decode_s, 3), "users_per_s": round(users / decode_s, 2)})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    stats = {"users": users, "users_per_s": metrics["users_per_s"], "decode_s": metrics["decode_s"],
             "parts": len(parts),
             **{f"item_{k}": v for k, v in metrics["item"].items()},
             **{f"sid_{k}": v for k, v in metrics["sid"].items()},
             **{f"popularity_{k}": v for k, v in metrics["popularity"].items()}}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("evaluate (%s, beam %d): %d users in %.1f s, %.1f users/s, %d part(s) (%d written by the "
             "driver), on %s:\n%s", cfg.eval.split, cfg.eval.beam_size, users, decode_s, metrics["users_per_s"],
             len(parts), by_driver, f"{actors} actor(s)" if actors else "this process", metrics_table(metrics))
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
    result = ranker.decode(queries, cfg.eval.beam_size)
    texts, ids = items["text"].to_pylist(), items["item_id"].to_pylist()
    return [[{"rank": r + 1, "item_id": ids[i], "score": float(s), "text": texts[i]}
             for r, (i, s) in enumerate(zip(row_items[:cfg.eval.top_k], row_scores)) if i >= 0]
            for row_items, row_scores in zip(result["items"], result["scores"])]


def read_history_file(path: Path) -> list[list[str]]:
    """One history per line: item ids separated by spaces (blank lines skipped)."""
    if not path.is_file():
        raise DataError(path, "file not found")
    return [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

