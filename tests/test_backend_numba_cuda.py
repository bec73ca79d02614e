"""Tests of the numba_cuda backend.

Without a GPU (CI) every kernel runs under numba's CUDA simulator
(tests/conftest.py sets NUMBA_ENABLE_CUDASIM=1 before numba is imported) at
tiny sizes, compared with the NumPy reference backend. On a machine with a
GPU, ``LSTMENG_REAL_CUDA=1 python -m pytest tests/test_backend_numba_cuda.py``
runs the same tests on the device at realistic sizes, plus the float64
reference check that only means something there.

What the simulator cannot show: a cooperative grid there is one block (numba
runs simulated blocks one after another), so the split of hidden units
across blocks and the grid barrier between blocks run only on a real GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lstmeng as le
from lstmeng import testing
from lstmeng.backends import registry
from lstmeng.testing import kernel_overrides

from _backends import REAL_GPU, fast_simulator_thread_switches, numba_cuda_backend, ptx_check_lines, sequence_forward

REPO = Path(__file__).resolve().parent.parent
_backend = numba_cuda_backend
_fast_simulator_thread_switches = pytest.fixture(autouse=True, scope="module")(fast_simulator_thread_switches)


@pytest.fixture
def backend():
    return _backend()


# -- conformance with the NumPy reference ---------------------------------------------
def _simulator_sizes(cases):
    """Shrink cases to simulator sizes, varied so that row chunks, K tiles, K splits and
    unit groups of the kernels all occur (simulator shape: 8 threads, 2 rows, K tile 4)."""
    sizes = [(3, 4, 3, 5), (1, 3, 4, 3), (2, 4, 5, 6), (3, 3, 2, 4)]
    return [dataclasses.replace(case, batch=b, steps=t, input_size=i, units=h)
            for index, case in enumerate(cases) for b, t, i, h in [sizes[index % len(sizes)]]]


if REAL_GPU:
    CASES = testing.conformance_cases(size=8)
    GLOBAL_WEIGHT_CASES = testing.conformance_cases(dtypes=("float32",), size=8, cases_per_dtype=12)
else:
    CASES = _simulator_sizes(testing.conformance_cases(dtypes=("float32",), cases_per_dtype=14)
                             + testing.conformance_cases(dtypes=("float64",), cases_per_dtype=6))
    GLOBAL_WEIGHT_CASES = _simulator_sizes(testing.conformance_cases(dtypes=("float32",), cases_per_dtype=4))


def test_cases_cover_the_contract():
    """The chosen subset meets every mask pattern, direction, output mode and option."""
    assert {case.mask for case in CASES} == set(testing.MASK_PATTERNS)
    for flag in ("reverse", "zero_output_for_mask", "return_sequences", "initial_state", "dropout", "use_bias"):
        assert {getattr(case, flag) for case in CASES} == {False, True}, flag
    assert {case.dtype for case in CASES} == {"float32", "float64"}
    assert {(case.activation, case.recurrent_activation) for case in CASES} == set(testing.ACTIVATION_PAIRS)


@pytest.mark.parametrize("design", [None, "general"], ids=["auto-design", "general-design"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_conformance(backend, case, design):
    """Batches of up to 16 rows go to the small-batch kernels unless the general design is forced;
    both must pass every case (tests/test_cuda_small_batch.py tests the small design further)."""
    with kernel_overrides(cuda_recurrence_design=design):
        testing.check_case("numba_cuda", case)


@pytest.mark.parametrize("case", GLOBAL_WEIGHT_CASES, ids=str)
def test_conformance_with_weights_in_global_memory(backend, case):
    """The fallback for weight slices that do not fit in shared memory computes the same."""
    with kernel_overrides(cuda_weights_in_shared=False):
        testing.check_case("numba_cuda", case)


@pytest.mark.skipif(not REAL_GPU, reason="needs a real GPU (LSTMENG_REAL_CUDA=1)")
@pytest.mark.parametrize("batch,units", [(1, 1024), (8, 512), (64, 256)])
def test_float32_relative_error_against_float64_reference(backend, batch, units):
    """float32 on the GPU within 1e-5 relative error of a float64 NumPy computation."""
    rng = np.random.default_rng(units + batch)
    steps = 100
    x = rng.normal(size=(batch, steps, units))
    kernel = rng.normal(size=(units, 4 * units)) / np.sqrt(units)
    recurrent = rng.normal(size=(units, 4 * units)) / np.sqrt(units)
    bias = rng.normal(size=4 * units) * 0.1
    h0 = np.zeros((batch, units))
    reference = registry.get_backend_object("numpy")
    expected = sequence_forward(reference, x, h0, h0, kernel, recurrent, bias, training=True)
    dy = rng.normal(size=expected.outputs.shape)
    expected_grads = reference.sequence_backward(dy, h0, h0, expected.workspace)

    def device(array):
        return backend.ops.asarray(array.astype(np.float32), np.float32)

    actual = sequence_forward(backend, device(x), device(h0), device(h0), device(kernel), device(recurrent),
                                      device(bias), training=True)
    grads = backend.sequence_backward(device(dy), device(h0), device(h0), actual.workspace)
    pairs = {"outputs": (actual.outputs, expected.outputs), "dx": (grads.dx, expected_grads.dx),
             "drecurrent_kernel": (grads.drecurrent_kernel, expected_grads.drecurrent_kernel),
             "dkernel": (grads.dkernel, expected_grads.dkernel)}
    for name, (got, want) in pairs.items():
        got = backend.ops.to_numpy(got).astype(np.float64)
        error = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert error < 1e-5, f"{name}: relative error {error:.2e}"


# -- launch configuration on a GPU (decision logic, with a stand-in device) ----------------
class _StandInOverload:
    """Answers max_cooperative_grid_blocks like an H100 would: one 256-thread block per SM
    while the block's shared memory fits ``optin`` bytes."""

    def __init__(self, sms, optin):
        self.sms, self.optin = sms, optin

    def max_cooperative_grid_blocks(self, threads, shared_bytes=0):
        return self.sms if shared_bytes <= self.optin else 0


