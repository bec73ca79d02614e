"""Short sequence calls: lstmeng.torch.LSTM against torch.nn.LSTM, one call at a time.

A loop that calls an LSTM module on short sequences (a streaming model fed a
few steps at a time, a truncated-BPTT window, one decoding step) pays each
module's per-call glue on every call, which a long sequence hides. This
times loops of such calls at batch 1 in one process, the two modules
interleaved (the same weights, loaded from one state dict), best of several
repeats, and prints microseconds per call:

* inference: calls under ``torch.no_grad()``;
* training: each call followed by a backward from the outputs' sum into the
  parameters' ``.grad``.

Usage:
    python benchmarks/torch_short_calls.py                   # T = 1 and 16, I = 64, H = 128
    python benchmarks/torch_short_calls.py --steps 1 4 16 64 --sizes 256,512 --repeats 9
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 16], help="sequence lengths T")
    parser.add_argument("--sizes", default="64,128", help="input size and hidden size, I,H")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=300, help="calls per timed loop")
    parser.add_argument("--repeats", type=int, default=15, help="timed loops per module (best kept)")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def call_loop(module, x, training: bool, calls: int):
    """A loop of ``calls`` calls of ``module`` on ``x``: under ``torch.no_grad()``, or each call
    followed by a backward from its outputs' sum."""
    import torch

    def inference():
        with torch.no_grad():
            for _ in range(calls):
                module(x)

    def train():
        for _ in range(calls):
            output, _ = module(x)
            output.sum().backward()

    return train if training else inference


def main() -> int:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    import lstmeng.torch
    from lstmeng._runtime import timing

    torch.set_num_threads(args.threads)
    inputs, units = (int(value) for value in args.sizes.split(","))
    print(f"batch {args.batch}, I={inputs}, H={units}, one layer, {args.threads} threads, {args.calls}-call loops, "
          f"best of {args.repeats}; microseconds per call (x torch: torch.nn.LSTM's time / lstmeng's)")
    for steps in args.steps:
        torch.manual_seed(0)
        reference = torch.nn.LSTM(inputs, units, batch_first=True)
        mine = lstmeng.torch.LSTM(inputs, units, batch_first=True)
        mine.load_state_dict(reference.state_dict())
        x = torch.randn(args.batch, steps, inputs)
        for training in (False, True):
            # The two modules' loops in turn (a busy moment falls on both); one warm-up loop each
            # (thread pools, buffer caches, the split chooser).
            best = timing.interleaved_best_times(
                {name: call_loop(module, x, training, args.calls) for name, module in
                 (("torch", reference), ("lstmeng", mine))}, args.repeats, warmup=1, clock=time.perf_counter)
            theirs, ours = (best[name].seconds / args.calls for name in ("torch", "lstmeng"))
            print(f"T={steps} {'training' if training else 'inference'}: torch.nn.LSTM {theirs * 1e6:.1f} us, "
                  f"lstmeng.torch.LSTM {ours * 1e6:.1f} us ({theirs / ours:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
