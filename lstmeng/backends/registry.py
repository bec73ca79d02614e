"""Backend registry: built-in table, entry-point plugins, the process default.

Built-in backends live in one table ``name -> module``; third-party backends
register through the entry-point group ``lstmeng.backends`` (the entry point
loads a ``KernelBackend`` instance or subclass). Nothing is imported until a backend
is asked for, and a backend that fails to import or probe becomes an
"unavailable: <reason>" row, never an error at ``import lstmeng``.

Probing is cheap first: a missing optional library (``importlib.util.find_spec``)
or a missing NVIDIA driver library is reported without importing anything, and
``list_backends()`` leaves the backends whose import costs seconds
(``DEFERRED_PROBES``: TensorFlow) unprobed until they are used or
``list_backends(probe=True)`` asks.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import difflib
import importlib
import importlib.util
import os
import sys
import threading
import warnings
from importlib import metadata

import numpy as np

from lstmeng.backends.base import KernelBackend

ENTRY_POINT_GROUP = "lstmeng.backends"
ENVIRONMENT_VARIABLE = "LSTMENG_BACKEND"

#: name -> module holding a module-level ``backend`` instance.
BUILTIN_BACKENDS = {
    "numpy": "lstmeng.backends.numpy",
    "cython": "lstmeng.backends.cython",
    "numba_cuda": "lstmeng.backends.numba_cuda",
    "tensorflow": "lstmeng.backends.tensorflow",
}

#: Built-in backends' optional dependency: checked with importlib.util.find_spec (no import) before
#: the backend module is imported, so that a missing library costs nothing to report.
OPTIONAL_DEPENDENCIES = {"numba_cuda": "numba", "tensorflow": "tensorflow"}

#: Backends that ``list_backends()`` reports from the cheap checks alone (installed or not): importing
#: them takes seconds (TensorFlow: 2-7 s), so they are probed when first used or on ``probe=True``.
DEFERRED_PROBES = frozenset({"tensorflow"})

# Preference order for "auto" on host (NumPy) arrays.
HOST_PREFERENCE = ("cython", "numpy")


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """One row of ``list_backends()``."""

    name: str
    available: bool
    reason: str
    device: str
    #: False for a row from the cheap checks alone (a deferred backend that is installed but not yet
    #: imported): ``available`` then means "installed", and the first use imports and probes it.
    probed: bool = True


_lock = threading.RLock()
_cache: dict[str, tuple[KernelBackend | None, BackendInfo]] = {}
#: resolve()'s answers: (backend name or "auto", array kind, dtype, activation, recurrent_activation)
#: -> backend. A backend's check_support depends on its arguments alone, so an answer holds until
#: refresh(); a one-step call (a cell step, about 20 us) paid 3-4 us to find it again.
_resolved: dict[tuple, KernelBackend] = {}
_plugins: dict[str, metadata.EntryPoint] | None = None


class _Scopes(threading.local):
    """Per thread: the stack of ``use_backend`` names. None until the thread's first scope (a class
    attribute, so that reading it does not raise and catch AttributeError: ~0.3 us a call)."""

    stack: list[str] | None = None


_default = _Scopes()
_process_default: list[str | None] = [None]


def _plugin_entry_points() -> dict[str, metadata.EntryPoint]:
    global _plugins
    if _plugins is None:
        found = {}
        try:
            for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
                if entry_point.name not in BUILTIN_BACKENDS:
                    found[entry_point.name] = entry_point
        except Exception as error:  # a broken distribution must not break lstmeng
            warnings.warn(f"lstmeng: could not read entry points {ENTRY_POINT_GROUP!r}: {error}", stacklevel=2)
        _plugins = found
    return _plugins


def known_backend_names() -> list[str]:
    """Built-in names, then plugin names."""
    return list(BUILTIN_BACKENDS) + sorted(_plugin_entry_points())


#: Where each platform keeps the NVIDIA driver's library (what numba-cuda loads).
_CUDA_DRIVER_LIBRARIES = {"linux": ("libcuda.so.1", "libcuda.so"), "win32": ("nvcuda.dll",)}


def _cuda_driver_reason() -> str | None:
    """Why no CUDA driver can be there, found without importing numba (None: it may be, probe it).

    The simulator needs no driver, and a driver named by NUMBA_CUDA_DRIVER is left to numba to find.
    """
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0") or os.environ.get("NUMBA_CUDA_DRIVER"):
        return None
    candidates = _CUDA_DRIVER_LIBRARIES.get(sys.platform, ())
    for library in candidates:
        try:
            ctypes.CDLL(library)
            return None
        except OSError:
            continue
    where = f"none of {', '.join(candidates)} can be loaded" if candidates else f"no CUDA on {sys.platform}"
    return f"no NVIDIA driver ({where}; NUMBA_ENABLE_CUDASIM=1 runs the simulator)"


def _cheap_reason(name: str) -> str | None:
    """Why ``name`` is unavailable, from checks that import nothing (None: it may be available)."""
    dependency = OPTIONAL_DEPENDENCIES.get(name)
    if dependency is not None and importlib.util.find_spec(dependency) is None:
        return f"{dependency} is not installed (pip install {dependency})"
    if name == "numba_cuda":
        return _cuda_driver_reason()
    return None


def _load(name: str) -> tuple[KernelBackend | None, BackendInfo]:
    reason = _cheap_reason(name)
    if reason is not None:
        return None, BackendInfo(name, False, reason, "")
    try:
        if name in BUILTIN_BACKENDS:
            backend = importlib.import_module(BUILTIN_BACKENDS[name]).backend
        else:
            loaded = _plugin_entry_points()[name].load()
            backend = loaded() if isinstance(loaded, type) else loaded
        if not isinstance(backend, KernelBackend):
            raise TypeError(f"{type(backend).__name__} is not an lstmeng.backends.KernelBackend")
        device = backend.probe()
        return backend, BackendInfo(name, True, "", device)
    except Exception as error:  # import errors, missing drivers, plugin bugs: all become reasons
        reason = f"{type(error).__name__}: {error}" if not isinstance(error, NotImplementedError) else str(error)
        if name not in BUILTIN_BACKENDS:
            warnings.warn(f"lstmeng backend plugin {name!r} is unavailable: {reason}", stacklevel=2)
        return None, BackendInfo(name, False, reason.strip() or type(error).__name__, "")


def _entry(name: str) -> tuple[KernelBackend | None, BackendInfo]:
    with _lock:
        if name not in _cache:
            _cache[name] = _load(name)
        return _cache[name]


def refresh() -> None:
    """Forget cached probes, plugin lists and resolve()'s answers (after installing a plugin or a driver)."""
    global _plugins
    with _lock:
        _cache.clear()
        _resolved.clear()
        _plugins = None