class _StandInKernel:
    def __init__(self, overload):
        self.overloads = {"signature": overload}

    def specialize(self, *arguments):
        return self


@pytest.mark.parametrize("units,dtype,optin_allowed,expected", [
    # float32, H=1024 on 132 SMs: 128 blocks of 8 units, weights (128 KB) + staging (40 KB) on chip.
    (1024, "float32", True, (128, 8, True, (4 * 1024 * 8 + 8 * 1024 + 256 * 8) * 4)),
    (512, "float32", True, (128, 4, True, (4 * 512 * 4 + 8 * 1024 + 256 * 8) * 4)),
    # The driver refuses the opt-in: weights from global memory, staging only (40 KB).
    (1024, "float32", False, (128, 8, False, (8 * 1024 + 256 * 8) * 4)),
    # float64, H=1024: the weight slice (256 KB) does not fit in 227 KB.
    (1024, "float64", True, (128, 8, False, (4 * 1024 + 256 * 4) * 8)),
    # More units than threads can hold columns for: 2 groups per block.
    (4096, "float32", True, (128, 32, False, (8 * 1024 + 256 * 8) * 4)),
])
def test_gpu_launch_partition(monkeypatch, units, dtype, optin_allowed, expected):
    from lstmeng.backends import _cuda_recurrence as rec
    from lstmeng.backends import numba_cuda
    device = type("StandInH100", (), {"MULTIPROCESSOR_COUNT": 132, "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN": 227 * 1024})
    monkeypatch.setattr(numba_cuda.cuda, "get_current_device", lambda: device(), raising=False)
    monkeypatch.setattr(numba_cuda, "_allow_dynamic_shared", lambda overload, nbytes: optin_allowed)
    backend = numba_cuda.NumbaCudaBackend()
    dtype = np.dtype(dtype)
    kernel = _StandInKernel(_StandInOverload(132, 227 * 1024 if optin_allowed else 48 * 1024))
    _, blocks, units_per_block, in_shared, shared_bytes = backend._partition(
        "forward", kernel, (), dtype, units, rec.GPU_SHAPES[dtype.name])
    assert (blocks, units_per_block, in_shared, shared_bytes) == expected


@pytest.mark.parametrize("dtype,batch,rows", [("float32", 1, 1), ("float32", 2, 2), ("float32", 3, 4),
                                              ("float32", 8, 8), ("float32", 256, 8), ("float64", 8, 4)])
def test_gpu_rows_per_chunk_follow_the_batch(monkeypatch, dtype, batch, rows):
    """Small batches compute only their rows (B=1: one row, not 8 with 7 of padding)."""
    from lstmeng.backends import numba_cuda
    monkeypatch.setattr(numba_cuda, "simulator_enabled", lambda: False)
    shape = numba_cuda.NumbaCudaBackend()._recurrence_shape(np.dtype(dtype), batch)
    assert (shape.rows, shape.threads, shape.k_tile) == (rows, 256, 1024)


