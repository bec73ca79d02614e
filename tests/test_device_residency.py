"""Parameters where the compute runs: layers on the GPU keep params, grads and states there.

Under the CUDA simulator (tests/conftest.py) the numba_cuda backend runs its
kernels in Python and its "device" arrays are simulator arrays, so these
tests check the logic (what lives where, what is copied, how many launches,
what is reused) at tiny sizes; every number is compared with the NumPy
reference backend.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import lstmeng as le
from lstmeng.backends import registry

from _backends import sequence_forward

REAL_GPU = os.environ.get("LSTMENG_REAL_CUDA") == "1"


@pytest.fixture
def backend():
    backend, info = registry._entry("numba_cuda")
    if backend is None:
        pytest.skip(f"numba_cuda unavailable: {info.reason}")
    return backend


def _on_device(backend, array) -> bool:
    return registry.array_kind(array) == "cuda" and backend.ops.owns(array)


def _host(backend, array):
    return backend.ops.to_numpy(array) if _on_device(backend, array) else np.asarray(array)


def _reference_and_gpu(backend, units=3, features=2, **options):
    """A NumPy-backend layer and a numba_cuda layer with the same weights."""
    reference = le.LSTM(units, backend="numpy", seed=1, **options).build(features)
    gpu = le.LSTM(units, backend="numba_cuda", seed=1, **options)
    gpu.set_weights(reference.get_weights())
    return reference, gpu


# -- where the parameters are -------------------------------------------------------------------
def test_numba_cuda_layer_starts_on_the_gpu_and_moves(backend):
    layer = le.LSTM(3, backend="numba_cuda", seed=0).build(2)
    assert layer.device == "cuda:0"
    assert all(_on_device(backend, value) for value in layer.params.values())
    host_weights = layer.get_weights()
    assert all(type(w) is np.ndarray for w in host_weights)
    assert layer.to("cpu") is layer and layer.device == "cpu"
    assert all(type(value) is np.ndarray for value in layer.params.values())
    for got, want in zip(layer.get_weights(), host_weights):
        np.testing.assert_array_equal(got, want)
    layer.to("cuda:0")
    assert all(_on_device(backend, value) for value in layer.params.values())
    for got, want in zip(layer.get_weights(), host_weights):
        np.testing.assert_array_equal(got, want)


def test_auto_layer_moves_to_the_gpu_at_its_first_call_on_a_cuda_array(backend):
    x = np.random.default_rng(0).normal(size=(2, 3, 2)).astype(np.float32)
    layer = le.LSTM(3, seed=0).build(2)        # built on the CPU, never called
    assert layer.device == "cpu"
    layer(backend.ops.asarray(x, np.float32))
    assert layer.device == "cuda:0" and all(_on_device(backend, v) for v in layer.params.values())


def test_cuda_array_to_a_cpu_layer_names_both_devices(backend):
    x = np.ones((2, 3, 2), np.float32)
    layer = le.LSTM(3, seed=0)
    layer(x)                                    # used on the CPU: its device is settled
    with pytest.raises(ValueError, match=r"expected an array on cpu.*got an array on cuda:0.*layer\.to\('cuda'\)"):
        layer(backend.ops.asarray(x, np.float32))
    assert layer.device == "cpu" and all(type(v) is np.ndarray for v in layer.params.values())


def test_to_rejects_bad_devices_and_host_backends(backend):
    layer = le.LSTM(3, seed=0).build(2)
    for bad in ("gpu", "cuda:x", "cuda:7"):
        with pytest.raises(ValueError, match="cuda"):
            layer.to(bad)
    with pytest.raises(ValueError, match="computes on the CPU"):
        le.LSTM(3, backend="numpy").to("cuda")
    assert layer.device == "cpu"


def test_set_weights_copies_in_and_changes_nothing_on_error(backend):
    layer = le.LSTM(3, backend="numba_cuda", seed=0).build(2)
    before = layer.get_weights()
    params_before = dict(layer.params)
    bad = [w.copy() for w in before]
    bad[2] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="bias must have shape"):
        layer.set_weights(bad)
    assert all(layer.params[name] is params_before[name] for name in params_before)
    new = [w + 1 for w in before]
    layer.set_weights(new)
    assert all(_on_device(backend, value) for value in layer.params.values())
    for got, want in zip(layer.get_weights(), new):
        np.testing.assert_array_equal(got, want)


# -- training on the device against the NumPy reference ---------------------------------------
@pytest.mark.parametrize("host_inputs", [False, True])
def test_training_steps_on_the_gpu_match_numpy(backend, host_inputs):
    """Two steps with different data: outputs, dx and the device gradients (written in place
    into the same arrays at the second step) match the NumPy reference each time."""
    reference, gpu = _reference_and_gpu(backend, return_sequences=True, go_backwards=True)
    rng = np.random.default_rng(3)
    gradient_arrays = None
    for step in range(2):
        x = rng.normal(size=(2, 3, 2)).astype(np.float32)
        dy = rng.normal(size=(2, 3, 3)).astype(np.float32)
        y_expected = reference(x, lengths=[3, 1], training=True)
        dx_expected = reference.backward(dy)
        feed = (lambda a: a) if host_inputs else (lambda a: backend.ops.asarray(a, np.float32))
        y = gpu(feed(x), lengths=[3, 1], training=True)
        dx = gpu.backward(feed(dy))
        assert (type(y) is np.ndarray) == host_inputs and (type(dx) is np.ndarray) == host_inputs
        np.testing.assert_allclose(_host(backend, y), y_expected, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(_host(backend, dx), dx_expected, rtol=2e-4, atol=2e-5)
        for name, value in gpu.grads.items():
            assert _on_device(backend, value), name
            np.testing.assert_allclose(backend.ops.to_numpy(value), reference.grads[name], rtol=2e-4, atol=2e-5,
                                       err_msg=f"{name} step {step}")
        if gradient_arrays is not None:   # the second backward wrote into the first one's arrays
            assert all(gpu.grads[name] is gradient_arrays[name] for name in gradient_arrays)
        gradient_arrays = dict(gpu.grads)


def test_cell_and_wrappers_move_with_to(backend):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 2)).astype(np.float32)
    reference = le.Sequential([le.Bidirectional(le.LSTM(2, return_sequences=True, backend="numpy", seed=2)),
                               le.LSTM(3, backend="numpy", seed=3)]).build(2)
    model = le.Sequential([le.Bidirectional(le.LSTM(2, return_sequences=True, seed=2)),
                           le.LSTM(3, seed=3)]).build(2)
    model.set_weights(reference.get_weights())
    assert model.to("cuda") is model and model.device == "cuda:0"
    assert all(_on_device(backend, value) for value in model.params.values())
    y = model(x, training=True)                 # NumPy in: one copy in, NumPy out
    assert type(y) is np.ndarray
    np.testing.assert_allclose(y, reference(x, training=True), rtol=2e-5, atol=2e-5)
    dy = rng.normal(size=y.shape).astype(np.float32)
    dx = model.backward(dy)
    np.testing.assert_allclose(dx, reference.backward(dy), rtol=2e-4, atol=2e-5)
    for name, value in model.grads.items():
        assert _on_device(backend, value), name
        np.testing.assert_allclose(backend.ops.to_numpy(value), reference.grads[name], rtol=2e-4, atol=2e-5)
    model.to("cpu")
    assert model.device == "cpu" and all(type(v) is np.ndarray for v in model.params.values())
    assert all(type(v) is np.ndarray for v in model.grads.values())

    cell = le.LSTMCell(3, seed=0).build(2).to("cuda")
    reference_cell = le.LSTMCell(3, backend="numpy", seed=0).build(2)
    reference_cell.set_weights(cell.get_weights())
    x_t = rng.normal(size=(2, 2)).astype(np.float32)
    h, _ = cell(x_t, training=True)
    h_expected, _ = reference_cell(x_t, training=True)
    np.testing.assert_allclose(h, h_expected, rtol=2e-5, atol=2e-5)
    cell.backward(np.ones((2, 3), np.float32))
    reference_cell.backward(np.ones((2, 3), np.float32))
    for name, value in cell.grads.items():
        assert _on_device(backend, value)
        np.testing.assert_allclose(backend.ops.to_numpy(value), reference_cell.grads[name], rtol=2e-4, atol=2e-5)


def test_bidirectional_makes_its_backward_copy_on_the_forward_layer_device(backend):
    bidirectional = le.Bidirectional(le.LSTM(3, seed=0).to("cuda"))
    assert bidirectional.forward_layer.device == bidirectional.backward_layer.device == "cuda:0"


def test_stateful_states_move_with_the_layer(backend):
    layer = le.LSTM(3, stateful=True, backend="numba_cuda", seed=0)
    layer(np.ones((2, 2, 2), np.float32))
    assert all(_on_device(backend, state) for state in layer.states)
    expected = [backend.ops.to_numpy(state) for state in layer.states]
    layer.to("cpu")
    assert all(type(state) is np.ndarray for state in layer.states)
    for got, want in zip(layer.states, expected):
        np.testing.assert_array_equal(got, want)


# -- save and load ----------------------------------------------------------------------------
class _RecordingOptimizer:
    """Stands in for lstmeng.optim's optimizers: only the state_dict format matters here."""

    def __init__(self, state=None):
        self.loaded = None
        self.state = state or {"config": {"name": "Adam", "lr": 0.001, "step": 3},
                               "state": {"0.kernel.m": np.arange(6, dtype=np.float32).reshape(2, 3),
                                         "0.kernel.v": np.ones(4, np.float32)}}

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.loaded = state


