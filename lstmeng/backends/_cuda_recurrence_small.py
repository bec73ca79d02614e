"""The LSTM recurrence for small batches (B <= 16): persistent kernels, one warp per hidden unit.

Why a second design. The general kernel (``_cuda_recurrence``) keeps
accumulators in local arrays, meets
partial sums in shared memory and pays ``this_grid().sync()`` (1.37 us on an
H200) every step: about 45 instructions per useful FMA and 12.7 us per step
at B=1, H=1024 (``docs/benchmarks/numba_cuda_notes.md``). At small batches
the step is latency-bound, so this design removes everything but the FMAs,
the loads that feed them and one cheap barrier.

Work split. Block ``p`` owns ``U = units_per_block`` hidden units; warp ``w``
owns unit ``p*U + w`` with its four gates (forward) or its row of
``recurrent_kernel`` (backward). Lane ``l`` of the warp handles reduction
indices ``k = i*32 + l``; the warp meets its partial sums with
``shfl_xor_sync`` (a butterfly: every lane ends with every total), and lane
``r < B`` then updates row ``r`` of the unit, keeping ``c`` (and in the
backward ``dh`` and ``dc``) in registers across all steps.

Per step (forward): stage ``h(t-1) * recurrent_dropout`` of all B rows in
shared memory (``[B, KP]``, KP = H rounded up to 32, from the double buffer
``h_buffers[2, B, H]``; each thread's share loaded in one pass of up to 32
loads in flight),
``syncthreads``, the dot products (weights from shared memory in exactly the
order the lanes read them, so a block's slice is contiguous and each load is
one conflict-free 128-byte row), the butterfly, the cell update, then the
grid barrier. Backward: phase A (gate gradients of the own unit from the
registers), barrier, phase B (stage ``dz(t) [B, 4H]``,
``dh(t-1)[:, unit] = dz @ recurrent_kernel[unit, :]``).

Compile time. Every launch-wide value is a constant of the generated source:
H, B (= ROWS, the row count; one kernel per batch size <= 16), units per
block, blocks, the call's options (``_cuda_recurrence.kernel_options``:
activations, reverse, training, has_mask, zero_output_for_mask,
return_sequences, recurrent dropout), weight placement, dtype. The per-row
accumulators are separate scalars written out by the generator (a
``cuda.local.array`` indexed in a loop can land in local
memory), and the FMA loop has a constant trip count with no branch. Kernels
are cached per ``SmallRecurrenceConfig``. The source is generated (``exec``)
rather than written with closures because the number of accumulators and
staging registers depends on B; the generated text of each kernel is kept on
its ``py_func.__source__``.

Grid barrier (``_barrier``). The launch stays cooperative (the driver checks
that all blocks are co-resident, without which any software barrier can
deadlock), but steps synchronise through an arrival counter: after
``syncthreads``, thread 0 of every block issues ``threadfence`` (release: the
block's h(t)/dz(t) stores are visible at device scope before its arrival
is), ``atomic.add(counter, 1)``, then polls the counter with ``ld.global.cv``
(not cached in L1, so other SMs' arrivals are seen) until it reaches
``(barrier_index + 1) * BLOCKS``, then ``threadfence`` (acquire: no later load
is satisfied before the arrivals were observed) and ``syncthreads``. The
target only grows, so the counter is never reset during a launch (no reset
race); block 0 zeroes it before the launch's one ``this_grid().sync()``.
numba emits ``cuda.ldcv`` as inline asm without side effects, and LLVM
hoisted a poll with a constant address out of the spin loop (a deadlock,
seen in the PTX); each poll's index is therefore computed from the previous
poll's value (see ``_barrier``). After the barrier, data other blocks
published is read with plain loads, as CUDA's own grid sync does (not
``cuda.ldcg``, which LLVM could move across the barrier for the same reason).
Measured on an H200: 1.02 us per empty barrier against 1.37 us for
``this_grid().sync()`` (132 blocks).

Weights. Each block lays its slice out itself at the start of the launch
(in shared memory, or when that does not fit in a global scratch slice only
that block reads): no separate layout kernel and no cache that could go
stale when an optimizer updates ``recurrent_kernel`` in place.

Under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) there are no warp shuffles
and a cooperative grid is one block; the generator then emits a shared-memory
reduction instead of the butterfly and polls the counter with a plain read
(``simulator`` in the config). Everything else - the layout, the staging,
the counter barrier with its atomic arrival, the flags - is the same source.
"""

from __future__ import annotations

import dataclasses
import math

import numba
import numpy as np
from numba import cuda

from lstmeng.backends._cuda_recurrence import kernel_options
from lstmeng.backends.base import SequenceOptions