def test_gpu_launch_partition_shrinks_the_grid_to_the_cooperative_limit(monkeypatch):
    from lstmeng.backends import _cuda_recurrence as rec
    from lstmeng.backends import numba_cuda
    device = type("StandIn", (), {"MULTIPROCESSOR_COUNT": 132, "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN": 227 * 1024})
    monkeypatch.setattr(numba_cuda.cuda, "get_current_device", lambda: device(), raising=False)
    monkeypatch.setattr(numba_cuda, "_allow_dynamic_shared", lambda overload, nbytes: True)
    backend = numba_cuda.NumbaCudaBackend()
    # Another context holds part of the GPU: only 40 blocks can be co-resident.
    kernel = _StandInKernel(_StandInOverload(40, 227 * 1024))
    _, blocks, units_per_block, in_shared, _ = backend._partition(
        "backward", kernel, (), np.dtype("float32"), 256, rec.GPU_SHAPES["float32"])
    assert blocks <= 40 and blocks * units_per_block >= 256 and in_shared


# -- device arrays through the layers -----------------------------------------------------
def _device_kind(array) -> bool:
    return registry.array_kind(array) == "cuda" and _backend().ops.owns(array)


class _HostCopies:
    """Records every device-to-host copy the backend makes (shape of each)."""

    def __init__(self, backend, monkeypatch):
        self.shapes = []
        original = backend.ops.to_numpy

        def to_numpy(array):
            self.shapes.append(tuple(int(n) for n in array.shape))
            return original(array)

        monkeypatch.setattr(backend.ops, "to_numpy", to_numpy)


def _weights_only(shapes, model):
    """Host copies made during a training step on device arrays: none at all (the weight
    gradients stay on the device since issue 14, and nothing sequence-shaped ever left it)."""
    return list(shapes)


