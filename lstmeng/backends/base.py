"""The backend contract: what every lstmeng backend implements.

A backend computes one LSTM layer in one direction over a whole sequence, and
its explicit backward pass. It knows nothing of layers, masks given as lengths,
go_backwards flips, Bidirectional merges or stacking: the layers in
``lstmeng.layers`` reduce all of those to calls of this contract.

Shapes use these letters: B batch rows, T time steps, I input features,
H units. Weights use Keras's layout and gate order (input, forget, cell
candidate, output)::

    kernel:           [I, 4H]
    recurrent_kernel: [H, 4H]
    bias:             [4H]

The sequence call is batch-major (``x: [B, T, I]``) like Keras; a backend may
receive any strides and copies to the layout it prefers. Outputs are always
written in input time order, also when ``reverse=True``: the layer flips them
for ``go_backwards``.

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


@dataclasses.dataclass
class SequenceForward:
    """What a whole-sequence forward returns.

    Attributes:
        outputs: ``[B, T, H]`` when return_sequences, else ``[B, H]`` (the
            output of the last step processed).
        h: ``[B, H]`` final hidden state (the state after the last real step).
        c: ``[B, H]`` final cell state.
        workspace: opaque object for ``sequence_backward``; None when the
            forward ran with ``training=False``. It may reference the ``x``
            given to the forward instead of copying it (every built-in backend
            does, to keep the theoretical 6H workspace), so callers must not
            change ``x`` in place before the backward.
    """

    outputs: Any
    h: Any
    c: Any
    workspace: Any = None


@dataclasses.dataclass
class SequenceGrads:
    """What a whole-sequence (or single-step) backward returns.

    Attributes:
        dx: ``[B, T, I]`` (``[B, I]`` for a cell step).
        dh0, dc0: ``[B, H]`` gradients of the initial states.
        dkernel: ``[I, 4H]``; drecurrent_kernel: ``[H, 4H]``; dbias: ``[4H]``
            (zeros when the layer has no bias; the layer drops it).
    """

    dx: Any
    dh0: Any
    dc0: Any
    dkernel: Any
    drecurrent_kernel: Any
    dbias: Any


class Backend(abc.ABC):
    """Base class of every backend (built in or a plugin).

    Subclasses implement ``probe``, ``sequence_forward`` and
    ``sequence_backward``. The single-step cell calls default to a sequence of
    length one; a backend may override them with a dedicated kernel. The array
    helpers at the end default to NumPy; backends whose arrays live elsewhere
    (a GPU, TensorFlow) override them so that stacked layers never round-trip
    through the host.
    """

    #: Registry name, e.g. ``"cython"``.
    name: str = "?"
    #: Float dtypes the backend computes in.
    dtypes: tuple[str, ...] = ("float32", "float64")
    #: True when ``sequence_backward`` takes ``grads_out=`` (a dict of the
    #: caller's weight-gradient arrays to overwrite in place; numba_cuda).
    accepts_grads_out: bool = False

    # -- what the backend can do -------------------------------------------
    @abc.abstractmethod
    def probe(self) -> str:
        """Return a short description of the device used (e.g. "CPU: AMD EPYC").

        Raises:
            NotImplementedError: with the reason when the backend cannot run on
                this machine (library missing, no GPU, extension not built).
        """

    def check_support(self, dtype, activation: str, recurrent_activation: str) -> None:
        """Raise NotImplementedError with the reason if this configuration is not supported."""
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
    def sequence_forward(
        self,
        x,
        h0,
        c0,
        kernel,
        recurrent_kernel,
        bias,
        mask=None,
        *,
        activation: str = "tanh",
        recurrent_activation: str = "sigmoid",
        reverse: bool = False,
        zero_output_for_mask: bool = False,
        return_sequences: bool = True,
        input_dropout_mask=None,
        recurrent_dropout_mask=None,
        training: bool = False,
    ) -> SequenceForward:
        """Run one LSTM layer in one direction over a whole sequence.

        Args:
            x: ``[B, T, I]`` inputs (B >= 1, T >= 1), the layer's dtype.
            h0, c0: ``[B, H]`` initial states.
            kernel: ``[I, 4H]``; recurrent_kernel: ``[H, 4H]``; bias: ``[4H]``
                or None for no bias.
            mask: ``[B, T]`` bool, True = real step; None = every step real.
            activation, recurrent_activation: names from ACTIVATIONS and
                RECURRENT_ACTIVATIONS.
            reverse: process t = T-1 .. 0; outputs still in input order.
            zero_output_for_mask: masked steps output zeros instead of the
                previous output.
            return_sequences: return ``[B, T, H]`` outputs; otherwise only the
                last processed step's ``[B, H]`` (and keep no ``[B, T, H]``
                buffer when not training).
            input_dropout_mask: ``[B, I]`` or None; recurrent_dropout_mask:
                ``[B, H]`` or None.
            training: keep the workspace that ``sequence_backward`` needs.
                Without it, memory beyond the outputs is O(B x H).

        Returns:
            SequenceForward.
        """

    @abc.abstractmethod
    def sequence_backward(self, doutputs, dh, dc, workspace) -> SequenceGrads:
        """Backward pass of ``sequence_forward``.

        Args:
            doutputs: gradient of the outputs, same shape as the forward's
                ``outputs`` (``[B, T, H]`` or ``[B, H]``).
            dh, dc: ``[B, H]`` gradients of the final states (zeros if unused).
            workspace: the forward's workspace, consumed as is.

        Returns:
            SequenceGrads with dx ``[B, T, I]``.
        """

    # -- the single-step cell --------------------------------------------------
    def cell_forward(
        self,
        x,
        h,
        c,
        kernel,
        recurrent_kernel,
        bias,
        *,
        activation: str = "tanh",
        recurrent_activation: str = "sigmoid",
        input_dropout_mask=None,
        recurrent_dropout_mask=None,
        training: bool = False,
    ) -> SequenceForward:
        """One LSTM step. x: ``[B, I]``; h, c: ``[B, H]``.

        Returns SequenceForward whose outputs is the new h ``[B, H]``.
        """
        forward = self.sequence_forward(
            self.expand_time(x), h, c, kernel, recurrent_kernel, bias, None,
            activation=activation, recurrent_activation=recurrent_activation,
            return_sequences=False, input_dropout_mask=input_dropout_mask,
            recurrent_dropout_mask=recurrent_dropout_mask, training=training,
        )
        return forward

    def cell_backward(self, dh, dc, workspace) -> SequenceGrads:
        """Backward of ``cell_forward``: dh, dc ``[B, H]`` of the new states.

        Returns SequenceGrads with dx ``[B, I]``.
        """
        grads = self.sequence_backward(self.zeros_like(dh), dh, dc, workspace)
        grads.dx = grads.dx[:, 0, :]
        return grads

    # -- array helpers (NumPy defaults) ---------------------------------------
    def owns(self, array) -> bool:
        """True when ``array`` is of the kind this backend returns (not a host ndarray by default)."""
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
        return self.zeros(tuple(array.shape), array.dtype)

    def zeros_constant(self, shape, dtype):
        """A zero array that the caller promises never to write (default initial states and
        state gradients); a backend may hand the same array to every call."""
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
        return a + b

    def multiply(self, a, b):
        return a * b

    def scale(self, a, factor: float):
        return a * factor

    def concatenate(self, arrays, axis: int = -1):
        return np.concatenate(arrays, axis=axis)

    def split_last(self, array, sizes):
        """Split the last axis into consecutive pieces of the given sizes."""
        pieces, start = [], 0
        for size in sizes:
            pieces.append(array[..., start:start + size])
            start += size
        return pieces

    def __repr__(self) -> str:
        return f"<lstmeng backend {self.name!r}>"
