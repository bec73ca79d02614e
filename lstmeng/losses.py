"""Losses with their gradients: each returns ``(loss, dpredictions)``.

The loss is a Python float, the mean over the counted entries; the gradient
has the predictions' shape and dtype and is what the model's ``backward``
takes. Every loss takes an optional bool ``mask`` over the leading axes (True
= counted), for padded steps of a sequence: masked entries add nothing to
the loss, get a zero gradient, and are not counted in the mean::

    logits [B, T, C], targets [B, T], mask [[T, T, F], ...]  ->  mean over the True steps

The predictions decide where a loss computes. Host arrays (NumPy, or anything
``np.asarray`` converts, tf.Tensor included): with NumPy, on every backend.
CUDA device arrays (a model on the GPU): with numba-cuda kernels
(``lstmeng.backends._cuda_layers``), and the gradient is a device array; the
loss still comes back as a Python float, which costs one 24-byte copy to the
host that waits for the queued work. Targets and mask on the other side are
copied over (they are small next to a model's activations). Device
predictions of a dtype other than float32 and float64 are computed in
float32.

Example:
    >>> import numpy as np, lstmeng as le
    >>> loss, dlogits = le.losses.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 2]))
    >>> round(loss, 4), dlogits.shape
    (1.0986, (2, 3))
"""

from __future__ import annotations

import numpy as np

from lstmeng import _validation
from lstmeng._arrays import array_dtype_name, host_copy
from lstmeng.backends import registry

__all__ = ["mean_squared_error", "softmax_cross_entropy", "binary_cross_entropy", "get", "LOSSES"]


def _host(array, argument: str) -> np.ndarray:
    if registry.array_kind(array) == "cuda":   # with host predictions: copied to the host
        array = host_copy(array)
    array = np.asarray(array)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise TypeError(f"{argument} must be a numeric array, got dtype {array.dtype}")
    return array


def _float(predictions, argument: str) -> np.ndarray:
    predictions = _host(predictions, argument)
    if not np.issubdtype(predictions.dtype, np.floating):
        predictions = predictions.astype(np.float32)
    return predictions


def _check_mask(mask, shape: tuple, argument: str) -> None:
    """Raise unless ``mask`` (a host or device array) is boolean of ``shape``."""
    dtype = array_dtype_name(mask, argument)
    if dtype != "bool":
        raise TypeError(f"{argument} must be boolean (True = counted), got dtype {dtype}")
    if _validation.shape_of(mask) != tuple(shape):
        raise ValueError(f"{argument} must have shape {tuple(shape)}, got {_validation.shape_of(mask)}")


def _weights(mask, shape: tuple, argument: str = "mask") -> tuple[np.ndarray | None, float]:
    """The mask as 0/1 weights of ``shape`` (None = all counted) and the number of counted entries."""
    if mask is None:
        return None, float(np.prod(shape)) if shape else 1.0
    mask = _host(mask, argument)
    _check_mask(mask, shape, argument)
    return mask, float(mask.sum())


def _class_id_error(targets: np.ndarray, classes: int) -> ValueError:
    """The error for host class ids ``targets`` of which some lie outside [0, classes) (names the first)."""
    bad = targets[(targets < 0) | (targets >= classes)].flat[0]
    return ValueError(f"targets must be class ids in [0, {classes}), got {int(bad)}")


def _finish(total, gradient, count, predictions) -> tuple[float, np.ndarray]:
    """Mean loss and gradient; with nothing counted, 0 and zeros (not NaN)."""
    if count == 0:
        return 0.0, np.zeros_like(predictions)
    return float(total / count), (gradient / count).astype(predictions.dtype, copy=False)


