"""GEMM benchmark: the numba_cuda backend's products on its Numba kernel, on cuBLAS via CuPy, and torch.matmul.

Usage::

    python benchmarks/gpu_gemm.py --out DIR      # on a GPU: TFLOP/s and errors, < 90 s; writes
                                                 # DIR/gpu_gemm.txt and DIR/gpu_gemm.json
    python benchmarks/gpu_gemm.py --simulate     # tiny shapes under the CUDA simulator: the logic only
    python benchmarks/gpu_gemm.py --sass         # no GPU needed: compile the Numba kernels to sm_90
                                                 # and report registers, spills and the FFMA share of
                                                 # the main loop (ptxas/nvdisasm from the CUDA toolkit
                                                 # or pip's nvidia-cuda-nvcc; --cuda-bin DIR to point)

Shapes (issue 16): for (B, T, I, H) in (64, 100, 256, 256), (256, 100, 256, 1024) and
(64, 200, 512, 1024), the four products of an LSTM layer over all steps:
``projection = x [B*T, I] @ kernel [I, 4H] + bias``, ``dkernel = x.T @ dz``,
``drecurrent = h.T @ dz [B*T, 4H]`` and ``dx = dz @ kernel.T``.

Paths: "numba" is ``launch_numba_gemm`` with its own tile choice; "numba r128"
the same large-tile kernel compiled with a 128-register cap (two blocks per
SM, but ptxas spills), on the projection only (compile time); "cublas" is ``launch_gemm`` forced onto cuBLAS via
CuPy (bias included: a bias-row fill plus a beta = 1 GEMM); "torch" is
``torch.addmm`` / ``torch.mm`` on the same memory with TF32 off. Each is timed
with CUDA events on the default stream around one call, median of several
runs after warm-up (compilation). TFLOP/s counts 2*M*N*K. The error is the
largest absolute difference from a float64 NumPy product over a sample of
64 output rows x 256 columns, divided by the largest reference value there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np

from lstmeng._runtime import timing
from lstmeng.testing import kernel_overrides

LSTM_SHAPES = ((64, 100, 256, 256), (256, 100, 256, 1024), (64, 200, 512, 1024))
SIMULATED_SHAPES = ((2, 3, 5, 3), (1, 4, 6, 5))
TIME_BUDGET_S = 80.0
SAMPLE_ROWS, SAMPLE_COLUMNS = 64, 256


@dataclasses.dataclass(frozen=True)
class Product:
    """One GEMM of an LSTM layer: c[M, N] = op(a) @ op(b) (+ bias); names of the operands below."""

    name: str
    a: str
    b: str
    transpose_a: bool
    transpose_b: bool
    with_bias: bool


PRODUCTS = (
    Product("projection x@W+b", "x", "kernel", False, False, True),
    Product("dkernel x.T@dz", "x", "dz", True, False, False),
    Product("drecurrent h.T@dz", "h", "dz", True, False, False),
    Product("dx dz@W.T", "dz", "kernel", False, True, False),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--simulate", action="store_true", help="tiny shapes under the CUDA simulator")
    mode.add_argument("--sass", action="store_true", help="compile to sm_90 and count registers/FFMAs")
    parser.add_argument("--out", help="directory for gpu_gemm.txt / gpu_gemm.json")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per product and path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (the first compiles)")
    parser.add_argument("--cuda-bin", help="directory with ptxas and nvdisasm (--sass)")
    arguments = parser.parse_args(argv)
    if arguments.simulate:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    elif os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        parser.error("NUMBA_ENABLE_CUDASIM=1 is set: unset it, or pass --simulate")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = sass_report(arguments.cuda_bin) if arguments.sass else benchmark(arguments)
    text = "\n".join(lines)
    print(text if arguments.sass else "")
    if arguments.out:
        os.makedirs(arguments.out, exist_ok=True)
        with open(os.path.join(arguments.out, "gpu_gemm_sass.txt" if arguments.sass else "gpu_gemm.txt"), "w") as f:
            f.write(text + "\n")
    return 0


# -- timing ---------------------------------------------------------------------------------------------------
def benchmark(arguments) -> list[str]:
    from numba import cuda

    from lstmeng.backends import _cuda_cublas
    from lstmeng.backends import _cuda_gemm as gemm

    started = time.perf_counter()
    simulate = arguments.simulate
    torch = _torch(simulate)
    header = _header(cuda, gemm, torch, simulate)
    for line in header:
        print(line, flush=True)
    lines = list(header)
    shapes = SIMULATED_SHAPES if simulate else LSTM_SHAPES
    paths = ["numba", "numba r128", "cublas", "torch"]
    cublas_usable, cublas_reason = (False, "CUDA simulator") if simulate else _cuda_cublas.status()
    rows_out = []
    columns = f"{'shape (B,T,I,H)':<20} {'product':<19} {'M x N x K':<20} " + \
        "  ".join(f"{path + ' TFLOP/s':>17} {'err':>8}" for path in paths)
    print(columns, flush=True)
    lines.append(columns)
    rng = np.random.default_rng(0)
    for shape in shapes:
        batch, steps, features, units = shape
        host = _operands(rng, batch * steps, features, units)
        device = {name: cuda.to_device(array) for name, array in host.items()}
        for product in PRODUCTS:
            if time.perf_counter() - started > TIME_BUDGET_S:
                lines.append(f"(stopped: over the {TIME_BUDGET_S:.0f} s budget)")
                print(lines[-1])
                return _finish(lines, rows_out, arguments)
            a, b = host[product.a], host[product.b]
            rows = a.shape[1] if product.transpose_a else a.shape[0]
            columns_n = b.shape[0] if product.transpose_b else b.shape[1]
            depth = a.shape[0] if product.transpose_a else a.shape[1]
            sample = _sample(rng, rows, columns_n)
            expected = _reference(host, product, sample)
            output = cuda.device_array((rows, columns_n), np.float32)
            row = {"shape": shape, "product": product.name, "m": rows, "n": columns_n, "k": depth}
            cells = []
            for path in paths:
                try:
                    run, reason = _runner(path, product, device, output, gemm, torch, cublas_usable,
                                          cublas_reason, simulate)
                except Exception as failure:
                    run, reason = None, f"setup failed: {type(failure).__name__}: {failure}"
                if run is None:
                    row[path] = {"skipped": reason}
                    cells.append(f"{'-':>17} {'-':>8}")
                    continue
                try:   # one run on the GPU: a failing path is reported, the others still measured
                    _poison(output, simulate)   # a path that writes nothing must show up as an error
                    seconds = _median_time(run, cuda, arguments, simulate)
                    error = _error(output.copy_to_host()[np.ix_(*sample)], expected)
                except Exception as failure:
                    row[path] = {"failed": f"{type(failure).__name__}: {failure}"}
                    cells.append(f"{'FAILED':>17} {'-':>8}")
                    lines.append(f"  {path} on {product.name} {shape}: {type(failure).__name__}: {failure}")
                    print(lines[-1], flush=True)
                    continue
                tflops = 2.0 * rows * columns_n * depth / seconds / 1e12
                row[path] = {"ms": seconds * 1e3, "tflops": tflops, "max_rel_error": error}
                cells.append(f"{tflops:>17.2f} {error:>8.1e}")
            text = f"{str(shape):<20} {product.name:<19} {f'{rows}x{columns_n}x{depth}':<20} " + "  ".join(cells)
            print(text, flush=True)
            lines.append(text)
            rows_out.append(row)
        del device
    lines.append(f"total {time.perf_counter() - started:.1f} s")
    if not cublas_usable:
        lines.append(f"cublas: skipped ({cublas_reason})")
    return _finish(lines, rows_out, arguments)


def _finish(lines, rows_out, arguments):
    if arguments.out:
        os.makedirs(arguments.out, exist_ok=True)
        with open(os.path.join(arguments.out, "gpu_gemm.json"), "w") as f:
            json.dump({"lines": lines, "rows": rows_out}, f, indent=1, default=str)
    print(lines[-1])
    return lines


def _torch(simulate):
    try:
        import torch
    except ImportError:
        return None
    if not simulate and not torch.cuda.is_available():
        return None
    torch.set_float32_matmul_precision("highest")   # no TF32 in matmul
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch


def _header(cuda, gemm, torch, simulate) -> list[str]:
    if simulate:
        device = "CUDA simulator (timings meaningless)"
    else:
        device = cuda.get_current_device().name
        device = device.decode() if isinstance(device, bytes) else str(device)
    versions = [f"python {platform.python_version()}", f"numpy {np.__version__}"]
    for name in ("numba", "numba_cuda", "cupy"):
        try:
            module = __import__(name)
            versions.append(f"{name} {getattr(module, '__version__', '?')}")
        except Exception:
            versions.append(f"{name} -")
    if torch is not None:
        versions.append(f"torch {torch.__version__} (TF32 off)")
    return [f"GEMM benchmark on {device}; {', '.join(versions)}", f"gemm_path(): {gemm.gemm_path()}",
            f"numba tiles: large {gemm.GPU_LARGE_TILES}, small {gemm.GPU_TILES}"]


def _operands(rng, rows, features, units):
    """x [B*T, I], h [B*T, H], dz [B*T, 4H], kernel [I, 4H], bias [4H]; float32, scaled to O(1) results."""
    def normal(shape, scale):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))
    return {"x": normal((rows, features), 1.0), "h": normal((rows, units), 1.0),
            "dz": normal((rows, 4 * units), 1.0 / np.sqrt(rows)),
            "kernel": normal((features, 4 * units), 1.0 / np.sqrt(features)),
            "bias": normal((4 * units,), 1.0)}


def _sample(rng, rows, columns):
    return (np.sort(rng.choice(rows, min(rows, SAMPLE_ROWS), replace=False)),
            np.sort(rng.choice(columns, min(columns, SAMPLE_COLUMNS), replace=False)))


def _reference(host, product, sample):
    """op(a) @ op(b) (+ bias) in float64 on the sampled rows and columns only."""
    row_index, column_index = sample
    a = host[product.a].astype(np.float64)
    b = host[product.b].astype(np.float64)
    a_rows = a[:, row_index].T if product.transpose_a else a[row_index]
    b_columns = b[column_index].T if product.transpose_b else b[:, column_index]
    result = a_rows @ b_columns
    return result + host["bias"][column_index] if product.with_bias else result


def _error(result, expected):
    return float(np.abs(result - expected).max() / max(np.abs(expected).max(), 1e-30))


def _runner(path, product, device, output, gemm, torch, cublas_usable, cublas_reason, simulate):
    """(callable running one product on ``path`` into ``output``, None) or (None, why not)."""
    a, b = device[product.a], device[product.b]
    bias = device["bias"] if product.with_bias else None
    flags = dict(transpose_a=product.transpose_a, transpose_b=product.transpose_b)
    if path == "numba":
        return (lambda: gemm.launch_numba_gemm(a, b, output, bias, **flags)), None
    if path == "numba r128":
        if simulate:
            return None, "register cap has no meaning in the simulator"
        if not product.with_bias:   # each capped variant is one more compile: the projection only
            return None, "measured on the projection only"
        depth = device[product.a].shape[0 if product.transpose_a else 1]
        tiles = gemm.choose_tiles(*output.shape, np.float32, depth)
        if tiles != gemm.GPU_LARGE_TILES:
            return None, "small tiles"
        capped = dataclasses.replace(tiles, max_registers=128)
        return (lambda: gemm.launch_numba_gemm(a, b, output, bias, tiles=capped, **flags)), None
    if path == "cublas":
        if not cublas_usable:
            return None, cublas_reason
        def run_cublas():
            with kernel_overrides(cuda_gemm_path="cublas"):
                gemm.launch_gemm(a, b, output, bias, **flags)
        return run_cublas, None
    if torch is None:
        return None, "torch with CUDA not available"
    as_tensor = (lambda array: torch.as_tensor(array.copy_to_host())) if simulate else \
        (lambda array: torch.as_tensor(array, device="cuda"))
    ta, tb, tc = as_tensor(a), as_tensor(b), as_tensor(output)
    op_a, op_b = (ta.T if product.transpose_a else ta), (tb.T if product.transpose_b else tb)
    if bias is not None:
        tbias = as_tensor(bias)
        run = lambda: torch.addmm(tbias, op_a, op_b, out=tc)   # noqa: E731
    else:
        run = lambda: torch.mm(op_a, op_b, out=tc)   # noqa: E731
    if simulate:   # tc is a host copy: write the result back so that the error is checked
        def run_and_copy():
            run()
            output.copy_to_device(tc.numpy())
        return run_and_copy, None
    return run, None


def _poison(output, simulate) -> None:
    """Fill ``output`` with NaN (all bits set) on the device."""
    if simulate:
        output.copy_to_device(np.full(output.shape, np.nan, np.float32))
        return
    from numba.cuda.cudadrv import driver
    driver.device_memset(output, 0xFF, output.size * output.dtype.itemsize)


def _median_time(run, cuda, arguments, simulate) -> float:
    """Median seconds of ``run()``: between CUDA events, or by wall clock under the simulator."""
    if simulate:
        return timing.median_time(run, arguments.repeats, warmup=arguments.warmup)
    return timing.median_event_ms(run, timing.numba_event_clock(cuda), arguments.repeats,
                                  warmup=arguments.warmup) / 1e3


# -- SASS report ----------------------------------------------------------------------------------------------
def sass_report(cuda_bin=None) -> list[str]:
    """Registers, spills and the main loop's instruction mix of each float32 kernel variant on sm_90."""
    from numba import cuda, types

    from lstmeng.backends import _cuda_gemm as gemm

    tools = _cuda_tools(cuda_bin)
    flat, scalar = types.Array(types.float32, 1, "C"), types.int64
    lines = ["Numba GEMM kernels compiled for sm_90 (float32): registers, spills, main loop"]
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        for tiles_name, tiles in (("large", gemm.GPU_LARGE_TILES), ("small", gemm.GPU_TILES)):
            for product in PRODUCTS:
                kernel = gemm.gemm_kernel(np.float32, tiles, transpose_a=product.transpose_a,
                                          transpose_b=product.transpose_b, with_bias=product.with_bias)
                signature = (flat, flat, flat) + ((flat,) if product.with_bias else ()) + (scalar,) * 3
                ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
                lines.append(f"{tiles_name:<6} {product.name:<19} " + _analyse(ptx, tools, folder))
        for product in PRODUCTS[1:3]:   # the weight gradients, which split K on small outputs
            kernel = gemm.gemm_kernel(np.float32, gemm.GPU_LARGE_TILES, transpose_a=product.transpose_a,
                                      transpose_b=product.transpose_b, split_k=True)
            ptx, _ = cuda.compile_ptx(kernel.py_func, (flat, flat, flat) + (scalar,) * 4, cc=(9, 0))
            lines.append(f"{'split':<6} {product.name:<19} " + _analyse(ptx, tools, folder))
    return lines