#: Batches up to this size use this design (one compiled kernel per batch size).
SMALL_BATCH_MAX_ROWS = 16
#: A warp owns one unit; a block holds at most 32 warps.
MAX_UNITS_PER_BLOCK = 32
#: ... and at least 8 when H allows: fewer blocks make the grid barrier cheaper (fewer
#: arrivals on one counter) and give the staging copy more threads.
MIN_UNITS_PER_BLOCK = 8
#: At most this many float32 values each thread loads into registers before storing them
#: to shared memory (all of its share of a step's staging in one pass up to this size).
MAX_STAGE_GROUP = 32
WARP = 32


@dataclasses.dataclass(frozen=True)
class SmallRecurrenceConfig:
    """Everything constant for one launch: the key of the compiled-kernel cache."""

    direction: str            # "forward" or "backward"
    dtype: str                # "float32" or "float64"
    units: int                # H
    rows: int                 # B: batch rows (1..SMALL_BATCH_MAX_ROWS)
    units_per_block: int      # U: warps per block, one unit each
    blocks: int
    weights_in_shared: bool
    options: SequenceOptions  # kernel_options() of the call's (the backward's: its forward's)
    simulator: bool

    @property
    def threads(self) -> int:
        return WARP * self.units_per_block

    @property
    def reduction_length(self) -> int:
        """Padded length of each dot product: H (forward) or 4H (backward), rounded up to 32."""
        length = self.units if self.direction == "forward" else 4 * self.units
        return WARP * math.ceil(length / WARP)

    def weight_values(self) -> int:
        """Values of one block's laid-out weight slice."""
        per_unit = 4 * self.reduction_length if self.direction == "forward" else self.reduction_length
        return self.units_per_block * per_unit

    def scratch_values(self) -> int:
        """Values of the global weight scratch: every block's slice, when not in shared memory."""
        return 0 if self.weights_in_shared else self.blocks * self.weight_values()

    def shared_values(self) -> int:
        """Values of dynamic shared memory per block."""
        staged = self.rows * self.reduction_length
        weights = self.weight_values() if self.weights_in_shared else 0
        accumulators = 4 * self.rows if self.direction == "forward" else self.rows
        reduction = self.threads * accumulators if self.simulator else 0
        return weights + staged + reduction


_kernels: dict = {}


def kernel_for(config: SmallRecurrenceConfig):
    """The compiled (lazily, by numba) kernel for ``config`` (cached)."""
    if config not in _kernels:
        _kernels[config] = _build(config)
    return _kernels[config]


# -- activations, specialised per name (no switch in the kernel) -------------------------
def _activation_functions(name: str, scalar):
    """(activate, derivative_from_output) device functions of one activation in ``scalar`` arithmetic."""
    ZERO, ONE, HALF, SIX = scalar(0), scalar(1), scalar(0.5), scalar(6)
    if name == "tanh":
        def activate(x):
            return math.tanh(x)

        def derivative(y):
            return ONE - y * y
    elif name == "relu":
        def activate(x):
            return max(x, ZERO)

        def derivative(y):
            return ONE if y > ZERO else ZERO
    elif name == "sigmoid":
        def activate(x):
            # exp of -|x| only, as the reference, so large inputs saturate cleanly.
            if x >= ZERO:
                return ONE / (ONE + math.exp(-x))
            e = math.exp(x)
            return e / (ONE + e)

        def derivative(y):
            return y * (ONE - y)
    elif name == "hard_sigmoid":
        def activate(x):
            return min(max(x / SIX + HALF, ZERO), ONE)

        def derivative(y):
            return ONE / SIX if (y > ZERO and y < ONE) else ZERO
    elif name == "linear":
        def activate(x):
            return x

        def derivative(y):
            return ONE
    else:
        raise ValueError(f"unknown activation {name!r}")
    return cuda.jit(device=True)(activate), cuda.jit(device=True)(derivative)


