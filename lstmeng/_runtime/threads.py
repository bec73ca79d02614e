"""Thread pools and CPU facts: the one place lstmeng reads and sets thread counts.

Everything that runs threads asks here: the cython kernels (their OpenMP team
and the BLAS they call from each thread), the initializers (one BLAS thread for
a QR), ``lstmeng bench`` and ``lstmeng demo`` (BLAS limited for a run), and
``lstmeng info`` (which only reports).

BLAS and OpenMP runtimes are found and controlled through threadpoolctl, the
library scikit-learn relies on: it knows OpenBLAS (every symbol naming scheme),
MKL and BLIS on Linux, macOS and Windows, where the hand-written
``/proc/self/maps`` + ctypes code this replaces knew only OpenBLAS on Linux.

Thread count (``thread_count()``): ``OMP_NUM_THREADS`` if set; otherwise the
CPUs this process may use (its affinity mask, cut to its cgroup CPU quota in a
container), and never more than the OpenMP runtime's ``omp_get_max_threads()``
once one is loaded, so that ``threadpoolctl.threadpool_limits(n)`` around a call
limits lstmeng as it limits scikit-learn.

BLAS limits are process-wide (one count per library), so every change goes
through one lock and one reference count: ``single_threaded_blas()`` (held while
a multi-threaded kernel calls BLAS from each of its threads) and
``blas_limits(n)`` (a whole run) nest and overlap across Python threads and
always leave the counts the first entrant found.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import threading

from threadpoolctl import ThreadpoolController


# -- CPU ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 7B13"), from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@functools.lru_cache(maxsize=None)
def cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs' worth of time the process's cgroup may use (``2.5`` for "250000 100000"), or None if unlimited.

    Containers cut CPU time with a quota rather than an affinity mask, so
    ``os.cpu_count()`` and the mask both overstate what a thread pool can use.
    Reads cgroup v2 (``cpu.max``), then v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); read
    once (two file reads would cost every kernel call tens of microseconds), ``refresh()`` forgets it.
    """
    try:
        with open(os.path.join(root, "cpu.max")) as cpu_max:
            quota, period = cpu_max.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as quota_file, \
                open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as period_file:
            quota, period = int(quota_file.read()), int(period_file.read())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, cut to its cgroup CPU quota (rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _environment_threads() -> int | None:
    """``OMP_NUM_THREADS``'s first (outermost) level as a positive int, or None when unset or invalid."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def thread_count() -> int:
    """Threads lstmeng's CPU kernels (and the benchmark's libraries) may use.

    ``OMP_NUM_THREADS`` if set; else the usable cores, no more than the loaded
    OpenMP runtime's ``omp_get_max_threads()`` (which ``threadpool_limits``
    lowers).
    """
    from_environment = _environment_threads()
    if from_environment is not None:
        return from_environment
    count = usable_cores()
    openmp_threads = [threads for threads in (library.get_num_threads() for library in _libraries("openmp")) if threads]
    return max(1, min([count, *openmp_threads]))


# -- thread pools (threadpoolctl) -----------------------------------------------------------------------------
_LOCK = threading.RLock()
#: Held for a whole ``blas_limits`` block: two runs limiting BLAS at once from different Python
#: threads would restore each other's counts out of order (reentrant: blocks nest).
_RUN_LOCK = threading.RLock()


@functools.lru_cache(maxsize=None)
def _controller() -> ThreadpoolController:
    """The controller of every BLAS and OpenMP runtime loaded, built once (building one scans the
    loaded libraries: about a millisecond, too slow for every kernel call).

    SciPy's BLAS (the one ``scipy.linalg.cython_blas`` and the cython kernels
    call) and the cython extension's OpenMP runtime are loaded first so that they
    are in it; ``refresh()`` rebuilds it after other libraries load.
    """
    import scipy.linalg.cython_blas  # noqa: F401  (loads SciPy's BLAS)
    try:
        from lstmeng.backends import _cython_lstm  # noqa: F401  (loads the OpenMP runtime it links)
    except ImportError:
        pass
    return ThreadpoolController()


@functools.lru_cache(maxsize=None)
def _libraries(user_api: str) -> tuple:
    """The cached controller's libraries of one kind ("blas" or "openmp")."""
    return tuple(_controller().select(user_api=user_api).lib_controllers)


def refresh() -> None:
    """Forget the cached controller and CPU quota (libraries loaded since are found on the next use)."""
    with _LOCK:
        _controller.cache_clear()
        _libraries.cache_clear()
        _knobs.cache_clear()
        cpu_quota.cache_clear()


def blas_libraries() -> list:
    """threadpoolctl's controllers of every BLAS loaded (OpenBLAS, MKL, BLIS, ...); [] when it finds none."""
    return list(_libraries("blas"))