def mean_squared_error(predictions, targets, mask=None) -> tuple[float, np.ndarray]:
    """Mean of ``(predictions - targets)**2`` over every counted element.

    Args:
        predictions: ``[B, ..., F]`` float.
        targets: same shape.
        mask: bool over the leading axes ``[B, ...]`` (without F), or None.

    Returns:
        (loss, dpredictions) with dpredictions = 2 (p - t) / count.

    Example:
        >>> import numpy as np, lstmeng as le
        >>> le.losses.mean_squared_error(np.array([[1.0], [3.0]]), np.array([[0.0], [1.0]]))[0]
        2.5
    """
    if registry.array_kind(predictions) == "cuda":
        return _device_mean_squared_error(predictions, targets, mask)
    predictions = _float(predictions, "predictions")
    targets = _host(targets, "targets")
    if targets.shape != predictions.shape:
        raise ValueError(f"targets must have the predictions' shape {predictions.shape}, got {targets.shape}")
    error = predictions - targets.astype(predictions.dtype)
    if predictions.ndim == 0:
        raise ValueError("predictions must be an array of shape (batch, ..., features), got a scalar")
    weights, count = _weights(mask, predictions.shape[:-1])
    if weights is not None:
        error = error * weights[..., None]
    count *= predictions.shape[-1]   # the mean is over elements, not positions
    return _finish(np.sum(error * error, dtype=np.float64), 2.0 * error, count, predictions)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - np.max(logits, axis=-1, keepdims=True)   # no overflow for large logits
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def softmax_cross_entropy(logits, targets, mask=None) -> tuple[float, np.ndarray]:
    """Cross-entropy of ``softmax(logits)`` against class ids or one-hot (or soft) targets.

    Args:
        logits: ``[B, ..., C]`` unnormalised scores (a Dense layer without activation).
        targets: integer class ids ``[B, ...]`` in [0, C), or probabilities ``[B, ..., C]``.
        mask: bool ``[B, ...]`` (e.g. ``[B, T]`` for padded steps), or None.

    Returns:
        (mean loss over counted positions, dlogits = (softmax - onehot) / count).

    Example:
        >>> import numpy as np, lstmeng as le
        >>> logits = np.array([[[2.0, 0.0], [0.0, 0.0]]])          # [B=1, T=2, C=2]
        >>> loss, _ = le.losses.softmax_cross_entropy(logits, np.array([[0, 1]]), mask=np.array([[True, False]]))
        >>> round(loss, 4)                                         # only step 0 counts
        0.1269
    """
    if registry.array_kind(logits) == "cuda":
        return _device_softmax_cross_entropy(logits, targets, mask)
    logits = _float(logits, "logits")
    if logits.ndim < 1:
        raise ValueError(f"logits must have a class axis, got shape {logits.shape}")
    classes = logits.shape[-1]
    targets = _host(targets, "targets")
    if targets.shape == logits.shape[:-1] and np.issubdtype(targets.dtype, np.integer):
        if targets.size and (targets.min() < 0 or targets.max() >= classes):
            raise _class_id_error(targets, classes)
        probabilities = np.zeros(logits.shape, logits.dtype)
        np.put_along_axis(probabilities, targets[..., None].astype(np.int64), 1.0, axis=-1)
    elif targets.shape == logits.shape:
        probabilities = targets.astype(logits.dtype)
    else:
        raise ValueError(f"targets must be integer class ids of shape {logits.shape[:-1]} or one-hot of shape "
                         f"{logits.shape}, got {targets.dtype} of shape {targets.shape}")
    log_probabilities = _log_softmax(logits)
    per_position = -np.sum(probabilities * log_probabilities, axis=-1, dtype=np.float64)
    gradient = np.exp(log_probabilities) * np.sum(probabilities, axis=-1, keepdims=True) - probabilities
    weights, count = _weights(mask, logits.shape[:-1])
    if weights is not None:
        per_position = per_position * weights
        gradient = gradient * weights[..., None]
    return _finish(np.sum(per_position), gradient, count, logits)


def binary_cross_entropy(logits, targets, mask=None) -> tuple[float, np.ndarray]:
    """Cross-entropy of ``sigmoid(logits)`` against 0/1 (or soft) targets, from the logits (stable).

    Args:
        logits: ``[B, ...]`` float.
        targets: same shape, in [0, 1].
        mask: bool of the logits' shape, or None.

    Returns:
        (mean loss, dlogits = (sigmoid(logits) - targets) / count).

    Example:
        >>> import numpy as np, lstmeng as le
        >>> round(le.losses.binary_cross_entropy(np.array([0.0]), np.array([1.0]))[0], 4)   # log 2
        0.6931
    """
    if registry.array_kind(logits) == "cuda":
        return _device_binary_cross_entropy(logits, targets, mask)
    logits = _float(logits, "logits")
    targets = _host(targets, "targets")
    if targets.shape != logits.shape:
        raise ValueError(f"targets must have the logits' shape {logits.shape}, got {targets.shape}")
    targets = targets.astype(logits.dtype)
    # log(1 + e^z) - z y, written with logaddexp so that no exp overflows.
    per_entry = np.logaddexp(0.0, logits) - logits * targets
    gradient = 0.5 * (1.0 + np.tanh(0.5 * logits)) - targets   # sigmoid in tanh form: no overflow
    weights, count = _weights(mask, logits.shape)
    if weights is not None:
        per_entry, gradient = per_entry * weights, gradient * weights
    return _finish(np.sum(per_entry, dtype=np.float64), gradient, count, logits)


