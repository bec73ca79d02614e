"""Keras 3 layers that compute through an lstmeng backend: ``LSTM`` and ``Bidirectional``.

They are drop-in replacements for ``keras.layers.LSTM`` and
``keras.layers.Bidirectional``: the same arguments (those lstmeng supports),
the same weights (names, shapes, order: ``lstm/lstm_cell/kernel``,
``recurrent_kernel``, ``bias``), Keras masks (``Masking``,
``Embedding(mask_zero=True)``, ``mask=``) and Keras serialization, plus
``backend=``, any lstmeng backend name or "auto".

How a call runs:
    * backend "tensorflow" (what "auto" picks for Keras's ``tf.Tensor``
      inputs): pure TF ops with a ``tf.custom_gradient`` whose gradient is the
      backend's explicit ``sequence_backward``. Works in ``tf.function``,
      ``model.fit``, ``jit_compile=True`` and under ``tf.distribute``.
    * any other backend ("cython", "numpy", plugins): the forward and the
      backward run on the host through ``tf.numpy_function``. CPU only, and
      not XLA-compilable, so these layers report ``supports_jit = False``
      and Keras's ``jit_compile="auto"`` leaves the model uncompiled.

Dropout follows lstmeng's semantics: one inverted-dropout mask per sequence
and sample (``[B, I]`` on the inputs, ``[B, H]`` on h(t-1) in the
recurrence), drawn from the layer's seeded Keras ``SeedGenerator``.

Example:
    >>> import keras, lstmeng.keras
    >>> model = keras.Sequential([
    ...     keras.Input((None,), dtype="int32"),
    ...     keras.layers.Embedding(100, 8, mask_zero=True),
    ...     lstmeng.keras.LSTM(16, backend="tensorflow"),
    ...     keras.layers.Dense(1, activation="sigmoid")])
    >>> model.output_shape
    (None, 1)
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading

import keras
import numpy as np
import tensorflow as tf

from lstmeng.backends import registry
from lstmeng.backends.base import ACTIVATIONS, RECURRENT_ACTIVATIONS, SequenceOptions

__all__ = ["LSTM", "Bidirectional"]


def _activation_name(function, argument: str, allowed) -> str:
    name = keras.activations.serialize(function)
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"lstmeng.keras.LSTM: {argument} must be one of {list(allowed)}, got {name!r}")
    return name


_check_backend_name = registry.check_backend_choice


def _runs_in_tensorflow(name: str) -> bool:
    """Whether backend ``name`` ("auto" included) computes in TF ops for Keras's tf.Tensor inputs."""
    if name == "auto":
        name = registry.get_backend()
    return name in ("auto", "tensorflow")


