"""lstmeng._runtime.timing: the one home of the benchmarks' timers, FLOP formula, shapes and peak.

The timers run on a fake clock here: nothing measures or asserts speed.
"""

import math

import pytest

from lstmeng._runtime import timing


class FakeClock:
    """A clock that advances only when a fake workload says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def workload(self, durations, calls=None):
        durations = iter(durations)

        def run():
            if calls is not None:
                calls.append(run)
            self.now += next(durations)
        return run


def test_flop_formula_and_shape():
    shape = timing.Shape(64, 100, 256, 128)
    forward = 8 * 64 * 100 * 128 * (256 + 128)
    assert timing.forward_flops(64, 100, 256, 128) == forward == shape.forward_flops
    assert shape.flops("infer") == forward
    assert shape.flops("train") == 3 * forward == timing.TRAIN_FLOPS_FACTOR * forward
    assert str(shape) == "64,100,256,128"
    assert "8*B*T*H*(I+H)" in timing.FLOPS_FORMULA and "3x" in timing.FLOPS_FORMULA


def test_best_time_takes_the_fastest_and_respects_repeats_minimum_and_budget():
    clock = FakeClock()
    # No budget: every repeat is timed; warm-up calls are not.
    result = timing.best_time(clock.workload([9.0, 0.5, 0.2, 0.9]), 3, warmup=1, clock=clock)
    assert result == timing.Timing(pytest.approx(0.2), 3)
    # A budget stops early, but only after min_repeats calls.
    result = timing.best_time(clock.workload([0.5, 0.2, 0.9, 0.3]), 200, min_repeats=3, budget_s=1.0, clock=clock)
    assert (result.seconds, result.calls) == (pytest.approx(0.2), 3)
    result = timing.best_time(clock.workload([40.0, 1.0]), 5, budget_s=30.0, clock=clock)
    assert result.calls == 1   # a slow call gets one try


def test_synchronize_runs_inside_the_timed_region():
    clock = FakeClock()
    waits = []

    def synchronize():
        waits.append(1)
        clock.now += 1.0   # the device finishes its queued work

    result = timing.best_time(clock.workload([0.1, 0.1]), 2, synchronize=synchronize, clock=clock)
    assert result.seconds == pytest.approx(1.1) and len(waits) == 2


def test_interleaved_calls_take_turns_and_drop_a_failing_one():
    clock = FakeClock()
    order = []
    a = clock.workload([0.4, 0.2, 0.3], order)
    b = clock.workload([0.6, 0.9, 0.7], order)
    best = timing.interleaved_best_times({"a": a, "b": b}, 3, clock=clock)
    assert order == [a, b, a, b, a, b]
    assert best["b"].seconds / best["a"].seconds == pytest.approx(3.0)

    def broken():
        raise RuntimeError("no")

    errors = []
    best = timing.interleaved_best_times({"ok": clock.workload([0.1, 0.1]), "broken": broken}, 2, clock=clock,
                                         on_error=lambda key, error: errors.append((key, str(error))))
    assert list(best) == ["ok"] and errors == [("broken", "no")]
    with pytest.raises(RuntimeError):
        timing.interleaved_best_times({"broken": broken}, 1)


def test_median_timers():
    clock = FakeClock()
    assert timing.median_time(clock.workload([5.0, 0.3, 0.1, 0.2]), 3, clock=clock) == pytest.approx(0.2)

    class Event:
        def __init__(self):
            self.at = None

        def record(self):
            self.at = clock.now

        def synchronize(self):
            pass

    events = timing.EventClock(lambda: (Event(), Event()), lambda start, end: (end.at - start.at) * 1e3)
    run = clock.workload([5.0, 0.003, 0.001, 0.002, 0.004])
    assert timing.median_event_ms(run, events, 3, warmup=1, clock=clock) == pytest.approx(2.0)


def test_square_matmul_gflops_and_blas_peak():
    clock = FakeClock()
    gflops = timing.square_matmul_gflops(clock.workload([1.0, 2.0, 0.5]), 1000, 2, warmup=1, clock=clock)
    assert gflops == pytest.approx(2.0 * 1000 ** 3 / 0.5 / 1e9)
    for dtype in ("float32", "float64"):
        peak = timing.blas_gemm_peak(16, 1, dtype=dtype)
        assert math.isfinite(peak) and peak > 0


def test_report_and_fmt(capsys):
    report = timing.Report()
    report("a")
    report()
    assert report.lines == ["a", ""] and report.text() == "a\n\n"
    assert capsys.readouterr().out == "a\n\n"
    assert timing.fmt(1.23456, 8, 2) == "    1.23"
    assert timing.fmt(None, 5, 1) == "  n/a"
    assert timing.fmt(None, 3, missing="-") == "  -"
    assert timing.fmt(12345.0, 9, 1, "e") == "  1.2e+04"


def test_timing_imports_no_optional_library():
    import subprocess
    import sys
    code = ("import sys, lstmeng._runtime.timing; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