def test_save_from_the_gpu_and_load_onto_it_with_optimizer_state(backend, tmp_path):
    layer = le.LSTM(3, backend="numba_cuda", seed=0).build(2)
    path = tmp_path / "gpu.npz"
    saver = _RecordingOptimizer()
    le.save(layer, path, optimizer=saver)
    on_cpu = le.serialization.load(path, device="cpu")
    assert on_cpu.device == "cpu"
    auto_layer = le.LSTM(3, seed=0).build(2)
    auto_layer.set_weights(layer.get_weights())
    le.save(auto_layer, tmp_path / "auto.npz")
    on_gpu = le.serialization.load(tmp_path / "auto.npz", device="cuda")
    assert on_gpu.device == "cuda:0" and all(_on_device(backend, v) for v in on_gpu.params.values())
    for loaded in (on_cpu, on_gpu):
        for got, want in zip(loaded.get_weights(), layer.get_weights()):
            np.testing.assert_array_equal(got, want)
    restored = _RecordingOptimizer()
    le.serialization.load(path, optimizer=restored)
    assert restored.loaded["config"] == saver.state["config"]
    assert sorted(restored.loaded["state"]) == sorted(saver.state["state"])
    for key, value in saver.state["state"].items():
        np.testing.assert_array_equal(restored.loaded["state"][key], value)
    again = _RecordingOptimizer()
    le.serialization.load_optimizer_state(path, again)
    assert again.loaded["config"] == saver.state["config"]
    with pytest.raises(ValueError, match="saved without an optimizer"):
        le.serialization.load(tmp_path / "auto.npz", optimizer=_RecordingOptimizer())
    with pytest.raises(ValueError, match="device must be"):
        le.serialization.load(path, device="tpu")


