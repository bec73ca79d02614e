"""Devices of layers: "cpu" or "cuda:N", parsed, and the function that moves an array to one.

Weights live where the compute runs (PyTorch's and Keras's convention): host
NumPy arrays on "cpu", Numba device arrays on "cuda:N".
"""

from __future__ import annotations

import numpy as np

from lstmeng._arrays import array_dtype_name, host_copy
from lstmeng.backends import registry


def current_cuda_device() -> str:
    """"cuda:N" for numba's current CUDA device (0 under the simulator)."""
    backend = registry.get_backend_object("numba_cuda")
    return f"cuda:{backend.device_index()}"


def parse_device(device) -> str:
    """"cpu", "cuda" or "cuda:N" (or a torch.device) -> "cpu" or "cuda:N"; ValueError otherwise.

    "cuda:N" must be numba's current device: lstmeng launches on the current
    CUDA context, so another GPU is selected with numba.cuda.select_device(N)
    (or ``with numba.cuda.gpus[N]:``) before the layer is moved and called.
    """
    text = str(device).strip().lower()
    if text == "cpu":
        return "cpu"
    if text != "cuda" and not (text.startswith("cuda:") and text[5:].isdigit()):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    current = current_cuda_device()   # ValueError naming why when numba_cuda is unavailable
    if text != "cuda" and text != current:
        raise ValueError(f"device {text!r} is not numba's current CUDA device ({current}); select it first "
                         f"with numba.cuda.select_device({text[5:]}) or `with numba.cuda.gpus[{text[5:]}]:`")
    return current


def cuda_array_on_cpu_layer(argument: str) -> ValueError:
    """The error for a CUDA array given to a layer whose parameters are on the CPU (PyTorch's rule:
    no silent copy), naming both devices and the fix."""
    return ValueError(f"{argument}: expected an array on cpu, where this layer's parameters are, got an array "
                      f"on {current_cuda_device()}; call layer.to('cuda') first (or pass a NumPy array)")


def _mover(target: str):
    """A function that returns its array on ``target`` ("cpu" or "cuda:N"), copying only when needed."""
    if target == "cpu":
        return lambda array: array if registry.array_kind(array) == "host" else host_copy(array)
    backend = registry.get_backend_object("numba_cuda")

    def to_cuda(array):
        dtype = np.dtype(array_dtype_name(array)) if registry.array_kind(array) == "cuda" else array.dtype
        return backend.ops.asarray(array, dtype)
    return to_cuda
