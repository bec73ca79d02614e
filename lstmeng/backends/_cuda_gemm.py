"""Matrix products on the device: cuBLAS through CuPy where it is usable, else a Numba tiled GEMM.

``launch_gemm`` computes ``c[M, N] = op(a) @ op(b) (+ bias[N]) (+ c)``, op the
identity or the transpose. The LSTM uses it for

* the input projection of all time steps: ``[B*T, I] @ kernel [I, 4H] + bias``
  (bias folded in, one call for the whole sequence);
* the backward's ``dx = gate_grads [B*T, 4H] @ kernel.T`` (transpose_b);
* the weight gradients ``x.T @ gate_grads`` and ``h_in.T @ gate_grads`` over
  all steps at once (transpose_a).

Which path runs (``choose_path``): cuBLAS (``_cuda_cublas``) when CuPy is
installed and usable, the CUDA simulator is off and the product is big enough
for the library's call overhead not to matter; the Numba kernel below
otherwise. ``LSTMENG_CUDA_GEMM=numba|cublas|auto`` forces a path (tests
and benchmarks: the ``cuda_gemm_path`` of ``lstmeng.testing.kernel_overrides``,
over the variable); ``gemm_path()`` says in words which one is active and why.
Both paths compute in the array's dtype with plain FMAs: no TF32.

Why a hand-written GEMM is kept beside cuBLAS: CuPy is an optional
dependency (a per-CUDA-major extra), the backend must work with numba-cuda
alone, and the simulator tests run this code. On an H200 the first version
(128x64 tiles, 8x4 per thread, runtime transpose flags) reached 4.9 TFLOP/s,
7 % of the float32 peak; docs/benchmarks/gemm_notes.md records its
successor's SASS and speed.

Kernel design (the classic register-blocked SGEMM): a block of 256 threads
computes a 128x128 tile of c, stepping through K in slices of 8. Each slice
of a and b is staged in shared memory, double-buffered: the global loads of
slice k+1 are issued into registers before the FMAs of slice k and stored
into the other buffer after them, so one barrier per slice suffices and load
latency hides behind 512 FMAs. Each thread accumulates an 8x8 register tile
as two 4-row by two 4-column groups 64 apart, so its shared reads are four
aligned 16-byte vectors per k (LDS.128, 64 FMAs per 4 loads) and a warp reads
them without bank conflicts. The kernel source is generated per variant
(dtype, transpose_a, transpose_b, bias, accumulate, split-K, tile shape) with
the 8x8 accumulators as named scalars: Numba local arrays indexed in loops
were left in local memory (the old kernel spilled at 8x8), and generated
straight-line code puts every accumulator in a register and every transpose
and flag at compile time. Operands arrive flattened (C order) so that a
global load is one add from a per-thread start. Outputs with fewer tiles than
SMs (the weight gradients: small [I, 4H] over K = B*T) split K over blocks
and sum the partials in a second, deterministic kernel; outputs too small
even for that use 64x64 tiles (4x4 per thread), as does float64. Under the
CUDA simulator the same generator emits 8x8 tiles with 4 threads so tests
stay fast.
"""

from __future__ import annotations

import dataclasses
import linecache
import math
import os
import threading

import numba
import numpy as np
from numba import cuda

from lstmeng.backends import _kernel_overrides


