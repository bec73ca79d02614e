"""Calls of the cython backend on a busy machine: the automatic thread choice against one
thread, mean and median per call (issue 17's busy-machine target: no slower than 1.2x the
one-thread time). By default the short batch-1 calls that split their units; ``--shapes``
for others, e.g. the whole parts of larger batches.

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
    python benchmarks/busy_machine.py --hog --shapes 64,1,128,512:infer:3000 \
        256,50,128,128:train:60 64,100,256,256:infer:60 64,50,64,128:train:200   # whole parts
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time

import numpy as np

#: (B, T, I, H), training, calls: batch 1 calls the unit split takes since session 12.
SHAPES = (((1, 64, 64, 128), False, 30000), ((1, 16, 64, 128), True, 15000))


def parse_shape(text: str) -> tuple:
    """"B,T,I,H:infer|train:calls" -> ((B, T, I, H), training, calls)."""
    try:
        sizes, mode, calls = text.split(":")
        shape = tuple(int(size) for size in sizes.split(","))
        if len(shape) != 4 or mode not in ("infer", "train") or int(calls) < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is B,T,I,H:infer|train:calls, got {text!r}") from None
    return shape, mode == "train", int(calls)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hog", action="store_true", help="run a CPU-bound process beside the calls")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=None, help="calls per block (default: per shape)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=SHAPES,
                        help="B,T,I,H:infer|train:calls each (default: the batch-1 shapes)")
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
        for (batch, steps, features, units), training, default_calls in args.shapes:
            calls = args.calls or default_calls
            x = rng.normal(size=(batch, steps, features)).astype(np.float32)
            dy = np.ones((batch, steps, units), np.float32)
            layer = le.LSTM(units, return_sequences=True, backend="cython", seed=0).build(features)
            for _ in range(args.rounds):
                auto = block(layer, x, dy, training, calls, args.threads)
                one = block(layer, x, dy, training, calls, 1)
                print(f"| {batch},{steps},{features},{units} | {'train' if training else 'infer'} | "
                      f"{auto.mean() * 1e3:.3f} / {np.median(auto) * 1e3:.3f} | "
                      f"{one.mean() * 1e3:.3f} / {np.median(one) * 1e3:.3f} | {auto.mean() / one.mean():.2f}x |",
                      flush=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)


if __name__ == "__main__":
    main()
