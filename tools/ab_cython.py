"""A/B timing of the cython backend: the working tree against a git revision, in one process.

Why: the development machine is shared and its speed drifts by 15-30 % within
minutes, so two benchmark runs taken one after the other cannot show a 2-5 %
kernel change. This builds REV into a cache folder (``git worktree`` +
``pip install --target``), loads its extension and backend module beside the
working tree's, and times both on the same arrays, calls interleaved; the
best and median of each and their ratios are printed (and the median of the
rounds' ratios: a round times both, the two first in turn), with the largest
difference between the two results (a kernel change should not change them
beyond rounding).

    python tools/ab_cython.py --base HEAD~1 --shape 64,100,256,256 --mode train --repeats 16

A caveat on medians: the two builds share one process, and each backend's busy-machine
rule (lstmeng/backends/cython.py) reads the waits of its own calls. Where the builds'
allocations leave one of them faulting fresh pages in every other call (seen at
(64, 100, 256, 256) with ``--lengths``, AVX-512, also with the two builds' kernels the same),
that build's waits at the parts' end grow, the rule runs its next call on one thread, and its
median doubles while its best does not move: compare the best times, and check a surprising
median in a loop of that build alone before believing it.

The working tree's extension is the one the editable install builds on import.
The builds stay in the temp folder (lstmeng-ab-COMMIT, and its -src worktree);
delete them and run ``git worktree prune`` to clean up.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_revision(revision: str) -> str:
    """Folder holding an installed build of ``revision`` (built once per commit, then reused)."""
    commit = subprocess.run(["git", "-C", REPOSITORY, "rev-parse", revision], check=True,
                            capture_output=True, text=True).stdout.strip()
    target = os.path.join(tempfile.gettempdir(), f"lstmeng-ab-{commit[:12]}")
    if glob.glob(os.path.join(target, "lstmeng", "backends", "_cython_lstm*.so")):
        return target
    source = target + "-src"
    if not os.path.isdir(source):
        subprocess.run(["git", "-C", REPOSITORY, "worktree", "add", "--detach", "-f", source, commit],
                       check=True)
    print(f"building {revision} ({commit[:12]}) into {target} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation",
                    "--no-deps", "--target", target, source], check=True)
    return target


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def base_backend_module(folder: str):
    """The backend module of the build in ``folder``, bound to that build's extension, contract
    (its ``backends/base.py``: the contract's classes change between revisions) and buffer cache."""
    # The base's own copies of the modules its backend module imports that change between
    # revisions: the contract's classes, and the buffer cache (whose arrays' alignment is the
    # base's, not the working tree's; a base copy from session 18 on takes its aligned_empty
    # from the working tree's extension, which only allocates).
    own_modules = {"lstmeng.backends.base": "base.py", "lstmeng.backends._buffer_cache": "_buffer_cache.py"}
    working = {name: sys.modules.get(name) for name in own_modules}
    for name, file in own_modules.items():
        path = os.path.join(folder, "lstmeng", "backends", file)
        if os.path.exists(path):
            sys.modules[name] = _load("lstmeng_ab_base_" + file[:-3].lstrip("_"), path)
    try:
        extension = _load("_cython_lstm", glob.glob(os.path.join(folder, "lstmeng", "backends",
                                                             "_cython_lstm*.so"))[0])
        module = _load("lstmeng_ab_base_cython", os.path.join(folder, "lstmeng", "backends", "cython.py"))
    finally:
        for name, previous in working.items():
            if previous is not None:
                sys.modules[name] = previous
            else:
                sys.modules.pop(name, None)
    module._cython_lstm = extension
    # The kernel overrides the base reads are its own: their fields change between revisions (a
    # base reading a field the working tree renamed failed). No override is set in its copy.
    overrides = os.path.join(folder, "lstmeng", "backends", "_kernel_overrides.py")
    if os.path.exists(overrides) and hasattr(module, "_kernel_overrides"):
        module._kernel_overrides = _load("lstmeng_ab_base_overrides", overrides)
    return module


def sequence_forward(backend, x, zeros, kernel, recurrent_kernel, bias, mask, training: bool):
    """One sequence forward through either contract: SequenceOptions (this tree; a backend only reads
    its fields) or the keyword arguments of revisions before it."""
    if "options" not in inspect.signature(backend.sequence_forward).parameters:
        return backend.sequence_forward(x, zeros, zeros, kernel, recurrent_kernel, bias, mask, training=training)
    from lstmeng.backends.base import SequenceOptions
    options = SequenceOptions.for_call(bias=bias, mask=mask, input_dropout_mask=None, recurrent_dropout_mask=None,
                                       training=training)
    return backend.sequence_forward(x, zeros, zeros, kernel, recurrent_kernel, bias, mask, None, None, options)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare against (default HEAD)")
    parser.add_argument("--shape", default="64,100,256,256", help="B,T,I,H")
    parser.add_argument("--mode", choices=("infer", "train"), default="train")
    parser.add_argument("--lengths", action="store_true", help="lengths uniform in 1..T (variable-length path)")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--split", choices=("auto", "on", "off"), default="auto",
                        help="force the unit split of one-part calls on or off in both builds (default: each "
                             "build's own timing-based choice, which a noisy machine can tip either way)")
    parser.add_argument("--layout", choices=("lstmeng", "torch"), default="lstmeng",
                        help="weights as lstmeng's [K, 4H] arrays, or as transposed views of PyTorch's "
                             "[4H, K] parameters (what lstmeng.torch passes)")
    parser.add_argument("--isa", choices=("auto", "avx512", "avx2", "scalar"), default="auto",
                        help="force one kernel family in both builds (default: the CPU's best)")
    args = parser.parse_args(argv)

    import lstmeng.backends.cython as working_tree
    base = base_backend_module(build_revision(args.base))
    batch, steps, inputs, units = (int(value) for value in args.shape.split(","))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, steps, inputs), dtype=np.float32)
    dy = rng.standard_normal((batch, steps, units), dtype=np.float32)
    kernel = (0.05 * rng.standard_normal((inputs, 4 * units))).astype(np.float32)
    recurrent_kernel = (0.05 * rng.standard_normal((units, 4 * units))).astype(np.float32)
    if args.layout == "torch":
        kernel, recurrent_kernel = np.ascontiguousarray(kernel.T).T, np.ascontiguousarray(recurrent_kernel.T).T
    bias = np.zeros(4 * units, np.float32)
    zeros = np.zeros((batch, units), np.float32)
    mask = None
    if args.lengths:
        lengths = rng.integers(1, steps + 1, batch)
        mask = np.arange(steps)[None, :] < lengths[:, None]

    backends = {"base": base.CythonBackend(), "tree": working_tree.CythonBackend()}
    split = {"auto": None, "on": True, "off": False}[args.split]
    overrides = {"base": getattr(base, "_kernel_overrides", None), "tree": working_tree._kernel_overrides}
    times = {name: [] for name in backends}
    results = {}
    order = list(backends.items())
    for round_index in range(args.repeats + 1):   # the first round warms up and is not counted
        # Each build first in every other round: whichever call comes second in a round measured
        # a few per cent apart from the first on this machine, which a fixed order adds to one side.
        for name, backend in order[round_index % 2:] + order[:round_index % 2]:
            forced = contextlib.nullcontext()
            fields = {}
            if split is not None:
                fields["cython_split_units"] = split
            if args.isa != "auto":
                fields["cython_isa"] = args.isa
            if fields:
                if overrides[name] is None:
                    parser.error(f"--split / --isa: the {name} build has no kernel overrides")
                forced = overrides[name].kernel_overrides(**fields)
            with forced:
                start = time.perf_counter()
                forward = sequence_forward(backend, x, zeros, kernel, recurrent_kernel, bias, mask,
                                           args.mode == "train")
                if args.mode == "train":
                    grads = backend.sequence_backward(dy, zeros, zeros, forward.workspace)
                    results[name] = (forward.outputs, grads.dx, grads.dkernel, grads.drecurrent_kernel, grads.dbias)
                else:
                    results[name] = (forward.outputs, forward.h, forward.c)
                times[name].append(time.perf_counter() - start)
    flops = 8.0 * batch * steps * units * (inputs + units) * (3 if args.mode == "train" else 1)
    for name, measured in times.items():
        measured = measured[1:]
        print(f"{name:4} ({args.base if name == 'base' else 'working tree'}): best {min(measured) * 1e3:.2f} ms "
              f"({flops / min(measured) / 1e9:.0f} GFLOP/s), median {np.median(measured) * 1e3:.2f} ms")
    base_times, tree_times = times["base"][1:], times["tree"][1:]
    difference = max(float(np.max(np.abs(a - b))) for a, b in zip(results["base"], results["tree"]))
    paired = np.median(np.asarray(base_times) / np.asarray(tree_times))
    print(f"working tree vs base: {min(base_times) / min(tree_times):.3f}x faster (best), "
          f"{np.median(base_times) / np.median(tree_times):.3f}x (median), {paired:.3f}x (median of the rounds' "
          f"ratios); largest result difference {difference:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
