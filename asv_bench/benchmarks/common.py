"""What every lstmeng benchmark shares: backends, shapes, inputs, timing helpers.

The timers, the matrix-product GFLOP/s and the FLOP formula are lstmeng's own
(``lstmeng._runtime.timing``, also used by ``lstmeng bench`` and the scripts in
``benchmarks/``); this module only sets the suite's policy (repeats, budgets).

Every benchmark is parametrised over ``BACKENDS`` and a few named shapes. A
backend that is not available on the machine (not built, library missing, no
GPU) makes ``setup`` raise ``NotImplementedError``, which asv records as
"skipped" rather than "failed". Optional libraries (torch, TensorFlow, numba)
are imported only inside ``setup`` or the helpers below, never at module
level, so benchmark discovery works wherever lstmeng itself imports.

Inputs are deterministic (a fixed seed per shape) and cached per process, so
repeated setups of the same shape do not redraw them. All allocation, device
copies, warm-up and JIT compilation happen in ``setup``; the timed calls only
run the layer and, for device backends, wait for the device to finish.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os

import numpy as np

import lstmeng as le
from lstmeng._runtime import timing

#: Every backend the registry knows; unavailable ones skip.
BACKENDS = ("numpy", "cython", "numba_cuda", "tensorflow")

#: Environment variable with a comma-separated subset of BACKENDS to run (the
#: others skip), e.g. to record only the backend an environment adds.
BACKENDS_VARIABLE = "LSTMENG_ASV_BACKENDS"

#: Compute dtype of every benchmark (what the fast backends are tuned for).
DTYPE = "float32"


@dataclasses.dataclass(frozen=True)
class Shape(timing.Shape):
    """Problem size of one benchmark case.

    Attributes:
        batch, steps, inputs, units: B, T, I, H.
        variable_length: right-padded batch whose rows have different lengths
            (passed as ``lengths``), as after ``le.pad_sequences``.
    """

    variable_length: bool = False


#: The named shapes. A name is part of every result key, so changing a shape's
#: numbers without renaming it would silently break the history graphs.
SHAPES = {
    # One sequence: per-step overhead dominates (serving, decoders).
    "latency-B1": Shape(batch=1, steps=32, inputs=64, units=128),
    # A typical training minibatch.
    "mid-B64": Shape(batch=64, steps=32, inputs=64, units=128),
    # Wide layer: the recurrent GEMM dominates. (Few steps: the numpy
    # reference needs about a second per training step here already.)
    "large-H512": Shape(batch=16, steps=8, inputs=128, units=512),
    # The mid batch with rows of 8..32 real steps.
    "varlen-B64": Shape(batch=64, steps=32, inputs=64, units=128, variable_length=True),
    # A small batch fed a few steps at a time (a streaming model over a batch of streams,
    # a batch of environments): which path the step products take and the per-call setup
    # dominate. Only bench_layer.ShortCall runs it (SHORT_SHAPE_NAMES).
    "short-B8": Shape(batch=8, steps=3, inputs=64, units=128),
}
#: The shapes only the short-call benchmarks run.
SHORT_SHAPE_NAMES = ("short-B8",)
#: The shapes every other benchmark runs.
SHAPE_NAMES = tuple(name for name in SHAPES if name not in SHORT_SHAPE_NAMES)


class Benchmark:
    """Base class: asv settings shared by the suite.

    One round, and ``repeat = (min, max, seconds)`` = at least 2 samples,
    at most 5, stop after 1.5 s: the whole suite must stay affordable on a
    2-core machine for every recorded commit, and the slow cases (numpy at
    H=512, about a second per training step) dominate. asv's statistics still
    get several samples of the fast cases.
    """

    timeout = 240.0
    rounds = 1
    repeat = (2, 5, 1.5)
    warmup_time = 0.05


# -- backends -------------------------------------------------------------------

def cuda_simulator_enabled() -> bool:
    """True when numba runs CUDA kernels in its Python simulator (tests, CPU-only CI)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def require_backend(name: str) -> None:
    """Raise NotImplementedError (asv: skip) unless backend ``name`` can run here.

    Only ``name`` is imported and probed: asking the registry for the full
    list would import TensorFlow and numba in every benchmark process.
    """
    from lstmeng.backends import registry
    selected = os.environ.get(BACKENDS_VARIABLE, "").strip()
    if selected and name not in [entry.strip() for entry in selected.split(",")]:
        raise NotImplementedError(f"backend {name!r} not selected by {BACKENDS_VARIABLE}={selected}")
    if name == "numba_cuda" and cuda_simulator_enabled():
        # The simulator interprets kernels in Python: its timings mean nothing.
        raise NotImplementedError("numba_cuda: CUDA simulator is on (NUMBA_ENABLE_CUDASIM)")
    if name not in registry.BUILTIN_BACKENDS:
        raise NotImplementedError(f"backend {name!r} is not known to this lstmeng")
    try:
        importlib.import_module(registry.BUILTIN_BACKENDS[name]).backend.probe()
    except NotImplementedError as error:
        raise NotImplementedError(f"backend {name!r} is unavailable: {error}") from None
    except Exception as error:  # the registry reports these as unavailable too
        raise NotImplementedError(f"backend {name!r} failed to load: {type(error).__name__}: {error}") from None


