"""Bidirectional, Dropout and Sequential: layers built from LSTM layers (and Dense, Embedding).

Each has the same verbs as LSTM: ``__call__``, ``backward``, ``params`` /
``grads``, ``build``, ``get_weights`` / ``set_weights`` (in Keras's order, so a
Keras model's weights load into the equivalent lstmeng model),
``get_config`` / ``from_config``, and ``to(device)`` / ``device``.
"""

from __future__ import annotations

import numpy as np

from lstmeng import _validation
from lstmeng._weights import LayerArrays, PrefixedArrays, TrainingTape
from lstmeng.backends import registry
from lstmeng.dense import Dense, Embedding
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

    Both directions are clones (``LSTM.clone``; Keras rebuilds its sublayers
    from config): ``layer`` and ``backward_layer`` themselves are never
    changed, and training updates ``forward_layer`` and ``backward_layer``.
    With return_sequences both directions output zeros at masked steps (as
    Keras forces), and the backward direction's output is put back in input
    order, so on a right-padded batch it starts at each row's last real step.
    return_state gives ``[y, h_fw, c_fw, h_bw, c_bw]``. The directions are run
    through their public two-phase calls (``plan``/``run``,
    ``plan_backprop``/``run_backprop``): every argument of both is checked
    before either runs.

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
        if backward_layer is not None:
            if not isinstance(backward_layer, LSTM):
                raise TypeError(f"backward_layer must be an lstmeng.LSTM, got {type(backward_layer).__name__}")
            for option in ("return_sequences", "return_state", "stateful", "time_major", "dtype"):
                if getattr(backward_layer, option) != getattr(layer, option):
                    raise ValueError(f"backward_layer.{option} must equal layer.{option} "
                                     f"({getattr(layer, option)!r}), got {getattr(backward_layer, option)!r}")
            if backward_layer.go_backwards == layer.go_backwards:
                raise ValueError("backward_layer.go_backwards must be the opposite of layer.go_backwards")
        # Both directions are clones (Keras rebuilds its sublayers from config), configured here:
        # with return_sequences both output zeros at masked steps, as Keras forces. The layers the
        # caller passed are never changed; train and read the weights through forward_layer and
        # backward_layer.
        zero_output_for_mask = layer.return_sequences
        self.forward_layer = layer.clone(zero_output_for_mask=zero_output_for_mask)
        if backward_layer is None:
            # The mirror of the forward layer; another seed gives it its own weights and dropout masks.
            seed = None if layer.seed is None else layer.seed + 1
            backward = LSTM.from_config({**self.forward_layer.get_config(), "go_backwards": not layer.go_backwards,
                                         "seed": seed, "kernel_initializer": layer.kernel_initializer,
                                         "recurrent_initializer": layer.recurrent_initializer,
                                         "bias_initializer": layer.bias_initializer})
            if layer.device != "cpu":
                backward.to(layer.device)   # the mirror lives where the forward layer does
            self.backward_layer = backward
        else:
            self.backward_layer = backward_layer.clone(zero_output_for_mask=zero_output_for_mask)
        self.return_sequences = layer.return_sequences
        self.return_state = layer.return_state
        self.time_major = layer.time_major
        self._tapes = TrainingTape()   # per training call: (backend, y_forward, y_backward) for the unmerge
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

    def _directions(self):
        return [("forward", self.forward_layer), ("backward", self.backward_layer)]

    params = property(lambda self: PrefixedArrays(self._directions, "params"),
                      lambda self, mapping: PrefixedArrays(self._directions, "params").assign_all(mapping),
                      doc='"forward.<name>" / "backward.<name>" -> the directions\' live arrays (writes checked).')
    grads = property(lambda self: PrefixedArrays(self._directions, "grads"),
                     lambda self, mapping: PrefixedArrays(self._directions, "grads").assign_all(mapping),
                     doc="The directions' gradients under the keys of ``params``.")

    def zero_grads(self):
        """Set both directions' gradients to zero; returns self."""
        self.forward_layer.zero_grads()
        self.backward_layer.zero_grads()
        return self

    def reset_tape(self):
        """Drop every training call not yet backpropagated; returns self."""
        self._tapes.clear()
        self.forward_layer.reset_tape()
        self.backward_layer.reset_tape()
        return self

    def get_weights(self) -> list:
        return self.forward_layer.get_weights() + self.backward_layer.get_weights()

    def set_weights(self, weights):
        weights = list(weights)
        count = 3 if self.forward_layer.use_bias else 2
        backward_count = 3 if self.backward_layer.use_bias else 2
        if len(weights) != count + backward_count:
            raise ValueError(f"set_weights expects {count + backward_count} arrays (forward layer's, then "
                             f"backward layer's), got {len(weights)}")
        _set_weights_all_or_nothing([(self.forward_layer, weights[:count]), (self.backward_layer, weights[count:])])
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
    def last_states(self):
        """``[h_fw, c_fw, h_bw, c_bw]`` of the most recent call; None before any."""
        return self._last_states

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
        forward_plan = self.forward_layer.plan(x, mask, lengths, states[0], check_finite=check_finite, build=False)
        backward_plan = self.backward_layer.plan(x, mask, lengths, states[1], state_offset=2, build=False)
        features = _validation.shape_of(forward_plan.x)[2]
        for direction in (self.forward_layer, self.backward_layer):
            if not direction.built:
                direction.build(features)
        y_forward, h_forward, c_forward = self.forward_layer.run(forward_plan, training, keep_input_order=True)
        try:
            y_backward, h_backward, c_backward = self.backward_layer.run(backward_plan, training,
                                                                          keep_input_order=True)
        except Exception:
            if training:
                self.forward_layer.discard_last_training_call()
            raise
        backend = forward_plan.backend
        self._last_states = [h_forward, c_forward, h_backward, c_backward]
        if training:   # an inference call leaves the tape as it is
            self._tapes.push((backend, y_forward, y_backward))
        merged = self._merge(backend, y_forward, y_backward)
        if self.return_state:
            outputs = merged if isinstance(merged, list) else [merged]
            return outputs + [h_forward, c_forward, h_backward, c_backward]
        return merged

    def _merge(self, backend, y_forward, y_backward):
        if self.merge_mode == "concat":
            return backend.ops.concatenate([y_forward, y_backward], axis=-1)
        if self.merge_mode == "sum":
            return backend.ops.add(y_forward, y_backward)
        if self.merge_mode == "ave":
            return backend.ops.scale(backend.ops.add(y_forward, y_backward), 0.5)
        if self.merge_mode == "mul":
            return backend.ops.multiply(y_forward, y_backward)
        return [y_forward, y_backward]

    def backward(self, dy, dstates=None):
        """Gradients of the most recent training call not yet backpropagated (see ``LSTM.backward``).

        Args:
            dy: gradient of the merged output (a list ``[dy_fw, dy_bw]`` when merge_mode is None).
            dstates: ``[dh_fw, dc_fw, dh_bw, dc_bw]`` or None.

        Returns:
            dx, same shape as x.
        """
        backend, y_forward, y_backward = self._tapes.peek()
        dy_forward, dy_backward = self._unmerge(backend, dy, y_forward, y_backward)
        if dstates is None:
            dstates = [None] * 4
        elif len(dstates) != 4:
            raise ValueError("dstates must be [dh_fw, dc_fw, dh_bw, dc_bw] (entries may be None)")
        # Both directions' gradients are checked before either direction's backward consumes its workspace.
        forward_plan = self.forward_layer.plan_backprop(dy_forward, dstates[0], dstates[1], keep_input_order=True,
                                                        state_arguments=("dstates[0]", "dstates[1]"))
        backward_plan = self.backward_layer.plan_backprop(dy_backward, dstates[2], dstates[3], keep_input_order=True,
                                                          state_arguments=("dstates[2]", "dstates[3]"))
        forward_grads_before = {name: value.copy() for name, value in self.forward_layer.grads.items()}
        forward_grads = self.forward_layer.run_backprop(forward_plan)
        try:
            backward_grads = self.backward_layer.run_backprop(backward_plan)
        except Exception:
            # Only the backend itself fails here (every argument was checked above). The forward
            # direction's workspace is consumed, so the call cannot be backpropagated again: it is
            # dropped from every tape, and the forward direction's gradients are put back.
            self.backward_layer.discard_last_training_call()
            self._tapes.pop()
            if forward_grads_before:
                self.forward_layer.grads = forward_grads_before
            raise
        self._tapes.pop()
        return backend.ops.add(forward_grads.dx, backward_grads.dx)   # both in x's layout

    def _unmerge(self, backend, dy, y_forward, y_backward):
        if self.merge_mode is None:
            if not isinstance(dy, (list, tuple)) or len(dy) != 2:
                raise ValueError("with merge_mode=None, dy must be [dy_forward, dy_backward]")
            # Checked before the forward direction's backward consumes its workspace.
            for index, (gradient, output) in enumerate(zip(dy, (y_forward, y_backward))):
                expected = _validation.shape_of(output)
                if hasattr(gradient, "shape") and _validation.shape_of(gradient) != expected:
                    raise ValueError(f"dy[{index}] must have shape {expected}, got {_validation.shape_of(gradient)}")
            return dy[0], dy[1]
        expected = _validation.shape_of(y_forward)
        if self.merge_mode == "concat":
            expected = expected[:-1] + (expected[-1] + _validation.shape_of(y_backward)[-1],)
        if _validation.shape_of(dy) != expected:
            raise ValueError(f"dy must have shape {expected}, got {_validation.shape_of(dy)}")
        if registry.array_kind(dy) == "host":
            dy = backend.ops.asarray(np.asarray(dy), self.forward_layer.dtype)
        if self.merge_mode == "concat":
            return backend.ops.split_last(dy, [self.forward_layer.units, self.backward_layer.units])
        if self.merge_mode == "sum":
            return dy, dy
        if self.merge_mode == "ave":
            half = backend.ops.scale(dy, 0.5)
            return half, half
        return backend.ops.multiply(dy, y_backward), backend.ops.multiply(dy, y_forward)

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
        self._tapes = TrainingTape()
        self._params, self._grads = {}, {}

    params = property(lambda self: LayerArrays(self, "params"), doc="Empty: Dropout has no weights.")
    grads = property(lambda self: LayerArrays(self, "grads"), doc="Empty: Dropout has no weights.")

    def zero_grads(self):
        return self

    def reset_tape(self):
        self._tapes.clear()
        return self

    def __call__(self, x, training=False):
        if registry.array_kind(x) == "host":
            x = np.asarray(x)
        if not training:   # an inference call leaves the tape as it is
            return x
        if self.rate == 0:
            self._tapes.push(("identity", None, tuple(x.shape)))
            return x
        backend = registry.backend_for_array(x) if registry.array_kind(x) != "host" else None
        keep = 1.0 - self.rate
        shape = tuple(int(n) for n in x.shape)
        dtype = np.dtype(getattr(x.dtype, "name", str(x.dtype)))
        noise = (self._rng.random(shape) < keep).astype(dtype) / dtype.type(keep)
        if backend is None:
            self._tapes.push(("host", noise, shape))
            return np.asarray(x) * noise
        noise = backend.ops.asarray(noise, dtype)
        self._tapes.push(("backend", (backend, noise), shape))
        return backend.ops.multiply(x, noise)

    def backward(self, dy):
        """dy: the output's shape; returns dx (the most recent training call's, as LSTM.backward)."""
        kind, noise, shape = self._tapes.peek()
        if _validation.shape_of(dy) != shape:
            raise ValueError(f"dy must have shape {shape}, got {_validation.shape_of(dy)}")
        self._tapes.pop()
        if kind == "identity":
            return dy
        if kind == "host":
            return np.asarray(dy) * noise
        backend, noise = noise
        return backend.ops.multiply(dy, noise)

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


