"""The ``lstmeng`` command: ``info``, ``demo`` and ``bench``.

Mistakes a user can make (an unknown backend, a bad shape string, a missing
optional library) print one line ``lstmeng: error: ...`` on stderr and exit
with status 2; a diverging demo exits with status 1. Bugs still show their
traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

USAGE_ERROR = 2
DIVERGED = 1


class UsageError(Exception):
    """A mistake in the command line: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from lstmeng import __version__
    from lstmeng.cli import bench, demo

    parser = argparse.ArgumentParser(
        prog="lstmeng", description="lstmeng: one LSTM API on NumPy, Cython, CUDA and TensorFlow backends.")
    parser.add_argument("--version", action="version", version=f"lstmeng {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{info,demo,bench}")
    commands.required = True

    info_parser = commands.add_parser(
        "info", help="backends, devices, BLAS and thread settings, optional libraries",
        description="Print what this machine offers lstmeng: every backend (available or why not) and its "
                    "device, the CPU and GPU, BLAS and thread settings, and optional libraries with versions.")
    info_parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")

    demo_parser = commands.add_parser(
        "demo", help="train a model that needs long-term memory",
        description="Train Bidirectional(LSTM) -> LSTM -> dense with lstmeng on a synthetic task with "
                    "variable-length (padded, masked) sequences. adding: the adding problem (validation MSE "
                    "must drop below 0.01; predicting the mean scores ~0.167). sentiment: the label depends "
                    "on two tokens far apart (validation accuracy must exceed 90%).")
    demo_parser.add_argument("--task", choices=demo.TASKS, default="adding", help="default: adding")
    demo_parser.add_argument("--backend", default="auto", help="backend name (see `lstmeng info`); default: auto")
    demo_parser.add_argument("--epochs", type=int, help="default: the task's setting, which meets its target")
    demo_parser.add_argument("--seed", type=int, default=0, help="seeds data, weights and batch order (default 0)")
    demo_parser.add_argument("--plot", metavar="FILE", help="write the loss curves to this PNG (needs matplotlib)")
    demo_parser.add_argument("--train-size", type=int, metavar="N",
                             help="number of training sequences (default: the task's setting)")
    demo_parser.add_argument("--blas-threads", type=int, metavar="N", default=demo.DEFAULT_BLAS_THREADS,
                             help="BLAS threads while training (default %(default)s: the demo's matrices are "
                                  "small, where more threads only wait on each other); 0 leaves BLAS as it is")
    demo_parser.add_argument("--no-progress", action="store_true", help="no progress bars")

    bench_parser = commands.add_parser(
        "bench", help="time backends beside torch.nn.LSTM and keras.layers.LSTM",
        description="Time one LSTM layer (float32, batch-major, returning sequences) on every requested "
                    "backend and peer, on the same inputs and weights, in this one process. Prints ms, "
                    "GFLOP/s (forward 8*B*T*H*(I+H), train 3x), the fraction of the sgemm peak measured in "
                    "the same run, and speed ratios against each peer.")
    bench_parser.add_argument("--backends", metavar="NAMES",
                              help="comma-separated backend names (default: every known backend; unavailable "
                                   "ones are listed as skipped)")
    bench_parser.add_argument("--against", metavar="PEERS", default="torch,keras",
                              help="comma-separated peers from torch, keras, or 'none' (default: torch,keras)")
    bench_parser.add_argument("--shapes", metavar="SHAPES", default=bench.DEFAULT_SHAPES,
                              help="'B,T,I,H;B,T,I,H;...' batch, time steps, input features, units "
                                   "(default: %(default)s)")
    bench_parser.add_argument("--mode", choices=("infer", "train", "both"), default="both",
                              help="infer: forward only; train: forward+backward; default: both")
    bench_parser.add_argument("--repeats", type=int, default=5, metavar="N",
                              help="timed calls per measurement, best one kept (default 5)")
    bench_parser.add_argument("--threads", type=int, metavar="N",
                              help="threads for BLAS, torch and TensorFlow (default: OMP_NUM_THREADS or the "
                                   "usable cores)")
    bench_parser.add_argument("--peak-size", type=int, default=2048, metavar="N",
                              help="size of the square sgemm that measures the peak (default 2048)")
    bench_parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    bench_parser.add_argument("--plot", metavar="FILE", help="draw time against size to this PNG (needs matplotlib)")
    bench_parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def _require_matplotlib(option: str) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"{option} needs matplotlib, which is not installed (pip install 'lstmeng[plot]')")


