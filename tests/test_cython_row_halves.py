"""The batch-1 recurrent products in halves (cython backend, float32, AVX-512 and AVX2 kernels).

At batch 1 each step's product h(t - 1) @ R (forward) and dz(t) @ R^T (backward) is
summed over two halves apart (``product_in_halves`` in the extension: the halves of h, or the
gate columns of each half of the units): in a two-member unit split a member adds its own
half while the partner's half is still on its way over the barrier, then the other. One
thread, a team of two and a team of three (no overlap) must give bitwise the same numbers
(the backward's products after the time loop with the same thread budget),
for every H the path takes (a multiple of 32: halves of 0 + 32, 32 + 64, 64 + 64 units),
both weight layouts (row-major, and PyTorch's transposed one), masks, dropout, reverse and
the backward, in the fixed order and in the turning orders that keep part of a share
in L1 from step to step, on both kernel families (each with its own piece kernel under
the same order logic); and match the float64 NumPy reference. The extension's
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
    pytest.mark.skipif(cython_module._cython_lstm is None or "avx2" not in cython_module._cython_lstm.SUPPORTED_ISAS,
                       reason="the halves product runs on the AVX-512 or AVX2 kernels, which this CPU or build lacks"),
]
extension = cython_module._cython_lstm

#: The kernel families that run the products in halves, each a parameter of the tests below
#: (skipped where this CPU or build lacks it).
HALVES_ISAS = [pytest.param(isa, marks=pytest.mark.skipif(
    extension is None or isa not in extension.SUPPORTED_ISAS, reason=f"this CPU or build does not run {isa}"))
    for isa in ("avx512", "avx2")]

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


@pytest.mark.parametrize("isa", HALVES_ISAS)
@pytest.mark.parametrize("units", [32, 96, 128])
@pytest.mark.parametrize("transposed", [False, True], ids=["row-major", "transposed"])
@pytest.mark.parametrize("masked", [False, True], ids=["", "mask-dropout"])
@pytest.mark.parametrize("reverse", [False, True], ids=["", "reverse"])
def test_split_teams_and_one_thread_agree_bitwise(isa, units, transposed, masked, reverse, monkeypatch):
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)
    arrays = _arrays(1, 45, 16, units, seed=units)
    results = {}
    for threads in (2, 3):
        monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
        if not cython_module._team(1, units, True)[2]:
            pytest.skip("this build runs one thread (no OpenMP or no OpenBLAS thread control)")
        for split in (False, True):
            with kernel_overrides(cython_isa=isa, cython_split_units=split, cython_pipeline=False):
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


@pytest.fixture
def l1_size():
    """Sets the L1 size the products in halves plan their order with; restores it after."""
    real = extension.halves_l1_size()
    yield lambda size: extension.halves_l1_size(size)
    extension.halves_l1_size(real)


def _turns(units, backward, member):
    order = extension.halves_order(units, backward, member)
    return order["own_turn"] > 0 or order["other_turn"] > 0


@pytest.mark.parametrize("isa", HALVES_ISAS)
@pytest.mark.parametrize("units, size", [
    (64, 16384),    # the members turn (2 of 4 own pieces early)
    (96, 32768),    # both members turn (their shares differ: 32 and 64 units), a whole share does not
    (128, 40960),   # the members turn, keeping no other piece
    (128, None),    # this CPU's L1 (48 KB on the machine the docs measured: members turn)
    (64, None),     # a whole share turns (5 of 8 pairs at 48 KB), a member fits
    (96, None),
])
def test_turning_orders_give_the_fixed_orders_bits(isa, units, size, l1_size, monkeypatch):
    """Each step starting on what the last one read last (lstmeng_halves_order), for a member
    of a two-member split and for a whole share: bitwise the fixed order's results, forward
    and backward, over enough steps for the starts to come round several times, and close to
    the float64 NumPy reference."""
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    if not cython_module._team(1, units, True)[2]:
        pytest.skip("this build runs one thread (no OpenMP or no OpenBLAS thread control)")
    arrays = _arrays(1, 40, 16, units, seed=units + 1)
    results = {}
    for l1 in (0, size if size is not None else extension.L1D_BYTES):
        l1_size(l1)
        if l1:   # the sizes chosen so that something turns: a test that turns nothing proves nothing
            assert any(_turns(units, backward, member) for backward in (False, True) for member in (None, 0, 1))
        for split in (False, True):
            with kernel_overrides(cython_isa=isa, cython_split_units=split, cython_pipeline=False):
                results[l1, split] = _run(cython_module.CythonBackend(), arrays, False, True, False)
                assert extension.last_forward_row_halves and extension.last_backward_row_halves
    fixed = results[0, False]
    for key, got in results.items():
        for name, value, want in zip(NAMES, got, fixed):
            np.testing.assert_array_equal(value, want, err_msg=f"{name}: L1 {key[0]}, split {key[1]}")
    # And all of them against the float64 NumPy reference, not only against each other.
    reference = _run(numpy_backend_module.NumpyBackend(), {key: value if value.dtype == bool else
                                                           value.astype(np.float64)
                                                           for key, value in arrays.items()},
                     False, True, False)
    for name, got, want in zip(NAMES, fixed, reference):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max(), err_msg=name)


def test_the_order_keeps_what_fits_in_l1(l1_size):
    """The planned orders at a 48 KB L1 (what the docs' measurements used), and none without
    room or where too little of a share would stay."""
    l1_size(48 * 1024)
    # A member of a two-member split at H = 128: 8 own pieces of 8 KB (R), 4 of them before the
    # barrier and 1 other piece kept (40 KB); the backward's R^T: 2 pieces of 32 KB, 1 early.
    for member in (0, 1):
        assert extension.halves_order(128, False, member) == {"pieces": 8, "early": 4, "own_turn": 4,
                                                              "other_turn": 1}
        assert extension.halves_order(128, True, member) == {"pieces": 2, "early": 1, "own_turn": 1,
                                                             "other_turn": 0}
    # A whole share of H = 64 (8 pairs of 8 KB) turns 5 pairs; at H = 128 2 of 16 pairs would stay:
    # under a quarter, so one fixed order, as for a member at H = 256 and a member that fits.
    assert extension.halves_order(64, False) == {"pieces": 8, "early": 8, "own_turn": 5, "other_turn": 0}
    for units, member in ((128, None), (256, 0), (64, 0)):
        order = extension.halves_order(units, False, member)
        assert order["own_turn"] == order["other_turn"] == 0 and order["early"] == order["pieces"]
    assert extension.halves_order(128, False, 0, l1_size=0)["own_turn"] == 0
    with pytest.raises(ValueError, match="size must be >= 0"):
        extension.halves_l1_size(-1)
    with pytest.raises(ValueError, match="member must be"):
        extension.halves_order(128, False, 2)


@pytest.mark.parametrize("isa", HALVES_ISAS)
def test_the_pipelined_calls_take_the_halves_too(isa, monkeypatch):
    """Batch 1 on one thread's time loop, the projection (forward) or the weight gradients
    (backward, AVX-512) on another: the same numbers."""
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    arrays = _arrays(1, 300, 32, 64, seed=5)
    results = []
    for pipeline in (False, True):
        with kernel_overrides(cython_isa=isa, cython_split_units=False, cython_pipeline=pipeline):
            results.append(_run(cython_module.CythonBackend(), arrays, False, False, False))
            assert extension.last_forward_row_halves and extension.last_backward_row_halves
            assert extension.last_forward_pipelined == pipeline
            # The backward pipelines its weight gradients on the packed AVX-512 kernels only.
            assert extension.last_backward_pipelined == (pipeline and isa == "avx512")
    for name, got, want in zip(NAMES, results[1], results[0]):
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("batch, units, dtype, isa", [
    (2, 64, np.float32, "avx512"),     # two rows: the block kernels
    (1, 48, np.float32, "avx512"),     # H not whole panel pairs
    (1, 64, np.float64, "avx512"),     # BLAS
    (2, 64, np.float32, "avx2"),
    (1, 48, np.float32, "avx2"),
    (1, 64, np.float32, "scalar"),     # BLAS for every product
])
def test_other_calls_keep_the_whole_product(batch, units, dtype, isa, monkeypatch):
    if isa not in extension.SUPPORTED_ISAS:
        pytest.skip(f"this CPU or build does not run {isa}")
    arrays = {key: value if value.dtype == bool else value.astype(dtype)
              for key, value in _arrays(batch, 30, 8, units, seed=1).items()}
    with kernel_overrides(cython_isa=isa):
        _run(cython_module.CythonBackend(), arrays, False, False, False)
    assert not (extension.last_forward_row_halves or extension.last_backward_row_halves)
