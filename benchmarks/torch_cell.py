"""Step-by-step cell loops: lstmeng.torch.LSTMCell and lstmeng.LSTMCell against torch.nn.LSTMCell.

A loop that calls a cell once per step pays the per-call glue of each
implementation at every step, which one call over a whole sequence does not.
This times 50-step loops at batch 1 (by default) in one process, the
implementations interleaved, best of several repeats, and prints microseconds
per step:

* inference: the loop under ``torch.no_grad()`` (NumPy for ``lstmeng.LSTMCell``);
* training: the loop with autograd recording, then one backward from the sum
  of the last h (``lstmeng.LSTMCell``: its explicit backward through the
  unrolled steps);
* online: a backward after every step from the sum of its h, the states
  detached before the next (learning from a stream one step at a time).

Usage:
    python benchmarks/torch_cell.py                  # (I, H) = (64, 128) and (256, 512)
    python benchmarks/torch_cell.py --sizes 64,128 --batch 4 --repeats 15
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

STEPS = 50


def torch_loops(cell, x, batch: int, units: int):
    """(inference, training, online) loops of a torch.nn.LSTMCell-like module over STEPS steps."""
    import torch

    def inference():
        h = c = torch.zeros(batch, units)
        with torch.no_grad():
            for _ in range(STEPS):
                h, c = cell(x, (h, c))

    def training():
        h = c = torch.zeros(batch, units)
        for _ in range(STEPS):
            h, c = cell(x, (h, c))
        h.sum().backward()

    def online():
        h = c = torch.zeros(batch, units)
        for _ in range(STEPS):
            h, c = cell(x, (h.detach(), c.detach()))
            h.sum().backward()

    return inference, training, online


def numpy_loops(cell, x, batch: int, units: int):
    """(inference, training, online) loops of lstmeng.LSTMCell (NumPy in and out, explicit backward)."""
    zeros = np.zeros((batch, units), np.float32)
    ones = np.ones((batch, units), np.float32)

    def inference():
        state = [zeros, zeros]
        for _ in range(STEPS):
            _, state = cell(x, state)

    def training():
        state = [zeros, zeros]
        for _ in range(STEPS):
            _, state = cell(x, state, training=True)
        dh, dc = ones, None
        for _ in range(STEPS):
            _, (dh, dc) = cell.backward(dh, dc)

    def online():
        state = [zeros, zeros]
        for _ in range(STEPS):
            _, state = cell(x, state, training=True)
            cell.backward(ones, None)

    return inference, training, online


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["64,128", "256,512"], help="I,H pairs")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9, help="best of this many loops")
    parser.add_argument("--threads", type=int, default=None, help="default: OMP_NUM_THREADS, else 2")
    args = parser.parse_args(argv)
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "2"))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    import lstmeng as le
    import lstmeng.torch
    from lstmeng._runtime import timing

    torch.set_num_threads(threads)
    print(f"batch {args.batch}, {STEPS}-step loops, {threads} threads, best of {args.repeats}; "
          "microseconds per step (x torch: torch.nn.LSTMCell's time / this one's)")
    for size in args.sizes:
        features, units = (int(value) for value in size.split(","))
        torch.manual_seed(0)
        x = torch.randn(args.batch, features)
        theirs = torch.nn.LSTMCell(features, units)
        ours = lstmeng.torch.LSTMCell(features, units)
        ours.load_state_dict(theirs.state_dict())
        numpy_cell = le.LSTMCell(units, seed=0)
        numpy_cell.build(features)
        loops = {"torch.nn.LSTMCell": torch_loops(theirs, x, args.batch, units),
                 "lstmeng.torch.LSTMCell": torch_loops(ours, x, args.batch, units),
                 "lstmeng.LSTMCell": numpy_loops(numpy_cell, x.numpy(), args.batch, units)}
        for mode, index in (("inference", 0), ("training", 1), ("online", 2)):
            best = timing.interleaved_best_times({name: pair[index] for name, pair in loops.items()},
                                                 args.repeats, warmup=2, clock=time.perf_counter)
            reference = best["torch.nn.LSTMCell"].seconds
            print(f"I={features}, H={units} {mode}: " + "; ".join(
                f"{name} {result.seconds / STEPS * 1e6:.1f} us ({reference / result.seconds:.2f}x)"
                for name, result in best.items()))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
