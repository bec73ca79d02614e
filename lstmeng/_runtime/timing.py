"""What every lstmeng benchmark measures with: timers, the matrix-product peak, problem shapes, FLOPs.

One home for the helpers that ``lstmeng bench``, the scripts in ``benchmarks/``
and the asv suite in ``asv_bench/`` share:

- ``Shape`` (B, T, I, H) and the FLOP count of one LSTM layer:
  forward = 8*B*T*H*(I+H) (two GEMMs per row and step, ``2*I*4H`` and
  ``2*H*4H``; elementwise work not counted), forward+backward = 3x forward;
- ``best_time``: the fastest of repeated calls (noise on a shared machine
  only ever adds time), with a repeat count, a minimum and a time budget;
- ``interleaved_best_times``: the same for several calls taken in turn, so
  that a busy moment lands on all of them rather than on one (A/B ratios);
- ``median_time`` and ``median_event_ms``: the median of wall-clock or
  device-event timings (GPU benchmarks);
- ``blas_gemm_peak`` / ``square_matmul_gflops``: GFLOP/s of a square matrix
  product, the reference "peak" a layer's GFLOP/s is divided by;
- ``Report`` and ``fmt``: the line collector and the number cells of the
  GPU benchmark reports.

Device timings stay import-free: a caller passes ``synchronize`` (e.g.
``numba.cuda.synchronize``) or an event clock built from the module it has
already imported (``numba_event_clock(cuda)``, ``torch_event_clock(torch)``).
Nothing here imports an optional library at module level; SciPy (a core
dependency) only inside ``blas_gemm_peak``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Hashable, Mapping

import numpy as np

#: The FLOP count of one LSTM layer, as reports state it.
FLOPS_FORMULA = "forward = 8*B*T*H*(I+H); train (forward+backward) = 3x forward"
#: Forward + backward FLOPs over forward FLOPs.
TRAIN_FLOPS_FACTOR = 3.0


def forward_flops(batch: int, steps: int, inputs: int, units: int) -> float:
    """FLOPs of one LSTM forward pass: 8*B*T*H*(I+H).

    ``batch * steps`` is the count of row-steps computed; a variable-length
    batch that skips padding passes its real row-steps (e.g. ``sum(lengths), 1``).
    """
    return 8.0 * batch * steps * units * (inputs + units)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One problem: batch B, time steps T, input features I, units H."""

    batch: int
    steps: int
    inputs: int
    units: int

    @property
    def forward_flops(self) -> float:
        return forward_flops(self.batch, self.steps, self.inputs, self.units)

    def flops(self, mode: str) -> float:
        """FLOPs of one call: ``"infer"`` (forward) or anything else (forward + backward, 3x)."""
        return self.forward_flops if mode == "infer" else TRAIN_FLOPS_FACTOR * self.forward_flops

    def __str__(self) -> str:
        return f"{self.batch},{self.steps},{self.inputs},{self.units}"


# -- timers ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Timing:
    """The best seconds of one call and how many calls were timed."""

    seconds: float
    calls: int


def _clock(clock):
    # Looked up at call time, so that a test can replace time.perf_counter.
    return clock if clock is not None else time.perf_counter


def best_time(function: Callable[[], object], repeats: int, *, min_repeats: int = 1, budget_s: float = math.inf,
              warmup: int = 0, synchronize: Callable[[], object] | None = None,
              clock: Callable[[], float] | None = None) -> Timing:
    """The fastest of up to ``repeats`` timed calls of ``function()``, after ``warmup`` untimed ones.

    Timing stops early once at least ``min_repeats`` calls are timed and the
    timed calls have used ``budget_s`` seconds, so a slow call gets few tries
    and a fast one many. ``synchronize`` (a device's wait-for-idle) runs after
    every call, inside the timed region. ``clock``: ``time.perf_counter`` by
    default (``time.process_time`` for CPU time).
    """
    return interleaved_best_times({None: function}, repeats, min_repeats=min_repeats, budget_s=budget_s,
                                  warmup=warmup, synchronize=synchronize, clock=clock)[None]


def interleaved_best_times(functions: Mapping[Hashable, Callable[[], object]], repeats: int, *,
                           min_repeats: int = 1, budget_s: float = math.inf, warmup: int = 0,
                           synchronize: Callable[[], object] | None = None, clock: Callable[[], float] | None = None,
                           on_error: Callable[[Hashable, Exception], object] | None = None) -> dict:
    """The best time of each of ``functions``, calling them in turn (round-robin), so that a busy
    moment of a shared machine falls on all of them instead of on one.

    Each function stops on its own as ``best_time`` does (``repeats``,
    ``min_repeats`` and ``budget_s`` apply per function). ``on_error``: when
    given, a function that raises is reported to it as ``(key, error)`` and
    dropped (missing from the result); without it the error propagates.

    Returns:
        ``{key: Timing}`` in the order of ``functions``.
    """
    now, wait = _clock(clock), synchronize or (lambda: None)
    for function in functions.values():
        for _ in range(warmup):
            function()
        if warmup:
            wait()
    best = {key: math.inf for key in functions}
    done = {key: 0 for key in functions}
    spent = {key: 0.0 for key in functions}
    for _ in range(repeats):
        for key, function in functions.items():
            if key not in best or (done[key] >= min_repeats and spent[key] >= budget_s):
                continue
            start = now()
            try:
                function()
                wait()
            except Exception as error:
                if on_error is None:
                    raise
                on_error(key, error)
                del best[key]
                continue
            elapsed = now() - start
            best[key], done[key], spent[key] = min(best[key], elapsed), done[key] + 1, spent[key] + elapsed
    return {key: Timing(best[key], done[key]) for key in best}


