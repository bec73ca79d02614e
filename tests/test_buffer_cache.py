"""The host buffer cache (lstmeng.backends._buffer_cache) and its use by the cython backend.

The cache must reuse memory only where nothing else can see it: outputs of a
call are never overwritten by a later call, a workspace is recycled only once
its backward consumed it, and results are bit-identical with and without it.
"""

import numpy as np
import pytest

from lstmeng.backends import _buffer_cache as buffer_cache_module
from lstmeng.backends import cython as cython_backend
from lstmeng.backends._buffer_cache import ALIGNMENT, BufferCache, aligned_empty

from _backends import sequence_forward


def test_take_gives_requested_shape_and_dtype():
    cache = BufferCache(2**20, min_bytes=0)
    array = cache.take((3, 5), np.float64)
    assert array.shape == (3, 5) and array.dtype == np.float64 and array.flags.c_contiguous


def test_released_buffer_serves_next_request_of_similar_size():
    cache = BufferCache(2**20, min_bytes=0)
    first = cache.take((64, 32), np.float32)    # 8,192 bytes
    cache.give(first)
    assert cache.cached_bytes() == first.nbytes
    second = cache.take((40, 32), np.float64)   # 10,240 bytes: more than the cached buffer
    assert not np.shares_memory(first, second)
    third = cache.take((48, 32), np.float32)    # 6,144 bytes: fits, and 8,192 is under twice that
    assert np.shares_memory(first, third)
    assert cache.cached_bytes() == 0


def test_small_request_does_not_pin_a_large_buffer():
    cache = BufferCache(2**20, min_bytes=0)
    big = cache.take((1024,), np.float32)
    cache.give(big)
    small = cache.take((100,), np.float32)      # 400 bytes: 4,096 is more than twice that
    assert not np.shares_memory(big, small)
    assert cache.cached_bytes() == big.nbytes


def test_cache_keeps_at_most_max_bytes_dropping_oldest():
    cache = BufferCache(10_000, min_bytes=0)
    arrays = [cache.take((1000,), np.float32) for _ in range(3)]   # 4,000 bytes each
    cache.give(*arrays)
    assert cache.cached_bytes() == 8_000
    # The oldest went: the two newest remain.
    again = [cache.take((1000,), np.float32) for _ in range(2)]
    assert not any(np.shares_memory(arrays[0], array) for array in again)
    assert all(any(np.shares_memory(kept, array) for array in again) for kept in arrays[1:])


def test_larger_than_max_bytes_and_zero_cache_keep_nothing():
    cache = BufferCache(100, min_bytes=0)
    cache.give(cache.take((1000,), np.float32))
    assert cache.cached_bytes() == 0
    empty = BufferCache(0, min_bytes=0)
    empty.give(empty.take((4,), np.float32))
    assert empty.cached_bytes() == 0


def test_double_give_and_views_of_foreign_memory():
    cache = BufferCache(2**20, min_bytes=0)
    array = cache.take((256,), np.float32)
    cache.give(array, array)
    assert cache.cached_bytes() == array.nbytes   # one entry
    cache.clear()
    assert cache.cached_bytes() == 0
    # An array over memory NumPy does not own (a bytearray here) is never cached.
    foreign = np.frombuffer(bytearray(1024), np.float32)
    cache.give(foreign)
    assert cache.cached_bytes() == 0


def test_small_arrays_bypass_the_cache():
    cache = BufferCache(2**30)                  # default min_bytes: 256 KiB
    small = cache.take((100, 100), np.float32)  # 40 KB
    cache.give(small)
    assert cache.cached_bytes() == 0
    large = cache.take((256, 1024), np.float32)  # 1 MiB
    cache.give(large)
    assert cache.cached_bytes() == large.nbytes


def _on_a_line(array):
    return array.ctypes.data % ALIGNMENT == 0


@pytest.mark.parametrize("shape, dtype", [((3, 5), np.float64), ((1, 128), np.float32), ((7,), np.uint8),
                                          ((2, 1, 100), np.float32)])
@pytest.mark.parametrize("implementation", ["module", "python"])
def test_aligned_empty_starts_on_a_cache_line(shape, dtype, implementation):
    """Why: a unit split's two threads write the halves of each row; rows off a line shared
    the line at the halves' boundary, which crossed between the cores at every step. Both
    the extension's function (what the module uses where it is built) and the fallback."""
    make = aligned_empty if implementation == "module" else buffer_cache_module._python_aligned_empty
    array = make(list(shape), dtype)
    assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous
    assert array.flags.writeable and _on_a_line(array)
    array[...] = 1
    assert array.sum() == array.size


def test_every_array_taken_starts_on_a_cache_line():
    cache = BufferCache(2**24, min_bytes=4096)
    small = cache.take((10, 3), np.float32)           # under min_bytes: never cached
    large = cache.take((300, 257), np.float32)        # a new owner
    assert _on_a_line(small) and _on_a_line(large)
    cache.give(large)
    again = cache.take((290, 257), np.float32)        # served by large's owner
    assert np.shares_memory(again, large) and _on_a_line(again)
    cache.give(again)
    assert cache.cached_bytes() == large.nbytes       # an owner counts what it serves


