"""The LSTM recurrence as persistent cooperative kernels (forward and backward).

A kernel launch from Python costs more than a whole LSTM step on a modern
GPU, so the recurrence over all T steps is ONE cooperative launch per layer
and direction, with ``cuda.cg.this_grid().sync()`` between steps.

Work split (forward). The grid has at most one block per multiprocessor
(the caller checks ``max_cooperative_grid_blocks``). Block ``p`` owns the
hidden units ``[p*U, (p+1)*U)`` and all four gates of each, i.e. ``4U``
columns of ``recurrent_kernel [H, 4H]``; that slice (``H x 4U`` values) is
copied into shared memory once when it fits (``weights_in_shared``), else it
is read from global memory / L2 every step (same code, correct everywhere).
Each step, for every chunk of ``ROWS`` batch rows:

1. stage ``h(t-1) * recurrent_dropout`` for those rows in shared memory, in
   tiles of ``K_TILE`` units (read from a double-buffered global array
   ``h_buffers[2, B, H]``: step s reads buffer ``s % 2`` and writes the other,
   so one grid barrier per step is enough);
2. thread ``(split, column)`` accumulates ``ROWS`` partial dot products over
   every ``K_SPLITS``-th unit (weights reused across the batch rows); the
   partials meet in shared memory;
3. one thread per (row, unit) adds the input projection, applies the gate
   activations, updates c (kept in global memory owned by the block) and h,
   applies the mask rules and writes the outputs and the training workspace.

Then ``grid.sync()``. Work per step and block: ``2 * B * H * 4U`` FLOPs.

The backward mirrors it in reverse time with one grid barrier per step:
phase A (block-local, own units): gate gradients ``dz [B, 4U]`` of the step
from dh and dc, written to ``gate_grads [B, T, 4H]``; ``grid.sync()``;
phase B: ``dh(t-1)[:, own units] = dz(all 4H columns) @ recurrent_kernel[own
units, :].T``, with that transposed weight slice (``4H x U``) in shared
memory when it fits. Phase B's dh is only read by its own block in the next
phase A, so no second grid barrier is needed.

Masking, the carried previous output, zero_output_for_mask, reverse and the
dropout masks follow ``lstmeng.backends.base`` exactly (see numpy.py, the
reference); ``seen_before [B, T]`` comes from ``_cuda_elementwise.mask_summary``.

Compile time. The launch-wide flags (activations, reverse,
zero_output_for_mask, return_sequences, training, has_mask, recurrent
dropout) are closure constants of the kernel, which numba freezes at compile
time, so a flag is never tested at run time: one compiled kernel per
(dtype, ``RecurrenceShape``, ``kernel_options(options)``), cached.

Under the CUDA simulator a cooperative grid is limited to one block
(numba's simulator runs blocks one after another), so there the same kernels
run with a single block that owns every unit; the row chunking, K tiling, K
splits, unit groups and both weight placements are exercised with tiny
compile-time constants (``SIMULATOR_SHAPE``).
"""

from __future__ import annotations

import dataclasses
import math

import numba
import numpy as np
from numba import cuda

from lstmeng.backends.base import ACTIVATION_CODES, SequenceOptions

# The codes the device functions switch on (compile-time constants to Numba).
_TANH, _RELU, _SIGMOID, _HARD_SIGMOID = (ACTIVATION_CODES[name] for name in ("tanh", "relu", "sigmoid",
                                                                             "hard_sigmoid"))


@dataclasses.dataclass(frozen=True)
class RecurrenceShape:
    """Compile-time constants of the recurrence kernels.

    threads: threads per block. rows: batch rows per chunk (register
    accumulators per thread). k_tile: units of h staged in shared memory at
    once.
    """

    threads: int = 256
    rows: int = 8
    k_tile: int = 256

    def shared_values(self, units: int, owned_units: int, weights_in_shared: bool) -> int:
        """Values of dynamic shared memory one block needs (same for forward and backward)."""
        weights = 4 * units * owned_units if weights_in_shared else 0
        return weights + self.rows * self.k_tile + self.threads * self.rows


#: GPU shapes per dtype. k_tile = 1024 stages a whole h(t-1) row chunk at once for
#: H <= 1024 (all loads in flight together, one barrier pair per chunk); the
#: staging buffers stay under the default 48 KB (float32: 8*1024*4 + 256*8*4 =
#: 40 KB; float64 with 4 rows: 40 KB), so only the weight slice needs the opt-in.
GPU_SHAPES = {"float32": RecurrenceShape(threads=256, rows=8, k_tile=1024),
              "float64": RecurrenceShape(threads=256, rows=4, k_tile=1024)}
