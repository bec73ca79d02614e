"""set_weights of Bidirectional and Sequential is all or nothing, built or not (one helper serves both)."""

import numpy as np
import pytest

import lstmeng as le

FEATURES, UNITS = 3, 4


def _lstm_weights(input_size, units, value=0.5):
    return [np.full((input_size, 4 * units), value), np.full((units, 4 * units), value), np.full(4 * units, value)]


def test_bidirectional_failure_leaves_an_unbuilt_layer_unbuilt():
    layer = le.Bidirectional(le.LSTM(UNITS, backend="numpy"))
    bad_backward = [np.ones((FEATURES, 4 * UNITS)), np.ones((UNITS + 1, 4 * UNITS)), np.ones(4 * UNITS)]
    with pytest.raises(ValueError, match="recurrent_kernel"):
        layer.set_weights(_lstm_weights(FEATURES, UNITS) + bad_backward)
    assert not layer.forward_layer.built and not layer.backward_layer.built
    assert layer.forward_layer.get_weights() == [] and layer.backward_layer.get_weights() == []
    layer.set_weights(_lstm_weights(FEATURES, UNITS) * 2)   # and a good call still works
    assert layer.forward_layer.built and layer.backward_layer.built


def test_sequential_failure_restores_built_and_unbuilt_layers():
    model = le.Sequential([le.LSTM(UNITS, return_sequences=True, backend="numpy", seed=1), le.Dropout(0.5),
                           le.Bidirectional(le.LSTM(2, backend="numpy", seed=2)), le.Dense(1, seed=3)])
    good = _lstm_weights(FEATURES, UNITS) + _lstm_weights(UNITS, 2) * 2 + [np.ones((4, 1)), np.ones(1)]
    bad = good[:-2] + [np.ones((4, 2)), np.ones(1)]   # only the Dense kernel is wrong (2 units, not 1)
    with pytest.raises(ValueError, match="kernel"):
        model.set_weights(bad)
    assert not any(getattr(layer, "built", False) for layer in (model.layers[0], model.layers[2].forward_layer,
                                                                model.layers[2].backward_layer))
    assert model.layers[3]._params == {} and model.layers[3].input_size is None
    model.set_weights(good)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match="kernel"):
        model.set_weights([w + 1 for w in bad[:-2]] + bad[-2:])
    for after, expected in zip(model.get_weights(), before):
        np.testing.assert_array_equal(after, expected)
