"""lstmeng.torch.LSTMCell loops in training: the weight gradients of a loop's steps are added up
by one node at its end (``_CellUnroll``). Every gradient against torch.nn.LSTMCell run the same
way (an independent implementation), and against finite differences (gradcheck)."""

from __future__ import annotations

import copy
import io

import pytest

from _backends import spy_step_functions

torch = pytest.importorskip("torch")

import lstmeng.torch as lt  # noqa: E402
from lstmeng.testing import kernel_overrides  # noqa: E402

cython_module = pytest.importorskip("lstmeng.backends.cython")

INPUT_SIZE, HIDDEN_SIZE, STEPS = 5, 6, 4

pytestmark = pytest.mark.skipif(lt._graph_task_id is None, reason="this torch has no graph task id")


def _pair(bias: bool = True, backend: str = "cython", dtype=torch.float64, sizes=(INPUT_SIZE, HIDDEN_SIZE)):
    """(torch.nn.LSTMCell, lstmeng.torch.LSTMCell) with the same parameters."""
    torch.manual_seed(11)
    reference = torch.nn.LSTMCell(*sizes, bias=bias, dtype=dtype)
    mine = lt.LSTMCell(*sizes, bias=bias, backend=backend, dtype=dtype)
    mine.load_state_dict(reference.state_dict())
    return reference, mine


def _loop(module, x, hx, steps=STEPS):
    """h, c after ``steps`` steps of module over x [T, B, I] from hx."""
    h, c = hx
    for t in range(steps):
        h, c = module(x[t], (h, c))
    return h, c


def _leaves(batch: int, dtype, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS, batch, INPUT_SIZE, generator=generator, dtype=dtype)
    h0 = torch.randn(batch, HIDDEN_SIZE, generator=generator, dtype=dtype)
    c0 = torch.randn(batch, HIDDEN_SIZE, generator=generator, dtype=dtype)
    dh = torch.randn(batch, HIDDEN_SIZE, generator=generator, dtype=dtype)
    dc = torch.randn(batch, HIDDEN_SIZE, generator=generator, dtype=dtype)
    return x, h0, c0, dh, dc


def _loop_gradients(module, x, h0, c0, dh, dc):
    """(h, c, dx, dh0, dc0, every parameter's .grad) of one loop and backward."""
    module.zero_grad(set_to_none=True)
    x, h0, c0 = (tensor.clone().requires_grad_(True) for tensor in (x, h0, c0))
    h, c = _loop(module, x, (h0, c0))
    ((h * dh).sum() + (c * dc).sum()).backward()
    return [h, c, x.grad, h0.grad, c0.grad] + [parameter.grad for parameter in module.parameters()]


def _online_gradients(module, x, h0, c0, dh, dc):
    """Online learning (a backward per step, the states detached before the next) over x [T, B, I]
    from h0, c0: after each step its h, c and a copy of every parameter's .grad."""
    module.zero_grad(set_to_none=True)
    h, c, results = h0, c0, []
    for t in range(STEPS):
        h, c = module(x[t], (h.detach(), c.detach()))
        ((h * dh).sum() + (c * dc).sum()).backward()
        results += [h, c] + [parameter.grad.clone() for parameter in module.parameters()]
    return results


def _assert_matches_torch(run, reference, mine, rtol=1e-10, atol=1e-12):
    """``run(module)`` -> a list of tensors, run on torch.nn.LSTMCell and then on the lstmeng module:
    each of the lstmeng module's equals torch's."""
    want = run(reference)
    got = run(mine)
    assert len(got) == len(want)
    for index, (actual, expected) in enumerate(zip(got, want)):
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=f"result {index}")


def _count_unrolls(monkeypatch) -> list:
    """A list that receives every _CellUnroll made from now on."""
    made = []
    original_init = lt._CellUnroll.__init__

    def init(self, *args):
        made.append(self)
        original_init(self, *args)

    monkeypatch.setattr(lt._CellUnroll, "__init__", init)
    return made


