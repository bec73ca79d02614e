"""lstmeng.losses against their formulas and finite differences."""

import numpy as np
import pytest

import lstmeng as le
from lstmeng import losses

from _backends import numerical_gradient


def _check_gradient(loss_function, predictions, *args, **kwargs):
    _, gradient = loss_function(predictions, *args, **kwargs)
    expected = numerical_gradient(lambda: loss_function(predictions, *args, **kwargs)[0], predictions)
    np.testing.assert_allclose(gradient, expected, rtol=1e-6, atol=1e-9)


def test_mean_squared_error_formula_mask_and_gradient():
    rng = np.random.default_rng(0)
    predictions, targets = rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 4, 2))
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]], bool)
    loss, _ = losses.mean_squared_error(predictions, targets)
    assert loss == pytest.approx(np.mean((predictions - targets) ** 2), rel=1e-12)
    masked, _ = losses.mean_squared_error(predictions, targets, mask=mask)
    assert masked == pytest.approx(np.mean(((predictions - targets) ** 2)[mask]), rel=1e-12)
    _check_gradient(losses.mean_squared_error, predictions, targets)
    _check_gradient(losses.mean_squared_error, predictions, targets, mask=mask)


def test_softmax_cross_entropy_ids_one_hot_mask_and_gradient():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 5)) * 3
    ids = rng.integers(0, 5, size=(2, 3))
    mask = np.array([[True, True, False], [True, False, False]])
    log_probabilities = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probabilities, ids[..., None], -1)[..., 0]
    loss, gradient = losses.softmax_cross_entropy(logits, ids, mask=mask)
    assert loss == pytest.approx(-picked[mask].mean(), rel=1e-12)
    assert not gradient[~mask].any()
    one_hot = np.eye(5)[ids]
    loss_one_hot, gradient_one_hot = losses.softmax_cross_entropy(logits, one_hot, mask=mask)
    assert loss_one_hot == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(gradient_one_hot, gradient, rtol=1e-12)
    _check_gradient(losses.softmax_cross_entropy, logits, ids)
    _check_gradient(losses.softmax_cross_entropy, logits, ids, mask=mask)
    soft = rng.dirichlet(np.ones(5), size=(2, 3))
    _check_gradient(losses.softmax_cross_entropy, logits, soft)


def test_binary_cross_entropy_formula_and_gradient():
    rng = np.random.default_rng(2)
    logits, targets = rng.normal(size=(6, 1)) * 3, (rng.random((6, 1)) < 0.5).astype(float)
    probability = 1 / (1 + np.exp(-logits))
    expected = -np.mean(targets * np.log(probability) + (1 - targets) * np.log(1 - probability))
    assert losses.binary_cross_entropy(logits, targets)[0] == pytest.approx(expected, rel=1e-12)
    _check_gradient(losses.binary_cross_entropy, logits, targets)


def test_losses_are_stable_for_large_logits_and_empty_masks():
    logits = np.array([[1000.0, -1000.0]], np.float32)
    loss, gradient = losses.softmax_cross_entropy(logits, np.array([1]))
    assert np.isfinite(loss) and loss == pytest.approx(2000.0) and np.all(np.isfinite(gradient))
    assert gradient.dtype == np.float32
    loss, gradient = losses.binary_cross_entropy(np.array([800.0, -800.0]), np.array([0.0, 1.0]))
    assert loss == pytest.approx(800.0) and np.all(np.isfinite(gradient))
    loss, gradient = losses.mean_squared_error(np.ones((2, 1)), np.zeros((2, 1)), mask=np.zeros(2, bool))
    assert loss == 0.0 and not gradient.any()


def test_losses_name_the_bad_argument():
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\), got 3"):
        losses.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"targets must be integer class ids of shape \(2,\)"):
        losses.softmax_cross_entropy(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(TypeError, match="mask must be boolean"):
        losses.binary_cross_entropy(np.zeros(2), np.zeros(2), mask=np.ones(2))
    with pytest.raises(ValueError, match=r"mask must have shape \(2,\), got \(3,\)"):
        losses.mean_squared_error(np.zeros((2, 1)), np.zeros((2, 1)), mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="loss must be one of"):
        losses.get("hinge")
    assert le.losses.get("mse") is losses.mean_squared_error
