"""Small elementwise and reduction kernels of the numba_cuda backend.

These keep every array operation of the layers on the device (merges of
Bidirectional, dropout, time flips, concatenation) so that stacked layers
never round-trip through the host. They are memory-bound one-pass kernels;
the LSTM arithmetic itself lives in ``_cuda_gemm`` and ``_cuda_recurrence``.

Every kernel takes arrays of any strides (numba indexes them through their
strides), so views such as ``y[..., a:b]`` are valid outputs.

Imported only by ``lstmeng.backends.numba_cuda``: importing lstmeng never
imports numba.
"""

from __future__ import annotations

import math

import numba
from numba import cuda

_SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
#: Threads per block of the grid-stride elementwise kernels (the simulator
#: runs each thread as a Python thread, so it gets few).
ELEMENTWISE_THREADS = 4 if _SIMULATOR else 128
#: Most blocks of one elementwise launch (grid-stride loops cover the rest).
MAX_ELEMENTWISE_BLOCKS = 2 if _SIMULATOR else 4096

# Operation codes of ``binary_*``: out = op(a, b).
OP_COPY = 0       # out = a (with a cast to out's dtype)
OP_ADD = 1        # out = a + b
OP_MULTIPLY = 2   # out = a * b
OP_SCALE = 3      # out = a * factor


@cuda.jit(device=True)
def _combine(op, a, b, factor):
    if op == OP_ADD:
        return a + b
    if op == OP_MULTIPLY:
        return a * b
    if op == OP_SCALE:
        return a * factor
    return a


@cuda.jit
def binary_1d(op, a, b, factor, out):
    """out[i] = op(a[i], b[i]); a, b, out: [N] (b ignored unless op needs it)."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, out.shape[0], stride):
        out[i] = _combine(op, a[i], b[i] if op == OP_ADD or op == OP_MULTIPLY else a[i], factor)


@cuda.jit
def binary_2d(op, a, b, factor, out):
    """out[i, j] = op(a[i, j], b[i, j]); every array [N0, N1]."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    n1 = out.shape[1]
    for flat in range(start, out.shape[0] * n1, stride):
        i, j = flat // n1, flat % n1
        out[i, j] = _combine(op, a[i, j], b[i, j] if op == OP_ADD or op == OP_MULTIPLY else a[i, j], factor)


@cuda.jit
def binary_3d(op, a, b, factor, out):
    """out[i, j, k] = op(a[i, j, k], b[i, j, k]); every array [N0, N1, N2]."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    n1, n2 = out.shape[1], out.shape[2]
    for flat in range(start, out.shape[0] * n1 * n2, stride):
        i, rest = flat // (n1 * n2), flat % (n1 * n2)
        j, k = rest // n2, rest % n2
        out[i, j, k] = _combine(op, a[i, j, k], b[i, j, k] if op == OP_ADD or op == OP_MULTIPLY else a[i, j, k],
                                factor)


BINARY_KERNELS = {1: binary_1d, 2: binary_2d, 3: binary_3d}

# Index maps of ``permute_3d``.
PERMUTE_SWAP_01 = 0   # out[i, j, k] = src[j, i, k]   ([B, T, X] <-> [T, B, X])
PERMUTE_FLIP_1 = 1    # out[i, j, k] = src[i, N1-1-j, k] (reverse time of [B, T, X])


@cuda.jit
def permute_3d(mode, src, out):
    """out: [N0, N1, N2] gathered from src by the index map ``mode``."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    n0, n1, n2 = out.shape[0], out.shape[1], out.shape[2]
    for flat in range(start, n0 * n1 * n2, stride):
        i, rest = flat // (n1 * n2), flat % (n1 * n2)
        j, k = rest // n2, rest % n2
        if mode == PERMUTE_SWAP_01:
            out[i, j, k] = src[j, i, k]
        else:
            out[i, j, k] = src[i, n1 - 1 - j, k]


@cuda.jit
def fill_1d(out, value):
    """out[i] = value; out: [N]."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, out.shape[0], stride):
        out[i] = value


@cuda.jit
def scale_rows_3d(x, row_scale, out):
    """out[b, t, i] = x[b, t, i] * row_scale[b, i]; x, out: [B, T, I]; row_scale: [B, I] (dropout masks)."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    steps, features = out.shape[1], out.shape[2]
    for flat in range(start, out.shape[0] * steps * features, stride):
        b, rest = flat // (steps * features), flat % (steps * features)
        t, i = rest // features, rest % features
        out[b, t, i] = x[b, t, i] * row_scale[b, i]


