"""The "cython" backend: fused, BLAS-backed LSTM kernels on the CPU.

The kernels live in the compiled extension ``lstmeng.backends._cython_lstm``
(source ``ext/_cython_lstm.pyx`` and ``ext/lstm_rows.h``); this module only
prepares arrays, chooses the layout and allocates the outputs and workspace.
See the extension's module comment for the packed time-major layout.

Right-padded masks (every row's mask is a prefix, as from ``lengths``) take
the variable-length path: rows are sorted by length once and each step only
computes the rows still running, so a batch with lengths spread over 1..T
costs about half of the full batch. Any other mask takes the general path,
which checks the mask per row and step.

Threads: one pool, OpenMP's. The batch is split into parts, one per thread
(``lstmeng._runtime.threads.thread_count()``: ``OMP_NUM_THREADS``, the CPU
quota, ``threadpool_limits``); rows are independent, so each thread runs the
whole sequence for its part without synchronising per step. A batch too small
to split by rows (fewer than ``MIN_ROWS_PER_PART`` rows per thread; a batch of
one, say) is split by units instead: each thread owns a slice of the units and
the threads meet at one barrier per step. BLAS is held at one thread
meanwhile, so its pool never spins against ours. Without OpenMP or without a
BLAS whose threads threadpoolctl can set, one thread runs and BLAS threads as
it likes (``probe()`` says so). The GIL is released for the whole sequence, so
layers on different Python threads run in parallel.

Training keeps the theoretical workspace only: per processed (row, step) the
activated gates (4H), c(t-1) and h(t-1) (H each); the backward recomputes
act(c(t)) and reads the inputs again from the caller's ``x``, which must not
be changed between a training forward and its backward (as with PyTorch's
saved tensors).

Example:
    >>> import numpy as np, lstmeng as le
    >>> layer = le.LSTM(8, return_sequences=True, backend="cython", seed=0)
    >>> layer(np.zeros((2, 5, 3), np.float32)).shape
    (2, 5, 8)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import threading
import time

import numpy as np

from lstmeng._runtime import threads
from lstmeng.backends import _kernel_overrides
from lstmeng.backends._buffer_cache import BufferCache, aligned_empty
from lstmeng.backends.base import KernelBackend, SequenceForward, SequenceGrads, Workspace

try:
    from lstmeng.backends import _cython_lstm
except ImportError as error:  # not built (e.g. a source checkout without a compiler)
    _cython_lstm = None
    _IMPORT_ERROR = error
else:
    _IMPORT_ERROR = None

#: The input projection runs this many packed rows per part at a time (at least
#: one step): no [T, B, I] copy of the inputs is made, and inference keeps no
#: [T, B, 4H] gate buffer either.
CHUNK_ROWS = 1024
#: Steps per input-projection chunk when a small batch's units are split among the
#: threads (3-5 % faster at batch 1, I = 64, H = 128 than 1024-row chunks).
SPLIT_CHUNK_STEPS = 32
#: A part (a thread's share of the batch) gets at least this many rows: fewer
#: would make its per-step GEMM too thin to run near the machine's peak.
MIN_ROWS_PER_PART = 16
#: Smallest layer whose units are split among threads when its batch is too
#: small to split by rows: below it a step is too short to pay for a barrier.
MIN_UNITS_TO_SPLIT = 64
#: A batch too small to split by rows whose forward does fewer FLOPs than this
#: (8*B*T*H*(I+H)) runs on one thread, backward included, instead of splitting its
#: units: it lasts a few hundred microseconds on one core, so a second thread saved
#: nothing on an idle machine ((1, 200, 32, 64) and (1, 100, 32, 128): the same
#: best and median times either way), while on a busy one waiting for it cost
#: milliseconds (issue 17: (1, 200, 32, 64) training, median 50-80 ms with two
#: threads). Batches split by rows keep their threads: at (32, 50, 16, 32) and
#: (64, 50, 16, 16), 13-20 MFLOP, two threads were 1.6-1.7x faster when idle.
MIN_FLOPS_TO_THREAD = 2**25
#: ... except a call of at least MIN_STEPS_TO_SPLIT steps on a layer of at least this many
#: units, which still splits them (the split chooser then times both ways, as for larger
#: calls): its steps are long enough to pay for a barrier each. Batch 1, one thread / split,
#: best of 5 (Zen 5, 2 threads): (I, H) = (32, 128) 1.14x at T = 16, 1.38x at 64-128
#: (inference; training 1.23x / 1.36-1.42x), (256, 128) 1.38-1.58x at 16-128; at H = 64
#: the split lost at every T up to 256 ((32, 64): 0.78-0.98x; 0.8-1.07x at batch 4).
MIN_UNITS_TO_SPLIT_SMALL_CALL = 128
#: A training step of 2 * MIN_ROWS_PER_PART rows or more takes the one-step kernel (one thread)
#: only under this many forward FLOPs (``_takes_one_step``): its backward then computes the
#: weight gradients on that thread too, where the general path splits them among the threads.
#: Zen 5, 2 threads, lstmeng.torch.LSTMCell training loops at batch 32 against the general
#: path: (I, H) = (64, 128), 6.3 MFLOP, faster (1.05-1.09x -> 1.26-1.29x torch); (96, 192),
#: 14 MFLOP, 1.31-1.33x -> 1.26-1.27x; (128, 256), 25 MFLOP, 1.41-1.47x -> 1.30-1.32x.
ONE_STEP_TRAINING_MAX_FLOPS = 2**23
#: ``gates_weight_gradients`` runs the kernel threads from this many FLOPs (one thread below).
#: One parallel region, no barriers: two threads of a Zen 5 took 6.4 against 8.3 us at 0.8 MFLOP
#: ((rows, I, H) = (4, 64, 128)), 10.6 against 16.5 at 3.1 MFLOP, even at 0.03; the limit keeps
#: the tiniest products off a second thread that may be asleep (waking one took 0.3-3 ms on that
#: guest: CALL_RUN_SECONDS).
GATES_WEIGHT_GRADIENTS_MIN_FLOPS_TO_THREAD = 2**21
#: Steps a call below MIN_FLOPS_TO_THREAD needs to split its units (the team's start and the
#: packing are paid once per call: at T = 8 the split gained 1.03-1.26x, less than at 16).
MIN_STEPS_TO_SPLIT = 8
#: Such a call splits only within a run of calls: the backend's last call ended less than
#: this many seconds ago. Idle OpenMP workers spin a few milliseconds and then sleep, and
#: waking one took 0.3-3 ms on the Zen 5 guest (batch 1, (I, H, T) = (64, 128, 16), calls
#: 10 ms apart: 3.2 ms split against 0.31-0.38 on one thread; 2 ms apart, 110 against 116
#: us; back to back, 70 against 82): an isolated call runs one thread.
CALL_RUN_SECONDS = 0.002
#: The unit split is "losing" in a call when a member spent more than this fraction
#: of the call waiting at barriers after it began to yield its core (another member
#: more than ~5 us late: descheduled); the next calls then run one thread (see
#: _UnitSplitGovernor).
LOSING_WAIT_FRACTION = 0.1
#: Whole parts meet only at the call's end, where a part's thread also waits for a partner
#: that started late (waking an idle OpenMP thread) or had the slower part: on an idle
#: Zen 5 guest such waits were 50-110 us (1-2 % of calls over LOSING_WAIT_FRACTION, and
#: the back-off doubling on runs of them), where a core lost to another process cost
#: 2-35 ms. Shorter waits at the parts' end do not count (session 17).
PARTS_MIN_SLOW_WAIT_SECONDS = 250e-6
#: ... nor do waits under this fraction of the call (the unit split's LOSING_WAIT_FRACTION is
#: 10 %). Two parts of work W each, whose call ends after a wait of a fraction f of it, took
#: W / (1 - f) where one thread takes 2 W: slower only from f = 1/2, while a split call's
#: waits recur at every step. On an idle but noisy guest, (32, 200, 128, 512) inference waited
#: 10-13 % in 7 of 64 calls, and at 10 % the governor ran 36 of them on one thread (median
#: 0.73x the previous build's); 0.3 keeps the calls where a core was really lost (30-89 %).
PARTS_LOSING_WAIT_FRACTION = 0.3
#: Most calls a losing unit split is skipped before it is tried again (see
#: _UnitSplitGovernor: with a CPU-bound process on the other core, a retry of a short
#: call's split can stall for several ms, 20 % more on 256 calls of 0.16 ms).
MAX_SPLIT_BACKOFF_CALLS = 4096
#: A call shape whose unit split and one thread have both been timed runs the slower
#: of the two once every this many calls, to notice when the machine changed (see
#: _SplitChooser).
SPLIT_EXPLORE_EVERY = 64
#: Timings of each choice the chooser compares (the best of them).
SPLIT_TIMINGS = 3
#: Calls of each choice the chooser times, alternating, before it compares them: the
#: first call of a shape is cold (the team's threads start, fresh scratch pages are
#: touched): at (1, 500, 64, 128) training it ran 24 us per step split against 3.9
#: for the next split call, so comparing one timing of each kept the shape on one
#: thread for its first SPLIT_EXPLORE_EVERY calls even where the split was 1.5x faster.
SPLIT_FIRST_TIMINGS = 2
#: Chunks of steps whose inputs (and, in inference, gates) a pipelined forward holds at once
#: (``_cython_lstm.projection_ahead``): its second thread projects up to this many minus one
#: chunks ahead of the time loop. A constant, so inference memory stays O(B H).
PIPELINE_SLOTS = 4
#: Call shapes the chooser remembers (least recently used go first).
SPLIT_CHOOSER_SHAPES = 64
#: Bytes of released scratch and workspace arrays a backend keeps for its next calls
#: (see ``lstmeng.backends._buffer_cache``): a few workspaces of a mid-sized layer.
BUFFER_CACHE_BYTES = 512 * 2**20


class _ThreadCounts:
    """A call's thread counts, from at most one reading of ``threads.thread_count()`` (2-3 us:
    OMP_NUM_THREADS, the affinity mask and the OpenMP runtime's limit, any of which may change
    between calls; a forward asked up to four times).

    kernel: threads the kernels may run: one pool, OpenMP's, with BLAS on one thread each; 1
    without OpenMP or without control over BLAS's threads (``probe()`` says which).
    gradient: threads the backward's weight-gradient products may use (BLAS at one thread each).
    """

    __slots__ = ("_count",)

    def __init__(self):
        self._count = None

    def _read(self) -> int:
        if self._count is None:
            self._count = threads.thread_count() if threads.blas_controllable() else 1
        return self._count

    @property
    def kernel(self) -> int:
        return self._read() if _cython_lstm is not None and _cython_lstm.HAVE_OPENMP else 1

    @property
    def gradient(self) -> int:
        return self._read()


def _kernel_threads() -> int:
    """``_ThreadCounts.kernel`` read now."""
    return _ThreadCounts().kernel


def _one_thread_reason() -> str:
    """Why the kernels run one thread where more were asked for ("" when they don't)."""
    if _cython_lstm is not None and not _cython_lstm.HAVE_OPENMP:
        return ": built without OpenMP"
    if not threads.blas_controllable():
        return ": no BLAS whose threads threadpoolctl can set"
    return ""


def _parts(batch: int, threads: int | None = None) -> int:
    """How many threads share the batch by rows (at least MIN_ROWS_PER_PART each)."""
    threads = _kernel_threads() if threads is None else threads
    return max(1, min(threads, batch // MIN_ROWS_PER_PART))


def _team(batch: int, units: int, split_units: bool | None, flops: float | None = None, steps: int = 0,
          in_run: bool = True, counts: _ThreadCounts | None = None) -> tuple[int, int, bool]:
    """(parts, threads, split_units) for a batch: parts by rows when the batch is large
    enough, else (with ``split_units`` None, the automatic choice, or True) one part
    whose units the threads share. split_units True forces the unit split whenever
    threads are available (the ``cython_split_units`` kernel override: tests run that
    path at tiny sizes); False never splits. flops: the forward's FLOPs; below
    MIN_FLOPS_TO_THREAD a batch of one part runs one thread (None: no limit) unless its
    ``steps`` and units reach MIN_STEPS_TO_SPLIT and MIN_UNITS_TO_SPLIT_SMALL_CALL and the
    call is part of a run of calls (``in_run``: see CALL_RUN_SECONDS). counts: the call's
    thread counts (read now when None)."""
    one_thread = (flops is not None and flops < MIN_FLOPS_TO_THREAD
                  and (steps < MIN_STEPS_TO_SPLIT or units < MIN_UNITS_TO_SPLIT_SMALL_CALL or not in_run))
    if batch < 2 * MIN_ROWS_PER_PART and one_thread:
        # One part whatever the thread count, too small to thread: the answer without
        # asking for the thread count (2-3 us, a tenth of a one-step cell call).
        return 1, 1, False
    threads = (counts or _ThreadCounts()).kernel
    parts = _parts(batch, threads)
    if parts == 1 and one_thread:
        threads = 1
    if parts == 1 and threads > 1 and split_units is not False and (
            split_units is True or units >= MIN_UNITS_TO_SPLIT):
        return 1, threads, True
    return parts, parts, False


class _UnitSplitGovernor:
    """Whether to split units (or run whole parts on their threads) now: stops that for a while
    after a call in which it lost.

    The unit split meets at a barrier every step; when another process holds
    one of the cores, a member is descheduled and every barrier waits for it
    (issue 17: a batch-1 training step 9x slower than on one thread). The
    kernels time the waits that had to yield their core; after a call where
    they took more than LOSING_WAIT_FRACTION of its time, the next ``backoff``
    calls run on one thread, and ``backoff`` doubles (up to
    MAX_SPLIT_BACKOFF_CALLS) each time the split loses again, halving back
    after each run of ``backoff`` split calls that did not: the split is retried
    ever more rarely while the machine stays busy, and runs on as soon as it is idle.

    Whole parts (batches of 32 rows or more, a part per thread) meet once, at the call's
    end; since session 17 the time a part's thread waits there after it began to yield
    its core counts as the split's barrier waits do, and while the governor holds back
    the parts run one after another on one thread (the same numbers). With a CPU-bound
    process on the other core, such calls had taken 1.08-2.15x their one-thread time on
    average, 0.96-1.07x since (docs/cython.md, "Whole parts back off too"); waits there under
    PARTS_MIN_SLOW_WAIT_SECONDS or PARTS_LOSING_WAIT_FRACTION of the call do not count.

    A run, not a single call: with a CPU-bound process on the other core, most short
    split calls of (1, 64, 64, 128) ran faster than one thread (0.10 against 0.16 ms)
    while one every few dozen stalled for milliseconds, waiting for a member that had
    lost its core; halving the back-off after every call that did not lose kept the
    split running between stalls, and calls averaged 1.2-1.4x the one-thread time
    (``benchmarks/busy_machine.py --hog``; 1.02-1.04x since).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._skip = 0       # calls still to run on one thread
        self._backoff = 1    # what the next losing call sets _skip to
        self._wins = 0       # split calls that did not lose since the last loss or halving

    def holding_back(self) -> bool:
        """Whether calls run on one thread now (a reading: no call is counted)."""
        return self._skip > 0

    def allow(self) -> bool:
        """Whether this call may split (counts the call when it may not)."""
        with self._lock:
            if self._skip > 0:
                self._skip -= 1
                return False
            return True

    def record(self, barriers: int, slow_wait_seconds: float, call_seconds: float) -> None:
        """Account a split call: its barriers and slow-wait time (from the kernels) and
        its wall time."""
        if barriers <= 0:
            return
        with self._lock:
            if slow_wait_seconds > LOSING_WAIT_FRACTION * call_seconds:
                self._skip = self._backoff
                self._backoff = min(2 * self._backoff, MAX_SPLIT_BACKOFF_CALLS)
                self._wins = 0
            else:
                self._wins += 1
                if self._wins >= self._backoff:
                    self._backoff = max(1, self._backoff // 2)
                    self._wins = 0


class _SplitChooser:
    """Per call shape, whether the unit split or one thread has been faster lately.

    The split pays only when both cores run at full speed at once, which a process
    cannot see from inside: on a 2-core cloud guest whose host placed its two virtual
    CPUs badly (or ran other work beside them), a batch-1 forward of (1, 500, 64, 128)
    took 1.85 ms split, its members busy rather than waiting at the barriers, against
    0.94 ms on one thread; placed well, 0.66 ms split. So the backend measures: the
    first eligible calls of a shape alternate split and one thread until each has run
    SPLIT_FIRST_TIMINGS times (split first), and from then on the faster of the two
    runs (seconds per step, the best of the last SPLIT_TIMINGS calls that ran it:
    other processes only ever slow a call down, and the first call is cold, so the
    best is the least disturbed), the other one again every SPLIT_EXPLORE_EVERY calls.
    Forward and backward calls are separate shapes. (The one-thread path computes
    the same numbers, bitwise where the call's products all run on the AVX-512
    kernels and in float64; where a float32 product runs on BLAS (the AVX2 and scalar
    paths, dx with inputs not a multiple of 32, unit slices not a multiple of 32)
    the members' column blocks may differ from one thread's in the last bits.)
    """

    def __init__(self):
        self._lock = threading.Lock()
        #: shape key -> [seconds per step of the last calls split, the same on one thread,
        #: eligible calls so far]
        self._shapes: collections.OrderedDict = collections.OrderedDict()

    def choose(self, key) -> bool:
        """Whether this call of shape ``key`` should split its units."""
        with self._lock:
            entry = self._shapes.get(key)
            if entry is None:
                entry = self._shapes[key] = [collections.deque(maxlen=SPLIT_TIMINGS),
                                             collections.deque(maxlen=SPLIT_TIMINGS), 0]
                while len(self._shapes) > SPLIT_CHOOSER_SHAPES:
                    self._shapes.popitem(last=False)
            self._shapes.move_to_end(key)
            entry[2] += 1
            split_times, one_times, calls = entry
            if len(split_times) < SPLIT_FIRST_TIMINGS and len(split_times) <= len(one_times):
                return True
            if len(one_times) < SPLIT_FIRST_TIMINGS:
                return False
            split_faster = min(split_times) <= min(one_times)
            return split_faster != (calls % SPLIT_EXPLORE_EVERY == 0)

    def observe(self, key, split: bool, seconds_per_step: float) -> None:
        """Account a call of shape ``key`` that ran split (or not) in ``seconds_per_step``."""
        with self._lock:
            entry = self._shapes.get(key)
            if entry is None:
                return
            entry[0 if split else 1].append(seconds_per_step)


def _length_class(steps: int) -> int:
    """The split chooser's class of a call's length: steps within a factor of two share one.
    Its per-step times include each way's fixed cost per call (the team's start, packing),
    which weighs on a short call's steps and not on a long one's: with one class for every
    length, 8-step calls taught the chooser to run 64- and 128-step calls on one thread
    (1.22x torch at (1, 64, 64, 128) instead of 1.7x)."""
    return max(steps, 1).bit_length()


def _pipelined_call_stats(stats, elapsed: float, thread_seconds: float) -> tuple:
    """(hand-overs, seconds lost) of a pipelined call for the busy-machine rule: the longer of
    the kernels' slow waits and the time the calling thread, which runs the time loop, was
    off its core (wall time minus its CPU time). On a 2-core machine with another process
    busy, the pipeline's second thread takes time slices from the loop's thread without
    either waiting for the other. stats: the extension's (hand-overs, slow-wait seconds);
    a call that did not pipeline reports no hand-overs and is left as it is."""
    handovers, slow_seconds = stats
    if handovers <= 0:
        return stats
    return handovers, max(slow_seconds, elapsed - thread_seconds)


#: What ``_blas_guard`` returns for a call that makes no BLAS call (reused: one per call costs more).
_NO_GUARD = contextlib.nullcontext()


def _blas_guard(dtype, batch: int, features: int, units: int, backward: bool):
    """Context for a one-step kernel call (``step_forward`` / ``step_backward``): BLAS held to one
    thread when the call uses BLAS, else nothing (float32 batches of up to 16 rows run
    lstm_gemv.h's kernels, with exceptions there; taking the limit costs ~2 us of a ~10 us
    batch-1 cell step)."""
    if _cython_lstm.step_calls_blas(dtype == np.float32, batch, features, units, backward):
        return threads.single_threaded_blas()
    return _NO_GUARD


def _threads_for(layout):
    """Context for a kernel call: BLAS on one thread whenever the kernels own the threading.

    Also with a single part (a batch too small to split): its per-step
    products are too small for BLAS threads to pay for their wake-ups.
    """
    return threads.single_threaded_blas()


@dataclasses.dataclass
class _Layout:
    """Which packed rows each part and step own (see ``ext/_cython_lstm.pyx``).

    order: [B] caller's row of each packed-order row; row_begin: [P + 1] the
    parts' ranges in ``order``; active: [P, T] rows of part p in step t;
    offsets: [P, T + 1] first packed row of part p's step t; or, for the
    general path, both [P, 1]: every step of part p has active[p, 0] rows
    from offsets[p, 0] + t * active[p, 0] (nothing of length T is kept);
    mask: [B, T] uint8 for the general path, None when every packed row is a
    real step; steps: T; largest_part: rows of the largest part.
    """

    order: np.ndarray
    row_begin: np.ndarray
    active: np.ndarray
    offsets: np.ndarray
    mask: np.ndarray | None
    steps: int
    largest_part: int

    @property
    def rows(self) -> int:
        """N, the number of packed rows."""
        return self.offset(len(self.row_begin) - 2, self.steps)

    def offset(self, part: int, step: int) -> int:
        """First packed row of part ``part``'s step ``step`` (as the kernels compute it)."""
        return int(_cython_lstm.packed_row_offset(self.active, self.offsets, self.steps, part, step))


def _packed_offsets(active: np.ndarray) -> np.ndarray:
    """[P, T + 1] offsets of parts laid out one after another, each time-major."""
    ends = np.cumsum(active.sum(axis=1))
    starts = np.concatenate([[0], ends[:-1]])
    return (starts[:, None] + np.concatenate(
        [np.zeros((active.shape[0], 1), np.intp), np.cumsum(active, axis=1)], axis=1)).astype(np.intp)


def _layout(mask, batch: int, steps: int, parts: int, packed_variable_length: bool) -> _Layout:
    """Split the batch into ``parts`` and choose the general or the variable-length layout.

    mask: [B, T] bool or None.
    """
    if mask is not None:
        mask = np.ascontiguousarray(mask, dtype=bool)
        lengths = _cython_lstm.right_padded_lengths(mask.view(np.uint8))
        if lengths is not None and bool((lengths == steps).all()):
            mask = None  # every step real
        elif lengths is not None and packed_variable_length:
            # Rows sorted by length, dealt to the parts in snake order (see the extension).
            order, row_begin, active, offsets, largest_part = _cython_lstm.variable_length_layout(
                lengths, steps, parts)
            return _Layout(order, row_begin, active, offsets, None, steps, largest_part)
    if mask is None:
        return _uniform_layout(batch, steps, parts)   # cached, mask None (a copy cost 3 us a call)
    return dataclasses.replace(_uniform_layout(batch, steps, parts),
                               mask=np.ascontiguousarray(mask).view(np.uint8))


@functools.lru_cache(maxsize=64)
def _uniform_layout(batch: int, steps: int, parts: int) -> _Layout:
    """The general path's layout: contiguous parts, every row in every step. Cached (a
    training loop calls with the same shapes every step); its arrays are read-only."""
    row_begin = (np.arange(parts + 1) * batch // parts).astype(np.intp)
    active = np.diff(row_begin)[:, None].astype(np.intp)
    offsets = (row_begin[:-1, None] * steps).astype(np.intp)
    arrays = (np.arange(batch, dtype=np.intp), row_begin, active, offsets)
    for array in arrays:
        array.flags.writeable = False
    return _Layout(*arrays, None, steps, int(active.max()))


@dataclasses.dataclass
class _Workspace(Workspace):
    """What the backward needs, in packed row order (N packed rows) but for x.

    x: [B, T, I] the caller's inputs (a reference, not a copy); gates:
    [N, 4H] activated gates (the backward overwrites them with their
    gradients); c_prev, h_in: [N, H] c(t-1) and h(t-1) after recurrent
    dropout. threads, split_units: the forward's team; thread_budget: the
    shares of the backward's weight-gradient and dx products; run_one_thread:
    the forward fell back to one thread (busy machine, or one thread was faster);
    busy: the busy-machine rule made that choice (the backward then does not
    pipeline either); kernel: [I, 4H];
    recurrent_kernel: [H, 4H] (with weights_transposed: [4H, I] and [4H, H], see
    _weights_for_kernels); input_dropout_mask: [B, I] or None;
    recurrent_dropout_mask: [B, H] or None. Once a backward has consumed it,
    gates, c_prev and h_in are None (their memory went back to the backend's
    buffer cache).
    """

    layout: _Layout
    x: np.ndarray
    gates: np.ndarray
    c_prev: np.ndarray
    h_in: np.ndarray
    threads: int
    thread_budget: int
    run_one_thread: bool
    split_units: bool
    kernel: np.ndarray
    recurrent_kernel: np.ndarray
    input_dropout_mask: np.ndarray | None
    recurrent_dropout_mask: np.ndarray | None
    input_shape: tuple
    weights_transposed: bool = False
    busy: bool = False


#: (ISA, fast gate math) selected in the extension now: production's until an override asks
#: for another (see _select_kernels).
_selected_kernels = (None, None)


def _select_kernels(overrides: _kernel_overrides.KernelOverrides) -> None:
    """Set the extension's kernel family from the caller's overrides (the CPU's best and
    the fused gate rows without any); a call into the extension only when it changes."""
    global _selected_kernels
    wanted = (overrides.cython_isa or _cython_lstm.BEST_ISA, overrides.cython_fast_gate_math is not False)
    if wanted != _selected_kernels:
        _cython_lstm.select_kernels(*wanted)
        _selected_kernels = wanted


def _specialization(kernel, dtype):
    """The float or double version of a fused kernel, chosen explicitly: Cython's
    automatic choice looks at the first array argument, which may be None."""
    return kernel["float" if np.dtype(dtype) == np.float32 else "double"]


def _contiguous(array, dtype):
    return None if array is None else np.ascontiguousarray(array, dtype=dtype)


def _takes_one_step(batch: int, steps: int, features: int, training: bool, flops: float, overrides,
                    units: int = 0, dtype=None) -> bool:
    """Whether a call without mask or dropout runs ``_one_step`` (the extension's
    ``step_forward``) rather than the general path. units, dtype: the layer's (they matter
    from 2 * MIN_ROWS_PER_PART rows). Call with the kernels of ``overrides`` selected.

    Under 2 * MIN_ROWS_PER_PART rows the short path is bitwise the general one: the general path
    takes the same unpacked products for such a call (one step is under PACK_MIN_STEPS and fewer
    than 32 rows under MIN_ROWS_TO_PACK, the extension's constants; tests/test_backend_cython.py
    compares the two paths bitwise at B = 1, 5 and 31). A training call takes it only where
    the general path runs one thread (under MIN_FLOPS_TO_THREAD), so that its workspace is the
    one the general path would hand the backward.

    From 2 * MIN_ROWS_PER_PART rows the general path splits the rows into parts on their threads
    and packs the input kernel; the short path takes such a call where one thread is enough
    (under MIN_FLOPS_TO_THREAD; in training under ONE_STEP_TRAINING_MAX_FLOPS, as its backward's
    weight gradients then run on one thread too) and its kernel calls no BLAS
    (``step_calls_blas``: float32, both products on its GEMV, 32 rows on the AVX-512 kernels, and
    in training the weight gradients on the packed kernel). There it agrees with the general
    path within rounding, not bitwise (the input projection's and the bias gradient's sums are
    grouped otherwise). Measured on the Zen 5 (2 threads, ``lstmeng.torch.LSTMCell`` against
    ``torch.nn.LSTMCell``, 50-step loops at (I, H) = (64, 128), batch 32, two alternated runs):
    inference 1.21-1.22x -> 1.53-1.58x,
    training 1.05-1.06x -> 1.27-1.29x, online 0.74-0.75x -> 1.02x; at batch 48 (SGEMM) the short
    path lost (inference 0.85x), hence the GEMV condition.
    """
    if not (steps == 1 and features > 0 and batch > 0 and overrides.cython_split_units is not True
            and overrides.cython_one_step is not False):
        return False
    if batch < 2 * MIN_ROWS_PER_PART:
        return not training or flops < MIN_FLOPS_TO_THREAD
    return (flops < (ONE_STEP_TRAINING_MAX_FLOPS if training else MIN_FLOPS_TO_THREAD) and dtype == np.float32
            and not _cython_lstm.step_calls_blas(True, batch, features, units, training))


def _takes_one_step_backward(ws, overrides) -> bool:
    """Whether the backward of workspace ``ws`` runs the extension's ``step_backward``: one step
    of one part in the uniform layout (offsets [P, 1]; a right-padded mask's layout has
    [P, T + 1] and rows sorted by length) without a mask, so every row is real and packed row
    r is batch row r; on one thread, no dropout."""
    layout = ws.layout
    return (ws.input_shape[1] == 1 and ws.input_shape[2] > 0 and ws.threads == 1 and ws.thread_budget == 1
            and not ws.split_units and len(layout.row_begin) == 2 and layout.offsets.shape[1] == 1
            and layout.mask is None and ws.input_dropout_mask is None and ws.recurrent_dropout_mask is None
            and overrides.cython_one_step is not False)


def _may_give_gates(ws, overrides) -> bool:
    """Whether the backward of workspace ``ws`` can give dz instead of the weight gradients: a
    one-step call in the uniform layout (offsets [P, 1]: packed row r is batch row r) without
    mask or dropout, where dz^T x and dz^T h0 are exactly the weight gradients, unless
    ``kernel_overrides(cython_one_step=False)``. ``sequence_backward_gates(prefer_gates=True)``
    gives it then."""
    layout = ws.layout
    return (ws.input_shape[1] == 1 and ws.input_shape[2] > 0 and layout.offsets.shape[1] == 1
            and layout.mask is None and ws.input_dropout_mask is None and ws.recurrent_dropout_mask is None
            and overrides.cython_one_step is not False)


def _gives_gates(ws, overrides) -> bool:
    """Whether ``sequence_backward_gates`` of workspace ``ws`` gives dz instead of the weight
    gradients by default: where it can (``_may_give_gates``), for fewer than 2 * MIN_ROWS_PER_PART
    rows: the one-step kernel's (``_takes_one_step_backward``) or, past its FLOPs, the general
    path's (one part, its units split among the threads).

    Not from 2 * MIN_ROWS_PER_PART rows (parts of rows on their threads): there the step's own
    weight-gradient products are large enough to run near the kernels' peak, which a caller's
    product over a loop's steps may not reach (torch.mm on MKL's AVX2 code on an AMD CPU, NumPy's
    BLAS on one thread): loops at batch 32 measured 0.91-0.95x (lstmeng.torch) and 0.84-0.85x
    (lstmeng.LSTMCell) the per-step sums' speed, where batch 16 at (I, H) = (256, 512) gained
    1.26x and 1.11x. (A caller with one step to form weight gradients for, which no loop adds
    up, asks for dz with ``prefer_gates``: there the step's weight-sized arrays and autograd's
    transposed pass over them are what it saves.)"""
    return ws.input_shape[0] < 2 * MIN_ROWS_PER_PART and _may_give_gates(ws, overrides)


def _step_states(step_forward, x, h0, c0, kernel, recurrent_kernel, bias, gates, activation: int,
                 recurrent_activation: int, weights_transposed: bool, c_prev=None, h_in=None) -> tuple:
    """One call of the extension's one-step kernel: (h [B, H], c [B, H]) after the step, new arrays.

    step_forward: its specialization for the arrays' dtype; x [B, I], h0, c0 [B, H] C-contiguous;
    kernel, recurrent_kernel as ``_weights_for_kernels`` returns them; bias [4H] or None; gates
    [B, 4H] receives the activated gates; activation codes from ``ACTIVATION_KINDS``; c_prev, h_in
    [B, H] (training) receive c(t - 1) and h(t - 1). BLAS is held to one thread only where the call
    uses it (``_blas_guard``)."""
    batch, units = h0.shape
    h_out, c_out = np.empty((batch, units), h0.dtype), np.empty((batch, units), h0.dtype)
    with _blas_guard(h0.dtype, batch, x.shape[1], units, backward=False):
        step_forward(x, h0, c0, kernel, recurrent_kernel, bias, gates, h_out, c_out, activation, recurrent_activation,
                     weights_transposed, c_prev, h_in)
    return h_out, c_out


def _weights_for_kernels(kernel, recurrent_kernel, dtype):
    """(kernel, recurrent_kernel, transposed) as the extension reads them.

    kernel [I, 4H] and recurrent_kernel [H, 4H] row-major (copied there when they are
    not, or not of ``dtype``), or, when the recurrent kernel is the transpose of a
    row-major [4H, H] array of ``dtype`` (``lstmeng.torch`` passes ``weight_hh.t()``,
    a view), both as their row-major transposes [4H, I] and [4H, H] with transposed
    True: the kernels read PyTorch's layout in place, where a transposing copy of each
    weight cost more than a batch-1 LSTMCell step's arithmetic.
    """
    recurrent_kernel = np.asarray(recurrent_kernel)
    kernel = np.asarray(kernel)
    transposed = (recurrent_kernel.dtype == dtype and recurrent_kernel.T.flags.c_contiguous
                  and not recurrent_kernel.flags.c_contiguous)
    if transposed:
        return np.ascontiguousarray(kernel.T, dtype=dtype), recurrent_kernel.T, True
    return _contiguous(kernel, dtype), _contiguous(recurrent_kernel, dtype), False


@dataclasses.dataclass(frozen=True)
class _CellWeights:
    """A cell's weights as the one-step kernels read them, found once for a loop of steps
    (``cell_inference_step``, ``cell_training_step``).

    kernel, recurrent_kernel: ``_weights_for_kernels``' arrays, views of the caller's (so
    in-place changes are seen); transposed: their layout flag; dtype; features I; units H;
    gate_columns 4H; has_bias: the options'.
    """

    kernel: np.ndarray
    recurrent_kernel: np.ndarray
    transposed: bool
    dtype: np.dtype
    features: int
    units: int
    gate_columns: int
    has_bias: bool

    @classmethod
    def of(cls, kernel, recurrent_kernel, options) -> "_CellWeights | None":
        """The weights prepared, or None where the one-step kernels cannot take them in place
        (another dtype, mismatched shapes, or a layout that would need a copy: a copy would
        miss in-place changes): the caller then keeps ``cell_forward``."""
        dtype = getattr(recurrent_kernel, "dtype", None)
        if dtype not in (np.float32, np.float64):
            return None
        prepared_kernel, prepared_recurrent, transposed = _weights_for_kernels(kernel, recurrent_kernel, dtype)
        if not (np.may_share_memory(prepared_kernel, kernel)
                and np.may_share_memory(prepared_recurrent, recurrent_kernel)):
            return None
        # [4H, I] and [4H, H] transposed, else [I, 4H] and [H, 4H].
        gate_axis = 0 if transposed else 1
        features, units = prepared_kernel.shape[1 - gate_axis], prepared_recurrent.shape[1 - gate_axis]
        if prepared_kernel.shape[gate_axis] != 4 * units or prepared_recurrent.shape[gate_axis] != 4 * units:
            return None
        return cls(prepared_kernel, prepared_recurrent, transposed, np.dtype(dtype), features, units, 4 * units,
                   options.has_bias)

    def takes(self, x, h, c, bias, training: bool, overrides) -> bool:
        """Whether a step on x [B, I], h, c [B, H], bias [4H] or None runs the one-step kernel
        directly: arrays of these weights' sizes and dtype, the bias the options said, and a call
        ``sequence_forward`` would give to ``_one_step`` (``_takes_one_step``)."""
        try:
            batch, width = x.shape
            units = self.units
            return (width == self.features and h.shape == c.shape == (batch, units)
                    and x.dtype == h.dtype == c.dtype == self.dtype and (bias is not None) == self.has_bias
                    and (bias is None or (bias.shape == (self.gate_columns,) and bias.dtype == self.dtype))
                    and _takes_one_step(batch, 1, width, training, 8.0 * batch * units * (width + units), overrides,
                                        units, self.dtype))
        except (AttributeError, TypeError, ValueError):   # not arrays, or x not 2-D
            return False


class CythonBackend(KernelBackend):
    """Fused Cython kernels with BLAS GEMMs (float32 and float64, every activation).

    A batch too small to split by rows has its units split among the threads
    when the layer has at least ``MIN_UNITS_TO_SPLIT`` units; right-padded
    masks take the sorted, shrinking-batch path. Tests and benchmarks force
    other paths with ``lstmeng.testing.kernel_overrides`` (read at each call).

    Args:
        buffer_cache_bytes: how many bytes of released scratch and consumed
            workspace arrays to keep for the next calls (a training loop then
            reuses its memory instead of having fresh pages zeroed every
            step); 0 keeps none. ``release_buffers()`` frees them.
    """

    name = "cython"

    def __init__(self, buffer_cache_bytes: int = BUFFER_CACHE_BYTES):
        if not isinstance(buffer_cache_bytes, (int, np.integer)) or buffer_cache_bytes < 0:
            raise ValueError(f"buffer_cache_bytes must be an int >= 0, got {buffer_cache_bytes!r}")
        self._buffers = BufferCache(int(buffer_cache_bytes))
        self._split_governor = _UnitSplitGovernor()
        self._split_chooser = _SplitChooser()
        #: perf_counter() at the end of this backend's last sequence call (see CALL_RUN_SECONDS).
        self._last_call_end = -math.inf

    def release_buffers(self) -> None:
        """Free the scratch and workspace memory kept for later calls."""
        self._buffers.clear()

    def probe(self) -> str:
        if _cython_lstm is None:
            raise NotImplementedError(f"the compiled extension lstmeng.backends._cython_lstm "
                                      f"is not built: {_IMPORT_ERROR}")
        return f"CPU: {threads.cpu_model()} ({_kernel_threads()} threads{_one_thread_reason()}, BLAS via scipy)"

    def sequence_forward(self, x, h0, c0, kernel, recurrent_kernel, bias, mask, input_dropout_mask,
                         recurrent_dropout_mask, options):
        options.check_arrays(bias, mask, input_dropout_mask, recurrent_dropout_mask)
        overrides = _kernel_overrides.current()
        _select_kernels(overrides)
        activation, recurrent_activation = options.activation, options.recurrent_activation
        reverse, zero_output_for_mask = options.reverse, options.zero_output_for_mask
        return_sequences, training = options.return_sequences, options.training
        x = np.asarray(x)
        dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)
        x = np.ascontiguousarray(x, dtype=dtype)
        batch, steps, features = x.shape
        units = np.shape(recurrent_kernel)[0]
        kernel, recurrent_kernel, weights_transposed = _weights_for_kernels(kernel, recurrent_kernel, dtype)
        bias = _contiguous(bias, dtype)
        h0, c0 = _contiguous(h0, dtype), _contiguous(c0, dtype)
        input_dropout_mask = _contiguous(input_dropout_mask, dtype)
        recurrent_dropout_mask = _contiguous(recurrent_dropout_mask, dtype)
        flops = 8.0 * batch * steps * units * (features + units)
        if (mask is None and input_dropout_mask is None and recurrent_dropout_mask is None
                and _takes_one_step(batch, steps, features, training, flops, overrides, units, dtype)):
            return self._one_step(x, h0, c0, kernel, recurrent_kernel, bias, weights_transposed, options)
        counts = _ThreadCounts()
        parts, threads, split_units = _team(batch, units, overrides.cython_split_units, flops, steps,
                                            time.perf_counter() - self._last_call_end < CALL_RUN_SECONDS, counts)
        # Shares of the backward's products after its time loop (weight gradients, dx):
        # one for a one-part call too small to thread, else one per thread. Fixed by
        # the shape alone, so the results never depend on the busy-machine fallback.
        thread_budget = threads if parts == 1 and flops < MIN_FLOPS_TO_THREAD else counts.gradient
        run_one_thread = busy = False
        # A split the caller did not force: one thread instead while the split has been
        # losing (another process holds a core, and every parallel region's end would
        # wait for it too), or while one thread has been faster at this shape. One
        # thread, backward included (the same shares, run one after another).
        chooser_key = None
        if split_units and overrides.cython_split_units is None:
            # The forced kernel family too (None in production): a process that switches it
            # (tests, `compare_cpu.py --isa`) keeps one verdict per family.
            chooser_key = ("forward", batch, features, units, training, dtype.char, _length_class(steps),
                           overrides.cython_isa)
            busy = not self._split_governor.allow()
            if busy or not self._split_chooser.choose(chooser_key):
                parts, threads, split_units, run_one_thread = 1, 1, False, True
        elif parts > 1 and threads > 1:
            # Whole parts on their threads, which meet only at the call's end: while that
            # wait has been losing (another process holding a core) the same parts run one
            # after another on one thread (the same numbers), the backward's too.
            busy = not self._split_governor.allow()
            if busy:
                threads = 1
        layout = _layout(mask, batch, steps, parts, overrides.cython_packed_variable_length is not False)
        # One part whose time loop runs on one thread while others are free: the input
        # projection of the chunks ahead runs on another thread (the extension's pipelined
        # forward), unless the busy-machine rule holds those threads back.
        # (The cheap tests first: a first reading of the thread count costs a few µs.)
        one_part_may_thread = (parts == 1 and not split_units and flops >= MIN_FLOPS_TO_THREAD
                               and counts.kernel > 1)
        if one_part_may_thread and chooser_key is None and overrides.cython_pipeline is not False:
            busy = not self._split_governor.allow()
        pipeline = one_part_may_thread and not busy and overrides.cython_pipeline is not False

        # On cache lines (aligned_empty): a unit split's members write the two halves of each row.
        sequence_outputs = aligned_empty((batch, steps, units), dtype) if return_sequences else None
        last_output = None if return_sequences else aligned_empty((batch, units), dtype)
        h_out, c_out = aligned_empty((batch, units), dtype), aligned_empty((batch, units), dtype)
        # The inputs reach the projection GEMM a chunk of steps at a time, in packed rows.
        part_batch = layout.largest_part
        chunk_steps = max(1, min(steps, CHUNK_ROWS // max(part_batch, 1)))
        if split_units or one_part_may_thread:
            # A unit split's steps read each step's gate rows just after the recurrent
            # product streamed the weights through the cache: a short chunk keeps them in
            # L1/L2 (batch 1, H = 128: 1024 rows are 2 MB of gates). A pipelined forward
            # needs chunks to hand over. The same chunks whether the call splits, pipelines
            # or not, so that the projection's results never depend on that choice.
            chunk_steps = min(chunk_steps, SPLIT_CHUNK_STEPS)
        part_chunk_rows = chunk_steps * part_batch
        # A part's slot of the chunk buffers; a pipelined forward's chunks take PIPELINE_SLOTS
        # slots in turn.
        slots = parts
        if pipeline:
            slots, threads = PIPELINE_SLOTS, counts.kernel
        take = self._buffers.take
        packed_x = take((slots * part_chunk_rows, features), dtype)
        if training:
            rows = layout.rows
            gates = take((rows, 4 * units), dtype)
            c_prev, h_in = take((rows, units), dtype), take((rows, units), dtype)
        else:
            gates = take((slots * part_chunk_rows, 4 * units), dtype)
            c_prev = h_in = None
        h_state, c_state = take((batch, units), dtype), take((batch, units), dtype)
        h_in_step = take((2, batch, units), dtype)

        start, start_cpu = time.perf_counter(), time.thread_time()
        with _threads_for(layout):
            barrier_stats = _specialization(_cython_lstm.forward, dtype)(
                x=x, h0=h0, c0=c0, kernel=kernel, recurrent_kernel=recurrent_kernel, bias=bias,
                mask=layout.mask, input_dropout_mask=input_dropout_mask,
                recurrent_dropout_mask=recurrent_dropout_mask,
                order=layout.order, row_begin=layout.row_begin, active=layout.active, offsets=layout.offsets,
                act=_cython_lstm.ACTIVATION_KINDS[activation],
                ract=_cython_lstm.ACTIVATION_KINDS[recurrent_activation],
                reverse=reverse, zero_output_for_mask=zero_output_for_mask,
                sequence_outputs=sequence_outputs, last_output=last_output, h_out=h_out, c_out=c_out,
                packed_x=packed_x, gates=gates, c_prev_all=c_prev, h_in_all=h_in,
                h_state=h_state, c_state=c_state, h_in_step=h_in_step,
                chunk_steps=chunk_steps, part_chunk_rows=part_chunk_rows,
                threads=threads, split_units=split_units, buffer_cache=self._buffers,
                weights_transposed=weights_transposed, pipeline=pipeline)
        self._record_call(start, start_cpu, barrier_stats, pipeline, split_units or parts > 1, chooser_key, steps,
                          split_units)
        self._buffers.give(packed_x, h_state, c_state, h_in_step, None if training else gates)

        workspace = None
        if training:
            workspace = _Workspace(
                options, layout=layout, x=x, gates=gates, c_prev=c_prev, h_in=h_in, threads=threads,
                thread_budget=thread_budget, run_one_thread=run_one_thread, busy=busy,
                split_units=split_units, kernel=kernel, recurrent_kernel=recurrent_kernel,
                input_dropout_mask=input_dropout_mask, recurrent_dropout_mask=recurrent_dropout_mask,
                input_shape=x.shape, weights_transposed=weights_transposed)
        outputs = sequence_outputs if return_sequences else last_output
        return SequenceForward(outputs=outputs, h=h_out, c=c_out, workspace=workspace)

    def _record_call(self, start: float, start_cpu: float, barrier_stats: tuple, pipeline: bool,
                     teamed: bool, chooser_key, steps: int, split_units: bool) -> None:
        """After a forward or backward kernel call that began at ``start`` (perf_counter) and
        ``start_cpu`` (this thread's thread_time): its end for the run rule (CALL_RUN_SECONDS),
        and what the busy-machine governor and the split chooser learn from it. barrier_stats:
        the kernel's (barriers, slow-wait seconds), or a pipelined call's raw stats; teamed:
        the call ran a unit split or whole parts (barriers where its threads meet; a call on
        one thread reports none, and the governor ignores it); split_units: it ran a unit
        split (what the chooser learns)."""
        elapsed = time.perf_counter() - start
        self._last_call_end = start + elapsed
        if pipeline:
            barrier_stats = _pipelined_call_stats(barrier_stats, elapsed, time.thread_time() - start_cpu)
        elif teamed and not split_units and (barrier_stats[1] < PARTS_MIN_SLOW_WAIT_SECONDS
                                             or barrier_stats[1] < PARTS_LOSING_WAIT_FRACTION * elapsed):
            barrier_stats = (barrier_stats[0], 0.0)
        if teamed or pipeline:
            self._split_governor.record(*barrier_stats, elapsed)
        if chooser_key is not None:
            self._split_chooser.observe(chooser_key, split_units, elapsed / max(steps, 1))

    def cell_inference_step(self, kernel, recurrent_kernel, options):
        """``KernelBackend.cell_inference_step``: a step that ``cell_forward`` would give to
        ``_one_step`` goes straight to the extension's ``step_forward`` with the weights'
        layout, kernel specialization and activation codes found once, the same kernel call
        (so bitwise the same results); any other step (another dtype, shape or batch size,
        a forced kernel path) takes ``cell_forward``. Weights that the kernels cannot read
        in place (a copy would miss in-place changes) always take ``cell_forward``."""
        generic = super().cell_inference_step(kernel, recurrent_kernel, options)
        cell = _CellWeights.of(kernel, recurrent_kernel, options)
        if cell is None:
            return generic
        step_forward = _specialization(_cython_lstm.step_forward, cell.dtype)
        kinds = _cython_lstm.ACTIVATION_KINDS
        activation, recurrent_activation = kinds[options.activation], kinds[options.recurrent_activation]

        def step(x, h, c, bias):
            """x [B, I], h, c [B, H], bias [4H] or None -> (h [B, H], c [B, H])."""
            overrides = _kernel_overrides.current()
            _select_kernels(overrides)   # before takes(): from 32 rows it asks the kernels in use
            if not cell.takes(x, h, c, bias, False, overrides):
                return generic(x, h, c, bias)
            return _step_states(step_forward, np.ascontiguousarray(x), np.ascontiguousarray(h),
                                np.ascontiguousarray(c), cell.kernel, cell.recurrent_kernel,
                                None if bias is None else np.ascontiguousarray(bias),
                                np.empty((x.shape[0], cell.gate_columns), cell.dtype), activation,
                                recurrent_activation, cell.transposed)

        return step

    def cell_training_step(self, kernel, recurrent_kernel, options):
        """``KernelBackend.cell_training_step``: as ``cell_inference_step``, a step that
        ``cell_forward`` would give to ``_one_step`` goes to it directly, with the weights'
        layout found once (the same kernel call and workspace, so bitwise the same results and
        the same backward); any other step takes ``cell_forward``. A batch-1 training step at
        (I, H) = (64, 128) spent ~6 us in ``sequence_forward``'s setup before ``_one_step``."""
        generic = super().cell_training_step(kernel, recurrent_kernel, options)
        cell = _CellWeights.of(kernel, recurrent_kernel, options)
        if cell is None:
            return generic

        def step(x, h, c, bias):
            """x [B, I], h, c [B, H], bias [4H] or None -> (h [B, H], c [B, H], workspace)."""
            overrides = _kernel_overrides.current()
            _select_kernels(overrides)   # before takes(): from 32 rows it asks the kernels in use
            if not cell.takes(x, h, c, bias, True, overrides):
                return generic(x, h, c, bias)
            x = np.ascontiguousarray(x)
            result = self._one_step(x.reshape(x.shape[0], 1, x.shape[1]), np.ascontiguousarray(h),
                                    np.ascontiguousarray(c), cell.kernel, cell.recurrent_kernel,
                                    None if bias is None else np.ascontiguousarray(bias), cell.transposed, options,
                                    outputs=False)
            return result.h, result.c, result.workspace

        return step

    def _one_step(self, x, h0, c0, kernel, recurrent_kernel, bias, weights_transposed, options,
                  outputs: bool = True):
        """sequence_forward of one step of one part without a mask or dropout (a cell step, a
        streaming call): the extension's ``step_forward``, under 32 rows the same products as the
        general path's at T = 1 (so bitwise the same results; ``_takes_one_step``) without its
        setup: a batch-1 inference call at (I, H) = (64, 128) took 18.6 us through the general
        path, 9.2 this way. In training it also writes the workspace the general path's
        one-thread forward would (gates, c(t - 1), h(t - 1) of the one-part layout), for the
        same backward.

        x: [B, 1, I]; h0, c0: [B, H]; kernel, recurrent_kernel as ``_weights_for_kernels``
        returns them; bias: [4H] or None; outputs: False for a caller that reads only h and c (a
        cell step): the result's outputs are then None instead of a copy of h."""
        dtype = x.dtype
        batch, units = x.shape[0], h0.shape[1]
        c_prev = h_in = None
        if options.training:
            # The workspace's arrays come from the buffer cache, as the general path's do (the
            # backward gives them back); an inference step's gates are scratch, and np.empty
            # (0.13 us) costs a fifth of a cache take and give (0.63 us).
            take = self._buffers.take
            gates = take((batch, 4 * units), dtype)
            c_prev, h_in = take((batch, units), dtype), take((batch, units), dtype)
        else:
            gates = np.empty((batch, 4 * units), dtype)
        kinds = _cython_lstm.ACTIVATION_KINDS
        h_out, c_out = _step_states(_specialization(_cython_lstm.step_forward, dtype), x.reshape(batch, -1), h0, c0,
                                    kernel, recurrent_kernel, bias, gates, kinds[options.activation],
                                    kinds[options.recurrent_activation], weights_transposed, c_prev, h_in)
        outputs = h_out.copy() if outputs else None
        if outputs is not None and options.return_sequences:
            outputs = outputs.reshape(batch, 1, units)
        workspace = None
        if options.training:
            # The general path's workspace for this call: one part, one thread, no split.
            workspace = _Workspace(
                options, layout=_uniform_layout(batch, 1, 1), x=x, gates=gates, c_prev=c_prev, h_in=h_in,
                threads=1, thread_budget=1, run_one_thread=False, busy=False, split_units=False, kernel=kernel,
                recurrent_kernel=recurrent_kernel, input_dropout_mask=None, recurrent_dropout_mask=None,
                input_shape=x.shape, weights_transposed=weights_transposed)
        return SequenceForward(outputs=outputs, h=h_out, c=c_out, workspace=workspace)

    def sequence_backward(self, doutputs, dh, dc, workspace, *, input_grad=True, state_grads=True):
        return self._backward(doutputs, dh, dc, workspace, input_grad, weight_grads=True, state_grads=state_grads)

    def sequence_backward_gates(self, doutputs, dh, dc, workspace, *, input_grad=True, prefer_gates=False,
                                state_grads=True):
        """The contract's: dgates for a one-step call without mask or dropout (``_gives_gates``,
        any number of rows with ``prefer_gates``: ``_may_give_gates``), the one-step kernel's or
        the general path's with its weight-gradient products skipped; else ``sequence_backward``.
        Without ``state_grads`` the extension skips the last step's product with the recurrent
        kernel (it reaches only dh0; a one-step call's only one)."""
        overrides = _kernel_overrides.current()
        gates = (_may_give_gates if prefer_gates else _gives_gates)(workspace, overrides)
        return self._backward(doutputs, dh, dc, workspace, input_grad, weight_grads=not gates,
                              state_grads=state_grads)

    def gives_gates(self, workspace) -> bool:
        return _gives_gates(workspace, _kernel_overrides.current())

    def takes_gates_weight_gradients(self, rows, inputs, units, dtype) -> bool:
        if _cython_lstm is None or np.dtype(dtype) != np.float32:   # a dtype, a scalar type or its name
            return False
        _select_kernels(_kernel_overrides.current())
        return _cython_lstm.gates_weight_gradients_take(rows, inputs, units)

    def gates_weight_gradients(self, dgates, inputs, states, *, transposed=True):
        """The contract's, on the packed AVX-512 kernel (``_cython_lstm.gates_weight_gradients``:
        transposed, dgates read transposed in place and the 4H rows of the results shared by the
        threads; else the backward's own weight-gradient products, the 4H columns shared), where
        it takes the call: float32, the avx512 kernels selected, I and H multiples of 32; else None.
        On a Zen 5 (2 threads) 2.0-2.4x faster than torch.mm (MKL's AVX2 code on that CPU) from 32
        rows, 1.2-1.5x from 2 (docs/cython.md, "Cell-loop weight gradients")."""
        rows, inputs_width, units = dgates.shape[0], inputs.shape[1], states.shape[1]
        if (inputs.dtype != dgates.dtype or states.dtype != dgates.dtype
                or not self.takes_gates_weight_gradients(rows, inputs_width, units, dgates.dtype)):
            return None
        flops = 2 * rows * dgates.shape[1] * (inputs_width + units)
        count = 1
        if flops >= GATES_WEIGHT_GRADIENTS_MIN_FLOPS_TO_THREAD and not self._split_governor.holding_back():
            count = _kernel_threads()
        gate_columns = dgates.shape[1]
        dinput_weights = np.empty((gate_columns, inputs_width) if transposed else (inputs_width, gate_columns),
                                  np.float32)
        dstate_weights = np.empty((gate_columns, units) if transposed else (units, gate_columns), np.float32)
        _cython_lstm.gates_weight_gradients(np.ascontiguousarray(dgates), np.ascontiguousarray(inputs),
                                            np.ascontiguousarray(states), dinput_weights, dstate_weights, count,
                                            transposed, self._buffers)
        return dinput_weights, dstate_weights

    def _backward(self, doutputs, dh, dc, workspace, input_grad: bool, weight_grads: bool,
                  state_grads: bool = True):
        """sequence_backward; without ``weight_grads`` (a workspace ``_gives_gates`` holds for)
        sequence_backward_gates' dgates in place of the weight gradients; without
        ``state_grads`` dh0 and dc0 None (sequence_backward_gates')."""
        ws, options = workspace, workspace.options
        # The backward overwrites the gates with their gradients: one backward per workspace.
        ws.consume(self.name)
        overrides = _kernel_overrides.current()
        _select_kernels(overrides)
        dtype = ws.gates.dtype
        batch, steps, features = ws.input_shape
        units = ws.recurrent_kernel.shape[1 if ws.weights_transposed else 0]
        doutputs = np.ascontiguousarray(doutputs, dtype=dtype)
        if _takes_one_step_backward(ws, overrides):
            return self._one_step_backward(doutputs, dh, dc, ws, input_grad, weight_grads, state_grads)
        dx = np.zeros((batch, steps, features), dtype) if input_grad else None
        dh0 = dc0 = None
        if state_grads:
            dh0, dc0 = np.empty((batch, units), dtype), np.empty((batch, units), dtype)
        dkernel = drecurrent_kernel = dbias = None
        if weight_grads:
            dkernel = np.empty((features, 4 * units), dtype)
            drecurrent_kernel = np.empty((units, 4 * units), dtype)
            dbias = np.empty(4 * units, dtype)
        layout = ws.layout
        packed_x = self._buffers.take((layout.rows, features), dtype)
        # The forward's unit split, unless it has been losing since (the workspace is
        # the same either way).
        split_units, threads = ws.split_units, max(ws.threads if ws.split_units else 1, ws.thread_budget)
        chooser_key = None
        busy = ws.busy
        # On a busy machine (the forward's verdict) the products after the loop run their
        # shares one after another too: threads parted at the loop's end would each wait
        # for the slowest.
        run_threads = 1 if ws.run_one_thread or busy else 0
        if split_units and overrides.cython_split_units is None:
            chooser_key = ("backward", batch, features, units, dtype.char, _length_class(steps),
                           overrides.cython_isa)
            busy = not self._split_governor.allow()
            if busy or not self._split_chooser.choose(chooser_key):
                split_units, run_threads = False, 1
        # One part on one thread's time loop: the other threads take the weight gradients
        # and dx of the finished rows meanwhile (the extension's pipelined backward), unless
        # the split has been losing to another process, which would hold those threads too.
        pipeline = not split_units and not busy and overrides.cython_pipeline is not False
        start, start_cpu = time.perf_counter(), time.thread_time()
        with _threads_for(layout):
            barrier_stats = _specialization(_cython_lstm.backward, dtype)(
                doutputs_sequence=doutputs if options.return_sequences else None,
                doutputs_last=None if options.return_sequences else doutputs,
                dh=_contiguous(dh, dtype), dc=_contiguous(dc, dtype), x=ws.x, kernel=ws.kernel,
                recurrent_kernel=ws.recurrent_kernel, mask=layout.mask,
                input_dropout_mask=ws.input_dropout_mask, recurrent_dropout_mask=ws.recurrent_dropout_mask,
                order=layout.order, row_begin=layout.row_begin, active=layout.active, offsets=layout.offsets,
                act=_cython_lstm.ACTIVATION_KINDS[options.activation],
                ract=_cython_lstm.ACTIVATION_KINDS[options.recurrent_activation],
                reverse=options.reverse, zero_output_for_mask=options.zero_output_for_mask,
                gates=ws.gates, c_prev_all=ws.c_prev, h_in_all=ws.h_in,
                dx=dx, dh0=dh0, dc0=dc0, dkernel=dkernel, drecurrent_kernel=drecurrent_kernel, dbias=dbias,
                packed_x=packed_x,
                # Every thread of the budget shares the weight-gradient GEMMs, also when the
                # batch is one part.
                threads=threads, split_units=split_units, run_threads=run_threads,
                buffer_cache=self._buffers, weights_transposed=ws.weights_transposed,
                pipeline=pipeline)
        # (The extension pipelines one part only; whole parts report their end's barrier.)
        parts = len(layout.row_begin) - 1
        self._record_call(start, start_cpu, barrier_stats, pipeline and parts == 1, split_units or parts > 1,
                          chooser_key, steps, split_units)
        # The consumed workspace and the scratch serve later calls; the workspace lets go of them.
        # Without weight gradients the gates hold dz [B, 4H] (one step, packed row r = batch
        # row r): the result, no longer scratch.
        dgates = None if weight_grads else ws.gates
        self._buffers.give(packed_x, ws.c_prev, ws.h_in, *((ws.gates,) if weight_grads else ()))
        ws.gates = ws.c_prev = ws.h_in = None
        return SequenceGrads(dx=dx, dh0=dh0, dc0=dc0, dkernel=dkernel,
                             drecurrent_kernel=drecurrent_kernel, dbias=dbias, dgates=dgates)

    def _one_step_backward(self, doutputs, dh, dc, ws, input_grad, weight_grads=True, state_grads=True):
        """sequence_backward of a one-step workspace of one part on one thread without mask or
        dropout (``_one_step``'s, or the general forward's for such a call): the extension's
        ``step_backward``, bitwise what ``backward`` computes for it, without its setup (a
        batch-1 step at (I, H) = (64, 128): 48 us through ``backward``). Without
        ``weight_grads``: sequence_backward_gates' result (dgates, no weight gradients); without
        ``state_grads`` no dh0 product, and dh0, dc0 None (dc0's rows are the kernel's scratch).

        doutputs: [B, 1, H] or [B, H]; dh, dc: [B, H]; ws: the consumed workspace."""
        options, dtype = ws.options, ws.gates.dtype
        batch, _, features = ws.input_shape
        units = ws.recurrent_kernel.shape[1 if ws.weights_transposed else 0]
        dx = np.empty((batch, 1, features), dtype) if input_grad else None
        dh0 = np.empty((batch, units), dtype) if state_grads else None
        dc0 = np.empty((batch, units), dtype)
        dkernel = drecurrent_kernel = dbias = None
        if weight_grads:
            dkernel = np.empty((features, 4 * units), dtype)
            drecurrent_kernel = np.empty((units, 4 * units), dtype)
            dbias = np.empty(4 * units, dtype)
        with _blas_guard(dtype, batch, features, units, backward=weight_grads):
            _specialization(_cython_lstm.step_backward, dtype)(
                doutputs.reshape(batch, units), _contiguous(dh, dtype), _contiguous(dc, dtype),
                ws.x.reshape(batch, features), ws.kernel, ws.recurrent_kernel, ws.gates, ws.c_prev, ws.h_in,
                None if dx is None else dx.reshape(batch, features), dh0, dc0, dkernel, drecurrent_kernel, dbias,
                _cython_lstm.ACTIVATION_KINDS[options.activation],
                _cython_lstm.ACTIVATION_KINDS[options.recurrent_activation], ws.weights_transposed)
        # The gates now hold dz: without weight gradients they are the result, no longer scratch.
        dgates = None if weight_grads else ws.gates
        self._buffers.give(ws.c_prev, ws.h_in, *((ws.gates,) if weight_grads else ()))
        ws.gates = ws.c_prev = ws.h_in = None
        return SequenceGrads(dx=dx, dh0=dh0, dc0=dc0 if state_grads else None, dkernel=dkernel,
                             drecurrent_kernel=drecurrent_kernel, dbias=dbias, dgates=dgates)


backend = CythonBackend()
