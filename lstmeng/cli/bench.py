"""`lstmeng bench`: lstmeng's backends beside torch.nn.LSTM and keras.layers.LSTM, in one process.

Every runner gets the same float32 input ``x: [B, T, I]``, the same weights
(Keras layout, converted for torch) and the same output gradient
``dy: [B, T, H]``, for one LSTM layer returning the whole sequence:

- ``infer``: the forward pass without keeping anything for a backward;
- ``train``: forward and backward (gradients of x and of the weights).

Time is the best of ``repeats`` calls after two warm-up calls (which also
trace tf.function and JIT-compile); the runners take turns call by call, so
that a busy moment on a shared machine hits all of them alike. FLOPs are counted as forward = 8*B*T*H*(I+H) and
train = 3x forward, and compared with the float32 matrix-multiply peak measured
in the same run (SciPy's BLAS sgemm on a square problem, measured beside
every shape and at the end, best of all).
Every library gets the same thread count (``--threads``, default
OMP_NUM_THREADS or the usable cores).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import time
from collections.abc import Callable

import numpy as np

from lstmeng._runtime import threads as runtime_threads
from lstmeng._runtime.timing import (
    BLAS_SPIN_SECONDS,
    FLOPS_FORMULA,
    Shape,
    blas_gemm_peak,
    interleaved_best_times,
)

MODES = ("infer", "train")
PEERS = ("torch", "keras")
DEFAULT_SHAPES = "64,100,256,256;32,200,128,512;256,50,128,128;1,500,64,128"
#: Seconds of timed calls after which a slow runner (the NumPy backend at large shapes) stops
#: early, always after at least one call; the others take their ``repeats`` turns.
RUNNER_BUDGET_S = 30.0


class BenchError(ValueError):
    """A mistake in the benchmark's arguments (reported as one line, no traceback)."""


def parse_shapes(text: str) -> list[Shape]:
    """``"B,T,I,H;B,T,I,H"`` (also ``x`` between numbers, spaces ignored) -> shapes.

    Example:
        >>> parse_shapes("64,100,256,256; 1x500x64x128")
        [Shape(batch=64, steps=100, inputs=256, units=256), Shape(batch=1, steps=500, inputs=64, units=128)]
    """
    shapes = []
    for group in text.replace(" ", "").split(";"):
        if not group:
            continue
        fields = group.replace("x", ",").split(",")
        if len(fields) != 4 or not all(field.isdigit() and int(field) > 0 for field in fields):
            raise BenchError(f"bad shape {group!r}: expected four positive integers B,T,I,H "
                             f"(batch, time steps, input features, units), shapes separated by ';', "
                             f"e.g. --shapes '64,100,256,256;1,500,64,128'")
        shapes.append(Shape(*(int(field) for field in fields)))
    if not shapes:
        raise BenchError(f"no shape in {text!r}; expected e.g. --shapes '64,100,256,256;1,500,64,128'")
    return shapes


def split_names(text: str) -> list[str]:
    """``"a,b c"`` -> ["a", "b", "c"]; "none" or "" -> []."""
    names = [name for name in text.replace(",", " ").split() if name]
    return [] if names == ["none"] else names


# -- runners --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Problem:
    """The shared inputs of one shape. x ``[B, T, I]``, dy ``[B, T, H]``; weights in Keras layout:
    kernel ``[I, 4H]``, recurrent_kernel ``[H, 4H]``, bias ``[4H]``."""

    shape: Shape
    x: np.ndarray
    dy: np.ndarray
    kernel: np.ndarray
    recurrent_kernel: np.ndarray
    bias: np.ndarray

    @classmethod
    def random(cls, shape: Shape, seed: int = 0) -> "Problem":
        rng = np.random.default_rng(seed)
        scale = 1.0 / math.sqrt(shape.units)

        def uniform(*dims):
            return rng.uniform(-scale, scale, dims).astype(np.float32)

        return cls(shape, x=rng.standard_normal((shape.batch, shape.steps, shape.inputs), dtype=np.float32),
                   dy=rng.standard_normal((shape.batch, shape.steps, shape.units), dtype=np.float32),
                   kernel=uniform(shape.inputs, 4 * shape.units),
                   recurrent_kernel=uniform(shape.units, 4 * shape.units), bias=uniform(4 * shape.units))


