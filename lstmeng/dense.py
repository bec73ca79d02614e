"""Dense and Embedding: the layers around an LSTM, in the same explicit-backward style.

Both compute with NumPy on host arrays whatever the backend (their work is
one matrix product or one lookup, which every host backend would hand to
the same BLAS), keep a ``TrainingTape`` like ``LSTM`` (training calls
backpropagated last-in-first-out, inference calls never recorded), and
expose live ``params`` / ``grads`` mappings in Keras's names and layouts::

    Dense:      kernel [F, units], bias [units]
    Embedding:  embeddings [input_dim, output_dim]

CUDA device arrays are not supported yet: a device input raises
``NotImplementedError`` (a ``Sequential`` on the GPU copies the activations
to the host in front of these layers instead).
"""

from __future__ import annotations

import numpy as np

from lstmeng import _validation, initializers
from lstmeng._arrays import grads_property, host_copy, params_property, zero_grads_of
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


def _host_input(x, argument: str, layer: str):
    """``x`` as a host array (a tf.Tensor is converted); a CUDA array is NotImplementedError."""
    if registry.array_kind(x) == "cuda":
        raise NotImplementedError(
            f"{layer}: {argument} is a CUDA device array, but {layer} computes on host arrays only "
            f"(numba_cuda support is not written yet); pass {argument}.copy_to_host(), or let a Sequential "
            "model do the copy")
    if registry.array_kind(x) == "tensorflow":
        x = np.asarray(x)
    return x


def _check_seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    return None if seed is None else int(seed)


class _HostLayer:
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

    @property
    def built(self) -> bool:
        return bool(self._params)

    @property
    def device(self) -> str:
        return "cpu"

    def to(self, device):
        """Only "cpu" is supported; returns self."""
        if str(device).strip().lower() != "cpu":
            raise NotImplementedError(f"{type(self).__name__}.to({device!r}): this layer computes on host arrays "
                                      "only (numba_cuda support is not written yet)")
        return self

    def zero_grads(self):
        """Set every gradient to zero (zeros where no backward ran yet); returns self."""
        zero_grads_of(self)
        return self

    def reset_tape(self):
        """Drop every training call not yet backpropagated; returns self."""
        self._tapes.clear()
        return self

    def get_weights(self) -> list:
        """Host copies in Keras's order."""
        return [host_copy(self._params[name]) for name in self.WEIGHT_NAMES if name in self._params]

    def _set_checked(self, weights, shapes: dict):
        """Replace the weights by ``weights`` (Keras's order) after checking all of them against ``shapes``."""
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
        self._params = arrays
        return self

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)


class Dense(_HostLayer):
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
    sequence passes through unchanged.

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
        """Create kernel ``[input_size, units]`` and bias ``[units]``; returns self."""
        input_size = _validation.check_units(input_size, "input_size")
        params = {"kernel": initializers.initialize(self.kernel_initializer, (input_size, self.units), self._rng,
                                                    self.dtype, "kernel_initializer")}
        if self.use_bias:
            params["bias"] = initializers.initialize(self.bias_initializer, (self.units,), self._rng, self.dtype,
                                                     "bias_initializer")
        self._params, self.input_size = params, input_size
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

    def __call__(self, x, training=False):
        """x: ``[..., F]``; returns ``[..., units]``. ``training=True`` records the call for ``backward``."""
        x = _host_input(x, "x", "Dense")
        x = _validation.check_numeric_array(x, "x", self.dtype)
        if x.ndim < 2:
            raise ValueError(f"x must have shape (batch, ..., features), got shape {x.shape}")
        if self.built and x.shape[-1] != self.input_size:
            raise ValueError(f"x has {x.shape[-1]} features but the layer was built for {self.input_size}")
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
            self._tapes.push((x, y, InputGuard.of(x, "x") if debug_checks() else None))
        return y

    def backward(self, dy):
        """dy: the output's shape; returns dx ``[..., F]`` and sets ``grads`` (see ``LSTM.backward``)."""
        x, y, guard = self._tapes.peek()
        if guard is not None:
            guard.check()
        dy = _validation.check_numeric_array(_host_input(dy, "dy", "Dense"), "dy", self.dtype)
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

    def __repr__(self) -> str:
        return f"Dense({self.units}, activation={self.activation!r})"


class Embedding(_HostLayer):
    """A trainable lookup table: integer ids ``[B, T]`` -> vectors ``[B, T, output_dim]``.

    Args:
        input_dim: vocabulary size V; ids must be in [0, V).
        output_dim: E, the vector size.
        mask_zero: id 0 is padding: ``compute_mask(ids)`` gives ``ids != 0`` (True = real
            step), which ``Sequential`` hands to the next layer as its ``mask``.
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
        """Create the table ``[input_dim, output_dim]`` (``input_size`` is ignored: ids have none); returns self."""
        self._params = {"embeddings": initializers.initialize(
            self.embeddings_initializer, (self.input_dim, self.output_dim), self._rng, self.dtype,
            "embeddings_initializer")}
        return self

    def set_weights(self, weights):
        """Keras's ``[embeddings (input_dim, output_dim)]``."""
        return self._set_checked(weights, {"embeddings": (self.input_dim, self.output_dim)})

    def get_config(self) -> dict:
        return {"input_dim": self.input_dim, "output_dim": self.output_dim, "mask_zero": self.mask_zero,
                "embeddings_initializer": initializers.serialize(self.embeddings_initializer),
                "dtype": self.dtype.name, "seed": self.seed}

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(_host_input(ids, "ids", "Embedding"))
        if ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"ids must be integer token ids, got dtype {ids.dtype}")
        if ids.size:
            bad = np.flatnonzero((ids < 0) | (ids >= self.input_dim))
            if bad.size:
                position = tuple(int(i) for i in np.unravel_index(bad[0], ids.shape))
                raise ValueError(f"ids must be in [0, {self.input_dim}) (input_dim), got {int(ids[position])} "
                                 f"at position {position}")
        return ids

    def compute_mask(self, ids):
        """Bool ``ids != 0`` (True = real step) with mask_zero, else None."""
        return np.asarray(ids) != 0 if self.mask_zero else None

    def __call__(self, ids, training=False):
        """ids: integers ``[B, T]`` (any shape); returns ``[..., output_dim]``."""
        ids = self._check_ids(ids)
        if not self.built:
            self.build()
        if training:   # the tape references the caller's ids (checked under LSTMENG_DEBUG, as on LSTM)
            self._tapes.push((ids, InputGuard.of(ids, "ids") if debug_checks() else None))
        return self._params["embeddings"][ids]

    def backward(self, dy):
        """dy: ``[..., output_dim]``; sets ``grads["embeddings"]`` (a row sums every place its id was looked
        up) and returns None (ids have no gradient)."""
        ids, guard = self._tapes.peek()
        if guard is not None:
            guard.check()
        dy = _validation.check_numeric_array(_host_input(dy, "dy", "Embedding"), "dy", self.dtype)
        _validation.check_shape(dy, "dy", ids.shape + (self.output_dim,))
        _, accumulate = self._tapes.pop()
        table = self._grads["embeddings"].copy() if accumulate else np.zeros_like(self._params["embeddings"])
        np.add.at(table, ids.reshape(-1), dy.reshape(-1, self.output_dim))
        self._grads = {"embeddings": table}
        return None

    def __repr__(self) -> str:
        return f"Embedding({self.input_dim}, {self.output_dim}, mask_zero={self.mask_zero})"
