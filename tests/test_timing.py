"""The timing harness shared by diffgrm stress and the benchmarks: warm-up apart, every
timed call synchronised on both clock reads, results in call order."""

import time

from diffgrm_dist.core.timing import time_calls


def test_warmup_calls_are_kept_out_of_the_totals_and_every_clock_read_is_synchronised():
    syncs = []
    calls = [lambda: time.sleep(0.05) or "warm", *[lambda i=i: time.sleep(0.01) or i for i in range(3)]]
    timed = time_calls(calls, warmup=1, sync=lambda: syncs.append(1))
    assert timed.results == ["warm", 0, 1, 2] and timed.timed_results == [0, 1, 2]
    assert len(timed.warmup_s) == 1 and timed.warmup_s[0] >= 0.05
    assert len(timed.wall_s) == len(timed.cpu_s) == 3
    assert 0.03 <= timed.seconds < timed.warmup_s[0] + 0.03  # the slow warm-up is not in the total
    assert timed.cpu_seconds < timed.seconds  # sleeping costs no CPU
    assert len(syncs) == 2 * len(calls)


def test_benchmarks_load_the_same_harness_from_the_current_tree():
    import benchlib

    harness = benchlib.timing()
    assert harness.time_calls([lambda: 1, lambda: 2], warmup=0).results == [1, 2]
