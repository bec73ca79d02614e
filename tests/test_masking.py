"""Masks and padding: lengths_to_mask, pad_batch, pad_sequences (Keras's), and the masking semantics of the layers.

The semantics are checked against independent facts rather than captured
output: a right-padded row gives what the same row gives alone, unpadded; a
masked step changes nothing; ``lengths`` is the mask ``arange(T) < lengths``.
(Keras parity for every mask pattern is in test_keras_parity.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

import lstmeng as le
from lstmeng import testing

RNG = np.random.default_rng(0)
FEATURES, UNITS = 3, 4


def lstm(**options):
    options.setdefault("backend", "numpy")
    return le.LSTM(UNITS, seed=0, bias_initializer="normal", dtype="float64", **options).build(FEATURES)


# -- helpers -------------------------------------------------------------------------
def test_lengths_to_mask():
    np.testing.assert_array_equal(le.lengths_to_mask([2, 0, 3], maxlen=3),
                                  [[True, True, False], [False, False, False], [True, True, True]])
    assert le.lengths_to_mask([1, 3]).shape == (2, 3)
    assert le.lengths_to_mask(np.array([2.0, 1.0])).tolist() == [[True, True], [True, False]]
    assert le.lengths_to_mask([], maxlen=4).shape == (0, 4)
    assert le.lengths_to_mask([0, 0]).shape == (2, 0)
    with pytest.raises(ValueError, match=r"lengths must be 1-D \(batch,\), got shape \(1, 2\)"):
        le.lengths_to_mask([[1, 2]])
    with pytest.raises(ValueError, match="lengths must be >= 0, got -2"):
        le.lengths_to_mask([1, -2])
    with pytest.raises(ValueError, match=r"lengths must be <= time steps \(2\), got 3"):
        le.lengths_to_mask([3], maxlen=2)
    with pytest.raises(ValueError, match="lengths must be integers"):
        le.lengths_to_mask([0.5])


def test_pad_batch_post_and_pre():
    sequences = [np.arange(6.0).reshape(3, 2), np.array([[7.0, 8.0]])]
    x, mask = le.pad_batch(sequences)
    assert x.dtype == np.float32 and x.shape == (2, 3, 2)
    np.testing.assert_array_equal(x[0], sequences[0])
    np.testing.assert_array_equal(x[1], [[7, 8], [0, 0], [0, 0]])
    np.testing.assert_array_equal(mask, [[True] * 3, [True, False, False]])

    x, mask = le.pad_batch(sequences, padding="pre", value=-1.0, dtype="float64")
    assert x.dtype == np.float64
    np.testing.assert_array_equal(x[1], [[-1, -1], [-1, -1], [7, 8]])
    np.testing.assert_array_equal(mask[1], [False, False, True])

    x, mask = le.pad_batch(sequences, maxlen=2)  # truncating="post" keeps the start
    np.testing.assert_array_equal(x[0], [[0, 1], [2, 3]])
    x, mask = le.pad_batch(sequences, maxlen=2, truncating="pre")
    np.testing.assert_array_equal(x[0], [[2, 3], [4, 5]])
    assert mask.all(axis=1).tolist() == [True, False]


def test_pad_batch_scalars_empty_and_errors():
    x, mask = le.pad_batch([[1, 2, 3], [4]])
    assert x.shape == (2, 3, 1) and x[1, 0, 0] == 4 and mask.sum() == 4
    x, mask = le.pad_batch([np.zeros((0, 2)), np.ones((2, 2))])
    assert x.shape == (2, 2, 2) and mask.tolist() == [[False, False], [True, True]]
    x, mask = le.pad_batch([])
    assert x.shape == (0, 0, 1) and mask.shape == (0, 0)
    x, mask = le.pad_batch([np.ones((3, 2))], maxlen=0)
    assert x.shape == (1, 0, 2)
    with pytest.raises(ValueError, match=r"same number of features, got \[2, 3\]"):
        le.pad_batch([np.ones((2, 2)), np.ones((2, 3))])
    with pytest.raises(TypeError, match=r"sequences\[1\] must be numeric"):
        le.pad_batch([np.ones((2, 2)), np.array([["a", "b"]])])
    with pytest.raises(ValueError, match="padding must be one of"):
        le.pad_batch([np.ones(2)], padding="middle")
    with pytest.raises(ValueError, match="maxlen must be a non-negative integer"):
        le.pad_batch([np.ones(2)], maxlen=-1)
    with pytest.raises(ValueError, match=r"sequences\[0\] must be \(time,\) or \(time, features\)"):
        le.pad_batch([np.ones((2, 2, 2))])


PAD_SEQUENCES_CASES = [
    {}, {"padding": "post"}, {"maxlen": 2}, {"maxlen": 2, "truncating": "post"},
    {"maxlen": 5, "padding": "post", "value": 9}, {"dtype": "float32", "value": -1.5},
]


@pytest.mark.parametrize("options", PAD_SEQUENCES_CASES, ids=str)
def test_pad_sequences_has_keras_semantics(options):
    token_lists = [[1, 2, 3], [4], [], [5, 6, 7, 8]]
    got = le.pad_sequences(token_lists, **options)
    # Keras's documented rule, written out: truncate then pad, both at the front by default.
    maxlen = options.get("maxlen", 4)
    expected = np.full((4, maxlen), options.get("value", 0), dtype=options.get("dtype", "int32"))
    for row, tokens in enumerate(token_lists):
        kept = tokens[-maxlen:] if options.get("truncating", "pre") == "pre" else tokens[:maxlen]
        if kept:
            if options.get("padding", "pre") == "pre":
                expected[row, maxlen - len(kept):] = kept
            else:
                expected[row, :len(kept)] = kept
    assert isinstance(got, np.ndarray) and got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    keras = pytest.importorskip("keras")
    np.testing.assert_array_equal(got, keras.utils.pad_sequences(token_lists, **options))


def test_pad_sequences_of_vectors_and_errors():
    got = le.pad_sequences([np.ones((2, 3)), np.ones((1, 3))], dtype="float32")
    assert got.shape == (2, 2, 3) and got[1, 0].tolist() == [0, 0, 0] and got[1, 1].tolist() == [1, 1, 1]
    assert le.pad_sequences([]).shape == (0, 0)
    with pytest.raises(ValueError, match=r"sequences\[1\] must be a sequence"):
        le.pad_sequences([[1], 2])
    with pytest.raises(ValueError, match="truncating must be one of"):
        le.pad_sequences([[1]], truncating="middle")


# -- semantics -------------------------------------------------------------------------
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("zero_output_for_mask", [False, True])
def test_right_padded_row_equals_the_row_alone(go_backwards, zero_output_for_mask):
    """Final states and real-step outputs of a padded row are those of the unpadded row."""
    lengths = np.array([5, 3, 1])
    sequences = [RNG.normal(size=(n, FEATURES)) for n in lengths]
    x, mask = le.pad_batch(sequences, dtype="float64", value=9.0)  # padding values must not matter
    layer = lstm(return_sequences=True, return_state=True, go_backwards=go_backwards,
                 zero_output_for_mask=zero_output_for_mask)
    y, h, c = layer(x, mask=mask)
    for row, sequence in enumerate(sequences):
        y_alone, h_alone, c_alone = layer(sequence[None])
        np.testing.assert_allclose(h[row], h_alone[0], rtol=1e-12)
        np.testing.assert_allclose(c[row], c_alone[0], rtol=1e-12)
        n = len(sequence)
        if go_backwards:  # the reversed output of the padded row starts with its padding
            real, padded = y[row, x.shape[1] - n:], y[row, :x.shape[1] - n]
        else:
            real, padded = y[row, :n], y[row, n:]
        np.testing.assert_allclose(real, y_alone[0], rtol=1e-12)
        if zero_output_for_mask or go_backwards:
            # Backwards, the padding comes first (before any real step): zeros either way.
            assert np.all(padded == 0)
        else:  # masked steps repeat the previous output
            np.testing.assert_array_equal(padded, np.broadcast_to(real[-1], padded.shape))


def test_lengths_equal_mask():
    x = RNG.normal(size=(3, 4, FEATURES))
    lengths = np.array([4, 0, 2])
    for options in (dict(return_sequences=True), dict(return_state=True), dict(go_backwards=True)):
        layer = lstm(**options)
        by_lengths = layer(x, lengths=lengths)
        by_mask = layer(x, mask=np.arange(4)[None] < lengths[:, None])
        for a, b in zip(by_lengths if isinstance(by_lengths, list) else [by_lengths],
                        by_mask if isinstance(by_mask, list) else [by_mask]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("zero_output_for_mask", [False, True])
def test_masked_step_changes_nothing(zero_output_for_mask):
    """Holes: a masked step keeps h and c, and outputs the previous output (or zeros)."""
    x = RNG.normal(size=(2, 5, FEATURES))
    mask = np.array([[True, False, True, False, False], [False, True, True, False, True]])
    layer = lstm(return_sequences=True, return_state=True, zero_output_for_mask=zero_output_for_mask)
    y, h, c = layer(x, mask=mask)
    for row in range(2):
        real_steps = np.flatnonzero(mask[row])
        y_alone, h_alone, c_alone = layer(x[row:row + 1, real_steps])  # the holes removed
        np.testing.assert_allclose(y[row, real_steps], y_alone[0], rtol=1e-12)
        np.testing.assert_allclose(h[row], h_alone[0], rtol=1e-12)
        np.testing.assert_allclose(c[row], c_alone[0], rtol=1e-12)
        previous = np.zeros(UNITS)
        for t in range(5):
            if mask[row, t]:
                previous = y[row, t]
            else:
                np.testing.assert_array_equal(y[row, t], 0 if zero_output_for_mask else previous)


@pytest.mark.parametrize("return_sequences", [True, False])
def test_fully_masked_rows(return_sequences):
    """Outputs zeros, final state = initial state, no gradient into the row's inputs."""
    x = RNG.normal(size=(3, 4, FEATURES))
    mask = np.ones((3, 4), bool)
    mask[1] = False
    h0, c0 = RNG.normal(size=(3, UNITS)), RNG.normal(size=(3, UNITS))
    layer = lstm(return_sequences=return_sequences, return_state=True)
    y, h, c = layer(x, mask=mask, initial_state=[h0, c0], training=True)
    assert np.all(y[1] == 0)
    np.testing.assert_array_equal(h[1], h0[1])
    np.testing.assert_array_equal(c[1], c0[1])
    dh, dc = RNG.normal(size=(3, UNITS)), RNG.normal(size=(3, UNITS))
    dx = layer.backward(np.ones_like(y), dh=dh, dc=dc)
    assert np.all(dx[1] == 0)
    # The state gradients pass straight through the row.
    np.testing.assert_array_equal(layer.initial_state_grads[0][1], dh[1])
    np.testing.assert_array_equal(layer.initial_state_grads[1][1], dc[1])


