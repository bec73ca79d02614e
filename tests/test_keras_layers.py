"""lstmeng.keras: parity with keras.layers.LSTM / Bidirectional, masks, serialization, tf.function/XLA.

Keras is the independent reference: each parity test copies a Keras layer's
weights into the lstmeng.keras layer and compares outputs (1e-5) and the
gradients that tf.GradientTape computes (1e-4) for
``loss = sum_k sum(output_k * upstream_k)`` with random upstream gradients.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from lstmeng import testing

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import lstmeng as le  # noqa: E402
import lstmeng.keras as lk  # noqa: E402
from lstmeng.backends import numpy as numpy_backend  # noqa: E402

from _backends import sequence_forward  # noqa: E402

OUTPUT_TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-4
MASK_PATTERNS = ("none", "right", "left", "holes", "fully_masked")
HOST_BACKENDS = ["numpy"] + [info.name for info in le.list_backends()
                             if info.available and info.name == "cython"]
BACKENDS = ["tensorflow"] + HOST_BACKENDS


# -- helpers ---------------------------------------------------------------------------------
def random_inputs(seed, batch=4, steps=6, features=3, mask_pattern="right"):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, steps, features)).astype("float32")
    mask = testing.make_mask(mask_pattern, batch, steps, rng)
    return rng, x, mask


def randomize(layer, rng, scale=0.5):
    """Random weights (biases too), so parity does not hinge on initializers."""
    layer.set_weights([(rng.normal(size=w.shape) * scale).astype("float32") for w in layer.get_weights()])


def unnumbered(path):
    """A variable path without Keras's unique-name counters: "forward_lstm_3/x" -> "forward_lstm/x"."""
    return re.sub(r"_\d+(?=/|$)", "", path)


def as_list(outputs):
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def forward_and_grads(layer, x, rng_seed, **call_kwargs):
    """Outputs, d loss/d x and d loss/d weights of ``layer(x, **call_kwargs)`` under a tape."""
    x = tf.constant(x)
    differentiable_x = [x] if x.dtype.is_floating else []  # token ids have no gradient
    with tf.GradientTape() as tape:
        tape.watch(differentiable_x)
        outputs = as_list(layer(x, **call_kwargs))
        rng = np.random.default_rng(rng_seed)
        loss = sum(tf.reduce_sum(out * rng.normal(size=out.shape).astype("float32")) for out in outputs)
    grads = tape.gradient(loss, differentiable_x + layer.trainable_weights)
    return [out.numpy() for out in outputs], [tf.convert_to_tensor(g).numpy() for g in grads]


def assert_parity(reference, mine, x, **call_kwargs):
    expected, expected_grads = forward_and_grads(reference, x, 7, **call_kwargs)
    actual, actual_grads = forward_and_grads(mine, x, 7, **call_kwargs)
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, e, rtol=OUTPUT_TOLERANCE, atol=OUTPUT_TOLERANCE, err_msg=f"output {index}")
    names = (["x"] if len(actual_grads) > len(reference.trainable_weights) else []) + [
        w.path for w in reference.trainable_weights]
    for name, a, e in zip(names, actual_grads, expected_grads):
        np.testing.assert_allclose(a, e, rtol=GRADIENT_TOLERANCE, atol=GRADIENT_TOLERANCE, err_msg=f"d/d {name}")


def lstm_pair(backend, features, rng, **options):
    reference = keras.layers.LSTM(5, **options)
    mine = lk.LSTM(5, backend=backend, **options)
    reference.build((None, None, features))
    mine.build((None, None, features))
    randomize(reference, rng)
    mine.set_weights(reference.get_weights())
    return reference, mine


