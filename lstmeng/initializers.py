"""Weight initializers by name, as Keras defines them, drawn from a NumPy Generator.

A callable ``(shape, rng) -> ndarray`` is accepted wherever a name is.
"""

from __future__ import annotations

import numpy as np


def glorot_uniform(shape, rng):
    fan_in, fan_out = shape[0], shape[-1] if len(shape) > 1 else shape[0]
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


def orthogonal(shape, rng):
    # Keras's Orthogonal on a 2-D shape: QR of a normal matrix, sign-fixed so
    # the result is uniformly distributed over orthogonal matrices.
    rows, cols = shape[0], int(np.prod(shape[1:])) if len(shape) > 1 else 1
    flat = rng.normal(size=(max(rows, cols), min(rows, cols)))
    # One BLAS thread: a multi-threaded OpenBLAS call leaves its idle workers
    # busy-waiting for ~0.1 s, and they took a core from the layer's first calls
    # (a new layer's first ~10 forwards ran at half speed). The QR of an [H, 4H]
    # matrix is milliseconds on one thread.
    from lstmeng._runtime.threads import single_threaded_blas
    with single_threaded_blas():
        q, r = np.linalg.qr(flat)
    q *= np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return q.reshape(shape)


def zeros(shape, rng):
    return np.zeros(shape)


def ones(shape, rng):
    return np.ones(shape)


def uniform(shape, rng):
    """Keras's RandomUniform defaults: U(-0.05, 0.05)."""
    return rng.uniform(-0.05, 0.05, size=shape)


def normal(shape, rng):
    """Keras's RandomNormal defaults: N(0, 0.05)."""
    return rng.normal(0.0, 0.05, size=shape)


INITIALIZERS = {
    "glorot_uniform": glorot_uniform,
    "orthogonal": orthogonal,
    "zeros": zeros,
    "ones": ones,
    "uniform": uniform,
    "normal": normal,
}


def check_initializer(initializer, argument: str):
    """Return ``initializer`` if it is a known name or a callable, else raise ValueError."""
    if callable(initializer) or initializer in INITIALIZERS:
        return initializer
    raise ValueError(f"{argument} must be one of {list(INITIALIZERS)} or a callable (shape, rng), got {initializer!r}")


def initialize(initializer, shape, rng, dtype, argument: str) -> np.ndarray:
    """Draw an array of ``shape`` and ``dtype``; a callable's result is checked for shape."""
    function = INITIALIZERS[initializer] if isinstance(initializer, str) else initializer
    values = np.asarray(function(tuple(shape), rng), dtype=dtype)
    if values.shape != tuple(shape):
        raise ValueError(f"{argument} returned shape {values.shape}, expected {tuple(shape)}")
    return np.ascontiguousarray(values)


def serialize(initializer):
    """Name for get_config; callables cannot be serialized to JSON and are saved by their name if registered."""
    if isinstance(initializer, str):
        return initializer
    return getattr(initializer, "__name__", repr(initializer))
