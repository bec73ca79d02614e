"""The cython backend: conformance with the NumPy reference, layer parity, threads, variable-length path."""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time

import numpy as np
import pytest

import lstmeng as le
from lstmeng import testing
from lstmeng.backends import registry
from lstmeng.testing import kernel_overrides

from _backends import sequence_forward

cython_module = pytest.importorskip("lstmeng.backends.cython")
pytestmark = pytest.mark.skipif(
    cython_module._cython_lstm is None, reason="the cython extension is not built")


@pytest.mark.parametrize("case", testing.conformance_cases(), ids=str)
def test_conformance(case):
    testing.check_case("cython", case)


@pytest.fixture
def three_parts(monkeypatch):
    """Split even tiny batches over three threads, so the multi-part code runs."""
    monkeypatch.setattr(cython_module, "MIN_ROWS_PER_PART", 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    if cython_module._parts(5) != 3:
        pytest.skip("this build runs one part (no OpenMP or no OpenBLAS thread control)")


@pytest.mark.parametrize("case", testing.conformance_cases(size=3, cases_per_dtype=8), ids=str)
def test_conformance_larger_shapes(case):
    testing.check_case("cython", case)


@pytest.mark.parametrize("case", testing.conformance_cases(cases_per_dtype=24), ids=str)
def test_conformance_three_parts(case, three_parts):
    testing.check_case("cython", case)


@pytest.fixture(params=[2, 3, 4], ids=lambda threads: f"{threads}threads")
def split_units(request, monkeypatch):
    """Split the units of every batch among 2, 3 or 4 threads (one barrier per step).

    With the conformance suite's 6 units, 4 threads get slices of 1, 2, 1 and 2
    units; with 64 units, 3 threads get 0, 32 and 32 (a member with no units
    still takes part in every barrier).
    """
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)
    monkeypatch.setenv("OMP_NUM_THREADS", str(request.param))
    if not cython_module._team(1, 6, True)[2]:
        pytest.skip("this build runs one thread (no OpenMP or no OpenBLAS thread control)")
    with kernel_overrides(cython_split_units=True):
        yield request.param


@pytest.mark.parametrize("case", testing.conformance_cases(), ids=str)
def test_conformance_split_units(case, split_units):
    testing.check_case("cython", case)


# Slices of whole panel pairs take the packed kernel per gate block (float32).
@pytest.mark.parametrize("case", [
    dataclasses.replace(case, units=64, batch=3)
    for case in testing.conformance_cases(dtypes=("float32",), cases_per_dtype=8)], ids=str)
def test_conformance_split_units_packed_kernel_sizes(case, split_units):
    testing.check_case("cython", case)


@pytest.fixture
def generic_gate_math():
    """The generic row code instead of the fused AVX2 gate kernels (float32, tanh / sigmoid)."""
    with kernel_overrides(cython_fast_gate_math=False):
        yield


@pytest.mark.parametrize("case", testing.conformance_cases(dtypes=("float32",)), ids=str)
def test_conformance_generic_gate_math(case, generic_gate_math):
    testing.check_case("cython", case)


def _fast_and_generic(x, dy, units):
    """(outputs, dx, dbias, dkernel, drecurrent_kernel) with the fast and with the generic gate code."""
    results = []
    for fast in (True, False):
        with kernel_overrides(cython_fast_gate_math=fast):
            layer = le.LSTM(units, return_sequences=True, backend="cython", seed=0)
            y = layer(x, training=True)
            dx = layer.backward(dy)
            results.append((y, dx, *(layer.grads[name] for name in sorted(layer.grads))))
    return results


@pytest.mark.parametrize("units", [8, 13, 64])  # whole vectors of 8, a remainder, several
def test_fast_and_generic_gate_math_agree(units):
    """Both row codes against each other (each is held to float64 by the conformance suite)."""
    if not cython_module._cython_lstm.FAST_GATE_MATH:
        pytest.skip("this CPU has no AVX2+FMA")
    rng = np.random.default_rng(units)
    x = (rng.normal(size=(3, 9, 5)) * 3).astype(np.float32)
    dy = rng.normal(size=(3, 9, units)).astype(np.float32)
    fast, generic = _fast_and_generic(x, dy, units)
    for fast_value, generic_value in zip(fast, generic):
        np.testing.assert_allclose(fast_value, generic_value, rtol=2e-5, atol=2e-5)


def test_fast_gate_math_saturates_like_the_generic_code():
    """Inputs of 1e4 saturate every gate: finite outputs and gradients, the same outputs.
    (Gradients through saturated gates are differences of numbers near 1 in float32:
    they are compared for finiteness only.)"""
    if not cython_module._cython_lstm.FAST_GATE_MATH:
        pytest.skip("this CPU has no AVX2+FMA")
    rng = np.random.default_rng(0)
    x = rng.choice([-1e4, 1e4], size=(2, 6, 4)).astype(np.float32)
    dy = rng.normal(size=(2, 6, 16)).astype(np.float32)
    fast, generic = _fast_and_generic(x, dy, 16)
    assert all(np.all(np.isfinite(value)) for value in fast)
    np.testing.assert_allclose(fast[0], generic[0], rtol=1e-5, atol=1e-6)


def test_small_batches_split_units_by_default(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    if not cython_module._team(1, 128, None)[2]:
        pytest.skip("this build runs one thread (no OpenMP or no OpenBLAS thread control)")
    assert cython_module._team(1, 128, None) == (1, 2, True)
    assert cython_module._team(1, cython_module.MIN_UNITS_TO_SPLIT - 1, None) == (1, 1, False)
    assert cython_module._team(64, 128, None) == (2, 2, False)
    assert cython_module._team(1, 128, False) == (1, 1, False)


def test_variable_length_rows_are_dealt_so_parts_run_equal_steps():
    """Rows sorted by length go to the parts in snake order: with lengths 8, 7, .., 1 and
    two parts each part gets 18 steps (round-robin gave 20 and 16)."""
    lengths = np.arange(8, 0, -1)
    mask = np.arange(8)[None, :] < lengths[:, None]
    layout = cython_module._layout(mask, 8, 8, 2, True)
    steps_per_part = layout.active.sum(axis=1)
    assert steps_per_part.tolist() == [18, 18]
    for part in range(2):   # each part's rows stay sorted longest first
        rows = layout.order[layout.row_begin[part]:layout.row_begin[part + 1]]
        assert np.all(np.diff(lengths[rows]) <= 0)


def test_variable_length_layout_matches_its_definition():
    """The extension's layout builder against the layout's definition written with NumPy:
    rows sorted by decreasing length (ties in row order), dealt in snake order, active[p,
    t] = the part's rows longer than t, offsets the parts' packed rows one after another;
    and the right-padding test against a [B, T] comparison, on random masks and lengths."""
    extension = cython_module._cython_lstm
    rng = np.random.default_rng(5)
    for _ in range(300):
        batch, steps, parts = int(rng.integers(0, 30)), int(rng.integers(0, 20)), int(rng.integers(1, 5))
        lengths = rng.integers(0, steps + 1, size=batch)
        padded = np.arange(steps)[None, :] < lengths[:, None]
        holes = padded ^ (rng.random((batch, steps)) < 0.05)
        for mask in (padded, holes):
            real = mask.sum(axis=1)
            expected = real if np.array_equal(mask, np.arange(steps)[None, :] < real[:, None]) else None
            got = extension.right_padded_lengths(mask.view(np.uint8))
            assert (got is None) == (expected is None)
            if expected is not None:
                np.testing.assert_array_equal(got, expected)
        order, row_begin, active, offsets, largest = extension.variable_length_layout(
            lengths.astype(np.intp), steps, parts)
        by_length = np.argsort(-lengths, kind="stable")
        lap, seat = np.divmod(np.arange(batch), parts)
        dealt_to = np.where(lap % 2 == 0, seat, parts - 1 - seat)
        part_rows = [by_length[dealt_to == part] for part in range(parts)]
        np.testing.assert_array_equal(order, np.concatenate([[]] + part_rows))
        np.testing.assert_array_equal(row_begin, np.cumsum([0] + [len(rows) for rows in part_rows]))
        expected_active = np.array([[np.sum(lengths[rows] > t) for t in range(steps)] for rows in part_rows],
                                   np.intp).reshape(parts, steps)
        np.testing.assert_array_equal(active, expected_active)
        starts = np.concatenate([[0], np.cumsum(expected_active.sum(axis=1))[:-1]])
        np.testing.assert_array_equal(
            offsets, starts[:, None] + np.concatenate([np.zeros((parts, 1), np.intp),
                                                       np.cumsum(expected_active, axis=1)], axis=1))
        assert largest == max(len(rows) for rows in part_rows)
    with pytest.raises(ValueError, match="lengths must lie in 0 .. 4"):
        extension.variable_length_layout(np.array([2, 5], np.intp), 4, 2)
    with pytest.raises(ValueError, match="parts must be at least 1"):
        extension.variable_length_layout(np.array([2], np.intp), 4, 0)


@pytest.mark.parametrize("steps", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("units", [32, 64])
def test_short_calls_use_blas_and_long_calls_the_packed_kernel_with_the_same_results(steps, units):
    """Below a few steps the weights are not packed (BLAS reads them in place: a one-step call
    at H = 1024 took 2.0 ms packing against 0.27 ms); both sides of the threshold match the
    NumPy reference."""
    extension = cython_module._cython_lstm
    if extension.PACKED_GEMM and extension.isa() != "scalar":
        assert extension.packs_recurrent_kernel(steps, 2, units) == (steps >= 4)
        # Thin products (1-3 rows) of a kernel larger than the caches: only with many steps;
        # of 4 rows or more, or of a cached kernel: from 4 steps.
        assert not extension.packs_recurrent_kernel(63, 3, 1024) and extension.packs_recurrent_kernel(64, 3, 1024)
        assert extension.packs_recurrent_kernel(4, 4, 1024) and not extension.packs_recurrent_kernel(3, 4, 1024)
        assert extension.packs_recurrent_kernel(4, 16, 128) and not extension.packs_recurrent_kernel(3, 16, 128)
        # Products that would go to SGEMM (which packs the kernel at every call: more than 16
        # rows; on AVX2 more than 6 of a kernel over 4 MiB): from 2 steps, and from one step
        # at 32 rows (a part's).
        assert extension.packs_recurrent_kernel(2, 17, 128) and not extension.packs_recurrent_kernel(1, 31, 128)
        assert extension.packs_recurrent_kernel(1, 32, 128)
        assert extension.packs_recurrent_kernel(2, 24, 1024) and not extension.packs_recurrent_kernel(1, 24, 1024)
        # Three GEMV passes or more (7+ rows) over a kernel beyond 1 MiB: from 2 steps too;
        # fewer passes, or a cached kernel: from 4.
        assert extension.packs_recurrent_kernel(2, 7, 512) and not extension.packs_recurrent_kernel(3, 7, 128)
        assert not extension.packs_recurrent_kernel(3, 6, 1024)
    rng = np.random.default_rng(steps)
    batch, inputs = 2, 32
    args = [rng.normal(size=shape).astype(np.float32) * scale for shape, scale in
            [((batch, steps, inputs), 1), ((batch, units), 1), ((batch, units), 1),
             ((inputs, 4 * units), 0.2), ((units, 4 * units), 0.2), ((4 * units,), 0.1)]]
    dy = rng.normal(size=(batch, steps, units)).astype(np.float32)
    results = []
    for name in ("cython", "numpy"):
        backend = registry.get_backend_object(name)
        forward = sequence_forward(backend, *args, training=True)
        grads = backend.sequence_backward(dy, args[1] * 0, args[2] * 0, forward.workspace)
        results.append((forward.outputs, forward.h, forward.c, grads.dx, grads.dkernel,
                        grads.drecurrent_kernel, grads.dbias, grads.dh0, grads.dc0))
    rtol, atol = testing.tolerance("float32", gradient=True)
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(1.0, np.abs(want).max()))


def test_kernel_overrides_are_checked_scoped_and_restored():
    """Values are checked before anything changes; blocks nest and restore on exit, also on an
    error; the production class takes no testing switches."""
    from lstmeng.backends import _kernel_overrides
    for bad in ({"cython_split_units": "yes"}, {"cython_split_units": 1}, {"cython_isa": "sse9"},
                {"cuda_recurrence_design": "medium"}):
        with pytest.raises(ValueError, match=next(iter(bad))), kernel_overrides(**bad):
            pass
    with pytest.raises(TypeError), kernel_overrides(split_units=True):
        pass
    assert _kernel_overrides.current() == testing.KernelOverrides()
    with kernel_overrides(cython_split_units=False, cython_fast_gate_math=False):
        with pytest.raises(KeyError), kernel_overrides(cython_split_units=True) as inner:
            assert inner == testing.KernelOverrides(cython_split_units=True, cython_fast_gate_math=False)
            raise KeyError
        assert _kernel_overrides.current() == testing.KernelOverrides(cython_split_units=False,
                                                                      cython_fast_gate_math=False)
    assert _kernel_overrides.current() == testing.KernelOverrides()
    with pytest.raises(TypeError):
        cython_module.CythonBackend(split_units=True)


def test_kernel_overrides_belong_to_their_thread():
    """A block on one thread leaves the calls of another thread on the automatic choice."""
    from lstmeng.backends import _kernel_overrides
    seen = []
    with kernel_overrides(cython_split_units=True):
        thread = threading.Thread(target=lambda: seen.append(_kernel_overrides.current()))
        thread.start()
        thread.join()
    assert seen == [testing.KernelOverrides()]


def test_isa_override_is_applied_per_call_and_undone_after_the_block():
    extension = cython_module._cython_lstm
    x = np.zeros((1, 2, 3), np.float32)
    with kernel_overrides(cython_isa="scalar", cython_fast_gate_math=False):
        le.LSTM(4, backend="cython", seed=0)(x)
        assert (extension.isa(), extension.fast_gate_math()) == ("scalar", False)
    le.LSTM(4, backend="cython", seed=0)(x)
    assert (extension.isa(), extension.fast_gate_math()) == (extension.BEST_ISA, extension.FAST_GATE_MATH)


# Units a multiple of 32 take the packed-panel FMA kernel for the per-step
# products in float32 (forward and backward), when the CPU has AVX2 and FMA.
# Batches of 9 and 10 rows leave 3 and 4 rows after the six-row blocks (row kernels, then
# the four-row block); right-padded masks shrink the rows per step through every remainder.
@pytest.mark.parametrize("case", [
    dataclasses.replace(case, units=32, batch=batch)
    for batch in (9, 10)
    for case in testing.conformance_cases(dtypes=("float32",), cases_per_dtype=8)], ids=str)
def test_conformance_packed_kernel_sizes(case):
    testing.check_case("cython", case)


def test_avx2_kernels_are_used_where_supported():
    """The packed-panel step product and the fused gate kernels, on every CPU with AVX2 and FMA."""
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo to read the CPU flags from")
    with open("/proc/cpuinfo") as cpuinfo:
        flags = cpuinfo.read()
    if " avx2" in flags and " fma" in flags:
        assert cython_module._cython_lstm.PACKED_GEMM
        assert cython_module._cython_lstm.FAST_GATE_MATH


def test_available_with_cpu_device():
    backend = registry.get_backend_object("cython")
    assert backend.probe().startswith("CPU")
    assert le.LSTM(3, backend="auto")._resolve_backend(np.zeros((1, 1, 2))).name == "cython"


def _right_padded_inputs(batch=9, steps=12, features=5, seed=3, dtype="float64"):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, steps, features)).astype(dtype)
    lengths = rng.integers(0, steps + 1, size=batch)
    lengths[1] = steps
    return x, lengths


