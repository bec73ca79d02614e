"""The "cython" backend: fused, BLAS-backed LSTM kernels on the CPU.

The kernels live in the compiled extension ``lstmeng.backends._cython_lstm``
(source ``ext/_cython_lstm.pyx`` and ``ext/lstm_rows.h``); this module only
prepares arrays, chooses the layout and allocates the outputs and workspace.
See the extension's module comment for the packed time-major layout.

Right-padded masks (every row's mask is a prefix, as from ``lengths``) take
the variable-length path: rows are sorted by length once and each step only
computes the rows still running, so a batch with lengths spread over 1..T
costs about half of the full batch. Any other mask takes the general path,
which checks the mask per row and step.

Threads: the GEMMs run on the BLAS library's own thread pool (scipy's
OpenBLAS, sized by ``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS`` at start-up);
the elementwise passes run on the calling thread, so no second pool ever
spins against BLAS's. The GIL is released for the whole sequence, so layers
on different Python threads run in parallel.

Example:
    >>> import numpy as np, lstmeng as le
    >>> layer = le.LSTM(8, return_sequences=True, backend="cython", seed=0)
    >>> layer(np.zeros((2, 5, 3), np.float32)).shape
    (2, 5, 8)
"""

from __future__ import annotations

import dataclasses
import os
import platform

import numpy as np

from lstmeng.backends.base import Backend, SequenceForward, SequenceGrads

try:
    from lstmeng.backends import _cython_lstm
except ImportError as error:  # not built (e.g. a source checkout without a compiler)
    _cython_lstm = None
    _IMPORT_ERROR = error
else:
    _IMPORT_ERROR = None

#: Inference computes the input projection this many packed rows at a time
#: (at least one step), so no [T, B, 4H] buffer is kept without training.
INFERENCE_CHUNK_ROWS = 1024


