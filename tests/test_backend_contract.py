"""The backend contract's own objects (lstmeng/backends/base.py): SequenceOptions and Workspace."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import lstmeng as le
from lstmeng import testing
from lstmeng.backends import registry
from lstmeng.backends.base import ACTIVATIONS, RECURRENT_ACTIVATIONS, SequenceOptions, Workspace

from _backends import sequence_forward


def test_options_are_frozen_hashable_and_equal_by_value():
    first = SequenceOptions(activation="relu", reverse=True, training=True)
    again = SequenceOptions(activation="relu", reverse=np.bool_(True), training=True)
    assert first == again and hash(first) == hash(again)
    assert type(again.reverse) is bool   # np.bool_ is stored as bool: one key, plain constants
    assert len({first, again, dataclasses.replace(first, reverse=False)}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.reverse = False


def test_for_call_derives_the_presence_flags_from_the_arrays():
    array = np.zeros(3)
    options = SequenceOptions.for_call(bias=array, mask=None, input_dropout_mask=array,
                                       recurrent_dropout_mask=None, training=1, return_sequences=0)
    assert (options.has_bias, options.has_mask, options.has_input_dropout, options.has_recurrent_dropout) == (
        True, False, True, False)
    assert options.training is True and options.return_sequences is False
    options.check_arrays(array, None, array, None)
    with pytest.raises(ValueError, match=r"mask is an array but SequenceOptions.has_mask is False"):
        options.check_arrays(array, np.ones((2, 2), bool), array, None)
    with pytest.raises(ValueError, match=r"bias is None but SequenceOptions.has_bias is True"):
        options.check_arrays(None, None, array, None)


def test_for_call_shares_one_options_object_per_combination():
    """for_call builds each combination once (the options are frozen, so sharing is safe); any
    differing field or flag gives other options, and activations outside the table still raise."""
    array = np.zeros(3)

    def options(**changes):
        arguments = dict(bias=array, mask=None, input_dropout_mask=None, recurrent_dropout_mask=None,
                         activation="relu", training=True)
        return SequenceOptions.for_call(**{**arguments, **changes})

    first = options()
    assert options(bias=np.ones(2)) is first   # presence, not the array, counts
    assert options() == SequenceOptions(activation="relu", training=True, has_bias=True)
    others = [options(bias=None), options(mask=array), options(input_dropout_mask=array),
              options(recurrent_dropout_mask=array), options(activation="tanh"),
              options(recurrent_activation="hard_sigmoid"), options(reverse=True),
              options(zero_output_for_mask=True), options(return_sequences=False), options(training=False)]
    assert len({first, *others}) == 1 + len(others)
    for bad in ("softmax", ["relu"]):   # a name outside the table, an unhashable value
        with pytest.raises(ValueError, match="SequenceOptions.activation must be one of"):
            options(activation=bad)


@pytest.mark.parametrize("field,value,allowed", [
    ("activation", "hard_sigmoid", ACTIVATIONS), ("activation", "softmax", ACTIVATIONS),
    ("recurrent_activation", "tanh", RECURRENT_ACTIVATIONS)])
def test_options_refuse_activations_outside_the_table(field, value, allowed):
    with pytest.raises(ValueError, match=rf"SequenceOptions.{field} must be one of .*got '{value}'"):
        SequenceOptions(**{field: value})


def test_options_refuse_non_bool_flags():
    with pytest.raises(ValueError, match=r"SequenceOptions.training must be a bool, got 'yes'"):
        SequenceOptions(training="yes")


@pytest.mark.parametrize("backend_name", ["numpy", "cython", "tensorflow", "numba_cuda"])
def test_backends_refuse_options_that_disagree_with_the_arrays(backend_name):
    backend, info = registry._entry(backend_name)
    if backend is None:
        pytest.skip(f"{backend_name} unavailable: {info.reason}")
    rng = np.random.default_rng(0)
    x, zeros = rng.normal(size=(2, 3, 2)), np.zeros((2, 4))
    kernel, recurrent_kernel, bias = rng.normal(size=(2, 16)), rng.normal(size=(4, 16)), np.zeros(16)
    claims_no_bias = SequenceOptions(has_bias=False)
    with pytest.raises(ValueError, match="has_bias"):
        backend.sequence_forward(x, zeros, zeros, kernel, recurrent_kernel, bias, None, None, None, claims_no_bias)
    # The same call with options built from its arrays runs.
    assert sequence_forward(backend, x, zeros, zeros, kernel, recurrent_kernel, bias).outputs.shape == (2, 3, 4)


def test_cell_forward_takes_the_options_of_one_step():
    backend = registry.get_backend_object("numpy")
    rng = np.random.default_rng(1)
    x, zeros = rng.normal(size=(2, 2)), np.zeros((2, 4))
    kernel, recurrent_kernel = rng.normal(size=(2, 16)), rng.normal(size=(4, 16))
    with pytest.raises(ValueError, match="return_sequences"):
        backend.cell_forward(x, zeros, zeros, kernel, recurrent_kernel, None, None, None,
                             SequenceOptions(has_bias=False, return_sequences=True))


def test_workspace_consume_marks_it_used_once():
    workspace = Workspace(SequenceOptions(training=True))
    assert not workspace.consumed
    workspace.consume("mine")
    assert workspace.consumed
    with pytest.raises(RuntimeError, match="backend 'mine': this workspace was already used by a backward"):
        workspace.consume("mine")


@pytest.mark.parametrize("backend_name", ["numpy", "cython", "tensorflow", "numba_cuda"])
def test_every_backend_backpropagates_a_workspace_once(backend_name):
    """The contract's rule, on each built-in backend (the conformance suite checks it on every case)."""
    if registry._entry(backend_name)[0] is None:
        pytest.skip(f"{backend_name} unavailable")
    case = testing.conformance_cases(dtypes=("float64",), cases_per_dtype=1)[0]
    testing.check_single_backward(backend_name, case)


