"""What the benchmark scripts share: this process's peak memory, and running one
measurement in a fresh Python process so that its peak memory is its own."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Mapping


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(script: str, *args: object, env: Mapping[str, str] | None = None) -> dict:
    """Runs ``python SCRIPT --one ARGS...`` and returns the JSON object on its last output line."""
    out = subprocess.run([sys.executable, script, "--one", *map(str, args)], check=True,
                         capture_output=True, text=True, env=None if env is None else dict(env))
    return json.loads(out.stdout.strip().splitlines()[-1])
