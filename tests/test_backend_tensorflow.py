"""The tensorflow backend: conformance with the NumPy reference, TF tensors in and out, no retracing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lstmeng import testing

tf = pytest.importorskip("tensorflow")

import lstmeng as le  # noqa: E402
from lstmeng.backends import registry  # noqa: E402

from _backends import sequence_forward  # noqa: E402


def _conformance_params():
    """Every case of the suite; a spread-out subset runs quickly, the rest is marked slow
    (each configuration traces its own tf.functions, about a second each)."""
    quick = set(testing.conformance_cases(cases_per_dtype=8))
    return [case if case in quick else pytest.param(case, marks=pytest.mark.slow)
            for case in testing.conformance_cases()]


@pytest.mark.parametrize("case", _conformance_params(), ids=str)
def test_conformance(case):
    testing.check_case("tensorflow", case)


def tf_backend():
    return registry.get_backend_object("tensorflow")


def test_listed_available_with_device():
    info = {row.name: row for row in le.list_backends()}["tensorflow"]
    assert info.available, info.reason
    assert "TensorFlow" in info.device


def test_import_lstmeng_does_not_import_tensorflow():
    code = ("import sys, lstmeng, numpy as np; lstmeng.LSTM(2)(np.ones((1, 2, 3), 'float32'));"
            "print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_without_tensorflow_the_backend_is_listed_unavailable():
    code = ("import sys; sys.modules['tensorflow'] = None\n"  # makes `import tensorflow` fail
            "import lstmeng as le\n"
            "row = {r.name: r for r in le.list_backends()}['tensorflow']\n"
            "print(row.available, '|', row.reason)\n"
            "try:\n"
            "    le.LSTM(2, backend='tensorflow')\n"
            "except ValueError as error:\n"
            "    print('ValueError |', error)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    listed, refused = result.stdout.strip().splitlines()
    assert listed.startswith("False | tensorflow is not installed")
    assert refused.startswith("ValueError |") and "tensorflow is not installed" in refused


def test_tensor_inputs_give_tensor_outputs_and_auto_picks_tensorflow():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(3, 4, 2)).astype("float32"))
    lstm = le.LSTM(5, return_sequences=True, seed=0)
    y = lstm(x, mask=tf.constant(np.array([[1, 1, 1, 0]] * 3, bool)), training=True)
    assert isinstance(y, tf.Tensor) and tuple(y.shape) == (3, 4, 5)
    dx = lstm.backward(tf.ones_like(y))
    assert isinstance(dx, tf.Tensor) and tuple(dx.shape) == (3, 4, 2)
    reference = le.LSTM(5, return_sequences=True, backend="numpy", seed=0)
    reference.set_weights(lstm.get_weights())
    expected = reference(x.numpy(), mask=np.array([[1, 1, 1, 0]] * 3, bool))
    np.testing.assert_allclose(y.numpy(), expected, rtol=2e-5, atol=2e-5)


def test_numpy_inputs_run_on_the_tensorflow_backend():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 3)).astype("float64")
    lstm = le.LSTM(4, dtype="float64", backend="tensorflow", go_backwards=True, return_sequences=True, seed=1)
    reference = le.LSTM(4, dtype="float64", backend="numpy", go_backwards=True, return_sequences=True, seed=1)
    y = lstm(x, lengths=[6, 2], training=True)
    expected = reference(x, lengths=[6, 2], training=True)
    assert isinstance(y, np.ndarray)   # NumPy in, NumPy out (issue 18)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    dy = rng.normal(size=expected.shape)
    dx = lstm.backward(dy)
    assert isinstance(dx, np.ndarray)
    np.testing.assert_allclose(dx, reference.backward(dy), rtol=1e-10, atol=1e-12)
    assert isinstance(lstm(tf.constant(x)), tf.Tensor)   # tf.Tensor in, tf.Tensor out
    for name in ("kernel", "recurrent_kernel", "bias"):
        np.testing.assert_allclose(lstm.grads[name], reference.grads[name], rtol=1e-10, atol=1e-12)


def test_stacked_model_stays_on_tensorflow():
    """Bidirectional + Dropout + LSTM with the TF array helpers (concat, split, flip, scale)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 5, 2)).astype("float32")
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]], bool)
    dy = rng.normal(size=(3, 4)).astype("float32")
    results = {}
    for backend in ("numpy", "tensorflow"):
        model = le.Sequential([
            le.Bidirectional(le.LSTM(3, return_sequences=True, backend=backend, seed=3), merge_mode="ave"),
            le.Bidirectional(le.LSTM(3, return_sequences=True, backend=backend, seed=4), merge_mode="concat"),
            le.LSTM(4, backend=backend, seed=5)])
        y = model(x, mask=mask, training=True)
        dx = model.backward(dy)
        results[backend] = (np.asarray(y), np.asarray(dx), model.grads)
    np.testing.assert_allclose(results["tensorflow"][0], results["numpy"][0], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(results["tensorflow"][1], results["numpy"][1], rtol=2e-4, atol=2e-5)
    for name, value in results["numpy"][2].items():
        np.testing.assert_allclose(results["tensorflow"][2][name], value, rtol=2e-4, atol=2e-5, err_msg=name)


def test_new_shapes_do_not_retrace():
    backend = tf_backend()
    rng = np.random.default_rng(3)
    kwargs = dict(activation="tanh", recurrent_activation="sigmoid", return_sequences=True, training=True)

    def run(batch, steps, features, units):
        x = rng.normal(size=(batch, steps, features)).astype("float32")
        zeros = np.zeros((batch, units), "float32")
        forward = sequence_forward(backend,
            x, zeros, zeros, rng.normal(size=(features, 4 * units)).astype("float32"),
            rng.normal(size=(units, 4 * units)).astype("float32"), None,
            np.ones((batch, steps), bool), **kwargs)
        backend.sequence_backward(np.ones((batch, steps, units), "float32"), zeros, zeros, forward.workspace)
        return forward

    forward = run(2, 3, 4, 5)
    options, dtype = forward.workspace.options, forward.workspace.dtype
    run(3, 7, 2, 6)
    run(1, 1, 1, 1)
    assert backend._forward_function(options, dtype).experimental_get_tracing_count() == 1
    assert backend._backward_function(options, dtype).experimental_get_tracing_count() == 1


def test_runs_inside_tf_function_and_xla():
    """The backend's ops compose into a caller's tf.function, compiled by XLA too."""
    backend = tf_backend()
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(size=(2, 5, 3)).astype("float32"))
    kernel = tf.constant(rng.normal(size=(3, 8)).astype("float32"))
    recurrent_kernel = tf.constant(rng.normal(size=(2, 8)).astype("float32"))
    mask = tf.constant([[True] * 5, [True, True, False, False, False]])
    zeros = tf.zeros((2, 2))

    def forward_backward(x):
        forward = sequence_forward(backend, x, zeros, zeros, kernel, recurrent_kernel, None, mask,
                                           return_sequences=False, training=True)
        grads = backend.sequence_backward(tf.ones_like(forward.outputs), zeros, zeros, forward.workspace)
        return forward.outputs, grads.dx

    eager = forward_backward(x)
    for compiled in (tf.function(forward_backward), tf.function(forward_backward, jit_compile=True)):
        outputs, dx = compiled(x)
        np.testing.assert_allclose(outputs.numpy(), eager[0].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dx.numpy(), eager[1].numpy(), rtol=1e-5, atol=1e-6)


def test_array_helpers_use_tensors():
    backend = tf_backend()
    a = backend.ops.asarray(np.arange(12, dtype="float32").reshape(2, 3, 2), "float32")
    assert backend.ops.owns(a) and not backend.ops.owns(np.zeros(2))
    np.testing.assert_array_equal(backend.ops.to_numpy(backend.ops.swap_batch_time(a)), np.swapaxes(a.numpy(), 0, 1))
    np.testing.assert_array_equal(backend.ops.to_numpy(backend.ops.flip_time(a)), a.numpy()[:, ::-1])
    left, right = backend.ops.split_last(backend.ops.concatenate([a, backend.ops.scale(a, 2.0)]), [2, 2])
    np.testing.assert_array_equal(right.numpy(), 2 * left.numpy())
    np.testing.assert_array_equal(backend.ops.to_numpy(backend.ops.expand_time(a[:, 0])), a.numpy()[:, :1])
    assert backend.ops.zeros((2, 3), np.float64).dtype == tf.float64