def _check_training_step_on_device(backend, monkeypatch, host, gpu, x, expected, rng, **call):
    """Run ``gpu`` on device arrays and compare with the host model's ``expected`` output:
    outputs, dx and the weight gradients stay on the device (nothing comes to the host), and the
    outputs, dx and weight gradients match the numpy model's."""
    copies = _HostCopies(backend, monkeypatch)
    actual = gpu(backend.ops.asarray(x, np.float32), training=True, **call)
    assert _device_kind(actual)
    dy = rng.normal(size=expected.shape).astype(np.float32)
    dx_device = gpu.backward(backend.ops.asarray(dy, np.float32))
    assert _device_kind(dx_device)
    assert _weights_only(copies.shapes, gpu) == []
    np.testing.assert_allclose(backend.ops.to_numpy(actual), expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(backend.ops.to_numpy(dx_device), host.backward(dy), rtol=2e-4, atol=2e-5)
    for name in host.grads:
        # A GPU layer keeps its gradients on the device (issue 14): compared on the host.
        assert _device_kind(gpu.grads[name]), name
        np.testing.assert_allclose(backend.ops.to_numpy(gpu.grads[name]), host.grads[name], rtol=2e-4, atol=2e-5,
                                   err_msg=name)


@pytest.mark.parametrize("go_backwards", [False, True])
def test_lstm_device_array_in_device_array_out(backend, monkeypatch, go_backwards):
    batch, steps, features, units = 3, 4, 3, 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, steps, features)).astype(np.float32)
    mask = np.arange(steps)[None] < np.array([4, 2, 3])[:, None]
    host = le.LSTM(units, return_sequences=True, return_state=True, go_backwards=go_backwards,
                   backend="numpy", seed=1)
    gpu = le.LSTM(units, return_sequences=True, return_state=True, go_backwards=go_backwards, seed=1)
    expected = host(x, mask=mask, training=True)
    gpu.set_weights(host.get_weights())
    copies = _HostCopies(backend, monkeypatch)
    x_device = backend.ops.asarray(x, np.float32)
    actual = gpu(x_device, mask=backend.ops.asarray(mask, np.bool_), training=True)   # backend="auto"
    for got in actual:
        assert _device_kind(got), type(got)
    dy = rng.normal(size=expected[0].shape).astype(np.float32)
    dx_device = gpu.backward(backend.ops.asarray(dy, np.float32))
    assert _device_kind(dx_device)
    assert _weights_only(copies.shapes, gpu) == []
    dx = host.backward(dy)
    for got, want in zip(actual, expected):
        np.testing.assert_allclose(backend.ops.to_numpy(got), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(backend.ops.to_numpy(dx_device), dx, rtol=2e-4, atol=2e-5)
    for name in host.grads:
        assert _device_kind(gpu.grads[name]), name
        np.testing.assert_allclose(backend.ops.to_numpy(gpu.grads[name]), host.grads[name], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("merge_mode", ["concat", "sum", "mul", "ave"])
def test_bidirectional_on_device(backend, monkeypatch, merge_mode):
    batch, steps, features, units = 2, 3, 3, 3
    rng = np.random.default_rng(1)
    x = rng.normal(size=(batch, steps, features)).astype(np.float32)
    lengths = [3, 2]
    host = le.Bidirectional(le.LSTM(units, return_sequences=True, backend="numpy", seed=2), merge_mode=merge_mode)
    gpu = le.Bidirectional(le.LSTM(units, return_sequences=True, backend="numba_cuda", seed=2),
                           merge_mode=merge_mode)
    expected = host(x, lengths=lengths, training=True)
    gpu.set_weights(host.get_weights())
    _check_training_step_on_device(backend, monkeypatch, host, gpu, x, expected, rng, lengths=lengths)


def test_sequential_on_device(backend, monkeypatch):
    batch, steps, features = 2, 4, 3
    rng = np.random.default_rng(2)
    x = rng.normal(size=(batch, steps, features)).astype(np.float32)
    mask = np.array([[True, True, False, False], [False, True, True, True]])

    def model(name):
        return le.Sequential([
            le.Bidirectional(le.LSTM(3, return_sequences=True, backend=name, seed=3)),
            le.Dropout(0.25, seed=4),
            le.LSTM(2, backend=name, seed=5, dropout=0.2, recurrent_dropout=0.3),
        ])

    host, gpu = model("numpy"), model("numba_cuda")
    expected = host(x, mask=mask, training=True)
    # Building draws the initial weights from each layer's seeded generator; build
    # the same way as the host model so the dropout masks drawn next are the same.
    gpu.build(features).set_weights(host.get_weights())
    _check_training_step_on_device(backend, monkeypatch, host, gpu, x, expected, rng, mask=mask)


def test_stateful_layer_keeps_states_on_device(backend):
    rng = np.random.default_rng(5)
    chunks = [rng.normal(size=(2, 3, 3)).astype(np.float32) for _ in range(2)]
    host = le.LSTM(4, stateful=True, return_sequences=True, backend="numpy", seed=6)
    gpu = le.LSTM(4, stateful=True, return_sequences=True, backend="numba_cuda", seed=6)
    for chunk in chunks:
        expected = host(chunk)
        actual = gpu(backend.ops.asarray(chunk, np.float32))
        assert _device_kind(actual) and all(_device_kind(state) for state in gpu.states)
        np.testing.assert_allclose(backend.ops.to_numpy(actual), expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(backend.ops.to_numpy(gpu.states[1]), host.states[1], rtol=2e-5, atol=2e-5)


def test_host_arrays_copy_in_and_out(backend):
    """Called with NumPy arrays, the backend copies them in and its results out; with device
    arrays it returns device arrays (the conformance suite covers that side)."""
    case = _simulator_sizes(testing.conformance_cases(dtypes=("float32",), cases_per_dtype=1))[0]
    case = dataclasses.replace(case, mask="holes", return_sequences=True)
    inputs = testing.make_inputs(case)
    arguments = [inputs[name] for name in ("x", "h0", "c0", "kernel", "recurrent_kernel", "bias", "mask")]
    results = []
    for engine in (backend, registry.get_backend_object("numpy")):
        forward = sequence_forward(engine, *arguments, training=True, return_sequences=True)
        grads = engine.sequence_backward(inputs["doutputs"], inputs["dh"], inputs["dc"], forward.workspace)
        results.append([forward.outputs, forward.h, forward.c, grads.dx, grads.dh0, grads.drecurrent_kernel])
    for got, want in zip(*results):
        assert type(got) is np.ndarray
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_layer_with_host_input_gives_host_output(backend):
    """NumPy in, NumPy out through a layer too (copy in, copy out); the values match numpy's."""
    x = np.random.default_rng(6).normal(size=(2, 3, 2)).astype(np.float32)
    results = []
    for name in ("numba_cuda", "numpy"):
        lstm = le.LSTM(3, return_sequences=True, go_backwards=True, backend=name, seed=0)
        y = lstm(x, lengths=[3, 2], training=True)
        dx = lstm.backward(np.ones_like(y))
        results.append((y, dx))
    for got, want in zip(*results):
        assert type(got) is np.ndarray
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_cell_on_device(backend):
    host = le.LSTMCell(3, backend="numpy", seed=0)
    gpu = le.LSTMCell(3, backend="numba_cuda", seed=0)
    x = np.random.default_rng(3).normal(size=(2, 4)).astype(np.float32)
    h_host, _ = host(x, training=True)
    h_gpu, states = gpu(backend.ops.asarray(x, np.float32), training=True)
    assert _device_kind(h_gpu) and all(_device_kind(state) for state in states)
    np.testing.assert_allclose(backend.ops.to_numpy(h_gpu), h_host, rtol=2e-5, atol=2e-5)
    dh = np.ones((2, 3), np.float32)
    dx_host, _ = host.backward(dh)
    dx_gpu, _ = gpu.backward(backend.ops.asarray(dh, np.float32))
    assert _device_kind(dx_gpu) and tuple(dx_gpu.shape) == (2, 4)
    np.testing.assert_allclose(backend.ops.to_numpy(dx_gpu), dx_host, rtol=2e-4, atol=2e-5)


# -- array helpers ---------------------------------------------------------------------------
def test_array_helpers_match_numpy(backend):
    rng = np.random.default_rng(4)
    a = rng.normal(size=(2, 3, 4)).astype(np.float32)
    b = rng.normal(size=(2, 3, 4)).astype(np.float32)
    c = rng.normal(size=(2, 3, 2)).astype(np.float32)
    da, db, dc = (backend.ops.asarray(v, np.float32) for v in (a, b, c))
    results = {
        "add": (backend.ops.add(da, db), a + b),
        "multiply": (backend.ops.multiply(da, db), a * b),
        "scale": (backend.ops.scale(da, 0.5), a * 0.5),
        "concatenate": (backend.ops.concatenate([da, dc], axis=-1), np.concatenate([a, c], axis=-1)),
        "swap_batch_time": (backend.ops.swap_batch_time(da), np.swapaxes(a, 0, 1)),
        "flip_time": (backend.ops.flip_time(da), a[:, ::-1]),
        "expand_time": (backend.ops.expand_time(backend.ops.asarray(a[:, 0], np.float32)), a[:, :1]),
        "zeros": (backend.ops.zeros((2, 5), np.float64), np.zeros((2, 5))),
        "asarray_cast": (backend.ops.asarray(da, np.float64), a.astype(np.float64)),
        "add_2d": (backend.ops.add(da[:, 0], db[:, 0]), a[:, 0] + b[:, 0]),
        "add_1d": (backend.ops.add(backend.ops.asarray(a[0, 0], np.float32), backend.ops.asarray(b[0, 0], np.float32)),
                   a[0, 0] + b[0, 0]),
    }
    for name, host_result, want in (
            ("host add", backend.ops.add(a, b), a + b), ("host scale", backend.ops.scale(a, 2.0), a * 2),
            ("host flip_time", backend.ops.flip_time(a), a[:, ::-1]),
            ("host swap_batch_time", backend.ops.swap_batch_time(a), np.swapaxes(a, 0, 1)),
            ("host concatenate", backend.ops.concatenate([a, c]), np.concatenate([a, c], axis=-1))):
        assert isinstance(host_result, np.ndarray), name      # host arrays stay on the host
        np.testing.assert_allclose(host_result, want, rtol=1e-6, err_msg=name)
    pieces = backend.ops.split_last(backend.ops.concatenate([da, dc]), [4, 2])
    results["split_last_0"] = (pieces[0], a)
    results["split_last_1"] = (pieces[1], c)
    for name, (got, want) in results.items():
        assert _device_kind(got), name
        host = backend.ops.to_numpy(got)
        assert host.dtype == want.dtype and host.shape == want.shape, name
        np.testing.assert_allclose(host, want, rtol=1e-6, atol=0, err_msg=name)


def test_empty_batch_on_device(backend):
    lstm = le.LSTM(3, return_sequences=True, backend="numba_cuda", seed=0)
    y = lstm(backend.ops.asarray(np.zeros((0, 4, 2), np.float32), np.float32))
    assert tuple(y.shape) == (0, 4, 3)


# -- availability --------------------------------------------------------------------------
@pytest.mark.slow   # list_backends() probes every backend, TensorFlow included (an import of seconds)
def test_list_backends_row():
    row = next(info for info in le.list_backends() if info.name == "numba_cuda")
    assert row.available, row.reason
    assert ("CUDA simulator" in row.device) if not REAL_GPU else row.device.startswith("GPU:")


def test_probe_reasons(monkeypatch):
    """Missing numba-cuda, or no driver / GPU, are reasons, not crashes."""
    from lstmeng.backends import numba_cuda
    monkeypatch.setattr(numba_cuda, "_IMPORT_ERROR", ImportError("No module named 'numba'"))
    with pytest.raises(NotImplementedError, match="numba-cuda is not installed.*lstmeng\\[cuda\\]"):
        numba_cuda.backend.probe()
    monkeypatch.setattr(numba_cuda, "_IMPORT_ERROR", None)
    monkeypatch.setattr(numba_cuda, "simulator_enabled", lambda: False)
    monkeypatch.setattr(numba_cuda.cuda, "is_available", lambda: False, raising=False)
    with pytest.raises(NotImplementedError, match="no CUDA GPU found"):
        numba_cuda.backend.probe()


def _load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_fresh_process_without_simulator():
    """In a fresh process without the simulator: importing lstmeng imports no numba; on this
    machine (no CUDA driver or GPU in CI) the backend is unavailable with the reason, and the
    GPU benchmark script exits cleanly saying so. (One process: importing lstmeng is slow.)"""
    code = ("import sys, runpy, lstmeng\n"
            "print('numba imported:', 'numba' in sys.modules)\n"
            "from lstmeng.backends import registry\n"
            "info = registry._entry('numba_cuda')[1]\n"
            "print('row:', info.available, info.reason)\n"
            "if not info.available:\n"
            "    sys.argv = ['gpu_bench.py', '--quick']\n"
            f"    runpy.run_path({str(REPO / 'benchmarks' / 'gpu_bench.py')!r}, run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    lines = result.stdout.strip().splitlines()
    assert "numba imported: False" in lines, result.stdout + result.stderr
    row = [line for line in lines if line.startswith("row:")][0]
    if REAL_GPU or row.startswith("row: True"):
        assert row.startswith("row: True"), row
        return
    assert row.startswith("row: False") and ("CUDA" in row or "numba" in row), row
    # runpy propagates the script's sys.exit(0) as the process's exit status.
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no CUDA GPU" in lines[-1], lines


@pytest.mark.slow
def test_gpu_benchmark_script_runs_in_simulate_mode(capsys):
    """The GPU benchmark's logic (shapes, both engines, table) on one tiny shape under the simulator."""
    if REAL_GPU:
        pytest.skip("the simulator is off in this session")
    assert _load_gpu_bench().main(["--simulate"]) == 0
    output = capsys.readouterr().out
    assert "simulator" in output and "numba_cuda" in output
    rows = [line for line in output.splitlines() if line.startswith(("inference", "train"))]
    assert [row.split()[0] for row in rows] == ["inference", "train"], output
    for row in rows:   # numba_cuda against torch.nn.LSTM on the same weights: outputs and dx
        assert float(row.split("|")[-1]) < 1e-5, row


# -- compiling for a real GPU without one ------------------------------------------------------
_COMPILE_CHECK = r'''
from lstmeng.backends import _cuda_elementwise as ew, _cuda_gemm as gm, _cuda_recurrence as rec
from lstmeng.backends import _cuda_recurrence_small as small
i64, b1, f64 = numba.int64, numba.boolean, numba.float64
from lstmeng.backends.base import SequenceOptions
for name in ("float32", "float64"):
    dt = np.dtype(name)
    f1, f2, f3, m1, m2 = A(2, dt), A((2, 2), dt), A((2, 2, 2), dt), A(2, bool), A((2, 2), bool)
    strided = typeof(np.empty((4, 4), dt)[:, 1:3])
    counter = A(1, np.uint32)
    # The flags are compile-time constants of every recurrence kernel: masked training with recurrent
    # dropout here, the configuration with the most code.
    flagged = SequenceOptions(training=True, has_mask=True, has_recurrent_dropout=True)
    general_forward = (f3, f2, f2, m2, m2, strided, f2, f3, f2, f3, f3, f3, f3, i64, b1)
    general_backward = (f3, f2, f2, m2, m2, f3, f3, f2, f2, f2, f3, i64, b1)
    small_forward = (f3, f2, f2, m2, m2, f2, f2, f3, f2, f3, f3, f3, f3, counter, f1)
    small_backward = (f3, f2, f2, m2, m2, f3, f3, f2, f2, f2, f3, counter, f1)
    kernels = [
        ("gemm", gm.gemm_kernel(dt, gm.GPU_TILES, with_bias=True), (f1, f1, f1, f1, i64, i64, i64)),
        ("gemm large", gm.gemm_kernel(dt, gm.choose_tiles(10**5, 10**4, dt), transpose_b=True),
         (f1, f1, f1, i64, i64, i64)),
        ("gemm split", gm.gemm_kernel(dt, gm.choose_tiles(256, 1024, dt, 6400), transpose_a=True, split_k=True),
         (f1, f1, f1, i64, i64, i64, i64)),
        ("forward", rec.forward_kernel(dt, rec.GPU_SHAPES[name], flagged), general_forward),
        ("backward", rec.backward_kernel(dt, rec.GPU_SHAPES[name], flagged), general_backward),
        ("forward rows=1", rec.forward_kernel(dt, dataclasses.replace(rec.GPU_SHAPES[name], rows=1), flagged),
         general_forward),
        ("backward rows=1", rec.backward_kernel(dt, dataclasses.replace(rec.GPU_SHAPES[name], rows=1), flagged),
         general_backward),
        ("binary_1d", ew.binary_1d, (i64, f1, f1, f64, f1)),
        ("binary_2d", ew.binary_2d, (i64, strided, strided, f64, f2)),
        ("binary_3d", ew.binary_3d, (i64, f3, f3, f64, f3)),
        ("permute_3d", ew.permute_3d, (i64, f3, f3)), ("fill_1d", ew.fill_1d, (f1, i64)),
        ("scale_rows_3d", ew.scale_rows_3d, (f3, f2, f3)), ("select_rows", ew.select_rows, (f2, m1, b1, f2)),
        ("add_selected_rows", ew.add_selected_rows, (f2, f2, m1, b1, f2)),
        ("backward_prologue", ew.backward_prologue, (f2, f2, f2, m1, b1, b1, f2, f2, f1)),
        ("column_sums", ew.column_sums, (f2, f1)), ("mask_summary", ew.mask_summary, (m2, b1, b1, m2, m1)),
    ]
    # The small-batch design (batch <= 16): an inference and a training forward, a backward,
    # each as launched on a 132-SM sm_90 GPU with 227 KB of opt-in shared memory (float64's
    # backward at H=1024, B=8 does not fit that design and falls back to the general kernel).
    units = 1024 if name == "float32" else 512
    for training in (False, True):
        options = SequenceOptions(training=training, has_mask=training, has_recurrent_dropout=training)
        config = small.plan("forward", dt, units, 8, options, simulator=False, multiprocessors=132,
                            optin_limit=227 * 1024)
        kernels.append((f"small forward training={training}", small.kernel_for(config), small_forward))
    config = small.plan("backward", dt, units, 8, SequenceOptions(training=True), simulator=False,
                        multiprocessors=132, optin_limit=227 * 1024)
    kernels.append(("small backward", small.kernel_for(config), small_backward))
    for label, kernel, signature in kernels:
        ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
        depot = re.findall(r"__local_depot\d+\[(\d+)\]", ptx)
        print("OK", name, label, "local bytes", depot[0] if depot else 0)
'''


@pytest.mark.slow
@pytest.mark.skipif(REAL_GPU, reason="the GPU session compiles and runs the kernels for real")
def test_kernels_compile_to_ptx_for_hopper():
    """The simulator runs kernels as Python and type-checks nothing; here numba compiles every
    kernel to sm_90 PTX (needs libnvvm and nvrtc, e.g. pip install nvidia-nvvm nvidia-cuda-nvrtc
    with their lib folder on LD_LIBRARY_PATH; skipped without them), and the hot kernels must
    keep their accumulators in registers (no local-memory depot)."""
    lines = ptx_check_lines(_COMPILE_CHECK)
    assert len(lines) == 2 * 21, lines
    for line in lines:
        if any(hot in line for hot in ("gemm", "forward", "backward")):
            assert line.endswith("local bytes 0"), line
