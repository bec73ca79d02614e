"""Small-batch recurrence (issue 15) on a GPU: correctness and speed beside cuDNN, in one short run.

Usage (an NVIDIA GPU, numba-cuda, PyTorch with CUDA; the repository on PYTHONPATH,
no Cython build needed)::

    PYTHONPATH=. python benchmarks/gpu_small_batch.py --out docs/benchmarks
    python benchmarks/gpu_small_batch.py --simulate --out /tmp/x   # tiny, CUDA simulator:
                                                                   # the logic only, no timings

What it prints (and writes to ``OUT/gpu_small_batch.txt``):

1. The empty grid barrier: the small design's arrival-counter barrier and
   ``cuda.cg.this_grid().sync()``, side by side (us per barrier, a
   one-block-per-SM grid of 256 threads).
2. Per shape (B in {1, 8}, H in {256, 512, 1024}, I=256, and B=1, I=64,
   H=128; T=1000, float32): the largest relative error (max |a-b| / max |b|)
   of y, h, c and of dx, dkernel, drecurrent_kernel, dbias against
   ``torch.nn.LSTM`` (cuDNN, TF32 off) for the small and the general design;
   the median per-call time of inference (forward, training=False) and
   training (forward + backward) of both designs and cuDNN; speedups and us
   per step.
3. The barrier stress check: T=4000, H=1024, B=1 and 8: two runs of the
   small design must be bit-identical, and match the general kernel.

Timing: parameters and inputs live on the device before timing (device
arrays straight into ``backend.sequence_forward``/``sequence_backward``);
each measured call is bracketed by CUDA events on the default stream (Numba
and PyTorch share it) after a warm-up call that absorbs the JIT compile;
the median of 5 calls. Runs under ~150 s including compiles (a budget guard
skips remaining timings past 130 s and says so).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lstmeng._runtime.timing import (
    Report,
    fmt,
    median_event_ms,
    numba_event_clock,
    torch_event_clock,
)
from lstmeng.testing import kernel_overrides

SHAPES = [(1, 256, 256), (1, 256, 512), (1, 256, 1024), (8, 256, 256), (8, 256, 512), (8, 256, 1024),
          (1, 64, 128)]                       # (B, I, H)
STEPS = 1000
STRESS = dict(steps=4000, units=1024, features=64, batches=(1, 8))
SIMULATE_SHAPES = [(1, 3, 3), (2, 3, 4)]
SIMULATE_STEPS = 3
SIMULATE_STRESS = dict(steps=6, units=3, features=2, batches=(1, 2))
TIME_BUDGET_S = 130.0
REPEATS = 5

cuda = None   # numba.cuda, imported after --simulate set NUMBA_ENABLE_CUDASIM


def main(argv=None) -> int:
    global cuda
    parser = argparse.ArgumentParser(description="small-batch recurrence vs cuDNN")
    parser.add_argument("--out", default=".", help="folder for gpu_small_batch.txt")
    parser.add_argument("--simulate", action="store_true", help="tiny sizes under the CUDA simulator")
    args = parser.parse_args(argv)
    if args.simulate:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    began = time.perf_counter()
    import numpy as np

    from lstmeng.backends import numba_cuda
    backend = numba_cuda.NumbaCudaBackend()
    try:
        device = backend.probe()
    except NotImplementedError as error:
        print(f"no CUDA GPU usable by numba_cuda ({error}); nothing to benchmark.")
        return 0
    cuda = numba_cuda.cuda
    simulated = numba_cuda.simulator_enabled()
    torch = _import_torch(simulated)
    report = Report()
    report(f"# small-batch recurrence (issue 15) vs torch.nn.LSTM, float32 - {device}")
    if torch is not None:
        name = torch.cuda.get_device_name() if not simulated else "CPU (simulate mode)"
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        report(f"# torch {torch.__version__} on {name}, cuDNN {cudnn}, cudnn.allow_tf32="
               f"{torch.backends.cudnn.allow_tf32}, matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
    else:
        report("# torch not available: correctness against the NumPy backend (float64), no cuDNN timings")
    if simulated:
        report("# simulator: kernels run in Python; no timings are measured or claimed")

    measure_barriers(report, np, simulated)
    shapes = SIMULATE_SHAPES if simulated else SHAPES
    steps = SIMULATE_STEPS if simulated else STEPS
    rows = []
    for batch, features, units in shapes:
        over_budget = time.perf_counter() - began > TIME_BUDGET_S
        rows.append(run_shape(backend, torch, np, batch, features, units, steps, simulated, over_budget, report))
        if torch is not None and not simulated:
            torch.cuda.empty_cache()
    print_table(report, rows, simulated)
    stress(report, backend, np, SIMULATE_STRESS if simulated else STRESS)
    report(f"# total {time.perf_counter() - began:.0f} s; launches: " + "; ".join(
        f"{key}: {value}" for key, value in sorted(backend.launch_log.items(), key=str)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_small_batch.txt").write_text("\n".join(report.lines) + "\n")
    print(f"report written to {out / 'gpu_small_batch.txt'}")
    return 0


def _import_torch(simulated):
    try:
        import torch
    except ImportError:
        return None
    if not simulated and not torch.cuda.is_available():
        return None
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch


# -- 1. the empty barrier --------------------------------------------------------------------------
def measure_barriers(report, np, simulated):
    from lstmeng.backends import _cuda_recurrence_small as small

    @cuda.jit
    def grid_sync_loop(count, barrier_counter):
        grid = cuda.cg.this_grid()
        for _ in range(count):
            grid.sync()
        if cuda.grid(1) == 0:
            barrier_counter[0] = count

    counter = cuda.to_device(np.zeros(1, np.uint32))
    if simulated:
        grid_sync_loop[1, 4](3, counter)
        small.barrier_loop_kernel(1)[1, 4](3, counter)
        assert int(counter.copy_to_host()[0]) == 3, "the counter barrier counted wrong"
        report("# barriers: both kernels ran under the simulator (one block); no timing")
        return
    threads = 256
    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    results = []
    for label, kernel_of in (("counter barrier (small design)", small.barrier_loop_kernel),
                             ("cuda.cg.this_grid().sync()", lambda blocks: grid_sync_loop)):
        compiled = kernel_of(sms).specialize(1, counter)
        overload = next(iter(compiled.overloads.values()))
        blocks = min(sms, overload.max_cooperative_grid_blocks(threads))
        if blocks < sms:
            compiled = kernel_of(blocks).specialize(1, counter)
        times = {}
        for count in (1000, 11000):
            compiled[blocks, threads](count, counter)       # warm-up (and compile)
            samples = []
            for _ in range(5):
                start, end = cuda.event(), cuda.event()
                start.record()
                compiled[blocks, threads](count, counter)
                end.record()
                end.synchronize()
                samples.append(cuda.event_elapsed_time(start, end))
            times[count] = statistics.median(samples)
        results.append(f"{label} {(times[11000] - times[1000]) / 10000 * 1000:.2f} us")
    report(f"# empty grid barrier ({blocks} blocks x {threads} threads): " + " | ".join(results))


# -- 2. one shape ------------------------------------------------------------------------------------
def run_shape(backend, torch, np, batch, features, units, steps, simulated, over_budget, report):
    rng = np.random.default_rng(batch * 7919 + units)
    scale = 1.0 / math.sqrt(units)
    host = {
        "x": rng.normal(size=(batch, steps, features)).astype(np.float32),
        "kernel": rng.uniform(-scale, scale, (features, 4 * units)).astype(np.float32),
        "recurrent": rng.uniform(-scale, scale, (units, 4 * units)).astype(np.float32),
        "bias": rng.uniform(-scale, scale, 4 * units).astype(np.float32),
        "h0": (rng.normal(size=(batch, units)) * 0.5).astype(np.float32),
        "c0": (rng.normal(size=(batch, units)) * 0.5).astype(np.float32),
        "dy": rng.normal(size=(batch, steps, units)).astype(np.float32),
    }
    dev = {name: backend.ops.asarray(value, np.float32) for name, value in host.items()}
    zeros = backend.ops.asarray(np.zeros((batch, units), np.float32), np.float32)
    expected = _reference(torch, np, host, simulated)
    row = {"B": batch, "I": features, "H": units, "T": steps}

    def ours(design, training):
        with kernel_overrides(cuda_recurrence_design=design):
            forward = backend.sequence_forward(dev["x"], dev["h0"], dev["c0"], dev["kernel"], dev["recurrent"],
                                               dev["bias"], None, None, None, _options(dev["bias"], training))
            grads = backend.sequence_backward(dev["dy"], zeros, zeros, forward.workspace) if training else None
        return forward, grads

    for design in ("small", "general"):
        forward, grads = ours(design, True)
        actual = {"y": forward.outputs, "h": forward.h, "c": forward.c, "dx": grads.dx, "dkernel": grads.dkernel,
                  "drecurrent_kernel": grads.drecurrent_kernel, "dbias": grads.dbias}
        errors = {name: _relative_error(np, backend.ops.to_numpy(actual[name]), expected[name]) for name in expected}
        forward_error = max(errors[name] for name in ("y", "h", "c"))
        backward_error = max(errors[name] for name in ("dx", "dkernel", "drecurrent_kernel", "dbias"))
        row[f"{design} error"] = (forward_error, backward_error)
        report(f"check {design:<7} B={batch} I={features} H={units} T={steps}: max rel error y/h/c "
               f"{forward_error:.2e}, grads {backward_error:.2e}  {max(forward_error, backward_error):.2e}")
    if simulated or over_budget:
        if over_budget:
            report(f"# B={batch} H={units}: timings skipped, past the {TIME_BUDGET_S:.0f} s budget")
        return row
    for design in ("small", "general"):
        for mode, training in (("inference", False), ("train", True)):
            row[f"{design} {mode}"] = _median_ms(lambda: ours(design, training))  # noqa: B023 (called in this iteration)
    if torch is not None:
        lstm, tx, tdy, params = _torch_lstm(torch, host)

        def cudnn_inference():
            with torch.no_grad():
                lstm(tx)

        def cudnn_train():
            x = tx.detach().requires_grad_(True)
            y, _ = lstm(x)
            torch.autograd.grad(y, [x, *params], tdy)

        row["cudnn inference"] = _median_ms(cudnn_inference, torch)
        row["cudnn train"] = _median_ms(cudnn_train, torch)
    return row


def _options(bias, training):
    """The SequenceOptions of this script's calls: no mask or dropout, full output sequences."""
    from lstmeng.backends.base import SequenceOptions
    return SequenceOptions.for_call(bias=bias, mask=None, input_dropout_mask=None, recurrent_dropout_mask=None,
                                    training=training)


