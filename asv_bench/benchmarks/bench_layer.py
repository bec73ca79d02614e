"""One LSTM layer over a whole sequence: inference, training step, its peak memory."""

from .common import BACKENDS, SHAPE_NAMES, SHORT_SHAPE_NAMES, Benchmark, LayerRun


class LayerForward(Benchmark):
    """``le.LSTM(H, return_sequences=True)`` inference on a ``[B, T, I]`` batch."""

    params = (BACKENDS, SHAPE_NAMES)
    param_names = ("backend", "shape")

    def setup(self, backend, shape):
        self.run = LayerRun(backend, shape)
        self.run.forward()  # warm-up

    def time_forward(self, backend, shape):
        self.run.forward()


class LayerTrainingStep(Benchmark):
    """Training forward plus the full backward pass (dx and the weight gradients)."""

    params = (BACKENDS, SHAPE_NAMES)
    param_names = ("backend", "shape")

    def setup(self, backend, shape):
        self.run = LayerRun(backend, shape)
        self.run.training_step()  # warm-up

    def time_training_step(self, backend, shape):
        self.run.training_step()

    def peakmem_training_step(self, backend, shape):
        # asv reports the process's peak resident memory: setup's inputs and
        # weights plus the workspace the training forward keeps for backward.
        self.run.training_step()


class ShortCall(Benchmark):
    """A few steps of a small batch (``short-B8``: B=8, T=3), inference and a training step:
    the regime where the cython backend's step products moved from BLAS's SGEMM to its own
    GEMV and packed kernels (session 16)."""

    params = (BACKENDS, SHORT_SHAPE_NAMES)
    param_names = ("backend", "shape")

    def setup(self, backend, shape):
        self.run = LayerRun(backend, shape)
        self.run.training_step()  # warm-up

    def time_forward(self, backend, shape):
        self.run.forward()

    def time_training_step(self, backend, shape):
        self.run.training_step()
