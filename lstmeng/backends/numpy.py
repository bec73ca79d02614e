"""NumPy reference backend: the executable specification of the contract.

Every fast backend is tested against this one, so it favours plain, readable
arithmetic over speed, with the structure that keeps it reasonable: one GEMM
for the input projection of all steps, one GEMM per step for the recurrence,
the weight gradients as GEMMs over all steps at the end of the backward.
With ``training=False`` it keeps no per-step workspace and projects the input
in blocks of INFERENCE_BLOCK_STEPS steps, so memory beyond the output is
O(B x H).
"""

from __future__ import annotations

import dataclasses
import platform

import numpy as np

from lstmeng import activations
from lstmeng.backends.base import KernelBackend, SequenceForward, SequenceGrads, Workspace


@dataclasses.dataclass
class _Workspace(Workspace):
    """What the backward needs, time-major and in input time order.

    x: [B, T, I] the caller's input array itself (batch-major, before input
    dropout): referenced, not copied, so it must not change before the
    backward; h_in: [T, B, H] h(t-1) as it entered the recurrence (after
    recurrent dropout); c_prev: [T, B, H]; gates: [T, B, 4H] activated gates
    (i, f, g, o); mask: [T, B] bool or None; seen_before: [T, B] bool, a real
    step came earlier in processing order (None without mask); last_real:
    [B] bool, the last output equals the final h on this row (None without
    mask); kernel: [I, 4H]; recurrent_kernel: [H, 4H]; input_dropout_mask:
    [B, I] or None; recurrent_dropout_mask: [B, H] or None.

    That is 6H values per (row, step), the theoretical workspace: the
    backward recomputes activation(c(t)) from the gates and c(t-1), and
    re-applies the [B, I] input dropout mask to x.
    """

    x: np.ndarray
    h_in: np.ndarray
    c_prev: np.ndarray
    gates: np.ndarray
    mask: np.ndarray | None
    seen_before: np.ndarray | None
    last_real: np.ndarray | None
    kernel: np.ndarray
    recurrent_kernel: np.ndarray
    input_dropout_mask: np.ndarray | None
    recurrent_dropout_mask: np.ndarray | None


#: Steps whose input projection an inference forward computes at once (one GEMM).
INFERENCE_BLOCK_STEPS = 64


def _dropped_input(x_tb, input_dropout_mask):
    """Contiguous ``[K, B, I]`` inputs of K steps, times the ``[B, I]`` dropout mask if any."""
    if input_dropout_mask is not None:
        x_tb = x_tb * input_dropout_mask[None]
    return np.ascontiguousarray(x_tb)


def _input_projection(x_tb, kernel, bias):
    """``x_tb [K, B, I] @ kernel [I, 4H] (+ bias)`` as one GEMM: ``[K, B, 4H]``."""
    steps, batch, _ = x_tb.shape
    projection = (x_tb.reshape(steps * batch, -1) @ kernel).reshape(steps, batch, -1)
    if bias is not None:
        projection += bias
    return projection


def _input_gradient_product(x, input_dropout_mask, gate_grads):
    """dkernel ``[I, 4H]`` = sum over (b, t) of (x * mask)[b, t]^T gate_grads[t, b].

    Args:
        x: ``[B, T, I]`` the forward's input; input_dropout_mask: ``[B, I]`` or None;
        gate_grads: ``[T, B, 4H]``.

    The dropped-out input is a temporary of the backward (the forward keeps x
    only), and the gate gradients are made batch-major to meet x's layout.
    """
    batch, steps, features = x.shape
    if input_dropout_mask is not None:
        x = x * input_dropout_mask[:, None, :]
    flat_x = x.reshape(batch * steps, features)
    flat_gate_grads = np.swapaxes(gate_grads, 0, 1).reshape(batch * steps, -1)
    return flat_x.T @ flat_gate_grads


