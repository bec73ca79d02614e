"""The asv suite in asv_bench/: discoverable, and every benchmark runs on the numpy backend.

The benchmarks are executed here at a tiny size, so a broken benchmark shows
up in the test run rather than in the (slower) CI smoke run of asv itself.
Nothing here measures or asserts speed.
"""

import importlib
import importlib.util
import inspect
import itertools
import math
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ASV_DIR = pathlib.Path(__file__).resolve().parent.parent / "asv_bench"
BENCHMARK_DIR = ASV_DIR / "benchmarks"
PACKAGE = "lstmeng_asv_benchmarks"  # a private name: "benchmarks" may mean another directory on sys.path
BENCHMARK_PREFIXES = ("time_", "peakmem_", "track_", "mem_", "timeraw_")


def _load_suite():
    """Import asv_bench/benchmarks as a package and every module in it."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, BENCHMARK_DIR / "__init__.py",
                                                      submodule_search_locations=[str(BENCHMARK_DIR)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    modules = [importlib.import_module(f"{PACKAGE}.{path.stem}")
               for path in sorted(BENCHMARK_DIR.glob("*.py")) if path.stem != "__init__"]
    return importlib.import_module(f"{PACKAGE}.common"), modules


def _benchmark_cases():
    """(class, method name) for every benchmark method in the suite."""
    _, modules = _load_suite()
    cases = []
    for module in modules:
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            for name in sorted(vars(cls)):
                if name.startswith(BENCHMARK_PREFIXES):
                    cases.append((cls, name))
    return cases


CASES = _benchmark_cases()


def test_suite_has_every_required_kind_of_benchmark():
    names = {name for _, name in CASES}
    assert {"time_forward", "time_training_step", "time_cell_step",
            "time_stack_training_step", "peakmem_training_step"} <= names
    assert sum(name.startswith("track_") and "matmul_peak" in name for name in names) >= 1
    assert sum(name.startswith("track_") and "torch" in name for name in names) >= 1


def test_every_benchmark_is_parametrised_over_all_backends():
    common, _ = _load_suite()
    for cls, name in CASES:
        assert cls.param_names[0] == "backend", (cls, name)
        assert tuple(cls.params[0]) == ("numpy", "cython", "numba_cuda", "tensorflow"), (cls, name)
        assert set(cls.params[1]) <= set(common.SHAPES), (cls, name)


def test_shapes_cover_latency_mid_large_and_variable_length():
    common, _ = _load_suite()
    shapes = list(common.SHAPES.values())
    assert any(shape.batch == 1 for shape in shapes)
    assert any(shape.batch == 64 and not shape.variable_length for shape in shapes)
    assert any(shape.units == 512 for shape in shapes)
    assert any(shape.variable_length for shape in shapes)


@pytest.fixture
def tiny_shapes(monkeypatch):
    """Shrink every named shape to a few units so each benchmark runs in milliseconds."""
    common, _ = _load_suite()
    for name, shape in list(common.SHAPES.items()):
        monkeypatch.setitem(common.SHAPES, name, common.Shape(
            batch=min(shape.batch, 3), steps=5, inputs=4, units=6, variable_length=shape.variable_length))
    return common


@pytest.mark.parametrize("backend", ["numpy", "cython", pytest.param("tensorflow", marks=pytest.mark.slow)])
@pytest.mark.parametrize("cls, method", CASES, ids=[f"{cls.__name__}.{name}" for cls, name in CASES])
def test_benchmark_runs_at_tiny_size(tiny_shapes, cls, method, backend):
    try:
        tiny_shapes.require_backend(backend)
    except NotImplementedError as error:
        pytest.skip(str(error))
    for params in itertools.product([backend], *cls.params[1:]):
        benchmark = cls()
        try:
            benchmark.setup(*params)
        except NotImplementedError as error:   # asv's "skipped" (e.g. a backend a suite does not track)
            pytest.skip(str(error))
        result = getattr(benchmark, method)(*params)
        if method.startswith("track_"):
            assert isinstance(result, float) and math.isfinite(result) and result > 0, (params, result)
        getattr(benchmark, "teardown", lambda *args: None)(*params)


def test_unavailable_backends_skip_with_not_implemented_error():
    common, _ = _load_suite()
    # tests/conftest.py switches the CUDA simulator on; its timings would be meaningless.
    assert common.cuda_simulator_enabled()
    with pytest.raises(NotImplementedError, match="simulator"):
        common.require_backend("numba_cuda")
    with pytest.raises(NotImplementedError, match="not known"):
        common.require_backend("no_such_backend")
    common.require_backend("numpy")  # always available: no exception


def test_backend_selection_variable_skips_the_others(monkeypatch):
    common, _ = _load_suite()
    monkeypatch.setenv(common.BACKENDS_VARIABLE, "cython, tensorflow")
    with pytest.raises(NotImplementedError, match=common.BACKENDS_VARIABLE):
        common.require_backend("numpy")
    monkeypatch.setenv(common.BACKENDS_VARIABLE, "numpy")
    common.require_backend("numpy")


def test_variable_length_flops_count_only_real_steps(tiny_shapes):
    common = tiny_shapes
    shape = common.SHAPES["varlen-B64"]
    _, lengths, _ = common.host_inputs(shape)
    assert lengths.max() == shape.steps and lengths.min() >= 1
    per_row_step = 8 * shape.units * (shape.inputs + shape.units)
    assert common.forward_flops(shape) == per_row_step * int(lengths.sum())
    fixed = common.SHAPES["mid-B64"]
    assert common.forward_flops(fixed) == 8 * fixed.batch * fixed.steps * fixed.units * (fixed.inputs + fixed.units)


class _FakeClock:
    """A perf_counter that advances only when a fake workload says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def workload(self, durations):
        durations = iter(durations)

        def run():
            self.now += next(durations)
        return run


