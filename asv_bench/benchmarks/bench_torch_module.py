"""``lstmeng.torch.LSTM`` and ``LSTMCell``: the drop-in PyTorch modules, called as a PyTorch model calls them.

The module's own glue (parameter views, autograd Function, tensor wrapping) is
part of every timing, which ``bench_layer``'s ``le.LSTM`` does not pay; the
ratio against ``torch.nn.LSTM`` on the same inputs is issue 19's measure.
"""

from .common import (
    BACKENDS,
    SHAPE_NAMES,
    SHAPES,
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
    """``lstmeng.torch.LSTMCell`` stepped over the shape's T steps on CPU tensors, as PyTorch code
    steps a cell: training (autograd records every step, one backward from the last h into the
    parameters' ``.grad``; a loop's weight gradients are added up once at its end where the
    backend gives dz, see ``lstmeng.torch._CellUnroll``) and online (a backward after every
    step, the states detached), and each against ``torch.nn.LSTMCell`` on the same inputs (> 1:
    lstmeng faster). Not tracked: variable-length shapes (a cell has no lengths), the tensorflow
    backend (as ``TorchModuleRun``) and numba_cuda (cell loops on CUDA tensors)."""

    params = (BACKENDS, SHAPE_NAMES)
    param_names = ("backend", "shape")

    def setup(self, backend, shape):
        shape = SHAPES[shape]
        if shape.variable_length:
            raise NotImplementedError("a cell loop has no variable-length form")
        if backend in ("tensorflow", "numba_cuda"):
            raise NotImplementedError(f"lstmeng.torch cell loops with the {backend} backend are not tracked")
        torch = import_torch()
        require_backend(backend)
        import lstmeng.torch
        torch.manual_seed(0)
        self.steps = shape.steps
        self.reference = torch.nn.LSTMCell(shape.inputs, shape.units)
        self.mine = lstmeng.torch.LSTMCell(shape.inputs, shape.units, backend=backend)
        self.mine.load_state_dict(self.reference.state_dict())
        self.x = torch.randn(shape.batch, shape.inputs)
        self.zeros = torch.zeros(shape.batch, shape.units)
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

    def time_training_loop(self, backend, shape):
        self._training(self.mine)

    def time_online_loop(self, backend, shape):
        self._online(self.mine)

    def track_training_speed_vs_torch(self, backend, shape):
        return speed_ratio(lambda: self._training(self.reference), lambda: self._training(self.mine),
                           budget_seconds=0.5)

    def track_online_speed_vs_torch(self, backend, shape):
        return speed_ratio(lambda: self._online(self.reference), lambda: self._online(self.mine),
                           budget_seconds=0.5)
