"""The CUDA simulator's shared-array race, and the tests' workaround for it (tests/_simulator_fixes.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

import _simulator_fixes
from _backends import REAL_GPU

cuda = pytest.importorskip("numba.cuda")   # a module global: the simulator swaps globals named for it
from numba import float32  # noqa: E402

pytestmark = pytest.mark.skipif(REAL_GPU, reason="a CUDA simulator workaround; a real GPU has no such race")

THREADS = 16
LAUNCHES = 20
#: Long enough for the threads started meanwhile to reach their own lookup (a thread starts in ~50 us).
ALLOCATION_DELAY_S = 2e-3


def _rotate_kernel():
    """Each thread stores into a shared array, waits at the barrier, then reads its neighbour's store."""
    @cuda.jit
    def rotate(out):
        values = cuda.shared.array(THREADS, float32)
        thread = cuda.threadIdx.x
        values[thread] = thread + 1
        cuda.syncthreads()
        out[thread] = values[(thread + 1) % THREADS]

    return rotate


def _bad_launches(kernel) -> int:
    """Launches of ``kernel`` (one block) in which some thread did not see another thread's store."""
    expected = ((np.arange(THREADS) + 1) % THREADS + 1).astype(np.float32)
    bad = 0
    for _ in range(LAUNCHES):
        out = np.zeros(THREADS, np.float32)
        kernel[1, THREADS](out)
        bad += not np.array_equal(out, expected)
    return bad


class _SlowEmptyNumpy:
    """numpy, except that ``empty`` first sleeps: a thread switch inside the simulator's allocation."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(*args, **kwargs):
        time.sleep(ALLOCATION_DELAY_S)
        return np.empty(*args, **kwargs)


def test_shared_arrays_are_shared_even_when_threads_allocate_together(monkeypatch):
    from numba.cuda.simulator import kernelapi

    shared = kernelapi.FakeCUDAShared
    assert getattr(shared, "_lstmeng_locked_allocation", False), "tests/conftest.py did not apply the workaround"
    kernel = _rotate_kernel()

    # The simulator's own method, its allocation slowed down: threads starting together get arrays of their own.
    with monkeypatch.context() as patched:
        patched.setattr(shared, "array", shared._lstmeng_unlocked_array)
        patched.setattr(kernelapi, "np", _SlowEmptyNumpy())
        unlocked_bad = _bad_launches(_rotate_kernel())
    if unlocked_bad == 0:
        pytest.skip("numba-cuda's FakeCUDAShared.array no longer races here: tests/_simulator_fixes.py can go")

    # The locked method, its allocation slowed down the same way: every thread of a block sees one array.
    def slow_allocate(shape, dtype):
        time.sleep(ALLOCATION_DELAY_S)
        return np.empty(shape, dtype)

    monkeypatch.setattr(_simulator_fixes, "_allocate", slow_allocate)
    assert _bad_launches(kernel) == 0, f"the unlocked method failed {unlocked_bad} of {LAUNCHES} launches"
