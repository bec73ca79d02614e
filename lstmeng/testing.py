"""Conformance suite: checks any backend (built in or a plugin) against the NumPy reference.

Use it from pytest::

    import pytest
    from lstmeng import testing

    @pytest.mark.parametrize("case", testing.conformance_cases(), ids=str)
    def test_my_backend(case):
        testing.check_case("my_backend", case)

Each case runs the backend's whole-sequence forward (with and without
``training``) and backward, and its cell step, on the same inputs as the NumPy
backend, and compares outputs, final states, dx, initial-state gradients and
weight gradients; a second backward of one workspace must raise RuntimeError
(a workspace is backpropagated once, on every backend). Cases cover every mask pattern (none, right padding, left
padding, holes, fully-masked rows), reverse, zero_output_for_mask,
return_sequences, initial states, dropout masks, every activation, no bias, in
every dtype the backend claims. ``size`` scales the shapes for real-size runs
on a device; every case stays well-conditioned at every size (see
``RECURRENT_GAIN``), so the same tight tolerances hold at size 1 and size 8.

``kernel_overrides(**fields)`` (with its ``KernelOverrides`` fields) forces the
built-in backends' internal paths within a ``with`` block, for tests and
benchmarks only: the unit split of small batches, the cython instruction set
and gate kernels, the numba_cuda recurrence design, weight placement and GEMM
path. Production code never needs it.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from lstmeng.backends import registry
from lstmeng.backends._kernel_overrides import KernelOverrides as KernelOverrides  # re-exported
from lstmeng.backends._kernel_overrides import kernel_overrides as kernel_overrides  # re-exported
from lstmeng.backends.base import SequenceOptions

MASK_PATTERNS = ("none", "right", "left", "holes", "fully_masked", "random")
ACTIVATION_PAIRS = (("tanh", "sigmoid"), ("relu", "hard_sigmoid"), ("sigmoid", "sigmoid"),
                    ("linear", "hard_sigmoid"))
#: Activations whose output is unbounded: with them the state can grow from step to step.
UNBOUNDED_ACTIVATIONS = ("linear", "relu")
#: Standard deviation of the recurrent kernel's entries, times sqrt(max(I, H)), keyed by
#: "the activation is unbounded". With an unbounded activation a gain of 1.5 (or even
#: 1.0) makes the recurrence expansive: at size=8 (T=56) outputs and gradients reach
#: 1e7-1e20 and rounding differences between correct backends grow with them, so the
#: cases test conditioning, not the backend. At 0.5 the largest output or gradient of
#: these cases is of the same order as the tanh cases' (51 vs 84 at size 8, 96 vs 164
#: at size 24: what is left grows with B*T through the weight gradients' sums).
RECURRENT_GAIN = {False: 1.5, True: 0.5}
#: The tolerance table of lstmeng's tests, the one place its numbers are written: this suite's and
#: the repository's own backend tests (tests/_backends.py) import it. (rtol, atol) per dtype for
#: outputs and states; gradients (longer chains of rounding) get ``GRADIENT_FACTOR`` times both.
#: ``assert_close`` scales atol by max(1, max |expected|), so large values compare relatively.
TOLERANCES = {"float32": (2e-5, 2e-5), "float64": (1e-10, 1e-11)}
GRADIENT_FACTOR = 10


def tolerance(dtype, gradient: bool = False) -> tuple[float, float]:
    """(rtol, atol) of ``TOLERANCES`` for ``dtype`` (a name or NumPy dtype); gradients get ``GRADIENT_FACTOR``x."""
    rtol, atol = TOLERANCES[np.dtype(dtype).name]
    return (rtol * GRADIENT_FACTOR, atol * GRADIENT_FACTOR) if gradient else (rtol, atol)


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of the conformance suite."""

    dtype: str
    mask: str
    reverse: bool
    zero_output_for_mask: bool
    return_sequences: bool
    initial_state: bool
    dropout: bool
    activation: str
    recurrent_activation: str
    use_bias: bool
    batch: int = 5
    steps: int = 7
    input_size: int = 4
    units: int = 6
    seed: int = 0

    def __str__(self) -> str:
        flags = [self.dtype, f"mask={self.mask}", "rev" if self.reverse else "fwd",
                 "zero" if self.zero_output_for_mask else "prev", "seq" if self.return_sequences else "last",
                 f"{self.activation}/{self.recurrent_activation}",
                 f"B{self.batch}T{self.steps}I{self.input_size}H{self.units}"]
        if self.initial_state:
            flags.append("h0")
        if self.dropout:
            flags.append("dropout")
        if not self.use_bias:
            flags.append("nobias")
        return "-".join(flags)


