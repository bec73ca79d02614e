# Fused LSTM forward and backward kernels for the "cython" backend.
#
# Layout. The batch rows are split into P *parts* (P = threads, or 1); batch
# rows are independent in an LSTM, so each part runs the whole sequence on its
# own thread with no synchronisation per step. Every per-step array is packed
# part-major, then time-major (cuDNN's packed layout, per part): in part p,
# step t owns the packed rows offsets[p, t] .. offsets[p, t] + active[p, t] of
# arrays such as gates [N, 4H] (N = offsets[P - 1, T]); packed row i of that
# step is batch row order[row_begin[p] + i].
#   - general path: parts are contiguous row ranges, active[p, t] = part size,
#     and a [B, T] mask (or none) decides per row and step whether the step is
#     real. Its active and offsets are *uniform*: passed as [P, 1] arrays (the
#     part's rows and its first packed row), so nothing of length T is
#     allocated for them (inference memory stays O(B x H));
#   - variable-length path (right-padded batch): rows sorted by decreasing
#     length and dealt round-robin to the parts (so they stay balanced), each
#     part sorted again, active[p, t] = its rows longer than t: the finished
#     rows of a step are not in it, so they cost no GEMM rows and no
#     elementwise work. active is [P, T], offsets [P, T + 1].
#
# Unit split. A batch too small to split by rows (one part) can instead be
# split by *units*: each of the team's threads owns the units u0 .. u1 - 1,
# i.e. the gate columns i, f, g, o of those units, and does their share of
# every product and all of their elementwise work. h(t) is exchanged through
# memory with one barrier per step (lstm_sync.h): in the forward each thread
# writes its slice of h(t - 1) into the step's input rows, all wait, then each
# multiplies the whole h(t - 1) by its columns of the recurrent kernel; in the
# backward each writes its gate gradients, all wait, then each computes its
# slice of dh(t - 1) = dz(t) @ R^T from the whole dz(t). This is what makes a
# batch of one use both cores.
#
# Per step the forward does one recurrent GEMM into the gate rows (which hold
# the input projection, computed for a chunk of steps by one GEMM beforehand,
# bias folded in), then one pass over the step's rows for nonlinearities, cell
# update, masking and output write. The backward does one pass for the gate
# gradients and one GEMM for dh per step; then the weight gradients as two
# GEMMs over all packed rows (split by gate columns across the threads), the
# bias gradient as a column sum, and dx as one GEMM per part.
#
# Training workspace, per packed row: the activated gates (4H), c(t-1) and
# h(t-1) (H each): the theoretical minimum. act(c(t)) is recomputed in the
# backward and the inputs are read again from the caller's x.
#
# Threads: one pool, OpenMP's. When more than one thread runs, the caller has
# set BLAS to one thread for the duration of the call, so each BLAS call runs
# on the OpenMP thread that makes it. The GIL is released for the whole
# sequence.
#
# Shapes use B batch, T steps, I input features, H units, G = 4H gate columns,
# N packed rows. All index arithmetic is Py_ssize_t (64-bit).

from libc.string cimport memcpy, memset
from libc.limits cimport INT_MAX
from libc.stdint cimport int64_t
from cython cimport floating
from cython.parallel cimport prange, parallel
from scipy.linalg.cython_blas cimport sgemm, dgemm, sgemv, dgemv

import numpy as np

cimport numpy as cnp
from cpython.ref cimport Py_INCREF

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    # Steals a reference to descr (hence the INCREF before each call).
    object PyArray_NewFromDescr(type subtype, cnp.dtype descr, int nd, cnp.npy_intp *dims,
                                cnp.npy_intp *strides, void *data, int flags, object obj)

#: Where aligned_empty's arrays start: a cache line (64 bytes on x86-64).
CACHE_LINE_BYTES = 64

# The C headers, the structs (LstmProblem, LstmBuffers, LstmGradients, TeamShare,
# Layout) and the kernel signatures are declared in _cython_lstm.pxd.

cdef extern from *:
    """
    #ifdef _OPENMP
    #define LSTMENG_HAVE_OPENMP 1
    #else
    #define LSTMENG_HAVE_OPENMP 0
    #endif
    """
    int LSTMENG_HAVE_OPENMP

#: Whether this build runs parts on OpenMP threads (else parts run one after another).
HAVE_OPENMP = bool(LSTMENG_HAVE_OPENMP)

#: Hand-written kernel families by name (lstm_cpu.h), in increasing order of preference.
ISA_CODES = {"scalar": LSTMENG_ISA_SCALAR, "avx2": LSTMENG_ISA_AVX2, "avx512": LSTMENG_ISA_AVX512}
_ISA_NAMES = {code: name for name, code in ISA_CODES.items()}

#: The kernel families this CPU (and this build) runs, best last: "scalar" always.
SUPPORTED_ISAS = tuple(name for name, code in ISA_CODES.items() if code <= lstmeng_best_isa())

#: The best of them, the one used unless a test chooses another (select_kernels).
BEST_ISA = _ISA_NAMES[lstmeng_best_isa()]

#: Whether float32 steps can use the packed-panel FMA kernels of lstm_gemm.h (AVX2 or
#: AVX-512; else BLAS) on this CPU.
PACKED_GEMM = lstmeng_best_isa() >= LSTMENG_ISA_AVX2
# Whether they are used now: the ISA in use is not "scalar".
cdef bint packed_gemm = PACKED_GEMM
# Whether the input projection, dx and the weight gradients use them too at any size
# (AVX-512; the AVX2 kernel lost to OpenBLAS at 1024-row chunks, 56-59 against 70
# GFLOP/s, see docs/cython.md, and takes only short chunks: projects_packed).
cdef bint packed_projection = lstmeng_best_isa() == LSTMENG_ISA_AVX512

#: Whether this CPU runs the fused gate kernels (float32, tanh / sigmoid; lstm_rows_fast.h).
FAST_GATE_MATH = PACKED_GEMM
lstmeng_fast_rows = FAST_GATE_MATH
lstmeng_isa = lstmeng_best_isa()

#: Bytes of one core's L1 data cache (lstmeng_l1d_bytes in lstm_cpu.h): what the
#: batch-1 products in halves plan their order with (lstmeng_halves_order in lstm_halves.h).
L1D_BYTES = lstmeng_l1d_bytes()
cdef int64_t halves_l1_bytes = L1D_BYTES


def halves_l1_size(size=None):
    """The L1 data cache bytes the batch-1 products in halves plan their order with
    (L1D_BYTES unless set). With ``size`` (bytes, >= 0; 0: one fixed order), set it
    process-wide and return the previous value: tests make small layers turn and
    benchmarks compare orders. The results do not depend on it."""
    global halves_l1_bytes
    previous = halves_l1_bytes
    if size is not None:
        if size < 0:
            raise ValueError(f"size must be >= 0 bytes, got {size}")
        halves_l1_bytes = size
    return previous


def halves_order(Py_ssize_t H, bint backward, member=None, l1_size=None):
    """The order of a share's batch-1 products in halves at layer size H (lstmeng_halves_order):
    forward (R) or backward (R^T); a whole share (member None: one thread) or member 0 or 1
    of a two-member split; an L1 of l1_size bytes (default halves_l1_size()). A dict of
    pieces (output pairs), early (own pieces before the barrier: all of them but for a
    turning member), own_turn and other_turn (pieces a step starts earlier; 0: one fixed
    order)."""
    cdef Py_ssize_t u0 = 0, u1 = H
    if member is not None:
        if member not in (0, 1):
            raise ValueError(f"member must be None, 0 or 1, got {member!r}")
        u0, u1 = unit_bound(member, 2, H), unit_bound(member + 1, 2, H)
    cdef LstmengHalvesOrder order = lstmeng_halves_order(
        H, halves_split(H), u0, u1 - u0, 1 if backward else 4, 4 if backward else 1, member is not None,
        halves_l1_bytes if l1_size is None else l1_size)
    return {"pieces": order.pieces, "early": order.early, "own_turn": order.own_turn,
            "other_turn": order.other_turn}


def isa():
    """The name of the kernel family in use: "avx512", "avx2" or "scalar" (see select_kernels)."""
    return _ISA_NAMES[lstmeng_isa]


def fast_gate_math():
    """Whether the fused gate kernels run now (see select_kernels)."""
    return bool(lstmeng_fast_rows)


def select_kernels(isa_name, bint fast_gate_math):
    """Run the hand-written kernels of one instruction set, with or without the fused
    gate kernels, process-wide. "avx512" and "avx2": the packed step product and (with
    fast_gate_math, where the CPU has them) the fused gate rows of that set; "scalar":
    BLAS for the step product and the compiler-vectorised generic rows.

    The cython backend calls it at the start of each call from the caller's kernel
    overrides (``lstmeng.testing.kernel_overrides``: tests run every path the CPU
    supports; production uses BEST_ISA with the fused rows). Process-wide C switches:
    a change while another thread runs a call reaches that call.

    Raises ValueError for a name this CPU or build does not run (see SUPPORTED_ISAS).
    """
    global lstmeng_isa, packed_gemm, packed_projection, lstmeng_fast_rows
    if isa_name not in SUPPORTED_ISAS:
        raise ValueError(f"instruction set {isa_name!r} is not available here: this CPU and build "
                         f"run {SUPPORTED_ISAS}")
    lstmeng_isa = ISA_CODES[isa_name]
    packed_gemm = lstmeng_isa != LSTMENG_ISA_SCALAR
    packed_projection = lstmeng_isa == LSTMENG_ISA_AVX512
    lstmeng_fast_rows = fast_gate_math and FAST_GATE_MATH


#: Activation names -> the kind numbers of lstm_rows.h.
ACTIVATION_KINDS = {"tanh": 0, "relu": 1, "sigmoid": 2, "linear": 3, "hard_sigmoid": 4}

# Rows ahead whose caller rows (x, outputs, dy, dx) a row loop prefetches
# (lstmeng_prefetch_row): enough to cover a miss behind one row's gate math.
cdef Py_ssize_t ROW_PREFETCH_DISTANCE = 4

#: Packed-kernel panels are 16 columns and its kernels take them in pairs.
cdef Py_ssize_t PANEL_PAIR = 32
# When packing the recurrent kernel for the packed kernel pays, per call: packing
# reads and writes it once (memory-bound once it outgrows the caches: 16 MB took
# 1.1 ms on a Zen 5 guest), and each step's product then gains over the unpacked one.
# A product too thick for lstm_gemv.h (takes_gemv: over 16 rows; on the AVX2 kernels
# over 6 of a kernel over 4 MiB) goes to BLAS's SGEMM, which packs the whole kernel
# at every call, so packing once pays from PACK_MIN_STEPS_THICK steps (session 16:
# 2-3-step calls of 17-64 rows per part 1.4-1.8x faster), and from one step at
# MIN_ROWS_TO_PACK rows per part (one-step calls of 64-128 rows 1.15-1.58x faster;
# 48 rows in parts of 24 lost, 0.85x; the short path's calls, under 32 rows, must stay
# bitwise the general path's anyway). Products of PACK_MIN_ROWS rows or more (more
# than one of lstm_gemv.h's passes, each reading the whole kernel) pay from
# PACK_MIN_STEPS steps, and products of PACK_MIN_ROWS_UNCACHED rows or more (three
# passes or more) from PACK_MIN_STEPS_THICK where the kernel outgrows
# PACK_CACHED_BYTES (each pass then streams it from beyond L2). Session 16: H = 512,
# 8-16 rows at 2-3 steps: the GEMV took 1.16-1.65x as long as packing; H = 1024, 4-6
# rows: packing 1.16x faster at 4 steps, 1.9x at 16 (it needed 64 steps before),
# 0.83-0.96x at 2; at H = 128 (256 KiB) the GEMV of 8-16 rows beat packing at 2
# steps (0.92-0.95x packed). A thinner one (batch 1-3) is bound by reading the
# kernel once a step either way, where the packed layout gains only while the kernel
# fits in the caches: there the call needs PACK_MIN_STEPS steps and one more per
# PACK_BYTES_PER_STEP of the kernel (H = 1024: 64 steps; H <= 256: 4), the
# crossovers of a sweep at batch 1 (docs/cython.md). Shorter calls (a cell step,
# streaming with T = 1) read the caller's arrays as they are. The input kernel and
# K^T are packed for products of at least MIN_ROWS_TO_PACK rows.
cdef Py_ssize_t PACK_MIN_STEPS = 4
cdef Py_ssize_t PACK_MIN_ROWS = 4
cdef Py_ssize_t PACK_MIN_STEPS_THICK = 2
cdef Py_ssize_t PACK_CACHED_BYTES = 1024 * 1024
cdef Py_ssize_t PACK_MIN_ROWS_UNCACHED = 7
cdef Py_ssize_t PACK_BYTES_PER_STEP = 256 * 1024
cdef Py_ssize_t MIN_ROWS_TO_PACK = 32
# On the AVX2 kernels the input projection takes the packed kernel for chunks of at most
# AVX2_PROJECTION_MAX_CHUNK_ROWS rows (a unit split's or a pipelined call's chunks of 32
# steps of up to 16 rows), where OpenBLAS's sgemm, which packs the input kernel and the
# chunk again at every call, spent more time packing than multiplying: at batch 1 a
# member projects 32 rows of I = 64 into its 256 gate columns (perf at (1, 500, 64, 128),
# split: sgemm's copies 9 % and its kernel 15 % of the call). tools/ab_cython.py --isa
# avx2 on the Zen 5, packed against BLAS (inference): batch 1 split 1.20x with the
# halves' 1.05x, batch 2 1.10x, 4 and 8 1.08-1.09x, (16, 100, 128, 256) 1.05x; training
# at batch 1 1.11x. The 1024-row chunks of larger batches keep BLAS: 1.01-1.03x here,
# and on the Zen 3 this kernel (which does not pack A) lost to OpenBLAS there (56-59
# against 70 GFLOP/s, docs/cython.md). (Batch 2 had lost, 0.96x, until the AVX2 kernel
# started from the bias row as the AVX-512 one does, instead of C filled with it.)
cdef Py_ssize_t AVX2_PROJECTION_MAX_CHUNK_ROWS = 512
#: Unpacked float64 products of at most this many rows run as one BLAS DGEMV per row (see gemm).
cdef Py_ssize_t DGEMV_MAX_ROWS = 3


