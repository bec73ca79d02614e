"""Device scratch memory kept between kernel launches, so that a GPU training loop allocates nothing.

Why: every ``numba.cuda.device_array`` is a ``cuMemAlloc`` (tens of
microseconds for large blocks) and its release a deferred ``cuMemFree``; a
training step of the numba_cuda backend used about ten of them for
workspaces and scratch, a large part of its per-call cost at small sizes
(../../shared/gpu/H200-baseline.md: 1.8-4.7 ms per call before the first
step). A training loop asks for the same sizes every step, so the blocks one
call releases serve the next.

The model is the cython backend's host ``BufferCache`` (``_buffer_cache.py``):
only arrays that never reach the caller go through the pool: scratch
released when the launches that use it are queued, and a training workspace
once its backward has consumed it. Outputs (y, h, c, gradients) are always
fresh arrays, so a caller can keep them. Reuse is safe without
synchronisation because every launch of the backend goes to one stream
(Numba's default stream): a block handed out again is written only by
launches queued after those that read it.

It is the backend's own pool, not a Numba EMM plugin: installing a
process-wide memory manager would change every other Numba user's
allocations behind their back. ``release_buffers()`` on the backend empties it.

Example (on a GPU, or under the simulator)::

    pool = DevicePool(max_bytes=2**30)
    scratch = pool.take((1024, 4096), np.float32)   # 16 MiB, new
    pool.give(scratch)
    again = pool.take((1024, 4096), np.float32)     # the same memory
"""

from __future__ import annotations

import math
import threading
import weakref

import numpy as np

#: Smaller requests are served too (device allocations cost the same at any
#: size, unlike host malloc, which reuses small blocks itself).
MIN_POOLED_BYTES = 1


class DevicePool:
    """A bounded pool of device byte blocks, handed out as arrays of any shape and dtype.

    Args:
        allocate: ``allocate(nbytes) -> 1-D uint8 device array``, the owner of a block.
        max_bytes: most bytes the pool keeps while nothing uses them; the
            oldest blocks go first when a release would exceed it. 0 keeps
            nothing (every ``take`` allocates).
        wrap: applied to every array handed out (the backend's simulator
            wrapper); the wrapped object is what ``give`` takes back.
    """

    def __init__(self, allocate, max_bytes: int, wrap=None):
        if int(max_bytes) < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._allocate = allocate
        self._wrap = wrap if wrap is not None else (lambda array: array)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._free: list[_Block] = []          # blocks not in use, oldest first
        self._lent: dict[int, tuple] = {}      # id(array handed out) -> (weakref to it, its _Block, view key)
        #: Blocks allocated so far (a steady-state loop stops increasing it; tests read it).
        self.allocations = 0

    def take(self, shape: tuple[int, ...], dtype):
        """An uninitialised C-contiguous device array of ``shape`` and ``dtype``: a free block of
        at least its size (and at most twice it, so small requests do not pin large blocks),
        or a new one."""
        dtype = np.dtype(dtype)
        shape = tuple(int(n) for n in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        needed = max(1, nbytes)
        with self._lock:
            self._forget_dead()
            fitting = [index for index, block in enumerate(self._free)
                       if needed <= block.nbytes <= 2 * needed]
            block = (self._free.pop(min(fitting, key=lambda index: self._free[index].nbytes))
                     if fitting else None)
        if block is None:
            block = _Block(self._allocate(needed), needed)
            self.allocations += 1
        key = (shape, dtype.str)
        # A loop asks for the same shapes every step: the view made last time is handed out
        # again (building a device-array view costs microseconds of Python per array).
        array = block.views.pop(key, None)
        if array is None:
            array = self._wrap(block.owner[:nbytes].view(dtype).reshape(shape))
        with self._lock:
            # The record holds the array weakly, so an array dropped without give() frees its block.
            self._lent[id(array)] = (weakref.ref(array), block, key)
        return array

    def give(self, *arrays) -> None:
        """Return arrays from ``take`` (None and arrays not from this pool are skipped). The caller
        must not use them again: their memory is handed out again."""
        with self._lock:
            for array in arrays:
                if array is None:
                    continue
                entry = self._lent.get(id(array))
                if entry is None or entry[0]() is not array:
                    continue
                del self._lent[id(array)]
                _, block, key = entry
                if block.nbytes > self.max_bytes or any(kept is block for kept in self._free):
                    continue
                block.views[key] = array
                self._free.append(block)
                while sum(kept.nbytes for kept in self._free) > self.max_bytes:
                    self._free.pop(0)

    def _forget_dead(self) -> None:
        """Drop the records of arrays collected without ``give`` (their blocks are freed with them)."""
        for key in [key for key, (ref, _, _) in self._lent.items() if ref() is None]:
            del self._lent[key]

    def cached_bytes(self) -> int:
        """Bytes kept for reuse now."""
        with self._lock:
            return sum(block.nbytes for block in self._free)

    def clear(self) -> None:
        """Drop every free block (their memory goes back to the driver once unreferenced)."""
        with self._lock:
            self._free.clear()


class _Block:
    """One device allocation: its owner array (1-D uint8), its size, and the views of it
    handed out before, by (shape, dtype), kept while the block is free."""

    __slots__ = ("owner", "nbytes", "views")

    def __init__(self, owner, nbytes: int):
        self.owner = owner
        self.nbytes = int(nbytes)
        self.views: dict = {}
