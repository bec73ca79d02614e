"""The lstmeng-only options of ``lstmeng.torch.LSTM`` / ``LSTMCell``: activations, and a cell's
recurrent dropout and mask.

With every option off the modules are ``torch.nn.LSTM`` / ``LSTMCell`` (tests/test_torch_module.py).
Here the references are lstmeng's own layers on the numpy backend (the backend
contract's executable specification) with the same weights, a cell step written
in torch ops (autograd differentiates it), ``torch.nn.LSTMCell`` on the rows a
mask keeps, and finite differences (``torch.autograd.gradcheck``). Sizes are tiny.
"""

from __future__ import annotations

import copy
import io
import itertools
import pickle

import numpy as np
import pytest

import lstmeng as le
from lstmeng.backends import registry
from lstmeng.backends.base import ACTIVATIONS, RECURRENT_ACTIVATIONS

torch = pytest.importorskip("torch")

import lstmeng.torch as lt  # noqa: E402

INPUT_SIZE, HIDDEN_SIZE, BATCH, STEPS = 3, 4, 3, 4
PAIRS = list(itertools.product(ACTIVATIONS, RECURRENT_ACTIVATIONS))
NON_DEFAULT_PAIRS = [pair for pair in PAIRS if pair != ("tanh", "sigmoid")]
TOLERANCE = dict(rtol=1e-10, atol=1e-12)
GRAD_TOLERANCE = dict(rtol=1e-9, atol=1e-11)
#: The activations in torch ops. hard_sigmoid is Keras 3's, clip(x / 6 + 0.5, 0, 1), the values of
#: torch.nn.functional.hardsigmoid, whose CPU backward multiplies by 1/6 rounded to float32 even in float64
#: (gradients 3e-8 off), so it is written out here.
TORCH_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "linear": lambda x: x,
                     "hard_sigmoid": lambda x: torch.clamp(x / 6 + 0.5, 0, 1)}


def pair_id(pair):
    return "-".join(pair)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def lstmeng_layer(module, layer: int, suffix: str, **options):
    """Layer ``layer`` (direction ``suffix``: "" or "_reverse") of ``module`` as an ``le.LSTM`` on the numpy
    backend, with the module's activations and weights."""
    def weight(name):
        return getattr(module, f"{name}_l{layer}{suffix}").detach().numpy()

    lstm = le.LSTM(module.hidden_size, activation=module.activation, recurrent_activation=module.recurrent_activation,
                   use_bias=module.bias, return_sequences=True, go_backwards=suffix == "_reverse",
                   time_major=not module.batch_first, dtype="float64", backend="numpy", **options)
    biases = [weight("bias_ih") + weight("bias_hh")] if module.bias else []
    return lstm.set_weights([weight("weight_ih").T, weight("weight_hh").T] + biases)


def lstmeng_model(module):
    """``module``'s stack as lstmeng layers: ``le.from_torch``'s layout (one LSTM or Bidirectional per layer),
    built by hand so that the reference does not depend on the conversion (tested on its own below)."""
    layers = []
    for layer in range(module.num_layers):
        if module.bidirectional:
            layers.append(le.Bidirectional(lstmeng_layer(module, layer, ""), merge_mode="concat",
                                           backward_layer=lstmeng_layer(module, layer, "_reverse")))
        else:
            layers.append(lstmeng_layer(module, layer, ""))
    return le.Sequential(layers)


def manual_cell(x, h, c, weight_ih, weight_hh, bias, activation="tanh", recurrent_activation="sigmoid",
                recurrent_dropout_mask=None):
    """One LSTM step in torch ops: x [B, I], h, c [B, H] -> (h, c); h times the [B, H] dropout mask where it
    enters the gates."""
    act, gate = TORCH_ACTIVATIONS[activation], TORCH_ACTIVATIONS[recurrent_activation]
    recurrent_input = h if recurrent_dropout_mask is None else h * recurrent_dropout_mask
    gates = x @ weight_ih.T + recurrent_input @ weight_hh.T
    if bias is not None:
        gates = gates + bias
    i, f, g, o = gates.chunk(4, dim=1)
    c = gate(f) * c + gate(i) * act(g)
    return gate(o) * act(c), c