LAYER_CLASSES = {"LSTM": LSTM, "Bidirectional": Bidirectional, "Dropout": Dropout, "Dense": Dense,
                 "Embedding": Embedding}
_RECURRENT = (LSTM, Bidirectional)
_HOST_ONLY = (Dense, Embedding)   # compute on host arrays: the model copies device activations to them


class Sequential:
    """A stack of layers: Embedding, LSTM, Bidirectional, Dropout and Dense.

    The mask travels with the sequence: an ``Embedding(mask_zero=True)`` makes
    one from its ids (``ids != 0``), every layer that returns sequences passes
    it on (Dense and Dropout too), and a layer that returns its last output
    consumes it. ``initial_state`` goes to the first recurrent layer; after a
    backward its gradients are in ``initial_state_grads`` (as on LSTM).

    ``params`` and ``grads`` are live mappings keyed ``"<index>.<name>"``, e.g.
    ``"0.forward.kernel"``, ``"2.recurrent_kernel"``: an assignment
    ``model.params[k] = new`` is checked (shape, dtype, device) and copied into
    the sublayer's array. After each call ``states`` holds the final states of
    each recurrent layer (``[h, c]``, or ``[h_fw, c_fw, h_bw, c_bw]`` for
    Bidirectional), None for others.

    Training calls are backpropagated last-in-first-out, as on every layer
    (see ``LSTM.backward``); inference calls in between are not recorded.

    On the GPU (``model.to("cuda")``) the recurrent layers live on the device
    and Dense/Embedding on the host: activations are copied between them.

    Example:
        >>> import numpy as np, lstmeng as le
        >>> model = le.Sequential([le.Embedding(20, 4, mask_zero=True, seed=0),
        ...                        le.Bidirectional(le.LSTM(4, return_sequences=True, seed=1)),
        ...                        le.LSTM(3, seed=2), le.Dense(2, seed=3)])
        >>> ids = np.array([[5, 2, 7, 0], [3, 9, 0, 0]])
        >>> y = model(ids, training=True)
        >>> model.backward(np.ones_like(y)) is None, y.shape, sorted(model.grads)[:2]
        (True, (2, 2), ['0.embeddings', '1.backward.bias'])
    """

    def __init__(self, layers):
        layers = list(layers)
        for index, layer in enumerate(layers):
            if not isinstance(layer, tuple(LAYER_CLASSES.values())):
                raise TypeError(f"layers[{index}] must be one of {', '.join(LAYER_CLASSES)}, "
                                f"got {type(layer).__name__}")
            if getattr(layer, "return_state", False):
                raise ValueError(f"layers[{index}] has return_state=True; inside Sequential read "
                                 "model.states instead")
            if isinstance(layer, Bidirectional) and layer.merge_mode is None:
                raise ValueError(f"layers[{index}]: merge_mode=None returns two outputs; "
                                 "use a merging mode inside Sequential")
            if isinstance(layer, Embedding) and index != 0:
                raise ValueError(f"layers[{index}] is an Embedding: it takes integer ids, so it must be layers[0]")
        self.layers = layers
        self.states = None
        self.initial_state_grads = None
        self._tapes = TrainingTape()   # per training call: the array kinds and shapes between layers

    def _recurrent(self):
        return [layer for layer in self.layers if isinstance(layer, _RECURRENT)]

    def _indexed(self):
        return [(str(index), layer) for index, layer in enumerate(self.layers)]

    params = property(lambda self: PrefixedArrays(self._indexed, "params"),
                      lambda self, mapping: PrefixedArrays(self._indexed, "params").assign_all(mapping),
                      doc='"<index>.<name>" -> the layers\' live arrays (writes checked and copied in).')
    grads = property(lambda self: PrefixedArrays(self._indexed, "grads"),
                     lambda self, mapping: PrefixedArrays(self._indexed, "grads").assign_all(mapping),
                     doc="The layers' gradients under the keys of ``params``.")

    def zero_grads(self):
        """Set every layer's gradients to zero; returns self."""
        for layer in self.layers:
            layer.zero_grads()
        return self

    def reset_tape(self):
        """Drop every training call not yet backpropagated, in every layer; returns self."""
        self._tapes.clear()
        for layer in self.layers:
            layer.reset_tape()
        return self

    @property
    def device(self) -> str:
        """Where the recurrent layers' params, grads and states live ("cpu" without any)."""
        recurrent = self._recurrent()
        return recurrent[0].device if recurrent else "cpu"

    def to(self, device):
        """Move every recurrent layer to ``device`` ("cpu", "cuda", "cuda:N"); returns self.

        Dense and Embedding stay on the host (they compute on host arrays).
        """
        _move_all(self._recurrent(), device)
        return self

    def build(self, input_size=None):
        """Build every layer for ``input_size`` features (ignored after an Embedding); returns self."""
        size = input_size
        for layer in self.layers:
            if isinstance(layer, Dropout):
                continue
            if isinstance(layer, Embedding):
                layer.build()
            else:
                layer.build(size)
            size = layer.units
        return self

    def get_weights(self) -> list:
        return [w for layer in self.layers for w in layer.get_weights()]

    def set_weights(self, weights):
        weights = list(weights)
        counts = [len(_expected_weight_names(layer)) for layer in self.layers]
        if len(weights) != sum(counts):
            raise ValueError(f"set_weights expects {sum(counts)} arrays (layer by layer), got {len(weights)}")
        starts = [sum(counts[:index]) for index in range(len(counts))]
        _set_weights_all_or_nothing([(layer, weights[start:start + count])
                                     for layer, start, count in zip(self.layers, starts, counts)])
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

    def summary(self, input_size=None) -> str:
        """A table of the layers, their output shapes and parameter counts (also printed).

        Shapes use None for the batch and time sizes; an unbuilt layer's
        parameters are counted once ``input_size`` (or a first call) settles them.

        Example:
            >>> import lstmeng as le
            >>> text = le.Sequential([le.Embedding(50, 8), le.LSTM(16), le.Dense(3)]).summary()
            Layer                         Output shape            Params
            0 Embedding(50, 8)            (None, None, 8)            400
            1 LSTM(16)                    (None, 16)                1600
            2 Dense(3, linear)            (None, 3)                   51
            Total parameters: 2051
        """
        rows, total = [], 0
        size = input_size
        sequence = True
        for index, layer in enumerate(self.layers):
            count = _parameter_count(layer, size)
            total += count or 0
            if isinstance(layer, Embedding):
                size, sequence = layer.output_dim, True
            elif isinstance(layer, _RECURRENT):
                size, sequence = layer.units, bool(layer.return_sequences)
            elif isinstance(layer, Dense):
                size = layer.units
            shape = ("None", "None", str(size)) if sequence else ("None", str(size))
            rows.append((f"{index} {_short_name(layer)}", "(" + ", ".join(shape) + ")",
                         "?" if count is None else str(count)))
        width = max([30] + [len(name) + 2 for name, _, _ in rows])
        lines = [f"{'Layer':<{width}}{'Output shape':<20}{'Params':>10}"]
        lines += [f"{name:<{width}}{shape:<20}{count:>10}" for name, shape, count in rows]
        lines.append(f"Total parameters: {total}")
        text = "\n".join(lines)
        print(text)
        return text

    def __call__(self, x, mask=None, lengths=None, initial_state=None, training=False, check_finite=False):
        """Run every layer in turn.

        Args:
            x: ``[B, T, I]`` features, or integer ids ``[B, T]`` when layers[0] is an Embedding.
            mask: bool ``[B, T]`` (True = real step) or lengths: ints ``[B]``; one or neither.
            initial_state: the first recurrent layer's (``[h0, c0]``, or four arrays for Bidirectional).
            training: record the call for ``backward``.
            check_finite: the first recurrent layer raises on NaN/inf in its input.

        Returns:
            the last layer's output, in the array kind of x (NumPy in, NumPy out).
        """
        if mask is not None and lengths is not None:
            raise ValueError("give mask or lengths, not both")
        recurrent = self._recurrent()
        if lengths is not None:
            from lstmeng.masking import lengths_to_mask
            shape = _validation.shape_of(x)
            # The first recurrent layer (not layers[0], which may be a Dropout) says how x is laid out.
            time_major = bool(recurrent) and recurrent[0].time_major
            mask = lengths_to_mask(np.asarray(lengths), maxlen=shape[0] if time_major else shape[1])
        if initial_state is not None and not recurrent:
            raise ValueError("initial_state is given but the model has no recurrent layer")
        input_kind = registry.array_kind(x)
        input_shape = _validation.shape_of(x) if hasattr(x, "shape") else np.shape(x)
        states, kinds = [], []
        for layer in self.layers:
            if isinstance(layer, Embedding):
                ids = _to_host(x)
                made = layer.compute_mask(ids)
                x = layer(ids, training=training)
                if made is not None:
                    mask = made if mask is None else np.logical_and(_to_host(mask), made)
            elif isinstance(layer, Dense):
                x = layer(_to_host(x), training=training)
            elif isinstance(layer, Dropout):
                x = layer(x, training=training)
            else:
                if layer.device != "cpu" and registry.array_kind(x) == "host":
                    # One copy in for a run of GPU layers, instead of a round trip per layer.
                    x = registry.get_backend_object("numba_cuda").ops.asarray(
                        _validation.check_numeric_array(x, "x", layer.dtype), layer.dtype)
                first = layer is recurrent[0]
                x = layer(x, mask=mask, initial_state=initial_state if first else None, training=training,
                          check_finite=check_finite and first)
                if not layer.return_sequences:
                    mask = None
            states.append(_final_states(layer) if isinstance(layer, _RECURRENT) else None)
            kinds.append((registry.array_kind(x), _validation.shape_of(x)))
        if input_kind == "host":   # NumPy in, NumPy out: the output and the reported states too
            x = _to_host(x)
            states = [None if group is None else [_to_host(state) for state in group] for group in states]
        self.states = states
        if training:   # an inference call leaves the tape as it is
            self._tapes.push((input_kind, input_shape, kinds, initial_state is not None,
                              (registry.array_kind(x), _validation.shape_of(x))))
        return x

    def backward(self, dy):
        """Backpropagate ``dy`` (the output's shape) through every layer, most recent training call first.

        Returns:
            dx in the array kind of the call's x, or None when layers[0] is an Embedding (ids have no
            gradient). Sets every layer's ``grads`` and, when the call had an initial_state,
            ``initial_state_grads``.
        """
        input_kind, input_shape, kinds, got_initial_state, (_, output_shape) = self._tapes.peek()
        # Checked before any layer consumes its tape: a bad dy leaves every tape as it was.
        _validation.check_shape(dy, "dy", output_shape)
        recurrent = self._recurrent()
        for index in reversed(range(len(self.layers))):
            layer = self.layers[index]
            if kinds[index][0] == "cuda" and registry.array_kind(dy) == "host":
                dy = registry.get_backend_object("numba_cuda").ops.asarray(
                    _validation.check_numeric_array(dy, "dy", layer.dtype), layer.dtype)
            elif kinds[index][0] == "host":
                dy = _to_host(dy)
            dy = layer.backward(dy)
            if recurrent and layer is recurrent[0]:
                grads = layer.initial_state_grads if got_initial_state else None
                self.initial_state_grads = None if grads is None else [_to_host(g) if input_kind == "host" else g
                                                                       for g in grads]
        self._tapes.pop()
        if dy is None:
            return None
        return _to_host(dy) if input_kind == "host" else dy

    def __repr__(self):
        return "Sequential([" + ", ".join(repr(layer) for layer in self.layers) + "])"