class _GatesSpy:
    """Counts the one-step backwards that gave dz (the deferred weight gradients ran)."""

    def __init__(self, monkeypatch):
        self.with_gates = self.without = 0
        self.teams = []   # (parts, units split) of each backward's workspace
        self.preferred = []   # each call's prefer_gates
        self.state_grads = []   # each call's state_grads
        original = cython_module.CythonBackend.sequence_backward_gates

        def spy(backend, *args, **kwargs):
            workspace = args[3]
            self.teams.append((len(workspace.layout.row_begin) - 1, workspace.split_units))
            self.preferred.append(kwargs.get("prefer_gates", False))
            self.state_grads.append(kwargs.get("state_grads", True))
            grads = original(backend, *args, **kwargs)
            if grads.dgates is None:
                self.without += 1
            else:
                self.with_gates += 1
            return grads

        monkeypatch.setattr(cython_module.CythonBackend, "sequence_backward_gates", spy)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_loop_gives_torch_gradients_through_one_weight_node(bias, batch, monkeypatch):
    spy = _GatesSpy(monkeypatch)
    made = _count_unrolls(monkeypatch)
    reference, mine = _pair(bias)
    leaves = _leaves(batch, torch.float64)
    _assert_matches_torch(lambda module: _loop_gradients(module, *leaves), reference, mine)
    # The first step alone, one unroll for the others; every step gave dz.
    assert len(made) == 1 and spy.with_gates == STEPS and spy.without == 0
    assert made[0].deferred == [] and made[0].given == {}


@pytest.mark.parametrize("backend", ["numpy", "cython-forced-general", "cython-parts-of-rows"])
def test_steps_whose_backend_gives_weight_gradients_stay_alone(backend, monkeypatch):
    """The numpy backend gives no dz (the contract's default), nor does the cython backend's general
    path where the one-step path is switched off (``cython_one_step=False``) or where the batch
    runs in parts of rows (34 rows on two threads): such steps make no unroll, autograd adds up
    their weight gradients."""
    spy = _GatesSpy(monkeypatch)
    made = _count_unrolls(monkeypatch)
    reference, mine = _pair(backend="numpy" if backend == "numpy" else "cython")
    batch = 4
    if backend == "cython-parts-of-rows":
        monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)   # every training step threads
        monkeypatch.setattr(cython_module, "_kernel_threads", lambda: 2)
        batch = 34
    leaves = _leaves(batch, torch.float64)
    with kernel_overrides(cython_one_step=False if backend == "cython-forced-general" else None):
        _assert_matches_torch(lambda module: _loop_gradients(module, *leaves), reference, mine)
    assert made == []
    if backend != "numpy":
        assert spy.without == STEPS and spy.with_gates == 0 and not any(spy.preferred)
        assert set(spy.teams) == {(2, False) if backend == "cython-parts-of-rows" else (1, False)}


@pytest.mark.parametrize("most_rows", [34, 33])
def test_a_lone_step_of_parts_of_rows_asks_for_dz(most_rows, monkeypatch):
    """Online learning at a batch the backend gives weight gradients for (34 rows in two parts of
    rows): each step is its backward pass's only one, asks for dz (``prefer_gates``) when it has
    at most LONE_STEP_GATES_MAX_ROWS rows and forms its weight gradients from it; with fewer
    allowed rows it takes the backend's. Steps of one loop ask for none
    (``test_steps_whose_backend_gives_weight_gradients_stay_alone``); a step that gives its
    states to another is linked too. Gradients and states equal torch.nn.LSTMCell's run the
    same way."""
    spy = _GatesSpy(monkeypatch)
    made = _count_unrolls(monkeypatch)
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)   # every training step threads
    monkeypatch.setattr(cython_module, "_kernel_threads", lambda: 2)
    monkeypatch.setattr(lt, "LONE_STEP_GATES_MAX_ROWS", most_rows)
    reference, mine = _pair()
    leaves = _leaves(34, torch.float64)
    x, h0, c0 = leaves[:3]
    _assert_matches_torch(lambda module: _online_gradients(module, *leaves), reference, mine)
    lone = most_rows == 34
    assert made == [] and spy.preferred == [lone] * STEPS and set(spy.teams) == {(2, False)}
    assert (spy.with_gates, spy.without) == ((STEPS, 0) if lone else (0, STEPS))

    # A step whose states the next step takes is linked, though its backward pass runs first.
    spy.preferred.clear()
    h, c = mine(x[0], (h0, c0))
    mine(x[1], (h, c))
    h.sum().backward()
    assert spy.preferred == [False]


