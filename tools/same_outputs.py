"""Whether two run directories hold the same outputs, stage by stage, file by file: the
evidence that a change moved no numbers (a refactor, a cache-key change). Hashes every
file of each stage folder except what records when, where and how long (manifests,
stats, logs, plots), and prints per stage "same" or the files that differ.

    python tools/same_outputs.py RUN_BEFORE RUN_AFTER [--json OUT.json]

JSON results (``metrics.json``) are compared without what differs from run to run by
nature: wall times (``*_s``, ``*_per_s``) and the Ray node ids work ran on.

Exit status 0 when every stage both runs hold is byte-identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

STAGES = ("prepare", "tokenize", "shard", "train", "evaluate")
# Files that describe the run rather than hold its results.
SKIPPED = {"manifest.json", "stats.json", "curves.png", "history.jsonl", "report.md"}
SKIPPED_DIRS = {"wandb"}  # the experiment tracker's own run log


def volatile(key: str) -> bool:
    return key.endswith("_s") or key in {"nodes", "node", "node_id", "hostname"}


def stable(value):
    """A JSON value without its volatile keys."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if not volatile(k)}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def file_hashes(stage_dir: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in stage_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(stage_dir)
        if path.name in SKIPPED or path.suffix in {".log", ".png"} or SKIPPED_DIRS & set(rel.parts):
            continue
        digest = hashlib.sha256()
        if path.suffix == ".json":
            digest.update(json.dumps(stable(json.loads(path.read_text())), sort_keys=True).encode())
        else:
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        out[rel.as_posix()] = digest.hexdigest()
    return out


def compare(before: Path, after: Path) -> dict[str, dict]:
    report = {}
    for stage in STAGES:
        a, b = before / stage, after / stage
        if not (a.is_dir() and b.is_dir()):
            continue
        ha, hb = file_hashes(a), file_hashes(b)
        differ = sorted(n for n in ha.keys() & hb.keys() if ha[n] != hb[n])
        report[stage] = {"files": len(ha), "same": not differ and ha.keys() == hb.keys(),
                         "differ": differ, "only_before": sorted(ha.keys() - hb.keys()),
                         "only_after": sorted(hb.keys() - ha.keys()),
                         "digest": hashlib.sha256(json.dumps(sorted(ha.items())).encode()).hexdigest()[:16]}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = compare(args.before, args.after)
    for stage, r in report.items():
        what = "same" if r["same"] else (f"DIFFERENT: {', '.join(r['differ'][:5])}"
                                          + (f"; only in one: {r['only_before'][:3] + r['only_after'][:3]}"
                                             if r["only_before"] or r["only_after"] else ""))
        print(f"{stage:9s} {r['files']:4d} files  digest {r['digest']}  {what}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"before": str(args.before), "after": str(args.after), "stages": report},
                                        indent=2) + "\n")
    sys.exit(0 if report and all(r["same"] for r in report.values()) else 1)


if __name__ == "__main__":
    main()
