"""lstmeng.optim against torch.optim, against textbook NumPy formulas, and host against device (CUDA simulator)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import lstmeng as le
from lstmeng import optim

torch = pytest.importorskip("torch")

#: (rtol, atol) for the same update done by two implementations in the same dtype.
TOLERANCES = {"float32": (2e-5, 2e-6), "float64": (1e-12, 1e-14)}
STEPS = 5


class ArrayModel:
    """The smallest "model": params and grads dicts of arrays."""

    def __init__(self, params: dict, grads: dict):
        self.params, self.grads = params, grads


def random_arrays(dtype, seed=0) -> dict:
    """A 2-D kernel [3, 8] and a bias [8], entries N(0, 1)."""
    rng = np.random.default_rng(seed)
    return {"kernel": rng.normal(size=(3, 8)).astype(dtype), "bias": rng.normal(size=8).astype(dtype)}


def gradient_sequence(dtype, steps=STEPS, seed=1) -> list[dict]:
    """A different gradient per step, with the scales of the two arrays far apart (Adam's per-entry scaling shows)."""
    rng = np.random.default_rng(seed)
    return [{"kernel": (rng.normal(size=(3, 8)) * 3.0).astype(dtype), "bias": (rng.normal(size=8) * 0.01).astype(dtype)}
            for _ in range(steps)]


def assert_close(actual, expected, dtype, what=""):
    rtol, atol = TOLERANCES[np.dtype(dtype).name]
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def run_lstmeng(make_optimizer, dtype, steps=STEPS):
    params = random_arrays(dtype)
    model = ArrayModel(params, {})
    optimizer = make_optimizer(model)
    for grads in gradient_sequence(dtype, steps):
        model.grads = {name: value.copy() for name, value in grads.items()}
        optimizer.step()
    return params, optimizer


def run_torch(make_optimizer, dtype, steps=STEPS):
    tensors = {name: torch.nn.Parameter(torch.from_numpy(value.copy()))
               for name, value in random_arrays(dtype).items()}
    optimizer = make_optimizer(list(tensors.values()))
    for grads in gradient_sequence(dtype, steps):
        for name, tensor in tensors.items():
            tensor.grad = torch.from_numpy(grads[name].copy())
        optimizer.step()
    return {name: tensor.detach().numpy() for name, tensor in tensors.items()}, optimizer, tensors


OPTIMIZER_PAIRS = {
    "sgd": (lambda m: optim.SGD(m, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1, foreach=False)),
    "sgd-momentum-decay": (lambda m: optim.SGD(m, lr=0.05, momentum=0.9, weight_decay=0.01),
                           lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01, foreach=False)),
    "sgd-nesterov": (lambda m: optim.SGD(m, lr=0.05, momentum=0.8, nesterov=True),
                     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True, foreach=False)),
    "adam": (lambda m: optim.Adam(m, lr=1e-2), lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False)),
    "adam-l2": (lambda m: optim.Adam(m, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
                lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, foreach=False)),
    "adamw": (lambda m: optim.AdamW(m, lr=1e-2, weight_decay=0.1),
              lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False)),
    "adamw-default-decay": (lambda m: optim.AdamW(m), lambda p: torch.optim.AdamW(p, foreach=False)),
}


