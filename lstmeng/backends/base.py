"""The backend contract: what every lstmeng backend implements.

The contract has two parts, as Keras 3 splits ``backend.lstm`` from ``keras.ops``:

* ``KernelBackend``: the LSTM itself. One layer in one direction over a whole
  sequence (``sequence_forward``/``sequence_backward``) and one step
  (``cell_forward``/``cell_backward``), plus what the backend can do
  (``probe``, ``check_support``). It knows nothing of layers, masks given as
  lengths, go_backwards flips, Bidirectional merges or stacking: the layers in
  ``lstmeng.layers`` reduce all of those to calls of this contract.
* ``ArrayOps``: the few array helpers (``asarray``, ``zeros``, ``flip_time``,
  ``concatenate``, ...) that the layers use to stay on the backend's device
  between calls. Every ``KernelBackend`` has one as ``backend.ops``; the class
  ``ArrayOps`` here is the NumPy implementation, which TensorFlow's and the
  CUDA arrays' implementations extend (host arrays given to them stay NumPy).

Shapes use these letters: B batch rows, T time steps, I input features,
H units. Weights use Keras's layout and gate order (input, forget, cell
candidate, output)::

    kernel:           [I, 4H]
    recurrent_kernel: [H, 4H]
    bias:             [4H]

Every call takes its arrays positionally and one ``SequenceOptions``: the
activations, reverse, zero_output_for_mask, return_sequences, training and
which optional arrays (bias, mask, dropout masks) are present. The options are
frozen and hashable, so a backend keys its compiled kernels or traced
functions by them, and its workspace keeps them for the backward.

The sequence call is batch-major (``x: [B, T, I]``) like Keras; a backend may
receive any strides and copies to the layout it prefers. Outputs are always
written in input time order, also when ``options.reverse``: the layer flips
them for ``go_backwards``.

Masking semantics (identical on every backend; they are Keras 3's)::

    processing order: t = 0 .. T-1, or T-1 .. 0 when reverse
    real step   (mask[b, t] True):  c, h updated; output = new h
    masked step (mask[b, t] False): c, h kept;    output = previous output
                                    (zeros before the row's first real
                                    step), or zeros if zero_output_for_mask
    last output (return_sequences=False) = the output of the last step
    processed, i.e. h at the row's last real step when zero_output_for_mask
    is False.

Dropout: ``input_dropout_mask: [B, I]`` multiplies x at every step and
``recurrent_dropout_mask: [B, H]`` multiplies h(t-1) where it enters the
recurrence (not the carried state). Both hold 0 or 1/(1-rate) and are drawn by
the layer, so every backend gives the same numbers for the same seed.

Workspaces: a forward with ``options.training`` returns a ``Workspace`` (a
subclass per backend holding its arrays) that exactly one backward consumes.
A second backward of the same workspace raises RuntimeError on every backend
(the cython and numba_cuda backends reuse its memory for the backward's
results and later calls); run the forward again to backpropagate again.

A backend says what it can do before it is called: ``probe()`` for the
machine (is the library importable, is there a device), ``check_support()`` for
a configuration (dtype, activation). Either raises ``NotImplementedError`` with
the reason, as Keras's fused ``lstm`` calls do.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import numpy as np

#: The activation table: every activation by name, and the number that compiled kernels know it
#: by. One table for every backend: the NumPy and TensorFlow backends key their functions by the
#: names, the CUDA kernels (lstmeng/backends/_cuda_recurrence*.py) and the Cython extension's C enum
#: (ext/lstm_rows.h, exposed as ``_cython_lstm.ACTIVATION_KINDS``) use the codes;
#: tests/test_activations.py checks that each of them matches this table.
ACTIVATION_CODES = {"tanh": 0, "relu": 1, "sigmoid": 2, "linear": 3, "hard_sigmoid": 4}
ACTIVATION_NAMES = {code: name for name, code in ACTIVATION_CODES.items()}
#: Which of them each argument accepts: ``activation`` (the cell input and the cell state) and
#: ``recurrent_activation`` (the gates).
ACTIVATIONS = ("tanh", "relu", "sigmoid", "linear")
RECURRENT_ACTIVATIONS = ("sigmoid", "hard_sigmoid")


def numpy_dtype(array) -> np.dtype:
    """The NumPy dtype of a host array or of a CUDA array of any library.

    torch's dtypes are not NumPy's (``np.dtype(torch.float32)`` raises), so a
    CUDA array's dtype is read from ``__cuda_array_interface__['typestr']``,
    the field torch, CuPy and Numba export alike. (A torch tensor that requires
    grad exports no interface: the RuntimeError is the caller's to explain.)
    """
    dtype = getattr(array, "dtype", None)
    if isinstance(dtype, np.dtype):
        return dtype
    interface = getattr(array, "__cuda_array_interface__", None)
    if interface is not None:
        return np.dtype(interface["typestr"])
    return np.dtype(getattr(dtype, "name", dtype))


@dataclasses.dataclass(frozen=True)
class SequenceOptions:
    """Everything a sequence or cell call computes apart from its arrays (frozen, hashable).

    Build it with ``SequenceOptions.for_call``, which derives the ``has_*``
    flags from the arrays the call passes. Backends key their compiled
    kernels and traced functions by it (or by a projection of it: the flags
    that are compile-time there), and their workspaces keep it.

    Attributes:
        activation: the cell input's and the cell state's activation, one of ACTIVATIONS.
        recurrent_activation: the gates' activation, one of RECURRENT_ACTIVATIONS.
        reverse: process t = T-1 .. 0; outputs still in input order.
        zero_output_for_mask: masked steps output zeros instead of the previous output.
        return_sequences: return ``[B, T, H]`` outputs; otherwise only the last
            processed step's ``[B, H]`` (and keep no ``[B, T, H]`` buffer when
            not training).
        training: keep the workspace that the backward needs. Without it,
            memory beyond the outputs is O(B x H).
        has_bias, has_mask, has_input_dropout, has_recurrent_dropout: the call
            passes a bias, a mask, an input dropout mask, a recurrent dropout
            mask (the array is None exactly when its flag is False).

    Example:
        >>> from lstmeng.backends.base import SequenceOptions
        >>> options = SequenceOptions.for_call(bias=None, mask=None, input_dropout_mask=None,
        ...                                    recurrent_dropout_mask=None, reverse=True)
        >>> options.reverse, options.has_bias, options.activation
        (True, False, 'tanh')
    """

    activation: str = "tanh"
    recurrent_activation: str = "sigmoid"
    reverse: bool = False
    zero_output_for_mask: bool = False
    return_sequences: bool = True
    training: bool = False
    has_bias: bool = True
    has_mask: bool = False
    has_input_dropout: bool = False
    has_recurrent_dropout: bool = False

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"SequenceOptions.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.recurrent_activation not in RECURRENT_ACTIVATIONS:
            raise ValueError(f"SequenceOptions.recurrent_activation must be one of {RECURRENT_ACTIVATIONS}, "
                             f"got {self.recurrent_activation!r}")
        for name in _SEQUENCE_OPTION_FLAGS:   # built once per call: a plain loop, no dataclasses.fields()
            value = getattr(self, name)
            if type(value) is bool:
                continue
            if not isinstance(value, np.bool_):
                raise ValueError(f"SequenceOptions.{name} must be a bool, got {value!r}")
            # np.bool_ and bool hash alike, but a plain bool keeps reprs and compile-time constants simple.
            object.__setattr__(self, name, bool(value))

    @classmethod
    def for_call(cls, *, bias, mask, input_dropout_mask, recurrent_dropout_mask, activation: str = "tanh",
                 recurrent_activation: str = "sigmoid", reverse: bool = False,
                 zero_output_for_mask: bool = False, return_sequences: bool = True,
                 training: bool = False) -> SequenceOptions:
        """The options of a call that passes these optional arrays (each an array or None); the
        flags are taken by truth value, as the layers' arguments are.

        Built once per combination and shared (the options are frozen): constructing and
        checking them took 1.6 us, a tenth of a batch-1 cell step's Python."""
        flags = (bool(reverse), bool(zero_output_for_mask), bool(return_sequences), bool(training),
                 bias is not None, mask is not None, input_dropout_mask is not None,
                 recurrent_dropout_mask is not None)
        key = (cls, activation, recurrent_activation, flags)
        try:
            return _OPTIONS_FOR_CALL[key]
        except (KeyError, TypeError):   # TypeError: an unhashable activation, which cls() rejects
            pass
        options = cls(activation=activation, recurrent_activation=recurrent_activation,
                      **dict(zip(_SEQUENCE_OPTION_FLAGS, flags)))
        _OPTIONS_FOR_CALL[key] = options
        return options

    def check_arrays(self, bias, mask, input_dropout_mask, recurrent_dropout_mask) -> None:
        """ValueError naming the first optional array whose presence disagrees with its flag."""
        for name, flag, array in (("bias", "has_bias", bias), ("mask", "has_mask", mask),
                                  ("input_dropout_mask", "has_input_dropout", input_dropout_mask),
                                  ("recurrent_dropout_mask", "has_recurrent_dropout", recurrent_dropout_mask)):
            if getattr(self, flag) != (array is not None):
                given = "None" if array is None else "an array"
                raise ValueError(f"{name} is {given} but SequenceOptions.{flag} is {getattr(self, flag)}; "
                                 "build the options with SequenceOptions.for_call")