def _run(model, x, mask, dy_seed=0):
    y = model(x, mask=mask, training=True)
    first = y[0] if isinstance(y, list) else y
    dy = np.random.default_rng(dy_seed).normal(size=first.shape).astype(first.dtype)
    dx = model.backward(dy)
    return first, dx, {name: np.array(value) for name, value in model.grads.items()}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["lstm", "bidirectional", "sequential"])
def test_layers_match_numpy_backend(kind, dtype):
    x, lengths = _right_padded_inputs(dtype=dtype)
    holes = np.random.default_rng(1).random(lengths.shape + (x.shape[1],)) < 0.7
    for mask in (le.lengths_to_mask(lengths, x.shape[1]), holes):

        def make(backend):
            if kind == "lstm":
                return le.LSTM(7, return_sequences=True, go_backwards=True, dtype=dtype,
                               backend=backend, seed=4, dropout=0.2, recurrent_dropout=0.1)
            if kind == "bidirectional":
                return le.Bidirectional(le.LSTM(6, return_sequences=True, dtype=dtype,
                                                backend=backend, seed=5), merge_mode="concat")
            return le.Sequential([
                le.Bidirectional(le.LSTM(6, return_sequences=True, dtype=dtype, backend=backend, seed=6),
                                 merge_mode="sum"),
                le.LSTM(5, dtype=dtype, backend=backend, seed=7)])

        ours, reference = make("cython"), make("numpy")
        y, dx, grads = _run(ours, x, mask)
        y_ref, dx_ref, grads_ref = _run(reference, x, mask)
        testing.assert_close(y, y_ref, f"{kind} outputs", dtype)
        testing.assert_close(dx, dx_ref, f"{kind} dx", dtype, gradient=True)
        assert grads.keys() == grads_ref.keys()
        for name in grads:
            testing.assert_close(grads[name], grads_ref[name], f"{kind} d{name}", dtype, gradient=True)


def _forward_backward(backend, inputs, options):
    forward = sequence_forward(backend,
        inputs["x"], inputs["h0"], inputs["c0"], inputs["kernel"], inputs["recurrent_kernel"],
        inputs["bias"], inputs["mask"], training=True, **options)
    grads = backend.sequence_backward(inputs["doutputs"], inputs["dh"], inputs["dc"], forward.workspace)
    return [forward.outputs, forward.h, forward.c, grads.dx, grads.dh0, grads.dc0, grads.dkernel,
            grads.drecurrent_kernel, grads.dbias]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("zero_output_for_mask", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("parts", [1, 3])
def test_variable_length_path_matches_general_path(reverse, zero_output_for_mask, return_sequences,
                                                   parts, monkeypatch):
    monkeypatch.setattr(cython_module, "MIN_ROWS_PER_PART", 1)
    monkeypatch.setenv("OMP_NUM_THREADS", str(parts))
    rng = np.random.default_rng(11)
    batch, steps, features, units = 13, 17, 6, 8
    lengths = rng.integers(0, steps + 1, size=batch)
    inputs = {
        "x": rng.normal(size=(batch, steps, features)), "h0": rng.normal(size=(batch, units)),
        "c0": rng.normal(size=(batch, units)), "kernel": rng.normal(size=(features, 4 * units)) * 0.4,
        "recurrent_kernel": rng.normal(size=(units, 4 * units)) * 0.4, "bias": rng.normal(size=4 * units),
        "mask": le.lengths_to_mask(lengths, steps),
        "doutputs": rng.normal(size=(batch, steps, units) if return_sequences else (batch, units)),
        "dh": rng.normal(size=(batch, units)), "dc": rng.normal(size=(batch, units)),
    }
    options = dict(reverse=reverse, zero_output_for_mask=zero_output_for_mask,
                   return_sequences=return_sequences)
    backend = cython_module.CythonBackend()
    # The two paths really differ: sorted rows and shrinking steps vs the full mask.
    layout = cython_module._layout(inputs["mask"], batch, steps, parts, True)
    assert layout.mask is None and layout.rows == lengths.sum()
    assert cython_module._layout(inputs["mask"], batch, steps, parts, False).mask is not None
    packed = _forward_backward(backend, inputs, options)
    with kernel_overrides(cython_packed_variable_length=False):
        general = _forward_backward(backend, inputs, options)
    for got, expected in zip(packed, general):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_two_threads_match_sequential_runs():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 40, 12)).astype("float32")
    mask = rng.random((16, 40)) < 0.8
    layers = [le.LSTM(32, return_sequences=True, backend="cython", seed=seed) for seed in (1, 2)]

    def run(layer):
        y = layer(x, mask=mask, training=True)
        dx = layer.backward(np.ones_like(y))
        return y, dx, layer.grads["recurrent_kernel"].copy()

    sequential = [run(layer) for layer in layers]
    concurrent = [None, None]

    def worker(index):
        for _ in range(5):
            concurrent[index] = run(layers[index])

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, expected in zip(concurrent, sequential):
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation,recurrent_activation",
                         [("tanh", "sigmoid"), ("sigmoid", "hard_sigmoid"), ("linear", "sigmoid")])
def test_large_activations_stay_finite(dtype, activation, recurrent_activation):
    rng = np.random.default_rng(0)
    backend = registry.get_backend_object("cython")
    reference = registry.get_backend_object("numpy")
    x = (rng.normal(size=(3, 5, 4)) * 1e4).astype(dtype)
    arrays = [np.zeros((3, 6), dtype), np.zeros((3, 6), dtype),
              rng.normal(size=(4, 24)).astype(dtype), rng.normal(size=(6, 24)).astype(dtype),
              np.zeros(24, dtype)]
    options = dict(activation=activation, recurrent_activation=recurrent_activation)
    ours = sequence_forward(backend, x, *arrays, **options)
    expected = sequence_forward(reference, x, *arrays, **options)
    if activation != "linear":  # linear lets c grow without bound: only check it is finite
        testing.assert_close(ours.outputs, expected.outputs, "saturated outputs", dtype)
    assert np.isfinite(ours.outputs).all() and np.isfinite(ours.c).all()


def test_inference_keeps_no_workspace_and_chunks_match_training():
    rng = np.random.default_rng(5)
    batch, steps = 3, 700  # more steps than one inference chunk (1024 packed rows)
    backend = registry.get_backend_object("cython")
    args = (rng.normal(size=(batch, steps, 4)), np.zeros((batch, 5)), np.zeros((batch, 5)),
            rng.normal(size=(4, 20)) * 0.5, rng.normal(size=(5, 20)) * 0.5, rng.normal(size=20))
    for reverse in (False, True):
        inference = sequence_forward(backend, *args, reverse=reverse, training=False)
        training = sequence_forward(backend, *args, reverse=reverse, training=True)
        assert inference.workspace is None
        np.testing.assert_allclose(inference.outputs, training.outputs, rtol=1e-12, atol=1e-12)


