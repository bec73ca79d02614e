"""Parity with torch.nn.LSTM through ``le.from_torch`` on packed variable-length batches.

PyTorch is the independent reference: a packed batch (pack_padded_sequence)
runs each row only over its real steps, which lstmeng reproduces with a
right-padded mask. Compared: outputs at real steps, final states
(``model.states``), and the gradients of ``sum(output * dy)`` with respect to
the input and every weight (torch's two biases each get lstmeng's bias gradient).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import lstmeng as le

torch = pytest.importorskip("torch")
rnn_utils = pytest.importorskip("torch.nn.utils.rnn")

CASES = list(itertools.product([1, 2], [False, True], [True, False], [True, False]))


def case_id(case):
    layers, bidirectional, batch_first, bias = case
    return (f"layers{layers}-{'bi' if bidirectional else 'uni'}-{'batch_first' if batch_first else 'time_first'}"
            f"-{'bias' if bias else 'nobias'}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_from_torch_matches_packed_lstm(case, dtype):
    num_layers, bidirectional, batch_first, bias = case
    torch_dtype = getattr(torch, dtype)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=1e-10, atol=1e-10)
    grad_tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=1e-9, atol=1e-9)
    torch.manual_seed(sum(case) + num_layers * 10)
    batch, steps, features, units = 4, 6, 3, 5
    torch_lstm = torch.nn.LSTM(features, units, num_layers=num_layers, bias=bias, batch_first=batch_first,
                               bidirectional=bidirectional).to(torch_dtype)
    model = le.from_torch(torch_lstm, backend="numpy")
    assert isinstance(model, le.Sequential)

    rng = np.random.default_rng(num_layers)
    lengths = np.array([6, 2, 4, 1])
    x_batch_major = rng.normal(size=(batch, steps, features)).astype(dtype)
    x = x_batch_major if batch_first else np.ascontiguousarray(x_batch_major.swapaxes(0, 1))
    mask = le.lengths_to_mask(lengths, maxlen=steps)
    directions = 2 if bidirectional else 1
    dy_batch_major = rng.normal(size=(batch, steps, directions * units)).astype(dtype) * mask[:, :, None]
    dy = dy_batch_major if batch_first else np.ascontiguousarray(dy_batch_major.swapaxes(0, 1))

    x_torch = torch.tensor(x, requires_grad=True)
    packed = rnn_utils.pack_padded_sequence(x_torch, torch.tensor(lengths), batch_first=batch_first,
                                            enforce_sorted=False)
    packed_output, (h_n, c_n) = torch_lstm(packed)
    expected, _ = rnn_utils.pad_packed_sequence(packed_output, batch_first=batch_first, total_length=steps)
    (expected * torch.tensor(dy)).sum().backward()

    actual = model(x, lengths=lengths, training=True)
    real = mask if batch_first else mask.T
    np.testing.assert_allclose(actual[real], expected.detach().numpy()[real], **tolerance)
    for layer_index, states in enumerate(model.states):
        assert len(states) == 2 * directions
        for direction in range(directions):
            torch_index = layer_index * directions + direction
            np.testing.assert_allclose(states[2 * direction], h_n[torch_index].detach().numpy(), **tolerance,
                                       err_msg=f"h of layer {layer_index} direction {direction}")
            np.testing.assert_allclose(states[2 * direction + 1], c_n[torch_index].detach().numpy(), **tolerance,
                                       err_msg=f"c of layer {layer_index} direction {direction}")

    dx = model.backward(dy)
    np.testing.assert_allclose(dx, x_torch.grad.numpy(), **grad_tolerance, err_msg="dx")
    grads = model.grads
    for layer_index in range(num_layers):
        for direction, suffix in enumerate(["", "_reverse"][:directions]):
            prefix = f"{layer_index}." + (("forward.", "backward.")[direction] if bidirectional else "")

            def torch_grad(name):
                return getattr(torch_lstm, f"{name}_l{layer_index}{suffix}").grad.numpy()  # noqa: B023 (called in this iteration)

            np.testing.assert_allclose(grads[prefix + "kernel"], torch_grad("weight_ih").T, **grad_tolerance)
            np.testing.assert_allclose(grads[prefix + "recurrent_kernel"], torch_grad("weight_hh").T,
                                       **grad_tolerance)
            if bias:
                np.testing.assert_allclose(grads[prefix + "bias"], torch_grad("bias_ih"), **grad_tolerance)
                np.testing.assert_allclose(grads[prefix + "bias"], torch_grad("bias_hh"), **grad_tolerance)
            else:
                assert prefix + "bias" not in grads


def test_from_torch_inter_layer_dropout_becomes_dropout_layer():
    torch_lstm = torch.nn.LSTM(3, 4, num_layers=3, dropout=0.25, batch_first=True)
    model = le.from_torch(torch_lstm, backend="numpy")
    assert [type(layer).__name__ for layer in model.layers] == ["LSTM", "Dropout", "LSTM", "Dropout", "LSTM"]
    assert all(layer.rate == 0.25 for layer in model.layers[1::2])
    torch_lstm.eval()
    x = np.random.default_rng(0).normal(size=(2, 5, 3)).astype("float32")
    expected, _ = torch_lstm(torch.tensor(x))
    np.testing.assert_allclose(model(x), expected.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert model.states[1] is None


def test_from_torch_rejects_other_modules():
    with pytest.raises(TypeError, match="torch.nn.LSTM"):
        le.from_torch(torch.nn.GRU(3, 4))
    with pytest.raises(ValueError, match="proj_size"):
        le.from_torch(torch.nn.LSTM(3, 4, proj_size=2))