def _relative_error(np, actual, expected):
    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / max(np.abs(expected).max(), 1e-30))


def _torch_lstm(torch, host):
    """torch.nn.LSTM with lstmeng's weights (weight_ih = kernel.T, weight_hh = recurrent.T, b_hh = 0),
    time-major inputs (cuDNN's native layout), on the GPU when there is one."""
    where = "cuda" if torch.cuda.is_available() else "cpu"
    features, units = host["kernel"].shape[0], host["recurrent"].shape[0]
    lstm = torch.nn.LSTM(features, units).to(where)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(host["kernel"].T.copy()))
        lstm.weight_hh_l0.copy_(torch.from_numpy(host["recurrent"].T.copy()))
        lstm.bias_ih_l0.copy_(torch.from_numpy(host["bias"]))
        lstm.bias_hh_l0.zero_()
    tx = torch.from_numpy(host["x"].transpose(1, 0, 2).copy()).to(where)
    tdy = torch.from_numpy(host["dy"].transpose(1, 0, 2).copy()).to(where)
    params = [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0]
    return lstm, tx, tdy, params


def _reference(torch, np, host, simulated):
    """y, h, c and the gradients of sum(y * dy) (dh = dc = 0 at the end) from cuDNN or NumPy."""
    if torch is None:
        from lstmeng.backends import registry
        numpy_backend = registry.get_backend_object("numpy")
        f64 = {name: value.astype(np.float64) for name, value in host.items()}
        forward = numpy_backend.sequence_forward(f64["x"], f64["h0"], f64["c0"], f64["kernel"], f64["recurrent"],
                                                 f64["bias"], None, None, None, _options(f64["bias"], True))
        zeros = np.zeros_like(f64["h0"])
        grads = numpy_backend.sequence_backward(f64["dy"], zeros, zeros, forward.workspace)
        return {"y": forward.outputs, "h": forward.h, "c": forward.c, "dx": grads.dx, "dkernel": grads.dkernel,
                "drecurrent_kernel": grads.drecurrent_kernel, "dbias": grads.dbias}
    lstm, tx, tdy, params = _torch_lstm(torch, host)
    where = tx.device
    h0 = torch.from_numpy(host["h0"])[None].to(where)
    c0 = torch.from_numpy(host["c0"])[None].to(where)
    x = tx.detach().requires_grad_(True)
    y, (h, c) = lstm(x, (h0, c0))
    dx, dw_ih, dw_hh, db = torch.autograd.grad(y, [x, *params], tdy)

    def host_array(tensor):
        return tensor.detach().cpu().numpy()

    return {"y": host_array(y).transpose(1, 0, 2), "h": host_array(h[0]), "c": host_array(c[0]),
            "dx": host_array(dx).transpose(1, 0, 2), "dkernel": host_array(dw_ih).T,
            "drecurrent_kernel": host_array(dw_hh).T, "dbias": host_array(db)}


