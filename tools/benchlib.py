"""What the benchmark scripts share: this process's peak memory, running one measurement
in a fresh Python process (so that its peak memory is its own) against a chosen source
tree, the ``--baseline-tree`` flag, and the provenance block of the JSON results.

Before/after in one run: ``diffgrm_dist`` is installed in editable mode from this checkout,
and an editable install's import hook comes after ``PYTHONPATH`` on the import path, so a
child started with ``PYTHONPATH=TREE`` imports ``TREE/diffgrm_dist`` (an older worktree,
e.g. ``git worktree add /tmp/base <commit>``) while one without it imports the current
checkout. Each child reports the package it imported (``package_info``) and
``run_isolated`` checks that it is the tree that was asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the current checkout
DEFAULT_BASELINE_TREE = Path("/tmp/base")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(script: str, *args: object, env: Mapping[str, str] | None = None,
                 tree: str | Path | None = None) -> dict:
    """Runs ``python SCRIPT --one ARGS...`` and returns the JSON object on its last output line.

    ``tree``: a source tree whose ``diffgrm_dist`` the child imports (``PYTHONPATH=TREE``,
    ahead of any inherited ``PYTHONPATH``); None = the current checkout (an inherited
    ``PYTHONPATH`` is dropped so it cannot shadow it). If the child's result names the
    package it imported (``package`` from ``package_info``), it must lie in that tree."""
    child_env = dict(os.environ if env is None else env)
    inherited = child_env.pop("PYTHONPATH", "")
    if tree is not None:
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(tree).resolve()), inherited) if p)
    out = subprocess.run([sys.executable, script, "--one", *map(str, args)], capture_output=True,
                         text=True, env=child_env)
    if out.returncode != 0:
        raise RuntimeError(f"{Path(script).name} --one {' '.join(map(str, args))} "
                           f"(tree {tree or ROOT}) failed with exit code {out.returncode}:\n"
                           f"{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected = Path(tree or ROOT).resolve()
    package = result.get("package")
    if package is not None and expected not in Path(package).resolve().parents:
        raise RuntimeError(f"the child imported {package}, not the package of {expected}")
    return result


def package_info() -> dict:
    """Where this process's ``diffgrm_dist`` comes from (for ``run_isolated``'s check)."""
    import diffgrm_dist

    return {"package": str(Path(diffgrm_dist.__file__).resolve())}


# --------------------------------------------------------------------------- baseline tree


def add_baseline_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--baseline-tree", default=str(DEFAULT_BASELINE_TREE) if DEFAULT_BASELINE_TREE.is_dir() else "",
        help="source tree of the baseline package for the 'before' rows (default /tmp/base if it "
             "exists; '' = skip the before rows)")


def baseline_tree(args: argparse.Namespace) -> Path | None:
    """The baseline tree to measure, or None (with a printed note) when there is none."""
    if not args.baseline_tree:
        print(f"note: no baseline tree ({DEFAULT_BASELINE_TREE} absent and no --baseline-tree): "
              "skipping the 'before' rows; ratios are against the first 'after' row instead")
        return None
    tree = Path(args.baseline_tree).resolve()
    if not (tree / "diffgrm_dist" / "__init__.py").is_file():
        raise SystemExit(f"--baseline-tree {tree}: no diffgrm_dist package there")
    return tree


def git_info(tree: str | Path) -> dict:
    """Commit of a source tree and whether its working tree differs from it."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    changed = [line for line in git("status", "--porcelain").splitlines() if line] if commit else []
    package = [line for line in changed if line[3:].startswith("diffgrm_dist/")]
    return {"tree": str(Path(tree).resolve()), "commit": commit or None,
            "dirty": bool(changed) if commit else None, "changed_files": len(changed),
            "changed_package_files": len(package)}


def provenance(baseline: Path | None) -> dict:
    """The JSON block every before/after result carries: where and against what it ran."""
    return {"device": device_string(), "current": git_info(ROOT),
            "baseline": git_info(baseline) if baseline is not None else None}


def device_string() -> str:
    """CPU model, cores, torch threads and version, and bf16 hardware support."""
    import torch

    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    text = (f"cpu: {model}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), bf16 ISA: {'+'.join(bf16) or 'none'}")
    if torch.cuda.is_available():
        text += f"; cuda: {torch.cuda.get_device_name(0)} (unused)"
    return text


def write_json(path: str | Path, payload: dict) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out


def ratio(value: float, base: float | None) -> float | None:
    return None if not base else value / base


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def print_provenance(meta: dict) -> None:
    """The device and both trees a benchmark compared, as ``provenance`` recorded them."""
    print(f"\ndevice: {meta['device']}")
    print(f"current: {meta['current']['tree']} @ {meta['current']['commit']}"
          f"{' (dirty)' if meta['current']['dirty'] else ''}; baseline: "
          + (f"{meta['baseline']['tree']} @ {meta['baseline']['commit']}" if meta["baseline"] else "none"))


# Where each module lived before the subpackage layout (baseline trees of before/after
# benchmarks run the same bench code against older commits).
FLAT_LAYOUT = {
    "core.config": "config", "model.network": "model", "model.objectives": "objectives",
    "decode.search": "decode", "decode.catalogue": "catalogue", "train.engine": "train",
    "data.synthetic": "synthetic",
}


def package_module(name: str):
    """``diffgrm_dist.<name>``, or the flat module that held it in a tree from before the
    subpackage layout (and ``decode`` for the catalogue, before catalogue and search split)."""
    import importlib
    import importlib.util

    for candidate in (name, FLAT_LAYOUT.get(name), "decode" if name == "decode.catalogue" else None):
        try:  # a dotted name whose parent is a module (or absent) in this tree is no match
            found = candidate is not None and importlib.util.find_spec(f"diffgrm_dist.{candidate}") is not None
        except ModuleNotFoundError:
            found = False
        if found:
            return importlib.import_module(f"diffgrm_dist.{candidate}")
    raise ModuleNotFoundError(f"diffgrm_dist.{name} (nor its flat-layout home) in this tree")


def catalogue_module():
    """The package's module holding the catalogue index (see ``package_module``)."""
    return package_module("decode.catalogue")


def timing():
    """The package's timing harness (``diffgrm_dist/core/timing.py``) from the current tree,
    loaded by path: the same clock for the current and the baseline package, and for
    ``diffgrm stress``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("diffgrm_timing", ROOT / "diffgrm_dist" / "core" / "timing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module