# -- source generation ---------------------------------------------------------------------
def _barrier(simulator: bool, indent: str) -> str:
    """The arrival-counter grid barrier; ``barrier_index`` counts this launch's barriers from 0."""
    # The poll is ld.global.cv (never served by a stale L1 line). numba emits cuda.ldcv as
    # inline asm without side effects, which LLVM hoists out of a spin loop whose operands do
    # not change (seen in the PTX: a loop re-testing one stale register, a deadlock). So the
    # index of each poll is computed from the value the previous poll read (``seen >> 31``:
    # always 0, as the counter stays below 2**31, but not provable at compile time), which
    # keeps every poll inside the loop. The simulator runs one block: a plain read suffices.
    poll = "barrier_counter[seen >> 31]" if simulator else "cuda.ldcv(barrier_counter, seen >> 31)"
    lines = [
        "cuda.syncthreads()                  # every warp of the block has stored its part of the step",
        "if thread == 0:",
        "    cuda.threadfence()              # release: those stores reach device scope before the arrival",
        "    seen = cuda.atomic.add(barrier_counter, 0, ONE_ARRIVAL) + ONE_ARRIVAL",
        "    target = numba.uint32((barrier_index + 1) * BLOCKS)   # only grows: no reset between steps",
        "    while seen < target:",
        f"        seen = {poll}",
        "    cuda.threadfence()              # acquire: no later load is served before the arrivals were seen",
        "cuda.syncthreads()",
    ]
    return "\n".join(indent + line for line in lines)


def _staging(c: SmallRecurrenceConfig, source: str, scale: str | None, indent: str) -> str:
    """Code copying ``ROWS x KP`` values of ``source`` (an expression in r and k, valid for
    k < LENGTH) into ``staged``, zero-padded, times ``scale`` (an expression, or None).

    Each thread loads up to MAX_STAGE_GROUP values into registers before storing any, so
    their latencies overlap (a plain strided loop waits for one L2 round trip per value).
    Plain loads, as in CUDA's own grid sync: the barrier's acquire fence orders them after
    the other blocks' release fences (cuda.ldcg, inline asm without side effects, could be
    moved across the barrier by LLVM).
    """
    # MAX_STAGE_GROUP float32 loads in flight; float64 values take two registers and with
    # recurrent dropout each staged value is two loads: both halve the group (full groups
    # spilled there in the SASS report).
    largest = MAX_STAGE_GROUP * 4 // np.dtype(c.dtype).itemsize // (2 if scale else 1)
    group = min(largest, math.ceil(c.rows * c.reduction_length / c.threads))
    passes = math.ceil(c.rows * c.reduction_length / (group * c.threads))
    lines = ["stage_pass = 0", f"while stage_pass < {passes}:",
             f"    first = thread + stage_pass * {group * c.threads}"]
    for g in range(group):
        lines += [f"    i{g} = first + {g * c.threads}",
                  f"    v{g} = ZERO",
                  f"    if i{g} < ROWS * KP:",
                  f"        r = i{g} // KP",
                  f"        k = i{g} % KP",
                  "        if k < LENGTH:",
                  f"            v{g} = {source}" + (f" * {scale}" if scale else "")]
    for g in range(group):
        lines += [f"    if i{g} < ROWS * KP:", f"        staged[i{g}] = v{g}"]
    lines += ["    stage_pass += 1"]
    return "\n".join(indent + line for line in lines)


def _warp_sum(config: SmallRecurrenceConfig, names: list[str], indent: str) -> str:
    """Code that leaves the warp-wide sum of each scalar in ``names`` in every lane."""
    if not config.simulator:
        lines = ["offset = 16", "while offset > 0:"]
        lines += [f"    {n} += cuda.shfl_xor_sync(FULL_MASK, {n}, offset)" for n in names]
        lines += ["    offset //= 2"]
    else:
        # The simulator has no shuffles: the same sums through shared memory.
        count = len(names)
        lines = [f"slot = thread * {count}"]
        lines += [f"reduction[slot + {j}] = {n}" for j, n in enumerate(names)]
        lines += ["cuda.syncthreads()", "first = warp * 32 * " + str(count)]
        lines += [f"{n} = ZERO" for n in names]
        lines += ["for other in range(32):"]
        lines += [f"    {n} += reduction[first + other * {count} + {j}]" for j, n in enumerate(names)]
        lines += ["cuda.syncthreads()"]
    return "\n".join(indent + line for line in lines)


def _unroll(c: SmallRecurrenceConfig) -> int:
    """k steps per pass of the FMA loop: the largest of 8, 4, 2, 1 that divides the trip count.

    The simulator unrolls at most 2, so that its tiny sizes still run the loop more than once.
    """
    trips = c.reduction_length // WARP
    return next(u for u in ((2, 1) if c.simulator else (8, 4, 2, 1)) if trips % u == 0)