#: SequenceOptions.for_call's options by (class, field values): bounded by the activation table
#: times 2^8 flag combinations, of which a program uses a handful (an entry is made only after
#: the constructor accepted the activations).
_OPTIONS_FOR_CALL: dict = {}

#: SequenceOptions' bool fields (all but the two activations).
_SEQUENCE_OPTION_FLAGS = tuple(field.name for field in dataclasses.fields(SequenceOptions)[2:])


@dataclasses.dataclass
class Workspace:
    """What a training forward keeps for its backward: the base of every backend's workspace.

    Each backend extends it with its own arrays (any layout it likes); the
    caller treats it as opaque and hands it to exactly one backward.

    Attributes:
        options: the forward's SequenceOptions.
        consumed: set by the backward that used it (``consume``).
    """

    options: SequenceOptions
    consumed: bool = dataclasses.field(default=False, init=False)

    def consume(self, backend_name: str) -> None:
        """Mark the workspace used by a backward; RuntimeError if a backward already used it.

        Every backend calls this when its backward starts, so that a second
        backward of one forward fails the same way everywhere.
        """
        if self.consumed:
            raise RuntimeError(f"backend {backend_name!r}: this workspace was already used by a backward (each "
                               "training forward is backpropagated once); run the forward again")
        self.consumed = True


