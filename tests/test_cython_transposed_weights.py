"""The cython backend reading the weights transposed, in PyTorch's layout (no copy).

``lstmeng.torch`` passes ``weight_ih.t()`` and ``weight_hh.t()``: views of [4H, I] and
[4H, H] row-major arrays. The backend hands them to the kernels as they are
(``_weights_for_kernels``); every path that reads a weight (the packed projection and
step product, their BLAS fallbacks, dx, the backward's packed R^T) must then give the
numbers it gives for row-major [I, 4H] and [H, 4H] weights. Each kernel family this CPU
runs is forced in turn, with the unit split forced on and off, packed and unpacked sizes,
masks with variable lengths, reverse and both dropouts.
"""

from __future__ import annotations

import numpy as np
import pytest

from lstmeng.testing import kernel_overrides

from _backends import sequence_forward

cython_module = pytest.importorskip("lstmeng.backends.cython")
pytestmark = pytest.mark.skipif(
    cython_module._cython_lstm is None, reason="the cython extension is not built")
extension = cython_module._cython_lstm


def _run(backend, arrays, weights, options):
    """(outputs, h, c, dx, dh0, dc0, dkernel, drecurrent_kernel, dbias) of one training call."""
    x, h0, c0, bias, mask, input_dropout, recurrent_dropout, doutputs, dh, dc = arrays
    kernel, recurrent_kernel = weights
    forward = sequence_forward(backend, x, h0, c0, kernel, recurrent_kernel, bias, mask, input_dropout,
                               recurrent_dropout, training=True, **options)
    grads = backend.sequence_backward(doutputs, dh, dc, forward.workspace)
    return (forward.outputs, forward.h, forward.c, grads.dx, grads.dh0, grads.dc0, grads.dkernel,
            grads.drecurrent_kernel, grads.dbias)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(1, 9, 32, 64), (1, 1, 5, 64), (3, 6, 4, 32), (37, 7, 64, 32)],
                         ids=["batch1", "one-step", "small", "two-parts"])
@pytest.mark.parametrize("split_units", [None, True], ids=["auto", "split"])
def test_transposed_weights_give_the_row_major_results(isa, dtype, shape, split_units, monkeypatch):
    if isa not in extension.SUPPORTED_ISAS:
        pytest.skip(f"this CPU or build does not run {isa}")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)
    batch, steps, features, units = shape
    rng = np.random.default_rng(sum(shape))
    weight_ih = (rng.normal(size=(4 * units, features)) * 0.3).astype(dtype)   # PyTorch's layout
    weight_hh = (rng.normal(size=(4 * units, units)) * 0.3).astype(dtype)
    lengths = rng.integers(1, steps + 1, size=batch)
    mask = np.arange(steps)[None, :] < lengths[:, None]
    arrays = (rng.normal(size=(batch, steps, features)).astype(dtype), rng.normal(size=(batch, units)).astype(dtype),
              rng.normal(size=(batch, units)).astype(dtype), (rng.normal(size=4 * units) * 0.1).astype(dtype),
              mask, (rng.random((batch, features)) < 0.8).astype(dtype) * 1.25,
              (rng.random((batch, units)) < 0.8).astype(dtype) * 1.25,
              rng.normal(size=(batch, steps, units)).astype(dtype), rng.normal(size=(batch, units)).astype(dtype),
              rng.normal(size=(batch, units)).astype(dtype))
    backend = cython_module.CythonBackend()
    transposed = (weight_ih.T, weight_hh.T)
    row_major = (np.ascontiguousarray(weight_ih.T), np.ascontiguousarray(weight_hh.T))
    assert cython_module._weights_for_kernels(*transposed, np.dtype(dtype))[2] is True
    assert cython_module._weights_for_kernels(*row_major, np.dtype(dtype))[2] is False
    tolerance = {"float32": 2e-6, "float64": 1e-13}[dtype]
    for options in ({}, {"reverse": True, "zero_output_for_mask": True}):
        with kernel_overrides(cython_isa=isa, cython_split_units=split_units):
            expected = _run(backend, arrays, row_major, options)
            actual = _run(backend, arrays, transposed, options)
        names = ("outputs", "h", "c", "dx", "dh0", "dc0", "dkernel", "drecurrent_kernel", "dbias")
        for name, got, want in zip(names, actual, expected):
            np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance, err_msg=f"{name} {options}")


def test_mixed_or_foreign_layouts_are_copied_to_row_major():
    """Only a transposed recurrent kernel of the compute dtype is read in place; the kernel then
    follows it (copied to [4H, I] if needed); anything else becomes row-major [I, 4H], [H, 4H]."""
    rng = np.random.default_rng(0)
    weight_ih, weight_hh = rng.normal(size=(16, 3)), rng.normal(size=(16, 4))
    kernel, recurrent, transposed = cython_module._weights_for_kernels(
        np.ascontiguousarray(weight_ih.T), weight_hh.T, np.dtype("float64"))
    assert transposed and kernel.shape == (16, 3) and recurrent.base is weight_hh
    np.testing.assert_array_equal(kernel, weight_ih)
    kernel, recurrent, transposed = cython_module._weights_for_kernels(
        weight_ih.T, weight_hh.T, np.dtype("float32"))     # another dtype: converted, row-major
    assert not transposed and recurrent.flags.c_contiguous and recurrent.dtype == np.float32
    np.testing.assert_allclose(recurrent, weight_hh.T.astype("float32"))