# -- no weight crosses the bus in a training loop ------------------------------------------------
class _Transfers:
    """Counts host<->device copies by wrapping numba's transfer functions and the backend's own."""

    def __init__(self, backend, monkeypatch):
        import numba.cuda
        self.shapes = []
        original_to_device = numba.cuda.to_device

        def to_device(array, *args, **kwargs):
            self.shapes.append(("to_device", tuple(np.shape(array))))
            return original_to_device(array, *args, **kwargs)

        monkeypatch.setattr(numba.cuda, "to_device", to_device)
        array_classes = []
        try:
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
            array_classes.append(FakeCUDAArray)
        except ImportError:
            pass
        try:
            from numba.cuda.cudadrv.devicearray import DeviceNDArray
            array_classes.append(DeviceNDArray)
        except ImportError:
            pass
        for cls in array_classes:
            original = cls.copy_to_host

            def copy_to_host(array, *args, _original=original, **kwargs):
                self.shapes.append(("copy_to_host", tuple(int(n) for n in array.shape)))
                return _original(array, *args, **kwargs)

            monkeypatch.setattr(cls, "copy_to_host", copy_to_host)


def test_training_loop_moves_no_weight_between_host_and_device(backend, monkeypatch):
    """Forward, backward and an SGD update done with the backend's own add/scale: with x and dy
    on the device nothing at all is copied between host and device after the first step."""
    layer = le.Sequential([le.LSTM(4, return_sequences=True, backend="numba_cuda", seed=0),
                           le.LSTM(3, backend="numba_cuda", seed=1)]).build(2)
    rng = np.random.default_rng(5)
    batches = [(backend.ops.asarray(rng.normal(size=(2, 3, 2)).astype(np.float32), np.float32),
                backend.ops.asarray(rng.normal(size=(2, 3)).astype(np.float32), np.float32)) for _ in range(3)]
    initial = [w.copy() for w in layer.get_weights()]

    def train_step(x, dy):
        layer(x, training=True)
        layer.backward(dy)
        for sublayer in layer.layers:
            for name, grad in sublayer.grads.items():
                sublayer.params[name] = backend.ops.add(sublayer.params[name], backend.ops.scale(grad, -0.1))

    train_step(*batches[0])                     # compiles, fills the pool and the shared zeros
    transfers = _Transfers(backend, monkeypatch)
    for x, dy in batches[1:]:
        train_step(x, dy)
    assert transfers.shapes == []
    monkeypatch.undo()
    # The updates did happen, on the device.
    assert any(not np.allclose(got, want) for got, want in zip(layer.get_weights(), initial))