@dataclasses.dataclass
class SequenceForward:
    """What a whole-sequence (or single-step) forward returns.

    Attributes:
        outputs: ``[B, T, H]`` when return_sequences, else ``[B, H]`` (the
            output of the last step processed).
        h: ``[B, H]`` final hidden state (the state after the last real step).
        c: ``[B, H]`` final cell state.
        workspace: a ``Workspace`` for one backward; None when the forward ran
            with ``training=False``. It may reference the ``x`` given to the
            forward instead of copying it (every built-in backend does, to
            keep the theoretical 6H workspace), so callers must not change
            ``x`` in place before the backward.
    """

    outputs: Any
    h: Any
    c: Any
    workspace: Workspace | None = None


@dataclasses.dataclass
class SequenceGrads:
    """What a whole-sequence (or single-step) backward returns.

    Attributes:
        dx: ``[B, T, I]`` (``[B, I]`` for a cell step), or None when the
            backward was asked for no input gradient (``input_grad=False``).
        dh0, dc0: ``[B, H]`` gradients of the initial states (None from a
            backward asked for none: ``state_grads=False``).
        dkernel: ``[I, 4H]``; drecurrent_kernel: ``[H, 4H]``; dbias: ``[4H]``
            (zeros when the layer has no bias; the layer drops it).
        dgates: None, except from ``sequence_backward_gates`` where the
            backend gave the gates' gradient instead of the weight gradients
            (then None): ``[B, 4H]`` dz of a one-step call, gates in Keras's
            order (i, f, c, o).
    """

    dx: Any
    dh0: Any
    dc0: Any
    dkernel: Any
    drecurrent_kernel: Any
    dbias: Any
    dgates: Any = None


