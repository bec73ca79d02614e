"""Layer API behaviour: shapes, return_state, stateful, time_major, LSTMCell's tape, Sequential's
params/grads, weights and config round trips, empty batches and zero steps, dtypes and casting.

References are independent of the code under test where values matter: a
hand-written NumPy LSTM step (``reference_lstm``), the whole-sequence run for
a stateful or cell-by-cell run, and transposition for time_major.
"""

from __future__ import annotations

import numpy as np
import pytest

import lstmeng as le
import lstmeng.cell as cell_module
from lstmeng.backends import registry

RNG = np.random.default_rng(0)
BATCH, STEPS, FEATURES, UNITS = 3, 5, 2, 4


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def reference_lstm(x, kernel, recurrent_kernel, bias, h=None, c=None):
    """Plain LSTM (tanh / sigmoid, gate order i, f, g, o), written out from the equations.

    x: [B, T, I]. Returns outputs [B, T, H], h [B, H], c [B, H].
    """
    batch, steps, _ = x.shape
    units = recurrent_kernel.shape[0]
    h = np.zeros((batch, units)) if h is None else h
    c = np.zeros((batch, units)) if c is None else c
    outputs = []
    for t in range(steps):
        z = x[:, t] @ kernel + h @ recurrent_kernel + bias
        i, f, g, o = (z[:, k * units:(k + 1) * units] for k in range(4))
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        outputs.append(h)
    return np.stack(outputs, axis=1), h, c


def lstm(**options):
    options.setdefault("backend", "numpy")
    options.setdefault("dtype", "float64")
    return le.LSTM(UNITS, seed=0, bias_initializer="normal", **options).build(FEATURES)


def x_of(batch=BATCH, steps=STEPS, dtype="float64"):
    return RNG.normal(size=(batch, steps, FEATURES)).astype(dtype)


# -- shapes and values -----------------------------------------------------------------
@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("return_state", [True, False])
@pytest.mark.parametrize("time_major", [True, False])
def test_output_shapes(return_sequences, return_state, time_major):
    layer = lstm(return_sequences=return_sequences, return_state=return_state, time_major=time_major)
    x = x_of()
    out = layer(np.swapaxes(x, 0, 1) if time_major else x)
    y = out[0] if return_state else out
    if return_sequences:
        assert y.shape == ((STEPS, BATCH, UNITS) if time_major else (BATCH, STEPS, UNITS))
    else:
        assert y.shape == (BATCH, UNITS)
    if return_state:
        assert len(out) == 3 and out[1].shape == out[2].shape == (BATCH, UNITS)
    else:
        assert isinstance(out, np.ndarray)


