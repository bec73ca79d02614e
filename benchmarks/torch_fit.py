"""Per-epoch training time: lstmeng.torch.LSTM against torch.nn.LSTM in the same PyTorch model.

The same model (a stacked LSTM, its last output into a Linear head), the same
initial weights (one state dict loaded into both), the same data and the same
optimizer (Adam), in one process. After one warm-up epoch each, epochs
alternate between the implementations and the best epoch of each is kept, so
load from other processes hits both alike. Prints the best and the median
epoch time of each, the ratio of the best times torch / lstmeng (> 1: lstmeng
is faster) and each model's final loss (the two train the same model, so the
losses agree to rounding), after the CPU model and the load average. On a
shared machine the median shows how much the load moved the numbers.

Shapes (the issue's targets):
    batch   B=64, T=100, I=H=256, 2 layers      target: lstmeng >= 1.3x faster
    online  B=1,  T=500, I=64,   H=128, 2 layers (one sequence per step) target: >= 2x

Threads: ``--threads`` (default 2) for both: ``torch.set_num_threads`` and
OMP_NUM_THREADS, which the cython backend reads.

``--device cuda``: both models and the data on the GPU (torch.nn.LSTM on cuDNN, lstmeng's
"auto" on numba_cuda, which takes the CUDA tensors without copies); each epoch ends with a
device synchronise, so queued work counts. The first (warm-up) epoch includes numba's
compilation of the kernels.

Usage:
    python benchmarks/torch_fit.py                 # both shapes, 5 timed epochs each
    python benchmarks/torch_fit.py --quick         # smaller epochs, 1 timed epoch (a minute)
    python benchmarks/torch_fit.py --shape online --backend numpy
    python benchmarks/torch_fit.py --device cuda --quick     # on a GPU, against cuDNN
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark configuration: batch size, steps, features, units, layers and sequences per epoch."""

    name: str
    batch: int
    steps: int
    features: int
    units: int
    layers: int
    samples: int
    quick_samples: int


SHAPES = {
    "batch": Shape("batch", batch=64, steps=100, features=256, units=256, layers=2, samples=512,
                   quick_samples=128),
    "online": Shape("online", batch=1, steps=500, features=64, units=128, layers=2, samples=32, quick_samples=8),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, "both"], default="both")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per implementation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="auto", help="lstmeng backend (auto: cython, else numpy)")
    parser.add_argument("--quick", action="store_true", help="fewer sequences per epoch and one timed epoch")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (models and data on the GPU)")
    return parser.parse_args()


def build_models(shape: Shape, backend: str, device: str = "cpu"):
    """(torch model, lstmeng model) on ``device``: the same weights, differing only in the LSTM class."""
    import torch

    import lstmeng.torch

    class Regressor(torch.nn.Module):
        def __init__(self, lstm):
            super().__init__()
            self.lstm = lstm
            self.head = torch.nn.Linear(shape.units, 1)

        def forward(self, x):
            output, _ = self.lstm(x)
            return self.head(output[:, -1])

    torch.manual_seed(0)
    reference = Regressor(torch.nn.LSTM(shape.features, shape.units, num_layers=shape.layers, batch_first=True))
    mine = Regressor(lstmeng.torch.LSTM(shape.features, shape.units, num_layers=shape.layers, batch_first=True,
                                        backend=backend))
    mine.load_state_dict(reference.state_dict())
    return reference.to(device), mine.to(device)


def make_data(shape: Shape, samples: int, device: str = "cpu"):
    import torch

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(samples, shape.steps, shape.features, generator=generator)
    target = x[:, 0, :1] * x[:, -1, 1:2]     # needs memory across the whole sequence
    return x.to(device), target.to(device)


class Trainer:
    """A model, its Adam optimizer, and one epoch of minibatch training."""

    def __init__(self, model):
        import torch

        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.loss = float("nan")

    def epoch(self, x, target, batch: int) -> float:
        """Seconds for one pass over (x, target) in minibatches of ``batch``."""
        import torch

        start = time.perf_counter()
        for first in range(0, len(x), batch):
            self.optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(self.model(x[first:first + batch]), target[first:first + batch])
            loss.backward()
            self.optimizer.step()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.loss = float(loss.detach())
        return time.perf_counter() - start


def measure(shape: Shape, args) -> dict:
    import numpy as np

    samples = shape.quick_samples if args.quick else shape.samples
    repeats = 1 if args.quick else args.repeats
    x, target = make_data(shape, samples, args.device)
    reference, mine = build_models(shape, args.backend, args.device)
    trainers = {"torch.nn.LSTM": Trainer(reference), "lstmeng.torch.LSTM": Trainer(mine)}
    for trainer in trainers.values():
        trainer.epoch(x, target, shape.batch)             # warm-up: allocator, thread pools
    seconds = {name: [] for name in trainers}
    for _ in range(repeats):
        for name, trainer in trainers.items():
            seconds[name].append(trainer.epoch(x, target, shape.batch))
    return {"best": {name: min(times) for name, times in seconds.items()},
            "median": {name: float(np.median(times)) for name, times in seconds.items()},
            "losses": {name: trainer.loss for name, trainer in trainers.items()}, "samples": samples}


def main():
    args = parse_args()
    # Before torch and the cython backend start their thread pools.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import torch

    from lstmeng._runtime import threads
    from lstmeng.backends import registry

    torch.set_num_threads(args.threads)
    on_gpu = torch.device(args.device).type == "cuda"
    if args.backend == "auto" and not on_gpu:
        # What the module's "auto" picks for CPU float32 tensors (cython, else numpy).
        args.backend = registry.resolve("auto", np.empty(0, np.float32), "float32", "tanh", "sigmoid").name
    backend = args.backend
    where = (f"GPU: {torch.cuda.get_device_name(args.device)}, cuDNN {torch.backends.cudnn.version()}" if on_gpu
             else f"CPU: {threads.cpu_model()}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"{where}; torch {torch.__version__}; lstmeng backend {backend!r}{'; --quick' if args.quick else ''}")
    names = list(SHAPES) if args.shape == "both" else [args.shape]
    print(f"{'shape':<42} {'torch s/epoch':>14} {'lstmeng s/epoch':>16} {'speed-up':>9}   "
          "final losses (torch, lstmeng)")
    print(f"{'':<42} {'best (median)':>14} {'best (median)':>16} {'(best)':>9}")
    for name in names:
        shape = SHAPES[name]
        result = measure(shape, args)
        best, median, losses = result["best"], result["median"], result["losses"]
        ratio = best["torch.nn.LSTM"] / best["lstmeng.torch.LSTM"]
        label = (f"{shape.name}: B={shape.batch} T={shape.steps} I={shape.features} H={shape.units} "
                 f"L={shape.layers} x{result['samples']}")
        torch_times = f"{best['torch.nn.LSTM']:.3f} ({median['torch.nn.LSTM']:.3f})"
        lstmeng_times = f"{best['lstmeng.torch.LSTM']:.3f} ({median['lstmeng.torch.LSTM']:.3f})"
        print(f"{label:<42} {torch_times:>14} {lstmeng_times:>16} {ratio:>8.2f}x"
              f"   {losses['torch.nn.LSTM']:.5f}, {losses['lstmeng.torch.LSTM']:.5f}", flush=True)


if __name__ == "__main__":
    main()
