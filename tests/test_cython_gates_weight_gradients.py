"""The cython backend's ``gates_weight_gradients``: a cell loop's weight gradients dz^T x and
dz^T h0 in PyTorch's layout on the packed AVX-512 kernel (``lstmeng.torch.LSTMCell`` forms them
with it). Against a float64 NumPy product (an independent reference), the same numbers whatever
the thread count, and None (the contract's default) wherever the kernel does not take the call."""

from __future__ import annotations

import numpy as np
import pytest

from lstmeng.backends import registry
from lstmeng.backends.numpy import NumpyBackend
from lstmeng.testing import kernel_overrides

cython_module = pytest.importorskip("lstmeng.backends.cython")
pytestmark = pytest.mark.skipif(
    cython_module._cython_lstm is None, reason="the cython extension is not built")
extension = cython_module._cython_lstm

needs_avx512 = pytest.mark.skipif(
    extension is None or "avx512" not in extension.SUPPORTED_ISAS, reason="this CPU or build does not run avx512")


def _arrays(rows: int, inputs: int, units: int, dtype=np.float32, seed: int = 0):
    """dz [rows, 4H], x [rows, I], h0 [rows, H] of a normal distribution."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, 4 * units)).astype(dtype), rng.standard_normal((rows, inputs)).astype(dtype),
            rng.standard_normal((rows, units)).astype(dtype))


def _reference(dz, x, h0, transposed=True):
    """dz^T x and dz^T h0 in float64 (their transposes without ``transposed``)."""
    products = dz.astype(np.float64).T @ x.astype(np.float64), dz.astype(np.float64).T @ h0.astype(np.float64)
    return products if transposed else tuple(product.T for product in products)


@pytest.fixture
def backend():
    return registry.get_backend_object("cython")


@needs_avx512
@pytest.mark.parametrize("rows", [1, 2, 13, 256, 257, 700])   # one chunk, a chunk and a row, several
@pytest.mark.parametrize("sizes", [(32, 32), (64, 128), (96, 64)])
@pytest.mark.parametrize("transposed", [True, False], ids=["torch-layout", "contract-layout"])
def test_the_products_match_a_float64_reference_and_any_thread_count(rows, sizes, transposed, backend, monkeypatch):
    inputs, units = sizes
    dz, x, h0 = _arrays(rows, inputs, units)
    wanted = _reference(dz, x, h0, transposed)
    shapes = [(4 * units, inputs), (4 * units, units)]
    if not transposed:
        shapes = [shape[::-1] for shape in shapes]
    results = []
    # At (32, 32) 4H has 4 panel pairs: 3 threads take unequal shares, 5 more threads than pairs.
    for threads in (1, 2, 3, 5):
        monkeypatch.setattr(cython_module, "GATES_WEIGHT_GRADIENTS_MIN_FLOPS_TO_THREAD", 0)
        monkeypatch.setattr(cython_module, "_kernel_threads", lambda threads=threads: threads)
        with kernel_overrides(cython_isa="avx512"):
            # Any spelling of the dtype that NumPy reads as float32.
            for dtype in (np.float32, np.dtype(np.float32), "float32"):
                assert backend.takes_gates_weight_gradients(rows, inputs, units, dtype), dtype
            results.append(backend.gates_weight_gradients(dz, x, h0, transposed=transposed))
    for got in results:
        for array, expected, shape in zip(got, wanted, shapes):
            assert array.shape == shape and array.dtype == np.float32 and array.flags.c_contiguous
            # float32 sums of `rows` products: a few ulps of the terms' magnitude per term.
            np.testing.assert_allclose(array, expected, rtol=1e-5, atol=1e-5 * np.sqrt(rows))
    # Each element of the results is one FMA chain, whichever thread runs it: bitwise equal.
    for got in results[1:]:
        np.testing.assert_array_equal(got[0], results[0][0])
        np.testing.assert_array_equal(got[1], results[0][1])


@needs_avx512
def test_strided_inputs_are_read_as_their_values(backend):
    dz, x, h0 = _arrays(40, 64, 32)
    wide = np.zeros((40, 2 * 64), np.float32)
    wide[:, ::2] = x
    with kernel_overrides(cython_isa="avx512"):
        got = backend.gates_weight_gradients(dz, wide[:, ::2], h0)
        want = backend.gates_weight_gradients(dz, x, h0)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@needs_avx512
def test_threads_run_from_the_flop_limit_and_not_while_the_governor_holds_back(backend, monkeypatch):
    asked = []
    original = extension.gates_weight_gradients

    def spy(*args):
        asked.append(args[5])   # threads
        return original(*args)

    monkeypatch.setattr(extension, "gates_weight_gradients", spy)
    monkeypatch.setattr(cython_module, "_kernel_threads", lambda: 2)
    monkeypatch.setattr(backend._split_governor, "_skip", 0)   # not holding back (earlier tests may)
    limit = cython_module.GATES_WEIGHT_GRADIENTS_MIN_FLOPS_TO_THREAD
    with kernel_overrides(cython_isa="avx512"):
        small = _arrays(2, 32, 32)      # 2 * 2 * 128 * 64 FLOPs, far under the limit
        large = _arrays(64, 64, 128)    # 12.6 MFLOP
        assert 2 * 2 * 128 * 64 < limit <= 2 * 64 * 512 * 192
        backend.gates_weight_gradients(*small)
        backend.gates_weight_gradients(*large)
        monkeypatch.setattr(backend._split_governor, "_skip", 3)   # another process was winning
        backend.gates_weight_gradients(*large)
        assert backend._split_governor._skip == 3   # a reading: no call counted
    assert asked == [1, 2, 1]


@pytest.mark.parametrize("case", ["float64", "avx2", "scalar", "inputs not a multiple of 32",
                                  "units not a multiple of 32", "mixed dtypes"])
def test_calls_the_kernel_does_not_take_get_none(case, backend):
    # Each case on the avx512 kernels but for its one difference (elsewhere none is taken anyway).
    needed = case if case in ("avx2", "scalar") else "avx512"
    if needed not in extension.SUPPORTED_ISAS:
        pytest.skip(f"this CPU or build does not run {needed}")
    inputs, units, dtype, isa = 64, 32, np.float32, "avx512"
    if case == "float64":
        dtype = np.float64
    elif case in ("avx2", "scalar"):
        isa = case
    elif case == "inputs not a multiple of 32":
        inputs = 48
    elif case == "units not a multiple of 32":
        units = 40
    dz, x, h0 = _arrays(8, inputs, units, dtype)
    if case == "mixed dtypes":
        x = x.astype(np.float64)
    with kernel_overrides(cython_isa=isa):
        if case != "mixed dtypes":
            assert not backend.takes_gates_weight_gradients(8, inputs, units, dtype)
        assert backend.gates_weight_gradients(dz, x, h0) is None


def test_the_contract_default_is_none():
    dz, x, h0 = _arrays(8, 32, 32)
    numpy_backend = NumpyBackend()
    assert not numpy_backend.takes_gates_weight_gradients(8, 32, 32, np.float32)
    assert numpy_backend.gates_weight_gradients(dz, x, h0) is None


@pytest.mark.skipif(extension is None or "avx2" not in extension.SUPPORTED_ISAS, reason="no avx2 kernels")
def test_the_extension_names_what_it_cannot_take(backend):
    dz, x, h0 = _arrays(4, 64, 32)
    out_x, out_h = np.empty((128, 64), np.float32), np.empty((128, 32), np.float32)
    try:
        with kernel_overrides(cython_isa="avx2"):
            backend.takes_gates_weight_gradients(4, 64, 32, np.float32)   # selects the avx2 kernels
            with pytest.raises(ValueError, match="needs the avx512 kernels \\(selected: avx2\\)"):
                extension.gates_weight_gradients(dz, x, h0, out_x, out_h, 1)
        if "avx512" in extension.SUPPORTED_ISAS:
            with kernel_overrides(cython_isa="avx512"):
                backend.takes_gates_weight_gradients(4, 64, 32, np.float32)
                with pytest.raises(ValueError, match="outputs must be \\[128, 64\\] and \\[128, 32\\]"):
                    extension.gates_weight_gradients(dz, x, h0, out_h, out_x, 1)
                with pytest.raises(ValueError, match="dz must be \\[N, 4H\\]"):
                    extension.gates_weight_gradients(dz[:3], x, h0, out_x, out_h, 1)
                with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
                    extension.gates_weight_gradients(dz, x, h0, out_x, out_h, 0)
    finally:
        with kernel_overrides():
            backend.takes_gates_weight_gradients(4, 64, 32, np.float32)   # the CPU's best again