def test_bidirectional_checks_both_gradients_before_either_direction_consumes_its_workspace():
    layer = le.Bidirectional(le.LSTM(3, return_sequences=True, seed=0, backend="numpy"), merge_mode=None)
    x = np.random.default_rng(2).normal(size=(2, 4, 5)).astype("float32")
    y_forward, y_backward = layer(x, training=True)
    with pytest.raises(ValueError, match=r"dy\[1\] must have shape \(2, 4, 3\), got \(2, 4, 1\)"):
        layer.backward([np.ones_like(y_forward), np.ones((2, 4, 1), "float32")])
    # Nothing was consumed: the backward with good gradients runs.
    assert layer.backward([np.ones_like(y_forward), np.ones_like(y_backward)]).shape == x.shape


@pytest.mark.parametrize("backend_name", ["numpy", "cython", "tensorflow", "numba_cuda"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 12, 32, 8)], ids=["small", "packed-dx"])
def test_backward_without_input_grad_skips_dx_and_keeps_the_other_gradients(backend_name, dtype, shape):
    """``input_grad=False``: dx is None, every other gradient as with dx (masks, input and
    recurrent dropout, reverse). The second shape reaches the cython backend's packed dx
    product (I a multiple of 32, enough rows) on AVX-512 machines."""
    if backend_name == "numba_cuda" and shape[1] > 5:
        pytest.skip("the packed-dx shape is for the cython backend (20 s under the CUDA simulator)")
    backend, info = registry._entry(backend_name)
    if backend is None:
        pytest.skip(f"{backend_name} unavailable: {info.reason}")
    batch, steps, features, units = shape
    rng = np.random.default_rng(3)
    arrays = [rng.normal(size=size).astype(dtype) * scale for size, scale in [
        ((batch, steps, features), 1), ((batch, units), 1), ((batch, units), 1),
        ((features, 4 * units), 0.3), ((units, 4 * units), 0.3), ((4 * units,), 0.1)]]
    lengths = rng.integers(1, steps + 1, size=batch)
    mask = np.arange(steps)[None, :] < lengths[:, None]
    input_dropout = (rng.random((batch, features)) < 0.8).astype(dtype) / dtype_scale(dtype, 0.8)
    recurrent_dropout = (rng.random((batch, units)) < 0.8).astype(dtype) / dtype_scale(dtype, 0.8)
    doutputs = rng.normal(size=(batch, steps, units)).astype(dtype)
    dh, dc = rng.normal(size=(2, batch, units)).astype(dtype)
    grads = {}
    for input_grad in (True, False):
        forward = sequence_forward(backend, *arrays, mask, input_dropout, recurrent_dropout, training=True,
                                   reverse=True)
        grads[input_grad] = backend.sequence_backward(doutputs, dh, dc, forward.workspace,
                                                      input_grad=input_grad)
    assert grads[False].dx is None
    assert np.asarray(grads[True].dx).shape == (batch, steps, features)
    for name in ("dh0", "dc0", "dkernel", "drecurrent_kernel", "dbias"):
        np.testing.assert_array_equal(np.asarray(getattr(grads[False], name)),
                                      np.asarray(getattr(grads[True], name)), err_msg=name)


