"""The cython backend's pipelined calls: one thread runs a one-part time loop while another
does the products that do not depend on it.

Forward: the input projection of the chunks of steps ahead (any dtype and ISA).
Backward: the weight gradients and dx of the rows whose dz is final (float32, AVX-512
path). Both apply to a one-part call without a unit split (batch 1 when the split is off
or has lost, small layers, batches under two parts) and must give bitwise the numbers of
the one-thread order (``kernel_overrides(cython_pipeline=False)``): a forward chunk's
projection is the same computation whichever thread runs it; each chunk of the weight
gradients is summed on its own and the chunks added in the order the unpipelined backward
accumulates them. Checked on every layout they meet (batch 1 reading x in place, batches
whose inputs are copied, right-padded and holed masks, reverse, both dropouts, no dx,
several chunks), with the extension's ``last_forward_pipelined`` and
``last_backward_pipelined`` confirming which path ran.

Also here, as the other place where a backward's dx is computed: whole parts (no unit
split, not pipelined) compute each step's dx in the time loop right after its dz
(``last_backward_dx_in_loop``), float32 on the AVX-512 and AVX2 kernels. On AVX-512 that
is bitwise the pipelined backward's dx (the unpipelined side of the comparison above runs
it at batch 3); on both families it matches the NumPy reference in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

from lstmeng.testing import kernel_overrides

from _backends import sequence_forward

cython_module = pytest.importorskip("lstmeng.backends.cython")
pytestmark = pytest.mark.skipif(cython_module._cython_lstm is None, reason="the cython extension is not built")
extension = cython_module._cython_lstm
#: The pipelined backward runs on the AVX-512 path only (the forward's on every ISA).
needs_avx512 = pytest.mark.skipif(
    extension is None or "avx512" not in extension.SUPPORTED_ISAS,
    reason="the pipelined backward runs on the AVX-512 kernels, which this CPU or build lacks")

GRADIENTS = ("dx", "dh0", "dc0", "dkernel", "drecurrent_kernel", "dbias")


@pytest.fixture
def idle_machine(monkeypatch):
    """Two threads, any call size threaded, and the busy-machine rule never engaged: at
    these tiny sizes a helper thread's wake-up can be a tenth of a call, which the rule
    would count as time lost (and then stop pipelining)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)
    monkeypatch.setattr(cython_module._UnitSplitGovernor, "allow", lambda self: True)


def _gradients(backend, arrays, options, *, pipeline, input_grad):
    """(name -> gradient, whether the backward ran pipelined) of one training call."""
    x, h0, c0, kernel, recurrent_kernel, bias, mask, input_dropout, recurrent_dropout, doutputs = arrays
    with kernel_overrides(cython_isa="avx512", cython_split_units=False, cython_pipeline=pipeline):
        forward = sequence_forward(backend, x, h0, c0, kernel, recurrent_kernel, bias, mask, input_dropout,
                                   recurrent_dropout, training=True, **options)
        grads = backend.sequence_backward(doutputs, h0 * 0.5, c0 * 0.25, forward.workspace,
                                          input_grad=input_grad)
    return {name: getattr(grads, name) for name in GRADIENTS}, extension.last_backward_pipelined


def _arrays(shape, mask_kind, dropout, seed):
    batch, steps, features, units = shape
    rng = np.random.default_rng(seed)
    normal = lambda *size, scale=1.0: (rng.normal(size=size) * scale).astype(np.float32)  # noqa: E731
    if mask_kind == "none":
        mask = None
    elif mask_kind == "right-padded":
        lengths = rng.integers(1, steps + 1, size=batch)
        lengths[0] = steps
        mask = np.arange(steps)[None, :] < lengths[:, None]
    else:  # holes: the general masked path
        mask = rng.random((batch, steps)) < 0.8
    input_dropout = ((rng.random((batch, features)) < 0.8) * 1.25).astype(np.float32) if dropout else None
    recurrent_dropout = ((rng.random((batch, units)) < 0.8) * 1.25).astype(np.float32) if dropout else None
    return (normal(batch, steps, features), normal(batch, units), normal(batch, units),
            normal(features, 4 * units, scale=0.2), normal(units, 4 * units, scale=0.2),
            normal(4 * units, scale=0.1), mask, input_dropout, recurrent_dropout,
            normal(batch, steps, units))


