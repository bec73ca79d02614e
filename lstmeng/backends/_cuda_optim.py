"""Fused optimizer kernels for parameters that live on the GPU (numba-cuda).

``lstmeng.optim`` calls these when a parameter is a CUDA array (anything
with ``__cuda_array_interface__``: Numba device arrays, CuPy arrays, PyTorch
CUDA tensors, and the backend's simulator arrays under
``NUMBA_ENABLE_CUDASIM=1``). Every update is one grid-stride launch per
parameter that reads the gradient, updates the optimizer's moments and writes
the parameter in the same pass: an optimizer step is memory-bound, so one
pass over (param, grad, moments) is the whole cost, and nothing crosses the
bus.

Options that are constant for a launch (weight decay on or off, momentum,
Nesterov, L2 or decoupled decay) are compile-time constants of a kernel
built once per combination (closure variables are constants to numba-cuda),
so the inner loop never tests them. Scalars arrive in the parameter's dtype,
so float32 parameters are updated in float32 arithmetic like the NumPy path
and torch.optim.

Gradient clipping needs the global norm over every gradient: one reduction
launch per gradient adds its sum of squares (accumulated in float64) into a
one-element device array, then ``clip_grad_norm`` copies that scalar to the
host (8 bytes, the only device-to-host copy of a step, and a synchronisation)
because it returns the norm as a Python float, and launches a scale kernel
per gradient only when clipping is needed.

Imported only by ``lstmeng.optim`` when it meets a device array: importing
lstmeng never imports numba.
"""

from __future__ import annotations

import functools
import math
import weakref

import numpy as np
from numba import cuda, float64

from lstmeng.backends import _cuda_elementwise as elementwise
from lstmeng.backends.numba_cuda import backend as _backend

#: Threads per block of every launch here; a power of two (the reduction halves it).
THREADS = elementwise.ELEMENTWISE_THREADS


def is_device_array(array) -> bool:
    """True for a CUDA array (one the numba_cuda backend can use in place)."""
    return _backend.ops.owns(array)


#: id(array) -> (weak reference to the array, its flat view). Parameters, moments
#: and (on GPU layers) gradients are the same arrays at every step, and building a
#: Numba device-array view is pure-Python work of the order of a launch (the device
#: pool caches its views for the same reason), so each array's view is built once.
#: Only arrays that are their own Numba view are cached (Numba's and the
#: simulator's): the view of a CuPy or torch array holds that array, and caching it
#: would keep it alive. An entry leaves with its array.
_FLAT_VIEWS: dict[int, tuple] = {}


def flat_view(array, what: str):
    """A 1-D Numba device view ``[N]`` of the CUDA array ``array`` (no copy).

    Raises:
        ValueError: ``array`` is not C-contiguous (a flat view would need a copy,
            and the update would then miss the caller's array).
    """
    key = id(array)
    cached = _FLAT_VIEWS.get(key)
    if cached is not None and cached[0]() is array:
        return cached[1]
    view = _backend.ops.view(array)
    if not view.is_c_contiguous():
        raise ValueError(f"{what}: the optimizer updates device arrays in place and needs them C-contiguous, "
                         f"got strides {view.strides} for shape {view.shape}")
    flat = view.reshape(view.size)
    if view is array:
        try:
            reference = weakref.ref(array, lambda _, key=key: _FLAT_VIEWS.pop(key, None))
        except TypeError:   # not weakly referenceable: no cache
            return flat
        _FLAT_VIEWS[key] = (reference, flat)
    return flat


def zeros_like(array):
    """A zero-filled device array with the shape and dtype of the CUDA array ``array``."""
    view = _backend.ops.view(array)
    return _backend.ops.zeros(view.shape, view.dtype)


def to_device(host: np.ndarray, dtype):
    """A device copy of host array ``host`` in ``dtype``."""
    return _backend.ops.asarray(host, np.dtype(dtype))


def to_host(array) -> np.ndarray:
    """A host copy of the CUDA array ``array``."""
    return _backend.ops.to_numpy(array)


def _launch_shape(count: int) -> tuple[int, int]:
    return elementwise.blocks_for(count, THREADS), THREADS