def assert_close_all(actual: dict, expected: dict, tolerance):
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        value = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        torch.testing.assert_close(actual[name], value, **tolerance, msg=lambda m: f"{name}: {m}")  # noqa: B023 (called in this iteration)


def parameter_grads(module, suffix=""):
    """The gradients of ``module``'s parameters named ``<name><suffix>``, weights transposed to lstmeng's layout."""
    grads = {name: getattr(module, name + suffix).grad for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    return grads | {"weight_ih": grads["weight_ih"].T, "weight_hh": grads["weight_hh"].T}


def lstmeng_grads(grads, prefix=""):
    """lstmeng's kernel, recurrent_kernel and bias gradients under the names of ``parameter_grads``
    (the one bias gradient is both torch biases')."""
    return {"weight_ih": grads[prefix + "kernel"], "weight_hh": grads[prefix + "recurrent_kernel"],
            "bias_ih": grads[prefix + "bias"], "bias_hh": grads[prefix + "bias"]}


# -- activations -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cython", "numpy"])
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_stacked_bidirectional_activations_match_lstmeng_layers(pair, backend):
    """Two bidirectional layers: outputs, h_n, c_n, dx and every parameter gradient against the same
    stack of ``le.LSTM`` layers with the same activations and weights."""
    activation, recurrent_activation = pair
    torch.manual_seed(1)
    mine = lt.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True, batch_first=True, backend=backend,
                   activation=activation, recurrent_activation=recurrent_activation).double()
    x = randn(BATCH, STEPS, INPUT_SIZE, seed=2)
    dy = randn(BATCH, STEPS, 2 * HIDDEN_SIZE, seed=3)
    x_leaf = x.clone().requires_grad_(True)
    output, (h_n, c_n) = mine(x_leaf)
    (output * dy).sum().backward()

    model = lstmeng_model(mine)
    expected = model(x.numpy(), training=True)
    torch.testing.assert_close(output, torch.from_numpy(expected), **TOLERANCE)
    for layer, states in enumerate(model.states):      # [h_fw, c_fw, h_bw, c_bw] per layer
        for direction in range(2):
            assert_close_all({"h_n": h_n[2 * layer + direction], "c_n": c_n[2 * layer + direction]},
                             {"h_n": states[2 * direction], "c_n": states[2 * direction + 1]}, TOLERANCE)
    torch.testing.assert_close(x_leaf.grad, torch.from_numpy(model.backward(dy.numpy())), **GRAD_TOLERANCE)
    for layer, (direction, suffix) in itertools.product(range(2), (("forward", ""), ("backward", "_reverse"))):
        assert_close_all(parameter_grads(mine, f"_l{layer}{suffix}"),
                         lstmeng_grads(model.grads, f"{layer}.{direction}."), GRAD_TOLERANCE)


@pytest.mark.parametrize("pair", NON_DEFAULT_PAIRS, ids=pair_id)
def test_from_torch_keeps_the_activations(pair):
    """``le.from_torch`` of an lstmeng.torch.LSTM builds layers with its activations (it used to
    build tanh / sigmoid ones), so its output is the module's."""
    activation, recurrent_activation = pair
    torch.manual_seed(4)
    mine = lt.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True, batch_first=True, backend="numpy",
                   activation=activation, recurrent_activation=recurrent_activation).double()
    x = randn(BATCH, STEPS, INPUT_SIZE, seed=5)
    converted = le.from_torch(mine, backend="numpy")
    for layer in converted.layers:
        for direction in (layer.forward_layer, layer.backward_layer):
            assert (direction.activation, direction.recurrent_activation) == pair
    with torch.no_grad():
        output, _ = mine(x)
    torch.testing.assert_close(torch.from_numpy(converted(x.numpy())), output, **TOLERANCE)


@pytest.mark.parametrize("pair, backend", [(pair, "cython") for pair in NON_DEFAULT_PAIRS]
                         + [(("sigmoid", "hard_sigmoid"), "numba_cuda")],
                         ids=lambda case: pair_id(case) if isinstance(case, tuple) else case)
