"""PyTorch modules ``LSTM`` and ``LSTMCell`` that compute through an lstmeng backend.

They are drop-in replacements for ``torch.nn.LSTM`` and ``torch.nn.LSTMCell``
(they subclass them): the same constructor and ``forward`` signatures, the
same ``nn.Parameter`` names and layouts (``weight_ih_l0`` ``[4H, I]``,
``weight_hh_l0`` ``[4H, H]``, ``bias_ih_l0``/``bias_hh_l0`` ``[4H]``,
``..._reverse``), the same initialisation, ``PackedSequence`` in and out,
``batch_first``, unbatched input and PyTorch's errors for bad input. So
``state_dict`` checkpoints load both ways, and optimizers, ``clip_grad_norm_``
and ``DistributedDataParallel`` work unchanged. Added: ``backend=``, an
lstmeng backend name or "auto" (the default in force, else numba_cuda for
CUDA tensors and cython, then numpy, for CPU tensors), and lstmeng-only
options of both modules, off by default: ``activation=`` and
``recurrent_activation=`` (other activations than tanh and sigmoid; the
parameters are the same, so state dicts still load both ways),
``recurrent_dropout=`` and ``forward(..., mask=)`` (``LSTM``: masks with holes
or left padding; ``LSTMCell``: rows that keep their state).

How a call runs: each layer and direction is one ``torch.autograd.Function``
whose forward is the backend's ``sequence_forward`` and whose backward is its
``sequence_backward`` (see ``lstmeng.backends.base``). PyTorch's weights map
to the contract's as ``kernel = weight_ih.T``, ``recurrent_kernel =
weight_hh.T`` (the gate order i, f, g, o is the same) and ``bias = bias_ih +
bias_hh``; the bias gradient goes to both biases.

* CPU tensors reach the backend as ``tensor.numpy()`` views (no copy when the
  tensor is contiguous; time-major input is made batch-major once), the weights
  as transposed views ``weight.t()`` that the cython backend reads in place, and
  the results come back through ``torch.from_numpy`` (no copy).
* CUDA tensors reach the numba_cuda backend through ``__cuda_array_interface__``
  (no copy) and its device arrays come back through ``torch.as_tensor`` (no
  copy). numba launches on the legacy default stream; when PyTorch's current
  stream is another one, the default stream first waits for it and it then
  waits for the default stream (events, no host synchronisation).
* numba_cuda given CPU tensors copies them to the device and its results back
  (how the tests run it under numba's CUDA simulator).

Example:
    >>> import torch, lstmeng.torch
    >>> lstm = lstmeng.torch.LSTM(3, 8, num_layers=2, batch_first=True)   # was torch.nn.LSTM(3, 8, ...)
    >>> output, (h_n, c_n) = lstm(torch.zeros(4, 5, 3))
    >>> tuple(output.shape), tuple(h_n.shape)
    ((4, 5, 8), (2, 4, 8))

See docs/torch.md for every argument and every difference from ``torch.nn.LSTM``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence

from lstmeng import activations
from lstmeng.backends import registry
from lstmeng.backends.base import InferenceStepSlot, SequenceOptions

__all__ = ["LSTM", "LSTMCell"]

#: Floating dtypes that autocast may hand the module; they are cast to the parameters' dtype.
_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)
_CPU = torch.device("cpu")
#: Tensor dtypes whose ``.numpy()`` views are backend arrays.
_NUMPY_FLOATS = (torch.float32, torch.float64)


_check_backend_name = registry.check_backend_choice


# -- tensors <-> backend arrays ------------------------------------------------------
def _host_array(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor (a copy only when it is not contiguous)."""
    if not tensor.requires_grad and tensor.is_contiguous():
        return tensor.numpy()   # without detach() and contiguous(): 0.5 instead of 0.8 us
    return tensor.detach().contiguous().numpy()


#: id(parameter) -> (weak reference to it, its (data_ptr, shape, strides, dtype), the NumPy view
#: of its memory). Keyed by id: tensors compare elementwise, so they cannot be dict keys by value.
_PARAMETER_VIEWS: dict = {}


def _forget_view(identity: int, reference) -> None:
    """A parameter died: drop its view (unless the id has been reused by a newer entry)."""
    entry = _PARAMETER_VIEWS.get(identity)
    if entry is not None and entry[0] is reference:
        del _PARAMETER_VIEWS[identity]


