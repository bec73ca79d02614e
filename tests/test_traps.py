"""The three training traps of issue 18, each against an independent reference.

1. Assignments through ``params``/``grads`` reach the weights on every layer and model (checked).
2. A partly backpropagated ``LSTMCell`` unroll does not leak into the next sequence's gradients.
3. Inference calls between a training forward and its backward leave the tape alone, and
   several training calls are backpropagated last-in-first-out with gradients summed
   (checked against finite differences).
"""

import re
import warnings

import numpy as np
import pytest

import lstmeng as le
from lstmeng.testing import finite_difference_check


def _models():
    """One of each layer and model, built for 3 input features, float64 on NumPy."""
    lstm = le.LSTM(4, dtype="float64", backend="numpy", seed=0).build(3)
    bidirectional = le.Bidirectional(le.LSTM(2, return_sequences=True, dtype="float64", backend="numpy",
                                             seed=1)).build(3)
    sequential = le.Sequential([le.Bidirectional(le.LSTM(2, return_sequences=True, dtype="float64",
                                                         backend="numpy", seed=2)),
                                le.LSTM(3, dtype="float64", backend="numpy", seed=3)]).build(3)
    cell = le.LSTMCell(2, dtype="float64", backend="numpy", seed=4).build(3)
    return {"LSTM": lstm, "Bidirectional": bidirectional, "Sequential": sequential, "LSTMCell": cell}


# -- trap 1: params / grads assignments ----------------------------------------------------------
@pytest.mark.parametrize("name", ["LSTM", "Bidirectional", "Sequential", "LSTMCell"])
def test_assignment_through_params_changes_the_weights(name):
    model = _models()[name]
    before = [w.copy() for w in model.get_weights()]
    for key in list(model.params):
        model.params[key] = model.params[key] - 0.5          # a new array, not an in-place update
    after = model.get_weights()
    assert len(after) == len(before)
    for old, new in zip(before, after):
        np.testing.assert_allclose(new, old - 0.5)


@pytest.mark.parametrize("name", ["LSTM", "Bidirectional", "Sequential", "LSTMCell"])
def test_bad_assignments_name_key_expected_actual_and_change_nothing(name):
    model = _models()[name]
    key = sorted(model.params)[0]
    before = [w.copy() for w in model.get_weights()]
    shape = model.params[key].shape
    with pytest.raises(ValueError, match=rf"params\['{re.escape(key)}'\].*shape {re.escape(str(shape))}.*got \(1, 1\)"):
        model.params[key] = np.zeros((1, 1))
    with pytest.raises(TypeError, match=rf"params\['{re.escape(key)}'\].*dtype float64.*got float32"):
        model.params[key] = np.zeros(shape, np.float32)
    with pytest.raises(KeyError, match="no parameter 'nonexistent'"):
        model.params["nonexistent"] = np.zeros(shape)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(new, old)


@pytest.mark.parametrize("name", ["LSTM", "Bidirectional", "Sequential"])
def test_grads_assignment_reaches_the_sublayer_and_whole_mapping_assignment_is_checked(name):
    model = _models()[name]
    grads = {key: np.full(value.shape, 2.0) for key, value in model.params.items()}
    model.grads = grads
    for key in grads:
        np.testing.assert_array_equal(model.grads[key], 2.0)
    # The optimizer sees them: clip_grad_norm scales what it reads from the mapping.
    total = float(np.sqrt(sum(np.sum(value ** 2) for value in grads.values())))
    assert le.optim.clip_grad_norm(model, 1.0) == pytest.approx(total)
    bad = dict(grads)
    first = sorted(bad)[0]
    bad[first] = np.zeros((7,))
    with pytest.raises(ValueError, match=rf"grads\['{re.escape(first)}'\]"):
        model.grads = bad
    # Nothing was written by the failed assignment (the clipped values are still there).
    for key in grads:
        np.testing.assert_allclose(model.grads[key], 2.0 / total, rtol=1e-5)
    model.zero_grads()
    assert all(not np.any(value) for value in model.grads.values())


# -- trap 2: a partly backpropagated LSTMCell unroll ----------------------------------------------
def _unroll(cell, xs, training=True):
    states, outputs = None, []
    for x_t in xs:
        h, states = cell(x_t, states, training=training)
        outputs.append(h)
    return outputs


