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


def best_per_call(modules: dict, x, training: bool, calls: int, repeats: int) -> dict:
    """Seconds per call of each module's best loop, the modules' loops interleaved."""
    import torch

    def loop(module):
        if training:
            for _ in range(calls):
                output, _ = module(x)
                output.sum().backward()
        else:
            with torch.no_grad():
                for _ in range(calls):
                    module(x)

    for module in modules.values():
        loop(module)   # warm-up: thread pools, buffer caches, the split chooser
    best = {name: float("inf") for name in modules}
    for _ in range(repeats):
        for name, module in modules.items():
            start = time.perf_counter()
            loop(module)
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def main() -> int:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    import lstmeng.torch

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
            best = best_per_call({"torch": reference, "lstmeng": mine}, x, training, args.calls, args.repeats)
            print(f"T={steps} {'training' if training else 'inference'}: torch.nn.LSTM {best['torch'] * 1e6:.1f} us, "
                  f"lstmeng.torch.LSTM {best['lstmeng'] * 1e6:.1f} us ({best['torch'] / best['lstmeng']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