# -- updates -------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _adam_kernel(l2_decay: bool, decoupled_decay: bool):
    """The fused Adam/AdamW update for one combination of weight-decay flags (compile-time constants)."""

    @cuda.jit
    def adam_step(param, grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2, step_size,
                  bias_correction2_sqrt, eps, weight_decay, decay_factor):
        """param, grad, exp_avg, exp_avg_sq: [N], updated in place; scalars in param's dtype."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, param.shape[0], stride):
            value = param[i]
            if decoupled_decay:
                value = value * decay_factor
            gradient = grad[i]
            if l2_decay:
                gradient = gradient + weight_decay * value
            first = exp_avg[i]
            first = first + one_minus_beta1 * (gradient - first)   # torch's lerp, weight < 0.5
            second = exp_avg_sq[i] * beta2 + one_minus_beta2 * (gradient * gradient)
            exp_avg[i] = first
            exp_avg_sq[i] = second
            param[i] = value - step_size * (first / (math.sqrt(second) / bias_correction2_sqrt + eps))

    return adam_step


def adam_update(param, grad, exp_avg, exp_avg_sq, *, beta1: float, beta2: float, step_size: float,
                bias_correction2_sqrt: float, eps: float, weight_decay: float, decoupled: bool, lr: float) -> None:
    """One fused Adam (``decoupled=False``, L2 in the gradient) or AdamW step of one parameter.

    Args:
        param, grad, exp_avg, exp_avg_sq: CUDA arrays of one shape and dtype; all
            but ``grad`` are updated in place.
        step_size: ``lr / (1 - beta1**step)``.
        bias_correction2_sqrt: ``sqrt(1 - beta2**step)``.
    """
    flat = [flat_view(param, "param"), flat_view(grad, "grad"), flat_view(exp_avg, "exp_avg"),
            flat_view(exp_avg_sq, "exp_avg_sq")]
    scalar = flat[0].dtype.type
    kernel = _adam_kernel(bool(weight_decay) and not decoupled, bool(weight_decay) and decoupled)
    kernel[_launch_shape(flat[0].size)](
        *flat, scalar(1.0 - beta1), scalar(beta2), scalar(1.0 - beta2), scalar(step_size),
        scalar(bias_correction2_sqrt), scalar(eps), scalar(weight_decay), scalar(1.0 - lr * weight_decay))


@functools.lru_cache(maxsize=None)
def _sgd_kernel(weight_decay: bool, momentum: bool, nesterov: bool):
    """The fused SGD update for one combination of flags (compile-time constants)."""

    @cuda.jit
    def sgd_step(param, grad, momentum_buffer, lr, weight_decay_value, momentum_value):
        """param, grad, momentum_buffer: [N] (the buffer is untouched without momentum); scalars in param's dtype."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, param.shape[0], stride):
            value = param[i]
            direction = grad[i]
            if weight_decay:
                direction = direction + weight_decay_value * value
            if momentum:
                # The buffer starts at zero, so the first step stores the direction
                # itself, as torch's clone does.
                buffer = momentum_buffer[i] * momentum_value + direction
                momentum_buffer[i] = buffer
                if nesterov:
                    direction = direction + momentum_value * buffer
                else:
                    direction = buffer
            param[i] = value - lr * direction

    return sgd_step


def sgd_update(param, grad, momentum_buffer, *, lr: float, momentum: float, nesterov: bool,
               weight_decay: float) -> None:
    """One fused SGD step of one parameter; ``momentum_buffer`` is None without momentum."""
    flat_param, flat_grad = flat_view(param, "param"), flat_view(grad, "grad")
    # Without momentum the kernel never reads its buffer: the parameter stands in for it.
    flat_buffer = flat_param if momentum_buffer is None else flat_view(momentum_buffer, "momentum_buffer")
    scalar = flat_param.dtype.type
    kernel = _sgd_kernel(bool(weight_decay), momentum_buffer is not None, bool(nesterov))
    kernel[_launch_shape(flat_param.size)](flat_param, flat_grad, flat_buffer, scalar(lr), scalar(weight_decay),
                                           scalar(momentum))


# -- gradients -----------------------------------------------------------------------------------------------
@cuda.jit
def _sum_of_squares(values, total):
    """total[0] += sum(values**2) in float64; values: [N]; launched with THREADS threads per block."""
    partial = cuda.shared.array(THREADS, float64)
    thread = cuda.threadIdx.x
    accumulated = 0.0
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, values.shape[0], stride):
        value = float64(values[i])
        accumulated += value * value
    block_total = elementwise.block_sum(accumulated, partial)
    if thread == 0:
        # One atomic per block, not per thread.
        cuda.atomic.add(total, 0, block_total)


@cuda.jit
def _scale(values, factor):
    """values[i] *= factor; values: [N]."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, values.shape[0], stride):
        values[i] = values[i] * factor


def squared_norm(arrays) -> float:
    """sum(a**2) over the CUDA arrays ``arrays`` (float64 accumulation), as a Python float.

    One reduction launch per array into one device scalar, then one 8-byte
    device-to-host copy (which waits for the launches). The scalar comes from
    the backend's scratch pool, so a training loop allocates nothing here.
    """
    total = _backend._scratch((1,), np.float64)
    try:
        elementwise.fill_1d[1, THREADS](total, 0)
        for array in arrays:
            flat = flat_view(array, "grad")
            if flat.size:
                _sum_of_squares[_launch_shape(flat.size)](flat, total)
        return float(_backend.ops.to_numpy(total)[0])
    finally:
        _backend._release(total)


def scale_in_place(array, factor: float) -> None:
    """``array *= factor`` on the device (factor rounded to the array's dtype, as torch's mul_ does)."""
    flat = flat_view(array, "grad")
    if flat.size:
        _scale[_launch_shape(flat.size)](flat, flat.dtype.type(factor))


def fill_zero(array) -> None:
    """``array[...] = 0`` on the device."""
    flat = flat_view(array, "grad")
    if flat.size:
        elementwise.fill_1d[_launch_shape(flat.size)](flat, 0)
