"""LSTMCell: one step at a time, for decoders and custom loops.

Each ``training=True`` call pushes its workspace on a tape; each ``backward``
pops the most recent one, so a loop of N steps is backpropagated by N
``backward`` calls in reverse order (inference calls never touch the tape).
Weight gradients accumulate over those calls into ``grads``; the first
backward of an unroll replaces them.

An unroll starts at a training call that finds the tape empty, or at the
first training call after a backward: steps left on the tape by a truncated
backpropagation are dropped then, automatically, so a new sequence never
inherits them (``reset_tape()`` drops them explicitly). Dropout masks are
drawn when an unroll starts and reused over it, as Keras's cell reuses them
over one sequence.

Where the backend's backward of a step gives the gates' gradient dz instead of
the weight gradients (``KernelBackend.gives_gates``: the cython backend's
one-step calls of small batches, on the CPU) and the step has at most
``DEFERRED_GRADS_MAX_ROWS`` rows, a step's backward keeps dz with its x and h and
the weight gradients of all such steps are formed at once, ``x^T dz`` and
``h^T dz`` over every step (one product each: the backend's
``gates_weight_gradients`` where it forms them, up to
``BACKEND_DEFERRED_GRADS_MAX_ROWS`` rows, else NumPy's), when the round's last step is
backpropagated or when ``grads`` is read, whichever comes first: a per-step
sum moved the whole gradient through memory at every step (12 MB at I = 256,
H = 512). ``grads`` reads as it always did.
"""

from __future__ import annotations

import numpy as np

from lstmeng import _validation
from lstmeng._arrays import prepare_input, prepare_state
from lstmeng._lstm_base import LSTMBase
from lstmeng._runtime import threads
from lstmeng._tape import TrainingTape
from lstmeng.backends import registry
from lstmeng.backends.base import InferenceStepSlot, SequenceOptions

#: The most rows a training step may have for its weight gradients to be formed late (see the
#: module docstring). The late products run on NumPy's BLAS on one thread; the backend's
#: per-step products run threaded: forming them late measured 1.09x (64, 128) at batch 8,
#: 1.32x and 1.11x (256, 512) at batches 12 and 16, but 0.92-0.95x at batch 24.
DEFERRED_GRADS_MAX_ROWS = 16
#: The same where the backend forms the late products itself (``takes_gates_weight_gradients``:
#: the cython backend's AVX-512 kernel, threaded) and the step has no dropout (whose steps give no
#: dz). 50-step training loops against session 25's (late products on NumPy to 16 rows), Zen 5:
#: (I, H) = (256, 512) 1.43x faster at batch 16, 1.38x at 32, 1.24x at 64, 1.02x at 96 with the limit
#: there; (64, 128) 1.29x / 1.14x at 16 / 32, 0.96-1.07x at 40-64 (noise).
BACKEND_DEFERRED_GRADS_MAX_ROWS = 64


