"""The activation table (lstmeng.backends.base.ACTIVATION_CODES) and every backend's copy of it.

Each backend knows the activations either by name (NumPy, TensorFlow) or by
number (the CUDA kernels, the Cython extension's C enum). These tests check
that every one of them knows exactly the table's activations, under the
table's codes, and that each code computes the function it names (against
the NumPy reference), so a renumbering in one place cannot go unnoticed.
"""

import importlib.util
import pathlib
import re

import numpy as np
import pytest

from lstmeng import activations
from lstmeng.backends import base, registry

from _backends import sequence_forward

try:  # a module global: the CUDA simulator swaps a kernel's global ``cuda`` (tests/conftest.py turns it on)
    from numba import cuda
except ImportError:
    cuda = None

REPO = pathlib.Path(__file__).resolve().parent.parent
NAMES = set(base.ACTIVATION_CODES)
#: Inputs across every activation's regions (negative, the hard_sigmoid ramp, saturation).
X = np.array([-40.0, -4.0, -2.5, -1.0, -0.25, 0.0, 0.3, 1.0, 2.5, 4.0, 40.0])


def test_table_is_consistent():
    codes = list(base.ACTIVATION_CODES.values())
    assert len(set(codes)) == len(codes) and all(isinstance(code, int) for code in codes)
    assert base.ACTIVATION_NAMES == {code: name for name, code in base.ACTIVATION_CODES.items()}
    assert set(base.ACTIVATIONS) | set(base.RECURRENT_ACTIVATIONS) == NAMES
    for name in base.ACTIVATIONS:
        assert activations.check_activation(name) == name
    for name in base.RECURRENT_ACTIVATIONS:
        assert activations.check_activation(name, "recurrent_activation") == name


def test_numpy_functions_cover_the_table():
    assert set(activations.FUNCTIONS) == NAMES
    assert set(activations.DERIVATIVES_FROM_OUTPUT) == NAMES


def test_cython_extension_codes_match_the_table():
    if importlib.util.find_spec("lstmeng.backends._cython_lstm") is None and registry._entry("cython")[0] is None:
        pytest.skip("the Cython extension is not built")
    from lstmeng.backends import cython as cython_backend

    kinds = cython_backend._cython_lstm.ACTIVATION_KINDS
    assert kinds == base.ACTIVATION_CODES


def test_c_enum_matches_the_table():
    header = REPO / "ext" / "lstm_rows.h"
    if not header.exists():
        pytest.skip("no ext/ sources (installed package)")
    enum = {name.lower(): int(code) for name, code in
            re.findall(r"LSTMENG_(TANH|RELU|SIGMOID|LINEAR|HARD_SIGMOID)\s*=\s*(\d+)", header.read_text())}
    assert enum == base.ACTIVATION_CODES


def _reference(name, x):
    y = activations.FUNCTIONS[name](x)
    return y, activations.DERIVATIVES_FROM_OUTPUT[name](y)


def test_tensorflow_functions_match_the_table():
    pytest.importorskip("tensorflow")
    from lstmeng.backends import tensorflow as tf_backend

    if tf_backend._IMPORT_ERROR is not None:
        pytest.skip(f"TensorFlow unusable: {tf_backend._IMPORT_ERROR}")
    for name in NAMES:
        y, dy = _reference(name, X)
        np.testing.assert_allclose(tf_backend._activation(name)(tf_backend.tf.constant(X)).numpy(), y,
                                   rtol=1e-12, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(tf_backend._derivative_from_output(name)(tf_backend.tf.constant(y)).numpy(),
                                   dy, rtol=1e-12, atol=1e-12, err_msg=name)
    with pytest.raises(KeyError):
        tf_backend._activation("softmax")


def _cuda_modules():
    if registry._entry("numba_cuda")[0] is None:
        pytest.skip("numba_cuda unavailable")
    from lstmeng.backends import _cuda_recurrence, _cuda_recurrence_small
    return _cuda_recurrence, _cuda_recurrence_small


def test_cuda_codes_compute_the_functions_they_name():
    recurrence, _ = _cuda_modules()
    assert recurrence.ACTIVATION_CODES == base.ACTIVATION_CODES
    activate, derivative, _ = recurrence._device_math("float64")

    @cuda.jit
    def by_code(code, x, y, dy):
        i = cuda.grid(1)
        if i < x.shape[0]:
            y[i] = activate(code, x[i])
            dy[i] = derivative(code, y[i])

    for name, code in base.ACTIVATION_CODES.items():
        y, dy = np.zeros_like(X), np.zeros_like(X)
        by_code[1, 16](code, X, y, dy)
        expected_y, expected_dy = _reference(name, X)
        np.testing.assert_allclose(y, expected_y, rtol=1e-12, atol=1e-15, err_msg=name)
        np.testing.assert_allclose(dy, expected_dy, rtol=1e-12, atol=1e-15, err_msg=name)


def _kernel_of(activate, derivative):
    """A kernel applying one activation (and its derivative from the output) elementwise."""
    @cuda.jit
    def by_name(x, y, dy):
        i = cuda.grid(1)
        if i < x.shape[0]:
            y[i] = activate(x[i])
            dy[i] = derivative(y[i])
    return by_name


def test_small_batch_kernels_compute_each_named_activation():
    """The small-batch kernels take the activations by name from the SequenceOptions (no codes)."""
    _, small = _cuda_modules()
    for name in NAMES:
        y, dy = np.zeros_like(X), np.zeros_like(X)
        _kernel_of(*small._activation_functions(name, np.float64))[1, 16](X, y, dy)
        expected_y, expected_dy = _reference(name, X)
        np.testing.assert_allclose(y, expected_y, rtol=1e-12, atol=1e-15, err_msg=name)
        np.testing.assert_allclose(dy, expected_dy, rtol=1e-12, atol=1e-15, err_msg=name)
    with pytest.raises(ValueError):
        small._activation_functions("softmax", np.float64)


@pytest.mark.parametrize("backend_name", ["cython", "tensorflow", "numba_cuda"])
@pytest.mark.parametrize("activation,recurrent_activation", [(name, "sigmoid") for name in base.ACTIVATIONS]
                         + [("tanh", "hard_sigmoid")])
def test_backend_computes_the_named_activation(backend_name, activation, recurrent_activation):
    """End to end: the code a backend passes its kernels picks the activation the NumPy backend uses."""
    backend, info = registry._entry(backend_name)
    if backend is None:
        pytest.skip(f"{backend_name} unavailable: {info.reason}")
    reference = registry.get_backend_object("numpy")
    rng = np.random.default_rng(0)
    batch, steps, features, units = 2, 3, 3, 4
    arrays = [rng.normal(size=(batch, steps, features)), np.zeros((batch, units)), np.zeros((batch, units)),
              rng.normal(size=(features, 4 * units)), rng.normal(size=(units, 4 * units)) * 0.5,
              rng.normal(size=4 * units)]
    arrays = [array.astype(np.float64) for array in arrays]
    expected = sequence_forward(reference, *arrays, activation=activation, recurrent_activation=recurrent_activation)
    dtype = np.dtype(np.float64)
    try:
        backend.check_support(dtype, activation, recurrent_activation)
    except NotImplementedError as error:
        pytest.skip(str(error))
    actual = sequence_forward(backend, *(backend.ops.asarray(array, dtype) for array in arrays), activation=activation,
                                      recurrent_activation=recurrent_activation)
    np.testing.assert_allclose(backend.ops.to_numpy(actual.outputs), expected.outputs, rtol=1e-9, atol=1e-12)