cdef inline bint takes_gemv(bint float32, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    """Whether gemm computes an unpacked product of m rows, B n x k, as GEMVs rather than one
    GEMM: lstm_gemv.h's kernels in float32 (lstmeng_gemv_takes_f32: up to 16 rows, 32 on
    AVX-512, fewer for the AVX2 and scalar families in places), one DGEMV per row in float64."""
    return lstmeng_gemv_takes_f32(m, n, k) if float32 else m <= DGEMV_MAX_ROWS


cdef inline bint projects_packed(Py_ssize_t part_chunk_rows) noexcept nogil:
    """Whether a float32 call's input projection, in chunks of part_chunk_rows rows, may run
    on the packed kernel of the family in use: always on AVX-512, on AVX2 for chunks of
    at most AVX2_PROJECTION_MAX_CHUNK_ROWS rows, never on the scalar family (BLAS)."""
    return packed_projection or (packed_gemm and part_chunk_rows <= AVX2_PROJECTION_MAX_CHUNK_ROWS)


cdef inline bint step_weights_packed(bint float32, Py_ssize_t G) noexcept nogil:
    """Whether step_backward's weight gradients run on the packed kernel (float32 on the
    AVX-512 kernels, G = 4H a multiple of PANEL_PAIR), else on BLAS."""
    return float32 and packed_projection and G % PANEL_PAIR == 0


def step_calls_blas(bint float32, Py_ssize_t rows, Py_ssize_t features, Py_ssize_t units, bint backward):
    """Whether step_forward (with backward: step_backward) of ``rows`` rows, ``features``
    inputs and ``units`` units calls BLAS, with the kernels in use now: the caller holds
    BLAS to one thread around the call only then (threads.single_threaded_blas, ~2 us).
    In float32 the products with the kernel [features, 4 units] and the recurrent kernel
    [units, 4 units] are lstm_gemv.h's where takes_gemv says so, and the backward's weight
    gradients the packed kernel's where that takes them (step_weights_packed)."""
    if not float32 or not (takes_gemv(float32, rows, 4 * units, features)
                           and takes_gemv(float32, rows, 4 * units, units)):
        return True
    return backward and not step_weights_packed(float32, 4 * units)


cdef inline bint packs_input_kernel(Py_ssize_t B, Py_ssize_t T, Py_ssize_t I, Py_ssize_t G) noexcept nogil:
    """Whether a call's input projection (and dx) may run on the packed kernel: MIN_ROWS_TO_PACK
    rows, or PACK_MIN_STEPS steps, or from PACK_MIN_STEPS_THICK steps rows that lstm_gemv.h
    did not take when these rules were measured (lstmeng_gemv_took_f32: SGEMM would pack the
    input kernel [I, G] itself; one-step calls stay unpacked, as the short path, which must
    match them bitwise, is)."""
    return (B * T >= MIN_ROWS_TO_PACK or T >= PACK_MIN_STEPS
            or (T >= PACK_MIN_STEPS_THICK and not lstmeng_gemv_took_f32(B * T, G, I)))


cdef inline bint packing_pays(Py_ssize_t steps, Py_ssize_t rows, Py_ssize_t nbytes) noexcept nogil:
    """Whether a matrix of nbytes, used by each of ``steps`` steps' products of ``rows``
    rows (a part's, or the whole batch's in a unit split), is worth packing for the
    packed kernel (see PACK_MIN_STEPS). Products of more than 16 rows count as SGEMM's
    (lstmeng_gemv_took_f32), as when the rule was measured, also where the AVX-512 GEMV
    takes them unpacked since (up to 32 rows: one step, or one part of 17-31 rows)."""
    if not lstmeng_gemv_took_f32(rows, nbytes // sizeof(float), 1):   # (n x k: its floats)
        return steps >= PACK_MIN_STEPS_THICK or rows >= MIN_ROWS_TO_PACK
    if rows >= PACK_MIN_ROWS_UNCACHED and nbytes > PACK_CACHED_BYTES:
        return steps >= PACK_MIN_STEPS_THICK
    if steps < PACK_MIN_STEPS:
        return False
    return rows >= PACK_MIN_ROWS or steps * PACK_BYTES_PER_STEP >= nbytes


def aligned_empty(shape, dtype):
    """An uninitialised C-contiguous array of ``shape`` and ``dtype`` starting on a cache line:
    a view into NumPy-allocated bytes, 64 more than it needs (the array's base).

    Why: NumPy's allocations start 16 bytes into a line, and in a unit split two threads
    write the two halves of each row of gates and states, which then shared the line at
    the halves' boundary: it crossed between the cores at every step (false sharing).
    Here rather than in Python: finding the address through ``ndarray.ctypes`` and slicing
    took 1.7 us an array (NumPy's own empty: 0.1), ten of them a call."""
    cdef cnp.dtype descr = np.dtype(dtype)
    cdef int nd = len(shape), axis
    cdef cnp.npy_intp dims[32]
    cdef cnp.npy_intp count = 1, size = 1
    if nd > 32:
        raise ValueError(f"shape has {nd} dimensions; at most 32")
    for axis in range(nd):
        dims[axis] = shape[axis]
        if dims[axis] < 0:
            raise ValueError(f"negative dimension in shape {shape}")
        count *= dims[axis]
    size = count * descr.itemsize + CACHE_LINE_BYTES
    raw = cnp.PyArray_EMPTY(1, &size, cnp.NPY_UINT8, 0)
    cdef char *data = <char *>cnp.PyArray_DATA(raw)
    data += (-<size_t>data) % CACHE_LINE_BYTES
    Py_INCREF(descr)
    array = PyArray_NewFromDescr(np.ndarray, descr, nd, dims, NULL, data, cnp.NPY_ARRAY_CARRAY, None)
    cnp.set_array_base(array, raw)
    return array


def data_address(cnp.ndarray array):
    """The address of an array's first element (``array.ctypes.data`` without building the
    ctypes helper: 0.76 us a call)."""
    return <size_t>cnp.PyArray_DATA(array)


cdef inline Py_ssize_t member_flag_stride(Py_ssize_t B) noexcept nogil:
    """Entries between two members' per-row arrays ([B] flags of a byte and positions of
    8 bytes, one spare): B + 1 rounded up to 64 entries, whole cache lines of either, so
    that no two members' entries share a line when the arrays start on one (aligned_empty)."""
    return (B + 1 + 63) // 64 * 64


cdef object zeroed_flags(Py_ssize_t count):
    """count zero bytes starting on a cache line."""
    flags = aligned_empty((count,), np.uint8)
    flags.fill(0)
    return flags


cdef object take_float32(object buffer_cache, tuple shape):
    """An uninitialised float32 array of ``shape``: from ``buffer_cache`` (an object with
    take(shape, dtype), the backend's BufferCache) when given, else a new one. The
    packed weights of a large layer are megabytes, and fresh pages every call were
    5 % of an inference call at B = 16, T = 64, H = 1024 (page zeroing)."""
    return aligned_empty(shape, np.float32) if buffer_cache is None else buffer_cache.take(shape, np.float32)


def packs_recurrent_kernel(Py_ssize_t steps, Py_ssize_t rows, Py_ssize_t units):
    """Whether a float32 call of ``steps`` steps whose step products have ``rows`` rows
    packs its recurrent kernel [units, 4 units] for the packed kernel (never on the
    "scalar" ISA, which uses BLAS throughout)."""
    return bool(packed_gemm and packing_pays(steps, rows, 16 * units * units))
# Packed rows of dz per chunk of the packed weight-gradient products: 256 x 32
# floats (a panel pair) are 32 KB, within L1.
cdef Py_ssize_t WEIGHT_GRADIENT_CHUNK = 256
# The pipelined backward's work items (Pipeline.kind), and the most bytes its
# per-chunk partial weight gradients may take (batch 1, T = 500, I = H = 128:
# 2 chunks, 0.5 MB; a long sequence of a wide layer does without).
cdef Py_ssize_t PIPELINE_WEIGHTS = 0
cdef Py_ssize_t PIPELINE_DX = 1
cdef Py_ssize_t PIPELINE_MAX_BYTES = 64 * 2**20
#: Whether the last `forward` / `backward` call ran pipelined (the two ways give
#: the same numbers, so this is how a test tells which one ran).
last_forward_pipelined = False
last_backward_pipelined = False
#: Whether the last `forward` / `backward` call ran its recurrent products in halves
#: (batch 1, float32, AVX-512 packed kernel, H a multiple of 32), for the same reason.
last_forward_row_halves = False
last_backward_row_halves = False
#: How many members met at the parts' end in the last `forward` / `backward` call of whole
#: parts on more than one thread (0 otherwise): those that had a part, never a member
#: without one, whose wait would be the whole call. For tests.
last_forward_parts_met = 0
last_backward_parts_met = 0
#: Whether the last `backward` call computed dx in its time loop (step_input_gradients)
#: rather than in a product over all rows after it (the same numbers on the AVX-512
#: kernels). For tests.
last_backward_dx_in_loop = False


cdef Py_ssize_t members_met(const int64_t *flags, Py_ssize_t team) noexcept nogil:
    """How many of a team's members made at least one barrier call (lstm_sync.h's flags)."""
    cdef Py_ssize_t member, met = 0
    for member in range(team):
        if flags[member * LSTMENG_FLAG_STRIDE] > 0:
            met += 1
    return met


cdef Layout make_layout(const Py_ssize_t[::1] order, const Py_ssize_t[::1] row_begin,
                        const Py_ssize_t[:, ::1] active, const Py_ssize_t[:, ::1] offsets,
                        Py_ssize_t T):
    cdef Layout layout
    layout.order = &order[0] if order.shape[0] > 0 else NULL
    layout.row_begin = &row_begin[0]
    layout.uniform = offsets.shape[1] == 1 and active.shape[1] == 1
    if not layout.uniform and (active.shape[1] != T or offsets.shape[1] != T + 1):
        raise ValueError(f"layout arrays active {tuple(active.shape)} and offsets "
                         f"{tuple(offsets.shape)} do not match T = {T}")
    layout.active = &active[0, 0] if active.shape[1] > 0 else NULL
    layout.offsets = &offsets[0, 0]
    layout.T = T
    return layout


cdef inline Py_ssize_t step_rows(const Layout *layout, Py_ssize_t part, Py_ssize_t t) noexcept nogil:
    """Rows of part ``part`` processed in step ``t`` (a prefix of the part's rows)."""
    if layout.uniform:
        return layout.active[part]
    return layout.active[part * layout.T + t]


cdef inline Py_ssize_t step_offset(const Layout *layout, Py_ssize_t part, Py_ssize_t t) noexcept nogil:
    """First packed row of part ``part``'s step ``t`` (t = T: one past its last row)."""
    if layout.uniform:
        return layout.offsets[part] + t * layout.active[part]
    return layout.offsets[part * (layout.T + 1) + t]


def packed_row_offset(const Py_ssize_t[:, ::1] active, const Py_ssize_t[:, ::1] offsets,
                      Py_ssize_t T, Py_ssize_t part, Py_ssize_t t):
    """First packed row of part ``part``'s step ``t`` in a layout (uniform or not), as
    the kernels compute it; part = P - 1, t = T gives N, the number of packed rows."""
    cdef Py_ssize_t[::1] order = np.zeros(1, np.intp)
    cdef Py_ssize_t[::1] row_begin = np.zeros(offsets.shape[0] + 1, np.intp)
    cdef Layout layout = make_layout(order, row_begin, active, offsets, T)
    if not (0 <= part < offsets.shape[0] and 0 <= t <= T):
        raise IndexError(f"part {part} or step {t} outside the layout's {offsets.shape[0]} parts "
                         f"and {T} steps")
    return step_offset(&layout, part, t)


def right_padded_lengths(const unsigned char[:, ::1] mask):
    """The rows' lengths [B] (intp) when every row of the [B, T] mask (bool or uint8, 1 =
    real step) is a run of real steps from step 0 followed by padding only, else None.

    One pass over the mask, for the variable-length layout (a NumPy version built
    [B, T] comparisons: 45-180 us of a call at B = 256, T = 50).
    """
    cdef Py_ssize_t B = mask.shape[0], T = mask.shape[1], b, t, length
    lengths_array = np.empty(B, np.intp)
    cdef Py_ssize_t[::1] lengths = lengths_array
    cdef bint padded = True
    with nogil:
        for b in range(B):
            length = 0
            while length < T and mask[b, length]:
                length += 1
            for t in range(length, T):
                if mask[b, t]:
                    padded = False
                    break
            if not padded:
                break
            lengths[b] = length
    return lengths_array if padded else None


def variable_length_layout(const Py_ssize_t[::1] lengths, Py_ssize_t T, Py_ssize_t parts):
    """The variable-length layout of rows of the given lengths (each 0 .. T) in ``parts``
    parts: (order [B], row_begin [P + 1], active [P, T], offsets [P, T + 1], the largest
    part's rows), all intp (see the module comment).

    Rows are sorted by decreasing length (ties in row order) and dealt to the parts in
    snake order (0, 1, .., P - 1, P - 1, .., 0, 0, ...), so every part gets long and
    short rows and the parts' total steps match (the call lasts as long as its longest
    part: round-robin gave the first part the longer row of every pair, 7.5 % more
    steps at B = 32, T = 200); each part's rows stay sorted, so its active rows at
    step t, those longer than t, are a prefix.
    """
    cdef Py_ssize_t B = lengths.shape[0], P = parts, b, i, p, t, L, lap, seat, running
    if P < 1:
        raise ValueError(f"parts must be at least 1, got {P}")
    for b in range(B):
        if not 0 <= lengths[b] <= T:
            raise ValueError(f"lengths must lie in 0 .. {T}, got {lengths[b]} at row {b}")
    order_array = np.empty(B, np.intp)
    row_begin_array = np.zeros(P + 1, np.intp)
    active_array = np.zeros((P, T), np.intp)
    offsets_array = np.empty((P, T + 1), np.intp)
    cdef Py_ssize_t[::1] order = order_array, row_begin = row_begin_array
    cdef Py_ssize_t[:, ::1] active = active_array, offsets = offsets_array
    # Counting sort by decreasing length; then each part's rows counted by length.
    cdef Py_ssize_t[::1] first_of_length = np.zeros(T + 2, np.intp)
    cdef Py_ssize_t[::1] by_length = np.empty(B, np.intp)
    cdef Py_ssize_t[::1] dealt_to = np.empty(B, np.intp)
    cdef Py_ssize_t[:, ::1] part_lengths = np.zeros((P, T + 1), np.intp)
    with nogil:
        for b in range(B):
            first_of_length[T - lengths[b] + 1] += 1
        for L in range(1, T + 2):
            first_of_length[L] += first_of_length[L - 1]
        for b in range(B):
            i = T - lengths[b]
            by_length[first_of_length[i]] = b
            first_of_length[i] += 1
        for i in range(B):
            lap, seat = i // P, i % P
            p = seat if lap % 2 == 0 else P - 1 - seat
            dealt_to[i] = p
            row_begin[p + 1] += 1
            part_lengths[p, lengths[by_length[i]]] += 1
        for p in range(P):
            row_begin[p + 1] += row_begin[p]
        # Part by part, in the sorted order: each part's rows stay sorted.
        for p in range(P):
            seat = row_begin[p]
            for i in range(B):
                if dealt_to[i] == p:
                    order[seat] = by_length[i]
                    seat += 1
        running = 0
        for p in range(P):
            # active[p, t]: the part's rows longer than t.
            L = 0
            for t in range(T - 1, -1, -1):
                L += part_lengths[p, t + 1]
                active[p, t] = L
            offsets[p, 0] = running
            for t in range(T):
                offsets[p, t + 1] = offsets[p, t] + active[p, t]
            running = offsets[p, T]
    largest = 0
    for p in range(P):
        largest = max(largest, row_begin[p + 1] - row_begin[p])
    return order_array, row_begin_array, active_array, offsets_array, largest


cdef inline Py_ssize_t unit_bound(Py_ssize_t member, Py_ssize_t team, Py_ssize_t H) noexcept nogil:
    """First unit of team member ``member`` (member = team: H). Slices are whole panel
    pairs where H allows, so every slice can use the packed kernel."""
    if H % PANEL_PAIR == 0:
        return member * (H // PANEL_PAIR) // team * PANEL_PAIR
    return member * H // team


cdef void gemm(bint trans_a, bint trans_b, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
               floating alpha, floating *a, Py_ssize_t lda, floating *b, Py_ssize_t ldb,
               floating beta, floating *c, Py_ssize_t ldc) noexcept nogil:
    """Row-major C[m, n] = alpha * op(A) @ op(B) + beta * C through Fortran BLAS.

    BLAS is column-major, and a row-major matrix read column-major is its
    transpose: so row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T,
    i.e. the same call with the operands (and m, n) swapped and the transpose
    flags unchanged. Products of a few rows (takes_gemv) go to GEMVs rather than GEMM:
    OpenBLAS's SGEMM packs all of B at every call (K = 256, N = 1024: 2 rows 39 us by
    SGEMM, 23 by two SGEMVs; 3 rows 59 / 35; from 4 rows about even, from 8 SGEMM ahead;
    one thread, Zen 5). In float32 (alpha 1, as every caller passes) that is
    lstm_gemv.h's kernel, which takes up to three rows per pass over B and so leads
    SGEMM further (to 16 rows; see lstm_gemv.h); in float64 one BLAS
    DGEMV per row, up to DGEMV_MAX_ROWS rows. Sizes were checked against INT_MAX by the
    caller.
    """
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    cdef int im = <int>n, i_n = <int>m, ik = <int>k, one = 1
    cdef int ilda = <int>ldb, ildb = <int>lda, ildc = <int>ldc
    cdef Py_ssize_t row
    if m == 0 or n == 0:
        return
    if k == 0:
        if beta == 0:
            for row in range(m):
                memset(c + row * ldc, 0, n * sizeof(floating))
        return
    if not trans_a and takes_gemv(floating is float, m, n, k):
        if floating is float and alpha == 1:
            # lstm_gemv.h: up to three rows per pass over B, no BLAS call (so no BLAS thread
            # limit needed around it). B row-major [n, k] when trans_b, else [k, n].
            lstmeng_gemv_f32(m, trans_b, n, k, a, lda, b, ldb, beta != 0, c, ldc)
            return
        # c[row, :n] = op(B)^T-as-stored times the row a[row, :k]: column-major B is [n, k]
        # ('N') when B is row-major [k, n], and [k, n] read transposed ('T') when it is [n, k].
        for row in range(m):
            if trans_b:
                if floating is float:
                    sgemv(b'T', &ik, &im, &alpha, b, &ilda, a + row * lda, &one, &beta, c + row * ldc, &one)
                else:
                    dgemv(b'T', &ik, &im, &alpha, b, &ilda, a + row * lda, &one, &beta, c + row * ldc, &one)
            else:
                if floating is float:
                    sgemv(b'N', &im, &ik, &alpha, b, &ilda, a + row * lda, &one, &beta, c + row * ldc, &one)
                else:
                    dgemv(b'N', &im, &ik, &alpha, b, &ilda, a + row * lda, &one, &beta, c + row * ldc, &one)
        return
    if floating is float:
        sgemm(&tb, &ta, &im, &i_n, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc)
    else:
        dgemm(&tb, &ta, &im, &i_n, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc)



cdef inline void forward_row(floating *gates, floating *c, floating *c_prev, floating *h,
                             Py_ssize_t n, Py_ssize_t stride, int act, int ract) noexcept nogil:
    if floating is float:
        lstmeng_forward_row_f32(gates, c, c_prev, h, n, stride, act, ract)
    else:
        lstmeng_forward_row_f64(gates, c, c_prev, h, n, stride, act, ract)


cdef inline void backward_row(floating *gates, floating *c_prev, floating *dh, floating *dc,
                              floating *scratch, Py_ssize_t n, Py_ssize_t stride,
                              int act, int ract) noexcept nogil:
    if floating is float:
        lstmeng_backward_row_f32(gates, c_prev, dh, dc, scratch, n, stride, act, ract)
    else:
        lstmeng_backward_row_f64(gates, c_prev, dh, dc, scratch, n, stride, act, ract)


cdef inline void scaled_copy(floating *dst, floating *src, floating *scale,
                             Py_ssize_t n) noexcept nogil:
    """dst = src * scale (elementwise), or a plain copy when scale is NULL."""
    cdef Py_ssize_t j
    if scale == NULL:
        memcpy(dst, src, n * sizeof(floating))
    else:
        for j in range(n):
            dst[j] = src[j] * scale[j]


cdef inline void add_row(floating *total, const floating *values, Py_ssize_t n) noexcept nogil:
    """total[j] += values[j] for j < n."""
    cdef Py_ssize_t j
    for j in range(n):
        total[j] += values[j]


cdef inline floating *rows_of(floating *array, Py_ssize_t row, Py_ssize_t width,
                              Py_ssize_t first=0) noexcept nogil:
    """Pointer to element ``first`` of row ``row`` of a row-major [*, width] array,
    or NULL when array is NULL."""
    return NULL if array == NULL else array + row * width + first


cdef inline floating *pointer2(floating[:, ::1] array) noexcept nogil:
    return NULL if array is None or array.shape[0] * array.shape[1] == 0 else &array[0, 0]


cdef inline floating *pointer1(floating[::1] array) noexcept nogil:
    return NULL if array is None or array.shape[0] == 0 else &array[0]


cdef inline bint packed_slice_usable(Py_ssize_t H, Py_ssize_t width, Py_ssize_t columns) noexcept nogil:
    """Whether a slice of ``width`` units can use the packed kernel: the whole row of
    ``columns`` gate columns at once (width = H), else each gate's block alone."""
    if not packed_gemm or width == 0:
        return False
    return columns % PANEL_PAIR == 0 if width == H else width % PANEL_PAIR == 0


#: A whole matrix packed before a call's parallel region (the row-split parts and the
#: pipelined calls share one packed copy) is packed by all the call's threads from this
#: many floats (128 KiB). Packing is memory-bound, and one thread packing a 4 MiB recurrent
#: kernel (H = 512) took about a third of a one-step call of 64 rows. Session 17, 2 threads,
#: Zen 5, against packing on one thread (tools/ab_cython.py, results bitwise the same):
#: (64, 1, 128, 512) 1.14-1.19x, (64, 2, 256, 1024) training 1.10x, (32, 1, 128, 256) 1.09-1.13x,
#: (64, 2, 64, 128) training 1.06-1.08x (a 256 KiB kernel), (32, 2, 32, 64) 0.99-1.00x (64 KiB).
cdef Py_ssize_t PARALLEL_PACK_MIN_FLOATS = 32 * 1024


cdef void pack_panels(const float *b, Py_ssize_t K, Py_ssize_t columns, Py_ssize_t ld, bint transpose,
                      float *packed, Py_ssize_t threads) noexcept nogil:
    """lstmeng_pack_panels_f32 of b's [K, columns] block (row stride ld; with transpose the
    block of b^T), its panel pairs dealt to ``threads`` threads when it has at least
    PARALLEL_PACK_MIN_FLOATS floats. A pair's packed floats come from its own 32 columns
    alone, at (pair * K) * 32, so the layout is the same whichever thread writes a pair.
    Called outside any parallel region (threads = 1 inside one)."""
    cdef Py_ssize_t pairs = columns // PANEL_PAIR, share, first, end
    if threads <= 1 or not LSTMENG_HAVE_OPENMP or pairs < threads or K * columns < PARALLEL_PACK_MIN_FLOATS:
        lstmeng_pack_panels_f32(b, K, columns, ld, transpose, packed)
        return
    for share in prange(threads, num_threads=threads, schedule="static"):
        first = share * pairs // threads
        end = (share + 1) * pairs // threads
        lstmeng_pack_panels_f32(b + first * PANEL_PAIR * (ld if transpose else 1), K, (end - first) * PANEL_PAIR,
                                ld, transpose, packed + first * PANEL_PAIR * K)


cdef void pack_weight_slice(const float *weights, Py_ssize_t K, Py_ssize_t H, Py_ssize_t u0,
                            Py_ssize_t width, bint stored_transposed, float *packed,
                            Py_ssize_t threads=1) noexcept nogil:
    """Columns of units u0 .. u0 + width - 1 of weights [K, 4H] (the recurrent kernel,
    K = H, or the input kernel, K = I), packed: the whole [K, 4H] at once when
    width = H, else the i, f, g, o blocks one after another ([K, width] each).
    stored_transposed: the memory holds weights^T [4H, K] (PyTorch's layout), read
    transposed by the packer (the same packed panels). threads: pack_panels' (whole
    matrices only)."""
    cdef Py_ssize_t G = 4 * H, gate
    if width == H:
        if stored_transposed:
            pack_panels(weights, K, G, K, True, packed, threads)
        else:
            pack_panels(weights, K, G, G, False, packed, threads)
    else:
        for gate in range(4):
            if stored_transposed:
                lstmeng_pack_panels_f32(weights + (gate * H + u0) * K, K, width, K, 1,
                                        packed + gate * K * width)
            else:
                lstmeng_pack_panels_f32(weights + gate * H + u0, K, width, G, 0,
                                        packed + gate * K * width)


cdef void pack_recurrent_transpose_slice(const float *recurrent_kernel, Py_ssize_t H,
                                         Py_ssize_t u0, Py_ssize_t width, bint stored_transposed,
                                         float *packed, Py_ssize_t threads=1) noexcept nogil:
    """R^T [4H, H]'s columns u0 .. u0 + width - 1 (R's rows), packed; from R [H, 4H],
    or from R^T itself when stored_transposed. threads: pack_panels'."""
    if stored_transposed:
        pack_panels(recurrent_kernel + u0, 4 * H, width, H, False, packed, threads)
    else:
        pack_panels(recurrent_kernel + u0 * 4 * H, 4 * H, width, 4 * H, True, packed, threads)


cdef float *pack_slice(float *base, const float *weights, Py_ssize_t K, Py_ssize_t H,
                       Py_ssize_t u0, Py_ssize_t u1, bint transpose,
                       bint stored_transposed, Py_ssize_t threads=1) noexcept nogil:
    """Units u0 .. u1 - 1 of weights [K, 4H] (forward: the recurrent kernel, K = H, or
    the input kernel, K = I) or of the recurrent kernel's transpose (backward,
    transpose, K = H) packed into their place in base [K * 4H] for the packed
    kernel; NULL (use BLAS) when base is NULL or the slice cannot use it.
    stored_transposed: weights is held as its transpose (``weights_transposed``).
    threads: how many threads pack a whole matrix (pack_panels; a caller outside any
    parallel region)."""
    cdef Py_ssize_t width = u1 - u0
    cdef float *packed
    if base == NULL or K == 0 or not packed_slice_usable(H, width, H if transpose else 4 * H):
        return NULL
    packed = base + u0 * 4 * K
    if transpose:
        pack_recurrent_transpose_slice(weights, H, u0, width, stored_transposed, packed, threads)
    else:
        pack_weight_slice(weights, K, H, u0, width, stored_transposed, packed, threads)
    return packed


cdef float *pack_recurrent_slice(const LstmProblem *problem, float *base, const float *recurrent_kernel,
                                 Py_ssize_t u0, Py_ssize_t u1, bint backward, Py_ssize_t team,
                                 Py_ssize_t threads=1) noexcept nogil:
    """The recurrent kernel's units u0 .. u1 - 1 packed into their place in base
    [H * 4H]: R's gate columns of those units for the forward's h @ R, or R's rows
    (R^T's columns) for the backward's dz @ R^T. For product_in_halves when
    problem.recurrent_halves (the same floats in another order), else as pack_slice
    packs them; NULL (BLAS) as pack_slice. threads: pack_slice's (the halves layout, a
    batch-1 layout whose units are split anyway, packs on one). team: the size of the
    team the slice's reader belongs to (2: a member of a two-member split; else a whole
    share, whose layout depends on whether its order turns: halves_paired)."""
    cdef Py_ssize_t H = problem.units, G = 4 * H, ld_i, ld_j
    if not problem.recurrent_halves:
        return pack_slice(base, recurrent_kernel, H, H, u0, u1, backward, problem.weights_transposed, threads)
    if base == NULL or not packed_slice_usable(H, u1 - u0, H if backward else G):
        return NULL
    # M[i, j] = recurrent_kernel[i * ld_i + j * ld_j], M = R [H, 4H] (forward) or R^T [4H, H],
    # the memory holding R, or R^T when weights_transposed.
    if backward and problem.weights_transposed:
        ld_i, ld_j = H, 1
    elif backward:
        ld_i, ld_j = 1, G
    elif problem.weights_transposed:
        ld_i, ld_j = 1, H
    else:
        ld_i, ld_j = G, 1
    lstmeng_pack_halves_f32(recurrent_kernel, H, halves_split(H), u0, u1 - u0, 1 if backward else 4,
                            4 if backward else 1, ld_i, ld_j, halves_paired(H, u0, u1, backward, team), base + u0 * G)
    return base + u0 * G


cdef void gates_product(Py_ssize_t rows, Py_ssize_t K, floating *a, Py_ssize_t lda,
                        floating *weights, bint stored_transposed, float *packed, floating *gates,
                        Py_ssize_t H, Py_ssize_t u0, Py_ssize_t width, bint accumulate,
                        floating *bias) noexcept nogil:
    """gates[:, columns of units u0 .. u0 + width) = a @ weights[:, same] plus, when
    accumulate, the gates' own values, else bias[same] (zeros when bias is NULL).

    a: [rows, K] (row stride lda); weights: [K, 4H], held as weights^T [4H, K] when
    stored_transposed (BLAS then reads it transposed); gates: [rows, 4H]; bias: [4H]
    or NULL (read only when not accumulate). packed: weights' slice from
    pack_weight_slice (float32 only), or NULL for BLAS. Every path adds the same
    start value to the product once, so the sums match bitwise across them.
    """
    cdef Py_ssize_t G = 4 * H, gate, i
    cdef floating beta = 1 if accumulate or bias != NULL else 0
    if width == 0 or rows == 0:
        return
    if floating is float:
        if packed != NULL and not accumulate and bias != NULL:
            # The packed kernels start from the bias itself (no bias rows to fill first).
            if width == H:
                lstmeng_gemm_packed_bias_f32(rows, G, K, a, lda, packed, bias, gates, G)
            else:
                for gate in range(4):
                    lstmeng_gemm_packed_bias_f32(rows, width, K, a, lda, packed + gate * K * width,
                                                 bias + gate * H + u0, gates + gate * H + u0, G)
            return
    if not accumulate and (bias != NULL or (floating is float and packed != NULL)):
        # Bias rows (zeros without a bias: the packed kernel only accumulates), then beta = 1.
        for i in range(rows):
            for gate in range(4):
                if bias != NULL:
                    memcpy(gates + i * G + gate * H + u0, bias + gate * H + u0, width * sizeof(floating))
                else:
                    memset(gates + i * G + gate * H + u0, 0, width * sizeof(floating))
    if floating is float:
        if packed != NULL:
            if width == H:
                lstmeng_gemm_packed_f32(rows, G, K, a, lda, packed, gates, G)
            else:
                for gate in range(4):
                    lstmeng_gemm_packed_f32(rows, width, K, a, lda, packed + gate * K * width,
                                            gates + gate * H + u0, G)
            return
    if stored_transposed:
        if width == H:
            gemm(False, True, rows, G, K, <floating>1, a, lda, weights, K, beta, gates, G)
        else:
            for gate in range(4):
                gemm(False, True, rows, width, K, <floating>1, a, lda, weights + (gate * H + u0) * K, K,
                     beta, gates + gate * H + u0, G)
        return
    if width == H:
        gemm(False, False, rows, G, K, <floating>1, a, lda, weights, G, beta, gates, G)
    else:
        for gate in range(4):
            gemm(False, False, rows, width, K, <floating>1, a, lda, weights + gate * H + u0, G,
                 beta, gates + gate * H + u0, G)


cdef void hidden_gradient_product(Py_ssize_t rows, Py_ssize_t H, floating *dz,
                                  floating *recurrent_kernel, bint stored_transposed,
                                  float *packed_t, floating *dh, Py_ssize_t u0,
                                  Py_ssize_t width) noexcept nogil:
    """dh[:, u0 .. u0 + width) = dz @ R[u0 .. u0 + width, :]^T.

    dz: [rows, 4H]; recurrent_kernel R: [H, 4H] (R^T [4H, H] when stored_transposed);
    dh: [rows, H]; packed_t: from pack_recurrent_transpose_slice (float32), or NULL
    for BLAS.
    """
    cdef Py_ssize_t G = 4 * H, i
    if width == 0 or rows == 0:
        return
    if floating is float:
        if packed_t != NULL:
            for i in range(rows):
                memset(dh + i * H + u0, 0, width * sizeof(float))
            lstmeng_gemm_packed_f32(rows, width, G, dz, G, packed_t, dh + u0, H)
            return
    if stored_transposed:
        gemm(False, False, rows, width, G, <floating>1, dz, G, recurrent_kernel + u0, H,
             <floating>0, dh + u0, H)
        return
    gemm(False, True, rows, width, G, <floating>1, dz, G, recurrent_kernel + u0 * G, G,
         <floating>0, dh + u0, H)


cdef void copy_step_inputs(const LstmProblem *problem, Py_ssize_t part, Py_ssize_t t,
                           floating *x, floating *in_drop, floating *packed_x,
                           Py_ssize_t shift) noexcept nogil:
    """Step t's rows of part ``part`` from x [B, T, I], input dropout applied, into
    packed_x at packed row (offset + shift)."""
    cdef const Layout *layout = &problem.layout
    cdef Py_ssize_t T = problem.steps, I = problem.inputs
    cdef Py_ssize_t r_begin = layout.row_begin[part], first = step_offset(layout, part, t)
    cdef Py_ssize_t i, row, n_rows = step_rows(layout, part, t)
    for i in range(n_rows):
        row = layout.order[r_begin + i]
        if i + ROW_PREFETCH_DISTANCE < n_rows:
            lstmeng_prefetch_row(x + (layout.order[r_begin + i + ROW_PREFETCH_DISTANCE] * T + t) * I,
                                 I * sizeof(floating), 0)
        scaled_copy(packed_x + (first + i + shift) * I, x + (row * T + t) * I,
                    rows_of(in_drop, row, I), I)


def transposed_copy(floating[:, ::1] array):
    """A new C-contiguous array holding array's transpose: [cols, rows] from [rows, cols]
    (lstm_transpose.h: SIMD tiles for float32, faster than NumPy's and torch's transposing
    copies). lstmeng.torch hands PyTorch the weight gradients in its parameters' layout with it."""
    cdef Py_ssize_t rows = array.shape[0], cols = array.shape[1]
    result = np.empty((cols, rows), np.float32 if floating is float else np.float64)
    cdef floating[:, ::1] out = result
    if rows > 0 and cols > 0:
        with nogil:
            if floating is float:
                lstmeng_transpose_f32(rows, cols, &array[0, 0], cols, &out[0, 0], rows)
            else:
                lstmeng_transpose_f64(rows, cols, &array[0, 0], cols, &out[0, 0], rows)
    return result


def packed_panels(const float[:, ::1] matrix, bint transpose=False, Py_ssize_t threads=1):
    """The packed kernel's layout of ``matrix`` [K, G] (with transpose: of its transpose,
    ``matrix`` then [G, K]) as pack_panels writes it on ``threads`` threads: a new float32
    array [G / 32, K, 32] whose [p, k, c] is B[k, 32 p + c]. For tests: the layout must
    not depend on how many threads wrote it. G must be a multiple of 32."""
    cdef Py_ssize_t K = matrix.shape[1] if transpose else matrix.shape[0]
    cdef Py_ssize_t G = matrix.shape[0] if transpose else matrix.shape[1]
    if G % PANEL_PAIR != 0 or K == 0:
        raise ValueError(f"packed_panels: the packed matrix must have K > 0 rows and a multiple of "
                         f"{PANEL_PAIR} columns, got K = {K}, G = {G}")
    if threads < 1:
        raise ValueError(f"packed_panels: threads must be >= 1, got {threads}")
    result = np.empty((G // PANEL_PAIR, K, PANEL_PAIR), np.float32)
    cdef float[:, :, ::1] out = result
    with nogil:
        pack_panels(&matrix[0, 0], K, G, matrix.shape[1], transpose, &out[0, 0, 0], threads)
    return result


def check_blas_sizes(*sizes):
    """Raise ValueError when a GEMM dimension would not fit BLAS's 32-bit int."""
    for size in sizes:
        if size > INT_MAX:
            raise ValueError(f"dimension {size} exceeds the BLAS int limit {INT_MAX}")


cdef void team_wait(const LstmProblem *problem, TeamShare *share) noexcept nogil:
    """Return once every member of the share's team has made this barrier call (every
    member makes the same sequence of calls; a team of one passes at once)."""
    lstmeng_barrier_wait(problem.barrier_flags, share.member, share.team, share.barriers)
    share.barriers += 1


# The forward. Every kernel below copies the struct fields it uses into locals
# at its top: the compiler must otherwise reload them after each call it does
# not inline, as the structs are reached through pointers.

cdef void forward_part(const LstmProblem *problem, const LstmBuffers *buffers,
                       TeamShare *share, floating zero) noexcept nogil:
    """The whole forward sequence of one share (a part's rows, units u0 .. u1 - 1):
    per chunk of steps the input projection, then per step the recurrent product
    and the row math; the final states and outputs at the end."""
    cdef Py_ssize_t T = problem.steps, G = problem.gate_columns, part = share.part
    cdef Py_ssize_t chunk_first = 0, chunk_last, step, t, gate_shift, chunk = 0
    cdef int64_t *claims = problem.projection_claims
    cdef floating *gates = <floating *>buffers.gates
    cdef floating *step_gates
    share.barriers = 0
    share.steps_run = 0
    start_halves_order(share, problem.units, False)
    load_initial_state(problem, buffers, share, zero)
    while chunk_first < T:
        chunk_last = min(chunk_first + problem.chunk_steps, T)
        if claims == NULL:
            gate_shift = project_chunk(problem, buffers, share, chunk_first, chunk_last, part, zero)
        elif chunk == 0 or lstmeng_progress_claim_exact(claims, chunk):
            # The pipelined forward (see projection_ahead), and the chunk's projection
            # is not taken yet: this thread does it.
            gate_shift = project_chunk(problem, buffers, share, chunk_first, chunk_last,
                                       chunk % problem.projection_slots, zero)
            lstmeng_progress_publish(problem.projection_done + chunk, 1)
        else:
            # Time lost to a helper kept off its core counts as the split's barrier waits do.
            problem.barrier_flags[LSTMENG_SLOW_WAIT_NS] += lstmeng_progress_wait(
                problem.projection_done + chunk, 1)
            gate_shift = 0 if problem.training else chunk_gate_shift(
                problem, part, chunk % problem.projection_slots, chunk_first, chunk_last)
        for step in range(chunk_first, chunk_last):
            t = T - 1 - step if problem.reverse else step
            if step_rows(&problem.layout, part, t) == 0:
                continue
            step_gates = gates + (step_offset(&problem.layout, part, t) + gate_shift) * G
            recurrent_step_product(problem, buffers, share, t, step_gates)
            cell_rows(problem, buffers, share, t, step_gates)
        chunk_first = chunk_last
        chunk += 1
        if claims != NULL:
            # The chunk's slot of packed_x and of the inference gates is free again.
            lstmeng_progress_publish(claims + 2 * LSTMENG_FLAG_STRIDE, chunk)
    if claims != NULL:
        # Meet the other thread here rather than in OpenMP's barrier at the end of the
        # region, which spins: if another process keeps it off its core, this wait sleeps
        # (the other thread may run here) and counts for the busy-machine rule.
        problem.barrier_flags[LSTMENG_SLOW_WAIT_NS] += lstmeng_progress_wait(claims + LSTMENG_FLAG_STRIDE, 1)
    publish_part_outputs(problem, buffers, share, zero)


cdef void projection_ahead(const LstmProblem *problem, const LstmBuffers *buffers, TeamShare *share,
                           floating zero) noexcept nogil:
    """The pipelined forward's other thread: the input projection of the chunks ahead
    of the time loop's thread (forward_part), each claimed in order (the loop's
    thread projects chunk 0, and claims a chunk that is still free when it gets
    there). The chunks take turns in projection_slots slots of packed_x and of the
    inference gates (memory stays O(B H) in inference), so chunk k waits until the
    loop has finished chunk k - projection_slots; the projection is a few times
    faster than the steps, so this thread mostly sleeps there. When every chunk is
    claimed it says so; the loop's thread waits for that at its end. A chunk's
    projection is the same computation whichever thread runs it."""
    cdef int64_t *claims = problem.projection_claims
    cdef Py_ssize_t T = problem.steps, chunk, chunk_first
    while True:
        chunk = lstmeng_progress_claim(claims)
        chunk_first = chunk * problem.chunk_steps
        if chunk_first >= T:
            lstmeng_progress_publish(claims + LSTMENG_FLAG_STRIDE, 1)   # every chunk is projected
            return
        lstmeng_progress_wait(claims + 2 * LSTMENG_FLAG_STRIDE, chunk - problem.projection_slots + 1)
        project_chunk(problem, buffers, share, chunk_first, min(chunk_first + problem.chunk_steps, T),
                      chunk % problem.projection_slots, zero)
        lstmeng_progress_publish(problem.projection_done + chunk, 1)


cdef void load_initial_state(const LstmProblem *problem, const LstmBuffers *buffers,
                             TeamShare *share, floating zero) noexcept nogil:
    """h0, c0 of the share's rows and units into h_state, c_state (packed row order)."""
    cdef const Layout *layout = &problem.layout
    cdef Py_ssize_t H = problem.units, u0 = share.u0, width = share.u1 - share.u0, r
    cdef floating *h0 = <floating *>buffers.h0
    cdef floating *c0 = <floating *>buffers.c0
    cdef floating *h_state = <floating *>buffers.h_state
    cdef floating *c_state = <floating *>buffers.c_state
    for r in range(layout.row_begin[share.part], layout.row_begin[share.part + 1]):
        memcpy(h_state + r * H + u0, h0 + layout.order[r] * H + u0, width * sizeof(floating))
        memcpy(c_state + r * H + u0, c0 + layout.order[r] * H + u0, width * sizeof(floating))
        share.seen[r] = 0


cdef Py_ssize_t chunk_gate_shift(const LstmProblem *problem, Py_ssize_t part, Py_ssize_t slot,
                                 Py_ssize_t chunk_first, Py_ssize_t chunk_last) noexcept nogil:
    """The shift from a packed row of processing steps chunk_first .. chunk_last - 1
    (part ``part``) to its row in slot ``slot`` of packed_x and of the inference
    gates (slot * part_chunk_rows is the slot's first row)."""
    cdef Py_ssize_t t_lo = problem.steps - chunk_last if problem.reverse else chunk_first
    return slot * problem.part_chunk_rows - step_offset(&problem.layout, part, t_lo)


cdef Py_ssize_t project_chunk(const LstmProblem *problem, const LstmBuffers *buffers,
                              TeamShare *share, Py_ssize_t chunk_first, Py_ssize_t chunk_last,
                              Py_ssize_t slot, floating zero) noexcept nogil:
    """The input projection x(t) @ K + bias of processing steps chunk_first ..
    chunk_last - 1 as one GEMM (per gate block for a unit slice) into the gate
    rows; returns the shift from a packed row to its row of the gates buffer.

    The chunk's inputs go to slot ``slot`` of packed_x (a part's own, or in the
    pipelined forward one of the projection_slots slots the chunks take in turn);
    its gates to the workspace (training: shift 0) or to that slot of the gate
    chunk buffer (inference).
    """
    cdef const Layout *layout = &problem.layout
    cdef Py_ssize_t T = problem.steps, I = problem.inputs, H = problem.units, G = problem.gate_columns
    cdef Py_ssize_t part = share.part, u0 = share.u0, width = share.u1 - share.u0
    cdef Py_ssize_t t_lo, t_hi, first_row, rows, x_shift, gate_shift, t
    cdef floating *bias = <floating *>buffers.bias
    cdef floating *packed_x = <floating *>buffers.packed_x
    cdef floating *step_gates
    cdef float *kernel_packed = share.kernel_packed
    # The chunk's input times (processing steps run backwards in time when reversed).
    if problem.reverse:
        t_lo, t_hi = T - chunk_last, T - chunk_first
    else:
        t_lo, t_hi = chunk_first, chunk_last
    first_row = step_offset(layout, part, t_lo)
    rows = step_offset(layout, part, t_hi) - first_row
    x_shift = chunk_gate_shift(problem, part, slot, chunk_first, chunk_last)
    gate_shift = 0 if problem.training else x_shift
    # A team shares the copying (every team-th step each), then waits for all of it.
    for t in range(t_lo, t_hi):
        if (t - t_lo) % share.team == share.member:
            copy_step_inputs(problem, part, t, <floating *>buffers.x,
                             <floating *>buffers.input_dropout, packed_x, x_shift)
    team_wait(problem, share)
    step_gates = <floating *>buffers.gates + (first_row + gate_shift) * G
    gates_product(rows, I, packed_x + (first_row + x_shift) * I, I, <floating *>buffers.kernel,
                  problem.weights_transposed, kernel_packed, step_gates, H, u0, width, False, bias)
    return gate_shift


cdef void recurrent_step_product(const LstmProblem *problem, const LstmBuffers *buffers,
                                 TeamShare *share, Py_ssize_t t,
                                 floating *step_gates) noexcept nogil:
    """step_gates [rows, 4H] += h(t - 1) @ R for the share's rows and units of step t.

    h(t - 1) as it enters the recurrence (after recurrent dropout) is kept for
    the backward (training), or put in one of two alternating buffers when a
    team shares it (a member may still read the last step's while another
    writes this one's), or read from h_state in place.
    """
    cdef const Layout *layout = &problem.layout
    cdef Py_ssize_t B = problem.batch, H = problem.units, part = share.part
    cdef Py_ssize_t u0 = share.u0, width = share.u1 - share.u0
    cdef Py_ssize_t r_begin = layout.row_begin[part], n_rows = step_rows(layout, part, t)
    cdef Py_ssize_t i, r
    cdef floating *h_state = <floating *>buffers.h_state
    cdef floating *rec_drop = <floating *>buffers.recurrent_dropout
    cdef floating *h_in
    if problem.training:
        h_in = <floating *>buffers.h_in_all + step_offset(layout, part, t) * H
    elif rec_drop != NULL or share.team > 1:
        h_in = <floating *>buffers.h_in_step + (share.steps_run % 2) * B * H + r_begin * H
    else:
        h_in = h_state + r_begin * H
    if h_in != h_state + r_begin * H:
        for i in range(n_rows):
            r = r_begin + i
            scaled_copy(h_in + i * H + u0, h_state + r * H + u0,
                        rows_of(rec_drop, layout.order[r], H, u0), width)
    share.steps_run += 1
    if not (problem.recurrent_halves and share.recurrent_packed != NULL):
        team_wait(problem, share)
        gates_product(n_rows, H, h_in, H, <floating *>buffers.recurrent_kernel, problem.weights_transposed,
                      share.recurrent_packed, step_gates, H, u0, width, True, NULL)
    else:
        product_in_halves(problem, share, <float *>h_in, <float *>step_gates, H, False)


cdef inline bint takes_halves(bint pack_recurrent, Py_ssize_t B, Py_ssize_t H) noexcept nogil:
    """Whether a call's recurrent products run in halves (product_in_halves): batch 1, the
    recurrent kernel packed (float32 on the AVX-512 or AVX2 kernels) and H a multiple of
    32; the forward and the backward decide alike."""
    return pack_recurrent and B == 1 and H % PANEL_PAIR == 0 and lstmeng_isa != LSTMENG_ISA_SCALAR


cdef inline Py_ssize_t halves_split(Py_ssize_t H) noexcept nogil:
    """Where product_in_halves splits: the first unit of the second member of a
    two-member team (a multiple of 32 when H is)."""
    return unit_bound(1, 2, H)


cdef void product_in_halves(const LstmProblem *problem, TeamShare *share, float *a, float *c,
                            Py_ssize_t H, bint backward) noexcept nogil:
    """A batch-1 step's recurrent product for the share's units in halves (lstm_halves.h,
    the recurrent kernel packed by pack_recurrent_slice), with the step's barrier:
    forward, c = the step's gates [4H] += a = h(t - 1) [H] @ R; backward, c = dh(t - 1)
    [H] += a = dz(t) [4H] @ R^T.

    In a two-member team the member's own half of a is its own work: that half runs
    while the partner finishes its step and its half crosses over (the barrier's wait,
    65-170 ns a step at (1, 500, 64, 128), falls to 15-30). Other teams (one thread,
    three members) take a pair's two halves together after the barrier. Each step in
    the share's order (lstmeng_halves_order: starting on what the last step read
    last, still in L1); the same sums whoever runs them."""
    cdef Py_ssize_t k_split = halves_split(H), u0 = share.u0
    cdef int k_blocks = 4 if backward else 1
    if share.team == 2:
        lstmeng_barrier_arrive(problem.barrier_flags, share.member, share.barriers)
        lstmeng_row_halves_member_f32(H, k_split, u0, k_blocks, a, share.recurrent_packed, c, LSTMENG_HALVES_OWN,
                                      &share.halves_order)
        lstmeng_barrier_depart(problem.barrier_flags, share.member, share.team, share.barriers)
        share.barriers += 1
        lstmeng_row_halves_member_f32(H, k_split, u0, k_blocks, a, share.recurrent_packed, c, LSTMENG_HALVES_OTHER,
                                      &share.halves_order)
    else:
        team_wait(problem, share)
        lstmeng_row_halves_whole_f32(H, k_split, u0, k_blocks, a, share.recurrent_packed, c, &share.halves_order)
    lstmeng_halves_order_next(&share.halves_order)


cdef inline bint halves_paired(Py_ssize_t H, Py_ssize_t u0, Py_ssize_t u1, bint backward,
                               Py_ssize_t team) noexcept nogil:
    """Whether the products in halves of a share (units u0 .. u1 - 1, read by a team of
    `team`) read a paired layout (lstmeng_pack_halves_f32): a whole share whose order
    turns, pair by pair. A member of a two-member split, or a whole share in one fixed
    order, reads each half's pass as one stream."""
    return team != 2 and lstmeng_halves_order(H, halves_split(H), u0, u1 - u0, 1 if backward else 4,
                                              4 if backward else 1, False, halves_l1_bytes).own_turn > 0


cdef inline void start_halves_order(TeamShare *share, Py_ssize_t H, bint backward) noexcept nogil:
    """The share's products in halves at their first step (lstmeng_halves_order)."""
    share.halves_order = lstmeng_halves_order(H, halves_split(H), share.u0, share.u1 - share.u0,
                                              1 if backward else 4, 4 if backward else 1, share.team == 2,
                                              halves_l1_bytes)


cdef void cell_rows(const LstmProblem *problem, const LstmBuffers *buffers, TeamShare *share,
                    Py_ssize_t t, floating *step_gates) noexcept nogil:
    """Step t's row math for the share's rows and units: nonlinearities, cell update
    (real steps only, c(t - 1) kept for the backward), masking and output write."""
    cdef const Layout *layout = &problem.layout
    cdef Py_ssize_t T = problem.steps, H = problem.units, G = problem.gate_columns, part = share.part
    cdef Py_ssize_t u0 = share.u0, width = share.u1 - share.u0
    cdef Py_ssize_t r_begin = layout.row_begin[part], step_first = step_offset(layout, part, t)
    cdef Py_ssize_t i, r, row
    cdef const unsigned char *mask = problem.mask
    cdef int act = problem.act, ract = problem.ract
    cdef bint zero_output_for_mask = problem.zero_output_for_mask, real
    cdef unsigned char *seen = share.seen
    cdef floating *c_state = <floating *>buffers.c_state
    cdef floating *h_state = <floating *>buffers.h_state
    cdef floating *c_prev_all = <floating *>buffers.c_prev_all
    cdef floating *sequence_outputs = <floating *>buffers.sequence_outputs
    cdef floating *out_row
    cdef Py_ssize_t n_rows = step_rows(layout, part, t)
    for i in range(n_rows):
        r = r_begin + i
        row = layout.order[r]
        if sequence_outputs != NULL and i + ROW_PREFETCH_DISTANCE < n_rows:
            # The output row a few rows on: in the variable-length layout the caller rows
            # come in length order, which the hardware prefetcher cannot follow.
            lstmeng_prefetch_row(sequence_outputs + (layout.order[r + ROW_PREFETCH_DISTANCE] * T + t) * H + u0,
                                 width * sizeof(floating), 1)
        real = mask == NULL or mask[row * T + t]
        if real:
            forward_row(step_gates + i * G + u0, c_state + r * H + u0,
                        rows_of(c_prev_all, step_first + i, H, u0),
                        h_state + r * H + u0, width, H, act, ract)
            seen[r] = 1
        if sequence_outputs != NULL:
            out_row = sequence_outputs + (row * T + t) * H + u0
            if real or (seen[r] and not zero_output_for_mask):
                memcpy(out_row, h_state + r * H + u0, width * sizeof(floating))
            else:
                memset(out_row, 0, width * sizeof(floating))


cdef void publish_part_outputs(const LstmProblem *problem, const LstmBuffers *buffers,
                               TeamShare *share, floating zero) noexcept nogil:
    """The share's final states, in the caller's row order, and its outputs of the
    steps no step processed (sequence) or its last output."""
    cdef const Layout *layout = &problem.layout
    cdef Py_ssize_t T = problem.steps, H = problem.units, part = share.part
    cdef Py_ssize_t u0 = share.u0, width = share.u1 - share.u0
    cdef Py_ssize_t r_begin = layout.row_begin[part], r_end = layout.row_begin[part + 1]
    cdef Py_ssize_t i, r, row, t
    cdef const unsigned char *mask = problem.mask
    cdef bint zero_output_for_mask = problem.zero_output_for_mask, reverse = problem.reverse, real
    cdef unsigned char *seen = share.seen
    cdef floating *h_state = <floating *>buffers.h_state
    cdef floating *c_state = <floating *>buffers.c_state
    cdef floating *sequence_outputs = <floating *>buffers.sequence_outputs
    cdef floating *last_output = <floating *>buffers.last_output
    cdef floating *h_out = <floating *>buffers.h_out
    cdef floating *c_out = <floating *>buffers.c_out
    cdef floating *out_row
    for r in range(r_begin, r_end):
        row = layout.order[r]
        i = r - r_begin
        if sequence_outputs != NULL:
            # Rows outside active[p, t] (finished rows of the variable-length path) are
            # masked steps: they repeat h once a real step came (forward, these steps
            # come after the real ones; reversed, before), else they are zeros.
            for t in range(T):
                if i >= step_rows(layout, part, t):
                    out_row = sequence_outputs + (row * T + t) * H + u0
                    if seen[r] and not zero_output_for_mask and not reverse:
                        memcpy(out_row, h_state + r * H + u0, width * sizeof(floating))
                    else:
                        memset(out_row, 0, width * sizeof(floating))
        else:
            # The last processed step's output.
            t = 0 if reverse else T - 1
            real = i < step_rows(layout, part, t) and (mask == NULL or mask[row * T + t])
            if real or (seen[r] and not zero_output_for_mask):
                memcpy(last_output + row * H + u0, h_state + r * H + u0, width * sizeof(floating))
            else:
                memset(last_output + row * H + u0, 0, width * sizeof(floating))
        memcpy(h_out + row * H + u0, h_state + r * H + u0, width * sizeof(floating))
        memcpy(c_out + row * H + u0, c_state + r * H + u0, width * sizeof(floating))


cdef LstmProblem make_problem(const Py_ssize_t[::1] order, const Py_ssize_t[::1] row_begin,
                              const Py_ssize_t[:, ::1] active, const Py_ssize_t[:, ::1] offsets,
                              Py_ssize_t B, Py_ssize_t T, Py_ssize_t I, Py_ssize_t H,
                              const unsigned char[:, ::1] mask, int act, int ract,
                              bint reverse, bint zero_output_for_mask,
                              int64_t *barrier_flags) except *:
    """The LstmProblem of a forward or backward call (its forward-only fields zero)."""
    cdef LstmProblem problem
    memset(&problem, 0, sizeof(problem))
    problem.layout = make_layout(order, row_begin, active, offsets, T)
    problem.batch, problem.steps, problem.inputs, problem.units = B, T, I, H
    problem.gate_columns = 4 * H
    problem.parts = row_begin.shape[0] - 1
    problem.packed_rows = step_offset(&problem.layout, problem.parts - 1, T)
    problem.mask = NULL if mask is None else &mask[0, 0]
    problem.act, problem.ract = act, ract
    problem.reverse, problem.zero_output_for_mask = reverse, zero_output_for_mask
    problem.barrier_flags = barrier_flags
    return problem


cdef TeamShare whole_part(Py_ssize_t part, Py_ssize_t H) noexcept nogil:
    """A share running all units of a part alone (scratch pointers NULL)."""
    cdef TeamShare share
    memset(&share, 0, sizeof(share))
    share.part, share.u0, share.u1, share.team, share.member = part, 0, H, 1, 0
    return share


def forward(*, floating[:, :, ::1] x, floating[:, ::1] h0, floating[:, ::1] c0,
            floating[:, ::1] kernel, floating[:, ::1] recurrent_kernel, floating[::1] bias,
            const unsigned char[:, ::1] mask,
            floating[:, ::1] input_dropout_mask, floating[:, ::1] recurrent_dropout_mask,
            const Py_ssize_t[::1] order, const Py_ssize_t[::1] row_begin,
            const Py_ssize_t[:, ::1] active, const Py_ssize_t[:, ::1] offsets,
            int act, int ract, bint reverse, bint zero_output_for_mask,
            floating[:, :, ::1] sequence_outputs, floating[:, ::1] last_output,
            floating[:, ::1] h_out, floating[:, ::1] c_out,
            floating[:, ::1] packed_x, floating[:, ::1] gates,
            floating[:, ::1] c_prev_all, floating[:, ::1] h_in_all,
            floating[:, ::1] h_state, floating[:, ::1] c_state, floating[:, :, ::1] h_in_step,
            Py_ssize_t chunk_steps, Py_ssize_t part_chunk_rows,
            Py_ssize_t threads=1, bint split_units=False, object buffer_cache=None,
            bint weights_transposed=False, bint pipeline=False):
    """Whole-sequence forward of one layer and direction; writes into the given arrays.

    Every argument is keyword-only: many are arrays of one dtype and shape
    class, so a positional call that swapped two of them would pass every
    check and compute garbage. Call a specialization explicitly
    (``forward["float"]`` / ``forward["double"]``): Cython's automatic choice
    looks at the first array argument, which may be None.

    x: [B, T, I]; h0, c0: [B, H]; kernel: [I, 4H]; recurrent_kernel: [H, 4H]; or
    with weights_transposed their transposes, kernel [4H, I] and recurrent_kernel
    [4H, H] (PyTorch's weight_ih and weight_hh, read as they are: no copy);
    bias: [4H] or None; mask: [B, T] (uint8, 1 = real) or None when every
    packed row of a step is real; input_dropout_mask: [B, I] or None;
    recurrent_dropout_mask: [B, H] or None; order: [B]; row_begin: [P + 1];
    active: [P, T] and offsets: [P, T + 1], or both [P, 1] for a uniform
    layout (see the module comment).
    sequence_outputs: [B, T, H] or None; last_output: [B, H] or None
        (exactly one is given).
    h_out, c_out: [B, H] final states (caller's row order).
    packed_x: [P * part_chunk_rows, I] the input rows of a chunk of
        chunk_steps steps per part (part_chunk_rows >= chunk_steps * the
        largest part).
    Training (h_in_all given): gates [N, 4H], c_prev_all, h_in_all [N, H]
        are the workspace. Inference (h_in_all and c_prev_all None): gates
        [P * part_chunk_rows, 4H] is reused per chunk; nothing per step is kept.
    h_state, c_state: [B, H] and h_in_step: [2, B, H] scratch in packed row
    order.
    threads: OpenMP threads to run (the parts share them; with split_units,
    a single part's units are split among them).

    Returns (barriers, slow_wait_seconds): the per-step barriers each member of
    a unit split made and the longest time a member waited at them after it
    began to yield its core (0 and 0.0 without a split); see lstm_sync.h.
    """
    cdef Py_ssize_t B = x.shape[0], T = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t H = recurrent_kernel.shape[1 if weights_transposed else 0], G = 4 * H
    cdef Py_ssize_t part, member, team_threads = max(1, threads)
    # A member's flags start on their own cache line (member_flag_stride): seen[r] is
    # written at every step, and two members' flags on one line made it cross between the
    # cores at every step of a batch-1 unit split.
    cdef Py_ssize_t flag_stride = member_flag_stride(B)
    cdef unsigned char[::1] seen = zeroed_flags(team_threads * flag_stride)
    cdef int64_t[::1] barrier_flags = np.zeros(team_threads * LSTMENG_FLAG_STRIDE, np.int64)
    cdef LstmProblem problem = make_problem(order, row_begin, active, offsets, B, T, I, H, mask,
                                            act, ract, reverse, zero_output_for_mask,
                                            &barrier_flags[0])
    cdef LstmBuffers buffers
    cdef TeamShare share
    # The recurrent kernel [H, 4H] packed for every step's product (float32, AVX2 or AVX-512):
    # once here for whole parts, by each member for its own slice when units are split.
    cdef bint pack_recurrent = floating is float and packed_gemm and packing_pays(
        T, B // (row_begin.shape[0] - 1), H * G * 4)
    packed_weights_array = take_float32(buffer_cache, (H * G if pack_recurrent else 1,))
    cdef float[::1] packed_weights = packed_weights_array
    cdef float *packed_base = NULL
    # The input kernel [I, 4H] packed the same way for the input projection, where the
    # ISA's kernel beats BLAS at it (projects_packed: AVX-512, AVX2 in short chunks).
    cdef bint project_packed = floating is float and projects_packed(part_chunk_rows) and I > 0 \
        and packs_input_kernel(B, T, I, G)
    packed_input_array = take_float32(buffer_cache, (I * G if project_packed else 1,))
    cdef float[::1] packed_input_weights = packed_input_array
    cdef float *packed_input_base = NULL

    memset(&buffers, 0, sizeof(buffers))
    buffers.x = &x[0, 0, 0]
    buffers.h0 = &h0[0, 0]
    buffers.c0 = &c0[0, 0]
    buffers.kernel = pointer2(kernel)
    buffers.recurrent_kernel = &recurrent_kernel[0, 0]
    buffers.bias = pointer1(bias)
    buffers.input_dropout = pointer2(input_dropout_mask)
    buffers.recurrent_dropout = pointer2(recurrent_dropout_mask)
    buffers.sequence_outputs = NULL if sequence_outputs is None else &sequence_outputs[0, 0, 0]
    buffers.last_output = pointer2(last_output)
    buffers.h_out = &h_out[0, 0]
    buffers.c_out = &c_out[0, 0]
    buffers.packed_x = pointer2(packed_x)
    buffers.gates = pointer2(gates)
    buffers.c_prev_all = pointer2(c_prev_all)
    buffers.h_in_all = pointer2(h_in_all)
    buffers.h_state = &h_state[0, 0]
    buffers.c_state = &c_state[0, 0]
    buffers.h_in_step = &h_in_step[0, 0, 0]
    problem.training = buffers.h_in_all != NULL
    problem.weights_transposed = weights_transposed
    problem.chunk_steps = chunk_steps
    problem.part_chunk_rows = part_chunk_rows

    if floating is float:
        if pack_recurrent:
            packed_base = &packed_weights[0]
        if project_packed:
            packed_input_base = &packed_input_weights[0]
        # Batch 1 on the AVX-512 or AVX2 kernels: each step's recurrent product in halves of h
        # (product_in_halves), whether the units are split or not.
        problem.recurrent_halves = takes_halves(pack_recurrent, B, H)
        if not split_units:
            # Whole matrices, shared by the parts (or a pipelined call's threads): packed by
            # all of the call's threads.
            packed_base = pack_recurrent_slice(&problem, packed_base, &recurrent_kernel[0, 0], 0, H, False, 1,
                                               team_threads)
            packed_input_base = pack_slice(packed_input_base, <float *>buffers.kernel, I, H, 0, H,
                                           False, weights_transposed, team_threads)
    global last_forward_row_halves
    last_forward_row_halves = problem.recurrent_halves
    # The pipelined forward: one part's time loop on thread 0, the input projection of
    # the chunks ahead on thread 1 (projection_ahead), in the slots of part_chunk_rows
    # rows that packed_x (and the inference gates) have room for.
    cdef Py_ssize_t chunks = (T + chunk_steps - 1) // chunk_steps
    cdef Py_ssize_t slots = packed_x.shape[0] // max(part_chunk_rows, 1)
    if not problem.training:
        slots = min(slots, gates.shape[0] // max(part_chunk_rows, 1))
    cdef bint pipelined = (pipeline and problem.parts == 1 and not split_units and team_threads > 1
                           and LSTMENG_HAVE_OPENMP and chunks > 1 and slots >= 2)
    # Allocated only for a pipelined call (a one-step cell call pays every array it makes).
    cdef int64_t[::1] claims, projections_done
    global last_forward_pipelined, last_forward_parts_met
    last_forward_pipelined = pipelined
    last_forward_parts_met = 0
    if pipelined:
        claims = np.zeros(3 * LSTMENG_FLAG_STRIDE, np.int64)
        projections_done = np.zeros(chunks + 1, np.int64)
        # Chunk 0 is the loop's own: it would otherwise wait for the other thread to wake up.
        claims[0] = 1
        problem.projection_claims = &claims[0]
        problem.projection_done = &projections_done[0]
        problem.projection_slots = slots
    else:
        team_threads = 1 if not split_units and problem.parts == 1 else team_threads
    check_blas_sizes(problem.packed_rows, G, I, H, part_chunk_rows * max(problem.parts, slots))
    with nogil, parallel(num_threads=team_threads):
        member = lstmeng_thread_index()
        share = whole_part(0, H)
        if pipelined:
            share.seen = &seen[0]
            share.recurrent_packed = packed_base
            share.kernel_packed = packed_input_base
            if member == 0:
                forward_part(&problem, &buffers, &share, <floating>0)
            elif member == 1:
                projection_ahead(&problem, &buffers, &share, <floating>0)
        elif split_units:
            share.team = lstmeng_team_size()
            share.member = member
            share.u0 = unit_bound(member, share.team, H)
            share.u1 = unit_bound(member + 1, share.team, H)
            share.seen = &seen[0] + member * flag_stride
            if floating is float:
                share.recurrent_packed = pack_recurrent_slice(&problem, packed_base, &recurrent_kernel[0, 0],
                                                              share.u0, share.u1, False, share.team)
                share.kernel_packed = pack_slice(packed_input_base, <float *>buffers.kernel, I, H,
                                                 share.u0, share.u1, False, weights_transposed)
            forward_part(&problem, &buffers, &share, <floating>0)
        else:
            share.seen = &seen[0]
            share.recurrent_packed = packed_base
            share.kernel_packed = packed_input_base
            part = member
            while part < problem.parts:
                share.part = part
                forward_part(&problem, &buffers, &share, <floating>0)
                part = part + lstmeng_team_size()
            # The parts' own end (the region's join would wait anyway): a member that waits
            # here long, after it began to yield its core, reports it (team_barrier_stats) for
            # the busy-machine governor, as a unit split's per-step barriers do. Only members
            # that had a part meet (one without would report the whole call as its wait).
            if member < problem.parts:
                lstmeng_barrier_wait(&barrier_flags[0], member, min(lstmeng_team_size(), problem.parts), 0)
    if buffer_cache is not None:
        buffer_cache.give(packed_weights_array, packed_input_array)
    if pipelined:
        return chunks, barrier_flags[LSTMENG_SLOW_WAIT_NS] * 1e-9
    last_forward_parts_met = 0 if split_units else members_met(&barrier_flags[0], team_threads)
    return team_barrier_stats(&barrier_flags[0], team_threads)


def step_forward(floating[:, ::1] x, floating[:, ::1] h0, floating[:, ::1] c0, floating[:, ::1] kernel,
                 floating[:, ::1] recurrent_kernel, floating[::1] bias, floating[:, ::1] gates,
                 floating[:, ::1] h_out, floating[:, ::1] c_out, int act, int ract,
                 bint weights_transposed, floating[:, ::1] c_prev=None, floating[:, ::1] h_in=None):
    """One step of a batch of one part (no mask, no dropout): what `forward` computes for
    T = 1, by the same products in the same order (BLAS: packing does not pay for one
    step), without its setup (layout, team, chunk and state buffers), which cost more than
    the arithmetic of a batch-1 cell step.

    x: [B, I] (I > 0); h0, c0: [B, H]; kernel [I, 4H] and recurrent_kernel [H, 4H]
    (their transposes when weights_transposed, as in `forward`); bias [4H] or None;
    gates: [B, 4H], the activated gates afterwards; h_out, c_out: [B, H], the new states.
    Training: c_prev and h_in [B, H] given, they receive c(t - 1) and h(t - 1), and with
    gates they are the workspace `forward` writes for T = 1 in one part (its packed row r
    is batch row r), which `backward` then takes.
    """
    cdef Py_ssize_t B = x.shape[0], I = x.shape[1], H = h0.shape[1], r
    cdef floating *c_prev_rows = NULL
    if I == 0 or B == 0:
        raise ValueError(f"step_forward needs rows and inputs, got x of shape {list(x.shape)[:2]}")
    if (c_prev is None) != (h_in is None):
        raise ValueError("step_forward takes c_prev and h_in together (training) or neither")
    check_blas_sizes(B, 4 * H, I, H)
    if c_prev is not None:
        c_prev_rows = &c_prev[0, 0]
    with nogil:
        gates_product(B, I, &x[0, 0], I, &kernel[0, 0], weights_transposed, NULL, &gates[0, 0], H, 0, H,
                      False, pointer1(bias))
        gates_product(B, H, &h0[0, 0], H, &recurrent_kernel[0, 0], weights_transposed, NULL, &gates[0, 0],
                      H, 0, H, True, NULL)
        if c_prev_rows != NULL:
            memcpy(&h_in[0, 0], &h0[0, 0], B * H * sizeof(floating))
        memcpy(&c_out[0, 0], &c0[0, 0], B * H * sizeof(floating))
        for r in range(B):
            forward_row(&gates[r, 0], &c_out[r, 0], NULL if c_prev_rows == NULL else c_prev_rows + r * H,
                        &h_out[r, 0], H, H, act, ract)


cdef tuple team_barrier_stats(const int64_t *flags, Py_ssize_t team):
    """(barriers per member, seconds) of a unit-split call, or of whole parts on more than
    one thread (one barrier, at the parts' end; (0, 0.0) on one thread): the longest time
    a member spent waiting at barriers after it began to yield its core (lstm_sync.h)."""
    cdef int64_t barriers, slow_wait_ns
    lstmeng_team_slow_waits(flags, team, &barriers, &slow_wait_ns)
    return barriers, slow_wait_ns * 1e-9


# The backward time loop.

cdef void backward_part(const LstmProblem *problem, const LstmBuffers *buffers,
                        const LstmGradients *gradients, TeamShare *share,
                        floating zero) noexcept nogil:
    """The backward time loop of one share (a whole part, or one member's slice of
    its units: see forward_part): per step the gate gradients dz(t) of the share's
    rows and units, then dh(t - 1) = dz(t) @ R^T; the initial states' gradients
    at the end. Adds the share's column sums of dz to its dbias_partial."""
    cdef const Layout *layout = &problem.layout
    cdef Py_ssize_t T = problem.steps, H = problem.units, G = problem.gate_columns, part = share.part
    cdef Py_ssize_t u0 = share.u0, width = share.u1 - share.u0
    cdef Py_ssize_t r_begin = layout.row_begin[part], step, t, n_rows
    cdef int64_t final_rows = 0
    cdef floating *gates = <floating *>buffers.gates
    cdef floating *step_gates
    cdef floating *dh
    share.barriers = 0
    start_halves_order(share, H, True)
    find_real_steps(problem, share)
    load_output_gradients(problem, gradients, share, zero)
    for step in range(T - 1, -1, -1):
        t = T - 1 - step if problem.reverse else step
        n_rows = step_rows(layout, part, t)
        if n_rows == 0:
            continue
        step_gates = gates + step_offset(layout, part, t) * G
        gate_gradient_rows(problem, buffers, gradients, share, step, step_gates)
        if floating is float:
            if share.dx_step != NULL:
                step_input_gradients(problem, buffers, gradients, share, t, step_gates)
        if share.pipeline_progress != NULL:
            # The pipelined backward's other threads may read this step's dz from now on.
            final_rows += n_rows
            lstmeng_progress_publish(share.pipeline_progress, final_rows)
        # dh(t-1) = dz(t) @ R^T for the step's rows: a team needs every member's dz(t).
        # Not after the last step processed when the caller wants no state gradients: that
        # product only reaches dh0 (every member skips it, so the team's barriers still pair).
        if step == 0 and gradients.dh0 == NULL:
            continue
        dh = <floating *>gradients.dh_recurrent + r_begin * H
        if not (problem.recurrent_halves and share.recurrent_packed != NULL):
            team_wait(problem, share)
            hidden_gradient_product(n_rows, H, step_gates, <floating *>buffers.recurrent_kernel,
                                    problem.weights_transposed, share.recurrent_packed, dh, u0, width)
            continue
        # Batch 1 in halves, as the forward's product: a member's own gate columns of dz(t)
        # first, while the partner's cross over.
        memset(dh + u0, 0, width * sizeof(floating))
        product_in_halves(problem, share, <float *>step_gates, <float *>dh, H, True)
    publish_state_gradients(problem, buffers, gradients, share, zero)


cdef void find_real_steps(const LstmProblem *problem, TeamShare *share) noexcept nogil:
    """Processing positions of each of the share's rows' first and last real step
    (T and -1 if none) into first_real and last_real."""
    cdef const Layout *layout = &problem.layout
    cdef const unsigned char *mask = problem.mask
    cdef Py_ssize_t T = problem.steps, part = share.part
    cdef Py_ssize_t r_begin = layout.row_begin[part], r_end = layout.row_begin[part + 1]
    cdef Py_ssize_t *first_real = share.first_real
    cdef Py_ssize_t *last_real = share.last_real
    cdef Py_ssize_t position, t, i, r
    for r in range(r_begin, r_end):
        first_real[r] = T
        last_real[r] = -1
    for position in range(T):
        t = T - 1 - position if problem.reverse else position
        for i in range(step_rows(layout, part, t)):
            r = r_begin + i
            if mask == NULL or mask[layout.order[r] * T + t]:
                if first_real[r] == T:
                    first_real[r] = position
                last_real[r] = position


cdef void load_output_gradients(const LstmProblem *problem, const LstmGradients *gradients,
                                TeamShare *share, floating zero) noexcept nogil:
    """The gradient reaching the share's rows and units after the last processed
    step: dh, dc, plus the gradients of outputs that no step computes (the last
    output, or the outputs of steps outside active[p, t], where they repeat h)."""
    cdef const Layout *layout = &problem.layout
    cdef Py_ssize_t T = problem.steps, H = problem.units, part = share.part
    cdef Py_ssize_t u0 = share.u0, u1 = share.u1, width = share.u1 - share.u0
    cdef Py_ssize_t r_begin = layout.row_begin[part], r_end = layout.row_begin[part + 1]
    cdef Py_ssize_t position, t, i, r, row, j
    cdef bint zero_output_for_mask = problem.zero_output_for_mask, reverse = problem.reverse
    cdef Py_ssize_t *first_real = share.first_real
    cdef Py_ssize_t *last_real = share.last_real
    cdef floating *dh = <floating *>gradients.dh
    cdef floating *dc = <floating *>gradients.dc
    cdef floating *doutputs_sequence = <floating *>gradients.doutputs_sequence
    cdef floating *doutputs_last = <floating *>gradients.doutputs_last
    cdef floating *dh_carry = <floating *>gradients.dh_carry
    cdef floating *dc_state = <floating *>gradients.dc_state
    for r in range(r_begin, r_end):
        row = layout.order[r]
        i = r - r_begin
        share.previous_real[r] = 0
        memcpy(dh_carry + r * H + u0, dh + row * H + u0, width * sizeof(floating))
        memcpy(dc_state + r * H + u0, dc + row * H + u0, width * sizeof(floating))
        if doutputs_last != NULL:
            # The last output is h on the rows where it is not zero (see the forward).
            if last_real[r] == T - 1 or (last_real[r] >= 0 and not zero_output_for_mask):
                for j in range(u0, u1):
                    dh_carry[r * H + j] += doutputs_last[row * H + j]
        elif not zero_output_for_mask and last_real[r] >= 0:
            # Steps outside active[p, t] after the row's first real step repeat h.
            for t in range(T):
                position = T - 1 - t if reverse else t
                if i >= step_rows(layout, part, t) and position > first_real[r]:
                    for j in range(u0, u1):
                        dh_carry[r * H + j] += doutputs_sequence[(row * T + t) * H + j]


cdef void gate_gradient_rows(const LstmProblem *problem, const LstmBuffers *buffers,
                             const LstmGradients *gradients, TeamShare *share, Py_ssize_t step,
                             floating *step_gates) noexcept nogil:
    """Processing step ``step``'s row math for the share's rows and units: the gate
    gradients dz(t) over the activated gates in step_gates (real steps; zeros for
    masked ones, whose dh passes on through dh_carry), dc(t - 1), and the bias
    gradient."""
    cdef const Layout *layout = &problem.layout
    cdef const unsigned char *mask = problem.mask
    cdef Py_ssize_t T = problem.steps, H = problem.units, G = problem.gate_columns, part = share.part
    cdef Py_ssize_t u0 = share.u0, width = share.u1 - share.u0
    cdef Py_ssize_t t = T - 1 - step if problem.reverse else step
    cdef Py_ssize_t r_begin = layout.row_begin[part], step_first = step_offset(layout, part, t)
    cdef Py_ssize_t i, r, row, j, gate
    cdef int act = problem.act, ract = problem.ract
    cdef bint zero_output_for_mask = problem.zero_output_for_mask, real
    cdef unsigned char *previous_real = share.previous_real
    cdef Py_ssize_t *first_real = share.first_real
    cdef floating *dh_total = <floating *>share.dh_total
    cdef floating *scratch = <floating *>share.scratch
    cdef floating *dbias_partial = <floating *>share.dbias_partial
    cdef floating *rec_drop = <floating *>buffers.recurrent_dropout
    cdef floating *c_prev_all = <floating *>buffers.c_prev_all
    cdef floating *doutputs_sequence = <floating *>gradients.doutputs_sequence
    cdef floating *dh_carry = <floating *>gradients.dh_carry
    cdef floating *dh_recurrent = <floating *>gradients.dh_recurrent
    cdef floating *dc_state = <floating *>gradients.dc_state
    cdef floating *dy
    cdef Py_ssize_t n_rows = step_rows(layout, part, t)
    for i in range(n_rows):
        r = r_begin + i
        row = layout.order[r]
        if doutputs_sequence != NULL and i + ROW_PREFETCH_DISTANCE < n_rows:
            lstmeng_prefetch_row(doutputs_sequence + (layout.order[r + ROW_PREFETCH_DISTANCE] * T + t) * H + u0,
                                 width * sizeof(floating), 0)
        real = mask == NULL or mask[row * T + t]
        # Gradient reaching h(t): from the recurrence (or the carry) plus this
        # step's output when that output is h (a real step, or a masked one
        # repeating h after an earlier real step).
        if previous_real[r]:
            scaled_copy(dh_total, dh_recurrent + r * H + u0, rows_of(rec_drop, row, H, u0), width)
        else:
            memcpy(dh_total, dh_carry + r * H + u0, width * sizeof(floating))
        if doutputs_sequence != NULL and (
                real or (step > first_real[r] and not zero_output_for_mask)):
            dy = doutputs_sequence + (row * T + t) * H + u0
            for j in range(width):
                dh_total[j] += dy[j]
        if real:
            backward_row(step_gates + i * G + u0, c_prev_all + (step_first + i) * H + u0,
                         dh_total, dc_state + r * H + u0, scratch, width, H, act, ract)
            # The bias gradient, while the row's dz is still in L1 (a pass over all
            # of dz at the end would read it from memory again).
            for gate in range(4):
                add_row(dbias_partial + gate * H + u0, step_gates + i * G + gate * H + u0, width)
        else:
            memcpy(dh_carry + r * H + u0, dh_total, width * sizeof(floating))
            for gate in range(4):
                memset(step_gates + i * G + gate * H + u0, 0, width * sizeof(floating))
        previous_real[r] = real


cdef void publish_state_gradients(const LstmProblem *problem, const LstmBuffers *buffers,
                                  const LstmGradients *gradients, TeamShare *share,
                                  floating zero) noexcept nogil:
    """dh0, dc0 of the share's rows and units, in the caller's row order (nothing when the
    caller wants no state gradients: dh0 NULL)."""
    cdef const Layout *layout = &problem.layout
    cdef Py_ssize_t H = problem.units, part = share.part
    cdef Py_ssize_t u0 = share.u0, width = share.u1 - share.u0, r, row
    cdef floating *rec_drop = <floating *>buffers.recurrent_dropout
    cdef floating *dh0 = <floating *>gradients.dh0
    cdef floating *dc0 = <floating *>gradients.dc0
    cdef floating *dh_carry = <floating *>gradients.dh_carry
    cdef floating *dh_recurrent = <floating *>gradients.dh_recurrent
    cdef floating *dc_state = <floating *>gradients.dc_state
    if dh0 == NULL:
        return
    for r in range(layout.row_begin[part], layout.row_begin[part + 1]):
        row = layout.order[r]
        if share.previous_real[r]:
            scaled_copy(dh0 + row * H + u0, dh_recurrent + r * H + u0, rows_of(rec_drop, row, H, u0),
                        width)
        else:
            memcpy(dh0 + row * H + u0, dh_carry + r * H + u0, width * sizeof(floating))
        memcpy(dc0 + row * H + u0, dc_state + r * H + u0, width * sizeof(floating))


def backward(*, floating[:, :, ::1] doutputs_sequence, floating[:, ::1] doutputs_last,
             floating[:, ::1] dh, floating[:, ::1] dc, floating[:, :, ::1] x,
             floating[:, ::1] kernel, floating[:, ::1] recurrent_kernel,
             const unsigned char[:, ::1] mask,
             floating[:, ::1] input_dropout_mask, floating[:, ::1] recurrent_dropout_mask,
             const Py_ssize_t[::1] order, const Py_ssize_t[::1] row_begin,
             const Py_ssize_t[:, ::1] active, const Py_ssize_t[:, ::1] offsets,
             int act, int ract, bint reverse, bint zero_output_for_mask,
             floating[:, ::1] gates, floating[:, ::1] c_prev_all, floating[:, ::1] h_in_all,
             floating[:, :, ::1] dx, floating[:, ::1] dh0, floating[:, ::1] dc0,
             floating[:, ::1] dkernel, floating[:, ::1] drecurrent_kernel, floating[::1] dbias,
             floating[:, ::1] packed_x, Py_ssize_t threads=1, bint split_units=False,
             Py_ssize_t run_threads=0, object buffer_cache=None, bint weights_transposed=False,
             bint pipeline=False):
    """Backward of `forward` (training); the workspace arrays are overwritten.
    Keyword-only arguments, as `forward`'s.

    doutputs_sequence: [B, T, H] or None; doutputs_last: [B, H] or None
    (exactly one given); dh, dc: [B, H] gradients of the final states;
    x: [B, T, I] the forward's inputs (read again: the workspace keeps no copy);
    workspace arrays as written by `forward`: gates [N, 4H] (become the
    gate-input gradients dz), c_prev_all, h_in_all [N, H]. Outputs: dx
    [B, T, I] (must be zero on entry: steps outside the packed rows get no
    gradient), or None to skip its product (the caller needs no input gradient:
    the first layer on embeddings, a frozen input), dh0, dc0 [B, H] or both None (the caller
    needs no gradient of the initial states: the product of the last step processed with R^T,
    which reaches only dh0, is skipped), dkernel [I, 4H], drecurrent_kernel [H, 4H],
    dbias [4H], or these three None: no weight gradients, their products skipped, the caller
    forms them from dz left in gates (a one-step call of a cell loop, as `step_backward`
    without them: lstmeng.torch adds up a loop's dz^T x in one product).
    packed_x: [N, I] scratch (the inputs in packed rows for dK = X^T dz,
    then dz @ K^T on the way to dx). threads: OpenMP threads (the parts share them, or with
    split_units they split one part's units as in `forward`; the weight
    gradients are split by gate columns among them). run_threads: how many
    threads run those shares (0: threads); fewer than threads run the same
    shares one after another, so the results do not depend on it (without a
    unit split; the busy-machine fallback uses it). weights_transposed: kernel and
    recurrent_kernel are their transposes, as in `forward`. pipeline: when the
    batch is one part on one thread's time loop (no unit split) and more threads
    are given, the others compute the weight gradients and dx of the rows whose
    dz is final while the loop runs (float32 on the AVX-512 path; elsewhere, or
    when the per-chunk partial sums would take more than PIPELINE_MAX_BYTES, it
    is ignored): bitwise the same results (see pipeline_work). Returns
    (barriers, slow_wait_seconds) as `forward` does.
    """
    cdef Py_ssize_t B = dh.shape[0], T = x.shape[1]
    cdef Py_ssize_t I = x.shape[2], H = recurrent_kernel.shape[1 if weights_transposed else 0], G = 4 * H
    cdef Py_ssize_t part, t, member, N, P
    cdef bint weight_gradients = dkernel is not None
    if weight_gradients != (drecurrent_kernel is not None) or weight_gradients != (dbias is not None):
        raise ValueError("backward: dkernel, drecurrent_kernel and dbias are given together or not at all")
    cdef bint state_gradients = dh0 is not None
    if state_gradients != (dc0 is not None):
        raise ValueError("backward: dh0 and dc0 are given together or not at all")
    cdef Py_ssize_t team_threads = max(1, threads)
    cdef Py_ssize_t running_threads = min(team_threads, run_threads) if run_threads > 0 else team_threads
    # Gate columns per thread for the weight gradients, a multiple of 16 (whole cache lines).
    cdef Py_ssize_t column_threads = team_threads if LSTMENG_HAVE_OPENMP else 1
    # The weight gradients through the packed kernel (AVX-512, float32): blocks of whole
    # panel pairs, dz packed WEIGHT_GRADIENT_CHUNK rows at a time into each thread's panels.
    cdef bint weights_packed = floating is float and packed_projection and G % PANEL_PAIR == 0
    cdef Py_ssize_t column_round = PANEL_PAIR if weights_packed else 16
    cdef Py_ssize_t column_block = ((G + column_threads - 1) // column_threads + column_round - 1) \
        // column_round * column_round
    gradient_panels_array = take_float32(
        buffer_cache, (column_threads, WEIGHT_GRADIENT_CHUNK * column_block if weights_packed else 1))
    cdef float[:, ::1] gradient_panels = gradient_panels_array
    # Each member's per-row flags and positions on their own cache lines (member_flag_stride).
    cdef Py_ssize_t per_thread_rows = member_flag_stride(B) if split_units else 0
    dtype = np.asarray(dh).dtype
    # Per-row state of the backward time loop, in packed row order: dh_carry is the
    # gradient reaching h for rows whose later step was masked or not processed,
    # dh_recurrent = dz @ R^T for rows whose later step was real.
    # (On cache lines: in a unit split the members write the halves of each row, and the
    # threads their own rows of dh_total and scratch; see aligned_empty.)
    cdef floating[:, ::1] dh_carry = aligned_empty((B, H), dtype)
    cdef floating[:, ::1] dh_recurrent = aligned_empty((B, H), dtype)
    cdef floating[:, ::1] dc_state = aligned_empty((B, H), dtype)
    cdef floating[:, ::1] dh_total = aligned_empty((team_threads, H), dtype)
    cdef floating[:, ::1] scratch = aligned_empty((team_threads, 6 * H), dtype)
    # Column sums of dz per member, or per part where whole parts run (so that parts run one
    # after another on fewer threads, the busy-machine fallback, sum them the same way).
    cdef Py_ssize_t partial_rows = max(team_threads, row_begin.shape[0] - 1)
    dbias_partial_array = aligned_empty((partial_rows, G), dtype)
    dbias_partial_array.fill(0)
    cdef floating[:, ::1] dbias_partial = dbias_partial_array
    cdef Py_ssize_t flag_stride = member_flag_stride(B)
    cdef unsigned char[::1] previous_real = zeroed_flags(team_threads * flag_stride)
    cdef Py_ssize_t[::1] first_real = aligned_empty((team_threads * flag_stride,), np.intp)
    cdef Py_ssize_t[::1] last_real = aligned_empty((team_threads * flag_stride,), np.intp)
    cdef int64_t[::1] barrier_flags = np.zeros(team_threads * LSTMENG_FLAG_STRIDE, np.int64)
    cdef LstmProblem problem = make_problem(order, row_begin, active, offsets, B, T, I, H, mask,
                                            act, ract, reverse, zero_output_for_mask,
                                            &barrier_flags[0])
    cdef LstmBuffers buffers
    cdef LstmGradients gradients
    cdef TeamShare share
    # R^T [4H, H] packed for every step's dh product (float32, AVX2 or AVX-512): once here for
    # whole parts, by each member for its own slice when units are split. (One step without
    # state gradients has no product with R^T.)
    cdef bint pack_recurrent = floating is float and packed_gemm and (T > 1 or state_gradients) \
        and packing_pays(T, B // (row_begin.shape[0] - 1), H * G * 4)
    packed_weights_array = take_float32(buffer_cache, (H * G if pack_recurrent else 1,))
    cdef float[::1] packed_weights = packed_weights_array
    cdef float *packed_base = NULL
    cdef bint dx_wanted = dx is not None
    N, P = problem.packed_rows, problem.parts
    # The pipelined backward (one part on one thread's time loop, the other threads on the
    # finished rows' weight gradients and dx; see pipeline_work).
    cdef Py_ssize_t chunks = (N + WEIGHT_GRADIENT_CHUNK - 1) // WEIGHT_GRADIENT_CHUNK
    cdef bint pipelined = (pipeline and weight_gradients and weights_packed and P == 1 and not split_units
                           and team_threads > 1
                           and LSTMENG_HAVE_OPENMP and chunks > 1
                           and chunks * (I + H) * G * 4 <= PIPELINE_MAX_BYTES)
    # K^T [4H, I] packed for dx = dz @ K^T (float32, I a multiple of 32, calls long enough
    # to pay for the packing): on the AVX-512 kernels always, on the AVX2 kernels where the
    # time loop computes dx (dx_in_loop).
    cdef bint dx_packable = dx_wanted and floating is float and packed_gemm and I > 0 \
        and I % PANEL_PAIR == 0 and packs_input_kernel(B, T, I, G)
    # Whole parts (no unit split, not pipelined) compute each step's dx in the time loop,
    # right after its dz (in L1/L2 then), into their rows of dx: no pass over all of dz and
    # no scatter afterwards. Not with a step of one row: the packed kernel runs a row alone
    # with other FMA chains than a block, and dx would then differ in the last bits from the
    # pipelined backward's (which computes the same rows in blocks).
    cdef bint dx_in_loop = dx_packable and not split_units and not pipelined \
        and smallest_step(&problem) >= 2
    cdef bint dx_packed = dx_packable and (packed_projection or dx_in_loop)
    packed_kernel_t_array = take_float32(buffer_cache, (G * I if dx_packed else 1,))
    cdef float[::1] packed_kernel_t = packed_kernel_t_array
    # Each thread's dx rows of one step (dx_in_loop), on their own cache lines.
    cdef Py_ssize_t part_rows_max = max_part_rows(&problem) if dx_in_loop else 0
    cdef Py_ssize_t dx_step_stride = (part_rows_max * I + 15) // 16 * 16
    dx_step_array = take_float32(buffer_cache, (team_threads * dx_step_stride if dx_in_loop else 1,))
    cdef float[::1] dx_step = dx_step_array
    memset(&buffers, 0, sizeof(buffers))
    buffers.x = &x[0, 0, 0]
    buffers.kernel = pointer2(kernel)
    buffers.recurrent_kernel = &recurrent_kernel[0, 0]
    buffers.input_dropout = pointer2(input_dropout_mask)
    buffers.recurrent_dropout = pointer2(recurrent_dropout_mask)
    buffers.packed_x = pointer2(packed_x)
    buffers.gates = pointer2(gates)
    buffers.c_prev_all = pointer2(c_prev_all)
    buffers.h_in_all = pointer2(h_in_all)
    problem.training = True
    problem.weights_transposed = weights_transposed
    gradients.doutputs_sequence = (NULL if doutputs_sequence is None
                                   else &doutputs_sequence[0, 0, 0])
    gradients.doutputs_last = pointer2(doutputs_last)
    gradients.dh = &dh[0, 0]
    gradients.dc = &dc[0, 0]
    gradients.dx = &dx[0, 0, 0] if dx_wanted else NULL
    gradients.dh0 = &dh0[0, 0] if state_gradients else NULL
    gradients.dc0 = &dc0[0, 0] if state_gradients else NULL
    gradients.dkernel = pointer2(dkernel)
    gradients.drecurrent_kernel = pointer2(drecurrent_kernel)
    gradients.dbias = pointer1(dbias)
    gradients.dh_carry = &dh_carry[0, 0]
    gradients.dh_recurrent = &dh_recurrent[0, 0]
    gradients.dc_state = &dc_state[0, 0]
    gradients.dbias_partial = &dbias_partial[0, 0]
    gradients.kernel_t_packed = NULL
    gradients.gradient_panels = &gradient_panels[0, 0]
    zero_row_array = np.zeros(max(G if weights_packed else 1, I if dx_in_loop else 1), np.float32)
    cdef float[::1] zero_row = zero_row_array
    gradients.zero_row = &zero_row[0]
    gradients.column_block = column_block

    if floating is float:
        if pack_recurrent:
            packed_base = &packed_weights[0]
        # Batch 1 on the AVX-512 or AVX2 kernels: dh(t - 1) = dz(t) @ R^T in halves, as the forward.
        problem.recurrent_halves = takes_halves(pack_recurrent, B, H)
        if not split_units:
            packed_base = pack_recurrent_slice(&problem, packed_base, &recurrent_kernel[0, 0], 0, H, True, 1,
                                               running_threads)
        if dx_packed:
            gradients.kernel_t_packed = &packed_kernel_t[0]
            if weights_transposed:   # K^T itself
                pack_panels(<float *>buffers.kernel, G, I, I, False, gradients.kernel_t_packed, running_threads)
            else:
                pack_panels(<float *>buffers.kernel, G, I, G, True, gradients.kernel_t_packed, running_threads)
    if packed_x.shape[0] != N or packed_x.shape[1] != I:
        raise ValueError(f"packed_x must be [{N}, {I}], got {list(packed_x.shape)[:2]}")
    check_blas_sizes(N, G, I, H)

    # The pipelined backward's work items and counters.
    cdef Pipeline work
    cdef Py_ssize_t[:, ::1] items_array
    cdef int64_t[::1] thresholds_array
    cdef int64_t[::1] counters_array
    cdef int64_t[::1] inputs_ready
    partials_array = packed_dx_array = None
    cdef float[::1] partials, packed_dx
    global last_backward_pipelined, last_backward_row_halves, last_backward_parts_met, last_backward_dx_in_loop
    last_backward_pipelined = pipelined
    last_backward_dx_in_loop = dx_in_loop
    last_backward_parts_met = 0
    last_backward_row_halves = problem.recurrent_halves
    memset(&work, 0, sizeof(work))
    if pipelined:
        counters_array = np.zeros(3 * LSTMENG_FLAG_STRIDE, np.int64)
        items_array, thresholds_array = pipeline_items(N, chunks, column_threads,
                                                       team_threads if dx_wanted else 0, reverse)
        inputs_ready_array = np.zeros(chunks, np.int64)
        inputs_ready = inputs_ready_array
        partials_array = take_float32(buffer_cache, (chunks * (I + H) * G,))
        packed_dx_array = take_float32(buffer_cache, (N * I if dx_wanted else 1,))
        partials, packed_dx = partials_array, packed_dx_array
        work.items = items_array.shape[1]
        work.kind, work.first, work.end = &items_array[0, 0], &items_array[1, 0], &items_array[2, 0]
        work.column_block = &items_array[3, 0]
        work.inputs_ready = &inputs_ready[0]
        work.inputs_in_place = B == 1 and input_dropout_mask is None
        work.threshold = &thresholds_array[0]
        # Each counter on its own cache lines (the time loop writes one at every step).
        work.progress = &counters_array[0]
        work.next_item = &counters_array[LSTMENG_FLAG_STRIDE]
        work.finished = &counters_array[2 * LSTMENG_FLAG_STRIDE]
        work.partials, work.packed_dx = &partials[0], &packed_dx[0]
        work.column_threads = column_threads
        running_threads = team_threads
    with nogil:
        with parallel(num_threads=running_threads):
            member = lstmeng_thread_index()
            share = whole_part(0, H)
            share.dh_total = &dh_total[0, 0] + member * H
            share.scratch = &scratch[0, 0] + member * 6 * H
            share.dbias_partial = &dbias_partial[0, 0] + member * G
            share.previous_real = &previous_real[0] + member * per_thread_rows
            share.first_real = &first_real[0] + member * per_thread_rows
            share.last_real = &last_real[0] + member * per_thread_rows
            if pipelined:
                # Thread 0 runs the time loop, the others the rows it has finished; then
                # thread 0 joins them.
                if member == 0:
                    share.recurrent_packed = packed_base
                    share.pipeline_progress = work.progress
                    backward_part(&problem, &buffers, &gradients, &share, <floating>0)
                if floating is float:
                    pipeline_work(&problem, &buffers, &gradients, &work, member)
                if member == 0:
                    # The items other threads still hold; time lost to one kept off its core
                    # counts as the split's barrier waits do.
                    barrier_flags[LSTMENG_SLOW_WAIT_NS] += lstmeng_progress_wait(work.finished, work.items)
            elif split_units:
                share.team = lstmeng_team_size()
                share.member = member
                share.u0 = unit_bound(member, share.team, H)
                share.u1 = unit_bound(member + 1, share.team, H)
                if floating is float:
                    share.recurrent_packed = pack_recurrent_slice(&problem, packed_base, &recurrent_kernel[0, 0],
                                                                  share.u0, share.u1, True, share.team)
                backward_part(&problem, &buffers, &gradients, &share, <floating>0)
            else:
                share.recurrent_packed = packed_base
                if dx_in_loop:
                    share.dx_step = &dx_step[0] + member * dx_step_stride
                part = member
                while part < P:
                    share.part = part
                    share.dbias_partial = &dbias_partial[0, 0] + part * G
                    backward_part(&problem, &buffers, &gradients, &share, <floating>0)
                    part = part + lstmeng_team_size()
                # The parts' end, timed for the busy-machine governor (as in `forward`): the
                # members that had a part (the backward's team can outnumber the parts).
                if member < P:
                    lstmeng_barrier_wait(&barrier_flags[0], member, min(lstmeng_team_size(), P), 0)

        if pipelined:
            if floating is float:
                sum_chunk_partials(&work, chunks, I, H, <float *>gradients.dkernel,
                                   <float *>gradients.drecurrent_kernel)
            sum_partials(<floating *>gradients.dbias, <floating *>gradients.dbias_partial, partial_rows, G,
                         0, G)
    if pipelined:
        if buffer_cache is not None:
            buffer_cache.give(packed_weights_array, packed_kernel_t_array, gradient_panels_array,
                              partials_array, packed_dx_array)
        return work.items, barrier_flags[LSTMENG_SLOW_WAIT_NS] * 1e-9
    with nogil:
        if weight_gradients:
            # The inputs in packed rows, each thread a share of the steps.
            for t in prange(T, num_threads=running_threads, schedule="static"):
                for part in range(P):
                    copy_step_inputs(&problem, part, t, <floating *>buffers.x,
                                     <floating *>buffers.input_dropout,
                                     <floating *>buffers.packed_x, 0)

            # Weight gradients over all packed rows, each thread a block of gate columns.
            for part in prange(column_threads, num_threads=min(column_threads, running_threads),
                               schedule="static"):
                weight_gradient_columns(&problem, &buffers, &gradients, part, partial_rows,
                                        weights_packed, <floating>0)

        # dx = dz @ K^T written over the packed input rows (consumed above), then
        # scattered to [B, T, I] with the input dropout mask; each thread a share
        # of the packed rows.
        if dx_wanted and not dx_in_loop:
            for part in prange(team_threads, num_threads=running_threads, schedule="static"):
                dx_rows(part * N // team_threads, (part + 1) * N // team_threads, I, G,
                        <floating *>buffers.kernel, weights_transposed, gradients.kernel_t_packed,
                        <floating *>buffers.gates, <floating *>buffers.packed_x)
            for t in prange(T, num_threads=running_threads, schedule="static"):
                for part in range(P):
                    scatter_step_gradients(&problem, part, t, <floating *>buffers.packed_x
                                           + step_offset(&problem.layout, part, t) * I,
                                           <floating *>gradients.dx,
                                           <floating *>buffers.input_dropout)
    if buffer_cache is not None:
        buffer_cache.give(packed_weights_array, packed_kernel_t_array, gradient_panels_array, dx_step_array)
    last_backward_parts_met = 0 if split_units else members_met(&barrier_flags[0], team_threads)
    return team_barrier_stats(&barrier_flags[0], team_threads)


def step_backward(floating[:, ::1] doutputs, floating[:, ::1] dh, floating[:, ::1] dc,
                  floating[:, ::1] x, floating[:, ::1] kernel, floating[:, ::1] recurrent_kernel,
                  floating[:, ::1] gates, floating[:, ::1] c_prev, floating[:, ::1] h_in,
                  floating[:, ::1] dx, floating[:, ::1] dh0, floating[:, ::1] dc0 not None,
                  floating[:, ::1] dkernel, floating[:, ::1] drecurrent_kernel, floating[::1] dbias,
                  int act, int ract, bint weights_transposed):
    """Backward of a one-step training forward of one part on one thread, without mask or
    dropout (`step_forward`'s workspace, or `forward`'s for such a call): what `backward`
    computes for it, by the same functions in the same order (so bitwise the same
    results), without its setup (a dozen scratch arrays, the layout, three parallel
    regions), which cost more than the arithmetic of a batch-1 cell step.

    doutputs: [B, H] the gradient of the step's output; dh, dc: [B, H] of the final states;
    x: [B, I] (I > 0); kernel, recurrent_kernel as in `forward`; the workspace gates
    [B, 4H] (overwritten with dz), c_prev, h_in [B, H]; outputs dx [B, I] or None (no
    input gradient), dh0 [B, H] or None (no gradient of h0: its product with R^T skipped),
    dc0 [B, H] (also scratch: given either way), dkernel [I, 4H], drecurrent_kernel [H, 4H], dbias [4H]
    or all three None: no weight gradients, the caller forms them from dz in gates
    (the cell loops of lstmeng.torch and lstmeng.cell, one product over all their steps).
    """
    cdef Py_ssize_t B = x.shape[0], I = x.shape[1], H = dh.shape[1], G = 4 * H, r, j, gate
    cdef bint weight_gradients = dkernel is not None
    if weight_gradients and (drecurrent_kernel is None or dbias is None):
        raise ValueError("step_backward: dkernel, drecurrent_kernel and dbias are given together or not at all")
    cdef bint weights_packed = weight_gradients and step_weights_packed(floating is float, G)
    cdef bint state_gradient = dh0 is not None
    if I == 0 or B == 0:
        raise ValueError(f"step_backward needs rows and inputs, got x of shape {list(x.shape)[:2]}")
    # One scratch array (a batch-1 step's arrays cost more to make than to fill): dh_total [H],
    # the row math's scratch [6H], dbias_partial [G]; float32 with the packed weight
    # gradients also their panels of dz [B * G] (B rows: one chunk) and zero start row [G].
    cdef Py_ssize_t packed_floats = (B + 1) * G if weights_packed else 0
    cdef floating[::1] work = np.empty(7 * H + G + packed_floats, np.asarray(dh).dtype)
    cdef floating *dh_total = &work[0]
    cdef floating *scratch = dh_total + H
    cdef floating *dbias_partial = scratch + 6 * H
    cdef float *panels = NULL
    cdef float *zero_row = NULL
    if weights_packed:
        panels = <float *>(dbias_partial + G)
        zero_row = panels + B * G
    check_blas_sizes(B, G, I, H)
    with nogil:
        memset(dbias_partial, 0, G * sizeof(floating))
        if zero_row != NULL:
            memset(zero_row, 0, G * sizeof(float))
        for r in range(B):
            # load_output_gradients, then gate_gradient_rows, for a real step with no step after it.
            memcpy(dh_total, &dh[r, 0], H * sizeof(floating))
            for j in range(H):
                dh_total[j] += doutputs[r, j]
            memcpy(&dc0[r, 0], &dc[r, 0], H * sizeof(floating))
            backward_row(&gates[r, 0], &c_prev[r, 0], dh_total, &dc0[r, 0], scratch, H, H, act, ract)
            if weight_gradients:
                for gate in range(4):
                    add_row(dbias_partial + gate * H, &gates[r, gate * H], H)
        if state_gradient:
            hidden_gradient_product(B, H, &gates[0, 0], &recurrent_kernel[0, 0], weights_transposed, NULL,
                                    &dh0[0, 0], 0, H)
        if floating is float and weights_packed:
            gemm_columns_packed(I, H, G, B, 0, G, <float *>&x[0, 0], <float *>&h_in[0, 0], <float *>&gates[0, 0],
                                <float *>&dkernel[0, 0], <float *>&drecurrent_kernel[0, 0], panels, zero_row)
        elif weight_gradients:
            gemm_columns(I, H, G, B, 0, G, &x[0, 0], &h_in[0, 0], &gates[0, 0], &dkernel[0, 0],
                         &drecurrent_kernel[0, 0])
        if weight_gradients:
            memcpy(&dbias[0], dbias_partial, G * sizeof(floating))
        if dx is not None:
            dx_rows(0, B, I, G, &kernel[0, 0], weights_transposed, NULL, &gates[0, 0], &dx[0, 0])


def gates_weight_gradients(const float[:, ::1] dz, const float[:, ::1] inputs, const float[:, ::1] states,
                           float[:, ::1] dinput_weights, float[:, ::1] dstate_weights, Py_ssize_t threads=1,
                           bint transposed=True, object buffer_cache=None):
    """The weight gradients of cell steps from their gate gradients dz [N, 4H] (the steps' rows
    stacked), inputs [N, I] and states [N, H] (each row's x and h0), overwritten: in PyTorch's
    layout (``transposed``) dinput_weights [4H, I] = dz^T inputs and dstate_weights [4H, H] =
    dz^T states; else in the contract's, dinput_weights [I, 4H] = inputs^T dz and dstate_weights
    [H, 4H] = states^T dz.

    On the packed AVX-512 kernel, ``threads`` threads each a share of the results, a chunk of
    WEIGHT_GRADIENT_CHUNK rows at a time (a chunk's panels stay in L2 while the results pass
    over them): transposed, dz read transposed in place and each thread packing the chunk's
    inputs and states for its share of the 4H rows; else the backward's own weight-gradient
    products (``gemm_columns_packed``: dz's columns packed, the inputs and states read
    transposed in place), each thread a block of the 4H columns. Each element is one FMA chain
    either way: the same numbers on any thread count. The panels come from ``buffer_cache``
    when given (the backend's: megabytes at (I, H) = (256, 512), whose fresh pages at every call
    cost more than the products of a few rows).

    Only where the AVX-512 kernels are selected, with I and H multiples of 32 (the panel
    pair): ValueError otherwise (the caller checks ``gates_weight_gradients_take``)."""
    cdef Py_ssize_t N = dz.shape[0], G = dz.shape[1], I = inputs.shape[1], H = states.shape[1]
    cdef Py_ssize_t first, rows, share, row_begin, row_end, pairs
    if not gates_weight_gradients_take(N, I, H):
        raise ValueError(f"gates_weight_gradients: needs the avx512 kernels (selected: {_ISA_NAMES[lstmeng_isa]}), "
                         f"rows and I, H multiples of {PANEL_PAIR}; got N = {N}, I = {I}, H = {H}")
    if G != 4 * H or inputs.shape[0] != N or states.shape[0] != N:
        raise ValueError(f"gates_weight_gradients: dz must be [N, 4H], inputs [N, I], states [N, H]; got "
                         f"{list(dz.shape)[:2]}, {list(inputs.shape)[:2]}, {list(states.shape)[:2]}")
    wanted = ((G, I), (G, H)) if transposed else ((I, G), (H, G))
    if ((dinput_weights.shape[0], dinput_weights.shape[1]), (dstate_weights.shape[0], dstate_weights.shape[1])) != wanted:
        raise ValueError(f"gates_weight_gradients: outputs must be {list(wanted[0])} and {list(wanted[1])}; got "
                         f"{list(dinput_weights.shape)[:2]} and {list(dstate_weights.shape)[:2]}")
    if threads < 1:
        raise ValueError(f"gates_weight_gradients: threads must be >= 1, got {threads}")
    pairs = G // PANEL_PAIR
    threads = min(threads, pairs)
    # Each thread's panels of one chunk (transposed: the chunk's inputs then states; else its
    # columns of dz), then the zero row the first chunk's products start from.
    cdef Py_ssize_t chunk_rows = min(N, WEIGHT_GRADIENT_CHUNK)
    cdef Py_ssize_t column_block = (pairs + threads - 1) // threads * PANEL_PAIR
    cdef Py_ssize_t thread_floats = chunk_rows * ((I + H) if transposed else column_block)
    panels_array = take_float32(buffer_cache, (threads * thread_floats + max(I, H, G),))
    cdef float[::1] panels = panels_array
    cdef float *zero_row = &panels[0] + threads * thread_floats
    cdef float *own
    with nogil:
        memset(zero_row, 0, max(I, H, G) * sizeof(float))
        if not transposed:
            for share in prange(threads, num_threads=threads, schedule="static"):
                row_begin = share * pairs // threads * PANEL_PAIR     # the share's first column
                row_end = (share + 1) * pairs // threads * PANEL_PAIR
                gemm_columns_packed(I, H, G, N, row_begin, row_end, <float *>&inputs[0, 0], <float *>&states[0, 0],
                                    <float *>&dz[0, 0], &dinput_weights[0, 0], &dstate_weights[0, 0],
                                    &panels[0] + share * thread_floats, zero_row)
        else:
            for share in prange(threads, num_threads=threads, schedule="static"):
                row_begin = share * G // threads
                row_end = (share + 1) * G // threads
                own = &panels[0] + share * thread_floats
                first = 0
                while first < N:
                    rows = min(WEIGHT_GRADIENT_CHUNK, N - first)
                    lstmeng_pack_panels_f32(&inputs[first, 0], rows, I, I, 0, own)
                    lstmeng_pack_panels_f32(&states[first, 0], rows, H, H, 0, own + rows * I)
                    lstmeng_gemm_at_packed_f32(row_end - row_begin, I, rows, &dz[first, row_begin], G,
                                               own, zero_row if first == 0 else NULL,
                                               &dinput_weights[row_begin, 0], I)
                    lstmeng_gemm_at_packed_f32(row_end - row_begin, H, rows, &dz[first, row_begin], G,
                                               own + rows * I, zero_row if first == 0 else NULL,
                                               &dstate_weights[row_begin, 0], H)
                    first = first + rows
    if buffer_cache is not None:
        buffer_cache.give(panels_array)


def gates_weight_gradients_take(Py_ssize_t rows, Py_ssize_t inputs, Py_ssize_t units):
    """Whether `gates_weight_gradients` computes these sizes with the kernels selected now."""
    return (lstmeng_isa == LSTMENG_ISA_AVX512 and rows > 0 and inputs > 0 and units > 0
            and inputs % PANEL_PAIR == 0 and units % PANEL_PAIR == 0)


cdef void weight_gradient_columns(const LstmProblem *problem, const LstmBuffers *buffers,
                                  const LstmGradients *gradients, Py_ssize_t column_thread,
                                  Py_ssize_t partials, bint packed, floating zero) noexcept nogil:
    """Gate column block ``column_thread`` of the weight gradients over all packed
    rows: dK = X^T dz, dR = H_in^T dz (through the packed kernel when ``packed``),
    and db = the ``partials`` rows of column sums of dz (per member, or per part) added up."""
    cdef Py_ssize_t I = problem.inputs, H = problem.units, G = problem.gate_columns, N = problem.packed_rows
    cdef Py_ssize_t column_block = gradients.column_block
    cdef Py_ssize_t column_begin = column_thread * column_block
    cdef Py_ssize_t column_end = min(G, column_begin + column_block)
    if column_begin >= column_end:
        return
    if floating is float and packed:
        gemm_columns_packed(I, H, G, N, column_begin, column_end, <float *>buffers.packed_x,
                            <float *>buffers.h_in_all, <float *>buffers.gates,
                            <float *>gradients.dkernel, <float *>gradients.drecurrent_kernel,
                            gradients.gradient_panels
                            + column_thread * WEIGHT_GRADIENT_CHUNK * column_block, gradients.zero_row)
    else:
        gemm_columns(I, H, G, N, column_begin, column_end, <floating *>buffers.packed_x,
                     <floating *>buffers.h_in_all, <floating *>buffers.gates,
                     <floating *>gradients.dkernel, <floating *>gradients.drecurrent_kernel)
    sum_partials(<floating *>gradients.dbias, <floating *>gradients.dbias_partial, partials, G,
                 column_begin, column_end)


cdef void gemm_columns(Py_ssize_t I, Py_ssize_t H, Py_ssize_t G, Py_ssize_t N,
                       Py_ssize_t column_begin, Py_ssize_t column_end, floating *packed_x,
                       floating *h_in_all, floating *dz, floating *dkernel,
                       floating *drecurrent_kernel) noexcept nogil:
    """Gate columns column_begin .. column_end - 1 of dK [I, G] and dR [H, G]."""
    cdef Py_ssize_t width = column_end - column_begin
    gemm(True, False, I, width, N, <floating>1, packed_x, I, dz + column_begin, G,
         <floating>0, dkernel + column_begin, G)
    gemm(True, False, H, width, N, <floating>1, h_in_all, H, dz + column_begin, G,
         <floating>0, drecurrent_kernel + column_begin, G)


cdef void gemm_columns_packed(Py_ssize_t I, Py_ssize_t H, Py_ssize_t G, Py_ssize_t N,
                              Py_ssize_t column_begin, Py_ssize_t column_end, float *packed_x,
                              float *h_in_all, float *dz, float *dkernel, float *drecurrent_kernel,
                              float *panels, const float *zero_row) noexcept nogil:
    """gemm_columns with the packed kernel: dK = X^T dz and dR = H_in^T dz, X (packed_x
    [N, I]) and H_in ([N, H]) read transposed in place, dz's columns column_begin ..
    column_end - 1 (whole panel pairs) packed WEIGHT_GRADIENT_CHUNK rows at a time into
    panels [WEIGHT_GRADIENT_CHUNK * width] (one chunk of panels stays in L1/L2 while both
    products use it). zero_row: at least width zeros."""
    cdef Py_ssize_t width = column_end - column_begin, row, first, rows
    # The first chunk's products start from zero_row instead of C (no pass that zeroes
    # C first and no read of it: at T = 1, (I, H) = (256, 512), those were two of the
    # three passes over the 6 MB of dK and dR); the later chunks add to C.
    cdef const float *start = zero_row
    if N == 0:
        for row in range(I):
            memset(dkernel + row * G + column_begin, 0, width * sizeof(float))
        for row in range(H):
            memset(drecurrent_kernel + row * G + column_begin, 0, width * sizeof(float))
    first = 0
    while first < N:
        rows = min(WEIGHT_GRADIENT_CHUNK, N - first)
        lstmeng_pack_panels_f32(dz + first * G + column_begin, rows, width, G, 0, panels)
        if I > 0:
            lstmeng_gemm_at_packed_f32(I, width, rows, packed_x + first * I, I, panels, start,
                                       dkernel + column_begin, G)
        lstmeng_gemm_at_packed_f32(H, width, rows, h_in_all + first * H, H, panels, start,
                                   drecurrent_kernel + column_begin, G)
        start = NULL
        first += rows


cdef void sum_partials(floating *total, const floating *partials, Py_ssize_t count,
                       Py_ssize_t G, Py_ssize_t column_begin, Py_ssize_t column_end) noexcept nogil:
    """total[j] = sum of partials[k, j] over k < count (partials [count, G]) for the
    columns column_begin .. column_end - 1."""
    cdef Py_ssize_t k
    memcpy(total + column_begin, partials + column_begin,
           (column_end - column_begin) * sizeof(floating))
    for k in range(1, count):
        add_row(total + column_begin, partials + k * G + column_begin, column_end - column_begin)


cdef void dx_rows(Py_ssize_t row_first, Py_ssize_t row_end, Py_ssize_t I, Py_ssize_t G,
                  floating *kernel, bint stored_transposed, float *kernel_t_packed, floating *dz,
                  floating *packed_x) noexcept nogil:
    """Packed rows row_first .. row_end - 1 of dz @ K^T into packed_x [N, I], through
    the packed kernel when kernel_t_packed (K^T [4H, I] packed) is given, else BLAS
    (kernel: K [I, 4H], or K^T [4H, I] when stored_transposed)."""
    if floating is float:
        if kernel_t_packed != NULL:
            memset(packed_x + row_first * I, 0, (row_end - row_first) * I * sizeof(float))
            lstmeng_gemm_packed_f32(row_end - row_first, I, G, dz + row_first * G, G,
                                    kernel_t_packed, packed_x + row_first * I, I)
            return
    if stored_transposed:
        gemm(False, False, row_end - row_first, I, G, <floating>1, dz + row_first * G, G, kernel, I,
             <floating>0, packed_x + row_first * I, I)
        return
    gemm(False, True, row_end - row_first, I, G, <floating>1, dz + row_first * G, G, kernel, G,
         <floating>0, packed_x + row_first * I, I)


# The pipelined backward.
#
# At batch 1 (one part, no unit split: the split loses, or the chooser found one
# thread faster) the time loop runs on one thread while the weight gradients
# and dx, a quarter to a third of a one-thread backward at (1, 500, 128, 128)
# (perf), waited for it on the others. Here those threads take them chunk by chunk as the loop finishes the
# rows: a weight-gradient chunk is the canonical WEIGHT_GRADIENT_CHUNK packed
# rows, a dx item one of the canonical per-thread shares of rows. Bitwise the
# same results as the loop-then-products path: each chunk's dK and dR go to
# their own partial sums, computed as the canonical path computes that chunk's
# contribution (the kernel sums a chunk from zero, then adds it), which are then
# added up in chunk order as that path accumulates them; dx rows are computed
# over the same shares. The time loop's thread takes items too once it is done,
# so a helper that another process keeps off its core costs at most the item it
# holds.

def pipeline_items(Py_ssize_t N, Py_ssize_t chunks, Py_ssize_t column_blocks, Py_ssize_t dx_shares,
                   bint reverse):
    """The pipelined backward's work items over N packed rows, as ([4, items] kind,
    first, end, column block; [items] thresholds), in the order the time loop
    finishes their rows: each of `chunks` weight-gradient chunks of
    WEIGHT_GRADIENT_CHUNK rows in `column_blocks` items (the last chunk to finish
    is then shared by the threads, as the loop-then-products path shares all of
    them), and `dx_shares` shares of dx (0: no dx). A forward-direction layer's
    loop runs the packed rows from the last one down, a reversed one's from the
    first up; an item waits until the loop has finished this many rows."""
    kinds, firsts, ends, blocks = [], [], [], []
    for chunk in range(chunks):
        for block in range(column_blocks):
            kinds.append(PIPELINE_WEIGHTS)
            firsts.append(chunk * WEIGHT_GRADIENT_CHUNK)
            ends.append(min(N, (chunk + 1) * WEIGHT_GRADIENT_CHUNK))
            blocks.append(block)
    for share in range(dx_shares):
        if share * N // dx_shares < (share + 1) * N // dx_shares:
            kinds.append(PIPELINE_DX)
            firsts.append(share * N // dx_shares)
            ends.append((share + 1) * N // dx_shares)
            blocks.append(0)
    firsts_array, ends_array = np.array(firsts, np.intp), np.array(ends, np.intp)
    thresholds = ends_array if reverse else N - firsts_array
    order = np.argsort(thresholds, kind="stable")
    items = np.stack([np.array(kinds, np.intp), firsts_array, ends_array, np.array(blocks, np.intp)])
    return np.ascontiguousarray(items[:, order]), np.ascontiguousarray(thresholds[order], dtype=np.int64)


cdef void pipeline_work(const LstmProblem *problem, const LstmBuffers *buffers,
                        const LstmGradients *gradients, const Pipeline *pipeline,
                        Py_ssize_t member) noexcept nogil:
    """Claim the pipeline's items one after another until none is left; each waits
    until the time loop has finished its rows."""
    cdef Py_ssize_t I = problem.inputs, G = problem.gate_columns
    cdef int64_t item
    cdef float *panels = gradients.gradient_panels + member * WEIGHT_GRADIENT_CHUNK * gradients.column_block
    while True:
        item = lstmeng_progress_claim(pipeline.next_item)
        if item >= pipeline.items:
            return
        lstmeng_progress_wait(pipeline.progress, pipeline.threshold[item])
        if pipeline.kind[item] == PIPELINE_WEIGHTS:
            weight_gradient_chunk(problem, buffers, gradients, pipeline, pipeline.first[item],
                                  pipeline.end[item], pipeline.column_block[item], panels)
        else:
            dx_rows(pipeline.first[item], pipeline.end[item], I, G, <float *>buffers.kernel,
                    problem.weights_transposed, gradients.kernel_t_packed, <float *>buffers.gates,
                    pipeline.packed_dx)
            move_packed_rows(problem, pipeline.first[item], pipeline.end[item], <float *>gradients.dx,
                             pipeline.packed_dx, <float *>buffers.input_dropout, False)
        lstmeng_progress_claim(pipeline.finished)


cdef void weight_gradient_chunk(const LstmProblem *problem, const LstmBuffers *buffers,
                                const LstmGradients *gradients, const Pipeline *pipeline,
                                Py_ssize_t first, Py_ssize_t end, Py_ssize_t block,
                                float *panels) noexcept nogil:
    """Column block ``block`` of packed rows first .. end - 1 (one WEIGHT_GRADIENT_CHUNK
    chunk) of dK = X^T dz and dR = H_in^T dz into the chunk's partial sums, as
    gemm_columns_packed computes that block and chunk. X: x itself at batch 1
    without input dropout (packed row n is x[0, n] on every layout), else the
    chunk's inputs copied to packed_x by the chunk's block-0 item (the other
    blocks wait for them)."""
    cdef Py_ssize_t I = problem.inputs, H = problem.units, G = problem.gate_columns
    cdef Py_ssize_t rows = end - first, chunk = first // WEIGHT_GRADIENT_CHUNK
    cdef Py_ssize_t column_begin = block * gradients.column_block
    cdef Py_ssize_t column_end = min(G, column_begin + gradients.column_block)
    cdef float *partial_kernel = pipeline.partials + chunk * (I + H) * G
    cdef float *partial_recurrent = partial_kernel + I * G
    cdef float *inputs = <float *>buffers.x if pipeline.inputs_in_place else <float *>buffers.packed_x
    cdef float *dz = <float *>buffers.gates
    if column_begin >= column_end:
        return
    if I > 0 and not pipeline.inputs_in_place:
        if block == 0:
            move_packed_rows(problem, first, end, <float *>buffers.x, inputs, <float *>buffers.input_dropout,
                             True)
            lstmeng_progress_publish(pipeline.inputs_ready + chunk, 1)
        else:
            lstmeng_progress_wait(pipeline.inputs_ready + chunk, 1)
    lstmeng_pack_panels_f32(dz + first * G + column_begin, rows, column_end - column_begin, G, 0, panels)
    # From zero_row, as the unpipelined path's first chunk (C's old values not read).
    if I > 0:
        lstmeng_gemm_at_packed_f32(I, column_end - column_begin, rows, inputs + first * I, I, panels,
                                   gradients.zero_row, partial_kernel + column_begin, G)
    lstmeng_gemm_at_packed_f32(H, column_end - column_begin, rows, <float *>buffers.h_in_all + first * H,
                               H, panels, gradients.zero_row, partial_recurrent + column_begin, G)


cdef void sum_chunk_partials(const Pipeline *pipeline, Py_ssize_t chunks, Py_ssize_t I, Py_ssize_t H,
                             float *dkernel, float *drecurrent_kernel) noexcept nogil:
    """dK [I, 4H] and dR [H, 4H] as the chunks' partial sums added up in chunk order
    (dkernel NULL when I = 0)."""
    cdef Py_ssize_t G = 4 * H, chunk
    cdef float *partial
    if I > 0:
        memset(dkernel, 0, I * G * sizeof(float))
    memset(drecurrent_kernel, 0, H * G * sizeof(float))
    for chunk in range(chunks):
        partial = pipeline.partials + chunk * (I + H) * G
        if I > 0:
            add_row(dkernel, partial, I * G)
        add_row(drecurrent_kernel, partial + I * G, H * G)


cdef void move_packed_rows(const LstmProblem *problem, Py_ssize_t first, Py_ssize_t end,
                           float *batch_major, float *packed, float *in_drop,
                           bint into_packed) noexcept nogil:
    """Packed rows first .. end - 1 of a one-part layout between batch_major [B, T, I] and
    packed [N, I], through the input dropout mask: into packed (the inputs, as
    copy_step_inputs copies a step's rows) or out of it (dx, as scatter_step_gradients)."""
    cdef const Layout *layout = &problem.layout
    cdef Py_ssize_t T = problem.steps, I = problem.inputs, t, offset, position, row
    for t in range(T):
        offset = step_offset(layout, 0, t)
        for position in range(max(first, offset), min(end, offset + step_rows(layout, 0, t))):
            row = layout.order[position - offset]
            if into_packed:
                scaled_copy(packed + position * I, batch_major + (row * T + t) * I, rows_of(in_drop, row, I), I)
            else:
                scaled_copy(batch_major + (row * T + t) * I, packed + position * I, rows_of(in_drop, row, I), I)


cdef void step_input_gradients(const LstmProblem *problem, const LstmBuffers *buffers,
                               const LstmGradients *gradients, TeamShare *share, Py_ssize_t t,
                               float *dz) noexcept nogil:
    """dx of step t's rows of the share's part, in the time loop: dz(t) [rows, 4H] @ K^T
    through the packed K^T into the share's dx_step, then into dx [B, T, I] through the
    input dropout mask. Each row's numbers are those of dx_rows on the packed kernel (the
    sum starts from a zero row as dx_rows' from zeroed rows: the same arithmetic)."""
    cdef Py_ssize_t I = problem.inputs, G = problem.gate_columns
    lstmeng_gemm_packed_bias_f32(step_rows(&problem.layout, share.part, t), I, G, dz, G,
                                 gradients.kernel_t_packed, gradients.zero_row, share.dx_step, I)
    scatter_step_gradients(problem, share.part, t, share.dx_step, <float *>gradients.dx,
                           <float *>buffers.input_dropout)


cdef Py_ssize_t smallest_step(const LstmProblem *problem) noexcept nogil:
    """The fewest rows of any step that has rows, over all parts (0 when none has)."""
    cdef Py_ssize_t part, t, rows, fewest = 0
    for part in range(problem.parts):
        for t in range(problem.steps):
            rows = step_rows(&problem.layout, part, t)
            if rows > 0 and (fewest == 0 or rows < fewest):
                fewest = rows
    return fewest


cdef Py_ssize_t max_part_rows(const LstmProblem *problem) noexcept nogil:
    """The most rows of any part."""
    cdef Py_ssize_t part, most = 0
    for part in range(problem.parts):
        most = max(most, problem.layout.row_begin[part + 1] - problem.layout.row_begin[part])
    return most


cdef void scatter_step_gradients(const LstmProblem *problem, Py_ssize_t part, Py_ssize_t t,
                                 const floating *step_dx, floating *dx,
                                 floating *in_drop) noexcept nogil:
    """Step t's rows of part ``part`` (step_dx [rows, I], in packed row order: the step's rows
    of the packed [N, I] array, or the time loop's dx_step) into dx [B, T, I], through the
    input dropout mask."""
    cdef const Layout *layout = &problem.layout
    cdef Py_ssize_t T = problem.steps, I = problem.inputs
    cdef Py_ssize_t r_begin = layout.row_begin[part]
    cdef Py_ssize_t i, row, n_rows = step_rows(layout, part, t)
    for i in range(n_rows):
        row = layout.order[r_begin + i]
        if i + ROW_PREFETCH_DISTANCE < n_rows:
            lstmeng_prefetch_row(dx + (layout.order[r_begin + i + ROW_PREFETCH_DISTANCE] * T + t) * I,
                                 I * sizeof(floating), 1)
        scaled_copy(dx + (row * T + t) * I, step_dx + i * I, rows_of(in_drop, row, I), I)
