"""The LSTM layer: Keras's options, explicit backward, any backend.

The layer validates its arguments, turns lengths into a mask, draws dropout
masks and hands the whole sequence to one backend call; it never loops over
time in Python.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lstmeng import _validation, masking
from lstmeng._arrays import array_dtype_name, host_copy, prepare_input, prepare_state
from lstmeng._lstm_base import LSTMBase
from lstmeng._tape import workspace_bytes
from lstmeng.backends import registry
from lstmeng.backends.base import SequenceGrads, SequenceOptions


@dataclasses.dataclass
class _TapeEntry:
    """What one training forward left for the backward (an entry of the layer's ``TrainingTape``)."""

    backend: Any
    workspace: Any            # None for an empty batch or zero time steps
    batch: int
    steps: int
    got_initial_state: bool
    host_io: bool = False     # called with a host x: dx and state gradients come back as host arrays
    input_guard: Any = None   # LSTMENG_DEBUG: checksum of the x the workspace references (InputGuard)


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
    """A call's arguments after every check, ready to run (``LSTM.plan`` makes it, ``LSTM.run`` runs it).

    Attributes:
        backend: the backend the call runs on.
        x: ``[B, T, I]`` batch-major, in the backend's array kind.
        mask: ``[B, T]`` bool, True = real step, or None.
        h0, c0: ``[B, H]`` initial states.
        got_initial_state: the caller passed ``initial_state`` (its gradients are reported).
        batch, steps: B and T.
        host_io: x was a host array, so results come back as host arrays.
    """

    backend: Any
    x: Any
    mask: Any
    h0: Any
    c0: Any
    got_initial_state: bool
    batch: int
    steps: int
    host_io: bool = False


@dataclasses.dataclass(frozen=True)
class BackpropPlan:
    """A backward's arguments after every check (``LSTM.plan_backprop`` makes it, ``LSTM.run_backprop``
    runs it): dy batch-major in processing layout (``[B, T, H]`` or ``[B, H]``), dh and dc ``[B, H]``, on
    the device of the training call they backpropagate (``entry``, the most recent one not yet
    backpropagated when the plan was made)."""

    entry: _TapeEntry
    dy: Any
    dh: Any
    dc: Any


class LSTM(LSTMBase):
    """Long short-term memory layer with Keras 3's semantics and an explicit backward pass.

    Args:
        units: H, the size of the hidden and cell states.
        activation: "tanh" | "relu" | "sigmoid" | "linear" (cell input and output).
        recurrent_activation: "sigmoid" | "hard_sigmoid" (gates).
        use_bias, kernel_initializer, recurrent_initializer, bias_initializer,
            unit_forget_bias: as in Keras.
        dropout, recurrent_dropout: inverted-dropout rates in [0, 1) on the
            inputs and on h(t-1) in the recurrence; one mask per sequence.
        return_sequences: return ``[B, T, H]`` instead of the last output ``[B, H]``.
        return_state: also return the final states: ``[y, h, c]``.
        go_backwards: process the sequence in reverse and return it reversed.
        stateful: the final states of a call are the initial states of the next.
        zero_output_for_mask: masked steps output zeros, not the previous output.
        time_major: x is ``[T, B, I]`` (and sequence outputs ``[T, B, H]``).
        dtype: "float32" | "float64".
        backend: a backend name, or "auto" (see ``lstmeng.list_backends``).
        seed: seeds weight initialization and dropout masks.

    Example:
        >>> import numpy as np, lstmeng as le
        >>> lstm = le.LSTM(4, return_sequences=True, seed=0)
        >>> x = np.ones((2, 3, 5), "float32")
        >>> y = lstm(x, lengths=[3, 1], training=True)
        >>> y.shape
        (2, 3, 4)
        >>> dx = lstm.backward(np.ones_like(y))
        >>> dx.shape, lstm.grads["kernel"].shape
        ((2, 3, 5), (5, 16))
    """

    def __init__(self, units, *, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal",
                 bias_initializer="zeros", unit_forget_bias=True, dropout=0.0, recurrent_dropout=0.0,
                 return_sequences=False, return_state=False, go_backwards=False, stateful=False,
                 zero_output_for_mask=False, time_major=False, dtype="float32", backend="auto", seed=None):
        super().__init__(
            units, activation=activation, recurrent_activation=recurrent_activation, use_bias=use_bias,
            kernel_initializer=kernel_initializer, recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer, unit_forget_bias=unit_forget_bias, dropout=dropout,
            recurrent_dropout=recurrent_dropout, dtype=dtype, backend=backend, seed=seed)
        self.return_sequences = bool(return_sequences)
        self.return_state = bool(return_state)
        self.go_backwards = bool(go_backwards)
        self.stateful = bool(stateful)
        self.zero_output_for_mask = bool(zero_output_for_mask)
        self.time_major = bool(time_major)
        self.states = None            # [h, c] kept between calls when stateful
        self.initial_state_grads = None
        self._last_states = None

    @property
    def last_states(self):
        """``[h, c]`` (each ``[B, H]``) of the most recent call, as it returned them; None before any."""
        return self._last_states

    def clone(self, **overrides) -> "LSTM":
        """A new layer with this one's config (changed by ``overrides``, e.g. ``go_backwards=True``),
        its weights if built, its carried states, its device and its dropout generator's state;
        with a tape and gradients of its own.

        ``Bidirectional`` runs clones, as Keras's rebuilds its sublayers from
        config, so the layer a user passes is never changed.

        Example:
            >>> import lstmeng as le
            >>> le.LSTM(4, seed=0).clone(go_backwards=True).go_backwards
            True
        """
        config = self.get_config()
        for key in ("kernel_initializer", "recurrent_initializer", "bias_initializer"):
            config[key] = getattr(self, key)   # the initializer itself (a callable stays a callable)
        unknown = sorted(set(overrides) - set(config))
        if unknown:
            raise TypeError(f"clone() got unknown options {unknown}; valid: {sorted(config)}")
        config.update(overrides)
        copy = type(self).from_config(config)
        if self.device != "cpu":
            copy.to(self.device)
        if self.built:
            copy.set_weights(self.get_weights())
        if self.states is not None:
            copy.reset_state([host_copy(state) for state in self.states])
        copy._rng.bit_generator.state = self._rng.bit_generator.state
        copy._device_chosen = self._device_chosen
        return copy

    # -- configuration -----------------------------------------------------------
    def get_config(self) -> dict:
        """Constructor arguments as a JSON-friendly dict."""
        config = self._options_config()
        config.update(return_sequences=self.return_sequences, return_state=self.return_state,
                      go_backwards=self.go_backwards, stateful=self.stateful,
                      zero_output_for_mask=self.zero_output_for_mask, time_major=self.time_major)
        return config

    @classmethod
    def from_config(cls, config: dict) -> "LSTM":
        return cls(**config)

    def reset_state(self, states=None):
        """Stateful layers: forget the carried states, or set them to ``[h, c]`` each ``[B, H]``."""
        if states is None:
            self.states = None
            return
        if not isinstance(states, (list, tuple)) or len(states) != 2:
            raise ValueError("states must be a list [h, c] of two arrays of shape (batch, units)")
        h = _validation.check_numeric_array(host_copy(states[0]), "states[0]", self.dtype)
        c = _validation.check_numeric_array(host_copy(states[1]), "states[1]", self.dtype)
        _validation.check_rank(h, "states[0]", 2, "(batch, units)")
        _validation.check_shape(h, "states[0]", (h.shape[0], self.units))
        _validation.check_shape(c, "states[1]", h.shape)
        self.states = [self._on_device(h.copy()), self._on_device(c.copy())]

    def _moved_states(self, move):
        return None if self.states is None else [move(state) for state in self.states]

    def _assign_moved_states(self, moved) -> None:
        self.states = moved

    # -- forward -----------------------------------------------------------------
    def __call__(self, x, mask=None, lengths=None, initial_state=None, training=False, check_finite=False):
        """Run the layer.

        Args:
            x: ``[B, T, I]`` (``[T, B, I]`` when time_major).
            mask: bool ``[B, T]``, True = real step. lengths: ints ``[B]`` for a
                right-padded batch. Give one or neither.
            initial_state: ``[h0, c0]``, each ``[B, H]``.
            training: apply dropout and keep what ``backward`` needs.
            check_finite: raise on NaN/inf in x, naming the first bad row and step.

        Returns:
            y, or ``[y, h, c]`` with return_state; y is ``[B, H]``, or
            ``[B, T, H]`` with return_sequences.
        """
        outputs, h, c = self.run(self.plan(x, mask, lengths, initial_state, check_finite=check_finite), training)
        return [outputs, h, c] if self.return_state else outputs

    def plan(self, x, mask=None, lengths=None, initial_state=None, *, check_finite=False, build=True,
             state_argument="initial_state", state_offset=0) -> ForwardPlan:
        """Check every argument of a call (same as ``__call__``'s) and build the layer if needed;
        computes nothing and changes nothing else.

        The first half of ``__call__``, public so that a wrapper running several
        layers as one call (``Bidirectional``, later fused multi-layer backends)
        checks all of them before any runs: an error leaves states, dropout
        generators and tapes untouched.

        Args:
            state_argument, state_offset: how error messages name the initial
                states (Bidirectional's backward states are ``initial_state[2]`` and ``[3]``).
            build: False leaves building an unbuilt layer to the caller (who
                checks every layer first).

        Returns:
            ForwardPlan, for ``run``.
        """
        backend = self._resolve_backend(x)
        x = prepare_input(backend, x, self.dtype)
        _validation.check_rank(x, "x", 3, "(time, batch, features)" if self.time_major
                               else "(batch, time, features)")
        # NumPy in, NumPy out: results of a GPU layer or of the TensorFlow backend are copied out.
        host_io = registry.array_kind(x) == "host"
        x = self._to_call_device(backend, x)
        if self.time_major:
            x = backend.ops.swap_batch_time(x)
        batch, steps, features = _validation.shape_of(x)
        self._check_input_size(features)
        if self.device != "cpu" and mask is not None and registry.array_kind(mask) == "cuda":
            # A torch or CuPy mask viewed as a Numba array (dtype kept: resolve_mask checks it is bool).
            mask = backend.ops.asarray(mask, np.dtype(array_dtype_name(mask, "mask")))
        mask = masking.resolve_mask(mask, lengths, batch, steps)
        h0, c0, got_initial_state = self._initial_states(backend, initial_state, batch, state_argument,
                                                         state_offset, steps)
        if check_finite:
            _validation.check_finite(backend.ops.to_numpy(x))
        if build:
            # Built only once every argument is known good, so a bad first call leaves the layer unbuilt.
            self._ensure_built(features)
        return ForwardPlan(backend, x, mask, h0, c0, got_initial_state, batch, steps, host_io)

    def run(self, plan: ForwardPlan, training=False, *, keep_input_order=False):
        """Run a call checked by ``plan`` (the layer must be built); returns ``(outputs, h, c)``.

        Args:
            training: apply dropout and record the call for the backward.
            keep_input_order: leave a go_backwards layer's sequence outputs in
                input order (step t at index t) instead of reversed, as a
                Bidirectional's backward direction needs them.
        """
        backend, x, mask, batch, steps = plan.backend, plan.x, plan.mask, plan.batch, plan.steps
        h0, c0 = plan.h0, plan.c0
        if batch == 0 or steps == 0:
            outputs = (backend.ops.zeros((batch, steps, self.units), self.dtype) if self.return_sequences
                       else backend.ops.zeros((batch, self.units), self.dtype))
            h, c = h0, c0
            workspace = None
        else:
            input_dropout_mask, recurrent_dropout_mask = self._dropout_masks(batch, training)
            kernel, recurrent_kernel, bias = self._weights_for(backend)
            if input_dropout_mask is not None:
                input_dropout_mask = backend.ops.asarray(input_dropout_mask, self.dtype)
            if recurrent_dropout_mask is not None:
                recurrent_dropout_mask = backend.ops.asarray(recurrent_dropout_mask, self.dtype)
            options = SequenceOptions.for_call(
                bias=bias, mask=mask, input_dropout_mask=input_dropout_mask,
                recurrent_dropout_mask=recurrent_dropout_mask, activation=self.activation,
                recurrent_activation=self.recurrent_activation, reverse=self.go_backwards,
                zero_output_for_mask=self.zero_output_for_mask, return_sequences=self.return_sequences,
                training=training)
            result = backend.sequence_forward(x, h0, c0, kernel, recurrent_kernel, bias, mask, input_dropout_mask,
                                              recurrent_dropout_mask, options)
            outputs, h, c, workspace = result.outputs, result.h, result.c, result.workspace
        if training:   # an inference call leaves the tape as it is
            guard = None if workspace is None else self._input_guard(x, "x", plan.host_io)
            self._tapes.push(_TapeEntry(backend, workspace, batch, steps, plan.got_initial_state, plan.host_io,
                                        guard), lambda: workspace_bytes(workspace))
        if self.stateful:
            # Host arrays are mutable: carry copies so that a caller editing the
            # returned h or c in place does not change the next call's state.
            # (tf.Tensor is immutable; device arrays are the caller's to keep.)
            self.states = [h.copy(), c.copy()] if isinstance(h, np.ndarray) else [h, c]
        if self.return_sequences:
            if self.go_backwards and not keep_input_order:
                outputs = backend.ops.flip_time(outputs)
            if self.time_major:
                outputs = backend.ops.swap_batch_time(outputs)
        self._device_chosen = True   # a call has run here: later CUDA inputs to a CPU layer are errors
        if plan.host_io:  # NumPy in, NumPy out; carried states stay in the backend's kind
            outputs, h, c = (_to_host(backend, array) for array in (outputs, h, c))
        self._last_states = [h, c]
        return outputs, h, c

    def discard_last_training_call(self) -> None:
        """Drop the most recent training call not yet backpropagated (its workspace is freed).

        For wrappers that run several layers as one call and must undo the
        ones that ran when a later one fails.
        """
        self._tapes.drop_last()

    def _initial_states(self, backend, initial_state, batch, argument="initial_state", offset=0, steps=1):
        shape = (batch, self.units)
        if initial_state is not None:
            if not isinstance(initial_state, (list, tuple)) or len(initial_state) != 2:
                raise ValueError(
                    f"{argument} must be a list [h0, c0] of arrays of shape {shape}, got {type(initial_state).__name__}"
                    + (f" of length {len(initial_state)}" if isinstance(initial_state, (list, tuple)) else ""))
            h0 = prepare_state(backend, initial_state[0], self.dtype, f"{argument}[{offset}]", shape)
            c0 = prepare_state(backend, initial_state[1], self.dtype, f"{argument}[{offset + 1}]", shape)
            return self._to_call_device(backend, h0), self._to_call_device(backend, c0), True
        if self.stateful and self.states is not None:
            if _validation.shape_of(self.states[0]) != shape:
                raise ValueError(f"stateful layer carries states of shape {_validation.shape_of(self.states[0])} "
                                 f"but x has batch {batch}; call reset_state() first")
            h0, c0 = (backend.ops.asarray(state, self.dtype) for state in self.states)
            return h0, c0, False
        if batch and steps:
            # Read only (a call with steps returns new states): shared zeros, no fill per call.
            zeros = backend.ops.zeros_constant(shape, self.dtype)
            return zeros, zeros, False
        return backend.ops.zeros(shape, self.dtype), backend.ops.zeros(shape, self.dtype), False

    # -- backward ----------------------------------------------------------------
    def backward(self, dy, dh=None, dc=None, *, input_grad=True):
        """Gradients of the outputs of the most recent ``training=True`` call not yet backpropagated.

        Training calls are recorded on a tape and backpropagated last-in-first-out;
        inference calls in between do not touch it. The first backward after
        the tape was empty replaces ``grads``; the backward of an earlier
        training call of the same round adds to them (a layer applied twice
        gets the sum of both uses' gradients). See ``TrainingTape``.

        Args:
            dy: same shape as the returned y.
            dh, dc: ``[B, H]`` gradients of the returned final states, or None.
            input_grad: False when x needs no gradient (the first layer of a model on
                data): the backend skips dx's product and None is returned.

        Returns:
            dx, same shape as x (None without ``input_grad``). Also sets ``grads`` and
            ``initial_state_grads``.

        Example:
            >>> import numpy as np, lstmeng as le
            >>> encoder = le.LSTM(3, seed=0)
            >>> a, b = np.ones((2, 4, 5), "float32"), np.zeros((1, 2, 5), "float32")
            >>> y_a, y_b = encoder(a, training=True), encoder(b, training=True)
            >>> encoder.backward(np.ones_like(y_b)).shape, encoder.backward(np.ones_like(y_a)).shape
            ((1, 2, 5), (2, 4, 5))
        """
        grads = self.run_backprop(self.plan_backprop(dy, dh, dc), input_grad=input_grad)
        return grads.dx

    def plan_backprop(self, dy, dh=None, dc=None, *, keep_input_order=False, dy_argument="dy",
                      state_arguments=("dh", "dc")) -> BackpropPlan:
        """Check ``backward``'s arguments against the most recent training call not yet
        backpropagated; computes nothing and consumes nothing.

        The first half of ``backward``, public so that a wrapper checks every
        layer's gradients before any layer's backward consumes its workspace.

        Args:
            keep_input_order: dy of a go_backwards layer is in input order (as
                ``run(..., keep_input_order=True)`` returned its outputs).
            dy_argument, state_arguments: how error messages name dy, dh and dc.

        Returns:
            BackpropPlan, for ``run_backprop``.
        """
        entry = self._tapes.peek()
        if entry.input_guard is not None:   # LSTMENG_DEBUG: x unchanged since the forward?
            entry.input_guard.check()
        backend = entry.backend
        state_shape = (entry.batch, self.units)
        if self.return_sequences:
            expected = ((entry.steps, entry.batch, self.units) if self.time_major
                        else (entry.batch, entry.steps, self.units))
        else:
            expected = state_shape
        dy = self._prepare_grad(backend, dy, dy_argument, expected)
        # Default state gradients are read only when there is a workspace (the backward copies
        # them); without one they are returned as the initial states' gradients: fresh zeros.
        zeros = backend.ops.zeros_constant if entry.workspace is not None else backend.ops.zeros
        dh_argument, dc_argument = state_arguments
        dh = zeros(state_shape, self.dtype) if dh is None else self._prepare_grad(backend, dh, dh_argument,
                                                                                  state_shape)
        dc = zeros(state_shape, self.dtype) if dc is None else self._prepare_grad(backend, dc, dc_argument,
                                                                                  state_shape)
        dy, dh, dc = (self._to_call_device(backend, array) for array in (dy, dh, dc))
        if self.return_sequences:
            if self.time_major:
                dy = backend.ops.swap_batch_time(dy)
            if self.go_backwards and not keep_input_order:
                dy = backend.ops.flip_time(dy)
        return BackpropPlan(entry, dy, dh, dc)

    def run_backprop(self, plan: BackpropPlan, *, input_grad: bool = True) -> SequenceGrads:
        """Backpropagate a training call checked by ``plan_backprop``: consumes its tape entry,
        sets ``grads`` (replacing, or adding within a round: see ``backward``) and
        ``initial_state_grads``.

        Returns:
            SequenceGrads; dx in x's layout (``[T, B, I]`` when time_major), or None
            without ``input_grad``; dh0 and dc0 None when the call got no ``initial_state``
            (nothing to backpropagate to: the backend skips dh0's product); host arrays for
            dx and the state gradients when the call's x was a host array.
        """
        entry = plan.entry
        if self._tapes.last is not entry:
            raise RuntimeError("run_backprop: the plan is not for the most recent training call not yet "
                               "backpropagated (another call or backward ran since plan_backprop)")
        backend, dy, dh, dc = entry.backend, plan.dy, plan.dh, plan.dc
        accumulate = self._tapes.next_backward_adds   # a later backward of this round adds to grads
        if entry.workspace is None:  # empty batch or zero steps: outputs were constants
            zero = self._zero_weight_grads(backend)
            grads = SequenceGrads(
                dx=backend.ops.zeros((entry.batch, entry.steps, self.input_size), self.dtype) if input_grad else None,
                dh0=dh if entry.got_initial_state else None, dc0=dc if entry.got_initial_state else None,
                dkernel=zero["kernel"], drecurrent_kernel=zero["recurrent_kernel"],
                dbias=zero.get("bias", np.zeros(4 * self.units, self.dtype)))
        elif self._device != "cpu" and backend.accepts_grads_out and not accumulate:
            # On the GPU the gradients are written into the arrays of the last backward (as
            # PyTorch's .grad): a training loop allocates none. Copy them to keep them.
            grads = backend.sequence_backward(dy, dh, dc, entry.workspace, grads_out=self._grads,
                                              input_grad=input_grad, state_grads=entry.got_initial_state)
        else:
            # Initial states the caller did not give (zeros, or a stateful layer's carried ones)
            # take no gradient: the backend may skip dh0's product (a one-step call's only
            # product with the recurrent kernel).
            grads = backend.sequence_backward(dy, dh, dc, entry.workspace, input_grad=input_grad,
                                              state_grads=entry.got_initial_state)
        self._tapes.pop()
        self._store_grads(backend, grads, accumulate)
        if self.time_major and grads.dx is not None:
            grads.dx = backend.ops.swap_batch_time(grads.dx)
        if entry.host_io:  # host dy in, host dx and state gradients out; weight gradients stay on the device
            grads.dx, grads.dh0, grads.dc0 = (None if array is None else _to_host(backend, array)
                                              for array in (grads.dx, grads.dh0, grads.dc0))
        self.initial_state_grads = [grads.dh0, grads.dc0] if entry.got_initial_state else None
        return grads

    def _prepare_grad(self, backend, array, argument, shape):
        array = prepare_input(backend, array, self.dtype, argument)
        _validation.check_shape(array, argument, shape)
        return array

    def __repr__(self) -> str:
        return (f"LSTM(units={self.units}, return_sequences={self.return_sequences}, "
                f"go_backwards={self.go_backwards}, backend={self.backend!r})")


def _to_host(backend, array):
    """``array`` as a host array (copied out of a device or a tf.Tensor; a host array as it is)."""
    return array if registry.array_kind(array) == "host" else backend.ops.to_numpy(array)