def _backprop_all(cell, output_grads):
    dh_next = dc_next = None
    for dh_out in reversed(output_grads):
        dh = dh_out if dh_next is None else dh_out + dh_next
        _, (dh_next, dc_next) = cell.backward(dh, dc_next)


def test_partly_backpropagated_unroll_does_not_leak_into_the_next_sequence():
    rng = np.random.default_rng(0)
    first = [rng.normal(size=(2, 3)) for _ in range(5)]
    second = [rng.normal(size=(2, 3)) for _ in range(4)]
    dys = [rng.normal(size=(2, 2)) for _ in range(4)]

    clean = le.LSTMCell(2, dtype="float64", backend="numpy", seed=7).build(3)
    _unroll(clean, second)
    _backprop_all(clean, dys)
    expected = {key: value.copy() for key, value in clean.grads.items()}

    cell = le.LSTMCell(2, dtype="float64", backend="numpy", seed=7).build(3)
    _unroll(cell, first)
    cell.backward(np.ones((2, 2)))      # truncated: 4 of the 5 steps are never backpropagated
    _unroll(cell, second)               # a new unroll after a backward starts clean
    _backprop_all(cell, dys)
    for key in expected:
        np.testing.assert_allclose(cell.grads[key], expected[key], rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="backward needs"):
        cell.backward(np.ones((2, 2)))  # the 5 steps of the first unroll were dropped


def test_reset_tape_drops_unconsumed_steps():
    cell = le.LSTMCell(2, dtype="float64", backend="numpy", seed=7).build(3)
    _unroll(cell, [np.ones((2, 3))] * 3)
    cell.reset_tape()
    with pytest.raises(RuntimeError, match="backward needs"):
        cell.backward(np.ones((2, 2)))


# -- trap 3: calls between a training forward and its backward ------------------------------------
def _weighted_sum(outputs, weights):
    return sum(float(np.sum(output * weight)) for output, weight in zip(outputs, weights))


@pytest.mark.parametrize("name", ["LSTM", "Bidirectional", "Sequential"])
def test_inference_call_between_forward_and_backward_leaves_the_tape(name):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 4, 3))
    reference = _models()[name]
    y = reference(x, training=True)
    dy = rng.normal(size=y.shape)
    expected_dx = reference.backward(dy)
    expected = {key: value.copy() for key, value in reference.grads.items()}

    model = _models()[name]
    model(x, training=True)
    model(rng.normal(size=(5, 2, 3)), training=False)     # a validation batch of another shape
    dx = model.backward(dy)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-12)
    for key in expected:
        np.testing.assert_allclose(model.grads[key], expected[key], rtol=1e-12)


@pytest.mark.parametrize("name", ["LSTM", "Bidirectional", "Sequential"])
def test_two_training_calls_backpropagate_last_in_first_out_and_sum(name):
    """A shared encoder applied to two inputs: the gradient of the sum of both uses."""
    rng = np.random.default_rng(2)
    model = _models()[name]
    x1, x2 = rng.normal(size=(2, 4, 3)), rng.normal(size=(3, 2, 3))
    y1 = model(x1, training=True)
    y2 = model(x2, training=True)
    w1, w2 = rng.normal(size=y1.shape), rng.normal(size=y2.shape)
    dx2 = model.backward(w2)
    dx1 = model.backward(w1)
    assert dx1.shape == x1.shape and dx2.shape == x2.shape

    def loss_and_grads():
        loss = _weighted_sum([model(x1, training=True), model(x2, training=True)], [w1, w2])
        model.backward(w2)
        model.backward(w1)
        return loss, {key: value.copy() for key, value in model.grads.items()}

    # Compares every parameter's summed gradient with central differences.
    finite_difference_check(loss_and_grads, model.params, rng=rng, samples=4)

    def loss_of_x1():
        return _weighted_sum([model(x1), model(x2)], [w1, w2])

    index = (1, 0, 2)
    step = 1e-6
    saved = x1[index]
    x1[index] = saved + step
    up = loss_of_x1()
    x1[index] = saved - step
    down = loss_of_x1()
    x1[index] = saved
    assert dx1[index] == pytest.approx((up - down) / (2 * step), rel=1e-5, abs=1e-8)
    with pytest.raises(RuntimeError, match="backward needs"):
        model.backward(w1)


