"""le.fit: the same weights as the hand-written loop, history, early stopping, plot, errors."""

import sys

import numpy as np
import pytest

import lstmeng as le

from _backends import backends


def _data(rows=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4, 2)).astype("float32")
    lengths = rng.integers(1, 5, size=rows)
    mask = le.lengths_to_mask(lengths, maxlen=4)
    targets = (np.sum(x[..., 0] * mask, axis=1) > 0).astype("float32")[:, None]
    return x, targets, mask


def _model(seed=0):
    return le.Sequential([le.LSTM(6, return_sequences=True, backend="numpy", seed=seed),
                          le.LSTM(4, backend="numpy", seed=seed + 1), le.Dense(1, seed=seed + 2)])


def test_fit_takes_the_same_steps_as_the_hand_written_loop():
    x, targets, mask = _data()
    model, reference = _model(), _model()
    history = le.fit(model, "binary_cross_entropy", le.optim.Adam(model, lr=1e-2), (x, targets, mask),
                     epochs=2, batch_size=16, clip_norm=0.5, seed=3, progress=False)

    optimizer = le.optim.Adam(reference, lr=1e-2)
    rng = np.random.default_rng(3)
    epoch_losses = []
    for _ in range(2):
        order, total = rng.permutation(len(x)), 0.0
        for start in range(0, len(x), 16):
            rows = order[start:start + 16]
            logits = reference(x[rows], mask=mask[rows], training=True)
            loss, dlogits = le.losses.binary_cross_entropy(logits, targets[rows])
            reference.backward(dlogits)
            le.optim.clip_grad_norm(reference, 0.5)
            optimizer.step()
            total += loss * len(rows)
        epoch_losses.append(total / len(x))
    for got, want in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(history.history["loss"], epoch_losses, rtol=1e-12)
    assert history.epochs_run == 2 and not history.stopped_early


def test_fit_learns_and_reports_validation_metrics_per_epoch(capsys):
    x, targets, mask = _data(rows=96)
    model = _model()
    history = le.fit(model, "binary_cross_entropy", le.optim.Adam(model, lr=2e-2), (x[:64], targets[:64], mask[:64]),
                     validation_data=(x[64:], targets[64:], mask[64:]), metrics=["accuracy"], epochs=4,
                     batch_size=16, seed=0, progress=True)
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(values) == 4 for values in history.history.values())
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert "epoch 4/4" in capsys.readouterr().err        # the tqdm bar
    scores = le.evaluate(model, "binary_cross_entropy", (x[64:], targets[64:], mask[64:]), metrics=["accuracy"])
    assert scores["loss"] == pytest.approx(history.history["val_loss"][-1], rel=1e-9)
    logits = model(x[64:], mask=mask[64:])
    assert scores["accuracy"] == pytest.approx(np.mean((logits > 0) == (targets[64:] > 0.5)))


def test_early_stopping_restores_the_best_epoch():
    x, targets, mask = _data()
    model = _model()
    validation_rows = 8
    scores = iter([0.5, 0.4, 0.6, 0.7, 0.8, 0.9])   # one per validation pass: the best is epoch 2
    snapshots = []

    def watched(outputs, targets_, mask_=None):
        if len(outputs) != validation_rows:           # a training batch: not watched
            return 0.0
        snapshots.append([w.copy() for w in model.get_weights()])
        return next(scores)

    history = le.fit(model, "binary_cross_entropy", le.optim.SGD(model, lr=0.5), (x, targets, mask),
                     validation_data=(x[:validation_rows], targets[:validation_rows], mask[:validation_rows]),
                     metrics=[watched], monitor="val_watched", patience=2, epochs=10, batch_size=48,
                     progress=False)
    assert history.stopped_early and history.best_epoch == 2
    assert history.epochs_run == 4 and history.history["val_watched"] == [0.5, 0.4, 0.6, 0.7]
    for got, want in zip(model.get_weights(), snapshots[1]):
        np.testing.assert_array_equal(got, want)
    assert not all(np.array_equal(a, b) for a, b in zip(snapshots[1], snapshots[3]))


def test_plot_is_written_or_warned_about(tmp_path, monkeypatch):
    x, targets, mask = _data(rows=16)
    model = _model()
    path = tmp_path / "loss.png"
    le.fit(model, "binary_cross_entropy", le.optim.SGD(model, lr=0.1), (x, targets, mask), epochs=1,
           batch_size=16, progress=False, plot=str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        le.fit(model, "binary_cross_entropy", le.optim.SGD(model, lr=0.1), (x, targets, mask), epochs=1,
               batch_size=16, progress=False, plot=str(tmp_path / "none.png"))


def test_fit_names_bad_arguments_and_a_diverging_loss():
    x, targets, mask = _data(rows=16)
    model = _model()
    optimizer = le.optim.SGD(model, lr=0.1)
    with pytest.raises(ValueError, match="monitor='val_loss' needs validation_data"):
        le.fit(model, "mse", optimizer, (x, targets), monitor="val_loss", progress=False)
    with pytest.raises(ValueError, match="same number of rows, got 16, 15"):
        le.fit(model, "mse", optimizer, (x, targets[:15]), progress=False)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        le.fit(model, "mse", optimizer, (x, targets), epochs=0, progress=False)
    with pytest.raises(TypeError, match="optimizer must be an lstmeng.optim optimizer"):
        le.fit(model, "mse", "adam", (x, targets), progress=False)
    bad = x.copy()
    bad[3, 0, 0] = np.nan
    with pytest.raises(FloatingPointError, match="epoch 1, batch 1"):
        le.fit(model, "mse", optimizer, (bad, targets), batch_size=16, progress=False)


@pytest.mark.parametrize("backend", backends(only=("cython", "numba_cuda")))
def test_fit_on_another_backend_matches_numpy(backend):
    """The same fit on cython or the CUDA simulator (the whole model on the device, batches copied in once)
    ends with the NumPy weights."""
    x, targets, mask = _data(rows=8)
    x = x[:, :3]
    mask = mask[:, :3]
    weights = {}
    for name in ("numpy", backend):
        model = le.Sequential([le.LSTM(3, backend=name, seed=0), le.Dense(1, seed=1)])
        le.fit(model, "binary_cross_entropy", le.optim.Adam(model, lr=1e-2), (x, targets, mask), epochs=1,
               batch_size=4, clip_norm=1.0, seed=0, progress=False)
        weights[name] = model.get_weights()
    for got, want in zip(weights[backend], weights["numpy"]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