def _forward_source(c: SmallRecurrenceConfig) -> str:
    rows = range(c.rows)
    gates = ("i", "f", "g", "o")
    acc = [f"a{g}{r}" for r in rows for g in gates]
    s = []
    s.append('''
def forward_recurrence_small(projection, recurrent_kernel, recurrent_dropout, mask, seen_before, h0, c0,
                             h_buffers, c_state, outputs, h_in_ws, c_prev_ws, gates_ws,
                             barrier_counter, weight_scratch):
    """All T steps of one layer and direction for B = ROWS rows.

    projection: [B, T, 4H]; recurrent_kernel: [H, 4H]; recurrent_dropout: [B, H];
    mask, seen_before: [B, T] bool; h0, c0: [B, H] (any strides);
    h_buffers: [2, B, H] out (buffer T % 2 holds the final h); c_state: [B, H] out;
    outputs: [B, T, H]; h_in_ws, c_prev_ws: [B, T, H]; gates_ws: [B, T, 4H];
    barrier_counter: [1] uint32 scratch; weight_scratch: [BLOCKS * WEIGHT_VALUES]
    (used when the weights are not in shared memory).
    """
    thread = cuda.threadIdx.x
    warp = thread // 32
    lane = thread % 32
    block = cuda.blockIdx.x
    unit = block * U + warp              # >= H: a padding warp (zero weights, stores nothing)
    row = lane                           # the batch row this lane updates when lane < ROWS
    owns_cell = lane < ROWS and unit < H
    steps = projection.shape[1]
    shared = cuda.shared.array(0, dtype=ELEMENT)''')
    if c.weights_in_shared:
        s.append('''    weights = shared[0:WEIGHT_VALUES]     # [U, NK, 4, 32]: warp, k // 32, gate, k % 32
    staged = shared[WEIGHT_VALUES:WEIGHT_VALUES + ROWS * KP]   # [ROWS, KP] h(t-1) * dropout''')
    else:
        s.append('''    weights = weight_scratch[block * WEIGHT_VALUES:(block + 1) * WEIGHT_VALUES]
    staged = shared[0:ROWS * KP]''')
    if c.simulator:
        s.append("    reduction = shared[SHARED_VALUES - THREADS * ACCUMULATORS:SHARED_VALUES]")
    s.append('''    # Lay this block's weight slice out in read order: lane l of warp w reads
    # index ((w * NK + i) * 4 + gate) * 32 + l = recurrent_kernel[i*32 + l, gate*H + unit].
    for index in range(thread, WEIGHT_VALUES, THREADS):
        k = (index // 128) % NK * 32 + index % 32
        gate = index // 32 % 4
        owner = block * U + index // (128 * NK)
        value = ZERO
        if k < H and owner < H:
            value = recurrent_kernel[k, gate * H + owner]
        weights[index] = value

    h_own = ZERO                          # h(t-1) of (row, unit), carried through masked steps
    c = ZERO                              # the cell state stays in this register for all steps
    dropout_own = ONE
    if owns_cell:
        h_own = h0[row, unit]
        c = c0[row, unit]
        h_buffers[0, row, unit] = h_own''')
    if c.options.has_recurrent_dropout:
        s.append('''        dropout_own = recurrent_dropout[row, unit]''')
    s.append('''    if block == 0 and thread == 0:
        barrier_counter[0] = 0
    # The one cooperative barrier: h0 published, the counter zeroed, the weights laid out.
    cuda.cg.this_grid().sync()

    for step in range(steps):''')
    s.append("        t = steps - 1 - step" if c.options.reverse else "        t = step")
    s.append('''        current = step % 2
        # The own unit's input projection, loaded before the staging so its latency hides.
        p_i = ZERO
        p_f = ZERO
        p_g = ZERO
        p_o = ZERO
        if owns_cell:
            p_i = projection[row, t, unit]
            p_f = projection[row, t, H + unit]
            p_g = projection[row, t, 2 * H + unit]
            p_o = projection[row, t, 3 * H + unit]
''')
    recurrent_dropout = "recurrent_dropout[r, k]" if c.options.has_recurrent_dropout else None
    s.append(_staging(c, "h_buffers[current, r, k]", recurrent_dropout,
                      "        "))
    s.append('''        cuda.syncthreads()''')
    for name in acc:
        s.append(f"        {name} = ZERO")
    # The FMA loop: UNROLL steps of k per pass with constant offsets from two
    # running unsigned indices (no range-iterator bookkeeping, no sign checks).
    unroll = _unroll(c)
    s.append(f"""        w = numba.uint32(warp * (NK * 128) + lane)
        k = numba.uint32(lane)
        passes = numba.uint32(0)
        while passes < numba.uint32({c.reduction_length // WARP // unroll}):""")
    for u in range(unroll):
        for g, offset in zip(gates, (0, 32, 64, 96)):
            s.append(f"            w_{g} = weights[w + numba.uint32({u * 128 + offset})]")
        for r in rows:
            s.append(f"            h = staged[k + numba.uint32({r * c.reduction_length + u * WARP})]")
            for g in gates:
                s.append(f"            a{g}{r} += h * w_{g}")
    s.append(f"""            w += numba.uint32({unroll * 128})
            k += numba.uint32({unroll * WARP})
            passes += numba.uint32(1)""")
    s.append(_warp_sum(c, acc, "        "))
    s.append('''        z_i = p_i
        z_f = p_f
        z_g = p_g
        z_o = p_o''')
    for r in rows:
        s.append(f"        if lane == {r}:")
        for g in gates:
            s.append(f"            z_{g} += a{g}{r}")
    s.append('''        if owns_cell:
            input_gate = activate_gate(z_i)
            forget_gate = activate_gate(z_f)
            candidate = activate_cell(z_g)
            output_gate = activate_gate(z_o)
            c_new = forget_gate * c + input_gate * candidate
            h_new = output_gate * activate_cell(c_new)''')
    if c.options.training:
        s.append('''            h_in_ws[row, t, unit] = h_own * dropout_own
            c_prev_ws[row, t, unit] = c
            gates_ws[row, t, unit] = input_gate
            gates_ws[row, t, H + unit] = forget_gate
            gates_ws[row, t, 2 * H + unit] = candidate
            gates_ws[row, t, 3 * H + unit] = output_gate''')
    if c.options.has_mask:
        zero_rule = "True" if c.options.zero_output_for_mask else "not seen_before[row, t]"
        s.append(f'''            if mask[row, t]:
                h_own = h_new
                c = c_new
                output = h_new
            else:
                # The previous output is the carried h once a real step came before it.
                output = h_own
                if {zero_rule}:
                    output = ZERO''')
    else:
        s.append('''            h_own = h_new
            c = c_new
            output = h_new''')
    s.append('''            h_buffers[1 - current, row, unit] = h_own''')
    if c.options.return_sequences:
        s.append('''            outputs[row, t, unit] = output''')
    s.append('''        if step + 1 < steps:
            barrier_index = step''')
    s.append(_barrier(c.simulator, "            "))
    s.append('''    if owns_cell:
        c_state[row, unit] = c
''')
    return "\n".join(s)


