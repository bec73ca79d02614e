"""cuBLAS GEMMs through CuPy on the numba_cuda backend's own device arrays (no copies, full precision).

``gemm(a, b, c)`` writes ``c[M, N] = op(a) @ op(b) (+ c)`` with one
``cublasGemmEx`` call on the arrays' device pointers: nothing is copied or
allocated, c is the caller's preallocated array. ``_cuda_gemm.launch_gemm``
decides when this path runs and adds the bias (it fills c with the bias rows
and asks for ``+ c``, i.e. beta = 1, so the addition happens in cuBLAS's
epilogue).

Row-major through a column-major library: a row-major ``[R, C]`` array is a
column-major ``[C, R]`` matrix with leading dimension equal to its row
stride, i.e. its transpose. So ``c = op(a) @ op(b)`` row-major is
``c.T = op(b).T @ op(a).T`` column-major: cuBLAS is called with b first, m =
N, n = M, and each operand is transposed for cuBLAS exactly when it is *not*
transposed for us. Transposes are cuBLAS flags, never copies.

Precision: the compute type is ``CUBLAS_COMPUTE_32F`` (``_64F`` for float64)
and the handle's math mode is checked on every call; a mode that allows
TF32 tensor cores (``CUBLAS_TF32_TENSOR_OP_MATH``, which cuBLAS applies to
``CUBLAS_COMPUTE_32F``) is replaced by ``CUBLAS_DEFAULT_MATH`` for the call
and restored afterwards. CuPy's own TF32 switch (``CUPY_TF32=1``) only
changes the compute type CuPy's ``matmul`` picks, which this module does not
use. ``NVIDIA_TF32_OVERRIDE=0`` can only disable TF32, never enable it.

Stream: numba-cuda launches on the default stream (the legacy NULL stream,
or the per-thread default stream when ``NUMBA_CUDA_PER_THREAD_DEFAULT_STREAM``
is set). CuPy's default current stream is also the legacy NULL stream, but a
user may have made another CuPy stream current; every call here therefore
runs inside ``with`` the CuPy stream object for the stream numba uses, so the
GEMM is ordered after the kernels that produced its inputs and before those
that consume its output, with no host synchronisation.
"""

from __future__ import annotations

import functools
import os

import numpy as np

# cuBLAS ABI constants (cublas_api.h, library_types.h), used when CuPy's module does not export them.
_CUBLAS_OP_N, _CUBLAS_OP_T = 0, 1
_CUDA_R_32F, _CUDA_R_64F = 0, 1
_CUBLAS_COMPUTE_32F, _CUBLAS_COMPUTE_64F = 68, 70
_CUBLAS_GEMM_DEFAULT = -1
_CUBLAS_DEFAULT_MATH = 0
_CUBLAS_POINTER_MODE_HOST = 0
#: The math mode's low bits are an enum (high bits are flags such as 16, "disallow reduced-precision
#: reduction"); of its values only DEFAULT (0) and PEDANTIC (2) keep float32 products in float32:
#: 1 (legacy TENSOR_OP), 3 (TF32_TENSOR_OP) and later ones (emulated float32) round operands.
_MATH_MODE_ENUM_BITS = 0xF
_FULL_PRECISION_MATH_MODES = (0, 2)

#: (compute type, data type) per supported dtype.
_TYPES = {np.dtype(np.float32): (_CUBLAS_COMPUTE_32F, _CUDA_R_32F),
          np.dtype(np.float64): (_CUBLAS_COMPUTE_64F, _CUDA_R_64F)}


def _import_cupy():
    """CuPy, imported (a seam for tests that simulate a missing or broken CuPy)."""
    import cupy
    return cupy


def _import_cublas():
    """CuPy's low-level cuBLAS bindings (where CuPy's own code imports them from; older layouts second)."""
    try:
        from cupy_backends.cuda.libs import cublas
    except ImportError:
        from cupy.cuda import cublas
    return cublas


@functools.lru_cache(maxsize=1)
def status() -> tuple[bool, str]:
    """(usable, description): whether cuBLAS through CuPy works here, cached per process.

    The description is "CuPy 14.2.0 (float32/float64, no TF32)" when usable,
    else the reason ("CuPy not installed", "CuPy 14.2.0 unusable: ...").
    Probing creates CuPy's cuBLAS handle on the current device.
    """
    try:
        cupy = _import_cupy()
    except ImportError as error:
        missing = getattr(error, "name", None) in ("cupy", None)
        return False, "CuPy not installed" if missing else f"CuPy import failed: {error}"
    except Exception as error:   # a broken install raises anything from its extension modules
        return False, f"CuPy import failed: {type(error).__name__}: {error}"
    version = getattr(cupy, "__version__", "?")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False, f"CuPy {version} unusable: no CUDA device"
        _handle(cupy)
        _import_cublas()
    except Exception as error:
        first_line = (str(error).splitlines() or [""])[0]
        return False, f"CuPy {version} unusable: {type(error).__name__}: {first_line}"
    return True, f"CuPy {version} (float32/float64, no TF32)"


def refresh() -> None:
    """Forget the cached ``status`` (after installing CuPy, or in tests)."""
    status.cache_clear()


def supports(a, b, c) -> bool:
    """Whether ``gemm`` takes these arrays: a supported dtype shared by all, rows with unit stride."""
    dtype = np.dtype(c.dtype)
    if dtype not in _TYPES or any(np.dtype(x.dtype) != dtype for x in (a, b)):
        return False
    return all(_leading_dimension(x) is not None for x in (a, b, c))