def _set_weights_all_or_nothing(assignments) -> None:
    """``layer.set_weights(weights)`` for each ``(layer, weights)`` in turn, as one transaction.

    Every layer's own ``set_weights`` checks all its arrays before it assigns any (a failed call
    changes nothing). When one raises here, the layers already set get back what they had (their
    weights, or unbuilt if they had none) and the error propagates: nothing is left half-updated.
    Used by ``Bidirectional`` (its two directions) and ``Sequential`` (its layers).
    """
    done = []
    try:
        for layer, weights in assignments:
            saved = layer.get_weights()
            layer.set_weights(weights)
            done.append((layer, saved))
    except Exception:
        for layer, saved in reversed(done):
            _restore_weights(layer, saved)
        raise


def _restore_weights(layer, saved: list) -> None:
    """Give ``layer`` back the weights ``saved`` (from its ``get_weights``); [] makes it unbuilt again."""
    if saved:
        layer.set_weights(saved)
    elif isinstance(layer, Bidirectional):
        for direction in (layer.forward_layer, layer.backward_layer):
            _restore_weights(direction, [])
    elif not isinstance(layer, Dropout):
        layer._params = {}
        if hasattr(layer, "input_size"):
            layer.input_size = None


def _to_host(array):
    """A CUDA or TensorFlow array copied to a host NumPy array; host arrays as they are."""
    if array is None or registry.array_kind(array) == "host":
        return array
    return registry.backend_for_array(array).ops.to_numpy(array)