def _backward_source(c: SmallRecurrenceConfig) -> str:
    rows = range(c.rows)
    acc = [f"a{r}" for r in rows]
    s = []
    s.append('''
def backward_recurrence_small(doutputs, recurrent_kernel, recurrent_dropout, mask, seen_before,
                              gates_ws, c_prev_ws, dh_state, dc_state, dh_total_scratch, gate_grads,
                              barrier_counter, weight_scratch):
    """Backward of forward_recurrence_small over all T steps, in reverse processing order.

    doutputs: [B, T, H]; recurrent_kernel: [H, 4H]; recurrent_dropout: [B, H];
    mask, seen_before: [B, T] bool; gates_ws: [B, T, 4H]; c_prev_ws: [B, T, H];
    dh_state, dc_state: [B, H] final-state gradients in, h0/c0 gradients out;
    dh_total_scratch: [B, H] unused (dh stays in registers); gate_grads: [B, T, 4H] out;
    barrier_counter: [1] uint32; weight_scratch: [BLOCKS * WEIGHT_VALUES].
    """
    thread = cuda.threadIdx.x
    warp = thread // 32
    lane = thread % 32
    block = cuda.blockIdx.x
    unit = block * U + warp
    row = lane
    owns_cell = lane < ROWS and unit < H
    steps = gates_ws.shape[1]
    shared = cuda.shared.array(0, dtype=ELEMENT)''')
    if c.weights_in_shared:
        s.append('''    weights = shared[0:WEIGHT_VALUES]     # [U, NJ, 32]: warp, j // 32, j % 32 (j: gate column)
    staged = shared[WEIGHT_VALUES:WEIGHT_VALUES + ROWS * KP]   # [ROWS, KP] dz(t)''')
    else:
        s.append('''    weights = weight_scratch[block * WEIGHT_VALUES:(block + 1) * WEIGHT_VALUES]
    staged = shared[0:ROWS * KP]''')
    if c.simulator:
        s.append("    reduction = shared[SHARED_VALUES - THREADS * ACCUMULATORS:SHARED_VALUES]")
    s.append('''    # Lane l of warp w reads index (w * NJ + i) * 32 + l = recurrent_kernel[unit, i*32 + l].
    for index in range(thread, WEIGHT_VALUES, THREADS):
        j = index % KP
        owner = block * U + index // KP
        value = ZERO
        if j < 4 * H and owner < H:
            value = recurrent_kernel[owner, j]
        weights[index] = value

    dh = ZERO                             # dh and dc of (row, unit) stay in registers
    dc = ZERO
    dropout_own = ONE
    if owns_cell:
        dh = dh_state[row, unit]
        dc = dc_state[row, unit]''')
    if c.options.has_recurrent_dropout:
        s.append('''        dropout_own = recurrent_dropout[row, unit]''')
    s.append('''    if block == 0 and thread == 0:
        barrier_counter[0] = 0
    cuda.cg.this_grid().sync()

    for step in range(steps):''')
    s.append("        t = step" if c.options.reverse else "        t = steps - 1 - step")
    s.append('''        # Phase A: gate gradients of (row, unit) from dh and dc.
        dh_total = dh
        real = True
        if owns_cell:''')
    if c.options.has_mask:
        s.append("            real = mask[row, t]")
    if c.options.return_sequences:
        if c.options.has_mask and not c.options.zero_output_for_mask:
            s.append("            if real or seen_before[row, t]:")
        elif c.options.has_mask:
            s.append("            if real:")
        else:
            s.append("            if True:")
        s.append("                # A masked step's output is the carried h once a real step came before it.")
        s.append("                dh_total += doutputs[row, t, unit]")
    s.append('''            input_gate = gates_ws[row, t, unit]
            forget_gate = gates_ws[row, t, H + unit]
            candidate = gates_ws[row, t, 2 * H + unit]
            output_gate = gates_ws[row, t, 3 * H + unit]
            c_old = c_prev_ws[row, t, unit]
            # activation(c(t)), recomputed exactly as the forward computed it.
            cell_act = activate_cell(forget_gate * c_old + input_gate * candidate)
            dc_total = dc + dh_total * output_gate * derive_cell(cell_act)
            dz_i = dc_total * candidate * derive_gate(input_gate)
            dz_f = dc_total * c_old * derive_gate(forget_gate)
            dz_g = dc_total * input_gate * derive_cell(candidate)
            dz_o = dh_total * cell_act * derive_gate(output_gate)
            if real:
                dc = dc_total * forget_gate
            else:
                dz_i = ZERO
                dz_f = ZERO
                dz_g = ZERO
                dz_o = ZERO
            gate_grads[row, t, unit] = dz_i
            gate_grads[row, t, H + unit] = dz_f
            gate_grads[row, t, 2 * H + unit] = dz_g
            gate_grads[row, t, 3 * H + unit] = dz_o
        barrier_index = step''')
    s.append(_barrier(c.simulator, "        "))
    s.append('''        # Phase B: dh(t-1)[:, unit] = dz(t) [B, 4H] @ recurrent_kernel[unit, :].
''')
    s.append(_staging(c, "gate_grads[r, t, k]", None, "        "))
    s.append('''        cuda.syncthreads()''')
    for name in acc:
        s.append(f"        {name} = ZERO")
    unroll = _unroll(c)
    s.append(f"""        w = numba.uint32(warp * KP + lane)
        j = numba.uint32(lane)
        passes = numba.uint32(0)
        while passes < numba.uint32({c.reduction_length // WARP // unroll}):""")
    for u in range(unroll):
        s.append(f"            weight = weights[w + numba.uint32({u * WARP})]")
        for r in rows:
            s.append(f"            a{r} += staged[j + numba.uint32({r * c.reduction_length + u * WARP})] * weight")
    s.append(f"""            w += numba.uint32({unroll * WARP})
            j += numba.uint32({unroll * WARP})
            passes += numba.uint32(1)""")
    s.append(_warp_sum(c, acc, "        "))
    s.append("        total = ZERO")
    for r in rows:
        s.append(f"        if lane == {r}:")
        s.append(f"            total = a{r}")
    s.append('''        if owns_cell:
            dh = total * dropout_own
            if not real:
                dh = dh_total   # a masked step passes dh(t) through to t-1
    if owns_cell:
        dh_state[row, unit] = dh
        dc_state[row, unit] = dc
''')
    return "\n".join(s)


