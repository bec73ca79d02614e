"""lstmeng._runtime.threads: the thread count lstmeng's kernels use and the BLAS limits, on threadpoolctl."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import lstmeng as le
from lstmeng._runtime import threads

from _backends import AVAILABLE


def _blas_counts():
    return [library.get_num_threads() for library in threads.blas_libraries()]


@pytest.fixture
def no_blas(monkeypatch):
    """threadpoolctl reporting no BLAS (MKL or OpenBLAS it cannot read, a sandbox without /proc, ...)."""
    monkeypatch.setattr(threads, "_libraries", lambda user_api: ())
    monkeypatch.setattr(threads, "_knobs", lambda: ())
    yield


@pytest.fixture
def forget_quota():
    threads.cpu_quota.cache_clear()
    yield
    threads.cpu_quota.cache_clear()


# -- thread count ---------------------------------------------------------------------------------------------
def test_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.thread_count() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5,2")   # nested levels: the outermost counts
    assert threads.thread_count() == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    unset = threads.thread_count()
    assert 1 <= unset <= threads.usable_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "zero")  # invalid: ignored, as if unset
    assert threads.thread_count() == unset


def test_openmp_limit_is_honoured(monkeypatch):
    """``threadpool_limits(1)`` around a call limits lstmeng's kernels as it limits scikit-learn's."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if not threads._libraries("openmp"):
        pytest.skip("no OpenMP runtime loaded (the cython extension was built without OpenMP)")
    before = threads.thread_count()
    with threadpool_limits(limits=1, user_api="openmp"):
        assert threads.thread_count() == 1
    assert threads.thread_count() == before   # the limit ends with the block


@pytest.mark.parametrize("content, expected", [("max 100000\n", None), ("150000 100000\n", 1.5),
                                                ("50000 100000", 0.5), ("garbage", None)])
def test_cpu_quota_cgroup_v2(tmp_path, forget_quota, content, expected):
    (tmp_path / "cpu.max").write_text(content)
    assert threads.cpu_quota(str(tmp_path)) == expected


def test_cpu_quota_cgroup_v1(tmp_path, forget_quota):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cpu_quota(str(tmp_path)) == 2.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")   # unlimited
    threads.cpu_quota.cache_clear()
    assert threads.cpu_quota(str(tmp_path)) is None


def test_usable_cores_cut_to_the_quota(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(threads, "cpu_quota", lambda: 2.5)
    assert threads.usable_cores() == 3
    monkeypatch.setattr(threads, "cpu_quota", lambda: 0.2)
    assert threads.usable_cores() == 1
    monkeypatch.setattr(threads, "cpu_quota", lambda: None)
    assert threads.usable_cores() == 16


# -- BLAS limits ----------------------------------------------------------------------------------------------
def _require_blas():
    if not threads.blas_controllable():
        pytest.skip("threadpoolctl finds no BLAS here")


def test_blas_limits_set_and_restore():
    _require_blas()
    before = _blas_counts()
    with threads.blas_limits(1):
        assert _blas_counts() == [1] * len(before)
        with threads.single_threaded_blas():
            assert _blas_counts() == [1] * len(before)
    assert _blas_counts() == before
    with threads.blas_limits(None):
        assert _blas_counts() == before
    with pytest.raises(ValueError, match="count"):
        threads.blas_limits(0)


def test_kernel_inside_a_run_limit_restores_the_run_limit():
    """A kernel's single-threaded block inside a ``blas_limits(2)`` run leaves 2, not what it found first."""
    _require_blas()
    before = _blas_counts()
    with threads.blas_limits(2):
        with threads.single_threaded_blas():
            assert _blas_counts() == [1] * len(before)
        assert _blas_counts() == [2] * len(before)
    assert _blas_counts() == before


def test_run_limit_ending_while_a_kernel_holds_one_thread():
    """A run ending while a kernel on another Python thread still holds BLAS at one thread: BLAS
    stays at one until the kernel leaves, then returns to what the run found (not the run's count)."""
    _require_blas()
    before = _blas_counts()
    kernel_entered, kernel_may_leave = threading.Event(), threading.Event()
    seen = {}

    def kernel():
        with threads.single_threaded_blas():
            kernel_entered.set()
            kernel_may_leave.wait(10)
            seen["while_kernel"] = _blas_counts()

    with threads.blas_limits(2):
        worker = threading.Thread(target=kernel)
        worker.start()
        kernel_entered.wait(10)
    kernel_may_leave.set()
    worker.join(10)
    assert seen["while_kernel"] == [1] * len(before)
    assert _blas_counts() == before


def test_overlapping_kernels_on_threads_restore_the_counts():
    """Kernels entering and leaving on several Python threads in any order leave the counts as they were."""
    _require_blas()
    before = _blas_counts()

    def kernel(pause):
        for _ in range(20):
            with threads.single_threaded_blas():
                assert _blas_counts() == [1] * len(before)
                time.sleep(pause)

    workers = [threading.Thread(target=kernel, args=(pause,)) for pause in (0.0, 0.001, 0.002)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert _blas_counts() == before


def test_run_limits_on_two_threads_restore_in_order():
    """Two runs limiting BLAS from two Python threads: the second waits for the first, so neither
    restores a count over the other's."""
    _require_blas()
    before = _blas_counts()
    entered = threading.Event()

    def first():
        with threads.blas_limits(1):
            entered.set()
            time.sleep(0.05)

    def second():
        entered.wait(10)
        with threads.blas_limits(2):
            time.sleep(0.05)

    workers = [threading.Thread(target=first), threading.Thread(target=second)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert _blas_counts() == before


# -- without a controllable BLAS ------------------------------------------------------------------------------
def test_no_blas_means_no_change(no_blas):
    """Where threadpoolctl finds no BLAS, the blocks set nothing (the libraries the test process
    really loaded keep their counts) and say so through blas_controllable()."""
    assert not threads.blas_controllable()
    real = [library.get_num_threads() for library in threads.ThreadpoolController().select(user_api="blas")
            .lib_controllers]
    with threads.single_threaded_blas(), threads.blas_limits(1):
        assert [library.get_num_threads() for library in threads.ThreadpoolController().select(user_api="blas")
                .lib_controllers] == real


@pytest.mark.skipif("cython" not in AVAILABLE, reason="the cython backend is not built")
def test_cython_without_controllable_blas_runs_one_thread_and_says_so(no_blas):
    """The kernels cannot keep BLAS off their threads, so they run one: probe() (and so
    ``lstmeng info`` and ``list_backends``) report 1 thread and why, and results are unchanged."""
    from lstmeng.backends import cython as cython_module

    assert cython_module._kernel_threads() == 1
    assert "1 threads: no BLAS whose threads threadpoolctl can set" in cython_module.CythonBackend().probe()
    x = np.random.default_rng(0).normal(size=(8, 6, 5)).astype(np.float32)
    layer = le.LSTM(7, return_sequences=True, backend="cython", seed=1)
    reference = le.LSTM(7, return_sequences=True, backend="numpy", seed=1)
    np.testing.assert_allclose(layer(x), reference(x), rtol=2e-5, atol=2e-5)


@pytest.mark.skipif("cython" not in AVAILABLE, reason="the cython backend is not built")
def test_cython_probe_reports_the_threads_it_uses(monkeypatch):
    from lstmeng.backends import cython as cython_module

    if not threads.blas_controllable() or not cython_module._cython_lstm.HAVE_OPENMP:
        pytest.skip("the kernels run one thread here anyway")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert "(3 threads, " in cython_module.CythonBackend().probe()