def blas_controllable() -> bool:
    """Whether lstmeng can set BLAS's thread count (threadpoolctl finds at least one BLAS)."""
    return bool(blas_libraries())


def blas_report() -> list[dict]:
    """Each BLAS and OpenMP runtime loaded now, as threadpoolctl describes it (for ``lstmeng info``)."""
    return ThreadpoolController().info()


class _Knob:
    """One BLAS library's thread count, read and set from whichever Python thread holds ``_LOCK``.

    threadpoolctl (3.6 on) lets only one Python thread, the first to set it,
    change a process-wide OpenBLAS pool and silently ignores the others; the
    kernels run on any Python thread and ``_LOCK`` already serialises every
    change. For an OpenBLAS with its own threads (not OpenMP's) the knob holds
    OpenBLAS's own get/set functions as threadpoolctl found them (through its
    private ``_get_symbol``, hence the fallback): a kernel call reads and sets
    them four times, and threadpoolctl's methods look the symbol up on every
    call (a few microseconds per kernel call at batch 1). Any other library
    goes through threadpoolctl's methods, taking and giving back control.
    """

    __slots__ = ("library", "get", "set")

    def __init__(self, library):
        self.library = library
        get = set_ = None
        if (getattr(library, "internal_api", None) == "openblas" and getattr(library, "threading_layer", None)
                != "openmp" and hasattr(library, "_get_symbol")):
            get = library._get_symbol("openblas_get_num_threads")
            set_ = library._get_symbol("openblas_set_num_threads")
        if get is None or set_ is None:
            get, set_ = library.get_num_threads, self._set_through_threadpoolctl
        self.get, self.set = get, set_

    def _set_through_threadpoolctl(self, count: int) -> None:
        release = getattr(self.library, "clear_controlling_thread", None)
        if release is not None:
            release(force=True)
        self.library.set_num_threads(count)
        if release is not None:
            release()


@functools.lru_cache(maxsize=None)
def _knobs() -> tuple:
    """A ``_Knob`` for every BLAS of the cached controller (cleared by ``refresh()``)."""
    return tuple(_Knob(library) for library in _libraries("blas"))


class _BlasLimits:
    """The process-wide BLAS thread counts, changed only through one lock.

    ``_outside`` holds what each library should be set to when no kernel holds
    the single-threaded limit: while one does (``_single_users > 0``), a
    ``blas_limits`` block entered or left only updates ``_outside``, which the
    last kernel out applies. So no block restores a count over another's.
    """

    def __init__(self):
        self._single_users = 0
        self._outside: list[tuple] = []   # [(knob, count)]

    @staticmethod
    def _counts(knobs) -> list[tuple]:
        return [(knob, knob.get()) for knob in knobs]

    @staticmethod
    def _apply(counts) -> None:
        for knob, threads in counts:
            knob.set(threads)

    # single_threaded_blas()'s block, written as __enter__/__exit__ rather than a generator:
    # it wraps every kernel call, and a @contextmanager costs a few microseconds more.
    def __enter__(self):
        knobs = _knobs()
        with _LOCK:
            if self._single_users == 0:
                self._outside = self._counts(knobs)
                for knob in knobs:
                    knob.set(1)
            self._single_users += 1
        return self

    def __exit__(self, *exc_info):
        with _LOCK:
            self._single_users -= 1
            if self._single_users == 0:
                self._apply(self._outside)
        return False

    @contextlib.contextmanager
    def limits(self, count: int):
        with _RUN_LOCK:
            yield from self._limits(count)

    def _limits(self, count: int):
        knobs = _knobs()
        with _LOCK:
            previous = list(self._outside) if self._single_users else self._counts(knobs)
            wanted = [(knob, count) for knob, _ in previous]
            if self._single_users:
                self._outside = wanted
            else:
                self._apply(wanted)
        try:
            yield
        finally:
            with _LOCK:
                if self._single_users:
                    self._outside = previous
                else:
                    self._apply(previous)


_BLAS = _BlasLimits()


def single_threaded_blas():
    """Context manager: BLAS runs on one thread inside (reference-counted across Python threads).

    A kernel that splits its work over its own threads and calls BLAS from
    each holds this, so BLAS does not start a pool under each of them. The
    counts are process-wide: BLAS calls made elsewhere meanwhile run on one
    thread too (slower, still correct). Does nothing where no BLAS is found.
    """
    return _BLAS


def blas_limits(count: int | None):
    """Context manager: every BLAS limited to ``count`` threads inside (None: left as it is).

    For whole runs (``lstmeng bench``, ``lstmeng demo``); overlaps correctly
    with ``single_threaded_blas()`` and with blocks in other Python threads.
    """
    if count is None:
        return contextlib.nullcontext()
    if count < 1:
        raise ValueError(f"count must be a positive thread count or None, got {count!r}")
    return _BLAS.limits(int(count))