def test_activations_with_initial_states_match_lstmeng_lstm(pair, backend):
    """One time-major layer with hx and a loss on output, h_n and c_n: every gradient, h_0 and c_0 included,
    against ``le.LSTM``'s ``backward(dy, dh, dc)``. numba_cuda takes CPU tensors here (the CUDA simulator
    without a GPU)."""
    if backend not in {row.name for row in registry.list_backends() if row.available}:
        pytest.skip(f"{backend} unavailable")
    activation, recurrent_activation = pair
    torch.manual_seed(4)
    mine = lt.LSTM(INPUT_SIZE, HIDDEN_SIZE, backend=backend, activation=activation,
                   recurrent_activation=recurrent_activation).double()
    x = randn(STEPS, BATCH, INPUT_SIZE, seed=5)
    h0, c0, dh, dc = (randn(1, BATCH, HIDDEN_SIZE, seed=seed) for seed in (6, 7, 8, 9))
    dy = randn(STEPS, BATCH, HIDDEN_SIZE, seed=10)
    x_leaf, h0_leaf, c0_leaf = (tensor.clone().requires_grad_(True) for tensor in (x, h0, c0))
    output, (h_n, c_n) = mine(x_leaf, (h0_leaf, c0_leaf))
    ((output * dy).sum() + (h_n * dh).sum() + (c_n * dc).sum()).backward()

    reference = lstmeng_layer(mine, 0, "", return_state=True)
    expected, h, c = reference(x.numpy(), initial_state=[h0[0].numpy(), c0[0].numpy()], training=True)
    assert_close_all({"output": output, "h_n": h_n[0], "c_n": c_n[0]}, {"output": expected, "h_n": h, "c_n": c},
                     TOLERANCE)
    dx = reference.backward(dy.numpy(), dh[0].numpy(), dc[0].numpy())
    dh0, dc0 = reference.initial_state_grads
    assert_close_all({"x": x_leaf.grad, "h_0": h0_leaf.grad[0], "c_0": c0_leaf.grad[0]} | parameter_grads(mine, "_l0"),
                     {"x": dx, "h_0": dh0, "c_0": dc0} | lstmeng_grads(reference.grads), GRAD_TOLERANCE)