def lstmeng_runner(name: str, problem: Problem) -> dict[str, Callable[[], object]]:
    """Calls of an lstmeng layer on backend ``name``; inputs already live on the backend's device."""
    import lstmeng as le
    from lstmeng.backends import registry

    backend = registry.get_backend_object(name)
    layer = le.LSTM(problem.shape.units, return_sequences=True, return_state=True, backend=name)
    layer.set_weights([problem.kernel, problem.recurrent_kernel, problem.bias])
    x = backend.ops.asarray(problem.x, np.dtype(np.float32))
    dy = backend.ops.asarray(problem.dy, np.dtype(np.float32))

    def infer():
        _, h, _ = layer(x)
        return backend.ops.to_numpy(h)  # waits for a device backend to finish; h [B, H] is small

    def train():
        layer(x, training=True)
        layer.backward(dy)          # the weight gradients come back to the host: that waits too

    return {"infer": infer, "train": train}


def torch_runner(problem: Problem, threads: int) -> dict[str, Callable[[], object]]:
    """torch.nn.LSTM (batch_first) with the same weights: weight_ih = kernel.T, bias_ih = bias, bias_hh = 0."""
    import torch

    torch.set_num_threads(threads)
    shape = problem.shape
    lstm = torch.nn.LSTM(shape.inputs, shape.units, batch_first=True)
    with torch.no_grad():  # torch's gate order (i, f, g, o) is Keras's; only the layout is transposed
        lstm.weight_ih_l0.copy_(torch.from_numpy(problem.kernel.T.copy()))
        lstm.weight_hh_l0.copy_(torch.from_numpy(problem.recurrent_kernel.T.copy()))
        lstm.bias_ih_l0.copy_(torch.from_numpy(problem.bias))
        lstm.bias_hh_l0.zero_()
    x = torch.from_numpy(problem.x)
    x_trainable = x.clone().requires_grad_(True)
    dy = torch.from_numpy(problem.dy)

    def infer():
        with torch.inference_mode():
            return lstm(x)

    def train():
        lstm.zero_grad(set_to_none=True)
        x_trainable.grad = None
        output, _ = lstm(x_trainable)
        output.backward(dy)

    return {"infer": infer, "train": train}


def keras_runner(problem: Problem, threads: int) -> dict[str, Callable[[], object]]:
    """keras.layers.LSTM on TensorFlow, each mode one tf.function; train = GradientTape forward + backward.

    TensorFlow's thread count is set once, by ``configure_tensorflow_threads``, before its runtime starts.
    """
    import keras
    import tensorflow as tf

    shape = problem.shape
    layer = keras.layers.LSTM(shape.units, return_sequences=True)
    layer.build((shape.batch, shape.steps, shape.inputs))
    layer.set_weights([problem.kernel, problem.recurrent_kernel, problem.bias])
    x = tf.constant(problem.x)
    dy = tf.constant(problem.dy)

    @tf.function
    def forward(inputs):
        return layer(inputs)

    @tf.function
    def forward_backward(inputs, output_grads):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = layer(inputs, training=True)
        return tape.gradient(outputs, [inputs] + list(layer.trainable_weights), output_gradients=output_grads)

    return {"infer": lambda: forward(x).numpy(), "train": lambda: forward_backward(x, dy)[0].numpy()}


def peer_missing_reason(peer: str) -> str | None:
    """Why a peer cannot run here, or None."""
    needed = {"torch": ("torch",), "keras": ("tensorflow", "keras")}[peer]
    missing = [module for module in needed if importlib.util.find_spec(module) is None]
    if missing:
        extra = "pip install torch" if peer == "torch" else "pip install 'lstmeng[tensorflow]'"
        return f"{', '.join(missing)} not installed ({extra})"
    return None