@keras.saving.register_keras_serializable(package="lstmeng")
class LSTM(keras.layers.LSTM):
    """``keras.layers.LSTM`` computed by an lstmeng backend.

    Args:
        *args, **kwargs: those of ``keras.layers.LSTM`` (activation in
            {"tanh", "relu", "sigmoid", "linear"}, recurrent_activation in
            {"sigmoid", "hard_sigmoid"}), plus ``zero_output_for_mask``.
            ``unroll`` is accepted and changes nothing (the backend loops
            over time); ``use_cudnn=True`` is refused.
        backend: an lstmeng backend name or "auto" (the default in force,
            else "tensorflow" for Keras's tf.Tensor inputs).

    Weights are Keras's: ``mine.set_weights(keras_lstm.get_weights())``
    reproduces a Keras layer.
    """

    def __init__(self, *args, backend="auto", **kwargs):
        if kwargs.get("use_cudnn", "auto") is True:
            raise ValueError("use_cudnn=True: lstmeng.keras.LSTM computes through its lstmeng backend; "
                             "use backend='tensorflow' on a GPU")
        super().__init__(*args, **kwargs)
        # Keras's fused (cuDNN) paths, here and in keras.layers.Bidirectional,
        # must not bypass the lstmeng backend.
        self.use_cudnn = False
        self.activation_name = _activation_name(self.cell.activation, "activation", ACTIVATIONS)
        self.recurrent_activation_name = _activation_name(
            self.cell.recurrent_activation, "recurrent_activation", RECURRENT_ACTIVATIONS)
        self._set_backend(backend)

    def _set_backend(self, name):
        self.backend = _check_backend_name(name)
        # Host backends run through tf.numpy_function, which XLA cannot compile.
        self.supports_jit = _runs_in_tensorflow(self.backend)

    def get_config(self):
        config = super().get_config()
        config["backend"] = self.backend
        config["zero_output_for_mask"] = self.zero_output_for_mask
        return config

    def _maybe_config_dropout_masks(self, cell, input_sequence, input_state):
        # Keras's cell masks are per gate when recurrent_dropout is set; the
        # lstmeng masks are drawn in inner_loop instead.
        return None

    def _dropout_masks(self, sequences, training):
        """Inverted dropout masks ``[B, I]`` and ``[B, H]`` for this call (None when off)."""
        input_mask = recurrent_mask = None
        if not training:
            return input_mask, recurrent_mask
        seed = self.cell.seed_generator
        if self.dropout > 0:
            input_mask = keras.random.dropout(tf.ones_like(sequences[:, 0, :]), rate=self.dropout, seed=seed)
        if self.recurrent_dropout > 0:
            ones = tf.ones(tf.stack([tf.shape(sequences)[0], self.units]), sequences.dtype)
            recurrent_mask = keras.random.dropout(ones, rate=self.recurrent_dropout, seed=seed)
        return input_mask, recurrent_mask

    def inner_loop(self, sequences, initial_state, mask, training=False):
        """Keras's RNN hook: returns (last_output, outputs, [h, c]); outputs in processing order."""
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        training = bool(training)
        # Backends compute in float32/float64: mixed-precision layers compute in their variable dtype.
        dtype = tf.as_dtype(self.cell.variable_dtype)
        x = tf.cast(sequences, dtype)
        h0, c0 = (tf.cast(state, dtype) for state in initial_state)
        kernel = tf.convert_to_tensor(self.cell.kernel)
        recurrent_kernel = tf.convert_to_tensor(self.cell.recurrent_kernel)
        bias = tf.convert_to_tensor(self.cell.bias) if self.use_bias else None
        mask = None if mask is None else tf.cast(mask, tf.bool)
        input_dropout_mask, recurrent_dropout_mask = self._dropout_masks(x, training)
        backend = registry.resolve(self.backend, x, dtype.name, self.activation_name,
                                   self.recurrent_activation_name)
        constants = dict(mask=mask, input_dropout_mask=input_dropout_mask,
                         recurrent_dropout_mask=recurrent_dropout_mask)
        # training is set per forward (a gradient of an inference call recomputes with training=True).
        options = SequenceOptions.for_call(
            bias=bias, **constants, activation=self.activation_name,
            recurrent_activation=self.recurrent_activation_name, reverse=self.go_backwards,
            zero_output_for_mask=self.zero_output_for_mask, return_sequences=self.return_sequences)
        run = _tensorflow_sequence if backend.name == "tensorflow" else _host_sequence
        outputs, h, c = run(backend, options, constants, _keep_workspace(training),
                            x, h0, c0, kernel, recurrent_kernel, bias)
        if self.return_sequences:
            if self.go_backwards:
                outputs = tf.reverse(outputs, axis=[1])  # Keras returns go_backwards sequences reversed
            last_output = outputs[:, -1]
        else:
            last_output, outputs = outputs, outputs[:, None, :]
        return last_output, outputs, [h, c]


@keras.saving.register_keras_serializable(package="lstmeng")
class Bidirectional(keras.layers.Bidirectional):
    """``keras.layers.Bidirectional`` over lstmeng LSTM layers.

    Args:
        layer: an ``lstmeng.keras.LSTM``, or a ``keras.layers.LSTM`` that is
            converted (config and, if built, weights).
        merge_mode, weights, backward_layer, **kwargs: as in Keras.
        backend: None keeps the layers' own backends; a name sets both.
    """

    def __init__(self, layer, merge_mode="concat", weights=None, backward_layer=None, backend=None, **kwargs):
        layer = _as_lstmeng_lstm(layer, backend, "layer")
        if backward_layer is not None:
            backward_layer = _as_lstmeng_lstm(backward_layer, backend, "backward_layer")
        super().__init__(layer, merge_mode=merge_mode, weights=weights, backward_layer=backward_layer, **kwargs)

    def _can_attempt_fused_lstm(self, mask, initial_state=None):
        return False  # the fused cuDNN path would bypass the lstmeng backend


