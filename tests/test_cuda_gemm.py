"""The numba_cuda backend's GEMMs (lstmeng/backends/_cuda_gemm.py, _cuda_cublas.py).

Under the CUDA simulator (the default, see conftest.py): the generated Numba
kernel in every variant against NumPy in float64, the cuBLAS/Numba dispatch
and ``gemm_path()`` with CuPy faked or hidden, and the row-major to
column-major argument mapping of the cuBLAS call against an emulated
column-major ``gemmEx`` that follows the BLAS definition. With
``LSTMENG_REAL_CUDA=1`` on a GPU: both paths at real sizes, TF32 off, and
no copies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import types

import numpy as np
import pytest

numba = pytest.importorskip("numba")
from numba import cuda  # noqa: E402

from lstmeng.backends import _cuda_cublas as cublas_path  # noqa: E402
from lstmeng.backends import _cuda_gemm as gemm  # noqa: E402
from lstmeng.testing import kernel_overrides  # noqa: E402

REAL_GPU = os.environ.get("LSTMENG_REAL_CUDA") == "1"
SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
needs_simulator = pytest.mark.skipif(not SIMULATOR, reason="simulator-only check (tiny tiles, faked CuPy)")
needs_gpu = pytest.mark.skipif(not REAL_GPU, reason="needs LSTMENG_REAL_CUDA=1 and a GPU")


def operands(rows, columns, depth, *, transpose_a, transpose_b, dtype, seed=0):
    """(a, b, bias, c0) host arrays: a [M, K] or [K, M], b [K, N] or [N, K], bias [N], c0 [M, N]."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((depth, rows) if transpose_a else (rows, depth)).astype(dtype)
    b = rng.standard_normal((columns, depth) if transpose_b else (depth, columns)).astype(dtype)
    return a, b, rng.standard_normal(columns).astype(dtype), rng.standard_normal((rows, columns)).astype(dtype)


def reference(a, b, bias, c0, *, transpose_a, transpose_b, accumulate):
    """op(a) @ op(b) (+ bias) (+ c0) in float64 by NumPy."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    product = (a64.T if transpose_a else a64) @ (b64.T if transpose_b else b64)
    if bias is not None:
        product = product + bias
    return product + c0 if accumulate else product


def relative_error(result, expected):
    return float(np.abs(result - expected).max() / max(np.abs(expected).max(), 1e-30))


def run_gemm(launch, a, b, bias, c0, **flags):
    c = cuda.to_device(c0.copy())
    launch(cuda.to_device(a), cuda.to_device(b), c, None if bias is None else cuda.to_device(bias), **flags)
    return c.copy_to_host()


@pytest.fixture
def path_switch(monkeypatch):
    """A clean path switch: no LSTMENG_CUDA_GEMM, no cached CuPy status (and no kernel override:
    none is set outside a ``kernel_overrides`` block)."""
    monkeypatch.delenv(gemm.PATH_VARIABLE, raising=False)
    cublas_path.refresh()
    yield monkeypatch
    monkeypatch.undo()   # the real status() back before its cache is cleared
    cublas_path.refresh()


# -- the Numba kernel under the simulator ---------------------------------------------------------------------
@needs_simulator
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_numba_gemm_variants_match_numpy(transpose_a, transpose_b, with_bias, accumulate):
    # 13 x 11 x 9 leaves partial tiles on every axis (8x8 tiles, k slices of 4).
    flags = dict(transpose_a=transpose_a, transpose_b=transpose_b)
    a, b, bias, c0 = operands(13, 11, 9, dtype=np.float32, **flags)
    bias = bias if with_bias else None
    result = run_gemm(gemm.launch_numba_gemm, a, b, bias, c0, accumulate=accumulate, **flags)
    assert result.dtype == np.float32
    assert relative_error(result, reference(a, b, bias, c0, accumulate=accumulate, **flags)) < 1e-6


@needs_simulator
@pytest.mark.parametrize("rows, columns, depth", [(1, 1, 1), (8, 8, 4), (17, 3, 1), (2, 19, 13), (9, 16, 0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_gemm_odd_sizes_and_dtypes(rows, columns, depth, dtype):
    flags = dict(transpose_a=True, transpose_b=False)
    a, b, bias, c0 = operands(rows, columns, depth, dtype=dtype, **flags)
    result = run_gemm(gemm.launch_numba_gemm, a, b, bias, c0, **flags)
    tolerance = 1e-6 if dtype == np.float32 else 1e-14
    assert result.dtype == dtype
    np.testing.assert_allclose(result, reference(a, b, bias, c0, accumulate=False, **flags),
                               rtol=tolerance, atol=tolerance * 10)


@needs_simulator
@pytest.mark.parametrize("tiles", [gemm.GemmTiles(tile_m=16, tile_n=8, tile_k=4, thread_m=4, thread_n=4),
                                   gemm.GemmTiles(tile_m=8, tile_n=16, tile_k=2, thread_m=2, thread_n=4)])
@pytest.mark.parametrize("transpose_a, transpose_b", [(False, False), (True, False), (False, True)])
def test_numba_gemm_other_tile_shapes(tiles, transpose_a, transpose_b):
    """Non-square tiles and thread tiles exercise the generator's index arithmetic."""
    flags = dict(transpose_a=transpose_a, transpose_b=transpose_b)
    a, b, bias, c0 = operands(21, 18, 7, dtype=np.float32, **flags)
    result = run_gemm(gemm.launch_numba_gemm, a, b, bias, c0, tiles=tiles, **flags)
    assert relative_error(result, reference(a, b, bias, c0, accumulate=False, **flags)) < 1e-6