@pytest.mark.parametrize("pair", NON_DEFAULT_PAIRS, ids=pair_id)
def test_cell_activations_match_a_step_in_torch_ops(pair):
    """LSTMCell with other activations: h, c and every gradient against a step written in torch ops."""
    activation, recurrent_activation = pair
    torch.manual_seed(11)
    mine = lt.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, backend="cython", activation=activation,
                       recurrent_activation=recurrent_activation).double()
    weights = {name: p.detach().clone().requires_grad_(True) for name, p in mine.named_parameters()}
    x, h0, c0, dh, dc = randn(BATCH, INPUT_SIZE, seed=12), *(randn(BATCH, HIDDEN_SIZE, seed=s) for s in range(13, 17))
    results = []
    for run in ("mine", "manual"):
        leaves = [tensor.clone().requires_grad_(True) for tensor in (x, h0, c0)]
        if run == "mine":
            h, c = mine(leaves[0], (leaves[1], leaves[2]))
        else:
            h, c = manual_cell(*leaves, weights["weight_ih"], weights["weight_hh"],
                               weights["bias_ih"] + weights["bias_hh"], activation, recurrent_activation)
        ((h * dh).sum() + (c * dc).sum()).backward()
        parameters = mine.named_parameters() if run == "mine" else weights.items()
        results.append({"h": h, "c": c, "dx": leaves[0].grad, "dh0": leaves[1].grad, "dc0": leaves[2].grad}
                       | {name: parameter.grad for name, parameter in parameters})
    assert_close_all(*results, GRAD_TOLERANCE)


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_gradcheck_float64_with_other_activations(backend, monkeypatch):
    """Finite differences through relu and hard_sigmoid: input, states and every parameter of a
    bidirectional LSTM (hx given: a zero cell state would sit on relu's kink)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")   # hundreds of tiny calls (see test_torch_module's gradcheck)
    torch.manual_seed(0)
    module = lt.LSTM(2, 3, bidirectional=True, backend=backend, activation="relu",
                     recurrent_activation="hard_sigmoid").double()
    names = [name for name, _ in module.named_parameters()]

    def function(x, h0, c0, *parameters):
        output, (h_n, c_n) = torch.func.functional_call(module, dict(zip(names, parameters)), (x, (h0, c0)))
        return output, h_n, c_n

    x = randn(3, 2, 2, seed=1).requires_grad_(True)
    h0, c0 = (randn(2, 2, 3, seed=seed).requires_grad_(True) for seed in (2, 3))
    parameters = [parameter.detach().clone().requires_grad_(True) for parameter in module.parameters()]
    assert torch.autograd.gradcheck(function, (x, h0, c0, *parameters), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_float64_cell_with_mask_and_other_activations(monkeypatch):
    """Finite differences through a masked LSTMCell step with linear and hard_sigmoid (one row masked)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.manual_seed(0)
    cell = lt.LSTMCell(2, 3, backend="cython", activation="linear", recurrent_activation="hard_sigmoid").double()
    names = [name for name, _ in cell.named_parameters()]
    mask = torch.tensor([True, False, True])

    def function(x, h0, c0, *parameters):
        return torch.func.functional_call(cell, dict(zip(names, parameters)), (x, (h0, c0)), {"mask": mask})

    x = randn(3, 2, seed=1).requires_grad_(True)
    h0, c0 = (randn(3, 3, seed=seed).requires_grad_(True) for seed in (2, 3))
    parameters = [parameter.detach().clone().requires_grad_(True) for parameter in cell.parameters()]
    assert torch.autograd.gradcheck(function, (x, h0, c0, *parameters), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("module_class", [lt.LSTM, lt.LSTMCell])
def test_bad_activation_names_are_refused_at_construction(module_class):
    cases = [("activation", "gelu", r"activation must be one of \['tanh', 'relu', 'sigmoid', 'linear'\], "
                                    r"got 'gelu'"),
             ("activation", "hard_sigmoid", r"activation must be one of .*, got 'hard_sigmoid'"),  # gates only
             ("activation", torch.tanh, r"activation must be one of .*, got <built-in method tanh"),
             ("recurrent_activation", "tanh", r"recurrent_activation must be one of \['sigmoid', 'hard_sigmoid'\], "
                                              r"got 'tanh'"),
             ("recurrent_activation", None, r"recurrent_activation must be one of .*, got None")]
    for argument, value, message in cases:
        with pytest.raises(ValueError, match=f"^{message}"):
            module_class(INPUT_SIZE, HIDDEN_SIZE, **{argument: value})


def test_a_backend_that_cannot_run_the_activations_says_why(monkeypatch):
    """A named backend is asked at construction (ValueError with its reason); "auto" passes over it per call;
    a backend named later (``module.backend = ...``) is asked at the call, before anything runs."""
    numpy_backend = registry.get_backend_object("numpy")

    def check_support(dtype, activation, recurrent_activation):
        if activation != "tanh":
            raise NotImplementedError(f"backend 'numpy' has no activation {activation!r} (test)")

    monkeypatch.setattr(numpy_backend, "check_support", check_support)
    for module_class in (lt.LSTM, lt.LSTMCell):
        with pytest.raises(ValueError, match=r"^backend 'numpy' cannot run this layer: backend 'numpy' has no "
                                             r"activation 'relu' \(test\)"):
            module_class(INPUT_SIZE, HIDDEN_SIZE, backend="numpy", activation="relu")
        module_class(INPUT_SIZE, HIDDEN_SIZE, backend="numpy")                 # tanh: accepted
    mine = lt.LSTM(INPUT_SIZE, HIDDEN_SIZE, activation="relu", backend="cython")
    x = torch.randn(2, 1, INPUT_SIZE)
    expected = mine(x)[0]
    mine.backend = "numpy"
    with pytest.raises(ValueError, match="backend 'numpy' cannot run this layer: .*'relu'"):
        mine(x)
    mine.backend = "auto"
    with le.use_backend("numpy"):                   # the default in force names numpy: asked, refuses
        with pytest.raises(ValueError, match="backend 'numpy' cannot run this layer"):
            mine(x)
    torch.testing.assert_close(mine(x)[0], expected)   # auto, nothing in force: cython, which can


def test_activations_round_trip_and_state_dicts_load_both_ways():
    """The activations show in repr and survive pickling and deepcopy; they are no parameters, so state
    dicts load strictly between torch.nn.LSTM and an LSTM with other activations, both ways."""
    torch.manual_seed(0)
    mine = lt.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, backend="numpy", activation="relu",
                   recurrent_activation="hard_sigmoid", recurrent_dropout=0.25)
    assert repr(mine) == ("LSTM(3, 4, num_layers=2, activation='relu', recurrent_activation='hard_sigmoid', "
                          "recurrent_dropout=0.25, backend='numpy')")
    cell = lt.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, backend="numpy", activation="sigmoid")
    assert repr(cell) == "LSTMCell(3, 4, activation='sigmoid', backend='numpy')"
    assert repr(lt.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, backend="numpy")) == "LSTMCell(3, 4, backend='numpy')"

    reference = torch.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2).double()
    mine.double()
    assert list(mine.state_dict()) == list(reference.state_dict())
    mine.load_state_dict(reference.state_dict())               # torch -> lstmeng (strict)
    reference.load_state_dict(mine.state_dict())               # and back
    mine.eval()
    x = randn(4, 2, INPUT_SIZE, seed=1)
    output = mine(x)[0]
    expected = lstmeng_model(mine)(x.numpy())                  # the state dict's weights, mine's activations
    torch.testing.assert_close(output, torch.from_numpy(expected), **TOLERANCE)
    assert not torch.allclose(output, reference(x)[0], atol=1e-3)   # other activations: other numbers

    buffer = io.BytesIO()
    torch.save(mine, buffer)
    buffer.seek(0)
    for restored in (torch.load(buffer, weights_only=False), copy.deepcopy(mine)):
        assert (restored.activation, restored.recurrent_activation, restored.recurrent_dropout) == (
            "relu", "hard_sigmoid", 0.25)
        torch.testing.assert_close(restored(x)[0], output)
    restored_cell = pickle.loads(pickle.dumps(cell))
    assert repr(restored_cell) == repr(cell)