def _cuda_tools(cuda_bin):
    import shutil
    candidates = [cuda_bin] if cuda_bin else []
    try:
        import nvidia.cu13  # pip's CUDA 13 compilers (nvidia-cuda-nvcc), a namespace package
        candidates += [os.path.join(folder, "bin") for folder in nvidia.cu13.__path__]
    except Exception:
        pass
    candidates += [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin"), None]
    for folder in candidates:
        ptxas = shutil.which("ptxas", path=folder) if folder else shutil.which("ptxas")
        nvdisasm = shutil.which("nvdisasm", path=folder) if folder else shutil.which("nvdisasm")
        if ptxas and nvdisasm:
            return ptxas, nvdisasm
    raise SystemExit("ptxas and nvdisasm not found: pass --cuda-bin DIR (a CUDA toolkit new enough for "
                     "numba's PTX version)")


def _analyse(ptx, tools, folder) -> str:
    ptxas, nvdisasm = tools
    ptx_path, cubin_path = os.path.join(folder, "k.ptx"), os.path.join(folder, "k.cubin")
    with open(ptx_path, "w") as f:
        f.write(ptx)
    report = subprocess.run([ptxas, "-arch=sm_90", "-v", ptx_path, "-o", cubin_path], capture_output=True,
                            text=True)
    if report.returncode:
        return "ptxas failed: " + report.stderr.strip().splitlines()[-1]
    registers = re.search(r"Used (\d+) registers", report.stderr).group(1)
    spills = re.search(r"(\d+) bytes spill stores", report.stderr).group(1)
    sass = subprocess.run([nvdisasm, "-c", cubin_path], capture_output=True, text=True, check=True).stdout
    loop = _main_loop(sass)
    fma = sum(op.startswith("FFMA") for op in loop)
    shared = [op for op in loop if op.startswith("LDS")]
    widths = sorted(set(shared))
    return (f"{registers} registers, {spills} B spilled; main loop {len(loop)} instructions, {fma} FFMA "
            f"({100.0 * fma / max(len(loop), 1):.1f} %), {len(shared)} shared loads {widths}, "
            f"{sum(op.startswith('LDG') for op in loop)} LDG")


def _main_loop(sass: str) -> list[str]:
    """Opcodes of the loop (label ... backward branch to it) holding the most FFMAs."""
    labels, opcodes = {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(opcodes)
            continue
        instruction = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);", line)
        if instruction:
            opcodes.append((instruction.group(1), instruction.group(2)))
    best = []
    for index, (opcode, operands) in enumerate(opcodes):
        target = re.search(r"(\.L_x_\d+)", operands) if opcode.startswith("BRA") else None
        if target and labels.get(target.group(1), index + 1) <= index:
            body = [op for op, _ in opcodes[labels[target.group(1)]:index + 1]]
            if sum(op.startswith("FFMA") for op in body) > sum(op.startswith("FFMA") for op in best):
                best = body
    return best


if __name__ == "__main__":
    sys.exit(main())
