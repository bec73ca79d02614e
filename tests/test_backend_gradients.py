"""Finite-difference gradient checks in float64, on every backend that computes in float64.

Each check perturbs weights, inputs and initial states in place (central
differences, ``lstmeng.testing.finite_difference_check``) and compares with
the backend's explicit backward pass: the LSTM layer (masked steps, both
directions, return_state, zero_output_for_mask), the cell unrolled over a
few steps, Bidirectional, and a 3-layer Sequential. This is independent of
the NumPy reference: it catches a bug shared by every backend.

Weights are perturbed through ``layer.params`` (the live arrays an optimizer
updates in place), so a backend that caches stale copies of them fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

import lstmeng as le
from lstmeng.testing import finite_difference_check

from _backends import AVAILABLE, dtypes_of, is_simulated, random_weights, to_host

FLOAT64_BACKENDS = [pytest.param(name, id=name) for name in AVAILABLE if "float64" in dtypes_of(name)]


def _sizes(backend_name):
    """(batch, steps, input_size, units, entries checked per array).

    Every array is checked; TensorFlow's per-call overhead (~50 ms) and the
    simulator's slowness get fewer entries per array.
    """
    if is_simulated(backend_name):
        return 2, 3, 2, 2, 1
    return 3, 5, 3, 4, (2 if backend_name == "tensorflow" else 5)


def _checked(arrays, backend_name):
    """The arrays to perturb: all of them, or for the simulator (every call runs the
    kernels in Python) the inputs, the initial states and the first and last weight
    arrays; every weight's gradient still feeds dx, which is checked."""
    if not is_simulated(backend_name):
        return arrays
    weights = [name for name in arrays if name.endswith(("kernel", "bias"))]
    keep = {name for name in arrays if name not in weights} | {weights[0], weights[-1]}
    return {name: array for name, array in arrays.items() if name in keep}


def _simulator_budget(backend_name, case_index):
    """The simulator runs the first case of a parametrised family only (CI time budget)."""
    if is_simulated(backend_name) and case_index > 0:
        pytest.skip("CUDA simulator: the first case of this family only, to keep CI within its budget")


def _mask(batch, steps):
    """Right padding, a hole and a fully-masked row (when batch allows), so masked steps are crossed."""
    mask = np.ones((batch, steps), bool)
    mask[0, -1] = False
    mask[-1, 1] = False
    if batch > 2:
        mask[1] = False
    return mask


LAYER_OPTIONS = [
    dict(return_sequences=True, activation="tanh", recurrent_activation="sigmoid"),
    dict(return_sequences=True, go_backwards=True, zero_output_for_mask=True,
         activation="sigmoid", recurrent_activation="hard_sigmoid"),
    dict(return_sequences=False, go_backwards=True),
    dict(return_sequences=False, zero_output_for_mask=True, use_bias=False),
]


