"""Dense, Embedding and whole Sequential models against finite differences and NumPy formulas."""

import numpy as np
import pytest

import lstmeng as le
from lstmeng.testing import finite_difference_check

from _backends import backends, dtypes_of, is_simulated, numerical_gradient


# -- Dense -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", [None, "tanh", "relu", "sigmoid", "softmax"])
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 3)], ids=["last-output", "sequence"])
def test_dense_forward_matches_numpy_and_backward_matches_finite_differences(activation, shape):
    rng = np.random.default_rng(0)
    dense = le.Dense(5, activation=activation, dtype="float64", seed=1).build(3)
    dense.params["bias"] = rng.normal(size=5)
    x = rng.normal(size=shape)
    z = x @ dense.params["kernel"] + dense.params["bias"]
    expected = {None: z, "tanh": np.tanh(z), "relu": np.maximum(z, 0), "sigmoid": 1 / (1 + np.exp(-z)),
                "softmax": np.exp(z) / np.exp(z).sum(-1, keepdims=True)}[activation]
    np.testing.assert_allclose(dense(x), expected, rtol=1e-12)

    weights = rng.normal(size=shape[:-1] + (5,))

    def loss():
        return float(np.sum(dense(x) * weights))

    dense(x, training=True)
    dx = dense.backward(weights)
    np.testing.assert_allclose(dx, numerical_gradient(loss, x), rtol=1e-6, atol=1e-8)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(dense.grads[name], numerical_gradient(loss, dense.params[name]),
                                   rtol=1e-6, atol=1e-8)