class ArrayOps:
    """The array helpers the layers use to stay on a backend's device: NumPy's.

    A backend whose arrays live elsewhere (a GPU, TensorFlow) extends this
    class so that stacked layers never round-trip through the host; its
    helpers keep host arrays given to them on the host (NumPy in, NumPy out).
    Shapes as in the module docstring; ``dtype`` is a NumPy dtype or its name.
    """

    def owns(self, array) -> bool:
        """True when ``array`` is of the kind this backend returns (not a host ndarray here)."""
        return False

    def asarray(self, array, dtype):
        """Convert ``array`` (host or this backend's kind) to this backend's array kind."""
        return np.asarray(array, dtype=dtype)

    def to_numpy(self, array) -> np.ndarray:
        """Copy ``array`` to a host ndarray."""
        return np.asarray(array)

    def zeros(self, shape, dtype):
        """A zero array of this backend's kind."""
        return np.zeros(shape, dtype=dtype)

    def zeros_like(self, array):
        """A zero array of ``array``'s shape and dtype."""
        return self.zeros(tuple(array.shape), array.dtype)

    def zeros_constant(self, shape, dtype):
        """A zero array that the caller promises never to write (default initial states and
        state gradients); an implementation may hand the same array to every call."""
        return self.zeros(shape, dtype)

    def expand_time(self, x):
        """``[B, I]`` -> ``[B, 1, I]``."""
        return x[:, None, :]

    def swap_batch_time(self, x):
        """``[B, T, ...]`` <-> ``[T, B, ...]``."""
        return np.swapaxes(x, 0, 1)

    def flip_time(self, y):
        """Reverse axis 1 of ``[B, T, ...]``."""
        return y[:, ::-1]

    def add(self, a, b):
        """``a + b`` (same shapes)."""
        return a + b

    def multiply(self, a, b):
        """``a * b`` (same shapes)."""
        return a * b

    def scale(self, a, factor: float):
        """``a * factor``."""
        return a * factor

    def concatenate(self, arrays, axis: int = -1):
        """Join ``arrays`` along ``axis`` (device implementations may support the last axis only)."""
        return np.concatenate(arrays, axis=axis)

    def split_last(self, array, sizes):
        """Split the last axis into consecutive pieces of the given sizes."""
        pieces, start = [], 0
        for size in sizes:
            pieces.append(array[..., start:start + size])
            start += size
        return pieces

    def __repr__(self) -> str:
        return f"<lstmeng {type(self).__name__}>"


class InferenceStepSlot:
    """Where a cell keeps its last ``KernelBackend.cell_inference_step`` (or
    ``cell_training_step``) function, with the backend, weights and options it was made for.

    Copies and pickles of the cell get an empty slot: the function closes over the backend,
    which holds locks and buffers that neither ``copy.deepcopy`` nor ``pickle`` can take.
    """

    __slots__ = ("entry",)

    def __init__(self):
        self.entry = None

    def __reduce__(self):
        return type(self), ()

    def step(self, backend, kernel_key, recurrent_key, options, make):
        """The step function kept for these objects (compared by identity: the weights'
        arrays, or what identifies them), else ``make()``'s, kept in their place."""
        entry = self.entry
        if (entry is None or entry[0] is not backend or entry[1] is not kernel_key or entry[2] is not recurrent_key
                or entry[3] is not options):
            entry = self.entry = (backend, kernel_key, recurrent_key, options, make())
        return entry[4]


