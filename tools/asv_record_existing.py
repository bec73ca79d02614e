#!/usr/bin/env python
"""Record asv results for past commits in an existing environment, honestly.

``asv run -E existing --set-commit-hash C`` files results under commit C
whatever code is installed; this script makes sure that it is C's code. For
each commit, newest first, it checks the commit out in a dedicated clone (not
your working tree), lets the editable meson-python install there rebuild
itself, checks that lstmeng is imported from that clean checkout, and only
then runs asv with that commit's hash. Building incrementally in one clone is
much cheaper than asv's fresh build per commit in its own environments, which
is what made recording a long history affordable on a 2-core machine.

One-time setup (any Python environment with lstmeng's build and runtime
requirements, torch optional, asv_runner and pympler)::

    git clone /path/to/lstmeng /tmp/lstmeng-history
    /path/to/env/bin/python -m pip install --no-build-isolation --no-deps -e /tmp/lstmeng-history

Then, from anywhere::

    python tools/asv_record_existing.py --clone /tmp/lstmeng-history \\
        --python /path/to/env/bin/python --machine ci-2core-epyc main~10..main

Extra arguments after ``--`` go to ``asv run`` (e.g. ``-- --bench LayerForward``).
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

ASV_DIR = pathlib.Path(__file__).resolve().parent.parent / "asv_bench"


def _git(repo, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def _recorded(machine: str) -> set[str]:
    """Commit hash prefixes that already have a results file for ``machine``."""
    folder = ASV_DIR / "results" / machine
    return {path.name.split("-")[0] for path in folder.glob("*.json") if path.name != "machine.json"}


def record(commit: str, clone: pathlib.Path, python: str, machine: str, asv_args: list[str]) -> int:
    _git(clone, "checkout", "--quiet", "--detach", commit)
    if _git(clone, "rev-parse", "HEAD") != commit or _git(clone, "status", "--porcelain", "--untracked-files=no"):
        print(f"asv_record_existing: {clone} is not a clean checkout of {commit}", file=sys.stderr)
        return 1
    # Importing lstmeng rebuilds the editable install from the checked-out tree.
    probe = subprocess.run([python, "-c", "import lstmeng, os; print(os.path.realpath(lstmeng.__file__))"],
                           capture_output=True, text=True, cwd="/")
    location = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else ""
    if probe.returncode != 0 or not location.startswith(str(clone.resolve())):
        print(f"asv_record_existing: {commit[:8]}: lstmeng does not import from {clone} "
              f"(got {location!r}):\n{probe.stderr[-3000:]}", file=sys.stderr)
        return 1
    command = [sys.executable, "-m", "asv", "run", "-E", f"existing:{python}", "--set-commit-hash", commit,
               "--machine", machine, "--show-stderr", *asv_args]
    print("+ (cd asv_bench &&", " ".join(command[2:]) + ")", flush=True)
    return subprocess.run(command, cwd=ASV_DIR).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("range", help="git revision range of the repository, e.g. main~10..main")
    parser.add_argument("--clone", required=True, type=pathlib.Path,
                        help="a clone of the repository with lstmeng installed editable from it")
    parser.add_argument("--python", required=True, help="the Python of the environment to measure in")
    parser.add_argument("--machine", required=True, help="asv machine name")
    parser.add_argument("--skip-recorded", action="store_true",
                        help="skip commits that already have results for this machine (any environment)")
    args, asv_args = parser.parse_known_args(argv)
    asv_args = [arg for arg in asv_args if arg != "--"]
    _git(args.clone, "fetch", "--quiet", str(ASV_DIR.parent), "+refs/heads/*:refs/remotes/origin/*")
    repo = ASV_DIR.parent
    commits = _git(repo, "rev-list", args.range).split()
    done = _recorded(args.machine) if args.skip_recorded else set()
    failures = 0
    for commit in commits:  # rev-list gives newest first
        if commit[:8] in done:
            continue
        failures += record(commit, args.clone, args.python, args.machine, asv_args) != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