@pytest.mark.parametrize("batch", [1, 34])
def test_steps_on_states_that_need_no_gradient_ask_for_none(batch, monkeypatch):
    """A step whose h0 and c0 take no gradient (online learning's detached states) asks the backend
    for no state gradients (``state_grads=False``: no product of dz with the recurrent kernel);
    one whose h0 or c0 does (a leaf that requires it, or the states of a loop's earlier step)
    asks for them and gets torch's. At batch 1 (the one-step kernel) and 34 rows in two parts."""
    spy = _GatesSpy(monkeypatch)
    if batch == 34:
        monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)   # every training step threads
        monkeypatch.setattr(cython_module, "_kernel_threads", lambda: 2)
    reference, mine = _pair()
    leaves = _leaves(batch, torch.float64)
    x, h0, c0, dh, dc = leaves
    _assert_matches_torch(lambda module: _online_gradients(module, *leaves), reference, mine)
    assert spy.state_grads == [False] * STEPS

    for wanted in ("h0", "c0", "both"):
        def one_step(module, wanted=wanted):
            module.zero_grad(set_to_none=True)
            leaves = [state.clone().requires_grad_(wanted in (name, "both"))
                      for name, state in (("h0", h0), ("c0", c0))]
            h, c = module(x[0], tuple(leaves))
            ((h * dh).sum() + (c * dc).sum()).backward()
            return [leaf.grad for leaf in leaves if leaf.requires_grad] + [p.grad for p in module.parameters()]

        spy.state_grads.clear()
        _assert_matches_torch(one_step, reference, mine)
        assert spy.state_grads == [True], wanted

    spy.state_grads.clear()
    _assert_matches_torch(lambda module: _loop_gradients(module, x, h0, c0, dh, dc), reference, mine)
    assert spy.state_grads == [True] * STEPS


def test_the_general_paths_unit_split_steps_give_dz_and_join_the_unroll(monkeypatch):
    """Cell steps of a small batch past the one-step kernel's FLOPs (threaded: forced here at every
    size; in production from 2^25 FLOPs, (I, H) = (256, 512) from 11 rows) run the cython
    backend's general path with the units split between the threads, whose backward then skips
    its weight-gradient products and gives dz: the chain's steps join one unroll, whose node
    forms the weight gradients, equal to torch.nn.LSTMCell's."""
    spy = _GatesSpy(monkeypatch)
    made = _count_unrolls(monkeypatch)
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)   # every training step threads
    monkeypatch.setattr(cython_module, "_kernel_threads", lambda: 2)
    reference, mine = _pair(sizes=(INPUT_SIZE, 64))
    generator = torch.Generator().manual_seed(9)
    leaves = [torch.randn(STEPS, 1, INPUT_SIZE, generator=generator, dtype=torch.float64)] + [
        torch.randn(1, 64, generator=generator, dtype=torch.float64) for _ in range(4)]
    with kernel_overrides(cython_split_units=True):
        _assert_matches_torch(lambda module: _loop_gradients(module, *leaves), reference, mine)
    assert len(made) == 1 and spy.with_gates == STEPS and spy.without == 0
    assert set(spy.teams) == {(1, True)}


def test_an_unroll_adds_the_weight_gradients_of_steps_that_gave_no_dz(monkeypatch):
    """A chain's steps that give weight gradients at their backward after all (here: the one-step
    kernel switched off between the forward and the backward) are added up by the unroll too."""
    spy = _GatesSpy(monkeypatch)
    made = _count_unrolls(monkeypatch)
    reference, mine = _pair()
    x, h0, c0, dh, dc = _leaves(2, torch.float64)

    def run(module):
        module.zero_grad(set_to_none=True)
        h, c = _loop(module, x, (h0, c0))
        with kernel_overrides(cython_one_step=False):
            ((h * dh).sum() + (c * dc).sum()).backward()
        return [parameter.grad for parameter in module.parameters()]

    _assert_matches_torch(run, reference, mine)
    assert len(made) == 1 and spy.without == STEPS and spy.with_gates == 0


