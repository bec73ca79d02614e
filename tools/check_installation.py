#!/usr/bin/env python
"""Check that an install of lstmeng contains every module of the source tree.

The meson.build files list the package's ``.py`` files by hand, so a new
module that is missing there works in an editable checkout (which imports
from the source tree) and is absent from every wheel. This compares the
source tree with what meson installs (SciPy's ``tools/check_installation.py``
is the pattern):

- every ``.py`` file under ``lstmeng/`` (``__pycache__`` and hidden folders
  excepted) must be installed at the same path;
- every Cython extension (``ext/*.pyx``) must be installed as a compiled
  module (``<name><EXT_SUFFIX>``) somewhere under ``lstmeng/``;
- every non-Python file under ``lstmeng/`` other than ``meson.build`` must
  be installed too (package data; there is none today).

What "installed" means, by mode:

- default: meson's install plan of the editable build (``build/cp3XX``, made
  by ``pip install --no-build-isolation -e .``): ``meson-info/intro-installed.json``
  (what ``meson introspect --installed`` prints), read after
  ``ninja build.ninja`` has reconfigured the build if a meson.build changed
  (nothing is compiled: well under a second when up to date);
- ``--wheel``: a wheel built from the tree (``pip wheel --no-build-isolation
  --no-deps``, compiles the extension: minutes) and listed.

Exits 0 when nothing is missing, 1 naming each missing file, 2 when the
install could not be inspected.

Usage::

    python tools/check_installation.py [--build-dir build/cp311] [--wheel]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "lstmeng"
#: Files of the source package that are build instructions, not package contents.
NOT_INSTALLED = {"meson.build"}


class CannotInspect(Exception):
    """The install could not be read (no build folder, a failed build): exit status 2."""


def source_files(root: str = ROOT) -> tuple[set[str], set[str]]:
    """(package files that must be installed, relative to the package's parent, e.g. "lstmeng/cell.py";
    names of the compiled extensions, e.g. "_cython_lstm")."""
    expected = set()
    for folder, subfolders, files in os.walk(os.path.join(root, PACKAGE)):
        subfolders[:] = sorted(name for name in subfolders if name != "__pycache__" and not name.startswith("."))
        for name in files:
            if name in NOT_INSTALLED or name.endswith((".pyc", ".pyo")) or name.startswith("."):
                continue
            expected.add(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    extensions = {os.path.splitext(os.path.basename(path))[0]
                  for path in glob.glob(os.path.join(root, "ext", "*.pyx"))}
    return expected, extensions


def missing_files(expected: set[str], extensions: set[str], installed: set[str],
                  suffix: str | None = None) -> list[str]:
    """What the install lacks: each expected file not installed, and each extension without a
    compiled module under the package (named "<name><EXT_SUFFIX> (the compiled ext/<name>.pyx)")."""
    suffix = suffix or sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    missing = sorted(expected - installed)
    for name in sorted(extensions):
        if not any(path.startswith(PACKAGE + "/") and os.path.basename(path) == name + suffix
                   for path in installed):
            missing.append(f"{PACKAGE}/**/{name}{suffix} (the compiled ext/{name}.pyx)")
    return missing


# -- the editable build's install plan -----------------------------------------------------------
def find_build_dir(root: str = ROOT) -> str:
    """The editable build folder of this interpreter (meson-python's ``build/cp3XX``)."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    preferred = os.path.join(root, "build", tag)
    if os.path.isdir(os.path.join(preferred, "meson-info")):
        return preferred
    found = sorted(os.path.dirname(os.path.dirname(path))
                   for path in glob.glob(os.path.join(root, "build", "*", "meson-info", "meson-info.json")))
    if len(found) == 1:
        return found[0]
    raise CannotInspect(f"no meson build folder for {tag} under {os.path.join(root, 'build')} "
                        + (f"(found {', '.join(found)}; pass --build-dir)" if found else
                           "(run `python -m pip install --no-build-isolation -e .` first, or use --wheel)"))


def planned_files(build_dir: str) -> set[str]:
    """Destinations of meson's install plan, relative to the Python install folder ("lstmeng/cell.py")."""
    ninja = shutil.which("ninja")
    if ninja is None:
        raise CannotInspect("ninja is not on PATH (pip install ninja)")
    # Reconfigures when a meson.build changed since the last build (what the editable loader would do
    # on import); compiles nothing.
    result = subprocess.run([ninja, "-C", build_dir, "build.ninja"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise CannotInspect(f"`ninja -C {build_dir} build.ninja` failed:\n{result.stdout}{result.stderr}")
    path = os.path.join(build_dir, "meson-info", "intro-installed.json")
    try:
        with open(path) as handle:
            plan = json.load(handle)
    except (OSError, ValueError) as error:
        raise CannotInspect(f"cannot read meson's install plan {path}: {error}") from None
    installed = set()
    for destination in plan.values():
        parts = destination.replace("\\", "/").split("/")
        if PACKAGE in parts:
            # Relative to the site-packages folder, wherever the prefix put it.
            index = len(parts) - 1 - parts[::-1].index(PACKAGE)
            installed.add("/".join(parts[index:]))
    return installed


# -- a wheel -------------------------------------------------------------------------------------
def wheel_files(root: str = ROOT) -> tuple[set[str], str]:
    """Files of a wheel built from ``root`` (without build isolation), and that wheel's EXT_SUFFIX."""
    with tempfile.TemporaryDirectory(prefix="lstmeng-wheel-") as folder:
        result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                                 "-q", "-w", folder, root], capture_output=True, text=True, check=False)
        wheels = glob.glob(os.path.join(folder, "*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            raise CannotInspect(f"building a wheel failed:\n{result.stdout}{result.stderr}")
        with zipfile.ZipFile(wheels[0]) as archive:
            return {name for name in archive.namelist() if name.startswith(PACKAGE + "/")}, \
                sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", help="the meson build folder (default: build/cp3XX of this interpreter)")
    parser.add_argument("--wheel", action="store_true",
                        help="build a wheel and check its contents instead of the install plan (slow)")
    args = parser.parse_args(argv)
    expected, extensions = source_files()
    try:
        if args.wheel:
            installed, suffix = wheel_files()
            what = "the wheel built from the tree"
        else:
            build_dir = args.build_dir or find_build_dir()
            installed, suffix = planned_files(build_dir), None
            what = f"meson's install plan ({os.path.relpath(build_dir, ROOT)})"
    except CannotInspect as error:
        print(f"check_installation: {error}", file=sys.stderr)
        return 2
    missing = missing_files(expected, extensions, installed, suffix)
    if missing:
        print(f"check_installation: {len(missing)} file(s) of the source tree are missing from {what}; "
              "list them in the meson.build of their folder:", file=sys.stderr)
        for name in missing:
            print(f"  missing: {name}", file=sys.stderr)
        return 1
    print(f"check_installation: {what} holds all {len(expected)} files of {PACKAGE}/ and "
          f"{len(extensions)} compiled extension(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
