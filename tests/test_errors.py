"""Bad input gets a clear error before any computation (issue 2's list).

Each case asserts the exception type and that the message names the argument
and the expected and actual values; then that the layer's weights (and carried
states) are unchanged and the next valid call gives the same result as a
fresh copy of the layer that never saw the bad call.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import lstmeng as le

BATCH, STEPS, FEATURES, UNITS = 2, 5, 3, 4
RNG = np.random.default_rng(0)
X = RNG.normal(size=(BATCH, STEPS, FEATURES)).astype("float32")
STATE = [np.zeros((BATCH, UNITS), "float32"), np.ones((BATCH, UNITS), "float32")]


def twins(make):
    """Two layers made alike (same seed, so the same weights and dropout streams):
    one gets the bad input, the other shows what the next valid call must give."""
    return make(), make()


def snapshot(layer):
    states = getattr(layer, "states", None)
    return ([w.copy() for w in layer.get_weights()],
            None if states is None else [np.array(s, copy=True) for s in states])


def assert_untouched(layer, before, reference):
    """Weights and states as before the error, and the next valid call equals ``reference``'s."""
    weights, states = before
    for actual, expected in zip(layer.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(actual, expected)
    if states is not None:
        for actual, expected in zip(layer.states, states, strict=True):
            np.testing.assert_array_equal(actual, expected)
    np.testing.assert_array_equal(layer(X, training=True), reference(X, training=True))


def expect_error(exception, *patterns):
    """pytest.raises whose message must contain every regex in ``patterns``."""
    return _Raises(exception, patterns)


class _Raises:
    def __init__(self, exception, patterns):
        self.context = pytest.raises(exception)
        self.patterns = patterns

    def __enter__(self):
        self.info = self.context.__enter__()
        return self.info

    def __exit__(self, *exc):
        suppressed = self.context.__exit__(*exc)
        message = str(self.info.value)
        for pattern in self.patterns:
            assert re.search(pattern, message), f"{pattern!r} not in message {message!r}"
        return suppressed


def built_lstm(**options):
    options.setdefault("backend", "numpy")
    return le.LSTM(UNITS, seed=1, bias_initializer="normal", **options).build(FEATURES)


# -- LSTM call arguments ------------------------------------------------------------------
LSTM_CALL_CASES = {
    "x rank 2": (dict(x=np.zeros((BATCH, FEATURES))), ValueError,
                 [r"\bx\b", r"rank 3", r"\(batch, time, features\)", r"\(2, 3\)"]),
    "x rank 4": (dict(x=np.zeros((1, BATCH, STEPS, FEATURES))), ValueError, [r"\bx\b", "rank 3", r"\(1, 2, 5, 3\)"]),
    "x features": (dict(x=np.zeros((BATCH, STEPS, FEATURES + 2))), ValueError, [r"\bx\b", "5 features", "built for 3"]),
    "x strings": (dict(x=np.full((BATCH, STEPS, FEATURES), "a")), TypeError, [r"\bx\b", "numeric", "<U1"]),
    "x objects": (dict(x=np.empty((BATCH, STEPS, FEATURES), object)), TypeError, [r"\bx\b", "numeric", "object"]),
    "x ragged lists": (dict(x=[[[1.0, 2.0, 3.0]], [[1.0]]]), TypeError, [r"\bx\b", "numeric", "list", "inhomogeneous"]),
    "x None": (dict(x=None), TypeError, [r"\bx\b", "numeric", "NoneType"]),
    "x complex": (dict(x=np.zeros((BATCH, STEPS, FEATURES), complex)), TypeError, [r"\bx\b", "real", "complex"]),
    "mask not bool": (dict(mask=np.ones((BATCH, STEPS))), TypeError, ["mask", "boolean", "float64"]),
    "mask int": (dict(mask=np.ones((BATCH, STEPS), int)), TypeError, ["mask", "boolean", "int"]),
    "mask shape": (dict(mask=np.ones((BATCH, STEPS - 1), bool)), ValueError, ["mask", r"\(2, 5\)", r"\(2, 4\)"]),
    "mask transposed": (dict(mask=np.ones((STEPS, BATCH), bool)), ValueError, ["mask", r"\(2, 5\)", r"\(5, 2\)"]),
    "mask and lengths": (dict(mask=np.ones((BATCH, STEPS), bool), lengths=[5, 5]), ValueError, ["mask", "lengths"]),
    "lengths negative": (dict(lengths=[3, -1]), ValueError, ["lengths", ">= 0", "-1"]),
    "lengths above time": (dict(lengths=[3, 6]), ValueError, ["lengths", r"<= time steps \(5\)", "6"]),
    "lengths shape": (dict(lengths=[3, 2, 1]), ValueError, ["lengths", r"\(2,\)", r"\(3,\)"]),
    "lengths fractional": (dict(lengths=[1.5, 2]), ValueError, ["lengths", "integers", "1.5"]),
    "lengths strings": (dict(lengths=["a", "b"]), TypeError, ["lengths", "integers", "<U1"]),
    "initial_state h shape": (dict(initial_state=[np.zeros((BATCH, UNITS + 1)), STATE[1]]), ValueError,
                              [r"initial_state\[0\]", r"\(2, 4\)", r"\(2, 5\)"]),
    "initial_state c shape": (dict(initial_state=[STATE[0], np.zeros((BATCH + 1, UNITS))]), ValueError,
                              [r"initial_state\[1\]", r"\(2, 4\)", r"\(3, 4\)"]),
    "initial_state not a list": (dict(initial_state=STATE[0]), ValueError,
                                 ["initial_state", r"\[h0, c0\]", r"\(2, 4\)", "ndarray"]),
    "initial_state one array": (dict(initial_state=[STATE[0]]), ValueError, ["initial_state", "length 1"]),
    "initial_state None entry": (dict(initial_state=[STATE[0], None]), ValueError,
                                 [r"initial_state\[1\]", r"\(2, 4\)", "None"]),
    "initial_state strings": (dict(initial_state=[np.full((BATCH, UNITS), "a"), STATE[1]]), TypeError,
                              [r"initial_state\[0\]", "numeric"]),
}


@pytest.mark.parametrize("stateful", [False, True], ids=["stateless", "stateful"])
@pytest.mark.parametrize("case", list(LSTM_CALL_CASES), ids=str)
def test_lstm_call_bad_input(case, stateful):
    arguments, exception, patterns = LSTM_CALL_CASES[case]
    layer, reference = twins(lambda: built_lstm(stateful=stateful, return_sequences=True, dropout=0.2))
    if stateful:  # carry a state, so that an error must leave it in place
        layer(X)
        reference(X)
    before = snapshot(layer)
    arguments = dict(arguments)
    x = arguments.pop("x", X)
    with expect_error(exception, *patterns):
        layer(x, training=True, **arguments)
    assert_untouched(layer, before, reference)


def test_time_major_rank_error_names_time_major_layout():
    layer = built_lstm(time_major=True)
    with expect_error(ValueError, r"\bx\b", "rank 3", r"\(time, batch, features\)", r"\(2, 3\)"):
        layer(np.zeros((2, 3)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_names_first_bad_row_and_step(bad):
    layer, reference = twins(lambda: built_lstm(return_sequences=True))
    before = snapshot(layer)
    x = X.copy()
    x[1, 3, 2] = bad
    x[1, 4, 0] = bad
    with expect_error(ValueError, r"\bx\b", "non-finite", "batch row 1", "time step 3"):
        layer(x, check_finite=True)
    assert_untouched(layer, before, reference)
    # Without check_finite, non-finite inputs propagate (as in Keras and PyTorch).
    y = layer(x)
    assert np.isfinite(y[0]).all() and np.isfinite(y[1, :3]).all()
    if np.isnan(bad):
        assert np.isnan(y[1, 3:]).all()


def test_check_finite_time_major_reports_batch_row_and_time_step():
    layer = built_lstm(time_major=True)
    x = np.swapaxes(X, 0, 1).copy()
    x[2, 1, 0] = np.nan  # time step 2 of batch row 1
    with expect_error(ValueError, "batch row 1", "time step 2"):
        layer(x, check_finite=True)


def test_bad_first_call_leaves_layer_unbuilt():
    layer = le.LSTM(UNITS, backend="numpy", seed=3)
    with expect_error(ValueError, "mask"):
        layer(np.zeros((BATCH, STEPS, 7)), mask=np.ones((BATCH, 1), bool))
    assert not layer.built
    layer(X)
    assert layer.input_size == FEATURES
    fresh = le.LSTM(UNITS, backend="numpy", seed=3)
    np.testing.assert_array_equal(layer(X), fresh(X))  # the seeded weights are not disturbed


# -- constructor arguments ------------------------------------------------------------
CONSTRUCTOR_CASES = {
    "activation": (dict(activation="gelu"), ["activation", "tanh", "relu", "sigmoid", "linear", "'gelu'"]),
    "recurrent_activation": (dict(recurrent_activation="tanh"),
                             ["recurrent_activation", "sigmoid", "hard_sigmoid", "'tanh'"]),
    "kernel_initializer": (dict(kernel_initializer="he_normal"),
                           ["kernel_initializer", "glorot_uniform", "'he_normal'"]),
    "recurrent_initializer": (dict(recurrent_initializer="identity"), ["recurrent_initializer", "orthogonal"]),
    "bias_initializer": (dict(bias_initializer=3), ["bias_initializer", "zeros", "3"]),
    "dropout 1": (dict(dropout=1.0), ["dropout", r"\[0, 1\)", "1.0"]),
    "dropout negative": (dict(dropout=-0.1), ["dropout", r"\[0, 1\)", "-0.1"]),
    "dropout string": (dict(dropout="0.5"), ["dropout", r"\[0, 1\)", "'0.5'"]),
    "recurrent_dropout": (dict(recurrent_dropout=1.5), ["recurrent_dropout", r"\[0, 1\)", "1.5"]),
    "units 0": (dict(units=0), ["units", "positive integer", "0"]),
    "units float": (dict(units=2.5), ["units", "positive integer", "2.5"]),
    "dtype": (dict(dtype="float16"), ["dtype", "float32", "float64", "float16"]),
    "seed": (dict(seed=1.5), ["seed", "integer", "1.5"]),
    "backend unknown": (dict(backend="nope"), ["backend", "'nope'", "available backends", "numpy"]),
    "backend not a name": (dict(backend=3), ["backend", "3"]),
}


@pytest.mark.parametrize("case", list(CONSTRUCTOR_CASES), ids=str)
@pytest.mark.parametrize("cls", [le.LSTM, le.LSTMCell], ids=["LSTM", "LSTMCell"])
def test_constructor_bad_options(cls, case):
    options, patterns = CONSTRUCTOR_CASES[case]
    options = dict(options)
    units = options.pop("units", UNITS)
    with expect_error(ValueError, *patterns):
        cls(units, **options)


def test_callable_initializer_with_wrong_shape():
    layer = le.LSTM(UNITS, kernel_initializer=lambda shape, rng: np.zeros((1, 1)), backend="numpy")
    with expect_error(ValueError, "kernel_initializer", r"\(1, 1\)", r"\(3, 16\)"):
        layer.build(FEATURES)


def test_bad_merge_mode_and_wrapped_layer():
    with expect_error(ValueError, "merge_mode", "concat", "'max'"):
        le.Bidirectional(le.LSTM(UNITS), merge_mode="max")
    with expect_error(TypeError, "layer", "LSTM", "LSTMCell"):
        le.Bidirectional(le.LSTMCell(UNITS))
    with expect_error(ValueError, "backward_layer.go_backwards"):
        le.Bidirectional(le.LSTM(UNITS), backward_layer=le.LSTM(UNITS))
    with expect_error(ValueError, "backward_layer.return_sequences"):
        le.Bidirectional(le.LSTM(UNITS), backward_layer=le.LSTM(UNITS, go_backwards=True, return_sequences=True))


def test_bad_dropout_layer_and_sequential_members():
    with expect_error(ValueError, "rate", r"\[0, 1\)", "1.5"):
        le.Dropout(1.5)
    with expect_error(TypeError, r"layers\[1\]", "LSTM, Bidirectional, Dropout, Dense, Embedding", "str"):
        le.Sequential([le.LSTM(UNITS), "lstm"])
    with expect_error(ValueError, r"layers\[0\]", "return_state"):
        le.Sequential([le.LSTM(UNITS, return_state=True)])
    with expect_error(ValueError, r"layers\[1\]", "merge_mode=None"):
        le.Sequential([le.LSTM(UNITS, return_sequences=True), le.Bidirectional(le.LSTM(UNITS), merge_mode=None)])


# -- set_weights ------------------------------------------------------------------------
def lstm_weights(input_size=FEATURES, units=UNITS):
    return [np.ones((input_size, 4 * units)), np.ones((units, 4 * units)), np.ones(4 * units)]


SET_WEIGHTS_CASES = {
    "too few": (lstm_weights()[:2], ValueError, ["set_weights", "3 arrays", "kernel, recurrent_kernel, bias", "got 2"]),
    "too many": (lstm_weights() + [np.ones(3)], ValueError, ["set_weights", "3 arrays", "got 4"]),
    "kernel shape": (lstm_weights(input_size=5), ValueError, ["kernel", r"\(3, 16\)", r"\(5, 16\)"]),
    "recurrent shape": ([np.ones((3, 16)), np.ones((4, 12)), np.ones(16)], ValueError,
                        ["recurrent_kernel", r"\(4, 16\)", r"\(4, 12\)"]),
    "bias shape": ([np.ones((3, 16)), np.ones((4, 16)), np.ones(15)], ValueError, ["bias", r"\(16,\)", r"\(15,\)"]),
    "non-numeric": ([np.ones((3, 16)), np.ones((4, 16)), np.full(16, "a")], TypeError, ["bias", "real numbers", "<U1"]),
    "complex": ([np.ones((3, 16)) + 1j, np.ones((4, 16)), np.ones(16)], TypeError,
                ["kernel", "real numbers", "complex"]),
}


@pytest.mark.parametrize("case", list(SET_WEIGHTS_CASES), ids=str)
def test_lstm_set_weights_bad(case):
    weights, exception, patterns = SET_WEIGHTS_CASES[case]
    layer, reference = twins(lambda: built_lstm(return_sequences=True))
    before = snapshot(layer)
    with expect_error(exception, *patterns):
        layer.set_weights(weights)
    assert_untouched(layer, before, reference)


def test_set_weights_unbuilt_layer_stays_unbuilt():
    layer = le.LSTM(UNITS)
    with expect_error(ValueError, "kernel", r"\(16,\)"):
        layer.set_weights([np.ones(16), np.ones((4, 16)), np.ones(16)])
    assert not layer.built
    with expect_error(ValueError, "set_weights", "2 arrays", "kernel, recurrent_kernel"):
        le.LSTM(UNITS, use_bias=False).set_weights(lstm_weights())


def test_bidirectional_set_weights_bad_changes_neither_direction():
    layer, reference = twins(
        lambda: le.Bidirectional(le.LSTM(UNITS, return_sequences=True, seed=2, backend="numpy")).build(FEATURES))
    before = snapshot(layer)
    with expect_error(ValueError, "set_weights", "6 arrays", "got 3"):
        layer.set_weights(lstm_weights())
    with expect_error(ValueError, "recurrent_kernel", r"\(4, 16\)", r"\(3, 16\)"):
        layer.set_weights(lstm_weights() + [np.ones((3, 16)), np.ones((3, 16)), np.ones(16)])
    assert_untouched(layer, before, reference)


def test_sequential_set_weights_bad_changes_no_layer():
    model, reference = twins(lambda: le.Sequential([
        le.LSTM(UNITS, return_sequences=True, seed=3, backend="numpy"), le.Dropout(0.5, seed=5),
        le.LSTM(2, seed=4, backend="numpy")]).build(FEATURES))
    before = snapshot(model)
    with expect_error(ValueError, "set_weights", "6 arrays", "got 3"):
        model.set_weights(lstm_weights())
    # The first layer's arrays are good, the second layer's are not: nothing may change.
    with expect_error(ValueError, "kernel", r"\(4, 8\)", r"\(5, 8\)"):
        model.set_weights(lstm_weights() + lstm_weights(input_size=5, units=2))
    assert_untouched(model, before, reference)


# -- backward --------------------------------------------------------------------------
def test_backward_before_any_training_forward():
    layer = built_lstm()
    with expect_error(RuntimeError, "backward", "training=True"):
        layer.backward(np.zeros((BATCH, UNITS)))
    layer(X, training=False)
    with expect_error(RuntimeError, "training=True"):
        layer.backward(np.zeros((BATCH, UNITS)))
    layer(X, training=True)
    layer.backward(np.zeros((BATCH, UNITS)))
    with expect_error(RuntimeError, "once"):
        layer.backward(np.zeros((BATCH, UNITS)))


@pytest.mark.parametrize("return_sequences", [True, False], ids=["seq", "last"])
def test_backward_wrong_gradient_shapes_keep_the_tape(return_sequences):
    layer, reference = twins(lambda: built_lstm(return_sequences=return_sequences, return_state=True))
    y = layer(X, training=True)[0]
    reference(X, training=True)
    shape = y.shape
    wrong = shape[:-1] + (shape[-1] + 1,)
    dy = RNG.normal(size=shape).astype("float32")
    with expect_error(ValueError, r"\bdy\b", re.escape(str(shape)), re.escape(str(wrong))):
        layer.backward(np.zeros(wrong))
    with expect_error(ValueError, r"\bdh\b", r"\(2, 4\)", r"\(2, 3\)"):
        layer.backward(dy, dh=np.zeros((BATCH, 3)))
    with expect_error(ValueError, r"\bdc\b", r"\(2, 4\)", r"\(1, 4\)"):
        layer.backward(dy, dc=np.zeros((1, UNITS)))
    with expect_error(TypeError, r"\bdy\b", "numeric"):
        layer.backward(np.full(shape, "a"))
    # The tape survived: the valid backward gives what a clean layer gives.
    np.testing.assert_array_equal(layer.backward(dy), reference.backward(dy))
    for name in reference.grads:
        np.testing.assert_array_equal(layer.grads[name], reference.grads[name])


@pytest.mark.parametrize("merge_mode", ["concat", "sum", None])
def test_bidirectional_backward_wrong_shapes_keep_the_tape(merge_mode):
    layer, reference = twins(lambda: le.Bidirectional(
        le.LSTM(UNITS, return_sequences=True, return_state=True, seed=5, backend="numpy"),
        merge_mode=merge_mode).build(FEATURES))
    outputs = layer(X, training=True)
    reference(X, training=True)
    width = 2 * UNITS if merge_mode == "concat" else UNITS
    dy_shape = (BATCH, STEPS, UNITS) if merge_mode is None else (BATCH, STEPS, width)
    dy_one = RNG.normal(size=dy_shape).astype("float32")
    dy = [dy_one, dy_one] if merge_mode is None else dy_one
    if merge_mode is None:
        with expect_error(ValueError, r"\bdy\b", r"\[dy_forward, dy_backward\]"):
            layer.backward(dy_one)
    else:
        with expect_error(ValueError, r"\bdy\b", re.escape(str(dy_shape)), r"\(2, 5, 1\)"):
            layer.backward(np.zeros((BATCH, STEPS, 1)))
    good_state = np.zeros((BATCH, UNITS), "float32")
    with expect_error(ValueError, "dstates"):
        layer.backward(dy, [good_state] * 3)
    # A bad gradient for the backward direction's state is found before either direction's backward runs.
    with expect_error(ValueError, r"dstates\[3\]", r"\(2, 4\)", r"\(2, 3\)"):
        layer.backward(dy, [good_state] * 3 + [np.zeros((BATCH, 3))])
    with expect_error(ValueError, r"dstates\[0\]", r"\(2, 4\)", r"\(1, 4\)"):
        layer.backward(dy, [np.zeros((1, UNITS))] + [good_state] * 3)
    assert len(outputs) == (6 if merge_mode is None else 5)
    np.testing.assert_array_equal(layer.backward(dy), reference.backward(dy))
    for name in reference.grads:
        np.testing.assert_array_equal(layer.grads[name], reference.grads[name])


def test_sequential_and_dropout_backward_errors():
    model = le.Sequential([le.LSTM(UNITS, return_sequences=True, seed=6, backend="numpy"), le.Dropout(0.3, seed=1),
                           le.LSTM(2, seed=7, backend="numpy")])
    with expect_error(RuntimeError, "training=True"):
        model.backward(np.zeros((BATCH, 2)))
    model(X, training=True)
    with expect_error(ValueError, r"\bdy\b", r"\(2, 2\)", r"\(2, 3\)"):
        model.backward(np.zeros((BATCH, 3)))
    assert model.backward(np.ones((BATCH, 2))).shape == X.shape
    with expect_error(RuntimeError, "training=True"):
        le.Dropout(0.5).backward(np.zeros(3))
    dropout = le.Dropout(0.5, seed=0)
    dropout(np.ones((2, 3)), training=True)
    with expect_error(ValueError, r"\bdy\b", r"\(2, 3\)", r"\(3, 2\)"):
        dropout.backward(np.ones((3, 2)))


# -- LSTMCell ----------------------------------------------------------------------------
def test_cell_bad_input():
    cell, reference = twins(lambda: le.LSTMCell(UNITS, seed=8, dropout=0.2, backend="numpy").build(FEATURES))
    x_t = X[:, 0]
    with expect_error(ValueError, r"\bx_t\b", "rank 2", r"\(batch, features\)", r"\(2, 5, 3\)"):
        cell(X)
    with expect_error(ValueError, r"\bx_t\b", "5 features", "built for 3"):
        cell(np.zeros((BATCH, 5)))
    with expect_error(ValueError, r"states\[1\]", r"\(2, 4\)", r"\(2, 3\)"):
        cell(x_t, [STATE[0], np.zeros((BATCH, 3))])
    with expect_error(ValueError, "states", r"\[h, c\]"):
        cell(x_t, STATE[0])
    with expect_error(TypeError, r"\bx_t\b", "numeric"):
        cell(np.full((BATCH, FEATURES), "a"))
    with expect_error(RuntimeError, "backward", "training=True"):
        cell.backward(STATE[0])
    h, _ = cell(x_t, STATE, training=True)
    with expect_error(ValueError, r"\bdh\b", r"\(2, 4\)", r"\(2, 5\)"):
        cell.backward(np.zeros((BATCH, 5)))
    with expect_error(ValueError, r"\bdc\b", r"\(2, 4\)", r"\(3, 4\)"):
        cell.backward(STATE[1], np.zeros((3, UNITS)))
    # Nothing consumed: the valid backward matches a clean cell.
    expected_h, _ = reference(x_t, STATE, training=True)
    np.testing.assert_array_equal(h, expected_h)
    dx, (dh, dc) = cell.backward(STATE[1])
    expected_dx, (expected_dh, expected_dc) = reference.backward(STATE[1])
    np.testing.assert_array_equal(dx, expected_dx)
    np.testing.assert_array_equal(dh, expected_dh)
    np.testing.assert_array_equal(dc, expected_dc)


# -- Bidirectional and Sequential calls ---------------------------------------------------
def test_bidirectional_bad_backward_state_changes_nothing():
    """The backward direction's initial state is checked before the forward direction runs."""
    layer, reference = twins(lambda: le.Bidirectional(le.LSTM(
        UNITS, return_sequences=True, stateful=True, dropout=0.3, seed=9, backend="numpy")).build(FEATURES))
    layer(X, training=True)
    reference(X, training=True)
    forward_states = [s.copy() for s in layer.forward_layer.states]
    with expect_error(ValueError, r"initial_state\[3\]", r"\(2, 4\)", r"\(2, 3\)"):
        layer(X, initial_state=STATE + [STATE[0], np.zeros((BATCH, 3))], training=True)
    with expect_error(ValueError, "initial_state", r"\[h_fw, c_fw, h_bw, c_bw\]", "length 2"):
        layer(X, initial_state=STATE)
    for actual, expected in zip(layer.forward_layer.states, forward_states):
        np.testing.assert_array_equal(actual, expected)
    # Dropout generators were not advanced either: the next call matches the clean copy.
    np.testing.assert_array_equal(layer(X, training=True), reference(X, training=True))


def test_sequential_bad_call_arguments():
    model = le.Sequential([le.LSTM(UNITS, return_sequences=True, seed=10, backend="numpy"),
                           le.LSTM(2, seed=11, backend="numpy")])
    with expect_error(ValueError, "mask", "lengths"):
        model(X, mask=np.ones((BATCH, STEPS), bool), lengths=[5, 5])
    with expect_error(ValueError, "lengths", "<= time steps", "9"):
        model(X, lengths=[9, 1])
    with expect_error(ValueError, "mask", r"\(2, 5\)", r"\(2, 4\)"):
        model(X, mask=np.ones((BATCH, STEPS - 1), bool))
    with expect_error(ValueError, r"\bx\b", "rank 3"):
        model(X[0])