def _parameter_view(parameter: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU parameter's memory, made once per storage and reused.

    A view sees every write to that memory, in-place optimizer steps and ``.data``
    writes alike, so only a new storage (``module.double()``, ``param.data = ...``, a
    new Parameter) needs a new view; the key says when. (``detach().numpy()`` of four
    parameters was 3 us of a 40 us batch-1 LSTMCell step.)
    """
    key = (parameter.data_ptr(), parameter.shape, parameter.stride(), parameter.dtype)
    identity = id(parameter)
    entry = _PARAMETER_VIEWS.get(identity)
    if entry is not None and entry[0]() is parameter and entry[1] == key:
        return entry[2]
    view = parameter.detach().numpy()
    reference = weakref.ref(parameter, lambda dead, identity=identity: _forget_view(identity, dead))
    _PARAMETER_VIEWS[identity] = (reference, key, view)
    return view


def _host_weights(weight_ih, weight_hh, bias_ih, bias_hh) -> tuple:
    """CPU parameters as the contract's (kernel [I, 4H], recurrent_kernel [H, 4H], bias [4H] or
    None): transposed NumPy views of the parameters' memory (the cython backend reads them in
    place; a transposing copy of both weights cost more than a batch-1 LSTMCell step's
    arithmetic) and the biases' sum (NumPy's add of two views: a fraction of a torch op's
    dispatch on a cell step)."""
    bias = None if bias_ih is None else np.add(_parameter_view(bias_ih), _parameter_view(bias_hh))
    return _parameter_view(weight_ih).T, _parameter_view(weight_hh).T, bias


@functools.lru_cache(maxsize=None)
def _fast_transposed_copy():
    """The compiled extension's transposing copy (``transposed_copy``: SIMD tiles), or None where
    it is not built."""
    try:
        from lstmeng.backends._cython_lstm import transposed_copy
    except ImportError:
        return None
    return transposed_copy


def _in_parameter_layout(gradient: np.ndarray, contiguous: bool) -> np.ndarray:
    """A weight gradient of the contract's layout (dkernel [I, 4H], drecurrent_kernel [H, 4H]) as
    the parameter's [4H, I] / [4H, H]: a C-contiguous copy when ``contiguous`` and the extension's
    fast copy can make it, else NumPy's transposed view.

    Why a copy: autograd adds a gradient into ``.grad`` (or copies it there when ``.grad`` is None)
    element by element when its strides differ from the parameter's: ~18-70 us for a [512, 128]
    weight read transposed against ~3 contiguous, 37 % of a one-step training call at (64, 128);
    the extension's copy takes 3-7 us there. Why not always: a loop that calls a module many times
    per backward (an ``LSTMCell`` unroll) has autograd sum its steps' gradients first, which costs
    the same in either layout, so it pays the transposed add once and a copy would cost every step.
    """
    transposed_copy = _fast_transposed_copy() if contiguous else None
    if (transposed_copy is not None and gradient.ndim == 2 and gradient.flags.c_contiguous
            and gradient.dtype in (np.float32, np.float64)):
        return transposed_copy(gradient)
    return gradient.T


def _plain_host_call(dtype: torch.dtype, *tensors) -> bool:
    """Whether a module call on these tensors may take its plain lane (``LSTM._plain_call``,
    ``LSTMCell._plain_step``): every one a CPU tensor of ``dtype``, outside torch.compile and
    autocast (where the general path's graph break and casts must stay)."""
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    for tensor in tensors:   # a loop, not all(generator): ~1 us less on a ~20 us cell step
        if not (isinstance(tensor, torch.Tensor) and tensor.is_cpu and tensor.dtype == dtype):
            return False
    return True


def _records_gradient(tensors) -> bool:
    """Whether autograd records a call on these tensors (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _host_tensor(array: np.ndarray) -> torch.Tensor:
    """A NumPy result as a CPU tensor sharing its memory (copied only where ``torch.from_numpy``
    cannot share it: read-only memory, on which it warns, and negative strides)."""
    if not array.flags.writeable:
        array = np.array(array)
    try:
        return torch.from_numpy(array)
    except ValueError:
        return torch.from_numpy(np.array(array))


def _as_tensor(array, backend, device: torch.device, on_host: bool | None = None) -> torch.Tensor:
    """A backend result as a tensor on ``device``: NumPy arrays and CUDA arrays are wrapped, not copied.
    on_host: whether ``device`` is the CPU, when the caller knows (``device.type`` costs 0.2 us,
    and a training cell step wraps nine results)."""
    if isinstance(array, np.ndarray):
        tensor = _host_tensor(array)
        return tensor if (device.type == "cpu" if on_host is None else on_host) else tensor.to(device)
    if device.type == "cuda":
        return torch.as_tensor(array, device=device)
    return torch.from_numpy(np.ascontiguousarray(backend.ops.to_numpy(array)))


#: What ``_numba_stream_order`` returns on the CPU (reused: a null context holds no state).
_NO_STREAM_ORDER = contextlib.nullcontext()


def _numba_stream_order(device: torch.device, on_host: bool | None = None):
    """Orders numba's launches (legacy default stream) after PyTorch's current stream and back
    (nothing to order on the CPU: a null context, cheaper than a generator's). on_host: whether
    ``device`` is the CPU, when the caller knows (``device.type`` costs 0.26 us)."""
    if on_host is None:
        on_host = device.type != "cuda"
    return _NO_STREAM_ORDER if on_host else _cuda_stream_order(device)


@contextlib.contextmanager
def _cuda_stream_order(device: torch.device):
    """_numba_stream_order on a CUDA device."""
    current, default = torch.cuda.current_stream(device), torch.cuda.default_stream(device)
    if current == default:
        yield
        return
    default.wait_stream(current)
    try:
        yield
    finally:
        current.wait_stream(default)


@dataclasses.dataclass
class _DirectionCall:
    """One layer direction's call of the backend contract, tensors in and out.

    backend: the lstmeng KernelBackend; device: where the tensors live; on_device:
    the backend takes the CUDA tensors themselves (numba_cuda on a GPU);
    mask: ``[B, T]`` bool NumPy array (packed input, ``mask=``) or None; reverse:
    process t = T-1 .. 0; recurrent_dropout_mask: ``[B, H]`` tensor or None;
    activation, recurrent_activation: the module's (names of ``lstmeng.backends.base.ACTIVATIONS``
    and ``RECURRENT_ACTIVATIONS``); contiguous_weight_grads: host weight gradients as contiguous
    copies in the parameters' layout (``_in_parameter_layout``). on_host: ``device`` is the CPU
    (derived once: ``device.type`` costs 0.26 us, and a call's forward and backward asked it
    four times).
    """

    backend: object
    device: torch.device
    on_device: bool
    mask: np.ndarray | None
    reverse: bool
    recurrent_dropout_mask: torch.Tensor | None = None
    activation: str = "tanh"
    recurrent_activation: str = "sigmoid"
    contiguous_weight_grads: bool = False
    on_host: bool = dataclasses.field(init=False)

    def __post_init__(self):
        self.on_host = self.device.type == "cpu"

    def _array(self, tensor):
        if tensor is None:
            return None
        if self.on_device:
            # A Numba view of the CUDA tensor (no copy): the backend reads dtypes as NumPy dtypes,
            # which torch's are not. detach(): a tensor that requires grad exports no interface.
            from numba import cuda
            return cuda.as_cuda_array(tensor.detach())
        return _host_array(tensor)

    def _device_weights(self, weight_ih, weight_hh, bias_ih, bias_hh) -> tuple:
        """_host_weights on a GPU: contiguous copies of the transposed weights (the CUDA kernels
        read row-major weights) and the biases' sum, as device arrays."""
        kernel, recurrent_kernel = (self._array(weight.detach().t().contiguous()) for weight in (weight_ih, weight_hh))
        bias = None if bias_ih is None else self._array(bias_ih.detach() + bias_hh.detach())
        return kernel, recurrent_kernel, bias

    def forward(self, x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, training: bool, outputs: bool = True):
        """x: [B, T, I]; h0, c0: [B, H]; weight_ih: [4H, I]; weight_hh: [4H, H]; biases: [4H] or None.

        Returns (outputs [B, T, H] (None without ``outputs``: a cell step needs only the
        states), h [B, H], c [B, H], workspace or None).
        """
        weights = (weight_ih, weight_hh, bias_ih, bias_hh)
        kernel, recurrent_kernel, bias = (self._device_weights(*weights) if self.on_device   # [I, 4H], [H, 4H]
                                          else _host_weights(*weights))
        with _numba_stream_order(self.device, self.on_host):
            recurrent_dropout_mask = self._array(self.recurrent_dropout_mask)
            options = _call_options(bias is not None, self.mask is not None, recurrent_dropout_mask is not None,
                                    self.activation, self.recurrent_activation, self.reverse, training)
            result = self.backend.sequence_forward(
                self._array(x), self._array(h0), self._array(c0), kernel, recurrent_kernel, bias,
                self.mask, None, recurrent_dropout_mask, options)
        return (self._tensor(result.outputs) if outputs else None, self._tensor(result.h), self._tensor(result.c),
                result.workspace)

    def _tensor(self, array):
        """A backend result as a tensor on the call's device (None stays None)."""
        return None if array is None else _as_tensor(array, self.backend, self.device, self.on_host)

    def backward(self, doutputs, dh, dc, workspace, input_grad: bool = True, state_grads: bool = True):
        """Gradients (dx [B, T, I] or None without ``input_grad``, dh0, dc0 [B, H] or None without
        ``state_grads``, dweight_ih [4H, I], dweight_hh [4H, H], dbias [4H]): the weight gradients
        in the parameters' layout, made from the contract's dkernel [I, 4H] and drecurrent_kernel
        [H, 4H] (``_in_parameter_layout`` on the host: contiguous copies or transposed views;
        ``.t()`` views on a device)."""
        with _numba_stream_order(self.device, self.on_host):
            grads = self.backend.sequence_backward(self._array(doutputs), self._array(dh), self._array(dc),
                                                   workspace, input_grad=input_grad, state_grads=state_grads)
        wrapped = self._tensor
        if self.on_host and isinstance(grads.dkernel, np.ndarray):
            # Wrapped as NumPy arrays in the parameters' layout: cheaper than torch's .t() afterwards.
            contiguous = self.contiguous_weight_grads
            weights = tuple(None if array is None else wrapped(_in_parameter_layout(array, contiguous))
                            for array in (grads.dkernel, grads.drecurrent_kernel))
        else:
            weights = tuple(None if array is None else wrapped(array).t()
                            for array in (grads.dkernel, grads.drecurrent_kernel))
        return wrapped(grads.dx), wrapped(grads.dh0), wrapped(grads.dc0), *weights, wrapped(grads.dbias)


class _CellStepCall:
    """One host training step of an ``LSTMCell`` (``_CellStep``, ``_DeferredCellStep``), tensors in
    and out: the backend's ``cell_training_step`` function for the module's weights, made once
    per weight storage and options (``LSTMCell._training_step``), and the backend's backward.

    A batch-1 step's arithmetic takes a few microseconds; the general path's per-call setup
    (``_DirectionCall.forward``, then ``sequence_forward``'s checks) cost ~13 us more of a
    ~40 us training forward at (I, H) = (64, 128).

    backend: the KernelBackend; step: its ``cell_training_step`` function; gives_gates: set by
    the forward, whether the backend's backward of the step gives dz
    (``KernelBackend.gives_gates``), so that a chain of such steps pays to add up; linked: the
    step took states another step returned, or gave its states to another step
    (``_link_weight_gradient_steps``), so that autograd adds its weight gradients to theirs.
    """

    __slots__ = ("backend", "step", "gives_gates", "linked")

    def __init__(self, backend, step):
        self.backend, self.step, self.gives_gates, self.linked = backend, step, False, False

    def _tensor(self, array) -> torch.Tensor:
        """A backend result as a CPU tensor (NumPy arrays shared, not copied)."""
        return _host_tensor(array) if isinstance(array, np.ndarray) else _as_tensor(array, self.backend, _CPU, True)

    def forward(self, x, h0, c0, bias_ih, bias_hh) -> tuple:
        """x [B, I], h0, c0 [B, H], the biases [4H] or None (the weights are the step function's)
        -> (h [B, H], c [B, H] tensors, the backend's workspace)."""
        bias = None if bias_ih is None else np.add(_parameter_view(bias_ih), _parameter_view(bias_hh))
        h, c, workspace = self.step(_host_array(x), _host_array(h0), _host_array(c0), bias)
        return self._tensor(h), self._tensor(c), workspace

    def backward_gates(self, dh, dc, workspace, input_grad: bool = True, prefer_gates: bool = False,
                       state_grads: bool = True) -> tuple:
        """The step's backward for ``_cell_step_backward``: (dx [B, I] tensor or None, dh0 and dc0
        [B, H] tensors, or None without ``state_grads``, the backend's SequenceGrads). dh, dc:
        [B, H] gradients of the step's new states. The SequenceGrads holds either ``dgates``
        [B, 4H] (the backend's ``sequence_backward_gates``, given ``prefer_gates``) or the
        contract's weight gradients, as NumPy arrays."""
        dh = _host_array(dh)
        # The step's output is its new h: its gradient arrives as dh, the output's is zero.
        grads = self.backend.sequence_backward_gates(np.zeros(dh.shape, dh.dtype), dh, _host_array(dc), workspace,
                                                     input_grad=input_grad, prefer_gates=prefer_gates,
                                                     state_grads=state_grads)
        tensor = self._tensor
        dx = None if grads.dx is None else tensor(grads.dx.reshape(grads.dx.shape[0], -1))
        if not state_grads:
            return dx, None, None, grads
        return dx, tensor(grads.dh0), tensor(grads.dc0), grads


@functools.lru_cache(maxsize=256)
def _call_options(has_bias: bool, has_mask: bool, has_recurrent_dropout: bool, activation: str,
                  recurrent_activation: str, reverse: bool, training: bool) -> SequenceOptions:
    """The SequenceOptions of a layer direction's call (built once per combination: a cell step
    would otherwise pay the frozen dataclass's checks every call). Packed input: PyTorch's padded
    outputs are zeros, and h_n, c_n are taken at each row's last real step, which the contract's
    masked steps give (and mask= then means "as if the masked steps were removed")."""
    return SequenceOptions(activation=activation, recurrent_activation=recurrent_activation, reverse=reverse,
                           zero_output_for_mask=True, return_sequences=True, training=training, has_bias=has_bias,
                           has_mask=has_mask, has_input_dropout=False, has_recurrent_dropout=has_recurrent_dropout)


class _LSTMDirection(torch.autograd.Function):
    """One layer in one direction: the backend's forward, and its explicit backward as the gradient."""

    @staticmethod
    def forward(ctx, call, x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh):
        outputs, h, c, workspace = call.forward(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, training=True)
        ctx.call, ctx.workspace = call, workspace
        # Saved for the version check (the workspace references x's memory, which must not
        # change before the backward) and for a second backward (retain_graph=True).
        ctx.save_for_backward(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)
        return outputs, h, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, doutputs, dh, dc):
        saved = ctx.saved_tensors
        workspace = ctx.workspace
        if workspace is not None and workspace.consumed:
            # A workspace is backpropagated once (the contract): a second backward through the
            # same graph (retain_graph=True) recomputes the forward.
            workspace = ctx.call.forward(*saved, training=True)[3]
        needs = ctx.needs_input_grad
        # An input that needs no gradient (the first layer's data or frozen embeddings) costs
        # no dx product; initial states that need none (hx None: zeros) no dh0 product.
        dx, dh0, dc0, dweight_ih, dweight_hh, dbias = ctx.call.backward(doutputs, dh, dc, workspace,
                                                                       input_grad=needs[1],
                                                                       state_grads=needs[2] or needs[3])
        has_bias = saved[5] is not None
        return (None,
                dx if needs[1] else None,
                dh0 if needs[2] else None,
                dc0 if needs[3] else None,
                dweight_ih if needs[4] else None,
                dweight_hh if needs[5] else None,
                # The same tensor for both biases: AccumulateGrad copies a gradient that is
                # referenced elsewhere, so the two .grad never share memory (a test checks).
                dbias if has_bias and needs[6] else None,
                dbias if has_bias and needs[7] else None)


