"""Bidirectional, Dropout and Sequential: layers built from LSTM layers.

Each has the same verbs as LSTM: ``__call__``, ``backward``, ``params`` /
``grads``, ``build``, ``get_weights`` / ``set_weights`` (in Keras's order, so a
Keras model's weights load into the equivalent lstmeng model),
``get_config`` / ``from_config``, and ``to(device)`` / ``device``.
"""

from __future__ import annotations

import numpy as np

from lstmeng import _validation
from lstmeng.backends import registry
from lstmeng.layers import LSTM

MERGE_MODES = ("concat", "sum", "mul", "ave", None)


class Bidirectional:
    """Runs a layer forward and a copy of it backward in time and merges the outputs.

    Args:
        layer: an ``LSTM``; its config makes the backward layer (with
            go_backwards flipped) unless ``backward_layer`` is given.
        merge_mode: "concat" | "sum" | "mul" | "ave" | None (None returns
            ``[y_forward, y_backward]``).
        backward_layer: an ``LSTM`` with go_backwards opposite to ``layer``'s.

    With return_sequences both directions output zeros at masked steps (as
    Keras forces), and the backward direction's output is put back in input
    order, so on a right-padded batch it starts at each row's last real step.
    return_state gives ``[y, h_fw, c_fw, h_bw, c_bw]``.

    Example:
        >>> import numpy as np, lstmeng as le
        >>> bi = le.Bidirectional(le.LSTM(3, return_sequences=True, seed=0))
        >>> bi(np.ones((2, 4, 5), "float32"), lengths=[4, 2]).shape
        (2, 4, 6)
    """

    def __init__(self, layer, merge_mode="concat", backward_layer=None):
        if not isinstance(layer, LSTM):
            raise TypeError(f"layer must be an lstmeng.LSTM, got {type(layer).__name__}")
        self.merge_mode = _validation.check_choice(merge_mode, "merge_mode", MERGE_MODES)
        if backward_layer is None:
            config = layer.get_config()
            for key in ("kernel_initializer", "recurrent_initializer", "bias_initializer"):
                config[key] = getattr(layer, key)  # a callable, not the name get_config gives it
            config["go_backwards"] = not layer.go_backwards
            if config["seed"] is not None:
                config["seed"] += 1  # different weights and dropout masks from the forward copy
            backward_layer = LSTM.from_config(config)
            if layer.device != "cpu":
                backward_layer.to(layer.device)   # the copy lives where the forward layer does
        elif not isinstance(backward_layer, LSTM):
            raise TypeError(f"backward_layer must be an lstmeng.LSTM, got {type(backward_layer).__name__}")
        else:
            for option in ("return_sequences", "return_state", "stateful", "time_major", "dtype"):
                if getattr(backward_layer, option) != getattr(layer, option):
                    raise ValueError(f"backward_layer.{option} must equal layer.{option} "
                                     f"({getattr(layer, option)!r}), got {getattr(backward_layer, option)!r}")
            if backward_layer.go_backwards == layer.go_backwards:
                raise ValueError("backward_layer.go_backwards must be the opposite of layer.go_backwards")
        self.forward_layer = layer
        self.backward_layer = backward_layer
        self.return_sequences = layer.return_sequences
        self.return_state = layer.return_state
        self.time_major = layer.time_major
        for direction in (self.forward_layer, self.backward_layer):
            direction.zero_output_for_mask = self.return_sequences
        self._merge_inputs = None
        self._last_states = None

    @property
    def units(self) -> int:
        return self.forward_layer.units + self.backward_layer.units if self.merge_mode == "concat" \
            else self.forward_layer.units

    @property
    def input_size(self):
        return self.forward_layer.input_size

    @property
    def dtype(self):
        return self.forward_layer.dtype

    # -- device -------------------------------------------------------------------
    @property
    def device(self) -> str:
        """Where both directions' params, grads and states live: "cpu" or "cuda:N"."""
        return self.forward_layer.device

    def to(self, device):
        """Move both directions to ``device`` ("cpu", "cuda", "cuda:N"); returns self."""
        _move_all([self.forward_layer, self.backward_layer], device)
        return self

    # -- weights and config -------------------------------------------------------
    def build(self, input_size):
        self.forward_layer.build(input_size)
        self.backward_layer.build(input_size)
        return self

    @property
    def params(self) -> dict:
        return _prefixed({"forward": self.forward_layer.params, "backward": self.backward_layer.params})

    @property
    def grads(self) -> dict:
        return _prefixed({"forward": self.forward_layer.grads, "backward": self.backward_layer.grads})

    def get_weights(self) -> list:
        return self.forward_layer.get_weights() + self.backward_layer.get_weights()

    def set_weights(self, weights):
        weights = list(weights)
        count = 3 if self.forward_layer.use_bias else 2
        backward_count = 3 if self.backward_layer.use_bias else 2
        if len(weights) != count + backward_count:
            raise ValueError(f"set_weights expects {count + backward_count} arrays (forward layer's, then "
                             f"backward layer's), got {len(weights)}")
        saved = (self.forward_layer.get_weights(), self.forward_layer.input_size)
        self.forward_layer.set_weights(weights[:count])
        try:
            self.backward_layer.set_weights(weights[count:])
        except Exception:
            if saved[1] is None:
                self.forward_layer.params, self.forward_layer.input_size = {}, None
            else:
                self.forward_layer.set_weights(saved[0])  # nothing half-updated
            raise
        return self

    def get_config(self) -> dict:
        return {
            "layer": self.forward_layer.get_config(),
            "merge_mode": self.merge_mode,
            "backward_layer": self.backward_layer.get_config(),
        }

    @classmethod
    def from_config(cls, config: dict) -> "Bidirectional":
        backward = config.get("backward_layer")
        return cls(LSTM.from_config(config["layer"]), merge_mode=config.get("merge_mode", "concat"),
                   backward_layer=None if backward is None else LSTM.from_config(backward))

    def reset_state(self, states=None):
        if states is None:
            self.forward_layer.reset_state()
            self.backward_layer.reset_state()
        else:
            if len(states) != 4:
                raise ValueError("states must be [h_fw, c_fw, h_bw, c_bw]")
            self.forward_layer.reset_state(states[:2])
            self.backward_layer.reset_state(states[2:])

    @property
    def initial_state_grads(self):
        forward, backward = self.forward_layer.initial_state_grads, self.backward_layer.initial_state_grads
        return None if forward is None else forward + backward

    # -- forward and backward --------------------------------------------------------
    def __call__(self, x, mask=None, lengths=None, initial_state=None, training=False, check_finite=False):
        """Same arguments as ``LSTM.__call__``; initial_state is ``[h_fw, c_fw, h_bw, c_bw]``."""
        if initial_state is not None and (not isinstance(initial_state, (list, tuple)) or len(initial_state) != 4):
            raise ValueError("initial_state of Bidirectional must be a list [h_fw, c_fw, h_bw, c_bw], got "
                             + (f"{type(initial_state).__name__} of length {len(initial_state)}"
                                if isinstance(initial_state, (list, tuple)) else type(initial_state).__name__))
        states = (None, None) if initial_state is None else (list(initial_state[:2]), list(initial_state[2:]))
        # Both directions' arguments are checked before either direction runs or
        # is built: an error leaves states, dropout generators and weights as they were.
        forward_call = self.forward_layer._prepare_call(x, mask, lengths, states[0], check_finite, build=False)
        backward_call = self.backward_layer._prepare_call(x, mask, lengths, states[1], False, state_offset=2,
                                                          build=False)
        features = _validation.shape_of(forward_call.x)[2]
        self.forward_layer._ensure_built(features)
        self.backward_layer._ensure_built(features)
        y_forward, h_forward, c_forward = self.forward_layer._run_call(forward_call, training, input_order=True)
        try:
            y_backward, h_backward, c_backward = self.backward_layer._run_call(backward_call, training,
                                                                                input_order=True)
        except Exception:
            self.forward_layer._tape = None
            raise
        backend = forward_call.backend
        self._last_states = [h_forward, c_forward, h_backward, c_backward]
        self._merge_inputs = (backend, y_forward, y_backward) if training else None
        merged = self._merge(backend, y_forward, y_backward)
        if self.return_state:
            outputs = merged if isinstance(merged, list) else [merged]
            return outputs + [h_forward, c_forward, h_backward, c_backward]
        return merged

    def _merge(self, backend, y_forward, y_backward):
        if self.merge_mode == "concat":
            return backend.concatenate([y_forward, y_backward], axis=-1)
        if self.merge_mode == "sum":
            return backend.add(y_forward, y_backward)
        if self.merge_mode == "ave":
            return backend.scale(backend.add(y_forward, y_backward), 0.5)
        if self.merge_mode == "mul":
            return backend.multiply(y_forward, y_backward)
        return [y_forward, y_backward]

    def backward(self, dy, dstates=None):
        """Gradients of the last training call.

        Args:
            dy: gradient of the merged output (a list ``[dy_fw, dy_bw]`` when merge_mode is None).
            dstates: ``[dh_fw, dc_fw, dh_bw, dc_bw]`` or None.

        Returns:
            dx, same shape as x.
        """
        if self._merge_inputs is None:
            raise RuntimeError("backward needs a forward call with training=True first")
        backend, y_forward, y_backward = self._merge_inputs
        dy_forward, dy_backward = self._unmerge(backend, dy, y_forward, y_backward)
        if dstates is None:
            dstates = [None] * 4
        elif len(dstates) != 4:
            raise ValueError("dstates must be [dh_fw, dc_fw, dh_bw, dc_bw] (entries may be None)")
        # Checked here, before the forward direction's backward runs and consumes its tape.
        directions = (self.forward_layer, self.forward_layer, self.backward_layer, self.backward_layer)
        for index, (direction, state_grad) in enumerate(zip(directions, dstates)):
            if state_grad is not None and direction._tape is not None:
                _validation.check_shape(state_grad, f"dstates[{index}]", (direction._tape.batch, direction.units))
        forward_tape = self.forward_layer._tape
        _, forward_grads = self.forward_layer._backward(dy_forward, dstates[0], dstates[1], input_order=True)
        try:
            _, backward_grads = self.backward_layer._backward(dy_backward, dstates[2], dstates[3], input_order=True)
        except Exception:
            self.forward_layer._tape = forward_tape
            raise
        self._merge_inputs = None
        dx = backend.add(forward_grads.dx, backward_grads.dx)
        return backend.swap_batch_time(dx) if self.time_major else dx

    def _unmerge(self, backend, dy, y_forward, y_backward):
        if self.merge_mode is None:
            if not isinstance(dy, (list, tuple)) or len(dy) != 2:
                raise ValueError("with merge_mode=None, dy must be [dy_forward, dy_backward]")
            return dy[0], dy[1]
        expected = _validation.shape_of(y_forward)
        if self.merge_mode == "concat":
            expected = expected[:-1] + (expected[-1] + _validation.shape_of(y_backward)[-1],)
        if _validation.shape_of(dy) != expected:
            raise ValueError(f"dy must have shape {expected}, got {_validation.shape_of(dy)}")
        if registry.array_kind(dy) == "host":
            dy = backend.asarray(np.asarray(dy), self.forward_layer.dtype)
        if self.merge_mode == "concat":
            return backend.split_last(dy, [self.forward_layer.units, self.backward_layer.units])
        if self.merge_mode == "sum":
            return dy, dy
        if self.merge_mode == "ave":
            half = backend.scale(dy, 0.5)
            return half, half
        return backend.multiply(dy, y_backward), backend.multiply(dy, y_forward)

    def __repr__(self) -> str:
        return f"Bidirectional({self.forward_layer!r}, merge_mode={self.merge_mode!r})"


