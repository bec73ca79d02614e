"""Parity with Keras 3: outputs within 1e-5 and gradients within 1e-4 (float32).

Keras is the independent reference: each test builds the Keras layer, copies
its weights into the lstmeng layer, and compares the forward outputs and the
gradients that ``tf.GradientTape`` computes for the loss
``sum(y * dy) + sum(h * dh) + sum(c * dc)`` with the lstmeng backward pass.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

import lstmeng as le
from lstmeng import testing

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

OUTPUT_TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-4
MASK_PATTERNS = ("none", "right", "left", "holes", "fully_masked")
ACTIVATION_PAIRS = (("tanh", "sigmoid"), ("relu", "hard_sigmoid"), ("sigmoid", "sigmoid"),
                    ("linear", "hard_sigmoid"), ("tanh", "hard_sigmoid"), ("relu", "sigmoid"))


def core_backends():
    """numpy always; other host backends only on request (LSTMENG_CORE_BACKENDS="cython,..." or "all").

    Every backend is compared with numpy by the conformance and reliability
    suites; these tests pin the reference to Keras, so by default they run on it.
    """
    requested = os.environ.get("LSTMENG_CORE_BACKENDS", "")
    if not requested:
        return ["numpy"]
    import _backends  # probes every backend: only when asked

    available = [p.values[0] for p in _backends.fast_backends()]
    wanted = available if requested == "all" else requested.split(",")
    return ["numpy"] + [name for name in wanted if name in available and name not in ("numpy", "tensorflow")]


BACKENDS = core_backends()


# -- helpers ---------------------------------------------------------------------
def random_weights(keras_layer, rng, scale=0.5):
    """Give ``keras_layer`` random weights (biases too), so parity does not hinge on initializers."""
    keras_layer.set_weights([(rng.normal(size=w.shape) * scale).astype("float32")
                             for w in keras_layer.get_weights()])


def assert_outputs_close(actual, expected, what):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=OUTPUT_TOLERANCE,
                               atol=OUTPUT_TOLERANCE, err_msg=what)


def assert_grads_close(actual, expected, what):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=GRADIENT_TOLERANCE,
                               atol=GRADIENT_TOLERANCE, err_msg=what)


def keras_forward_and_grads(call, x, initial_state, output_grads, weights):
    """Run ``call(x, initial_state)`` under a tape.

    Args:
        call: ``(x, initial_state) -> output or list of outputs``.
        x: ``[B, T, I]`` host array; initial_state: list of ``[B, H]`` host arrays or None.
        output_grads: one host array per output (the loss is ``sum(output * grad)``).
        weights: the Keras variables to differentiate.

    Returns:
        (outputs as host arrays, dx, list of initial-state grads, list of weight grads)
    """
    x_tensor = tf.constant(x)
    states = None if initial_state is None else [tf.constant(s) for s in initial_state]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x_tensor)
        if states is not None:
            for state in states:
                tape.watch(state)
        outputs = call(x_tensor, states)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        loss = tf.add_n([tf.reduce_sum(output * grad) for output, grad in zip(outputs, output_grads)])
    sources = [x_tensor] + (states or []) + list(weights)
    grads = tape.gradient(loss, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    grads = [g.numpy() for g in grads]
    count = 0 if states is None else len(states)
    return [o.numpy() for o in outputs], grads[0], grads[1:1 + count], grads[1 + count:]


def random_output_grads(rng, outputs):
    return [rng.normal(size=np.shape(o)).astype("float32") for o in outputs]


# -- single LSTM -----------------------------------------------------------------
LSTM_CASES = [
    dict(mask=mask, go_backwards=go_backwards, zero_output_for_mask=zero, return_sequences=sequences,
         return_state=index % 2 == 0, initial_state=index % 3 != 1,
         activation=ACTIVATION_PAIRS[index % len(ACTIVATION_PAIRS)], use_bias=index % 5 != 3, seed=index)
    for index, (mask, go_backwards, zero, sequences) in enumerate(
        itertools.product(MASK_PATTERNS, (False, True), (False, True), (True, False)))
]


def case_id(case):
    return "-".join([case["mask"], "back" if case["go_backwards"] else "fwd",
                     "zero" if case["zero_output_for_mask"] else "prev",
                     "seq" if case["return_sequences"] else "last",
                     "state" if case["return_state"] else "nostate", "h0" if case["initial_state"] else "noh0",
                     "/".join(case["activation"]), "bias" if case["use_bias"] else "nobias"])


def make_mask(pattern, batch, steps, rng):
    mask = testing.make_mask(pattern, batch, steps, rng)
    if pattern == "holes":
        mask[1, 0] = False  # a row whose first step is masked: outputs before any real step
    return mask


def run_lstm_parity(case, backend, batch=4, steps=6, features=3, units=5):
    rng = np.random.default_rng(case["seed"])
    activation, recurrent_activation = case["activation"]
    options = dict(activation=activation, recurrent_activation=recurrent_activation,
                   use_bias=case["use_bias"], return_sequences=case["return_sequences"],
                   return_state=case["return_state"], go_backwards=case["go_backwards"],
                   zero_output_for_mask=case["zero_output_for_mask"])
    keras_layer = keras.layers.LSTM(units, **options)
    keras_layer.build((batch, steps, features))
    random_weights(keras_layer, rng)
    mine = le.LSTM(units, backend=backend, **options)
    mine.set_weights(keras_layer.get_weights())

    x = rng.normal(size=(batch, steps, features)).astype("float32")
    mask = make_mask(case["mask"], batch, steps, rng)
    initial_state = ([rng.normal(size=(batch, units)).astype("float32") * 0.5 for _ in range(2)]
                     if case["initial_state"] else None)

    def keras_call(x_tensor, states):
        return keras_layer(x_tensor, mask=None if mask is None else tf.constant(mask), initial_state=states)

    mine_outputs = mine(x, mask=mask, initial_state=initial_state, training=True)
    mine_outputs = mine_outputs if case["return_state"] else [mine_outputs]
    output_grads = random_output_grads(rng, mine_outputs)
    expected, dx, state_grads, weight_grads = keras_forward_and_grads(
        keras_call, x, initial_state, output_grads, keras_layer.trainable_weights)

    for name, actual, reference in zip(["y", "h", "c"], mine_outputs, expected):
        assert_outputs_close(actual, reference, f"{name} {case_id(case)}")
    if case["return_state"]:
        dx_mine = mine.backward(output_grads[0], dh=output_grads[1], dc=output_grads[2])
    else:
        dx_mine = mine.backward(output_grads[0])
    assert_grads_close(dx_mine, dx, "dx")
    for name, reference in zip(["kernel", "recurrent_kernel", "bias"], weight_grads):
        assert_grads_close(mine.grads[name], reference, f"d{name}")
    assert sorted(mine.grads) == sorted(["kernel", "recurrent_kernel"] + (["bias"] if case["use_bias"] else []))
    if initial_state is None:
        assert mine.initial_state_grads is None
    else:
        assert_grads_close(mine.initial_state_grads[0], state_grads[0], "dh0")
        assert_grads_close(mine.initial_state_grads[1], state_grads[1], "dc0")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LSTM_CASES, ids=case_id)
def test_lstm_matches_keras(case, backend):
    run_lstm_parity(case, backend)


@pytest.mark.parametrize("activation", ACTIVATION_PAIRS, ids="/".join)
@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
def test_lstm_activations_match_keras(activation, use_bias):
    case = dict(mask="holes", go_backwards=False, zero_output_for_mask=False, return_sequences=True,
                return_state=True, initial_state=True, activation=activation, use_bias=use_bias, seed=7)
    run_lstm_parity(case, "numpy")


def test_zero_output_for_mask_last_output_is_keras_corner_case():
    """Keras returns the last time step's output (zeros for a right-padded row) with
    zero_output_for_mask=True and return_sequences=False; lstmeng reproduces it."""
    rng = np.random.default_rng(3)
    keras_layer = keras.layers.LSTM(4, zero_output_for_mask=True)
    keras_layer.build((2, 5, 3))
    random_weights(keras_layer, rng)
    mine = le.LSTM(4, zero_output_for_mask=True, backend="numpy").set_weights(keras_layer.get_weights())
    x = rng.normal(size=(2, 5, 3)).astype("float32")
    mask = le.lengths_to_mask([5, 3], maxlen=5)
    expected = keras_layer(x, mask=mask).numpy()
    actual = mine(x, mask=mask)
    assert_outputs_close(actual, expected, "last output")
    assert np.all(actual[1] == 0) and np.any(actual[0] != 0)


# -- stateful ----------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_stateful_two_calls_match_keras(masked):
    rng = np.random.default_rng(11)
    batch, steps, features, units = 3, 4, 2, 5
    keras_layer = keras.layers.LSTM(units, stateful=True, return_sequences=True, return_state=True)
    keras_layer.build((batch, steps, features))
    random_weights(keras_layer, rng)
    mine = le.LSTM(units, stateful=True, return_sequences=True, return_state=True, backend="numpy")
    mine.set_weights(keras_layer.get_weights())
    for call in range(2):
        x = rng.normal(size=(batch, steps, features)).astype("float32")
        mask = testing.make_mask("holes", batch, steps, rng) if masked else None
        mine_outputs = mine(x, mask=mask, training=True)
        output_grads = random_output_grads(rng, mine_outputs)
        expected, dx, _, weight_grads = keras_forward_and_grads(
            lambda x_tensor, _: keras_layer(x_tensor, mask=None if mask is None else tf.constant(mask)),  # noqa: B023 (called in this iteration)
            x, None, output_grads, keras_layer.trainable_weights)
        for name, actual, reference in zip(["y", "h", "c"], mine_outputs, expected):
            assert_outputs_close(actual, reference, f"call {call}: {name}")
        assert_grads_close(mine.backward(*output_grads), dx, f"call {call}: dx")
        for name, reference in zip(["kernel", "recurrent_kernel", "bias"], weight_grads):
            assert_grads_close(mine.grads[name], reference, f"call {call}: d{name}")
        # The carried state is the Keras layer's state after the same call.
        assert_outputs_close(mine.states[0], keras_layer.states[0].numpy(), f"call {call}: carried h")
        assert_outputs_close(mine.states[1], keras_layer.states[1].numpy(), f"call {call}: carried c")
    keras_layer.reset_states()
    mine.reset_state()
    x = rng.normal(size=(batch, steps, features)).astype("float32")
    assert_outputs_close(mine(x)[0], keras_layer(x)[0].numpy(), "after reset_state")


# -- Bidirectional -----------------------------------------------------------------
BIDIRECTIONAL_CASES = [
    dict(merge_mode=merge_mode, mask=mask, return_sequences=sequences, return_state=index % 2 == 0,
         initial_state=index % 3 == 0, seed=100 + index)
    for index, (merge_mode, mask, sequences) in enumerate(
        itertools.product(["concat", "sum", "mul", "ave", None], MASK_PATTERNS, [True, False]))
]


def bidirectional_id(case):
    return "-".join([str(case["merge_mode"]), case["mask"], "seq" if case["return_sequences"] else "last",
                     "state" if case["return_state"] else "nostate", "h0" if case["initial_state"] else "noh0"])


@pytest.mark.parametrize("case", BIDIRECTIONAL_CASES, ids=bidirectional_id)
def test_bidirectional_matches_keras(case):
    rng = np.random.default_rng(case["seed"])
    batch, steps, features, units = 4, 5, 3, 4
    keras_layer = keras.layers.Bidirectional(
        keras.layers.LSTM(units, return_sequences=case["return_sequences"], return_state=case["return_state"]),
        merge_mode=case["merge_mode"])
    keras_layer.build((batch, steps, features))
    random_weights(keras_layer, rng)
    mine = le.Bidirectional(le.LSTM(units, return_sequences=case["return_sequences"],
                                    return_state=case["return_state"], backend="numpy"),
                            merge_mode=case["merge_mode"])
    mine.set_weights(keras_layer.get_weights())

    x = rng.normal(size=(batch, steps, features)).astype("float32")
    mask = make_mask(case["mask"], batch, steps, rng)
    initial_state = ([rng.normal(size=(batch, units)).astype("float32") * 0.5 for _ in range(4)]
                     if case["initial_state"] else None)

    def keras_call(x_tensor, states):
        return keras_layer(x_tensor, mask=None if mask is None else tf.constant(mask), initial_state=states)

    mine_outputs = mine(x, mask=mask, initial_state=initial_state, training=True)
    mine_outputs = list(mine_outputs) if isinstance(mine_outputs, list) else [mine_outputs]
    output_grads = random_output_grads(rng, mine_outputs)
    expected, dx, state_grads, weight_grads = keras_forward_and_grads(
        keras_call, x, initial_state, output_grads, keras_layer.trainable_weights)
    assert len(mine_outputs) == len(expected)
    for index, (actual, reference) in enumerate(zip(mine_outputs, expected)):
        assert_outputs_close(actual, reference, f"output {index} of {bidirectional_id(case)}")

    output_count = 2 if case["merge_mode"] is None else 1
    dy = output_grads[:output_count]
    dy = dy if case["merge_mode"] is None else dy[0]
    dstates = output_grads[output_count:] if case["return_state"] else None
    assert_grads_close(mine.backward(dy, dstates), dx, "dx")
    names = [f"{direction}.{name}" for direction in ("forward", "backward")
             for name in ("kernel", "recurrent_kernel", "bias")]
    assert sorted(mine.grads) == sorted(names)
    for name, reference in zip(names, weight_grads):
        assert_grads_close(mine.grads[name], reference, f"d {name}")
    if initial_state is None:
        assert mine.initial_state_grads is None
    else:
        for index, reference in enumerate(state_grads):
            assert_grads_close(mine.initial_state_grads[index], reference, f"initial state grad {index}")


def test_bidirectional_explicit_backward_layer_matches_keras():
    """A backward_layer with its own units and activations, as Keras allows."""
    rng = np.random.default_rng(5)
    keras_layer = keras.layers.Bidirectional(
        keras.layers.LSTM(3, return_sequences=True),
        backward_layer=keras.layers.LSTM(2, return_sequences=True, go_backwards=True, activation="relu"))
    keras_layer.build((2, 4, 2))
    random_weights(keras_layer, rng)
    mine = le.Bidirectional(le.LSTM(3, return_sequences=True, backend="numpy"),
                            backward_layer=le.LSTM(2, return_sequences=True, go_backwards=True,
                                                   activation="relu", backend="numpy"))
    mine.set_weights(keras_layer.get_weights())
    x = rng.normal(size=(2, 4, 2)).astype("float32")
    mask = le.lengths_to_mask([4, 2], maxlen=4)
    actual = mine(x, mask=mask)
    assert actual.shape == (2, 4, 5)
    assert_outputs_close(actual, keras_layer(x, mask=mask).numpy(), "y")


# -- stacks ------------------------------------------------------------------------
@pytest.mark.parametrize("mask_pattern", MASK_PATTERNS)
def test_stack_matches_keras(mask_pattern):
    """Bidirectional -> Dropout -> LSTM, the mask given to every layer as Keras propagates it."""
    rng = np.random.default_rng(MASK_PATTERNS.index(mask_pattern))
    batch, steps, features = 4, 6, 3
    first = keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True), merge_mode="concat")
    second = keras.layers.LSTM(5, return_sequences=True, go_backwards=True)
    third = keras.layers.LSTM(3)
    inputs = keras.Input(shape=(steps, features))
    mask_input = keras.Input(shape=(steps,), dtype="bool")
    hidden = first(inputs, mask=mask_input)
    hidden = keras.layers.Dropout(0.3)(hidden)
    hidden = second(hidden, mask=mask_input)
    outputs = third(hidden, mask=mask_input)
    keras_model = keras.Model([inputs, mask_input], outputs)
    random_weights(keras_model, rng)

    mine = le.Sequential([
        le.Bidirectional(le.LSTM(4, return_sequences=True, backend="numpy")),
        le.Dropout(0.3),
        le.LSTM(5, return_sequences=True, go_backwards=True, backend="numpy"),
        le.LSTM(3, backend="numpy")])
    mine.set_weights(keras_model.get_weights())

    x = rng.normal(size=(batch, steps, features)).astype("float32")
    mask = make_mask(mask_pattern, batch, steps, rng)
    keras_mask = np.ones((batch, steps), bool) if mask is None else mask
    actual = mine(x, mask=mask, training=False)
    dy = rng.normal(size=actual.shape).astype("float32")
    expected, dx, _, weight_grads = keras_forward_and_grads(
        lambda x_tensor, _: keras_model([x_tensor, tf.constant(keras_mask)], training=False),
        x, None, [dy], keras_model.trainable_weights)
    assert_outputs_close(actual, expected[0], "y")

    # Backward needs a training forward; dropout off (rate 0 copy) keeps it deterministic.
    mine.layers[1] = le.Dropout(0.0)
    mine(x, mask=mask, training=True)
    assert_grads_close(mine.backward(dy), dx, "dx")
    names = ([f"0.{d}.{n}" for d in ("forward", "backward") for n in ("kernel", "recurrent_kernel", "bias")]
             + [f"{i}.{n}" for i in (2, 3) for n in ("kernel", "recurrent_kernel", "bias")])
    assert sorted(mine.grads) == sorted(names)
    for name, reference in zip(names, weight_grads):
        assert_grads_close(mine.grads[name], reference, f"d {name}")


# -- from_keras ----------------------------------------------------------------------
def test_from_keras_lstm():
    rng = np.random.default_rng(21)
    keras_layer = keras.layers.LSTM(4, activation="relu", recurrent_activation="hard_sigmoid",
                                    return_sequences=True, go_backwards=True, zero_output_for_mask=True)
    keras_layer.build((None, None, 3))
    random_weights(keras_layer, rng)
    mine = le.from_keras(keras_layer, backend="numpy")
    assert isinstance(mine, le.LSTM)
    assert (mine.activation, mine.recurrent_activation) == ("relu", "hard_sigmoid")
    assert mine.go_backwards and mine.return_sequences and mine.zero_output_for_mask
    x = rng.normal(size=(3, 5, 3)).astype("float32")
    mask = make_mask("holes", 3, 5, rng)
    assert_outputs_close(mine(x, mask=mask), keras_layer(x, mask=mask).numpy(), "y")


@pytest.mark.parametrize("merge_mode", ["concat", "sum", "mul", "ave", None])
def test_from_keras_bidirectional(merge_mode):
    rng = np.random.default_rng(22)
    keras_layer = keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True), merge_mode=merge_mode)
    keras_layer.build((None, None, 3))
    random_weights(keras_layer, rng)
    mine = le.from_keras(keras_layer, backend="numpy")
    assert isinstance(mine, le.Bidirectional) and mine.merge_mode == merge_mode
    x = rng.normal(size=(3, 5, 3)).astype("float32")
    mask = le.lengths_to_mask([5, 2, 4], maxlen=5)
    expected = keras_layer(x, mask=mask)
    actual = mine(x, mask=mask)
    expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
    actual = actual if isinstance(actual, list) else [actual]
    for a, e in zip(actual, expected, strict=True):
        assert_outputs_close(a, e.numpy(), "y")


def test_from_keras_sequential():
    rng = np.random.default_rng(23)
    keras_model = keras.Sequential([
        keras.Input(shape=(None, 3)),
        keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True), merge_mode="sum"),
        keras.layers.Dropout(0.25),
        keras.layers.LSTM(5, use_bias=False, return_sequences=True),
        keras.layers.LSTM(2),
    ])
    random_weights(keras_model, rng)
    mine = le.from_keras(keras_model, backend="numpy")
    assert isinstance(mine, le.Sequential)
    assert [type(layer).__name__ for layer in mine.layers] == ["Bidirectional", "Dropout", "LSTM", "LSTM"]
    assert mine.layers[1].rate == 0.25
    x = rng.normal(size=(3, 6, 3)).astype("float32")
    assert_outputs_close(mine(x), keras_model(x, training=False).numpy(), "y")
    # Same weights in the same order.
    for actual, expected in zip(mine.get_weights(), keras_model.get_weights(), strict=True):
        np.testing.assert_array_equal(actual, expected)


def test_from_keras_sequential_with_masking_warns_and_matches_with_mask():
    rng = np.random.default_rng(24)
    keras_model = keras.Sequential([keras.Input(shape=(None, 3)), keras.layers.Masking(0.0),
                                    keras.layers.LSTM(4, return_sequences=True), keras.layers.LSTM(2)])
    random_weights(keras_model, rng)
    with pytest.warns(UserWarning, match="Masking layer is dropped"):
        mine = le.from_keras(keras_model, backend="numpy")
    x, mask = le.pad_batch([rng.normal(size=(n, 3)) for n in (6, 2, 4)])
    assert_outputs_close(mine(x, mask=mask), keras_model(x).numpy(), "y")
