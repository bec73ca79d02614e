"""Backward without dx (``input_grad=False``) through the layers, Sequential and le.fit: dx is
None, every other gradient as with dx, and the backend is asked for no dx product."""

from __future__ import annotations

import numpy as np
import pytest

import lstmeng as le
from lstmeng.backends import registry


def _spy_on_input_grad(monkeypatch, backend_name):
    """The ``input_grad`` of every ``sequence_backward`` call of the backend, in call order."""
    backend = registry.get_backend_object(backend_name)
    asked = []
    original = backend.sequence_backward

    def spy(*args, input_grad=True, **kwargs):
        asked.append(input_grad)
        return original(*args, input_grad=input_grad, **kwargs)

    monkeypatch.setattr(backend, "sequence_backward", spy)
    return asked


def _assert_same_grads(first, second):
    assert sorted(first.grads) == sorted(second.grads)
    for name in first.grads:
        np.testing.assert_array_equal(np.asarray(first.grads[name]), np.asarray(second.grads[name]),
                                      err_msg=name)


@pytest.mark.parametrize("backend_name", ["numpy", "cython"])
@pytest.mark.parametrize("make_layer", [
    lambda backend: le.LSTM(5, return_sequences=True, backend=backend, seed=0),
    lambda backend: le.LSTM(5, time_major=True, go_backwards=True, backend=backend, seed=0),
    lambda backend: le.Bidirectional(le.LSTM(5, return_sequences=True, backend=backend, seed=0)),
], ids=["lstm", "time_major_backwards", "bidirectional"])
def test_layer_backward_without_input_grad(backend_name, make_layer, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 2)).astype("float32")
    with_dx, without_dx = make_layer(backend_name), make_layer(backend_name)
    dy = None
    for layer in (with_dx, without_dx):
        y = layer(x, training=True)
        dy = np.asarray(rng.normal(size=np.shape(y)), "float32") if dy is None else dy
    asked = _spy_on_input_grad(monkeypatch, backend_name)
    assert with_dx.backward(dy).shape == x.shape
    assert without_dx.backward(dy, input_grad=False) is None
    directions = len(asked) // 2
    assert asked == [True] * directions + [False] * directions
    _assert_same_grads(with_dx, without_dx)


@pytest.mark.parametrize("first", ["lstm", "dense"])
def test_sequential_backward_without_input_grad(first, monkeypatch):
    """A recurrent first layer skips dx; a Dense first layer computes it as usual; None either way."""
    def model():
        head = (le.LSTM(6, return_sequences=True, backend="cython", seed=0) if first == "lstm"
                else le.Dense(6, seed=0))
        return le.Sequential([head, le.LSTM(4, return_sequences=True, backend="cython", seed=1),
                              le.LSTM(3, backend="cython", seed=2), le.Dense(1, seed=3)])

    x = np.random.default_rng(1).normal(size=(5, 7, 2)).astype("float32")
    with_dx, without_dx = model(), model()
    for network in (with_dx, without_dx):
        network(x, training=True)
    asked = _spy_on_input_grad(monkeypatch, "cython")
    dy = np.ones((5, 1), "float32")
    assert with_dx.backward(dy).shape == x.shape
    assert without_dx.backward(dy, input_grad=False) is None
    recurrent = 3 if first == "lstm" else 2
    assert asked[:recurrent] == [True] * recurrent
    assert asked[recurrent:] == [True] * (recurrent - 1) + [first != "lstm"]
    _assert_same_grads(with_dx, without_dx)


def test_fit_asks_for_no_input_gradient(monkeypatch):
    rng = np.random.default_rng(2)
    x, targets = rng.normal(size=(16, 5, 3)).astype("float32"), rng.normal(size=(16, 1)).astype("float32")
    model = le.Sequential([le.LSTM(4, return_sequences=True, backend="numpy", seed=0),
                           le.LSTM(4, backend="numpy", seed=1), le.Dense(1, seed=2)])
    asked = _spy_on_input_grad(monkeypatch, "numpy")
    le.fit(model, "mse", le.optim.SGD(model, lr=0.1), (x, targets), batch_size=8, progress=False)
    assert asked == [True, False] * 2      # two batches: the second layer's dx, not the first's