def test_a_module_pickled_before_the_options_existed_loads_with_them_off():
    torch.manual_seed(0)
    reference = torch.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE)
    # LSTM had recurrent_dropout before the activations; LSTMCell had none of the three.
    for mine, attributes in ((lt.LSTM(INPUT_SIZE, HIDDEN_SIZE, backend="numpy"),
                              ("activation", "recurrent_activation")),
                             (lt.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, backend="numpy"),
                              ("activation", "recurrent_activation", "recurrent_dropout"))):
        for name in attributes:
            del mine.__dict__[name]                  # what an older lstmeng.torch left in the pickle
        restored = pickle.loads(pickle.dumps(mine))
        assert (restored.activation, restored.recurrent_activation, restored.recurrent_dropout) == (
            "tanh", "sigmoid", 0.0)
    restored.load_state_dict(reference.state_dict())
    x = torch.randn(2, INPUT_SIZE)
    torch.testing.assert_close(restored(x)[0], reference(x)[0], rtol=1e-5, atol=1e-6)


# -- LSTMCell: recurrent dropout ----------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_cell_recurrent_dropout_matches_a_step_with_the_same_mask(backend):
    """Training mode: the mask the cell draws, redrawn from the same seed, in a step written in torch ops
    (h, c and every gradient); a new mask at each call. eval(): torch.nn.LSTMCell's numbers."""
    rate = 0.5
    torch.manual_seed(0)
    mine = lt.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, backend=backend, recurrent_dropout=rate).double()
    weights = {name: p.detach().clone().requires_grad_(True) for name, p in mine.named_parameters()}
    x, h0, c0, dh, dc = randn(BATCH, INPUT_SIZE, seed=1), *(randn(BATCH, HIDDEN_SIZE, seed=s) for s in range(2, 6))

    torch.manual_seed(7)
    leaves = [tensor.clone().requires_grad_(True) for tensor in (x, h0, c0)]
    h, c = mine(leaves[0], (leaves[1], leaves[2]))
    ((h * dh).sum() + (c * dc).sum()).backward()
    second_h = mine(x, (h0, c0))[0]                       # a second call draws a second mask

    torch.manual_seed(7)                                   # the one draw of the first call: [B, H]
    keep = 1 - rate
    dropout_mask = torch.empty(BATCH, HIDDEN_SIZE, dtype=torch.float64).bernoulli_(keep).div_(keep)
    assert 0 < int((dropout_mask == 0).sum()) < dropout_mask.numel()
    manual_leaves = [tensor.clone().requires_grad_(True) for tensor in (x, h0, c0)]
    expected_h, expected_c = manual_cell(*manual_leaves, weights["weight_ih"], weights["weight_hh"],
                                         weights["bias_ih"] + weights["bias_hh"], recurrent_dropout_mask=dropout_mask)
    ((expected_h * dh).sum() + (expected_c * dc).sum()).backward()
    assert_close_all({"h": h, "c": c, "dx": leaves[0].grad, "dh0": leaves[1].grad, "dc0": leaves[2].grad}
                     | {name: p.grad for name, p in mine.named_parameters()},
                     {"h": expected_h, "c": expected_c, "dx": manual_leaves[0].grad, "dh0": manual_leaves[1].grad,
                      "dc0": manual_leaves[2].grad} | {name: w.grad for name, w in weights.items()}, GRAD_TOLERANCE)
    second_mask = torch.empty(BATCH, HIDDEN_SIZE, dtype=torch.float64).bernoulli_(keep).div_(keep)
    assert not torch.equal(second_mask, dropout_mask)
    expected_second = manual_cell(x, h0, c0, weights["weight_ih"], weights["weight_hh"],
                                  weights["bias_ih"] + weights["bias_hh"], recurrent_dropout_mask=second_mask)[0]
    torch.testing.assert_close(second_h, expected_second, **TOLERANCE)

    mine.eval()
    reference = torch.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE).double()
    reference.load_state_dict(mine.state_dict())
    state = torch.random.get_rng_state()
    torch.testing.assert_close(mine(x, (h0, c0))[0], reference(x, (h0, c0))[0], **TOLERANCE)
    assert torch.equal(torch.random.get_rng_state(), state)   # eval draws nothing


