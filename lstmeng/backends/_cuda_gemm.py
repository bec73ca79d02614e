"""Tiled shared-memory matrix product (SGEMM/DGEMM) written with numba-cuda.

One kernel computes ``c[M, N] = op(a) @ op(b) (+ bias[N]) (+ c)`` where op
is the identity or the transpose, chosen per call. The LSTM uses it for

* the input projection of all time steps: ``[B*T, I] @ kernel [I, 4H] + bias``
  (bias folded in, one launch for the whole sequence);
* the backward's ``dx = gate_grads [B*T, 4H] @ kernel.T``;
* the weight gradients ``x.T @ gate_grads`` and ``h_in.T @ gate_grads`` over
  all steps at once.

Plain FMA arithmetic in the array's dtype: no TF32 or other reduced-precision
tensor-core path, so float32 results match a float32 reference to rounding.

Design: a block computes a ``TILE_M x TILE_N`` tile of c, stepping through K
in slices of ``TILE_K``; each slice of a and b is staged in shared memory
(loaded so that consecutive threads read consecutive addresses of whichever
operand layout was given), then each thread accumulates a ``THREAD_M x
THREAD_N`` register block. The tile shape is a compile-time choice: GPU
launches use 128x64x8 tiles with 8x4 per thread (256 threads) when that
still fills the GPU, else 64x64x16 with 4x4 per thread; under the CUDA
simulator the same code runs with 8x8x4 tiles (4 threads) so tests stay fast.
"""

from __future__ import annotations

import dataclasses
import math

import numba
import numpy as np
from numba import cuda