def test_dense_checks_its_inputs_and_weights():
    dense = le.Dense(2, seed=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        le.Dense(2, activation="gelu")
    dense(np.ones((1, 3)))
    with pytest.raises(ValueError, match="x has 4 features but the layer was built for 3"):
        dense(np.ones((1, 4)))
    with pytest.raises(RuntimeError, match="training=True"):
        dense.backward(np.ones((1, 2)))
    with pytest.raises(ValueError, match=r"kernel must have shape \(3, 2\), got \(2, 3\)"):
        dense.set_weights([np.ones((2, 3)), np.ones(2)])
    restored = le.Dense.from_config(dense.get_config()).set_weights(dense.get_weights())
    np.testing.assert_array_equal(restored(np.ones((1, 3))), dense(np.ones((1, 3))))


# -- Embedding ---------------------------------------------------------------------------------------------
def test_embedding_looks_up_rows_sums_repeated_ids_and_makes_the_mask():
    rng = np.random.default_rng(1)
    embedding = le.Embedding(6, 3, mask_zero=True, dtype="float64", seed=0)
    ids = np.array([[1, 1, 4], [5, 1, 0]])
    out = embedding(ids, training=True)
    np.testing.assert_array_equal(out, embedding.params["embeddings"][ids])
    np.testing.assert_array_equal(embedding.compute_mask(ids), ids != 0)
    weights = rng.normal(size=(2, 3, 3))
    assert embedding.backward(weights) is None

    def loss():
        return float(np.sum(embedding(ids) * weights))

    np.testing.assert_allclose(embedding.grads["embeddings"],
                               numerical_gradient(loss, embedding.params["embeddings"]), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 6\).*got 6 at position \(0, 1\)"):
        embedding(np.array([[1, 6]]))
    with pytest.raises(TypeError, match="integer token ids"):
        embedding(np.ones((1, 2)))


# -- whole models --------------------------------------------------------------------------------------------
def _model(backend, dtype, units=2):
    return le.Sequential([
        le.Embedding(7, 3, mask_zero=True, dtype=dtype, seed=0),
        le.Bidirectional(le.LSTM(units, return_sequences=True, dtype=dtype, backend=backend, seed=1)),
        le.LSTM(units, dtype=dtype, backend=backend, seed=2),
        le.Dense(3, dtype=dtype, seed=3),
    ])


@pytest.mark.parametrize("backend", backends(exclude=("tensorflow",)))
def test_embedding_bidirectional_lstm_dense_model_matches_finite_differences(backend):
    """Embedding -> Bidirectional LSTM -> LSTM -> Dense + masked cross-entropy, every parameter checked."""
    if "float64" not in dtypes_of(backend):
        pytest.skip(f"{backend} has no float64 (finite differences need it)")
    rng = np.random.default_rng(3)
    model = _model(backend, "float64")
    ids = np.array([[3, 5, 2], [6, 1, 0]])    # the second row is padded: its mask comes from id 0
    targets = np.array([2, 0])

    def loss_and_grads():
        logits = model(ids, training=True)
        loss, dlogits = le.losses.softmax_cross_entropy(logits, targets)
        assert model.backward(dlogits) is None
        return loss, {key: np.array(le._arrays.host_copy(value)) for key, value in model.grads.items()}

    _, grads = loss_and_grads()    # builds the model
    if model.device == "cpu":
        finite_difference_check(loss_and_grads, model.params, rng=rng, samples=2 if is_simulated(backend) else 4)
        return
    # On the device: perturb host copies and write them in through the checked mapping.
    cuda = le.backends.registry.get_backend_object("numba_cuda")

    def place_like(reference, host):
        return host if isinstance(reference, np.ndarray) else cuda.ops.asarray(host, np.dtype("float64"))

    host_params = {key: np.array(le._arrays.host_copy(value)) for key, value in model.params.items()}
    for key in ["1.forward.kernel", "2.recurrent_kernel", "2.bias", "3.kernel", "0.embeddings"]:
        array = host_params[key]
        index = np.unravel_index(rng.integers(array.size), array.shape)
        values = []
        for sign in (1, -1):
            perturbed = array.copy()
            perturbed[index] += sign * 1e-6
            model.params[key] = place_like(model.params[key], perturbed)
            values.append(loss_and_grads()[0])
        model.params[key] = place_like(model.params[key], array)
        assert grads[key][index] == pytest.approx((values[0] - values[1]) / 2e-6, rel=1e-5, abs=1e-8)


def test_sequential_initial_state_gradients_match_finite_differences():
    rng = np.random.default_rng(4)
    model = le.Sequential([le.LSTM(3, return_sequences=True, dtype="float64", backend="numpy", seed=0),
                           le.Dense(2, activation="tanh", dtype="float64", seed=1)])
    x = rng.normal(size=(2, 4, 3))
    h0, c0 = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    weights = rng.normal(size=(2, 4, 2))
    model(x, initial_state=[h0, c0], training=True)
    model.backward(weights)
    dh0, dc0 = model.initial_state_grads

    def loss():
        return float(np.sum(model(x, initial_state=[h0, c0]) * weights))

    np.testing.assert_allclose(dh0, numerical_gradient(loss, h0), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dc0, numerical_gradient(loss, c0), rtol=1e-6, atol=1e-8)


def test_summary_lists_layers_shapes_and_parameter_counts(capsys):
    model = _model("numpy", "float32", units=4)
    text = model.summary()
    assert capsys.readouterr().out.strip() == text.strip()
    lines = text.splitlines()
    counts = [7 * 3, 2 * (4 * 4 * (3 + 4 + 1)), 4 * 4 * (8 + 4 + 1), 4 * 3 + 3]
    for line, count in zip(lines[1:5], counts):
        assert line.split()[-1] == str(count)
    assert "(None, None, 8)" in lines[2] and "(None, 4)" in lines[3] and "(None, 3)" in lines[4]
    assert lines[-1] == f"Total parameters: {sum(counts)}"
    model.build()
    assert sum(int(np.prod(v.shape)) for v in model.params.values()) == sum(counts)


def test_sequential_with_dense_and_embedding_round_trips_through_save(tmp_path):
    model = _model("numpy", "float32")
    ids = np.array([[3, 5, 2], [6, 1, 0]])
    expected = model(ids)
    le.save(model, tmp_path / "model.npz")
    np.testing.assert_allclose(le.load(tmp_path / "model.npz")(ids), expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"layers\[1\] is an Embedding"):
        le.Sequential([le.LSTM(2), le.Embedding(3, 2)])


@pytest.mark.parametrize("activation", ["tanh", "softmax"])
def test_dense_and_embedding_match_keras_with_the_same_weights(activation):
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(5)
    dense = le.Dense(5, activation=activation, seed=0).build(4)
    keras_dense = keras.layers.Dense(5, activation=activation)
    keras_dense.build((None, 4))
    keras_dense.set_weights(dense.get_weights())       # Keras's names, order and layout
    x = rng.normal(size=(2, 3, 4)).astype("float32")
    np.testing.assert_allclose(dense(x), np.asarray(keras_dense(x)), rtol=1e-5, atol=1e-6)

    embedding = le.Embedding(7, 3, mask_zero=True, seed=0).build()
    keras_embedding = keras.layers.Embedding(7, 3, mask_zero=True)
    keras_embedding.build((None, 4))
    keras_embedding.set_weights(embedding.get_weights())
    ids = np.array([[1, 6, 0, 0], [3, 3, 2, 0]])
    np.testing.assert_allclose(embedding(ids), np.asarray(keras_embedding(ids)), rtol=1e-6)
    np.testing.assert_array_equal(embedding.compute_mask(ids), np.asarray(keras_embedding.compute_mask(ids)))
