"""Dropout: inverted dropout on every element during training, identity otherwise."""

from __future__ import annotations

import numpy as np

from lstmeng import _validation
from lstmeng._arrays import LayerArrays
from lstmeng._tape import TrainingTape
from lstmeng.backends import registry


class Dropout:
    """Inverted dropout on every element during training (identity otherwise).

    Example:
        >>> import numpy as np, lstmeng as le
        >>> le.Dropout(0.5, seed=0)(np.ones((2, 3)), training=False).tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """

    def __init__(self, rate, seed=None):
        self.rate = _validation.check_rate(rate, "rate")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self.seed = None if seed is None else int(seed)
        self._rng = np.random.default_rng(self.seed)
        self._tapes = TrainingTape()
        self._params, self._grads = {}, {}

    params = property(lambda self: LayerArrays(self, "params"), doc="Empty: Dropout has no weights.")
    grads = property(lambda self: LayerArrays(self, "grads"), doc="Empty: Dropout has no weights.")

    def zero_grads(self):
        return self

    def reset_tape(self):
        self._tapes.clear()
        return self

    def __call__(self, x, training=False):
        if registry.array_kind(x) == "host":
            x = np.asarray(x)
        if not training:   # an inference call leaves the tape as it is
            return x
        if self.rate == 0:
            self._tapes.push(("identity", None, tuple(x.shape)))
            return x
        backend = registry.backend_for_array(x) if registry.array_kind(x) != "host" else None
        keep = 1.0 - self.rate
        shape = tuple(int(n) for n in x.shape)
        dtype = np.dtype(getattr(x.dtype, "name", str(x.dtype)))
        noise = (self._rng.random(shape) < keep).astype(dtype) / dtype.type(keep)
        if backend is None:
            self._tapes.push(("host", noise, shape))
            return np.asarray(x) * noise
        noise = backend.ops.asarray(noise, dtype)
        self._tapes.push(("backend", (backend, noise), shape))
        return backend.ops.multiply(x, noise)

    def backward(self, dy):
        """dy: the output's shape; returns dx (the most recent training call's, as LSTM.backward)."""
        kind, noise, shape = self._tapes.peek()
        if _validation.shape_of(dy) != shape:
            raise ValueError(f"dy must have shape {shape}, got {_validation.shape_of(dy)}")
        self._tapes.pop()
        if kind == "identity":
            return dy
        if kind == "host":
            return np.asarray(dy) * noise
        backend, noise = noise
        return backend.ops.multiply(dy, noise)

    def get_weights(self):
        return []

    def set_weights(self, weights):
        if len(list(weights)) != 0:
            raise ValueError("Dropout has no weights")
        return self

    def get_config(self):
        return {"rate": self.rate, "seed": self.seed}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"Dropout({self.rate})"
