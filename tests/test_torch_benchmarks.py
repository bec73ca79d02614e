"""The PyTorch comparison scripts under benchmarks/ run at tiny sizes and print their ratio lines
(their numbers are measured on purpose outside the test suite; this keeps the scripts working)."""

import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script, *arguments):
    completed = subprocess.run([sys.executable, str(BENCHMARKS / script), *arguments], capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_torch_short_calls_prints_each_length_and_mode():
    out = _run("torch_short_calls.py", "--steps", "1", "3", "--sizes", "8,16", "--calls", "2", "--repeats", "1")
    lines = re.findall(r"^T=(\d+) (inference|training): torch\.nn\.LSTM [\d.]+ us, lstmeng\.torch\.LSTM [\d.]+ us "
                       r"\([\d.]+x\)$", out, flags=re.MULTILINE)
    assert lines == [("1", "inference"), ("1", "training"), ("3", "inference"), ("3", "training")]


def test_torch_cell_prints_the_three_cells_per_mode():
    out = _run("torch_cell.py", "--sizes", "8,16", "--repeats", "1")
    for mode in ("inference", "training", "online"):
        assert re.search(rf"^I=8, H=16 {mode}: torch\.nn\.LSTMCell [\d.]+ us \(1\.00x\); lstmeng\.torch\.LSTMCell "
                         rf"[\d.]+ us \([\d.]+x\); lstmeng\.LSTMCell [\d.]+ us \([\d.]+x\)$", out, flags=re.MULTILINE)


def test_torch_fit_prints_the_online_row_with_equal_losses():
    out = _run("torch_fit.py", "--shape", "online", "--quick")
    row = re.search(r"^online: B=1 T=500 I=64 H=128 L=2 x8 +[\d.]+ \([\d.]+\) +[\d.]+ \([\d.]+\) +[\d.]+x +"
                    r"([\d.]+), ([\d.]+)$", out, flags=re.MULTILINE)
    assert row is not None, out
    assert abs(float(row.group(1)) - float(row.group(2))) < 1e-4   # the same model trained both ways