@needs_avx512
@pytest.mark.parametrize("shape", [(1, 300, 32, 64), (1, 700, 64, 32), (3, 200, 32, 64), (5, 120, 0, 32)],
                         ids=["batch1", "batch1-3-chunks", "batch3", "no-inputs"])
@pytest.mark.parametrize("mask_kind", ["none", "right-padded", "holes"])
@pytest.mark.parametrize("dropout", [False, True], ids=["", "dropout"])
@pytest.mark.parametrize("reverse", [False, True], ids=["", "reverse"])
@pytest.mark.parametrize("input_grad", [True, False], ids=["dx", "no-dx"])
def test_pipelined_backward_gives_the_same_numbers(shape, mask_kind, dropout, reverse, input_grad, idle_machine):
    backend = cython_module.CythonBackend()
    arrays = _arrays(shape, mask_kind, dropout, seed=sum(shape))
    options = {"reverse": reverse, "zero_output_for_mask": True}
    expected, pipelined = _gradients(backend, arrays, options, pipeline=False, input_grad=input_grad)
    assert not pipelined
    # Batch 3 without a row alone at any step: the unpipelined side computed dx in its time
    # loop, so this also compares that with the pipelined dx shares.
    assert extension.last_backward_dx_in_loop == (input_grad and shape[0] == 3 and mask_kind != "right-padded")
    actual, pipelined = _gradients(backend, arrays, options, pipeline=None, input_grad=input_grad)
    assert pipelined, "the backward should have run pipelined"
    for name in GRADIENTS:
        if expected[name] is None:
            assert actual[name] is None, name
        else:
            np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


@needs_avx512
def test_pipelined_backward_agrees_with_the_reference(idle_machine):
    """Not only self-consistent: the pipelined gradients match the NumPy reference backend."""
    arrays = _arrays((2, 400, 32, 32), "right-padded", True, seed=7)
    actual, pipelined = _gradients(cython_module.CythonBackend(), arrays, {}, pipeline=None, input_grad=True)
    assert pipelined
    reference = _float64_reference_gradients(arrays, {})
    for name in GRADIENTS:
        want = reference[name]
        np.testing.assert_allclose(actual[name], want, rtol=2e-4, atol=2e-4 * np.abs(want).max(), err_msg=name)