def _build(config: SmallRecurrenceConfig):
    """Generate, exec and ``cuda.jit`` the kernel source of ``config``."""
    dtype = np.dtype(config.dtype)
    scalar = {"float32": np.float32, "float64": np.float64}[dtype.name]
    activate_cell, derive_cell = _activation_functions(config.options.activation, scalar)
    activate_gate, derive_gate = _activation_functions(config.options.recurrent_activation, scalar)
    forward = config.direction == "forward"
    namespace = {
        "cuda": cuda, "numba": numba,
        "ELEMENT": numba.from_dtype(dtype), "ZERO": scalar(0), "ONE": scalar(1),
        "ONE_ARRIVAL": np.uint32(1), "NO_ARRIVAL": np.uint32(0), "FULL_MASK": np.uint32(0xFFFFFFFF),
        "H": config.units, "ROWS": config.rows, "U": config.units_per_block, "BLOCKS": config.blocks,
        "THREADS": config.threads, "KP": config.reduction_length,
        "LENGTH": config.units if forward else 4 * config.units,
        "NK": config.reduction_length // WARP, "NJ": config.reduction_length // WARP,
        "WEIGHT_VALUES": config.weight_values(), "SHARED_VALUES": config.shared_values(),
        "ACCUMULATORS": 4 * config.rows if forward else config.rows,
        "activate_cell": activate_cell, "activate_gate": activate_gate,
        "derive_cell": derive_cell, "derive_gate": derive_gate,
    }
    source = _forward_source(config) if forward else _backward_source(config)
    name = "forward_recurrence_small" if forward else "backward_recurrence_small"
    filename = f"<lstmeng small recurrence {config}>"
    exec(compile(source, filename, "exec"), namespace)
    function = namespace[name]
    function.__source__ = source
    return cuda.jit(function)