def test_matches_handwritten_reference_with_initial_state():
    layer = lstm(return_sequences=True, return_state=True)
    kernel, recurrent_kernel, bias = layer.get_weights()
    x = x_of()
    h0, c0 = RNG.normal(size=(BATCH, UNITS)), RNG.normal(size=(BATCH, UNITS))
    y, h, c = layer(x, initial_state=[h0, c0])
    expected_y, expected_h, expected_c = reference_lstm(x, kernel, recurrent_kernel, bias, h0, c0)
    np.testing.assert_allclose(y, expected_y, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h, expected_h, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(c, expected_c, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(y[:, -1], h)  # no mask: the last output is the final h


def test_go_backwards_is_the_reversed_sequence_reversed_back():
    x = x_of()
    forward = lstm(return_sequences=True, return_state=True)
    backward = lstm(return_sequences=True, return_state=True, go_backwards=True)
    y_back, h_back, _ = backward(x)
    y_rev, h_rev, _ = forward(x[:, ::-1])
    np.testing.assert_allclose(y_back, y_rev, rtol=1e-12)  # returned in processing order, as Keras does
    np.testing.assert_allclose(h_back, h_rev, rtol=1e-12)


def test_time_major_equals_transposed_batch_major_including_backward():
    x = x_of()
    mask = le.lengths_to_mask([5, 2, 4], maxlen=STEPS)
    dy = RNG.normal(size=(BATCH, STEPS, UNITS))
    batch_major = lstm(return_sequences=True, go_backwards=True)
    time_major = lstm(return_sequences=True, go_backwards=True, time_major=True)
    y = batch_major(x, mask=mask, training=True)
    y_t = time_major(np.swapaxes(x, 0, 1), mask=mask, training=True)  # mask stays (batch, time)
    np.testing.assert_allclose(np.swapaxes(y_t, 0, 1), y, rtol=1e-12)
    dx = batch_major.backward(dy)
    dx_t = time_major.backward(np.swapaxes(dy, 0, 1))
    np.testing.assert_allclose(np.swapaxes(dx_t, 0, 1), dx, rtol=1e-12)
    for name in batch_major.grads:
        np.testing.assert_allclose(time_major.grads[name], batch_major.grads[name], rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_of_outputs_and_grads(dtype):
    layer = lstm(dtype=dtype, return_sequences=True)
    y = layer(x_of(dtype="float64"), training=True)  # float64 input is cast to the layer dtype
    assert y.dtype == dtype
    dx = layer.backward(np.ones_like(y))
    assert dx.dtype == dtype and all(g.dtype == dtype for g in layer.grads.values())
    assert all(w.dtype == dtype for w in layer.get_weights())


def test_integer_and_bool_inputs_are_cast():
    layer = lstm(dtype="float32")
    ints = RNG.integers(-2, 3, size=(BATCH, STEPS, FEATURES))
    np.testing.assert_array_equal(layer(ints), layer(ints.astype("float32")))
    assert layer(ints).dtype == np.float32
    np.testing.assert_array_equal(layer(ints.tolist()), layer(ints.astype("float32")))
    bools = ints > 0
    np.testing.assert_array_equal(layer(bools), layer(bools.astype("float32")))
    h0 = RNG.integers(0, 2, size=(BATCH, UNITS))
    np.testing.assert_array_equal(layer(ints, initial_state=[h0, h0]),
                                  layer(ints, initial_state=[h0.astype("float32")] * 2))
    np.testing.assert_array_equal(layer(ints, lengths=np.array([5, 1, 3], np.int32)),
                                  layer(ints, lengths=[5, 1, 3]))


def test_check_finite_passes_finite_input_unchanged():
    layer = lstm()
    x = x_of()
    np.testing.assert_array_equal(layer(x, check_finite=True), layer(x))


# -- return_state and initial-state gradients ---------------------------------------------
def test_initial_state_grads_only_when_initial_state_given():
    layer = lstm(return_state=True)
    x = x_of()
    y, h, c = layer(x, training=True)
    layer.backward(np.ones_like(y))
    assert layer.initial_state_grads is None
    state = [np.zeros((BATCH, UNITS)), np.zeros((BATCH, UNITS))]
    layer(x, initial_state=state, training=True)
    layer.backward(np.ones_like(y), dh=np.ones_like(h))
    assert [g.shape for g in layer.initial_state_grads] == [(BATCH, UNITS)] * 2


@pytest.mark.parametrize("backend", ["numpy", "cython"])
@pytest.mark.parametrize("steps", [1, STEPS])
@pytest.mark.parametrize("stateful", [False, True])
def test_backward_asks_for_state_gradients_only_when_initial_state_given(backend, steps, stateful, monkeypatch):
    """Without ``initial_state`` (zeros, or a stateful layer's carried states) the backend is asked
    for no dh0, dc0 (``state_grads=False``: the cython backend skips dh0's product, a one-step
    call's only one with the recurrent kernel), and dx and the weight gradients are those of the
    same call given its initial states explicitly; with them, their gradients are reported."""
    layer = lstm(backend=backend, return_sequences=True, stateful=stateful)
    engine = registry.get_backend_object(backend)
    asked = []
    # A spy on the backend object the layer resolves to (the registry's singleton).
    original = engine.sequence_backward

    def spy(*args, **kwargs):
        asked.append(kwargs.get("state_grads", True))
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "sequence_backward", spy)
    x = x_of(steps=steps)
    dy = RNG.normal(size=(BATCH, steps, UNITS))
    if stateful:
        layer(x_of(steps=2))   # states to carry into the calls below
    states = [np.array(s) for s in layer.last_states] if stateful else [np.zeros((BATCH, UNITS))] * 2
    results = {}
    for given in (False, True):
        if stateful:
            layer.reset_state(states)
        layer(x, initial_state=states if given else None, training=True)
        grads = layer.run_backprop(layer.plan_backprop(dy))
        assert (grads.dh0 is None) == (grads.dc0 is None) == (not given)
        results[given] = (grads.dx, {name: np.array(grad) for name, grad in layer.grads.items()},
                          layer.initial_state_grads)
    assert asked == [False, True]
    assert results[False][2] is None
    assert [g.shape for g in results[True][2]] == [(BATCH, UNITS)] * 2
    np.testing.assert_array_equal(results[False][0], results[True][0])
    for name, grad in results[True][1].items():
        np.testing.assert_array_equal(results[False][1][name], grad, err_msg=name)


# -- stateful -----------------------------------------------------------------------------
def test_stateful_two_calls_equal_one_long_call():
    x = x_of(steps=6)
    whole = lstm(return_sequences=True, return_state=True)
    y, h, c = whole(x)
    stateful = lstm(return_sequences=True, return_state=True, stateful=True)
    y1, _, _ = stateful(x[:, :4])
    y2, h2, c2 = stateful(x[:, 4:])
    np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), y, rtol=1e-12)
    np.testing.assert_allclose(h2, h, rtol=1e-12)
    np.testing.assert_allclose(stateful.states[1], c, rtol=1e-12)


def test_stateful_carried_state_is_not_the_returned_array():
    # Editing the returned states in place must not change what the next call starts from.
    x = x_of(steps=6)
    whole = lstm(return_sequences=True, return_state=True)
    y, _, _ = whole(x)
    stateful = lstm(return_sequences=True, return_state=True, stateful=True)
    _, h1, c1 = stateful(x[:, :3])
    h1[...] = 0.0
    c1[...] = 0.0
    y2, _, _ = stateful(x[:, 3:])
    np.testing.assert_allclose(y2, y[:, 3:], rtol=1e-12)


