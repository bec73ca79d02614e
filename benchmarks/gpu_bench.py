"""GPU benchmark: lstmeng's numba_cuda backend beside torch.nn.LSTM (cuDNN), float32.

Usage (on a machine with an NVIDIA GPU, numba-cuda and PyTorch with CUDA)::

    python benchmarks/gpu_bench.py                 # the full sweep of issue 4
    python benchmarks/gpu_bench.py --quick         # a few shapes, fewer repeats
    python benchmarks/gpu_bench.py --output docs/benchmarks/numba_cuda_<gpu>.txt
    python benchmarks/gpu_bench.py --simulate      # one tiny shape under the CUDA simulator:
                                                   # exercises the script's logic, no timings
    python benchmarks/gpu_bench.py --train-loop    # training loop with Adam, params on the device (< 60 s)
    python benchmarks/gpu_bench.py --overhead      # per-call overhead at B=1, T=1 and device memory
                                                   # over 1,000 training steps (< 60 s)
    python benchmarks/gpu_bench.py --overhead --simulate   # (either mode) the logic under the simulator
    python benchmarks/gpu_bench.py --overhead --profile    # also: where a call's host time goes
    python benchmarks/gpu_bench.py --overhead --caching-allocator   # numba allocating through a cache
    python benchmarks/gpu_bench.py --overhead --context-scope       # each call in one require_context scope

Method: both engines run in this one process on the same inputs and weights
(torch's weight_ih / weight_hh are the transposes of lstmeng's kernel /
recurrent_kernel in the same gate order; b_ih holds the bias, b_hh zero).
cuDNN gets float32 with TF32 off (``torch.backends.cudnn.allow_tf32 = False``,
``torch.backends.cuda.matmul.allow_tf32 = False``) and its native time-major
layout; numba_cuda gets lstmeng's batch-major ``[B, T, I]``. Each timed run
is bracketed by CUDA events on the default stream (Numba and PyTorch both
use it), after warm-up runs that absorb JIT compilation and cuDNN's
autotuning; the median of the runs is reported. Inputs rotate among three
sets so repeated runs do not just re-read a warm L2. The numba_cuda time
includes its Python launch overhead (several launches per call), which is
part of what a user pays.

Before the table, the script measures the cost of one empty grid-wide barrier
(``cuda.cg.this_grid().sync()`` in a persistent one-block-per-SM grid): that
is the floor per time step of a persistent recurrence kernel.

Modes: "inference" is a forward with training=False (torch: under no_grad);
"train" is forward with training=True plus the backward of the output
sequence (dx and the weight gradients; torch: x.requires_grad and
y.backward(dy)).

``--train-loop`` and ``--overhead`` time what a user's loop pays, through the
public layer API rather than the backend: an ``le.LSTM`` moved to the GPU
(params and grads on the device, inputs already there), its forward, backward
and an ``le.optim.Adam`` step, beside ``torch.nn.LSTM`` + ``torch.optim.Adam``
(cuDNN). Each sample is the wall time of one step followed by a device
synchronise (``time.perf_counter``), so Python and launch overhead count; the
median is reported. ``--overhead`` uses B=1, T=1, I=256, H=1024, where the
fixed cost of a call is all there is (issue 14's targets: inference <= 150 us,
training step <= 500 us), and reports the device memory in use before and
after 1,000 training steps (``cuda.current_context().get_memory_info()``;
flat means no growth per step).

``--caching-allocator`` (a GPU experiment) runs the same with numba's device
allocations through ``cuda_caching_memory_manager.py`` (freed blocks reused,
as PyTorch's caching allocator does): against a run without it, it says what
cuMemAlloc / cuMemFree cost per call.

``--profile`` (with ``--overhead``) then says where that time goes on the
host: the cost of launching an empty numba kernel with one and with fifteen
array arguments (plain and specialized dispatcher), of allocating and freeing
a device array (4 KB, 4 MB), and cProfile's top
functions over 200 inference calls and 200 training steps, by own time and by
cumulative time (where a call's time goes, from the layer down), with the
number of kernel launches and of numba's uncached context lookups per call; the
raw profiles go to ``$OUT/profile_<what>.pstats`` when ``OUT`` is set (the
device tool's folder; ``python -m pstats`` reads them).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys

from lstmeng._runtime.timing import (
    Report,
    fmt,
    median_event_ms,
    median_time,
    numba_event_clock,
    torch_event_clock,
)

FULL = dict(batches=(1, 8, 64, 256), units=(256, 512, 1024), steps=(100, 1000))
QUICK = dict(batches=(1, 64), units=(256, 1024), steps=(100,))
SIMULATE = dict(batches=(2,), units=(4,), steps=(3,))

#: numba.cuda, imported by main() after --simulate has set NUMBA_ENABLE_CUDASIM. A
#: module global, not a local import: the simulator swaps a kernel's global ``cuda``.
cuda = None

# Issue 4's targets: (mode, largest batch it covers) -> minimum speedup over cuDNN.
TARGETS = [("inference", 8, 2.0), ("inference", 64, 1.0), ("inference", 256, 0.7),
           ("train", 8, 1.0), ("train", 64, 0.7)]
STEP_TARGET_US = 2.0   # inference, B <= 8, H = 1024


def target_for(mode: str, batch: int):
    """Minimum speedup over cuDNN the issue asks for at this mode and batch (None: no target)."""
    for target_mode, largest_batch, speedup in TARGETS:
        if mode == target_mode and batch <= largest_batch:
            return speedup
    return None


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="a few shapes and fewer repeats")
    group.add_argument("--train-loop", action="store_true",
                       help="forward + backward + Adam with params on the device, beside torch + cuDNN")
    group.add_argument("--overhead", action="store_true",
                       help="per-call wall time at B=1, T=1, I=256, H=1024, and device memory over 1,000 steps")
    parser.add_argument("--simulate", action="store_true",
                        help="tiny shapes under the CUDA simulator (checks the logic; no timings)")
    parser.add_argument("--profile", action="store_true",
                        help="with --overhead: kernel launch cost and cProfile of the calls (host time)")
    parser.add_argument("--caching-allocator", action="store_true",
                        help="numba allocates through benchmarks/cuda_caching_memory_manager.py (an experiment: "
                             "is the per-call cost cuMemAlloc/cuMemFree?); on a GPU only")
    parser.add_argument("--context-scope", action="store_true",
                        help="with --overhead or --train-loop: time each lstmeng call inside one numba "
                             "require_context scope (an experiment: what do numba's per-API context lookups cost?)")
    parser.add_argument("--repeats", type=int, default=30, help="most timed runs per shape and engine")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds of timed runs per shape and engine (fewer repeats for slow shapes)")
    parser.add_argument("--output", help="also write the report to this file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    global cuda
    args = parse_arguments(argv)
    if args.simulate:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"    # before numba is first imported
    elif args.caching_allocator:
        _use_caching_allocator()                    # before numba creates a context
    import numpy as np

    from lstmeng.backends import registry

    report = Report()
    backend, info = registry._entry("numba_cuda")
    if backend is None:
        print(f"no CUDA GPU usable by numba_cuda ({info.reason}); nothing to benchmark.")
        return 0
    from lstmeng.backends import numba_cuda
    cuda = numba_cuda.cuda
    simulated = numba_cuda.simulator_enabled()
    if simulated and not args.simulate:
        print("no CUDA GPU: NUMBA_ENABLE_CUDASIM=1 is set (the CUDA simulator); unset it on a GPU machine, "
              "or pass --simulate to check the script's logic.")
        return 0
    torch = _import_torch(report, simulated)

    report(f"# lstmeng numba_cuda vs torch.nn.LSTM, float32 — {info.device}")
    if torch is not None:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        device_name = torch.cuda.get_device_name() if not simulated else "CPU (simulate mode)"
        report(f"# torch {torch.__version__} on {device_name}, cuDNN {cudnn}, "
               f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
               f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
    if not (args.train_loop or args.overhead):
        report(f"# python {sys.version.split()[0]}, numpy {np.__version__}; "
               f"warm-up {args.warmup} runs, then the median of up to {args.repeats} runs "
               f"(about {args.budget} s of runs per cell), CUDA events")
    if simulated:
        report("# simulator: kernels run in Python; times below are not GPU timings and claim nothing")

    if args.train_loop or args.overhead:
        run_loop_modes(report, backend, torch, np, args, simulated)
        _write_output(report, args)
        return 0

    floor_us = measure_grid_sync(report, simulated)
    sweep = SIMULATE if args.simulate else QUICK if args.quick else FULL
    rows = []
    for steps in sweep["steps"]:
        for units in sweep["units"]:
            for batch in sweep["batches"]:
                for mode in ("inference", "train"):
                    rows.append(run_shape(backend, torch, np, mode, batch, units, steps, args, simulated))
                    if torch is not None and not simulated:
                        torch.cuda.empty_cache()   # hand cached blocks back for numba's next shape
    print_table(report, rows, floor_us, simulated)
    report_partitions(report, backend)
    _write_output(report, args)
    return 0


def _write_output(report, args):
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            handle.write("\n".join(report.lines) + "\n")
        print(f"report written to {args.output}")


# -- --train-loop and --overhead: the public API, as a user's training loop runs it -------------------
#: (B, T, I, H) of --train-loop: a latency-bound and a batched shape. Each costs a second of timed
#: steps on an H100 plus the JIT compilation of its kernels (a kernel per row count), which dominates.
TRAIN_LOOP_SHAPES = ((1, 100, 256, 1024), (64, 100, 256, 256))
OVERHEAD_SHAPE = (1, 1, 256, 1024)
SIMULATED_SHAPE = (2, 3, 4, 4)
#: Issue 14's per-call targets at OVERHEAD_SHAPE (microseconds of wall time).
OVERHEAD_TARGETS_US = {"inference": 150.0, "train step (fwd+bwd+Adam)": 500.0}
MEMORY_STEPS = 1000


def run_loop_modes(report, backend, torch, np, args, simulated):
    """--train-loop / --overhead: time le.LSTM on the device (+ le.optim.Adam) beside torch."""
    import lstmeng as le

    adam, why_not = _adam_factory(le)
    if adam is None:
        report(f"# {why_not}: the training rows time forward + backward only (no optimizer step)")
    repeats = 3 if simulated else (200 if args.overhead else 30)
    if args.overhead:
        shapes, kinds = [SIMULATED_SHAPE if simulated else OVERHEAD_SHAPE], ("inference", "train")
    else:
        shapes, kinds = ([SIMULATED_SHAPE] if simulated else TRAIN_LOOP_SHAPES), ("train",)
    report(f"# {'overhead' if args.overhead else 'train-loop'}: wall time of one call + device synchronise, "
           f"median of {repeats} after {args.warmup} warm-up calls; float32; inputs on the device")
    rows = []
    for batch, steps, features, units in shapes:
        setup = _LoopSetup(le, backend, torch, np, adam, batch, steps, features, units, simulated)
        if setup.torch_lstm is not None:   # same weights, same inputs: the same outputs first
            report(f"# B, T, I, H = {batch}, {steps}, {features}, {units}: outputs agree with torch, max relative "
                   f"difference {setup.output_difference(backend, np):.1e}")
        for kind in kinds:
            train_label = "train step (fwd+bwd+Adam)" if adam is not None else "train step (fwd+bwd)"
            label = "inference" if kind == "inference" else train_label
            run = setup.ours_inference if kind == "inference" else setup.ours_train
            if args.context_scope:
                # Every top-level numba call (device_array, a launch, ...) resolves the CUDA context
                # outside such a scope: two driver queries, a lock and the memory manager's
                # initialize() each, 8 times per inference call on an H200 (session 24). Inside one
                # scope they reuse the context it attached.
                run = _numba_devices().require_context(run)
            ours = _wall_median(run, setup.synchronize_ours, args.warmup, repeats)
            theirs = None
            if setup.torch_lstm is not None:
                theirs = _wall_median(setup.theirs_inference if kind == "inference" else setup.theirs_train,
                                      setup.synchronize_theirs, args.warmup, repeats)
            rows.append((label, (batch, steps, features, units), ours, theirs))
    header = (f"{'what':<27} {'B, T, I, H':<18} | {'lstmeng us':>10} | {'torch+cuDNN us':>14} | "
              f"{'target us':>9} {'met':>4}")
    report()
    report(header)
    report("-" * len(header))
    for label, shape, ours, theirs in rows:
        target = OVERHEAD_TARGETS_US.get(label) if args.overhead else None
        met = "" if target is None or simulated else ("yes" if ours <= target else "no")
        report(f"{label:<27} {', '.join(map(str, shape)):<18} | {fmt(None if simulated else ours, 10, 1)} | "
               f"{fmt(None if simulated or theirs is None else theirs, 14, 1)} | {fmt(target, 9, 0)} {met:>4}")
    if simulated:
        report("simulator run: the loop ran; no timings are claimed.")
    if args.context_scope:
        report("# each lstmeng call ran inside one numba require_context scope (--context-scope)")
    _report_allocator(report, simulated)
    if args.overhead:
        _report_memory(report, backend, setup, simulated)
        if args.profile:
            _report_launch_cost(report, backend, np, simulated)
            _report_profile(report, setup, simulated)


def _numba_devices():
    """numba's ``cudadrv.devices`` module (the simulator's under NUMBA_ENABLE_CUDASIM), which holds
    ``require_context``."""
    import numba
    if numba.config.ENABLE_CUDASIM:
        from numba.cuda.simulator.cudadrv import devices
    else:
        from numba.cuda.cudadrv import devices
    return devices


def _adam_factory(le):
    """``le.optim.Adam`` as ``make(layer)``, or (None, why) while lstmeng.optim is not there yet."""
    try:
        from lstmeng import optim
        adam = optim.Adam
    except (ImportError, AttributeError) as error:
        return None, f"lstmeng.optim.Adam is not available ({type(error).__name__}: {error})"
    return (lambda layer: adam(layer, lr=1e-3)), None


class _LoopSetup:
    """One layer on the device with its optimizer, and torch's twin, for one (B, T, I, H)."""

    def __init__(self, le, backend, torch, np, adam, batch, steps, features, units, simulated):
        rng = np.random.default_rng(batch * 7919 + units * 31 + steps)
        self.layer = le.LSTM(units, return_sequences=True, seed=0).build(features).to("cuda")
        self.optimizer = adam(self.layer) if adam is not None else None
        self.x = backend.ops.asarray(rng.normal(size=(batch, steps, features)).astype(np.float32), np.float32)
        self.dy = backend.ops.asarray(rng.normal(size=(batch, steps, units)).astype(np.float32), np.float32)
        self.torch_lstm = None
        if torch is not None:
            where = "cpu" if simulated else "cuda"
            kernel, recurrent, bias = self.layer.get_weights()
            lstm = torch.nn.LSTM(features, units, batch_first=True).to(where)
            with torch.no_grad():
                lstm.weight_ih_l0.copy_(torch.from_numpy(kernel.T.copy()))
                lstm.weight_hh_l0.copy_(torch.from_numpy(recurrent.T.copy()))
                lstm.bias_ih_l0.copy_(torch.from_numpy(bias))
                lstm.bias_hh_l0.zero_()
            self.torch_lstm = lstm
            self.torch_optimizer = torch.optim.Adam(lstm.parameters(), lr=1e-3)
            self.torch_x = torch.from_numpy(backend.ops.to_numpy(self.x)).to(where)
            self.torch_dy = torch.from_numpy(backend.ops.to_numpy(self.dy)).to(where)
            self.torch = torch
            self.torch_device = where

    def output_difference(self, backend, np):
        """max |y_ours - y_torch| / max |y_torch| of one inference call."""
        ours = backend.ops.to_numpy(self.layer(self.x))
        with self.torch.no_grad():
            theirs = self.torch_lstm(self.torch_x)[0].cpu().numpy()
        return float(np.abs(ours - theirs).max() / max(float(np.abs(theirs).max()), 1e-30))

    def ours_inference(self):
        self.layer(self.x)

    def ours_train(self):
        y = self.layer(self.x, training=True)
        self.layer.backward(self.dy)
        if self.optimizer is not None:
            self.optimizer.step()
        return y

    def theirs_inference(self):
        with self.torch.no_grad():
            self.torch_lstm(self.torch_x)

    def theirs_train(self):
        self.torch_optimizer.zero_grad(set_to_none=True)
        y, _ = self.torch_lstm(self.torch_x)
        y.backward(self.torch_dy)
        self.torch_optimizer.step()

    def synchronize_ours(self):
        cuda.synchronize()

    def synchronize_theirs(self):
        if self.torch_device == "cuda":
            self.torch.cuda.synchronize()