def test_unit_split_arrays_start_on_cache_lines(monkeypatch):
    """The cython backend's outputs and the scratch it takes, in a batch-1 unit split."""
    backend = cython_backend.CythonBackend()
    taken = []
    take = backend._buffers.take
    monkeypatch.setattr(backend._buffers, "take", lambda shape, dtype: taken.append(take(shape, dtype)) or taken[-1])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 20, 8), dtype=np.float32)
    zeros = np.zeros((1, 64), np.float32)
    kernel = rng.standard_normal((8, 256), dtype=np.float32)
    recurrent_kernel = rng.standard_normal((64, 256), dtype=np.float32)
    from lstmeng.testing import kernel_overrides
    with kernel_overrides(cython_split_units=True):
        result = sequence_forward(backend, x, zeros, zeros, kernel, recurrent_kernel, np.zeros(256, np.float32),
                                  None, None, None, training=False)
    assert taken and all(_on_a_line(array) for array in taken)
    assert _on_a_line(result.outputs) and _on_a_line(result.h) and _on_a_line(result.c)


def test_negative_max_bytes_rejected():
    with pytest.raises(ValueError, match="max_bytes"):
        BufferCache(-1)


# -- the cython backend ---------------------------------------------------------------------------

needs_extension = pytest.mark.skipif(cython_backend._cython_lstm is None, reason="extension not built")


# Large enough that the gates ([B*T, 4H], 1 MiB) and the outputs ([B, T, H], 256 KiB) reach the
# cache's size threshold, so that a mistake of giving them back would show.
BATCH, STEPS, INPUTS, UNITS = 16, 32, 8, 128


def _problem(batch=BATCH, steps=STEPS, inputs=INPUTS, units=UNITS, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.normal(size=(batch, steps, inputs)).astype(np.float32),
        h0=rng.normal(size=(batch, units)).astype(np.float32),
        c0=rng.normal(size=(batch, units)).astype(np.float32),
        kernel=rng.normal(size=(inputs, 4 * units)).astype(np.float32),
        recurrent_kernel=rng.normal(size=(units, 4 * units)).astype(np.float32),
        bias=rng.normal(size=4 * units).astype(np.float32))


def _train_step(backend, problem, dy):
    forward = sequence_forward(backend, training=True, **problem)
    zeros = np.zeros_like(problem["h0"])
    grads = backend.sequence_backward(dy, zeros, zeros, forward.workspace)
    return forward, grads


@needs_extension
def test_training_loop_reuses_workspace_and_matches_uncached():
    cached = cython_backend.CythonBackend()
    uncached = cython_backend.CythonBackend(buffer_cache_bytes=0)
    problem = _problem()
    dy = np.random.default_rng(1).normal(size=(BATCH, STEPS, UNITS)).astype(np.float32)
    first, _ = _train_step(cached, problem, dy)
    assert first.workspace.gates is None       # consumed: the workspace let go of its arrays
    second = sequence_forward(cached, training=True, **problem)
    assert cached._buffers.cached_bytes() < first.outputs.nbytes * 100   # bounded
    reference, reference_grads = _train_step(uncached, problem, dy)
    zeros = np.zeros_like(problem["h0"])
    grads = cached.sequence_backward(dy, zeros, zeros, second.workspace)
    for got, want in [(second.outputs, reference.outputs), (second.h, reference.h),
                      (grads.dx, reference_grads.dx), (grads.dkernel, reference_grads.dkernel),
                      (grads.drecurrent_kernel, reference_grads.drecurrent_kernel),
                      (grads.dbias, reference_grads.dbias), (grads.dh0, reference_grads.dh0)]:
        np.testing.assert_array_equal(got, want)


@needs_extension
def test_workspace_memory_is_recycled_only_after_its_backward():
    backend = cython_backend.CythonBackend()
    problem = _problem()
    dy = np.ones((BATCH, STEPS, UNITS), np.float32)
    _train_step(backend, problem, dy)                       # fills the cache
    pending = sequence_forward(backend, training=True, **problem)
    other = sequence_forward(backend, training=True, **problem)
    for name in ("gates", "c_prev", "h_in"):
        assert not np.shares_memory(getattr(pending.workspace, name), getattr(other.workspace, name))
    saved = pending.workspace.gates.copy()
    zeros = np.zeros_like(problem["h0"])
    backend.sequence_backward(dy, zeros, zeros, other.workspace)   # releases other's arrays
    sequence_forward(backend, training=True, **problem)             # may take them again
    np.testing.assert_array_equal(pending.workspace.gates, saved)   # pending's untouched


@needs_extension
@pytest.mark.parametrize("return_sequences", [True, False])
def test_outputs_are_never_reused(return_sequences):
    backend = cython_backend.CythonBackend()
    problem = _problem()
    first = sequence_forward(backend, return_sequences=return_sequences, **problem)
    kept = [first.outputs.copy(), first.h.copy(), first.c.copy()]
    changed = dict(problem, x=problem["x"] * 2)
    for _ in range(3):
        sequence_forward(backend, return_sequences=return_sequences, **changed)
        _train_step(backend, changed, np.ones((BATCH, STEPS, UNITS), np.float32))
    for got, want in zip([first.outputs, first.h, first.c], kept):
        np.testing.assert_array_equal(got, want)


@needs_extension
def test_release_buffers_and_bad_size():
    backend = cython_backend.CythonBackend()
    _train_step(backend, _problem(), np.ones((BATCH, STEPS, UNITS), np.float32))
    assert backend._buffers.cached_bytes() > 0
    backend.release_buffers()
    assert backend._buffers.cached_bytes() == 0
    with pytest.raises(ValueError, match="buffer_cache_bytes"):
        cython_backend.CythonBackend(buffer_cache_bytes=-1)
