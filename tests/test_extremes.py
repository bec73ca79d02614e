"""Extremes on every backend: one unit, very long sequences, saturating inputs,
and the 64-bit index arithmetic of the cython kernels.
"""

from __future__ import annotations

import numpy as np
import pytest

import lstmeng as le

from _backends import AVAILABLE, assert_close, backends, dtypes_of, fast_backends, is_simulated, random_weights, to_host


def _pair(backend_name, dtype, units, input_size, seed, **options):
    """The same layer on numpy and on ``backend_name`` (same weights, same dropout seed)."""
    layers = []
    for name in ("numpy", backend_name):
        layer = le.LSTM(units, dtype=dtype, backend=name, seed=seed, **options).build(input_size)
        layer.set_weights(random_weights(layer, np.random.default_rng(seed)))
        layers.append(layer)
    return layers


def _train(layer, x, dy, **call):
    outputs = layer(x, training=True, **call)
    y, h, c = outputs if isinstance(outputs, list) else (outputs, None, None)
    dx = layer.backward(dy)
    return {"y": to_host(y), "h": to_host(h), "c": to_host(c), "dx": to_host(dx),
            **{f"d{name}": value for name, value in layer.grads.items()},
            **({} if layer.initial_state_grads is None else
               {"dh0": to_host(layer.initial_state_grads[0]), "dc0": to_host(layer.initial_state_grads[1])})}


# -- one unit ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend_name", backends())
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_one_unit(backend_name, go_backwards, return_sequences):
    """units=1 (4H = 4 gate columns, recurrent_kernel [1, 4]) with masks and dropout, against numpy."""
    batch, steps = (2, 3) if is_simulated(backend_name) else (5, 9)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, steps, 3))
    mask = rng.random((batch, steps)) < 0.7
    state = [rng.normal(size=(batch, 1)) for _ in range(2)]
    for dtype in dtypes_of(backend_name):
        reference, layer = _pair(backend_name, dtype, 1, 3, seed=1, go_backwards=go_backwards,
                                 return_sequences=return_sequences, dropout=0.3, recurrent_dropout=0.3)
        dy = rng.normal(size=(batch, steps, 1) if return_sequences else (batch, 1)).astype(dtype)
        call = dict(mask=mask, initial_state=[s.astype(dtype) for s in state])
        expected = _train(reference, x.astype(dtype), dy, **call)
        actual = _train(layer, x.astype(dtype), dy, **call)
        for name, value in expected.items():
            if value is not None:
                assert_close(actual[name], value, f"{backend_name} units=1 {dtype}: {name}", dtype,
                             gradient=name.startswith("d"))


@pytest.mark.parametrize("backend_name", backends())
def test_one_unit_bidirectional_and_cell(backend_name):
    dtype = dtypes_of(backend_name)[0]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 2)).astype(dtype)
    results = {}
    for name in ("numpy", backend_name):
        bi = le.Bidirectional(le.LSTM(1, return_sequences=True, dtype=dtype, backend=name, seed=3))
        y = to_host(bi(x, lengths=[3, 1], training=True))
        dx = to_host(bi.backward(np.ones_like(y)))
        cell = le.LSTMCell(1, dtype=dtype, backend=name, seed=4)
        h, (_, c) = cell(x[:, 0], training=True)
        dx_t, (dh_prev, dc_prev) = cell.backward(np.ones((2, 1), dtype))
        results[name] = [y, dx, to_host(h), to_host(c), to_host(dx_t), to_host(dh_prev), to_host(dc_prev)]
    for index, (a, e) in enumerate(zip(results[backend_name], results["numpy"])):
        assert_close(a, e, f"{backend_name} units=1 Bidirectional/cell result {index}", dtype, gradient=index >= 4)


# -- very long sequences -------------------------------------------------------------------------------

LONG_STEPS = 100_000


