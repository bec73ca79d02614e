"""The batch-1 recurrent products in halves (cython backend, float32, AVX-512 kernels).

At batch 1 each step's product h(t - 1) @ R (forward) and dz(t) @ R^T (backward) is
summed over two halves apart (``product_in_halves`` in the extension: the halves of h, or the
gate columns of each half of the units): in a two-member unit split a member adds its own
half while the partner's half is still on its way over the barrier, then the other. One
thread, a team of two and a team of three (no overlap) must give bitwise the same numbers
(the backward's products after the time loop with the same thread budget),
for every H the path takes (a multiple of 32: halves of 0 + 32, 32 + 64, 64 + 64 units),
both weight layouts (row-major, and PyTorch's transposed one), masks, dropout, reverse and
the backward; and match the float64 NumPy reference. The extension's
``last_forward_row_halves`` and ``last_backward_row_halves`` confirm the path ran, and that
other calls do not take it.
"""

from __future__ import annotations

import numpy as np
import pytest

from lstmeng.backends import numpy as numpy_backend_module
from lstmeng.testing import kernel_overrides

from _backends import sequence_forward

cython_module = pytest.importorskip("lstmeng.backends.cython")
pytestmark = [
    pytest.mark.skipif(cython_module._cython_lstm is None, reason="the cython extension is not built"),
    pytest.mark.skipif(cython_module._cython_lstm is None or "avx512" not in cython_module._cython_lstm.SUPPORTED_ISAS,
                       reason="the halves product runs on the AVX-512 kernels, which this CPU or build lacks"),
]
extension = cython_module._cython_lstm

NAMES = ("outputs", "h", "c", "dx", "dh0", "dc0", "dkernel", "drecurrent_kernel", "dbias")


def _arrays(batch, steps, features, units, seed):
    """Inputs, states, weights in PyTorch's layout ([4H, I], [4H, H]), bias, a mask with holes,
    both dropout masks and the output gradient, float32."""
    rng = np.random.default_rng(seed)
    normal = lambda *size, scale=1.0: (rng.normal(size=size) * scale).astype(np.float32)  # noqa: E731
    return dict(
        x=normal(batch, steps, features), h0=normal(batch, units), c0=normal(batch, units),
        weight_ih=normal(4 * units, features, scale=0.2), weight_hh=normal(4 * units, units, scale=0.2),
        bias=normal(4 * units, scale=0.1), mask=rng.random((batch, steps)) < 0.8,
        input_dropout=((rng.random((batch, features)) < 0.8) * 1.25).astype(np.float32),
        recurrent_dropout=((rng.random((batch, units)) < 0.8) * 1.25).astype(np.float32),
        doutputs=normal(batch, steps, units))


def _run(backend, arrays, transposed, masked, reverse):
    """Forward (training) and backward; the nine results as float64 arrays."""
    kernel, recurrent_kernel = arrays["weight_ih"].T, arrays["weight_hh"].T
    if not transposed:
        kernel, recurrent_kernel = np.ascontiguousarray(kernel), np.ascontiguousarray(recurrent_kernel)
    mask = arrays["mask"] if masked else None
    input_dropout = arrays["input_dropout"] if masked else None
    recurrent_dropout = arrays["recurrent_dropout"] if masked else None
    forward = sequence_forward(backend, arrays["x"], arrays["h0"], arrays["c0"], kernel, recurrent_kernel,
                               arrays["bias"], mask, input_dropout, recurrent_dropout, training=True,
                               reverse=reverse)
    grads = backend.sequence_backward(arrays["doutputs"], arrays["h0"] * 0.5, arrays["c0"] * 0.25,
                                      forward.workspace)
    return [np.asarray(value, np.float64) for value in
            (forward.outputs, forward.h, forward.c, grads.dx, grads.dh0, grads.dc0, grads.dkernel,
             grads.drecurrent_kernel, grads.dbias)]


@pytest.mark.parametrize("units", [32, 96, 128])
@pytest.mark.parametrize("transposed", [False, True], ids=["row-major", "transposed"])
@pytest.mark.parametrize("masked", [False, True], ids=["", "mask-dropout"])
@pytest.mark.parametrize("reverse", [False, True], ids=["", "reverse"])
def test_split_teams_and_one_thread_agree_bitwise(units, transposed, masked, reverse, monkeypatch):
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)
    arrays = _arrays(1, 45, 16, units, seed=units)
    results = {}
    for threads in (2, 3):
        monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
        if not cython_module._team(1, units, True)[2]:
            pytest.skip("this build runs one thread (no OpenMP or no OpenBLAS thread control)")
        for split in (False, True):
            with kernel_overrides(cython_isa="avx512", cython_split_units=split, cython_pipeline=False):
                results[threads, split] = _run(cython_module.CythonBackend(), arrays, transposed, masked, reverse)
                assert extension.last_forward_row_halves and extension.last_backward_row_halves
        # The same thread budget shares the backward's products after the time loop alike.
        for name, got, want in zip(NAMES, results[threads, True], results[threads, False]):
            np.testing.assert_array_equal(got, want, err_msg=f"{name}: {threads} threads, split against not")
    for name, got, want in zip(NAMES[:3], results[3, True], results[2, True]):
        np.testing.assert_array_equal(got, want, err_msg=f"{name}: a team of 3 against a team of 2")
    reference = _run(numpy_backend_module.NumpyBackend(), {key: value if value.dtype == bool else
                                                           value.astype(np.float64)
                                                           for key, value in arrays.items()},
                     transposed, masked, reverse)
    for name, got, want in zip(NAMES, results[2, True], reference):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max(), err_msg=name)


def test_the_pipelined_calls_take_the_halves_too(monkeypatch):
    """Batch 1 on one thread's time loop, the projection (forward) or the weight gradients
    (backward) on another: the same numbers."""
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    arrays = _arrays(1, 300, 32, 64, seed=5)
    results = []
    for pipeline in (False, True):
        with kernel_overrides(cython_isa="avx512", cython_split_units=False, cython_pipeline=pipeline):
            results.append(_run(cython_module.CythonBackend(), arrays, False, False, False))
            assert extension.last_forward_row_halves and extension.last_backward_row_halves
            assert extension.last_forward_pipelined == extension.last_backward_pipelined == pipeline
    for name, got, want in zip(NAMES, results[1], results[0]):
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("batch, units, dtype, isa", [
    (2, 64, np.float32, "avx512"),     # two rows: the block kernels
    (1, 48, np.float32, "avx512"),     # H not whole panel pairs
    (1, 64, np.float64, "avx512"),     # BLAS
    (1, 64, np.float32, "avx2"),       # the AVX2 kernels keep one sum over h
])
def test_other_calls_keep_the_whole_product(batch, units, dtype, isa, monkeypatch):
    if isa not in extension.SUPPORTED_ISAS:
        pytest.skip(f"this CPU or build does not run {isa}")
    arrays = {key: value if value.dtype == bool else value.astype(dtype)
              for key, value in _arrays(batch, 30, 8, units, seed=1).items()}
    with kernel_overrides(cython_isa=isa):
        _run(cython_module.CythonBackend(), arrays, False, False, False)
    assert not (extension.last_forward_row_halves or extension.last_backward_row_halves)