def conformance_cases(dtypes=("float32", "float64"), size=1, cases_per_dtype=None) -> list[Case]:
    """The suite's cases.

    Every combination of mask pattern, reverse, zero_output_for_mask and
    return_sequences appears once per dtype; initial state, dropout,
    activations and bias rotate through them so each also meets every mask
    pattern. ``size`` multiplies batch, input size and units (time grows
    too) for real-size runs; ``cases_per_dtype`` keeps a spread-out subset.
    """
    cases = []
    for dtype in dtypes:
        combos = list(itertools.product(MASK_PATTERNS, (False, True), (False, True), (True, False)))
        chosen = []
        for index, (mask, reverse, zero, sequences) in enumerate(combos):
            activation, recurrent_activation = ACTIVATION_PAIRS[index % len(ACTIVATION_PAIRS)]
            chosen.append(Case(
                dtype=dtype, mask=mask, reverse=reverse, zero_output_for_mask=zero,
                return_sequences=sequences, initial_state=index % 2 == 0, dropout=index % 3 == 0,
                activation=activation, recurrent_activation=recurrent_activation,
                use_bias=index % 5 != 4, batch=5 * size, steps=7 * size if size > 1 else 7,
                input_size=4 * size, units=6 * size, seed=index))
        if cases_per_dtype is not None and cases_per_dtype < len(chosen):
            picks = np.linspace(0, len(chosen) - 1, cases_per_dtype).round().astype(int)
            chosen = [chosen[i] for i in sorted(set(picks))]
        cases.extend(chosen)
    return cases


def make_mask(pattern: str, batch: int, steps: int, rng) -> np.ndarray | None:
    """A ``[B, T]`` bool mask of the named pattern (None for "none")."""
    if pattern == "none":
        return None
    if pattern == "right":
        lengths = rng.integers(1, steps + 1, size=batch)
        lengths[0] = steps
        return np.arange(steps)[None] < lengths[:, None]
    if pattern == "left":
        lengths = rng.integers(1, steps + 1, size=batch)
        return np.arange(steps)[None] >= (steps - lengths)[:, None]
    if pattern == "holes":
        mask = rng.random((batch, steps)) < 0.6
        mask[:, 0] = True
        return mask
    if pattern == "fully_masked":
        mask = np.arange(steps)[None] < rng.integers(1, steps + 1, size=batch)[:, None]
        mask[::2] = False
        return mask
    if pattern == "random":
        return rng.random((batch, steps)) < 0.5
    raise ValueError(f"unknown mask pattern {pattern!r}; expected one of {MASK_PATTERNS}")


def make_inputs(case: Case) -> dict:
    """Deterministic host inputs of a case: the arrays of ``sequence_forward`` and the upstream gradients."""
    rng = np.random.default_rng(case.seed)
    dtype = np.dtype(case.dtype)
    B, T, I, H = case.batch, case.steps, case.input_size, case.units  # noqa: E741 (the shape letters of the contract)
    scale = 1.0 / np.sqrt(max(I, H))
    recurrent_gain = RECURRENT_GAIN[case.activation in UNBOUNDED_ACTIVATIONS]

    def normal(*shape, s=1.0):
        return (rng.normal(size=shape) * s).astype(dtype)

    inputs = {
        "x": normal(B, T, I),
        "h0": normal(B, H, s=0.5) if case.initial_state else np.zeros((B, H), dtype),
        "c0": normal(B, H, s=0.5) if case.initial_state else np.zeros((B, H), dtype),
        "kernel": normal(I, 4 * H, s=scale * 1.5),
        "recurrent_kernel": normal(H, 4 * H, s=scale * recurrent_gain),
        "bias": normal(4 * H, s=0.5) if case.use_bias else None,
        "mask": make_mask(case.mask, B, T, rng),
        "input_dropout_mask": None,
        "recurrent_dropout_mask": None,
    }
    if case.dropout:
        inputs["input_dropout_mask"] = ((rng.random((B, I)) < 0.7) / 0.7).astype(dtype)
        inputs["recurrent_dropout_mask"] = ((rng.random((B, H)) < 0.8) / 0.8).astype(dtype)
    out_shape = (B, T, H) if case.return_sequences else (B, H)
    inputs["doutputs"] = normal(*out_shape)
    inputs["dh"] = normal(B, H)
    inputs["dc"] = normal(B, H)
    return inputs


