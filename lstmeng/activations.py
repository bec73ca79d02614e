"""Activation functions in NumPy, with derivatives written from their outputs.

Backends that store activated gates (not pre-activations) in their workspace
need each derivative as a function of the activation's output; every function
here allows that. ``hard_sigmoid`` is Keras 3's: ``clip(x / 6 + 0.5, 0, 1)``.
"""

from __future__ import annotations

import numpy as np

from lstmeng.backends.base import ACTIVATIONS, RECURRENT_ACTIVATIONS


def sigmoid(x):
    # exp of -|x| only, so large inputs saturate without overflow warnings.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def hard_sigmoid(x):
    return np.clip(x / 6.0 + 0.5, 0.0, 1.0).astype(x.dtype, copy=False)


def relu(x):
    return np.maximum(x, 0)


def linear(x):
    return x


FUNCTIONS = {
    "tanh": np.tanh,
    "relu": relu,
    "sigmoid": sigmoid,
    "hard_sigmoid": hard_sigmoid,
    "linear": linear,
}

# d activation / d input, as a function of the activation's output y.
DERIVATIVES_FROM_OUTPUT = {
    "tanh": lambda y: 1.0 - y * y,
    "relu": lambda y: (y > 0).astype(y.dtype),
    "sigmoid": lambda y: y * (1.0 - y),
    # Flat outside (0, 1); slope 1/6 inside.
    "hard_sigmoid": lambda y: ((y > 0) & (y < 1)).astype(y.dtype) / 6.0,
    "linear": lambda y: np.ones_like(y),
}


def check_activation(name, argument: str = "activation") -> str:
    """Return ``name`` if it is a known activation for ``argument``, else raise ValueError."""
    allowed = RECURRENT_ACTIVATIONS if argument == "recurrent_activation" else ACTIVATIONS
    if name not in allowed:
        raise ValueError(f"{argument} must be one of {list(allowed)}, got {name!r}")
    return name