def configure_tensorflow_threads(threads: int) -> str:
    """Give TensorFlow ``threads`` threads; must run before anything starts its runtime.

    Returns a note for the report: empty when it worked.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as error:  # the runtime was started earlier in this process
        return f"TensorFlow's thread count could not be set ({error})"
    return ""


# -- the run --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Measurement:
    shape: Shape
    mode: str
    name: str
    kind: str             # "backend" or "peer"
    seconds: float
    repeats: int
    peak_gflops: float

    @property
    def gflops(self) -> float:
        return self.shape.flops(self.mode) / self.seconds / 1e9

    @property
    def peak_fraction(self) -> float:
        return self.gflops / self.peak_gflops


@dataclasses.dataclass
class BenchResult:
    cpu: str
    threads: int
    peak_gflops: float
    peak_size: int
    measurements: list[Measurement]
    skipped: dict[str, str]         # name -> reason
    failed: list[str]               # "name shape: error" for runners that raised
    notes: list[str] = dataclasses.field(default_factory=list)

    def ratio(self, measurement: Measurement, peer: str) -> float | None:
        """How many times faster ``measurement`` is than ``peer`` on its shape and mode (None: no peer time)."""
        for other in self.measurements:
            if other.name == peer and other.shape == measurement.shape and other.mode == measurement.mode:
                return other.seconds / measurement.seconds
        return None

    def peers(self) -> list[str]:
        return [peer for peer in PEERS if any(m.name == peer for m in self.measurements)]

    def to_json(self) -> dict:
        return {
            "machine": {"cpu": self.cpu, "threads": self.threads},
            "sgemm_peak_gflops": self.peak_gflops,
            "sgemm_peak_size": self.peak_size,
            "flops": FLOPS_FORMULA,
            "results": [
                {"shape": dataclasses.asdict(m.shape), "mode": m.mode, "name": m.name, "kind": m.kind,
                 "ms": m.seconds * 1e3, "gflops": m.gflops, "peak_fraction": m.peak_fraction,
                 "repeats": m.repeats,
                 "speedup_vs": {peer: self.ratio(m, peer) for peer in self.peers()}}
                for m in self.measurements],
            "skipped": self.skipped,
            "failed": self.failed,
            "notes": self.notes,
        }


def run_bench(backends: list[str] | None = None, peers: list[str] = PEERS, shapes: list[Shape] | None = None,
              modes: tuple[str, ...] = MODES, repeats: int = 5, threads: int | None = None,
              peak_size: int = 2048, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Measure every available backend in ``backends`` (default: all known) and every peer in ``peers``.

    Raises:
        BenchError: an unknown backend or peer name, or a bad repeat count.
    """
    from lstmeng.backends import registry

    if repeats < 1:
        raise BenchError(f"--repeats must be >= 1, got {repeats}")
    if peak_size < 1:
        raise BenchError(f"--peak-size must be >= 1, got {peak_size}")
    known = registry.known_backend_names()
    backends = list(known) if backends is None else backends
    unknown = [name for name in backends if name not in known]
    if unknown:
        raise BenchError(f"unknown backend {unknown[0]!r}; known backends: {', '.join(known)}")
    bad_peers = [peer for peer in peers if peer not in PEERS]
    if bad_peers:
        raise BenchError(f"unknown peer {bad_peers[0]!r}; peers: {', '.join(PEERS)} (or 'none')")
    shapes = parse_shapes(DEFAULT_SHAPES) if shapes is None else shapes
    threads = runtime_threads.thread_count() if threads is None else threads
    if threads < 1:
        raise BenchError(f"--threads must be >= 1, got {threads}")
    say = progress or (lambda message: None)

    skipped: dict[str, str] = {}
    runners: list[tuple[str, str, Callable[[Problem], dict]]] = []
    for name in backends:
        try:  # probes only this backend (list_backends would import every optional library)
            registry.get_backend_object(name)
        except ValueError:
            reason = next(row.reason for row in registry.list_backends() if row.name == name)
            skipped[name] = f"backend unavailable: {reason}"
            continue
        runners.append((name, "backend", lambda problem, name=name: lstmeng_runner(name, problem)))
    for peer in peers:
        reason = peer_missing_reason(peer)
        if reason:
            skipped[peer] = reason
        else:
            make = torch_runner if peer == "torch" else keras_runner
            runners.append((peer, "peer", lambda problem, make=make: make(problem, threads)))

    notes = []
    uses_tensorflow = "tensorflow" in [name for name, _, _ in runners] or "keras" in [name for name, _, _ in runners]
    if uses_tensorflow and importlib.util.find_spec("tensorflow") is not None:
        note = configure_tensorflow_threads(threads)
        if note:
            notes.append(note)

    measurements, failed, peaks = [], [], []
    with runtime_threads.blas_limits(threads):
        for shape in shapes:
            # The peak is measured again beside every shape and the best kept:
            # on a shared machine one early measurement may catch a busy moment.
            say(f"measuring the sgemm peak ({peak_size}x{peak_size})")
            peaks.append(blas_gemm_peak(peak_size, max(repeats, 3)))
            # OpenBLAS's idle workers busy-wait for ~0.1 s after a multi-threaded product, and
            # calls timed meanwhile share their cores with them (a whole batch-1 row fits in that
            # window). Let them go to sleep first.
            time.sleep(BLAS_SPIN_SECONDS)
            problem = Problem.random(shape)
            calls = {}
            for name, kind, make in runners:
                try:
                    made = make(problem)
                    for mode in modes:
                        # Two warm-up calls: the first traces tf.function / compiles kernels.
                        made[mode]()
                        made[mode]()
                    calls[name] = (kind, made)
                except ImportError as error:
                    skipped[name] = f"import failed: {error}"
                except Exception as error:  # one runner's failure must not hide the others' numbers
                    failed.append(f"{name} {shape}: {type(error).__name__}: {error}")
            for mode in modes:
                say(f"{shape} {mode}: {', '.join(calls)}")
                timings = interleaved_best_times(
                    {name: made[mode] for name, (_, made) in calls.items()}, repeats, budget_s=RUNNER_BUDGET_S,
                    on_error=lambda name, error, label=f"{shape} {mode}": failed.append(
                        f"{name} {label}: {type(error).__name__}: {error}"))
                for name, timing in timings.items():
                    measurements.append(Measurement(shape, mode, name, calls[name][0], timing.seconds, timing.calls,
                                                    0.0))
        peaks.append(blas_gemm_peak(peak_size, max(repeats, 3)))
    peak = max(peaks)
    for measurement in measurements:
        measurement.peak_gflops = peak
    return BenchResult(cpu=runtime_threads.cpu_model(), threads=threads, peak_gflops=peak, peak_size=peak_size,
                       measurements=measurements, skipped=skipped, failed=failed, notes=notes)