def median_time(function: Callable[[], object], repeats: int, *, warmup: int = 1,
                synchronize: Callable[[], object] | None = None, clock: Callable[[], float] | None = None) -> float:
    """Median seconds of ``function(); synchronize()`` by the clock over ``repeats`` calls, after ``warmup``
    (at least one) untimed calls and a synchronize."""
    now, wait = _clock(clock), synchronize or (lambda: None)
    for _ in range(max(warmup, 1)):
        function()
    wait()
    samples = []
    for _ in range(repeats):
        began = now()
        function()
        wait()
        samples.append(now() - began)
    return statistics.median(samples)


@dataclasses.dataclass(frozen=True)
class EventClock:
    """A device's timing events: ``pair()`` -> (start, end) events with ``record()`` and
    ``synchronize()``; ``elapsed_ms(start, end)`` -> milliseconds between the recorded events."""

    pair: Callable[[], tuple]
    elapsed_ms: Callable[[object, object], float]


def numba_event_clock(cuda) -> EventClock:
    """CUDA events of ``numba.cuda`` (the module the caller imported)."""
    return EventClock(lambda: (cuda.event(), cuda.event()), cuda.event_elapsed_time)


def torch_event_clock(torch) -> EventClock:
    """CUDA events of ``torch`` (the module the caller imported)."""
    def pair():
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    return EventClock(pair, lambda start, end: start.elapsed_time(end))


def median_event_ms(function: Callable[[], object], events: EventClock, repeats: int, *, warmup: int = 1,
                    min_repeats: int | None = None, budget_s: float = math.inf,
                    clock: Callable[[], float] | None = None) -> float:
    """Median milliseconds of ``function()`` between two device events on the default stream.

    ``warmup`` untimed calls first (JIT compilation, autotuning); then up to
    ``repeats`` timed calls, stopping early once ``min_repeats`` (default:
    ``repeats``) are done and ``budget_s`` seconds of wall time have passed.
    """
    now = _clock(clock)
    for _ in range(warmup):
        function()
    least = repeats if min_repeats is None else min_repeats
    samples = []
    began = now()
    while len(samples) < max(repeats, 1):
        start, end = events.pair()
        start.record()
        function()
        end.record()
        end.synchronize()
        samples.append(events.elapsed_ms(start, end))
        if len(samples) >= least and now() - began > budget_s:
            break
    return statistics.median(samples)


# -- the matrix-product peak ------------------------------------------------------------------------------------
def square_matmul_gflops(product: Callable[[], object], size: int, repeats: int, *, min_repeats: int = 1,
                         budget_s: float = math.inf, warmup: int = 1, synchronize: Callable[[], object] | None = None,
                         clock: Callable[[], float] | None = None) -> float:
    """GFLOP/s of ``product()``, a ``[size, size] @ [size, size]`` matrix product: 2*size^3 / best seconds."""
    timing = best_time(product, repeats, min_repeats=min_repeats, budget_s=budget_s, warmup=warmup,
                       synchronize=synchronize, clock=clock)
    return 2.0 * size ** 3 / timing.seconds / 1e9


#: How long OpenBLAS's workers keep busy-waiting after a multi-threaded call (its thread
#: timeout, 2^28 cycles, ~0.1 s), with a margin: what a benchmark waits after measuring the
#: BLAS peak before it times anything else. Timed within that window, a two-thread call shares
#: its two cores with them (a batch-1 unit split then ran at one thread's speed).
BLAS_SPIN_SECONDS = 0.25


def blas_gemm_peak(size: int = 2048, repeats: int = 3, *, dtype="float32", min_repeats: int = 1,
                   budget_s: float = math.inf, clock: Callable[[], float] | None = None) -> float:
    """Best GFLOP/s of SciPy's BLAS GEMM (sgemm for float32, dgemm for float64; the BLAS the cython
    backend calls) on ``[size, size] @ [size, size]`` random Fortran-ordered matrices."""
    from scipy.linalg import blas

    dtype = np.dtype(dtype)
    gemm = {"float32": blas.sgemm, "float64": blas.dgemm}[dtype.name]
    rng = np.random.default_rng(0)
    a = np.asfortranarray(rng.standard_normal((size, size), dtype=dtype))
    b = np.asfortranarray(rng.standard_normal((size, size), dtype=dtype))
    return square_matmul_gflops(lambda: gemm(1.0, a, b), size, repeats, min_repeats=min_repeats, budget_s=budget_s,
                                clock=clock)


# -- reports ----------------------------------------------------------------------------------------------------
class Report:
    """Prints lines and keeps them (for a report file)."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def text(self) -> str:
        """Every line so far, newline-terminated."""
        return "\n".join(self.lines) + "\n"


def fmt(value, width: int, digits: int = 2, kind: str = "f", missing: str = "n/a") -> str:
    """``value`` right-aligned in ``width`` with ``digits`` decimals (``kind``: "f" or "e"); ``missing`` for None."""
    if value is None:
        return f"{missing:>{width}}"
    return f"{value:>{width}.{digits}{kind}}"
