"""Tests of the small-batch recurrence kernels (``_cuda_recurrence_small``) against the NumPy reference.

Without a GPU every kernel runs under numba's CUDA simulator (tests/conftest.py
sets NUMBA_ENABLE_CUDASIM=1) at tiny sizes: one block owning every unit (a
cooperative grid is one block there), warp reductions through shared memory
instead of shuffles (the simulator has none), everything else the same
generated source. With ``LSTMENG_REAL_CUDA=1`` on a GPU the same comparisons
run at realistic sizes, plus a barrier stress test over thousands of steps.

Run: ``python -m pytest -q tests/test_cuda_small_batch.py``
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lstmeng import testing
from lstmeng.backends.base import SequenceOptions
from lstmeng.testing import kernel_overrides

from _backends import REAL_GPU, fast_simulator_thread_switches, numba_cuda_backend, sequence_forward

REPO = Path(__file__).resolve().parent.parent
_backend = numba_cuda_backend
_fast_simulator_thread_switches = pytest.fixture(autouse=True, scope="module")(fast_simulator_thread_switches)


@pytest.fixture
def small_backend():
    """The numba_cuda backend with the small-batch design forced (an error where it does not apply)."""
    with kernel_overrides(cuda_recurrence_design="small"):
        yield _backend()


# -- direct comparisons with the reference: the flag combinations that change the code ----------
def _case(**changes) -> testing.Case:
    base = testing.Case(dtype="float32", mask="none", reverse=False, zero_output_for_mask=False,
                        return_sequences=True, initial_state=True, dropout=False, activation="tanh",
                        recurrent_activation="sigmoid", use_bias=True, batch=2, steps=4, input_size=3, units=3)
    if REAL_GPU:
        changes = {**changes, "batch": min(16, 4 * changes.get("batch", base.batch)), "steps": 40,
                   "input_size": 64, "units": changes.get("gpu_units", 256)}
    changes.pop("gpu_units", None)
    return dataclasses.replace(base, **changes)


FLAG_CASES = [
    _case(),
    _case(dtype="float64", batch=1),
    _case(mask="holes", reverse=True),
    # "fully_masked" has rows with no real step at all (zero-length rows) next to right-padded ones.
    _case(mask="fully_masked", batch=3, zero_output_for_mask=True),
    _case(mask="fully_masked", batch=3, dtype="float64", return_sequences=False),
    _case(mask="left", reverse=True, zero_output_for_mask=False, return_sequences=False, dropout=True),
    _case(mask="random", dropout=True, initial_state=False, activation="relu", recurrent_activation="hard_sigmoid",
          gpu_units=1024),
    _case(mask="holes", dtype="float64", activation="linear", recurrent_activation="sigmoid", reverse=True,
          dropout=True),
    _case(mask="right", activation="sigmoid", recurrent_activation="sigmoid", zero_output_for_mask=True,
          use_bias=False, units=5, gpu_units=1000),
    _case(batch=1, units=8, steps=3, activation="linear", recurrent_activation="hard_sigmoid", gpu_units=128),
]


@pytest.mark.parametrize("case", FLAG_CASES, ids=str)
def test_forward_and_backward_match_the_reference(small_backend, case):
    """Outputs, states and every gradient, training and inference, against the NumPy backend."""
    small_backend.launch_log.clear()
    testing.check_case("numba_cuda", case)
    logged = {key[0] for key in small_backend.launch_log if key[-1] == "small" and key[2] == case.units}
    assert logged == {"forward", "backward"}, small_backend.launch_log


@pytest.mark.parametrize("case", FLAG_CASES[2:5], ids=str)
def test_weights_in_global_memory_match_the_reference(small_backend, case):
    """The placement for weight slices that do not fit in shared memory computes the same."""
    with kernel_overrides(cuda_weights_in_shared=False):
        testing.check_case("numba_cuda", case)
    entry = small_backend.launch_log[("forward", case.dtype, case.units, case.batch, "small")]
    assert entry[3] is False


# -- the public conformance suite with the small design forced --------------------------------------
def _simulator_sizes(cases):
    sizes = [(3, 4, 3, 5), (1, 3, 4, 3), (2, 4, 5, 6), (4, 3, 2, 4)]
    return [dataclasses.replace(case, batch=b, steps=t, input_size=i, units=h)
            for index, case in enumerate(cases) for b, t, i, h in [sizes[index % len(sizes)]]]


if REAL_GPU:
    CONFORMANCE = [dataclasses.replace(case, batch=min(case.batch, 16)) for case in testing.conformance_cases(size=8)]
else:
    CONFORMANCE = _simulator_sizes(testing.conformance_cases(dtypes=("float32",), cases_per_dtype=8)
                                   + testing.conformance_cases(dtypes=("float64",), cases_per_dtype=4))


@pytest.mark.parametrize("case", CONFORMANCE, ids=str)
def test_conformance_with_the_small_design(small_backend, case):
    testing.check_case("numba_cuda", case)


@pytest.mark.parametrize("case", CONFORMANCE[::3], ids=str)
def test_conformance_with_the_general_design_forced(case):
    """The fallback (version 1) still runs small batches correctly when chosen."""
    with kernel_overrides(cuda_recurrence_design="general"):
        testing.check_case("numba_cuda", case)


# -- dispatch ---------------------------------------------------------------------------------------
def test_design_follows_the_batch_and_falls_back(monkeypatch):
    """B <= SMALL_BATCH_MAX_ROWS takes the small design, larger batches and shapes it cannot hold the
    general one; forcing "general" skips it; forcing "small" where it cannot apply is an error."""
    from lstmeng.backends import _cuda_recurrence_small as small
    calls = []
    original = small.launch

    def recording_launch(direction, dtype, units, batch, *args, **kwargs):
        launched = original(direction, dtype, units, batch, *args, **kwargs)
        calls.append((direction, batch, units, launched))
        return launched

    monkeypatch.setattr(small, "launch", recording_launch)
    case = _case(units=2, steps=2, batch=1)
    if REAL_GPU:
        pytest.skip("dispatch is checked under the simulator")
    for batch, units, expected in ((small.SMALL_BATCH_MAX_ROWS + 1, 2, None), (1, 2, True), (1, 40, False)):
        calls.clear()
        testing.check_case("numba_cuda", dataclasses.replace(case, batch=batch, units=units))
        launched = {launched for direction, *_, launched in calls}
        assert launched == ({expected} if expected is not None else set()), (batch, units, calls)
    with kernel_overrides(cuda_recurrence_design="general"):
        calls.clear()
        testing.check_case("numba_cuda", case)
        assert calls == []
    with kernel_overrides(cuda_recurrence_design="small"), pytest.raises(RuntimeError, match="small-batch"):
        testing.check_case("numba_cuda", dataclasses.replace(case, units=40))


@pytest.mark.parametrize("direction,dtype,units,batch,expected", [
    # float32, H=1024 on 132 SMs: 128 blocks of 8 warps, the 128 KB weight slice in shared memory.
    ("forward", "float32", 1024, 1, (8, 128, True, (8 * 1024 * 4 + 1024) * 4)),
    ("forward", "float32", 1024, 16, (8, 128, True, (8 * 1024 * 4 + 16 * 1024) * 4)),
    # The backward stages dz [B, 4H]: at B=8 weights (128 KB) + staging (128 KB) exceed 227 KB.
    ("backward", "float32", 1024, 1, (8, 128, True, (8 * 4096 + 4096) * 4)),
    ("backward", "float32", 1024, 8, (8, 128, False, 8 * 4096 * 4)),
    ("forward", "float64", 1024, 4, (8, 128, False, 4 * 1024 * 8)),
    # Small H: at least 8 warps per block (fewer arrivals at the barrier), H padded to 32s.
    ("forward", "float32", 256, 8, (8, 32, True, (8 * 256 * 4 + 8 * 256) * 4)),
    ("forward", "float32", 100, 1, (8, 13, True, (8 * 4 * 128 + 128) * 4)),
    ("forward", "float32", 8192, 1, None),          # 63 units per block: more than 32 warps
    ("backward", "float64", 4096, 16, None),        # dz staging alone exceeds shared memory
    ("forward", "float32", 256, 17, None),          # not a small batch
])
def test_gpu_launch_plan(direction, dtype, units, batch, expected):
    """The GPU launch plan (no GPU needed): units per block, blocks, weight placement, shared bytes."""
    from lstmeng.backends import _cuda_recurrence_small as small
    options = SequenceOptions(training=True)
    config = small.plan(direction, dtype, units, batch, options, simulator=False, multiprocessors=132,
                        optin_limit=227 * 1024)
    if expected is None:
        assert config is None
        return
    assert (config.units_per_block, config.blocks, config.weights_in_shared,
            config.shared_values() * np.dtype(dtype).itemsize) == expected


def test_kernel_cache_is_keyed_by_configuration():
    from lstmeng.backends import _cuda_recurrence_small as small
    options = SequenceOptions(training=True)
    first = small.plan("forward", "float32", 64, 2, options, simulator=False, multiprocessors=132,
                       optin_limit=227 * 1024)
    again = small.plan("forward", "float32", 64, 2, SequenceOptions(training=True), simulator=False,
                       multiprocessors=132, optin_limit=227 * 1024)
    # The bias and the input dropout do not reach the recurrence: the same kernel.
    without_bias = small.plan("forward", "float32", 64, 2, SequenceOptions(training=True, has_bias=False,
                                                                           has_input_dropout=True),
                              simulator=False, multiprocessors=132, optin_limit=227 * 1024)
    reversed_config = small.plan("forward", "float32", 64, 2, SequenceOptions(training=True, reverse=True),
                                 simulator=False, multiprocessors=132, optin_limit=227 * 1024)
    assert small.kernel_for(first) is small.kernel_for(again)
    assert small.kernel_for(first) is small.kernel_for(without_bias)
    assert small.kernel_for(first) is not small.kernel_for(reversed_config)
    # Launch-wide flags are compile-time: the reversed kernel's source indexes time backwards.
    assert "t = steps - 1 - step" in small.kernel_for(reversed_config).py_func.__source__
    assert "t = steps - 1 - step" not in small.kernel_for(first).py_func.__source__


# -- the GPU benchmark script's logic ---------------------------------------------------------------
def test_gpu_small_batch_benchmark_runs_in_simulate_mode(capsys, tmp_path):
    if REAL_GPU:
        pytest.skip("the simulator is off in this session")
    spec = importlib.util.spec_from_file_location("gpu_small_batch", REPO / "benchmarks" / "gpu_small_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--simulate", "--out", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert "simulator" in output
    assert (tmp_path / "gpu_small_batch.txt").exists()
    correctness = [line for line in output.splitlines() if line.startswith("check")]
    assert correctness, output
    for line in correctness:     # small and general design against the float64 NumPy reference
        assert float(line.split()[-1]) < 1e-4, line


# -- real GPU only: the barrier under stress ----------------------------------------------------------
@pytest.mark.skipif(not REAL_GPU, reason="needs a real GPU (LSTMENG_REAL_CUDA=1)")
@pytest.mark.parametrize("batch", [1, 8])
def test_barrier_stress_thousands_of_steps(batch):
    """T=4000, H=1024: two runs of the small design are bit-identical (the same summation order,
    so any barrier race would show as a difference), and agree with the general kernel to 1e-5
    relative (different summation order)."""
    backend = _backend()
    rng = np.random.default_rng(batch)
    units, steps, features = 1024, 4000, 64
    dtype = np.float32

    def device(array):
        return backend.ops.asarray(array.astype(dtype), dtype)

    x = device(rng.normal(size=(batch, steps, features)))
    kernel = device(rng.normal(size=(features, 4 * units)) / np.sqrt(features))
    recurrent = device(rng.normal(size=(units, 4 * units)) / np.sqrt(units))
    bias = device(rng.normal(size=4 * units) * 0.1)
    zeros = device(np.zeros((batch, units)))
    dy = device(rng.normal(size=(batch, steps, units)))
    results = {}
    for run, design in (("small 1", "small"), ("small 2", "small"), ("general", "general")):
        with kernel_overrides(cuda_recurrence_design=design):
            forward = sequence_forward(backend, x, zeros, zeros, kernel, recurrent, bias, training=True)
            grads = backend.sequence_backward(dy, zeros, zeros, forward.workspace)
        results[run] = {name: backend.ops.to_numpy(value) for name, value in
                        (("outputs", forward.outputs), ("c", forward.c), ("dh0", grads.dh0),
                         ("drecurrent_kernel", grads.drecurrent_kernel))}
    for name in results["small 1"]:
        np.testing.assert_array_equal(results["small 1"][name], results["small 2"][name], err_msg=name)
        want = results["general"][name].astype(np.float64)
        error = np.linalg.norm(results["small 1"][name] - want) / max(np.linalg.norm(want), 1e-30)
        assert error < 1e-5, f"{name}: relative difference {error:.2e} to the general kernel"


# -- strided arguments: one compiled specialization per layout ------------------------------------------
def test_strided_views_compute_what_contiguous_copies_do():
    """Inputs and output gradients given as strided views (what ``lstmeng.torch`` hands over for a
    bidirectional layer: each direction's half of the output gradient) give bitwise the results of
    contiguous copies, also when the contiguous call came first, and both match the float64 NumPy
    reference. On a GPU the first call's plan
    holds a kernel specialized for its arguments' layouts, and a specialized kernel does not check
    the types it is given: reused for a strided view it read the view as contiguous (the CUDA-tensor
    test of ``lstmeng.torch`` failed on an H200, 2026-11-28, after a CPU-tensor test in the same process)."""
    backend = _backend()
    batch, steps, features, units = (4, 40, 64, 256) if REAL_GPU else (2, 3, 3, 4)
    dtype = np.float32
    rng = np.random.default_rng(7)

    def device(array):
        return backend.ops.asarray(array.astype(dtype), dtype)

    x_wide = device(rng.normal(size=(batch, steps, 2 * features)))
    dy_wide = device(rng.normal(size=(batch, steps, 2 * units)))
    kernel = device(rng.normal(size=(features, 4 * units)) / np.sqrt(features))
    recurrent = device(rng.normal(size=(units, 4 * units)) / np.sqrt(units))
    bias = device(rng.normal(size=4 * units) * 0.1)
    zeros = device(np.zeros((batch, units)))
    views = {"strided": (x_wide[:, :, features:], dy_wide[:, :, units:])}
    views["contiguous"] = tuple(device(backend.ops.to_numpy(view)) for view in views["strided"])
    assert not views["strided"][1].is_c_contiguous() and views["contiguous"][1].is_c_contiguous()
    results = {}
    with kernel_overrides(cuda_recurrence_design="small"):
        for layout in ("contiguous", "strided"):
            x, dy = views[layout]
            forward = sequence_forward(backend, x, zeros, zeros, kernel, recurrent, bias, training=True)
            grads = backend.sequence_backward(dy, zeros, zeros, forward.workspace)
            results[layout] = {name: backend.ops.to_numpy(value) for name, value in
                               (("outputs", forward.outputs), ("c", forward.c), ("dx", grads.dx),
                                ("dh0", grads.dh0), ("dkernel", grads.dkernel),
                                ("drecurrent_kernel", grads.drecurrent_kernel))}
    for name, value in results["contiguous"].items():
        np.testing.assert_array_equal(results["strided"][name], value, err_msg=name)
    # The independent reference: the NumPy backend in float64 on the same values.
    from lstmeng.backends import registry
    reference = registry.get_backend_object("numpy")
    host = {name: backend.ops.to_numpy(array).astype(np.float64) for name, array in
            (("x", views["contiguous"][0]), ("dy", views["contiguous"][1]), ("kernel", kernel),
             ("recurrent", recurrent), ("bias", bias), ("zeros", zeros))}
    forward = sequence_forward(reference, host["x"], host["zeros"], host["zeros"], host["kernel"],
                               host["recurrent"], host["bias"], training=True)
    grads = reference.sequence_backward(host["dy"], host["zeros"], host["zeros"], forward.workspace)
    for name, value, gradient in (("outputs", forward.outputs, False), ("c", forward.c, False),
                                  ("dx", grads.dx, True), ("dh0", grads.dh0, True), ("dkernel", grads.dkernel, True),
                                  ("drecurrent_kernel", grads.drecurrent_kernel, True)):
        testing.assert_close(results["strided"][name], value, name, "float32", gradient)


def test_launch_plans_are_keyed_by_argument_layouts(monkeypatch):
    """The GPU branch of ``launch`` (run here with a stand-in planner and kernel): a call whose
    arguments have another layout gets its own plan, and the same layouts reuse theirs."""
    import types

    import numba

    from lstmeng.backends import _cuda_recurrence_small as small
    planned, launched = [], []

    class RecordingKernel:
        def __init__(self, layouts):
            self.layouts = layouts

        def __getitem__(self, launch_configuration):
            return lambda *arguments: launched.append(self.layouts)

    def stand_in_planner(direction, dtype, units, batch, options, arrays, *rest):
        layouts = tuple(t.layout for t in small.argument_types(arrays))
        planned.append(layouts)
        config = types.SimpleNamespace(scratch_values=lambda: 1, blocks=1, threads=32, units_per_block=1,
                                       weights_in_shared=False)
        return config, RecordingKernel(layouts), 0

    monkeypatch.setattr(small, "_plan_on_device", stand_in_planner)
    monkeypatch.setattr(small, "_device_id", lambda: "stand-in GPU")
    monkeypatch.setattr(small, "_launch_plans", {})
    monkeypatch.setattr(small, "_scratch", {})
    monkeypatch.setattr(numba.config, "ENABLE_CUDASIM", 0)   # the GPU branch (nothing here reaches a GPU)
    wide = np.zeros((2, 3, 32), np.float32)
    contiguous = (np.zeros((2, 3, 16), np.float32), np.zeros((4, 16), np.float32))
    strided = (wide[:, :, :16], contiguous[1])
    for arrays in (contiguous, strided, contiguous, strided):
        assert small.launch("forward", np.float32, 4, 2, arrays, SequenceOptions(training=True),
                            weights_in_shared=None, allocate=lambda shape, dtype: np.zeros(shape, dtype),
                            allow_dynamic_shared=None, launch_log={})
    assert planned == [("C", "C"), ("A", "C")]
    assert launched == [("C", "C"), ("A", "C"), ("C", "C"), ("A", "C")]