def barrier_loop_kernel(blocks: int):
    """A kernel that runs ``count`` empty barriers of this module's kind (for the benchmark).

    Launch as ``kernel[blocks, threads](count, barrier_counter)`` with a cooperative-size grid
    and the same ``blocks`` it was built for; barrier_counter: [1] uint32.
    """
    simulator = bool(numba.config.ENABLE_CUDASIM)
    key = ("barrier loop", blocks, simulator)
    if key not in _kernels:
        source = "\n".join([
            "def barrier_loop(count, barrier_counter):",
            "    thread = cuda.threadIdx.x",
            "    if cuda.blockIdx.x == 0 and thread == 0:",
            "        barrier_counter[0] = 0",
            "    cuda.cg.this_grid().sync()",
            "    for barrier_index in range(count):",
            _barrier(simulator, "        ")])
        namespace = {"cuda": cuda, "numba": numba, "BLOCKS": blocks, "ONE_ARRIVAL": np.uint32(1),
                     "NO_ARRIVAL": np.uint32(0)}
        exec(compile(source, "<lstmeng barrier loop>", "exec"), namespace)
        _kernels[key] = cuda.jit(namespace["barrier_loop"])
    return _kernels[key]


# -- launch planning ---------------------------------------------------------------------------
_scratch: dict = {}


def _device_id():
    """The current GPU's id (None under the simulator): scratch arrays and plans are per GPU."""
    return None if numba.config.ENABLE_CUDASIM else cuda.get_current_device().id


def scratch_arrays(values: int, dtype, allocate):
    """(barrier counter [1] uint32, weight scratch [values]) for a launch, reused across launches.

    Launches on one stream run one after another, so one pair per (GPU, size, dtype)
    suffices; the kernel zeroes the counter itself. (Two recurrences running at the same
    time on different streams would share a counter: the backend launches on the default
    stream only.)
    """
    key = (_device_id(), max(1, int(values)), np.dtype(dtype).name)
    if key not in _scratch:
        _scratch[key] = (allocate((1,), np.uint32), allocate((key[1],), dtype))
    return _scratch[key]


def plan(direction, dtype, units, batch, options: SequenceOptions, *, simulator, multiprocessors=None,
         optin_limit=0, weights_in_shared=None):
    """The configuration of a small-batch launch, or None when this design does not apply.

    options: the call's SequenceOptions (the backward's: its forward's). On a GPU the
    units are split over at most ``multiprocessors`` blocks (one block per SM),
    the weights go to shared memory when ``weights + staging`` fits
    ``optin_limit`` bytes and ``weights_in_shared`` is not False; the caller
    still checks co-residency of the compiled kernel.
    """
    if not 1 <= batch <= SMALL_BATCH_MAX_ROWS or units < 1:
        return None
    if simulator:
        units_per_block, blocks = units, 1     # the simulator's cooperative grids hold one block
    else:
        units_per_block = max(math.ceil(units / max(1, int(multiprocessors))), min(MIN_UNITS_PER_BLOCK, units))
        blocks = math.ceil(units / units_per_block)
    if units_per_block > MAX_UNITS_PER_BLOCK:
        return None
    config = SmallRecurrenceConfig(
        direction=direction, dtype=np.dtype(dtype).name, units=int(units), rows=int(batch),
        units_per_block=units_per_block, blocks=blocks, weights_in_shared=weights_in_shared is not False,
        options=kernel_options(options), simulator=bool(simulator))
    if simulator:
        return config
    itemsize = np.dtype(dtype).itemsize
    if config.weights_in_shared and config.shared_values() * itemsize > optin_limit:
        config = dataclasses.replace(config, weights_in_shared=False)
    if config.shared_values() * itemsize > optin_limit:
        return None    # even the staging alone does not fit
    return config


