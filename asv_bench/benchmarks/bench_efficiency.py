"""Ratios measured inside one process, robust to a noisy machine.

Absolute timings move with machine load and clocks; a ratio of two timings
taken seconds apart in the same process mostly does not. These track_
benchmarks record:

- the layer's achieved GFLOP/s as a fraction of a square matrix product's
  GFLOP/s on the same device (how close to the hardware the kernels get);
- the layer's speed relative to ``torch.nn.LSTM`` on the same inputs and
  device (> 1: lstmeng is faster), where torch is installed.
"""

from .common import (
    BACKENDS,
    SHAPE_NAMES,
    SHAPES,
    Benchmark,
    LayerRun,
    TorchRun,
    best_seconds,
    forward_flops,
    matmul_peak_gflops,
    speed_ratio,
)


class FractionOfMatmulPeak(Benchmark):
    """Useful LSTM GFLOP/s divided by matmul GFLOP/s (8*H*(I+H) flops per real row-step)."""

    params = (BACKENDS, SHAPE_NAMES)
    param_names = ("backend", "shape")
    unit = "fraction of matmul GFLOP/s"

    def setup(self, backend, shape):
        self.run = LayerRun(backend, shape)
        self.run.forward()  # warm-up of both timed calls
        self.run.training_step()
        self.peak_gflops = matmul_peak_gflops(backend)
        self.flops = forward_flops(SHAPES[shape])

    def track_forward_fraction_of_matmul_peak(self, backend, shape):
        seconds = best_seconds(self.run.forward)
        return self.flops / seconds / 1e9 / self.peak_gflops

    def track_training_fraction_of_matmul_peak(self, backend, shape):
        seconds = best_seconds(self.run.training_step)
        return 3.0 * self.flops / seconds / 1e9 / self.peak_gflops


class SpeedVersusTorch(Benchmark):
    """torch.nn.LSTM time divided by lstmeng time on the same shape and device (> 1: lstmeng faster)."""

    params = (BACKENDS, SHAPE_NAMES)
    param_names = ("backend", "shape")
    unit = "x torch.nn.LSTM speed"

    def setup(self, backend, shape):
        self.run = LayerRun(backend, shape)
        self.torch_run = TorchRun(backend, shape)
        for run in (self.run, self.torch_run):  # warm-up of both timed calls
            run.forward()
            run.training_step()

    def track_forward_speed_vs_torch(self, backend, shape):
        return speed_ratio(self.torch_run.forward, self.run.forward)

    def track_training_speed_vs_torch(self, backend, shape):
        return speed_ratio(self.torch_run.training_step, self.run.training_step)