def test_workspace_is_consumed_once():
    backend = registry.get_backend_object("cython")
    args = [np.ones((2, 3, 4)), np.zeros((2, 5)), np.zeros((2, 5)), np.ones((4, 20)) * 0.1,
            np.ones((5, 20)) * 0.1, None]
    forward = sequence_forward(backend, *args, training=True)
    backend.sequence_backward(np.ones((2, 3, 5)), np.zeros((2, 5)), np.zeros((2, 5)), forward.workspace)
    with pytest.raises(RuntimeError, match="already used"):
        backend.sequence_backward(np.ones((2, 3, 5)), np.zeros((2, 5)), np.zeros((2, 5)), forward.workspace)


def test_small_calls_run_one_thread(monkeypatch):
    """A one-part call below MIN_FLOPS_TO_THREAD runs one thread instead of splitting its
    units, unless it has the steps and units whose steps pay for a barrier; batches split
    by rows keep their threads."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    if cython_module._team(64, 128, "auto")[1] != 2:
        pytest.skip("this build runs one thread (no OpenMP or no OpenBLAS thread control)")
    small = cython_module.MIN_FLOPS_TO_THREAD / 2
    steps, units = cython_module.MIN_STEPS_TO_SPLIT, cython_module.MIN_UNITS_TO_SPLIT_SMALL_CALL
    assert cython_module._team(1, 128, "auto", small) == (1, 1, False)
    assert cython_module._team(2 * cython_module.MIN_ROWS_PER_PART - 1, 128, "auto", small) == (1, 1, False)
    assert cython_module._team(1, 128, "auto", 2 * cython_module.MIN_FLOPS_TO_THREAD) == (1, 2, True)
    assert cython_module._team(64, 128, "auto", small) == (2, 2, False)
    assert cython_module._team(1, units, "auto", small, steps) == (1, 2, True)
    assert cython_module._team(2 * cython_module.MIN_ROWS_PER_PART - 1, units, "auto", small, steps) == (1, 2, True)
    assert cython_module._team(1, units, "auto", small, steps - 1) == (1, 1, False)
    assert cython_module._team(1, units - 1, "auto", small, steps) == (1, 1, False)
    assert cython_module._team(1, units, False, small, steps) == (1, 1, False)
    assert cython_module._team(1, units, "auto", small, steps, in_run=False) == (1, 1, False)


def test_short_calls_of_wide_layers_split_their_units(monkeypatch):
    """A batch-1 call of MIN_STEPS_TO_SPLIT steps on a layer of MIN_UNITS_TO_SPLIT_SMALL_CALL
    units, far below MIN_FLOPS_TO_THREAD, runs one thread alone (its team would have to
    wake up) and, in a run of calls, reaches the extension with its units split over two
    threads (forward and backward), computing what the NumPy reference does."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    if cython_module._team(64, 128, "auto")[1] != 2:
        pytest.skip("this build runs one thread (no OpenMP or no OpenBLAS thread control)")
    steps, units, features = cython_module.MIN_STEPS_TO_SPLIT, cython_module.MIN_UNITS_TO_SPLIT_SMALL_CALL, 8
    assert 8 * steps * units * (features + units) < cython_module.MIN_FLOPS_TO_THREAD
    calls = []
    specialization = cython_module._specialization

    def spy(kernel, dtype):
        function = specialization(kernel, dtype)

        def called(*args, **kwargs):
            calls.append((kwargs.get("split_units"), kwargs.get("threads")))
            return function(*args, **kwargs)
        return called

    monkeypatch.setattr(cython_module, "_specialization", spy)
    rng = np.random.default_rng(0)
    arrays = (rng.normal(size=(1, steps, features)).astype(np.float32), np.zeros((1, units), np.float32),
              np.zeros((1, units), np.float32), (0.2 * rng.normal(size=(features, 4 * units))).astype(np.float32),
              (0.1 * rng.normal(size=(units, 4 * units))).astype(np.float32), None)
    backend, reference = cython_module.CythonBackend(), registry.get_backend_object("numpy")
    # Timing-free: the busy-machine rule would run one thread after a slow team start.
    monkeypatch.setattr(backend._split_governor, "allow", lambda: True)
    with kernel_overrides(cython_split_units=None):
        sequence_forward(backend, *arrays, training=False)
        assert calls == [(False, 1)], "a call outside a run of calls split its units"
        calls.clear()
        monkeypatch.setattr(cython_module, "CALL_RUN_SECONDS", 3600.0)   # a slow CI machine's run too
        # The chooser's first call of a shape splits (then it alternates to time both).
        ours = sequence_forward(backend, *arrays, training=True)
        dy = rng.normal(size=(1, steps, units)).astype(np.float32)
        got = backend.sequence_backward(dy, arrays[1], arrays[2], ours.workspace)
    assert calls == [(True, 2), (True, 2)]
    theirs = sequence_forward(reference, *arrays, training=True)
    want = reference.sequence_backward(dy, arrays[1], arrays[2], theirs.workspace)
    np.testing.assert_allclose(ours.outputs, theirs.outputs, rtol=2e-5, atol=2e-6)
    for name in ("dx", "dkernel", "drecurrent_kernel", "dbias"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=2e-4, atol=2e-5, err_msg=name)


def test_unit_split_governor_backs_off_and_recovers():
    """A losing split (members waiting a noticeable part of the call) is skipped for 1, 2,
    4, ... calls, capped; each run of as many split calls as the back-off that do not lose
    halves it again, and a loss within such a run starts the run over."""
    governor = cython_module._UnitSplitGovernor()
    losing = (100, 1.01 * cython_module.LOSING_WAIT_FRACTION, 1.0)
    fine = (100, 0.99 * cython_module.LOSING_WAIT_FRACTION, 1.0)
    cap = cython_module.MAX_SPLIT_BACKOFF_CALLS
    assert cap == 4096

    def skipped_calls():
        count = 0
        while not governor.allow():
            count += 1
        return count

    assert skipped_calls() == 0
    skips = []
    for _ in range(13):
        governor.record(*losing)
        skips.append(skipped_calls())
    assert skips == [2**n for n in range(13)]
    governor.record(*losing)
    assert skipped_calls() == cap
    # Calls that do not lose between stalls (a CPU hog on the other core) keep the back-off.
    for _ in range(cap - 1):
        governor.record(*fine)
    governor.record(*losing)
    assert skipped_calls() == cap
    # A whole run of cap calls halves it, the next run of cap / 2 halves it again.
    for _ in range(cap + cap // 2):
        governor.record(*fine)
    governor.record(*losing)
    assert skipped_calls() == cap // 4
    governor.record(0, 0.0, 1.0)  # no split made: nothing learnt
    assert skipped_calls() == 0
    for _ in range(2 * cap):        # an idle machine: back to one call
        governor.record(*fine)
    governor.record(*losing)
    assert skipped_calls() == 1


def test_split_chooser_times_both_and_keeps_the_faster():
    """The first calls of a shape alternate split and one thread (split first) until each ran
    SPLIT_FIRST_TIMINGS times; then the faster of the two (the best of the last SPLIT_TIMINGS
    per step) runs, the other again every SPLIT_EXPLORE_EVERY calls; forgotten shapes start
    over."""
    chooser = cython_module._SplitChooser()
    every = cython_module.SPLIT_EXPLORE_EVERY
    first = cython_module.SPLIT_FIRST_TIMINGS
    assert first == 2
    key = ("forward", 1, 64, 128, False, "f")
    # A cold first split call (20.0 per step) does not decide: the second split call does.
    for split_seconds, one_seconds in ((20.0, 1.0), (0.9, 1.2)):
        assert chooser.choose(key) is True
        chooser.observe(key, True, split_seconds)
        assert chooser.choose(key) is False
        chooser.observe(key, False, one_seconds)
    assert chooser.choose(key) is True                # 0.9 < 1.0
    chooser.observe(key, True, 2.0)
    chooser.observe(key, True, 2.0)
    chooser.observe(key, True, 2.0)                   # the split's last three: 2.0
    choices = [chooser.choose(key) for _ in range(6, 2 * every + 1)]   # calls 6 .. 2 * every
    assert [index + 6 for index, split in enumerate(choices) if split] == [every, 2 * every]
    for _ in range(cython_module.SPLIT_TIMINGS - 1):
        chooser.observe(key, False, 50.0)   # one thread disturbed twice: its best is still 1.0
    assert chooser.choose(key) is False
    chooser.observe(key, True, 0.5)         # the split got fast: it wins from the next call on
    assert chooser.choose(key) is True
    other = ("backward", 1, 64, 128, "f")
    assert chooser.choose(other) is True and chooser.choose(key) is True   # shapes are separate
    for size in range(cython_module.SPLIT_CHOOSER_SHAPES):
        chooser.choose(("forward", size, 1, 1, False, "d"))
    chooser.observe(key, False, 0.001)                  # forgotten: nothing recorded
    assert chooser.choose(key) is True                  # starts over with the split


def test_split_chooser_times_each_length_class_apart(monkeypatch):
    """Per-step times include each way's fixed cost per call, so calls of one layer whose
    lengths differ by a factor of two or more are timed apart (8-15 steps share a class,
    16 start the next): the forward and backward calls of 8 and 64 steps get four entries."""
    length_class = cython_module._length_class
    assert length_class(8) == length_class(15) != length_class(16) and length_class(0) == length_class(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)
    if not cython_module._team(1, 64, None, 1.0)[2]:
        pytest.skip("this build runs one thread (no OpenMP or no OpenBLAS thread control)")
    backend = cython_module.CythonBackend()
    monkeypatch.setattr(backend._split_governor, "allow", lambda: True)
    rng = np.random.default_rng(0)
    weights = (rng.normal(size=(4, 256)) * 0.1, rng.normal(size=(64, 256)) * 0.1, None)
    for steps in (8, 64):
        forward = sequence_forward(backend, rng.normal(size=(1, steps, 4)), np.zeros((1, 64)), np.zeros((1, 64)),
                                   *weights, training=True)
        backend.sequence_backward(np.ones((1, steps, 64)), np.zeros((1, 64)), np.zeros((1, 64)), forward.workspace)
    keys = list(backend._split_chooser._shapes)
    assert sorted((key[0], key[-2]) for key in keys) == sorted(
        (way, length_class(steps)) for way in ("forward", "backward") for steps in (8, 64))
    assert all(key[-1] is None for key in keys)   # no kernel family forced


def test_split_chooser_times_each_forced_kernel_family_apart(monkeypatch):
    """A process that forces kernel families in turn (tests, `compare_cpu.py --isa`) keeps a
    verdict per family: one family's timings said nothing of another's (a stale avx2 verdict
    kept an avx512 batch-1 call on one thread at 0.85 ms where it splits in 0.55)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)
    if not cython_module._team(1, 64, None, 1.0)[2]:
        pytest.skip("this build runs one thread (no OpenMP or no OpenBLAS thread control)")
    families = [isa for isa in ("avx2", "avx512") if isa in cython_module._cython_lstm.SUPPORTED_ISAS]
    if len(families) < 2:
        pytest.skip("this CPU runs one kernel family with a packed product")
    backend = cython_module.CythonBackend()
    monkeypatch.setattr(backend._split_governor, "allow", lambda: True)
    rng = np.random.default_rng(1)
    weights = (rng.normal(size=(4, 256)) * 0.1, rng.normal(size=(64, 256)) * 0.1, None)
    for isa in families:
        with kernel_overrides(cython_isa=isa):
            sequence_forward(backend, rng.normal(size=(1, 16, 4)), np.zeros((1, 64)), np.zeros((1, 64)), *weights)
    assert sorted(key[-1] for key in backend._split_chooser._shapes) == sorted(families)


def test_a_split_eligible_shape_is_timed_on_one_thread_too(monkeypatch):
    """Automatic choice: the first call of a shape splits its units, the second runs one
    thread, with the same numbers (exactly on the AVX-512 path and in float64)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)
    if not cython_module._team(1, 64, None)[2]:
        pytest.skip("this build runs one thread (no OpenMP or no OpenBLAS thread control)")
    rng = np.random.default_rng(8)
    args = [rng.normal(size=shape) * scale for shape, scale in
            [((1, 7, 5), 1), ((1, 64), 1), ((1, 64), 1), ((5, 256), 0.2), ((64, 256), 0.2), ((256,), 0.1)]]
    dy = rng.normal(size=(1, 7, 64))
    backend = cython_module.CythonBackend()
    results = []
    for _ in range(2):
        forward = sequence_forward(backend, *args, training=True)
        grads = backend.sequence_backward(dy, args[1] * 0, args[2] * 0, forward.workspace)
        results.append((forward.workspace.split_units, forward.outputs, grads.dx, grads.drecurrent_kernel))
    assert [result[0] for result in results] == [True, False]
    for got, want in zip(results[1][1:], results[0][1:]):
        np.testing.assert_array_equal(got, want)


