"""Per-epoch model.fit time: lstmeng.keras.LSTM(backend="cython") against keras.layers.LSTM.

The same model (Input -> LSTM -> Dense), the same data and the same optimizer,
built once per LSTM implementation in one process. After one warm-up epoch
each (tracing), epochs alternate between the implementations and the best
epoch of each is kept, so load from other processes hits both alike. Prints
the per-epoch times and the ratio keras / lstmeng (> 1: lstmeng is faster).

When the cython backend is not available the script says so and measures
the numpy backend instead.

Usage:
    python benchmarks/keras_fit.py                       # B=64, T=50, I=32, H=128, 2048 samples
    python benchmarks/keras_fit.py --units 256 --steps 100 --repeats 5
    python benchmarks/keras_fit.py --masked              # variable lengths (Masking layer)
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per implementation")
    parser.add_argument("--masked", action="store_true", help="right-padded variable lengths behind a Masking layer")
    parser.add_argument("--no-tensorflow-backend", action="store_true",
                        help="skip the extra row for lstmeng.keras.LSTM(backend='tensorflow')")
    return parser.parse_args()


def host_backend() -> str:
    """"cython" when available, else "numpy" (saying why)."""
    import lstmeng as le

    rows = {info.name: info for info in le.list_backends()}
    if rows["cython"].available:
        return "cython"
    print(f"cython backend unavailable ({rows['cython'].reason}); measuring the numpy backend instead")
    return "numpy"


def make_data(args):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.samples, args.steps, args.features)).astype("float32")
    if args.masked:
        lengths = rng.integers(args.steps // 4, args.steps + 1, size=args.samples)
        x[np.arange(args.steps)[None, :] >= lengths[:, None]] = 0.0
    y = (x[:, 0, :1] * x[:, -1, 1:2]).astype("float32")
    return x, y


def build_model(make_lstm, args):
    import keras

    keras.utils.set_random_seed(0)
    layers = [keras.Input((args.steps, args.features))]
    if args.masked:
        layers.append(keras.layers.Masking(0.0))
    layers += [make_lstm(args.units), keras.layers.Dense(1)]
    model = keras.Sequential(layers)
    # jit_compile=False for every model: the comparison is of the LSTM implementations.
    model.compile(optimizer="adam", loss="mse", jit_compile=False)
    return model


def epoch_seconds(model, x, y, batch):
    start = time.perf_counter()
    model.fit(x, y, epochs=1, batch_size=batch, verbose=0, shuffle=False)
    return time.perf_counter() - start


def main():
    args = parse_args()
    import keras
    import tensorflow as tf

    import lstmeng.keras as lk

    backend = host_backend()
    x, y = make_data(args)
    implementations = {
        "keras.layers.LSTM": lambda units: keras.layers.LSTM(units),
        f"lstmeng.keras.LSTM(backend={backend!r})": lambda units: lk.LSTM(units, backend=backend),
    }
    if not args.no_tensorflow_backend:
        implementations["lstmeng.keras.LSTM(backend='tensorflow')"] = \
            lambda units: lk.LSTM(units, backend="tensorflow")
    models = {name: build_model(make, args) for name, make in implementations.items()}
    for model in models.values():
        epoch_seconds(model, x, y, args.batch)  # warm-up: tracing and first allocations
    best = {name: float("inf") for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            best[name] = min(best[name], epoch_seconds(model, x, y, args.batch))

    flops = 3 * 8 * args.samples * args.steps * args.units * (args.features + args.units)
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}; {os.cpu_count()} CPUs")
    print(f"samples={args.samples} batch={args.batch} T={args.steps} I={args.features} H={args.units}"
          f"{' masked' if args.masked else ''}; best of {args.repeats} epochs after one warm-up")
    for name, seconds in best.items():
        print(f"  {name:45s} {seconds:8.3f} s/epoch  {flops / seconds / 1e9:6.1f} GFLOP/s (LSTM fwd+bwd)")
    keras_seconds = best["keras.layers.LSTM"]
    host_name = f"lstmeng.keras.LSTM(backend={backend!r})"
    print(f"ratio keras.layers.LSTM / {host_name}: {keras_seconds / best[host_name]:.2f}x")


if __name__ == "__main__":
    main()
