"""Latency as the compiler measures it: a burst of load from other processes in part of a candidate's runs does
not make that candidate look slower (candidates are measured one after another)."""

from __future__ import annotations

from edgefleet.compiler.measure import _steady_p50


def test_a_burst_of_load_during_one_block_of_runs_does_not_move_the_p50():
    quiet = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.02, 0.98, 1.0] * 3
    burst = quiet[:10] + [5.0] * 10 + quiet[20:]  # a third of the runs slowed 5x
    assert _steady_p50(burst) == _steady_p50(quiet) == 1.0
    spread = quiet[:10] + [5.0] * 20  # two thirds: the quietest block still decides
    assert _steady_p50(spread) == 1.0


def test_a_uniformly_slower_candidate_stays_slower():
    assert _steady_p50([2.0] * 30) > _steady_p50([1.0] * 30)


def test_few_runs_take_the_plain_median():
    assert _steady_p50([1.0, 3.0, 2.0]) == 2.0


def test_a_fast_model_is_timed_for_at_least_min_seconds_and_a_slow_one_for_its_runs():
    import time

    from edgefleet.compiler import measure

    class Sleeps:
        def __init__(self, seconds: float):
            self.seconds = seconds

        def run(self, feed):
            time.sleep(self.seconds)

    started = time.perf_counter()
    fast = measure._timed_runs(Sleeps(0.001), {}, 30)  # 30 runs: 30 ms
    assert time.perf_counter() - started >= measure.MIN_SECONDS and len(fast) > 30
    assert len(measure._timed_runs(Sleeps(0), {}, 30)) <= measure.MAX_RUNS  # a no-op ends at the cap
    assert len(measure._timed_runs(Sleeps(0.02), {}, 20)) == 20  # 0.4 s > MIN_SECONDS: no more than asked
