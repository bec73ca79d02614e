"""Dense, Embedding, the losses and le.fit on the numba_cuda backend's device arrays.

Every device result is compared with the host code of the same layer or loss
(float64 at the tight tolerance of ``lstmeng.testing.TOLERANCES``, float32 at
the loose one) and every device gradient with central differences. Under the
CUDA simulator (tests/conftest.py) the kernels run in Python, so the shapes
are tiny; with LSTMENG_REAL_CUDA=1 the same tests run on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

import lstmeng as le
from lstmeng import losses
from lstmeng.backends import registry

from _backends import (
    REAL_GPU,
    assert_close,
    fast_simulator_thread_switches,
    numba_cuda_backend,
    numerical_gradient,
    ptx_check_lines,
    to_host,
)

ACTIVATIONS = [None, "tanh", "relu", "sigmoid", "softmax"]

_fast_switches = pytest.fixture(autouse=True, scope="module")(fast_simulator_thread_switches)


@pytest.fixture
def backend():
    return numba_cuda_backend()


def _device(backend, array):
    array = np.asarray(array)
    return backend.ops.asarray(array, array.dtype)


def _on_device(array) -> bool:
    return registry.array_kind(array) == "cuda"


def _dense_pair(backend, activation, dtype, features=3, units=4, seed=1):
    """A host Dense and the same layer on the GPU, with a random bias (so it matters)."""
    rng = np.random.default_rng(seed)
    host = le.Dense(units, activation=activation, dtype=dtype, seed=seed).build(features)
    host.params["bias"] = rng.normal(size=units).astype(dtype)
    gpu = le.Dense(units, activation=activation, dtype=dtype, seed=seed).to("cuda")
    gpu.set_weights(host.get_weights())
    return host, gpu


# -- Dense ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_on_the_device_matches_the_host(backend, activation, dtype):
    """Two backwards of one round (the second adds) and a second round (written into the same arrays)."""
    host, gpu = _dense_pair(backend, activation, dtype)
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(2, 3, 3)).astype(dtype), rng.normal(size=(3, 3)).astype(dtype)]
    dys = [rng.normal(size=(2, 3, 4)).astype(dtype), rng.normal(size=(3, 4)).astype(dtype)]
    ys = [gpu(_device(backend, x), training=True) for x in xs]
    for x, y in zip(xs, ys):
        assert _on_device(y)
        assert_close(y, host(x, training=True), "y", dtype)
    for dy in reversed(dys):
        dx = gpu.backward(_device(backend, dy))
        assert _on_device(dx)
        assert_close(dx, host.backward(dy), "dx", dtype, gradient=True)
    for name in ("kernel", "bias"):
        assert _on_device(gpu.grads[name])
        assert_close(gpu.grads[name], host.grads[name], f"d{name} (summed over the round)", dtype, gradient=True)
    arrays = dict(gpu.grads)
    gpu(_device(backend, xs[0]), training=True)
    gpu.backward(_device(backend, dys[0]))
    host(xs[0], training=True)
    host.backward(dys[0])
    for name in ("kernel", "bias"):
        assert gpu.grads[name] is arrays[name], "a new round writes into the previous gradients"
        assert_close(gpu.grads[name], host.grads[name], f"d{name}", dtype, gradient=True)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_device_gradients_match_finite_differences(backend, activation):
    host, gpu = _dense_pair(backend, activation, "float64", features=3, units=3)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3))
    weights = rng.normal(size=(2, 3))
    params = {name: to_host(value) for name, value in gpu.params.items()}

    def loss():
        for name, value in params.items():   # the perturbed host copy, written into the device arrays
            gpu.params[name] = _device(backend, value)
        return float(np.sum(to_host(gpu(_device(backend, x))) * weights))

    loss()
    gpu(_device(backend, x), training=True)
    dx = to_host(gpu.backward(_device(backend, weights)))
    grads = {name: to_host(value) for name, value in gpu.grads.items()}
    np.testing.assert_allclose(dx, numerical_gradient(loss, x), rtol=1e-6, atol=1e-8)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(grads[name], numerical_gradient(loss, params[name]), rtol=1e-6, atol=1e-8,
                                   err_msg=name)


def test_dense_softmax_on_the_device_does_not_overflow(backend):
    host, gpu = _dense_pair(backend, "softmax", "float32", features=2, units=3)
    x = np.array([[500.0, -300.0], [-800.0, 900.0]], np.float32)
    y = to_host(gpu(_device(backend, x)))
    assert np.all(np.isfinite(y)) and np.allclose(y.sum(axis=-1), 1.0)
    assert_close(y, host(x), "y", "float32")


def test_gpu_dense_takes_host_arrays_numpy_in_numpy_out(backend):
    host, gpu = _dense_pair(backend, "tanh", "float32")
    x = np.random.default_rng(4).normal(size=(2, 3)).astype(np.float32)
    y = gpu(x, training=True)
    assert type(y) is np.ndarray
    dx = gpu.backward(np.ones_like(y))
    assert type(dx) is np.ndarray and _on_device(gpu.grads["kernel"])
    host(x, training=True)
    assert_close(dx, host.backward(np.ones_like(y)), "dx", "float32", gradient=True)


def test_dense_never_called_adopts_the_gpu_at_a_device_input(backend):
    dense = le.Dense(2, seed=0).build(3)
    dense(_device(backend, np.ones((1, 3), np.float32)))
    assert dense.device == "cuda:0" and all(_on_device(value) for value in dense.params.values())


# -- Embedding ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_embedding_on_the_device_matches_the_host_and_finite_differences(backend, dtype):
    host = le.Embedding(6, 3, mask_zero=True, dtype=dtype, seed=0).build()
    gpu = le.Embedding(6, 3, mask_zero=True, dtype=dtype, seed=0).to("cuda").build()
    assert _on_device(gpu.params["embeddings"])
    assert_close(gpu.params["embeddings"], host.params["embeddings"], "table", dtype)
    ids = np.array([[1, 1, 4], [5, 1, 0]], np.int32)     # id 1 three times: the scatter-add sums them
    mask = gpu.compute_mask(_device(backend, ids))
    assert _on_device(mask) and to_host(mask).dtype == bool
    np.testing.assert_array_equal(to_host(mask), ids != 0)
    out = gpu(_device(backend, ids), training=True)
    assert_close(out, host(ids, training=True), "out", dtype)
    dy = np.random.default_rng(5).normal(size=(2, 3, 3)).astype(dtype)
    assert gpu.backward(_device(backend, dy)) is None
    host.backward(dy)
    assert _on_device(gpu.grads["embeddings"])
    assert_close(gpu.grads["embeddings"], host.grads["embeddings"], "dembeddings", dtype, gradient=True)
    if dtype != "float64":
        return
    table = to_host(gpu.params["embeddings"])

    def loss():
        gpu.params["embeddings"] = _device(backend, table)
        return float(np.sum(to_host(gpu(_device(backend, ids))) * dy))

    np.testing.assert_allclose(to_host(gpu.grads["embeddings"]), numerical_gradient(loss, table), rtol=1e-6,
                               atol=1e-8)


def test_embedding_checks_device_ids_as_host_ids(backend):
    gpu = le.Embedding(6, 2, seed=0).to("cuda")
    with pytest.raises(ValueError, match=r"ids must be in \[0, 6\).*got 6 at position \(1, 0\)"):
        gpu(_device(backend, np.array([[1, 2], [6, -1]])))
    with pytest.raises(ValueError, match=r"got -1 at position \(0, 1\)"):
        gpu(_device(backend, np.array([[1, -1]])))
    with pytest.raises(TypeError, match="integer token ids, got dtype float32"):
        gpu(_device(backend, np.ones((1, 2), np.float32)))
    with pytest.raises(ValueError, match=r"got 7 at position \(0, 0\)"):
        gpu(np.array([[7]]))                           # host ids to a GPU layer: checked on the host
    out = gpu(np.array([[0, 5]]))
    assert type(out) is np.ndarray and out.shape == (1, 2, 2)


# -- losses ---------------------------------------------------------------------------------------------------
def _loss_cases(dtype):
    rng = np.random.default_rng(6)
    mask = np.array([[True, True, False], [True, False, False]])
    logits = (rng.normal(size=(2, 3, 4)) * 3).astype(dtype)
    ids = rng.integers(0, 4, size=(2, 3))
    return [
        ("mse", losses.mean_squared_error, logits, rng.normal(size=(2, 3, 4)), None),
        ("mse masked", losses.mean_squared_error, logits, rng.normal(size=(2, 3, 4)).astype(dtype), mask),
        ("sce ids", losses.softmax_cross_entropy, logits, ids, None),
        ("sce ids masked", losses.softmax_cross_entropy, logits, ids.astype(np.int32), mask),
        ("sce one-hot masked", losses.softmax_cross_entropy, logits, np.eye(4)[ids], mask),
        ("sce soft", losses.softmax_cross_entropy, logits, rng.dirichlet(np.ones(4), size=(2, 3)).astype(dtype),
         None),
        ("bce", losses.binary_cross_entropy, logits, (rng.random((2, 3, 4)) < 0.5).astype(dtype), None),
        ("bce masked", losses.binary_cross_entropy, logits, rng.random((2, 3, 4)), rng.random((2, 3, 4)) < 0.5),
    ]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_losses_on_the_device_match_the_host(backend, dtype):
    for label, function, predictions, targets, mask in _loss_cases(dtype):
        expected_loss, expected_gradient = function(predictions, targets, mask=mask)
        device_mask = None if mask is None else _device(backend, mask)
        loss, gradient = function(_device(backend, predictions), _device(backend, targets), mask=device_mask)
        assert isinstance(loss, float) and _on_device(gradient), label
        rtol = 1e-12 if dtype == "float64" else 1e-6
        assert loss == pytest.approx(expected_loss, rel=rtol), label
        assert_close(gradient, expected_gradient, label, dtype, gradient=True)
        # Host targets and mask with device predictions are copied in.
        assert function(_device(backend, predictions), targets, mask=mask)[0] == pytest.approx(loss, rel=1e-12)


def _device_loss_gradient_and_finite_differences(backend, function, predictions, targets, mask):
    """The device gradient of ``function`` at host ``predictions`` and its central differences."""
    targets = _device(backend, targets)
    mask = None if mask is None else _device(backend, mask)
    _, gradient = function(_device(backend, predictions), targets, mask=mask)
    expected = numerical_gradient(lambda: function(_device(backend, predictions), targets, mask=mask)[0],
                                  predictions)
    return to_host(gradient), expected


def test_losses_on_the_device_match_finite_differences(backend):
    for label, function, predictions, targets, mask in _loss_cases("float64"):
        # Two entries per row: two loss calls per entry.
        gradient, expected = _device_loss_gradient_and_finite_differences(
            backend, function, predictions[:1, :2], np.asarray(targets)[:1, :2], None if mask is None else mask[:1, :2])
        np.testing.assert_allclose(gradient, expected, rtol=1e-6, atol=1e-9, err_msg=label)


def test_device_losses_count_nothing_and_stay_finite(backend):
    nothing = _device(backend, np.zeros((2, 3), bool))
    predictions = _device(backend, np.ones((2, 3, 2), np.float32))
    for function, targets in ((losses.mean_squared_error, np.zeros((2, 3, 2))),
                              (losses.softmax_cross_entropy, np.zeros((2, 3), np.int64))):
        loss, gradient = function(predictions, _device(backend, targets), mask=nothing)
        assert loss == 0.0 and not to_host(gradient).any() and to_host(gradient).dtype == np.float32
    loss, gradient = losses.binary_cross_entropy(_device(backend, np.ones(3)), _device(backend, np.ones(3)),
                                                 mask=_device(backend, np.zeros(3, bool)))
    assert loss == 0.0 and not to_host(gradient).any()
    loss, gradient = losses.softmax_cross_entropy(_device(backend, np.array([[1000.0, -1000.0]], np.float32)),
                                                  _device(backend, np.array([1])))
    assert loss == pytest.approx(2000.0) and np.all(np.isfinite(to_host(gradient)))
    loss, _ = losses.binary_cross_entropy(_device(backend, np.array([800.0, -800.0])),
                                          _device(backend, np.array([0.0, 1.0])))
    assert loss == pytest.approx(800.0)


def test_host_predictions_take_device_targets_and_mask_to_the_host(backend):
    logits = np.random.default_rng(10).normal(size=(2, 3))
    ids, mask = np.array([2, 0]), np.array([True, False])
    loss, gradient = losses.softmax_cross_entropy(logits, _device(backend, ids), mask=_device(backend, mask))
    expected_loss, expected_gradient = losses.softmax_cross_entropy(logits, ids, mask=mask)
    assert loss == expected_loss and type(gradient) is np.ndarray
    np.testing.assert_array_equal(gradient, expected_gradient)


def test_device_losses_name_the_bad_argument(backend):
    logits = _device(backend, np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\), got 3"):
        losses.softmax_cross_entropy(logits, _device(backend, np.array([0, 3])))
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\), got -2"):
        losses.softmax_cross_entropy(logits, np.array([-2, 1]), mask=np.array([False, True]))
    with pytest.raises(ValueError, match=r"targets must be integer class ids of shape \(2,\)"):
        losses.softmax_cross_entropy(logits, _device(backend, np.zeros((2, 2))))
    with pytest.raises(TypeError, match="mask must be boolean"):
        losses.binary_cross_entropy(logits, logits, mask=_device(backend, np.ones((2, 3))))
    with pytest.raises(ValueError, match=r"mask must have shape \(2,\), got \(3,\)"):
        losses.mean_squared_error(logits, logits, mask=_device(backend, np.ones(3, bool)))
    with pytest.raises(ValueError, match=r"targets must have the predictions' shape \(2, 3\)"):
        losses.mean_squared_error(logits, np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"targets must have the logits' shape \(2, 3\)"):
        losses.binary_cross_entropy(logits, _device(backend, np.zeros((2, 2))))


# -- whole models ---------------------------------------------------------------------------------------------
def _model(dtype, backend="auto"):
    return le.Sequential([
        le.Embedding(7, 3, mask_zero=True, dtype=dtype, seed=0),
        le.Bidirectional(le.LSTM(2, return_sequences=True, dtype=dtype, backend=backend, seed=1)),
        le.LSTM(2, dtype=dtype, backend=backend, seed=2),
        le.Dense(3, activation="tanh", dtype=dtype, seed=3),
    ])


def _gpu_and_host_models(dtype="float64"):
    host = _model(dtype, backend="numpy").build()
    gpu = _model(dtype).build()
    gpu.set_weights(host.get_weights())
    assert gpu.to("cuda") is gpu and gpu.device == "cuda:0"
    assert all(layer.device == "cuda:0" for layer in gpu.layers)
    return host, gpu


class _Copies:
    """Counts host<->device copies (shapes) by wrapping numba's to_device and the arrays' copy_to_host."""

    def __init__(self, monkeypatch):
        import numba.cuda
        self.shapes = []
        original_to_device = numba.cuda.to_device

        def to_device(array, *args, **kwargs):
            self.shapes.append(("in", tuple(np.shape(array))))
            return original_to_device(array, *args, **kwargs)

        monkeypatch.setattr(numba.cuda, "to_device", to_device)
        if REAL_GPU:
            from numba.cuda.cudadrv.devicearray import DeviceNDArray as array_class
        else:
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as array_class
        original = array_class.copy_to_host

        def copy_to_host(array, *args, **kwargs):
            self.shapes.append(("out", tuple(int(n) for n in array.shape)))
            return original(array, *args, **kwargs)

        monkeypatch.setattr(array_class, "copy_to_host", copy_to_host)


def test_gpu_sequential_matches_the_host_model_and_keeps_everything_on_the_device(backend, monkeypatch):
    """Embedding -> Bidirectional LSTM -> LSTM -> Dense + masked-by-id-0 cross-entropy on the device:
    outputs, loss and every gradient equal the host model's, and a training step copies only the ids'
    range check (8 bytes) and the loss (24 bytes) between host and device."""
    host, gpu = _gpu_and_host_models()
    ids = np.array([[3, 5, 2], [6, 1, 0]])
    targets = np.array([2, 0])
    step_ids, step_targets = _device(backend, ids), _device(backend, targets)

    def step():
        logits = gpu(step_ids, training=True)
        loss, dlogits = losses.softmax_cross_entropy(logits, step_targets)
        assert gpu.backward(dlogits) is None
        return logits, loss

    logits, loss = step()
    assert _on_device(logits)
    expected_logits = host(ids, training=True)
    expected_loss, dlogits = losses.softmax_cross_entropy(expected_logits, targets)
    host.backward(dlogits)
    assert_close(logits, expected_logits, "logits", "float64")
    assert loss == pytest.approx(expected_loss, rel=1e-10)
    assert sorted(gpu.grads) == sorted(host.grads)
    for key, value in gpu.grads.items():
        assert _on_device(value), key
        assert_close(value, host.grads[key], key, "float64", gradient=True)
    copies = _Copies(monkeypatch)
    step()
    monkeypatch.undo()
    assert sorted(copies.shapes) == [("out", (1,)), ("out", (3,))], copies.shapes
    # NumPy in, NumPy out: the model copies the ids in once and the output out; a host mask joins the
    # Embedding's device mask.
    assert_close(gpu(ids), expected_logits, "logits (host ids)", "float64")
    mask = np.array([[True, False, True], [True, True, True]])
    assert_close(gpu(step_ids, mask=mask), host(ids, mask=mask), "logits (a mask too)", "float64")


def test_gpu_sequential_gradients_match_finite_differences(backend):
    _, gpu = _gpu_and_host_models()
    ids, targets = np.array([[3, 5], [6, 0]]), np.array([2, 0])
    rng = np.random.default_rng(7)
    logits = gpu(ids, training=True)
    gpu.backward(losses.softmax_cross_entropy(logits, targets)[1])
    grads = {key: to_host(value) for key, value in gpu.grads.items()}
    for key in ("0.embeddings", "3.kernel", "3.bias", "1.forward.kernel"):
        array = to_host(gpu.params[key])
        index = np.unravel_index(rng.integers(array.size), array.shape)
        if key == "0.embeddings":
            index = (5, int(rng.integers(3)))        # a row that is looked up
        values = []
        for sign in (1, -1):
            perturbed = array.copy()
            perturbed[index] += sign * 1e-6
            gpu.params[key] = _device(backend, perturbed)
            values.append(losses.softmax_cross_entropy(gpu(ids), targets)[0])
        gpu.params[key] = _device(backend, array)
        assert grads[key][index] == pytest.approx((values[0] - values[1]) / 2e-6, rel=1e-5, abs=1e-8), key


def test_fit_one_epoch_on_a_cuda_model_matches_the_host_model(backend):
    host, gpu = _gpu_and_host_models()
    rng = np.random.default_rng(8)
    ids = rng.integers(1, 7, size=(6, 3))
    ids[::2, 2] = 0
    labels = rng.integers(0, 3, size=6)
    mask = np.ones((6, 3), bool)
    mask[1, 1:] = False     # combined with the Embedding's mask (id 0) on the device
    histories = {}
    for name, model in (("host", host), ("gpu", gpu)):
        histories[name] = le.fit(model, "softmax_cross_entropy", le.optim.Adam(model, lr=1e-2),
                                 (ids, labels, mask), epochs=1, batch_size=3, clip_norm=1.0, metrics=["accuracy"],
                                 seed=0, progress=False)
    assert all(_on_device(value) for value in gpu.params.values())
    for key in ("loss", "accuracy"):
        assert histories["gpu"].history[key] == pytest.approx(histories["host"].history[key], rel=1e-9)
    for got, want in zip(gpu.get_weights(), host.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    scores = le.evaluate(gpu, "softmax_cross_entropy", (ids, labels, mask), metrics=["accuracy"])
    expected = le.evaluate(host, "softmax_cross_entropy", (ids, labels, mask), metrics=["accuracy"])
    assert scores == pytest.approx(expected, rel=1e-9)

    def custom_loss(outputs, targets):   # a callable written for NumPy gets host arrays, as on the CPU
        assert type(outputs) is np.ndarray and type(targets) is np.ndarray
        return losses.softmax_cross_entropy(outputs, targets)

    custom = le.evaluate(gpu, custom_loss, (ids[:3], labels[:3], mask[:3]))
    assert custom["loss"] == pytest.approx(le.evaluate(host, "softmax_cross_entropy",
                                                       (ids[:3], labels[:3], mask[:3]))["loss"], rel=1e-9)


# -- devices --------------------------------------------------------------------------------------------------
def test_dense_and_embedding_move_with_to_and_keep_their_weights(backend):
    rng = np.random.default_rng(9)
    for layer, x, dy in ((le.Dense(2, seed=0).build(3), rng.normal(size=(2, 3)), rng.normal(size=(2, 2))),
                         (le.Embedding(5, 2, seed=0).build(), np.array([[1, 4]]), rng.normal(size=(1, 2, 2)))):
        weights = layer.get_weights()
        assert layer.to("cuda") is layer and layer.device == "cuda:0"
        assert all(_on_device(value) for value in layer.params.values())
        layer(x.astype(np.float32) if x.dtype.kind == "f" else x, training=True)
        layer.backward(dy.astype(np.float32))
        grads = {name: to_host(value) for name, value in layer.grads.items()}
        assert all(type(w) is np.ndarray for w in layer.get_weights())
        layer.to("cpu")
        assert layer.device == "cpu"
        assert all(type(value) is np.ndarray for value in layer.params.values())
        for name, value in layer.grads.items():
            np.testing.assert_array_equal(value, grads[name])
        for got, want in zip(layer.get_weights(), weights):
            np.testing.assert_array_equal(got, want)
        layer.to("cuda:0").set_weights([w + 1 for w in weights])
        assert all(_on_device(value) for value in layer.params.values())
        for got, want in zip(layer.get_weights(), weights):
            np.testing.assert_array_equal(got, want + 1)
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        le.Dense(2).to("gpu")


def test_sequential_to_moves_every_layer_and_back_and_loads_onto_the_gpu(backend, tmp_path):
    host, gpu = _gpu_and_host_models("float32")
    le.save(gpu, tmp_path / "model.npz")                      # from the device
    gpu.to("cpu")
    assert gpu.device == "cpu" and all(layer.device == "cpu" for layer in gpu.layers)
    assert all(type(value) is np.ndarray for value in gpu.params.values())
    for got, want in zip(gpu.get_weights(), host.get_weights()):
        np.testing.assert_array_equal(got, want)
    loaded = le.load(tmp_path / "model.npz", device="cuda")
    assert all(layer.device == "cuda:0" for layer in loaded.layers)
    assert all(_on_device(value) for value in loaded.params.values())
    for got, want in zip(loaded.get_weights(), host.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_debug_guard_catches_a_device_input_changed_in_place(backend, monkeypatch):
    monkeypatch.setenv("LSTMENG_DEBUG", "1")
    x_host = np.ones((2, 3), np.float32)
    x = _device(backend, x_host)
    dense = le.Dense(2, seed=0).to("cuda")
    y = dense(x, training=True)
    x.copy_to_device(x_host + 1)
    with pytest.raises(RuntimeError, match="x was modified in place"):
        dense.backward(backend.ops.zeros((2, 2), np.float32))
    x.copy_to_device(x_host)
    assert _on_device(dense.backward(backend.ops.zeros(tuple(y.shape), np.float32)))
    dense(np.ones((1, 3), np.float32), training=True)         # a host input: the layer's own copy, no guard
    assert dense._tapes.last.guard is None


def test_device_arrays_to_layers_on_the_cpu_name_both_devices(backend):
    dense = le.Dense(2, seed=0)
    dense(np.ones((1, 3), np.float32), training=True)          # used on the CPU: its device is settled
    with pytest.raises(ValueError, match=r"x: expected an array on cpu.*got an array on cuda:0.*to\('cuda'\)"):
        dense(_device(backend, np.ones((1, 3), np.float32)))
    with pytest.raises(ValueError, match=r"dy: expected an array on cpu.*on cuda:0"):
        dense.backward(_device(backend, np.ones((1, 2), np.float32)))
    embedding = le.Embedding(4, 2).to("cpu")
    with pytest.raises(ValueError, match=r"ids: expected an array on cpu.*on cuda:0"):
        embedding(_device(backend, np.array([[1]])))
    assert dense.device == embedding.device == "cpu"
    dense.to("cuda")                                           # moved with a call still on the tape
    with pytest.raises(RuntimeError, match="ran on cpu but the layer is on cuda:0 now"):
        dense.backward(np.ones((1, 2), np.float32))
    gpu = le.Dense(2, seed=0).to("cuda")
    with pytest.raises(TypeError, match="x must have dtype float32 on this layer, got float64"):
        gpu(_device(backend, np.ones((1, 3))))


# -- compiling for a real GPU without one ---------------------------------------------------------------------
_COMPILE_CHECK = r'''
from lstmeng.backends import _cuda_layers as cl
kernels = []
for name in ("float32", "float64"):
    f1, f2, m1, acc = A(2, name), A((2, 2), name), A(2, bool), A(3, np.float64)
    for activation in ("tanh", "relu", "sigmoid", "softmax"):
        kernels.append((name, cl._activation_forward_kernel(activation, name, True), (f2, f1)))
        kernels.append((name, cl._activation_backward_kernel(activation, name), (f2, f2, f2)))
    kernels += [(name, cl._squared_error_kernel(name, True), (f2, A((2, 2), np.int64), m1, acc, f2)),
                (name, cl._cross_entropy_kernel(name, True, True), (f2, A(2, np.int32), m1, acc, f2)),
                (name, cl._cross_entropy_kernel(name, False, False), (f2, A((2, 2), np.float64), m1, acc, f2)),
                (name, cl._binary_cross_entropy_kernel(name, True), (f1, A(2, np.float64), m1, acc, f1)),
                (name, cl._gather_rows, (A(2, np.int64), f2, f2)),
                (name, cl._scatter_add_rows, (A(2, np.int32), f2, f2))]
kernels += [("int", cl._first_out_of_range, (A(2, np.int64), numba.int64, A(1, np.int64))),
            ("int", cl._nonzero, (A(2, np.int32), A(2, bool))), ("bool", cl._both, (A(2, bool),) * 3),
            ("bool", cl._count_mask, (A(2, bool), numba.float64, A(3, np.float64))),
            ("bool", cl._set_count, (numba.float64, A(3, np.float64)))]
for name, kernel, signature in kernels:
    ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
    depot = re.findall(r"__local_depot\d+\[(\d+)\]", ptx)
    float64_ops = len(re.findall(r"\.f64", ptx))
    print("OK", name, kernel.py_func.__name__, "local bytes", depot[0] if depot else 0, "float64 ops", float64_ops)
'''


@pytest.mark.slow
@pytest.mark.skipif(REAL_GPU, reason="the GPU session compiles and runs the kernels for real")
def test_layer_kernels_compile_to_ptx_for_hopper():
    """The simulator runs kernels as Python and type-checks nothing: numba compiles each kernel of
    _cuda_layers to sm_90 PTX here (skipped without libnvvm), none spills to local memory, and the
    float32 Dense kernels do no float64 arithmetic (their constants are typed)."""
    lines = ptx_check_lines(_COMPILE_CHECK, timeout=600)
    assert len(lines) == 2 * 14 + 5, lines
    for line in lines:
        assert "local bytes 0 " in line, line
        if line.startswith("OK float32") and ("activate" in line or "softmax" in line or "backward" in line):
            assert line.endswith("float64 ops 0"), line