# -- parity: LSTM --------------------------------------------------------------------------
LSTM_CASES = [
    # (mask pattern, go_backwards, return_sequences, return_state, activation, recurrent_activation)
    ("none", False, True, False, "tanh", "sigmoid"),
    ("right", False, False, True, "tanh", "sigmoid"),
    ("left", True, True, True, "relu", "hard_sigmoid"),
    ("holes", True, False, False, "tanh", "sigmoid"),
    ("fully_masked", False, True, True, "sigmoid", "sigmoid"),
    ("right", True, True, False, "linear", "hard_sigmoid"),
    ("holes", False, True, True, "tanh", "hard_sigmoid"),
    ("fully_masked", True, False, True, "tanh", "sigmoid"),
    ("left", False, False, False, "relu", "sigmoid"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LSTM_CASES, ids=lambda case: "-".join(map(str, case)))
def test_lstm_parity_with_keras(backend, case):
    mask_pattern, go_backwards, return_sequences, return_state, activation, recurrent_activation = case
    rng, x, mask = random_inputs(hash(case) % 1000, mask_pattern=mask_pattern)
    reference, mine = lstm_pair(backend, x.shape[-1], rng, go_backwards=go_backwards,
                                return_sequences=return_sequences, return_state=return_state,
                                activation=activation, recurrent_activation=recurrent_activation)
    assert_parity(reference, mine, x, mask=None if mask is None else tf.constant(mask))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_parity_initial_state_zero_output_and_no_bias(backend):
    rng, x, mask = random_inputs(11, mask_pattern="holes")
    options = dict(return_sequences=True, return_state=True, zero_output_for_mask=True, use_bias=False)
    reference, mine = lstm_pair(backend, x.shape[-1], rng, **options)
    h0, c0 = (rng.normal(size=(x.shape[0], 5)).astype("float32") for _ in range(2))
    x_tensor, states = tf.constant(x), [tf.constant(h0), tf.constant(c0)]
    results = []
    for layer in (reference, mine):
        with tf.GradientTape() as tape:
            tape.watch([x_tensor] + states)
            outputs = layer(x_tensor, initial_state=states, mask=tf.constant(mask))
            loss = sum(tf.reduce_sum(out * np.float32(k + 1) * out) for k, out in enumerate(outputs))
        results.append((outputs, tape.gradient(loss, [x_tensor] + states + layer.trainable_weights)))
    for expected, actual in zip(*(r[0] for r in results)):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=OUTPUT_TOLERANCE, atol=OUTPUT_TOLERANCE)
    for expected, actual in zip(*(r[1] for r in results)):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=GRADIENT_TOLERANCE,
                                   atol=GRADIENT_TOLERANCE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stateful_parity_over_consecutive_batches(backend):
    rng = np.random.default_rng(12)
    batches = [rng.normal(size=(3, 4, 2)).astype("float32") for _ in range(3)]
    reference = keras.layers.LSTM(4, stateful=True, return_sequences=True)
    mine = lk.LSTM(4, stateful=True, return_sequences=True, backend=backend)
    for layer in (reference, mine):
        layer.build((3, 4, 2))
    randomize(reference, rng)
    mine.set_weights(reference.get_weights())
    for index, x in enumerate(batches):
        if index == 2:
            reference.reset_state()
            mine.reset_state()
        assert_parity(reference, mine, x)  # each call advances both layers' states once
        for ref_state, my_state in zip(reference.states, mine.states):
            np.testing.assert_allclose(my_state.numpy(), ref_state.numpy(), rtol=OUTPUT_TOLERANCE,
                                       atol=OUTPUT_TOLERANCE)


