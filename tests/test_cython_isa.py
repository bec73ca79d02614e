"""The cython backend's hand-written kernel families (AVX-512, AVX2, scalar), each forced in turn.

Every family this CPU runs passes the conformance suite against the NumPy
reference in float32 and float64; the families this CPU lacks are skipped,
so an AVX-512 machine runs all three and an AVX2 machine two. Sizes are
chosen to reach every block of the packed step product (AVX-512: 12-, 8-
and 4-row blocks and single rows; AVX2: 6- and 4-row blocks and single rows)
and the masked tails of the 16-lane gate kernels.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

import lstmeng as le
from lstmeng import testing
from lstmeng.testing import kernel_overrides

cython_module = pytest.importorskip("lstmeng.backends.cython")
pytestmark = pytest.mark.skipif(
    cython_module._cython_lstm is None, reason="the cython extension is not built")
extension = cython_module._cython_lstm

ISAS = ("avx512", "avx2", "scalar")


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test with one kernel family forced (skipped where the CPU lacks it)."""
    if request.param not in extension.SUPPORTED_ISAS:
        pytest.skip(f"this CPU or build does not run {request.param}")
    with kernel_overrides(cython_isa=request.param):
        yield request.param


@pytest.mark.parametrize("case", testing.conformance_cases(), ids=str)
def test_conformance(case, isa):
    testing.check_case("cython", case)


# Units a multiple of 32 take the packed step product (float32), and on the AVX-512 path
# the input projection too (any input size) and dx = dz @ K^T (input sizes a multiple of
# 32); batches of 1, 3, 13, 16, 21, 31 rows reach the AVX-512 kernel's single row, the
# 4-row block holding 3 rows and passes of 7 + 6, 8 + 8, 11 + 10 and 11 + 10 + 10 rows,
# and every remainder of the AVX2 blocks (6 + 6 + 1, 6 + 6 + 4, ...); masks shrink the
# rows per step further.
@pytest.mark.parametrize("case", [
    dataclasses.replace(case, units=units, batch=batch, input_size=inputs)
    for units, batch, inputs in ((32, 1, 4), (32, 3, 32), (64, 13, 64), (32, 16, 5), (32, 21, 32),
                                 (64, 31, 4))
    for case in testing.conformance_cases(dtypes=("float32",), cases_per_dtype=4)], ids=str)
def test_conformance_packed_kernel_sizes(case, isa):
    testing.check_case("cython", case)


def test_avx512_rows_do_not_depend_on_their_block(monkeypatch):
    """The AVX-512 step product deals a part's rows to blocks of 2 to 12 rows (as few
    passes over the weights as 12-row blocks allow, rows dealt evenly). Each row's sum is
    the same FMA chain in every block, so a row's outputs must be bitwise the same whatever
    batch it is in: every batch of 2 to 25 rows (one thread, so one part) against the
    first rows of the batch of 25, whose outputs match the float64 NumPy reference."""
    if "avx512" not in extension.SUPPORTED_ISAS:
        pytest.skip("this CPU or build does not run the AVX-512 kernels")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rng = np.random.default_rng(7)
    # 16 steps: the packed kernels take the recurrent product (4 steps or more) and the
    # input projection (4 steps or more) at every batch size here.
    x = rng.normal(size=(25, 16, 6)).astype(np.float32)
    layer = le.LSTM(32, return_sequences=True, backend="cython", seed=1)
    with kernel_overrides(cython_isa="avx512"):
        whole = layer(x)
        assert extension.packs_recurrent_kernel(16, 2, 32)
        for batch in range(2, 25):
            np.testing.assert_array_equal(layer(x[:batch]), whole[:batch], err_msg=f"batch {batch}")
    reference = le.LSTM(32, return_sequences=True, backend="numpy", seed=1, dtype="float64")(x.astype(np.float64))
    testing.assert_close(whole, reference, "outputs", "float32")


@pytest.fixture
def two_thread_unit_split(monkeypatch):
    """Split the units of every batch between two threads (the per-gate-block products)."""
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    if not cython_module._team(1, 64, True)[2]:
        pytest.skip("this build runs one thread (no OpenMP or no OpenBLAS thread control)")
    with kernel_overrides(cython_split_units=True):
        yield