def test_split_calls_report_their_barriers(monkeypatch):
    """The kernels return (barriers per member, slow-wait seconds); a T-step unit split
    makes at least T barriers in the forward and T in the backward; whole parts none
    (a one-part call that may pipeline is reported, with no barriers when it did not)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    if not cython_module._team(1, 64, True)[2]:
        pytest.skip("this build runs one thread (no OpenMP or no OpenBLAS thread control)")
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)
    records = []
    monkeypatch.setattr(cython_module._UnitSplitGovernor, "record",
                        lambda self, barriers, slow, seconds: records.append((barriers, slow)))
    rng = np.random.default_rng(0)
    steps, units = 9, 64
    args = (rng.normal(size=(1, steps, 3)).astype(np.float32), np.zeros((1, units), np.float32),
            np.zeros((1, units), np.float32), rng.normal(size=(3, 4 * units)).astype(np.float32),
            rng.normal(size=(units, 4 * units)).astype(np.float32), None)
    backend = cython_module.CythonBackend()
    forward = sequence_forward(backend, *args, training=True)
    backend.sequence_backward(np.ones((1, steps, units), np.float32), args[1], args[2],
                              forward.workspace)
    assert len(records) == 2 and all(barriers >= steps and 0 <= slow for barriers, slow in records)
    records.clear()
    with kernel_overrides(cython_split_units=False):
        sequence_forward(cython_module.CythonBackend(), *args)
    assert all(barriers == 0 for barriers, _ in records)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_busy_machine_fallback_gives_the_same_numbers(dtype, isa, monkeypatch):
    """A backend whose unit split has backed off (one thread) returns what a split backend
    returns: the backward keeps its shares of the weight-gradient and dx products, only
    run one after another. Exactly, where every product is our packed kernel or float64
    BLAS; in float32 on the avx2 and scalar paths the forward's BLAS products differ in
    shape between the split (per gate block of a unit slice) and one thread (whole rows),
    and so in the last bits."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    if not cython_module._team(1, 128, True)[2]:
        pytest.skip("this build runs one thread (no OpenMP or no OpenBLAS thread control)")
    extension = cython_module._cython_lstm
    if isa not in extension.SUPPORTED_ISAS:
        pytest.skip(f"this CPU or build does not run {isa}")
    with kernel_overrides(cython_isa=isa):
        rng = np.random.default_rng(3)
        batch, steps, inputs, units = 16, 32, 8, 128   # one part: a unit split by default
        # Weights of 0.1: a contracting recurrence, so rounding differences stay rounding.
        args = [(rng.normal(size=shape) * scale).astype(dtype) for shape, scale in
                [((batch, steps, inputs), 1), ((batch, units), 1), ((batch, units), 1),
                 ((inputs, 4 * units), 0.1), ((units, 4 * units), 0.1), ((4 * units,), 0.1)]]
        dy = rng.normal(size=(batch, steps, units)).astype(dtype)
        split, backed_off = cython_module.CythonBackend(), cython_module.CythonBackend()
        backed_off._split_governor._skip = 10**9
        results = []
        for backend in (split, backed_off):
            forward = sequence_forward(backend, *args, training=True)
            grads = backend.sequence_backward(dy, args[1] * 0, args[2] * 0, forward.workspace)
            results.append((forward.workspace.split_units, forward.outputs, forward.h, forward.c,
                            grads.dx, grads.dkernel, grads.drecurrent_kernel, grads.dbias,
                            grads.dh0))
    assert results[0][0] and not results[1][0]
    exact = dtype == "float64" or isa == "avx512"
    for got, want in zip(results[1][1:], results[0][1:]):
        if exact:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "variable-length"])
def test_whole_parts_report_their_end_and_run_one_thread_while_the_governor_holds_back(dtype, lengths,
                                                                                       monkeypatch):
    """A batch of two parts on two threads meets once, at the parts' end: the forward and the
    backward each report that barrier to the busy-machine governor (a losing wait there makes
    the next calls run the parts one after another on one thread), and a backend whose governor
    holds back gives the same numbers, bitwise, its backward on one thread too (the forward's
    verdict, kept in the workspace). Waits under PARTS_MIN_SLOW_WAIT_SECONDS do not count."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    batch, steps, inputs, units = 2 * cython_module.MIN_ROWS_PER_PART, 12, 8, 32
    if cython_module._team(batch, units, None)[0] != 2:
        pytest.skip("this build runs one thread (no OpenMP)")
    records = []
    original_record = cython_module._UnitSplitGovernor.record
    monkeypatch.setattr(cython_module._UnitSplitGovernor, "record",
                        lambda self, *args: (records.append(args), original_record(self, *args)))
    rng = np.random.default_rng(4)
    args = [(rng.normal(size=shape) * scale).astype(dtype) for shape, scale in
            [((batch, steps, inputs), 1), ((batch, units), 1), ((batch, units), 1),
             ((inputs, 4 * units), 0.3), ((units, 4 * units), 0.3), ((4 * units,), 0.1)]]
    mask = np.arange(steps)[None, :] < rng.integers(1, steps + 1, batch)[:, None] if lengths else None
    dy = rng.normal(size=(batch, steps, units)).astype(dtype)
    teamed, backed_off = cython_module.CythonBackend(), cython_module.CythonBackend()
    backed_off._split_governor._skip = 10**9
    results = []
    for backend in (teamed, backed_off):
        del records[:]
        forward = sequence_forward(backend, *args, mask=mask, training=True)
        grads = backend.sequence_backward(dy, args[1] * 0, args[2] * 0, forward.workspace)
        barriers = sum(record[0] for record in records)
        results.append((forward.workspace.busy, barriers, forward.outputs, forward.h, forward.c, grads.dx,
                        grads.dkernel, grads.drecurrent_kernel, grads.dbias, grads.dh0, grads.dc0))
        if backend is teamed:
            # One barrier each, its slow wait (none, or at least the floor) within the call; on
            # one thread none (the governor learns nothing from such calls).
            assert [record[0] for record in records] == [1, 1]
            assert all(record[1] == 0 or cython_module.PARTS_MIN_SLOW_WAIT_SECONDS <= record[1] <= record[2]
                       for record in records)
    assert results[0][:2] == (False, 2) and results[1][:2] == (True, 0)
    for got, want in zip(results[1][2:], results[0][2:]):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("batch, parts", [(32, 2), (48, 3), (64, 4)])
def test_only_members_with_a_part_meet_at_the_parts_end(batch, parts, monkeypatch):
    """With 4 threads, a batch of 32 rows is two parts (16 rows each at least): the forward runs
    a member per part, while the backward's team has a member per thread, two of them without a
    part. Only members with a part meet at the parts' end (``last_*_parts_met``): one without
    would wait there for the whole call and report that as a slow wait, every call."""
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    if cython_module._ThreadCounts().kernel != 4:
        pytest.skip("this build cannot run 4 OpenMP threads")
    extension = cython_module._cython_lstm
    backend = cython_module.CythonBackend()
    rng = np.random.default_rng(batch)
    units, steps, inputs = 32, 6, 8
    args = [rng.normal(size=shape).astype(np.float32) for shape in
            [(batch, steps, inputs), (batch, units), (batch, units), (inputs, 4 * units), (units, 4 * units),
             (4 * units,)]]
    forward = sequence_forward(backend, *args, training=True)
    assert extension.last_forward_parts_met == parts
    backend.sequence_backward(rng.normal(size=(batch, steps, units)).astype(np.float32), args[1], args[2],
                              forward.workspace)
    assert extension.last_backward_parts_met == parts


def test_short_waits_at_the_parts_end_do_not_count():
    """A waking partner, a slightly slower part or a noisy host keeps a whole-parts call's wait
    under PARTS_MIN_SLOW_WAIT_SECONDS or under PARTS_LOSING_WAIT_FRACTION of the call: not
    losing. A unit split's waits count from LOSING_WAIT_FRACTION (its members meet every step)."""
    floor, fraction = cython_module.PARTS_MIN_SLOW_WAIT_SECONDS, cython_module.PARTS_LOSING_WAIT_FRACTION

    def losing(slow_wait, call_seconds, split_units):
        backend = cython_module.CythonBackend()
        backend._record_call(time.perf_counter() - call_seconds, time.thread_time(), (1, slow_wait),
                             pipeline=False, teamed=True, chooser_key=None, steps=10, split_units=split_units)
        return not backend._split_governor.allow()

    short_call = 0.9 * floor / (fraction + 0.05)      # 0.9 floor is over the fraction of it
    assert not losing(0.9 * floor, short_call, split_units=False)
    assert losing(0.9 * floor, short_call, split_units=True)
    long_call = 10 * floor                           # 2.5 floor is 25 % of it: over 10 %, under 30 %
    assert not losing(2.5 * floor, long_call, split_units=False)
    assert losing(2.5 * floor, long_call, split_units=True)
    assert losing(3.5 * floor, long_call, split_units=False)


