"""LSTM's public two-phase call (plan/run, plan_backprop/run_backprop), clone(), and Bidirectional
built on them without touching the layers the caller passed."""

from __future__ import annotations

import numpy as np
import pytest

import lstmeng as le


def _inputs(batch=3, steps=5, features=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, steps, features)).astype(np.float32), np.array([5, 3, 1])


def test_call_is_plan_then_run():
    x, lengths = _inputs()
    a = le.LSTM(6, return_sequences=True, go_backwards=True, dropout=0.2, seed=3, backend="numpy")
    b = a.clone()
    y_call = a(x, lengths=lengths, training=True)
    y_run, h, c = b.run(b.plan(x, lengths=lengths), training=True)
    np.testing.assert_array_equal(y_call, y_run)
    np.testing.assert_array_equal(a.last_states[0], h)
    dy = np.random.default_rng(1).normal(size=y_call.shape).astype(np.float32)
    dx_call = a.backward(dy)
    grads = b.run_backprop(b.plan_backprop(dy))
    np.testing.assert_array_equal(dx_call, grads.dx)
    for name in a.grads:
        np.testing.assert_array_equal(a.grads[name], b.grads[name])


def test_plan_changes_nothing():
    x, lengths = _inputs()
    layer = le.LSTM(6, dropout=0.3, recurrent_dropout=0.3, seed=2, backend="numpy")
    rng_state = layer._rng.bit_generator.state
    plan = layer.plan(x, lengths=lengths, build=False)
    assert not layer.built and layer._rng.bit_generator.state == rng_state and len(layer._tapes) == 0
    assert (plan.batch, plan.steps) == (3, 5) and plan.mask.shape == (3, 5)
    layer.plan(x)   # build=True builds, still runs nothing
    assert layer.built and len(layer._tapes) == 0 and layer.last_states is None


def test_plan_backprop_checks_and_consumes_nothing():
    x, _ = _inputs()
    layer = le.LSTM(6, return_sequences=True, seed=0, backend="numpy")
    y = layer(x, training=True)
    with pytest.raises(ValueError, match="dstates\\[1\\]"):
        layer.plan_backprop(np.ones_like(y), None, np.ones((2, 6), np.float32), state_arguments=("dstates[0]",
                                                                                                "dstates[1]"))
    assert len(layer._tapes) == 1
    plan = layer.plan_backprop(np.ones_like(y))
    assert len(layer._tapes) == 1
    layer(x, training=True)   # a newer training call: the plan no longer names the last one
    with pytest.raises(RuntimeError, match="most recent training call"):
        layer.run_backprop(plan)
    layer.discard_last_training_call()
    assert layer.run_backprop(plan).dx.shape == x.shape
    assert len(layer._tapes) == 0


def test_clone_copies_weights_states_generator_and_device_choice():
    x, lengths = _inputs()
    layer = le.LSTM(6, stateful=True, dropout=0.25, seed=4, backend="numpy")
    layer(x, lengths=lengths, training=True)
    copy = layer.clone()
    for mine, theirs in zip(layer.get_weights(), copy.get_weights()):
        np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(layer.states[0], copy.states[0])
    np.testing.assert_array_equal(layer(x, training=True), copy(x, training=True))   # same dropout masks next
    assert len(copy._tapes) == 1 and len(layer._tapes) == 2   # tapes of their own
    copy.set_weights([w + 1 for w in copy.get_weights()])
    assert not np.array_equal(layer.get_weights()[0], copy.get_weights()[0])   # weights of their own
    with pytest.raises(TypeError, match="unknown options"):
        layer.clone(unit=3)


@pytest.mark.parametrize("return_sequences", [True, False])
def test_bidirectional_leaves_the_callers_layers_alone(return_sequences):
    x, lengths = _inputs()
    forward = le.LSTM(6, return_sequences=return_sequences, seed=1, backend="numpy")
    backward = le.LSTM(6, return_sequences=return_sequences, go_backwards=True, seed=9, backend="numpy")
    bi = le.Bidirectional(forward, backward_layer=backward)
    assert bi.forward_layer is not forward and bi.backward_layer is not backward
    assert bi.forward_layer.zero_output_for_mask is return_sequences
    y = bi(x, lengths=lengths, training=True)
    bi.backward(np.ones_like(y))
    for layer in (forward, backward):
        assert layer.zero_output_for_mask is False and not layer.built and len(layer._tapes) == 0


def test_bidirectional_of_a_built_layer_starts_from_its_weights_and_trains_copies():
    x, lengths = _inputs()
    layer = le.LSTM(6, return_sequences=True, seed=1, backend="numpy").build(4)
    before = layer.get_weights()
    bi = le.Bidirectional(layer)
    for mine, theirs in zip(before, bi.forward_layer.get_weights()):
        np.testing.assert_array_equal(mine, theirs)
    y = bi(x, lengths=lengths, training=True)
    bi.backward(np.ones_like(y))
    bi.forward_layer.set_weights([w - 0.1 * g for w, g in zip(bi.forward_layer.get_weights(),
                                                               [bi.forward_layer.grads[n] for n in
                                                                ("kernel", "recurrent_kernel", "bias")])])
    for mine, kept in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(mine, kept)


def test_bidirectional_is_its_directions_run_through_the_public_calls():
    """The wrapper adds nothing but the merge: its output and dx are the two directions' public calls."""
    x, lengths = _inputs()
    bi = le.Bidirectional(le.LSTM(6, return_sequences=True, seed=1, backend="numpy"), merge_mode="sum")
    forward, backward = bi.forward_layer.clone(), bi.backward_layer.clone()
    y = bi(x, lengths=lengths, training=True)
    y_forward, _, _ = forward.run(forward.plan(x, lengths=lengths), training=True)
    y_backward, _, _ = backward.run(backward.plan(x, lengths=lengths), training=True, keep_input_order=True)
    np.testing.assert_allclose(y, y_forward + y_backward, rtol=1e-6, atol=1e-6)
    dy = np.random.default_rng(2).normal(size=y.shape).astype(np.float32)
    dx = bi.backward(dy)
    dx_forward = forward.run_backprop(forward.plan_backprop(dy)).dx
    dx_backward = backward.run_backprop(backward.plan_backprop(dy, keep_input_order=True)).dx
    np.testing.assert_allclose(dx, dx_forward + dx_backward, rtol=1e-6, atol=1e-6)


def test_bidirectional_backward_failing_in_the_second_direction_leaves_tapes_in_step(monkeypatch):
    """A backend failing in the backward direction's backward (every argument was checked): the call is
    dropped from every tape (the forward direction's workspace is spent) and the forward direction's
    gradients are the ones before the call."""
    x, lengths = _inputs()
    bi = le.Bidirectional(le.LSTM(6, return_sequences=True, seed=1, backend="numpy"))
    y = bi(x, lengths=lengths, training=True)
    bi.backward(np.ones_like(y))
    before = {name: value.copy() for name, value in bi.forward_layer.grads.items()}
    y = bi(x * 2, lengths=lengths, training=True)

    def failing(plan, **options):
        raise RuntimeError("device lost")

    monkeypatch.setattr(bi.backward_layer, "run_backprop", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        bi.backward(np.ones_like(y))
    assert len(bi._tapes) == len(bi.forward_layer._tapes) == len(bi.backward_layer._tapes) == 0
    for name, value in before.items():
        np.testing.assert_array_equal(bi.forward_layer.grads[name], value)
    monkeypatch.undo()
    y = bi(x, lengths=lengths, training=True)   # the wrapper keeps working
    assert bi.backward(np.ones_like(y)).shape == x.shape
