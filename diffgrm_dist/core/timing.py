"""One timing harness for ``diffgrm stress`` and the benchmarks in ``tools/``: warm-up calls
untimed, then every timed call's wall and CPU seconds, with the device synchronised before
each clock read (GPU work is asynchronous; a clock read without a sync times the launch).

Standard library only, so the benchmarks can load this file from the current tree while
they measure the package of an older one (``benchlib.timing``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Timings:
    """Per-call wall and CPU seconds of the timed calls (warm-up calls apart), and what every
    call returned, warm-up first."""

    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    warmup_s: list[float] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(self.wall_s)

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu_s)

    @property
    def timed_results(self) -> list[Any]:
        return self.results[len(self.warmup_s):]


def no_sync() -> None:
    """The CPU's synchronisation: nothing is in flight."""


def time_calls(calls: Iterable[Callable[[], Any]], warmup: int = 1, sync: Callable[[], None] = no_sync) -> Timings:
    """Runs ``calls`` in order: the first ``warmup`` ones untimed in the totals (their wall
    time kept apart: allocations, first-call compilation), every later one timed."""
    out = Timings()
    for i, call in enumerate(calls):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        out.results.append(call())
        sync()
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if i < warmup:
            out.warmup_s.append(wall)
        else:
            out.wall_s.append(wall)
            out.cpu_s.append(cpu)
    return out
