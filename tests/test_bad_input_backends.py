"""Bad input on every backend and every public entry point.

tests/test_errors.py checks each bad argument's exception and message on
the reference backend; this module checks the per-backend guarantees:

- the bad call raises before the backend is invoked (its sequence and cell
  calls are counted), with the same exception type on every backend;
- the layer's weights (and carried states, and a pending backward's tape)
  are unchanged afterwards, and the next valid call equals a numpy layer that
  never saw the bad input;
- backend-owned arrays (tf.Tensor, CUDA device arrays) of the wrong dtype
  or rank are rejected like host arrays;
- non-finite inputs stay in their own batch rows on every backend;
- save/load keeps the backend; ``le.load`` of truncated or corrupted files
  (every truncation point, seeded byte corruption) raises ValueError or
  yields exactly the saved model, and a file whose weights disagree with its
  config, or are not real numbers, raises ValueError;
- from_keras / from_torch reject foreign objects and convert onto every backend.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle

import numpy as np
import pytest

import lstmeng as le
from lstmeng.backends import registry

from _backends import AVAILABLE, assert_close, backends, to_host

BATCH, STEPS, FEATURES, UNITS = 2, 3, 2, 2
RNG = np.random.default_rng(0)
X = RNG.normal(size=(BATCH, STEPS, FEATURES)).astype("float32")
STATE = [RNG.normal(size=(BATCH, UNITS)).astype("float32") for _ in range(2)]
MASK = np.array([[True, True, False], [False, True, True]])


@contextlib.contextmanager
def backend_calls(backend_name):
    """Count the backend's compute calls made inside the block: ``calls["n"]``."""
    backend = registry.get_backend_object(backend_name)
    calls = {"n": 0}
    names = ("sequence_forward", "sequence_backward", "cell_forward", "cell_backward")
    originals = {name: getattr(backend, name) for name in names}

    def counting(original):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            return original(*args, **kwargs)
        return wrapper

    for name, original in originals.items():
        setattr(backend, name, counting(original))
    try:
        yield calls
    finally:
        for name in names:
            delattr(backend, name)  # back to the class's methods


def _lstm(backend_name, **options):
    return le.LSTM(UNITS, backend=backend_name, seed=1, bias_initializer="normal", **options).build(FEATURES)


def _weights(layer):
    return [w.copy() for w in layer.get_weights()]


