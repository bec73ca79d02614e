"""Dense and Embedding: the layers around an LSTM, in the same explicit-backward style.

Both keep a ``TrainingTape`` like ``LSTM`` (training calls backpropagated
last-in-first-out, inference calls never recorded) and expose live
``params`` / ``grads`` mappings in Keras's names and layouts::

    Dense:      kernel [F, units], bias [units]
    Embedding:  embeddings [input_dim, output_dim]

Where they compute follows LSTM's rules (PyTorch's and Keras's convention):

* On "cpu" (the default) they compute with NumPy on host arrays whatever the
  backend (their work is one matrix product or one lookup, which every host
  backend would hand to the same BLAS); a tf.Tensor is converted.
* On "cuda" (``to("cuda")``, or a layer never called nor moved that receives a
  CUDA array: it moves there at that call) params and grads are numba_cuda
  device arrays and the work runs as numba-cuda kernels
  (``lstmeng.backends._cuda_layers``: the GEMMs of the LSTM backend, an
  elementwise bias + activation pass, a gather and an atomic scatter-add).
  A backward writes the weight gradients into the previous ones (as
  PyTorch's ``.grad``): a training loop allocates only its outputs. A host
  array given to a layer on the GPU is copied in and the results copied out
  (NumPy in, NumPy out); a CUDA array given to a layer on the CPU is an error
  naming both devices. ``get_weights`` returns host copies, ``set_weights``
  copies in.

Device ids are range-checked on the device: one reduction whose 8-byte result
is copied to the host (which waits for the queued work); host ids are checked
on the host before they are copied in.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lstmeng import _validation, initializers
from lstmeng._arrays import array_dtype_name, grads_property, host_copy, params_property, prepare_input, zero_grads_of
from lstmeng._devices import _mover, cuda_array_on_cpu_layer, parse_device
from lstmeng._tape import InputGuard, TrainingTape, debug_checks
from lstmeng.backends import registry

#: Dense activations: name -> (forward f(z), derivative as a function of the output y = f(z)).
#: softmax is handled apart (its Jacobian mixes the last axis).
_ELEMENTWISE = {
    "linear": (lambda z: z, lambda y, dy: dy),
    "tanh": (np.tanh, lambda y, dy: dy * (1 - y * y)),
    "relu": (lambda z: np.maximum(z, 0), lambda y, dy: dy * (y > 0)),
    "sigmoid": (lambda z: 0.5 * (1 + np.tanh(0.5 * z)), lambda y, dy: dy * y * (1 - y)),   # tanh form: no overflow
}
DENSE_ACTIVATIONS = (None, "linear", "tanh", "relu", "sigmoid", "softmax")


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax along ``axis``, shifted by the maximum so that large logits do not overflow."""
    shifted = logits - np.max(logits, axis=axis, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / np.sum(exponentials, axis=axis, keepdims=True)


def _host_input(x):
    """``x`` as a host array where it is a tf.Tensor; anything else as it is."""
    if registry.array_kind(x) == "tensorflow":
        x = np.asarray(x)
    return x


def _cuda():
    """The numba_cuda backend object and the layers' kernels (numba is imported here, on first use)."""
    from lstmeng.backends import _cuda_layers
    return registry.get_backend_object("numba_cuda"), _cuda_layers


def _check_seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    return None if seed is None else int(seed)


@dataclasses.dataclass
class _Call:
    """What one training call left for the backward (an entry of the layer's ``TrainingTape``).

    inputs: x ``[..., F]`` or ids (referenced, not copied: the caller's array, or the device copy this
    layer made of a host input); outputs: Dense's y (its activation's derivative reads it), None for
    Embedding; guard: the ``LSTMENG_DEBUG`` checksum of inputs, or None; device: where the call ran;
    host_io: a host input on a GPU layer (dx comes back as a host array); kernel: Dense's kernel on
    the device at the call.
    """

    inputs: object
    outputs: object = None
    guard: object = None
    device: str = "cpu"
    host_io: bool = False
    kernel: object = None


class _Layer:
    """What Dense and Embedding share: live params/grads, the tape, device and weight plumbing."""

    WEIGHT_NAMES: tuple = ()
    params = params_property()
    grads = grads_property()

    def _init_common(self, dtype, seed):
        self.dtype = _validation.check_dtype(dtype)
        self.seed = _check_seed(seed)
        self._rng = np.random.default_rng(self.seed)
        self._params: dict = {}
        self._grads: dict = {}
        self._tapes = TrainingTape()
        # Where params and grads live ("cpu" or "cuda:N"), and whether that is settled: a layer
        # never called nor moved adopts the GPU at a first call that brings a CUDA array (as LSTM).
        self._device = "cpu"
        self._device_chosen = False

    @property
    def built(self) -> bool:
        return bool(self._params)

    @property
    def device(self) -> str:
        """Where params and grads live: "cpu" or "cuda:N"."""
        return self._device

    def to(self, device):
        """Move params and grads to ``device`` ("cpu", "cuda", "cuda:N"); returns self.

        Example:
            >>> import lstmeng as le
            >>> le.Dense(3).to("cpu").device
            'cpu'
        """
        target = parse_device(device)
        move = _mover(target)
        # Everything is moved first and assigned last: a failed copy leaves the layer as it was.
        params = {name: move(value) for name, value in self._params.items()}
        grads = {name: move(value) for name, value in self._grads.items()}
        self._params, self._grads = params, grads
        self._device, self._device_chosen = target, True
        return self

    def _on_device(self, array):
        """A host array placed on this layer's device (itself on the CPU)."""
        return array if self._device == "cpu" else _mover(self._device)(array)

    def _runs_on_device(self, x, argument: str) -> bool:
        """True when this call computes on the GPU. A CUDA array given to a layer on the CPU moves
        a layer never called nor moved there; otherwise it is an error naming both devices."""
        if self._device == "cpu" and registry.array_kind(x) == "cuda":
            if self._device_chosen:
                raise cuda_array_on_cpu_layer(argument)
            self.to("cuda")
        return self._device != "cpu"

    def _peek(self) -> _Call:
        """The training call the next backward consumes, on the device it ran on."""
        entry = self._tapes.peek()
        if entry.device != self._device:
            raise RuntimeError(f"{type(self).__name__}.backward: the training call ran on {entry.device} but the "
                               f"layer is on {self._device} now; backpropagate before to(), or reset_tape()")
        if entry.guard is not None:
            entry.guard.check()
        return entry

    def _device_gradient(self, backend, dy, expected_shape):
        """dy of a GPU call, checked against ``expected_shape`` and made a device array (a host dy is
        copied in)."""
        dy = _host_input(dy)
        dy = prepare_input(backend, dy, self.dtype, "dy")
        _validation.check_shape(dy, "dy", expected_shape)
        return backend.ops.asarray(dy, self.dtype)

    def zero_grads(self):
        """Set every gradient to zero (zeros where no backward ran yet); returns self."""
        zero_grads_of(self)
        return self

    def reset_tape(self):
        """Drop every training call not yet backpropagated; returns self."""
        self._tapes.clear()
        return self

    def get_weights(self) -> list:
        """Host copies in Keras's order, wherever the layer lives."""
        return [host_copy(self._params[name]) for name in self.WEIGHT_NAMES if name in self._params]

    def _set_checked(self, weights, shapes: dict):
        """Replace the weights by ``weights`` (Keras's order) after checking all of them against ``shapes``;
        they are copied to the layer's device before any is assigned."""
        weights = list(weights)
        if len(weights) != len(shapes):
            raise ValueError(f"set_weights expects {len(shapes)} arrays ({', '.join(shapes)}), got {len(weights)}")
        arrays = {}
        for (name, shape), weight in zip(shapes.items(), weights):
            array = host_copy(weight)
            if array.shape != shape:
                raise ValueError(f"set_weights: {name} must have shape {shape}, got {array.shape}")
            if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
                raise TypeError(f"set_weights: {name} must be real numbers, got dtype {array.dtype}")
            arrays[name] = array.astype(self.dtype)
        self._params = {name: self._on_device(array) for name, array in arrays.items()}
        return self

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)