# -- launches and memory of one training step --------------------------------------------------
class _Launches:
    """Counts kernel launches (and their arguments) by wrapping the simulator's kernel dispatch."""

    def __init__(self, monkeypatch):
        from numba.cuda.simulator import kernel as simulated
        self.launches = []
        original = simulated.FakeCUDAKernel.__call__

        def call(kernel, *args):
            if not kernel._device:   # device functions called from kernels are not launches
                self.launches.append((kernel.fn.__name__, len(args)))
            return original(kernel, *args)

        monkeypatch.setattr(simulated.FakeCUDAKernel, "__call__", call)


#: Launches of one training step (forward + backward of one LSTM, return_sequences=True, no mask,
#: no dropout, x and dy on the device) and their kernel arguments; docs/numba_cuda.md records them.
#: Before the folding: 14 launches, 75 arguments (4 fills for default states and state gradients,
#: 2 copies for dh/dc, a fill for dbias).
TRAINING_STEP_LAUNCHES = 8


@pytest.mark.skipif(REAL_GPU, reason="counts the simulator's kernel dispatch")
def test_one_training_step_launch_count(backend, monkeypatch):
    layer = le.LSTM(4, return_sequences=True, backend="numba_cuda", seed=0).build(3)
    x = backend.ops.asarray(np.ones((2, 3, 3), np.float32), np.float32)
    dy = backend.ops.asarray(np.ones((2, 3, 4), np.float32), np.float32)
    layer(x, training=True)
    layer.backward(dy)                           # warm: shared zeros and the pool exist now
    counter = _Launches(monkeypatch)
    layer(x, training=True)
    layer.backward(dy)
    names = [name for name, _ in counter.launches]
    assert len(names) == TRAINING_STEP_LAUNCHES, names
    assert "fill_1d" not in names and "binary_2d" not in names, names