def last_output_rows(mask_tb, reverse: bool, zero_output_for_mask: bool):
    """Which rows have a nonzero last output, and it equals the final h.

    Args:
        mask_tb: ``[T, B]`` bool.
    Returns:
        ``[B]`` bool: with zero_output_for_mask, the last processed step is
        real; otherwise the row has any real step.
    """
    if zero_output_for_mask:
        return mask_tb[0] if reverse else mask_tb[-1]
    return mask_tb.any(axis=0)


class NumpyBackend(KernelBackend):
    """Reference implementation in NumPy (float32 and float64, every activation)."""

    name = "numpy"

    def probe(self) -> str:
        return f"CPU: {platform.processor() or platform.machine()} (NumPy {np.__version__})"

    def sequence_forward(self, x, h0, c0, kernel, recurrent_kernel, bias, mask, input_dropout_mask,
                         recurrent_dropout_mask, options):
        options.check_arrays(bias, mask, input_dropout_mask, recurrent_dropout_mask)
        act = activations.FUNCTIONS[options.activation]
        ract = activations.FUNCTIONS[options.recurrent_activation]
        reverse, zero_output_for_mask = options.reverse, options.zero_output_for_mask
        return_sequences, training = options.return_sequences, options.training
        batch, steps, _ = x.shape
        units = recurrent_kernel.shape[0]
        dtype = x.dtype

        x_tb = np.swapaxes(x, 0, 1)  # [T, B, I], a view
        # Training keeps per-step arrays anyway, so one GEMM projects every step's
        # input. Inference projects INFERENCE_BLOCK_STEPS steps at a time, so that
        # memory beyond the output stays O(B x H) however long the sequence.
        block_steps = max(1, steps if training else min(steps, INFERENCE_BLOCK_STEPS))
        block_start, projection = None, None

        mask_tb = None if mask is None else np.swapaxes(mask, 0, 1)  # [T, B], a view
        h = np.array(h0, dtype=dtype, copy=True)
        c = np.array(c0, dtype=dtype, copy=True)
        previous_output = np.zeros((batch, units), dtype)
        outputs = np.zeros((batch, steps, units), dtype) if return_sequences else None
        if training:
            h_in_all = np.empty((steps, batch, units), dtype)
            c_prev_all = np.empty((steps, batch, units), dtype)
            gates_all = np.empty((steps, batch, 4 * units), dtype)
            seen_before = None if mask is None else np.empty((steps, batch), bool)
        seen = np.zeros(batch, bool)

        order = range(steps - 1, -1, -1) if reverse else range(steps)
        for t in order:
            if block_start is None or not block_start <= t < block_start + block_steps:
                block_start = t - t % block_steps
                x_block = _dropped_input(x_tb[block_start:block_start + block_steps], input_dropout_mask)
                projection = _input_projection(x_block, kernel, bias)
            h_in = h if recurrent_dropout_mask is None else h * recurrent_dropout_mask
            z = projection[t - block_start] + h_in @ recurrent_kernel
            i = ract(z[:, :units])
            f = ract(z[:, units:2 * units])
            g = act(z[:, 2 * units:3 * units])
            o = ract(z[:, 3 * units:])
            c_new = f * c + i * g
            cell_act = act(c_new)
            h_new = o * cell_act
            if training:
                h_in_all[t] = h_in
                c_prev_all[t] = c
                gates_all[t] = np.concatenate([i, f, g, o], axis=1)
            if mask_tb is None:
                h, c, output = h_new, c_new, h_new
            else:
                real = mask_tb[t][:, None]
                if training:
                    seen_before[t] = seen
                seen = seen | mask_tb[t]
                h = np.where(real, h_new, h)
                c = np.where(real, c_new, c)
                skipped = np.zeros_like(h_new) if zero_output_for_mask else previous_output
                output = np.where(real, h_new, skipped)
            previous_output = output
            if return_sequences:
                outputs[:, t] = output
        if not return_sequences:
            # A copy: without a mask the last output is the very array h, and a
            # caller scaling y in place must not change the returned (or carried) state.
            outputs = previous_output.copy()

        workspace = None
        if training:
            workspace = _Workspace(
                options, x=x, h_in=h_in_all, c_prev=c_prev_all, gates=gates_all,
                mask=None if mask_tb is None else np.ascontiguousarray(mask_tb),
                seen_before=seen_before,
                last_real=None if mask_tb is None else last_output_rows(mask_tb, reverse, zero_output_for_mask),
                kernel=kernel, recurrent_kernel=recurrent_kernel, input_dropout_mask=input_dropout_mask,
                recurrent_dropout_mask=recurrent_dropout_mask,
            )
        return SequenceForward(outputs=outputs, h=h, c=c, workspace=workspace)

    def sequence_backward(self, doutputs, dh, dc, workspace, *, input_grad=True, state_grads=True):
        ws, options = workspace, workspace.options
        ws.consume(self.name)   # one backward per workspace, as on every backend (see base.Workspace)
        act = activations.FUNCTIONS[options.activation]
        dact = activations.DERIVATIVES_FROM_OUTPUT[options.activation]
        dract = activations.DERIVATIVES_FROM_OUTPUT[options.recurrent_activation]
        steps, batch, units = ws.c_prev.shape
        dtype = ws.gates.dtype

        dh = np.array(dh, dtype=dtype, copy=True)
        dc = np.array(dc, dtype=dtype, copy=True)
        if not options.return_sequences:
            # The last output is the final h on the rows where it is not zero.
            rows = np.ones(batch, bool) if ws.last_real is None else ws.last_real
            dh += np.where(rows[:, None], doutputs, 0)
        gate_grads = np.empty((steps, batch, 4 * units), dtype)
        recurrent_t = ws.recurrent_kernel.T

        order = range(steps) if options.reverse else range(steps - 1, -1, -1)
        for t in order:
            if options.return_sequences:
                dy = doutputs[:, t]
                if ws.mask is not None:
                    real = ws.mask[t][:, None]
                    # A masked step's output is the carried h once a real step
                    # came before it (and not zeroed); its gradient joins dh.
                    reaches_h = real | (ws.seen_before[t][:, None] & (not options.zero_output_for_mask))
                    dy = np.where(reaches_h, dy, 0)
                dh_total = dh + dy
            else:
                dh_total = dh
            gates = ws.gates[t]
            i, f, g, o = (gates[:, k * units:(k + 1) * units] for k in range(4))
            # activation(c(t)), recomputed exactly as the forward computed it.
            cell_act = act(f * ws.c_prev[t] + i * g)
            do = dh_total * cell_act
            dc_total = dc + dh_total * o * dact(cell_act)
            di = dc_total * g
            dg = dc_total * i
            df = dc_total * ws.c_prev[t]
            dc_prev = dc_total * f
            dz = np.concatenate(
                [di * dract(i), df * dract(f), dg * dact(g), do * dract(o)], axis=1)
            dh_prev = dz @ recurrent_t
            if ws.recurrent_dropout_mask is not None:
                dh_prev *= ws.recurrent_dropout_mask
            if ws.mask is None:
                dh, dc = dh_prev, dc_prev
            else:
                real = ws.mask[t][:, None]
                dz = np.where(real, dz, 0)
                dh = np.where(real, dh_prev, dh_total)
                dc = np.where(real, dc_prev, dc)
            gate_grads[t] = dz

        flat_gate_grads = gate_grads.reshape(steps * batch, 4 * units)
        dkernel = _input_gradient_product(ws.x, ws.input_dropout_mask, gate_grads)
        drecurrent_kernel = ws.h_in.reshape(steps * batch, units).T @ flat_gate_grads
        dbias = flat_gate_grads.sum(axis=0)
        dx = None
        if input_grad:
            dx_tb = (flat_gate_grads @ ws.kernel.T).reshape(steps, batch, -1)
            if ws.input_dropout_mask is not None:
                dx_tb *= ws.input_dropout_mask[None]
            dx = np.ascontiguousarray(np.swapaxes(dx_tb, 0, 1))
        if not state_grads:   # computed all the same: the reference keeps one loop body
            dh = dc = None
        return SequenceGrads(dx=dx, dh0=dh, dc0=dc, dkernel=dkernel,
                             drecurrent_kernel=drecurrent_kernel, dbias=dbias)


backend = NumpyBackend()