def _check_writable(path: str, option: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"{option} {path}: directory {directory} does not exist")


def _write_json(data: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


# -- commands ---------------------------------------------------------------------------------------------------
def run_info(arguments) -> int:
    from lstmeng.cli import info

    if arguments.json:
        _check_writable(arguments.json, "--json")
    report = info.gather()
    print(info.render(report))
    if arguments.json:
        _write_json(report, arguments.json)
    return 0


def run_demo(arguments) -> int:
    from lstmeng.backends import registry
    from lstmeng.cli import demo

    if arguments.backend != "auto":
        try:
            registry.get_backend_object(arguments.backend)
        except ValueError as error:
            raise UsageError(str(error)) from None
    if arguments.epochs is not None and arguments.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {arguments.epochs}")
    if arguments.train_size is not None and arguments.train_size < 1:
        raise UsageError(f"--train-size must be >= 1, got {arguments.train_size}")
    if arguments.blas_threads < 0:
        raise UsageError(f"--blas-threads must be >= 0, got {arguments.blas_threads}")
    if arguments.plot:
        _require_matplotlib("--plot")
        _check_writable(arguments.plot, "--plot")

    try:
        result = demo.run_demo(arguments.task, backend=arguments.backend, epochs=arguments.epochs,
                               seed=arguments.seed, progress=not arguments.no_progress,
                               train_size=arguments.train_size, blas_threads=arguments.blas_threads or None)
    except demo.DivergenceError as error:
        print(f"lstmeng: {error}", file=sys.stderr)
        return DIVERGED
    print(demo.summary(result))
    if arguments.plot:
        demo.plot_losses(result, arguments.plot)
        print(f"loss curves written to {arguments.plot}")
    return 0


def run_bench(arguments) -> int:
    from lstmeng.cli import bench

    for option in ("json", "plot"):
        if getattr(arguments, option):
            _check_writable(getattr(arguments, option), f"--{option}")
    if arguments.plot:
        _require_matplotlib("--plot")
    modes = bench.MODES if arguments.mode == "both" else (arguments.mode,)
    try:
        result = bench.run_bench(
            backends=None if arguments.backends is None else bench.split_names(arguments.backends),
            peers=bench.split_names(arguments.against), shapes=bench.parse_shapes(arguments.shapes),
            modes=modes, repeats=arguments.repeats, threads=arguments.threads, peak_size=arguments.peak_size,
            progress=None if arguments.quiet else (lambda message: print(f"  {message}", file=sys.stderr)))
    except bench.BenchError as error:
        raise UsageError(str(error)) from None
    print(bench.render(result))
    if arguments.json:
        _write_json(result.to_json(), arguments.json)
    if arguments.plot:
        bench.plot(result, arguments.plot)
        print(f"plot written to {arguments.plot}")
    return 0


COMMANDS = {"info": run_info, "demo": run_demo, "bench": run_bench}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lstmeng`` console script and ``python -m lstmeng``; returns the exit status."""
    # Before anything imports TensorFlow (probing its backend does): keep its C++ logging quiet.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    try:
        arguments = parser.parse_args(argv)
    except SystemExit as exit_request:  # argparse has printed usage and the error (or --help)
        return int(exit_request.code or 0)
    try:
        return COMMANDS[arguments.command](arguments)
    except UsageError as error:
        print(f"lstmeng {arguments.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("lstmeng: interrupted", file=sys.stderr)
        return 130
