#!/usr/bin/env python
"""CI smoke check of the asv suite: every benchmark is discovered and runs once without error.

Runs, from asv_bench/, against the Python environment this script runs in
(lstmeng installed there, e.g. editable):

1. ``asv check``: every benchmark module imports and every benchmark is well
   formed. (``asv run`` alone exits 0 when a module fails to import: it then
   simply runs nothing.)
2. ``asv run --quick --dry-run``: each benchmark and parameter combination
   once, nothing saved. asv exits 2 when a benchmark fails; skipped cases
   (unavailable backends, no torch) are fine.

and fails when either fails, when no benchmark ran at all, or when the whole
run exceeds ``--timeout`` seconds. Timings of a quick run mean nothing; this
only proves that the suite works.
"""

from __future__ import annotations

import argparse
import atexit
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

ASV_DIR = pathlib.Path(__file__).resolve().parent.parent / "asv_bench"
MACHINE = "asv-smoke"
# asv's progress lines: "[ 50.00%] ··· bench_layer.LayerForward.time_forward     ok"
# (long names are shortened with "..."); a benchmark whose every case failed
# ends in "failed", one where only some cases failed still ends in "ok" but
# shows "failed" in its result table and "asv: benchmark failed" in its log.
RESULT_LINE = re.compile(r"···\s+(\S+)\s+(ok|failed)\s*$")
CASE_FAILURE = "asv: benchmark failed"


def _asv(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """Run asv in its own process group, so that a timeout also stops its benchmark processes."""
    command = [sys.executable, "-m", "asv", *args]
    print("+ (cd asv_bench &&", "asv", " ".join(args) + ")", flush=True)
    process = subprocess.Popen(command, cwd=ASV_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(process.pid)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _kill_session(session_id: int) -> None:
    """Kill every process of the session asv was started in.

    asv's fork server puts itself in a process group of its own, so killing
    asv's group would leave it (and the benchmark it runs) behind; it stays in
    the session, though.
    """
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session_id:
                    os.kill(int(entry), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        os.killpg(session_id, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds allowed for the whole smoke run (default: 900)")
    parser.add_argument("--bench", default=None, help="only benchmarks matching this regular expression")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    # asv run writes results/<machine>/machine.json even with --dry-run; the
    # smoke machine must not appear among the recorded ones.
    machine_results = ASV_DIR / "results" / MACHINE
    if not machine_results.exists():
        atexit.register(shutil.rmtree, machine_results, ignore_errors=True)

    def remaining() -> float:
        return max(1.0, deadline - time.monotonic())

    try:
        # asv run needs a machine description; a fixed name keeps it non-interactive.
        machine = _asv("machine", "--yes", "--machine", MACHINE, timeout=remaining())
        if machine.returncode != 0:
            print(machine.stdout + machine.stderr, file=sys.stderr)
            return 1
        check = _asv("check", "-E", "existing:same", timeout=remaining())
        print(check.stdout[-5000:] + check.stderr[-5000:])
        if check.returncode != 0:
            print("asv_smoke: asv check failed", file=sys.stderr)
            return 1
        run_args = ["run", "-E", "existing:same", "--quick", "--dry-run", "--show-stderr", "--machine", MACHINE]
        if args.bench:
            run_args += ["--bench", args.bench]
        run = _asv(*run_args, timeout=remaining())
    except subprocess.TimeoutExpired as error:
        print(f"asv_smoke: the smoke run took more than {args.timeout:.0f} s "
              f"(stopped during: {' '.join(map(str, error.cmd[3:5]))})", file=sys.stderr)
        return 1

    output = run.stdout + run.stderr
    print(output)
    outcomes = [match.groups() for match in map(RESULT_LINE.search, output.splitlines()) if match]
    failed = sorted({name for name, outcome in outcomes if outcome == "failed"})
    ran = sorted({name for name, outcome in outcomes if outcome == "ok"})
    failed_cases = output.count(CASE_FAILURE)
    if run.returncode != 0 or failed or failed_cases:
        print(f"asv_smoke: asv run failed (exit status {run.returncode}); {failed_cases} failed cases; "
              f"benchmarks failing in every case: {failed}", file=sys.stderr)
        return 1
    if not ran or "Failed to build the project and import the benchmark suite" in output:
        print("asv_smoke: no benchmark ran (the suite or lstmeng failed to import)", file=sys.stderr)
        return 1
    print(f"asv_smoke: {len(ran)} benchmarks ran without error "
          f"in {args.timeout - (deadline - time.monotonic()):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