def test_pipeline_is_skipped_where_it_does_not_apply(monkeypatch):
    """A unit split, a batch of two parts, float64 or a single chunk run the usual path."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)
    backend = cython_module.CythonBackend()
    for shape, split, dtype in (((1, 300, 32, 64), True, np.float32), ((40, 20, 32, 32), None, np.float32),
                                ((1, 300, 32, 64), False, np.float64), ((1, 100, 32, 64), False, np.float32)):
        x, h0, c0, kernel, recurrent_kernel, bias, *_, doutputs = (
            array if array is None else array.astype(dtype) for array in _arrays(shape, "none", False, 1))
        with kernel_overrides(cython_split_units=split):
            forward = sequence_forward(backend, x, h0, c0, kernel, recurrent_kernel, bias, training=True)
            backend.sequence_backward(doutputs, h0, c0, forward.workspace)
        assert not extension.last_backward_pipelined, (shape, split, dtype)


def _float64_reference_gradients(arrays, options):
    """The NumPy reference backend's gradients of ``arrays`` in float64 (``_gradients``' call)."""
    from lstmeng.backends import numpy as numpy_backend_module

    mask = arrays[6]
    x, h0, c0, kernel, recurrent_kernel, bias, _, input_dropout, recurrent_dropout, doutputs = (
        array if array is None or array is mask else np.asarray(array, np.float64) for array in arrays)
    reference = numpy_backend_module.NumpyBackend()
    forward = sequence_forward(reference, x, h0, c0, kernel, recurrent_kernel, bias, mask, input_dropout,
                               recurrent_dropout, training=True, **options)
    grads = reference.sequence_backward(doutputs, h0 * 0.5, c0 * 0.25, forward.workspace)
    return {name: getattr(grads, name) for name in GRADIENTS}


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("mask_kind", ["none", "right-padded", "holes"])
@pytest.mark.parametrize("dropout", [False, True], ids=["", "dropout"])
@pytest.mark.parametrize("reverse", [False, True], ids=["", "reverse"])
def test_dx_in_the_time_loop_agrees_with_the_reference(isa, mask_kind, dropout, reverse, idle_machine):
    """Two parts of 20 rows (rows in length order where right-padded, so a step's rows are
    not the batch's in order), through the input dropout mask: dx and the other gradients
    match the float64 NumPy reference."""
    if isa not in extension.SUPPORTED_ISAS:
        pytest.skip(f"this CPU or build lacks the {isa} kernels")
    arrays = list(_arrays((40, 30, 32, 32), mask_kind, dropout, seed=11))
    if mask_kind == "right-padded":   # every step keeps at least two rows per part
        arrays[6][:8] = True
    options = {"reverse": reverse, "zero_output_for_mask": True}
    backend = cython_module.CythonBackend()
    x, h0, c0, kernel, recurrent_kernel, bias, mask, input_dropout, recurrent_dropout, doutputs = arrays
    with kernel_overrides(cython_isa=isa, cython_split_units=False):
        forward = sequence_forward(backend, x, h0, c0, kernel, recurrent_kernel, bias, mask, input_dropout,
                                   recurrent_dropout, training=True, **options)
        grads = backend.sequence_backward(doutputs, h0 * 0.5, c0 * 0.25, forward.workspace)
    assert extension.last_backward_dx_in_loop
    reference = _float64_reference_gradients(arrays, options)
    for name in GRADIENTS:
        want = reference[name]
        np.testing.assert_allclose(getattr(grads, name), want, rtol=2e-4, atol=2e-4 * np.abs(want).max(),
                                   err_msg=name)


def test_dx_in_the_time_loop_is_skipped_where_it_does_not_apply(idle_machine):
    """A step of one row, a unit split, float64, inputs not a multiple of 32, no dx wanted, the
    scalar kernels: dx is computed after the loop (or not at all)."""
    backend = cython_module.CythonBackend()
    cases = (((1, 300, 32, 64), {"cython_split_units": False, "cython_pipeline": False}, np.float32, True),
             ((1, 300, 32, 64), {"cython_split_units": True}, np.float32, True),
             ((40, 30, 32, 32), {}, np.float64, True),
             ((40, 30, 24, 32), {}, np.float32, True),
             ((40, 30, 32, 32), {}, np.float32, False),
             ((40, 30, 32, 32), {"cython_isa": "scalar"}, np.float32, True))
    for shape, overrides, dtype, input_grad in cases:
        x, h0, c0, kernel, recurrent_kernel, bias, *_, doutputs = (
            array if array is None else array.astype(dtype) for array in _arrays(shape, "none", False, 1))
        with kernel_overrides(**overrides):
            forward = sequence_forward(backend, x, h0, c0, kernel, recurrent_kernel, bias, training=True)
            backend.sequence_backward(doutputs, h0, c0, forward.workspace, input_grad=input_grad)
        assert not extension.last_backward_dx_in_loop, (shape, overrides, dtype, input_grad)
    # And the same call as the first two parts' case does take it.
    x, h0, c0, kernel, recurrent_kernel, bias, *_, doutputs = _arrays((40, 30, 32, 32), "none", False, 1)
    forward = sequence_forward(backend, x, h0, c0, kernel, recurrent_kernel, bias, training=True)
    backend.sequence_backward(doutputs, h0, c0, forward.workspace)
    assert extension.last_backward_dx_in_loop == (extension.isa() != "scalar")


def test_pipeline_items_follow_the_time_loop():
    """Items come in the order the loop finishes their rows: from the last packed row down
    for a forward-direction layer, from the first up for a reversed one."""
    items, thresholds = extension.pipeline_items(600, 3, 2, 2, False)
    kinds, firsts, ends, blocks = items
    assert list(thresholds) == sorted(thresholds)
    assert thresholds[0] == 600 - 512 and list(firsts[:2]) == [512, 512] and list(blocks[:2]) == [0, 1]
    assert sorted(zip(firsts[kinds == 1], ends[kinds == 1])) == [(0, 300), (300, 600)]
    items, thresholds = extension.pipeline_items(600, 3, 2, 0, True)
    assert list(items[1][:2]) == [0, 0] and thresholds[0] == 256 and (items[0] == 0).all()


FORWARD_RESULTS = ("outputs", "h", "c")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("shape", [(1, 200, 32, 64), (5, 70, 24, 40), (3, 100, 0, 32)],
                         ids=["batch1", "batch5", "no-inputs"])
@pytest.mark.parametrize("mask_kind", ["none", "right-padded", "holes"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_pipelined_forward_gives_the_same_numbers(dtype, isa, shape, mask_kind, training, idle_machine):
    """Outputs and final states, and in training the whole backward of the two workspaces."""
    if isa not in extension.SUPPORTED_ISAS:
        pytest.skip(f"this CPU or build does not run {isa}")
    backend = cython_module.CythonBackend()
    arrays = [None if array is None or array.dtype == bool else array.astype(dtype)
              for array in _arrays(shape, mask_kind, True, seed=sum(shape))]
    arrays[6] = _arrays(shape, mask_kind, True, seed=sum(shape))[6]
    x, h0, c0, kernel, recurrent_kernel, bias, mask, input_dropout, recurrent_dropout, doutputs = arrays
    results = []
    for pipeline in (False, None):
        for reverse in (False, True):
            with kernel_overrides(cython_isa=isa, cython_split_units=False, cython_pipeline=pipeline):
                forward = sequence_forward(backend, x, h0, c0, kernel, recurrent_kernel, bias, mask,
                                           input_dropout, recurrent_dropout, training=training, reverse=reverse)
                assert extension.last_forward_pipelined == (pipeline is None), (pipeline, reverse)
                got = [getattr(forward, name) for name in FORWARD_RESULTS]
                if training:
                    grads = backend.sequence_backward(doutputs, h0, c0, forward.workspace)
                    got += [getattr(grads, name) for name in GRADIENTS]
            results.append(got)
    for expected, actual in zip(results[:2], results[2:]):
        for name, want, got in zip(FORWARD_RESULTS + GRADIENTS, expected, actual):
            np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("reverse", [False, True], ids=["", "reverse"])
def test_pipelined_forward_agrees_with_the_reference(training, reverse, idle_machine):
    """Not only self-consistent: a pipelined forward's outputs and final states match the NumPy
    reference backend (more chunks than slots, so the slots are reused)."""
    from lstmeng.backends import numpy as numpy_backend_module

    arrays = _arrays((3, 300, 24, 40), "right-padded", True, seed=11)
    x, h0, c0, kernel, recurrent_kernel, bias, mask, input_dropout, recurrent_dropout, _ = arrays
    with kernel_overrides(cython_split_units=False):
        actual = sequence_forward(cython_module.CythonBackend(), x, h0, c0, kernel, recurrent_kernel, bias, mask,
                                  input_dropout, recurrent_dropout, training=training, reverse=reverse)
    assert extension.last_forward_pipelined
    as64 = [None if a is None else np.asarray(a, np.float64)
            for a in (x, h0, c0, kernel, recurrent_kernel, bias, input_dropout, recurrent_dropout)]
    expected = sequence_forward(numpy_backend_module.NumpyBackend(), *as64[:6], mask, *as64[6:],
                                training=training, reverse=reverse)
    for name in FORWARD_RESULTS:
        np.testing.assert_allclose(getattr(actual, name), getattr(expected, name), rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def test_busy_machine_stops_the_pipeline(monkeypatch):
    """While the busy-machine rule holds (a split or a pipelined call lost time waiting for a
    thread another process kept off its core), one-part calls run on one thread; a pipelined
    call reports its chunks and waits to that rule."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)
    records = []
    original_record = cython_module._UnitSplitGovernor.record
    monkeypatch.setattr(cython_module._UnitSplitGovernor, "record",
                        lambda self, *args: (records.append(args), original_record(self, *args)))
    backend = cython_module.CythonBackend()
    x, h0, c0, kernel, recurrent_kernel, bias, *_, doutputs = _arrays((1, 300, 32, 64), "none", False, 3)
    with kernel_overrides(cython_split_units=False):
        forward = sequence_forward(backend, x, h0, c0, kernel, recurrent_kernel, bias, training=True)
        assert extension.last_forward_pipelined
        chunks, slow_seconds, _ = records[-1]
        assert chunks == -(-300 // cython_module.SPLIT_CHUNK_STEPS) and slow_seconds >= 0
        backend.sequence_backward(doutputs, h0, c0, forward.workspace)
        backend._split_governor._skip = 2       # as after a call that lost
        forward = sequence_forward(backend, x, h0, c0, kernel, recurrent_kernel, bias, training=True)
        assert not extension.last_forward_pipelined and forward.workspace.busy
        backend.sequence_backward(doutputs, h0, c0, forward.workspace)
        assert not extension.last_backward_pipelined