@needs_simulator
@pytest.mark.parametrize("splits, depth", [(2, 8), (3, 37), (5, 9), (4, 0)])
@pytest.mark.parametrize("with_bias, accumulate", [(False, False), (True, True)])
def test_numba_gemm_split_over_k(splits, depth, with_bias, accumulate):
    """Split-K (partial products per K range, then one ordered sum) gives the same product."""
    flags = dict(transpose_a=True, transpose_b=False)
    a, b, bias, c0 = operands(10, 9, depth, dtype=np.float32, **flags)
    bias = bias if with_bias else None
    result = run_gemm(gemm.launch_numba_gemm, a, b, bias, c0, accumulate=accumulate, splits=splits, **flags)
    assert relative_error(result, reference(a, b, bias, c0, accumulate=accumulate, **flags)) < 1e-6


@needs_simulator
def test_split_k_is_deterministic():
    flags = dict(transpose_a=True, transpose_b=False)
    a, b, bias, c0 = operands(9, 9, 40, dtype=np.float32, **flags)
    first = run_gemm(gemm.launch_numba_gemm, a, b, None, c0, splits=4, **flags)
    np.testing.assert_array_equal(first, run_gemm(gemm.launch_numba_gemm, a, b, None, c0, splits=4, **flags))


def test_split_k_only_where_the_output_cannot_fill_the_gpu():
    assert gemm.choose_splits(blocks=6400, depth=256) == 1            # projection: plenty of tiles
    assert gemm.choose_splits(blocks=16, depth=6400) == 12            # dkernel [256, 1024] over B*T = 6400
    assert gemm.choose_splits(blocks=16, depth=300) == 1              # too little K to share
    assert gemm.choose_splits(blocks=1, depth=10 ** 6) == gemm.SPLIT_K_MAX


@needs_simulator
def test_launch_gemm_without_cupy_runs_the_numba_kernel(path_switch):
    flags = dict(transpose_a=False, transpose_b=True)
    a, b, bias, c0 = operands(12, 10, 6, dtype=np.float32, **flags)
    result = run_gemm(gemm.launch_gemm, a, b, bias, c0, **flags)
    assert relative_error(result, reference(a, b, bias, c0, accumulate=False, **flags)) < 1e-6


def test_tile_shapes_are_validated():
    with pytest.raises(ValueError, match="even"):
        gemm.GemmTiles(tile_m=8, tile_n=8, tile_k=4, thread_m=3, thread_n=4).check()
    with pytest.raises(ValueError, match="split evenly"):
        gemm.GemmTiles(tile_m=8, tile_n=8, tile_k=1, thread_m=2, thread_n=2).check()   # 8 loads, 16 threads
    for tiles in (gemm.GPU_LARGE_TILES, gemm.GPU_TILES, gemm.SIMULATOR_TILES):
        tiles.check()
    assert gemm.GPU_LARGE_TILES.threads == 256 and gemm.GPU_TILES.threads == 256


def test_kernel_source_fixes_every_flag_at_generation():
    """No launch-wide flag reaches the kernel as an argument: each variant is its own source."""
    plain = gemm.kernel_source(gemm.GPU_LARGE_TILES, transpose_a=False, transpose_b=False,
                               with_bias=False, accumulate=False)
    biased = gemm.kernel_source(gemm.GPU_LARGE_TILES, transpose_a=True, transpose_b=True,
                                with_bias=True, accumulate=True)
    assert plain.startswith("def gemm(a, b, c, rows, columns, depth):")
    assert biased.startswith("def gemm(a, b, c, bias, rows, columns, depth):")
    assert "transpose" not in plain and "accumulate" not in plain
    assert plain.count("+= a") == 8 * 8 * 8        # 8x8 outputs per thread, 8 k steps per slice
    assert plain != gemm.kernel_source(gemm.GPU_LARGE_TILES, transpose_a=True, transpose_b=False,
                                       with_bias=False, accumulate=False)


