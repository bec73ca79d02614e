"""Compare lstmeng's cython backend with torch.nn.LSTM and keras.layers.LSTM on the CPU.

Everything is measured in one process and one run, so the ratios are fair on a
noisy machine: best of several repeats, float32, batch-major input, the same
thread count for every library. FLOPs: forward = 8*B*T*H*(I+H),
forward+backward = 3x that. "peak" is scipy's sgemm on a large square matrix,
measured in the same run. A library that is not installed is skipped.

On a shared machine whose other load distorts wall times, ``--cpu-time``
runs every library on one thread and times process CPU time instead, which
other processes disturb much less (single-core ratios; no threading effects).

Usage:
    python benchmarks/compare_cpu.py                       # the issue's four shapes
    python benchmarks/compare_cpu.py --shapes 64,100,256,256 --repeats 10
    python benchmarks/compare_cpu.py --no-keras --threads 1
    python benchmarks/compare_cpu.py --cpu-time            # one thread, CPU time
    python benchmarks/compare_cpu.py --isa avx2            # both libraries' AVX2 code

``--isa avx2`` (or ``avx512``) runs lstmeng's kernel family of that ISA
(``kernel_overrides(cython_isa=...)``) and caps torch's oneDNN at the same ISA
(``ONEDNN_MAX_CPU_ISA``, set before torch loads): on an AVX-512 CPU, the two
libraries' AVX2 code on the same cores. It is not an AVX2 machine (caches,
clocks and the sgemm peak stay this CPU's); Keras is skipped (TensorFlow's
kernels cannot be capped the same way).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from lstmeng._runtime import threads as runtime_threads
from lstmeng._runtime import timing

SHAPES = ((64, 100, 256, 256), (32, 200, 128, 512), (256, 50, 128, 128), (1, 500, 64, 128))
#: --isa: oneDNN's name for the same instruction set (ONEDNN_MAX_CPU_ISA).
ONEDNN_ISAS = {"avx2": "AVX2", "avx512": "AVX512_CORE"}
#: The clock of every measurement: wall time, or process CPU time with --cpu-time.
clock = time.perf_counter


def _best(function, repeats: int) -> float:
    """Best time of ``function()`` in seconds (by ``clock``) over ``repeats`` calls after one warm-up."""
    return timing.best_time(function, repeats, min_repeats=repeats, warmup=1, clock=clock).seconds


def lstmeng_timings(shape, repeats, lengths=None):
    """(forward s, forward+backward s) of the cython backend through the LSTM layer."""
    forward, forward_backward = lstmeng_calls(shape, lengths)
    return _best(forward, repeats), _best(forward_backward, repeats)


def lstmeng_calls(shape, lengths=None):
    """(forward, forward+backward) calls of the cython backend through the LSTM layer."""
    import lstmeng as le
    batch, steps, features, units = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, steps, features), dtype=np.float32)
    layer = le.LSTM(units, return_sequences=True, backend="cython", seed=0)
    layer.build(features)
    dy = np.ones((batch, steps, units), np.float32)

    def forward():
        layer(x, lengths=lengths, training=False)

    def forward_backward():
        layer(x, lengths=lengths, training=True)
        layer.backward(dy)

    return forward, forward_backward


def torch_timings(shape, repeats, threads):
    import torch
    torch.set_num_threads(threads)
    batch, steps, features, units = shape
    lstm = torch.nn.LSTM(features, units, batch_first=True)
    x = torch.randn(batch, steps, features)

    def forward():
        with torch.no_grad():
            lstm(x)

    x_grad = x.clone().requires_grad_(True)
    dy = torch.ones(batch, steps, units)

    def forward_backward():
        y, _ = lstm(x_grad)
        y.backward(dy)

    return _best(forward, repeats), _best(forward_backward, repeats)


def keras_timings(shape, repeats):
    import keras
    import tensorflow as tf
    batch, steps, features, units = shape
    layer = keras.layers.LSTM(units, return_sequences=True)
    x = tf.random.normal((batch, steps, features))
    layer(x)

    @tf.function
    def forward():
        return layer(x, training=False)

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y)
        return tape.gradient(loss, [x] + layer.trainable_weights)

    return (_best(lambda: forward().numpy(), repeats),
            _best(lambda: [g.numpy() for g in forward_backward()], repeats))


def library_available(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", default=None,
                        help="B,T,I,H shapes (default: the issue's four)")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every library (default: OMP_NUM_THREADS, else the usable cores)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-keras", action="store_true")
    parser.add_argument("--no-variable-length", action="store_true",
                        help="skip the lengths-uniform-in-1..T row")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread everywhere, timed by process CPU time (for loaded machines)")
    parser.add_argument("--isa", choices=sorted(ONEDNN_ISAS), default=None,
                        help="lstmeng's kernel family of this ISA, torch's oneDNN capped at it; no Keras")
    args = parser.parse_args(argv)
    if args.isa is None:
        return run(args)
    from lstmeng.backends import _cython_lstm
    from lstmeng.testing import kernel_overrides
    if args.isa not in _cython_lstm.SUPPORTED_ISAS:
        parser.error(f"--isa {args.isa}: this CPU runs {', '.join(_cython_lstm.SUPPORTED_ISAS)}")
    if "torch" in sys.modules:
        parser.error("--isa: torch was imported before its ISA could be capped")
    os.environ["ONEDNN_MAX_CPU_ISA"] = ONEDNN_ISAS[args.isa]
    args.no_keras = True
    print(f"ISA: lstmeng kernels {args.isa}, torch's oneDNN capped at {ONEDNN_ISAS[args.isa]}, Keras skipped")
    with kernel_overrides(cython_isa=args.isa):
        return run(args)


def run(args) -> int:
    """The comparison for parsed arguments (main's)."""
    global clock
    if args.cpu_time:
        clock = time.process_time
        args.threads = 1
    # The same thread count for every library; OpenBLAS reads it when it loads,
    # so it is set before anything imports scipy.
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0").split(",")[0] or 0) \
        or runtime_threads.usable_cores()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    use_torch = not args.no_torch and library_available("torch")
    use_keras = not args.no_keras and library_available("keras") and library_available("tensorflow")
    if use_keras:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)

    peak = timing.blas_gemm_peak(2048, args.repeats, clock=clock)
    # Its threads spin on: timed right after, a batch-1 unit split ran on one thread at
    # 1.0 ms instead of 0.55 (a single-shape run).
    time.sleep(timing.BLAS_SPIN_SECONDS)
    print(f"CPU: {runtime_threads.cpu_model()}; threads: {threads}; float32; best of {args.repeats}; "
          f"{'process CPU time' if args.cpu_time else 'wall time'}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"sgemm peak (scipy, 2048^3): {peak:.1f} GFLOP/s")
    print("libraries: lstmeng-cython" + (", torch" if use_torch else " (torch missing)")
          + (", keras" if use_keras else " (keras missing)"))
    header = (f"{'B,T,I,H':>16} {'library':>8} | {'fwd ms':>8} {'GFLOP/s':>7} {'%peak':>5} | "
              f"{'fwd+bwd ms':>10} {'GFLOP/s':>7} {'%peak':>5}")
    print(header)
    print("-" * len(header))
    summary = []
    for shape in shapes:
        flops = timing.Shape(*shape).forward_flops
        results = {"cython": lstmeng_timings(shape, args.repeats)}
        if use_torch:
            results["torch"] = torch_timings(shape, args.repeats, threads)
        if use_keras:
            results["keras"] = keras_timings(shape, max(2, args.repeats // 2))
        for library, (forward, forward_backward) in results.items():
            print(f"{','.join(map(str, shape)):>16} {library:>8} | {forward * 1e3:8.2f} "
                  f"{flops / forward / 1e9:7.1f} {flops / forward / 1e9 / peak:5.0%} | "
                  f"{forward_backward * 1e3:10.2f} {3 * flops / forward_backward / 1e9:7.1f} "
                  f"{3 * flops / forward_backward / 1e9 / peak:5.0%}")
        summary.append((shape, results))
        sys.stdout.flush()

    print()
    print("speed-ups of lstmeng-cython (time of the other library / ours):")
    for shape, results in summary:
        ours = results["cython"]
        parts = []
        for library in ("torch", "keras"):
            if library in results:
                theirs = results[library]
                parts.append(f"vs {library}: fwd {theirs[0] / ours[0]:.2f}x, "
                             f"fwd+bwd {theirs[1] / ours[1]:.2f}x")
        print(f"{','.join(map(str, shape)):>16}  " + ("; ".join(parts) or "(no other library)"))

    if not args.no_variable_length:
        print()
        print("variable length (lengths uniform in 1..T) / full length, lstmeng-cython:")
        for shape in shapes:
            batch, steps = shape[0], shape[1]
            if batch < 8:
                continue
            lengths = np.random.default_rng(1).integers(1, steps + 1, size=batch)
            # Full and variable length interleaved call by call: the ratio is what matters.
            (full_forward, full_both), (variable_forward, variable_both) = (
                lstmeng_calls(shape), lstmeng_calls(shape, lengths))
            forwards = timing.interleaved_best_times({"full": full_forward, "variable": variable_forward},
                                                     args.repeats, warmup=1, clock=clock)
            boths = timing.interleaved_best_times({"full": full_both, "variable": variable_both},
                                                  args.repeats, warmup=1, clock=clock)
            full, variable = [(forwards[key].seconds, boths[key].seconds) for key in ("full", "variable")]
            # Three decimals: the target (<= 0.6) sits where two would round either way.
            print(f"{','.join(map(str, shape)):>16}  fwd {variable[0] / full[0]:.3f}, "
                  f"fwd+bwd {variable[1] / full[1]:.3f}  (mean length / T = "
                  f"{lengths.mean() / steps:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