def test_cell_recurrent_dropout_is_validated():
    for rate in (-0.1, 1.0, "0.5"):
        with pytest.raises(ValueError, match=r"^recurrent_dropout must be a number in \[0, 1\), got"):
            lt.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, recurrent_dropout=rate)


# -- LSTMCell: mask ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_cell_mask_keeps_the_state_of_masked_rows(backend):
    """Masked rows return hx as it was and pass the gradients of h_1, c_1 to h_0, c_0 unchanged (their input
    gets zeros, the weights nothing from them); the other rows are torch.nn.LSTMCell's on those rows alone."""
    torch.manual_seed(3)
    reference = torch.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE).double()
    mine = lt.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, backend=backend).double()
    mine.load_state_dict(reference.state_dict())
    mask = torch.tensor([True, False, True, False])
    x, h0, c0, dh, dc = randn(4, INPUT_SIZE, seed=1), *(randn(4, HIDDEN_SIZE, seed=s) for s in range(2, 6))

    leaves = [tensor.clone().requires_grad_(True) for tensor in (x, h0, c0)]
    h, c = mine(leaves[0], (leaves[1], leaves[2]), mask=mask)
    ((h * dh).sum() + (c * dc).sum()).backward()
    real = [tensor[mask].clone().requires_grad_(True) for tensor in (x, h0, c0)]
    expected_h, expected_c = reference(real[0], (real[1], real[2]))
    ((expected_h * dh[mask]).sum() + (expected_c * dc[mask]).sum()).backward()

    assert torch.equal(h[~mask], h0[~mask]) and torch.equal(c[~mask], c0[~mask])
    assert torch.equal(leaves[0].grad[~mask], torch.zeros(2, INPUT_SIZE, dtype=torch.float64))
    assert torch.equal(leaves[1].grad[~mask], dh[~mask]) and torch.equal(leaves[2].grad[~mask], dc[~mask])
    assert_close_all({"h": h[mask], "c": c[mask], "dx": leaves[0].grad[mask], "dh0": leaves[1].grad[mask],
                      "dc0": leaves[2].grad[mask]} | {name: p.grad for name, p in mine.named_parameters()},
                     {"h": expected_h, "c": expected_c, "dx": real[0].grad, "dh0": real[1].grad, "dc0": real[2].grad}
                     | {name: p.grad for name, p in reference.named_parameters()}, GRAD_TOLERANCE)

    # All rows real: the unmasked call; no row real: hx back, in memory of its own.
    torch.testing.assert_close(mine(x, (h0, c0), mask=torch.ones(4, dtype=torch.bool))[0], reference(x, (h0, c0))[0],
                               **TOLERANCE)
    h_none, c_none = mine(x, (h0, c0), mask=np.zeros(4, dtype=bool))
    assert torch.equal(h_none, h0) and torch.equal(c_none, c0)
    h_none.add_(1.0)
    assert not torch.equal(h_none, h0)
    # Unbatched input takes a 0-d mask (the input's shape without its feature axis).
    assert torch.equal(mine(x[1], (h0[1], c0[1]), mask=torch.tensor(False))[1], c0[1])
    torch.testing.assert_close(mine(x[1], (h0[1], c0[1]), mask=True)[0], reference(x[1], (h0[1], c0[1]))[0],
                               **TOLERANCE)