def _long_run(backend_name):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, LONG_STEPS, 3))
    dy = rng.normal(size=(2, 4))
    layer = le.LSTM(4, return_state=True, dtype="float64", backend=backend_name, seed=0)
    return _train(layer, x, dy, lengths=np.array([LONG_STEPS, LONG_STEPS // 2]),
                  initial_state=[np.ones((2, 4)), np.ones((2, 4))])


@pytest.fixture(scope="module")
def long_reference():
    """The numpy backend's results for T=100,000, computed once for the module."""
    return _long_run("numpy")


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", [name for name in ("numpy", "cython") if name in AVAILABLE])
def test_hundred_thousand_steps(backend_name, long_reference):
    """T=100,000 (B=2, I=3, H=4): training forward and backward complete, finite, equal to numpy.

    Row 1 is right-padded to half the length, so the cython variable-length
    path also runs over 100,000 steps; the recurrence is contractive, so
    float64 rounding stays small over the whole sequence.
    """
    results = long_reference if backend_name == "numpy" else _long_run(backend_name)
    assert results["dx"].shape == (2, LONG_STEPS, 3)
    for name, value in results.items():
        assert np.all(np.isfinite(value)), f"{backend_name}: {name} not finite after {LONG_STEPS} steps"
        assert_close(value, long_reference[name], f"{backend_name} T={LONG_STEPS}: {name}", "float64",
                     gradient=name.startswith("d"))


@pytest.mark.parametrize("backend_name", fast_backends())
def test_long_sequence_inference_all_backends(backend_name):
    """A few thousand steps at inference on every non-simulated backend, equal to numpy."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 3000, 2)).astype("float32")
    reference, layer = _pair(backend_name, "float32", 3, 2, seed=2, go_backwards=True)
    assert_close(to_host(layer(x, lengths=[3000, 1, 1500])), reference(x, lengths=[3000, 1, 1500]),
                 f"{backend_name} T=3000 inference", "float32")


# -- saturating inputs -----------------------------------------------------------------------------------

SATURATING = [("tanh", "sigmoid"), ("tanh", "hard_sigmoid"), ("sigmoid", "sigmoid")]


@pytest.mark.parametrize("backend_name", backends())
@pytest.mark.parametrize("activation, recurrent_activation", SATURATING)
@pytest.mark.filterwarnings("error::RuntimeWarning")  # overflow in a NumPy path means an inf intermediate
def test_inputs_of_magnitude_1e4_saturate_finitely(backend_name, activation, recurrent_activation):
    batch, steps, input_size, units = (2, 3, 2, 2) if is_simulated(backend_name) else (4, 12, 5, 6)
    rng = np.random.default_rng(3)
    x = rng.choice([-1e4, 1e4], size=(batch, steps, input_size)) * rng.uniform(0.5, 1, size=(batch, steps, input_size))
    for dtype in dtypes_of(backend_name):
        reference, layer = _pair(backend_name, dtype, units, input_size, seed=4, return_sequences=True,
                                 return_state=True, activation=activation,
                                 recurrent_activation=recurrent_activation)
        call = dict(mask=rng.random((batch, steps)) < 0.8,
                    initial_state=[np.full((batch, units), 1e4, dtype), np.full((batch, units), -1e4, dtype)])
        dy = np.ones((batch, steps, units), dtype)
        actual = _train(layer, x.astype(dtype), dy, **call)
        expected = _train(reference, x.astype(dtype), dy, **call)
        for name, value in actual.items():
            assert np.all(np.isfinite(value)), f"{backend_name} {dtype} {activation}: {name} has NaN/inf"
        assert np.abs(actual["y"]).max() <= 1.0, "saturating activations bound the outputs by 1"
        for name, value in expected.items():
            assert_close(actual[name], value, f"{backend_name} {dtype} 1e4 inputs: {name}", dtype,
                         gradient=name.startswith("d"))


@pytest.mark.parametrize("backend_name", backends())
@pytest.mark.parametrize("activation", ["relu", "linear"])
def test_unbounded_activations_stay_finite_over_a_few_steps(backend_name, activation):
    """relu/linear with 1e4 inputs grow but stay finite over a few steps, and agree with numpy."""
    rng = np.random.default_rng(5)
    x = (rng.choice([-1e4, 1e4], size=(2, 4, 3))).astype("float32")
    reference, layer = _pair(backend_name, "float32", 2, 3, seed=6, return_sequences=True, activation=activation)
    dy = np.ones((2, 4, 2), "float32")
    actual, expected = _train(layer, x, dy), _train(reference, x, dy)
    for name, value in expected.items():
        if value is None:
            continue
        assert np.all(np.isfinite(actual[name])), f"{backend_name} {activation}: {name} not finite"
        assert_close(actual[name], value, f"{backend_name} {activation} 1e4 inputs: {name}", "float32",
                     gradient=name.startswith("d"))


# -- 64-bit index arithmetic (cython) ------------------------------------------------------------------------

cython_only = pytest.mark.skipif("cython" not in AVAILABLE, reason="the cython backend is not built here")


@cython_only
def test_blas_dimension_guard_at_int32_limit():
    """Every GEMM dimension goes through check_blas_sizes: 2^31 - 1 passes, 2^31 and above raise."""
    from lstmeng.backends import _cython_lstm

    _cython_lstm.check_blas_sizes(1, 2**31 - 1)
    for size in (2**31, 2**32 + 5, 2**40):
        with pytest.raises(ValueError, match="BLAS int limit"):
            _cython_lstm.check_blas_sizes(4, size)


@cython_only
def test_packed_row_offsets_are_64_bit_beyond_2_to_31():
    """Row offsets (the kernels' index base, Py_ssize_t) for B*T > 2^31 are exact, without an 8 GB array.

    Two parts of 2^31 packed rows each: the second part starts exactly at 2^31,
    where a 32-bit offset would wrap to a negative number.
    """
    from lstmeng.backends import cython as cython_module

    batch, steps = 2**20, 2**12  # 2^32 packed rows
    layout = cython_module._layout(None, batch, steps, parts=2, packed_variable_length=True)
    assert layout.offsets.dtype.itemsize == 8 and layout.active.dtype.itemsize == 8
    assert layout.rows == batch * steps == 2**32
    # The uniform layout keeps one offset per part; the kernels compute the rest.
    assert layout.offset(1, 0) == 2**31
    assert layout.offset(0, steps - 1) == (steps - 1) * batch // 2
    assert layout.offset(1, 1) - layout.offset(1, 0) == batch // 2
    assert layout.offset(1, steps) == 2**32
    with pytest.raises(IndexError):
        layout.offset(2, 0)

    # The variable-length layout keeps [P, T + 1] offsets; every row at full length.
    mask = np.ones((4, 3), bool)
    mask[0, -1] = False
    assert cython_module._layout(mask, 4, 3, parts=2, packed_variable_length=True).rows == 11


@cython_only
def test_variable_length_offsets_are_64_bit():
    """The sorted, shrinking-batch layout keeps 64-bit offsets and counts every real step once."""
    from lstmeng.backends import cython as cython_module

    lengths = np.array([3, 7, 1, 7, 5, 2])
    mask = np.arange(7)[None] < lengths[:, None]
    layout = cython_module._layout(mask, 6, 7, parts=2, packed_variable_length=True)
    assert layout.offsets.dtype.itemsize == 8 and layout.order.dtype.itemsize == 8
    assert layout.rows == lengths.sum()
    np.testing.assert_array_equal(np.sort(layout.order), np.arange(6))
    # Per step, the parts together hold exactly the rows still running.
    np.testing.assert_array_equal(layout.active.sum(axis=0), (lengths[:, None] > np.arange(7)[None]).sum(axis=0))
    for part in range(2):
        rows = layout.order[layout.row_begin[part]:layout.row_begin[part + 1]]
        assert np.all(np.diff(lengths[rows]) <= 0), "each part's rows are sorted longest first"
