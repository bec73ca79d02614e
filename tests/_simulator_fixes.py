"""A workaround for a race in numba-cuda's CUDA simulator, applied by tests/conftest.py.

The simulator runs each CUDA thread of a block as a Python thread, and its
``cuda.shared.array`` (``FakeCUDAShared.array``, numba-cuda 0.30.4) finds a
block's shared array by the calling line: it looks the line up in a dict and,
when absent, allocates the array and inserts it, without a lock. Threads that
start together can each find nothing and insert their own array: a thread then
keeps a private "shared" array, reads none of the other threads' stores, and
computes garbage. In CI this showed as an occasional wrong weight gradient
(tests/test_backend_numba_cuda.py, a cell's dkernel: exactly the outputs of
one thread of the simulated 8 x 8 GEMM tile were zeros) that passed on rerun.
The tests' short GIL switch interval (``fast_simulator_thread_switches``)
makes the interleaving more likely. tests/test_simulator_fixes.py shows the
race on the unpatched method and its absence here.

Not a bug of lstmeng's kernels: on a GPU a block has one shared array per
declaration. The library itself never patches numba.
"""

from __future__ import annotations

import sys
import threading

import numpy as np


def _allocate(shape, dtype):
    """A new shared array's storage (a module function so that the test can slow it down)."""
    return np.empty(shape, dtype)


def lock_shared_array_allocation() -> bool:
    """Make the simulator's per-line lookup and insertion of a shared array one atomic step.

    Returns True when it patched, False when it had already (idempotent).
    """
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    shared = kernelapi.FakeCUDAShared
    if getattr(shared, "_lstmeng_locked_allocation", False):
        return False
    unlocked = shared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:
            # Dynamic shared memory is one buffer made beforehand, and an alignment is an
            # error in the simulator: neither looks anything up.
            return unlocked(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        call_site = (caller.f_code.co_filename, caller.f_lineno)   # the key the simulator uses
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        with lock:
            found = self._allocations.get(call_site)
            if found is None:
                found = self._allocations[call_site] = _allocate(shape, dtype)
        return found

    shared.array = array
    shared._lstmeng_locked_allocation = True
    shared._lstmeng_unlocked_array = unlocked
    return True
