"""benchmarks/busy_machine.py runs at a tiny size and prints one table row per shape and round
(its numbers are measured on purpose outside the test suite; this keeps the script working)."""

import pathlib
import re
import subprocess
import sys

import pytest

from _backends import AVAILABLE

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "busy_machine.py"


@pytest.mark.skipif("cython" not in AVAILABLE, reason="the cython backend is not built")
def test_busy_machine_prints_a_row_per_shape_and_round():
    completed = subprocess.run([sys.executable, str(SCRIPT), "--calls", "3", "--rounds", "2"],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    rows = re.findall(r"^\| 1,(\d+),64,128 \| (infer|train) \| [\d.]+ / [\d.]+ \| [\d.]+ / [\d.]+ \| [\d.]+x \|$",
                      completed.stdout, flags=re.MULTILINE)
    assert rows == [("64", "infer")] * 2 + [("16", "train")] * 2
