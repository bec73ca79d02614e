"""Build lstmeng layers from Keras and PyTorch LSTMs, weights included.

Neither library is imported here: the objects passed in are read through
their public attributes.
"""

from __future__ import annotations

import warnings

import numpy as np

from lstmeng.bidirectional import Bidirectional
from lstmeng.dropout import Dropout
from lstmeng.layers import LSTM
from lstmeng.sequential import Sequential

_KERAS_LSTM_OPTIONS = ("units", "activation", "recurrent_activation", "use_bias", "unit_forget_bias",
                       "dropout", "recurrent_dropout", "return_sequences", "return_state",
                       "go_backwards", "stateful")


def _keras_activation_name(value):
    name = value if isinstance(value, str) else getattr(value, "__name__", str(value))
    return name


def _lstm_from_keras(layer, **overrides):
    config = layer.get_config()
    options = {key: config[key] for key in _KERAS_LSTM_OPTIONS if key in config}
    options["activation"] = _keras_activation_name(options.get("activation", "tanh"))
    options["recurrent_activation"] = _keras_activation_name(options.get("recurrent_activation", "sigmoid"))
    options["zero_output_for_mask"] = bool(getattr(layer, "zero_output_for_mask", False))
    dtype = getattr(layer, "dtype", None) or config.get("dtype")
    dtype = getattr(dtype, "name", dtype) if not isinstance(dtype, dict) else dtype.get("config", {}).get("name")
    options["dtype"] = dtype if dtype in ("float32", "float64") else "float32"
    options.update(overrides)
    lstm = LSTM(**options)
    weights = [np.asarray(w) for w in layer.get_weights()]
    if weights:
        lstm.set_weights(weights)
    return lstm


def from_keras(keras_layer, backend="auto"):
    """Equivalent lstmeng layer of a ``keras.layers.LSTM``, ``Bidirectional(LSTM)``,
    ``Dropout`` or a ``keras.Sequential`` of those, with the same weights.

    Example (needs Keras)::

        k = keras.layers.LSTM(8, return_sequences=True); k.build((None, None, 3))
        mine = le.from_keras(k)        # same outputs as k on any input
    """
    class_name = type(keras_layer).__name__
    if class_name == "LSTM":
        return _lstm_from_keras(keras_layer, backend=backend)
    if class_name == "Bidirectional":
        if type(keras_layer.forward_layer).__name__ != "LSTM":
            raise TypeError(f"Bidirectional must wrap an LSTM, got {type(keras_layer.forward_layer).__name__}")
        forward = _lstm_from_keras(keras_layer.forward_layer, backend=backend)
        backward = _lstm_from_keras(keras_layer.backward_layer, backend=backend)
        return Bidirectional(forward, merge_mode=keras_layer.merge_mode, backward_layer=backward)
    if class_name == "Dropout":
        return Dropout(keras_layer.rate)
    if class_name == "Sequential":
        if any(type(layer).__name__ == "Masking" for layer in keras_layer.layers):
            # lstmeng has no Masking layer: the mask is an argument of the call.
            warnings.warn("from_keras: the Keras Masking layer is dropped; give the lstmeng model "
                          "mask= (or lengths=) to get the same outputs on padded input", stacklevel=2)
        layers = [layer for layer in keras_layer.layers if type(layer).__name__ not in ("InputLayer", "Masking")]
        return Sequential([from_keras(layer, backend=backend) for layer in layers])
    raise TypeError(f"from_keras converts keras LSTM, Bidirectional(LSTM), Dropout and Sequential; got {class_name}")


def from_torch(torch_lstm, backend="auto", dtype=None):
    """Equivalent lstmeng model of a ``torch.nn.LSTM``.

    Each torch layer becomes an ``LSTM`` (or ``Bidirectional(LSTM, merge_mode="concat")``)
    with return_sequences=True, and ``time_major = not batch_first``. PyTorch's
    gate order (i, f, g, o) is Keras's; its two biases are summed. The result
    is a ``Sequential``: its output is torch's output, and after a call
    ``model.states`` lists, per layer, torch layer k's final ``[h, c]``
    (``h_n[k]``, ``c_n[k]``), or ``[h_fw, c_fw, h_bw, c_bw]`` when
    bidirectional (``h_n[2k]``, ``c_n[2k]``, ``h_n[2k+1]``, ``c_n[2k+1]``);
    torch's inter-layer dropout becomes ``Dropout`` layers, whose entries are
    None. ``proj_size`` is not supported. An ``lstmeng.torch.LSTM`` keeps its
    ``activation`` and ``recurrent_activation`` (tanh and sigmoid for ``nn.LSTM``).
    """
    if type(torch_lstm).__name__ != "LSTM" or not hasattr(torch_lstm, "weight_ih_l0"):
        raise TypeError(f"from_torch expects a torch.nn.LSTM, got {type(torch_lstm).__name__}")
    if getattr(torch_lstm, "proj_size", 0):
        raise ValueError("from_torch: proj_size > 0 has no lstmeng equivalent")
    if dtype is None:
        dtype = str(torch_lstm.weight_ih_l0.dtype).replace("torch.", "")
    layers = []
    for index in range(torch_lstm.num_layers):
        directions = []
        for suffix in ("", "_reverse") if torch_lstm.bidirectional else ("",):
            def weight(name):
                return getattr(torch_lstm, f"{name}_l{index}{suffix}").detach().cpu().numpy()  # noqa: B023 (called in this iteration)
            kernel = weight("weight_ih").T
            recurrent_kernel = weight("weight_hh").T
            use_bias = bool(torch_lstm.bias)
            lstm = LSTM(torch_lstm.hidden_size, return_sequences=True, use_bias=use_bias,
                        go_backwards=suffix == "_reverse", time_major=not torch_lstm.batch_first,
                        activation=getattr(torch_lstm, "activation", "tanh"),
                        recurrent_activation=getattr(torch_lstm, "recurrent_activation", "sigmoid"),
                        dtype=dtype, backend=backend)
            arrays = [kernel, recurrent_kernel] + ([weight("bias_ih") + weight("bias_hh")] if use_bias else [])
            directions.append(lstm.set_weights(arrays))
        if torch_lstm.bidirectional:
            layers.append(Bidirectional(directions[0], merge_mode="concat", backward_layer=directions[1]))
        else:
            layers.append(directions[0])
        if torch_lstm.dropout > 0 and index < torch_lstm.num_layers - 1:
            layers.append(Dropout(torch_lstm.dropout))
    return Sequential(layers)