# -- parity: Bidirectional -------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("merge_mode, mask_pattern, return_sequences, return_state", [
    ("concat", "right", True, False),
    ("sum", "left", True, True),
    ("mul", "holes", False, False),
    ("ave", "fully_masked", True, False),
    (None, "right", True, True),
    ("concat", "none", False, True),
])
def test_bidirectional_parity_with_keras(backend, merge_mode, mask_pattern, return_sequences, return_state):
    rng, x, mask = random_inputs(13, mask_pattern=mask_pattern)
    options = dict(return_sequences=return_sequences, return_state=return_state)
    reference = keras.layers.Bidirectional(keras.layers.LSTM(5, **options), merge_mode=merge_mode)
    mine = lk.Bidirectional(lk.LSTM(5, backend=backend, **options), merge_mode=merge_mode)
    for layer in (reference, mine):
        layer.build((None, None, x.shape[-1]))
    randomize(reference, rng)
    mine.set_weights(reference.get_weights())
    assert [unnumbered(w.path) for w in mine.weights] == [unnumbered(w.path) for w in reference.weights]
    assert_parity(reference, mine, x, mask=None if mask is None else tf.constant(mask))


def test_bidirectional_converts_a_built_keras_lstm_and_sets_backends():
    rng, x, _ = random_inputs(14)
    keras_lstm = keras.layers.LSTM(5, return_sequences=True)
    keras_lstm.build((None, None, x.shape[-1]))
    randomize(keras_lstm, rng)
    mine = lk.Bidirectional(keras_lstm, backend="numpy")
    assert isinstance(mine.forward_layer, lk.LSTM) and isinstance(mine.backward_layer, lk.LSTM)
    assert mine.forward_layer.backend == mine.backward_layer.backend == "numpy"
    reference = keras.layers.Bidirectional(keras_lstm)
    reference.build(x.shape)
    mine.build(x.shape)
    mine.set_weights(reference.get_weights())
    np.testing.assert_allclose(mine(x).numpy(), reference(x).numpy(), rtol=OUTPUT_TOLERANCE, atol=OUTPUT_TOLERANCE)


# -- Keras masks ------------------------------------------------------------------------------
def keras_and_mine_models(backend, build_layers, inputs_shape, dtype="float32"):
    """The same Sequential model built twice, with keras.layers.LSTM and with lstmeng.keras.LSTM."""
    models = []
    for lstm in (keras.layers.LSTM, lambda *a, **k: lk.LSTM(*a, backend=backend, **k)):
        keras.utils.set_random_seed(0)
        models.append(keras.Sequential([keras.Input(inputs_shape, dtype=dtype)] + build_layers(lstm)))
    models[1].set_weights(models[0].get_weights())
    return models


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_mask_zero_and_stacked_mask_propagation(backend):
    """The output mask of a return_sequences layer reaches the next LSTM, as in Keras."""
    rng = np.random.default_rng(15)
    tokens = rng.integers(1, 20, size=(4, 7))
    tokens[1, 4:] = 0
    tokens[2, 1:] = 0
    tokens[3, :] = 0  # a fully masked row

    def layers(lstm):
        return [keras.layers.Embedding(20, 3, mask_zero=True), lstm(4, return_sequences=True),
                lstm(5, go_backwards=True), keras.layers.Dense(2)]

    reference, mine = keras_and_mine_models(backend, layers, (None,), dtype="int32")
    for model in (reference, mine):
        randomize(model.layers[1], np.random.default_rng(16))
        randomize(model.layers[2], np.random.default_rng(17))
    assert_parity(reference, mine, tokens)
    # compute_mask: sequences keep the mask, a last output drops it.
    embedded = mine.layers[0](tokens)
    mask = mine.layers[0].compute_mask(tokens)
    np.testing.assert_array_equal(mine.layers[1].compute_mask(embedded, mask).numpy(), tokens != 0)
    assert mine.layers[2].compute_mask(embedded, mask) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_masking_layer_with_bidirectional(backend):
    rng, x, mask = random_inputs(18, mask_pattern="right")
    x[~mask] = 0.0

    def layers(lstm):
        return [keras.layers.Masking(0.0), keras.layers.Bidirectional(lstm(4, return_sequences=True)),
                lstm(3)]

    reference, mine = keras_and_mine_models(backend, layers, (None, x.shape[-1]))
    randomize(reference, np.random.default_rng(19))
    mine.set_weights(reference.get_weights())
    assert_parity(reference, mine, x)