def _one_step_arrays(rng, batch: int, features: int, units: int, dtype, transposed: bool, with_bias: bool) -> tuple:
    """(x [B, 1, I], h0, c0 [B, H], kernel [I, 4H], recurrent_kernel [H, 4H], bias [4H] or None) of a
    one-step call, the weights made in PyTorch's layout and passed as their transposed views (read
    in place) or as row-major copies."""
    x = rng.normal(size=(batch, 1, features)).astype(dtype)
    h0, c0 = (rng.normal(size=(batch, units)).astype(dtype) for _ in range(2))
    weight_ih = (rng.normal(size=(4 * units, features)) * 0.3).astype(dtype)   # PyTorch's layout
    weight_hh = (rng.normal(size=(4 * units, units)) * 0.3).astype(dtype)
    kernel, recurrent_kernel = ((weight_ih.T, weight_hh.T) if transposed else
                                (np.ascontiguousarray(weight_ih.T), np.ascontiguousarray(weight_hh.T)))
    bias = (rng.normal(size=4 * units) * 0.1).astype(dtype) if with_bias else None
    return x, h0, c0, kernel, recurrent_kernel, bias


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [1, 5, 2 * cython_module.MIN_ROWS_PER_PART - 1])
@pytest.mark.parametrize("transposed", [False, True], ids=["row-major", "transposed"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_one_step_calls_take_the_short_path_with_the_same_numbers(isa, dtype, batch, transposed, with_bias,
                                                                 monkeypatch):
    """A one-step call of one part (a cell step, a streaming call) runs the extension's
    step_forward, and its backward step_backward: bitwise what the general path computes
    (forced with ``cython_one_step=False``), in inference and in training (outputs, states
    and every gradient); and the float64 reference's numbers. Other calls keep the general
    path."""
    extension = cython_module._cython_lstm
    if isa not in extension.SUPPORTED_ISAS:
        pytest.skip(f"this CPU or build does not run {isa}")
    calls, backward_calls = [], []
    short_path, short_backward = cython_module.CythonBackend._one_step, cython_module.CythonBackend._one_step_backward
    monkeypatch.setattr(cython_module.CythonBackend, "_one_step",
                        lambda self, *args: calls.append(args[0].shape) or short_path(self, *args))
    monkeypatch.setattr(cython_module.CythonBackend, "_one_step_backward",
                        lambda self, *args: backward_calls.append(args[3].input_shape) or short_backward(self, *args))
    rng = np.random.default_rng(batch)
    units, features = 32, 7
    arrays = _one_step_arrays(rng, batch, features, units, dtype, transposed, with_bias)
    x, h0, c0, kernel, recurrent_kernel, bias = arrays
    from lstmeng.backends.numpy import NumpyBackend
    backend, reference = cython_module.CythonBackend(), NumpyBackend()
    names = ("dx", "dh0", "dc0", "dkernel", "drecurrent_kernel", "dbias")
    with kernel_overrides(cython_isa=isa):
        for return_sequences, training in itertools.product((True, False), (False, True)):
            calls.clear()
            short = sequence_forward(backend, *arrays, return_sequences=return_sequences, training=training)
            with kernel_overrides(cython_one_step=False):
                general = sequence_forward(backend, *arrays, return_sequences=return_sequences, training=training)
            assert calls == [(batch, 1, features)]
            assert (short.workspace is None) == (not training)
            for name in ("outputs", "h", "c"):
                got, want = getattr(short, name), getattr(general, name)
                assert got.shape == want.shape and got.dtype == want.dtype, name
                np.testing.assert_array_equal(got, want, err_msg=name)
            assert not np.shares_memory(short.outputs, short.h)   # separate arrays, as the general path's
            expected = sequence_forward(reference, *(None if a is None else a.astype(np.float64) for a in arrays),
                                        return_sequences=return_sequences, training=training)
            tolerance = 1e-5 if dtype == "float32" else 1e-12
            for name in ("outputs", "h", "c"):
                np.testing.assert_allclose(getattr(short, name), getattr(expected, name), rtol=tolerance,
                                           atol=tolerance, err_msg=name)
            if training:
                doutputs = rng.normal(size=short.outputs.shape).astype(dtype)
                dh, dc = (rng.normal(size=(batch, units)).astype(dtype) for _ in range(2))
                backward_calls.clear()
                short_grads = backend.sequence_backward(doutputs, dh, dc, short.workspace)
                with kernel_overrides(cython_one_step=False):
                    general_grads = backend.sequence_backward(doutputs, dh, dc, general.workspace)
                again = sequence_forward(backend, *arrays, return_sequences=return_sequences, training=True)
                without_dx = backend.sequence_backward(doutputs, dh, dc, again.workspace, input_grad=False)
                assert backward_calls == [(batch, 1, features)] * 2 and without_dx.dx is None
                for name in names[1:]:
                    np.testing.assert_array_equal(getattr(without_dx, name), getattr(short_grads, name), err_msg=name)
                expected_grads = reference.sequence_backward(*(a.astype(np.float64) for a in (doutputs, dh, dc)),
                                                             expected.workspace)
                for name in names:
                    if getattr(expected_grads, name) is None:   # no bias
                        continue
                    np.testing.assert_array_equal(getattr(short_grads, name), getattr(general_grads, name),
                                                  err_msg=name)
                    testing.assert_close(getattr(short_grads, name), getattr(expected_grads, name), name, dtype,
                                         gradient=True)
        # Not one step, a batch of two parts past the GEMV's rows, a mask, dropout, a forced unit
        # split: the general path.
        calls.clear()
        mask = np.ones((batch, 1), bool)
        sequence_forward(backend, np.concatenate([x, x], axis=1), *arrays[1:])
        sequence_forward(backend, np.concatenate([x] * 40)[:2 * cython_module.MIN_ROWS_PER_PART + 1],
                         *(np.concatenate([a] * 40)[:2 * cython_module.MIN_ROWS_PER_PART + 1] for a in (h0, c0)),
                         *arrays[3:])
        sequence_forward(backend, *arrays, mask)
        sequence_forward(backend, *arrays, None, None, np.ones((batch, units), dtype))
        with kernel_overrides(cython_split_units=True):
            sequence_forward(backend, *arrays)
        assert calls == []


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("transposed", [False, True], ids=["row-major", "transposed"])
def test_one_step_calls_of_32_rows_take_the_short_path_where_its_gemv_takes_them(isa, dtype, transposed,
                                                                                   monkeypatch):
    """A one-step call of 2 * MIN_ROWS_PER_PART rows (where the general path splits the rows into
    parts on threads) runs the one-step kernel only in float32 on the AVX-512 kernels (its GEMV
    takes 32 rows, no BLAS call) and under MIN_FLOPS_TO_THREAD (in training under
    ONE_STEP_TRAINING_MAX_FLOPS); there it agrees with the general
    path within rounding (not bitwise: the general path packs the input kernel and sums the bias
    gradient per part), and with the float64 NumPy reference, outputs and every gradient. A
    larger layer (over MIN_FLOPS_TO_THREAD) keeps the general path."""
    if isa not in cython_module._cython_lstm.SUPPORTED_ISAS:
        pytest.skip(f"this CPU or build does not run {isa}")
    monkeypatch.setattr(cython_module, "_kernel_threads", lambda: 2)
    calls = []
    short_path = cython_module.CythonBackend._one_step
    monkeypatch.setattr(cython_module.CythonBackend, "_one_step",
                        lambda self, *args, **kwargs: calls.append(args[0].shape) or short_path(self, *args, **kwargs))
    batch, units, features = 2 * cython_module.MIN_ROWS_PER_PART, 32, 64
    rng = np.random.default_rng(32)
    arrays = _one_step_arrays(rng, batch, features, units, dtype, transposed, with_bias=True)
    doutputs = rng.normal(size=(batch, 1, units)).astype(dtype)
    dh, dc = (rng.normal(size=(batch, units)).astype(dtype) for _ in range(2))
    from lstmeng.backends.numpy import NumpyBackend
    backend, reference = cython_module.CythonBackend(), NumpyBackend()
    expected = sequence_forward(reference, *(a.astype(np.float64) for a in arrays), return_sequences=True,
                                training=True)
    expected_grads = reference.sequence_backward(*(a.astype(np.float64) for a in (doutputs, dh, dc)),
                                                 expected.workspace)
    tolerance = 1e-4 if dtype == "float32" else 1e-10
    names = ("dx", "dh0", "dc0", "dkernel", "drecurrent_kernel", "dbias")
    with kernel_overrides(cython_isa=isa):
        for one_step in (None, False):
            calls.clear()
            with kernel_overrides(cython_one_step=one_step):
                forward = sequence_forward(backend, *arrays, return_sequences=True, training=True)
                grads = backend.sequence_backward(doutputs, dh, dc, forward.workspace)
            assert calls == ([(batch, 1, features)] if one_step is None and _gemv_takes_32_rows(isa, dtype)
                             else [])
            for name in ("outputs", "h", "c"):
                np.testing.assert_allclose(getattr(forward, name), getattr(expected, name), rtol=tolerance,
                                           atol=tolerance, err_msg=name)
            for name in names:
                testing.assert_close(getattr(grads, name), getattr(expected_grads, name), name, dtype,
                                     gradient=True)
        # Training over ONE_STEP_TRAINING_MAX_FLOPS, and any call over MIN_FLOPS_TO_THREAD: the rows
        # run in parts on their threads.
        monkeypatch.setattr(cython_module, "ONE_STEP_TRAINING_MAX_FLOPS", 0)
        calls.clear()
        sequence_forward(backend, *arrays, return_sequences=True, training=True)
        sequence_forward(backend, *arrays, return_sequences=True, training=False)
        assert calls == ([(batch, 1, features)] if _gemv_takes_32_rows(isa, dtype) else [])
        monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)
        calls.clear()
        sequence_forward(backend, *arrays, return_sequences=True, training=False)
        assert calls == []


def _gemv_takes_32_rows(isa: str, dtype) -> bool:
    """Whether a one-step call of 2 * MIN_ROWS_PER_PART rows (small layers) runs the one-step
    kernel: float32 on the AVX-512 kernels, whose GEMV takes 32 rows (``_takes_one_step``)."""
    return np.dtype(dtype) == np.float32 and isa == "avx512"


def _cell_step_case(isa, dtype, transposed: bool, with_bias: bool, training: bool, monkeypatch) -> tuple:
    """What the tests of cell_inference_step and cell_training_step start from: (rng, backend,
    kernel [I, 4H], recurrent_kernel [H, 4H], bias [4H] or None, options of one step, generic_calls,
    cell_forward) with I = 7, H = 32, the weights made in PyTorch's layout and passed as their
    transposed views (read in place) or as row-major copies; backend a new CythonBackend whose
    cell_forward appends each call's x shape to generic_calls (cell_forward: the unpatched one).
    Skips an ISA this CPU or build does not run."""
    if isa not in cython_module._cython_lstm.SUPPORTED_ISAS:
        pytest.skip(f"this CPU or build does not run {isa}")
    from lstmeng.backends.base import SequenceOptions

    rng = np.random.default_rng(23 if training else 17)
    units, features = 32, 7
    weight_ih = (rng.normal(size=(4 * units, features)) * 0.3).astype(dtype)   # PyTorch's layout
    weight_hh = (rng.normal(size=(4 * units, units)) * 0.3).astype(dtype)
    kernel, recurrent_kernel = ((weight_ih.T, weight_hh.T) if transposed else
                                (np.ascontiguousarray(weight_ih.T), np.ascontiguousarray(weight_hh.T)))
    bias = (rng.normal(size=4 * units) * 0.1).astype(dtype) if with_bias else None
    options = SequenceOptions.for_call(bias=bias, mask=None, input_dropout_mask=None, recurrent_dropout_mask=None,
                                       return_sequences=False, training=training)
    backend = cython_module.CythonBackend()
    generic_calls = []
    cell_forward = backend.cell_forward
    monkeypatch.setattr(backend, "cell_forward",
                        lambda *args: generic_calls.append(args[0].shape) or cell_forward(*args))
    return rng, backend, kernel, recurrent_kernel, bias, options, generic_calls, cell_forward


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("transposed", [False, True], ids=["row-major", "transposed"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_cell_inference_step_gives_cell_forwards_numbers(isa, dtype, transposed, with_bias, monkeypatch):
    """The backend's cell_inference_step function: bitwise cell_forward's h and c at batches
    1, 3 and 2 * MIN_ROWS_PER_PART - 1 (the one-step kernel, called directly) and at
    2 * MIN_ROWS_PER_PART (the one-step kernel in float32 on the AVX-512 kernels, whose GEMV
    takes 32 rows, else cell_forward's general path); non-contiguous inputs are read as
    cell_forward reads them; in-place changes of the weights' values are seen. Inputs of
    another dtype and forced kernel paths go through cell_forward itself."""
    rng, backend, kernel, recurrent_kernel, bias, options, generic_calls, cell_forward = _cell_step_case(
        isa, dtype, transposed, with_bias, False, monkeypatch)
    features, units = kernel.shape[0], recurrent_kernel.shape[0]

    from lstmeng.backends.numpy import NumpyBackend

    reference = NumpyBackend()

    def check(x, h, c, direct):
        generic_calls.clear()
        got = step(x, h, c, bias)
        assert generic_calls == ([] if direct else [x.shape])
        want = cell_forward(x, h, c, kernel, recurrent_kernel, bias, None, None, options)
        # And the NumPy reference in float64, independently of the cython code.
        exact = reference.cell_forward(*(None if a is None else np.asarray(a, np.float64)
                                         for a in (x, h, c, kernel, recurrent_kernel, bias)), None, None, options)
        tolerance = 1e-5 if np.float32 in (x.dtype, kernel.dtype) else 1e-12
        for name, array, expected, value in zip("hc", got, (want.h, want.c), (exact.h, exact.c)):
            assert array.dtype == expected.dtype and array.shape == expected.shape, name
            np.testing.assert_array_equal(array, expected, err_msg=name)
            np.testing.assert_allclose(array, value, rtol=tolerance, atol=tolerance, err_msg=name)

    with kernel_overrides(cython_isa=isa):
        step = backend.cell_inference_step(kernel, recurrent_kernel, options)
        for batch in (1, 3, 2 * cython_module.MIN_ROWS_PER_PART - 1, 2 * cython_module.MIN_ROWS_PER_PART):
            x = rng.normal(size=(batch, features)).astype(dtype)
            h, c = (rng.normal(size=(batch, units)).astype(dtype) for _ in range(2))
            check(x, h, c, direct=batch < 2 * cython_module.MIN_ROWS_PER_PART or _gemv_takes_32_rows(isa, dtype))
        wide = rng.normal(size=(3, 2 * features)).astype(dtype)
        check(wide[:, ::2], h[:3], c[:3], direct=True)                       # strided x
        check(x[:3].astype(np.float64 if dtype == "float32" else np.float32), h[:3], c[:3], direct=False)
        with kernel_overrides(cython_one_step=False):
            check(x[:3], h[:3], c[:3], direct=False)
        before = step(x[:3], h[:3], c[:3], bias)
        recurrent_kernel *= 0.5                   # in place (through the view when transposed)
        after = step(x[:3], h[:3], c[:3], bias)
        assert not np.array_equal(before[0], after[0])
        check(x[:3], h[:3], c[:3], direct=True)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("transposed", [False, True], ids=["row-major", "transposed"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_cell_training_step_gives_cell_forwards_numbers_and_workspace(isa, dtype, transposed, with_bias,
                                                                      monkeypatch):
    """The backend's cell_training_step function: bitwise cell_forward's h and c, and a workspace
    whose backward (sequence_backward_gates, the cell loops' call, and cell_backward) is bitwise
    that of cell_forward's workspace, at batches 1, 3 and 2 * MIN_ROWS_PER_PART - 1 (the one-step
    kernel, called directly) and 2 * MIN_ROWS_PER_PART (the one-step kernel where its GEMV takes
    32 rows, float32 on the AVX-512 kernels, else cell_forward's general path); forced
    kernel paths and other dtypes go through cell_forward; in-place weight changes are seen."""
    rng, backend, kernel, recurrent_kernel, bias, options, generic_calls, cell_forward = _cell_step_case(
        isa, dtype, transposed, with_bias, True, monkeypatch)
    features, units = kernel.shape[0], recurrent_kernel.shape[0]
    from lstmeng.backends.numpy import NumpyBackend

    reference = NumpyBackend()

    def check(x, h, c, direct):
        generic_calls.clear()
        got_h, got_c, got_workspace = step(x, h, c, bias)
        assert generic_calls == ([] if direct else [x.shape])
        want = cell_forward(x, h, c, kernel, recurrent_kernel, bias, None, None, options)
        for name, array, expected in (("h", got_h, want.h), ("c", got_c, want.c)):
            assert array.dtype == expected.dtype and array.shape == expected.shape, name
            np.testing.assert_array_equal(array, expected, err_msg=name)
        assert backend.gives_gates(got_workspace) == backend.gives_gates(want.workspace)
        dh, dc = (rng.normal(size=h.shape).astype(h.dtype) for _ in range(2))
        # The cell loops' backward (dz where the one-step kernel gives it) on a second pair of
        # workspaces, cell_backward on the first.
        for backward in ("cell", "gates"):
            if backward == "gates":
                got_workspace = step(x, h, c, bias)[2]
                want = cell_forward(x, h, c, kernel, recurrent_kernel, bias, None, None, options)
                got_grads, want_grads = (backend.sequence_backward_gates(np.zeros_like(dh), dh, dc, workspace)
                                         for workspace in (got_workspace, want.workspace))
            else:
                got_grads, want_grads = (backend.cell_backward(dh, dc, workspace)
                                         for workspace in (got_workspace, want.workspace))
            for field in ("dx", "dh0", "dc0", "dkernel", "drecurrent_kernel", "dbias", "dgates"):
                got_array, want_array = getattr(got_grads, field), getattr(want_grads, field)
                assert (got_array is None) == (want_array is None), (backward, field)
                if got_array is not None:
                    np.testing.assert_array_equal(got_array, want_array, err_msg=f"{backward} {field}")
            if backward == "cell":
                # And the NumPy reference in float64, independently of the cython code.
                as64 = [None if a is None else np.asarray(a, np.float64) for a in (x, h, c, kernel,
                                                                                   recurrent_kernel, bias)]
                exact = reference.cell_forward(*as64, None, None, options)
                exact_grads = reference.cell_backward(np.asarray(dh, np.float64), np.asarray(dc, np.float64),
                                                      exact.workspace)
                tolerance = 1e-4 if np.float32 in (x.dtype, kernel.dtype) else 1e-10
                for name, array, value in (("h", got_h, exact.h), ("c", got_c, exact.c)) + tuple(
                        (field, getattr(got_grads, field), getattr(exact_grads, field))
                        for field in ("dx", "dh0", "dc0", "dkernel", "drecurrent_kernel", "dbias")
                        if getattr(exact_grads, field) is not None):
                    np.testing.assert_allclose(array, value, rtol=tolerance, atol=tolerance, err_msg=name)

    with kernel_overrides(cython_isa=isa):
        step = backend.cell_training_step(kernel, recurrent_kernel, options)
        for batch in (1, 3, 2 * cython_module.MIN_ROWS_PER_PART - 1, 2 * cython_module.MIN_ROWS_PER_PART):
            x = rng.normal(size=(batch, features)).astype(dtype)
            h, c = (rng.normal(size=(batch, units)).astype(dtype) for _ in range(2))
            check(x, h, c, direct=batch < 2 * cython_module.MIN_ROWS_PER_PART or _gemv_takes_32_rows(isa, dtype))
        check(x[:3].astype(np.float64 if dtype == "float32" else np.float32), h[:3], c[:3], direct=False)
        with kernel_overrides(cython_one_step=False):
            check(x[:3], h[:3], c[:3], direct=False)
        before = step(x[:1], h[:1], c[:1], bias)[0]
        recurrent_kernel *= 0.5                   # in place (through the view when transposed)
        assert not np.array_equal(before, step(x[:1], h[:1], c[:1], bias)[0])
        check(x[:1], h[:1], c[:1], direct=True)
    with pytest.raises(ValueError, match="cell_training_step takes the options of one training step"):
        backend.cell_training_step(kernel, recurrent_kernel, dataclasses.replace(options, training=False))


def test_cell_inference_step_keeps_cell_forward_for_weights_it_would_copy(monkeypatch):
    """Weights that the kernels cannot read in place (another dtype than the recurrent
    kernel's, or a layout that needs a copy) take cell_forward at every step, so that
    in-place changes of their values are seen, as cell_forward sees them."""
    from lstmeng.backends.base import SequenceOptions

    rng = np.random.default_rng(3)
    units, features = 8, 5
    options = SequenceOptions.for_call(bias=None, mask=None, input_dropout_mask=None, recurrent_dropout_mask=None,
                                       return_sequences=False)
    backend = cython_module.CythonBackend()
    x, h, c = (rng.normal(size=(1, n)).astype(np.float32) for n in (features, units, units))
    wide_kernel = rng.normal(size=(features, 8 * units)).astype(np.float32)
    recurrent_kernel = rng.normal(size=(units, 4 * units)).astype(np.float32)
    calls = []
    cell_forward = backend.cell_forward
    monkeypatch.setattr(backend, "cell_forward", lambda *args: calls.append(1) or cell_forward(*args))
    for kernel in (wide_kernel[:, ::2], wide_kernel[:, :4 * units].astype(np.float64)):
        step = backend.cell_inference_step(kernel, recurrent_kernel, options)
        calls.clear()
        first = step(x, h, c, None)
        kernel *= 2
        second = step(x, h, c, None)
        assert calls == [1, 1] and not np.array_equal(first[0], second[0])
        np.testing.assert_array_equal(second[0], cell_forward(x, h, c, kernel, recurrent_kernel, None, None, None,
                                                              options).h)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("path, batch", [("one-step", 1), ("one-step", 5), ("units", 1), ("one-part", 5),
                                         ("parts", 34)])
def test_sequence_backward_gates_gives_dz_of_one_step_calls(isa, dtype, path, batch, monkeypatch):
    """sequence_backward_gates of a one-step call of fewer than 2 * MIN_ROWS_PER_PART rows (the cell
    loops' call): dz in place of the weight gradients, with x^T dz, h0^T dz and dz's column sums
    the weight gradients sequence_backward gives for the same step, and dx, dh0, dc0 bitwise its;
    on the one-step kernel and on the threaded general path (its weight-gradient products
    skipped) with a unit split or one part of rows (which would pipeline its weight gradients).
    With two parts of rows (34 rows) it is sequence_backward unless asked with ``prefer_gates``;
    with a recurrent dropout mask, a right-padded mask (rows sorted by length) or the one-step
    path switched off it is sequence_backward either way."""
    if isa not in cython_module._cython_lstm.SUPPORTED_ISAS:
        pytest.skip(f"this CPU or build does not run {isa}")
    one_step_calls = []
    one_step_backward = cython_module.CythonBackend._one_step_backward
    monkeypatch.setattr(cython_module.CythonBackend, "_one_step_backward",
                        lambda self, *args: one_step_calls.append(1) or one_step_backward(self, *args))
    overrides = {"cython_isa": isa}
    if path != "one-step":
        monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)   # every training call threads
        monkeypatch.setattr(cython_module, "_kernel_threads", lambda: 2)
        overrides["cython_split_units"] = path == "units"   # one part ("one-part") is not split
    rng = np.random.default_rng(batch + 10)
    units, features = 32, 16
    x = rng.normal(size=(batch, 1, features)).astype(dtype)
    h0, c0 = (rng.normal(size=(batch, units)).astype(dtype) for _ in range(2))
    kernel = (rng.normal(size=(features, 4 * units)) * 0.3).astype(dtype)
    recurrent_kernel = (rng.normal(size=(units, 4 * units)) * 0.3).astype(dtype)
    bias = (rng.normal(size=4 * units) * 0.1).astype(dtype)
    arrays = (x, h0, c0, kernel, recurrent_kernel, bias)
    dh, dc = (rng.normal(size=(batch, units)).astype(dtype) for _ in range(2))
    doutputs = np.zeros((batch, 1, units), dtype)
    backend = cython_module.CythonBackend()

    def workspace(**kwargs):
        return sequence_forward(backend, *arrays, return_sequences=True, training=True, **kwargs).workspace

    with kernel_overrides(**overrides):
        forward = workspace()
        teams = (len(forward.layout.row_begin) - 1, forward.split_units)
        assert backend.gives_gates(forward) == (path != "parts")
        if path == "parts":
            by_default = backend.sequence_backward_gates(doutputs, dh, dc, forward)
            forward = workspace()
        gates = backend.sequence_backward_gates(doutputs, dh, dc, forward, prefer_gates=path == "parts")
        full = backend.sequence_backward(doutputs, dh, dc, workspace())
        assert len(one_step_calls) == (2 if path == "one-step" else 0)
        assert teams == {"one-step": (1, False), "one-part": (1, False), "parts": (2, False),
                         "units": (1, True)}[path]
        if path == "parts":
            assert by_default.dgates is None
            for name in ("dx", "dh0", "dc0", "dkernel", "drecurrent_kernel", "dbias"):
                np.testing.assert_array_equal(getattr(by_default, name), getattr(full, name), err_msg=name)
        dropout = np.full((batch, units), 2.0, dtype)
        right_padded = np.ones((batch, 1), bool)
        right_padded[0] = False
        for prefer_gates in (False, True):
            others = [workspace(recurrent_dropout_mask=dropout), workspace(mask=right_padded)]
            with kernel_overrides(cython_one_step=False):
                others.append(workspace())
                for other in others:
                    assert not backend.gives_gates(other)
                    grads = backend.sequence_backward_gates(doutputs, dh, dc, other, prefer_gates=prefer_gates)
                    assert grads.dgates is None and grads.dkernel.shape == (features, 4 * units)
    assert gates.dkernel is None and gates.drecurrent_kernel is None and gates.dbias is None
    assert gates.dgates.shape == (batch, 4 * units) and gates.dgates.dtype == np.dtype(dtype)
    for name in ("dx", "dh0", "dc0"):
        np.testing.assert_array_equal(getattr(gates, name), getattr(full, name), err_msg=name)
    assert full.dgates is None
    tolerance = 1e-5 if dtype == "float32" else 1e-12
    for got, want, name in ((x[:, 0].T @ gates.dgates, full.dkernel, "dkernel"),
                            (h0.T @ gates.dgates, full.drecurrent_kernel, "drecurrent_kernel"),
                            (gates.dgates.sum(0), full.dbias, "dbias")):
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance, err_msg=name)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("path, batch, steps", [
    ("one-step", 5, 1), ("units", 1, 1), ("one-part", 5, 1), ("parts", 34, 1),
    ("units", 1, 6), ("one-part", 2, 300), ("parts", 34, 6), ("packed", 34, 6)])
def test_backward_without_state_grads_keeps_every_other_result_bitwise(isa, dtype, path, batch, steps,
                                                                         monkeypatch):
    """``sequence_backward_gates(state_grads=False)`` on every path of the extension's backward:
    the one-step kernel, a unit split (batch 1: the products in halves where packed), one part
    (300 steps of 2 rows: the pipelined backward on AVX-512), two parts of rows, and the packed
    variable-length layout (a right-padded mask, reversed): dh0 and dc0 None, and dx, dz or the
    weight gradients bitwise those of the same call with them; the skipped product is the last
    step's only, so a sequence's earlier steps are unchanged."""
    if isa not in cython_module._cython_lstm.SUPPORTED_ISAS:
        pytest.skip(f"this CPU or build does not run {isa}")
    overrides = {"cython_isa": isa}
    if path != "one-step":
        monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)   # every training call threads
        monkeypatch.setattr(cython_module, "_kernel_threads", lambda: 2)
        monkeypatch.setattr(cython_module._UnitSplitGovernor, "allow", lambda self: True)
        overrides["cython_split_units"] = path == "units"
    rng = np.random.default_rng(batch + steps)
    units, features = 32, 32
    arrays = [(rng.normal(size=size) * scale).astype(dtype) for size, scale in [
        ((batch, steps, features), 1), ((batch, units), 1), ((batch, units), 1),
        ((features, 4 * units), 0.3), ((units, 4 * units), 0.3), ((4 * units,), 0.1)]]
    mask, flags = None, {}
    if path == "packed":
        mask = np.arange(steps)[None, :] < rng.integers(1, steps + 1, size=batch)[:, None]
        flags = {"reverse": True}
    doutputs = rng.normal(size=(batch, steps, units)).astype(dtype)
    dh, dc = (rng.normal(size=(batch, units)).astype(dtype) for _ in range(2))
    backend = cython_module.CythonBackend()
    grads = {}
    with kernel_overrides(**overrides):
        for state_grads in (True, False):
            forward = sequence_forward(backend, *arrays, mask, training=True, return_sequences=True, **flags)
            teams = (len(forward.workspace.layout.row_begin) - 1, forward.workspace.split_units)
            grads[state_grads] = backend.sequence_backward_gates(doutputs, dh, dc, forward.workspace,
                                                                 prefer_gates=True, state_grads=state_grads)
    assert teams == {"one-step": (1, False), "units": (1, True), "one-part": (1, False), "parts": (2, False),
                     "packed": (2, False)}[path]
    assert grads[False].dh0 is None and grads[False].dc0 is None
    assert grads[True].dh0.shape == grads[True].dc0.shape == (batch, units)
    assert (grads[True].dgates is None) == (steps > 1)
    for name in ("dx", "dkernel", "drecurrent_kernel", "dbias", "dgates"):
        got, want = getattr(grads[False], name), getattr(grads[True], name)
        assert (got is None) == (want is None), name
        if want is not None:
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_one_step_backward_short_path_only_for_the_uniform_layout(monkeypatch):
    """A one-step workspace of the variable-length layout (a right-padded mask with rows of
    length 0: the rows are sorted by length and those rows not processed) keeps the general
    backward, whose gradients match the NumPy reference; without the mask the short one runs."""
    calls = []
    short_backward = cython_module.CythonBackend._one_step_backward
    monkeypatch.setattr(cython_module.CythonBackend, "_one_step_backward",
                        lambda self, *args: calls.append(args[3].input_shape) or short_backward(self, *args))
    from lstmeng.backends.numpy import NumpyBackend
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 1, 2))
    h0, c0 = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    arrays = (x, h0, c0, rng.normal(size=(2, 16)), rng.normal(size=(4, 16)), rng.normal(size=16))
    doutputs, dh, dc = rng.normal(size=(3, 1, 4)), rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    backend, reference = cython_module.CythonBackend(), NumpyBackend()
    for mask in (np.array([[True], [False], [True]]), None):
        calls.clear()
        ours = sequence_forward(backend, *arrays, mask, training=True)
        theirs = sequence_forward(reference, *arrays, mask, training=True)
        got = backend.sequence_backward(doutputs, dh, dc, ours.workspace)
        want = reference.sequence_backward(doutputs, dh, dc, theirs.workspace)
        assert calls == ([] if mask is not None else [(3, 1, 2)])
        for name in ("dx", "dh0", "dc0", "dkernel", "drecurrent_kernel", "dbias"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-10, atol=1e-12,
                                       err_msg=name)