def test_timing_helpers_take_the_fastest_call(monkeypatch):
    common, _ = _load_suite()
    clock = _FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)   # lstmeng._runtime.timing reads it at each call
    # min of the slowed-down calls is the undisturbed 0.2 s; the budget stops after 3 calls.
    best = common.best_seconds(clock.workload([0.5, 0.2, 0.9, 0.3]), min_repeats=3, budget_seconds=1.0)
    assert best == pytest.approx(0.2)
    # reference best 0.6 s, candidate best 0.2 s: the candidate is 3x faster.
    candidate = clock.workload([0.4, 0.2, 0.3])
    reference = clock.workload([0.6, 0.9, 0.7])
    assert common.speed_ratio(reference, candidate, min_rounds=3, budget_seconds=0.1) == pytest.approx(3.0)


def test_inputs_are_deterministic():
    common, _ = _load_suite()
    shape = common.Shape(batch=2, steps=3, inputs=4, units=5, variable_length=True)
    first = common.host_inputs(shape)
    common.host_inputs.cache_clear()
    second = common.host_inputs(shape)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_discovery_imports_no_optional_library_and_survives_their_absence(tmp_path):
    # A fresh interpreter where torch, tensorflow and numba cannot be imported:
    # the suite must still import, the numpy cases still set up, and the torch
    # comparison must skip (NotImplementedError), not fail.
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "tensorflow", "numba", "keras"):
                    raise ImportError("blocked for this test: " + name)
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {str(ASV_DIR)!r})
        import benchmarks.bench_layer, benchmarks.bench_cell, benchmarks.bench_stack, benchmarks.bench_efficiency
        import benchmarks.bench_torch_module
        from benchmarks import common
        common.SHAPES["mid-B64"] = common.Shape(2, 3, 4, 5)
        loaded = sorted(name for name in ("torch", "tensorflow", "numba") if name in sys.modules)
        assert not loaded, loaded
        benchmarks.bench_layer.LayerForward().setup("numpy", "mid-B64")
        for needs_torch in (benchmarks.bench_efficiency.SpeedVersusTorch,
                            benchmarks.bench_torch_module.TorchModuleCall):
            try:
                needs_torch().setup("numpy", "mid-B64")
            except NotImplementedError as error:
                assert "torch" in str(error), error
            else:
                raise AssertionError(needs_torch.__name__ + " did not skip without torch")
        for name in ("tensorflow", "numba_cuda"):
            try:
                common.require_backend(name)
            except NotImplementedError:
                pass
            else:
                raise AssertionError(name + " reported available without its library")
        print("ok")
    """)
    environment = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    completed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0 and completed.stdout.strip().endswith("ok"), completed.stderr[-3000:]


@pytest.mark.slow
def test_asv_check_finds_no_problems():
    pytest.importorskip("asv")
    completed = subprocess.run([sys.executable, "-m", "asv", "check", "-E", "existing:same"], cwd=ASV_DIR,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "No problems found" in completed.stdout