def _wall_median(run, synchronize, warmup, repeats):
    """Median microseconds of ``run(); synchronize()`` by wall clock, after ``warmup`` calls."""
    return median_time(run, repeats, warmup=warmup, synchronize=synchronize) * 1e6


def _use_caching_allocator():
    """numba's device allocations through the caching EMM plugin beside this script."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cuda_caching_memory_manager
    from numba import cuda as numba_cuda_api
    numba_cuda_api.set_memory_manager(cuda_caching_memory_manager.CachingMemoryManager)


def _report_allocator(report, simulated):
    """Which device allocator ran, and the caching one's counts (driver allocations, reuses)."""
    if simulated:
        return
    manager = cuda.current_context().memory_manager
    if hasattr(manager, "driver_allocations"):
        report(f"# device allocator: caching (benchmarks/cuda_caching_memory_manager.py): "
               f"{manager.driver_allocations} cuMemAlloc calls, {manager.reuses} allocations served "
               f"from its free lists")
    else:
        report(f"# device allocator: numba's {type(manager).__name__} (cuMemAlloc / cuMemFree per array)")


def _report_launch_cost(report, backend, np, simulated):
    """Wall microseconds of launching an empty kernel (no synchronise): numba's host cost per launch,
    with 1 and 15 array arguments, through the plain dispatcher and a specialized one."""
    @cuda.jit
    def empty_kernel_1(a):
        pass

    @cuda.jit
    def empty_kernel_15(a, b, c, d, e, f, g, h, i, j, k, m, n, o, p):
        pass

    one = (backend.ops.empty((4,), np.float32),)
    fifteen = tuple(backend.ops.empty((2, 3, 4), np.float32) for _ in range(15))
    repeats = 3 if simulated else 2000
    report()
    report("# host cost of one kernel launch (wall us, median of "
           f"{repeats}, no synchronise){': simulator, not a GPU timing' if simulated else ''}")
    for label, empty_kernel, arguments in (("1 array argument", empty_kernel_1, one),
                                           ("15 array arguments", empty_kernel_15, fifteen)):
        specialized = empty_kernel.specialize(*arguments)
        plain, fast = (median_time(lambda kernel=kernel, arguments=arguments: kernel[1, 32](*arguments), repeats,
                                   warmup=3) * 1e6 for kernel in (empty_kernel, specialized))
        report(f"  {label:<20} dispatcher {fmt(None if simulated else plain, 7, 1)} us | "
               f"specialized {fmt(None if simulated else fast, 7, 1)} us")
    cuda.synchronize()
    # A call allocates its results (3 arrays in inference, 6 in a training step) with
    # cuda.device_array; numba queues the frees and flushes them in batches. Each sample here
    # allocates one array and flushes its free, so it pays both.
    allocations = max(3, repeats // 4)
    report("# host cost of cuda.device_array + its free (wall us, median of "
           f"{allocations}){': simulator, not a GPU timing' if simulated else ''}")
    for nbytes in (4 * 1024, 4 * 1024 * 1024):
        def allocate_and_free(count=nbytes // 4):
            array = cuda.device_array(count, dtype=np.float32)
            del array
            if not simulated:   # the memory manager's queue of frees (numba's default manager)
                cuda.current_context().memory_manager.deallocations.clear()
        cost = median_time(allocate_and_free, allocations, warmup=3) * 1e6
        report(f"  {nbytes // 1024:>5} KB {fmt(None if simulated else cost, 9, 1)} us")


def _report_profile(report, setup, simulated):
    """cProfile of 200 inference calls and 200 training steps (host time): the top functions by own
    and by cumulative time, kernel launches per call (calls of numba's launch) and numba's context
    lookups outside a ``require_context`` scope per call (each queries the driver, takes a lock
    and re-initializes the memory manager: 8 per inference call on an H200, session 24). Saves
    each profile as ``$OUT/profile_<label>.pstats`` when ``OUT`` is set."""
    import cProfile
    import io
    import pstats

    calls = 3 if simulated else 200
    for label, run in (("inference", setup.ours_inference), ("train step", setup.ours_train)):
        run()
        cuda.synchronize()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(calls):
            run()
        cuda.synchronize()
        profile.disable()
        stats = pstats.Stats(profile)
        # numba's _Kernel.launch on a GPU; the simulator's kernel __call__ there.
        simulator_kernel = os.path.join("simulator", "kernel.py")
        launches = sum(count for (filename, _, name), (count, *_) in stats.stats.items()
                       if (name == "launch" and filename.endswith("dispatcher.py"))
                       or (simulated and name == "__call__" and filename.endswith(simulator_kernel)))
        lookups = sum(count for (filename, _, name), (count, *_) in stats.stats.items()
                      if name == "_get_or_create_context_uncached")
        if os.environ.get("OUT"):
            os.makedirs(os.environ["OUT"], exist_ok=True)
            stats.dump_stats(os.path.join(os.environ["OUT"], f"profile_{label.replace(' ', '_')}.pstats"))
        report()
        report(f"# cProfile, {calls} {label} calls{' (simulator)' if simulated else ''}: "
               f"{launches / calls:.1f} kernel launches and {lookups / calls:.1f} uncached context lookups per call")
        for order, count in (("tottime", 25), ("cumulative", 40)):
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats(order).print_stats(count)
            report(f"# top {count} by {'own' if order == 'tottime' else 'cumulative'} time")
            for line in text.getvalue().splitlines():
                if line.strip() and not line.startswith(("   Ordered by", "   List reduced")):
                    report(line.rstrip())


def _report_memory(report, backend, setup, simulated):
    """Device memory in use before and after MEMORY_STEPS training steps of the last shape."""
    steps = 5 if simulated else MEMORY_STEPS
    context = cuda.current_context()
    cuda.synchronize()
    free_before, total = context.get_memory_info()
    pool_before = backend.pool_allocations()
    for _ in range(steps):
        setup.ours_train()
    cuda.synchronize()
    free_after, _ = context.get_memory_info()
    report()
    if simulated or not math.isfinite(free_before):
        report(f"device memory over {steps} training steps: the simulator has no device memory to measure; "
               f"scratch pool blocks allocated during them: {backend.pool_allocations() - pool_before}")
        return
    delta_mib = (free_before - free_after) / 2**20
    report(f"device memory over {steps} training steps: in use before {(total - free_before) / 2**20:.1f} MiB, "
           f"after {(total - free_after) / 2**20:.1f} MiB, delta {delta_mib:+.1f} MiB "
           f"({'flat' if abs(delta_mib) < 1 else 'GROWS'}); scratch pool blocks allocated during them: "
           f"{backend.pool_allocations() - pool_before}")


def _import_torch(report, simulated):
    try:
        import torch
    except ImportError as error:
        report(f"# torch is not importable ({error}); timing numba_cuda only")
        return None
    if not simulated and not torch.cuda.is_available():
        report("# torch has no CUDA device; timing numba_cuda only")
        return None
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    return torch


def measure_grid_sync(report, simulated):
    """Per-barrier cost of cuda.cg.this_grid().sync() in a one-block-per-SM grid (µs), or None."""
    import numpy as np

    @cuda.jit
    def grid_sync_loop(count, sink):
        grid = cuda.cg.this_grid()
        for _ in range(count):
            grid.sync()
        if cuda.grid(1) == 0:
            sink[0] = count

    sink = cuda.to_device(np.zeros(1, np.int64))
    threads = 256 if not simulated else 4
    if simulated:
        grid_sync_loop[1, threads](3, sink)
        assert int(sink.copy_to_host()[0]) == 3
        report("# grid barrier floor: kernel ran under the simulator (one block); no timing")
        return None
    compiled = grid_sync_loop.specialize(1, sink)
    overload = next(iter(compiled.overloads.values()))
    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    blocks = min(sms, overload.max_cooperative_grid_blocks(threads))
    times = {}
    for count in (1000, 11000):
        compiled[blocks, threads](count, sink)     # warm-up
        samples = []
        for _ in range(5):
            start, end = cuda.event(), cuda.event()
            start.record()
            compiled[blocks, threads](count, sink)
            end.record()
            end.synchronize()
            samples.append(cuda.event_elapsed_time(start, end))
        times[count] = statistics.median(samples)
    per_sync_us = (times[11000] - times[1000]) / 10000 * 1000
    report(f"# grid barrier floor: {per_sync_us:.2f} us per cuda.cg.this_grid().sync() "
           f"({blocks} blocks x {threads} threads, {sms} SMs)")
    return per_sync_us


class _Inputs:
    """Inputs and weights of one shape, for both engines (three rotating input sets)."""

    def __init__(self, backend, torch, np, batch, units, steps, simulated):
        rng = np.random.default_rng(batch * 7919 + units * 31 + steps)
        features = units
        scale = 1.0 / math.sqrt(units)
        self.kernel = rng.uniform(-scale, scale, (features, 4 * units)).astype(np.float32)
        self.recurrent = rng.uniform(-scale, scale, (units, 4 * units)).astype(np.float32)
        self.bias = rng.uniform(-scale, scale, 4 * units).astype(np.float32)
        self.x = [rng.normal(size=(batch, steps, features)).astype(np.float32) for _ in range(3)]
        self.dy = rng.normal(size=(batch, steps, units)).astype(np.float32)
        def device(array):
            return backend.ops.asarray(array, np.float32)
        self.device_x = [device(x) for x in self.x]
        self.device_weights = (device(self.kernel), device(self.recurrent), device(self.bias))
        self.device_zeros = device(np.zeros((batch, units), np.float32))
        self.device_dy = device(self.dy)
        self.torch_lstm = None
        if torch is not None:
            where = "cpu" if simulated else "cuda"
            lstm = torch.nn.LSTM(features, units, batch_first=False).to(where)
            with torch.no_grad():
                lstm.weight_ih_l0.copy_(torch.from_numpy(self.kernel.T.copy()))
                lstm.weight_hh_l0.copy_(torch.from_numpy(self.recurrent.T.copy()))
                lstm.bias_ih_l0.copy_(torch.from_numpy(self.bias))
                lstm.bias_hh_l0.zero_()
            self.torch_lstm = lstm
            # cuDNN's native layout is time-major [T, B, I].
            self.torch_x = [torch.from_numpy(x.transpose(1, 0, 2).copy()).to(where) for x in self.x]
            self.torch_dy = torch.from_numpy(self.dy.transpose(1, 0, 2).copy()).to(where)


def run_shape(backend, torch, np, mode, batch, units, steps, args, simulated):
    """Time one (mode, B, H=I, T) cell for both engines; returns a row dict."""
    inputs = _Inputs(backend, torch, np, batch, units, steps, simulated)
    zeros = inputs.device_zeros
    kernel, recurrent, bias = inputs.device_weights
    from lstmeng.backends.base import SequenceOptions

    training = mode == "train"
    options = SequenceOptions.for_call(bias=bias, mask=None, input_dropout_mask=None, recurrent_dropout_mask=None,
                                       return_sequences=True, training=training)

    def ours(index):
        forward = backend.sequence_forward(inputs.device_x[index], zeros, zeros, kernel, recurrent, bias, None, None,
                                           None, options)
        if training:
            grads = backend.sequence_backward(inputs.device_dy, zeros, zeros, forward.workspace)
            return forward.outputs, grads.dx
        return forward.outputs, None

    def theirs(index):
        x = inputs.torch_x[index]
        if training:
            x = x.detach().requires_grad_(True)
            y, _ = inputs.torch_lstm(x)
            y.backward(inputs.torch_dy)
            return y, x.grad
        with torch.no_grad():
            y, _ = inputs.torch_lstm(x)
        return y, None

    row = dict(mode=mode, batch=batch, units=units, steps=steps)
    ours_results = [None if r is None else backend.ops.to_numpy(r) for r in ours(0)]
    row["ours_ms"] = _time(ours, args, simulated, "numba")
    if inputs.torch_lstm is not None:
        # Outputs (and dx when training), time-major from torch: compared batch-major.
        theirs_results = [None if r is None else r.detach().cpu().numpy().transpose(1, 0, 2) for r in theirs(0)]
        differences = [np.abs(mine - other).max() / max(np.abs(other).max(), 1e-30)
                       for mine, other in zip(ours_results, theirs_results) if other is not None]
        row["max_relative_difference"] = float(max(differences))
        row["theirs_ms"] = _time(theirs, args, simulated, "torch", torch)
    return row


def _time(run, args, simulated, engine, torch=None):
    """Median milliseconds of ``run(i)`` with CUDA events after warm-up; None under the simulator.

    ``i`` cycles through the three input sets; at least 5 timed runs, then up to ``args.repeats``
    within ``args.budget`` seconds.
    """
    if simulated:
        run(1)
        return None
    events = numba_event_clock(cuda) if engine == "numba" else torch_event_clock(torch)
    calls = itertools.count()
    return median_event_ms(lambda: run(next(calls) % 3), events, args.repeats, warmup=args.warmup, min_repeats=5,
                           budget_s=args.budget)


def print_table(report, rows, floor_us, simulated):
    report()
    header = (f"{'mode':<9} {'B':>4} {'H=I':>5} {'T':>5} | {'numba_cuda ms':>13} {'us/step':>8} | "
              f"{'cuDNN ms':>9} {'us/step':>8} | {'speedup':>7} {'target':>7} {'met':>4} | {'max rel diff':>12}")
    report(header)
    report("-" * len(header))
    for row in rows:
        ours, theirs = row.get("ours_ms"), row.get("theirs_ms")
        ours_step = None if ours is None else ours * 1000 / row["steps"]
        theirs_step = None if theirs is None else theirs * 1000 / row["steps"]
        speedup = None if ours is None or theirs is None else theirs / ours
        target = target_for(row["mode"], row["batch"])
        met = "" if speedup is None or target is None else ("yes" if speedup >= target else "no")
        if (row["mode"] == "inference" and row["batch"] <= 8 and row["units"] == 1024 and ours_step is not None
                and ours_step > STEP_TARGET_US):
            met = "no*"
        report(f"{row['mode']:<9} {row['batch']:>4} {row['units']:>5} {row['steps']:>5} | "
               f"{fmt(ours, 13, 3)} {fmt(ours_step, 8, 2)} | {fmt(theirs, 9, 3)} {fmt(theirs_step, 8, 2)} | "
               f"{fmt(speedup, 7, 2)} {fmt(target, 7, 1)} {met:>4} | "
               f"{fmt(row.get('max_relative_difference'), 12, 1, 'e')}")
    report()
    report("speedup = cuDNN time / numba_cuda time (above 1: numba_cuda faster). target: issue 4's minimum "
           "speedup; 'no*': slower than the 2 us/step target at H=1024, B<=8.")
    if floor_us is not None:
        report(f"floor: one grid barrier per step costs {floor_us:.2f} us (forward: 1 per step; backward: 1 per step).")
    if simulated:
        report("simulator run: max relative difference (outputs, and dx when training) checks that both engines "
               "computed the same LSTM; "
               "no timings are claimed.")


def report_partitions(report, backend):
    """How the recurrence kernels were launched: grid, units per block, weights on chip or not."""
    if not backend.launch_log:
        return
    report("recurrence launches (direction, dtype, H, rows per chunk or batch[, kernel family]): blocks x "
           "threads, units per block, weights in shared memory, dynamic shared bytes")
    # Keys differ by kernel family (the small-batch kernels add the batch and "small"): printed as they are.
    for key, (blocks, threads, units_per_block, in_shared, shared_bytes) in sorted(
            backend.launch_log.items(), key=lambda item: tuple(str(part) for part in item[0])):
        direction, dtype, units, *rest = key
        report(f"  {direction:<8} {dtype} H={units:<5} {' '.join(str(part) for part in rest):<10} "
               f"{blocks:>4} x {threads}, {units_per_block:>3} units/block, "
               f"weights in shared: {'yes' if in_shared else 'no '}, {shared_bytes} B")


if __name__ == "__main__":
    sys.exit(main())
