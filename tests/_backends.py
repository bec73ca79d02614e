"""Backends available in this process, and what the cross-backend suites share.

The reliability suites (properties, gradients, determinism, concurrency,
memory, extremes, bad input) are parametrised over every backend that
``le.list_backends(probe=True)`` reports available at collection time, so a backend
joins them as soon as it lands. numba_cuda under the CUDA simulator
(tests/conftest.py sets NUMBA_ENABLE_CUDASIM=1) runs every kernel thread in
Python, so it gets tiny shapes and few examples.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import lstmeng as le
from lstmeng import testing
from lstmeng.backends import registry
from lstmeng.backends.base import SequenceOptions

AVAILABLE = [info.name for info in le.list_backends(probe=True) if info.available]
UNAVAILABLE = {info.name: info.reason for info in le.list_backends(probe=True) if not info.available}
CUDA_SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


#: LSTMENG_REAL_CUDA=1: the numba_cuda tests run on a real GPU at realistic sizes (tests/conftest.py
#: then leaves the CUDA simulator off).
REAL_GPU = os.environ.get("LSTMENG_REAL_CUDA") == "1"


def numba_cuda_backend():
    """The numba_cuda backend object; skips the test where it is unavailable (fails on a real GPU run)."""
    backend, info = registry._entry("numba_cuda")
    if backend is None:
        if REAL_GPU:
            pytest.fail(f"LSTMENG_REAL_CUDA=1 but numba_cuda is unavailable: {info.reason}")
        pytest.skip(f"numba_cuda unavailable: {info.reason}")
    return backend


def fast_simulator_thread_switches():
    """Module fixture body: a short GIL switch interval while the CUDA simulator runs.

    The simulator runs every CUDA thread as a Python thread and polls them at each
    barrier; with the default 5 ms switch interval each barrier costs milliseconds,
    with 0.2 ms the CUDA test modules run about 5x faster. Use as
    ``fixture = pytest.fixture(autouse=True, scope="module")(fast_simulator_thread_switches)``.
    """
    previous = sys.getswitchinterval()
    sys.setswitchinterval(previous if REAL_GPU else 2e-4)
    yield
    sys.setswitchinterval(previous)


def numerical_gradient(function, array, step=1e-6):
    """Central differences of a scalar ``function()`` with respect to every entry of ``array``
    (changed in place and restored; use float64 arrays)."""
    gradient = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + step
        up = function()
        array[index] = saved - step
        down = function()
        array[index] = saved
        gradient[index] = (up - down) / (2 * step)
    return gradient


def is_simulated(name: str) -> bool:
    """True when ``name`` runs its kernels in the (slow, Python) CUDA simulator."""
    return name == "numba_cuda" and CUDA_SIMULATED


def backends(exclude=(), only=None) -> list:
    """pytest params of the available backends (ids = names), minus ``exclude``.

    ``only`` restricts to those names (e.g. host backends for RSS tests).
    """
    names = [name for name in AVAILABLE if name not in exclude and (only is None or name in only)]
    return [pytest.param(name, id=name) for name in names]


def fast_backends(exclude=()) -> list:
    """Available backends except the simulated one: for tests whose sizes the simulator cannot afford."""
    return backends(exclude=tuple(exclude) + (("numba_cuda",) if CUDA_SIMULATED else ()))


def dtypes_of(name: str) -> tuple[str, ...]:
    """The float dtypes backend ``name`` claims."""
    return tuple(registry.get_backend_object(name).dtypes)


#: Largest (batch, steps, input_size, units) drawn per backend by the property tests.
SIZE_LIMITS = {"default": (6, 8, 5, 6), "simulated": (3, 3, 3, 3)}


def size_limits(name: str) -> tuple[int, int, int, int]:
    return SIZE_LIMITS["simulated" if is_simulated(name) else "default"]


def to_host(array) -> np.ndarray:
    """Copy a backend's array (ndarray, tf.Tensor, CUDA device array) to a host ndarray."""
    if array is None or isinstance(array, np.ndarray):
        return array
    if hasattr(array, "copy_to_host"):
        return array.copy_to_host()
    if hasattr(array, "numpy"):
        return array.numpy()
    return np.asarray(array)