def test_cell_mask_with_recurrent_dropout_and_without_hx():
    """Options combine: hx=None masked rows stay zero; real rows see the dropout mask."""
    torch.manual_seed(0)
    mine = lt.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, backend="cython", recurrent_dropout=0.5,
                       activation="relu").double()
    x, h0, c0 = randn(3, INPUT_SIZE, seed=1), randn(3, HIDDEN_SIZE, seed=2), randn(3, HIDDEN_SIZE, seed=3)
    h, c = mine(x, mask=torch.tensor([False, True, False]))
    zeros = torch.zeros(2, HIDDEN_SIZE, dtype=torch.float64)
    assert torch.equal(h[[0, 2]], zeros) and torch.equal(c[[0, 2]], zeros)
    torch.manual_seed(5)
    h, c = mine(x, (h0, c0), mask=torch.tensor([False, True, True]))
    torch.manual_seed(5)
    dropout_mask = torch.empty(3, HIDDEN_SIZE, dtype=torch.float64).bernoulli_(0.5).div_(0.5)
    weights = dict(mine.named_parameters())
    expected_h, _ = manual_cell(x, h0, c0, weights["weight_ih"], weights["weight_hh"],
                                weights["bias_ih"] + weights["bias_hh"], "relu", recurrent_dropout_mask=dropout_mask)
    torch.testing.assert_close(h[1:], expected_h[1:], **TOLERANCE)
    assert torch.equal(h[0], h0[0])


def test_cell_mask_errors():
    cell = lt.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, backend="cython")
    x = torch.randn(2, INPUT_SIZE)
    with pytest.raises(ValueError, match=r"mask must have the input's shape without its feature axis, \(2,\), "
                                         r"got \(2, 1\)"):
        cell(x, mask=torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must have the input's shape without its feature axis, \(\), "):
        cell(x[0], mask=torch.ones(1, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        cell(x, mask=torch.ones(2))
    # PyTorch's own errors come first, as without a mask.
    with pytest.raises(RuntimeError, match="input has inconsistent input_size"):
        cell(torch.randn(2, 5), mask=torch.ones(3))
