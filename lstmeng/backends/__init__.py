"""Backends: the contract (``base``), the registry, and one module per backend.

Importing this package imports no backend library (TensorFlow, Numba): each
backend module is loaded on first use by the registry.
"""

from lstmeng.backends.base import Backend, SequenceForward, SequenceGrads
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
    "Backend",
    "BackendInfo",
    "SequenceForward",
    "SequenceGrads",
    "get_backend",
    "get_backend_object",
    "list_backends",
    "refresh",
    "set_backend",
    "use_backend",
]