def _assert_weights(layer, weights):
    for actual, expected in zip(layer.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(actual, expected)


def _valid_call_matches_numpy(layer, backend_name, make, **call):
    """The next valid training call + backward equals a fresh numpy twin's."""
    twin = make("numpy")
    twin.set_weights(layer.get_weights())
    if getattr(layer, "states", None) is not None:
        twin.reset_state([to_host(s) for s in layer.states])
    results = []
    for candidate in (layer, twin):
        out = candidate(X, training=True, **call)
        out = out[0] if isinstance(out, list) else out
        dx = candidate.backward(np.ones(tuple(out.shape), "float32"))
        results.append((to_host(out), to_host(dx)))
    assert_close(results[0][0], results[1][0], f"{backend_name}: valid call after the error", "float32")
    assert_close(results[0][1], results[1][1], f"{backend_name}: dx after the error", "float32", gradient=True)


LSTM_BAD_CALLS = {
    "x rank 2": (dict(x=X[:, 0]), ValueError),
    "x features": (dict(x=np.zeros((BATCH, STEPS, FEATURES + 1), "float32")), ValueError),
    "x strings": (dict(x=np.full((BATCH, STEPS, FEATURES), "a")), TypeError),
    "x complex": (dict(x=X.astype(complex)), TypeError),
    "mask float": (dict(mask=MASK.astype(float)), TypeError),
    "mask shape": (dict(mask=MASK[:, :2]), ValueError),
    "mask and lengths": (dict(mask=MASK, lengths=[1, 2]), ValueError),
    "lengths above time": (dict(lengths=[1, STEPS + 1]), ValueError),
    "lengths negative": (dict(lengths=[-1, 2]), ValueError),
    "initial_state shape": (dict(initial_state=[STATE[0][:, :1], STATE[1]]), ValueError),
    "initial_state count": (dict(initial_state=[STATE[0]]), ValueError),
    "non-finite with check_finite": (dict(x=np.where(np.arange(STEPS)[None, :, None] == 1, np.nan, X),
                                          check_finite=True), ValueError),
}


@pytest.mark.parametrize("backend_name", backends())
@pytest.mark.parametrize("stateful", [False, True], ids=["stateless", "stateful"])
@pytest.mark.parametrize("case", list(LSTM_BAD_CALLS))
def test_lstm_bad_call(backend_name, stateful, case):
    arguments, exception = LSTM_BAD_CALLS[case]
    layer = _lstm(backend_name, return_sequences=True, stateful=stateful)
    if stateful:
        layer(X)  # carries states into the next call
    weights = _weights(layer)
    states = None if layer.states is None else [to_host(s).copy() for s in layer.states]
    arguments = dict(arguments)
    x = arguments.pop("x", X)
    with backend_calls(backend_name) as calls, pytest.raises(exception):
        layer(x, training=True, **arguments)
    assert calls["n"] == 0, f"{backend_name} was called before the {case!r} error"
    _assert_weights(layer, weights)
    if states is not None:
        for actual, expected in zip(layer.states, states):
            np.testing.assert_array_equal(to_host(actual), expected)
    _valid_call_matches_numpy(layer, backend_name,
                              lambda name: _lstm(name, return_sequences=True, stateful=stateful), mask=MASK)


@pytest.mark.parametrize("backend_name", backends())
def test_backward_errors_keep_the_tape(backend_name):
    layer = _lstm(backend_name, return_sequences=True, return_state=True)
    with pytest.raises(RuntimeError, match="training=True"):
        layer.backward(np.ones((BATCH, STEPS, UNITS), "float32"))
    layer(X, mask=MASK, training=True)
    weights = _weights(layer)
    dy = np.ones((BATCH, STEPS, UNITS), "float32")
    with backend_calls(backend_name) as calls:
        for bad in (dict(dy=dy[:, :2]), dict(dy=dy, dh=np.ones((BATCH, UNITS + 1), "float32")),
                    dict(dy=dy, dc=np.ones((BATCH + 1, UNITS), "float32")), dict(dy=np.full(dy.shape, "x"))):
            with pytest.raises((ValueError, TypeError)):
                layer.backward(**bad)
    assert calls["n"] == 0
    _assert_weights(layer, weights)
    # The tape survived: the valid backward works and equals numpy's.
    dx = to_host(layer.backward(dy))
    twin = _lstm("numpy", return_sequences=True, return_state=True)
    twin.set_weights(weights)
    twin(X, mask=MASK, training=True)
    assert_close(dx, twin.backward(dy), f"{backend_name}: backward after rejected gradients", "float32", True)
    with pytest.raises(RuntimeError):
        layer.backward(dy)  # each forward is backpropagated once


@pytest.mark.parametrize("backend_name", backends())
def test_cell_bad_input(backend_name):
    def make(name):
        return le.LSTMCell(UNITS, backend=name, seed=2).build(FEATURES)

    cell = make(backend_name)
    weights = _weights(cell)
    bad_calls = [((X,), ValueError), ((X[:, 0, :1],), ValueError), ((X[:, 0], [STATE[0][:, :1], STATE[1]]), ValueError),
                 ((X[:, 0], STATE[0]), ValueError), ((np.full((BATCH, FEATURES), "a"),), TypeError)]
    with backend_calls(backend_name) as calls:
        for args, exception in bad_calls:
            with pytest.raises(exception):
                cell(*args, training=True)
        with pytest.raises(RuntimeError):
            cell.backward(np.ones((BATCH, UNITS), "float32"))
    assert calls["n"] == 0
    _assert_weights(cell, weights)
    twin = make("numpy")
    results = []
    for candidate in (cell, twin):
        h, (_, c) = candidate(X[:, 0], STATE, training=True)
        dx, (dh, dc) = candidate.backward(np.ones((BATCH, UNITS), "float32"))
        results.append([to_host(a) for a in (h, c, dx, dh, dc)])
    for index, (a, e) in enumerate(zip(*results)):
        assert_close(a, e, f"{backend_name}: cell result {index} after errors", "float32", gradient=index >= 2)


@pytest.mark.parametrize("backend_name", backends())
def test_bidirectional_bad_input(backend_name):
    def make(name):
        bi = le.Bidirectional(le.LSTM(UNITS, return_sequences=True, backend=name, seed=3))
        return bi.build(FEATURES)

    bi = make(backend_name)
    weights = _weights(bi)
    with backend_calls(backend_name) as calls:
        for arguments, exception in [(dict(initial_state=STATE), ValueError),
                                     (dict(initial_state=STATE + [STATE[0][:, :1], STATE[1]]), ValueError),
                                     (dict(mask=MASK[:1]), ValueError), (dict(lengths=[4, 1]), ValueError)]:
            with pytest.raises(exception):
                bi(X, training=True, **arguments)
        with pytest.raises(ValueError):
            bi.set_weights(weights[:3] + [weights[3][:1]] + weights[4:])
        with pytest.raises(RuntimeError):
            bi.backward(np.ones((BATCH, STEPS, 2 * UNITS), "float32"))
    assert calls["n"] == 0
    _assert_weights(bi, weights)
    bi(X, training=True)
    with pytest.raises(ValueError):
        bi.backward(np.ones((BATCH, STEPS, UNITS), "float32"))  # concat needs 2 * UNITS
    _assert_weights(bi, weights)
    bi.backward(np.ones((BATCH, STEPS, 2 * UNITS), "float32"))  # the tape survived the rejected gradient
    _valid_call_matches_numpy(bi, backend_name, make, lengths=[3, 1])


@pytest.mark.parametrize("backend_name", backends())
def test_sequential_bad_input(backend_name):
    def make(name):
        model = le.Sequential([le.LSTM(UNITS, return_sequences=True, backend=name, seed=4), le.Dropout(0.5, seed=5),
                               le.LSTM(UNITS, backend=name, seed=6)])
        return model.build(FEATURES)

    model = make(backend_name)
    weights = _weights(model)
    with backend_calls(backend_name) as calls:
        for arguments in [dict(mask=MASK, lengths=[1, 1]), dict(x=X[..., :1]), dict(x=X[0]), dict(mask=MASK.T)]:
            arguments = dict(arguments)
            with pytest.raises(ValueError):
                model(arguments.pop("x", X), training=True, **arguments)
        with pytest.raises(ValueError):
            model.set_weights(weights[:-1])
    assert calls["n"] == 0
    _assert_weights(model, weights)
    model.set_weights(weights)
    # The Dropout layer draws from its own seeded stream: compare with dropout off.
    model.layers[1].rate = 0.0
    _valid_call_matches_numpy(model, backend_name, lambda name: _without_dropout(make(name)), mask=MASK)


def _without_dropout(model):
    model.layers[1].rate = 0.0
    return model


@pytest.mark.parametrize("backend_name", [n for n in AVAILABLE if n in ("tensorflow", "numba_cuda")])
def test_backend_arrays_of_wrong_dtype_or_rank(backend_name):
    """A backend's own arrays (tf.Tensor, device arrays) are checked like host arrays."""
    backend = registry.get_backend_object(backend_name)
    layer = _lstm(backend_name)
    weights = _weights(layer)
    with backend_calls(backend_name) as calls:
        with pytest.raises(TypeError, match="float32"):
            layer(backend.ops.asarray(X.astype("float64"), np.float64))
        with pytest.raises(ValueError, match="rank 3"):
            layer(backend.ops.asarray(X[:, 0], np.float32))
        with pytest.raises(ValueError):
            layer(backend.ops.asarray(X, np.float32),
                  initial_state=[backend.ops.asarray(STATE[0][:1], np.float32), STATE[1]])
    assert calls["n"] == 0
    _assert_weights(layer, weights)
    expected = _lstm("numpy")(X)
    assert_close(to_host(layer(backend.ops.asarray(X, np.float32))), expected, f"{backend_name} device input",
                 "float32")


@pytest.mark.parametrize("backend_name", backends())
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_stays_in_its_row(backend_name, bad):
    """Without check_finite a NaN/inf propagates (as in Keras) but only within its own batch row."""
    layer = _lstm(backend_name, return_sequences=True)
    reference = _lstm("numpy", return_sequences=True)
    x = X.copy()
    x[0, 1, 0] = bad
    y = to_host(layer(x, training=True))
    dx = to_host(layer.backward(np.ones_like(y)))
    y_ref = reference(x, training=True)
    assert np.all(np.isfinite(y[1])) and np.all(np.isfinite(dx[1])), f"{backend_name}: row 1 contaminated"
    assert np.all(np.isfinite(y[0, 0])), f"{backend_name}: the step before the bad value is affected"
    if np.isnan(bad):
        assert np.all(np.isnan(y[0, 1:])), f"{backend_name}: NaN did not propagate along its row"
    assert_close(y[1], y_ref[1], f"{backend_name}: clean row next to a {bad} row", "float32")


def test_pad_sequences_bad_input_then_every_backend():
    with pytest.raises(ValueError, match="same number of features"):
        le.pad_batch([np.ones((2, 3)), np.ones((2, 4))])
    with pytest.raises(TypeError, match="numeric"):
        le.pad_batch([np.array([["a", "b"]])])
    with pytest.raises(ValueError, match="padding"):
        le.pad_batch([np.ones((2, 3))], padding="middle")
    with pytest.raises(ValueError, match="maxlen"):
        le.pad_batch([np.ones((2, 3))], maxlen=-1)
    with pytest.raises(TypeError):
        le.pad_batch(np.ones(3))
    x, mask = le.pad_batch([np.ones((3, 2)), np.ones((1, 2)), np.zeros((0, 2))], padding="pre")
    expected = _lstm("numpy")(x, mask=mask)
    for name in AVAILABLE:
        assert_close(to_host(_lstm(name)(x, mask=mask)), expected, f"{name} on pad_batch output", "float32")


# -- save / load ----------------------------------------------------------------------------------------------

def _saved_models(backend_name):
    lstm = _lstm(backend_name, return_sequences=True)
    bi = le.Bidirectional(le.LSTM(UNITS, return_sequences=True, backend=backend_name, seed=7)).build(FEATURES)
    model = le.Sequential([le.LSTM(UNITS, return_sequences=True, backend=backend_name, seed=8),
                           le.LSTM(UNITS, backend=backend_name, seed=9)]).build(FEATURES)
    cell = le.LSTMCell(UNITS, backend=backend_name, seed=10).build(FEATURES)
    return {"LSTM": lstm, "Bidirectional": bi, "Sequential": model, "LSTMCell": cell}


@pytest.mark.parametrize("backend_name", backends())
def test_save_load_keeps_backend_and_results(backend_name, tmp_path):
    for kind, original in _saved_models(backend_name).items():
        path = tmp_path / f"{kind}.npz"
        le.save(original, path)
        loaded = le.load(path)
        assert json.dumps(loaded.get_config(), sort_keys=True) == json.dumps(original.get_config(), sort_keys=True)
        _assert_weights(loaded, original.get_weights())
        if kind == "LSTMCell":
            y, y_loaded = original(X[:, 0])[0], loaded(X[:, 0])[0]
        else:
            y, y_loaded = original(X), loaded(X)
        assert_close(to_host(y_loaded), to_host(y), f"{backend_name} {kind} after load", "float32")


def _file_bytes(tmp_path, kind):
    path = tmp_path / f"{kind}-valid.npz"
    le.save(_saved_models("numpy")[kind], path)
    return path.read_bytes()


def _load_or_error(tmp_path, data):
    path = tmp_path / "damaged.npz"
    path.write_bytes(data)
    try:
        return le.load(path), None
    except ValueError as error:  # the only exception a damaged file may raise
        assert str(path) in str(error)
        return None, error


@pytest.mark.parametrize("kind", ["LSTM", "Bidirectional", "Sequential", "LSTMCell"])
def test_load_every_truncation_raises_value_error(kind, tmp_path):
    valid = _file_bytes(tmp_path, kind)
    for length in sorted(set(np.linspace(0, len(valid) - 1, 60).astype(int))):
        loaded, error = _load_or_error(tmp_path, valid[:length])
        assert error is not None, f"{kind}: a file truncated to {length}/{len(valid)} bytes loaded"


@pytest.mark.parametrize("kind", ["LSTM", "Bidirectional", "Sequential"])
def test_load_corrupted_bytes_raises_or_gives_the_saved_model(kind, tmp_path):
    """Seeded byte corruption: ValueError, or (a byte the format ignores) exactly the saved model."""
    valid = _file_bytes(tmp_path, kind)
    original = le.load(_write(tmp_path / "original.npz", valid))
    rng = np.random.default_rng(42)
    for _ in range(80):
        damaged = bytearray(valid)
        for position in rng.integers(0, len(valid), size=rng.integers(1, 4)):
            damaged[position] ^= int(rng.integers(1, 256))
        loaded, error = _load_or_error(tmp_path, bytes(damaged))
        if error is None:
            assert loaded.get_config() == original.get_config()
            _assert_weights(loaded, original.get_weights())


def _write(path, data):
    path.write_bytes(data)
    return path


def _npz(**arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _header(obj, count):
    document = {"format": "lstmeng", "version": 1, "class_name": type(obj).__name__, "config": obj.get_config(),
                "input_size": FEATURES, "weights": count}
    return np.array(json.dumps(document))


class _Payload:
    """Unpickling this creates a file: proof that something was executed."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return (open, (self.flag, "w"))


def _bad_weight_files(flag):
    bi = _saved_models("numpy")["Bidirectional"]
    model = _saved_models("numpy")["Sequential"]
    good_bi, good_model = bi.get_weights(), model.get_weights()
    files = {
        "bidirectional backward kernel shape": [*good_bi[:3], good_bi[3][:, :-1], *good_bi[4:]],
        "bidirectional extra weight": [*good_bi, good_bi[-1]],
        "sequential second layer units": [*good_model[:3], np.zeros((UNITS, 4 * UNITS + 4)), *good_model[4:]],
        "complex weights": [w.astype(complex) + 1j for w in good_bi],
        "string weights": [np.full(w.shape, "1.0") for w in good_bi],
        "bool weights": [np.ones(w.shape, bool) for w in good_bi],
        "0-d weight": [np.float32(1.0), *good_bi[1:]],
        "pickled weight among valid ones": [*good_bi[:-1], np.array([_Payload(flag)], dtype=object)],
    }
    owners = {name: (model if name.startswith("sequential") else bi) for name in files}
    return {name: _npz(__lstmeng__=_header(owners[name], len(arrays)),
                       **{f"weight_{i}": a for i, a in enumerate(arrays)}) for name, arrays in files.items()}


BAD_WEIGHT_FILES = ["bidirectional backward kernel shape", "bidirectional extra weight",
                    "sequential second layer units", "complex weights", "string weights", "bool weights",
                    "0-d weight", "pickled weight among valid ones"]


@pytest.mark.parametrize("name", BAD_WEIGHT_FILES)
def test_load_weights_disagreeing_with_config(name, tmp_path):
    flag = tmp_path / "executed.flag"
    files = _bad_weight_files(flag)
    assert sorted(files) == sorted(BAD_WEIGHT_FILES)
    with pytest.raises(ValueError, match="lstmeng"):
        le.load(_write(tmp_path / "bad.npz", files[name]))
    assert not flag.exists()


def test_pickle_payload_is_live(tmp_path):
    """The payload above really executes when unpickled (so the guard is not vacuous)."""
    flag = tmp_path / "executed.flag"
    pickle.loads(pickle.dumps(_Payload(flag)))
    assert flag.exists()


# -- conversion ---------------------------------------------------------------------------------------------------

def test_from_keras_and_from_torch_reject_foreign_objects():
    # from_keras reads objects by class name and attributes (it never imports Keras), so
    # lstmeng's own LSTM/Dropout pass for Keras ones; everything else is refused.
    for foreign in (object(), np.zeros(3), "LSTM", {"class_name": "LSTM"}):
        with pytest.raises(TypeError):
            le.from_keras(foreign)
    for foreign in (object(), np.zeros(3), "LSTM", le.LSTM(2)):
        with pytest.raises(TypeError):
            le.from_torch(foreign)


@pytest.mark.parametrize("backend_name", backends())
def test_from_torch_on_every_backend(backend_name):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="proj_size"):
        le.from_torch(torch.nn.LSTM(FEATURES, 4, proj_size=2), backend=backend_name)
    with pytest.raises(ValueError):
        le.from_torch(torch.nn.LSTM(FEATURES, UNITS), backend="no_such_backend")
    lstm = torch.nn.LSTM(FEATURES, UNITS, num_layers=2, bidirectional=True, batch_first=True)
    model = le.from_torch(lstm, backend=backend_name)
    with torch.no_grad():
        expected = lstm(torch.from_numpy(X))[0].numpy()
    assert_close(to_host(model(X)), expected, f"{backend_name}: from_torch output", "float32")


@pytest.mark.parametrize("backend_name", backends())
def test_from_keras_on_every_backend(backend_name):
    keras = pytest.importorskip("keras")
    with pytest.raises(TypeError):
        le.from_keras(keras.layers.Dense(3))
    gru = keras.layers.Bidirectional(keras.layers.GRU(2))
    gru.build((None, None, FEATURES))
    with pytest.raises(TypeError, match="LSTM"):
        le.from_keras(gru)
    keras_layer = keras.layers.LSTM(UNITS, return_sequences=True)
    keras_layer.build((None, None, FEATURES))
    mine = le.from_keras(keras_layer, backend=backend_name)
    expected = np.asarray(keras_layer(X))
    assert_close(to_host(mine(X)), expected, f"{backend_name}: from_keras output", "float32")