def _run_direction(call, x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, outputs: bool = True,
                   records: bool | None = None):
    """(outputs [B, T, H], h [B, H], c [B, H]) with gradients when any input needs them
    (outputs None when not ``outputs`` and no gradient is recorded). records: whether autograd
    records the call, when the caller has asked already (``_records_gradient``)."""
    tensors = (x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)
    if _records_gradient(tensors) if records is None else records:
        return _LSTMDirection.apply(call, *tensors)
    return call.forward(*tensors, training=False, outputs=outputs)[:3]


#: torch's id of the backward pass running now, or None where this torch lacks it (private API;
#: torch.utils.checkpoint uses it too). A cell loop's weight node takes only the steps of its own
#: pass (``_CellUnroll``); without it cell steps return their weight gradients each.
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def _cell_step_backward(call, x, h0, c0, parameters: tuple, workspace, dh, dc, input_grad: bool,
                        prefer_gates: bool = False, state_grads: bool = True) -> tuple:
    """The backward of a host cell step that leaves its weight gradients to its caller:
    (dx [B, I] or None, dh0, dc0 [B, H], dz, weights). call: the step's ``_CellStepCall``; x [B, I],
    h0, c0 [B, H] and parameters (weight_ih, weight_hh, bias_ih, bias_hh) the step's; workspace its
    forward's (recomputed when a backward already consumed it: a second pass with
    retain_graph=True); dh, dc [B, H]; prefer_gates, state_grads: passed to the backend's
    ``sequence_backward_gates`` (without ``state_grads``, dh0 and dc0 are None: states that need no
    gradient, as online learning's detached ones, cost no product with the recurrent kernel).

    dz: the gates' gradient [B, 4H] (``sequence_backward_gates``), weights None; or, where the
    backend gave the weight gradients instead, dz None and weights their tensors in the
    parameters' layout, (weight_ih [4H, I], weight_hh [4H, H], bias [4H]), new memory.
    """
    if workspace.consumed:
        workspace = call.forward(x, h0, c0, parameters[2], parameters[3])[2]
    dx, dh0, dc0, grads = call.backward_gates(dh, dc, workspace, input_grad=input_grad, prefer_gates=prefer_gates,
                                              state_grads=state_grads)
    wrapped = call._tensor
    if grads.dgates is not None:
        return dx, dh0, dc0, wrapped(grads.dgates), None
    # NumPy's transposed views wrapped as tensors, not .t() views: autograd adds into a gradient
    # that is no view in place, and makes a new tensor for the sum of views.
    weights = tuple(wrapped(array.T) if isinstance(array, np.ndarray) else wrapped(array).t()
                    for array in (grads.dkernel, grads.drecurrent_kernel)) + (wrapped(grads.dbias),)
    return dx, dh0, dc0, None, weights


def _summed_weight_gradients(deferred, given, needs: tuple, parameters: tuple, backend=None) -> tuple:
    """(weight_ih [4H, I], weight_hh [4H, H], bias [4H]) gradients of some cell steps, each None
    where ``needs`` (the same three) wants none. deferred: (x [B, I], h0 [B, H], dz [B, 4H]) of the
    steps that gave dz, whose weight gradients are ``dz^T x``, ``dz^T h0`` (one product over all
    of them, contiguous in the parameters' layout) and dz's column sums; given: the other steps'
    gradients already added up (a list of the three, or None); backend: the steps' KernelBackend,
    whose ``gates_weight_gradients`` forms both products where it offers them (host steps of
    several rows; the cython backend's AVX-512 kernel), else torch.mm does. No steps: zeros, as
    autograd gives a parameter that no step reached."""
    totals = list(given) if given is not None else [None, None, None]
    if deferred:
        dz = deferred[0][2] if len(deferred) == 1 else torch.cat([step[2] for step in deferred])  # [S B, 4H]
        factors = [None, None]
        for position in (0, 1):
            if needs[position]:
                factors[position] = (deferred[0][position] if len(deferred) == 1
                                     else torch.cat([step[position] for step in deferred]))  # [S B, I or H]
        products = _backend_weight_products(backend, dz, *factors)
        for position in (0, 1):
            if needs[position]:
                # One row (a batch-1 step on its own, as online learning runs): an outer product,
                # which a broadcast multiply forms in one pass over the result, with the same
                # roundings (one product per element). torch.mm with K = 1 took 2-3x longer there
                # (e.g. 79 against 36 us for both weights at (I, H) = (256, 512)).
                product = (products[position] if products is not None
                           else dz.t() * factors[position] if dz.shape[0] == 1 else dz.t().mm(factors[position]))
                totals[position] = product if totals[position] is None else product.add_(totals[position])
        if needs[2] and dz.shape[0] == 1 and totals[2] is None:
            # One row and nothing to add to it: the row itself, which is its sum exactly (a view of
            # dz, no longer read, where sum(0) makes a tensor: ~1 us of a batch-1 online step).
            totals[2] = dz[0]
        elif needs[2]:
            sums = dz.sum(0)
            totals[2] = sums if totals[2] is None else sums.add_(totals[2])
    for position, parameter in enumerate(parameters[:3]):
        if not needs[position]:
            totals[position] = None
        elif totals[position] is None:
            totals[position] = torch.zeros_like(parameter)
    return tuple(totals)


def _backend_weight_products(backend, dz, x, h0):
    """(dz^T x [4H, I], dz^T h0 [4H, H]) tensors from the backend's ``gates_weight_gradients``, or
    None where it does not form them: it is not asked for a step of one row (the broadcast outer
    products of ``_summed_weight_gradients`` are as fast there), for CUDA tensors, or where the caller
    needs only one of them. On a Zen 5 its AVX-512 kernel ran 2.0-2.4x faster than torch.mm (MKL's
    AVX2 code on that CPU) from 32 rows: at (I, H) = (64, 128) and 64 rows 35 against 72 us,
    at (256, 512) and 32 rows 234 against 536."""
    if (backend is None or x is None or h0 is None or dz.shape[0] < 2 or dz.device.type != "cpu"
            or dz.dtype not in _NUMPY_FLOATS):
        return None
    products = backend.gates_weight_gradients(dz.numpy(), x.numpy(), h0.numpy())
    if products is None:
        return None
    return _host_tensor(products[0]), _host_tensor(products[1])


