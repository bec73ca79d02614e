"""Finite-difference gradient checks in float64 for LSTM, LSTMCell, Bidirectional and Sequential.

Each check builds the loss ``sum(output * random weights)`` and compares the
layer's explicit backward pass (weight, input and initial-state gradients)
with central differences from ``lstmeng.testing.finite_difference_check``.
Layers with dropout are rebuilt from their config and seed before every
forward, so each forward draws the same dropout masks.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import lstmeng as le
from lstmeng import testing

BATCH, STEPS, FEATURES, UNITS = 3, 5, 2, 3


def core_backends():
    """numpy always; other backends only on request (LSTMENG_CORE_BACKENDS="cython,..." or "all").

    Every backend is compared with numpy by the conformance and reliability
    suites; these checks pin the reference itself, so by default they run on it.
    """
    requested = os.environ.get("LSTMENG_CORE_BACKENDS", "")
    if not requested:
        return ["numpy"]
    import _backends  # probes every backend: only when asked

    available = [p.values[0] for p in _backends.fast_backends()]
    wanted = available if requested == "all" else requested.split(",")
    return ["numpy"] + [name for name in wanted if name in available and name != "numpy"
                        and name != "tensorflow" and "float64" in _backends.dtypes_of(name)]


BACKENDS = core_backends()


def fresh_copy(layer, weights):
    """A new layer of the same class and config (so the same seed) holding ``weights``."""
    copy = type(layer).from_config(layer.get_config())
    copy.set_weights([weights[f"w{i}"] for i in range(len(layer.get_weights()))])
    return copy


def check_gradients(layer, x, *, mask=None, initial_state=None, call_options=None, rng, samples=5):
    """Finite-difference check of every gradient the layer's backward gives.

    ``layer`` is built; it is re-created from its config before every forward
    (fresh dropout generators), so it may use dropout with a seed.
    """
    call_options = call_options or {}
    weights = {f"w{i}": w.copy() for i, w in enumerate(layer.get_weights())}
    inputs = {"x": x.copy()}
    if initial_state is not None:
        inputs.update({f"s{i}": s.copy() for i, s in enumerate(initial_state)})
    output_grads = {}

    def loss_and_grads():
        model = fresh_copy(layer, weights)
        state = None if initial_state is None else [inputs[f"s{i}"] for i in range(len(initial_state))]
        state_kwargs = {} if state is None else {"initial_state": state}
        outputs = model(inputs["x"], mask=mask, training=True, **state_kwargs, **call_options)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        if not output_grads:
            output_grads["values"] = [rng.normal(size=np.shape(o)) for o in outputs]
        loss = sum(float(np.sum(o * g)) for o, g in zip(outputs, output_grads["values"]))
        grads_in = output_grads["values"]
        if isinstance(model, le.LSTM):
            dx = model.backward(grads_in[0], *grads_in[1:])
        elif isinstance(model, le.Bidirectional):
            merged = 2 if model.merge_mode is None else 1
            dy = grads_in[:merged] if model.merge_mode is None else grads_in[0]
            dx = model.backward(dy, grads_in[merged:] or None)
        else:
            dx = model.backward(grads_in[0])
        grads = {f"w{i}": model.grads[name] for i, name in enumerate(_weight_names(model))}
        assert len(grads) == len(model.params) == len(weights)
        grads["x"] = dx
        if initial_state is not None:
            for i, value in enumerate(model.initial_state_grads):
                grads[f"s{i}"] = value
        return loss, grads

    testing.finite_difference_check(loss_and_grads, {**weights, **inputs}, rng=rng, samples=samples,
                                    epsilon=1e-6, rtol=1e-6)


def _weight_names(model):
    """The grads keys in get_weights() order."""
    if isinstance(model, le.LSTM):
        return ["kernel", "recurrent_kernel", "bias"][:len(model.get_weights())]
    if isinstance(model, le.Bidirectional):
        return ([f"forward.{n}" for n in _weight_names(model.forward_layer)]
                + [f"backward.{n}" for n in _weight_names(model.backward_layer)])
    names = []
    for index, layer in enumerate(model.layers):
        if isinstance(layer, (le.LSTM, le.Bidirectional)):
            names += [f"{index}.{n}" for n in _weight_names(layer)]
    return names


def random_inputs(rng, mask_pattern, initial_state_count=0, units=UNITS):
    x = rng.normal(size=(BATCH, STEPS, FEATURES))
    mask = testing.make_mask(mask_pattern, BATCH, STEPS, rng)
    states = [rng.normal(size=(BATCH, units)) * 0.5 for _ in range(initial_state_count)] or None
    return x, mask, states


# -- LSTM --------------------------------------------------------------------------
# Every mask pattern both directions; zero_output_for_mask and return_sequences
# rotate through their four combinations (Keras parity covers the full product).
LSTM_CASES = [(mask, go_backwards, *[(False, True), (True, False), (True, True), (False, False)][index % 4])
              for index, (mask, go_backwards) in enumerate(
                  (m, g) for m in ["none", "right", "left", "holes", "fully_masked", "random"] for g in (False, True))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_pattern,go_backwards,zero_output,return_sequences", LSTM_CASES,
                         ids=lambda v: str(v))
def test_lstm_gradients(mask_pattern, go_backwards, zero_output, return_sequences, backend):
    rng = np.random.default_rng(LSTM_CASES.index((mask_pattern, go_backwards, zero_output, return_sequences)))
    layer = le.LSTM(UNITS, return_sequences=return_sequences, return_state=True, go_backwards=go_backwards,
                    zero_output_for_mask=zero_output, bias_initializer="normal", dtype="float64",
                    backend=backend, seed=1).build(FEATURES)
    x, mask, states = random_inputs(rng, mask_pattern, 2)
    check_gradients(layer, x, mask=mask, initial_state=states, rng=rng)


@pytest.mark.parametrize("activation,recurrent_activation",
                         [("relu", "sigmoid"), ("sigmoid", "hard_sigmoid"), ("linear", "sigmoid")])
def test_lstm_gradients_activations_no_bias(activation, recurrent_activation):
    rng = np.random.default_rng(4)
    layer = le.LSTM(UNITS, activation=activation, recurrent_activation=recurrent_activation, use_bias=False,
                    return_sequences=True, dtype="float64", backend="numpy", seed=2).build(FEATURES)
    x, mask, _ = random_inputs(rng, "holes")
    check_gradients(layer, x, mask=mask, rng=rng)


@pytest.mark.parametrize("masked", [False, True])
def test_lstm_gradients_with_seeded_dropout(masked):
    rng = np.random.default_rng(5)
    layer = le.LSTM(UNITS, dropout=0.3, recurrent_dropout=0.4, return_sequences=True, return_state=True,
                    dtype="float64", backend="numpy", seed=3).build(FEATURES)
    x, mask, states = random_inputs(rng, "holes" if masked else "none", 2)
    # The seed fixes the masks: two fresh copies give the same outputs, and dropout is active.
    first = fresh_copy(layer, {f"w{i}": w for i, w in enumerate(layer.get_weights())})(x, training=True)[0]
    second = fresh_copy(layer, {f"w{i}": w for i, w in enumerate(layer.get_weights())})(x, training=True)[0]
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, layer(x, training=False)[0])
    check_gradients(layer, x, mask=mask, initial_state=states, rng=rng)


def test_lstm_gradients_time_major():
    rng = np.random.default_rng(6)
    layer = le.LSTM(UNITS, return_sequences=True, time_major=True, go_backwards=True, dtype="float64",
                    backend="numpy", seed=4).build(FEATURES)
    x = rng.normal(size=(STEPS, BATCH, FEATURES))
    mask = testing.make_mask("right", BATCH, STEPS, rng)
    check_gradients(layer, x, mask=mask, rng=rng)


# -- LSTMCell ----------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_cell_gradients_over_several_steps(dropout):
    """Three steps through the cell tape: backward in reverse order accumulates weight gradients."""
    rng = np.random.default_rng(7)
    steps = 3
    cell = le.LSTMCell(UNITS, dropout=dropout, recurrent_dropout=dropout, bias_initializer="normal",
                       dtype="float64", backend="numpy", seed=5).build(FEATURES)
    weights = {f"w{i}": w for i, w in enumerate(cell.get_weights())}
    inputs = {f"x{t}": rng.normal(size=(BATCH, FEATURES)) for t in range(steps)}
    inputs["h0"] = rng.normal(size=(BATCH, UNITS)) * 0.5
    inputs["c0"] = rng.normal(size=(BATCH, UNITS)) * 0.5
    dh_out = [rng.normal(size=(BATCH, UNITS)) for _ in range(steps)]
    dc_final = rng.normal(size=(BATCH, UNITS))

    def loss_and_grads():
        model = fresh_copy(cell, weights)
        states = [inputs["h0"], inputs["c0"]]
        loss = 0.0
        for t in range(steps):
            h, states = model(inputs[f"x{t}"], states, training=True)
            loss += float(np.sum(h * dh_out[t]))
        loss += float(np.sum(states[1] * dc_final))
        grads = {}
        dh_next, dc_next = np.zeros((BATCH, UNITS)), dc_final
        for t in reversed(range(steps)):
            dx_t, (dh_next, dc_next) = model.backward(dh_out[t] + dh_next, dc_next)
            grads[f"x{t}"] = dx_t
        grads["h0"], grads["c0"] = dh_next, dc_next
        for i, name in enumerate(["kernel", "recurrent_kernel", "bias"]):
            grads[f"w{i}"] = model.grads[name]
        return loss, grads

    testing.finite_difference_check(loss_and_grads, {**weights, **inputs}, rng=rng, samples=5,
                                    epsilon=1e-6, rtol=1e-6)


# -- Bidirectional -------------------------------------------------------------------
@pytest.mark.parametrize("merge_mode", ["concat", "sum", "mul", "ave", None])
@pytest.mark.parametrize("return_sequences", [True, False], ids=["seq", "last"])
def test_bidirectional_gradients(merge_mode, return_sequences):
    rng = np.random.default_rng(8)
    layer = le.Bidirectional(le.LSTM(UNITS, return_sequences=return_sequences, return_state=True,
                                     bias_initializer="normal", dtype="float64", backend="numpy", seed=6),
                             merge_mode=merge_mode).build(FEATURES)
    x, mask, states = random_inputs(rng, "right", 4)
    check_gradients(layer, x, mask=mask, initial_state=states, rng=rng)


def test_bidirectional_gradients_with_dropout_and_holes():
    rng = np.random.default_rng(9)
    layer = le.Bidirectional(le.LSTM(UNITS, return_sequences=True, dropout=0.25, recurrent_dropout=0.25,
                                     dtype="float64", backend="numpy", seed=7)).build(FEATURES)
    x, mask, _ = random_inputs(rng, "holes")
    check_gradients(layer, x, mask=mask, rng=rng)


# -- Sequential ----------------------------------------------------------------------
@pytest.mark.parametrize("mask_pattern", ["none", "right", "holes"])
def test_sequential_gradients(mask_pattern):
    rng = np.random.default_rng(10)
    model = le.Sequential([
        le.Bidirectional(le.LSTM(UNITS, return_sequences=True, dtype="float64", backend="numpy", seed=8),
                         merge_mode="concat"),
        le.Dropout(0.3, seed=9),
        le.LSTM(UNITS, return_sequences=True, go_backwards=True, recurrent_dropout=0.2, dtype="float64",
                backend="numpy", seed=10),
        le.LSTM(2, use_bias=False, dtype="float64", backend="numpy", seed=11),
    ]).build(FEATURES)
    x, mask, _ = random_inputs(rng, mask_pattern)
    check_gradients(model, x, mask=mask, rng=rng, samples=3)


def test_sequential_gradients_with_lengths():
    rng = np.random.default_rng(11)
    model = le.Sequential([le.LSTM(UNITS, return_sequences=True, dtype="float64", backend="numpy", seed=12),
                           le.LSTM(2, return_sequences=True, dtype="float64", backend="numpy", seed=13)]
                          ).build(FEATURES)
    x = rng.normal(size=(BATCH, STEPS, FEATURES))
    check_gradients(model, x, call_options={"lengths": np.array([5, 2, 3])}, rng=rng)
