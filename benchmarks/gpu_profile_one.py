"""A few identical numba_cuda forward calls, for a profiler or a sanitizer to look at.

Usage (on a machine with an NVIDIA GPU; tools/gpu_session.sh runs both)::

    ncu --clock-control none --kernel-name regex:forward --launch-skip 2 --launch-count 1 \\
        python benchmarks/gpu_profile_one.py            # B=1, T=200, I=256, H=1024
    compute-sanitizer --tool racecheck python benchmarks/gpu_profile_one.py --small

The calls go through the public API (``le.LSTM`` on a device array), so they
run whichever recurrence design the backend picks for the shape; the first
call compiles, so a profiler should skip it. ``--small`` (B=2, T=20, I=32,
H=64, training forward and backward) keeps a sanitizer's run short while
still covering the forward and backward kernels and both barrier phases.
"""

from __future__ import annotations

import argparse

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a tiny training call for sanitizers")
    parser.add_argument("--calls", type=int, default=4)
    args = parser.parse_args(argv)

    from numba import cuda

    import lstmeng as le

    batch, steps, features, units = (2, 20, 32, 64) if args.small else (1, 200, 256, 1024)
    rng = np.random.default_rng(0)
    x = cuda.to_device(rng.standard_normal((batch, steps, features)).astype(np.float32))
    layer = le.LSTM(units, return_sequences=True, backend="numba_cuda", seed=0)
    for _ in range(args.calls):
        y = layer(x, training=args.small)
        if args.small:
            layer.backward(cuda.to_device(np.ones(tuple(y.shape), np.float32)))
    cuda.synchronize()
    host = y.copy_to_host() if hasattr(y, "copy_to_host") else np.asarray(y)
    print(f"{args.calls} calls of B={batch} T={steps} I={features} H={units}: output finite "
          f"{bool(np.isfinite(host).all())}, mean |y| {float(np.abs(host).mean()):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