# -- on the GPU: the same checks and messages, the numbers from numba-cuda kernels ------------------------------
def _device():
    """The numba_cuda array helpers and the loss kernels (numba is imported here, at the first device loss)."""
    from lstmeng.backends import _cuda_layers
    return registry.get_backend_object("numba_cuda").ops, _cuda_layers


def _device_array(ops, array, argument: str):
    """``array`` as a device array: a CUDA array in place, a host one checked and copied in."""
    if registry.array_kind(array) == "cuda":
        return ops.asarray(array, np.dtype(array_dtype_name(array, argument)))
    host = _host(array, argument)
    return ops.asarray(host, host.dtype)


def _device_float(ops, predictions, argument: str):
    """Device predictions in float32 or float64 (other dtypes are copied to float32)."""
    predictions = _device_array(ops, predictions, argument)
    if np.dtype(predictions.dtype).name not in ("float32", "float64"):
        predictions = ops.copy(predictions, np.float32)
    return predictions


def _device_mask(ops, mask, shape: tuple):
    if mask is None:
        return None
    mask = _device_array(ops, mask, "mask")
    _check_mask(mask, shape, "mask")
    return mask


def _device_same_shape(predictions, targets, argument: str):
    """(ops, kernels, predictions, targets, shape) for a loss whose targets have the predictions'
    shape (mean squared error, binary cross-entropy): both on the device, ValueError otherwise."""
    ops, kernels = _device()
    predictions = _device_float(ops, predictions, argument)
    targets = _device_array(ops, targets, "targets")
    shape = _validation.shape_of(predictions)
    if _validation.shape_of(targets) != shape:
        raise ValueError(f"targets must have the {argument}' shape {shape}, got {_validation.shape_of(targets)}")
    return ops, kernels, predictions, targets, shape


def _device_mean_squared_error(predictions, targets, mask):
    ops, kernels, predictions, targets, shape = _device_same_shape(predictions, targets, "predictions")
    if not shape:
        raise ValueError("predictions must be an array of shape (batch, ..., features), got a scalar")
    return kernels.mean_squared_error(predictions, targets, _device_mask(ops, mask, shape[:-1]))


def _device_softmax_cross_entropy(logits, targets, mask):
    ops, kernels = _device()
    logits = _device_float(ops, logits, "logits")
    shape = _validation.shape_of(logits)
    if not shape:
        raise ValueError(f"logits must have a class axis, got shape {shape}")
    targets = _device_array(ops, targets, "targets")
    target_shape, target_dtype = _validation.shape_of(targets), np.dtype(targets.dtype)
    class_ids = target_shape == shape[:-1] and np.issubdtype(target_dtype, np.integer)
    if not class_ids and target_shape != shape:
        raise ValueError(f"targets must be integer class ids of shape {shape[:-1]} or one-hot of shape "
                         f"{shape}, got {target_dtype} of shape {target_shape}")
    loss, gradient, bad = kernels.softmax_cross_entropy(logits, targets, _device_mask(ops, mask, shape[:-1]),
                                                        class_ids)
    if bad:   # flagged by the kernel; the host copy names the first bad id as the host check does
        raise _class_id_error(ops.to_numpy(targets), shape[-1])
    return loss, gradient


def _device_binary_cross_entropy(logits, targets, mask):
    ops, kernels, logits, targets, shape = _device_same_shape(logits, targets, "logits")
    return kernels.binary_cross_entropy(logits, targets, _device_mask(ops, mask, shape))


#: Names ``le.fit`` accepts for ``loss``.
LOSSES = {
    "mean_squared_error": mean_squared_error,
    "mse": mean_squared_error,
    "softmax_cross_entropy": softmax_cross_entropy,
    "binary_cross_entropy": binary_cross_entropy,
}


def get(loss):
    """A loss function from its name (see ``LOSSES``) or the callable itself."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)} or a callable (predictions, targets[, mask]) -> "
                         f"(loss, gradient), got {loss!r}")
    return LOSSES[loss]
