"""LSTMENG_DEBUG=1: an input changed in place between a training forward and its backward is caught.

The workspace references the caller's ``x`` (issue 13, item 9); under the debug
switch the tape keeps a checksum of it and ``backward`` raises on a mismatch,
naming the argument, before anything is consumed or computed.
"""

from __future__ import annotations

import numpy as np
import pytest

import lstmeng as le

from _backends import CUDA_SIMULATED, backends, numba_cuda_backend

RNG = np.random.default_rng(0)
MESSAGE = r"x was modified in place since the training forward call .* pass a copy \(x.copy\(\)\)"


@pytest.fixture
def debug(monkeypatch):
    monkeypatch.setenv("LSTMENG_DEBUG", "1")


def make_x(batch=2, steps=3, features=4, dtype="float32"):
    return RNG.normal(size=(batch, steps, features)).astype(dtype)


# Host x on the host backends (a GPU layer copies a host x in; tensorflow copies it into a tf.Tensor).
@pytest.mark.parametrize("backend", backends(exclude=("tensorflow", "numba_cuda")))
@pytest.mark.parametrize("options", [{}, {"time_major": True, "return_sequences": True}, {"go_backwards": True}],
                         ids=["plain", "time_major", "go_backwards"])
def test_lstm_raises_on_x_changed_in_place(backend, options, debug):
    lstm = le.LSTM(3, seed=0, backend=backend, **options)
    x = make_x()
    y = lstm(x, training=True)
    saved = x[1, 2, 1]
    x[1, 2, 1] = saved + 1.0
    with pytest.raises(RuntimeError, match=MESSAGE):
        lstm.backward(np.ones(y.shape, "float32"))
    assert len(lstm._tapes) == 1, "the failed backward consumed its tape entry"
    x[1, 2, 1] = saved   # restored: the entry is still there and backpropagates
    assert lstm.backward(np.ones(y.shape, "float32")).shape == x.shape


def test_unchanged_x_gives_the_gradients_of_a_run_without_the_switch(monkeypatch):
    x, mask = make_x(), le.lengths_to_mask([3, 1], maxlen=3)
    results = []
    for value in ("0", "1"):
        monkeypatch.setenv("LSTMENG_DEBUG", value)
        lstm = le.LSTM(3, return_sequences=True, seed=0, backend="numpy")
        y = lstm(x, mask=mask, training=True)
        results.append((lstm.backward(np.ones_like(y)), dict(lstm.grads)))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    for name in results[0][1]:
        np.testing.assert_array_equal(results[0][1][name], results[1][1][name])


def test_off_by_default_and_read_at_the_forward(monkeypatch):
    monkeypatch.delenv("LSTMENG_DEBUG", raising=False)
    lstm = le.LSTM(3, seed=0, backend="numpy")
    x = make_x()
    y = lstm(x, training=True)
    x += 1.0
    lstm.backward(np.ones_like(y))   # unchecked: the rule is the caller's to keep
    for off in ("", "0", "false", "off"):
        monkeypatch.setenv("LSTMENG_DEBUG", off)
        y = lstm(x, training=True)
        x += 1.0
        lstm.backward(np.ones_like(y))
    # A forward under the switch is checked at its backward even if the switch went off in between.
    monkeypatch.setenv("LSTMENG_DEBUG", "1")
    y = lstm(x, training=True)
    monkeypatch.setenv("LSTMENG_DEBUG", "0")
    x += 1.0
    with pytest.raises(RuntimeError, match=MESSAGE):
        lstm.backward(np.ones_like(y))


def test_a_cast_copy_is_not_the_callers_array(debug):
    """A float64 x given to a float32 layer is copied, so changing it is harmless and not an error."""
    lstm = le.LSTM(3, seed=0, backend="numpy")
    x = make_x(dtype="float64")
    expected_layer = le.LSTM(3, seed=0, backend="numpy")
    y_expected = expected_layer(x.astype("float32"), training=True)
    expected = expected_layer.backward(np.ones_like(y_expected))
    y = lstm(x, training=True)
    x[:] = 0.0
    np.testing.assert_array_equal(lstm.backward(np.ones_like(y)), expected)