class Dropout:
    """Inverted dropout on every element during training (identity otherwise).

    Example:
        >>> import numpy as np, lstmeng as le
        >>> le.Dropout(0.5, seed=0)(np.ones((2, 3)), training=False).tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """

    def __init__(self, rate, seed=None):
        self.rate = _validation.check_rate(rate, "rate")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self.seed = None if seed is None else int(seed)
        self._rng = np.random.default_rng(self.seed)
        self._tape = None
        self.params, self.grads = {}, {}

    def __call__(self, x, training=False):
        if registry.array_kind(x) == "host":
            x = np.asarray(x)
        if not training or self.rate == 0:
            self._tape = ("identity", None, tuple(x.shape)) if training else None
            return x
        backend = registry.backend_for_array(x) if registry.array_kind(x) != "host" else None
        keep = 1.0 - self.rate
        shape = tuple(int(n) for n in x.shape)
        dtype = np.dtype(getattr(x.dtype, "name", str(x.dtype)))
        noise = (self._rng.random(shape) < keep).astype(dtype) / dtype.type(keep)
        if backend is None:
            self._tape = ("host", noise, shape)
            return np.asarray(x) * noise
        noise = backend.asarray(noise, dtype)
        self._tape = ("backend", (backend, noise), shape)
        return backend.multiply(x, noise)

    def backward(self, dy):
        if self._tape is None:
            raise RuntimeError("backward needs a forward call with training=True first")
        kind, noise, shape = self._tape
        if _validation.shape_of(dy) != shape:
            raise ValueError(f"dy must have shape {shape}, got {_validation.shape_of(dy)}")
        self._tape = None
        if kind == "identity":
            return dy
        if kind == "host":
            return np.asarray(dy) * noise
        backend, noise = noise
        return backend.multiply(dy, noise)

    def get_weights(self):
        return []

    def set_weights(self, weights):
        if len(list(weights)) != 0:
            raise ValueError("Dropout has no weights")
        return self

    def get_config(self):
        return {"rate": self.rate, "seed": self.seed}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"Dropout({self.rate})"