def sequence_options(case: Case, inputs: dict, training: bool) -> SequenceOptions:
    """The ``SequenceOptions`` of a case's sequence call on ``inputs`` (from ``make_inputs``)."""
    return SequenceOptions.for_call(
        bias=inputs["bias"], mask=inputs["mask"], input_dropout_mask=inputs["input_dropout_mask"],
        recurrent_dropout_mask=inputs["recurrent_dropout_mask"], activation=case.activation,
        recurrent_activation=case.recurrent_activation, reverse=case.reverse,
        zero_output_for_mask=case.zero_output_for_mask, return_sequences=case.return_sequences,
        training=training)


def cell_options(case: Case, inputs: dict) -> SequenceOptions:
    """The ``SequenceOptions`` of a case's training cell step (no mask, the new h as output)."""
    return SequenceOptions.for_call(
        bias=inputs["bias"], mask=None, input_dropout_mask=inputs["input_dropout_mask"],
        recurrent_dropout_mask=inputs["recurrent_dropout_mask"], activation=case.activation,
        recurrent_activation=case.recurrent_activation, return_sequences=False, training=True)


def _on_device(backend, case: Case, inputs: dict) -> dict:
    """``inputs`` converted to the backend's arrays (the mask as bool)."""
    dtype = np.dtype(case.dtype)
    return {name: None if array is None else backend.ops.asarray(array, np.bool_ if name == "mask" else dtype)
            for name, array in inputs.items()}


def _forward(backend, case: Case, arrays: dict, training: bool):
    return backend.sequence_forward(
        arrays["x"], arrays["h0"], arrays["c0"], arrays["kernel"], arrays["recurrent_kernel"], arrays["bias"],
        arrays["mask"], arrays["input_dropout_mask"], arrays["recurrent_dropout_mask"],
        sequence_options(case, arrays, training))


def run_backend(backend, case: Case, inputs: dict, training: bool = True) -> dict:
    """Run forward (and backward when training) of ``backend`` on host ``inputs``; host results."""
    arrays = _on_device(backend, case, inputs)
    forward = _forward(backend, case, arrays, training)
    result = {"outputs": backend.ops.to_numpy(forward.outputs), "h": backend.ops.to_numpy(forward.h),
              "c": backend.ops.to_numpy(forward.c)}
    if training:
        grads = backend.sequence_backward(arrays["doutputs"], arrays["dh"], arrays["dc"], forward.workspace)
        for name in ("dx", "dh0", "dc0", "dkernel", "drecurrent_kernel"):
            result[name] = backend.ops.to_numpy(getattr(grads, name))
        if case.use_bias:
            result["dbias"] = backend.ops.to_numpy(grads.dbias)
    else:
        result["workspace"] = forward.workspace
    return result


def assert_close(actual, expected, what: str, dtype: str, gradient: bool = False) -> None:
    """Assert ``actual`` matches ``expected`` within the suite's tolerance for ``dtype``."""
    rtol, atol = tolerance(dtype, gradient)
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {actual.shape}, expected {expected.shape}")
    # Scale atol with the magnitude so large gradients are compared relatively.
    atol = atol * max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def check_case(backend_name: str, case: Case) -> None:
    """Compare backend ``backend_name`` with the NumPy reference on ``case``.

    Skips (pytest.skip) when the backend does not claim the case's dtype or
    activations; raises AssertionError on any mismatch.
    """
    backend = registry.get_backend_object(backend_name)
    try:
        backend.check_support(case.dtype, case.activation, case.recurrent_activation)
    except NotImplementedError as error:
        import pytest
        pytest.skip(f"{backend_name}: {error}")
    reference = registry.get_backend_object("numpy")
    inputs = make_inputs(case)
    expected = run_backend(reference, case, inputs, training=True)
    actual = run_backend(backend, case, inputs, training=True)
    for name, value in expected.items():
        assert_close(actual[name], value, f"{case}: {name}", case.dtype, gradient=name.startswith("d"))
    inference = run_backend(backend, case, inputs, training=False)
    for name in ("outputs", "h", "c"):
        assert_close(inference[name], expected[name], f"{case}: {name} (training=False)", case.dtype)
    if inference["workspace"] is not None:
        raise AssertionError(f"{case}: forward with training=False returned a workspace")
    check_cell(backend_name, case)
    check_single_backward(backend_name, case)