def _as_lstmeng_lstm(layer, backend, argument):
    if isinstance(layer, LSTM):
        if backend is not None and backend != layer.backend:
            if layer.built:
                raise ValueError(f"{argument} is already built with backend {layer.backend!r}; "
                                 "pass backend= before building, or leave backend=None")
            layer._set_backend(backend)
        return layer
    if not isinstance(layer, keras.layers.LSTM):
        raise TypeError(f"lstmeng.keras.Bidirectional: {argument} must be an LSTM layer, "
                        f"got {type(layer).__name__}")
    config = layer.get_config()
    config.pop("use_cudnn", None)
    converted = LSTM.from_config({**config, "backend": "auto" if backend is None else backend})
    if layer.built:
        converted.build((None, None, int(layer.cell.kernel.shape[0])))
        converted.set_weights(layer.get_weights())
    return converted


# -- the differentiable sequence call -------------------------------------------------------
def _keep_workspace(training: bool) -> bool:
    """Keep the forward's workspace for the backward?

    Always in training. Otherwise only when a gradient tape records in eager
    mode; a gradient of a call that kept none recomputes the forward first.
    """
    if training:
        return True
    if not tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.eager import record
    except ImportError:  # a TF without this module: always keep
        return True
    return bool(record.could_possibly_record())


def _zeros_if_none(gradient, like):
    return tf.zeros_like(like) if gradient is None else gradient


def _tensorflow_sequence(backend, options, constants, keep, x, h0, c0, kernel, recurrent_kernel, bias):
    """Forward through the tensorflow backend with its explicit backward as the gradient.

    x: [B, T, I]; h0, c0: [B, H]; kernel [I, 4H]; recurrent_kernel [H, 4H];
    bias [4H] or None. constants: mask [B, T] bool and dropout masks (or None),
    not differentiated. Returns (outputs, h, c).
    """
    has_bias = bias is not None

    def forward(training, x, h0, c0, kernel, recurrent_kernel, bias):
        return backend.sequence_forward(x, h0, c0, kernel, recurrent_kernel, bias, constants["mask"],
                                        constants["input_dropout_mask"], constants["recurrent_dropout_mask"],
                                        dataclasses.replace(options, training=training))

    @tf.custom_gradient
    def sequence(x, h0, c0, kernel, recurrent_kernel, *maybe_bias):
        weights = (kernel, recurrent_kernel, maybe_bias[0] if has_bias else None)
        result = forward(keep, x, h0, c0, *weights)

        def gradient(doutputs, dh, dc):
            workspace = result.workspace
            if workspace is None or workspace.consumed:
                # No workspace kept, or a second gradient of this call (a persistent tape): a
                # workspace is backpropagated once, so the forward runs again.
                workspace = forward(True, x, h0, c0, *weights).workspace
            grads = backend.sequence_backward(_zeros_if_none(doutputs, result.outputs),
                                              _zeros_if_none(dh, result.h), _zeros_if_none(dc, result.c),
                                              workspace)
            return [grads.dx, grads.dh0, grads.dc0, grads.dkernel, grads.drecurrent_kernel] + (
                [grads.dbias] if has_bias else [])

        return (result.outputs, result.h, result.c), gradient

    return sequence(x, h0, c0, kernel, recurrent_kernel, *([bias] if has_bias else []))


class _WorkspaceStore:
    """Host workspaces between a numpy_function forward and its backward, by integer token.

    Bounded: a training forward whose gradient is never taken must not keep
    its workspace forever. A backward whose workspace was evicted recomputes
    the forward.
    """

    capacity = 64

    def __init__(self):
        self._entries: collections.OrderedDict[int, object] = collections.OrderedDict()
        self._tokens = itertools.count()
        self._lock = threading.Lock()

    def put(self, workspace) -> int:
        with self._lock:
            token = next(self._tokens)
            self._entries[token] = workspace
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            return token

    def pop(self, token: int):
        with self._lock:
            return self._entries.pop(int(token), None)

    def __len__(self):
        with self._lock:
            return len(self._entries)


