"""What LSTM and LSTMCell share: options, weights, dropout masks, backend choice.

Weights are host NumPy arrays in Keras's layout and gate order
(input, forget, cell candidate, output)::

    kernel:           [I, 4H]
    recurrent_kernel: [H, 4H]
    bias:             [4H]     (absent when use_bias=False)
"""

from __future__ import annotations

import numpy as np

from lstmeng import _validation, activations, initializers
from lstmeng.backends import registry

WEIGHT_NAMES = ("kernel", "recurrent_kernel", "bias")


class LSTMWeights:
    """Options and weights of one LSTM direction; the base of LSTM and LSTMCell."""

    def __init__(self, units, *, activation="tanh", recurrent_activation="sigmoid",
                 use_bias=True, kernel_initializer="glorot_uniform",
                 recurrent_initializer="orthogonal", bias_initializer="zeros",
                 unit_forget_bias=True, dropout=0.0, recurrent_dropout=0.0,
                 dtype="float32", backend="auto", seed=None):
        self.units = _validation.check_units(units)
        self.activation = activations.check_activation(activation, "activation")
        self.recurrent_activation = activations.check_activation(recurrent_activation, "recurrent_activation")
        self.use_bias = bool(use_bias)
        self.kernel_initializer = initializers.check_initializer(kernel_initializer, "kernel_initializer")
        self.recurrent_initializer = initializers.check_initializer(recurrent_initializer, "recurrent_initializer")
        self.bias_initializer = initializers.check_initializer(bias_initializer, "bias_initializer")
        self.unit_forget_bias = bool(unit_forget_bias)
        self.dropout = _validation.check_rate(dropout, "dropout")
        self.recurrent_dropout = _validation.check_rate(recurrent_dropout, "recurrent_dropout")
        self.dtype = _validation.check_dtype(dtype)
        if not isinstance(backend, str):
            raise ValueError(f"backend must be a backend name or 'auto', got {backend!r}")
        if backend != "auto":
            registry.get_backend_object(backend)  # unknown or unavailable: ValueError now
        self.backend = backend
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self.seed = None if seed is None else int(seed)
        self._rng = np.random.default_rng(self.seed)
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.input_size: int | None = None

    # -- weights ---------------------------------------------------------------
    @property
    def built(self) -> bool:
        return self.input_size is not None

    def weight_shapes(self, input_size: int) -> dict[str, tuple]:
        shapes = {"kernel": (input_size, 4 * self.units), "recurrent_kernel": (self.units, 4 * self.units)}
        if self.use_bias:
            shapes["bias"] = (4 * self.units,)
        return shapes

    def build(self, input_size):
        """Create the weights for ``input_size`` features (done on first call otherwise)."""
        input_size = _validation.check_units(input_size, "input_size")
        shapes = self.weight_shapes(input_size)
        params = {
            "kernel": initializers.initialize(self.kernel_initializer, shapes["kernel"], self._rng,
                                              self.dtype, "kernel_initializer"),
            "recurrent_kernel": initializers.initialize(self.recurrent_initializer, shapes["recurrent_kernel"],
                                                        self._rng, self.dtype, "recurrent_initializer"),
        }
        if self.use_bias:
            bias = initializers.initialize(self.bias_initializer, shapes["bias"], self._rng,
                                           self.dtype, "bias_initializer")
            if self.unit_forget_bias:
                # Keras: bias = [init(H), ones(H), init(2H)] so the forget gate starts open.
                bias[self.units:2 * self.units] = 1.0
            params["bias"] = bias
        self.params = params
        self.input_size = input_size
        return self

    def get_weights(self) -> list[np.ndarray]:
        """[kernel (I, 4H), recurrent_kernel (H, 4H), bias (4H,)] as copies (no bias if use_bias=False)."""
        if not self.built:
            return []
        return [self.params[name].copy() for name in WEIGHT_NAMES if name in self.params]

    def set_weights(self, weights):
        """Load Keras-layout weights; builds the layer from their shapes if needed.

        Nothing changes unless every array has the right shape.
        """
        weights = list(weights)
        names = [name for name in WEIGHT_NAMES if name != "bias" or self.use_bias]
        if len(weights) != len(names):
            raise ValueError(f"set_weights expects {len(names)} arrays ({', '.join(names)}), got {len(weights)}")
        arrays = [np.asarray(w) for w in weights]
        input_size = self.input_size if self.built else (arrays[0].shape[0] if arrays[0].ndim == 2 else 0)
        if input_size < 1:
            raise ValueError(f"set_weights: kernel must have shape (input_size >= 1, {4 * self.units}), "
                             f"got {arrays[0].shape}")
        shapes = self.weight_shapes(input_size)
        for name, array in zip(names, arrays):
            if array.shape != shapes[name]:
                raise ValueError(f"set_weights: {name} must have shape {shapes[name]}, got {array.shape}")
            if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
                raise TypeError(f"set_weights: {name} must be real numbers, got dtype {array.dtype}")
        self.params = {name: np.array(array, dtype=self.dtype, copy=True) for name, array in zip(names, arrays)}
        self.input_size = input_size
        return self

    def _options_config(self) -> dict:
        return {
            "units": self.units,
            "activation": self.activation,
            "recurrent_activation": self.recurrent_activation,
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "recurrent_initializer": initializers.serialize(self.recurrent_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "unit_forget_bias": self.unit_forget_bias,
            "dropout": self.dropout,
            "recurrent_dropout": self.recurrent_dropout,
            "dtype": self.dtype.name,
            "backend": self.backend,
            "seed": self.seed,
        }

    # -- per call --------------------------------------------------------------
    def _resolve_backend(self, x):
        return registry.resolve(self.backend, x, self.dtype, self.activation, self.recurrent_activation)

    def _check_input_size(self, input_size: int, argument: str = "x") -> None:
        """Raise if the layer is built for another number of features."""
        if self.built and input_size != self.input_size:
            raise ValueError(
                f"{argument} has {input_size} features but the layer was built for {self.input_size}")

    def _ensure_built(self, input_size: int, argument: str = "x"):
        self._check_input_size(input_size, argument)
        if not self.built:
            self.build(input_size)

    def _dropout_masks(self, batch: int, training: bool):
        """Inverted-dropout masks ``[B, I]`` and ``[B, H]`` (None when off), one per sequence."""
        input_mask = recurrent_mask = None
        if training and self.dropout > 0:
            keep = 1.0 - self.dropout
            input_mask = (self._rng.random((batch, self.input_size)) < keep).astype(self.dtype) / self.dtype.type(keep)
        if training and self.recurrent_dropout > 0:
            keep = 1.0 - self.recurrent_dropout
            recurrent_mask = (self._rng.random((batch, self.units)) < keep).astype(self.dtype) / self.dtype.type(keep)
        return input_mask, recurrent_mask

    def _weights_for(self, backend):
        return (backend.asarray(self.params["kernel"], self.dtype),
                backend.asarray(self.params["recurrent_kernel"], self.dtype),
                backend.asarray(self.params["bias"], self.dtype) if self.use_bias else None)

    def _store_grads(self, backend, grads) -> None:
        self.grads = {
            "kernel": backend.to_numpy(grads.dkernel),
            "recurrent_kernel": backend.to_numpy(grads.drecurrent_kernel),
        }
        if self.use_bias:
            self.grads["bias"] = backend.to_numpy(grads.dbias)


def prepare_input(backend, x, dtype, argument="x"):
    """Host input: checked and cast to ``dtype``; a backend's own arrays: dtype checked."""
    if registry.array_kind(x) == "host":
        return _validation.check_numeric_array(x, argument, dtype)
    name = getattr(x.dtype, "name", str(x.dtype))
    if name != dtype.name:
        raise TypeError(f"{argument} must have dtype {dtype.name} on this layer, got {name}")
    return backend.asarray(x, dtype)


def prepare_state(backend, state, dtype, argument, shape):
    """Check one initial state ``[B, H]`` and convert it to the backend's kind."""
    if state is None:
        raise ValueError(f"{argument} must be an array of shape {shape}, got None")
    if registry.array_kind(state) == "host":
        state = _validation.check_numeric_array(state, argument, dtype)
    _validation.check_shape(state, argument, shape)
    return backend.asarray(state, dtype)