def test_one_step_training_short_path_only_where_the_general_path_runs_one_thread(monkeypatch):
    """A one-step training call whose forward reaches MIN_FLOPS_TO_THREAD keeps the general path
    (its workspace may then ask for a unit split or more threads in the backward)."""
    calls = []
    short_path = cython_module.CythonBackend._one_step
    monkeypatch.setattr(cython_module.CythonBackend, "_one_step",
                        lambda self, *args: calls.append(args[7].training) or short_path(self, *args))
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)
    rng = np.random.default_rng(0)
    arrays = (rng.normal(size=(2, 1, 3)), np.zeros((2, 4)), np.zeros((2, 4)), rng.normal(size=(3, 16)),
              rng.normal(size=(4, 16)), None)
    backend = cython_module.CythonBackend()
    sequence_forward(backend, *arrays, training=True)
    sequence_forward(backend, *arrays, training=False)
    assert calls == [False]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transposed", [False, True], ids=["row_major", "torch_layout"])
@pytest.mark.parametrize("one_step", [None, False], ids=["short_path", "general_path"])
def test_rows_of_tiny_batches_match_the_single_row(dtype, transposed, one_step):
    """Products of a few rows run as GEMVs (the extension's gemm: lstm_gemv.h's kernels in
    float32 for up to 16 rows, 32 on the AVX-512 kernels, blocks of three or four per pass; one
    BLAS DGEMV per row in float64 for up to three), so a row's outputs, states and input and state gradients are bitwise
    the same in a one-step call of one row or more, on the short path and the general one
    (whose kernels are not packed for one step). With SGEMM for two or three rows they
    differed in the last bits."""
    rng = np.random.default_rng(3)
    features, units = 24, 40
    kernel = (0.2 * rng.normal(size=(features, 4 * units))).astype(dtype)
    recurrent_kernel = (0.2 * rng.normal(size=(units, 4 * units))).astype(dtype)
    if transposed:   # lstmeng.torch's layout: weight_hh.t(), read in place
        kernel, recurrent_kernel = np.ascontiguousarray(kernel.T).T, np.ascontiguousarray(recurrent_kernel.T).T
    bias = rng.normal(size=4 * units).astype(dtype)
    wide = cython_module._cython_lstm.isa() == "avx512"   # the kernels in use take 32 rows
    batches = ((1, 2, 3, 7, 16) + ((24, 31) if wide else ())) if dtype == np.float32 else (1, 2, 3)
    most = batches[-1]
    x = rng.normal(size=(most, 1, features)).astype(dtype)
    h0, c0 = rng.normal(size=(most, units)).astype(dtype), rng.normal(size=(most, units)).astype(dtype)
    dy, dh, dc = (rng.normal(size=shape).astype(dtype) for shape in ((most, 1, units), (most, units), (most, units)))
    backend = cython_module.CythonBackend()
    results = {}
    with kernel_overrides(cython_one_step=one_step):
        for batch in batches:
            forward = sequence_forward(backend, x[:batch], h0[:batch], c0[:batch], kernel, recurrent_kernel, bias,
                                       training=True)
            grads = backend.sequence_backward(dy[:batch], dh[:batch], dc[:batch], forward.workspace)
            results[batch] = (forward.outputs[0], forward.h[0], forward.c[0], grads.dx[0], grads.dh0[0],
                              grads.dc0[0])
    for batch in batches[1:]:
        for name, got, want in zip(("outputs", "h", "c", "dx", "dh0", "dc0"), results[batch], results[1]):
            np.testing.assert_array_equal(got, want, err_msg=f"{name}, batch {batch}")