SIMULATOR_SHAPE = RecurrenceShape(threads=8, rows=2, k_tile=4)

_kernels: dict = {}


def kernel_options(options: SequenceOptions) -> SequenceOptions:
    """The projection of a call's options that the recurrence kernels of both designs compile in.

    The bias is folded into the input projection and the input dropout applied
    before it, so neither reaches the recurrence: calls that differ only there
    share a kernel.
    """
    return dataclasses.replace(options, has_bias=False, has_input_dropout=False)


def _numba_scalar(dtype):
    """The NumPy scalar type of ``dtype``: typed constants keep float32 arithmetic in float32."""
    return {"float32": np.float32, "float64": np.float64}[np.dtype(dtype).name]


def _device_math(dtype):
    """Activation functions and their derivatives (from outputs) in ``dtype``'s arithmetic."""
    scalar = _numba_scalar(dtype)
    ZERO, ONE, HALF, SIX = scalar(0), scalar(1), scalar(0.5), scalar(6)

    @cuda.jit(device=True)
    def activate(code, x):
        if code == _TANH:
            return math.tanh(x)
        if code == _RELU:
            return max(x, ZERO)
        if code == _SIGMOID:
            # exp of -|x| only, as the reference, so large inputs saturate cleanly.
            if x >= ZERO:
                return ONE / (ONE + math.exp(-x))
            e = math.exp(x)
            return e / (ONE + e)
        if code == _HARD_SIGMOID:
            return min(max(x / SIX + HALF, ZERO), ONE)
        return x  # linear

    @cuda.jit(device=True)
    def derivative_from_output(code, y):
        if code == _TANH:
            return ONE - y * y
        if code == _RELU:
            return ONE if y > ZERO else ZERO
        if code == _SIGMOID:
            return y * (ONE - y)
        if code == _HARD_SIGMOID:
            return ONE / SIX if (y > ZERO and y < ONE) else ZERO
        return ONE  # linear

    return activate, derivative_from_output, ZERO


def forward_kernel(dtype, shape: RecurrenceShape, options: SequenceOptions):
    """The forward recurrence kernel for ``dtype``, ``shape`` and the call's options (cached)."""
    options = kernel_options(options)
    key = ("forward", np.dtype(dtype).name, shape, options)
    if key not in _kernels:
        _kernels[key] = _make_forward(np.dtype(dtype), shape, options)
    return _kernels[key]


def backward_kernel(dtype, shape: RecurrenceShape, options: SequenceOptions):
    """The backward recurrence kernel for ``dtype``, ``shape`` and the forward's options (cached)."""
    options = kernel_options(options)
    key = ("backward", np.dtype(dtype).name, shape, options)
    if key not in _kernels:
        _kernels[key] = _make_backward(np.dtype(dtype), shape, options)
    return _kernels[key]


def _compile_time_flags(options: SequenceOptions) -> tuple:
    """(activation code, recurrent activation code, reverse, zero_output_for_mask,
    return_sequences, training, has_mask, has_recurrent_dropout): the kernels' closure constants."""
    return (ACTIVATION_CODES[options.activation], ACTIVATION_CODES[options.recurrent_activation],
            options.reverse, options.zero_output_for_mask, options.return_sequences, options.training,
            options.has_mask, options.has_recurrent_dropout)


