"""Determinism: the same seed gives bit-identical results on one backend, and the
same dropout masks (hence the same numbers within tolerance) on every backend.

Dropout masks are drawn by the layer from its seeded generator and handed to
the backend, so a backend cannot change them; these tests check that no
backend adds nondeterminism of its own (racing reductions, uninitialised or
reused buffers, state left over from a previous call).
"""

from __future__ import annotations

import numpy as np
import pytest

import lstmeng as le

from _backends import assert_close, backends, dtypes_of, is_simulated, to_host


def _shapes(backend_name):
    """(batch, steps, input_size, units)."""
    return (2, 3, 3, 2) if is_simulated(backend_name) else (4, 7, 5, 6)


def _inputs(backend_name, dtype, seed=0):
    batch, steps, input_size, units = _shapes(backend_name)
    rng = np.random.default_rng(seed)
    mask = rng.random((batch, steps)) < 0.7
    mask[0] = True
    return {"x": rng.normal(size=(batch, steps, input_size)).astype(dtype), "mask": mask,
            "state": [rng.normal(size=(batch, units)).astype(dtype) for _ in range(2)],
            "dy": rng.normal(size=(batch, steps, units)).astype(dtype)}


def _train_step(backend_name, dtype, inputs, seed=11, layer=None, **options):
    """One forward (training) + backward of a fresh layer (or ``layer``); host results."""
    if layer is None:
        units = inputs["state"][0].shape[1]
        layer = le.LSTM(units, return_sequences=True, return_state=True, dtype=dtype, backend=backend_name,
                        seed=seed, **options)
    y, h, c = layer(inputs["x"], mask=inputs["mask"], initial_state=inputs["state"], training=True)
    dx = layer.backward(inputs["dy"], inputs["state"][0], inputs["state"][1])
    result = {"y": to_host(y), "h": to_host(h), "c": to_host(c), "dx": to_host(dx),
              "dh0": to_host(layer.initial_state_grads[0]), "dc0": to_host(layer.initial_state_grads[1])}
    result.update({f"d{name}": value for name, value in layer.grads.items()})
    return result


def _assert_bit_identical(first, second, what):
    for name in first:
        assert first[name].tobytes() == second[name].tobytes(), f"{what}: {name} differs between runs"


@pytest.mark.parametrize("backend_name", backends())
def test_same_seed_bit_identical(backend_name):
    for dtype in dtypes_of(backend_name):
        inputs = _inputs(backend_name, dtype)
        first = _train_step(backend_name, dtype, inputs, dropout=0.3, recurrent_dropout=0.3)
        second = _train_step(backend_name, dtype, inputs, dropout=0.3, recurrent_dropout=0.3)
        _assert_bit_identical(first, second, f"{backend_name} {dtype}, two fresh layers with seed 11")


@pytest.mark.parametrize("backend_name", backends())
def test_repeated_calls_on_one_layer_bit_identical(backend_name):
    """Calling the same layer again (and between, on another batch size) changes nothing."""
    dtype = dtypes_of(backend_name)[0]
    inputs = _inputs(backend_name, dtype)
    other = _inputs(backend_name, dtype, seed=5)
    other = {"x": other["x"][:1], "mask": other["mask"][:1], "state": [s[:1] for s in other["state"]],
             "dy": other["dy"][:1]}
    batch, steps, input_size, units = _shapes(backend_name)
    layer = le.LSTM(units, return_sequences=True, return_state=True, dtype=dtype, backend=backend_name, seed=2)
    first = _train_step(backend_name, dtype, inputs, layer=layer)
    _train_step(backend_name, dtype, other, layer=layer)
    layer(np.full_like(inputs["x"], 3.0), training=False)  # an inference call between the two
    second = _train_step(backend_name, dtype, inputs, layer=layer)
    _assert_bit_identical(first, second, f"{backend_name} {dtype}, one layer called again")


@pytest.mark.parametrize("backend_name", backends())
def test_bidirectional_and_sequential_bit_identical(backend_name):
    dtype = dtypes_of(backend_name)[0]
    batch, steps, input_size, units = _shapes(backend_name)
    inputs = _inputs(backend_name, dtype)
    runs = []
    for _ in range(2):
        model = le.Sequential([
            le.Bidirectional(le.LSTM(units, return_sequences=True, dropout=0.2, recurrent_dropout=0.2,
                                     dtype=dtype, backend=backend_name, seed=1)),
            le.Dropout(0.25, seed=2),
            le.LSTM(units, dtype=dtype, backend=backend_name, seed=3)])
        y = to_host(model(inputs["x"], mask=inputs["mask"], training=True))
        dx = to_host(model.backward(np.ones_like(y)))
        runs.append(dict(model.grads, y=y, dx=dx))
    _assert_bit_identical(runs[0], runs[1], f"{backend_name} {dtype} Sequential with dropout")


@pytest.mark.parametrize("backend_name", backends(exclude=("numpy",)))
def test_dropout_masks_same_on_every_backend(backend_name):
    """Same seed: the same dropout masks as the numpy backend, so the same numbers.

    Dropped input features get exactly zero dx at every step; the set of
    those zeros must be the same as the reference's, and everything else
    must match within tolerance.
    """
    dtype = dtypes_of(backend_name)[0]
    inputs = _inputs(backend_name, dtype)
    options = dict(dropout=0.5, recurrent_dropout=0.5)
    expected = _train_step("numpy", dtype, inputs, **options)
    actual = _train_step(backend_name, dtype, inputs, **options)
    for name in expected:
        assert_close(actual[name], expected[name], f"{backend_name} vs numpy with dropout: {name}", dtype,
                     gradient=name.startswith("d"))
    dropped = np.all(expected["dx"] == 0, axis=1)  # [B, I]: input feature dropped for this row
    assert dropped.any() and not dropped.all(), "seed 11 should drop some features, not all"
    np.testing.assert_array_equal(np.all(actual["dx"] == 0, axis=1), dropped)
    # Not vacuous: without dropout the numbers differ.
    undropped = _train_step(backend_name, dtype, inputs)
    assert not np.allclose(undropped["y"], actual["y"])


@pytest.mark.parametrize("backend_name", backends())
def test_different_seeds_give_different_masks(backend_name):
    dtype = dtypes_of(backend_name)[0]
    inputs = _inputs(backend_name, dtype)
    first = _train_step(backend_name, dtype, inputs, seed=1, dropout=0.5)
    second = _train_step(backend_name, dtype, inputs, seed=2, dropout=0.5)
    assert not np.array_equal(first["dx"] == 0, second["dx"] == 0)
