"""The scripts under examples/ run at their --tiny size (as CI runs them) and learn something."""

import importlib.util
import pathlib
import subprocess
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_char_lm_tiny_trains_below_uniform_guessing_and_samples(capsys):
    result = _load("char_lm").main(["--tiny", "--epochs", "3"])
    assert result["loss"][-1] < result["loss"][0]
    assert result["loss"][-1] < result["uniform"]      # better than guessing among the characters
    assert result["sample_length"] == 80
    out = capsys.readouterr().out
    assert "Total parameters" in out and "sample:" in out


def test_classifier_tiny_runs_and_beats_chance(capsys):
    result = _load("classify_variable_length").main(["--tiny", "--epochs", "3"])
    assert len(result["val_accuracy"]) >= 1
    assert result["loss"][-1] < result["loss"][0]
    assert max(result["val_accuracy"]) > 0.55
    assert "validation accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["char_lm.py", "classify_variable_length.py"])
def test_examples_run_as_scripts(script):
    completed = subprocess.run([sys.executable, str(EXAMPLES / script), "--tiny", "--epochs", "1"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr


def test_char_lm_windows_are_shifted_by_one():
    module = _load("char_lm")
    inputs, targets = module.make_windows(np.arange(10), 3)
    assert inputs.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert targets.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