@pytest.mark.parametrize("backend", ["numpy", "cython"])
def test_training_calls_that_keep_much_memory_warn_before_the_count(backend, monkeypatch):
    """The tape warns once a round keeps more workspace bytes than WARN_AFTER_BYTES without a
    backward, long before the call count (a large layer's 256 calls were gigabytes); once per
    layer, as the count's warning (a later round as large says nothing)."""
    if backend == "cython":
        pytest.importorskip("lstmeng.backends._cython_lstm")
    import lstmeng._tape as tape_module
    lstm = le.LSTM(8, backend=backend, return_sequences=True, seed=0)
    x = np.ones((4, 10, 3), "float32")
    lstm(x, training=True)
    one_call = tape_module.workspace_bytes(lstm._tapes.last.workspace)
    # gates, c(t-1) and h(t-1) of 40 rows (or more: backends may round their buffers up), not x
    assert 40 * 6 * 8 * 4 <= one_call < 40 * 6 * 8 * 4 + x.nbytes
    lstm.backward(np.ones((4, 10, 8), "float32"))
    monkeypatch.setattr(tape_module, "WARN_AFTER_BYTES", 3 * one_call)
    lstm = le.LSTM(8, backend=backend, return_sequences=True, seed=0)
    with pytest.warns(ResourceWarning, match=r"4 training calls are recorded \(0 MiB of workspaces\)"):
        for _ in range(6):
            lstm(x, training=True)
    lstm.backward(np.ones((4, 10, 8), "float32"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # warned once already
        for _ in range(6):
            lstm(x, training=True)


def test_training_calls_never_backpropagated_warn_once():
    lstm = le.LSTM(2, backend="numpy", seed=0)
    x = np.ones((1, 2, 3), "float32")
    with pytest.warns(ResourceWarning, match="257 training calls are recorded"):
        for _ in range(300):
            lstm(x, training=True)
    lstm.reset_tape()
    with pytest.raises(RuntimeError, match="backward needs"):
        lstm.backward(np.ones((1, 2), "float32"))


# -- papercuts found on the way (issue 18) -----------------------------------------------------------
def test_misspelt_backend_is_answered_with_did_you_mean_before_any_probe(monkeypatch):
    from lstmeng.backends import registry

    def no_probe(name):
        raise AssertionError(f"probed {name!r} to answer a typo")

    monkeypatch.setattr(registry, "_entry", no_probe)
    with pytest.raises(ValueError, match=r"unknown backend 'cythn'; did you mean 'cython'\?"):
        le.LSTM(2, backend="cythn")
    with pytest.raises(ValueError, match=r"did you mean 'numba_cuda'"):
        le.set_backend("numba-cuda")


def test_a_missing_optional_library_is_reported_without_importing(monkeypatch):
    import importlib.util

    from lstmeng.backends import registry
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "tensorflow" else real_find_spec(name, *args))
    backend, info = registry._load("tensorflow")
    assert backend is None and not info.available
    assert info.reason == "tensorflow is not installed (pip install tensorflow)"


def test_tensorflow_backend_gives_numpy_for_numpy_input():
    pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4)).astype("float32")
    with le.use_backend("tensorflow"):
        lstm = le.LSTM(3, return_sequences=True, return_state=True, seed=0)
        y, h, c = lstm(x, training=True)
        dx = lstm.backward(np.ones_like(y))
        bidirectional = le.Bidirectional(le.LSTM(2, return_sequences=True, seed=1))
        merged = bidirectional(x, training=True)
        dx_bidirectional = bidirectional.backward(np.ones_like(merged))
        cell = le.LSTMCell(2, seed=2)
        h_cell, (_, c_cell) = cell(x[:, 0], training=True)
        dx_cell, _ = cell.backward(np.ones_like(h_cell))
        model = le.Sequential([le.LSTM(3, seed=3), le.Dense(1, seed=4)])
        out = model(x, training=True)
        dx_model = model.backward(np.ones_like(out))
    for array in (y, h, c, dx, merged, dx_bidirectional, h_cell, c_cell, dx_cell, out, dx_model):
        assert isinstance(array, np.ndarray), type(array)
    assert y.T.shape == (3, 3, 2)   # NumPy code works on the result (a tf.Tensor has no .T)
    reference = le.LSTM(3, return_sequences=True, backend="numpy", seed=0)
    np.testing.assert_allclose(y, reference(x), rtol=1e-5, atol=1e-6)


def test_set_weights_in_pytorch_layout_points_to_from_torch():
    lstm = le.LSTM(4, seed=0).build(3)
    kernel, recurrent_kernel, bias = lstm.get_weights()
    with pytest.raises(ValueError, match=r"kernel must have shape \(3, 16\).*got \(16, 3\).*le\.from_torch"):
        lstm.set_weights([kernel.T, recurrent_kernel.T, bias])


