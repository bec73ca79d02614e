"""The `lstmeng` command: info, demo and bench end to end at tiny settings, their error paths,
and the demo's NumPy parts (dense head, embedding, losses, Adam, data) against independent references."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import lstmeng as le
from lstmeng.backends import registry
from lstmeng.cli import bench, demo
from lstmeng.cli import commands as cli

from _backends import numerical_gradient

TINY_SHAPES = "2,3,4,5;3,4,2,3"


def available_backends():
    return [row.name for row in le.list_backends() if row.available]


def run_main(capsys, *argv):
    """main(argv) in this process -> (exit status, stdout, stderr)."""
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status, err, *fragments):
    assert status == cli.USAGE_ERROR
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


class _BrokenEntryPoint:
    """An entry-point plugin whose import fails, as a third-party backend with a missing library would."""

    name = "broken_plugin"

    def load(self):
        raise ImportError("libbroken.so: cannot open shared object file")


@pytest.fixture
def broken_plugin(monkeypatch):
    registry.refresh()
    monkeypatch.setattr(registry, "_plugins", {"broken_plugin": _BrokenEntryPoint()})
    yield "broken_plugin"
    registry.refresh()


# -- info -----------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:lstmeng backend plugin")
def test_info_names_every_backend_with_its_state(capsys, tmp_path, broken_plugin):
    path = tmp_path / "info.json"
    status, out, _ = run_main(capsys, "info", "--json", str(path))
    assert status == 0
    report = json.loads(path.read_text())
    rows = {row.name: row for row in le.list_backends()}
    assert [entry["name"] for entry in report["backends"]] == list(rows)
    for name, row in rows.items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert ("unavailable" if not row.available else "available") in line
        assert (row.reason if not row.available else row.device) in line
    assert "libbroken.so" in out  # the failing plugin's reason is shown
    assert report["lstmeng"] == le.__version__
    assert report["cpu"]["logical_cores"] == os.cpu_count()
    for library in ("numpy", "scipy"):
        assert report["libraries"][library] == importlib.metadata.version(library)
    assert "OMP_NUM_THREADS" in out


# -- bench ----------------------------------------------------------------------------------------------------
def test_parse_shapes():
    assert bench.parse_shapes("64,100,256,256; 1x500x64x128;") == [
        bench.Shape(64, 100, 256, 256), bench.Shape(1, 500, 64, 128)]
    assert len(bench.parse_shapes(bench.DEFAULT_SHAPES)) == 4
    for bad in ("1,2,3", "1,2,3,0", "a,b,c,d", "1,2,3,4,5", ";", "1.5,2,3,4"):
        with pytest.raises(bench.BenchError, match="B,T,I,H|no shape"):
            bench.parse_shapes(bad)


def test_flop_counts_follow_the_issue_definition():
    shape = bench.Shape(64, 100, 256, 256)
    assert shape.flops("infer") == 8 * 64 * 100 * 256 * (256 + 256)
    assert shape.flops("train") == 3 * shape.flops("infer")


def test_bench_tiny_table_lists_every_available_backend_and_peers(capsys, tmp_path):
    path = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    status, out, _ = run_main(capsys, "bench", "--shapes", TINY_SHAPES, "--repeats", "1", "--peak-size", "64",
                              "--against", "torch,keras", "--json", str(path), "--plot", str(plot), "--quiet")
    assert status == 0
    report = json.loads(path.read_text())
    names = available_backends()
    expected_peers = [peer for peer in bench.PEERS if bench.peer_missing_reason(peer) is None]
    table_rows = [line.split() for line in out.splitlines()
                  if line[:1].isdigit() and len(line.split()) >= 6]
    for shape in bench.parse_shapes(TINY_SHAPES):
        for mode in bench.MODES:
            listed = {row[2] for row in table_rows if row[0] == str(shape) and row[1] == mode}
            assert listed == set(names) | set(expected_peers), (shape, mode, listed)
    results = report["results"]
    assert len(results) == len(bench.parse_shapes(TINY_SHAPES)) * 2 * (len(names) + len(expected_peers))
    by_key = {(r["name"], tuple(r["shape"].values()), r["mode"]): r for r in results}
    for result in results:
        shape = result["shape"]
        forward_flops = 8 * shape["batch"] * shape["steps"] * shape["units"] * (shape["inputs"] + shape["units"])
        flops = forward_flops * (3 if result["mode"] == "train" else 1)
        assert result["gflops"] == pytest.approx(flops / (result["ms"] / 1e3) / 1e9, rel=1e-9)
        assert result["peak_fraction"] == pytest.approx(result["gflops"] / report["sgemm_peak_gflops"], rel=1e-9)
        for peer in expected_peers:
            peer_ms = by_key[(peer, tuple(shape.values()), result["mode"])]["ms"]
            assert result["speedup_vs"][peer] == pytest.approx(peer_ms / result["ms"], rel=1e-9)
    unavailable = [row.name for row in le.list_backends() if not row.available]
    assert sorted(report["skipped"]) == sorted(unavailable)
    assert report["failed"] == []
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.filterwarnings("ignore:lstmeng backend plugin")
def test_bench_lists_unavailable_backend_and_missing_peer_as_skipped(capsys, monkeypatch, broken_plugin):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "torch" else real_find_spec(name, *args))
    status, out, _ = run_main(capsys, "bench", "--backends", "numpy,broken_plugin", "--against", "torch",
                              "--shapes", "2,3,4,5", "--repeats", "1", "--peak-size", "32", "--quiet")
    assert status == 0
    skipped = out.split("skipped:")[1]
    assert "broken_plugin: backend unavailable: ImportError: libbroken.so" in skipped
    assert "torch: torch not installed" in skipped
    assert any(line.split()[2:3] == ["numpy"] for line in out.splitlines() if line.startswith("2,3,4,5"))


@pytest.mark.parametrize("argv, fragments", [
    (["--backends", "no_such_backend"], ["unknown backend 'no_such_backend'", "numpy"]),
    (["--shapes", "64,100,256"], ["bad shape '64,100,256'", "B,T,I,H"]),
    (["--against", "jax"], ["unknown peer 'jax'"]),
    (["--repeats", "0"], ["--repeats must be >= 1"]),
])
def test_bench_user_errors_are_one_line(capsys, argv, fragments):
    status, _, err = run_main(capsys, "bench", "--shapes", "2,3,4,5", "--peak-size", "16", "--quiet", *argv)
    assert_one_line_error(status, err, *fragments)


def test_missing_matplotlib_is_one_line_error(capsys, monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "matplotlib" else real_find_spec(name, *args))
    for command in (["bench", "--shapes", "2,3,4,5", "--against", "none"], ["demo", "--epochs", "1"]):
        status, _, err = run_main(capsys, *command, "--plot", str(tmp_path / "x.png"))
        assert_one_line_error(status, err, "matplotlib", "pip install")


def test_python_dash_m_runs_bench_and_reports_errors(tmp_path):
    path = tmp_path / "bench.json"
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "lstmeng", "bench", "--backends", "numpy", "--against", "none", "--shapes", "2,3,4,5",
         "--repeats", "1", "--peak-size", "32", "--json", str(path), "--quiet"],
        capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(path.read_text())
    assert {r["name"] for r in report["results"]} == {"numpy"}
    assert report["machine"]["threads"] == 1
    assert "numpy" in done.stdout

    failed = subprocess.run([sys.executable, "-m", "lstmeng", "bench", "--shapes", "64,100,256"],
                            capture_output=True, text=True, env=environment, timeout=600)
    assert failed.returncode == cli.USAGE_ERROR
    assert "Traceback" not in failed.stderr
    assert "bad shape '64,100,256'" in failed.stderr


# -- demo: command line ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", demo.TASKS)
def test_demo_tiny_run_prints_summary_and_plot(capsys, tmp_path, task):
    plot = tmp_path / "loss.png"
    status, out, _ = run_main(capsys, "demo", "--task", task, "--backend", "numpy", "--epochs", "1",
                              "--train-size", "48", "--no-progress", "--plot", str(plot))
    assert status == 0
    assert f"task: {task}" in out and "backend: numpy" in out
    assert "sequences/s" in out and "baseline" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_progress_bar_shows_loss_and_throughput(capsys):
    status, _, err = run_main(capsys, "demo", "--backend", "numpy", "--epochs", "1", "--train-size", "32")
    assert status == 0
    assert "epoch 1/1" in err and "loss=" in err and "seq_per_s=" in err


def test_demo_auto_reports_the_backend_that_ran(capsys):
    status, out, _ = run_main(capsys, "demo", "--epochs", "1", "--train-size", "32", "--no-progress")
    assert status == 0
    preferred = next(name for name in registry.HOST_PREFERENCE if name in available_backends())
    assert f"backend: {preferred}" in out


def test_demo_exits_nonzero_with_clear_message_on_nan_loss(capsys, monkeypatch):
    spec = demo.TASK_SPECS["adding"]

    def poisoned(count, rng):
        data = demo.make_adding(count, rng)
        data.inputs[0, 0, 0] = np.nan  # one bad value makes that batch's loss NaN
        return data

    monkeypatch.setitem(demo.TASK_SPECS, "adding", demo.dataclasses.replace(spec, make=poisoned))
    status, _, err = run_main(capsys, "demo", "--backend", "numpy", "--epochs", "1", "--train-size", "32",
                              "--no-progress")
    assert status == cli.DIVERGED
    assert "training diverged: the loss is nan" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, fragments", [
    (["--backend", "no_such_backend"], ["unknown backend 'no_such_backend'", "available backends"]),
    (["--epochs", "0"], ["--epochs must be >= 1"]),
])
def test_demo_user_errors_are_one_line(capsys, argv, fragments):
    status, _, err = run_main(capsys, "demo", *argv)
    assert_one_line_error(status, err, *fragments)


def test_argparse_mistakes_exit_2(capsys):
    assert cli.main(["demo", "--task", "translation"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main([]) == 2


# -- demo: its losses against independent references ---------------------------------------------------------
@pytest.mark.parametrize("task_name", demo.TASKS)
def test_losses_match_their_formulas_and_finite_differences(task_name):
    rng = np.random.default_rng(2)
    task = demo.TASK_SPECS[task_name]
    outputs = rng.standard_normal((7, 1)) * 3
    targets = (rng.random((7, 1)) < 0.5).astype(np.float64)
    loss, gradient = demo.loss_and_gradient(task, outputs, targets)
    if task_name == "adding":
        expected = np.mean((outputs - targets) ** 2)
    else:
        probability = 1 / (1 + np.exp(-outputs))
        expected = -np.mean(targets * np.log(probability) + (1 - targets) * np.log(1 - probability))
    assert loss == pytest.approx(expected, rel=1e-10)
    np.testing.assert_allclose(
        gradient, numerical_gradient(lambda: demo.loss_and_gradient(task, outputs, targets)[0], outputs),
        rtol=1e-5, atol=1e-9)


def test_adding_data_follows_the_problem_definition():
    rng = np.random.default_rng(3)
    data = demo.make_adding(2000, rng, min_length=10, max_length=20)
    lengths = data.mask.sum(axis=1)
    assert lengths.min() >= 10 and lengths.max() <= 20
    assert np.array_equal(data.mask, np.arange(20)[None, :] < lengths[:, None])  # right padding
    values, markers = data.inputs[..., 0], data.inputs[..., 1]
    assert np.all(values[~data.mask] == 0) and np.all(markers[~data.mask] == 0)
    for row in range(len(data)):
        marked = np.flatnonzero(markers[row])
        assert len(marked) == 2
        half = lengths[row] // 2
        assert marked[0] < half <= marked[1] < lengths[row]
        assert data.targets[row, 0] == pytest.approx(values[row, marked].sum())
    # Predicting the mean scores the variance of a sum of two U(0, 1): 2/12.
    assert np.var(data.targets) == pytest.approx(1 / 6, abs=0.015)


def test_sentiment_labels_follow_the_rule():
    rng = np.random.default_rng(4)
    data = demo.make_sentiment(1500, rng)
    lengths = data.mask.sum(axis=1)
    for row in range(len(data)):
        tokens = data.inputs[row, :lengths[row]]
        assert np.all(data.inputs[row, lengths[row]:] == demo.PAD)
        opinions = [t for t in tokens[:demo.OPENING_WINDOW] if t in (demo.GOOD, demo.BAD)]
        verdicts = [t for t in tokens[-demo.CLOSING_WINDOW:] if t in (demo.INDEED, demo.NOT)]
        assert len(opinions) == 1 and len(verdicts) <= 1
        assert np.sum(np.isin(tokens, [demo.GOOD, demo.BAD, demo.INDEED, demo.NOT])) == 1 + len(verdicts)
        positive = (opinions[0] == demo.GOOD) != (verdicts == [demo.NOT])
        assert data.targets[row, 0] == float(positive)
    # Either end alone is a poor predictor: that is what makes the task need memory.
    opening = np.isin(data.inputs[:, :demo.OPENING_WINDOW], [demo.GOOD]).any(axis=1)
    assert 0.55 < np.mean(opening == (data.targets[:, 0] > 0.5)) < 0.8


# -- the targets (slow, still run in CI) -----------------------------------------------------------------------
@pytest.mark.slow
def test_default_adding_demo_reaches_the_mse_target():
    result = demo.run_demo("adding", progress=False)
    assert result.baseline > 0.14          # predicting the mean is far from the target
    assert result.final < 0.01, result.validation
    assert math.isfinite(result.sequences_per_second)


@pytest.mark.slow
def test_default_sentiment_demo_reaches_the_accuracy_target():
    result = demo.run_demo("sentiment", progress=False)
    assert result.baseline < 0.6
    assert result.final > 0.9, result.validation


def test_library_never_imports_the_cli():
    """Data flows one way: importing the library (every public module) loads nothing of lstmeng.cli."""
    code = ("import sys, lstmeng, lstmeng.layers, lstmeng.cell, lstmeng.bidirectional, lstmeng.sequential, "
            "lstmeng.dropout, lstmeng.serialization, lstmeng.initializers, lstmeng.training, lstmeng.optim, "
            "lstmeng.testing, lstmeng.backends.registry; "
            "lstmeng.list_backends(); "
            "print(sorted(name for name in sys.modules if name.startswith('lstmeng.cli')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
