"""TensorFlow backend: the whole-sequence forward and backward in TF ops inside ``tf.function``.

The forward is one matmul for every step's input projection and a
``tf.while_loop`` over time for the recurrence; the backward is written out
step by step (not obtained by differentiating the loop), from the same
workspace the other backends keep, with the weight gradients as matmuls over
all steps at the end. Inputs may be ``tf.Tensor`` or NumPy arrays; results are
``tf.Tensor``. Because it is plain TF, the computation runs inside
``tf.function``, under ``jit_compile=True`` (XLA) and on any TF device.

TensorFlow is imported when the registry first loads this module, never by
``import lstmeng``.

Each configuration (the call's ``SequenceOptions`` and the dtype) gets one
``tf.function`` with an ``input_signature`` whose batch, time and feature
sizes are ``None``: new shapes do not retrace.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from lstmeng.backends.base import ArrayOps, KernelBackend, SequenceForward, SequenceGrads, SequenceOptions, Workspace

try:
    import tensorflow as tf
except ImportError as error:  # the backend shows as unavailable with this reason
    tf = None
    _IMPORT_ERROR = f"tensorflow is not installed ({error})"
except Exception as error:  # a broken install must not break lstmeng either
    tf = None
    _IMPORT_ERROR = f"tensorflow failed to import: {type(error).__name__}: {error}"
else:
    _IMPORT_ERROR = None


# -- activations and their derivatives written from the activation's output ----------
def _hard_sigmoid(x):
    # Keras 3's definition: clip(x / 6 + 0.5, 0, 1).
    return tf.clip_by_value(x / 6.0 + 0.5, 0.0, 1.0)


def _activation(name):
    return {"tanh": tf.tanh, "relu": tf.nn.relu, "sigmoid": tf.sigmoid,
            "hard_sigmoid": _hard_sigmoid, "linear": tf.identity}[name]


def _derivative_from_output(name):
    def tanh(y):
        return 1.0 - y * y

    def relu(y):
        return tf.cast(y > 0, y.dtype)

    def sigmoid(y):
        return y * (1.0 - y)

    def hard_sigmoid(y):
        # Flat outside (0, 1); slope 1/6 inside.
        return tf.cast((y > 0) & (y < 1), y.dtype) / 6.0

    def linear(y):
        return tf.ones_like(y)

    return {"tanh": tanh, "relu": relu, "sigmoid": sigmoid,
            "hard_sigmoid": hard_sigmoid, "linear": linear}[name]


@dataclasses.dataclass
class _Workspace(Workspace):
    """What the backward needs, time-major and in input time order (TF tensors).

    dtype: the forward's dtype name (with the options, the key of the traced
    backward); x: [B, T, I] the input tensor the forward was given (before
    input dropout), referenced, not copied; h_in: [T, B, H] h(t-1) as it
    entered the recurrence (after recurrent dropout); c_prev: [T, B, H];
    gates: [T, B, 4H] activated gates (i, f, g, o); mask: [B, T] bool or
    None; seen_before: [T, B] bool, a real step came earlier in processing
    order; last_real: [B] bool, the last output equals the final h on this
    row (both None without a mask); kernel: [I, 4H]; recurrent_kernel:
    [H, 4H]; input_dropout_mask: [B, I] or None; recurrent_dropout_mask:
    [B, H] or None.

    That is 6H values per (row, step), the theoretical workspace: the
    backward recomputes activation(c(t)) from the gates and c(t-1), and
    re-applies the [B, I] input dropout mask to x.
    """

    dtype: str
    x: object
    h_in: object
    c_prev: object
    gates: object
    mask: object
    seen_before: object
    last_real: object
    kernel: object
    recurrent_kernel: object
    input_dropout_mask: object
    recurrent_dropout_mask: object


def _time_index(step, steps, reverse: bool):
    """The time index of processing step ``step``: t = step, or T-1-step when reverse."""
    return steps - 1 - step if reverse else step


def _forward_graph(options: SequenceOptions, x, h0, c0, kernel, recurrent_kernel, bias, mask,
                   input_dropout_mask, recurrent_dropout_mask):
    """The traced forward. x: [B, T, I]; h0, c0: [B, H]; mask: [B, T] bool.

    Returns (outputs, h, c) and, when training, the workspace tensors
    (h_in, c_prev, gates, seen_before, last_real).
    """
    act = _activation(options.activation)
    ract = _activation(options.recurrent_activation)
    dtype = x.dtype
    x_tb = tf.transpose(x, [1, 0, 2])  # [T, B, I]
    if options.has_input_dropout:
        x_tb = x_tb * input_dropout_mask[None]
    steps, batch, features = tf.shape(x_tb)[0], tf.shape(x_tb)[1], tf.shape(x_tb)[2]
    units = tf.shape(recurrent_kernel)[0]
    # One matmul for every step's input projection: [T*B, I] @ [I, 4H].
    projection = tf.reshape(tf.matmul(tf.reshape(x_tb, [steps * batch, features]), kernel),
                            [steps, batch, 4 * units])
    if options.has_bias:
        projection = projection + bias
    mask_tb = tf.transpose(mask) if options.has_mask else None  # [T, B]

    def new_array():
        return tf.TensorArray(dtype, size=steps, element_shape=None)

    carry = {
        "h": h0, "c": c0, "previous_output": tf.zeros_like(h0),
    }
    if options.has_mask:
        carry["seen"] = tf.zeros([batch], tf.bool)
    if options.return_sequences:
        carry["outputs"] = new_array()
    if options.training:
        for name in ("h_in", "c_prev", "gates"):
            carry[name] = new_array()
        if options.has_mask:
            carry["seen_before"] = tf.TensorArray(tf.bool, size=steps)

    def body(step, carry):
        carry = dict(carry)
        t = _time_index(step, steps, options.reverse)
        h, c = carry["h"], carry["c"]
        h_in = h * recurrent_dropout_mask if options.has_recurrent_dropout else h
        z = projection[t] + tf.matmul(h_in, recurrent_kernel)
        z_i, z_f, z_g, z_o = tf.split(z, 4, axis=1)
        i, f, g, o = ract(z_i), ract(z_f), act(z_g), ract(z_o)
        c_new = f * c + i * g
        cell_act = act(c_new)
        h_new = o * cell_act
        if options.training:
            carry["h_in"] = carry["h_in"].write(t, h_in)
            carry["c_prev"] = carry["c_prev"].write(t, c)
            carry["gates"] = carry["gates"].write(t, tf.concat([i, f, g, o], axis=1))
        if options.has_mask:
            real_rows = mask_tb[t]
            real = real_rows[:, None]
            if options.training:
                carry["seen_before"] = carry["seen_before"].write(t, carry["seen"])
            carry["seen"] = carry["seen"] | real_rows
            carry["h"] = tf.where(real, h_new, h)
            carry["c"] = tf.where(real, c_new, c)
            skipped = tf.zeros_like(h_new) if options.zero_output_for_mask else carry["previous_output"]
            output = tf.where(real, h_new, skipped)
        else:
            carry["h"], carry["c"], output = h_new, c_new, h_new
        carry["previous_output"] = output
        if options.return_sequences:
            carry["outputs"] = carry["outputs"].write(t, output)
        return step + 1, carry

    _, carry = tf.while_loop(lambda step, _: step < steps, body, (tf.constant(0), carry))
    if options.return_sequences:
        outputs = tf.transpose(carry["outputs"].stack(), [1, 0, 2])  # [B, T, H]
    else:
        outputs = carry["previous_output"]
    results = [outputs, carry["h"], carry["c"]]
    if options.training:
        results += [carry[name].stack() for name in ("h_in", "c_prev", "gates")]
        if options.has_mask:
            if options.zero_output_for_mask:
                last_real = mask_tb[0] if options.reverse else mask_tb[-1]
            else:
                last_real = tf.reduce_any(mask_tb, axis=0)
            results += [carry["seen_before"].stack(), last_real]
    return tuple(results)


def _backward_graph(options: SequenceOptions, doutputs, dh, dc, x, h_in, c_prev, gates,
                    mask, seen_before, last_real, kernel, recurrent_kernel,
                    input_dropout_mask, recurrent_dropout_mask):
    """The traced backward. doutputs: [B, T, H] or [B, H]; dh, dc: [B, H]; the
    workspace tensors as in ``_Workspace``. Returns (dx, dh0, dc0, dkernel,
    drecurrent_kernel, dbias)."""
    act = _activation(options.activation)
    dact = _derivative_from_output(options.activation)
    dract = _derivative_from_output(options.recurrent_activation)
    steps, batch = tf.shape(c_prev)[0], tf.shape(c_prev)[1]
    units = tf.shape(c_prev)[2]
    mask_tb = tf.transpose(mask) if options.has_mask else None  # [T, B]
    if options.return_sequences:
        doutputs_tb = tf.transpose(doutputs, [1, 0, 2])
    else:
        # The last output is the final h on the rows where it is not zero.
        dh = dh + (tf.where(last_real[:, None], doutputs, tf.zeros_like(doutputs))
                   if options.has_mask else doutputs)
    recurrent_t = tf.transpose(recurrent_kernel)

    def body(step, dh, dc, gate_grads):
        # Backward runs against the processing order.
        t = _time_index(step, steps, not options.reverse)
        if options.return_sequences:
            dy = doutputs_tb[t]
            if options.has_mask:
                real = mask_tb[t][:, None]
                # A masked step's output is the carried h once a real step came
                # before it (and not zeroed); its gradient joins dh.
                reaches_h = real
                if not options.zero_output_for_mask:
                    reaches_h = reaches_h | seen_before[t][:, None]
                dy = tf.where(reaches_h, dy, tf.zeros_like(dy))
            dh_total = dh + dy
        else:
            dh_total = dh
        i, f, g, o = tf.split(gates[t], 4, axis=1)
        # activation(c(t)), recomputed exactly as the forward computed it.
        activated_cell = act(f * c_prev[t] + i * g)
        do = dh_total * activated_cell
        dc_total = dc + dh_total * o * dact(activated_cell)
        di = dc_total * g
        dg = dc_total * i
        df = dc_total * c_prev[t]
        dc_prev = dc_total * f
        dz = tf.concat([di * dract(i), df * dract(f), dg * dact(g), do * dract(o)], axis=1)
        dh_prev = tf.matmul(dz, recurrent_t)
        if options.has_recurrent_dropout:
            dh_prev = dh_prev * recurrent_dropout_mask
        if options.has_mask:
            real = mask_tb[t][:, None]
            dz = tf.where(real, dz, tf.zeros_like(dz))
            dh_next = tf.where(real, dh_prev, dh_total)
            dc_next = tf.where(real, dc_prev, dc)
        else:
            dh_next, dc_next = dh_prev, dc_prev
        return step + 1, dh_next, dc_next, gate_grads.write(t, dz)

    gate_grads = tf.TensorArray(c_prev.dtype, size=steps)
    _, dh0, dc0, gate_grads = tf.while_loop(
        lambda step, *_: step < steps, body, (tf.constant(0), dh, dc, gate_grads))
    # Weight gradients as matmuls over all steps: [T*B, .]^T @ [T*B, 4H].
    gate_grads = gate_grads.stack()  # [T, B, 4H]
    flat_gate_grads = tf.reshape(gate_grads, [steps * batch, 4 * units])
    features = tf.shape(x)[2]
    # dkernel meets x in its own batch-major layout; x times the input
    # dropout mask is a temporary here, the forward keeps x only.
    x_in = x * input_dropout_mask[:, None, :] if options.has_input_dropout else x
    dkernel = tf.matmul(tf.reshape(x_in, [batch * steps, features]),
                        tf.reshape(tf.transpose(gate_grads, [1, 0, 2]), [batch * steps, 4 * units]),
                        transpose_a=True)
    drecurrent_kernel = tf.matmul(tf.reshape(h_in, [steps * batch, units]), flat_gate_grads, transpose_a=True)
    dbias = tf.reduce_sum(flat_gate_grads, axis=0)
    dx_tb = tf.reshape(tf.matmul(flat_gate_grads, kernel, transpose_b=True), [steps, batch, features])
    if options.has_input_dropout:
        dx_tb = dx_tb * input_dropout_mask[None]
    dx = tf.transpose(dx_tb, [1, 0, 2])
    return dx, dh0, dc0, dkernel, drecurrent_kernel, dbias


def _spec(rank, dtype):
    return tf.TensorSpec([None] * rank, dtype)


class TensorflowArrayOps(ArrayOps):
    """The array helpers in TF ops (``tf.Tensor`` and ``tf.Variable`` in, ``tf.Tensor`` out).

    They keep the kind they are given: on host arrays (a layer called with
    NumPy, whose results were already copied out) they are NumPy's, so NumPy in
    gives NumPy out.
    """

    def owns(self, array) -> bool:
        return tf is not None and isinstance(array, (tf.Tensor, tf.Variable))

    def asarray(self, array, dtype):
        dtype = _tf_dtype(dtype)
        if self.owns(array):
            return array if array.dtype == dtype else tf.cast(array, dtype)
        return tf.convert_to_tensor(np.asarray(array, dtype=dtype.as_numpy_dtype))

    def to_numpy(self, array) -> np.ndarray:
        if self.owns(array):
            return array.numpy()
        return np.asarray(array)

    def zeros(self, shape, dtype):
        return tf.zeros(shape, _tf_dtype(dtype))

    def zeros_like(self, array):
        return tf.zeros_like(array)

    def expand_time(self, x):
        return tf.expand_dims(x, 1)

    # The array helpers keep the kind they are given: on host arrays (a layer called with NumPy,
    # whose results were already copied out) they are NumPy's, so NumPy in gives NumPy out.
    def swap_batch_time(self, x):
        if not self.owns(x):
            return super().swap_batch_time(x)
        rank = len(x.shape)
        return tf.transpose(x, [1, 0] + list(range(2, rank)))

    def flip_time(self, y):
        return tf.reverse(y, axis=[1]) if self.owns(y) else super().flip_time(y)

    def add(self, a, b):
        return tf.add(a, b) if self.owns(a) or self.owns(b) else super().add(a, b)

    def multiply(self, a, b):
        return tf.multiply(a, b) if self.owns(a) or self.owns(b) else super().multiply(a, b)

    def scale(self, a, factor: float):
        return a * tf.cast(factor, a.dtype) if self.owns(a) else super().scale(a, factor)

    def concatenate(self, arrays, axis: int = -1):
        arrays = list(arrays)
        if not any(self.owns(array) for array in arrays):
            return super().concatenate(arrays, axis)
        return tf.concat(arrays, axis=axis)

    def split_last(self, array, sizes):
        return tf.split(array, list(sizes), axis=-1) if self.owns(array) else super().split_last(array, sizes)


class TensorflowBackend(KernelBackend):
    """LSTM in TensorFlow ops (float32 and float64, every activation, any TF device)."""

    name = "tensorflow"
    ops = TensorflowArrayOps()

    def __init__(self):
        self._forward_functions = {}
        self._backward_functions = {}
        self._lock = threading.Lock()

    def probe(self) -> str:
        if tf is None:
            raise NotImplementedError(_IMPORT_ERROR)
        # Physical devices only: listing logical devices would initialise the
        # runtime and forbid a later tf.config.set_logical_device_configuration.
        gpus = tf.config.list_physical_devices("GPU")
        where = f"GPU x{len(gpus)}" if gpus else "CPU"
        return f"{where} (TensorFlow {tf.__version__})"

    # -- traced functions, one per configuration -------------------------------------------
    def _forward_function(self, options: SequenceOptions, dtype_name: str):
        """The traced forward of one configuration: keyed by the options and the dtype."""
        key = (options, dtype_name)
        with self._lock:
            function = self._forward_functions.get(key)
            if function is None:
                dtype = tf.as_dtype(dtype_name)

                def forward(x, h0, c0, kernel, recurrent_kernel, bias, mask,
                            input_dropout_mask, recurrent_dropout_mask):
                    return _forward_graph(options, x, h0, c0, kernel, recurrent_kernel, bias, mask,
                                          input_dropout_mask, recurrent_dropout_mask)

                # Absent optional arguments travel as empty placeholders of rank 1
                # so that one signature fits every call of this configuration.
                signature = [_spec(3, dtype), _spec(2, dtype), _spec(2, dtype), _spec(2, dtype),
                             _spec(2, dtype), _spec(1, dtype),
                             _spec(2, tf.bool) if options.has_mask else _spec(1, tf.bool),
                             _spec(2, dtype) if options.has_input_dropout else _spec(1, dtype),
                             _spec(2, dtype) if options.has_recurrent_dropout else _spec(1, dtype)]
                function = tf.function(forward, input_signature=signature, autograph=False)
                self._forward_functions[key] = function
            return function

    def _backward_function(self, options: SequenceOptions, dtype_name: str):
        """The traced backward of one configuration: keyed by the options and the dtype."""
        key = (options, dtype_name)
        with self._lock:
            function = self._backward_functions.get(key)
            if function is None:
                dtype = tf.as_dtype(dtype_name)

                def backward(doutputs, dh, dc, x, h_in, c_prev, gates, mask, seen_before,
                             last_real, kernel, recurrent_kernel, input_dropout_mask, recurrent_dropout_mask):
                    return _backward_graph(options, doutputs, dh, dc, x, h_in, c_prev, gates,
                                           mask, seen_before, last_real, kernel, recurrent_kernel,
                                           input_dropout_mask, recurrent_dropout_mask)

                masked = options.has_mask
                signature = [_spec(3 if options.return_sequences else 2, dtype), _spec(2, dtype), _spec(2, dtype),
                             _spec(3, dtype), _spec(3, dtype), _spec(3, dtype), _spec(3, dtype),
                             _spec(2 if masked else 1, tf.bool), _spec(2 if masked else 1, tf.bool),
                             _spec(1, tf.bool), _spec(2, dtype), _spec(2, dtype),
                             _spec(2 if options.has_input_dropout else 1, dtype),
                             _spec(2 if options.has_recurrent_dropout else 1, dtype)]
                function = tf.function(backward, input_signature=signature, autograph=False)
                self._backward_functions[key] = function
            return function

    # -- the contract ---------------------------------------------------------------------
    def sequence_forward(self, x, h0, c0, kernel, recurrent_kernel, bias, mask, input_dropout_mask,
                         recurrent_dropout_mask, options):
        options.check_arrays(bias, mask, input_dropout_mask, recurrent_dropout_mask)
        dtype = _dtype_name(x)
        tensors = [self.ops.asarray(x, dtype), self.ops.asarray(h0, dtype), self.ops.asarray(c0, dtype),
                   self.ops.asarray(kernel, dtype), self.ops.asarray(recurrent_kernel, dtype),
                   _optional(self.ops, bias, dtype), _optional(self.ops, mask, "bool"),
                   _optional(self.ops, input_dropout_mask, dtype), _optional(self.ops, recurrent_dropout_mask, dtype)]
        results = self._forward_function(options, dtype)(*tensors)
        outputs, h, c = results[:3]
        workspace = None
        if options.training:
            h_in, c_prev, gates = results[3:6]
            seen_before, last_real = results[6:8] if options.has_mask else (None, None)
            # x is the caller's tensor (converted once when it came as NumPy):
            # referenced, not copied; the backward must not see it changed.
            workspace = _Workspace(
                options, dtype=dtype, x=tensors[0], h_in=h_in, c_prev=c_prev, gates=gates,
                mask=tensors[6] if options.has_mask else None, seen_before=seen_before, last_real=last_real,
                kernel=tensors[3], recurrent_kernel=tensors[4],
                input_dropout_mask=tensors[7] if options.has_input_dropout else None,
                recurrent_dropout_mask=tensors[8] if options.has_recurrent_dropout else None)
        return SequenceForward(outputs=outputs, h=h, c=c, workspace=workspace)

    def sequence_backward(self, doutputs, dh, dc, workspace, *, input_grad=True, state_grads=True):
        ws = workspace
        ws.consume(self.name)   # one backward per workspace, as on every backend (see base.Workspace)
        options = ws.options
        dtype = ws.dtype
        empty_bool = tf.zeros([0], tf.bool)
        empty = tf.zeros([0], dtype)
        results = self._backward_function(options, dtype)(
            self.ops.asarray(doutputs, dtype), self.ops.asarray(dh, dtype), self.ops.asarray(dc, dtype),
            ws.x, ws.h_in, ws.c_prev, ws.gates,
            ws.mask if options.has_mask else empty_bool,
            ws.seen_before if options.has_mask else empty_bool,
            ws.last_real if options.has_mask else empty_bool,
            ws.kernel, ws.recurrent_kernel,
            ws.input_dropout_mask if options.has_input_dropout else empty,
            ws.recurrent_dropout_mask if options.has_recurrent_dropout else empty)
        dx, dh0, dc0, dkernel, drecurrent_kernel, dbias = results
        # Without input_grad (state_grads) the traced function still computes dx (dh0, dc0): one
        # trace serves every call.
        if not state_grads:
            dh0 = dc0 = None
        return SequenceGrads(dx=dx if input_grad else None, dh0=dh0, dc0=dc0, dkernel=dkernel,
                             drecurrent_kernel=drecurrent_kernel, dbias=dbias)


def _tf_dtype(dtype):
    """A tf.DType from a NumPy dtype, a dtype name or a tf.DType."""
    if isinstance(dtype, tf.DType):
        return dtype
    return tf.as_dtype(np.dtype(dtype))


def _dtype_name(array) -> str:
    dtype = array.dtype
    return dtype.name if isinstance(dtype, (np.dtype, tf.DType)) else np.dtype(dtype).name


def _optional(ops, array, dtype):
    """The array as a tensor, or an empty rank-1 placeholder when it is absent."""
    if array is None:
        return tf.zeros([0], _tf_dtype(dtype))
    return ops.asarray(array, dtype)


backend = TensorflowBackend()