@pytest.mark.parametrize("backend_name", FLOAT64_BACKENDS)
@pytest.mark.parametrize("options", LAYER_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_lstm_finite_differences(backend_name, options):
    _simulator_budget(backend_name, LAYER_OPTIONS.index(options) // 2)
    batch, steps, input_size, units, samples = _sizes(backend_name)
    rng = np.random.default_rng(1)
    layer = le.LSTM(units, return_state=True, dtype="float64", backend=backend_name, seed=3, **options)
    layer.build(input_size)
    layer.set_weights(random_weights(layer, rng))
    mask = _mask(batch, steps)
    inputs = {"x": rng.normal(size=(batch, steps, input_size)),
              "h0": rng.normal(size=(batch, units)) * 0.5, "c0": rng.normal(size=(batch, units)) * 0.5}
    y_shape = (batch, steps, units) if layer.return_sequences else (batch, units)
    loss_weights = [rng.normal(size=y_shape), rng.normal(size=(batch, units)), rng.normal(size=(batch, units))]

    def loss_and_grads():
        outputs = layer(inputs["x"], mask=mask, initial_state=[inputs["h0"], inputs["c0"]], training=True)
        loss = sum(float(np.sum(w * to_host(o))) for w, o in zip(loss_weights, outputs))
        dx = layer.backward(*loss_weights)
        dh0, dc0 = layer.initial_state_grads
        return loss, dict(layer.grads, x=to_host(dx), h0=to_host(dh0), c0=to_host(dc0))

    finite_difference_check(loss_and_grads, _checked({**layer.params, **inputs}, backend_name), rng=rng,
                            samples=samples)


@pytest.mark.parametrize("backend_name", FLOAT64_BACKENDS)
def test_cell_finite_differences(backend_name):
    """Three unrolled steps: the tape, state gradients and accumulated weight gradients."""
    batch, _, input_size, units, samples = _sizes(backend_name)
    steps = 3
    rng = np.random.default_rng(2)
    cell = le.LSTMCell(units, dtype="float64", backend=backend_name, seed=4)
    cell.build(input_size)
    cell.set_weights(random_weights(cell, rng))
    inputs = {"x": rng.normal(size=(steps, batch, input_size)),
              "h0": rng.normal(size=(batch, units)), "c0": rng.normal(size=(batch, units))}
    h_weights = rng.normal(size=(steps, batch, units))
    c_weight = rng.normal(size=(batch, units))

    def loss_and_grads():
        states, loss = [inputs["h0"], inputs["c0"]], 0.0
        for t in range(steps):
            h, states = cell(inputs["x"][t], states, training=True)
            loss += float(np.sum(h_weights[t] * to_host(h)))
        loss += float(np.sum(c_weight * to_host(states[1])))
        dh, dc, dx = np.zeros((batch, units)), c_weight, np.zeros_like(inputs["x"])
        for t in reversed(range(steps)):
            step_dx, (dh, dc) = cell.backward(to_host(dh) + h_weights[t], to_host(dc))
            dx[t] = to_host(step_dx)
        return loss, dict(cell.grads, x=dx, h0=to_host(dh), c0=to_host(dc))

    finite_difference_check(loss_and_grads, _checked({**cell.params, **inputs}, backend_name), rng=rng,
                            samples=samples)


@pytest.mark.parametrize("backend_name", FLOAT64_BACKENDS)
@pytest.mark.parametrize("merge_mode", ["concat", "mul"])
@pytest.mark.parametrize("return_sequences", [True, False])
def test_bidirectional_finite_differences(backend_name, merge_mode, return_sequences):
    _simulator_budget(backend_name, (merge_mode != "concat") + (not return_sequences))
    batch, steps, input_size, units, samples = _sizes(backend_name)
    rng = np.random.default_rng(3)
    bi = le.Bidirectional(le.LSTM(units, return_sequences=return_sequences, return_state=True, dtype="float64",
                                  backend=backend_name, seed=5), merge_mode=merge_mode)
    bi.build(input_size)
    bi.set_weights(random_weights(bi.forward_layer, rng) + random_weights(bi.backward_layer, rng))
    mask = _mask(batch, steps)
    inputs = {"x": rng.normal(size=(batch, steps, input_size))}
    inputs.update({f"state{k}": rng.normal(size=(batch, units)) * 0.5 for k in range(4)})
    width = 2 * units if merge_mode == "concat" else units
    dy = rng.normal(size=(batch, steps, width) if return_sequences else (batch, width))
    dstates = [rng.normal(size=(batch, units)) for _ in range(4)]

    def loss_and_grads():
        y, *states = bi(inputs["x"], mask=mask, initial_state=[inputs[f"state{k}"] for k in range(4)],
                        training=True)
        loss = float(np.sum(dy * to_host(y))) + sum(float(np.sum(w * to_host(s))) for w, s in zip(dstates, states))
        dx = bi.backward(dy, dstates)
        grads = dict(bi.grads, x=to_host(dx))
        grads.update({f"state{k}": to_host(g) for k, g in enumerate(bi.initial_state_grads)})
        return loss, grads

    finite_difference_check(loss_and_grads, _checked({**bi.params, **inputs}, backend_name), rng=rng,
                            samples=samples)


@pytest.mark.parametrize("backend_name", FLOAT64_BACKENDS)
def test_sequential_three_layers_finite_differences(backend_name):
    batch, steps, input_size, units, samples = _sizes(backend_name)
    rng = np.random.default_rng(4)
    model = le.Sequential([
        le.Bidirectional(le.LSTM(units, return_sequences=True, dtype="float64", backend=backend_name, seed=6)),
        le.LSTM(units, return_sequences=True, go_backwards=True, dtype="float64", backend=backend_name, seed=7),
        le.LSTM(units, dtype="float64", backend=backend_name, seed=8),
    ])
    model.build(input_size)
    model.set_weights([w for layer in (model.layers[0].forward_layer, model.layers[0].backward_layer,
                                       model.layers[1], model.layers[2])
                       for w in random_weights(layer, rng)])
    lengths = np.arange(batch) % steps + 1
    lengths[0] = steps
    inputs = {"x": rng.normal(size=(batch, steps, input_size))}
    dy = rng.normal(size=(batch, units))

    def loss_and_grads():
        y = model(inputs["x"], lengths=lengths, training=True)
        loss = float(np.sum(dy * to_host(y)))
        dx = model.backward(dy)
        return loss, dict(model.grads, x=to_host(dx))

    finite_difference_check(loss_and_grads, _checked({**model.params, **inputs}, backend_name), rng=rng,
                            samples=samples)