class _CellUnroll:
    """The steps of one ``LSTMCell`` loop in training, and the weight gradients they leave behind.

    Called once per step, a cell would have each step's backward return gradients the size of
    the weights ([4H, I] and [4H, H]) for autograd to add into their sum: at (I, H) = (256, 512)
    and batch 1 that is 6 MB written and 18 MB more moved per step for a rank-1 update, and four
    additions a step at any size. Instead the steps of a loop reach the parameters through one
    node (``_UnrollWeights``), whose backward autograd runs after all of theirs: each step leaves
    its gates' gradient dz [B, 4H] with its x [B, I] and h0 [B, H], and the node forms
    weight_ih's gradient ``dz^T x``, weight_hh's ``dz^T h0`` and both biases' (the column sums of
    dz) as one product over the steps (``_summed_weight_gradients``). Only steps whose backend
    says after their forward that their backward gives dz (``gives_gates``) continue a chain; one
    whose backward gives weight gradients after all (kernel overrides changed in between) leaves
    those instead.

    A step continues a chain when its hx are the states the chain's last step returned
    (``_cell_chain``), so a detached state (truncated backpropagation) starts a new one; the
    chain's first step runs alone (``_CellStep``), the unroll begins with its second. What a
    step leaves is kept under the id of the backward pass that ran it: a pass that does not reach the
    weights (``torch.autograd.grad`` of the states only) leaves records the node's next pass
    ignores, and ``retain_graph`` passes each count once.

    parameters: (weight_ih, weight_hh, bias_ih, bias_hh), biases None without bias; versions:
    their ``_version`` when the unroll began (a step joins only while they hold; an in-place
    change of a weight before the backward is PyTorch's error, as for ``torch.nn.LSTMCell``);
    token: the node's output, a size-0 tensor each step takes as its autograd edge to the
    parameters; deferred: (backward pass id, x, h0, dz) of each step backward that gave dz;
    given: {backward pass id: [weight_ih, weight_hh, bias] gradients} added up, in place as
    they come (kept until the end, every step's arrays would be new memory, page faults).
    """

    __slots__ = ("parameters", "versions", "token", "deferred", "given", "backend", "__weakref__")

    def __init__(self, parameters: tuple):
        self.parameters = parameters
        self.versions = tuple(None if p is None else p._version for p in parameters)
        self.deferred, self.given = [], {}
        self.backend = None   # the steps' backend (the last to add one)
        self.token = _UnrollWeights.apply(self, *parameters)

    def current(self, parameters: tuple) -> bool:
        """Whether a step with these parameters may join: the same tensors, not changed in place."""
        return all(p is q and (p is None or p._version == version)
                   for p, q, version in zip(parameters, self.parameters, self.versions))

    def check_versions(self) -> None:
        """PyTorch's error when a weight was changed in place after a step of the unroll used it (a
        step's backward reads the weights; the biases it does not, as torch.nn.LSTMCell's does not)."""
        for parameter, version in zip(self.parameters[:2], self.versions):
            if parameter._version != version:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: [{type(parameter).__name__} of shape {list(parameter.shape)}] is at version "
                    f"{parameter._version}; expected version {version} instead (lstmeng.torch.LSTMCell)")

    def add_step(self, task_id, x, h0, dz, weights, backend) -> None:
        """Keep a step backward's contribution (``_cell_step_backward``'s dz or weights; backend:
        the step's, which forms the products of dz where it can)."""
        self.backend = backend
        if dz is not None:
            self.deferred.append((task_id, x, h0, dz))
            return
        totals = self.given.get(task_id)
        if totals is None:
            self.given[task_id] = list(weights)   # the step's own new tensors: added into from now on
        else:
            for total, piece in zip(totals, weights):
                total.add_(piece)

    def gradients(self, task_id, needs: tuple) -> tuple:
        """``_summed_weight_gradients`` of this backward pass's steps; forgets every step (this pass's
        are used, other passes' can no longer be)."""
        deferred = [step[1:] for step in self.deferred if step[0] == task_id]
        given = self.given.get(task_id)
        self.deferred, self.given = [], {}
        return _summed_weight_gradients(deferred, given, needs, self.parameters, self.backend)


class _UnrollWeights(torch.autograd.Function):
    """A cell loop's parameters, reached by its steps through one size-0 token: autograd runs this
    backward after every step's, and it returns the loop's weight gradients (``_CellUnroll``)."""

    @staticmethod
    def forward(ctx, unroll, weight_ih, weight_hh, bias_ih, bias_hh):
        ctx.unroll = unroll
        # The steps return no gradient for the token: None here, not zeros.
        ctx.set_materialize_grads(False)
        return weight_ih.new_empty(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _):
        needs = ctx.needs_input_grad
        dw_ih, dw_hh, dbias = ctx.unroll.gradients(_graph_task_id(), (needs[1], needs[2], needs[3] or needs[4]))
        # The same tensor for both biases: AccumulateGrad copies one that is referenced elsewhere.
        return None, dw_ih, dw_hh, dbias if needs[3] else None, dbias if needs[4] else None


class _DeferredCellStep(torch.autograd.Function):
    """A cell step of a ``_CellUnroll``: the backend's one-step forward, and a backward that gives
    the input's and states' gradients and leaves the weights' to the unroll."""

    @staticmethod
    def forward(ctx, call, unroll, x, h0, c0, token):
        h, c, workspace = call.forward(x, h0, c0, unroll.parameters[2], unroll.parameters[3])
        call.gives_gates = _chained_step_gives_gates(call.backend, workspace, x, h0)
        ctx.call, ctx.unroll, ctx.workspace = call, unroll, workspace
        ctx.save_for_backward(x, h0, c0)
        return h, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh, dc):
        unroll = ctx.unroll
        unroll.check_versions()
        x, h0, c0 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dh0, dc0, dz, weights = _cell_step_backward(ctx.call, x, h0, c0, unroll.parameters, ctx.workspace,
                                                        dh, dc, input_grad=needs[2],
                                                        prefer_gates=ctx.call.gives_gates,
                                                        state_grads=needs[3] or needs[4])
        unroll.add_step(_graph_task_id(), x.detach(), h0.detach(), dz, weights, ctx.call.backend)
        return None, None, dx if needs[2] else None, dh0 if needs[3] else None, dc0 if needs[4] else None, None


#: The most rows of a chained cell step (a loop's, which autograd would otherwise add up) whose
#: backward asks for dz where the backend forms the products of dz itself
#: (``KernelBackend.takes_gates_weight_gradients``; below 2 * 16 rows the cython backend gives dz
#: anyway). lstmeng.torch.LSTMCell training loops (50 steps, Zen 5 with AVX-512, 2 threads), dz
#: against the steps' own weight gradients: at (I, H) = (64, 128) 1.10x faster at batch 32,
#: 1.01x at 64, 0.93x at 128; at (256, 512) 1.30x, 1.06x, 1.05x.
CHAINED_STEP_GATES_MAX_ROWS = 64


def _backend_forms_products(backend, x, h0) -> bool:
    """Whether ``backend`` forms the weight-gradient products of a step on x [B, I] and h0 [B, H]
    (CPU tensors) from its dz (``takes_gates_weight_gradients``)."""
    return backend.takes_gates_weight_gradients(x.shape[0], x.shape[1], h0.shape[1], np.dtype(_dtype_name(x.dtype)))


def _chained_step_gives_gates(backend, workspace, x, h0) -> bool:
    """Whether a cell step's backward will give dz (``_CellStepCall.gives_gates``): where the backend
    gives it by default (``gives_gates``), or where its rows are at most CHAINED_STEP_GATES_MAX_ROWS
    and the backend forms the products of dz (then asked with ``prefer_gates``)."""
    return backend.gives_gates(workspace) or (x.shape[0] <= CHAINED_STEP_GATES_MAX_ROWS
                                              and _backend_forms_products(backend, x, h0))


#: The most rows of a lone cell step (``_CellStep``) whose backward asks for dz. Online loops
#: (one step per backward) on a Zen 5 CPU with AVX-512, lstmeng.torch.LSTMCell's time a step
#: with dz against with the backend's weight gradients: at (I, H) = (256, 512) 1.50x faster at
#: batch 32, 1.18x at 64, 1.07x at 128, 0.91x at 256; at (64, 128) 1.08x, 1.02x, 1.00x, 0.90x.
#: Past it the weight-gradient product, torch.mm on MKL's AVX2 code there, costs more than the
#: layout change saves. No limit where the backend forms the products itself
#: (``_backend_forms_products``): online loops (session 26, the same machine) with dz 1.01-1.20x
#: faster at (64, 128) from 32 to 256 rows (0.98x at 512), 1.16-2.22x at (256, 512) to 512 rows.
LONE_STEP_GATES_MAX_ROWS = 128