# -- against torch.optim ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(OPTIMIZER_PAIRS))
def test_matches_torch_optim(name, dtype):
    ours, theirs = OPTIMIZER_PAIRS[name]
    params, optimizer = run_lstmeng(ours, dtype)
    expected, torch_optimizer, tensors = run_torch(theirs, dtype)
    for key in params:
        assert params[key].dtype == np.dtype(dtype)
        assert_close(params[key], expected[key], dtype, f"{name} {key}")
    # The state too: resuming from it must continue torch's run.
    state = optimizer.state_dict()["state"]
    for key, tensor in tensors.items():
        for slot, value in torch_optimizer.state[tensor].items():
            if slot != "step":
                assert_close(state[f"{slot}/{key}"], value.numpy(), dtype, f"{name} {slot} of {key}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(dtype, max_norm):
    grads = gradient_sequence(dtype, steps=1)[0]
    model = ArrayModel(random_arrays(dtype), {name: value.copy() for name, value in grads.items()})
    tensors = [torch.nn.Parameter(torch.zeros(value.shape, dtype=getattr(torch, dtype))) for value in grads.values()]
    for tensor, value in zip(tensors, grads.values()):
        tensor.grad = torch.from_numpy(value.copy())
    expected_norm = float(torch.nn.utils.clip_grad_norm_(tensors, max_norm))
    norm = optim.clip_grad_norm(model, max_norm)
    assert isinstance(norm, float)
    assert norm == pytest.approx(expected_norm, rel=1e-6)
    for value, tensor in zip(model.grads.values(), tensors):
        assert_close(value, tensor.grad.numpy(), dtype)
    if max_norm < expected_norm:
        clipped = np.sqrt(sum(float(np.sum(value.astype(np.float64) ** 2)) for value in model.grads.values()))
        assert clipped == pytest.approx(max_norm, rel=1e-5)


# -- against the textbook formulas ----------------------------------------------------------------------------------
def test_adam_matches_textbook_formula():
    """Kingma & Ba's algorithm 1 written out in float64, with eps added to sqrt(v_hat)."""
    lr, beta1, beta2, eps = 1e-2, 0.9, 0.999, 1e-8
    params, _ = run_lstmeng(lambda m: optim.Adam(m, lr=lr, betas=(beta1, beta2), eps=eps), "float64")
    for key, expected in random_arrays("float64").items():
        first = np.zeros_like(expected)
        second = np.zeros_like(expected)
        for t, grads in enumerate(gradient_sequence("float64"), start=1):
            g = grads[key]
            first = beta1 * first + (1 - beta1) * g
            second = beta2 * second + (1 - beta2) * g ** 2
            first_hat, second_hat = first / (1 - beta1 ** t), second / (1 - beta2 ** t)
            expected = expected - lr * first_hat / (np.sqrt(second_hat) + eps)
        np.testing.assert_allclose(params[key], expected, rtol=1e-12, atol=1e-14)


def test_adamw_and_sgd_match_textbook_formulas():
    lr, decay, momentum = 1e-2, 0.1, 0.9
    adamw, _ = run_lstmeng(lambda m: optim.AdamW(m, lr=lr, eps=0.0, weight_decay=decay), "float64", steps=1)
    sgd, _ = run_lstmeng(lambda m: optim.SGD(m, lr=lr, momentum=momentum, weight_decay=decay), "float64", steps=2)
    grads = gradient_sequence("float64", steps=2)
    for key, start in random_arrays("float64").items():
        # AdamW's first step: m_hat = g, v_hat = g^2, so the step is lr * sign(g) after the decay.
        np.testing.assert_allclose(adamw[key], start * (1 - lr * decay) - lr * np.sign(grads[0][key]), rtol=1e-12)
        direction1 = grads[0][key] + decay * start
        after1 = start - lr * direction1
        buffer2 = momentum * direction1 + grads[1][key] + decay * after1
        np.testing.assert_allclose(sgd[key], after1 - lr * buffer2, rtol=1e-12)


# -- on real layers -----------------------------------------------------------------------------------------------
def _train_once(model, x):
    y = model(x, training=True)
    model.backward(np.ones_like(y) / y.size)


@pytest.mark.parametrize("make_model", [
    lambda: le.LSTM(5, seed=0),
    lambda: le.Bidirectional(le.LSTM(4, return_sequences=True, seed=1)),
    lambda: le.Sequential([le.Bidirectional(le.LSTM(4, return_sequences=True, seed=2)), le.LSTM(3, seed=3)]),
], ids=["LSTM", "Bidirectional", "Sequential"])
def test_updates_the_live_weights_of_layers_and_models(make_model):
    """On wrappers ``params`` is a new dict at each access: only in-place updates reach the sublayers."""
    model = make_model()
    x = np.random.default_rng(0).normal(size=(2, 6, 3)).astype(np.float32)
    optimizer = optim.Adam(model, lr=1e-2)
    tensors, torch_optimizer = None, None
    for _ in range(3):
        _train_once(model, x)
        if tensors is None:  # torch starts from the same weights
            tensors = {name: torch.nn.Parameter(torch.from_numpy(np.array(value)))
                       for name, value in model.params.items()}
            torch_optimizer = torch.optim.Adam(list(tensors.values()), lr=1e-2, foreach=False)
        for name, grad in model.grads.items():
            tensors[name].grad = torch.from_numpy(np.array(grad))
        torch_optimizer.step()
        optimizer.step()
    weights = model.params
    assert set(weights) == set(tensors)
    for name, tensor in tensors.items():
        assert_close(weights[name], tensor.detach().numpy(), "float32", name)
    # And the layer's own calls see the new weights.
    assert_close(np.concatenate([w.ravel() for w in model.get_weights()]),
                 np.concatenate([tensors[name].detach().numpy().ravel() for name in model.params]), "float32")


def test_list_of_models_and_zero_grad():
    first, second = le.LSTM(3, seed=0), le.LSTM(2, seed=1)
    x = np.ones((2, 4, 3), np.float32)
    _train_once(first, x)
    _train_once(second, x)
    optimizer = optim.SGD([first, second], lr=0.1)
    before = {name: value.copy() for name, value in first.params.items()}
    grads = {name: value.copy() for name, value in first.grads.items()}
    optimizer.step()
    for name in before:
        np.testing.assert_allclose(first.params[name], before[name] - np.float32(0.1) * grads[name], rtol=1e-6)
    assert set(optimizer.state_dict()["state"]) == set()  # plain SGD keeps no state
    optimizer.zero_grad()
    for model in (first, second):
        assert all(not value.any() for value in model.grads.values())


# -- state_dict ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sgd-momentum-decay", "adam-l2", "adamw"])
def test_state_dict_resumes_exactly(name):
    make = OPTIMIZER_PAIRS[name][0]
    uninterrupted, _ = run_lstmeng(make, "float64", steps=5)

    params = random_arrays("float64")
    model = ArrayModel(params, {})
    optimizer = make(model)
    sequence = gradient_sequence("float64", steps=5)
    for grads in sequence[:3]:
        model.grads = grads
        optimizer.step()
    saved = optimizer.state_dict()
    json.dumps(saved["config"])  # JSON-able, for le.save
    assert saved["config"]["step"] == 3 and saved["config"]["optimizer"] == type(optimizer).__name__
    assert all(isinstance(value, np.ndarray) for value in saved["state"].values())

    resumed = make(model)
    resumed.config = {**resumed.config, "lr": 123.0}   # overwritten by the load, as torch does
    resumed.load_state_dict(saved)
    assert resumed.config == optimizer.config
    for grads in sequence[3:]:
        model.grads = grads
        resumed.step()
    for key in params:
        np.testing.assert_array_equal(params[key], uninterrupted[key])


def test_load_state_dict_names_what_does_not_match():
    _, adam = run_lstmeng(lambda m: optim.Adam(m), "float32", steps=1)
    saved = adam.state_dict()
    other = ArrayModel(random_arrays("float32"), {})
    with pytest.raises(ValueError, match="for optimizer 'Adam', this is 'SGD'"):
        optim.SGD(other, lr=0.1).load_state_dict(saved)
    renamed = ArrayModel({"weights": other.params["kernel"]}, {})
    with pytest.raises(ValueError, match=r"missing \['exp_avg/weights'.*unexpected \['exp_avg/bias'"):
        optim.Adam(renamed).load_state_dict(saved)
    reshaped = ArrayModel({"kernel": np.zeros((8, 3), np.float32), "bias": np.zeros(8, np.float32)}, {})
    with pytest.raises(ValueError, match=r"'exp_avg/kernel' has shape \(3, 8\), but parameter 'kernel' has \(8, 3\)"):
        optim.Adam(reshaped).load_state_dict(saved)
    bad_config = {"config": {**saved["config"], "betas": [0.9, 1.5]}, "state": saved["state"]}
    target = optim.Adam(other)
    with pytest.raises(ValueError, match=r"betas\[1\] must be a finite number in \[0, 1\)"):
        target.load_state_dict(bad_config)
    assert target.step_count == 0 and target.state_dict()["state"] == {}   # nothing half-loaded


# -- argument checks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda m: optim.SGD(m, lr=-0.1), r"lr must be a finite number in >= 0, got -0.1"),
    (lambda m: optim.Adam(m, lr=float("nan")), "lr must be a finite number"),
    (lambda m: optim.Adam(m, betas=(0.9, 1.0)), r"betas\[1\] must be a finite number in \[0, 1\), got 1.0"),
    (lambda m: optim.AdamW(m, betas=(-0.1, 0.9)), r"betas\[0\]"),
    (lambda m: optim.Adam(m, betas=0.9), "betas must be a pair"),
    (lambda m: optim.SGD(m, lr=0.1, nesterov=True), "nesterov=True needs momentum > 0"),
    (lambda m: optim.SGD(m, lr=0.1, momentum=1.0), "momentum must be"),
    (lambda m: optim.Adam(m, weight_decay=-1), "weight_decay must be"),
    (lambda m: optim.Adam(m, eps="small"), "eps must be a number, got str"),
])
def test_bad_hyperparameters_raise(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make(ArrayModel(random_arrays("float32"), {}))


def test_bad_models_and_gradients_raise_before_changing_anything():
    with pytest.raises(TypeError, match="expected an object with `params` and `grads`"):
        optim.Adam(object())
    with pytest.raises(TypeError, match=r"model\[1\]"):
        optim.Adam([le.LSTM(2), {"kernel": np.zeros(2)}])
    with pytest.raises(ValueError, match="no parameters yet"):
        optim.Adam(le.LSTM(2)).step()

    params = random_arrays("float32")
    before = {name: value.copy() for name, value in params.items()}
    model = ArrayModel(params, {"kernel": np.ones((3, 8), np.float32)})
    optimizer = optim.Adam(model)
    with pytest.raises(ValueError, match=r"grads missing for \['bias'\].*call backward\(\) before step\(\)"):
        optimizer.step()
    model.grads["bias"] = np.ones(7, np.float32)
    with pytest.raises(ValueError, match=r"grads\['bias'\] has shape \(7,\), but the parameter has \(8,\)"):
        optimizer.step()
    model.grads["bias"] = np.ones(8, np.float64)
    with pytest.raises(TypeError, match=r"grads\['bias'\] has dtype float64, but the parameter has float32"):
        optimizer.step()
    model.grads["bias"] = np.ones(8, np.float32)
    params["bias"].flags.writeable = False
    with pytest.raises(ValueError, match=r"params\['bias'\] is read-only"):
        optimizer.step()
    params["bias"].flags.writeable = True
    for name in params:   # the kernel, checked first, was not updated either
        np.testing.assert_array_equal(params[name], before[name])
    assert optimizer.step_count == 0
    with pytest.raises(ValueError, match="max_norm must be"):
        optim.clip_grad_norm(model, -1.0)


def test_importing_lstmeng_does_not_import_numba():
    code = ("import sys, numpy as np, lstmeng as le; m = le.LSTM(2, seed=0).build(2);"
            "m.grads = {k: np.ones_like(v) for k, v in m.params.items()};"
            "le.optim.clip_grad_norm(m, 1.0); le.optim.Adam(m).step(); print('numba' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# -- on device arrays (CUDA simulator in CI, the GPU with LSTMENG_REAL_CUDA=1) ----------------------------------------
@pytest.fixture
def cuda_backend():
    pytest.importorskip("numba")
    from lstmeng.backends import registry
    backend = registry.get_backend_object("numba_cuda")
    try:
        backend.probe()
    except NotImplementedError as error:
        pytest.skip(str(error))
    return backend


def _device_model(backend, arrays: dict, dtype) -> ArrayModel:
    return ArrayModel({name: backend.ops.asarray(value, dtype) for name, value in arrays.items()}, {})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["sgd", "sgd-momentum-decay", "sgd-nesterov", "adam-l2", "adamw"])
def test_device_matches_host(cuda_backend, name, dtype):
    make = OPTIMIZER_PAIRS[name][0]
    host, host_optimizer = run_lstmeng(make, dtype, steps=3)
    model = _device_model(cuda_backend, random_arrays(dtype), dtype)
    live = dict(model.params)
    optimizer = make(model)
    for grads in gradient_sequence(dtype, steps=3):
        model.grads = {key: cuda_backend.ops.asarray(value, dtype) for key, value in grads.items()}
        optimizer.step()
    for key in host:
        assert live[key] is model.params[key]   # updated in place
        assert cuda_backend.ops.owns(live[key])
        assert_close(cuda_backend.ops.to_numpy(live[key]), host[key], dtype, f"{name} {key}")
    for slots in optimizer._state.values():      # the state stays next to the parameters
        assert all(cuda_backend.ops.owns(array) for array in slots.values())
    device_state, host_state = optimizer.state_dict(), host_optimizer.state_dict()
    assert device_state["config"] == host_state["config"]
    for key, value in host_state["state"].items():
        assert isinstance(device_state["state"][key], np.ndarray)
        assert_close(device_state["state"][key], value, dtype, key)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_device_clip_grad_norm_and_zero_grad(cuda_backend, dtype, max_norm):
    grads = gradient_sequence(dtype, steps=1)[0]
    host = ArrayModel(random_arrays(dtype), {key: value.copy() for key, value in grads.items()})
    device = _device_model(cuda_backend, random_arrays(dtype), dtype)
    device.grads = {key: cuda_backend.ops.asarray(value, dtype) for key, value in grads.items()}
    assert optim.clip_grad_norm(device, max_norm) == pytest.approx(optim.clip_grad_norm(host, max_norm), rel=1e-6)
    allocations = cuda_backend.pool_allocations()
    optim.clip_grad_norm(device, 1e9)   # the norm's scalar comes back from the pool: no new allocation
    assert cuda_backend.pool_allocations() == allocations
    for key in grads:
        assert_close(cuda_backend.ops.to_numpy(device.grads[key]), host.grads[key], dtype, key)
    optim.SGD(device, lr=0.1).zero_grad()
    assert all(not cuda_backend.ops.to_numpy(value).any() for value in device.grads.values())


def test_device_state_dict_loads_onto_the_device(cuda_backend):
    make = OPTIMIZER_PAIRS["adam-l2"][0]
    uninterrupted, _ = run_lstmeng(make, "float32", steps=4)
    host_params = random_arrays("float32")
    host = ArrayModel(host_params, {})
    optimizer = make(host)
    sequence = gradient_sequence("float32", steps=4)
    for grads in sequence[:2]:
        host.grads = grads
        optimizer.step()
    device = _device_model(cuda_backend, host_params, "float32")
    resumed = make(device)
    resumed.load_state_dict(optimizer.state_dict())
    assert all(cuda_backend.ops.owns(array) for slots in resumed._state.values() for array in slots.values())
    for grads in sequence[2:]:
        device.grads = {key: cuda_backend.ops.asarray(value, "float32") for key, value in grads.items()}
        resumed.step()
    for key, value in uninterrupted.items():
        assert_close(cuda_backend.ops.to_numpy(device.params[key]), value, "float32", key)


def test_device_and_host_gradients_cannot_mix(cuda_backend):
    model = _device_model(cuda_backend, random_arrays("float32"), "float32")
    model.grads = {key: np.ones(value.shape, np.float32) for key, value in model.params.items()}
    with pytest.raises(ValueError, match=r"grads\['kernel'\] is on cpu but the parameter is on cuda"):
        optim.Adam(model).step()


def test_gpu_layer_trains_like_the_host_layer_without_host_copies(cuda_backend, monkeypatch):
    """An LSTM on numba_cuda (params and grads on the device) stepped by Adam matches the NumPy layer,
    and neither clip_grad_norm nor step copies a weight, gradient or moment across the bus."""
    x = np.random.default_rng(0).normal(size=(2, 3, 3)).astype(np.float32)
    host, gpu = le.LSTM(3, seed=0, backend="numpy"), le.LSTM(3, seed=0, backend="numba_cuda")
    host_optimizer = optim.Adam(host, lr=1e-2, weight_decay=0.1)
    gpu_optimizer = optim.Adam(gpu, lr=1e-2, weight_decay=0.1)
    transfers = []
    for step in range(3):
        host(x, training=True)
        host.backward(np.ones((2, 3), np.float32))
        gpu(cuda_backend.ops.asarray(x, np.float32), training=True)
        gpu.backward(cuda_backend.ops.asarray(np.ones((2, 3), np.float32), np.float32))
        assert all(cuda_backend.ops.owns(grad) for grad in gpu.grads.values())
        host_norm = optim.clip_grad_norm(host, 0.5)
        host_optimizer.step()
        with monkeypatch.context() as patch:
            for name in ("asarray", "to_numpy"):
                original = getattr(cuda_backend.ops, name)
                patch.setattr(cuda_backend.ops, name, lambda array, *rest, _name=name, _original=original: (
                    transfers.append((step, _name, _shape_of_any(array))), _original(array, *rest))[1])  # noqa: B023 (called in this iteration)
            gpu_norm = optim.clip_grad_norm(gpu, 0.5)
            gpu_optimizer.step()
        assert gpu_norm == pytest.approx(host_norm, rel=1e-5)
    # The only crossing: clip_grad_norm's one-element sum of squares, once per step.
    assert transfers == [(step, "to_numpy", (1,)) for step in range(3)]
    for name, value in host.params.items():
        assert_close(cuda_backend.ops.to_numpy(gpu.params[name]), value, "float32", name)


def _shape_of_any(array):
    return tuple(getattr(array, "shape", ()))


def test_device_flat_views_are_built_once_and_leave_with_their_array(cuda_backend):
    import gc

    from lstmeng.backends import _cuda_optim
    array = cuda_backend.ops.asarray(np.zeros((3, 4), np.float32), np.float32)
    first = _cuda_optim.flat_view(array, "param")
    assert _cuda_optim.flat_view(array, "param") is first
    assert first.shape == (12,)
    key = id(array)
    assert key in _cuda_optim._FLAT_VIEWS
    del array, first
    gc.collect()
    assert key not in _cuda_optim._FLAT_VIEWS
    with pytest.raises(ValueError, match="needs them C-contiguous"):
        _cuda_optim.flat_view(cuda_backend.ops.asarray(np.zeros((4, 6), np.float32), np.float32)[:, 1:3], "grad")