def _leading_dimension(array) -> int | None:
    """Row stride in elements of a 2-D array whose rows are contiguous, else None."""
    if len(array.shape) != 2:
        return None
    rows, columns = array.shape
    itemsize = np.dtype(array.dtype).itemsize
    row_stride, column_stride = array.strides
    if columns > 1 and column_stride != itemsize:
        return None
    leading = row_stride // itemsize if rows > 1 else columns
    return max(leading, columns, 1) if row_stride % itemsize == 0 else None


def _pointer(array) -> int:
    return int(array.__cuda_array_interface__["data"][0] or 0)


def _handle(cupy):
    return cupy.cuda.device.get_cublas_handle()


def _constant(module, name: str, fallback: int) -> int:
    return int(getattr(module, name, fallback))


#: Runtime-API handles of the two default streams (driver_types.h): explicit, so that neither CuPy's
#: nor cuBLAS's reading of "stream 0" matters.
_CUDA_STREAM_LEGACY, _CUDA_STREAM_PER_THREAD = 0x1, 0x2


@functools.lru_cache(maxsize=None)
def _stream_for_numba(per_thread: bool, device_id: int):
    """The CuPy stream object for the default stream numba-cuda launches on (cached per device)."""
    cupy = _import_cupy()
    handle = _CUDA_STREAM_PER_THREAD if per_thread else _CUDA_STREAM_LEGACY
    return cupy.cuda.ExternalStream(handle, device_id)


def _numba_uses_per_thread_stream() -> bool:
    from numba.core import config
    return bool(getattr(config, "CUDA_PER_THREAD_DEFAULT_STREAM", 0)) or \
        os.environ.get("NUMBA_CUDA_PER_THREAD_DEFAULT_STREAM") == "1"


def gemm(a, b, c, *, transpose_a: bool = False, transpose_b: bool = False, accumulate: bool = False) -> None:
    """``c = op(a) @ op(b) (+ c)`` with cublasGemmEx on the arrays' own memory.

    Args:
        a: [M, K], or [K, M] when transpose_a (any array with
            ``__cuda_array_interface__`` and contiguous rows).
        b: [K, N], or [N, K] when transpose_b.
        c: [M, N] output, written in place.
        accumulate: add the product to c (beta = 1) instead of overwriting it.
    """
    cupy = _import_cupy()
    cublas = _import_cublas()
    rows, columns = c.shape
    depth = a.shape[0] if transpose_a else a.shape[1]
    compute_type, data_type = _TYPES[np.dtype(c.dtype)]
    one = np.ones((), dtype=c.dtype)
    beta = one if accumulate else np.zeros((), dtype=c.dtype)
    # Column-major view (module docstring): c.T[N, M] = op(b).T[N, K] @ op(a).T[K, M].
    op_n, op_t = _constant(cublas, "CUBLAS_OP_N", _CUBLAS_OP_N), _constant(cublas, "CUBLAS_OP_T", _CUBLAS_OP_T)
    device_id = _numba_device_id()
    with cupy.cuda.Device(device_id), _stream_for_numba(_numba_uses_per_thread_stream(), device_id):
        handle = _handle(cupy)
        with _full_precision(cublas, handle):
            cublas.gemmEx(handle, op_t if transpose_b else op_n, op_t if transpose_a else op_n,
                          columns, rows, depth,
                          one.ctypes.data, _pointer(b), data_type, _leading_dimension(b),
                          _pointer(a), data_type, _leading_dimension(a),
                          beta.ctypes.data, _pointer(c), data_type, _leading_dimension(c),
                          compute_type, _constant(cublas, "CUBLAS_GEMM_DEFAULT", _CUBLAS_GEMM_DEFAULT))


def _numba_device_id() -> int:
    from numba import cuda
    return int(cuda.get_current_device().id)


class _full_precision:
    """Context: host pointer mode and a math mode without TF32 on ``handle``, restored on exit."""

    def __init__(self, cublas, handle):
        self.cublas, self.handle = cublas, handle
        self.math_mode = self.pointer_mode = None

    def __enter__(self):
        cublas, handle = self.cublas, self.handle
        host = _constant(cublas, "CUBLAS_POINTER_MODE_HOST", _CUBLAS_POINTER_MODE_HOST)
        pointer_mode = cublas.getPointerMode(handle)
        if pointer_mode != host:
            cublas.setPointerMode(handle, host)
            self.pointer_mode = pointer_mode
        math_mode = cublas.getMathMode(handle)
        if _reduces_precision(math_mode):
            cublas.setMathMode(handle, _constant(cublas, "CUBLAS_DEFAULT_MATH", _CUBLAS_DEFAULT_MATH))
            self.math_mode = math_mode
        return self

    def __exit__(self, *exc_info):
        if self.math_mode is not None:
            self.cublas.setMathMode(self.handle, self.math_mode)
        if self.pointer_mode is not None:
            self.cublas.setPointerMode(self.handle, self.pointer_mode)
        return False


def math_mode_allows_tf32() -> bool:
    """Whether CuPy's cuBLAS handle on the current device is set to allow TF32 (``gemm`` overrides it)."""
    cupy = _import_cupy()
    cublas = _import_cublas()
    return _reduces_precision(cublas.getMathMode(_handle(cupy)))


def _reduces_precision(math_mode: int) -> bool:
    return (int(math_mode) & _MATH_MODE_ENUM_BITS) not in _FULL_PRECISION_MATH_MODES
