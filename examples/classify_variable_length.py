"""Classify variable-length token sequences: padding, masks and a Bidirectional LSTM.

    Embedding(V, E, mask_zero=True) -> Bidirectional(LSTM(H, return_sequences=True)) -> LSTM(H) -> Dense(2)

The task: a sequence of 4 to 30 tokens holds "up" tokens and "down" tokens
among filler; the class is whether "up" tokens outnumber "down" tokens. The
counts must be carried over the whole real part of each sequence, and the
padding must not count, which is what the mask is for: ``le.pad_sequences``
pads with id 0 and ``Embedding(mask_zero=True)`` turns id 0 into the mask
that the recurrent layers consume.

Run:
    python examples/classify_variable_length.py
    python examples/classify_variable_length.py --tiny     # a few seconds (what CI runs)
"""

from __future__ import annotations

import argparse

import numpy as np

import lstmeng as le

PAD, UP, DOWN = 0, 1, 2
FIRST_FILLER = 3


def make_data(count: int, vocabulary: int, rng: np.random.Generator, min_length=4, max_length=30):
    """Token lists of random lengths and their labels (1 when "up" outnumbers "down")."""
    sequences, labels = [], []
    while len(sequences) < count:
        length = int(rng.integers(min_length, max_length + 1))
        tokens = rng.integers(FIRST_FILLER, vocabulary, size=length)
        ups, downs = rng.integers(0, 4, size=2)
        if ups == downs:
            continue                                   # no ties: every label is well defined
        places = rng.choice(length, size=min(length, ups + downs), replace=False)
        tokens[places[:ups]] = UP
        tokens[places[ups:]] = DOWN
        sequences.append(tokens.tolist())
        labels.append(int(np.sum(tokens == UP) > np.sum(tokens == DOWN)))
    return sequences, np.array(labels)


def build_model(vocabulary: int, units: int, seed: int) -> le.Sequential:
    return le.Sequential([
        le.Embedding(vocabulary, 8, mask_zero=True, seed=seed),
        le.Bidirectional(le.LSTM(units, return_sequences=True, seed=seed + 1)),
        le.LSTM(units, seed=seed + 3),
        le.Dense(2, seed=seed + 4),                    # two logits; softmax_cross_entropy takes class ids
    ])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds of training (CI)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    train_size, units, epochs = (256, 8, 2) if arguments.tiny else (4000, 32, 12)
    epochs = arguments.epochs or epochs
    vocabulary = 20

    rng = np.random.default_rng(arguments.seed)
    train_tokens, train_labels = make_data(train_size, vocabulary, rng)
    test_tokens, test_labels = make_data(max(train_size // 4, 64), vocabulary, rng)
    # Keras's pad_sequences: id 0 fills the gaps; "post" keeps every sequence's start at step 0.
    train_ids = le.pad_sequences(train_tokens, padding="post")
    test_ids = le.pad_sequences(test_tokens, padding="post", maxlen=train_ids.shape[1])
    print(f"train ids {train_ids.shape} ({train_ids.dtype}), lengths {min(map(len, train_tokens))}"
          f"..{max(map(len, train_tokens))}; positive share {train_labels.mean():.2f}")

    model = build_model(vocabulary, units, arguments.seed)
    model.build()
    model.summary()
    history = le.fit(model, "softmax_cross_entropy", le.optim.Adam(model, lr=1e-2), (train_ids, train_labels),
                     validation_data=(test_ids, test_labels), metrics=["accuracy"], epochs=epochs,
                     batch_size=32, clip_norm=1.0, patience=3, seed=arguments.seed, progress=not arguments.tiny)
    accuracy = history.history["val_accuracy"]
    print(f"validation accuracy per epoch: {[round(value, 3) for value in accuracy]}"
          f"{' (stopped early)' if history.stopped_early else ''}")
    return {"val_accuracy": accuracy, "loss": history.history["loss"]}


if __name__ == "__main__":
    main()