def test_scratch_pool_is_flat_in_a_training_loop_and_released(backend):
    layer = le.LSTM(4, return_sequences=True, backend="numba_cuda", seed=0, dropout=0.2).build(3)
    x = backend.ops.asarray(np.ones((2, 3, 3), np.float32), np.float32)
    dy = backend.ops.asarray(np.ones((2, 3, 4), np.float32), np.float32)
    counts = []
    for _ in range(4):
        layer(x, mask=np.array([[1, 1, 0], [1, 1, 1]], bool), training=True)
        layer.backward(dy)
        counts.append(backend.pool_allocations())
    assert counts[1] == counts[2] == counts[3], counts
    assert backend._pool.cached_bytes() > 0
    backend.release_buffers()
    assert backend._pool.cached_bytes() == 0


def test_a_workspace_is_consumed_once(backend):
    rng = np.random.default_rng(6)
    x, h0 = rng.normal(size=(2, 3, 2)).astype(np.float32), np.zeros((2, 3), np.float32)
    kernel, recurrent = rng.normal(size=(2, 12)).astype(np.float32), rng.normal(size=(3, 12)).astype(np.float32)
    forward = sequence_forward(backend, x, h0, h0, kernel, recurrent, None, training=True)
    backend.sequence_backward(np.ones((2, 3, 3), np.float32), h0, h0, forward.workspace)
    with pytest.raises(RuntimeError, match="already used by a backward"):
        backend.sequence_backward(np.ones((2, 3, 3), np.float32), h0, h0, forward.workspace)