@pytest.mark.parametrize("case", [
    dataclasses.replace(case, units=64, batch=batch)
    for batch in (1, 5)
    for case in testing.conformance_cases(dtypes=("float32",), cases_per_dtype=4)], ids=str)
def test_conformance_split_units(case, isa, two_thread_unit_split):
    testing.check_case("cython", case)


def _train(x, dy, units):
    """(outputs, dx, every weight gradient) of a training step of a fresh layer."""
    layer = le.LSTM(units, return_sequences=True, backend="cython", seed=0)
    y = layer(x, training=True)
    dx = layer.backward(dy)
    return [y, dx, *(layer.grads[name] for name in sorted(layer.grads))]


# 8, 13, 24 and 40 units end in a partial vector of 16 lanes (the masked tail); 48 does not.
@pytest.mark.parametrize("units", [8, 13, 24, 40, 48])
def test_each_isa_agrees_with_the_generic_code(units, isa):
    """A family's fused gate kernels against the generic row loops on the same inputs."""
    rng = np.random.default_rng(units)
    x = (rng.normal(size=(3, 9, 5)) * 3).astype(np.float32)
    dy = rng.normal(size=(3, 9, units)).astype(np.float32)
    fast = _train(x, dy, units)
    with kernel_overrides(cython_fast_gate_math=False):
        generic = _train(x, dy, units)
    for fast_value, generic_value in zip(fast, generic):
        np.testing.assert_allclose(fast_value, generic_value, rtol=2e-5, atol=2e-5)


def test_saturated_inputs_stay_finite(isa):
    """Inputs of +-1e4 saturate every gate: finite results, outputs as the NumPy reference's."""
    rng = np.random.default_rng(0)
    x = rng.choice([-1e4, 1e4], size=(2, 6, 4)).astype(np.float32)
    dy = rng.normal(size=(2, 6, 20)).astype(np.float32)
    ours = _train(x, dy, 20)
    reference = le.LSTM(20, return_sequences=True, backend="numpy", seed=0)(x)
    assert all(np.all(np.isfinite(value)) for value in ours)
    np.testing.assert_allclose(ours[0], reference, rtol=1e-5, atol=1e-6)


def test_nan_propagates(isa):
    """A NaN input reaches the outputs of its row (the gate kernels' min/max keep NaN)."""
    x = np.zeros((2, 3, 4), np.float32)
    x[0, 1, 2] = np.nan
    y = le.LSTM(16, return_sequences=True, backend="cython", seed=0)(x)
    assert np.isnan(y[0, 1:]).all() and not np.isnan(y[1]).any() and not np.isnan(y[0, 0]).any()


def test_best_isa_is_the_default():
    """The best family the CPU runs is the one a call without overrides selects, and AVX-512
    CPUs get it."""
    le.LSTM(4, backend="cython", seed=0)(np.zeros((1, 2, 3), np.float32))
    assert extension.isa() == extension.BEST_ISA == extension.SUPPORTED_ISAS[-1]
    assert extension.SUPPORTED_ISAS[0] == "scalar"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set(cpuinfo.read().split())
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "fma", "avx2"} <= flags:
            assert extension.BEST_ISA == "avx512"
        elif {"avx2", "fma"} <= flags:
            assert extension.BEST_ISA == "avx2"


def test_isa_override_rejects_what_the_cpu_lacks():
    """An unknown name before the block starts; a family this CPU lacks at the call."""
    x = np.zeros((1, 2, 3), np.float32)
    with pytest.raises(ValueError, match="cython_isa"), kernel_overrides(cython_isa="sse9"):
        pass
    with pytest.raises(ValueError, match="not available"):
        extension.select_kernels("sse9", True)
    for name in ISAS:
        with kernel_overrides(cython_isa=name):
            if name in extension.SUPPORTED_ISAS:
                le.LSTM(4, backend="cython", seed=0)(x)
                assert extension.isa() == name
            else:
                with pytest.raises(ValueError, match="not available"):
                    le.LSTM(4, backend="cython", seed=0)(x)