def _short_name(layer) -> str:
    if isinstance(layer, Dense):
        return f"Dense({layer.units}, {layer.activation or 'linear'})"
    if isinstance(layer, Embedding):
        return f"Embedding({layer.input_dim}, {layer.output_dim})"
    if isinstance(layer, Bidirectional):
        return f"Bidirectional(LSTM({layer.forward_layer.units}), {layer.merge_mode})"
    if isinstance(layer, LSTM):
        return f"LSTM({layer.units})"
    return repr(layer)


def _parameter_count(layer, input_size):
    """Number of weights of ``layer`` for ``input_size`` input features (None while unknown)."""
    if isinstance(layer, Dropout):
        return 0
    if layer.built if not isinstance(layer, Bidirectional) else layer.forward_layer.built:
        return int(sum(int(np.prod(value.shape)) for value in layer.params.values()))
    if isinstance(layer, Embedding):
        return layer.input_dim * layer.output_dim
    if input_size is None:
        return None
    if isinstance(layer, Dense):
        return input_size * layer.units + (layer.units if layer.use_bias else 0)
    directions = [layer.forward_layer, layer.backward_layer] if isinstance(layer, Bidirectional) else [layer]
    return sum(int(sum(np.prod(shape) for shape in direction.weight_shapes(input_size).values()))
               for direction in directions)


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
    return layer.last_states


def _expected_weight_names(layer):
    if isinstance(layer, Dropout):
        return []
    if isinstance(layer, Dense):
        return ["kernel"] + (["bias"] if layer.use_bias else [])
    if isinstance(layer, Embedding):
        return ["embeddings"]
    if isinstance(layer, Bidirectional):
        return _expected_weight_names(layer.forward_layer) + _expected_weight_names(layer.backward_layer)
    return ["kernel", "recurrent_kernel"] + (["bias"] if layer.use_bias else [])