class Dense(_Layer):
    """``y = activation(x @ kernel + bias)`` on the last axis, with an explicit backward.

    Args:
        units: output features.
        activation: None (linear) | "tanh" | "relu" | "sigmoid" | "softmax" (over the last axis;
            for training, prefer linear logits with ``losses.softmax_cross_entropy``).
        use_bias: add a bias.
        kernel_initializer, bias_initializer: names as for LSTM (Keras's defaults).
        dtype: "float32" | "float64".
        seed: seeds the kernel's initialization.

    x is ``[..., F]``: ``[B, F]`` for a last LSTM output, ``[B, T, F]`` applies the
    same weights at every step (Keras's Dense on a sequence); the mask of a
    sequence passes through unchanged. On the GPU (``to("cuda")``) x may be a
    CUDA array (the result is one) or a host array (copied in, result copied out).

    Example:
        >>> import numpy as np, lstmeng as le
        >>> dense = le.Dense(3, activation="tanh", seed=0)
        >>> y = dense(np.ones((2, 5), "float32"), training=True)
        >>> dx = dense.backward(np.ones_like(y))
        >>> y.shape, dx.shape, dense.grads["kernel"].shape
        ((2, 3), (2, 5), (5, 3))
    """

    WEIGHT_NAMES = ("kernel", "bias")
    return_sequences = True   # keeps the time axis it is given (and the mask with it)

    def __init__(self, units, activation=None, use_bias=True, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", dtype="float32", seed=None):
        self.units = _validation.check_units(units)
        self.activation = _validation.check_choice(activation, "activation", DENSE_ACTIVATIONS)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = initializers.check_initializer(kernel_initializer, "kernel_initializer")
        self.bias_initializer = initializers.check_initializer(bias_initializer, "bias_initializer")
        self._init_common(dtype, seed)
        self.input_size = None

    def weight_shapes(self, input_size: int) -> dict:
        shapes = {"kernel": (input_size, self.units)}
        if self.use_bias:
            shapes["bias"] = (self.units,)
        return shapes

    def build(self, input_size):
        """Create kernel ``[input_size, units]`` and bias ``[units]`` on the layer's device; returns self."""
        input_size = _validation.check_units(input_size, "input_size")
        params = {"kernel": initializers.initialize(self.kernel_initializer, (input_size, self.units), self._rng,
                                                    self.dtype, "kernel_initializer")}
        if self.use_bias:
            params["bias"] = initializers.initialize(self.bias_initializer, (self.units,), self._rng, self.dtype,
                                                     "bias_initializer")
        self._params = {name: self._on_device(value) for name, value in params.items()}
        self.input_size = input_size
        return self

    def set_weights(self, weights):
        """Keras's ``[kernel (F, units), bias (units,)]``; builds the layer from the kernel's shape if needed."""
        weights = list(weights)
        first = host_copy(weights[0]) if weights else None
        input_size = self.input_size or (first.shape[0] if first is not None and first.ndim == 2 else 1)
        self._set_checked(weights, self.weight_shapes(input_size))
        self.input_size = input_size
        return self

    def get_config(self) -> dict:
        return {"units": self.units, "activation": self.activation, "use_bias": self.use_bias,
                "kernel_initializer": initializers.serialize(self.kernel_initializer),
                "bias_initializer": initializers.serialize(self.bias_initializer),
                "dtype": self.dtype.name, "seed": self.seed}

    def _check_features(self, x) -> int:
        """The number of features of x ``[..., F]`` (a host or device array), checked against the layer."""
        shape = _validation.shape_of(x)   # a tuple: the simulator's shapes take no negative index
        if len(shape) < 2:
            raise ValueError(f"x must have shape (batch, ..., features), got shape {shape}")
        if self.built and shape[-1] != self.input_size:
            raise ValueError(f"x has {shape[-1]} features but the layer was built for {self.input_size}")
        return shape[-1]

    def __call__(self, x, training=False):
        """x: ``[..., F]``; returns ``[..., units]``. ``training=True`` records the call for ``backward``."""
        if self._runs_on_device(x, "x"):
            return self._call_on_device(x, training)
        x = _host_input(x)
        x = _validation.check_numeric_array(x, "x", self.dtype)
        self._check_features(x)
        if not self.built:
            self.build(x.shape[-1])
        z = x @ self._params["kernel"]
        if self.use_bias:
            z = z + self._params["bias"]
        y = softmax(z) if self.activation == "softmax" else _ELEMENTWISE[self.activation or "linear"][0](z)
        y = y.astype(self.dtype, copy=False)
        if training:   # an inference call leaves the tape as it is
            # The tape references the caller's x (the kernel gradient reads it): LSTMENG_DEBUG checks it
            # is unchanged at the backward, as LSTM does.
            self._tapes.push(_Call(x, y, InputGuard.of(x, "x") if debug_checks() else None))
        self._device_chosen = True
        return y

    def _call_on_device(self, x, training):
        backend, kernels = _cuda()
        host_io = registry.array_kind(x) != "cuda"
        x = prepare_input(backend, _host_input(x), self.dtype)   # host: checked and cast; device: dtype checked
        features = self._check_features(x)
        if not self.built:
            self.build(features)
        if host_io:
            x = backend.ops.asarray(x, self.dtype)   # one copy in; the tape keeps it
        kernel = self._params["kernel"]
        y = kernels.dense_forward(x, kernel, self._params.get("bias"), self.activation or "linear")
        if training:
            guard = InputGuard.of(x, "x") if debug_checks() and not host_io else None
            self._tapes.push(_Call(x, y, guard, self._device, host_io, kernel))
        self._device_chosen = True
        return backend.ops.to_numpy(y) if host_io else y

    def backward(self, dy):
        """dy: the output's shape; returns dx ``[..., F]`` and sets ``grads`` (see ``LSTM.backward``)."""
        entry = self._peek()
        if entry.device != "cpu":
            return self._backward_on_device(entry, dy)
        x, y = entry.inputs, entry.outputs
        if registry.array_kind(dy) == "cuda":
            raise cuda_array_on_cpu_layer("dy")
        dy = _validation.check_numeric_array(_host_input(dy), "dy", self.dtype)
        _validation.check_shape(dy, "dy", y.shape)
        if self.activation == "softmax":
            dz = y * (dy - np.sum(dy * y, axis=-1, keepdims=True))
        else:
            dz = _ELEMENTWISE[self.activation or "linear"][1](y, dy)
        flat_x, flat_dz = x.reshape(-1, x.shape[-1]), dz.reshape(-1, self.units)
        fresh = {"kernel": flat_x.T @ flat_dz}
        if self.use_bias:
            fresh["bias"] = flat_dz.sum(axis=0)
        dx = dz @ self._params["kernel"].T
        _, accumulate = self._tapes.pop()
        if accumulate:
            fresh = {name: self._grads[name] + value for name, value in fresh.items()}
        self._grads = {name: value.astype(self.dtype, copy=False) for name, value in fresh.items()}
        return dx.astype(self.dtype, copy=False)

    def _backward_on_device(self, entry: _Call, dy):
        backend, kernels = _cuda()
        dy = self._device_gradient(backend, dy, _validation.shape_of(entry.outputs))
        _, accumulate = self._tapes.pop()
        # The gradients go into the arrays of the previous backward (no allocation), or add to them.
        dx, self._grads = kernels.dense_backward(entry.inputs, entry.outputs, dy, entry.kernel,
                                                 self.activation or "linear", self.use_bias, self._grads, accumulate)
        return backend.ops.to_numpy(dx) if entry.host_io else dx

    def __repr__(self) -> str:
        return f"Dense({self.units}, activation={self.activation!r})"


class Embedding(_Layer):
    """A trainable lookup table: integer ids ``[B, T]`` -> vectors ``[B, T, output_dim]``.

    Args:
        input_dim: vocabulary size V; ids must be in [0, V).
        output_dim: E, the vector size.
        mask_zero: id 0 is padding: ``compute_mask(ids)`` gives ``ids != 0`` (True = real
            step), which ``Sequential`` hands to the next layer as its ``mask`` (a device bool
            array for device ids, which the LSTM layers on the GPU take as they are).
        embeddings_initializer: Keras's default "uniform" is U(-0.05, 0.05).
        dtype, seed: as for Dense.

    Example:
        >>> import numpy as np, lstmeng as le
        >>> embedding = le.Embedding(10, 4, mask_zero=True, seed=0)
        >>> ids = np.array([[3, 5, 0], [2, 0, 0]])
        >>> embedding(ids).shape, embedding.compute_mask(ids).tolist()
        ((2, 3, 4), [[True, True, False], [True, False, False]])
    """

    WEIGHT_NAMES = ("embeddings",)
    return_sequences = True

    def __init__(self, input_dim, output_dim, mask_zero=False, embeddings_initializer="uniform", dtype="float32",
                 seed=None):
        self.input_dim = _validation.check_units(input_dim, "input_dim")
        self.output_dim = _validation.check_units(output_dim, "output_dim")
        self.mask_zero = bool(mask_zero)
        self.embeddings_initializer = initializers.check_initializer(embeddings_initializer,
                                                                     "embeddings_initializer")
        self._init_common(dtype, seed)

    @property
    def units(self) -> int:
        return self.output_dim

    def build(self, input_size=None):
        """Create the table ``[input_dim, output_dim]`` on the layer's device (``input_size`` is ignored:
        ids have none); returns self."""
        self._params = {"embeddings": self._on_device(initializers.initialize(
            self.embeddings_initializer, (self.input_dim, self.output_dim), self._rng, self.dtype,
            "embeddings_initializer"))}
        return self

    def set_weights(self, weights):
        """Keras's ``[embeddings (input_dim, output_dim)]``."""
        return self._set_checked(weights, {"embeddings": (self.input_dim, self.output_dim)})

    def get_config(self) -> dict:
        return {"input_dim": self.input_dim, "output_dim": self.output_dim, "mask_zero": self.mask_zero,
                "embeddings_initializer": initializers.serialize(self.embeddings_initializer),
                "dtype": self.dtype.name, "seed": self.seed}

    def _out_of_range(self, value, position) -> ValueError:
        return ValueError(f"ids must be in [0, {self.input_dim}) (input_dim), got {int(value)} at position {position}")

    @staticmethod
    def _check_id_dtype(dtype) -> None:
        if np.dtype(dtype) == np.bool_ or not np.issubdtype(dtype, np.integer):
            raise TypeError(f"ids must be integer token ids, got dtype {dtype}")

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(_host_input(ids))
        self._check_id_dtype(ids.dtype)
        if ids.size:
            bad = np.flatnonzero((ids < 0) | (ids >= self.input_dim))
            if bad.size:
                position = tuple(int(i) for i in np.unravel_index(bad[0], ids.shape))
                raise self._out_of_range(ids[position], position)
        return ids

    def _check_device_ids(self, backend, kernels, ids):
        """Device ids checked (integer dtype; every id in range by a device reduction); returns their view."""
        dtype = np.dtype(array_dtype_name(ids, "ids"))
        self._check_id_dtype(dtype)
        ids = backend.ops.asarray(ids, dtype)
        position = kernels.first_out_of_range(ids, self.input_dim)
        if position is not None:
            raise self._out_of_range(backend.ops.to_numpy(ids)[position], position)
        return ids

    def compute_mask(self, ids):
        """Bool ``ids != 0`` (True = real step) with mask_zero, else None; a device array for device ids."""
        if not self.mask_zero:
            return None
        if registry.array_kind(ids) == "cuda":
            return _cuda()[1].nonzero_mask(ids)
        return np.asarray(ids) != 0

    def __call__(self, ids, training=False):
        """ids: integers ``[B, T]`` (any shape); returns ``[..., output_dim]``."""
        if self._runs_on_device(ids, "ids"):
            return self._call_on_device(ids, training)
        ids = self._check_ids(ids)
        if not self.built:
            self.build()
        if training:   # the tape references the caller's ids (checked under LSTMENG_DEBUG, as on LSTM)
            self._tapes.push(_Call(ids, guard=InputGuard.of(ids, "ids") if debug_checks() else None))
        self._device_chosen = True
        return self._params["embeddings"][ids]

    def _call_on_device(self, ids, training):
        backend, kernels = _cuda()
        host_io = registry.array_kind(ids) != "cuda"
        if host_io:   # checked on the host, then one copy in
            ids = self._check_ids(ids)
            ids = backend.ops.asarray(ids, ids.dtype)
        else:
            ids = self._check_device_ids(backend, kernels, ids)
        if not self.built:
            self.build()
        out = kernels.embedding_lookup(ids, self._params["embeddings"])
        if training:
            guard = InputGuard.of(ids, "ids") if debug_checks() and not host_io else None
            self._tapes.push(_Call(ids, guard=guard, device=self._device, host_io=host_io))
        self._device_chosen = True
        return backend.ops.to_numpy(out) if host_io else out

    def backward(self, dy):
        """dy: ``[..., output_dim]``; sets ``grads["embeddings"]`` (a row sums every place its id was looked
        up) and returns None (ids have no gradient)."""
        entry = self._peek()
        ids = entry.inputs
        expected = _validation.shape_of(ids) + (self.output_dim,)
        if entry.device != "cpu":
            backend, kernels = _cuda()
            dy = self._device_gradient(backend, dy, expected)
            _, accumulate = self._tapes.pop()
            self._grads = {"embeddings": kernels.embedding_backward(
                ids, dy, self._grads.get("embeddings"), (self.input_dim, self.output_dim), self.dtype, accumulate)}
            return None
        if registry.array_kind(dy) == "cuda":
            raise cuda_array_on_cpu_layer("dy")
        dy = _validation.check_numeric_array(_host_input(dy), "dy", self.dtype)
        _validation.check_shape(dy, "dy", expected)
        _, accumulate = self._tapes.pop()
        table = self._grads["embeddings"].copy() if accumulate else np.zeros_like(self._params["embeddings"])
        np.add.at(table, ids.reshape(-1), dy.reshape(-1, self.output_dim))
        self._grads = {"embeddings": table}
        return None

    def __repr__(self) -> str:
        return f"Embedding({self.input_dim}, {self.output_dim}, mask_zero={self.mask_zero})"