def _unprobed(name: str) -> BackendInfo:
    """The row of a deferred backend that passed the cheap checks: installed, not imported yet."""
    dependency = OPTIONAL_DEPENDENCIES.get(name, name)
    try:
        version = " " + metadata.version(dependency)
    except metadata.PackageNotFoundError:
        version = ""
    return BackendInfo(name, True, "", f"not probed yet: {dependency}{version} is installed and is imported at "
                                       "first use (list_backends(probe=True) imports and checks it now)",
                       probed=False)


def list_backends(probe: bool = False) -> list[BackendInfo]:
    """Every known backend with whether it is available, why not, and its device.

    Fast by default: a backend already in use is reported from its probe, a missing library or
    NVIDIA driver is found without importing anything, and a backend whose import costs seconds
    (``DEFERRED_PROBES``: TensorFlow) is reported as installed with ``probed=False`` and is
    imported and checked at its first use. ``probe=True`` imports and probes every backend now
    (what ``lstmeng info`` does).

    Example:
        >>> import lstmeng as le
        >>> [info.name for info in le.list_backends()][:2]
        ['numpy', 'cython']
    """
    rows = []
    for name in known_backend_names():
        with _lock:
            cached = _cache.get(name)
        if cached is not None or probe or name not in DEFERRED_PROBES:
            rows.append(_entry(name)[1])
            continue
        reason = _cheap_reason(name)
        if reason is not None:
            rows.append(_entry(name)[1])   # as cheap as the check itself, and now cached
        else:
            rows.append(_unprobed(name))
    return rows


def _unavailable_message(name: str) -> str:
    rows = list_backends()
    available = [row.name for row in rows if row.available]
    reasons = "; ".join(f"{row.name}: {row.reason}" for row in rows if not row.available)
    message = f"available backends: {available}"
    if reasons:
        message += f"; unavailable: {reasons}"
    return message


def get_backend_object(name: str) -> KernelBackend:
    """The backend (a KernelBackend) registered as ``name``; ValueError if unknown or unavailable.

    A misspelt name close to a known one is answered at once with a "did you
    mean", before any backend is imported or probed.
    """
    known = known_backend_names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6) if isinstance(name, str) else []
        if close:
            raise ValueError(f"unknown backend {name!r}; did you mean {close[0]!r}? (known backends: {known}; "
                             "le.list_backends() says which are available)")
        raise ValueError(f"unknown backend {name!r}; {_unavailable_message(name)}")
    backend, info = _entry(name)
    if backend is None:
        raise ValueError(f"backend {name!r} is unavailable ({info.reason}); {_unavailable_message(name)}")
    return backend