class LSTMCell(LSTMBase):
    """One LSTM step with Keras's cell options (see ``LSTM`` for them).

    Example:
        >>> import numpy as np, lstmeng as le
        >>> cell = le.LSTMCell(3, seed=0)
        >>> x_t = np.ones((2, 4), "float32")
        >>> h, (h_again, c) = cell(x_t, training=True)
        >>> dx_t, (dh_prev, dc_prev) = cell.backward(np.ones_like(h))
        >>> dx_t.shape, dh_prev.shape
        ((2, 4), (2, 3))
    """

    def __init__(self, units, **options):
        # Steps whose weight gradients wait to be formed (see the module docstring); before
        # super().__init__, which sets _grads.
        self.__dict__["_pending_grads"] = None
        super().__init__(units, **options)
        self._tapes = TrainingTape(warn_after=100_000)   # one entry per step: unrolls are long
        self._sequence_dropout = (None, None)
        self._inference_steps = InferenceStepSlot()

    def get_config(self) -> dict:
        return self._options_config()

    @classmethod
    def from_config(cls, config: dict) -> "LSTMCell":
        return cls(**config)

    def __call__(self, x_t, states=None, training=False):
        """One step.

        Args:
            x_t: ``[B, I]``.
            states: ``[h, c]``, each ``[B, H]``; zeros when None.
            training: apply dropout and keep the step for ``backward``.

        Returns:
            ``h, [h, c]`` with the new states ``[B, H]``.
        """
        backend = self._resolve_backend(x_t, "x_t")
        x_t = prepare_input(backend, x_t, self.dtype, "x_t")
        _validation.check_rank(x_t, "x_t", 2, "(batch, features)")
        host_io = registry.array_kind(x_t) == "host"   # NumPy in, NumPy out (GPU cell, TensorFlow backend)
        x_t = self._to_call_device(backend, x_t)
        batch, features = _validation.shape_of(x_t)
        self._ensure_built(features, "x_t")
        shape = (batch, self.units)
        if states is None:
            # Read only when there are rows (the step returns new states): shared zeros.
            zeros = backend.ops.zeros_constant if batch else backend.ops.zeros
            h, c = zeros(shape, self.dtype), zeros(shape, self.dtype)
        else:
            if not isinstance(states, (list, tuple)) or len(states) != 2:
                raise ValueError(f"states must be a list [h, c] of arrays of shape {shape}")
            h = self._to_call_device(backend, prepare_state(backend, states[0], self.dtype, "states[0]", shape))
            c = self._to_call_device(backend, prepare_state(backend, states[1], self.dtype, "states[1]", shape))
        starts_unroll = training and self._tapes.next_call_starts_round
        input_mask, recurrent_mask = (self._dropout_masks(batch, training=True) if starts_unroll
                                      else self._sequence_dropout if training else (None, None))
        if not starts_unroll and input_mask is not None and input_mask.shape[0] != batch:
            raise ValueError(f"x_t has batch {batch} but this unrolled sequence started with batch "
                             f"{input_mask.shape[0]}; backpropagate it or call reset_tape() first")
        if batch == 0:
            h_new, c_new, workspace = h, c, None
        else:
            kernel, recurrent_kernel, bias = self._weights_for(backend)
            input_dropout_mask = None if input_mask is None else backend.ops.asarray(input_mask, self.dtype)
            recurrent_dropout_mask = None if recurrent_mask is None else backend.ops.asarray(recurrent_mask, self.dtype)
            options = SequenceOptions.for_call(
                bias=bias, mask=None, input_dropout_mask=input_dropout_mask,
                recurrent_dropout_mask=recurrent_dropout_mask, activation=self.activation,
                recurrent_activation=self.recurrent_activation, return_sequences=False, training=training)
            if training:
                result = backend.cell_forward(x_t, h, c, kernel, recurrent_kernel, bias, input_dropout_mask,
                                              recurrent_dropout_mask, options)
                h_new, c_new, workspace = result.h, result.c, result.workspace
            else:
                # The backend's step for these weights and options, made once while they stay
                # (for_call shares one options object per combination; new weight arrays, e.g.
                # from set_weights, get a new step; it reads in-place changes itself).
                step = self._inference_steps.step(
                    backend, kernel, recurrent_kernel, options,
                    lambda: backend.cell_inference_step(kernel, recurrent_kernel, options))
                h_new, c_new = step(x_t, h, c, bias)
                workspace = None
        self._device_chosen = True   # a call has run here: later CUDA inputs to a CPU cell are errors
        if training:
            guard = None if workspace is None else self._input_guard(x_t, "x_t", host_io)
            # The step's x_t and h, kept where its backward will give dz (h copied: the caller may
            # reuse its array; x_t is referenced by the workspace anyway).
            deferred = self._device == "cpu" and workspace is not None and (
                batch <= DEFERRED_GRADS_MAX_ROWS and backend.gives_gates(workspace)
                or batch <= BACKEND_DEFERRED_GRADS_MAX_ROWS and input_mask is None and recurrent_mask is None
                and backend.takes_gates_weight_gradients(batch, self.input_size, self.units, self.dtype))
            self._tapes.push((backend, workspace, batch, host_io, guard,
                              x_t if deferred else None, h.copy() if deferred else None))
            self._sequence_dropout = (input_mask, recurrent_mask)
        if host_io and registry.array_kind(h_new) != "host":  # NumPy in, NumPy out
            h_new, c_new = backend.ops.to_numpy(h_new), backend.ops.to_numpy(c_new)
        return h_new, [h_new, c_new]

    # -- weight gradients formed late (see the module docstring) -------------------
    @property
    def _grads(self) -> dict:
        """The gradient arrays, with the deferred steps' weight gradients added first."""
        if self.__dict__.get("_pending_grads") is not None:
            self._add_pending_grads()
        return self.__dict__["_grad_arrays"]

    @_grads.setter
    def _grads(self, value: dict) -> None:
        self.__dict__["_pending_grads"] = None
        self.__dict__["_grad_arrays"] = value

    def _defer_weight_grads(self, x, h, dz, accumulate: bool, backend) -> None:
        """Keep a step backward's x [B, I], h [B, H] and dz [B, 4H] for ``_add_pending_grads``;
        ``accumulate`` False (the round's first backward): they replace the gradients, as
        ``_set_grads`` would. backend: the step's, which may form the products."""
        pending = self.__dict__.get("_pending_grads")
        if pending is None or not accumulate:
            pending = self.__dict__["_pending_grads"] = {"replace": not accumulate, "steps": [], "backend": backend}
        pending["steps"].append((x, h, dz))
        if not len(self._tapes):   # the round's last step: form them now
            self._add_pending_grads()

    def _add_pending_grads(self) -> None:
        """The deferred steps' weight gradients, x^T dz, h^T dz and dz's column sums over all of
        them, put into the gradients by ``_set_grads``."""
        pending = self.__dict__["_pending_grads"]
        self.__dict__["_pending_grads"] = None
        steps = pending["steps"]
        x, h, dz = ((steps[0][part] if len(steps) == 1 else np.concatenate([step[part] for step in steps]))
                    for part in range(3))                                  # [S B, I], [S B, H], [S B, 4H]
        # The backend's products where it forms them (the cython backend's AVX-512 kernel, threaded;
        # not for one row, where np.dot's outer products are as fast), else NumPy's.
        products = (pending["backend"].gates_weight_gradients(dz, x, h, transposed=False) if dz.shape[0] > 1
                    else None)
        if products is not None:
            fresh = {"kernel": products[0], "recurrent_kernel": products[1]}
        else:
            # np.dot, not @: NumPy's matmul took 33 us for a one-row [64, 1] @ [1, 512], np.dot 3.6.
            # BLAS on one thread: a pool started here spins on after the products, and took a core
            # from the rest of the process (torch.nn.LSTMCell's loop beside it ran 1.7x slower).
            with threads.single_threaded_blas():
                fresh = {"kernel": np.dot(x.T, dz), "recurrent_kernel": np.dot(h.T, dz)}
        if self.use_bias:
            fresh["bias"] = dz.sum(axis=0)
        self._set_grads(fresh, not pending["replace"])

    def reset_tape(self):
        """Drop the steps not yet backpropagated and the current unroll's dropout masks; returns self.

        Not needed between sequences (a training call after a backward starts a
        new unroll by itself); use it to abandon an unroll that no backward ran on.
        """
        self._tapes.clear()
        self._sequence_dropout = (None, None)
        return self

    def reset_dropout_mask(self):
        """Same as ``reset_tape()`` (its former name)."""
        return self.reset_tape()

    def backward(self, dh, dc=None):
        """Backward of the most recent unconsumed training step.

        Args:
            dh, dc: ``[B, H]`` gradients of the step's new h and c (dc None = zeros).

        Returns:
            ``dx_t [B, I], [dh_prev, dc_prev]``; adds the step's weight gradients to ``grads``
            (the first backward of an unroll replaces them; on the cython backend they may be
            formed with the round's other steps', at its last backward or when ``grads`` is read
            first: see the module docstring).
        """
        backend, workspace, batch, host_io, input_guard, x_t, h_t = self._tapes.peek()
        if input_guard is not None:   # LSTMENG_DEBUG: x_t unchanged since the forward?
            input_guard.check()
        shape = (batch, self.units)
        dh = prepare_input(backend, dh, self.dtype, "dh")
        _validation.check_shape(dh, "dh", shape)
        if dc is None:
            dc = (backend.ops.zeros_constant if workspace is not None else backend.ops.zeros)(shape, self.dtype)
        else:
            dc = prepare_input(backend, dc, self.dtype, "dc")
            _validation.check_shape(dc, "dc", shape)
        dh, dc = self._to_call_device(backend, dh), self._to_call_device(backend, dc)
        if workspace is None:
            dx = backend.ops.zeros((0, self.input_size), self.dtype)
            dh_prev, dc_prev = dh, dc
            _, accumulate = self._tapes.pop()
            self._set_grads(self._zero_weight_grads(backend), accumulate)
        elif (h_t is not None and self._device == "cpu"
              and (len(self._tapes) > 1 or self.__dict__.get("_pending_grads") is not None)):
            # (A round's only step, as in online learning, gains nothing from waiting, and a layer
            # moved to a GPU since the forward keeps its gradients there: the backend forms them,
            # below.)
            # prefer_gates: dz also where the backend would give weight gradients by default, when
            # it forms the products of dz itself (the forward's choice: BACKEND_DEFERRED_GRADS_MAX_ROWS).
            grads = backend.sequence_backward_gates(backend.ops.zeros_like(dh), dh, dc, workspace, prefer_gates=True)
            _, accumulate = self._tapes.pop()
            dx, dh_prev, dc_prev = grads.dx[:, 0, :], grads.dh0, grads.dc0
            if grads.dgates is not None:
                self._defer_weight_grads(np.array(x_t), h_t, grads.dgates, accumulate, backend)
            else:
                self._store_grads(backend, grads, accumulate)
        else:
            grads = backend.cell_backward(dh, dc, workspace)
            _, accumulate = self._tapes.pop()
            # The unroll's first backward replaces grads; the others add to them.
            self._store_grads(backend, grads, accumulate)
            dx, dh_prev, dc_prev = grads.dx, grads.dh0, grads.dc0
        if host_io and registry.array_kind(dx) != "host":
            dx, dh_prev, dc_prev = (backend.ops.to_numpy(array) for array in (dx, dh_prev, dc_prev))
        return dx, [dh_prev, dc_prev]
