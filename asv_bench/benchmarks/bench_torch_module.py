"""``lstmeng.torch.LSTM``: the drop-in PyTorch module, called as a PyTorch model calls it.

The module's own glue (parameter views, autograd Function, tensor wrapping) is
part of every timing, which ``bench_layer``'s ``le.LSTM`` does not pay; the
ratio against ``torch.nn.LSTM`` on the same inputs is issue 19's measure.
"""

from .common import BACKENDS, SHAPE_NAMES, Benchmark, TorchModuleRun, TorchRun, speed_ratio


class TorchModuleCall(Benchmark):
    """One call on the shape's ``[B, T, I]`` tensor (a packed sequence for the variable-length
    shape): inference, and a training call (forward, then backward into the input's and the
    parameters' ``.grad``)."""

    params = (BACKENDS, SHAPE_NAMES)
    param_names = ("backend", "shape")

    def setup(self, backend, shape):
        self.run = TorchModuleRun(backend, shape)
        self.run.forward()
        self.run.training_step()

    def time_module_forward(self, backend, shape):
        self.run.forward()

    def time_module_training_step(self, backend, shape):
        self.run.training_step()


class TorchModuleVersusTorch(Benchmark):
    """``torch.nn.LSTM``'s time / ``lstmeng.torch.LSTM``'s (> 1: the swap made the model faster),
    both measured in this process on the same inputs, calls alternating."""

    params = (BACKENDS, SHAPE_NAMES)
    param_names = ("backend", "shape")

    def setup(self, backend, shape):
        self.mine = TorchModuleRun(backend, shape)
        self.reference = TorchRun(backend, shape, on_gpu=backend == "numba_cuda")
        for run in (self.mine, self.reference):
            run.forward()
            run.training_step()

    def track_module_forward_speed_vs_torch(self, backend, shape):
        return speed_ratio(self.reference.forward, self.mine.forward, budget_seconds=0.5)

    def track_module_training_speed_vs_torch(self, backend, shape):
        return speed_ratio(self.reference.training_step, self.mine.training_step, budget_seconds=0.5)