def test_tile_choice_follows_output_size_and_dtype():
    assert gemm.choose_tiles(25600, 4096) == gemm.GPU_LARGE_TILES
    assert gemm.choose_tiles(256, 1024) == gemm.GPU_TILES          # 16 large tiles cannot fill a GPU ...
    assert gemm.choose_tiles(256, 1024, np.float32, 6400) == gemm.GPU_LARGE_TILES   # ... unless K is split
    assert gemm.choose_tiles(25600, 4096, np.float64) == gemm.GPU_TILES


@needs_simulator
@pytest.mark.parametrize("strided", ["a", "b", "c"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_numba_gemm_on_strided_views(strided, accumulate):
    """Views of user arrays (every other column, a transposed array) still give the right product."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((9, 14)).astype(np.float32)[:, ::2] if strided == "a" else \
        rng.standard_normal((9, 7)).astype(np.float32)
    b = rng.standard_normal((5, 7)).astype(np.float32).T if strided == "b" else \
        rng.standard_normal((7, 5)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    c_storage = rng.standard_normal((9, 10)).astype(np.float32)
    c_host = c_storage[:, ::2] if strided == "c" else c_storage[:, :5].copy()
    expected = reference(a, b, bias, c_host, transpose_a=False, transpose_b=False, accumulate=accumulate)
    a_device = cuda.to_device(np.ascontiguousarray(a)) if strided != "a" else cuda.to_device(
        a.base if a.base is not None else a)[:, ::2]
    b_device = cuda.to_device(b) if strided != "b" else cuda.to_device(np.ascontiguousarray(b.T)).T
    storage_device = cuda.to_device(c_storage)
    c_device = storage_device[:, ::2] if strided == "c" else cuda.to_device(c_host)
    gemm.launch_numba_gemm(a_device, b_device, c_device, cuda.to_device(bias), accumulate=accumulate)
    assert relative_error(c_device.copy_to_host(), expected) < 1e-6
    if strided == "c":   # the columns between the view's are untouched
        np.testing.assert_array_equal(storage_device.copy_to_host()[:, 1::2], c_storage[:, 1::2])


# -- path choice ----------------------------------------------------------------------------------------------
def _fake_cublas_usable(monkeypatch, usable=True, description="CuPy 14.2.0 (float32/float64, no TF32)"):
    monkeypatch.setattr(gemm, "_simulator_enabled", lambda: False)
    monkeypatch.setattr(cublas_path, "status", lambda: (usable, description if usable else "CuPy not installed"))
    monkeypatch.setattr(cublas_path, "supports", lambda a, b, c: True)


BIG = types.SimpleNamespace(shape=(25600, 256)), types.SimpleNamespace(shape=(256, 4096)), \
    types.SimpleNamespace(shape=(25600, 4096))
SMALL = types.SimpleNamespace(shape=(4, 8)), types.SimpleNamespace(shape=(8, 16)), types.SimpleNamespace(shape=(4, 16))


def test_auto_picks_cublas_for_large_products_only(path_switch):
    _fake_cublas_usable(path_switch)
    assert gemm.choose_path(*BIG) == "cublas"
    assert gemm.choose_path(*SMALL) == "numba"
    assert gemm.gemm_path().startswith("cuBLAS via CuPy 14.2.0 (float32/float64, no TF32)")
    assert "Numba tiled GEMM" in gemm.gemm_path()   # says where the small products go


def test_auto_without_cupy_uses_numba(path_switch):
    _fake_cublas_usable(path_switch, usable=False)
    assert gemm.choose_path(*BIG) == "numba"
    assert gemm.gemm_path() == "Numba tiled GEMM (CuPy not installed)"


@pytest.mark.parametrize("setting", ["environment", "kernel_overrides"])
def test_forced_paths(path_switch, setting):
    _fake_cublas_usable(path_switch)
    with contextlib.ExitStack() as blocks:
        def force(value):
            if setting == "environment":
                path_switch.setenv(gemm.PATH_VARIABLE, value)
            else:
                blocks.enter_context(kernel_overrides(cuda_gemm_path=value))

        force("numba")
        assert gemm.choose_path(*BIG) == "numba"
        assert gemm.gemm_path() == "Numba tiled GEMM (forced by LSTMENG_CUDA_GEMM=numba)"
        force("cublas")
        assert gemm.choose_path(*SMALL) == "cublas"
        assert gemm.gemm_path() == "cuBLAS via CuPy 14.2.0 (float32/float64, no TF32)"
    path_switch.setenv(gemm.PATH_VARIABLE, "CUBLAS ")
    assert gemm.choose_path(*SMALL) == "cublas"


def test_kernel_override_overrides_the_environment(path_switch):
    _fake_cublas_usable(path_switch)
    path_switch.setenv(gemm.PATH_VARIABLE, "cublas")
    with kernel_overrides(cuda_gemm_path="numba"):
        assert gemm.choose_path(*BIG) == "numba"
    assert gemm.choose_path(*BIG) == "cublas"


def test_forced_cublas_without_cupy_fails_loudly(path_switch):
    _fake_cublas_usable(path_switch, usable=False)
    path_switch.setenv(gemm.PATH_VARIABLE, "cublas")
    with pytest.raises(RuntimeError, match="LSTMENG_CUDA_GEMM=cublas.*CuPy not installed"):
        gemm.choose_path(*BIG)
    assert gemm.gemm_path() == "unavailable: LSTMENG_CUDA_GEMM=cublas but CuPy not installed"


def test_bad_switch_value_names_the_variable(path_switch):
    path_switch.setenv(gemm.PATH_VARIABLE, "cudnn")
    with pytest.raises(ValueError, match="LSTMENG_CUDA_GEMM must be one of auto, numba, cublas, got 'cudnn'"):
        gemm.choose_path(*BIG)


@needs_simulator
def test_simulator_never_imports_cupy(path_switch):
    def no_import():
        raise AssertionError("CuPy imported under the simulator")

    path_switch.setattr(cublas_path, "_import_cupy", no_import)
    assert gemm.choose_path(*BIG) == "numba"
    assert gemm.gemm_path() == "Numba tiled GEMM (CUDA simulator)"
    path_switch.setenv(gemm.PATH_VARIABLE, "cublas")
    with pytest.raises(RuntimeError, match="CUDA simulator"):
        gemm.choose_path(*BIG)


# -- CuPy's status --------------------------------------------------------------------------------------------
def test_status_without_cupy(path_switch):
    path_switch.setitem(sys.modules, "cupy", None)   # makes `import cupy` raise ImportError
    assert cublas_path.status() == (False, "CuPy not installed")


def _fake_cupy(device_count=1, handle_error=None, version="14.2.0"):
    def get_cublas_handle():
        if handle_error is not None:
            raise handle_error
        return 7

    cupy_cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: device_count),
                                      device=types.SimpleNamespace(get_cublas_handle=get_cublas_handle))
    return types.SimpleNamespace(__version__=version, cuda=cupy_cuda)


@pytest.fixture
def fake_cublas_bindings(path_switch):
    path_switch.setattr(cublas_path, "_import_cublas", lambda: EmulatedCublas())


@pytest.mark.parametrize("fake, expected", [
    (_fake_cupy(), (True, "CuPy 14.2.0 (float32/float64, no TF32)")),
    (_fake_cupy(device_count=0), (False, "CuPy 14.2.0 unusable: no CUDA device")),
    (_fake_cupy(handle_error=OSError("libcublas.so.13: cannot open shared object file\nmore")),
     (False, "CuPy 14.2.0 unusable: OSError: libcublas.so.13: cannot open shared object file")),
])
def test_status_reports_why(fake_cublas_bindings, path_switch, fake, expected):
    path_switch.setattr(cublas_path, "_import_cupy", lambda: fake)
    assert cublas_path.status() == expected


def test_status_when_cupy_import_breaks(path_switch):
    def broken():
        raise ImportError("libcudart.so.13: cannot open shared object file", name="cupy_backends.cuda")

    path_switch.setattr(cublas_path, "_import_cupy", broken)
    assert cublas_path.status() == (False, "CuPy import failed: libcudart.so.13: cannot open shared object file")


def test_supports_needs_rows_with_unit_stride_and_one_dtype():
    f32 = np.zeros((6, 4), np.float32)
    assert cublas_path.supports(f32, f32.T.copy(), f32)
    assert not cublas_path.supports(f32[:, ::2], f32, f32)                  # strided columns
    assert cublas_path.supports(np.zeros((6, 8), np.float32)[:, :4], f32, f32)   # row stride 8: ld = 8
    assert not cublas_path.supports(f32, f32.astype(np.float64), f32)
    assert not cublas_path.supports(f32.astype(np.float16), f32, f32)


# -- the cuBLAS call, against an emulated column-major gemmEx --------------------------------------------------
class EmulatedCublas(types.ModuleType):
    """cublasGemmEx by its column-major definition, on host memory; records math and pointer modes."""

    CUBLAS_OP_N, CUBLAS_OP_T = 0, 1

    def __init__(self, math_mode=0):
        super().__init__("cupy.cuda.cublas")
        self.math_mode, self.pointer_mode = math_mode, 0
        self.modes_during_call = []

    def getMathMode(self, handle):
        return self.math_mode

    def setMathMode(self, handle, mode):
        self.math_mode = mode

    def getPointerMode(self, handle):
        return self.pointer_mode

    def setPointerMode(self, handle, mode):
        self.pointer_mode = mode

    def gemmEx(self, handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
               computeType, algo):
        assert Atype == Btype == Ctype and computeType == {0: 68, 1: 70}[Ctype]   # COMPUTE_32F / _64F
        self.modes_during_call.append((self.math_mode, self.pointer_mode))
        dtype = np.dtype({0: np.float32, 1: np.float64}[Ctype])

        def column_major(address, row_count, column_count, leading):
            assert leading >= max(1, row_count)
            buffer = (ctypes.c_char * (leading * column_count * dtype.itemsize)).from_address(address)
            flat = np.frombuffer(buffer, dtype=dtype)
            return np.lib.stride_tricks.as_strided(flat, (row_count, column_count), (dtype.itemsize,
                                                                                    leading * dtype.itemsize))

        def scalar(address):
            return np.frombuffer((ctypes.c_char * dtype.itemsize).from_address(address), dtype=dtype)[0]

        op_a = column_major(A, m, k, lda) if transa == self.CUBLAS_OP_N else column_major(A, k, m, lda).T
        op_b = column_major(B, k, n, ldb) if transb == self.CUBLAS_OP_N else column_major(B, n, k, ldb).T
        c = column_major(C, m, n, ldc)
        c[...] = scalar(alpha) * (op_a.astype(np.float64) @ op_b) + scalar(beta) * c


@pytest.fixture
def emulated_cublas(path_switch):
    """``_cuda_cublas.gemm`` on host NumPy arrays through an emulated CuPy and cuBLAS."""
    fake_blas = EmulatedCublas()
    fake_cupy = types.ModuleType("cupy")
    fake_cupy.cuda = types.ModuleType("cupy.cuda")
    fake_cupy.cuda.cublas = fake_blas
    fake_cupy.cuda.Device = lambda device_id: contextlib.nullcontext()
    fake_cupy.cuda.ExternalStream = lambda handle, device_id: contextlib.nullcontext()
    fake_cupy.cuda.device = types.SimpleNamespace(get_cublas_handle=lambda: 7)
    path_switch.setattr(cublas_path, "_import_cupy", lambda: fake_cupy)
    path_switch.setattr(cublas_path, "_import_cublas", lambda: fake_blas)
    path_switch.setattr(cublas_path, "_pointer", lambda array: array.ctypes.data)
    path_switch.setattr(cublas_path, "_numba_device_id", lambda: 0)
    cublas_path._stream_for_numba.cache_clear()
    yield fake_blas
    cublas_path._stream_for_numba.cache_clear()


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cublas_call_maps_row_major_to_column_major(emulated_cublas, transpose_a, transpose_b, accumulate, dtype):
    flags = dict(transpose_a=transpose_a, transpose_b=transpose_b)
    a, b, _, c0 = operands(7, 5, 3, dtype=dtype, **flags)
    c = c0.copy()
    address = c.ctypes.data
    cublas_path.gemm(a, b, c, accumulate=accumulate, **flags)
    assert c.ctypes.data == address
    np.testing.assert_allclose(c, reference(a, b, None, c0, accumulate=accumulate, **flags), rtol=1e-5, atol=1e-5)


def test_cublas_call_on_row_strided_views(emulated_cublas):
    """Views whose rows are contiguous but farther apart than their width go as leading dimensions."""
    rng = np.random.default_rng(1)
    a_storage, c_storage = rng.standard_normal((6, 9)), np.zeros((6, 11))
    a, b, c = a_storage[:, 2:6], rng.standard_normal((4, 3)), c_storage[:, 1:4]
    cublas_path.gemm(a, b, c)
    np.testing.assert_allclose(c, a @ b, rtol=1e-12)
    assert not c_storage[:, 4:].any() and not c_storage[:, :1].any()   # nothing outside the view written


@pytest.mark.parametrize("mode, overridden", [(3, True), (1, True), (3 | 16, True), (0, False), (2, False),
                                              (16, False)])
def test_tf32_math_mode_is_overridden_for_the_call_and_restored(emulated_cublas, mode, overridden):
    emulated_cublas.math_mode = mode
    emulated_cublas.pointer_mode = 1   # device pointer mode left behind by someone else
    a, b, _, c0 = operands(4, 4, 4, transpose_a=False, transpose_b=False, dtype=np.float32)
    cublas_path.gemm(a, b, c0.copy())
    assert emulated_cublas.modes_during_call == [(0 if overridden else mode, 0)]
    assert (emulated_cublas.math_mode, emulated_cublas.pointer_mode) == (mode, 1)


@needs_simulator
@pytest.mark.parametrize("accumulate", [False, True])
def test_launch_gemm_on_the_cublas_path_adds_the_bias_in_the_epilogue(path_switch, accumulate):
    """The cuBLAS branch fills c with the bias rows (a Numba kernel) and asks cuBLAS for beta = 1."""
    calls = []

    def host_cublas(a, b, c, *, transpose_a, transpose_b, accumulate):
        calls.append(accumulate)
        a_host, b_host, c_host = a.copy_to_host(), b.copy_to_host(), c.copy_to_host()
        c.copy_to_device(reference(a_host, b_host, None, c_host, transpose_a=transpose_a,
                                   transpose_b=transpose_b, accumulate=accumulate).astype(c_host.dtype))

    path_switch.setattr(gemm, "choose_path", lambda *args, **kwargs: "cublas")
    path_switch.setattr(cublas_path, "gemm", host_cublas)
    flags = dict(transpose_a=True, transpose_b=False)
    a, b, bias, c0 = operands(9, 7, 5, dtype=np.float32, **flags)
    result = run_gemm(gemm.launch_gemm, a, b, bias, c0, accumulate=accumulate, **flags)
    assert calls == [True]
    assert relative_error(result, reference(a, b, bias, c0, accumulate=accumulate, **flags)) < 1e-6


# -- on a real GPU --------------------------------------------------------------------------------------------
def _gpu_paths():
    paths = ["numba"]
    if REAL_GPU:
        cublas_path.refresh()
        if cublas_path.status()[0]:
            paths.append("cublas")
    return paths


#: The LSTM's products at B=64, T=100, I=256, H=256: projection, dkernel, drecurrent_kernel, dx.
REAL_SHAPES = [
    dict(rows=6400, columns=1024, depth=256, transpose_a=False, transpose_b=False, with_bias=True),
    dict(rows=256, columns=1024, depth=6400, transpose_a=True, transpose_b=False, with_bias=False),
    dict(rows=6400, columns=256, depth=1024, transpose_a=False, transpose_b=True, with_bias=False),
    dict(rows=1000, columns=777, depth=333, transpose_a=True, transpose_b=True, with_bias=True),
]


@needs_gpu
@pytest.mark.parametrize("path", ["numba", "cublas"])
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda shape: "x".join(str(shape[k]) for k in
                                                                           ("rows", "columns", "depth")))
def test_gpu_paths_match_float64(path_switch, path, shape):
    if path not in _gpu_paths():
        pytest.skip(f"cuBLAS path unusable: {cublas_path.status()[1]}")
    path_switch.setenv(gemm.PATH_VARIABLE, path)
    flags = dict(transpose_a=shape["transpose_a"], transpose_b=shape["transpose_b"])
    a, b, bias, c0 = operands(shape["rows"], shape["columns"], shape["depth"], dtype=np.float32, **flags)
    bias = bias if shape["with_bias"] else None
    result = run_gemm(gemm.launch_gemm, a, b, bias, c0, **flags)
    assert relative_error(result, reference(a, b, bias, c0, accumulate=False, **flags)) < 2e-5


def _normwise_error(result, expected):
    return float(np.linalg.norm(result - expected) / np.linalg.norm(expected))


_BIG_PRODUCT: dict = {}


def _big_product():
    """(a, b, a @ b in float64) for 4096^3, computed once per session (seconds on the host)."""
    if not _BIG_PRODUCT:
        a, b, _, _ = operands(4096, 4096, 4096, transpose_a=False, transpose_b=False, dtype=np.float32)
        _BIG_PRODUCT.update(a=a, b=b, expected=a.astype(np.float64) @ b.astype(np.float64))
    return _BIG_PRODUCT["a"], _BIG_PRODUCT["b"], _BIG_PRODUCT["expected"]


@needs_gpu
@pytest.mark.parametrize("path", ["numba", "cublas"])
def test_gpu_float32_without_tf32(path_switch, path):
    """A 4096^3 product in float32 is ~1e-6 from float64 (normwise); TF32 would give ~3e-4."""
    if path not in _gpu_paths():
        pytest.skip(f"cuBLAS path unusable: {cublas_path.status()[1]}")
    path_switch.setenv(gemm.PATH_VARIABLE, path)
    a, b, expected = _big_product()
    a_device, b_device = cuda.to_device(a), cuda.to_device(b)
    c = cuda.device_array((4096, 4096), np.float32)
    if path == "cublas":   # a handle left in TF32 mode by other code must not matter
        import cupy
        cublas = cublas_path._import_cublas()
        handle = cupy.cuda.device.get_cublas_handle()
        previous = cublas.getMathMode(handle)
        cublas.setMathMode(handle, 3)   # CUBLAS_TF32_TENSOR_OP_MATH
        try:
            gemm.launch_gemm(a_device, b_device, c)
        finally:
            assert cublas.getMathMode(handle) == 3
            cublas.setMathMode(handle, previous)
    else:
        gemm.launch_gemm(a_device, b_device, c)
    assert _normwise_error(c.copy_to_host(), expected) < 1e-5


@needs_gpu
def test_gpu_tf32_check_can_fail(path_switch):
    """Positive control: the same product with TF32 explicitly requested is far outside that bound."""
    if "cublas" not in _gpu_paths():
        pytest.skip(f"cuBLAS path unusable: {cublas_path.status()[1]}")
    import cupy
    cublas = cublas_path._import_cublas()
    a, b, expected = _big_product()
    a_device, b_device, c = cupy.asarray(a), cupy.asarray(b), cupy.empty((4096, 4096), np.float32)
    one, zero = np.ones((), np.float32), np.zeros((), np.float32)
    # Column-major: c.T = b.T @ a.T, as in _cuda_cublas.gemm; 77 = CUBLAS_COMPUTE_32F_FAST_TF32.
    cublas.gemmEx(cupy.cuda.device.get_cublas_handle(), 0, 0, 4096, 4096, 4096, one.ctypes.data, b_device.data.ptr,
                  0, 4096, a_device.data.ptr, 0, 4096, zero.ctypes.data, c.data.ptr, 0, 4096, 77, -1)
    assert _normwise_error(cupy.asnumpy(c), expected) > 5e-5


@needs_gpu
def test_gpu_cublas_writes_the_callers_array_without_copies(path_switch):
    if "cublas" not in _gpu_paths():
        pytest.skip(f"cuBLAS path unusable: {cublas_path.status()[1]}")
    import cupy
    path_switch.setenv(gemm.PATH_VARIABLE, "cublas")
    flags = dict(transpose_a=False, transpose_b=False)
    a, b, bias, c0 = operands(2048, 1024, 256, dtype=np.float32, **flags)
    a_device, b_device, bias_device = cuda.to_device(a), cuda.to_device(b), cuda.to_device(bias)
    c = cuda.to_device(c0)
    address = c.device_ctypes_pointer.value
    pool = cupy.get_default_memory_pool()
    gemm.launch_gemm(a_device, b_device, c, bias_device)   # warm-up (handle, kernels)
    cuda.synchronize()
    used_before = pool.used_bytes()
    gemm.launch_gemm(a_device, b_device, c, bias_device)
    cuda.synchronize()
    assert pool.used_bytes() == used_before                  # CuPy allocated nothing
    assert c.device_ctypes_pointer.value == address          # the result is in the caller's array
    assert relative_error(c.copy_to_host(), reference(a, b, bias, c0, accumulate=False, **flags)) < 2e-5
    np.testing.assert_array_equal(a_device.copy_to_host(), a)  # inputs untouched


# -- compiling for a real GPU without one ----------------------------------------------------------------------
_PTX_CHECK = r'''
import re, sys
import numba
import numpy as np
from numba import cuda, types
try:
    cuda.compile_ptx(lambda a: None, (types.float32[:],), cc=(9, 0))
except Exception as error:
    print("SKIP", type(error).__name__, str(error).splitlines()[0]); sys.exit(0)
from lstmeng.backends import _cuda_gemm as gemm
for dtype, tiles in ((np.float32, gemm.GPU_LARGE_TILES), (np.float64, gemm.GPU_TILES)):
    flat = types.Array(numba.from_dtype(np.dtype(dtype)), 1, "C")
    for transpose_a, transpose_b, with_bias, split_k in ((False, False, True, False), (True, False, False, False),
                                                        (False, True, False, False), (True, False, False, True)):
        kernel = gemm.gemm_kernel(dtype, tiles, transpose_a=transpose_a, transpose_b=transpose_b,
                                  with_bias=with_bias, split_k=split_k)
        signature = (flat,) * (4 if with_bias else 3) + (types.int64,) * (4 if split_k else 3)
        ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
        depot = re.findall(r"__local_depot\d+\[(\d+)\]", ptx)
        print("OK", np.dtype(dtype).name, transpose_a, transpose_b, with_bias, split_k, "local bytes",
              depot[0] if depot else 0, "ld.shared.v4" in ptx)
'''


@pytest.mark.slow
@pytest.mark.skipif(REAL_GPU, reason="the GPU session compiles the kernels for real")
def test_numba_gemm_compiles_to_hopper_ptx_with_accumulators_in_registers():
    """Every kernel variant compiles to sm_90 PTX with no local-memory depot (the 8x8 accumulators stay in
    registers), and the float32 kernel reads shared memory as 16-byte vectors. Skipped without libnvvm."""
    import subprocess
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _PTX_CHECK], capture_output=True, text=True, env=env,
                            timeout=900, cwd=repository)
    assert result.returncode == 0, result.stdout + result.stderr
    if result.stdout.startswith("SKIP"):
        pytest.skip(f"no CUDA compiler libraries: {result.stdout.strip()}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("OK")]
    assert len(lines) == 8, result.stdout
    for line in lines:
        assert "local bytes 0" in line, line
        if "float32" in line:
            assert line.endswith("True"), line


@needs_gpu
def test_gpu_cublas_is_ordered_with_numba_launches(path_switch):
    """Numba kernel -> cuBLAS -> Numba kernel with no synchronisation in between, while user code has a
    non-blocking CuPy stream current: the GEMM must still run on numba's default stream, in order."""
    if "cublas" not in _gpu_paths():
        pytest.skip(f"cuBLAS path unusable: {cublas_path.status()[1]}")
    import cupy
    path_switch.setenv(gemm.PATH_VARIABLE, "cublas")
    flags = dict(transpose_a=False, transpose_b=False)
    a, b, bias, _ = operands(4096, 4096, 2048, dtype=np.float32, **flags)
    a_source, b_device, bias_device = cuda.to_device(a), cuda.to_device(b), cuda.to_device(bias)
    a_device = cuda.device_array_like(a_source)
    c, c_copy = cuda.device_array((4096, 4096), np.float32), cuda.device_array((4096, 4096), np.float32)
    cuda.synchronize()
    with cupy.cuda.Stream(non_blocking=True):
        gemm._launch_copy_2d(a_source, a_device)              # producer (numba, default stream)
        gemm.launch_gemm(a_device, b_device, c, bias_device)  # cuBLAS
        gemm._launch_copy_2d(c, c_copy)                       # consumer (numba, default stream)
    assert relative_error(c_copy.copy_to_host(), reference(a, b, bias, 0, accumulate=False, **flags)) < 2e-5


@needs_gpu
@pytest.mark.parametrize("path", ["numba", "cublas"])
def test_gpu_float64_accumulate_and_split_k(path_switch, path):
    """float64, accumulate and bias at an odd size whose K is split on the Numba path."""
    if path not in _gpu_paths():
        pytest.skip(f"cuBLAS path unusable: {cublas_path.status()[1]}")
    path_switch.setenv(gemm.PATH_VARIABLE, path)
    flags = dict(transpose_a=True, transpose_b=False)
    a, b, bias, c0 = operands(130, 250, 3001, dtype=np.float64, **flags)
    result = run_gemm(gemm.launch_gemm, a, b, bias, c0, accumulate=True, **flags)
    assert relative_error(result, reference(a, b, bias, c0, accumulate=True, **flags)) < 1e-12


# -- the benchmark script -------------------------------------------------------------------------------------
@needs_simulator
def test_gemm_benchmark_runs_in_simulate_mode(tmp_path, capsys, monkeypatch):
    """benchmarks/gpu_gemm.py --simulate: every product on the Numba path, errors against float64 small,
    cuBLAS reported as skipped with its reason, and the JSON written."""
    import importlib.util
    import json
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_gemm.py")
    spec = importlib.util.spec_from_file_location("gpu_gemm", path)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_gemm", script)   # dataclasses look their module up there
    spec.loader.exec_module(script)
    assert script.main(["--simulate", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_gemm.json").read_text())
    assert len(report["rows"]) == len(script.SIMULATED_SHAPES) * len(script.PRODUCTS)
    for row in report["rows"]:
        assert row["numba"]["max_rel_error"] < 1e-6, row
        assert row["cublas"] == {"skipped": "CUDA simulator"}
    assert "gemm_path(): Numba tiled GEMM (CUDA simulator)" in capsys.readouterr().out
