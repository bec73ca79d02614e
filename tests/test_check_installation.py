"""tools/check_installation.py: every module of the source tree is in the install (issue 13, item 8)."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("check_installation",
                                              os.path.join(ROOT, "tools", "check_installation.py"))
check_installation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_installation)


def test_missing_modules_and_extensions_are_named(tmp_path):
    for name in ("lstmeng/__init__.py", "lstmeng/meson.build", "lstmeng/sub/__init__.py", "lstmeng/sub/new.py",
                 "lstmeng/sub/__pycache__/new.cpython-311.pyc", "lstmeng/data.json", "ext/_kernels.pyx"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    expected, extensions = check_installation.source_files(str(tmp_path))
    assert expected == {"lstmeng/__init__.py", "lstmeng/sub/__init__.py", "lstmeng/sub/new.py", "lstmeng/data.json"}
    assert extensions == {"_kernels"}
    installed = {"lstmeng/__init__.py", "lstmeng/sub/__init__.py", "lstmeng/backends/_kernels.cpython-311.so"}
    assert check_installation.missing_files(expected, extensions, installed, ".cpython-311.so") == [
        "lstmeng/data.json", "lstmeng/sub/new.py"]
    without_extension = expected  # every file, no compiled module
    assert check_installation.missing_files(expected, extensions, without_extension, ".cpython-311.so") == [
        "lstmeng/**/_kernels.cpython-311.so (the compiled ext/_kernels.pyx)"]
    assert check_installation.missing_files(expected, extensions, expected | installed, ".cpython-311.so") == []


def test_the_editable_install_plan_holds_the_source_tree(capsys):
    try:
        check_installation.find_build_dir()
    except check_installation.CannotInspect as error:
        pytest.skip(str(error))
    assert check_installation.main([]) == 0, capsys.readouterr().err
