"""A caching device allocator for numba (an EMM plugin), for ``gpu_bench.py --caching-allocator``.

An experiment, not part of lstmeng: it tests whether the per-call cost of the numba_cuda layers
is numba's default allocator. That allocator calls ``cuMemAlloc`` for every device array and
queues a ``cuMemFree`` for it when the array dies. A layer call allocates its results (3 arrays
in inference, 6 in a training step), and on an H200 (2026-11-28) a B=1, T=1, H=1024 call cost
1285 us in inference and 2721 us in a training step: close to 3 and 6 times one cost. This
manager keeps a freed block on a free list of its size and hands it out again, as PyTorch's
caching allocator does, so a steady loop stops calling the driver.

Use it before numba creates a CUDA context::

    from numba import cuda
    import cuda_caching_memory_manager
    cuda.set_memory_manager(cuda_caching_memory_manager.CachingMemoryManager)

Reuse follows the order of one stream: a block freed after launches that use it is handed to
later launches on the same stream (numba's legacy default stream, as lstmeng launches), never to
work on other streams that may still read it. It never returns memory to the driver before
``reset()`` or the context's end.
"""

from __future__ import annotations

import collections
import weakref

from numba.cuda.cudadrv import driver as numba_driver

#: Sizes are rounded up to this many bytes, so that near sizes share free lists.
ROUNDING_BYTES = 512


def rounded_size(nbytes: int) -> int:
    """The block size for a request of ``nbytes`` (at least one rounding unit)."""
    return max(1, -(-int(nbytes) // ROUNDING_BYTES)) * ROUNDING_BYTES


class CachingMemoryManager(numba_driver.NumbaCUDAMemoryManager):
    """numba's own on-device memory manager with a free list per block size instead of cuMemFree
    (memory info, IPC handles and the interface version are numba's).

    Counters: ``driver_allocations`` (cuMemAlloc calls) and ``reuses`` (requests served from a
    free list), for the benchmark's report."""

    def initialize(self):
        super().initialize()
        # numba calls this at every context lookup outside a ``require_context`` scope (the
        # context's ``prepare_for_use``: 8 times per inference call on the H200, session 24), not
        # once: the free lists and counts made at the first call stay. (Reset here, they read 0
        # on that run, and the blocks on the dropped lists were lost: +24 MiB over 1,000 steps.)
        if not hasattr(self, "_free"):
            self._free: dict[int, list] = collections.defaultdict(list)
            self.driver_allocations = self.reuses = 0

    def memalloc(self, size):
        block_size = rounded_size(size)
        free_blocks = self._free[block_size]
        if free_blocks:
            pointer = free_blocks.pop()
            self.reuses += 1
        else:
            pointer = self._attempt_allocation(lambda: numba_driver.driver.cuMemAlloc(block_size))
            self.driver_allocations += 1
        allocations, key = self.allocations, int(pointer)

        def back_to_the_free_list():
            allocations.pop(key, None)
            free_blocks.append(pointer)

        memory = numba_driver.AutoFreePointer(weakref.proxy(self.context), pointer, size,
                                              finalizer=back_to_the_free_list)
        # The owned pointer handed out holds ``memory`` weakly; this record keeps it alive until
        # the last view is gone (then its finalizer runs), as numba's own manager does.
        allocations[key] = memory
        return memory.own()

    def reset(self):
        """Free every cached block (and numba's queued frees)."""
        super().reset()
        for blocks in self._free.values():
            while blocks:
                numba_driver.driver.cuMemFree(blocks.pop())

    def cached_blocks(self) -> int:
        return sum(len(blocks) for blocks in self._free.values())


#: What ``NUMBA_CUDA_MEMORY_MANAGER=cuda_caching_memory_manager`` looks up (numba's EMM protocol).
_numba_memory_manager = CachingMemoryManager
