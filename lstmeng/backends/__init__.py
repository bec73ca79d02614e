"""Backends: the contract (``base``), the registry, and one module per backend.

Importing this package imports no backend library (TensorFlow, Numba): each
backend module is loaded on first use by the registry.
"""

from lstmeng.backends.base import (
    ArrayOps,
    KernelBackend,
    SequenceForward,
    SequenceGrads,
    SequenceOptions,
    Workspace,
)
from lstmeng.backends.registry import (
    BackendInfo,
    get_backend,
    get_backend_object,
    list_backends,
    refresh,
    set_backend,
    use_backend,
)

__all__ = [
    "ArrayOps",
    "BackendInfo",
    "KernelBackend",
    "SequenceForward",
    "SequenceGrads",
    "SequenceOptions",
    "Workspace",
    "get_backend",
    "get_backend_object",
    "list_backends",
    "refresh",
    "set_backend",
    "use_backend",
]