class _CellStep(torch.autograd.Function):
    """A cell step on its own: a chain's first, which may be the only one of its backward pass
    (online learning), or one whose backend gives no dz by default (larger batches). The weights
    are its inputs, and its backward returns their gradients: from dz as the unroll's node forms
    them (contiguous, in the parameters' layout: autograd adds them into ``.grad`` without a
    transposed pass), else the backend's.

    A step linked to no other (``_CellStepCall.linked``) of up to ``LONE_STEP_GATES_MAX_ROWS``
    rows asks the backend for dz (``prefer_gates``) also where it would give weight gradients:
    those are autograd's to add into ``.grad`` as they are, and the backend's, in the contract's
    layout, would cost a transposed pass over weight-sized arrays (1.4 ms at (I, H) = (256, 512)
    and batch 32) where dz^T x makes them in the parameters' layout (any number of rows where the
    backend forms dz^T x itself: ``_backend_forms_products``). Steps that autograd adds up keep
    the backend's products, which run faster than torch.mm's there (``CythonBackend``'s
    ``_gives_gates``), unless the backend forms dz^T x itself and they have at most
    CHAINED_STEP_GATES_MAX_ROWS rows: those give dz and continue a chain
    (``_chained_step_gives_gates``)."""

    @staticmethod
    def forward(ctx, call, x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh):
        h, c, workspace = call.forward(x, h0, c0, bias_ih, bias_hh)
        call.gives_gates = _chained_step_gives_gates(call.backend, workspace, x, h0)
        ctx.call, ctx.workspace = call, workspace
        ctx.save_for_backward(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)
        return h, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh, dc):
        x, h0, c0, *parameters = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dh0, dc0, dz, weights = _cell_step_backward(ctx.call, x, h0, c0, parameters, ctx.workspace, dh, dc,
                                                        input_grad=needs[1],
                                                        prefer_gates=ctx.call.gives_gates or not ctx.call.linked
                                                        and (x.shape[0] <= LONE_STEP_GATES_MAX_ROWS
                                                             or _backend_forms_products(ctx.call.backend, x, h0)),
                                                        state_grads=needs[2] or needs[3])
        deferred = [] if dz is None else [(x.detach(), h0.detach(), dz)]
        dw_ih, dw_hh, dbias = _summed_weight_gradients(deferred, weights, (needs[4], needs[5], needs[6] or needs[7]),
                                                       parameters, ctx.call.backend)
        return (None, dx if needs[1] else None, dh0 if needs[2] else None, dc0 if needs[3] else None,
                dw_ih, dw_hh, dbias if needs[6] else None, dbias if needs[7] else None)


class _StatesLedger:
    """Per LSTMCell (weakly, so modules pickle and die as before): {id(h): (h, c, value)} with weak
    references to the states the last step of each live sequence of a module's steps returned,
    and a value noted with them; a step given those states continues that sequence."""

    __slots__ = ("_modules",)

    def __init__(self):
        self._modules = weakref.WeakKeyDictionary()

    def take(self, module, hx, missing=None):
        """The value noted with the states hx ([B, H] pair), forgotten now, or ``missing`` where hx
        are not the last states of a noted step."""
        entries = self._modules.get(module)
        if entries is None:
            entries = self._modules[module] = {}
        entry = entries.pop(id(hx[0]), None)
        if entry is not None and entry[0]() is hx[0] and entry[1]() is hx[1]:
            return entry[2]
        if len(entries) >= 16:   # sequences that stopped (their states died or were detached)
            for key in [key for key, value in entries.items() if value[0]() is None]:
                del entries[key]
        return missing

    def note(self, module, h, c, value) -> None:
        """Note h, c [B, H] as the states the last step of a sequence returned, with ``value``."""
        self._modules.setdefault(module, {})[id(h)] = (weakref.ref(h), weakref.ref(c), value)


#: The chains of steps whose backward gives dz, each noted with its unroll (None after the
#: chain's first step).
_CELL_CHAINS = _StatesLedger()
#: The sequences of steps whose backward gives weight gradients, each noted with its last
#: step's ``_CellStepCall``.
_WEIGHT_GRADIENT_STEPS = _StatesLedger()
#: ``_CELL_CHAINS.take``'s answer for states that continue no chain (an unroll may be None).
_NO_CHAIN = object()


def _link_weight_gradient_steps(module, hx, h, c, call: _CellStepCall) -> None:
    """Mark a step whose backward gives weight gradients (``call``; hx its states before, h, c
    [B, H] after) and the step whose states it took, if any, as ``linked``: autograd adds their
    weight gradients up. A step linked to no other is its backward pass's only step of the
    module (online learning, one step per backward)."""
    previous = _WEIGHT_GRADIENT_STEPS.take(module, hx)
    if previous is not None:
        previous.linked = call.linked = True
    _WEIGHT_GRADIENT_STEPS.note(module, h, c, call)


def _cell_chain(module, hx, parameters: tuple) -> _CellUnroll | None:
    """The unroll a training step of ``module`` on states hx joins: that of the chain whose last
    step returned hx (made now at the chain's second step), or None for a chain's first step."""
    unroll = _CELL_CHAINS.take(module, hx, _NO_CHAIN)
    if unroll is _NO_CHAIN:
        return None
    return unroll if unroll is not None and unroll.current(parameters) else _CellUnroll(parameters)


def _continue_cell_chain(module, h, c, unroll: _CellUnroll | None) -> None:
    """Note h, c [B, H] as the states the last step of a chain returned (unroll: its unroll, None
    after its first step)."""
    _CELL_CHAINS.note(module, h, c, unroll)


@functools.lru_cache(maxsize=64)
def _cell_options(has_bias: bool, activation: str, recurrent_activation: str,
                  training: bool = False) -> SequenceOptions:
    """The SequenceOptions of a cell step (``KernelBackend.cell_forward``), inference or training."""
    return SequenceOptions(activation=activation, recurrent_activation=recurrent_activation,
                           return_sequences=False, has_bias=has_bias, training=training)


def _stacked(states: list) -> torch.Tensor:
    """[L*D, B, H] from L*D states [B, H]: a view of the only one (a one-layer module's h_n),
    else a stacked copy."""
    return states[0].unsqueeze(0) if len(states) == 1 else torch.stack(states)


@functools.lru_cache(maxsize=None)
def _dtype_name(dtype: torch.dtype) -> str:
    """The NumPy name of a torch dtype ("float32"), found once per dtype (``str`` and ``replace``
    cost ~0.4 us, and every call asks)."""
    return str(dtype).replace("torch.", "")


def _choose_backend(requested: str, x: torch.Tensor, dtype: torch.dtype, activation: str,
                    recurrent_activation: str):
    """(backend, on_device) for a call on ``x``; ValueError with the reason when the backend named
    cannot run this dtype and these activations (``registry.resolve``)."""
    dtype_name = _dtype_name(dtype)
    if x.is_cpu:   # first: a tensor's device object costs more than is_cpu (a cell step's glue)
        return registry.resolve(requested, _host_sample(dtype_name), dtype_name, activation,
                                recurrent_activation), False
    if x.device.type != "cuda":
        raise ValueError(f"lstmeng computes on CPU and CUDA tensors, got a tensor on {x.device}")
    backend = registry.resolve(requested, x.detach(), dtype_name, activation, recurrent_activation)
    if not backend.ops.owns(x.detach()):
        raise ValueError(f"backend {backend.name!r} computes on the CPU but the input is on {x.device}; "
                         "use backend='numba_cuda' (or 'auto') for CUDA tensors, or move module and input "
                         "to the CPU")
    # numba launches on its current device; a tensor elsewhere would be read from the wrong GPU.
    numba_device = getattr(backend, "device_index", lambda: x.device.index)()
    if x.device.index is not None and x.device.index != numba_device:
        raise ValueError(f"backend {backend.name!r} runs on CUDA device {numba_device} but the input is on "
                         f"{x.device}; select the device first (numba.cuda.select_device({x.device.index}))")
    return backend, True


@functools.lru_cache(maxsize=None)
def _host_sample(dtype_name: str) -> np.ndarray:
    """An empty host array of the dtype: what ``registry.resolve`` looks at for CPU tensors."""
    return np.empty((0,), dtype=dtype_name)


def _check_devices(input: torch.Tensor, hx, parameter: torch.Tensor) -> None:
    """PyTorch's errors for tensors on different devices (checked before any computation)."""
    if input.device != parameter.device:
        raise RuntimeError(f"Input and parameter tensors are not at the same device, found input tensor at "
                           f"{input.device} and parameter tensor at {parameter.device}")
    for state in hx:
        if state.device != input.device:
            raise RuntimeError(f"Input and hidden tensors are not at the same device, found input tensor at "
                               f"{input.device} and hidden tensor at {state.device}")


def _check_state_dtypes(hx, dtype: torch.dtype) -> None:
    for index, state in enumerate(hx):
        if state.dtype != dtype:
            raise RuntimeError(f"hx[{index}] dtype ({state.dtype}) does not match the input and weight dtype "
                               f"({dtype})")


def _autocast_input(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Under autocast, half-precision tensors are cast to the parameters' dtype (the backends
    compute in float32 and float64 only); outside it, dtypes must match (checked elsewhere)."""
    if tensor.dtype != dtype and tensor.dtype in _AUTOCAST_DTYPES and torch.is_autocast_enabled(
            tensor.device.type):
        return tensor.to(dtype)
    return tensor


#: What ``_autocast_off`` returns outside autocast (reusable; building one per call costs more).
_NO_CONTEXT = contextlib.nullcontext()


def _autocast_off(device: torch.device):
    """Autocast disabled for the module's own ops (they run in the parameters' dtype)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return _NO_CONTEXT