# -- dropout --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_masks_are_per_sequence_seeded_and_inverted(backend):
    """Training output equals the reference backend run with the masks that the layer's seed gives."""
    rng, x, mask = random_inputs(20, mask_pattern="holes")
    layer = lk.LSTM(5, dropout=0.3, recurrent_dropout=0.4, seed=42, return_sequences=True, backend=backend)
    layer.build(x.shape)
    randomize(layer, rng)
    y = layer(x, mask=mask, training=True).numpy()
    # The same draws, in the layer's order: inputs [B, I], then h(t-1) [B, H].
    seed = keras.random.SeedGenerator(42)
    input_mask = keras.random.dropout(np.ones((4, 3), "float32"), rate=0.3, seed=seed).numpy()
    recurrent_mask = keras.random.dropout(np.ones((4, 5), "float32"), rate=0.4, seed=seed).numpy()
    assert set(np.unique(input_mask)) <= {0.0, np.float32(1 / 0.7)}
    kernel, recurrent_kernel, bias = layer.get_weights()
    zeros = np.zeros((4, 5), "float32")
    expected = sequence_forward(numpy_backend.backend,
        x, zeros, zeros, kernel, recurrent_kernel, bias, mask, input_dropout_mask=input_mask,
        recurrent_dropout_mask=recurrent_mask).outputs
    np.testing.assert_allclose(y, expected, rtol=OUTPUT_TOLERANCE, atol=OUTPUT_TOLERANCE)
    # Inference ignores dropout; a second training call draws new masks.
    inference = layer(x, mask=mask, training=False).numpy()
    plain = sequence_forward(numpy_backend.backend, x, zeros, zeros, kernel, recurrent_kernel, bias, mask).outputs
    np.testing.assert_allclose(inference, plain, rtol=OUTPUT_TOLERANCE, atol=OUTPUT_TOLERANCE)
    assert not np.allclose(layer(x, mask=mask, training=True).numpy(), y)


# -- serialization ---------------------------------------------------------------------------
def test_config_round_trip_keeps_backend_and_options():
    layer = lk.LSTM(7, activation="relu", recurrent_activation="hard_sigmoid", dropout=0.1, go_backwards=True,
                    return_sequences=True, zero_output_for_mask=True, seed=3, backend="numpy")
    config = layer.get_config()
    assert config["backend"] == "numpy" and config["zero_output_for_mask"] is True
    again = lk.LSTM.from_config(config)
    assert again.get_config() == config
    assert keras.saving.get_registered_name(lk.LSTM) == "lstmeng>LSTM"
    assert keras.saving.get_registered_name(lk.Bidirectional) == "lstmeng>Bidirectional"


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_save_and_load_round_trip(backend, tmp_path):
    rng, x, mask = random_inputs(21)
    inputs = keras.Input((None, x.shape[-1]))
    hidden = lk.Bidirectional(lk.LSTM(4, return_sequences=True, backend=backend), merge_mode="sum")(inputs)
    outputs = lk.LSTM(3, backend=backend)(hidden)
    model = keras.Model(inputs, outputs)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[1], lk.Bidirectional) and isinstance(loaded.layers[2], lk.LSTM)
    assert loaded.layers[2].backend == backend
    # (Keras itself drops the wrapper's prefix from the paths of a loaded Bidirectional.)
    assert [(w.name, tuple(w.shape)) for w in loaded.weights] == [(w.name, tuple(w.shape)) for w in model.weights]
    for loaded_weight, weight in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(loaded_weight, weight)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=0, atol=0)


