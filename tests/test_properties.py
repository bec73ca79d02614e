"""Property-based tests: every available backend against the NumPy reference.

Hypothesis draws a whole layer configuration (shapes including empty batches
and zero steps, every Core option, dropout with a fixed seed, a mask of any
pattern) and the same layer runs on the backend under test and on
backend="numpy" through the public API. Outputs, final states, dx, every
weight gradient and the initial-state gradients must agree within
``lstmeng.testing.TOLERANCES``. Metamorphic properties (go_backwards = forward on
the flipped sequence, time_major = transposed, lengths = mask, rows are
independent, fully-masked rows keep the initial state) check every backend,
the reference included, against itself.

Runs are reproducible: derandomize=True, bounded example counts, no deadline.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lstmeng as le
from lstmeng.backends.base import ACTIVATIONS, RECURRENT_ACTIVATIONS

from _backends import assert_close, backends, dtypes_of, is_simulated, random_weights, size_limits, to_host

COMPARED = backends(exclude=("numpy",))  # numpy vs itself proves nothing; it gets the metamorphic tests


def _settings(name, examples, simulated_examples):
    """Bounded, reproducible runs; TensorFlow (tens of ms of overhead per call) gets half the examples."""
    if is_simulated(name):
        examples = simulated_examples
    elif name == "tensorflow":
        examples = max(1, examples // 2)
    return settings(max_examples=examples, deadline=None,
                    derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@st.composite
def masks(draw, batch, steps):
    """(mask, lengths): none, lengths, or any bool [B, T] (holes, left/right padding, empty rows)."""
    kind = draw(st.sampled_from(["none", "lengths", "any", "all_false", "left"]))
    if kind == "none" or batch == 0:
        return None, None
    if kind == "lengths":
        return None, np.array(draw(st.lists(st.integers(0, steps), min_size=batch, max_size=batch)))
    if kind == "all_false":
        return np.zeros((batch, steps), bool), None
    if kind == "left":
        lengths = np.array(draw(st.lists(st.integers(0, steps), min_size=batch, max_size=batch)))
        return np.arange(steps)[None] >= (steps - lengths)[:, None], None
    flat = draw(st.lists(st.booleans(), min_size=batch * steps, max_size=batch * steps))
    return np.array(flat, bool).reshape(batch, steps), None


@st.composite
def layer_cases(draw, backend_name):
    """A random LSTM configuration and its inputs, sized for ``backend_name``."""
    max_batch, max_steps, max_input, max_units = size_limits(backend_name)
    batch = draw(st.integers(0, max_batch))
    steps = draw(st.integers(0, max_steps))
    activation = draw(st.sampled_from(ACTIVATIONS))
    case = {
        "dtype": draw(st.sampled_from(dtypes_of(backend_name))),
        "batch": batch, "steps": steps,
        "input_size": draw(st.integers(1, max_input)),
        "units": draw(st.integers(1, max_units)),
        "options": {
            "activation": activation,
            "recurrent_activation": draw(st.sampled_from(RECURRENT_ACTIVATIONS)),
            "use_bias": draw(st.booleans()),
            "return_sequences": draw(st.booleans()),
            "return_state": draw(st.booleans()),
            "go_backwards": draw(st.booleans()),
            "zero_output_for_mask": draw(st.booleans()),
            "time_major": draw(st.booleans()),
            "stateful": draw(st.booleans()),
            "dropout": draw(st.sampled_from([0.0, 0.0, 0.4])),
            "recurrent_dropout": draw(st.sampled_from([0.0, 0.0, 0.3])),
        },
        "initial_state": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }
    case["mask"], case["lengths"] = draw(masks(batch, steps))
    return case


def _make_layer(case, backend_name):
    layer = le.LSTM(case["units"], dtype=case["dtype"], backend=backend_name, seed=case["seed"],
                    **case["options"])
    layer.build(case["input_size"])
    layer.set_weights(random_weights(layer, np.random.default_rng(case["seed"])))
    return layer


def _inputs(case):
    rng = np.random.default_rng(case["seed"] + 1)
    dtype = case["dtype"]
    batch, steps, units = case["batch"], case["steps"], case["units"]
    x = rng.normal(size=(batch, steps, case["input_size"])).astype(dtype)
    if case["options"]["time_major"]:
        x = np.ascontiguousarray(np.swapaxes(x, 0, 1))
    state = [rng.normal(size=(batch, units)).astype(dtype) * 0.5 for _ in range(2)]
    if case["options"]["return_sequences"]:
        y_shape = (steps, batch, units) if case["options"]["time_major"] else (batch, steps, units)
    else:
        y_shape = (batch, units)
    grads = {"dy": rng.normal(size=y_shape).astype(dtype),
             "dh": rng.normal(size=(batch, units)).astype(dtype),
             "dc": rng.normal(size=(batch, units)).astype(dtype)}
    return x, state, grads


def _call(layer, case, x, state, training):
    return layer(x, mask=case["mask"], lengths=case["lengths"],
                 initial_state=state if case["initial_state"] else None, training=training)


def _as_list(result):
    return list(result) if isinstance(result, (list, tuple)) else [result]


def check_against_reference(backend_name, case):
    """Run ``case`` on ``backend_name`` and on numpy; compare every output and gradient."""
    dtype = case["dtype"]
    x, state, grads = _inputs(case)
    layers = {name: _make_layer(case, name) for name in ("numpy", backend_name)}
    results = {}
    for name, layer in layers.items():
        if case["options"]["stateful"]:
            _call(layer, {**case, "initial_state": False}, x, state, training=False)  # carry states into the next call
        outputs = [to_host(a) for a in _as_list(_call(layer, case, x, state, training=True))]
        if case["options"]["return_state"]:
            dx = layer.backward(grads["dy"], grads["dh"], grads["dc"])
        else:
            dx = layer.backward(grads["dy"])
        inference = [to_host(a) for a in _as_list(_call(layer, case, x, state, training=False))]
        results[name] = {"outputs": outputs, "dx": to_host(dx), "grads": dict(layer.grads),
                         "initial_state_grads": layer.initial_state_grads, "inference": inference}
    expected, actual = results["numpy"], results[backend_name]
    label = f"{backend_name} vs numpy, case {case}"
    for index, (a, e) in enumerate(zip(actual["outputs"], expected["outputs"])):
        assert_close(a, e, f"output {index}: {label}", dtype)
    for index, (a, e) in enumerate(zip(actual["inference"], expected["inference"])):
        assert_close(a, e, f"inference output {index}: {label}", dtype)
    assert_close(actual["dx"], expected["dx"], f"dx: {label}", dtype, gradient=True)
    assert sorted(actual["grads"]) == sorted(expected["grads"]), label
    for key in expected["grads"]:
        assert_close(actual["grads"][key], expected["grads"][key], f"d{key}: {label}", dtype, gradient=True)
    if case["initial_state"]:
        for a, e, what in zip(actual["initial_state_grads"], expected["initial_state_grads"], ("dh0", "dc0")):
            assert_close(a, e, f"{what}: {label}", dtype, gradient=True)
    else:
        assert actual["initial_state_grads"] is None and expected["initial_state_grads"] is None, label


@pytest.mark.parametrize("backend_name", COMPARED)
def test_layer_matches_reference(backend_name):
    @_settings(backend_name, examples=60, simulated_examples=6)
    @given(case=layer_cases(backend_name))
    def run(case):
        check_against_reference(backend_name, case)

    run()


# -- Bidirectional and the cell ----------------------------------------------------------------

@pytest.mark.parametrize("backend_name", COMPARED)
def test_bidirectional_matches_reference(backend_name):
    max_batch, max_steps, max_input, max_units = size_limits(backend_name)

    @_settings(backend_name, examples=20, simulated_examples=3)
    @given(dtype=st.sampled_from(dtypes_of(backend_name)), batch=st.integers(1, max_batch),
           steps=st.integers(1, max_steps), input_size=st.integers(1, max_input),
           units=st.integers(1, max_units), merge_mode=st.sampled_from(["concat", "sum", "mul", "ave"]),
           return_sequences=st.booleans(), data=st.data(), seed=st.integers(0, 2**16))
    def run(dtype, batch, steps, input_size, units, merge_mode, return_sequences, data, seed):
        mask, lengths = data.draw(masks(batch, steps))
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(batch, steps, input_size)).astype(dtype)
        state = [rng.normal(size=(batch, units)).astype(dtype) for _ in range(4)]
        dy_shape = (batch, steps) if return_sequences else (batch,)
        dy = rng.normal(size=dy_shape + (2 * units if merge_mode == "concat" else units,)).astype(dtype)
        results = {}
        for name in ("numpy", backend_name):
            bi = le.Bidirectional(le.LSTM(units, return_sequences=return_sequences, dtype=dtype, backend=name,
                                          dropout=0.2, recurrent_dropout=0.2, seed=seed), merge_mode=merge_mode)
            bi.build(input_size)
            weight_rng = np.random.default_rng(seed)
            bi.set_weights(random_weights(bi.forward_layer, weight_rng) + random_weights(bi.backward_layer, weight_rng))
            y = to_host(bi(x, mask=mask, lengths=lengths, initial_state=state, training=True))
            dx = to_host(bi.backward(dy))
            results[name] = (y, dx, dict(bi.grads), [to_host(g) for g in bi.initial_state_grads])
        (y_ref, dx_ref, grads_ref, state_ref), (y, dx, grads, state_grads) = results["numpy"], results[backend_name]
        label = f"{backend_name} Bidirectional {merge_mode} B{batch} T{steps} mask={mask} lengths={lengths}"
        assert_close(y, y_ref, "y " + label, dtype)
        assert_close(dx, dx_ref, "dx " + label, dtype, gradient=True)
        for key in grads_ref:
            assert_close(grads[key], grads_ref[key], f"d{key} {label}", dtype, gradient=True)
        for index, (a, e) in enumerate(zip(state_grads, state_ref)):
            assert_close(a, e, f"initial state grad {index} {label}", dtype, gradient=True)

    run()


@pytest.mark.parametrize("backend_name", COMPARED)
def test_cell_unrolled_matches_reference(backend_name):
    """A few unrolled cell steps (dropout masks reused per sequence), backward step by step."""
    max_batch, max_steps, max_input, max_units = size_limits(backend_name)

    @_settings(backend_name, examples=20, simulated_examples=3)
    @given(dtype=st.sampled_from(dtypes_of(backend_name)), batch=st.integers(0, max_batch),
           steps=st.integers(1, max_steps), input_size=st.integers(1, max_input),
           units=st.integers(1, max_units), dropout=st.sampled_from([0.0, 0.3]),
           activation=st.sampled_from(ACTIVATIONS), recurrent_activation=st.sampled_from(RECURRENT_ACTIVATIONS),
           seed=st.integers(0, 2**16))
    def run(dtype, batch, steps, input_size, units, dropout, activation, recurrent_activation, seed):
        rng = np.random.default_rng(seed)
        xs = rng.normal(size=(steps, batch, input_size)).astype(dtype)
        h0, c0 = (rng.normal(size=(batch, units)).astype(dtype) for _ in range(2))
        dhs = rng.normal(size=(steps, batch, units)).astype(dtype)
        results = {}
        for name in ("numpy", backend_name):
            cell = le.LSTMCell(units, dtype=dtype, backend=name, dropout=dropout, recurrent_dropout=dropout,
                               activation=activation, recurrent_activation=recurrent_activation, seed=seed)
            cell.build(input_size)
            cell.set_weights(random_weights(cell, np.random.default_rng(seed)))
            states, hs = [h0, c0], []
            for t in range(steps):
                h, states = cell(xs[t], states, training=True)
                hs.append(to_host(h))
            dh, dc, dxs = np.zeros((batch, units), dtype), np.zeros((batch, units), dtype), []
            for t in reversed(range(steps)):
                dx, (dh, dc) = cell.backward(to_host(dh) + dhs[t], to_host(dc))
                dxs.append(to_host(dx))
            results[name] = (hs, to_host(states[1]), dxs, to_host(dh), to_host(dc), dict(cell.grads))
        expected, actual = results["numpy"], results[backend_name]
        label = f"{backend_name} cell B{batch} T{steps} I{input_size} H{units} {activation}/{recurrent_activation}"
        for t, (a, e) in enumerate(zip(actual[0], expected[0])):
            assert_close(a, e, f"h step {t} {label}", dtype)
        assert_close(actual[1], expected[1], "final c " + label, dtype)
        for t, (a, e) in enumerate(zip(actual[2], expected[2])):
            assert_close(a, e, f"dx step {t} {label}", dtype, gradient=True)
        assert_close(actual[3], expected[3], "dh0 " + label, dtype, gradient=True)
        assert_close(actual[4], expected[4], "dc0 " + label, dtype, gradient=True)
        for key in expected[5]:
            assert_close(actual[5][key], expected[5][key], f"d{key} {label}", dtype, gradient=True)

    run()


# -- metamorphic properties, every backend including the reference ---------------------------------

def _property_layer(backend_name, dtype, units, input_size, seed, **options):
    layer = le.LSTM(units, dtype=dtype, backend=backend_name, seed=seed, **options)
    layer.build(input_size)
    layer.set_weights(random_weights(layer, np.random.default_rng(seed)))
    return layer


@pytest.mark.parametrize("backend_name", backends())
def test_metamorphic_properties(backend_name):
    max_batch, max_steps, max_input, max_units = size_limits(backend_name)

    @_settings(backend_name, examples=25, simulated_examples=2)
    @given(dtype=st.sampled_from(dtypes_of(backend_name)), batch=st.integers(2, max(2, max_batch)),
           steps=st.integers(1, max_steps), input_size=st.integers(1, max_input),
           units=st.integers(1, max_units), zero_output_for_mask=st.booleans(),
           return_sequences=st.booleans(), data=st.data(), seed=st.integers(0, 2**16))
    def run(dtype, batch, steps, input_size, units, zero_output_for_mask, return_sequences, data, seed):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(batch, steps, input_size)).astype(dtype)
        h0, c0 = (rng.normal(size=(batch, units)).astype(dtype) for _ in range(2))
        lengths = np.array(data.draw(st.lists(st.integers(0, steps), min_size=batch, max_size=batch)))
        mask, _ = data.draw(masks(batch, steps))
        if mask is None:
            mask = np.ones((batch, steps), bool)
        options = dict(zero_output_for_mask=zero_output_for_mask, return_sequences=return_sequences,
                       return_state=True)
        label = f"{backend_name} B{batch} T{steps} mask={mask.astype(int).tolist()}"

        def run_layer(inputs, layer_mask, go_backwards=False, time_major=False, state=(h0, c0), **call):
            layer = _property_layer(backend_name, dtype, units, input_size, seed, go_backwards=go_backwards,
                                    time_major=time_major, **options)
            return [to_host(a) for a in layer(inputs, mask=layer_mask, initial_state=list(state), **call)]

        forward = run_layer(x, mask)
        # go_backwards = processing the flipped sequence forward (outputs in processing order).
        backwards = run_layer(x, mask, go_backwards=True)
        flipped = run_layer(np.ascontiguousarray(x[:, ::-1]), np.ascontiguousarray(mask[:, ::-1]))
        for a, e, what in zip(backwards, flipped, ("y", "h", "c")):
            assert_close(a, e, f"go_backwards {what} {label}", dtype)
        # time_major = the batch-major result with batch and time swapped.
        time_major = run_layer(np.ascontiguousarray(np.swapaxes(x, 0, 1)), mask, time_major=True)
        y_tm = np.swapaxes(time_major[0], 0, 1) if return_sequences else time_major[0]
        assert_close(y_tm, forward[0], "time_major y " + label, dtype)
        assert_close(time_major[1], forward[1], "time_major h " + label, dtype)
        # lengths = the mask arange(T) < lengths.
        by_lengths = run_layer(x, None, lengths=lengths)
        by_mask = run_layer(x, np.arange(steps)[None] < lengths[:, None])
        for a, e, what in zip(by_lengths, by_mask, ("y", "h", "c")):
            assert_close(a, e, f"lengths {what} {label}", dtype)
        # Rows are independent: the first row alone gives the first row of the batch.
        alone = run_layer(x[:1], mask[:1], state=(h0[:1], c0[:1]))
        for a, e, what in zip(alone, forward, ("y", "h", "c")):
            assert_close(a, e[:1], f"row independence {what} {label}", dtype)
        # A fully masked row keeps its initial state and outputs zeros.
        empty_rows = ~mask.any(axis=1)
        assert np.all(forward[0][empty_rows] == 0), label
        np.testing.assert_array_equal(forward[1][empty_rows], h0[empty_rows], err_msg=label)
        np.testing.assert_array_equal(forward[2][empty_rows], c0[empty_rows], err_msg=label)

    run()


@pytest.mark.parametrize("backend_name", backends())
@pytest.mark.parametrize("batch, steps", [(0, 3), (2, 0), (0, 0)])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_empty_shapes(backend_name, batch, steps, return_sequences):
    """Empty batch / zero steps: correctly shaped outputs; zero steps return the initial state."""
    layer = le.LSTM(3, return_sequences=return_sequences, return_state=True, backend=backend_name, seed=0)
    x = np.zeros((batch, steps, 2), "float32")
    h0 = np.full((batch, 3), 0.25, "float32")
    y, h, c = (to_host(a) for a in layer(x, initial_state=[h0, -h0], training=True))
    assert y.shape == ((batch, steps, 3) if return_sequences else (batch, 3))
    np.testing.assert_array_equal(h, h0)
    np.testing.assert_array_equal(c, -h0)
    dx = to_host(layer.backward(np.ones(y.shape, "float32"), np.ones_like(h0), np.ones_like(h0)))
    assert dx.shape == x.shape
    dh0, dc0 = (to_host(g) for g in layer.initial_state_grads)
    # With no step the final state is the initial state: its gradient passes through unchanged.
    np.testing.assert_array_equal(dh0, np.ones_like(h0))
    np.testing.assert_array_equal(dc0, np.ones_like(h0))
    assert all(np.all(g == 0) for g in layer.grads.values())