def _checked_mask(mask, expected_shape: tuple) -> np.ndarray:
    """``mask`` (bool tensor or array of ``expected_shape``) as a bool NumPy array, else ValueError."""
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.dtype != np.bool_:
        raise ValueError(f"mask must be bool (True = real step), got dtype {array.dtype}")
    if tuple(array.shape) != expected_shape:
        raise ValueError(f"mask must have the input's shape without its feature axis, {expected_shape}, "
                         f"got {tuple(array.shape)}")
    return array


def _batch_major_mask(mask, expected_shape: tuple, is_batched: bool, batch_first: bool) -> np.ndarray:
    """``mask`` (tensor or array, the input's layout without its feature axis) as ``[B, T]`` bool NumPy."""
    array = _checked_mask(mask, expected_shape)
    if not is_batched:
        return array[None, :]
    return array if batch_first else np.ascontiguousarray(array.T)


# -- PackedSequence <-> padded batch-major -----------------------------------------------
@dataclasses.dataclass
class _PackedIndex:
    """Where each row of a PackedSequence's data lives in the padded batch-major ``[B, T, ...]``.

    rows, times: [N] original batch row and time step of each packed row
    (original order: sorted_indices applied); mask: [B, T] bool, True at real steps.
    """

    rows: torch.Tensor
    times: torch.Tensor
    mask: np.ndarray

    @classmethod
    def of(cls, packed: PackedSequence) -> "_PackedIndex":
        batch_sizes = packed.batch_sizes.cpu()               # [T] rows still running at each step
        steps, batch = len(batch_sizes), int(batch_sizes[0])
        times = torch.repeat_interleave(torch.arange(steps), batch_sizes)
        step_starts = torch.cumsum(batch_sizes, 0) - batch_sizes
        sorted_rows = torch.arange(len(times)) - step_starts[times]   # row in length-sorted order
        rows = sorted_rows if packed.sorted_indices is None else packed.sorted_indices.cpu()[sorted_rows]
        mask = np.zeros((batch, steps), dtype=bool)
        mask[rows.numpy(), times.numpy()] = True
        device = packed.data.device
        return cls(rows.to(device), times.to(device), mask)

    def pad(self, data: torch.Tensor) -> torch.Tensor:
        """data [N, F] -> [B, T, F] with zeros after each row's length (differentiable)."""
        batch, steps = self.mask.shape
        padded = data.new_zeros((batch, steps, data.shape[1]))
        return padded.index_put((self.rows, self.times), data)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, T, F] -> data [N, F] in the PackedSequence's row order (differentiable)."""
        return padded[self.rows, self.times]


class _LstmengOptions:
    """The lstmeng-only options that ``LSTM`` and ``LSTMCell`` share: validated, shown and used in one place.

    The class attributes are the defaults, so a module pickled before an option
    existed unpickles with that option off.
    """

    backend = "auto"
    activation = "tanh"
    recurrent_activation = "sigmoid"
    recurrent_dropout = 0.0

    def _set_lstmeng_options(self, dtype: torch.dtype, *, backend, activation, recurrent_activation,
                             recurrent_dropout) -> None:
        """Check every option (ValueError naming the argument, the allowed and the given value), then set them."""
        activation = activations.check_activation(activation, "activation")
        recurrent_activation = activations.check_activation(recurrent_activation, "recurrent_activation")
        if not isinstance(recurrent_dropout, (int, float)) or not 0 <= recurrent_dropout < 1:
            raise ValueError(f"recurrent_dropout must be a number in [0, 1), got {recurrent_dropout!r}")
        backend = _check_backend_name(backend)
        if backend != "auto":
            _check_named_backend_supports(backend, dtype, activation, recurrent_activation)
        self.backend, self.activation, self.recurrent_activation = backend, activation, recurrent_activation
        self.recurrent_dropout = float(recurrent_dropout)

    def _lstmeng_repr(self) -> str:
        """The options that differ from their defaults, then the backend, for ``extra_repr``."""
        extra = "".join(f", {name}={getattr(self, name)!r}" for name, default in
                        (("activation", "tanh"), ("recurrent_activation", "sigmoid"), ("recurrent_dropout", 0.0))
                        if getattr(self, name) != default)
        return f"{extra}, backend={self.backend!r}"

    def _recurrent_dropout_mask(self, x):
        """[B, H] inverted-dropout mask for one layer direction, or None (eval, or no recurrent dropout)."""
        if not (self.training and self.recurrent_dropout > 0):
            return None
        keep = 1.0 - self.recurrent_dropout
        return x.new_empty((x.shape[0], self.hidden_size)).bernoulli_(keep).div_(keep)

    def _backend_for(self, x: torch.Tensor, dtype: torch.dtype):
        """(backend, on_device) for a call on x (``[B, T, I]``, or a cell's ``[B, I]``: only its device
        counts) with parameters of ``dtype``."""
        return _choose_backend(self.backend, x, dtype, self.activation, self.recurrent_activation)

    def _direction_call(self, backend, on_device: bool, x, mask, reverse: bool,
                        contiguous_weight_grads: bool = False) -> _DirectionCall:
        """One layer direction's call on x [B, T, I]: the module's activations, and in training mode
        with recurrent_dropout a fresh recurrent dropout mask."""
        return _DirectionCall(backend, x.device, on_device, mask, reverse=reverse,
                              recurrent_dropout_mask=self._recurrent_dropout_mask(x), activation=self.activation,
                              recurrent_activation=self.recurrent_activation,
                              contiguous_weight_grads=contiguous_weight_grads)


def _check_named_backend_supports(name: str, dtype: torch.dtype, activation: str, recurrent_activation: str):
    """At construction, a named backend that cannot run these activations raises ValueError with its reason.

    Asked in the parameters' dtype when the backend computes in it, else in one it
    does: the dtype itself is checked at each call (``module.double()`` may come
    between), as for any backend chosen by "auto".
    """
    backend = registry.get_backend_object(name)
    dtype_name = _dtype_name(dtype)
    if dtype_name not in backend.dtypes and backend.dtypes:
        dtype_name = backend.dtypes[0]
    try:
        backend.check_support(dtype_name, activation, recurrent_activation)
    except NotImplementedError as error:
        raise ValueError(f"backend {name!r} cannot run this layer: {error}") from None