def _make_forward(dtype, shape: RecurrenceShape, options: SequenceOptions):
    THREADS, ROWS, K_TILE = shape.threads, shape.rows, shape.k_tile
    element = numba.from_dtype(dtype)   # element type of shared and local arrays
    activate, _, ZERO = _device_math(dtype)
    # Closure constants: numba compiles them in (see the module docstring).
    (activation, recurrent_activation, reverse, zero_output_for_mask, return_sequences, training, has_mask,
     has_recurrent_dropout) = _compile_time_flags(options)

    @cuda.jit
    def forward_recurrence(projection, recurrent_kernel, recurrent_dropout, mask, seen_before, h0, c0,
                           h_buffers, c_state, outputs, h_in_ws, c_prev_ws, gates_ws,
                           units_per_block, weights_in_shared):
        """All T steps of one layer and direction.

        Args:
            projection: [B, T, 4H] x @ kernel + bias (gate order i, f, g, o).
            recurrent_kernel: [H, 4H].
            recurrent_dropout: [B, H] (read when has_recurrent_dropout).
            mask: [B, T] bool; seen_before: [B, T] bool (read when has_mask).
            h0, c0: [B, H] initial states (any strides).
            h_buffers: [2, B, H] out; buffer T % 2 holds the final h on exit.
            c_state: [B, H] out: the final c.
            outputs: [B, T, H] written when return_sequences.
            h_in_ws, c_prev_ws: [B, T, H]; gates_ws: [B, T, 4H] activated
                gates; written when training (the backward's workspace; it
                recomputes activation(c(t)) from them).
        """
        grid = cuda.cg.this_grid()
        shared = cuda.shared.array(0, dtype=element)
        thread = cuda.threadIdx.x
        batch, steps = projection.shape[0], projection.shape[1]
        units = recurrent_kernel.shape[0]
        unit_begin = cuda.blockIdx.x * units_per_block
        owned = min(unit_begin + units_per_block, units) - unit_begin
        owned_columns = 4 * owned

        weight_values = units * owned_columns if weights_in_shared else 0
        weights = shared[0:weight_values]                        # [H, 4U]: k-major, column g*U + u
        h_tile = shared[weight_values:weight_values + ROWS * K_TILE]    # [ROWS, K_TILE]
        partials = shared[weight_values + ROWS * K_TILE:weight_values + ROWS * K_TILE + THREADS * ROWS]
        if weights_in_shared:
            for index in range(thread, units * owned_columns, THREADS):
                k, local = index // owned_columns, index % owned_columns
                gate, unit = local // owned, local % owned
                weights[index] = recurrent_kernel[k, gate * units + unit_begin + unit]
            cuda.syncthreads()

        # Each block copies the initial states of its units in (no separate
        # launches); every block reads all of h0 at step 0, hence the barrier.
        for item in range(thread, batch * owned, THREADS):
            b, u = item // owned, unit_begin + item % owned
            h_buffers[0, b, u] = h0[b, u]
            c_state[b, u] = c0[b, u]
        grid.sync()

        # Units are processed in groups small enough that every column of a
        # group has at least one thread; the K splits share a column's dot product.
        group_size = min(owned, THREADS // 4)
        accumulators = cuda.local.array(ROWS, element)
        for step in range(steps):
            t = steps - 1 - step if reverse else step
            current = step % 2
            following = 1 - current
            for group_begin in range(0, owned, group_size):
                group_units = min(group_size, owned - group_begin)
                columns = 4 * group_units
                k_splits = THREADS // columns
                column = thread % columns
                split = thread // columns
                active = split < k_splits
                gate = column // group_units
                unit = group_begin + column % group_units            # local unit index
                shared_column = gate * owned + unit
                global_column = gate * units + unit_begin + unit
                for row_begin in range(0, batch, ROWS):
                    for r in range(ROWS):
                        accumulators[r] = ZERO
                    for k_begin in range(0, units, K_TILE):
                        k_count = min(K_TILE, units - k_begin)
                        cuda.syncthreads()   # the previous users of h_tile and partials are done
                        for index in range(thread, ROWS * K_TILE, THREADS):
                            r, kk = index // K_TILE, index % K_TILE
                            b = row_begin + r
                            value = ZERO
                            if b < batch and kk < k_count:
                                value = h_buffers[current, b, k_begin + kk]
                                if has_recurrent_dropout:
                                    value *= recurrent_dropout[b, k_begin + kk]
                            h_tile[index] = value
                        cuda.syncthreads()
                        if active:
                            for kk in range(split, k_count, k_splits):
                                if weights_in_shared:
                                    weight = weights[(k_begin + kk) * owned_columns + shared_column]
                                else:
                                    weight = recurrent_kernel[k_begin + kk, global_column]
                                for r in range(ROWS):
                                    accumulators[r] += h_tile[r * K_TILE + kk] * weight
                    if active:
                        for r in range(ROWS):
                            partials[(split * ROWS + r) * columns + column] = accumulators[r]
                    cuda.syncthreads()
                    for item in range(thread, ROWS * group_units, THREADS):
                        r, local_unit = item // group_units, item % group_units
                        b = row_begin + r
                        if b < batch:
                            u = unit_begin + group_begin + local_unit
                            z_i = projection[b, t, u]
                            z_f = projection[b, t, units + u]
                            z_g = projection[b, t, 2 * units + u]
                            z_o = projection[b, t, 3 * units + u]
                            for s in range(k_splits):
                                base = (s * ROWS + r) * columns + local_unit
                                z_i += partials[base]
                                z_f += partials[base + group_units]
                                z_g += partials[base + 2 * group_units]
                                z_o += partials[base + 3 * group_units]
                            input_gate = activate(recurrent_activation, z_i)
                            forget_gate = activate(recurrent_activation, z_f)
                            candidate = activate(activation, z_g)
                            output_gate = activate(recurrent_activation, z_o)
                            c_old = c_state[b, u]
                            c_new = forget_gate * c_old + input_gate * candidate
                            cell_act = activate(activation, c_new)
                            h_new = output_gate * cell_act
                            h_old = h_buffers[current, b, u]
                            if training:
                                h_in = h_old
                                if has_recurrent_dropout:
                                    h_in = h_old * recurrent_dropout[b, u]
                                h_in_ws[b, t, u] = h_in
                                c_prev_ws[b, t, u] = c_old
                                gates_ws[b, t, u] = input_gate
                                gates_ws[b, t, units + u] = forget_gate
                                gates_ws[b, t, 2 * units + u] = candidate
                                gates_ws[b, t, 3 * units + u] = output_gate
                            real = True
                            if has_mask:
                                real = mask[b, t]
                            if real:
                                h_buffers[following, b, u] = h_new
                                c_state[b, u] = c_new
                                output = h_new
                            else:
                                h_buffers[following, b, u] = h_old
                                # The previous output is the carried h once a real
                                # step came before (zeros before it, or always zeros).
                                output = h_old
                                if zero_output_for_mask or not seen_before[b, t]:
                                    output = ZERO
                            if return_sequences:
                                outputs[b, t, u] = output
            grid.sync()

    return forward_recurrence


def _make_backward(dtype, shape: RecurrenceShape, options: SequenceOptions):
    THREADS, ROWS, K_TILE = shape.threads, shape.rows, shape.k_tile
    element = numba.from_dtype(dtype)
    activate, derivative, ZERO = _device_math(dtype)
    # Closure constants: numba compiles them in (see the module docstring).
    (activation, recurrent_activation, reverse, zero_output_for_mask, return_sequences, _, has_mask,
     has_recurrent_dropout) = _compile_time_flags(options)

    @cuda.jit
    def backward_recurrence(doutputs, recurrent_kernel, recurrent_dropout, mask, seen_before,
                            gates_ws, c_prev_ws, dh_state, dc_state, dh_total_scratch,
                            gate_grads, units_per_block, weights_in_shared):
        """Backward of ``forward_recurrence`` over all T steps, in reverse processing order.

        Args:
            doutputs: [B, T, H] gradient of the sequence outputs (read when return_sequences).
            recurrent_kernel: [H, 4H].
            recurrent_dropout: [B, H]; mask, seen_before: [B, T] bool.
            gates_ws: [B, T, 4H]; c_prev_ws: [B, T, H] (the forward's workspace).
            dh_state, dc_state: [B, H] gradients of the final states on entry
                (the last output's gradient already added), of h0 and c0 on exit.
            dh_total_scratch: [B, H] scratch (dh + dy of the current step).
            gate_grads: [B, T, 4H] out: d loss / d pre-activation gates (zero at masked steps).
        """
        grid = cuda.cg.this_grid()
        shared = cuda.shared.array(0, dtype=element)
        thread = cuda.threadIdx.x
        batch, steps = gates_ws.shape[0], gates_ws.shape[1]
        units = recurrent_kernel.shape[0]
        gate_columns = 4 * units
        unit_begin = cuda.blockIdx.x * units_per_block
        owned = min(unit_begin + units_per_block, units) - unit_begin

        weight_values = gate_columns * owned if weights_in_shared else 0
        weights = shared[0:weight_values]                 # [4H, U]: column-major slice of W.T
        dz_tile = shared[weight_values:weight_values + ROWS * K_TILE]
        partials = shared[weight_values + ROWS * K_TILE:weight_values + ROWS * K_TILE + THREADS * ROWS]
        if weights_in_shared:
            for index in range(thread, gate_columns * owned, THREADS):
                j, unit = index // owned, index % owned
                weights[index] = recurrent_kernel[unit_begin + unit, j]
            cuda.syncthreads()

        group_size = min(owned, THREADS)
        accumulators = cuda.local.array(ROWS, element)
        for step in range(steps):
            t = step if reverse else steps - 1 - step
            # Phase A: gate gradients of the owned units, every row.
            for item in range(thread, batch * owned, THREADS):
                b, local_unit = item // owned, item % owned
                u = unit_begin + local_unit
                real = True
                if has_mask:
                    real = mask[b, t]
                dh_total = dh_state[b, u]
                if return_sequences:
                    # A masked step's output is the carried h once a real step
                    # came before it (and not zeroed); its gradient joins dh.
                    if real or (seen_before[b, t] and not zero_output_for_mask):
                        dh_total += doutputs[b, t, u]
                input_gate = gates_ws[b, t, u]
                forget_gate = gates_ws[b, t, units + u]
                candidate = gates_ws[b, t, 2 * units + u]
                output_gate = gates_ws[b, t, 3 * units + u]
                c_old = c_prev_ws[b, t, u]
                # activation(c(t)), recomputed exactly as the forward computed it.
                c_new = forget_gate * c_old + input_gate * candidate
                cell_act = activate(activation, c_new)
                d_output_gate = dh_total * cell_act
                dc_total = dc_state[b, u] + dh_total * output_gate * derivative(activation, cell_act)
                dz_i = dc_total * candidate * derivative(recurrent_activation, input_gate)
                dz_f = dc_total * c_old * derivative(recurrent_activation, forget_gate)
                dz_g = dc_total * input_gate * derivative(activation, candidate)
                dz_o = d_output_gate * derivative(recurrent_activation, output_gate)
                if real:
                    dc_state[b, u] = dc_total * forget_gate
                else:
                    dz_i = ZERO
                    dz_f = ZERO
                    dz_g = ZERO
                    dz_o = ZERO
                gate_grads[b, t, u] = dz_i
                gate_grads[b, t, units + u] = dz_f
                gate_grads[b, t, 2 * units + u] = dz_g
                gate_grads[b, t, 3 * units + u] = dz_o
                dh_total_scratch[b, u] = dh_total
            grid.sync()
            # Phase B: dh(t-1) of the owned units = dz [B, 4H] @ W[own units, :].T.
            for group_begin in range(0, owned, group_size):
                group_units = min(group_size, owned - group_begin)
                k_splits = THREADS // group_units
                column = thread % group_units
                split = thread // group_units
                active = split < k_splits
                unit = group_begin + column
                for row_begin in range(0, batch, ROWS):
                    for r in range(ROWS):
                        accumulators[r] = ZERO
                    for j_begin in range(0, gate_columns, K_TILE):
                        j_count = min(K_TILE, gate_columns - j_begin)
                        cuda.syncthreads()
                        for index in range(thread, ROWS * K_TILE, THREADS):
                            r, jj = index // K_TILE, index % K_TILE
                            b = row_begin + r
                            value = ZERO
                            if b < batch and jj < j_count:
                                value = gate_grads[b, t, j_begin + jj]
                            dz_tile[index] = value
                        cuda.syncthreads()
                        if active:
                            for jj in range(split, j_count, k_splits):
                                if weights_in_shared:
                                    weight = weights[(j_begin + jj) * owned + unit]
                                else:
                                    weight = recurrent_kernel[unit_begin + unit, j_begin + jj]
                                for r in range(ROWS):
                                    accumulators[r] += dz_tile[r * K_TILE + jj] * weight
                    if active:
                        for r in range(ROWS):
                            partials[(split * ROWS + r) * group_units + column] = accumulators[r]
                    cuda.syncthreads()
                    for item in range(thread, ROWS * group_units, THREADS):
                        r, local_unit = item // group_units, item % group_units
                        b = row_begin + r
                        if b < batch:
                            u = unit_begin + group_begin + local_unit
                            real = True
                            if has_mask:
                                real = mask[b, t]
                            if real:
                                dh_prev = ZERO
                                for s in range(k_splits):
                                    dh_prev += partials[(s * ROWS + r) * group_units + local_unit]
                                if has_recurrent_dropout:
                                    dh_prev *= recurrent_dropout[b, u]
                                dh_state[b, u] = dh_prev
                            else:
                                dh_state[b, u] = dh_total_scratch[b, u]
            # The next phase A reads dh_state and rewrites the scratch of this block only.
            cuda.syncthreads()

    return backward_recurrence


def choose_partition(units: int, itemsize: int, shape: RecurrenceShape, max_blocks: int,
                     shared_limit_bytes: int) -> tuple[int, int, bool]:
    """How to split H units over at most ``max_blocks`` blocks.

    Returns (units_per_block, blocks, weights_in_shared): the fewest units per
    block that the grid allows, and whether each block's weight slice fits in
    ``shared_limit_bytes`` of shared memory next to the staging buffers.
    """
    max_blocks = max(1, int(max_blocks))
    units_per_block = max(1, math.ceil(units / max_blocks))
    blocks = math.ceil(units / units_per_block)
    needed = shape.shared_values(units, units_per_block, True) * itemsize
    return units_per_block, blocks, needed <= shared_limit_bytes