def render(result: BenchResult) -> str:
    """The comparison table, one row per shape, mode and runner."""
    peers = result.peers()
    header = ["shape B,T,I,H", "mode", "name", "ms", "GFLOP/s", "% peak"] + [f"x {peer}" for peer in peers]
    rows = []
    for m in result.measurements:
        ratios = [result.ratio(m, peer) for peer in peers]
        rows.append([str(m.shape), m.mode, m.name, f"{m.seconds * 1e3:.3f}" if m.seconds < 0.01
                     else f"{m.seconds * 1e3:.1f}", f"{m.gflops:.1f}", f"{100 * m.peak_fraction:.0f}%"]
                    + ["" if ratio is None else f"{ratio:.2f}" for ratio in ratios])
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) if rows else len(header[i])
              for i in range(len(header))]

    def line(cells):
        return "  ".join(cell.ljust(width) if index < 3 else cell.rjust(width)
                         for index, (cell, width) in enumerate(zip(cells, widths))).rstrip()

    lines = [f"CPU: {result.cpu}; {result.threads} threads for every library",
             f"float32 sgemm peak: {result.peak_gflops:.1f} GFLOP/s "
             f"(SciPy BLAS, {result.peak_size}^3, best of the run)",
             "FLOPs: forward 8*B*T*H*(I+H), train = forward+backward = 3x; "
             "'x peer' = peer's time / this time (above 1: faster than the peer)", "",
             line(header), line(["-" * width for width in widths])]
    lines += [line(row) for row in rows]
    if result.notes:
        lines += [""] + [f"note: {note}" for note in result.notes]
    if result.skipped:
        lines += ["", "skipped:"] + [f"  {name}: {reason}" for name, reason in result.skipped.items()]
    if result.failed:
        lines += ["", "failed:"] + [f"  {failure}" for failure in result.failed]
    return "\n".join(lines)


def plot(result: BenchResult, path: str) -> None:
    """Time against problem size (GFLOP per call), one line per runner, one panel per mode; log-log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [mode for mode in MODES if any(m.mode == mode for m in result.measurements)]
    figure, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for axis, mode in zip(axes[0], modes):
        names = list(dict.fromkeys(m.name for m in result.measurements if m.mode == mode))
        for name in names:
            points = sorted((m.shape.flops(mode) / 1e9, m.seconds * 1e3, str(m.shape))
                            for m in result.measurements if m.mode == mode and m.name == name)
            style = "--" if name in PEERS else "-"
            axis.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=name)
        axis.set_xscale("log")
        axis.set_yscale("log")
        for size, label in sorted({(m.shape.flops(mode) / 1e9, str(m.shape))
                                   for m in result.measurements if m.mode == mode}):
            axis.annotate(label, (size, axis.get_ylim()[0]), fontsize=7, rotation=90, va="bottom", ha="right",
                          color="grey")
        axis.set_xlabel("GFLOP per call (shape B,T,I,H)")
        axis.set_ylabel("ms (best of run)")
        axis.set_title("forward" if mode == "infer" else "forward + backward")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(f"LSTM layer, float32, {result.cpu}, {result.threads} threads", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
