"""Short batch-1 calls of the cython backend on a busy machine: the automatic thread choice
against one thread, mean and median per call (issue 17's busy-machine target: no slower than
1.2x the one-thread time).

With ``--hog`` a CPU-bound process (``python -c "while True: pass"``) runs beside the
measurement, as another program on one of the two cores would. Each shape runs a block of
calls with the automatic choice (``OMP_NUM_THREADS`` = ``--threads``; the unit split, its
busy-machine governor and the split chooser decide) and a block on one thread
(``OMP_NUM_THREADS=1``, read by the backend at every call), alternating ``--rounds`` times,
each block after its own warm-up (the backend's governor and chooser keep what they learnt
across blocks and shapes, as in one long-running program). Long blocks: the cost of the
split under load is its rare stalls (a member that lost its core for a scheduler slice),
which only the mean shows.

    python benchmarks/busy_machine.py --hog                  # the shapes of docs/cython.md
    python benchmarks/busy_machine.py --calls 2000 --rounds 1 # quick look, quiet machine
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time

import numpy as np

#: (steps, training, calls): batch 1, I = 64, H = 128: calls the unit split takes since session 12.
SHAPES = ((64, False, 30000), (16, True, 15000))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hog", action="store_true", help="run a CPU-bound process beside the calls")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=None, help="calls per block (default: per shape)")
    return parser.parse_args()


@contextlib.contextmanager
def cpu_hog(enabled: bool):
    """A busy-looping Python process while the block runs (nothing when not enabled)."""
    if not enabled:
        yield
        return
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)   # let the scheduler place it
        yield
    finally:
        hog.kill()
        hog.wait()


def block(layer, x, dy, training: bool, calls: int, threads: int) -> np.ndarray:
    """Seconds of each of ``calls`` calls with OMP_NUM_THREADS=threads, after 50 warm-up calls."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    seconds = np.empty(calls)
    for call in range(-50, calls):
        start = time.perf_counter()
        if training:
            layer(x, training=True)
            layer.backward(dy)
        else:
            layer(x)
        if call >= 0:
            seconds[call] = time.perf_counter() - start
    return seconds


def main():
    args = parse_args()
    import lstmeng as le
    from lstmeng._runtime import threads as runtime_threads

    print(f"CPU: {runtime_threads.cpu_model()}; {'CPU hog on' if args.hog else 'no hog'}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| B,T,I,H | mode | auto: mean / median ms | 1 thread: mean / median ms | auto / 1 thread (mean) |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    with cpu_hog(args.hog):
        for steps, training, default_calls in SHAPES:
            calls = args.calls or default_calls
            x = rng.normal(size=(1, steps, 64)).astype(np.float32)
            dy = np.ones((1, steps, 128), np.float32)
            layer = le.LSTM(128, return_sequences=True, backend="cython", seed=0).build(64)
            for _ in range(args.rounds):
                auto = block(layer, x, dy, training, calls, args.threads)
                one = block(layer, x, dy, training, calls, 1)
                print(f"| 1,{steps},64,128 | {'train' if training else 'infer'} | "
                      f"{auto.mean() * 1e3:.3f} / {np.median(auto) * 1e3:.3f} | "
                      f"{one.mean() * 1e3:.3f} / {np.median(one) * 1e3:.3f} | {auto.mean() / one.mean():.2f}x |",
                      flush=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)


if __name__ == "__main__":
    main()