def assert_close(actual, expected, what: str, dtype, gradient: bool = False) -> None:
    """Assert a backend's result (any array kind) matches the NumPy reference within the tolerance
    table of lstmeng.testing (``testing.TOLERANCES``), with the same dtype."""
    actual, expected = to_host(actual), to_host(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    testing.assert_close(actual, expected, what, np.dtype(dtype).name, gradient)


def random_weights(layer, rng, scale: float = 1.0) -> list[np.ndarray]:
    """Weights for a built LSTM/LSTMCell with every gate in its working range (not just the initializer's)."""
    shapes = layer.weight_shapes(layer.input_size)
    weights = [rng.normal(size=shapes[name]) * scale / np.sqrt(max(shapes[name][0], 1))
               for name in ("kernel", "recurrent_kernel")]
    if layer.use_bias:
        weights.append(rng.normal(size=shapes["bias"]) * 0.5 * scale)
    return [w.astype(layer.dtype) for w in weights]


def sequence_forward(backend, x, h0, c0, kernel, recurrent_kernel, bias, mask=None, input_dropout_mask=None,
                     recurrent_dropout_mask=None, **flags):
    """``backend.sequence_forward`` with the ``SequenceOptions`` built from the arrays and ``flags``
    (activation, reverse, training, ... as keywords): what the tests' direct backend calls share."""
    options = SequenceOptions.for_call(bias=bias, mask=mask, input_dropout_mask=input_dropout_mask,
                                       recurrent_dropout_mask=recurrent_dropout_mask, **flags)
    return backend.sequence_forward(x, h0, c0, kernel, recurrent_kernel, bias, mask, input_dropout_mask,
                                    recurrent_dropout_mask, options)


def spy_step_functions(monkeypatch, backend_class, maker: str) -> tuple[list, list]:
    """Count what ``backend_class.<maker>`` (``cell_inference_step`` or ``cell_training_step``)
    makes and how its functions are called: (made: each function made, calls: the x shape of
    each call). Patched on the class: undoing a patch of the registry's instance would leave the
    bound method behind as an instance attribute, hiding later class-level patches."""
    made, calls = [], []
    original = getattr(backend_class, maker)

    def spy(self, *args, **kwargs):
        step = original(self, *args, **kwargs)
        made.append(step)

        def counted(x, h, c, bias):
            calls.append(x.shape)
            return step(x, h, c, bias)

        return counted

    monkeypatch.setattr(backend_class, maker, spy)
    return made, calls


# -- compiling CUDA kernels for a real GPU without one ------------------------------------------
#: The start of a script that compiles kernels to sm_90 PTX in a subprocess (without the
#: simulator): it prints "SKIP ..." and exits where numba finds no CUDA compiler libraries,
#: lets device functions ask for a compute capability without a device, and defines
#: ``A(shape, dtype)``, the numba type of such an array. The test's script follows it and
#: prints one line starting with "OK" per kernel.
PTX_CHECK_PREAMBLE = r'''
import dataclasses, re, sys, types
import numpy as np, numba
from numba import cuda, typeof
try:
    cuda.compile_ptx(lambda a: None, (numba.float32[:],), cc=(9, 0))
except Exception as error:
    print("SKIP", type(error).__name__, str(error).splitlines()[0]); sys.exit(0)
import numba.cuda.dispatcher as dispatcher
# Device functions ask the current device for its compute capability; there may be none.
dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
def A(shape, dtype):
    return typeof(np.empty(shape, dtype))
'''


def ptx_check_lines(script: str, timeout: float = 900) -> list[str]:
    """Run PTX_CHECK_PREAMBLE + ``script`` in a fresh interpreter without the CUDA simulator,
    from the repository root; its "OK" lines (skips the test where numba cannot compile)."""
    import subprocess
    import sys
    from pathlib import Path
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    result = subprocess.run([sys.executable, "-c", PTX_CHECK_PREAMBLE + script], capture_output=True,
                            text=True, env=env, timeout=timeout, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    if result.stdout.startswith("SKIP"):
        pytest.skip(f"no CUDA compiler libraries: {result.stdout.strip()}")
    return [line for line in result.stdout.splitlines() if line.startswith("OK")]