class KernelBackend(abc.ABC):
    """Base class of every backend (built in or a plugin): the LSTM kernels.

    Subclasses implement ``probe``, ``sequence_forward`` and
    ``sequence_backward``. The single-step cell calls default to a sequence of
    length one; a backend may override them with a dedicated kernel. ``ops``
    is the backend's ``ArrayOps`` (NumPy's by default; backends whose arrays
    live elsewhere set their own).
    """

    #: Registry name, e.g. ``"cython"``.
    name: str = "?"
    #: Float dtypes the backend computes in.
    dtypes: tuple[str, ...] = ("float32", "float64")
    #: True when ``sequence_backward`` takes ``grads_out=`` (a dict of the
    #: caller's weight-gradient arrays to overwrite in place; numba_cuda).
    accepts_grads_out: bool = False
    #: The array helpers for this backend's arrays.
    ops: ArrayOps = ArrayOps()

    # -- what the backend can do -------------------------------------------
    @abc.abstractmethod
    def probe(self) -> str:
        """Return a short description of the device used (e.g. "CPU: AMD EPYC").

        Raises:
            NotImplementedError: with the reason when the backend cannot run on
                this machine (library missing, no GPU, extension not built).
        """

    def check_support(self, dtype, activation: str, recurrent_activation: str) -> None:
        """Raise NotImplementedError with the reason if this configuration is not supported.

        A function of its arguments: ``registry.resolve`` remembers a backend's answer for
        them until ``registry.refresh()``."""
        if np.dtype(dtype).name not in self.dtypes:
            raise NotImplementedError(
                f"backend {self.name!r} computes in {', '.join(self.dtypes)}, not {np.dtype(dtype).name}"
            )
        if activation not in ACTIVATIONS:
            raise NotImplementedError(f"backend {self.name!r} has no activation {activation!r}")
        if recurrent_activation not in RECURRENT_ACTIVATIONS:
            raise NotImplementedError(
                f"backend {self.name!r} has no recurrent_activation {recurrent_activation!r}"
            )

    # -- the fused sequence call --------------------------------------------
    @abc.abstractmethod
    def sequence_forward(self, x, h0, c0, kernel, recurrent_kernel, bias, mask, input_dropout_mask,
                         recurrent_dropout_mask, options: SequenceOptions) -> SequenceForward:
        """Run one LSTM layer in one direction over a whole sequence.

        Args:
            x: ``[B, T, I]`` inputs (B >= 1, T >= 1), the layer's dtype.
            h0, c0: ``[B, H]`` initial states.
            kernel: ``[I, 4H]``.
            recurrent_kernel: ``[H, 4H]``.
            bias: ``[4H]``, or None for no bias.
            mask: ``[B, T]`` bool, True = real step; None = every step real.
            input_dropout_mask: ``[B, I]`` or None.
            recurrent_dropout_mask: ``[B, H]`` or None.
            options: SequenceOptions; its ``has_*`` flags agree with the
                optional arrays above.

        Returns:
            SequenceForward, with a workspace when ``options.training``.
        """

    @abc.abstractmethod
    def sequence_backward(self, doutputs, dh, dc, workspace: Workspace, *,
                          input_grad: bool = True, state_grads: bool = True) -> SequenceGrads:
        """Backward pass of ``sequence_forward``; consumes ``workspace`` (see ``Workspace.consume``).

        Args:
            doutputs: gradient of the outputs, same shape as the forward's
                ``outputs`` (``[B, T, H]`` or ``[B, H]``).
            dh, dc: ``[B, H]`` gradients of the final states (zeros if unused).
            workspace: the forward's workspace; RuntimeError if a backward
                already used it.
            input_grad: False when the caller needs no dx (the first layer on
                embeddings or on data, a frozen input): dx is then None and
                its product ``dz @ kernel^T`` (a third of the backward's
                weight-sized GEMMs) is skipped.
            state_grads: False when the caller needs no gradient of the initial
                states (a layer called without ``initial_state``): dh0 and dc0
                are then None, and a backend may skip the product that forms
                dh0 (the cython backend does: the last step's product with the
                recurrent kernel, the only one of a one-step call).

        Returns:
            SequenceGrads with dx ``[B, T, I]`` (None without ``input_grad``),
            dh0 and dc0 ``[B, H]`` (None without ``state_grads``).
        """

    def sequence_backward_gates(self, doutputs, dh, dc, workspace: Workspace, *,
                                input_grad: bool = True, prefer_gates: bool = False,
                                state_grads: bool = True) -> SequenceGrads:
        """``sequence_backward``, or, where the backend can give it cheaply, the gates'
        gradient in place of the weight gradients: for a caller that adds up the weight
        gradients of many one-step calls (a cell loop) as one product at the end, instead of
        one weight-sized array per step.

        When ``dgates`` (``[B, 4H]``) is not None, dkernel, drecurrent_kernel and dbias are None
        and are, for the forward's x ``[B, 1, I]`` and h0 ``[B, H]``: ``x[:, 0]^T @ dgates``,
        ``h0^T @ dgates`` and ``dgates`` summed over rows. A backend gives it only for a
        one-step call without mask or dropout (where those products are exactly the weight
        gradients); otherwise, and by default, this is ``sequence_backward``.

        ``prefer_gates``: give ``dgates`` wherever the call allows it, also where the backend
        would give the weight gradients for speed (``gives_gates`` False for larger batches,
        whose products it runs well itself): for a caller with one step to form weight
        gradients for, in a layout of its own (``lstmeng.torch.LSTMCell``'s online step, whose
        parameters are the transposes of the contract's weights).

        ``state_grads``: False when the caller needs no gradient of the initial states (a cell
        step on detached states, as online learning runs): dh0 and dc0 are then None, and a
        backend may skip the product that forms dh0 (the cython backend does: for one step,
        the backward's only product with the recurrent kernel); as ``sequence_backward``'s.
        """
        return self.sequence_backward(doutputs, dh, dc, workspace, input_grad=input_grad, state_grads=state_grads)

    def gives_gates(self, workspace: Workspace) -> bool:
        """Whether ``sequence_backward_gates`` of ``workspace`` (not yet consumed) gives ``dgates``
        (False by default): lets a caller choose, right after the forward, between adding up
        the steps' dz itself and taking their weight gradients."""
        return False

    def gates_weight_gradients(self, dgates, inputs, states, *, transposed: bool = True):
        """The weight gradients of one-step calls from their ``dgates``: in the transposed layout
        (PyTorch's ``weight_ih`` and ``weight_hh``) ``(dgates^T @ inputs [4H, I], dgates^T @ states
        [4H, H])``, or without ``transposed`` in the contract's ``(inputs^T @ dgates [I, 4H],
        states^T @ dgates [H, 4H])``; new arrays, for dgates ``[N, 4H]`` (the calls' rows stacked),
        inputs ``[N, I]`` and states ``[N, H]`` (each row's x and h0), host arrays of one dtype.

        None (the default) where the backend has no faster way than the caller's own matrix
        product (``takes_gates_weight_gradients`` False; the caller multiplies then): an optional
        speed-up for a caller that adds up a cell loop's ``dgates`` (``lstmeng.torch.LSTMCell``, and
        ``le.LSTMCell`` without ``transposed``), not a computation every backend owes.
        """
        return None

    def takes_gates_weight_gradients(self, rows: int, inputs: int, units: int, dtype) -> bool:
        """Whether ``gates_weight_gradients`` forms the products for these sizes and dtype (False by
        default): lets a caller choose, before a step's backward, to ask for ``dgates``."""
        return False

    # -- the single-step cell --------------------------------------------------
    def cell_forward(self, x, h, c, kernel, recurrent_kernel, bias, input_dropout_mask,
                     recurrent_dropout_mask, options: SequenceOptions) -> SequenceForward:
        """One LSTM step.

        Args:
            x: ``[B, I]``.
            h, c: ``[B, H]`` states before the step.
            kernel, recurrent_kernel, bias, input_dropout_mask,
                recurrent_dropout_mask: as for ``sequence_forward``.
            options: SequenceOptions of one step: no mask, return_sequences False.

        Returns:
            SequenceForward whose outputs is the new h ``[B, H]``.
        """
        if options.has_mask or options.return_sequences:
            raise ValueError("cell_forward takes the options of one step: has_mask and return_sequences "
                             f"must be False, got {options}")
        return self.sequence_forward(self.ops.expand_time(x), h, c, kernel, recurrent_kernel, bias, None,
                                     input_dropout_mask, recurrent_dropout_mask, options)

    def cell_inference_step(self, kernel, recurrent_kernel, options: SequenceOptions):
        """A function ``step(x, h, c, bias) -> (h_new, c_new)`` for a loop of inference steps
        with these weights: what ``cell_forward(x, h, c, kernel, recurrent_kernel, bias, None,
        None, options)`` gives as its ``h`` and ``c``.

        Args:
            kernel, recurrent_kernel: as for ``sequence_forward``. The function reads them at
                every call, so in-place changes of their values are seen; a caller that replaces
                the arrays asks for a new function.
            options: SequenceOptions of one inference step: no mask, no dropout, training and
                return_sequences False.

        A backend overrides it to do once what depends only on the weights and options (the
        default calls ``cell_forward``, which prepares them at every call): a per-step loop at
        batch 1 spends most of its time outside the arithmetic.
        """
        if (options.training or options.has_mask or options.return_sequences or options.has_input_dropout
                or options.has_recurrent_dropout):
            raise ValueError("cell_inference_step takes the options of one inference step without mask or "
                             f"dropout, got {options}")

        def step(x, h, c, bias):
            result = self.cell_forward(x, h, c, kernel, recurrent_kernel, bias, None, None, options)
            return result.h, result.c

        return step

    def cell_training_step(self, kernel, recurrent_kernel, options: SequenceOptions):
        """A function ``step(x, h, c, bias) -> (h_new, c_new, workspace)`` for a loop of training
        steps with these weights: what ``cell_forward(x, h, c, kernel, recurrent_kernel, bias,
        None, None, options)`` gives as its ``h``, ``c`` and ``workspace``, which goes to
        ``cell_backward`` or ``sequence_backward_gates`` (with doutputs ``[B, H]``) as that
        call's would.

        Args:
            kernel, recurrent_kernel: as for ``cell_inference_step`` (read at every call).
            options: SequenceOptions of one training step: no mask, no dropout, training True,
                return_sequences False.

        The same bargain as ``cell_inference_step``: a backend overrides it to do once what
        depends only on the weights and options (the default calls ``cell_forward``).
        """
        if (not options.training or options.has_mask or options.return_sequences or options.has_input_dropout
                or options.has_recurrent_dropout):
            raise ValueError("cell_training_step takes the options of one training step without mask or "
                             f"dropout, got {options}")

        def step(x, h, c, bias):
            result = self.cell_forward(x, h, c, kernel, recurrent_kernel, bias, None, None, options)
            return result.h, result.c, result.workspace

        return step

    def cell_backward(self, dh, dc, workspace: Workspace) -> SequenceGrads:
        """Backward of ``cell_forward``: dh, dc ``[B, H]`` of the new states; consumes ``workspace``.

        Returns SequenceGrads with dx ``[B, I]``.
        """
        grads = self.sequence_backward(self.ops.zeros_like(dh), dh, dc, workspace)
        grads.dx = grads.dx[:, 0, :]
        return grads

    def __repr__(self) -> str:
        return f"<lstmeng backend {self.name!r}>"
