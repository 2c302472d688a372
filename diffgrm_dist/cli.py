"""``diffgrm`` command line: ``diffgrm <stage> -c CONFIG -o RUN_DIR [key.sub=value ...]``."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from diffgrm_dist.cluster.raycluster import quiet_library_logs
from diffgrm_dist.core.config import load_config
from diffgrm_dist.core.errors import DiffGRMError
from diffgrm_dist.core.rundir import RunDir, display_uri, is_uri
from diffgrm_dist.stages import PIPELINE, run_stage

log = logging.getLogger("diffgrm")
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, file too large, quota


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffgrm", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name in (*PIPELINE, "recommend", "pipeline"):
        helps = {"pipeline": "run every stage in order, skipping those already current"}
        p = sub.add_parser(name, help=helps.get(name, f"run the {name} stage"))
        p.add_argument("-c", "--config", required=True, help="experiment YAML (configs/*.yaml)")
        p.add_argument("-o", "--run-dir", required=True,
                       help="run directory for the artifacts: a path, or a URI such as s3://bucket/runs/x")
        p.add_argument("--force", action="store_true", help="re-run even if the manifest is current")
        p.add_argument("--verbose", action="store_true",
                       help="libraries' own INFO logs and progress bars (Ray, DeepSpeed, transformers)")
        if name == "recommend":
            p.add_argument("--history", nargs="+", metavar="ITEM_ID", help="one history, oldest first")
            p.add_argument("--file", help="histories, one per line (item ids, oldest first)")
        if name == "tokenize":
            p.add_argument("--encode", metavar="NEW_ITEMS",
                           help="assign SIDs to new items (JSONL/Parquet with item_id and text "
                                "or the template's fields) with the saved quantiser")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p = sub.add_parser("stress", help="decoder / training scalability grid over the Ray cluster")
    p.add_argument("-c", "--config", help="stress grid YAML (configs/stress.yaml)")
    p.add_argument("--merge", nargs="+", metavar="OUTPUT",
                   help="instead of running a grid: one report over these earlier outputs")
    p.add_argument("-o", "--out", required=True, help="output folder: stress.parquet, report.md, plots/")
    p.add_argument("--verbose", action="store_true", help="libraries' own INFO logs")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p = sub.add_parser("submit", help="run a stage or the pipeline as a Ray Job on a cluster")
    p.add_argument("job_stage", metavar="STAGE", choices=[*PIPELINE, "pipeline"])
    p.add_argument("-c", "--config", required=True, help="config path, relative to the project")
    p.add_argument("-o", "--run-dir", required=True,
                   help="run directory every node reaches: s3://..., gs://... or an absolute shared path")
    p.add_argument("--address", required=True, help="Jobs API address, http://HEAD:8265")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the job (secret values are never printed)")
    p.add_argument("--no-follow", action="store_true", help="print the job id and return")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    for name, what in (("status", "print a job's status"), ("stop", "stop a job")):
        p = sub.add_parser(name, help=what)
        p.add_argument("job_id")
        p.add_argument("--address", required=True, help="Jobs API address, http://HEAD:8265")
    return parser


def _jobs(args: argparse.Namespace) -> int:
    """submit / status / stop through the Ray Jobs SDK; exit 0 only for a job that succeeded."""
    from diffgrm_dist.cluster import submit as jobs
    from diffgrm_dist.core.config import find_project_root
    from diffgrm_dist.core.errors import ConfigError

    if args.stage == "status":
        print(jobs.status(args.address, args.job_id))
        return 0
    if args.stage == "stop":
        print("stopped" if jobs.stop(args.address, args.job_id) else "was not running")
        return 0
    load_config(args.config, args.overrides)  # fail here, not on the cluster
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--env {name!r}: expected NAME=VALUE")
        env[name] = value
    try:
        entrypoint = jobs.entrypoint_for(args.job_stage, args.config, args.run_dir, args.overrides)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    root = find_project_root(Path(args.config).resolve().parent)
    job_id = jobs.submit(args.address, entrypoint, str(root), env)
    shown = jobs.entrypoint_for(args.job_stage, args.config, display_uri(args.run_dir)
                                if is_uri(args.run_dir) else args.run_dir, args.overrides)
    print(f"submitted {job_id}: {shown}  env={jobs.redact(env)}", flush=True)
    if args.no_follow:
        return 0
    state = jobs.follow(args.address, job_id)
    print(f"job {job_id}: {state}")
    return 0 if state == "SUCCEEDED" else 1


def _print_stats(stage: str, stats: dict[str, Any]) -> None:
    flat = {k: v for k, v in stats.items() if not isinstance(v, (dict, list))}
    print(f"[{stage}] " + "  ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}"
                                    for k, v in flat.items()))
    nested = {k: v for k, v in stats.items() if isinstance(v, (dict, list))}
    if nested:
        print(f"[{stage}] " + json.dumps(nested, sort_keys=True))


def _recommend(cfg, run_dir: RunDir, args: argparse.Namespace) -> None:
    from diffgrm_dist.core.errors import ConfigError
    from diffgrm_dist.evaluate.stage import read_history_file, recommend

    histories = ([args.history] if args.history else []) + (read_history_file(Path(args.file)) if args.file else [])
    if not histories:
        raise ConfigError("recommend: give --history ITEM_ID ... or --file HISTORIES")
    for number, ranked in enumerate(recommend(cfg, run_dir, histories), start=1):
        print(f"history {number}: {' '.join(histories[number - 1])}")
        for row in ranked:
            print(f"  {row['rank']:>3}. {row['item_id']:<14} {row['score']:>9.4f}  {row['text']}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.stage == "submit" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # overrides after the options: argparse leaves them over
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    if getattr(args, "verbose", False):
        os.environ["DIFFGRM_VERBOSE"] = "1"  # Ray workers inherit it through the runtime env
    quiet_library_logs()
    try:
        if args.stage in ("submit", "status", "stop"):
            return _jobs(args)
        if args.stage == "stress":
            from diffgrm_dist.core.errors import ConfigError
            from diffgrm_dist.stress.config import load_stress_config
            from diffgrm_dist.stress.grid import merge_outputs, run_stress

            if bool(args.config) == bool(args.merge):
                raise ConfigError("stress: give -c CONFIG (run a grid) or --merge OUTPUT ... (report over outputs)")
            stats = (merge_outputs([Path(p) for p in args.merge], Path(args.out), Path(args.out).name) if args.merge
                     else run_stress(load_stress_config(args.config, args.overrides), Path(args.out)))
            _print_stats("stress", stats)
            print(f"[stress] wrote {args.out}/stress.parquet, report.md, plots/")
            return 0
        cfg = load_config(args.config, args.overrides)
        run_dir = RunDir(args.run_dir)
        if args.stage == "pipeline":
            for stage in PIPELINE:
                _print_stats(stage, run_stage(stage, cfg, run_dir, force=args.force))
        elif args.stage == "tokenize" and args.encode:
            from diffgrm_dist.tokenize.stage import encode_new_items

            path = encode_new_items(cfg, run_dir, Path(args.encode))
            print(f"[tokenize] encoded {args.encode} -> {path}")
        elif args.stage == "recommend":
            _recommend(cfg, run_dir, args)
        else:
            _print_stats(args.stage, run_stage(args.stage, cfg, run_dir, force=args.force))
    except DiffGRMError as exc:
        print(f"diffgrm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"diffgrm: error: out of disk space{where} ({os.strerror(exc.errno)}); the stage published "
              "nothing and any earlier output of it is intact: free space and run it again", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