def _check_float32_call(isa, transposed, inputs, output_grads, label):
    """A float32 training call and its backward on the cython backend's ``isa`` kernels against the
    float64 NumPy reference. inputs: float64 (x [B, T, I], h0, c0 [B, H], kernel [I, 4H],
    recurrent_kernel [H, 4H], bias [4H]); output_grads: (dy [B, T, H], dh, dc [B, H]);
    transposed: the weights as lstmeng.torch passes them (weight_ih.t(), weight_hh.t(), read in
    place)."""
    from lstmeng.backends.numpy import NumpyBackend
    arrays = [a.astype(np.float32) for a in inputs]
    if transposed:
        arrays[3], arrays[4] = (np.ascontiguousarray(a.T).T for a in arrays[3:5])
    backend, reference = cython_module.CythonBackend(), NumpyBackend()
    with kernel_overrides(cython_isa=isa):
        ours = sequence_forward(backend, *arrays, training=True)
        grads = backend.sequence_backward(*(a.astype(np.float32) for a in output_grads), ours.workspace)
    expected = sequence_forward(reference, *inputs, training=True)
    expected_grads = reference.sequence_backward(*output_grads, expected.workspace)
    for name in ("outputs", "h", "c"):
        np.testing.assert_allclose(getattr(ours, name), getattr(expected, name), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{name}, {label}")
    for name in ("dx", "dh0", "dc0", "dkernel", "drecurrent_kernel", "dbias"):
        testing.assert_close(getattr(grads, name), getattr(expected_grads, name), f"{name}, {label}", "float32",
                             gradient=True)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("sizes", [(19, 13), (70, 40)], ids=["tails-only", "full-blocks-and-tails"])
@pytest.mark.parametrize("transposed", [False, True], ids=["row_major", "torch_layout"])
def test_small_batch_products_match_the_reference(isa, sizes, transposed):
    """The float32 GEMVs of small batches (lstm_gemv.h: dot products on PyTorch's layout,
    partial sums fed by groups of weight rows on lstmeng's; blocks of three rows, four on
    AVX-512, so 5, 7, 16 and 31 rows take full and partial blocks; 24 and 31 rows on AVX-512
    only since session 17, elsewhere SGEMM's) in every kernel family, at sizes
    that leave only tails (I = 19, H = 13: 4H = 52 columns, 13 and 19 k) and whole vectors
    and row groups plus tails (I = 70, H = 40: 4H = 160, 70 k = groups of 4 or 8 and a
    remainder): one-step forward (input and accumulated recurrent product) and backward (dh0
    and dx products) against the float64 NumPy reference."""
    if isa not in cython_module._cython_lstm.SUPPORTED_ISAS:
        pytest.skip(f"this CPU or build does not run {isa}")
    features, units = sizes
    rng = np.random.default_rng(features)
    kernel = 0.3 * rng.normal(size=(features, 4 * units))
    recurrent_kernel = 0.3 * rng.normal(size=(units, 4 * units))
    bias = 0.1 * rng.normal(size=4 * units)
    for batch in (1, 2, 3, 5, 7, 16, 24, 31):
        x = rng.normal(size=(batch, 1, features))
        h0, c0 = rng.normal(size=(batch, units)), rng.normal(size=(batch, units))
        dy, dh, dc = (rng.normal(size=shape) for shape in ((batch, 1, units), (batch, units), (batch, units)))
        _check_float32_call(isa, transposed, (x, h0, c0, kernel, recurrent_kernel, bias), (dy, dh, dc),
                            f"batch {batch}")


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("transposed", [False, True], ids=["row_major", "torch_layout"])
@pytest.mark.parametrize("batch, steps, units", [(8, 2, 32), (8, 3, 32), (12, 2, 32), (17, 3, 32), (20, 2, 32),
                                                 (64, 2, 32), (64, 1, 32), (4, 4, 288), (8, 2, 288), (6, 2, 288),
                                                 (64, 2, 96), (64, 1, 96), (24, 1, 32), (48, 1, 96)])
def test_short_calls_of_small_batches_on_each_product_path_match_the_reference(isa, transposed, batch, steps,
                                                                             units):
    """Short calls of small batches, which session 16 moved between product paths: step
    products on the GEMV (up to 16 rows, unpacked) or on the packed recurrent kernel (from 2
    steps where SGEMM would have taken them, more than 16 rows, and from one step at 32 rows
    per part; from 2 steps for 7+ rows of a kernel over 1 MiB: H = 288; from 4 steps for 4+
    rows), and the input projection and dx on the packed input kernel from 2 steps of more
    than 16 rows (AVX-512, I = 32); batch 64 at H = 96 in two parts that share a recurrent kernel
    packed by both threads (session 17: 36 K floats, over PARALLEL_PACK_MIN_FLOATS, its 12 panel
    pairs dealt 6 and 6); one step of 24 rows (the short path) and of two parts of 24, unpacked:
    the AVX-512 GEMV's since session 17, SGEMM's on AVX2. Forward and backward against the
    float64 NumPy reference."""
    if isa not in cython_module._cython_lstm.SUPPORTED_ISAS:
        pytest.skip(f"this CPU or build does not run {isa}")
    features = 32
    rng = np.random.default_rng(batch * 100 + steps)
    scale = 1 / np.sqrt(units)
    kernel = scale * rng.normal(size=(features, 4 * units))
    recurrent_kernel = scale * rng.normal(size=(units, 4 * units))
    bias = 0.1 * rng.normal(size=4 * units)
    x = rng.normal(size=(batch, steps, features))
    h0, c0 = rng.normal(size=(batch, units)), rng.normal(size=(batch, units))
    dy, dh, dc = (rng.normal(size=shape) for shape in ((batch, steps, units), (batch, units), (batch, units)))
    _check_float32_call(isa, transposed, (x, h0, c0, kernel, recurrent_kernel, bias), (dy, dh, dc),
                        f"batch {batch}, {steps} steps, {units} units")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposed_copy_is_the_transpose(dtype):
    """The extension's transposing copy (lstm_transpose.h: 8 x 8 SIMD tiles in float32 with AVX2 or
    better, element by element otherwise) in every kernel family, at sizes with and without
    partial tiles and blocks: a C-contiguous array equal to the transpose."""
    extension = cython_module._cython_lstm
    rng = np.random.default_rng(7)
    try:
        for isa in extension.SUPPORTED_ISAS:
            extension.select_kernels(isa, True)
            for shape in [(1, 1), (3, 17), (8, 8), (9, 16), (64, 512), (70, 130), (130, 64)]:
                array = rng.normal(size=shape).astype(dtype)
                copy = extension.transposed_copy(array)
                assert copy.flags.c_contiguous and copy.dtype == dtype and copy.shape == shape[::-1], (isa, shape)
                np.testing.assert_array_equal(copy, array.T, err_msg=f"{isa} {shape}")
    finally:
        cython_module._selected_kernels = None
        cython_module._select_kernels(cython_module._kernel_overrides.current())


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("transpose", [False, True], ids=["row_major", "transposed"])
@pytest.mark.parametrize("rows, columns", [(8, 64), (300, 1024), (400, 96), (33, 1056)])
def test_packed_panels_do_not_depend_on_the_threads_that_pack_them(threads, transpose, rows, columns):
    """The packed kernel's layout (lstm_gemm.h: pairs of 16-column panels, [p, k, c] = B[k, 32 p + c])
    as pack_panels writes it on 1-3 threads: the pairs dealt among the threads where the matrix has
    PARALLEL_PACK_MIN_FLOATS floats or more (all but 8 x 64; 400 x 96 is three pairs, dealt 1 and 2),
    read row-major or transposed (PyTorch's layout), equal to NumPy's reshape of the matrix."""
    extension = cython_module._cython_lstm
    matrix = np.random.default_rng(rows).normal(size=(rows, columns)).astype(np.float32)
    stored = np.ascontiguousarray(matrix.T) if transpose else matrix
    packed = extension.packed_panels(stored, transpose, threads)
    expected = matrix.reshape(rows, columns // 32, 32).transpose(1, 0, 2)
    np.testing.assert_array_equal(packed, expected)


def test_packed_panels_reject_bad_arguments():
    extension = cython_module._cython_lstm
    with pytest.raises(ValueError, match="multiple of 32 columns, got K = 4, G = 48"):
        extension.packed_panels(np.zeros((4, 48), np.float32))
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        extension.packed_panels(np.zeros((4, 64), np.float32), False, 0)


def test_float32_steps_of_small_batches_leave_blas_threads_alone():
    """A float32 one-step call of up to 16 rows (32 on the AVX-512 kernels; on the AVX2 kernels 6
    where a weight matrix outgrows 4 MiB; 3 on the scalar kernels) calls no BLAS (lstm_gemv.h), so it takes no BLAS
    thread limit (~2 us); float64 and larger batches do, and a backward does unless the packed
    kernel takes its weight gradients (AVX-512, 4H a multiple of 32)."""
    limit = type(cython_module.threads.single_threaded_blas())
    guard = cython_module._blas_guard
    float32, float64 = np.dtype(np.float32), np.dtype(np.float64)
    extension = cython_module._cython_lstm
    for isa in extension.SUPPORTED_ISAS:
        with kernel_overrides(cython_isa=isa):
            cython_module._select_kernels(cython_module._kernel_overrides.current())
            cached, streamed = {"scalar": (3, 3), "avx2": (16, 6), "avx512": (32, 32)}[isa]
            assert not isinstance(guard(float32, cached, 64, 13, backward=False), limit), isa
            assert isinstance(guard(float32, cached + 1, 64, 13, backward=False), limit), isa
            # H = 512: the recurrent kernel [512, 2048] is 4 MiB; H = 1024: 16 MiB, which the
            # AVX2 kernels stream from memory too slowly at every pass of three rows.
            assert not isinstance(guard(float32, cached, 64, 512, backward=False), limit), isa
            assert not isinstance(guard(float32, streamed, 64, 1024, backward=False), limit), isa
            assert isinstance(guard(float32, streamed + 1, 64, 1024, backward=False), limit), isa
            assert isinstance(guard(float32, streamed + 1, 4100, 64, backward=False), limit), isa   # K over 4 MiB
            assert isinstance(guard(float64, 1, 64, 13, backward=False), limit), isa
            packed = isa == "avx512"
            assert isinstance(guard(float32, 1, 64, 32, backward=True), limit) != packed, isa
            assert isinstance(guard(float32, 1, 64, 13, backward=True), limit), isa   # 4H = 52
    cython_module._select_kernels(cython_module._kernel_overrides.current())