@dataclasses.dataclass(frozen=True)
class GemmTiles:
    """Compile-time tile shape of the GEMM kernel."""

    tile_m: int = 64
    tile_n: int = 64
    tile_k: int = 16
    thread_m: int = 4
    thread_n: int = 4

    @property
    def threads(self) -> int:
        return (self.tile_m // self.thread_m) * (self.tile_n // self.thread_n)


#: Large tiles (8x4 outputs per thread: 32 FMAs per 12 shared loads; 8x8 spilled its
#: accumulators to local memory in the PTX) for GEMMs
#: with enough tiles to fill the GPU; 64x64 tiles otherwise (short sequences).
GPU_LARGE_TILES = GemmTiles(tile_m=128, tile_n=64, tile_k=8, thread_m=8, thread_n=4)
GPU_TILES = GemmTiles()
#: Use the large tiles when they still give this many blocks (about 2 per SM on an H100).
LARGE_TILE_MIN_BLOCKS = 264
SIMULATOR_TILES = GemmTiles(tile_m=8, tile_n=8, tile_k=4, thread_m=4, thread_n=4)

_kernels: dict = {}


def gemm_kernel(dtype, tiles: GemmTiles):
    """The compiled GEMM kernel for ``dtype`` and ``tiles`` (built once, then cached)."""
    key = (np.dtype(dtype).name, tiles)
    if key not in _kernels:
        _kernels[key] = _make_gemm_kernel(np.dtype(dtype), tiles)
    return _kernels[key]


def _make_gemm_kernel(dtype, tiles: GemmTiles):
    TILE_M, TILE_N, TILE_K = tiles.tile_m, tiles.tile_n, tiles.tile_k
    THREAD_M, THREAD_N = tiles.thread_m, tiles.thread_n
    THREADS = tiles.threads
    THREADS_N = TILE_N // THREAD_N
    element = numba.from_dtype(dtype)   # element type of shared and local arrays
    ZERO = dtype.type(0)               # a typed zero keeps float32 arithmetic in float32

    @cuda.jit
    def gemm(a, b, c, bias, transpose_a, transpose_b, has_bias, accumulate):
        """c[M, N] = op(a)[M, K] @ op(b)[K, N] (+ bias[N]) (+ c).

        Args:
            a: [M, K], or [K, M] when transpose_a.
            b: [K, N], or [N, K] when transpose_b.
            c: [M, N] output (any strides).
            bias: [N] (read only when has_bias).
            accumulate: add to c's contents instead of overwriting them.
        """
        a_tile = cuda.shared.array((TILE_K, TILE_M), element)
        b_tile = cuda.shared.array((TILE_K, TILE_N), element)
        rows, columns = c.shape
        depth = a.shape[0] if transpose_a else a.shape[1]
        thread = cuda.threadIdx.x
        thread_row = thread // THREADS_N
        thread_column = thread % THREADS_N
        row_begin = cuda.blockIdx.y * TILE_M
        column_begin = cuda.blockIdx.x * TILE_N

        acc = cuda.local.array((THREAD_M, THREAD_N), element)
        for i in range(THREAD_M):
            for j in range(THREAD_N):
                acc[i, j] = ZERO
        a_fragment = cuda.local.array(THREAD_M, element)
        b_fragment = cuda.local.array(THREAD_N, element)

        for k_begin in range(0, depth, TILE_K):
            # Stage the slices; consecutive threads walk the operand's contiguous axis.
            for index in range(thread, TILE_M * TILE_K, THREADS):
                if transpose_a:   # a stored [K, M]: m is contiguous
                    kk, m = index // TILE_M, index % TILE_M
                    value = ZERO
                    if row_begin + m < rows and k_begin + kk < depth:
                        value = a[k_begin + kk, row_begin + m]
                else:             # a stored [M, K]: k is contiguous
                    m, kk = index // TILE_K, index % TILE_K
                    value = ZERO
                    if row_begin + m < rows and k_begin + kk < depth:
                        value = a[row_begin + m, k_begin + kk]
                a_tile[kk, m] = value
            for index in range(thread, TILE_N * TILE_K, THREADS):
                if transpose_b:   # b stored [N, K]: k is contiguous
                    n, kk = index // TILE_K, index % TILE_K
                    value = ZERO
                    if column_begin + n < columns and k_begin + kk < depth:
                        value = b[column_begin + n, k_begin + kk]
                else:             # b stored [K, N]: n is contiguous
                    kk, n = index // TILE_N, index % TILE_N
                    value = ZERO
                    if column_begin + n < columns and k_begin + kk < depth:
                        value = b[k_begin + kk, column_begin + n]
                b_tile[kk, n] = value
            cuda.syncthreads()
            for kk in range(TILE_K):
                for i in range(THREAD_M):
                    a_fragment[i] = a_tile[kk, thread_row * THREAD_M + i]
                for j in range(THREAD_N):
                    b_fragment[j] = b_tile[kk, thread_column * THREAD_N + j]
                for i in range(THREAD_M):
                    for j in range(THREAD_N):
                        acc[i, j] += a_fragment[i] * b_fragment[j]
            cuda.syncthreads()

        for i in range(THREAD_M):
            row = row_begin + thread_row * THREAD_M + i
            if row < rows:
                for j in range(THREAD_N):
                    column = column_begin + thread_column * THREAD_N + j
                    if column < columns:
                        value = acc[i, j]
                        if has_bias:
                            value += bias[column]
                        if accumulate:
                            value += c[row, column]
                        c[row, column] = value

    return gemm


def choose_tiles(rows: int, columns: int) -> GemmTiles:
    """GPU tile shape for a ``[rows, columns]`` output."""
    large = GPU_LARGE_TILES
    if math.ceil(rows / large.tile_m) * math.ceil(columns / large.tile_n) >= LARGE_TILE_MIN_BLOCKS:
        return large
    return GPU_TILES


def launch_gemm(a, b, c, bias=None, *, transpose_a=False, transpose_b=False, accumulate=False,
                tiles: GemmTiles | None = None, dummy_bias=None):
    """Launch ``c = op(a) @ op(b) (+ bias) (+ c)`` on device arrays (shapes as in the kernel's docstring).

    ``tiles`` None chooses the GPU tile shape from c's shape.
    """
    rows, columns = c.shape
    if tiles is None:
        tiles = choose_tiles(rows, columns)
    kernel = gemm_kernel(c.dtype, tiles)
    grid = (math.ceil(columns / tiles.tile_n), math.ceil(rows / tiles.tile_m))
    kernel[grid, tiles.threads](a, b, c, dummy_bias if bias is None else bias,
                                bool(transpose_a), bool(transpose_b), bias is not None, bool(accumulate))
