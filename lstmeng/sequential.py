"""Sequential: a stack of Embedding, LSTM, Bidirectional, Dropout and Dense layers.

Same verbs as LSTM: ``__call__``, ``backward``, ``params`` / ``grads``,
``build``, ``get_weights`` / ``set_weights`` (in Keras's order, so a Keras
model's weights load into the equivalent lstmeng model), ``get_config`` /
``from_config``, ``to(device)`` / ``device``, and ``summary()``.

On the GPU (``model.to("cuda")``) every layer lives and computes on the
device, Embedding and Dense included: a host input is copied in once, before
the first layer on the GPU, and the output copied out (NumPy in, NumPy out);
a device input gives a device output, and no activation, mask or gradient
crosses the bus in between.
"""

from __future__ import annotations

import numpy as np

from lstmeng import _validation
from lstmeng._arrays import PrefixedArrays, array_dtype_name
from lstmeng._composite import _move_all, _set_weights_all_or_nothing
from lstmeng._tape import TrainingTape
from lstmeng.backends import registry
from lstmeng.bidirectional import Bidirectional
from lstmeng.dense import Dense, Embedding
from lstmeng.dropout import Dropout
from lstmeng.layers import LSTM

LAYER_CLASSES = {"LSTM": LSTM, "Bidirectional": Bidirectional, "Dropout": Dropout, "Dense": Dense,
                 "Embedding": Embedding}
_RECURRENT = (LSTM, Bidirectional)


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

    On the GPU (``model.to("cuda")``) every layer lives on the device: a host
    input is copied in once (ids stay integers) and the output copied out; the
    Embedding's mask is made on the device, and nothing else crosses the bus.

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

    def _placed(self):
        """The layers that live somewhere (all but Dropout)."""
        return [layer for layer in self.layers if not isinstance(layer, Dropout)]

    @property
    def device(self) -> str:
        """Where the layers' params, grads and states live: the first one's that is not on "cpu", else "cpu"."""
        return next((layer.device for layer in self._placed() if layer.device != "cpu"), "cpu")

    def to(self, device):
        """Move every layer to ``device`` ("cpu", "cuda", "cuda:N"); returns self (all or nothing)."""
        _move_all(self._placed(), device)
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
            if not isinstance(layer, Dropout) and layer.device != "cpu" and registry.array_kind(x) == "host":
                # One copy in for a run of GPU layers, instead of a round trip per layer.
                x = _copy_in(layer, x)
            if isinstance(layer, Embedding):
                made = layer.compute_mask(x)
                x = layer(x, training=training)
                if made is not None:
                    mask = made if mask is None else _both(mask, made)
            elif isinstance(layer, (Dense, Dropout)):
                x = layer(x, training=training)
            else:
                first = layer is recurrent[0]
                x = layer(x, mask=mask, initial_state=initial_state if first else None, training=training,
                          check_finite=check_finite and first)
                if not layer.return_sequences:
                    mask = None
            states.append(_final_states(layer) if isinstance(layer, _RECURRENT) else None)
            kinds.append((registry.array_kind(x), _validation.shape_of(x), array_dtype_name(x)))
        if input_kind == "host":   # NumPy in, NumPy out: the output and the reported states too
            x = _to_host(x)
            states = [None if group is None else [_to_host(state) for state in group] for group in states]
        self.states = states
        if training:   # an inference call leaves the tape as it is
            self._tapes.push((input_kind, input_shape, kinds, initial_state is not None, _validation.shape_of(x)))
        return x

    def backward(self, dy, *, input_grad=True):
        """Backpropagate ``dy`` (the output's shape) through every layer, most recent training call first.

        Args:
            dy: the gradient of the model's output.
            input_grad: False when x needs no gradient (``le.fit`` passes it): a recurrent first
                layer then skips its dx product, and None is returned.

        Returns:
            dx in the array kind of the call's x, or None when layers[0] is an Embedding (ids have no
            gradient) or without ``input_grad``. Sets every layer's ``grads`` and, when the call had an
            initial_state, ``initial_state_grads``.
        """
        input_kind, input_shape, kinds, got_initial_state, output_shape = self._tapes.peek()
        # Checked before any layer consumes its tape: a bad dy leaves every tape as it was.
        _validation.check_shape(dy, "dy", output_shape)
        recurrent = self._recurrent()
        for index in reversed(range(len(self.layers))):
            layer = self.layers[index]
            kind, _, dtype = kinds[index]   # dy goes to the layer in the kind of the layer's output
            if kind == "cuda" and registry.array_kind(dy) == "host":
                dy = registry.get_backend_object("numba_cuda").ops.asarray(
                    _validation.check_numeric_array(dy, "dy", dtype), dtype)
            elif kind == "host":
                dy = _to_host(dy)
            if index == 0 and not input_grad and isinstance(layer, (LSTM, Bidirectional)):
                dy = layer.backward(dy, input_grad=False)
            else:
                dy = layer.backward(dy)
            if recurrent and layer is recurrent[0]:
                grads = layer.initial_state_grads if got_initial_state else None
                self.initial_state_grads = None if grads is None else [_to_host(g) if input_kind == "host" else g
                                                                       for g in grads]
        self._tapes.pop()
        if dy is None or not input_grad:
            return None
        return _to_host(dy) if input_kind == "host" else dy

    def __repr__(self):
        return "Sequential([" + ", ".join(repr(layer) for layer in self.layers) + "])"


def _copy_in(layer, x):
    """A host input copied to the GPU for ``layer``: ids as integers for an Embedding (which checks them
    there), features checked and cast to the layer's dtype for the others."""
    ops = registry.get_backend_object("numba_cuda").ops
    if isinstance(layer, Embedding):
        ids = np.asarray(x)
        return ops.asarray(ids, ids.dtype)
    return ops.asarray(_validation.check_numeric_array(x, "x", layer.dtype), layer.dtype)


def _both(mask, made):
    """The caller's mask ``[B, T]`` and an Embedding's ``made`` one combined (True = real step in both);
    on the device when either is there."""
    if registry.array_kind(made) == "host":
        return np.logical_and(_to_host(mask), made)
    from lstmeng.backends import _cuda_layers
    ops = registry.get_backend_object("numba_cuda").ops
    _validation.check_shape(mask, "mask", _validation.shape_of(made))
    device_mask = ops.asarray(mask, np.dtype(array_dtype_name(mask, "mask")))
    if np.dtype(device_mask.dtype) != np.bool_:
        raise TypeError(f"mask must be boolean (True = real step), got dtype {device_mask.dtype}")
    return _cuda_layers.logical_and(device_mask, ops.view(made))


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