def test_load_of_a_non_lstmeng_file_says_what_it_is_and_never_suggests_unpickling(tmp_path):
    import pickle

    cases = {"model.pkl": "a Python pickle", "array.npy": "a bare NumPy .npy array", "notes.txt": "not a zip archive"}
    with open(tmp_path / "model.pkl", "wb") as handle:
        pickle.dump({"weights": [1, 2]}, handle)
    np.save(tmp_path / "array.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "notes.txt").write_text("hello")
    for name, kind in cases.items():
        with pytest.raises(ValueError) as info:
            le.load(tmp_path / name)
        message = str(info.value)
        assert "is not an lstmeng file" in message and kind in message
        assert "allow_pickle" not in message and "pickle.load" not in message


# -- the same contracts on every backend (the simulator at a tiny size) -------------------------------
from _backends import backends, dtypes_of, to_host  # noqa: E402


@pytest.mark.parametrize("backend", backends())
def test_two_training_calls_sum_like_the_numpy_backend(backend):
    """LIFO backward with summed gradients (the GPU's grads_out path included) equals the NumPy spec."""
    dtype = "float64" if "float64" in dtypes_of(backend) else "float32"
    rng = np.random.default_rng(5)
    x1, x2 = rng.normal(size=(2, 3, 2)), rng.normal(size=(1, 2, 2))
    w1, w2 = rng.normal(size=(2, 3)), rng.normal(size=(1, 3))
    results = {}
    for name in ("numpy", backend):
        lstm = le.LSTM(3, dtype=dtype, backend=name, seed=0)
        for _ in range(2):   # the second round replaces the first round's gradients
            lstm(x1.astype(dtype), training=True)
            lstm(x2.astype(dtype), training=True)
            dx2 = lstm.backward(w2.astype(dtype))
            dx1 = lstm.backward(w1.astype(dtype))
        results[name] = {"dx1": to_host(dx1), "dx2": to_host(dx2),
                         **{key: to_host(value) for key, value in lstm.grads.items()}}
    tolerance = 1e-10 if dtype == "float64" else 2e-5
    for key, value in results["numpy"].items():
        np.testing.assert_allclose(results[backend][key], value, rtol=tolerance, atol=tolerance, err_msg=key)


@pytest.mark.parametrize("backend", backends())
def test_truncated_cell_unroll_starts_clean_on_every_backend(backend):
    dtype = "float64" if "float64" in dtypes_of(backend) else "float32"
    rng = np.random.default_rng(6)
    first = [rng.normal(size=(1, 2)).astype(dtype) for _ in range(3)]
    second = [rng.normal(size=(1, 2)).astype(dtype) for _ in range(2)]
    dys = [rng.normal(size=(1, 2)).astype(dtype) for _ in range(2)]
    results = {}
    for name in ("numpy", backend):
        cell = le.LSTMCell(2, dtype=dtype, backend=name, seed=1)
        _unroll(cell, first)
        cell.backward(np.ones((1, 2), dtype))
        _unroll(cell, second)
        _backprop_all(cell, [to_host(dy) for dy in dys])
        results[name] = {key: to_host(value) for key, value in cell.grads.items()}
    tolerance = 1e-10 if dtype == "float64" else 2e-5
    for key, value in results["numpy"].items():
        np.testing.assert_allclose(results[backend][key], value, rtol=tolerance, atol=tolerance, err_msg=key)


@pytest.mark.parametrize("backend", backends(only=("numba_cuda",)))
def test_device_params_take_device_arrays_only(backend):
    lstm = le.LSTM(2, backend=backend, seed=0).build(3)
    cuda = le.backends.registry.get_backend_object(backend)
    host_bias = np.full(8, 0.25, np.float32)
    with pytest.raises(ValueError, match=r"params\['bias'\]: expected an array on cuda.*got one on cpu"):
        lstm.params["bias"] = host_bias
    before = lstm.params["bias"]
    lstm.params["bias"] = cuda.ops.asarray(host_bias, np.dtype("float32"))
    assert lstm.params["bias"] is before                       # written into the same device array
    np.testing.assert_array_equal(lstm.get_weights()[2], host_bias)
    lstm.zero_grads()
    assert all(not to_host(value).any() for value in lstm.grads.values())
