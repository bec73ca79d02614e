"""``lstmeng.torch.LSTM`` and ``LSTMCell``: the drop-in PyTorch modules, called as a PyTorch model calls them.

The module's own glue (parameter views, autograd Function, tensor wrapping) is
part of every timing, which ``bench_layer``'s ``le.LSTM`` does not pay; the
ratio against ``torch.nn.LSTM`` on the same inputs is issue 19's measure.
"""

from .common import (
    BACKENDS,
    SHAPE_NAMES,
    Benchmark,
    TorchModuleRun,
    TorchRun,
    import_torch,
    require_backend,
    speed_ratio,
)


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


class TorchCellLoop(Benchmark):
    """A 50-step ``lstmeng.torch.LSTMCell`` loop at batch 1 on the cython backend, as PyTorch code
    steps a cell: training (autograd records every step, one backward from the last h into the
    parameters' ``.grad``; the loop's weight gradients are added up once at its end, see
    ``lstmeng.torch._CellUnroll``) and online (a backward after every step, the states detached),
    and each against ``torch.nn.LSTMCell`` on the same inputs (> 1: lstmeng faster)."""

    params = (("64x128", "256x512"),)
    param_names = ("cell",)
    steps = 50

    def setup(self, cell):
        torch = import_torch()
        require_backend("cython")
        import lstmeng.torch
        features, units = (int(size) for size in cell.split("x"))
        torch.manual_seed(0)
        self.reference = torch.nn.LSTMCell(features, units)
        self.mine = lstmeng.torch.LSTMCell(features, units, backend="cython")
        self.mine.load_state_dict(self.reference.state_dict())
        self.x = torch.randn(1, features)
        self.zeros = torch.zeros(1, units)
        for module in (self.reference, self.mine):
            self._training(module)
            self._online(module)

    def _training(self, module):
        h = c = self.zeros
        for _ in range(self.steps):
            h, c = module(self.x, (h, c))
        h.sum().backward()

    def _online(self, module):
        h = c = self.zeros
        for _ in range(self.steps):
            h, c = module(self.x, (h.detach(), c.detach()))
            h.sum().backward()

    def time_training_loop(self, cell):
        self._training(self.mine)

    def time_online_loop(self, cell):
        self._online(self.mine)

    def track_training_speed_vs_torch(self, cell):
        return speed_ratio(lambda: self._training(self.reference), lambda: self._training(self.mine),
                           budget_seconds=0.5)

    def track_online_speed_vs_torch(self, cell):
        return speed_ratio(lambda: self._online(self.reference), lambda: self._online(self.mine),
                           budget_seconds=0.5)