def _median_ms(run, torch=None):
    """Median milliseconds of ``run()`` between CUDA events on the default stream, after one warm-up."""
    events = numba_event_clock(cuda) if torch is None else torch_event_clock(torch)
    return median_event_ms(run, events, REPEATS, warmup=1)


def print_table(report, rows, simulated):
    report()
    report("errors: max |ours - cuDNN| / max |cuDNN| over y,h,c (fwd) / dx,dW,dR,db (bwd); times: median ms per "
           "call; x: cuDNN time / small-design time; us/step: small design")
    header = (f"{'B':>2} {'I':>4} {'H':>5} {'T':>5} | {'small err fwd/bwd':>17} {'general err':>17} | "
              f"{'infer small':>11} {'general':>8} {'cuDNN':>8} {'x':>5} {'us/step':>7} | "
              f"{'train small':>11} {'general':>8} {'cuDNN':>8} {'x':>5} {'us/step':>7}")
    report(header)
    report("-" * len(header))
    for row in rows:
        errors = " ".join(f"{row[f'{d} error'][0]:>8.1e}/{row[f'{d} error'][1]:.1e}" for d in ("small", "general"))
        cells = []
        for mode in ("inference", "train"):
            small, general, cudnn = (row.get(f"{d} {mode}") for d in ("small", "general", "cudnn"))
            cells.append(f"{_fmt(small, 11)} {_fmt(general, 8)} {_fmt(cudnn, 8)} "
                         f"{_fmt(cudnn / small if small and cudnn else None, 5, 1)} "
                         f"{_fmt(small * 1000 / row['T'] if small else None, 7, 1)}")
        report(f"{row['B']:>2} {row['I']:>4} {row['H']:>5} {row['T']:>5} | {errors} | {cells[0]} | {cells[1]}")
    if simulated:
        report("(simulator: no times)")


