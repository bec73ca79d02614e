"""Bidirectional: a layer run forward and a copy of it backward in time, outputs merged.

Same verbs as LSTM: ``__call__``, ``backward``, ``params`` / ``grads``,
``build``, ``get_weights`` / ``set_weights`` (Keras's order: the forward
direction's, then the backward's), ``get_config`` / ``from_config``,
``to(device)`` / ``device``.
"""

from __future__ import annotations

import numpy as np

from lstmeng import _validation
from lstmeng._arrays import PrefixedArrays
from lstmeng._composite import _move_all, _set_weights_all_or_nothing
from lstmeng._tape import TrainingTape
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

    def backward(self, dy, dstates=None, *, input_grad=True):
        """Gradients of the most recent training call not yet backpropagated (see ``LSTM.backward``).

        Args:
            dy: gradient of the merged output (a list ``[dy_fw, dy_bw]`` when merge_mode is None).
            dstates: ``[dh_fw, dc_fw, dh_bw, dc_bw]`` or None.
            input_grad: False when x needs no gradient: neither direction computes dx.

        Returns:
            dx, same shape as x (None without ``input_grad``).
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
        # References, not copies (a training step allocates nothing for this): a backward that
        # replaces the gradient arrays leaves these intact for the restore below.
        forward_grads_before = dict(self.forward_layer.grads.items())
        forward_grads = self.forward_layer.run_backprop(forward_plan, input_grad=input_grad)
        try:
            backward_grads = self.backward_layer.run_backprop(backward_plan, input_grad=input_grad)
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
        if not input_grad:
            return None
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