def num_threads() -> int:
    """Threads the backend may use: ``OMP_NUM_THREADS`` if set, else the CPUs this process may run on."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclasses.dataclass
class _Layout:
    """Which packed rows each step owns (see ``ext/_cython_lstm.pyx``).

    order: [B] caller's row of each packed row; active: [T] rows in step t;
    offsets: [T + 1] first packed row of step t; mask: [B, T] uint8 for the
    general path, None when every packed row is a real step.
    """

    order: np.ndarray
    active: np.ndarray
    offsets: np.ndarray
    mask: np.ndarray | None


def _layout(mask, batch: int, steps: int, packed_variable_length: bool) -> _Layout:
    """Choose the general or the variable-length (sorted, shrinking) layout for ``mask`` [B, T]."""
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        lengths = mask.sum(axis=1)
        is_right_padded = np.array_equal(mask, np.arange(steps)[None, :] < lengths[:, None])
        if is_right_padded and bool((lengths == steps).all()):
            mask = None  # every step real
        elif is_right_padded and packed_variable_length:
            order = np.argsort(-lengths, kind="stable").astype(np.intp)
            # active[t] = rows longer than t; with rows sorted these are the first active[t].
            shorter_or_equal = np.cumsum(np.bincount(lengths, minlength=steps + 1))[:steps]
            active = (batch - shorter_or_equal).astype(np.intp)
            offsets = np.concatenate([[0], np.cumsum(active)]).astype(np.intp)
            return _Layout(order, active, offsets, None)
    identity = np.arange(batch, dtype=np.intp)
    active = np.full(steps, batch, dtype=np.intp)
    offsets = np.arange(steps + 1, dtype=np.intp) * batch
    mask_bytes = None if mask is None else np.ascontiguousarray(mask).view(np.uint8)
    return _Layout(identity, active, offsets, mask_bytes)


@dataclasses.dataclass
class _Workspace:
    """What the backward needs, all in packed row order (N packed rows).

    packed_x: [N, I] inputs after input dropout; gates: [N, 4H] activated
    gates (the backward overwrites them with their gradients); c_prev,
    cell_act, h_in: [N, H] c(t-1), activation(c(t)) and h(t-1) after
    recurrent dropout.
    """

    layout: _Layout
    packed_x: np.ndarray
    gates: np.ndarray
    c_prev: np.ndarray
    cell_act: np.ndarray
    h_in: np.ndarray
    kernel: np.ndarray
    recurrent_kernel: np.ndarray
    input_dropout_mask: np.ndarray | None
    recurrent_dropout_mask: np.ndarray | None
    activation: str
    recurrent_activation: str
    reverse: bool
    zero_output_for_mask: bool
    return_sequences: bool
    input_shape: tuple
    consumed: bool = False


def _specialization(kernel, dtype):
    """The float or double version of a fused kernel, chosen explicitly: Cython's
    automatic choice looks at the first array argument, which may be None."""
    return kernel["float" if np.dtype(dtype) == np.float32 else "double"]


def _contiguous(array, dtype):
    return None if array is None else np.ascontiguousarray(array, dtype=dtype)


class CythonBackend(Backend):
    """Fused Cython kernels with BLAS GEMMs (float32 and float64, every activation).

    Args:
        packed_variable_length: take the sorted, shrinking-batch path for
            right-padded masks (the default); False forces the general
            masked path, which gives the same numbers (tests compare them).
    """

    name = "cython"

    def __init__(self, packed_variable_length: bool = True):
        self.packed_variable_length = packed_variable_length

    def probe(self) -> str:
        if _cython_lstm is None:
            raise NotImplementedError(f"the compiled extension lstmeng.backends._cython_lstm "
                                      f"is not built: {_IMPORT_ERROR}")
        return f"CPU: {cpu_name()} ({num_threads()} threads, BLAS via scipy)"

    def sequence_forward(self, x, h0, c0, kernel, recurrent_kernel, bias, mask=None, *,
                         activation="tanh", recurrent_activation="sigmoid", reverse=False,
                         zero_output_for_mask=False, return_sequences=True,
                         input_dropout_mask=None, recurrent_dropout_mask=None, training=False):
        x = np.asarray(x)
        dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)
        x = np.ascontiguousarray(x, dtype=dtype)
        batch, steps, features = x.shape
        units = np.shape(recurrent_kernel)[0]
        kernel = _contiguous(kernel, dtype)
        recurrent_kernel = _contiguous(recurrent_kernel, dtype)
        bias = _contiguous(bias, dtype)
        h0, c0 = _contiguous(h0, dtype), _contiguous(c0, dtype)
        input_dropout_mask = _contiguous(input_dropout_mask, dtype)
        recurrent_dropout_mask = _contiguous(recurrent_dropout_mask, dtype)
        layout = _layout(mask, batch, steps, self.packed_variable_length)

        sequence_outputs = np.empty((batch, steps, units), dtype) if return_sequences else None
        last_output = None if return_sequences else np.empty((batch, units), dtype)
        h_out, c_out = np.empty((batch, units), dtype), np.empty((batch, units), dtype)
        if training:
            rows = int(layout.offsets[-1])
            chunk_steps = steps
            packed_x = np.empty((rows, features), dtype)
            gates = np.empty((rows, 4 * units), dtype)
            c_prev, cell_act, h_in = (np.empty((rows, units), dtype) for _ in range(3))
        else:
            chunk_steps = max(1, min(steps, INFERENCE_CHUNK_ROWS // max(batch, 1)))
            packed_x = np.empty((chunk_steps * batch, features), dtype)
            gates = np.empty((chunk_steps * batch, 4 * units), dtype)
            c_prev = cell_act = h_in = None
        h_state, c_state, h_in_step = (np.empty((batch, units), dtype) for _ in range(3))

        _specialization(_cython_lstm.forward, dtype)(
            x, h0, c0, kernel, recurrent_kernel, bias, layout.mask,
            input_dropout_mask, recurrent_dropout_mask,
            layout.order, layout.active, layout.offsets,
            _cython_lstm.ACTIVATION_KINDS[activation], _cython_lstm.ACTIVATION_KINDS[recurrent_activation],
            reverse, zero_output_for_mask, sequence_outputs, last_output, h_out, c_out,
            packed_x, gates, c_prev, cell_act, h_in, h_state, c_state, h_in_step, chunk_steps)

        workspace = None
        if training:
            workspace = _Workspace(
                layout=layout, packed_x=packed_x, gates=gates, c_prev=c_prev, cell_act=cell_act,
                h_in=h_in, kernel=kernel, recurrent_kernel=recurrent_kernel,
                input_dropout_mask=input_dropout_mask, recurrent_dropout_mask=recurrent_dropout_mask,
                activation=activation, recurrent_activation=recurrent_activation, reverse=reverse,
                zero_output_for_mask=zero_output_for_mask, return_sequences=return_sequences,
                input_shape=x.shape)
        outputs = sequence_outputs if return_sequences else last_output
        return SequenceForward(outputs=outputs, h=h_out, c=c_out, workspace=workspace)

    def sequence_backward(self, doutputs, dh, dc, workspace):
        ws = workspace
        if ws.consumed:
            raise RuntimeError("this forward's workspace was already used by a backward "
                               "(the cython backend overwrites it); run the forward again")
        ws.consumed = True
        dtype = ws.gates.dtype
        batch, steps, features = ws.input_shape
        units = ws.recurrent_kernel.shape[0]
        doutputs = np.ascontiguousarray(doutputs, dtype=dtype)
        dx = np.zeros((batch, steps, features), dtype)
        dh0, dc0 = np.empty((batch, units), dtype), np.empty((batch, units), dtype)
        dkernel = np.empty((features, 4 * units), dtype)
        drecurrent_kernel = np.empty((units, 4 * units), dtype)
        dbias = np.empty(4 * units, dtype)
        layout = ws.layout
        _specialization(_cython_lstm.backward, dtype)(
            doutputs if ws.return_sequences else None, None if ws.return_sequences else doutputs,
            _contiguous(dh, dtype), _contiguous(dc, dtype), ws.kernel, ws.recurrent_kernel,
            layout.mask, ws.input_dropout_mask, ws.recurrent_dropout_mask,
            layout.order, layout.active, layout.offsets,
            _cython_lstm.ACTIVATION_KINDS[ws.activation],
            _cython_lstm.ACTIVATION_KINDS[ws.recurrent_activation],
            ws.reverse, ws.zero_output_for_mask,
            ws.packed_x, ws.gates, ws.c_prev, ws.cell_act, ws.h_in,
            dx, dh0, dc0, dkernel, drecurrent_kernel, dbias)
        return SequenceGrads(dx=dx, dh0=dh0, dc0=dc0, dkernel=dkernel,
                             drecurrent_kernel=drecurrent_kernel, dbias=dbias)


backend = CythonBackend()
