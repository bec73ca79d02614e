"""Test-session settings shared by every test module.

The CUDA simulator must be switched on before numba is first imported, so it
is set here, at collection time. On a machine with a real GPU, run with
LSTMENG_REAL_CUDA=1 to test the numba_cuda kernels on the device instead.
"""

import inspect
import os
import sys

import pytest

if os.environ.get("LSTMENG_REAL_CUDA") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    try:
        from _simulator_fixes import lock_shared_array_allocation
        lock_shared_array_allocation()   # the simulator's shared-array race (tests/_simulator_fixes.py)
    except ImportError:   # numba or numba-cuda not installed: no simulator to fix
        pass
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(autouse=True)
def _backend_methods_from_their_classes():
    """After each test, the loaded backends' methods come from their classes again.

    ``monkeypatch.setattr(backend, "sequence_backward", spy)`` on a backend object undoes itself by
    setting the bound method it read *on the instance*: the backends are process-wide singletons,
    so that leftover would hide every later spy or patch on the class (a full run failed a test
    that way). Torn down after ``monkeypatch`` (autouse fixtures are set up first)."""
    yield
    registry = sys.modules.get("lstmeng.backends.registry")
    if registry is None:
        return
    for backend, _ in list(registry._cache.values()):
        if backend is None:
            continue
        for name, value in list(getattr(backend, "__dict__", {}).items()):
            if (inspect.ismethod(value) and value.__self__ is backend
                    and getattr(type(backend), name, None) is value.__func__):
                delattr(backend, name)