def test_stateful_reset_state_and_explicit_states():
    x = x_of()
    stateful = lstm(stateful=True)
    fresh = lstm()
    first = stateful(x)
    assert not np.allclose(stateful(x), first)  # the carried state changes the result
    stateful.reset_state()
    assert stateful.states is None
    np.testing.assert_array_equal(stateful(x), fresh(x))
    h, c = RNG.normal(size=(BATCH, UNITS)), RNG.normal(size=(BATCH, UNITS))
    stateful.reset_state([h, c])
    np.testing.assert_allclose(stateful(x), fresh(x, initial_state=[h, c]), rtol=1e-12)
    with pytest.raises(ValueError, match=r"stateful layer carries states of shape \(3, 4\) but x has batch 2"):
        stateful(x[:2])
    with pytest.raises(ValueError, match=r"states\[1\] must have shape \(3, 4\), got \(2, 4\)"):
        stateful.reset_state([h, c[:2]])
    with pytest.raises(ValueError, match=r"states must be a list \[h, c\]"):
        stateful.reset_state(h)
    # An explicit initial_state overrides the carried one.
    np.testing.assert_allclose(stateful(x, initial_state=[h, c]), fresh(x, initial_state=[h, c]), rtol=1e-12)


def test_stateful_bidirectional_and_sequential_reset():
    x = x_of()
    bi = le.Bidirectional(le.LSTM(UNITS, stateful=True, dtype="float64", seed=1, backend="numpy"))
    first = bi(x)
    assert not np.allclose(bi(x), first)
    bi.reset_state()
    np.testing.assert_array_equal(bi(x), first)
    states = [RNG.normal(size=(BATCH, UNITS)) for _ in range(4)]
    bi.reset_state(states)
    np.testing.assert_array_equal(bi.backward_layer.states[0], states[2])
    model = le.Sequential([le.LSTM(UNITS, stateful=True, return_sequences=True, dtype="float64", seed=2,
                                   backend="numpy"), le.LSTM(2, stateful=True, dtype="float64", seed=3,
                                                             backend="numpy")])
    first = model(x)
    assert not np.allclose(model(x), first)
    model.reset_state()
    np.testing.assert_array_equal(model(x), first)


# -- LSTMCell ----------------------------------------------------------------------------
def test_cell_steps_equal_the_sequence_layer_forward_and_backward():
    x = x_of()
    layer = lstm(return_sequences=True, return_state=True)
    cell = le.LSTMCell(UNITS, dtype="float64", backend="numpy").set_weights(layer.get_weights())
    h0, c0 = RNG.normal(size=(BATCH, UNITS)), RNG.normal(size=(BATCH, UNITS))
    y, h, c = layer(x, initial_state=[h0, c0], training=True)
    states = [h0, c0]
    for t in range(STEPS):
        h_t, states = cell(x[:, t], states, training=True)
        np.testing.assert_allclose(h_t, y[:, t], rtol=1e-12)
        assert h_t is states[0]
    np.testing.assert_allclose(states[1], c, rtol=1e-12)

    dy = RNG.normal(size=y.shape)
    dc_final = RNG.normal(size=(BATCH, UNITS))
    dx = layer.backward(dy, dc=dc_final)
    dh_next, dc_next = np.zeros((BATCH, UNITS)), dc_final
    for t in reversed(range(STEPS)):
        dx_t, (dh_next, dc_next) = cell.backward(dy[:, t] + dh_next, dc_next)
        np.testing.assert_allclose(dx_t, dx[:, t], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dh_next, layer.initial_state_grads[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dc_next, layer.initial_state_grads[1], rtol=1e-10, atol=1e-12)
    for name in layer.grads:  # accumulated over the five backward calls
        np.testing.assert_allclose(cell.grads[name], layer.grads[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "cython"])
def test_cell_inference_steps_follow_weight_changes_and_copies_work(backend):
    """Inference steps run the backend's cell_inference_step function, made once while the
    weights' arrays and the options stay: its numbers are those of a fresh cell with the same
    weights after an in-place change of a weight's values and after set_weights (new arrays);
    a cell that has stepped can be deep-copied, and the copy steps alike."""
    import copy

    cell = le.LSTMCell(UNITS, backend=backend, seed=3)
    x = RNG.normal(size=(1, FEATURES)).astype("float32")
    states = [RNG.normal(size=(1, UNITS)).astype("float32") for _ in range(2)]

    def fresh_result():
        twin = le.LSTMCell(UNITS, backend=backend).set_weights(cell.get_weights())
        return twin(x, states)[0]

    made = []
    backend_class = type(le.backends.registry.get_backend_object(backend))
    original = backend_class.cell_inference_step
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backend_class, "cell_inference_step", lambda self, *args: made.append(1) or original(self, *args))
        first = cell(x, states)[0]
        np.testing.assert_array_equal(cell(x, states)[0], first)
        assert len(made) == 1
    cell.params["recurrent_kernel"][...] *= 0.5                   # in place: the same step reads it
    changed = cell(x, states)[0]
    assert not np.array_equal(changed, first)
    np.testing.assert_array_equal(changed, fresh_result())
    cell.set_weights([2 * w for w in cell.get_weights()])        # new arrays: a new step
    np.testing.assert_array_equal(cell(x, states)[0], fresh_result())
    twin = copy.deepcopy(cell)
    np.testing.assert_array_equal(twin(x, states)[0], cell(x, states)[0])