def _fmt(value, width, digits=2):
    return fmt(value, width, digits, missing="-")


# -- 3. barrier stress -----------------------------------------------------------------------------
def stress(report, backend, np, sizes):
    """Thousands of steps: two small-design runs bit-identical, and close to the general kernel."""
    rng = np.random.default_rng(4000)
    units, steps, features = sizes["units"], sizes["steps"], sizes["features"]
    for batch in sizes["batches"]:
        def device(array):
            return backend.ops.asarray(array.astype(np.float32), np.float32)

        x = device(rng.normal(size=(batch, steps, features)))
        kernel = device(rng.normal(size=(features, 4 * units)) / np.sqrt(features))
        recurrent = device(rng.normal(size=(units, 4 * units)) / np.sqrt(units))
        bias = device(rng.normal(size=4 * units) * 0.1)
        zeros = device(np.zeros((batch, units)))
        outputs = {}
        for run, design in (("small 1", "small"), ("small 2", "small"), ("general", "general")):
            with kernel_overrides(cuda_recurrence_design=design):
                forward = backend.sequence_forward(x, zeros, zeros, kernel, recurrent, bias, None, None, None,
                                                   _options(bias, False))
            outputs[run] = backend.ops.to_numpy(forward.outputs)
        identical = bool(np.array_equal(outputs["small 1"], outputs["small 2"]))
        difference = _relative_error(np, outputs["small 1"], outputs["general"])
        report(f"stress B={batch} H={units} T={steps}: two small runs bit-identical: {identical}; "
               f"max rel difference to the general kernel {difference:.1e} (summation order differs)")


if __name__ == "__main__":
    sys.exit(main())
