"""Host scratch buffers kept between kernel calls, so that a training loop reuses its memory.

Why: the cython backend's training workspace and scratch arrays are tens of
megabytes per call (gates alone are [N, 4H]). Freshly allocated, every page of
them is faulted in and zeroed by the operating system on first touch (glibc
maps blocks over 32 MiB anew on every call; transparent huge pages are zeroed
2 MiB at a time): ``perf`` put ``clear_page_erms`` at 10 % of a training step
of shape (32, 200, 128, 512). A training loop asks for the same sizes every
step, so the buffers one call releases serve the next.

Only arrays that never reach the caller go through the cache: scratch freed
when a kernel returns, and a training workspace once its backward has consumed
it. Outputs (y, h, c, gradients) are always fresh arrays. Arrays under
``MIN_CACHED_BYTES`` bypass it: malloc reuses small blocks without faulting
pages in, and the lock and search would cost a small call more than they
save (about 30 us per batch-1 call with five takes and gives).

Example:
    >>> cache = BufferCache(max_bytes=2**30)
    >>> a = cache.take((1024, 1024), np.float32)   # 4 MiB
    >>> cache.give(a)
    >>> b = cache.take((512, 1024), np.float32)    # served by a's memory (at most twice the size asked)
    >>> cache.cached_bytes()
    0
"""

from __future__ import annotations

import math
import threading

import numpy as np

#: Smaller arrays are allocated and freed as usual (see the module comment).
MIN_CACHED_BYTES = 256 * 1024

#: Where every array this module hands out starts: a cache line (64 bytes on x86-64).
ALIGNMENT = 64


def _python_data_address(array: np.ndarray) -> int:
    return array.ctypes.data


def _python_aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array of ``shape`` and ``dtype`` that starts on a cache line.

    Why: NumPy's allocations start 16 bytes into a line, and in a unit split the cython
    backend's two threads write the two halves of each row of gates and states: a row
    that does not start on a line shares the line at the halves' boundary, which then
    crosses between the cores at every step (false sharing; a batch-1 split step took
    1.14-1.40x as long). The extension's version of this function (used where it is
    built) takes 0.26 us an array, this one 1.7.
    """
    dtype = np.dtype(dtype)
    needed = math.prod(shape) * dtype.itemsize
    raw = np.empty(needed + ALIGNMENT, np.uint8)
    offset = -_python_data_address(raw) % ALIGNMENT
    return raw[offset:offset + needed].view(dtype).reshape(shape)


try:   # the same two functions in C, where the extension is built
    from lstmeng.backends._cython_lstm import aligned_empty
    from lstmeng.backends._cython_lstm import data_address as _data_address
except ImportError:
    aligned_empty, _data_address = _python_aligned_empty, _python_data_address


def _capacity(owner: np.ndarray) -> int:
    """Bytes an owner serves from a cache line on, wherever it starts: its size less one
    line (exactly what was asked of an ``aligned_empty`` owner)."""
    return owner.nbytes - ALIGNMENT


class BufferCache:
    """A bounded pool of host buffers, handed out as arrays of any shape and dtype.

    Args:
        max_bytes: most bytes the pool keeps while no call uses them; the
            oldest buffers go first when a release would exceed it. 0 keeps
            nothing (every ``take`` allocates).
        min_bytes: arrays smaller than this are neither cached nor served.
    """

    def __init__(self, max_bytes: int, min_bytes: int = MIN_CACHED_BYTES):
        if int(max_bytes) < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.min_bytes = int(min_bytes)
        self._lock = threading.Lock()
        self._free: list[np.ndarray] = []   # arrays owning their memory, oldest first

    def take(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype`` starting on a cache
        line (``aligned_empty``): a cached buffer of at least its size (and at most twice it,
        so small requests do not pin large buffers), or a new one."""
        dtype = np.dtype(dtype)
        needed = math.prod(shape) * dtype.itemsize
        if needed < self.min_bytes or not self._free:
            return aligned_empty(shape, dtype)
        with self._lock:
            fitting = [index for index, owner in enumerate(self._free)
                       if needed <= _capacity(owner) <= 2 * needed]
            owner = (self._free.pop(min(fitting, key=lambda index: self._free[index].nbytes))
                     if fitting else None)
        if owner is None:
            return aligned_empty(shape, dtype)
        offset = -_data_address(owner) % ALIGNMENT
        return owner.reshape(-1).view(np.uint8)[offset:offset + needed].view(dtype).reshape(shape)

    def give(self, *arrays: np.ndarray | None) -> None:
        """Return arrays from ``take`` (None is skipped) for reuse. The caller must keep no
        reference to them that it will use again: their memory is handed out again."""
        for array in arrays:
            if array is None or array.nbytes < self.min_bytes:
                continue
            # NumPy points a view's base at the array owning the memory.
            owner = array if array.base is None else array.base
            if not isinstance(owner, np.ndarray) or owner.base is not None \
                    or not owner.flags.c_contiguous or not 0 < _capacity(owner) <= self.max_bytes:
                continue
            with self._lock:
                if any(kept is owner for kept in self._free):
                    continue  # given back twice: one entry
                self._free.append(owner)
                while sum(_capacity(kept) for kept in self._free) > self.max_bytes:
                    self._free.pop(0)

    def cached_bytes(self) -> int:
        """Bytes kept for reuse now."""
        with self._lock:
            return sum(_capacity(owner) for owner in self._free)

    def clear(self) -> None:
        """Drop every cached buffer (their memory goes back to the allocator)."""
        with self._lock:
            self._free.clear()