@cuda.jit
def mask_summary(mask, reverse, zero_output_for_mask, seen_before, last_output_rows):
    """Per-row facts of a mask that the recurrence kernels need, one thread per row.

    Args:
        mask: [B, T] bool, True = real step.
        seen_before: [B, T] bool out: a real step came earlier in processing order.
        last_output_rows: [B] bool out: the last processed step's output is the
            final h (else it is zero): with zero_output_for_mask the last
            processed step is real, otherwise the row has any real step.
    """
    b = cuda.grid(1)
    batch, steps = mask.shape
    if b < batch:
        seen = False
        for step in range(steps):
            t = steps - 1 - step if reverse else step
            seen_before[b, t] = seen
            if mask[b, t]:
                seen = True
        if zero_output_for_mask:
            last_output_rows[b] = mask[b, 0] if reverse else mask[b, steps - 1]
        else:
            last_output_rows[b] = seen


@cuda.jit
def select_rows(h, rows, has_rows, out):
    """out[b, u] = h[b, u] where rows[b] (or everywhere without rows) else 0; h, out: [B, H]; rows: [B] bool."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    units = out.shape[1]
    for flat in range(start, out.shape[0] * units, stride):
        b, u = flat // units, flat % units
        if has_rows and not rows[b]:
            out[b, u] = 0
        else:
            out[b, u] = h[b, u]


@cuda.jit
def add_selected_rows(base, extra, rows, has_rows, out):
    """out[b, u] = base[b, u] + (extra[b, u] where rows[b], else 0); [B, H] each; rows: [B] bool."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    units = out.shape[1]
    for flat in range(start, out.shape[0] * units, stride):
        b, u = flat // units, flat % units
        value = base[b, u]
        if not has_rows or rows[b]:
            value += extra[b, u]
        out[b, u] = value


@cuda.jit
def backward_prologue(dh, dc, last_doutputs, rows, add_last_output, has_rows, dh_state, dc_state, dbias):
    """The backward's three set-ups in one launch (each used to be its own):

    dh_state[b, u] = dh[b, u] + (last_doutputs[b, u] if add_last_output and (rows[b] or not has_rows));
    dc_state[b, u] = dc[b, u]; dbias[n] = 0 (``column_sums`` adds into it next).

    Args:
        dh, dc, dh_state, dc_state: [B, H]; last_doutputs: [B, H] gradient of the
            last output (return_sequences=False; then it is the final h on the
            rows where ``rows`` is True) or a [1, 1] placeholder; rows: [B] bool or
            a [1] placeholder; dbias: [4H].
    """
    start, stride = cuda.grid(1), cuda.gridsize(1)
    units = dh_state.shape[1]
    state_count = dh_state.shape[0] * units
    for flat in range(start, max(state_count, dbias.shape[0]), stride):
        if flat < state_count:
            b, u = flat // units, flat % units
            value = dh[b, u]
            if add_last_output and (not has_rows or rows[b]):
                value += last_doutputs[b, u]
            dh_state[b, u] = value
            dc_state[b, u] = dc[b, u]
        if flat < dbias.shape[0]:
            dbias[flat] = 0


#: Rows summed by one thread of ``column_sums`` before its atomic add.
COLUMN_SUM_ROWS = 256


@cuda.jit
def column_sums(matrix, out):
    """out[n] += sum over m of matrix[m, n]; matrix: [M, N]; out: [N], zeroed by the caller.

    Grid (ceil(N / threads), ceil(M / COLUMN_SUM_ROWS)): each thread sums one
    column over a chunk of rows, then one atomic add per thread, so a long
    sequence (M = B*T rows) still spreads over many blocks.
    """
    n = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    row_begin = cuda.blockIdx.y * COLUMN_SUM_ROWS
    if n < matrix.shape[1]:
        total = 0.0  # float64 accumulator: the rows can number B*T
        for m in range(row_begin, min(row_begin + COLUMN_SUM_ROWS, matrix.shape[0])):
            total += matrix[m, n]
        cuda.atomic.add(out, n, total)


@cuda.jit(device=True)
def block_sum(value, shared):
    """The sum of every thread's ``value`` in this block, valid in thread 0 (other threads get a
    partial sum). Every thread of a block of ELEMENTWISE_THREADS (a power of two) must call it;
    shared: [ELEMENTWISE_THREADS] float64 shared memory of the caller's, reused afterwards."""
    thread = cuda.threadIdx.x
    shared[thread] = value
    cuda.syncthreads()
    half = ELEMENTWISE_THREADS // 2
    while half > 0:
        if thread < half:
            shared[thread] += shared[thread + half]
        cuda.syncthreads()
        half //= 2
    return shared[0]


def blocks_for(count: int, threads: int = ELEMENTWISE_THREADS) -> int:
    """Blocks of a grid-stride launch over ``count`` elements (at least 1)."""
    return max(1, min(MAX_ELEMENTWISE_BLOCKS, math.ceil(count / threads)))