def test_float32_loop_at_batch_one_matches_torch():
    reference, mine = _pair(dtype=torch.float32, sizes=(INPUT_SIZE, 32))
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(STEPS, 1, INPUT_SIZE, generator=generator)
    zeros = torch.zeros(1, 32)

    def run(module):
        module.zero_grad(set_to_none=True)
        h, c = _loop(module, x, (zeros, zeros))
        h.sum().backward()
        return [h] + [parameter.grad for parameter in module.parameters()]

    _assert_matches_torch(run, reference, mine, rtol=1e-5, atol=1e-6)


def test_truncated_backpropagation_with_optimizer_steps_matches_torch():
    """Chunks of steps, a backward and an SGD step each, the states detached between them: a new
    unroll per chunk, and the parameters' in-place updates are no error."""
    reference, mine = _pair()
    x, h0, c0, _, _ = _leaves(2, torch.float64)

    def run(module):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        h, c = h0, c0
        for _ in range(3):
            optimizer.zero_grad()
            h, c = _loop(module, x, (h.detach(), c.detach()))
            (h.sum() + c.pow(2).sum()).backward()
            optimizer.step()
        return [h.detach()] + [parameter.detach().clone() for parameter in module.parameters()]

    _assert_matches_torch(run, reference, mine)


def test_a_pass_that_skips_the_weights_leaves_nothing_for_the_next_one():
    """torch.autograd.grad of the states only runs the steps, not the weight node: their records
    must not count in a later backward through the same graph."""
    reference, mine = _pair()
    x, h0, c0, dh, _ = _leaves(2, torch.float64)

    def run(module):
        module.zero_grad(set_to_none=True)
        h0_leaf = h0.clone().requires_grad_(True)
        h, _ = _loop(module, x, (h0_leaf, c0))
        loss = (h * dh).sum()
        (dh0,) = torch.autograd.grad(loss, h0_leaf, retain_graph=True)
        (dweight_hh,) = torch.autograd.grad(loss, module.weight_hh, retain_graph=True)
        loss.backward()
        return [dh0, dweight_hh] + [parameter.grad for parameter in module.parameters()]

    _assert_matches_torch(run, reference, mine)


def test_retain_graph_passes_each_count_once():
    reference, mine = _pair()
    x, h0, c0, dh, dc = _leaves(1, torch.float64)

    def run(module):
        module.zero_grad(set_to_none=True)
        h, c = _loop(module, x, (h0, c0))
        loss = (h * dh).sum() + (c * dc).sum()
        loss.backward(retain_graph=True)
        loss.backward()          # .grad doubles
        return [parameter.grad for parameter in module.parameters()]

    _assert_matches_torch(run, reference, mine)


def test_interleaved_and_branching_loops_on_one_module_match_torch():
    """Two sequences stepped alternately (two unrolls at once), and a state that feeds two steps."""
    reference, mine = _pair()
    x, h0, c0, dh, _ = _leaves(2, torch.float64)

    def run(module):
        module.zero_grad(set_to_none=True)
        first, second = (h0, c0), (c0, h0)
        for t in range(STEPS):
            first = module(x[t], first)
            second = module(x[STEPS - 1 - t], second)
        branch_a = module(x[0], first)
        branch_b = module(x[1], first)
        loss = (first[0] * dh).sum() + second[1].sum() + branch_a[0].sum() + (branch_b[1] * dh).sum()
        loss.backward()
        return [parameter.grad for parameter in module.parameters()]

    _assert_matches_torch(run, reference, mine)


def test_frozen_parameters_take_the_general_path(monkeypatch):
    made = _count_unrolls(monkeypatch)
    reference, mine = _pair()
    for module in (reference, mine):
        module.weight_ih.requires_grad_(False)
    leaves = _leaves(2, torch.float64)
    _assert_matches_torch(lambda module: _loop_gradients(module, *leaves), reference, mine)
    assert made == []