@pytest.mark.parametrize("backend_name", ["numpy", "cython", "tensorflow", "numba_cuda"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("method", ["sequence_backward_gates", "sequence_backward"])
def test_backward_without_state_grads_gives_none_for_them_and_keeps_the_rest(backend_name, dtype, steps, method):
    """``sequence_backward_gates(state_grads=False)`` and ``sequence_backward(state_grads=False)``
    (a layer called without initial states): dh0 and dc0 are None, every other result (dx,
    dgates or the weight gradients) as with them: one-step calls (a cell step on detached states)
    and sequences with a mask, dropout and reverse (where only the product reaching dh0 may be
    skipped)."""
    backend, info = registry._entry(backend_name)
    if backend is None:
        pytest.skip(f"{backend_name} unavailable: {info.reason}")
    batch, features, units = 3, 4, 5
    rng = np.random.default_rng(steps)
    arrays = [rng.normal(size=size).astype(dtype) * scale for size, scale in [
        ((batch, steps, features), 1), ((batch, units), 1), ((batch, units), 1),
        ((features, 4 * units), 0.3), ((units, 4 * units), 0.3), ((4 * units,), 0.1)]]
    extras, flags = (), {}
    if steps > 1:
        mask = np.arange(steps)[None, :] < rng.integers(1, steps + 1, size=batch)[:, None]
        recurrent_dropout = (rng.random((batch, units)) < 0.8).astype(dtype) / dtype_scale(dtype, 0.8)
        extras, flags = (mask, None, recurrent_dropout), {"reverse": True}
    doutputs = rng.normal(size=(batch, steps, units)).astype(dtype)
    dh, dc = rng.normal(size=(2, batch, units)).astype(dtype)
    grads = {}
    for state_grads in (True, False):
        forward = sequence_forward(backend, *arrays, *extras, training=True, return_sequences=True, **flags)
        grads[state_grads] = getattr(backend, method)(doutputs, dh, dc, forward.workspace, state_grads=state_grads)
    assert grads[False].dh0 is None and grads[False].dc0 is None
    if method == "sequence_backward":
        assert grads[False].dgates is None and grads[False].dkernel is not None
    assert np.asarray(grads[True].dh0).shape == np.asarray(grads[True].dc0).shape == (batch, units)
    for name in ("dx", "dkernel", "drecurrent_kernel", "dbias", "dgates"):
        got, want = getattr(grads[False], name), getattr(grads[True], name)
        assert (got is None) == (want is None), name
        if want is not None:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)


def dtype_scale(dtype, keep):
    """``keep`` in ``dtype``: the inverted-dropout scale of the masks above."""
    return np.asarray(keep, dtype)


def test_cell_inference_step_default_calls_cell_forward():
    """The contract's default step function gives cell_forward's h and c (the NumPy backend keeps
    the default) and takes only the options of one inference step without mask or dropout."""
    backend = registry.get_backend_object("numpy")
    rng = np.random.default_rng(4)
    x, h, c = rng.normal(size=(2, 3)), rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    kernel, recurrent_kernel, bias = rng.normal(size=(3, 16)), rng.normal(size=(4, 16)), rng.normal(size=16)
    options = SequenceOptions(return_sequences=False)
    step = backend.cell_inference_step(kernel, recurrent_kernel, options)
    want = backend.cell_forward(x, h, c, kernel, recurrent_kernel, bias, None, None, options)
    for got, expected in zip(step(x, h, c, bias), (want.h, want.c)):
        np.testing.assert_array_equal(got, expected)
    for changes in ({"training": True}, {"has_mask": True}, {"return_sequences": True},
                    {"has_input_dropout": True}, {"has_recurrent_dropout": True}):
        with pytest.raises(ValueError, match="cell_inference_step takes the options of one inference step"):
            backend.cell_inference_step(kernel, recurrent_kernel, dataclasses.replace(options, **changes))


def test_cell_training_step_default_calls_cell_forward():
    """The contract's default training step function gives cell_forward's h, c and a workspace
    that cell_backward takes as cell_forward's (the NumPy backend keeps the default), and takes
    only the options of one training step without mask or dropout."""
    backend = registry.get_backend_object("numpy")
    rng = np.random.default_rng(5)
    x, h, c = rng.normal(size=(2, 3)), rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    kernel, recurrent_kernel, bias = rng.normal(size=(3, 16)), rng.normal(size=(4, 16)), rng.normal(size=16)
    dh, dc = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    options = SequenceOptions(return_sequences=False, training=True)
    step = backend.cell_training_step(kernel, recurrent_kernel, options)
    got_h, got_c, workspace = step(x, h, c, bias)
    want = backend.cell_forward(x, h, c, kernel, recurrent_kernel, bias, None, None, options)
    for got, expected in zip((got_h, got_c), (want.h, want.c)):
        np.testing.assert_array_equal(got, expected)
    got_grads, want_grads = backend.cell_backward(dh, dc, workspace), backend.cell_backward(dh, dc, want.workspace)
    for field in ("dx", "dh0", "dc0", "dkernel", "drecurrent_kernel", "dbias"):
        np.testing.assert_array_equal(getattr(got_grads, field), getattr(want_grads, field), err_msg=field)
    for changes in ({"training": False}, {"has_mask": True}, {"return_sequences": True},
                    {"has_input_dropout": True}, {"has_recurrent_dropout": True}):
        with pytest.raises(ValueError, match="cell_training_step takes the options of one training step"):
            backend.cell_training_step(kernel, recurrent_kernel, dataclasses.replace(options, **changes))


def test_inference_step_slot_keeps_one_step_per_identity_and_copies_empty():
    """The slot makes a step again only when the backend, either weight key or the options are
    other objects; copies and pickles of it (and so of the cell that owns it) start empty."""
    import copy
    import pickle

    from lstmeng.backends.base import InferenceStepSlot

    slot, made = InferenceStepSlot(), []
    backend, kernel, recurrent_kernel = object(), np.zeros(3), np.zeros(3)
    options = SequenceOptions(return_sequences=False)

    def make():
        made.append(len(made))
        return made[-1]

    assert slot.step(backend, kernel, recurrent_kernel, options, make) == 0
    assert slot.step(backend, kernel, recurrent_kernel, options, make) == 0
    assert slot.step(backend, np.zeros(3), recurrent_kernel, options, make) == 1          # equal, not the same
    assert slot.step(backend, kernel, recurrent_kernel, SequenceOptions(return_sequences=False), make) == 2
    assert slot.step(object(), kernel, recurrent_kernel, options, make) == 3
    assert copy.deepcopy(slot).entry is None and pickle.loads(pickle.dumps(slot)).entry is None
    assert slot.entry is not None