@pytest.mark.parametrize("backend", ["numpy", "cython"])
def test_cell_unroll_adds_its_gradients_in_place(backend):
    """A cell's unroll sums its steps' weight gradients into the round's own arrays (no new
    array per step: a cell step at I = 256, H = 512 spent more on allocating them than on its
    arithmetic), and an array the user stored as a gradient before the round is never
    written. The sums themselves: test_cell_steps_equal_the_sequence_layer_forward_and_backward."""
    if backend == "cython":
        pytest.importorskip("lstmeng.backends._cython_lstm")
    cell = le.LSTMCell(UNITS, dtype="float64", seed=4, backend=backend).build(FEATURES)
    given = np.full((FEATURES, 4 * UNITS), 7.0)
    cell.grads["kernel"] = given            # no backward yet: stored as given
    assert cell.grads["kernel"] is given
    x = x_of()
    states = None
    for t in range(STEPS):
        h, states = cell(x[:, t], states, training=True)
    cell.backward(np.ones_like(h))          # the round's first backward replaces the gradients
    first = {name: cell.grads[name] for name in cell.grads}
    assert first["kernel"] is not given and np.all(given == 7.0)
    after_one = {name: value.copy() for name, value in first.items()}
    dh, dc = np.ones_like(h), None
    for _ in range(STEPS - 1):
        _, (dh, dc) = cell.backward(dh, dc)
    for name, array in first.items():
        assert cell.grads[name] is array, f"{name}: a new array for a later step's sum"
        assert not np.array_equal(array, after_one[name]), f"{name}: the later steps added nothing"
    assert np.all(given == 7.0)


def _count_formed_steps(monkeypatch) -> list:
    """A list that receives, each time an LSTMCell forms its deferred weight gradients, how many
    steps' it formed at once."""
    formed = []
    original = le.LSTMCell._add_pending_grads
    monkeypatch.setattr(le.LSTMCell, "_add_pending_grads",
                        lambda self: formed.append(len(self.__dict__["_pending_grads"]["steps"])) or original(self))
    return formed


def test_cython_cell_forms_a_rounds_weight_gradients_at_once_with_the_per_step_numbers(monkeypatch):
    """On the cython backend a cell's one-step backwards give dz, and the round's weight gradients
    are formed from all of them at once (at the round's last backward, or when grads is read
    earlier): the same gradients as the numpy backend's per-step sums, after the whole round, read
    half-way through (the later steps then add on), after a truncated round and across a new
    round, and mixed with a step whose backward gives weight gradients."""
    pytest.importorskip("lstmeng.backends._cython_lstm")
    from lstmeng.testing import kernel_overrides
    formed = _count_formed_steps(monkeypatch)
    reference = le.LSTMCell(UNITS, dtype="float64", seed=4, backend="numpy").build(FEATURES)
    cell = le.LSTMCell(UNITS, dtype="float64", backend="cython").set_weights(reference.get_weights())
    x = x_of()
    dy = RNG.normal(size=(STEPS, BATCH, UNITS))

    def forward(layer, steps=STEPS):
        states = None
        for t in range(steps):
            _, states = layer(x[:, t], states, training=True)

    def backward(layer, steps, start=STEPS - 1, one_step=None):
        dh, dc = np.zeros((BATCH, UNITS)), None
        for t in range(start, start - steps, -1):
            if one_step is not None and t == one_step:   # this step's backward: the general path
                with kernel_overrides(cython_one_step=False):
                    _, (dh, dc) = layer.backward(dy[t] + dh, dc)
            else:
                _, (dh, dc) = layer.backward(dy[t] + dh, dc)

    def assert_same_grads():
        for name in reference.grads:
            np.testing.assert_allclose(cell.grads[name], reference.grads[name], rtol=1e-10, atol=1e-12,
                                       err_msg=name)

    for layer in (reference, cell):         # a whole round
        forward(layer)
        backward(layer, STEPS)
    assert formed == [STEPS]
    assert_same_grads()
    for layer in (reference, cell):         # read half-way: the steps so far, then the rest added on
        forward(layer)
        backward(layer, 2)
    assert_same_grads()
    kernel = cell.grads["kernel"]
    for layer in (reference, cell):
        backward(layer, STEPS - 2, start=STEPS - 3)
    assert cell.grads["kernel"] is kernel
    assert_same_grads()
    for layer in (reference, cell):         # a truncated round (never read), then a new one
        forward(layer)
        backward(layer, 2)
        forward(layer, 2)
        backward(layer, 2, start=1)
    assert_same_grads()
    formed.clear()
    for layer in (reference, cell):         # one step's backward gives weight gradients
        forward(layer)
        backward(layer, STEPS, one_step=2)
    assert_same_grads()
    assert formed == [2, STEPS - 3]         # the steps before it, when it adds its own; then the rest