def check_single_backward(backend_name: str, case: Case) -> None:
    """A workspace is backpropagated once: a second ``sequence_backward`` or ``cell_backward`` of the
    same workspace raises RuntimeError (``lstmeng.backends.base.Workspace``), on every backend."""
    backend = registry.get_backend_object(backend_name)
    inputs = make_inputs(case)
    arrays = _on_device(backend, case, inputs)
    forward = _forward(backend, case, arrays, training=True)
    step = backend.cell_forward(
        backend.ops.asarray(inputs["x"][:, 0], np.dtype(case.dtype)), arrays["h0"], arrays["c0"], arrays["kernel"],
        arrays["recurrent_kernel"], arrays["bias"], arrays["input_dropout_mask"], arrays["recurrent_dropout_mask"],
        cell_options(case, inputs))
    calls = {"sequence_backward": lambda: backend.sequence_backward(arrays["doutputs"], arrays["dh"], arrays["dc"],
                                                                    forward.workspace),
             "cell_backward": lambda: backend.cell_backward(arrays["dh"], arrays["dc"], step.workspace)}
    for name, backward in calls.items():
        backward()
        try:
            backward()
        except RuntimeError:
            continue
        raise AssertionError(f"{case}: a second {name} of one workspace ran; the contract says it raises "
                             "RuntimeError (a workspace is backpropagated once)")


def check_cell(backend_name: str, case: Case) -> None:
    """Compare the backend's single-step cell forward and backward with the reference."""
    backend = registry.get_backend_object(backend_name)
    reference = registry.get_backend_object("numpy")
    inputs = make_inputs(case)
    dtype = np.dtype(case.dtype)
    results = []
    for engine in (reference, backend):
        def device(array):
            return None if array is None else engine.ops.asarray(array, dtype)  # noqa: B023 (called in this iteration)
        step = engine.cell_forward(
            device(inputs["x"][:, 0]), device(inputs["h0"]), device(inputs["c0"]), device(inputs["kernel"]),
            device(inputs["recurrent_kernel"]), device(inputs["bias"]),
            device(inputs["input_dropout_mask"]), device(inputs["recurrent_dropout_mask"]),
            cell_options(case, inputs))
        grads = engine.cell_backward(device(inputs["dh"]), device(inputs["dc"]), step.workspace)
        results.append({
            "h": engine.ops.to_numpy(step.h), "c": engine.ops.to_numpy(step.c), "dx": engine.ops.to_numpy(grads.dx),
            "dh0": engine.ops.to_numpy(grads.dh0), "dc0": engine.ops.to_numpy(grads.dc0),
            "dkernel": engine.ops.to_numpy(grads.dkernel),
            "drecurrent_kernel": engine.ops.to_numpy(grads.drecurrent_kernel)})
    for name, value in results[0].items():
        assert_close(results[1][name], value, f"{case}: cell {name}", case.dtype, gradient=name.startswith("d"))


def finite_difference_check(loss_and_grads, params: dict, rng=None, samples: int = 6,
                            epsilon: float = 1e-6, rtol: float = 1e-5) -> None:
    """Check analytic gradients against central differences (float64).

    Args:
        loss_and_grads: ``() -> (loss: float, grads: dict)``; grads has the
            keys of ``params``.
        params: name -> float64 array, perturbed in place (and restored).
        samples: entries checked per array.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    _, grads = loss_and_grads()
    grads = {name: np.array(value, copy=True) for name, value in grads.items()}
    for name, array in params.items():
        if array.size == 0:
            continue
        for flat_index in rng.choice(array.size, size=min(samples, array.size), replace=False):
            index = np.unravel_index(flat_index, array.shape)
            original = array[index]
            array[index] = original + epsilon
            plus, _ = loss_and_grads()
            array[index] = original - epsilon
            minus, _ = loss_and_grads()
            array[index] = original
            numeric = (plus - minus) / (2 * epsilon)
            analytic = grads[name][index]
            if not np.isclose(analytic, numeric, rtol=rtol, atol=rtol * max(1.0, abs(numeric))):
                raise AssertionError(f"d loss / d {name}{list(index)}: analytic {analytic!r}, "
                                     f"finite difference {numeric!r}")