def test_an_in_place_change_before_the_backward_is_torch_error():
    for module in _pair():
        x, h0, c0, _, _ = _leaves(1, torch.float64)
        h, _ = _loop(module, x, (h0, c0))
        with torch.no_grad():
            module.weight_hh.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            h.sum().backward()


def test_a_weight_change_between_steps_is_torch_error_at_the_backward():
    """An optimizer-like in-place change of a weight in the middle of a loop, before its backward:
    both raise there (the earlier steps' backward reads the old weight)."""
    x, h0, c0, _, _ = _leaves(1, torch.float64)
    for module in _pair():
        h, c = _loop(module, x, (h0, c0), steps=3)
        with torch.no_grad():
            module.weight_hh.add_(0.5)
        h, c = _loop(module, x, (h, c), steps=2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            h.sum().backward()


def test_a_chain_starts_its_unroll_at_its_second_step(monkeypatch):
    """One step per backward pass (online learning, states detached) makes no unroll; a chain of
    two makes one, and a detached state starts a new chain."""
    made = _count_unrolls(monkeypatch)
    reference, mine = _pair()
    x, h0, c0, _, _ = _leaves(1, torch.float64)

    def run(module):
        module.zero_grad(set_to_none=True)
        h, c = h0, c0
        for t in range(STEPS):
            h, c = module(x[t], (h.detach(), c.detach()))
            (h.sum() + c.sum()).backward()
        return [h] + [parameter.grad for parameter in module.parameters()]

    _assert_matches_torch(run, reference, mine)
    assert made == []
    h, c = _loop(mine, x, (h0, c0), steps=2)
    assert len(made) == 1
    _loop(mine, x, (h.detach(), c), steps=1)
    assert len(made) == 1


def test_gradcheck_of_a_loop():
    _, mine = _pair(sizes=(3, 4))
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    parameters = tuple(mine.parameters())

    def loop(x, h0, c0, *weights):
        # The parameters as gradcheck's inputs: they are the module's own tensors.
        h, c = h0, c0
        for t in range(3):
            h, c = mine(x[t], (h, c))
        return h, c

    assert torch.autograd.gradcheck(loop, (x, h0, c0, *parameters), eps=1e-6, atol=1e-6)


def test_the_module_still_copies_and_saves_after_training_loops():
    _, mine = _pair()
    x, h0, c0, _, _ = _leaves(1, torch.float64)
    h, c = _loop(mine, x, (h0, c0))
    copied = copy.deepcopy(mine)
    buffer = io.BytesIO()
    torch.save(mine, buffer)
    h.sum().backward()
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for module in (copied, loaded):
        torch.testing.assert_close(_loop(module, x, (h0, c0))[0], h)


def test_training_steps_run_one_training_step_function_per_weight_storage(monkeypatch):
    """Training steps on the cython backend call its cell_training_step function, made once for the
    module's weights and kept while their storage stays: an optimizer step (in place) keeps it, a
    new storage (``.data = ...``) or dtype (``double()``) gets a new one. After each change an
    online step (a backward per step, batch 1) gives torch.nn.LSTMCell's gradients."""
    made, calls = spy_step_functions(monkeypatch, cython_module.CythonBackend, "cell_training_step")
    reference, mine = _pair(dtype=torch.float32)
    x, h0, c0, dh, dc = _leaves(1, torch.float32)
    optimizers = [torch.optim.SGD(module.parameters(), lr=0.5) for module in (reference, mine)]

    def online_step(module):
        module.zero_grad(set_to_none=True)
        h, c = module(x[0], (h0, c0))
        ((h * dh).sum() + (c * dc).sum()).backward()
        return [h, c] + [parameter.grad for parameter in module.parameters()]

    def check():
        _assert_matches_torch(online_step, reference, mine, rtol=1e-5, atol=1e-6)

    check()
    assert len(made) == 1 and calls == [(1, INPUT_SIZE)]
    for optimizer in optimizers:
        optimizer.step()
    check()
    assert len(made) == 1 and len(calls) == 2
    new_weight = torch.randn_like(mine.weight_ih)
    for module in (reference, mine):
        module.weight_ih.data = new_weight.clone()
    check()
    assert len(made) == 2 and len(calls) == 3
    reference.double()
    mine.double()
    x, h0, c0, dh, dc = (tensor.double() for tensor in (x, h0, c0, dh, dc))
    check()
    assert len(made) == 3 and len(calls) == 4


def _backend_products_spy(monkeypatch) -> list:
    """A list that receives the row count of every ``CythonBackend.gates_weight_gradients`` call
    that formed the products (not None)."""
    formed = []
    original = cython_module.CythonBackend.gates_weight_gradients

    def spy(backend, dgates, inputs, states):
        products = original(backend, dgates, inputs, states)
        if products is not None:
            formed.append(dgates.shape[0])
        return products

    monkeypatch.setattr(cython_module.CythonBackend, "gates_weight_gradients", spy)
    return formed


@pytest.mark.parametrize("isa, batch", [("avx512", 3), ("avx512", 34), ("avx512", 65), ("avx2", 3), ("avx2", 34)])
@pytest.mark.parametrize("mode", ["online", "loop"])
def test_float32_steps_whose_backend_forms_the_products_ask_for_dz(mode, isa, batch, monkeypatch):
    """Where the backend forms dz^T x and dz^T h0 itself (float32, the avx512 kernels, I and H
    multiples of 32: ``takes_gates_weight_gradients``), a lone step asks for dz at any batch
    (here past a LONE_STEP_GATES_MAX_ROWS of 1), and the steps of a loop of at most
    CHAINED_STEP_GATES_MAX_ROWS rows give dz and join one unroll, whose node has the backend form
    the products over all of them; 65 rows stay alone in a loop, and the avx2 kernels (torch.mm
    would form the products) leave both as they were. 3 rows give dz on either (the backend's
    default below 32 rows), whose products the backend forms on avx512 only. Every gradient equals
    torch.nn.LSTMCell's (float32)."""
    if isa not in cython_module._cython_lstm.SUPPORTED_ISAS:
        pytest.skip(f"this CPU or build does not run {isa}")
    spy = _GatesSpy(monkeypatch)
    made = _count_unrolls(monkeypatch)
    formed = _backend_products_spy(monkeypatch)
    monkeypatch.setattr(cython_module, "MIN_FLOPS_TO_THREAD", 0)   # parts of rows on two threads
    monkeypatch.setattr(cython_module, "_kernel_threads", lambda: 2)
    monkeypatch.setattr(lt, "LONE_STEP_GATES_MAX_ROWS", 1)
    sizes = (32, 64)
    reference, mine = _pair(dtype=torch.float32, sizes=sizes)
    generator = torch.Generator().manual_seed(5)
    leaves = [torch.randn(STEPS, batch, sizes[0], generator=generator)] + [
        torch.randn(batch, sizes[1], generator=generator) for _ in range(4)]
    run = _online_gradients if mode == "online" else _loop_gradients
    with kernel_overrides(cython_isa=isa):
        _assert_matches_torch(lambda module: run(module, *leaves), reference, mine, rtol=1e-4, atol=1e-5)
    avx512 = isa == "avx512"
    gives_dz = batch < 2 * cython_module.MIN_ROWS_PER_PART or avx512 and (
        mode == "online" or batch <= lt.CHAINED_STEP_GATES_MAX_ROWS)
    assert (spy.with_gates, spy.without) == ((STEPS, 0) if gives_dz else (0, STEPS))
    if mode == "online":
        # Each step its own backward pass: its dz's products, formed by the backend on avx512.
        assert made == [] and formed == ([batch] * STEPS if gives_dz and avx512 else [])
    else:
        # The chain's first step forms its own; the unroll those of the other steps at once.
        assert len(made) == (1 if gives_dz else 0)
        assert sorted(formed) == ([batch, (STEPS - 1) * batch] if gives_dz and avx512 else [])