def to_backend(name: str, array: np.ndarray):
    """Copy a host array to backend ``name``'s own array kind (device array, tf.Tensor)."""
    from lstmeng.backends import registry
    return registry.get_backend_object(name).ops.asarray(array, array.dtype)


def synchronizer(name: str):
    """A function that waits until backend ``name`` has finished its queued work.

    Device backends run asynchronously: a timed call must end with this, or
    it measures only the kernel launches.
    """
    if name == "numba_cuda":
        from numba import cuda
        return cuda.synchronize
    if name == "tensorflow":
        import tensorflow as tf
        if tf.config.list_logical_devices("GPU"):
            return tf.test.experimental.sync_devices
    # Host backends return finished results.
    return lambda: None


# -- inputs ---------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def host_inputs(shape: Shape):
    """Deterministic inputs for ``shape``, cached per process.

    Returns:
        x: ``[B, T, I]`` in DTYPE.
        lengths: ``[B]`` ints in [T/4, T] with at least one full row, or None
            for a fixed-length batch.
        dy: ``[B, T, H]`` output gradient for the training step.
    """
    rng = np.random.default_rng([shape.batch, shape.steps, shape.inputs, shape.units])
    x = rng.standard_normal((shape.batch, shape.steps, shape.inputs)).astype(DTYPE)
    dy = rng.standard_normal((shape.batch, shape.steps, shape.units)).astype(DTYPE)
    lengths = None
    if shape.variable_length:
        lengths = rng.integers(max(1, shape.steps // 4), shape.steps + 1, size=shape.batch)
        lengths[0] = shape.steps
    return x, lengths, dy


def real_steps(shape: Shape) -> int:
    """Sum over the batch of each row's real (unpadded) time steps."""
    _, lengths, _ = host_inputs(shape)
    return shape.batch * shape.steps if lengths is None else int(np.sum(lengths))


def forward_flops(shape: Shape) -> float:
    """Useful floating-point operations of one forward pass: 8*H*(I+H) per real row-step.

    (Two GEMMs of 2*I*4H and 2*H*4H flops per row and step; elementwise work
    is not counted.) Padded steps are not useful work, so a variable-length
    batch counts only its real steps. A training step is 3x this.
    """
    return timing.forward_flops(real_steps(shape), 1, shape.inputs, shape.units)


# -- one layer on one backend -----------------------------------------------------

class LayerRun:
    """One ``le.LSTM(return_sequences=True)`` on one backend, inputs already on its device.

    The constructor does all the allocation; a benchmark's ``setup`` then
    calls what it times once (``forward`` or ``training_step``), so JIT
    compilation, traced graphs, kernel caches and thread pools are warm
    before anything is timed.
    """

    def __init__(self, backend: str, shape_name: str):
        require_backend(backend)
        self.shape = shape = SHAPES[shape_name]
        x, self.lengths, dy = host_inputs(shape)
        self.layer = le.LSTM(shape.units, return_sequences=True, backend=backend, seed=0)
        self.layer.build(shape.inputs)
        self.x = to_backend(backend, x)
        self.dy = to_backend(backend, dy)
        self.synchronize = synchronizer(backend)

    def forward(self):
        """Inference over the whole batch; returns ``[B, T, H]``."""
        outputs = self.layer(self.x, lengths=self.lengths)
        self.synchronize()
        return outputs

    def training_step(self):
        """Training forward and the full backward (dx and weight gradients); returns dx ``[B, T, I]``."""
        self.layer(self.x, lengths=self.lengths, training=True)
        dx = self.layer.backward(self.dy)
        self.synchronize()
        return dx


# -- timing inside one process ------------------------------------------------------

def best_seconds(function, min_repeats: int = 3, budget_seconds: float = 0.5, max_repeats: int = 200) -> float:
    """Fastest of repeated calls: at least ``min_repeats``, then more until ``budget_seconds`` is spent.

    The minimum is the least noisy estimate on a shared machine (noise only
    ever adds time), and fast calls get many tries to find an undisturbed one.
    """
    return timing.best_time(function, max_repeats, min_repeats=min_repeats, budget_s=budget_seconds).seconds


def speed_ratio(reference, candidate, min_rounds: int = 3, budget_seconds: float = 1.0,
                max_rounds: int = 200) -> float:
    """Best time of ``reference`` / best time of ``candidate`` (> 1: candidate is faster).

    The two calls alternate, so a burst of machine load hits both rather than
    one of them; each gets half of ``budget_seconds``, as in ``best_seconds``.
    """
    best = timing.interleaved_best_times({"candidate": candidate, "reference": reference}, max_rounds,
                                         min_repeats=min_rounds, budget_s=budget_seconds / 2)
    return best["reference"].seconds / best["candidate"].seconds


@functools.lru_cache(maxsize=None)
def matmul_peak_gflops(backend: str) -> float:
    """Achieved GFLOP/s of a square DTYPE matrix product on the device backend ``name`` uses.

    This is the reference "peak" the track_ benchmarks divide by: measured in
    the same process and the same conditions as the LSTM, so machine noise
    and clock changes largely cancel in the ratio.

    Raises:
        NotImplementedError: no matrix product is available for that device
            (numba_cuda without torch's CUDA build).
    """
    if backend in ("numpy", "cython"):
        size = 1024
        a = np.ones((size, size), DTYPE)
        b = np.ones((size, size), DTYPE)
        product, synchronize = (lambda: a @ b), (lambda: None)
    elif backend == "tensorflow":
        import tensorflow as tf
        size = 4096 if tf.config.list_logical_devices("GPU") else 1024
        a = tf.ones((size, size), DTYPE)
        b = tf.ones((size, size), DTYPE)
        product, synchronize = (lambda: tf.linalg.matmul(a, b)), synchronizer("tensorflow")
    elif backend == "numba_cuda":
        torch = import_torch()
        if not torch.cuda.is_available():
            raise NotImplementedError("numba_cuda matmul peak needs torch with CUDA (cuBLAS)")
        size = 4096
        a = torch.ones((size, size), dtype=torch.float32, device="cuda")
        b = torch.ones((size, size), dtype=torch.float32, device="cuda")
        product, synchronize = (lambda: a @ b), torch.cuda.synchronize
    else:
        raise NotImplementedError(f"no matmul reference for backend {backend!r}")

    # One warm-up call (thread pools, cuBLAS handles, TF graph caches), then many tries: on a
    # loaded machine an undisturbed two-thread product is rare.
    return timing.square_matmul_gflops(product, size, 200, min_repeats=10, budget_s=1.0, warmup=1,
                                       synchronize=synchronize)


# -- torch.nn.LSTM, the outside reference ----------------------------------------------

def import_torch():
    """torch, or NotImplementedError (asv: skip) when it is not installed."""
    try:
        import torch
    except ImportError as error:
        raise NotImplementedError(f"torch is not installed: {error}") from None
    return torch


class TorchRun:
    """``torch.nn.LSTM`` on the same shape and inputs as ``LayerRun`` (warm it up like LayerRun).

    A variable-length batch goes through ``pack_padded_sequence``, torch's own
    way of skipping padding. The device is CUDA for numba_cuda (and for
    tensorflow when TF sees a GPU), else the CPU.
    """

    def __init__(self, backend: str, shape_name: str, on_gpu: bool | None = None):
        torch = self.torch = import_torch()
        shape = SHAPES[shape_name]
        if on_gpu is None:
            on_gpu = backend == "numba_cuda"
            if backend == "tensorflow":
                import tensorflow as tf
                on_gpu = bool(tf.config.list_logical_devices("GPU"))
        if on_gpu and not torch.cuda.is_available():
            raise NotImplementedError("torch has no CUDA device to compare a GPU backend with")
        device = "cuda" if on_gpu else "cpu"
        self.synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
        x, lengths, dy = host_inputs(shape)
        torch.manual_seed(0)
        self.lstm = torch.nn.LSTM(shape.inputs, shape.units, batch_first=True).to(device)
        self.x = torch.tensor(x, device=device, requires_grad=True)
        self.lengths = None if lengths is None else torch.as_tensor(lengths)
        dy = torch.tensor(dy, device=device)
        if lengths is not None:
            # The gradient of a packed output is itself packed.
            dy = torch.nn.utils.rnn.pack_padded_sequence(dy, self.lengths, batch_first=True,
                                                         enforce_sorted=False).data
        self.dy = dy

    def _outputs(self):
        if self.lengths is None:
            return self.lstm(self.x)[0]
        packed = self.torch.nn.utils.rnn.pack_padded_sequence(self.x, self.lengths, batch_first=True,
                                                              enforce_sorted=False)
        return self.lstm(packed)[0].data

    def forward(self):
        """Inference (no autograd graph)."""
        with self.torch.inference_mode():
            outputs = self._outputs()
        self.synchronize()
        return outputs

    def training_step(self):
        """Forward with autograd and backward to the input and the weights."""
        self.lstm.zero_grad(set_to_none=True)
        self.x.grad = None
        self._outputs().backward(self.dy)
        self.synchronize()


class TorchModuleRun(TorchRun):
    """``lstmeng.torch.LSTM`` computing with backend ``backend`` in place of ``torch.nn.LSTM``: the
    same weights (its state dict), inputs and calls, as a PyTorch model that swapped the module
    runs it: CUDA tensors for numba_cuda, CPU tensors for numpy and cython. Not tracked with the
    tensorflow backend (skipped before TensorFlow is imported: the module's "auto" never picks it,
    and its cases cost the suite's smoke run a TensorFlow import each)."""

    def __init__(self, backend: str, shape_name: str):
        if backend == "tensorflow":
            raise NotImplementedError("lstmeng.torch with the tensorflow backend is not tracked")
        require_backend(backend)
        super().__init__(backend, shape_name, on_gpu=backend == "numba_cuda")
        import lstmeng.torch
        shape = SHAPES[shape_name]
        module = lstmeng.torch.LSTM(shape.inputs, shape.units, batch_first=True, backend=backend)
        module.load_state_dict(self.lstm.state_dict())
        self.lstm = module.to(self.x.device)