@pytest.mark.parametrize("batch", [cell_module.DEFERRED_GRADS_MAX_ROWS, cell_module.DEFERRED_GRADS_MAX_ROWS + 1])
def test_cython_cell_forms_late_only_the_weight_gradients_of_small_batches(batch, monkeypatch):
    """Steps of up to DEFERRED_GRADS_MAX_ROWS rows have their weight gradients formed late; a
    larger batch keeps the backend's per-step sums (its threaded products), though the backend
    would give dz for it too; both the numpy backend's gradients."""
    pytest.importorskip("lstmeng.backends._cython_lstm")
    formed = _count_formed_steps(monkeypatch)
    reference = le.LSTMCell(UNITS, dtype="float64", seed=4, backend="numpy").build(FEATURES)
    cell = le.LSTMCell(UNITS, dtype="float64", backend="cython").set_weights(reference.get_weights())
    x = RNG.normal(size=(batch, STEPS, FEATURES))
    dy = RNG.normal(size=(STEPS, batch, UNITS))
    for layer in (reference, cell):
        states = None
        for t in range(STEPS):
            _, states = layer(x[:, t], states, training=True)
        dh, dc = np.zeros((batch, UNITS)), None
        for t in range(STEPS - 1, -1, -1):
            _, (dh, dc) = layer.backward(dy[t] + dh, dc)
    assert formed == ([STEPS] if batch <= cell_module.DEFERRED_GRADS_MAX_ROWS else [])
    for name in reference.grads:
        np.testing.assert_allclose(cell.grads[name], reference.grads[name], rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("case", ["avx512", "avx512-past-the-limit", "avx512-dropout", "avx2"])
def test_cython_cell_forms_late_the_weight_gradients_its_backend_forms(case, monkeypatch):
    """float32 steps of up to BACKEND_DEFERRED_GRADS_MAX_ROWS rows (here 34, past
    DEFERRED_GRADS_MAX_ROWS) whose backend forms the products of dz itself (the avx512 kernels,
    I and H multiples of 32) have their weight gradients formed late, by the backend, in the
    contract's layout; past the limit, with dropout (whose steps give no dz) or on the avx2
    kernels they keep the backend's per-step sums. Gradients: the numpy backend's (float32)."""
    extension = pytest.importorskip("lstmeng.backends._cython_lstm")
    isa = "avx2" if case == "avx2" else "avx512"
    if isa not in extension.SUPPORTED_ISAS:
        pytest.skip(f"this CPU or build does not run {isa}")
    from lstmeng.backends import cython as cython_module
    from lstmeng.testing import kernel_overrides
    formed = _count_formed_steps(monkeypatch)
    by_backend = []
    original = cython_module.CythonBackend.gates_weight_gradients

    def spy(backend, *args, **kwargs):
        by_backend.append(kwargs)
        return original(backend, *args, **kwargs)

    monkeypatch.setattr(cython_module.CythonBackend, "gates_weight_gradients", spy)
    batch = cell_module.BACKEND_DEFERRED_GRADS_MAX_ROWS + (1 if case == "avx512-past-the-limit" else -30)
    features, units, steps = 32, 32, 3
    options = {"dropout": 0.25, "recurrent_dropout": 0.25} if case == "avx512-dropout" else {}
    reference = le.LSTMCell(units, seed=4, backend="numpy", **options).build(features)
    cell = le.LSTMCell(units, backend="cython", **options).set_weights(reference.get_weights())
    x = RNG.normal(size=(batch, steps, features)).astype(np.float32)
    dy = RNG.normal(size=(steps, batch, units)).astype(np.float32)
    with kernel_overrides(cython_isa=isa):
        for layer in (reference, cell):
            layer._rng = np.random.default_rng(8)   # the same dropout masks
            states = None
            for t in range(steps):
                _, states = layer(x[:, t], states, training=True)
            dh, dc = np.zeros((batch, units), np.float32), None
            for t in range(steps - 1, -1, -1):
                _, (dh, dc) = layer.backward(dy[t] + dh, dc)
    late = case == "avx512"
    assert formed == ([steps] if late else [])
    assert by_backend == ([{"transposed": False}] if late else [])
    for name in reference.grads:
        np.testing.assert_allclose(cell.grads[name], reference.grads[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_cell_grads_restart_with_a_new_sequence_and_tape_is_lifo():
    cell = le.LSTMCell(UNITS, dtype="float64", seed=4, backend="numpy").build(FEATURES)
    x = x_of()
    h, states = cell(x[:, 0], training=True)
    cell.backward(np.ones_like(h))
    one_step = {name: value.copy() for name, value in cell.grads.items()}
    # A new sequence (the tape was empty): gradients start again from zero.
    h, states = cell(x[:, 0], training=True)
    cell.backward(np.ones_like(h))
    for name in one_step:
        np.testing.assert_array_equal(cell.grads[name], one_step[name])
    # Two steps on the tape: the first backward belongs to the second step.
    _, states = cell(x[:, 0], training=True)
    h2, _ = cell(x[:, 1], states, training=True)
    reference = le.LSTMCell(UNITS, dtype="float64", backend="numpy").set_weights(cell.get_weights())
    _, reference_states = reference(x[:, 0])
    reference(x[:, 1], reference_states, training=True)  # only the second step on its tape
    dx_second, _ = cell.backward(np.ones_like(h2))
    np.testing.assert_array_equal(dx_second, reference.backward(np.ones_like(h2))[0])
    cell.backward(np.ones_like(h2))
    with pytest.raises(RuntimeError, match="training=True"):
        cell.backward(np.ones_like(h2))


def test_cell_dropout_mask_is_reused_within_a_sequence():
    cell = le.LSTMCell(UNITS, dropout=0.5, recurrent_dropout=0.5, dtype="float64", seed=5,
                       backend="numpy").build(FEATURES)
    x_t = RNG.normal(size=(BATCH, FEATURES))
    first, _ = cell(x_t, training=True)
    second, _ = cell(x_t, training=True)  # same sequence (tape not empty): same masks
    np.testing.assert_array_equal(first, second)
    cell.reset_dropout_mask()
    assert not np.allclose(cell(x_t, training=True)[0], first)  # new sequence, new masks
    np.testing.assert_array_equal(cell(x_t)[0], cell(x_t)[0])  # inference: no dropout
    with pytest.raises(ValueError, match="x_t has batch 2 but this unrolled sequence started with batch 3"):
        cell(x_t[:2], training=True)


# -- Bidirectional, Dropout, Sequential ----------------------------------------------------------
@pytest.mark.parametrize("merge_mode,width", [("concat", 2 * UNITS), ("sum", UNITS), ("mul", UNITS),
                                              ("ave", UNITS), (None, UNITS)])
def test_bidirectional_merges(merge_mode, width):
    x = x_of()
    layer = le.Bidirectional(le.LSTM(UNITS, return_sequences=True, dtype="float64", seed=6, backend="numpy"),
                             merge_mode=merge_mode)
    both = le.Bidirectional(le.LSTM(UNITS, return_sequences=True, dtype="float64", seed=6, backend="numpy"),
                            merge_mode=None)
    forward, backward = both(x)
    merged = layer(x)
    expected = {"concat": lambda: np.concatenate([forward, backward], -1), "sum": lambda: forward + backward,
                "mul": lambda: forward * backward, "ave": lambda: (forward + backward) / 2,
                None: lambda: [forward, backward]}[merge_mode]()
    for actual, reference in zip(merged if merge_mode is None else [merged],
                                 expected if merge_mode is None else [expected]):
        assert actual.shape == (BATCH, STEPS, width)
        np.testing.assert_allclose(actual, reference, rtol=1e-12)
    if merge_mode != "concat":
        assert layer.units == UNITS


def test_bidirectional_weights_order_and_distinct_directions():
    layer = le.Bidirectional(le.LSTM(UNITS, seed=7, backend="numpy")).build(FEATURES)
    weights = layer.get_weights()
    assert [w.shape for w in weights] == [(FEATURES, 16), (UNITS, 16), (16,)] * 2
    assert not np.array_equal(weights[0], weights[3])  # the backward copy has its own weights
    assert layer.backward_layer.go_backwards and not layer.forward_layer.go_backwards
    assert sorted(layer.params) == sorted(f"{d}.{n}" for d in ("forward", "backward")
                                          for n in ("kernel", "recurrent_kernel", "bias"))


def test_dropout_layer():
    x = np.ones((200, 50))
    dropout = le.Dropout(0.25, seed=0)
    assert dropout(x) is x
    y = dropout(x, training=True)
    kept = y != 0
    assert set(np.unique(y)) == {0.0, 1.0 / 0.75}
    assert abs(kept.mean() - 0.75) < 0.02
    dy = RNG.normal(size=x.shape)
    np.testing.assert_array_equal(dropout.backward(dy), dy * y)  # the same mask, scaled
    np.testing.assert_array_equal(le.Dropout(0.25, seed=0)(x, training=True), y)  # seeded


def test_sequential_params_grads_keys_and_live_params():
    model = le.Sequential([le.Bidirectional(le.LSTM(UNITS, return_sequences=True, dtype="float64", seed=8,
                                                    backend="numpy")),
                           le.Dropout(0.2, seed=9),
                           le.LSTM(3, use_bias=False, dtype="float64", seed=10, backend="numpy")]).build(FEATURES)
    expected_keys = sorted([f"0.{d}.{n}" for d in ("forward", "backward") for n in ("kernel", "recurrent_kernel",
                                                                                    "bias")]
                           + ["2.kernel", "2.recurrent_kernel"])
    assert sorted(model.params) == expected_keys
    assert model.params["2.kernel"].shape == (2 * UNITS, 12)
    x = x_of()
    y = model(x, training=True)
    dx = model.backward(np.ones_like(y))
    assert dx.shape == x.shape
    assert sorted(model.grads) == expected_keys
    for key in expected_keys:
        assert model.grads[key].shape == model.params[key].shape
    # params are the live arrays: an in-place update (an optimizer step) changes the model.
    before = model(x)
    for key, value in model.params.items():
        value -= 0.1 * model.grads[key]
    assert not np.allclose(model(x), before)
    np.testing.assert_array_equal(model.layers[2].params["kernel"], model.params["2.kernel"])
    assert [None if s is None else len(s) for s in model.states] == [4, None, 2]


# -- weights and config round trips -------------------------------------------------------------
def test_lstm_config_and_weights_round_trip():
    layer = le.LSTM(UNITS, activation="relu", recurrent_activation="hard_sigmoid", use_bias=False,
                    kernel_initializer="uniform", recurrent_initializer="normal", dropout=0.1,
                    recurrent_dropout=0.2, return_sequences=True, return_state=True, go_backwards=True,
                    stateful=True, zero_output_for_mask=True, time_major=True, dtype="float64",
                    backend="numpy", seed=11).build(FEATURES)
    config = layer.get_config()
    copy = le.LSTM.from_config(config)
    assert copy.get_config() == config
    copy.set_weights(layer.get_weights())
    for a, b in zip(copy.get_weights(), layer.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # get_weights returns copies: changing them does not change the layer.
    weights = layer.get_weights()
    weights[0][:] = 0
    assert np.any(layer.get_weights()[0] != 0)
    x = np.swapaxes(x_of(), 0, 1)
    for a, b in zip(copy(x), layer(x)):
        np.testing.assert_array_equal(a, b)
    assert le.LSTMCell.from_config(le.LSTMCell(3, activation="sigmoid").get_config()).activation == "sigmoid"


def test_wrapper_config_and_weights_round_trip():
    model = le.Sequential([le.Bidirectional(le.LSTM(UNITS, return_sequences=True, seed=12, backend="numpy"),
                                            merge_mode="mul"),
                           le.Dropout(0.3, seed=13), le.LSTM(2, seed=14, backend="numpy")]).build(FEATURES)
    copy = le.Sequential.from_config(model.get_config())
    assert copy.get_config() == model.get_config()
    copy.set_weights(model.get_weights())
    x = x_of(dtype="float32")
    np.testing.assert_array_equal(copy(x), model(x))
    assert len(model.get_weights()) == 9


def test_set_weights_builds_an_unbuilt_layer_and_casts():
    layer = le.LSTM(UNITS, backend="numpy")
    layer.set_weights([np.ones((7, 16), int), np.zeros((UNITS, 16)), np.zeros(16)])
    assert layer.built and layer.input_size == 7 and layer.params["kernel"].dtype == np.float32


def test_initializers_and_unit_forget_bias():
    layer = le.LSTM(8, seed=0).build(5)
    kernel, recurrent_kernel, bias = layer.get_weights()
    limit = np.sqrt(6 / (5 + 32))
    assert np.abs(kernel).max() <= limit
    # Orthogonal recurrent kernel: [8, 32] has orthonormal rows.
    np.testing.assert_allclose(recurrent_kernel @ recurrent_kernel.T, np.eye(8), atol=1e-5)
    np.testing.assert_array_equal(bias, np.r_[np.zeros(8), np.ones(8), np.zeros(16)])
    no_forget = le.LSTM(8, unit_forget_bias=False, bias_initializer="ones").build(5)
    np.testing.assert_array_equal(no_forget.get_weights()[2], np.ones(32))
    custom = le.LSTM(2, kernel_initializer=lambda shape, rng: np.full(shape, 0.5)).build(3)
    np.testing.assert_array_equal(custom.get_weights()[0], np.full((3, 8), 0.5))
    # The same seed gives the same weights; another seed, others.
    np.testing.assert_array_equal(le.LSTM(8, seed=0).build(5).get_weights()[0], kernel)
    assert not np.array_equal(le.LSTM(8, seed=1).build(5).get_weights()[0], kernel)


def test_hard_sigmoid_is_keras3s():
    layer = le.LSTM(1, recurrent_activation="hard_sigmoid", activation="linear", backend="numpy",
                    dtype="float64", return_state=True)
    # One step with zero state: c = i * g, h = o * c, with every gate from one pre-activation z.
    z = 2.1
    layer.set_weights([np.full((1, 4), z), np.zeros((1, 4)), np.zeros(4)])
    _, h, c = layer(np.ones((1, 1, 1)))
    hard = np.clip(z / 6 + 0.5, 0, 1)
    np.testing.assert_allclose(c, [[hard * z]], rtol=1e-15)
    np.testing.assert_allclose(h, [[hard * hard * z]], rtol=1e-15)


# -- empty batch and zero steps ---------------------------------------------------------------
@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("batch,steps", [(0, STEPS), (BATCH, 0), (0, 0)])
def test_empty_batch_and_zero_steps(batch, steps, return_sequences):
    layer = lstm(return_sequences=return_sequences, return_state=True)
    x = np.zeros((batch, steps, FEATURES))
    h0, c0 = RNG.normal(size=(batch, UNITS)), RNG.normal(size=(batch, UNITS))
    y, h, c = layer(x, initial_state=[h0, c0], training=True)
    assert y.shape == ((batch, steps, UNITS) if return_sequences else (batch, UNITS))
    assert np.all(y == 0)
    np.testing.assert_array_equal(h, h0)  # zero steps: the states are the initial state
    np.testing.assert_array_equal(c, c0)
    dh, dc = RNG.normal(size=(batch, UNITS)), RNG.normal(size=(batch, UNITS))
    dx = layer.backward(np.ones_like(y), dh=dh, dc=dc)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(layer.initial_state_grads[0], dh)
    np.testing.assert_array_equal(layer.initial_state_grads[1], dc)
    assert {name: g.shape for name, g in layer.grads.items()} == {
        "kernel": (FEATURES, 16), "recurrent_kernel": (UNITS, 16), "bias": (16,)}
    assert all(np.all(g == 0) for g in layer.grads.values())
    layer(x, training=True)   # without initial states their gradients are None, as with a workspace
    grads = layer.run_backprop(layer.plan_backprop(np.ones_like(y)))
    assert grads.dh0 is None and grads.dc0 is None and layer.initial_state_grads is None
    if steps == 0:
        assert layer(x, lengths=np.zeros(batch, int), initial_state=[h0, c0])[1].shape == (batch, UNITS)


@pytest.mark.parametrize("batch,steps", [(0, STEPS), (BATCH, 0)])
def test_empty_inputs_through_wrappers_and_cell(batch, steps):
    x = np.zeros((batch, steps, FEATURES), "float32")
    bi = le.Bidirectional(le.LSTM(UNITS, return_sequences=True, backend="numpy"))
    y = bi(x, training=True)
    assert y.shape == (batch, steps, 2 * UNITS)
    assert bi.backward(np.zeros_like(y)).shape == x.shape
    model = le.Sequential([le.LSTM(UNITS, return_sequences=True, backend="numpy"), le.Dropout(0.5),
                           le.LSTM(2, backend="numpy")])
    y = model(x, training=True)
    assert y.shape == (batch, 2) and np.all(y == 0)
    assert model.backward(np.ones_like(y)).shape == x.shape
    cell = le.LSTMCell(UNITS, backend="numpy")
    h, (h_again, c) = cell(np.zeros((batch, FEATURES)), training=True)
    assert h.shape == c.shape == (batch, UNITS)
    dx, (dh, dc) = cell.backward(np.zeros((batch, UNITS)))
    assert dx.shape == (batch, FEATURES) and dh.shape == (batch, UNITS)


def test_inference_keeps_no_tape():
    layer = lstm(return_sequences=True)
    layer(x_of())  # an inference call records nothing
    with pytest.raises(RuntimeError, match="training=True"):
        layer.backward(np.zeros((BATCH, STEPS, UNITS)))
    layer(x_of(), training=True)
    layer(x_of())  # ... and leaves the training call's tape alone (issue 18; tests/test_traps.py)
    layer.backward(np.zeros((BATCH, STEPS, UNITS)))
    with pytest.raises(RuntimeError, match="training=True"):
        layer.backward(np.zeros((BATCH, STEPS, UNITS)))


def test_long_sequence_inference_equals_training_and_memory_stays_flat():
    """Inference projects the input in blocks of steps: same numbers, memory O(B x H) in T."""
    import tracemalloc

    layer = lstm(return_sequences=False, go_backwards=True, dropout=0.0)
    x = x_of(steps=150)
    mask = le.lengths_to_mask([150, 70, 1], maxlen=150)
    np.testing.assert_array_equal(layer(x, mask=mask), layer(x, mask=mask, training=True))
    peaks = {}
    for steps in (200, 1000):
        x = RNG.normal(size=(2, steps, FEATURES))
        layer(x[:, :3])
        tracemalloc.start()
        layer(x)
        peaks[steps] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # 800 more steps of a [T, B, 4H] projection alone would be 800 * 2 * 16 * 8 = 200 KiB.
    assert peaks[1000] - peaks[200] < 32 * 1024, peaks


def test_sequential_leading_dropout_keeps_checks_and_layout():
    x = x_of()
    x[1, 2, 0] = np.nan
    model = le.Sequential([le.Dropout(0.1), lstm()])
    with pytest.raises(ValueError, match="batch row 1, time step 2"):
        model(x, check_finite=True)
    time_major = le.Sequential([le.Dropout(0.1), lstm(time_major=True)])
    x = x_of()
    expected = lstm(time_major=True)(np.swapaxes(x, 0, 1), lengths=[5, 2, 3])
    np.testing.assert_array_equal(time_major(np.swapaxes(x, 0, 1), lengths=[5, 2, 3]), expected)


def test_dropout_accepts_host_lists():
    y = le.Dropout(0.5, seed=0)([[1.0, 2.0, 3.0]], training=True)
    assert isinstance(y, np.ndarray) and set(np.unique(y)) <= {0.0, 2.0, 4.0, 6.0}


def test_bidirectional_copies_callable_initializers():
    layer = le.Bidirectional(le.LSTM(UNITS, recurrent_initializer=lambda shape, rng: np.zeros(shape),
                                     backend="numpy")).build(FEATURES)
    assert np.all(layer.forward_layer.get_weights()[1] == 0)
    assert np.all(layer.backward_layer.get_weights()[1] == 0)


def test_last_output_does_not_alias_the_final_state():
    layer = lstm(return_state=True)
    y, h, c = layer(x_of())
    np.testing.assert_array_equal(y, h)
    assert not np.shares_memory(y, h)
    y *= 2  # a caller's in-place change of y leaves h alone
    assert not np.allclose(y, h)


def test_orthogonal_initializer_runs_its_qr_on_one_blas_thread(monkeypatch):
    """A multi-threaded OpenBLAS call leaves its workers busy-waiting for ~0.1 s, which took a core
    from a new layer's first calls; the initializer's QR must run on one BLAS thread and restore
    every BLAS's count afterwards."""
    from lstmeng import initializers
    from lstmeng._runtime import threads

    def counts():
        return {library.filepath: library.get_num_threads() for library in threads.blas_libraries()}

    if not threads.blas_controllable():
        pytest.skip("threadpoolctl finds no BLAS here")
    seen = []
    qr = np.linalg.qr

    def recording_qr(matrix):
        seen.append(counts())
        return qr(matrix)

    monkeypatch.setattr(np.linalg, "qr", recording_qr)
    before = counts()
    weights = initializers.orthogonal((64, 256), np.random.default_rng(0))
    np.testing.assert_allclose(weights @ weights.T, np.eye(64), atol=1e-10)
    assert seen and seen[0] == {path: 1 for path in before}
    assert counts() == before   # restored