def test_bidirectional_raises_and_consumes_nothing(debug):
    bi = le.Bidirectional(le.LSTM(3, return_sequences=True, seed=0, backend="numpy"))
    x = make_x()
    y = bi(x, training=True)
    x[0, 0, 0] = 7.0
    with pytest.raises(RuntimeError, match=MESSAGE):
        bi.backward(np.ones_like(y))
    assert len(bi._tapes) == len(bi.forward_layer._tapes) == len(bi.backward_layer._tapes) == 1


def test_sequential_raises_for_its_input(debug):
    model = le.Sequential([le.LSTM(3, return_sequences=True, seed=0, backend="numpy"),
                           le.LSTM(2, seed=1, backend="numpy")])
    x = make_x()
    y = model(x, training=True)
    x *= 2.0
    with pytest.raises(RuntimeError, match=MESSAGE):
        model.backward(np.ones_like(y))


def test_cell_raises_for_x_t(debug):
    cell = le.LSTMCell(3, seed=0, backend="numpy")
    x_t = make_x()[:, 0]
    h, states = cell(x_t, training=True)
    h2, _ = cell(x_t.copy(), states, training=True)
    x_t[0, 0] = 9.0
    cell.backward(np.ones_like(h2))   # the second step's input was a copy: unchanged
    with pytest.raises(RuntimeError, match=r"x_t was modified in place .* \(x_t.copy\(\)\)"):
        cell.backward(np.ones_like(h))


def test_tensorflow_tensors_are_not_checksummed(debug):
    """A tf.Tensor cannot change in place; a host x given to the tensorflow backend is copied into one."""
    tf = pytest.importorskip("tensorflow")
    lstm = le.LSTM(3, seed=0, backend="tensorflow")
    y = lstm(tf.constant(make_x()), training=True)
    assert lstm._tapes.last.input_guard is None
    lstm.backward(tf.ones_like(y))


def test_cuda_input_changed_in_place(debug):
    """A CUDA x is referenced on the device: the checksum copies it to the host (debug only)."""
    backend = numba_cuda_backend()
    if CUDA_SIMULATED:
        pytest.skip("the simulator's device arrays have no __cuda_array_interface__: lstmeng sees host arrays")
    from numba import cuda
    x_host = make_x(1, 2, 2)
    x = cuda.to_device(x_host)
    lstm = le.LSTM(2, seed=0, backend="numba_cuda")
    y = lstm(x, training=True)
    x.copy_to_device(x_host + 1.0)
    with pytest.raises(RuntimeError, match=MESSAGE):
        lstm.backward(backend.ops.asarray(np.ones(backend.ops.to_numpy(y).shape, "float32"), np.dtype("float32")))


def test_host_input_of_a_gpu_layer_is_a_copy(debug):
    """A host x given to a layer on the GPU is copied in: not the caller's array, so no checksum."""
    numba_cuda_backend()
    lstm = le.LSTM(2, seed=0, backend="numba_cuda")
    x = make_x(1, 2, 2)
    y = lstm(x, training=True)
    assert lstm._tapes.last.input_guard is None
    x[:] = 0.0
    assert lstm.backward(np.ones_like(y)).shape == x.shape


def test_dense_and_embedding_raise_on_input_changed_in_place(debug):
    """Dense keeps the caller's x for its kernel gradient and Embedding the caller's ids for its
    table's gradient: both are guarded like LSTM's x."""
    dense = le.Dense(3, seed=0)
    x = make_x()
    y = dense(x, training=True)
    x[0, 0, 0] += 1.0
    with pytest.raises(RuntimeError, match=MESSAGE):
        dense.backward(np.ones_like(y))
    x[0, 0, 0] -= 1.0   # restored: the same backward now runs
    assert dense.backward(np.ones_like(y)).shape == x.shape

    embedding = le.Embedding(10, 4, seed=0)
    ids = np.array([[1, 2, 3], [4, 5, 0]])
    out = embedding(ids, training=True)
    ids[1, 2] = 7
    with pytest.raises(RuntimeError, match="ids was modified in place"):
        embedding.backward(np.ones_like(out))


def test_dense_unguarded_without_the_switch(monkeypatch):
    monkeypatch.delenv("LSTMENG_DEBUG", raising=False)
    dense = le.Dense(3, seed=0)
    x = make_x()
    y = dense(x, training=True)
    x[0, 0, 0] += 1.0   # not checked (and not an error) with the switch off
    dense.backward(np.ones_like(y))