def test_left_padding_gives_zero_outputs_before_first_real_step():
    x = RNG.normal(size=(2, 5, FEATURES))
    mask = testing.make_mask("left", 2, 5, np.random.default_rng(3))
    mask[1] = [False, False, True, True, True]
    y = lstm(return_sequences=True)(x, mask=mask)
    assert np.all(y[1, :2] == 0)
    np.testing.assert_allclose(y[1, 2:], lstm(return_sequences=True)(x[1:, 2:])[0], rtol=1e-12)


def test_bidirectional_backward_direction_starts_at_each_rows_last_real_step():
    lengths = np.array([5, 2])
    sequences = [RNG.normal(size=(n, FEATURES)) for n in lengths]
    x, mask = le.pad_batch(sequences, dtype="float64")
    layer = le.Bidirectional(le.LSTM(UNITS, return_sequences=True, return_state=True, dtype="float64",
                                     backend="numpy", seed=1), merge_mode=None)
    y_forward, y_backward, h_fw, c_fw, h_bw, c_bw = layer(x, mask=mask)
    for row, sequence in enumerate(sequences):
        n = len(sequence)
        alone_forward, alone_backward, _, _, h_bw_alone, _ = layer(sequence[None])
        np.testing.assert_allclose(y_forward[row, :n], alone_forward[0], rtol=1e-12)
        np.testing.assert_allclose(y_backward[row, :n], alone_backward[0], rtol=1e-12)  # in input order
        np.testing.assert_allclose(h_bw[row], h_bw_alone[0], rtol=1e-12)
        # Keras forces zero_output_for_mask on both directions when returning sequences.
        assert np.all(y_forward[row, n:] == 0) and np.all(y_backward[row, n:] == 0)


def test_last_output_is_at_each_rows_last_real_step():
    lengths = np.array([4, 2, 3])
    x = RNG.normal(size=(3, 4, FEATURES))
    layer = lstm(return_state=True)
    y, h, _ = layer(x, lengths=lengths)
    np.testing.assert_array_equal(y, h)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(y[row], layer(x[row:row + 1, :n])[0][0], rtol=1e-12)