_workspaces = _WorkspaceStore()
_NO_WORKSPACE = -1


def _host_sequence(backend, options, constants, keep, x, h0, c0, kernel, recurrent_kernel, bias):
    """Forward and backward of a host backend through ``tf.numpy_function`` (CPU, not XLA).

    Same arguments and result as ``_tensorflow_sequence``.
    """
    dtype = x.dtype
    np_dtype = dtype.as_numpy_dtype
    has_bias = bias is not None
    optional_names = [name for name in ("mask", "input_dropout_mask", "recurrent_dropout_mask")
                      if constants[name] is not None]
    optional_tensors = [constants[name] for name in optional_names]

    def host(array, kind=np_dtype):
        return backend.ops.asarray(np.asarray(array), kind)

    def run_forward(training, x, h0, c0, kernel, recurrent_kernel, bias, optional):
        optional = dict(zip(optional_names, optional))
        mask = optional.get("mask")
        return backend.sequence_forward(
            host(x), host(h0), host(c0), host(kernel), host(recurrent_kernel),
            None if bias is None else host(bias), None if mask is None else host(mask, np.bool_),
            _maybe(host, optional.get("input_dropout_mask")), _maybe(host, optional.get("recurrent_dropout_mask")),
            dataclasses.replace(options, training=training))

    def split_inputs(arrays):
        """(x, h0, c0, kernel, recurrent_kernel, bias or None, optional list) from the flat inputs."""
        x, h0, c0, kernel, recurrent_kernel = arrays[:5]
        rest = list(arrays[5:])
        bias = rest.pop(0) if has_bias else None
        return x, h0, c0, kernel, recurrent_kernel, bias, rest

    def forward_numpy(*arrays):
        result = run_forward(keep, *split_inputs(arrays))
        token = _workspaces.put(result.workspace) if keep else _NO_WORKSPACE
        outputs, h, c = (np.asarray(backend.ops.to_numpy(array), np_dtype)
                         for array in (result.outputs, result.h, result.c))
        return outputs, h, c, np.int64(token)

    def backward_numpy(token, doutputs, dh, dc, *arrays):
        inputs = split_inputs(arrays)
        workspace = _workspaces.pop(token) if token != _NO_WORKSPACE else None
        if workspace is None:
            workspace = run_forward(True, *inputs).workspace
        grads = backend.sequence_backward(host(doutputs), host(dh), host(dc), workspace)
        results = [grads.dx, grads.dh0, grads.dc0, grads.dkernel, grads.drecurrent_kernel, grads.dbias]
        return tuple(np.asarray(backend.ops.to_numpy(value), np_dtype) for value in results)

    batch, steps = x.shape[0], x.shape[1]
    units = recurrent_kernel.shape[0]
    output_shape = [batch, steps, units] if options.return_sequences else [batch, units]

    @tf.custom_gradient
    def sequence(x, h0, c0, kernel, recurrent_kernel, *maybe_bias):
        inputs = [x, h0, c0, kernel, recurrent_kernel, *maybe_bias] + optional_tensors
        outputs, h, c, token = tf.numpy_function(forward_numpy, inputs, [dtype, dtype, dtype, tf.int64],
                                                 stateful=True, name="lstmeng_forward")
        outputs.set_shape(output_shape)
        h.set_shape([batch, units])
        c.set_shape([batch, units])

        def gradient(doutputs, dh, dc):
            upstream = [_zeros_if_none(doutputs, outputs), _zeros_if_none(dh, h), _zeros_if_none(dc, c)]
            grads = tf.numpy_function(backward_numpy, [token] + upstream + inputs, [dtype] * 6,
                                      stateful=True, name="lstmeng_backward")
            for value, like in zip(grads, (x, h0, c0, kernel, recurrent_kernel)):
                value.set_shape(like.shape)
            return list(grads[:5]) + ([grads[5]] if has_bias else [])

        return (outputs, h, c), gradient

    return sequence(x, h0, c0, kernel, recurrent_kernel, *([bias] if has_bias else []))


def _maybe(function, array):
    return None if array is None else function(array)