def launch(direction, dtype, units, batch, arrays, options, *, weights_in_shared, allocate, allow_dynamic_shared,
           launch_log):
    """Launch the small-batch recurrence if it applies and fits this GPU; False when it does not.

    arrays, options: as for the general kernels (``NumbaCudaBackend._launch_recurrence``).
    allocate(shape, dtype): a device array; allow_dynamic_shared(overload, nbytes): the
    backend's opt-in above 48 KB; launch_log: the backend's log of launch shapes.
    """
    dtype = np.dtype(dtype)
    simulator = bool(numba.config.ENABLE_CUDASIM)
    steps = int((arrays[0] if direction == "forward" else arrays[5]).shape[1])   # projection / gates_ws
    if steps * units >= 2**31:
        return False    # the barrier counter (steps x blocks <= steps x H arrivals) must stay below 2**31
    if simulator:
        config = plan(direction, dtype, units, batch, options, simulator=True, weights_in_shared=weights_in_shared)
        if config is None:
            return False
        counter, scratch = scratch_arrays(config.scratch_values(), dtype, allocate)
        shared_bytes = config.shared_values() * dtype.itemsize
        kernel_for(config)[1, config.threads, 0, shared_bytes](*arrays, counter, scratch)
        launch_log[(direction, dtype.name, units, batch, "small")] = (
            1, config.threads, config.units_per_block, config.weights_in_shared, shared_bytes)
        return True
    key = (_device_id(), direction, dtype.name, units, batch, kernel_options(options), weights_in_shared,
           argument_types(arrays))
    if key not in _launch_plans:
        _launch_plans[key] = _plan_on_device(direction, dtype, units, batch, options, arrays, weights_in_shared,
                                             allocate, allow_dynamic_shared)
    launch_plan = _launch_plans[key]
    if launch_plan is None:
        return False
    config, compiled, shared_bytes = launch_plan
    counter, scratch = scratch_arrays(config.scratch_values(), dtype, allocate)
    compiled[config.blocks, config.threads, 0, shared_bytes](*arrays, counter, scratch)
    launch_log[(direction, dtype.name, units, batch, "small")] = (
        config.blocks, config.threads, config.units_per_block, config.weights_in_shared, shared_bytes)
    return True


#: (device, direction, dtype, H, B, kernel options, weights_in_shared, argument types) ->
#: (config, specialized kernel, shared bytes), or None where the design does not fit.
_launch_plans: dict = {}


def argument_types(arrays) -> tuple:
    """The numba types of the kernel's array arguments (dtype, rank and layout), part of a plan's key.

    A specialized dispatcher runs its one compiled overload on whatever it is given, without
    checking types: a kernel compiled for C-contiguous arrays reads a strided view (the halves of
    a bidirectional layer's output gradient that PyTorch hands back) as if it were contiguous,
    silently wrong. Keying the plan by the layouts compiles one specialization per layout instead.
    ``_numba_type_`` is a cached property of numba's device arrays (no typeof dispatch per call).
    """
    return tuple(getattr(array, "_numba_type_", None) or numba.typeof(array) for array in arrays)


def _plan_on_device(direction, dtype, units, batch, options, arrays, weights_in_shared, allocate,
                    allow_dynamic_shared):
    """(config, compiled kernel, shared bytes) that is co-resident on this GPU, or None."""
    device = cuda.get_current_device()
    try:
        optin_limit = int(device.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
    except Exception:
        optin_limit = 48 * 1024
    config = plan(direction, dtype, units, batch, options, simulator=False,
                  multiprocessors=int(device.MULTIPROCESSOR_COUNT), optin_limit=optin_limit,
                  weights_in_shared=weights_in_shared)
    candidates = [] if config is None else [config]
    if config is not None and config.weights_in_shared:
        candidates.append(dataclasses.replace(config, weights_in_shared=False))
    for candidate in candidates:
        counter, scratch = scratch_arrays(candidate.scratch_values(), dtype, allocate)
        compiled = kernel_for(candidate).specialize(*arrays, counter, scratch)
        overload = next(iter(compiled.overloads.values()))
        shared_bytes = candidate.shared_values() * dtype.itemsize
        if shared_bytes > 48 * 1024 and not allow_dynamic_shared(overload, shared_bytes):
            continue
        # Co-residency of every block is what makes the counter barrier deadlock-free;
        # the occupancy query also accounts for the kernel's registers.
        if overload.max_cooperative_grid_blocks(candidate.threads, shared_bytes) >= candidate.blocks:
            return candidate, compiled, shared_bytes
    return None