def check_backend_choice(name) -> str:
    """``name`` when it is "auto" or an available backend's name, else a ValueError naming the problem.

    What every layer's ``backend=`` argument accepts (lstmeng's layers, lstmeng.keras,
    lstmeng.torch): an unknown or unavailable name fails at construction, with the
    available ones listed, not at the first call.
    """
    if not isinstance(name, str):
        raise ValueError(f"backend must be a backend name or 'auto', got {name!r}")
    if name != "auto":
        get_backend_object(name)
    return name


_check_name = check_backend_choice


def set_backend(name: str) -> None:
    """Set the process-wide default backend by name ("auto" restores automatic choice)."""
    _process_default[0] = _check_name(name)


def get_backend() -> str:
    """The default backend name in force: a ``use_backend`` scope, else ``set_backend``,
    else the LSTMENG_BACKEND environment variable, else "auto"."""
    scoped = _default.stack
    if scoped:
        return scoped[-1]
    if _process_default[0] is not None:
        return _process_default[0]
    return os.environ.get(ENVIRONMENT_VARIABLE, "auto") or "auto"


@contextlib.contextmanager
def use_backend(name: str):
    """Scoped default backend (per thread).

    Example:
        >>> import lstmeng as le
        >>> with le.use_backend("numpy"):
        ...     le.get_backend()
        'numpy'
    """
    _check_name(name)
    stack = _default.stack
    if stack is None:
        stack = _default.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def array_kind(array) -> str:
    """"tensorflow", "cuda" or "host", decided without importing TensorFlow or Numba."""
    if type(array) is np.ndarray:
        # First: every host call asks, and the attribute test below raises and catches
        # AttributeError inside hasattr (~0.5 us of a ~30 us batch-1 cell step).
        return "host"
    module = type(array).__module__ or ""
    if module.startswith(("tensorflow", "tf_keras")):
        return "tensorflow"
    if hasattr(array, "__cuda_array_interface__"):
        return "cuda"
    return "host"


def backend_for_array(array) -> KernelBackend:
    """The backend whose arrays ``array`` is: numba_cuda, tensorflow, or numpy for host arrays."""
    kind = array_kind(array)
    return get_backend_object({"tensorflow": "tensorflow", "cuda": "numba_cuda"}.get(kind, "numpy"))


def resolve(requested: str, array, dtype, activation: str, recurrent_activation: str) -> KernelBackend:
    """Choose the backend for one call.

    ``requested`` is a layer's ``backend`` argument. "auto" defers to the
    default in force; if that is "auto" too, the input's array type decides:
    CUDA arrays -> numba_cuda, tf.Tensor -> tensorflow, host arrays -> the
    first of HOST_PREFERENCE that is available and supports the configuration.
    A backend named explicitly that cannot run this configuration raises
    ValueError with the reason.
    """
    name = requested if requested != "auto" else get_backend()
    key = (name, array_kind(array) if name == "auto" else "", dtype, activation, recurrent_activation)
    try:
        return _resolved[key]
    except KeyError:
        pass
    except TypeError:   # an unhashable dtype argument: answered, not remembered
        return _resolve(name, array, dtype, activation, recurrent_activation)
    backend = _resolve(name, array, dtype, activation, recurrent_activation)
    _resolved[key] = backend
    return backend


def _resolve(name: str, array, dtype, activation: str, recurrent_activation: str) -> KernelBackend:
    """resolve() for the backend name in force (``requested``, or the default when it was "auto")."""
    if name != "auto":
        backend = get_backend_object(name)
        try:
            backend.check_support(dtype, activation, recurrent_activation)
        except NotImplementedError as error:
            raise ValueError(f"backend {name!r} cannot run this layer: {error}") from None
        return backend
    kind = array_kind(array)
    candidates = {"tensorflow": ("tensorflow",), "cuda": ("numba_cuda",)}.get(kind, HOST_PREFERENCE)
    reasons = []
    for candidate in candidates:
        backend, info = _entry(candidate)
        if backend is None:
            reasons.append(f"{candidate}: {info.reason}")
            continue
        try:
            backend.check_support(dtype, activation, recurrent_activation)
        except NotImplementedError as error:
            reasons.append(f"{candidate}: {error}")
            continue
        return backend
    if kind == "host":
        raise ValueError(f"no backend can run this layer ({'; '.join(reasons)})")
    raise ValueError(f"input is a {kind} array but no {kind} backend can run it ({'; '.join(reasons)})")