class LSTM(torch.nn.LSTM, _LstmengOptions):
    """``torch.nn.LSTM`` computed by an lstmeng backend.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout,
            bidirectional, device, dtype: as ``torch.nn.LSTM`` (float32 or
            float64 parameters).
        proj_size: must be 0 (NotImplementedError otherwise).
        backend: an lstmeng backend name ("cython", "numpy", "numba_cuda",
            a plugin) or "auto": the default in force (``lstmeng.use_backend``,
            ``set_backend``, LSTMENG_BACKEND), else numba_cuda for CUDA
            tensors and cython, then numpy, for CPU tensors.
        recurrent_dropout: lstmeng only, 0 by default. In training mode, each
            layer and direction draws one ``[B, H]`` inverted-dropout mask per
            call (0 or 1/(1 - rate), PyTorch's generator) that multiplies
            h(t-1) where it enters the recurrence at every step (the carried
            state is not dropped): Keras's recurrent dropout. Off in eval().
        activation: lstmeng only, "tanh" by default (``torch.nn.LSTM``): the
            cell input's and the cell state's activation, one of "tanh",
            "relu", "sigmoid", "linear".
        recurrent_activation: lstmeng only, "sigmoid" by default: the gates'
            activation, "sigmoid" or "hard_sigmoid" (Keras 3's,
            ``clip(x / 6 + 0.5, 0, 1)``, which is ``torch.nn.functional.hardsigmoid``).
            Both activations apply to every layer and direction. A name
            outside these raises ValueError here; a named backend that cannot
            run them raises ValueError with its reason here, "auto" passes
            over such backends at each call.

    ``forward(input, hx=None, *, mask=None) -> output, (h_n, c_n)`` exactly as
    ``torch.nn.LSTM``: input ``[T, B, I]`` (``[B, T, I]`` with batch_first),
    ``[T, I]`` unbatched, or a PackedSequence; hx ``(h_0, c_0)``, each
    ``[num_layers * num_directions, B, H]``.

    ``mask`` (lstmeng only, padded input only): bool, input's shape without the
    feature axis (``[T, B]``, ``[B, T]`` with batch_first, ``[T]`` unbatched),
    True = real step. Any pattern: holes, left padding. A masked step keeps h
    and c and outputs zeros, so each row computes as if its masked steps were
    removed, and h_n, c_n are the states after its last real step (the
    reverse direction: after its first). For example, a row masked
    ``[True, False, True]`` gives the outputs of the two-step sequence
    (x0, x2) at steps 0 and 2 and zeros at step 1.
    """

    def __init__(self, *args, backend: str = "auto", recurrent_dropout: float = 0.0, activation: str = "tanh",
                 recurrent_activation: str = "sigmoid", **kwargs):
        super().__init__(*args, **kwargs)
        if self.proj_size > 0:
            raise NotImplementedError(f"lstmeng.torch.LSTM: proj_size > 0 is not supported (got proj_size="
                                      f"{self.proj_size}); use torch.nn.LSTM for projected LSTMs")
        self._set_lstmeng_options(self.weight_ih_l0.dtype, backend=backend, activation=activation,
                                  recurrent_activation=recurrent_activation, recurrent_dropout=recurrent_dropout)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._lstmeng_repr()

    def forward(self, input, hx=None, *, mask=None):
        if mask is None:
            result = self._plain_call(input, hx)
            if result is not None:
                return result
        packed = isinstance(input, PackedSequence)
        if packed and mask is not None:
            raise ValueError("mask= is for padded input; a PackedSequence carries its own lengths")
        directions = 2 if self.bidirectional else 1
        weight = self.weight_ih_l0
        if packed:
            data = _autocast_input(input.data, weight.dtype)
            index = _PackedIndex.of(input)
            batch = int(input.batch_sizes[0])
            sequence = data
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            sequence = _autocast_input(input if is_batched else input.unsqueeze(batch_dim), weight.dtype)
            batch = sequence.size(batch_dim)
            index = None
            if mask is not None:
                mask = _batch_major_mask(mask, tuple(input.shape[:-1]), is_batched, self.batch_first)
        if hx is None:
            zeros = sequence.new_zeros((self.num_layers * directions, batch, self.hidden_size))
            hx = (zeros, zeros)
        else:
            expected_dims = 3 if packed or is_batched else 2
            if hx[0].dim() != expected_dims or hx[1].dim() != expected_dims:
                kind = "batched 3-D" if expected_dims == 3 else "unbatched 2-D"
                raise RuntimeError(f"For {kind} input, hx and cx should also be {expected_dims}-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            if expected_dims == 2:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            hx = tuple(_autocast_input(state, weight.dtype) for state in hx)
        if hasattr(self, "_update_flat_weights"):
            self._update_flat_weights()   # check_forward_args reads the dtype from _flat_weights
        self.check_forward_args(sequence, hx, input.batch_sizes if packed else None)
        _check_devices(sequence, hx, weight)
        _check_state_dtypes(hx, weight.dtype)

        with _autocast_off(sequence.device):
            if packed:
                x = index.pad(sequence)                       # [B, T, I] original row order
            else:
                x = sequence if self.batch_first else sequence.transpose(0, 1)   # [B, T, I]
            output, h_n, c_n = self._layers(x, hx, index.mask if packed else mask)
        if packed:
            # Original row order throughout (hx was not permuted, h_n needs no unpermuting).
            return (PackedSequence(index.pack(output), input.batch_sizes, input.sorted_indices,
                                   input.unsorted_indices), (h_n, c_n))
        if not self.batch_first:
            output = output.transpose(0, 1).contiguous()      # nn.LSTM returns contiguous outputs
        if not is_batched:
            output = output.squeeze(batch_dim)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def _plain_call(self, x, hx):
        """The call of a plain training or streaming loop, or None for any other call.

        x: a batched padded CPU tensor (``[T, B, I]``, ``[B, T, I]`` with batch_first) of the
        parameters' dtype and the module's input size; hx None or ``(h_0, c_0)`` CPU tensors of
        that dtype, each ``[L * D, B, H]``; outside torch.compile and autocast. What ``forward``
        runs for it, without the checks and conversions that only other kinds of call need
        (torch's ``_update_flat_weights`` and ``check_forward_args``, device and dtype checks,
        autocast casts): ~12 us of a ~50 us one-step call. Anything else, a bad input included,
        takes the general path, which raises PyTorch's errors.
        """
        weight = self._parameters.get("weight_ih_l0")   # None: a parametrized weight (a property)
        states = () if hx is None else hx
        if (weight is None or not (isinstance(states, tuple) and len(states) in (0, 2))
                or not _plain_host_call(weight.dtype, x, weight, *states) or x.dim() != 3
                or x.size(2) != self.input_size):
            return None
        expected = (self.num_layers * (2 if self.bidirectional else 1), x.size(0 if self.batch_first else 1),
                    self.hidden_size)
        if any(state.shape != expected for state in states):
            return None
        output, h_n, c_n = self._layers(x if self.batch_first else x.transpose(0, 1), hx, None)
        if not self.batch_first:
            output = output.transpose(0, 1).contiguous()      # nn.LSTM returns contiguous outputs
        return output, (h_n, c_n)

    @functools.cached_property
    def _direction_parameter_names(self) -> tuple:
        """Per layer direction (l0, l0_reverse, l1, ...): the names of its weight_ih, weight_hh,
        bias_ih and bias_hh (the biases None without bias). Built once per module."""
        suffixes = [f"_l{layer}" + ("_reverse" if direction else "") for layer in range(self.num_layers)
                    for direction in range(2 if self.bidirectional else 1)]
        return tuple(tuple(f"{name}{suffix}" if self.bias or name.startswith("weight") else None
                           for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")) for suffix in suffixes)

    @torch.compiler.disable
    def _layers(self, x, hx, mask):
        """The stacked layers on batch-major x [B, T, I] -> output [B, T, D*H], h_n, c_n [L*D, B, H];
        hx: (h_0, c_0) each [L*D, B, H], or None for zeros.

        Kept out of torch.compile graphs (a graph break): the backends compute outside PyTorch.
        Always through the wrapper, unlike LSTMCell's step: where Dynamo refuses the module
        (RNN modules, ``allow_rnn`` off) it runs ``forward`` eagerly but still compiles the
        frames it calls, and a plain ``_layers`` was traced then (a test counts the warnings).
        """
        directions = 2 if self.bidirectional else 1
        names = self._direction_parameter_names
        registered = self._parameters   # nn.Module.__getattr__ costs ~0.4 us a lookup
        backend = on_device = None
        if hx is None:
            zeros = x.new_zeros((x.shape[0], self.hidden_size))   # every layer direction's h_0 and c_0
        layer_input, h_n, c_n = x, [], []
        for layer in range(self.num_layers):
            direction_outputs = []
            for direction in range(directions):
                state = layer * directions + direction
                # Registered parameters directly; a parametrized one (a property) through getattr.
                parameters = [None if name is None else registered.get(name) for name in names[state]]
                parameters = [getattr(self, name) if name is not None and value is None else value
                              for name, value in zip(names[state], parameters)]
                if backend is None:
                    backend, on_device = self._backend_for(x, parameters[0].dtype)
                # One call per layer direction and backward, as a rule: its weight gradients
                # contiguous in the parameters' layout (a cell loop keeps the views).
                call = self._direction_call(backend, on_device, x, mask, reverse=direction == 1,
                                            contiguous_weight_grads=True)
                h0, c0 = (zeros, zeros) if hx is None else (hx[0][state], hx[1][state])
                outputs, h, c = _run_direction(call, layer_input, h0, c0, *parameters)
                direction_outputs.append(outputs)
                h_n.append(h)
                c_n.append(c)
            layer_input = torch.cat(direction_outputs, dim=2) if directions == 2 else direction_outputs[0]
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = torch.nn.functional.dropout(layer_input, self.dropout, training=True)
        return layer_input, _stacked(h_n), _stacked(c_n)


class LSTMCell(torch.nn.LSTMCell, _LstmengOptions):
    """``torch.nn.LSTMCell`` computed by an lstmeng backend (a one-step sequence call).

    Args:
        input_size, hidden_size, bias, device, dtype: as ``torch.nn.LSTMCell``.
        backend, activation, recurrent_activation: as for ``LSTM``.
        recurrent_dropout: as for ``LSTM``: in training mode each call draws
            one ``[B, H]`` mask (PyTorch's generator) that multiplies h_0 where
            it enters the gates; the carried state is not dropped. A call is
            one step, so a loop over steps draws a new mask at every step
            (``LSTM``, one call per sequence, keeps one over the sequence).

    ``forward(input, hx=None, *, mask=None) -> (h_1, c_1)``: input ``[B, I]``
    or ``[I]``; hx ``(h_0, c_0)`` each ``[B, H]`` or ``[H]``.

    ``mask`` (lstmeng only): bool ``[B]`` (``[]`` for unbatched input), True =
    real step. A masked row keeps its state, ``h_1 = h_0`` and ``c_1 = c_0``
    (a masked step of ``LSTM``, or of Keras's masking): its input and the
    weights get no gradient from it and the gradients of h_1, c_1 pass to
    h_0, c_0 unchanged. For example, ``mask=torch.tensor([True, False])``
    steps row 0 and returns row 1's hx as it was.

    Example:
        >>> import torch, lstmeng.torch
        >>> cell = lstmeng.torch.LSTMCell(3, 8, activation="relu", recurrent_activation="hard_sigmoid")
        >>> h, c = cell(torch.ones(2, 3))
        >>> h_next, c_next = cell(torch.ones(2, 3), (h, c), mask=torch.tensor([True, False]))
        >>> bool((h_next[1] == h[1]).all()), bool((c_next[1] == c[1]).all())
        (True, True)
    """

    def __init__(self, *args, backend: str = "auto", recurrent_dropout: float = 0.0, activation: str = "tanh",
                 recurrent_activation: str = "sigmoid", **kwargs):
        super().__init__(*args, **kwargs)
        self._set_lstmeng_options(self.weight_ih.dtype, backend=backend, activation=activation,
                                  recurrent_activation=recurrent_activation, recurrent_dropout=recurrent_dropout)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._lstmeng_repr()

    def forward(self, input, hx=None, *, mask=None):
        if hx is not None and mask is None:
            states = self._plain_step(input, hx)
            if states is not None:
                return states
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for position, state in enumerate(hx):
                if state.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{position}] to be 1D or 2D, got {state.dim()}D "
                                     "instead")
        is_batched = input.dim() == 2
        # Each parameter looked up once (nn.Module.__getattr__: 0.4 us a lookup, a batch-1 step ~1 %).
        weights = (self.weight_ih, self.weight_hh, *((self.bias_ih, self.bias_hh) if self.bias else (None, None)))
        dtype = weights[0].dtype
        x = _autocast_input(input if is_batched else input.unsqueeze(0), dtype)
        if hx is None:
            zeros = x.new_zeros((x.size(0), self.hidden_size))
            hx = (zeros, zeros)
        else:
            hx = tuple(_autocast_input(state if is_batched else state.unsqueeze(0), dtype) for state in hx)
        self._check_cell_input(x, hx, weights[0])
        if mask is not None:
            # [B, 1]: a one-step sequence mask; the backend's masked step keeps h and c.
            mask = _checked_mask(mask, tuple(input.shape[:-1])).reshape(-1, 1)
        # Called directly outside torch.compile: the graph break's wrapper costs ~0.5 us a step.
        step = self._step_outside_graph if torch.compiler.is_compiling() else self._step
        with _autocast_off(x.device):
            h, c = step(x, hx, mask, weights)
        if not is_batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c

    def _plain_step(self, x, hx):
        """The step of a streaming loop, or None for any other call.

        x [B, I] and hx ([B, H], [B, H]): CPU tensors of the parameters' dtype and the
        module's sizes, outside torch.compile and autocast. What the general path runs for it
        (``_step``), without its checks and conversions, each needed only for some other kind
        of call (1-D input, autocast, masks, errors): ~4 us of a ~25 us batch-1 inference
        step at (I, H) = (64, 128), ~10 of a ~110 us training step. Anything else, a bad
        input included, takes the general path, which raises PyTorch's errors.
        """
        parameters = self._parameters   # nn.Module.__getattr__ costs ~0.4 us a lookup
        weights = (parameters.get("weight_ih"), parameters.get("weight_hh"), parameters.get("bias_ih"),
                   parameters.get("bias_hh"))
        if (weights[0] is None or weights[1] is None or (self.bias and (weights[2] is None or weights[3] is None))
                or not (isinstance(hx, tuple) and len(hx) == 2)):
            return None   # parametrized weights (properties), or hx not a pair
        if not _plain_host_call(weights[0].dtype, x, weights[0], *hx) or x.dim() != 2:
            return None
        expected = (x.size(0), self.hidden_size)
        if x.size(1) != self.input_size or hx[0].shape != expected or hx[1].shape != expected:
            return None
        return self._step(x, hx, None, weights)

    def _check_cell_input(self, x, hx, weight_ih) -> None:
        """PyTorch's errors for a cell call, before any computation."""
        if x.dtype != weight_ih.dtype:
            raise ValueError(f"LSTMCell input dtype ({x.dtype}) does not match weight dtype "
                             f"({weight_ih.dtype}). Convert input: input.to({weight_ih.dtype})")
        batch, features = x.shape
        if features != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {features} expected {self.input_size}")
        for position, state in enumerate(hx):
            state_batch, state_units = state.shape
            if state_batch != batch:
                raise RuntimeError(f"Input batch size {batch} doesn't match hidden{position} batch size "
                                   f"{state_batch}")
            if state_units != self.hidden_size:
                raise RuntimeError(f"hidden{position} has inconsistent hidden_size: got {state_units}, "
                                   f"expected {self.hidden_size}")
        _check_devices(x, hx, weight_ih)
        _check_state_dtypes(hx, weight_ih.dtype)

    def _step(self, x, hx, mask, weights):
        """x [B, I], hx ([B, H], [B, H]), mask [B, 1] bool or None, weights (weight_ih, weight_hh,
        bias_ih, bias_hh) (biases None without bias) -> (h [B, H], c [B, H])."""
        backend, on_device = self._backend_for(x, weights[0].dtype)
        records = _records_gradient((x, *hx, *weights))
        dropout = self.training and self.recurrent_dropout > 0
        if not on_device and mask is None and not dropout and not records:
            return self._inference(backend, x, hx, weights)
        if (records and not on_device and mask is None and not dropout and _graph_task_id is not None
                and x.device.type == "cpu" and all(w is None or w.requires_grad for w in weights)):
            return self._unrolled_step(backend, x, hx, weights)
        sequence = x.unsqueeze(1)                                 # [B, 1, I]
        call = self._direction_call(backend, on_device, sequence, mask, reverse=False)
        # h, c are the states after the step (h_0, c_0 on masked rows), not the step's output (zeros there).
        _, h, c = _run_direction(call, sequence, hx[0], hx[1], *weights, outputs=False, records=records)
        return h, c

    def _unrolled_step(self, backend, x, hx, weights):
        """A training step on CPU tensors whose every parameter takes a gradient, no mask or dropout.
        The first step of a chain runs alone (``_CellStep``; a step that is its own backward pass,
        as in online learning, would otherwise pay a second autograd node); the chain's later
        steps join an unroll (``_CellUnroll``), which adds up their weight gradients at its end.
        x [B, I], hx ([B, H], [B, H]), weights as ``_step``'s -> (h, c)."""
        unroll = _cell_chain(self, hx, weights)
        call = _CellStepCall(backend, self._training_step(backend, weights))
        if unroll is None:
            h, c = _CellStep.apply(call, x, hx[0], hx[1], *weights)
        else:
            h, c = _DeferredCellStep.apply(call, unroll, x, hx[0], hx[1], unroll.token)
        if call.gives_gates:
            _continue_cell_chain(self, h, c, unroll)
        else:
            # A step whose backward will give weight gradients (larger batches) ends its chain:
            # autograd adds those up in C++, where an unroll would add them in Python.
            _link_weight_gradient_steps(self, hx, h, c, call)
        return h, c

    def _training_step(self, backend, weights):
        """The backend's ``cell_training_step`` function for these weights (weight_ih, weight_hh,
        bias_ih, bias_hh; biases None without bias), kept while the weights' storage and the
        options stay, as ``_inference`` keeps its inference step function."""
        input_view, hidden_view = _parameter_view(weights[0]), _parameter_view(weights[1])
        options = _cell_options(weights[2] is not None, self.activation, self.recurrent_activation, True)
        slot = self.__dict__.get("_training_steps")
        if slot is None:   # made here, not in __init__: modules pickled by older versions lack it
            slot = self._training_steps = InferenceStepSlot()
        # The contract's layout, as for _inference: transposed views the cython backend reads in place.
        return slot.step(backend, input_view, hidden_view, options,
                         lambda: backend.cell_training_step(input_view.T, hidden_view.T, options))

    def _inference(self, backend, x, hx, weights):
        """A step on CPU tensors that records no gradient, mask or dropout: the backend's
        ``cell_inference_step`` on NumPy views, without the autograd Function and the per-call
        ``_DirectionCall`` of the general path, made once per weight storage (the views of
        ``_parameter_view``) and options, and reused while they stay.

        x [B, I], hx ([B, H], [B, H]), weights (weight_ih, weight_hh, bias_ih, bias_hh) -> (h, c).
        """
        weight_ih, weight_hh, bias_ih, bias_hh = weights
        input_view, hidden_view = _parameter_view(weight_ih), _parameter_view(weight_hh)
        options = _cell_options(bias_ih is not None, self.activation, self.recurrent_activation)
        slot = self.__dict__.get("_inference_steps")
        if slot is None:   # made here, not in __init__: modules pickled by older versions lack it
            slot = self._inference_steps = InferenceStepSlot()
        # The contract's layout, [I, 4H] and [H, 4H]: transposed views of PyTorch's [4H, I] and
        # [4H, H], which the cython backend reads in place.
        step = slot.step(backend, input_view, hidden_view, options,
                         lambda: backend.cell_inference_step(input_view.T, hidden_view.T, options))
        bias = None if bias_ih is None else np.add(_parameter_view(bias_ih), _parameter_view(bias_hh))
        h, c = step(_host_array(x), _host_array(hx[0]), _host_array(hx[1]), bias)
        return _host_tensor(h), _host_tensor(c)

    #: ``_step`` kept out of torch.compile graphs (a graph break): the backends compute outside PyTorch.
    _step_outside_graph = torch.compiler.disable(_step)
