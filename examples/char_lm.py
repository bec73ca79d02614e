"""A character-level language model trained with lstmeng's public pieces, then sampled.

    Embedding(V, E) -> LSTM(H, return_sequences=True) -> Dense(V)

Training uses teacher forcing: the model reads characters 0..T-1 of a window
and is scored (softmax cross-entropy) on predicting characters 1..T, all
steps at once. ``le.fit`` runs the loop with Adam and gradient-norm clipping.
Sampling feeds the model its own output one character at a time, with an
``LSTMCell`` that holds the trained LSTM's weights (same Keras layout), so
each step costs one cell call instead of re-reading the whole prefix.

Run:
    python examples/char_lm.py                 # trains on lstmeng's own source code
    python examples/char_lm.py --text FILE     # or on any text file
    python examples/char_lm.py --tiny          # a few seconds (what CI runs)
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np

import lstmeng as le


def load_text(path: str | None, characters: int) -> str:
    """The training text: ``path``, or lstmeng's own Python source, cut to ``characters``."""
    if path is not None:
        return pathlib.Path(path).read_text(encoding="utf-8")[:characters]
    package = pathlib.Path(le.__file__).parent
    text = "".join(source.read_text(encoding="utf-8") for source in sorted(package.glob("*.py")))
    return text[:characters]


def make_windows(ids: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows: inputs ``[N, window]`` and the next-character targets ``[N, window]``."""
    count = (len(ids) - 1) // window
    inputs = ids[:count * window].reshape(count, window)
    targets = ids[1:count * window + 1].reshape(count, window)
    return inputs, targets


def build_model(vocabulary: int, embedding_size: int, units: int, seed: int) -> le.Sequential:
    return le.Sequential([
        le.Embedding(vocabulary, embedding_size, seed=seed),
        le.LSTM(units, return_sequences=True, seed=seed + 1),
        le.Dense(vocabulary, seed=seed + 2),            # logits; the loss applies the softmax
    ])


def sample(model: le.Sequential, prompt_ids: list[int], length: int, temperature: float,
           rng: np.random.Generator) -> list[int]:
    """Continue ``prompt_ids`` by ``length`` ids drawn from the model, one step at a time."""
    embedding, lstm, head = model.layers
    cell = le.LSTMCell(lstm.units, dtype=lstm.dtype.name).build(embedding.output_dim)
    cell.set_weights(lstm.get_weights())                # LSTM and LSTMCell share Keras's layout
    states, logits = None, None
    for token in prompt_ids:                            # read the prompt (inference calls: no tape)
        h, states = cell(embedding(np.array([token])), states)
        logits = head(h)
    generated = []
    for _ in range(length):
        probabilities = le.dense.softmax(logits[0].astype(np.float64) / temperature)
        token = int(rng.choice(len(probabilities), p=probabilities))
        generated.append(token)
        h, states = cell(embedding(np.array([token])), states)
        logits = head(h)
    return generated


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", help="a text file to train on (default: lstmeng's source code)")
    parser.add_argument("--tiny", action="store_true", help="a few seconds of training (CI)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    if arguments.tiny:
        characters, window, units, embedding_size, epochs, batch_size = 3000, 24, 32, 16, 2, 16
    else:
        characters, window, units, embedding_size, epochs, batch_size = 200_000, 64, 256, 32, 10, 64
    epochs = arguments.epochs or epochs

    text = load_text(arguments.text, characters)
    alphabet = sorted(set(text))
    index = {character: i for i, character in enumerate(alphabet)}
    ids = np.array([index[character] for character in text], np.int64)
    inputs, targets = make_windows(ids, window)
    split = max(1, int(0.9 * len(inputs)))
    print(f"{len(text)} characters, {len(alphabet)} distinct; {len(inputs)} windows of {window}")

    model = build_model(len(alphabet), embedding_size, units, arguments.seed)
    model.build()
    model.summary()
    optimizer = le.optim.Adam(model, lr=3e-3)
    start = time.perf_counter()
    history = le.fit(model, "softmax_cross_entropy", optimizer, (inputs[:split], targets[:split]),
                     validation_data=(inputs[split:], targets[split:]) if split < len(inputs) else None,
                     epochs=epochs, batch_size=batch_size, clip_norm=1.0, seed=arguments.seed,
                     progress=not arguments.tiny)
    seconds = time.perf_counter() - start
    losses = history.history["loss"]
    print(f"training loss per epoch: {[round(value, 3) for value in losses]} ({seconds:.1f} s); "
          f"uniform guessing scores {np.log(len(alphabet)):.3f}")

    rng = np.random.default_rng(arguments.seed)
    prompt = text[:20]
    continuation = sample(model, [index[c] for c in prompt], 80 if arguments.tiny else 400, 0.8, rng)
    print("sample:", repr(prompt + "".join(alphabet[i] for i in continuation)))
    return {"loss": losses, "uniform": float(np.log(len(alphabet))), "sample_length": len(continuation)}


if __name__ == "__main__":
    main()