def test_weights_files_are_interchangeable_with_keras(tmp_path):
    """A .weights.h5 saved from a Keras model loads into the lstmeng.keras model, and back."""
    rng, x, _ = random_inputs(25)

    def build(lstm, bidirectional):
        return keras.Sequential([keras.Input((None, x.shape[-1])),
                                 bidirectional(lstm(4, return_sequences=True)), lstm(2)])

    reference = build(keras.layers.LSTM, keras.layers.Bidirectional)
    randomize(reference, rng)
    reference.save_weights(tmp_path / "keras.weights.h5")
    mine = build(lambda *a, **k: lk.LSTM(*a, backend="numpy", **k), lk.Bidirectional)
    mine.load_weights(tmp_path / "keras.weights.h5")
    np.testing.assert_allclose(mine(x).numpy(), reference(x).numpy(), rtol=OUTPUT_TOLERANCE, atol=OUTPUT_TOLERANCE)
    mine.save_weights(tmp_path / "mine.weights.h5")
    again = build(keras.layers.LSTM, keras.layers.Bidirectional)
    again.load_weights(tmp_path / "mine.weights.h5")
    for loaded, original in zip(again.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(loaded, original)


# -- tf.function, fit, XLA ---------------------------------------------------------------------
def small_regression_model(backend, jit_compile):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((6, 3)), lk.LSTM(8, return_sequences=True, backend=backend),
                              lk.LSTM(4, backend=backend), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", jit_compile=jit_compile)
    return model


@pytest.mark.slow
def test_tensorflow_backend_inside_tf_function_fit_and_xla():
    rng, x, _ = random_inputs(22, batch=32)
    target = x.sum(axis=(1, 2))[:, None]
    layer = lk.LSTM(4, backend="tensorflow")
    layer.build(x.shape)
    eager = layer(x).numpy()
    np.testing.assert_allclose(tf.function(layer)(x).numpy(), eager, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tf.function(layer, jit_compile=True)(x).numpy(), eager, rtol=1e-5, atol=1e-5)

    model = small_regression_model("tensorflow", jit_compile=True)
    assert model.jit_compile
    history = model.fit(x, target, epochs=4, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_host_backend_fits_without_xla(backend):
    rng, x, _ = random_inputs(23, batch=32)
    target = x.sum(axis=(1, 2))[:, None]
    assert not lk.LSTM(3, backend=backend).supports_jit
    model = small_regression_model(backend, jit_compile="auto")
    assert not model.jit_compile  # numpy_function is not XLA-compilable
    with pytest.warns(UserWarning, match="doesn't support `jit_compile=True`"):
        assert not small_regression_model(backend, jit_compile=True).jit_compile
    stored_before = len(lk._workspaces)
    history = model.fit(x, target, epochs=4, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert len(lk._workspaces) == stored_before  # every training forward's workspace was consumed


def test_gradient_of_an_inference_call_recomputes_the_forward():
    """A tf.function that differentiates a training=False call (no workspace kept) still gets gradients."""
    rng, x, mask = random_inputs(24)
    for backend in BACKENDS:
        reference, mine = lstm_pair(backend, x.shape[-1], rng, return_sequences=True)

        @tf.function
        def grads(layer, x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x, mask=tf.constant(mask), training=False) ** 2)
            return tape.gradient(loss, [x] + layer.trainable_weights)

        x_tensor = tf.constant(x)
        for actual, expected in zip(grads(mine, x_tensor), grads(reference, x_tensor)):
            np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=GRADIENT_TOLERANCE,
                                       atol=GRADIENT_TOLERANCE, err_msg=backend)


# -- bad arguments -------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="activation must be one of"):
        lk.LSTM(3, activation="softplus")
    with pytest.raises(ValueError, match="recurrent_activation must be one of"):
        lk.LSTM(3, recurrent_activation="tanh")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        lk.LSTM(3, backend="nope")
    with pytest.raises(ValueError, match="use_cudnn=True"):
        lk.LSTM(3, use_cudnn=True)
    with pytest.raises(TypeError, match="must be an LSTM layer"):
        lk.Bidirectional(keras.layers.GRU(3))


# -- the seeds' Keras examples with lstmeng.keras.LSTM swapped in ---------------------------------
VOCABULARY = 20
POSITIVE, NEGATIVE = 1, 2  # sentiment words; 3.. are neutral fillers, 0 is padding


def synthetic_sentiment(count, seed):
    """Variable-length token sequences whose label is the majority sentiment of three words
    far apart: the first, the middle and the last real token. Returns (tokens [N, T] right-padded
    with 0, labels [N])."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(10, 25, size=count)
    tokens = np.zeros((count, lengths.max()), "int32")
    labels = np.zeros(count, "float32")
    for row, length in enumerate(lengths):
        tokens[row, :length] = rng.integers(3, VOCABULARY, size=length)
        sentiments = rng.choice([POSITIVE, NEGATIVE], size=3)
        tokens[row, [0, length // 2, length - 1]] = sentiments
        labels[row] = float((sentiments == POSITIVE).sum() >= 2)
    return tokens, labels


def sentiment_classifier(kind, backend):
    keras.utils.set_random_seed(5)
    embedding = keras.layers.Embedding(VOCABULARY, 8, mask_zero=True)
    if kind == "classifier":  # the seeds' Embedding -> LSTM -> Dropout -> Dense
        recurrent = [lk.LSTM(16, backend=backend), keras.layers.Dropout(0.2)]
    elif kind == "stacked":
        recurrent = [lk.LSTM(16, return_sequences=True, backend=backend), lk.LSTM(8, backend=backend)]
    else:
        recurrent = [lk.Bidirectional(lk.LSTM(8, backend=backend))]
    model = keras.Sequential([keras.Input((None,), dtype="int32"), embedding] + recurrent
                             + [keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="binary_crossentropy", metrics=["accuracy"])
    return model


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", HOST_BACKENDS[-1]])
@pytest.mark.parametrize("kind", ["classifier", "stacked", "bidirectional"])
def test_seed_examples_learn_the_synthetic_sentiment_task(kind, backend):
    train_tokens, train_labels = synthetic_sentiment(768, seed=0)
    test_tokens, test_labels = synthetic_sentiment(256, seed=1)
    assert 0.35 < test_labels.mean() < 0.65  # chance is about 50%
    model = sentiment_classifier(kind, backend)
    history = model.fit(train_tokens, train_labels, epochs=8, batch_size=32, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.8 * losses[0], losses
    _, accuracy = model.evaluate(test_tokens, test_labels, verbose=0)
    assert accuracy > 0.75, (accuracy, losses)


# -- tf.distribute ---------------------------------------------------------------------------
MIRRORED_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf

# Two logical CPU devices: must be configured before TF initialises its devices.
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import lstmeng.keras as lk

backend = sys.argv[1]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
rng = np.random.default_rng(0)
x = rng.normal(size=(128, 6, 3)).astype("float32")
y = x[:, 0, :1] - x[:, -1, 1:2]  # needs the first and the last step
with strategy.scope():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 3)), lk.LSTM(8, backend=backend), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
history = model.fit(x, y, epochs=8, batch_size=32, verbose=0)
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "loss": history.history["loss"]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", HOST_BACKENDS[-1]])
def test_mirrored_strategy_over_two_logical_cpus(backend):
    """model.fit under MirroredStrategy; a subprocess, so the device split happens before TF starts."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, backend], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    losses = report["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("backend", ["tensorflow", "numpy"])
def test_a_persistent_tape_takes_the_gradient_twice(backend):
    """A workspace is backpropagated once: a second gradient of one call runs the forward again."""
    layer = lk.LSTM(3, return_sequences=True, backend=backend)
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 4, 5)).astype("float32"))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True) ** 2)
    first, second = tape.gradient(loss, x), tape.gradient(loss, x)
    np.testing.assert_array_equal(first.numpy(), second.numpy())