LAYER_CLASSES = {"LSTM": LSTM, "Bidirectional": Bidirectional, "Dropout": Dropout}


class Sequential:
    """A stack of LSTM, Bidirectional and Dropout layers.

    The mask travels with the sequence: every layer that returns sequences
    passes it on; a layer that returns its last output consumes it.
    ``params`` and ``grads`` are flat dicts keyed ``"<index>.<name>"``, e.g.
    ``"0.forward.kernel"``, ``"2.recurrent_kernel"``. After each call
    ``states`` holds the final states of each recurrent layer (``[h, c]``, or
    ``[h_fw, c_fw, h_bw, c_bw]`` for Bidirectional), None for others.

    Example:
        >>> import numpy as np, lstmeng as le
        >>> model = le.Sequential([le.Bidirectional(le.LSTM(4, return_sequences=True, seed=0)),
        ...                        le.Dropout(0.2, seed=1), le.LSTM(3, seed=2)])
        >>> x, mask = le.pad_sequences([np.ones((5, 2)), np.ones((3, 2))])
        >>> y = model(x, mask=mask, training=True)
        >>> dx = model.backward(np.ones_like(y))
        >>> y.shape, dx.shape, sorted(model.grads)[:2]
        ((2, 3), (2, 5, 2), ['0.backward.bias', '0.backward.kernel'])
    """

    def __init__(self, layers):
        layers = list(layers)
        for index, layer in enumerate(layers):
            if not isinstance(layer, tuple(LAYER_CLASSES.values())):
                raise TypeError(f"layers[{index}] must be an LSTM, Bidirectional or Dropout, "
                                f"got {type(layer).__name__}")
            if getattr(layer, "return_state", False):
                raise ValueError(f"layers[{index}] has return_state=True; inside Sequential read "
                                 "model.states instead")
            if isinstance(layer, Bidirectional) and layer.merge_mode is None:
                raise ValueError(f"layers[{index}]: merge_mode=None returns two outputs; "
                                 "use a merging mode inside Sequential")
        self.layers = layers
        self.states = None
        self._host_io = False   # the last training call took a host x on the GPU: copy dy in, dx out

    def _recurrent(self):
        return [layer for layer in self.layers if not isinstance(layer, Dropout)]

    @property
    def device(self) -> str:
        """Where the recurrent layers' params, grads and states live ("cpu" without any)."""
        recurrent = self._recurrent()
        return recurrent[0].device if recurrent else "cpu"

    def to(self, device):
        """Move every layer to ``device`` ("cpu", "cuda", "cuda:N"); returns self."""
        _move_all(self._recurrent(), device)
        return self

    def _device_backend(self, x):
        """numba_cuda when the model lives on the GPU and ``x`` is a host array (copied in once), else None."""
        if self.device == "cpu" or registry.array_kind(x) != "host":
            return None
        return registry.get_backend_object("numba_cuda")

    def build(self, input_size):
        size = input_size
        for layer in self.layers:
            if isinstance(layer, Dropout):
                continue
            layer.build(size)
            size = layer.units
        return self

    @property
    def params(self) -> dict:
        return _prefixed({str(i): layer.params for i, layer in enumerate(self.layers)})

    @property
    def grads(self) -> dict:
        return _prefixed({str(i): layer.grads for i, layer in enumerate(self.layers)})

    def get_weights(self) -> list:
        return [w for layer in self.layers for w in layer.get_weights()]

    def set_weights(self, weights):
        weights = list(weights)
        counts = [len(_expected_weight_names(layer)) for layer in self.layers]
        if len(weights) != sum(counts):
            raise ValueError(f"set_weights expects {sum(counts)} arrays (layer by layer), got {len(weights)}")
        saved = [(layer.get_weights(), getattr(layer, "input_size", None)) for layer in self.layers]
        start = 0
        try:
            for layer, count in zip(self.layers, counts):
                layer.set_weights(weights[start:start + count])
                start += count
        except Exception:
            for layer, (old, input_size) in zip(self.layers, saved):
                if old:
                    layer.set_weights(old)
                elif isinstance(layer, LSTM):
                    layer.params, layer.input_size = {}, None
                elif isinstance(layer, Bidirectional):
                    for direction in (layer.forward_layer, layer.backward_layer):
                        direction.params, direction.input_size = {}, None
            raise
        return self

    def get_config(self) -> dict:
        return {"layers": [{"class_name": type(layer).__name__, "config": layer.get_config()}
                           for layer in self.layers]}

    @classmethod
    def from_config(cls, config: dict) -> "Sequential":
        layers = []
        for entry in config["layers"]:
            if entry.get("class_name") not in LAYER_CLASSES:
                raise ValueError(f"unknown layer class {entry.get('class_name')!r} in Sequential config")
            layers.append(LAYER_CLASSES[entry["class_name"]].from_config(entry["config"]))
        return cls(layers)

    def reset_state(self):
        for layer in self._recurrent():
            layer.reset_state()

    def __call__(self, x, mask=None, lengths=None, training=False, check_finite=False):
        """Run every layer in turn. x: ``[B, T, I]``; mask ``[B, T]`` or lengths ``[B]``."""
        if mask is not None and lengths is not None:
            raise ValueError("give mask or lengths, not both")
        recurrent = self._recurrent()
        if lengths is not None:
            from lstmeng.masking import lengths_to_mask
            shape = _validation.shape_of(x)
            # The first recurrent layer (not layers[0], which may be a Dropout) says how x is laid out.
            time_major = bool(recurrent) and recurrent[0].time_major
            mask = lengths_to_mask(np.asarray(lengths), maxlen=shape[0] if time_major else shape[1])
        # A model on the GPU called with a host x: one copy in, one copy out, instead of
        # a round trip through the host between layers.
        copy_backend = self._device_backend(x)
        if copy_backend is not None:
            x = copy_backend.asarray(_validation.check_numeric_array(x, "x", recurrent[0].dtype),
                                     recurrent[0].dtype)
        states = []
        for index, layer in enumerate(self.layers):
            if isinstance(layer, Dropout):
                x = layer(x, training=training)
                states.append(None)
                continue
            # The input is checked by the first recurrent layer, wherever it stands.
            x = layer(x, mask=mask, training=training, check_finite=check_finite and layer is recurrent[0])
            states.append(_final_states(layer))
            if not layer.return_sequences:
                mask = None
        if copy_backend is not None:  # NumPy in, NumPy out: the reported states too
            states = [None if group is None else [copy_backend.to_numpy(state) for state in group]
                      for group in states]
        self.states = states
        self._host_io = copy_backend is not None and training
        return x if copy_backend is None else copy_backend.to_numpy(x)

    def backward(self, dy):
        """Backpropagate ``dy`` (shape of the last output) through every layer; returns dx."""
        copy_backend = self._device_backend(dy) if self._host_io else None
        if copy_backend is not None:
            recurrent = self._recurrent()
            dy = copy_backend.asarray(_validation.check_numeric_array(dy, "dy", recurrent[-1].dtype),
                                      recurrent[-1].dtype)
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy if copy_backend is None else copy_backend.to_numpy(dy)

    def __repr__(self):
        return "Sequential([" + ", ".join(repr(layer) for layer in self.layers) + "])"


def _move_all(layers, device) -> None:
    """``layer.to(device)`` for each layer; on an error the layers already moved go back."""
    moved = []
    try:
        for layer in layers:
            previous = layer.device
            layer.to(device)
            moved.append((layer, previous))
    except Exception:
        for layer, previous in reversed(moved):
            layer.to(previous)
        raise


def _final_states(layer):
    """The final states of the layer's last call (kept for ``Sequential.states``)."""
    return layer._last_states


def _expected_weight_names(layer):
    if isinstance(layer, Dropout):
        return []
    if isinstance(layer, Bidirectional):
        return _expected_weight_names(layer.forward_layer) + _expected_weight_names(layer.backward_layer)
    return ["kernel", "recurrent_kernel"] + (["bias"] if layer.use_bias else [])


def _prefixed(groups: dict) -> dict:
    """Flatten ``{"0": {"kernel": a}}`` to ``{"0.kernel": a}``, nested dicts included."""
    flat = {}
    for prefix, values in groups.items():
        for name, value in values.items():
            flat[f"{prefix}.{name}"] = value
    return flat
