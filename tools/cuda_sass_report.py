"""Machine code report of the recurrence kernels for sm_90, without a GPU.

For each kernel variant (the general kernels of ``_cuda_recurrence`` and the
small-batch kernels of ``_cuda_recurrence_small``, float32, H=1024 and
H=256): numba compiles the kernel to PTX (``cuda.compile_ptx``), ``ptxas``
assembles it for sm_90 (``-v``: registers, spills, stack, shared memory),
``nvdisasm`` prints the SASS, and the report counts the instructions of the
FMA loop: the smallest loop (a backward branch) around the basic block with
the most FMAs (FFMA/DFMA). It prints the whole loop's instructions per FMA
and the FMA block's own ratio.

Usage (NUMBA_ENABLE_CUDASIM must be unset; numba needs libnvvm, e.g. the
nvidia-nvvm wheel, and ptxas/nvdisasm come from nvidia-cuda-nvcc and
nvidia-cuda-nvdisasm)::

    python tools/cuda_sass_report.py > docs/benchmarks/sass_report.txt

Static counts: a loop's instructions per FMA is what one pass of the loop
costs per FMA it issues; the step's other work (staging, reductions, cell
update, barrier) is outside the FMA loop and is not in the ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

if os.environ.get("NUMBA_ENABLE_CUDASIM"):
    sys.exit("cuda_sass_report: unset NUMBA_ENABLE_CUDASIM (the simulator cannot compile PTX)")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import cuda, typeof  # noqa: E402

COMPUTE_CAPABILITY = (9, 0)


def _tool(name: str) -> str:
    """ptxas/nvdisasm: the NVIDIA wheels' copy (matching NVVM's PTX version) first, then PATH."""
    try:
        import nvidia
        for base in nvidia.__path__:
            for candidate in sorted(Path(base).glob(f"*/bin/{name}")):
                return str(candidate)
    except ImportError:
        pass
    found = shutil.which(name)
    if found is None:
        sys.exit(f"cuda_sass_report: {name} not found (pip install nvidia-cuda-nvcc nvidia-cuda-nvdisasm)")
    return found


def _array(shape, dtype):
    return typeof(np.empty(shape, dtype))


def _variants():
    """(label, python function, numba signature, dynamic shared bytes at launch) of every variant.

    Shared memory is dynamic in both designs (sized at launch), so it comes from the
    launch plan on a 132-SM sm_90 GPU with 227 KB of opt-in shared memory, not from ptxas.
    """
    import numba.cuda.dispatcher as dispatcher
    # Device functions ask the current device for its compute capability; there is none here.
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=COMPUTE_CAPABILITY)
    from lstmeng.backends import _cuda_recurrence as general
    from lstmeng.backends import _cuda_recurrence_small as small
    from lstmeng.backends.base import SequenceOptions

    dt = np.dtype("float32")
    f1, f2, f3 = _array(2, dt), _array((2, 2), dt), _array((2, 2, 2), dt)
    m2, counter = _array((2, 2), bool), _array(1, np.uint32)
    i64, b1 = numba.int64, numba.boolean
    # units_per_block and weights_in_shared: the flags are compile-time (SequenceOptions).
    general_forward = (f3, f2, f2, m2, m2, f2, f2, f3, f2, f3, f3, f3, f3, i64, b1)
    general_backward = (f3, f2, f2, m2, m2, f3, f3, f2, f2, f2, f3, i64, b1)
    training_options = SequenceOptions(training=True)
    small_forward = (f3, f2, f2, m2, m2, f2, f2, f3, f2, f3, f3, f3, f3, counter, f1)
    small_backward = (f3, f2, f2, m2, m2, f3, f3, f2, f2, f2, f3, counter, f1)
    variants = []
    for rows in (1, 8):
        shape = dataclasses.replace(general.GPU_SHAPES["float32"], rows=rows)
        for units in (1024, 256):
            owned, _, in_shared = general.choose_partition(units, 4, shape, 132, 227 * 1024)
            shared = shape.shared_values(units, owned, in_shared) * 4
            variants.append((f"general forward  H={units} rows={rows}",
                             general.forward_kernel(dt, shape, training_options).py_func,
                             general_forward, shared))
            variants.append((f"general backward H={units} rows={rows}",
                             general.backward_kernel(dt, shape, training_options).py_func,
                             general_backward, shared))
    for units in (1024, 256):
        for batch in (1, 8):
            for training in (False, True):
                config = small.plan("forward", dt, units, batch, SequenceOptions(training=training),
                                    simulator=False, multiprocessors=132, optin_limit=227 * 1024)
                label = (f"small forward  H={units} B={batch} {'training ' if training else 'inference'} "
                         f"U={config.units_per_block} weights {'shared' if config.weights_in_shared else 'global'}")
                variants.append((label, small.kernel_for(config).py_func, small_forward, config.shared_values() * 4))
            config = small.plan("backward", dt, units, batch, training_options, simulator=False,
                                multiprocessors=132, optin_limit=227 * 1024)
            label = (f"small backward H={units} B={batch}           U={config.units_per_block} weights "
                     f"{'shared' if config.weights_in_shared else 'global'}")
            variants.append((label, small.kernel_for(config).py_func, small_backward, config.shared_values() * 4))
    # The masked, dropout, reversed variant: the flags add code outside the FMA loop only.
    flagged = SequenceOptions(reverse=True, training=True, has_mask=True, has_recurrent_dropout=True)
    config = small.plan("forward", dt, 1024, 8, flagged, simulator=False, multiprocessors=132,
                        optin_limit=227 * 1024)
    variants.append(("small forward  H=1024 B=8 training+mask+dropout+reverse", small.kernel_for(config).py_func,
                     small_forward, config.shared_values() * 4))
    return variants


_RESOURCE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "static_shared": re.compile(r"(\d+) bytes smem"),
}
_ADDRESS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH_TARGET = re.compile(r"BRA\b.*`\((\.L_x_\d+)\)")
_LABEL = re.compile(r"^(\.L_x_\d+):")


def _kernel_sass(sass: str, name_fragment: str) -> list[tuple[int, str, str | None]]:
    """[(address, instruction, label starting here)] of the function whose name contains the fragment."""
    lines = sass.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith(".text.") and name_fragment in line and line.rstrip().endswith(":"))
    instructions, pending_label = [], None
    for line in lines[start + 1:]:
        if line.lstrip().startswith(".section"):
            break
        label = _LABEL.match(line.strip())
        if label:
            pending_label = label.group(1)
            continue
        match = _ADDRESS.search(line)
        if match:
            instructions.append((int(match.group(1), 16), match.group(2).strip(), pending_label))
            pending_label = None
    return instructions


def _opcode(instruction: str) -> str:
    """The opcode with its modifiers, without a predicate guard (``@P0``)."""
    tokens = instruction.split()
    return tokens[1] if tokens[0].startswith("@") and len(tokens) > 1 else tokens[0]


def _is_fma(instruction: str) -> bool:
    return _opcode(instruction).split(".")[0] in ("FFMA", "DFMA")


def _fma_loop(instructions):
    """(loop instructions, loop FMAs, block instructions, block FMAs) of the FMA loop."""
    label_index = {label: i for i, (_, _, label) in enumerate(instructions) if label}
    # Basic blocks: split at labels and after branches.
    blocks, begin = [], 0
    for i, (_, text, label) in enumerate(instructions):
        if label and i > begin:
            blocks.append((begin, i))
            begin = i
        if _opcode(text).startswith(("BRA", "BRX", "EXIT", "RET", "CALL", "JMP")):
            blocks.append((begin, i + 1))
            begin = i + 1
    if begin < len(instructions):
        blocks.append((begin, len(instructions)))
    fma_count = [sum(_is_fma(instructions[i][1]) for i in range(b, e)) for b, e in blocks]
    best = max(range(len(blocks)), key=lambda j: fma_count[j])
    block_begin, block_end = blocks[best]
    loops = []
    for i, (_, text, _) in enumerate(instructions):
        target = _BRANCH_TARGET.search(text)
        if target and target.group(1) in label_index and label_index[target.group(1)] <= i:
            loops.append((label_index[target.group(1)], i + 1))
    around = [(b, e) for b, e in loops if b <= block_begin and block_end <= e]
    loop_begin, loop_end = min(around, key=lambda span: span[1] - span[0]) if around else (block_begin, block_end)
    loop_fmas = sum(_is_fma(instructions[i][1]) for i in range(loop_begin, loop_end))
    return loop_end - loop_begin, loop_fmas, block_end - block_begin, fma_count[best]


def report(out=sys.stdout) -> None:
    ptxas, nvdisasm = _tool("ptxas"), _tool("nvdisasm")
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(f"SASS report of the recurrence kernels, float32, sm_90 (ptxas: {version}; numba-cuda "
          f"{_numba_cuda_version()})", file=out)
    print("loop: the smallest loop around the basic block with the most FMAs; instr/FMA = instructions / FMAs "
          "in it (static)", file=out)
    header = (f"{'kernel variant':<66} {'regs':>4} {'spill':>5} {'stack':>5} {'smem KB':>7} {'loop instr':>10} "
              f"{'FMA':>4} {'instr/FMA':>9} {'block instr/FMA':>15}")
    print(header, file=out)
    print("-" * len(header), file=out)
    with tempfile.TemporaryDirectory() as folder:
        for index, (label, function, signature, shared_bytes) in enumerate(_variants()):
            ptx, _ = cuda.compile_ptx(function, signature, cc=COMPUTE_CAPABILITY)
            ptx_path, cubin_path = Path(folder, f"k{index}.ptx"), Path(folder, f"k{index}.cubin")
            ptx_path.write_text(ptx)
            # -c: a relocatable object; the cooperative-groups runtime (cudadevrt) is linked at load time.
            assembled = subprocess.run([ptxas, "-c", "-v", f"-arch=sm_{COMPUTE_CAPABILITY[0]}{COMPUTE_CAPABILITY[1]}",
                                        str(ptx_path), "-o", str(cubin_path)], capture_output=True, text=True)
            if assembled.returncode != 0:
                print(f"{label:<66} ptxas failed: {assembled.stderr.strip().splitlines()[-1]}", file=out)
                continue
            info = assembled.stderr + assembled.stdout
            kernel_lines = info[info.index(function.__name__):] if function.__name__ in info else info
            resources = {key: int(m.group(1)) if (m := pattern.search(kernel_lines)) else 0
                         for key, pattern in _RESOURCE.items()}
            sass = subprocess.run([nvdisasm, "-c", str(cubin_path)], capture_output=True, text=True,
                                  check=True).stdout
            loop, loop_fmas, block, block_fmas = _fma_loop(_kernel_sass(sass, function.__name__))
            ratio = f"{loop / loop_fmas:.2f}" if loop_fmas else "-"
            block_ratio = f"{block / block_fmas:.2f}" if block_fmas else "-"
            spills = resources["spill_stores"] + resources["spill_loads"]
            print(f"{label:<66} {resources['registers']:>4} {spills:>5} {resources['stack']:>5} "
                  f"{shared_bytes / 1024:>7.1f} {loop:>10} "
                  f"{loop_fmas:>4} {ratio:>9} {block_ratio:>15}", file=out, flush=True)
    print("spill: bytes of spill stores + loads; stack: local memory frame bytes (cuda.local.array lands there); "
          "smem: dynamic shared memory per block from the launch plan (132 SMs, 227 KB opt-in).", file=out)
    print("Where the FMA loop is unrolled completely (small design, H=256: 8 k-steps of 32 lanes), the smallest "
          "loop around it is the whole time step, so 'instr/FMA' then counts the step's staging, reduction, "
          "cell update and barrier too; 'block instr/FMA' is the dot-product code alone.", file=out)


def _numba_cuda_version() -> str:
    from importlib import metadata
    try:
        return metadata.version("numba-cuda")
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
