#!/usr/bin/env python
"""Regression check for contributors: is HEAD more than 1.2x slower than main on the key benchmarks?

Builds both commits in asv's own environments (asv_bench/asv.conf.json: a
virtualenv per configuration, each commit built from its own tree with the
project's meson-python build), runs the key time_ benchmarks on both with
asv's statistics, and exits non-zero when one of them is slower by more than
the factor and the difference is statistically significant, or fails on HEAD
where it worked on main.

Not for CI: shared CI machines are too noisy for absolute timings. Run it on a
quiet machine before asking for review of a performance-sensitive change::

    python tools/asv_regression.py                  # HEAD vs main, factor 1.2
    python tools/asv_regression.py --base v0.1.0 --factor 1.1 --bench "LayerForward"

Exit status: 0 no significant regression; 1 a key benchmark regressed (or
broke); 2 asv could not build or run a commit; 3 bad arguments.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

ASV_DIR = pathlib.Path(__file__).resolve().parent.parent / "asv_bench"

#: The benchmarks whose timings gate a change: lower is better for all of them
#: (track_ ratios are left out: for those, higher is better and asv's
#: regression test assumes lower-is-better).
KEY_BENCHMARKS = (
    r"bench_layer\.LayerForward\.time_forward",
    r"bench_layer\.LayerTrainingStep\.time_training_step",
    r"bench_cell\.CellStep\.time_cell_step",
    r"bench_stack\.BidirectionalStack\.time_stack_training_step",
)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ASV_DIR.parent, check=True, capture_output=True,
                          text=True).stdout.strip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="commit or branch to compare against (default: main)")
    parser.add_argument("--head", default="HEAD", help="commit or branch under test (default: HEAD)")
    parser.add_argument("--factor", type=float, default=1.2,
                        help="slowdown that counts as a regression (default: 1.2)")
    parser.add_argument("--bench", default="|".join(KEY_BENCHMARKS),
                        help="regular expression of the benchmarks to compare (default: the key time_ benchmarks)")
    parser.add_argument("--machine", default=None, help="asv machine name (default: asv's own choice)")
    args = parser.parse_args(argv)
    if args.factor <= 1.0:
        parser.error("--factor must be above 1")

    try:
        head = _git("rev-parse", "--verify", f"{args.head}^{{commit}}")
        base = _git("rev-parse", "--verify", f"{args.base}^{{commit}}")
    except subprocess.CalledProcessError as error:
        print(f"asv_regression: unknown commit: {error.stderr.strip()}", file=sys.stderr)
        return 3
    if head == base:
        print(f"asv_regression: {args.head} and {args.base} are the same commit ({head[:8]}); nothing to compare")
        return 0

    command = [sys.executable, "-m", "asv", "continuous", "--factor", str(args.factor),
               "--bench", args.bench, "--show-stderr", base, head]
    if args.machine:
        command[4:4] = ["--machine", args.machine]
    print("+ (cd asv_bench &&", " ".join(command[1:]) + ")", flush=True)
    # asv continuous exits 1 both for "performance decreased" and for "could
    # not build a commit", so its verdict line decides, not its exit status.
    process = subprocess.Popen(command, cwd=ASV_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:
        print(line, end="", flush=True)
        output.append(line)
    returncode = process.wait()
    output = "".join(output)
    if "PERFORMANCE DECREASED" in output:
        print(f"asv_regression: REGRESSION: a key benchmark is more than {args.factor}x slower (or newly failing) "
              f"on {head[:8]} than on {base[:8]}; see the table above", file=sys.stderr)
        status = 1
    elif returncode == 0 and ("NOT SIGNIFICANTLY CHANGED" in output or "PERFORMANCE INCREASED" in output):
        print(f"asv_regression: no key benchmark is more than {args.factor}x slower on {head[:8]} than on {base[:8]}")
        status = 0
    else:
        print(f"asv_regression: asv could not build or run one of the commits (exit status {returncode}); "
              "see its output above", file=sys.stderr)
        status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