@dataclasses.dataclass(frozen=True)
class GemmTiles:
    """Compile-time tile shape of the Numba GEMM kernel.

    A block computes ``tile_m x tile_n`` outputs, stepping through K by
    ``tile_k``; each thread owns ``thread_m x thread_n`` of them.
    """

    tile_m: int = 64
    tile_n: int = 64
    tile_k: int = 8
    thread_m: int = 4
    thread_n: int = 4
    #: Register cap passed to the compiler (None: its own choice). At 128 two 256-thread blocks fit an
    #: SM but ptxas spills 40-160 bytes; the GPU benchmark measures both.
    max_registers: int | None = None

    @property
    def threads(self) -> int:
        return (self.tile_m // self.thread_m) * (self.tile_n // self.thread_n)

    def check(self) -> None:
        """Raise ValueError unless the generator can build this shape."""
        problems = []
        if self.thread_m % 2 or self.thread_n % 2:
            problems.append("thread_m and thread_n must be even (two groups per thread)")
        if self.tile_m % self.thread_m or self.tile_n % self.thread_n:
            problems.append("tile_m, tile_n must be multiples of thread_m, thread_n")
        if (self.tile_m * self.tile_k) % self.threads or (self.tile_n * self.tile_k) % self.threads:
            problems.append("each slice must split evenly over the threads")
        if self.threads % self.tile_k:
            problems.append("the thread count must be a multiple of tile_k")
        for tile in (self.tile_m, self.tile_n):
            if tile % self.threads and self.threads % tile:
                problems.append("tile_m and tile_n must divide, or be multiples of, the thread count")
        if problems:
            raise ValueError(f"GemmTiles {self}: " + "; ".join(problems))


#: 128x128x8 tiles, 8x8 outputs per thread, 256 threads: 64 FMAs per 4 LDS.128.
GPU_LARGE_TILES = GemmTiles(tile_m=128, tile_n=128, tile_k=8, thread_m=8, thread_n=8)
#: 64x64x8 tiles, 4x4 per thread, 256 threads: for outputs with too few large tiles, and for float64
#: (8x8 float64 accumulators would need 128 registers on their own).
GPU_TILES = GemmTiles(tile_m=64, tile_n=64, tile_k=8, thread_m=4, thread_n=4)
#: Use the large tiles when they (split over K if need be) still give this many blocks: one per SM of
#: an H100/H200 (at 143-167 registers a thread one 256-thread block fits an SM; fewer blocks than SMs
#: leave SMs idle).
LARGE_TILE_MIN_BLOCKS = 132
#: Under the simulator every thread is a Python thread: 4 threads, 8x8 tiles.
SIMULATOR_TILES = GemmTiles(tile_m=8, tile_n=8, tile_k=4, thread_m=4, thread_n=4)

#: Products with fewer multiply-adds than this stay on the Numba kernel in "auto" mode: at that size
#: both paths are launch-overhead bound, and the Numba kernel skips CuPy's per-call Python work.
CUBLAS_MIN_MULTIPLY_ADDS = 1 << 21

PATH_VARIABLE = "LSTMENG_CUDA_GEMM"
PATHS = ("auto", "numba", "cublas")


# -- path choice ----------------------------------------------------------------------------------------------
def _simulator_enabled() -> bool:
    return bool(numba.config.ENABLE_CUDASIM)


def requested_path() -> str:
    """The path asked for: the ``cuda_gemm_path`` kernel override, else LSTMENG_CUDA_GEMM, else "auto"."""
    forced = _kernel_overrides.current().cuda_gemm_path
    value = forced if forced is not None else os.environ.get(PATH_VARIABLE, "auto")
    value = (value or "auto").strip().lower()
    if value not in PATHS:
        raise ValueError(f"{PATH_VARIABLE} must be one of {', '.join(PATHS)}, got {value!r}")
    return value


def _cublas_status() -> tuple[bool, str]:
    """(usable, description) of the cuBLAS path; never imports CuPy under the simulator."""
    if _simulator_enabled():
        return False, "CUDA simulator"
    from lstmeng.backends import _cuda_cublas
    return _cuda_cublas.status()


def gemm_path() -> str:
    """The active GEMM path in words, with the reason, e.g. "Numba tiled GEMM (CuPy not installed)"."""
    requested = requested_path()
    if requested == "numba":
        return f"Numba tiled GEMM (forced by {PATH_VARIABLE}=numba)"
    usable, description = _cublas_status()
    if usable:
        small = f"; products under {CUBLAS_MIN_MULTIPLY_ADDS} multiply-adds on the Numba tiled GEMM"
        return f"cuBLAS via {description}" + ("" if requested == "cublas" else small)
    if requested == "cublas":
        return f"unavailable: {PATH_VARIABLE}=cublas but {description}"
    return f"Numba tiled GEMM ({description})"


def choose_path(a, b, c, *, transpose_a: bool = False, transpose_b: bool = False) -> str:
    """"cublas" or "numba" for ``c[M, N] = op(a) @ op(b)`` (arrays as in ``launch_gemm``).

    Raises RuntimeError when cuBLAS is forced but unusable (a forced path that
    silently fell back would hide the misconfiguration it was set to test).
    """
    requested = requested_path()
    if requested == "numba":
        return "numba"
    usable, description = _cublas_status()
    if requested == "cublas":
        if not usable:
            raise RuntimeError(f"{PATH_VARIABLE}=cublas but the cuBLAS path is unusable: {description}")
        return "cublas"
    if not usable:
        return "numba"
    from lstmeng.backends import _cuda_cublas
    rows, columns = c.shape
    depth = a.shape[0] if transpose_a else a.shape[1]
    if rows * columns * depth < CUBLAS_MIN_MULTIPLY_ADDS or not _cuda_cublas.supports(a, b, c):
        return "numba"
    return "cublas"


def launch_gemm(a, b, c, bias=None, *, transpose_a=False, transpose_b=False, accumulate=False,
                tiles: GemmTiles | None = None, dummy_bias=None):
    """``c = op(a) @ op(b) (+ bias) (+ c)`` on device arrays, on cuBLAS or the Numba kernel.

    Args:
        a: [M, K], or [K, M] when transpose_a.
        b: [K, N], or [N, K] when transpose_b.
        c: [M, N] output, written in place (never reallocated).
        bias: [N] or None.
        accumulate: add the product to c's contents instead of overwriting them.
        tiles: Numba kernel tile shape; None chooses from c's shape (ignored on cuBLAS).
        dummy_bias: unused; kept so that callers written for the first kernel still work.
    """
    if c.shape[0] == 0 or c.shape[1] == 0:
        return
    if choose_path(a, b, c, transpose_a=transpose_a, transpose_b=transpose_b) == "cublas":
        from lstmeng.backends import _cuda_cublas
        if bias is not None:
            # cuBLAS adds beta * c: put the bias rows in c first and run the product with beta = 1.
            _launch_bias_rows(bias, c, accumulate)
        _cuda_cublas.gemm(a, b, c, transpose_a=transpose_a, transpose_b=transpose_b,
                          accumulate=accumulate or bias is not None)
        return
    launch_numba_gemm(a, b, c, bias, transpose_a=transpose_a, transpose_b=transpose_b,
                      accumulate=accumulate, tiles=tiles)


# -- the Numba kernel -----------------------------------------------------------------------------------------
#: Split-K: a product whose output has fewer tiles than SMs (the weight gradients: [I, 4H] outputs over
#: K = B*T) gives each block a K range; partial products go to a workspace that one kernel sums in a
#: fixed order (deterministic, unlike atomics). Each split keeps at least this much of K.
SPLIT_K_MIN_DEPTH = 512
SPLIT_K_MAX = 16
#: Blocks to aim for with split-K: two per SM of an H100/H200 (132 SMs).
SPLIT_K_TARGET_BLOCKS = 264


def choose_splits(blocks: int, depth: int) -> int:
    """How many K ranges to give ``blocks`` output tiles over ``depth`` (1: no split)."""
    if blocks >= LARGE_TILE_MIN_BLOCKS:
        return 1
    return max(1, min(math.ceil(SPLIT_K_TARGET_BLOCKS / max(blocks, 1)), depth // SPLIT_K_MIN_DEPTH, SPLIT_K_MAX))


def choose_tiles(rows: int, columns: int, dtype=np.float32, depth: int = 0) -> GemmTiles:
    """GPU tile shape for a ``[rows, columns]`` output of ``dtype`` over ``depth``: the large tiles
    whenever they, split over K where K allows, still give every SM a block."""
    if np.dtype(dtype).itemsize > 4:
        return GPU_TILES
    large = GPU_LARGE_TILES
    blocks = math.ceil(rows / large.tile_m) * math.ceil(columns / large.tile_n)
    if blocks * choose_splits(blocks, depth) >= LARGE_TILE_MIN_BLOCKS:
        return large
    return GPU_TILES


def launch_numba_gemm(a, b, c, bias=None, *, transpose_a=False, transpose_b=False, accumulate=False,
                      tiles: GemmTiles | None = None, splits: int | None = None):
    """``c = op(a) @ op(b) (+ bias) (+ c)`` on the Numba kernel (arguments as in ``launch_gemm``).

    ``splits`` None chooses the split-K factor on a GPU (1 under the simulator).
    """
    rows, columns = c.shape
    if rows == 0 or columns == 0:
        return
    depth = a.shape[0] if transpose_a else a.shape[1]
    simulator = _simulator_enabled()
    if tiles is None:
        tiles = SIMULATOR_TILES if simulator else choose_tiles(rows, columns, c.dtype, depth)
    grid = (math.ceil(columns / tiles.tile_n), math.ceil(rows / tiles.tile_m))
    if splits is None:
        splits = 1 if simulator else choose_splits(grid[0] * grid[1], depth)
    k_per_split = math.ceil(math.ceil(depth / max(splits, 1)) / tiles.tile_k) * tiles.tile_k
    splits = math.ceil(depth / k_per_split) if depth else 1
    if not _is_c_contiguous(c):
        # A strided output: compute into a contiguous temporary and copy it back.
        staged = _contiguous(c) if accumulate else cuda.device_array(tuple(c.shape), np.dtype(c.dtype))
        launch_numba_gemm(a, b, staged, bias, transpose_a=transpose_a, transpose_b=transpose_b,
                          accumulate=accumulate, tiles=tiles, splits=splits)
        _launch_copy_2d(staged, c)
        return
    # Strided inputs (views of user arrays) are copied once; the kernel reads flat C-order operands.
    flat_a, flat_b, flat_c = _flat(_contiguous(a), "a"), _flat(_contiguous(b), "b"), _flat(c, "c")
    if splits == 1:
        kernel = gemm_kernel(c.dtype, tiles, transpose_a=bool(transpose_a), transpose_b=bool(transpose_b),
                             with_bias=bias is not None, accumulate=bool(accumulate))
        operands = [flat_a, flat_b, flat_c] + ([] if bias is None else [bias])
        kernel[grid, tiles.threads](*operands, rows, columns, depth)
        return
    partial = gemm_kernel(c.dtype, tiles, transpose_a=bool(transpose_a), transpose_b=bool(transpose_b),
                          split_k=True)
    total = rows * columns
    finish = _split_sum_kernel(with_bias=bias is not None, accumulate=bool(accumulate))
    # The workspace is shared: the lock keeps each call's two launches adjacent in the (one, in-order)
    # default stream, so no other call's partial products land in between.
    with _workspace_lock:
        workspace = _workspace(splits * total, c.dtype)
        partial[(grid[0], grid[1], splits), tiles.threads](flat_a, flat_b, workspace, rows, columns, depth,
                                                          k_per_split)
        blocks = max(1, min(4096, math.ceil(total / SPLIT_SUM_THREADS)))
        finish[blocks, SPLIT_SUM_THREADS](workspace, flat_c, flat_c if bias is None else bias, splits, columns)


SPLIT_SUM_THREADS = 256
_workspace_lock = threading.Lock()
_workspaces: dict = {}


def _workspace(size: int, dtype):
    """A device array of at least ``size`` elements of ``dtype`` for split-K partials (grown, kept)."""
    key = (np.dtype(dtype).name, _device_id())
    held = _workspaces.get(key)
    if held is None or held.size < size:
        held = _workspaces[key] = cuda.device_array(max(size, 2 * held.size if held is not None else size),
                                                    np.dtype(dtype))
    return held[:size]


def _device_id() -> int:
    if _simulator_enabled():
        return 0
    return int(cuda.get_current_device().id)


_split_sums: dict = {}


def _split_sum_kernel(*, with_bias: bool, accumulate: bool):
    """c[i] = sum over s of workspace[s * M*N + i] (+ bias[i % N]) (+ c[i]), flags fixed at compile time."""
    key = (with_bias, accumulate)
    if key not in _split_sums:
        @cuda.jit
        def split_sum(workspace, c, bias, splits, columns):
            """workspace: [splits * M*N], c: [M*N], bias: [N] (read only when with_bias)."""
            total = c.size
            for index in range(cuda.grid(1), total, cuda.gridsize(1)):
                value = workspace[index]
                for split in range(1, splits):      # a fixed order: the sum is deterministic
                    value += workspace[split * total + index]
                if with_bias:
                    value += bias[index % columns]
                if accumulate:
                    value += c[index]
                c[index] = value
        _split_sums[key] = split_sum
    return _split_sums[key]


def _flat(array, name: str):
    """``array`` as a 1-D view in C order (no copy); ValueError unless it is C-contiguous."""
    if not _is_c_contiguous(array):
        raise ValueError(f"launch_gemm: {name} must be C-contiguous, got strides {array.strides} "
                         f"for shape {array.shape}")
    return array.reshape(array.size)


def _is_c_contiguous(array) -> bool:
    return array.flags["C_CONTIGUOUS"] if hasattr(array, "flags") else array.is_c_contiguous()


COPY_THREADS = 256


@cuda.jit
def _copy_2d(source, target):
    """target[m, n] = source[m, n] for any strides; both [M, N]; grid-stride over the elements."""
    rows, columns = target.shape
    for index in range(cuda.grid(1), rows * columns, cuda.gridsize(1)):
        target[index // columns, index % columns] = source[index // columns, index % columns]


def _launch_copy_2d(source, target) -> None:
    blocks = max(1, min(4096, math.ceil(source.shape[0] * source.shape[1] / COPY_THREADS)))
    _copy_2d[blocks, COPY_THREADS](source, target)


def _contiguous(array):
    """``array`` itself when C-contiguous, else a C-contiguous device copy (strided views of user arrays)."""
    if _is_c_contiguous(array):
        return array
    copy = cuda.device_array(tuple(array.shape), np.dtype(array.dtype))
    _launch_copy_2d(array, copy)
    return copy


_kernels: dict = {}


def gemm_kernel(dtype, tiles: GemmTiles, *, transpose_a=False, transpose_b=False, with_bias=False,
                accumulate=False, split_k=False):
    """The compiled Numba GEMM kernel for one variant (generated once, then cached)."""
    key = (np.dtype(dtype).name, tiles, transpose_a, transpose_b, with_bias, accumulate, split_k,
           _simulator_enabled())
    if key not in _kernels:
        source = kernel_source(tiles, transpose_a=transpose_a, transpose_b=transpose_b,
                               with_bias=with_bias, accumulate=accumulate, split_k=split_k,
                               device_code=not _simulator_enabled())
        options = {} if tiles.max_registers is None or _simulator_enabled() else {
            "max_registers": tiles.max_registers}
        _kernels[key] = cuda.jit(**options)(_define(source, np.dtype(dtype), key))
    return _kernels[key]


def _define(source: str, dtype, key):
    """The Python function ``gemm`` defined by ``source`` (registered with linecache for tracebacks)."""
    filename = f"<lstmeng gemm {'-'.join(str(part) for part in key)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"cuda": cuda, "element": numba.from_dtype(dtype), "ZERO": dtype.type(0), "uint64": numba.uint64}
    exec(compile(source, filename, "exec"), namespace)   # noqa: S102 (our own generated source)
    return namespace["gemm"]


def kernel_source(tiles: GemmTiles, *, transpose_a: bool, transpose_b: bool, with_bias: bool,
                  accumulate: bool, split_k: bool = False, device_code: bool = True) -> str:
    """Python source of one GEMM kernel variant: every flag and tile size is a literal in it.

    The kernel takes the operands flattened (C order) plus their logical
    sizes: one 64-bit add per global load and per k slice instead of a
    row-times-stride product, and indices cast to unsigned so that Numba
    emits no negative-index wraparound (two instructions per access).
    The thread's outputs are two groups of ``thread_m/2`` rows, ``tile_m/2``
    apart (likewise for columns): each group is one aligned 16-byte shared
    read, and a warp's reads cover consecutive addresses.
    ``split_k``: block z covers K range ``[z*k_per_split, (z+1)*k_per_split)``
    and writes its partial product to slab z of c (``[splits, M, N]``); no
    bias or accumulation (the sum kernel adds them). ``device_code`` False
    leaves out what the simulator rejects (shared array alignment).
    """
    tiles.check()
    if split_k and (with_bias or accumulate):
        raise ValueError("split-K partial kernels take no bias and do not accumulate")
    TM, TN, TK = tiles.tile_m, tiles.tile_n, tiles.tile_k
    threads = tiles.threads
    threads_n = TN // tiles.thread_n
    half_m, half_n = tiles.thread_m // 2, tiles.thread_n // 2
    loads_a, loads_b = TM * TK // threads, TN * TK // threads
    # Rows and columns of the thread's outputs within the tile: offsets from row_base / column_base.
    row_offsets = [group * (TM // 2) + i for group in range(2) for i in range(half_m)]
    column_offsets = [group * (TN // 2) + j for group in range(2) for j in range(half_n)]
    align = ", alignment=16" if device_code else ""
    lines = []
    emit = lines.append

    def load_setup(name: str, count: int, k_contiguous: bool, tile_outer: int, outer_begin: str,
                   outer_limit: str, leading: str) -> None:
        # Slice element `thread + l*threads` as (outer, kk) such that consecutive threads read
        # consecutive addresses of the operand's contiguous axis. Load l is load 0 moved by a fixed
        # number of rows or k steps, so one flat start index serves all (fewer live registers).
        if k_contiguous:          # stored [outer, K]: load l is threads/TK rows further
            emit(f"    {name}_outer0 = thread // {TK}")
            emit(f"    {name}_k0 = thread % {TK}")
            emit(f"    {name}_start = ({outer_begin} + {name}_outer0) * {leading} + {name}_k0")
            for load in range(count):
                emit(f"    {name}_outer{load} = {name}_outer0 + {load * threads // TK}")
                emit(f"    {name}_k{load} = {name}_k0")
                emit(f"    {name}_exists{load} = {outer_begin} + {name}_outer{load} < {outer_limit}")
                emit(f"    {name}_offset{load} = {load * threads // TK} * {leading}")
        else:                     # stored [K, outer]: load l is threads/tile_outer k steps further
            emit(f"    {name}_outer0 = thread % {tile_outer}")
            emit(f"    {name}_k0 = thread // {tile_outer}")
            emit(f"    {name}_start = {name}_k0 * {leading} + {outer_begin} + {name}_outer0")
            for load in range(count):
                index = load * threads
                emit(f"    {name}_outer{load} = {name}_outer0 + {index % tile_outer}")
                emit(f"    {name}_k{load} = {name}_k0 + {index // tile_outer}")
                emit(f"    {name}_exists{load} = {outer_begin} + {name}_outer{load} < {outer_limit}")
                emit(f"    {name}_offset{load} = {index // tile_outer} * {leading} + {index % tile_outer}")

    def global_loads(name: str, count: int, k_contiguous: bool, k_begin: str, indent: str) -> None:
        # k_begin * leading for a [K, outer] operand, k_begin itself for [outer, K].
        shift = k_begin if k_contiguous else f"{name}_shift"
        if not k_contiguous:
            emit(f"{indent}{name}_shift = {k_begin} * {name}_leading")
        for load in range(count):
            emit(f"{indent}{name}_next{load} = ZERO")
            emit(f"{indent}if {name}_exists{load} and {k_begin} + {name}_k{load} < k_last:")
            emit(f"{indent}    {name}_next{load} = {name}[uint64({name}_start + {name}_offset{load} + {shift})]")

    def shared_stores(name: str, count: int, buffer: str, indent: str) -> None:
        for load in range(count):
            emit(f"{indent}{name}_tile[{buffer}, {name}_k{load}, {name}_outer{load}] = {name}_next{load}")

    emit("def gemm(a, b, c" + (", bias" if with_bias else "") + ", rows, columns, depth"
         + (", k_per_split):" if split_k else "):"))
    emit('    """c[M, N] = op(a) @ op(b)' + (" + bias[N]" if with_bias else "") + (" + c" if accumulate else "")
         + ".\n\n    a: [" + ("K*M" if transpose_a else "M*K") + "], b: [" + ("N*K" if transpose_b else "K*N")
         + "], c: [" + ("splits*M*N" if split_k else "M*N") + "] flattened in C order"
         + (", bias: [N]" if with_bias else "")
         + "; rows M, columns N, depth K.\n    \"\"\"")
    emit(f"    a_tile = cuda.shared.array((2, {TK}, {TM}), element{align})")
    emit(f"    b_tile = cuda.shared.array((2, {TK}, {TN}), element{align})")
    emit("    thread = cuda.threadIdx.x")
    emit(f"    row_begin = cuda.blockIdx.y * {TM}")
    emit(f"    column_begin = cuda.blockIdx.x * {TN}")
    if split_k:
        emit("    k_first = cuda.blockIdx.z * k_per_split")
        emit("    k_last = min(depth, k_first + k_per_split)")
    else:
        emit("    k_first = 0")
        emit("    k_last = depth")
    emit(f"    row_base = (thread // {threads_n}) * {half_m}")
    emit(f"    column_base = (thread % {threads_n}) * {half_n}")
    emit(f"    a_leading = {'rows' if transpose_a else 'depth'}")
    emit(f"    b_leading = {'depth' if transpose_b else 'columns'}")
    load_setup("a", loads_a, not transpose_a, TM, "row_begin", "rows", "a_leading")
    load_setup("b", loads_b, transpose_b, TN, "column_begin", "columns", "b_leading")
    for i in range(tiles.thread_m):
        emit("    " + " = ".join(f"acc{i}_{j}" for j in range(tiles.thread_n)) + " = ZERO")
    # Prologue: slice 0 into buffer 0.
    global_loads("a", loads_a, not transpose_a, "k_first", "    ")
    global_loads("b", loads_b, transpose_b, "k_first", "    ")
    shared_stores("a", loads_a, "0", "    ")
    shared_stores("b", loads_b, "0", "    ")
    emit("    cuda.syncthreads()")
    emit("    buffer = 0")
    emit(f"    for k_begin in range(k_first, k_last, {TK}):")
    emit(f"        k_next = k_begin + {TK}")
    # The next slice's global loads first: their latency hides behind this slice's FMAs.
    global_loads("a", loads_a, not transpose_a, "k_next", "        ")
    global_loads("b", loads_b, transpose_b, "k_next", "        ")
    for kk in range(TK):
        for i, offset in enumerate(row_offsets):
            emit(f"        a{i} = a_tile[buffer, {kk}, row_base + {offset}]")
        for j, offset in enumerate(column_offsets):
            emit(f"        b{j} = b_tile[buffer, {kk}, column_base + {offset}]")
        for i in range(tiles.thread_m):
            for j in range(tiles.thread_n):
                emit(f"        acc{i}_{j} += a{i} * b{j}")
    # The other buffer was last read before the previous barrier: safe to overwrite now.
    shared_stores("a", loads_a, "1 - buffer", "        ")
    shared_stores("b", loads_b, "1 - buffer", "        ")
    emit("        cuda.syncthreads()")
    emit("        buffer = 1 - buffer")
    # Epilogue: bounds-checked stores.
    for j, offset in enumerate(column_offsets):
        emit(f"    column{j} = column_begin + column_base + {offset}")
        if with_bias:
            emit(f"    bias{j} = bias[uint64(column{j})] if column{j} < columns else ZERO")
    for i, offset in enumerate(row_offsets):
        emit(f"    row = row_begin + row_base + {offset}")
        emit("    if row < rows:")
        emit("        row_start = " + ("(cuda.blockIdx.z * rows + row)" if split_k else "row") + " * columns")
        for j in range(tiles.thread_n):
            emit(f"        if column{j} < columns:")
            target = f"c[uint64(row_start + column{j})]"
            value = f"acc{i}_{j}" + (f" + bias{j}" if with_bias else "") + (f" + {target}" if accumulate else "")
            emit(f"            {target} = {value}")
    return "\n".join(lines) + "\n"


# -- bias rows for the cuBLAS path -----------------------------------------------------------------------------
BIAS_ROWS_THREADS = 256
_bias_rows: dict = {}


def _bias_rows_kernel(accumulate: bool):
    """c[m, n] = bias[n] (+ c[m, n]) with ``accumulate`` fixed at compile time (cached)."""
    if accumulate not in _bias_rows:
        @cuda.jit
        def bias_rows(bias, c):
            """bias: [N], c: [M, N]; grid-stride over all elements."""
            rows, columns = c.shape
            for index in range(cuda.grid(1), rows * columns, cuda.gridsize(1)):
                row, column = index // columns, index % columns
                if accumulate:
                    c[row, column] += bias[column]
                else:
                    c[row, column] = bias[column]
        _bias_rows[accumulate] = bias_rows
    return _bias_rows[accumulate]


def _launch_bias_rows(bias, c, accumulate) -> None:
    # A Numba kernel on the default stream rather than a CuPy elementwise kernel: no NVRTC compile
    # at first use, and the ordering with the cuBLAS call follows from the shared stream.
    blocks = max(1, min(1024, math.ceil(c.shape[0] * c.shape[1] / BIAS_ROWS_THREADS)))
    _bias_rows_kernel(bool(accumulate))[blocks, BIAS_ROWS_THREADS](bias, c)