def test_backward_prologue_compiles_to_ptx():
    """The simulator type-checks nothing: compile the new kernel for sm_90 where libnvvm exists."""
    import subprocess
    import sys
    code = ("import sys, numba, numpy as np\n"
            "from numba import cuda, typeof\n"
            "from lstmeng.backends import _cuda_elementwise as ew\n"
            "A = lambda shape, dt: typeof(np.empty(shape, dt))\n"
            "try:\n"
            "    cuda.compile_ptx(lambda a: None, (numba.float32[:],), cc=(9, 0))\n"
            "except Exception as error:\n"
            "    print('SKIP', type(error).__name__); sys.exit(0)\n"
            "for dt in ('float32', 'float64'):\n"
            "    f1, f2, m1, b1 = A(2, dt), A((2, 2), dt), A(2, bool), numba.boolean\n"
            "    cuda.compile_ptx(ew.backward_prologue.py_func, (f2, f2, f2, m1, b1, b1, f2, f2, f1), cc=(9, 0))\n"
            "print('OK')\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    if result.stdout.startswith("SKIP"):
        pytest.skip("no CUDA compiler libraries")
    assert result.stdout.strip() == "OK"


# -- zero-copy inputs of every kind -------------------------------------------------------------
class _TorchLikeTensor:
    """A CUDA array from another library: a __cuda_array_interface__ and a dtype that does not
    print as NumPy's (torch's prints "torch.float32", which the layers used to reject)."""

    class _Dtype:
        def __str__(self):
            return "torch.float32"

        name = property(lambda self: "torch.float32")

    def __init__(self, device_array):
        self._device = device_array            # keeps the memory alive
        self.shape = tuple(device_array.shape)
        self.dtype = self._Dtype()
        self.__cuda_array_interface__ = dict(device_array.__cuda_array_interface__)


def test_foreign_cuda_arrays_are_used_in_place(backend):
    reference, gpu = _reference_and_gpu(backend, return_sequences=True)
    x = np.random.default_rng(7).normal(size=(2, 3, 2)).astype(np.float32)
    y = gpu(_TorchLikeTensor(backend.ops.asarray(x, np.float32)), training=True)
    assert _on_device(backend, y)               # outputs are Numba device arrays (documented)
    np.testing.assert_allclose(backend.ops.to_numpy(y), reference(x, training=True), rtol=2e-5, atol=2e-5)
    # A mask from the same library (torch's bool prints as "torch.bool"): viewed in place too.
    mask = np.array([[True, True, False], [True, False, False]])
    masked = gpu(_TorchLikeTensor(backend.ops.asarray(x, np.float32)),
                 mask=_TorchLikeTensor(backend.ops.asarray(mask, np.bool_)))
    np.testing.assert_allclose(backend.ops.to_numpy(masked), reference(x, mask=mask), rtol=2e-5, atol=2e-5)
    wrong = _TorchLikeTensor(backend.ops.asarray(x.astype(np.float64), np.float64))
    with pytest.raises(TypeError, match="must have dtype float32 on this layer, got float64"):
        gpu(wrong)


def test_backend_takes_foreign_cuda_arrays_directly(backend):
    """The backend contract itself (what lstmeng.torch calls) reads a foreign CUDA array's dtype from
    its interface: np.dtype(torch.float32) raises, and sequence_forward used to call it."""
    rng = np.random.default_rng(3)
    batch, steps, features, units = 2, 3, 2, 3
    host = {"x": rng.normal(size=(batch, steps, features)), "h0": np.zeros((batch, units)),
            "c0": np.zeros((batch, units)), "kernel": rng.normal(size=(features, 4 * units)),
            "recurrent_kernel": rng.normal(size=(units, 4 * units)), "bias": rng.normal(size=4 * units)}
    host = {name: value.astype(np.float32) for name, value in host.items()}
    foreign = {name: _TorchLikeTensor(backend.ops.asarray(value, np.float32)) for name, value in host.items()}
    got = sequence_forward(backend, **foreign)
    want = sequence_forward(registry.get_backend_object("numpy"), **host)
    np.testing.assert_allclose(backend.ops.to_numpy(got.outputs), want.outputs, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(backend.ops.to_numpy(got.c), want.c, rtol=2e-5, atol=2e-5)


# -- bugs found on the real GPU -----------------------------------------------------------------
def test_one_step_batch_with_all_rows_empty_matches_numpy(backend):
    """batch=2, steps=1, lengths [0, 0], with the flipped input of the metamorphic test:
    ``np.ascontiguousarray(x[:, ::-1])`` keeps a negative stride on the length-1 time axis,
    which Numba's device arrays turned into a zero-length axis on the GPU."""
    x = np.random.default_rng(8).normal(size=(2, 1, 3)).astype(np.float32)
    flipped = np.ascontiguousarray(x[:, ::-1])
    assert flipped.strides[1] < 0               # the layout that broke
    h0 = np.full((2, 2), 0.5, np.float32)
    for return_sequences in (False, True):
        results, cuda_weights = [], None
        for name in ("numba_cuda", "numpy"):
            layer = le.LSTM(2, backend=name, seed=0, return_sequences=return_sequences, return_state=True,
                            go_backwards=True).build(3)
            if cuda_weights is None:
                cuda_weights = layer.get_weights()
            else:
                layer.set_weights(cuda_weights)   # the NumPy reference gets the CUDA layer's weights
            results.append([_host(backend, a) for a in layer(flipped, lengths=np.array([0, 0]),
                                                             initial_state=[h0, -h0])])
        for got, want in zip(*results):
            np.testing.assert_array_equal(got, want)
    device = backend.ops.asarray(flipped, np.float32)
    assert tuple(device.strides) == (12, 12, 4)


def test_numba_device_arrays_keep_length_one_axes_whole():
    """What went wrong, in Numba's own terms: a length-1 axis with a negative stride becomes
    empty when the device array is sliced; the canonical strides the backend now uses do not."""
    import importlib.util

    import numba

    from lstmeng.backends import numba_cuda
    # The simulator replaces numba.cuda.cudadrv.dummyarray with a stub: load the real module
    # (pure Python and NumPy) from its file.
    path = os.path.join(os.path.dirname(numba.cuda.__file__), "cudadrv", "dummyarray.py")
    if not os.path.exists(path):
        pytest.skip("numba-cuda's dummyarray module is not where this test looks for it")
    spec = importlib.util.spec_from_file_location("_real_dummyarray", path)
    dummyarray = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dummyarray)
    broken = dummyarray.Array.from_desc(0, (2, 1, 1), (4, -4, 4), 4)
    assert broken[:, :, 0:1].shape == (2, 0, 1)
    fixed = numba_cuda._canonical_host(np.ascontiguousarray(np.ones((2, 1, 1), np.float32)[:, ::-1]))
    whole = dummyarray.Array.from_desc(0, fixed.shape, fixed.strides, 4)
    assert whole[:, :, 0:1].shape == (2, 1, 1)


def test_probe_reports_a_failing_compile_with_its_fix(backend, monkeypatch):
    from lstmeng.backends import _cuda_elementwise as ew
    from lstmeng.backends import numba_cuda

    class Broken:
        def __getitem__(self, configuration):
            raise AttributeError("module 'numpy' has no attribute 'row_stack'")

    monkeypatch.setattr(numba_cuda, "_COMPILE_CHECK", [])
    monkeypatch.setattr(ew, "fill_1d", Broken())
    with pytest.raises(NotImplementedError, match=r"needs numpy<2\.5.*pip install 'numpy<2\.5'"):
        backend.probe()
    _, info = registry._load("numba_cuda")
    assert not info.available and "row_stack" in info.reason and "numpy<2.5" in info.reason
    monkeypatch.undo()
    numba_cuda._COMPILE_CHECK.clear()
    assert backend.probe()                      # a real compile and launch succeeds again


# -- the benchmark's training-loop and overhead modes -------------------------------------------
@pytest.mark.skipif(REAL_GPU, reason="the simulator is off in this session")
@pytest.mark.parametrize("mode", ["--train-loop --context-scope", "--overhead", "--overhead --profile"])
def test_gpu_bench_loop_modes_run_under_the_simulator(backend, capsys, mode, monkeypatch):
    import importlib.util
    import types
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scoped = []   # the functions --context-scope wrapped in numba's require_context
    devices = module._numba_devices()
    monkeypatch.setattr(module, "_numba_devices", lambda: types.SimpleNamespace(
        require_context=lambda function: scoped.append(function) or devices.require_context(function)))
    assert module.main([*mode.split(), "--simulate"]) == 0
    assert len(scoped) == (1 if "--context-scope" in mode else 0)
    output = capsys.readouterr().out
    rows = [line for line in output.splitlines() if line.startswith(("inference", "train step"))]
    overhead = mode.startswith("--overhead")
    assert [row.split()[0] for row in rows] == (["inference", "train"] if overhead else ["train"])
    assert ("require_context scope" in output) == ("--context-scope" in mode)
    for line in output.splitlines():
        if "outputs agree with torch" in line:
            assert float(line.rsplit(" ", 1)[-1]) < 1e-5, line
    if overhead:
        assert "device memory over 5 training steps" in output and "blocks allocated during them: 0" in output
    if mode.endswith("--profile"):
        # The launch count comes from the profile: a one-layer inference call is at least the
        # projection GEMM and the recurrence, a training step more. (The simulator makes no
        # context lookups, so their count is only read.)
        counts = [line.split(": ")[1].split() for line in output.splitlines() if "kernel launches and" in line]
        launches = [float(words[0]) for words in counts]
        assert len(launches) == 2 and launches[0] >= 2 and launches[1] > launches[0], output
        assert all(words[5:8] == ["uncached", "context", "lookups"] and float(words[4]) >= 0 for words in counts)
        assert "15 array arguments" in output and output.count("by cumulative time") == 2


# -- the pool itself --------------------------------------------------------------------------
def test_device_pool_reuses_bounds_and_frees(backend):
    import gc

    from numba import cuda

    from lstmeng.backends._device_pool import DevicePool
    pool = DevicePool(lambda nbytes: cuda.device_array(nbytes, dtype=np.uint8), max_bytes=1000,
                      wrap=backend.ops.wrap)   # the simulator's wrapper there, the identity on a GPU
    a = pool.take((10, 10), np.float32)                  # 400 bytes, new
    assert tuple(a.shape) == (10, 10) and np.dtype(a.dtype) == np.float32 and pool.allocations == 1
    pool.give(a)
    b = pool.take((10, 10), np.float32)                  # the same block, and the same view again
    assert b is a and pool.allocations == 1
    c = pool.take((4, 10), np.float32)                   # 160 bytes: a 400-byte block is over twice it
    assert pool.allocations == 2
    d = pool.take((2, 3), np.bool_)                      # tiny and of another dtype
    pool.give(b, c, d, np.zeros(3))                      # arrays not from the pool are ignored
    assert pool.cached_bytes() == 400 + 160 + 6
    pool.give(b)                                         # given twice: kept once
    assert pool.cached_bytes() == 566
    big = pool.take((300,), np.float32)                  # 1200 bytes > max_bytes: never kept
    pool.give(big)
    assert pool.cached_bytes() == 566
    kept = [pool.take((5, 5), np.float64) for _ in range(3)]   # 3 x 200 bytes, new blocks
    pool.give(*kept)                                     # over 1000 bytes: the oldest blocks go
    assert pool.cached_bytes() <= 1000
    lost = pool.take((50,), np.float32)
    record_count = len(pool._lent)
    del lost
    gc.collect()
    pool.take((1,), np.float32)                          # forgets the record of the dropped array
    assert len(pool._lent) == record_count
    pool.clear()
    assert pool.cached_bytes() == 0


# -- the benchmark's caching allocator (an experiment for the GPU run) -------------------------
_CACHING_MANAGER_CHECK = r"""
import gc, sys, types
sys.path.insert(0, "benchmarks")
import cuda_caching_memory_manager as module
addresses = iter(range(0x10000, 0x100000000, 0x100000))
stand_in = types.SimpleNamespace(cuMemAlloc=lambda nbytes: next(addresses), freed=[],
                                 cuMemGetInfo=lambda: (1 << 30, 1 << 31))
stand_in.cuMemFree = stand_in.freed.append
module.numba_driver.driver = stand_in          # no GPU: a stand-in for numba's driver object

class Context:   # weakly referenced by the pointers, as numba's contexts are
    pass

context = Context()
manager = module.CachingMemoryManager(context=context)
manager.initialize()
first = manager.memalloc(1000)
address = first.device_ctypes_pointer.value
assert manager.driver_allocations == 1 and manager.reuses == 0
other = manager.memalloc(5000)                       # another size: another block
del first
gc.collect()
manager.initialize()                                 # numba calls it at each context lookup
assert manager.cached_blocks() == 1, manager.cached_blocks()
again = manager.memalloc(900)                        # rounds to the same 1024-byte size
assert again.device_ctypes_pointer.value == address
assert (manager.driver_allocations, manager.reuses) == (2, 1)
del again, other
gc.collect()
manager.reset()
assert manager.cached_blocks() == 0 and len(stand_in.freed) == 2, stand_in.freed
print("OK")
"""


def test_caching_memory_manager_reuses_freed_blocks():
    """``benchmarks/cuda_caching_memory_manager.py`` with a stand-in driver (numba's real driver
    module: a subprocess without the simulator): a freed block goes to the free list of its
    rounded size and is handed out again instead of a new cuMemAlloc, also after initialize()
    ran again (numba calls it at every context lookup); reset() frees them."""
    import subprocess
    import sys
    from pathlib import Path

    env = {key: value for key, value in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    result = subprocess.run([sys.executable, "-c", _CACHING_MANAGER_CHECK], capture_output=True, text=True,
                            env=env, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stdout + result.stderr
