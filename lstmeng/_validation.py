"""Argument checks shared by every layer: one place for each message.

Every check runs before any computation and raises with the argument's name,
what was expected and what was given.
"""

from __future__ import annotations

import numbers

import numpy as np

FLOAT_DTYPES = ("float32", "float64")


def check_dtype(dtype) -> np.dtype:
    """Return the float dtype named by ``dtype`` (float32 or float64)."""
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {list(FLOAT_DTYPES)}, got {dtype!r}")
    return resolved


def check_units(units, argument: str = "units") -> int:
    if isinstance(units, bool) or not isinstance(units, numbers.Integral) or units < 1:
        raise ValueError(f"{argument} must be a positive integer, got {units!r}")
    return int(units)


def check_rate(rate, argument: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{argument} must be a number in [0, 1), got {rate!r}")
    return float(rate)


def check_choice(value, argument: str, choices) -> object:
    if value not in choices:
        raise ValueError(f"{argument} must be one of {list(choices)}, got {value!r}")
    return value


def shape_of(array) -> tuple:
    return tuple(int(n) for n in array.shape)


def check_numeric_array(x, argument: str, dtype):
    """Host arrays: convert to ``dtype`` (ints are cast); non-numeric raises TypeError."""
    try:
        array = np.asarray(x)
    except (ValueError, TypeError) as error:  # ragged nested lists, objects NumPy cannot convert
        raise TypeError(f"{argument} must be a numeric array, got {type(x).__name__} that NumPy cannot "
                        f"convert ({error})") from None
    # dtype.kind: b bool, i/u integers, f floats, c complex (np.issubdtype said the same at
    # about a microsecond a call, three calls in every layer call).
    kind = array.dtype.kind
    if kind == "c":
        raise TypeError(f"{argument} must be real, got dtype {array.dtype}")
    if kind not in "biuf":
        raise TypeError(f"{argument} must be a numeric array, got {type(x).__name__} of dtype {array.dtype}")
    return array.astype(dtype, copy=False)


def check_rank(array, argument: str, rank: int, layout: str) -> None:
    if len(array.shape) != rank:
        raise ValueError(f"{argument} must have rank {rank} {layout}, got shape {shape_of(array)}")


def check_shape(array, argument: str, expected: tuple) -> None:
    if shape_of(array) != tuple(expected):
        raise ValueError(f"{argument} must have shape {tuple(expected)}, got {shape_of(array)}")


def check_finite(x_bti: np.ndarray, argument: str = "x") -> None:
    """Raise ValueError naming the first (row, step) of ``x: [B, T, I]`` holding NaN or inf."""
    bad = ~np.isfinite(x_bti).all(axis=-1)
    if bad.any():
        row, step = np.argwhere(bad)[0]
        raise ValueError(f"{argument} has a non-finite value at batch row {row}, time step {step}")
