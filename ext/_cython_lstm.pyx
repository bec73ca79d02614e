# Fused LSTM forward and backward kernels for the "cython" backend.
#
# Layout: every per-step array is *packed time-major*, as cuDNN's packed
# sequences are: step t owns the rows offsets[t] .. offsets[t] + active[t] of
# arrays such as gates [N, 4H] (N = offsets[T]). Rows inside a step are
# batch rows in `order` (order[r] is the caller's row of packed row r).
#   - general path: order = identity, active[t] = B, offsets[t] = t * B, and a
#     [B, T] mask decides per row and step whether the step is real;
#   - variable-length path (right-padded batch): rows sorted by decreasing
#     length and active[t] = number of rows longer than t, so the finished
#     rows of a step are simply not in it: no GEMM rows, no elementwise work.
#
# Per step the forward does one recurrent GEMM into the gate rows (which hold
# the input projection, computed for all steps by one GEMM beforehand), then
# one pass over the step's rows for nonlinearities, cell update, masking and
# output write. The backward does one pass for the gate gradients and one GEMM
# for dh per step; the weight gradients are two GEMMs over all packed rows at
# the end, dx one more, the bias gradient a column sum. The whole sequence runs
# without the GIL.
#
# Shapes use B batch, T steps, I input features, H units, N packed rows.

from libc.string cimport memcpy, memset
from libc.limits cimport INT_MAX
from cython cimport floating
from scipy.linalg.cython_blas cimport sgemm, dgemm

import numpy as np

cdef extern from "lstm_rows.h" nogil:
    void lstmeng_forward_row_f32(float *gates, float *c, float *c_prev, float *cell_act,
                                 float *h, Py_ssize_t H, int act, int ract)
    void lstmeng_forward_row_f64(double *gates, double *c, double *c_prev, double *cell_act,
                                 double *h, Py_ssize_t H, int act, int ract)
    void lstmeng_backward_row_f32(float *gates, const float *cell_act, const float *c_prev,
                                  const float *dh, float *dc, float *scratch, Py_ssize_t H,
                                  int act, int ract)
    void lstmeng_backward_row_f64(double *gates, const double *cell_act, const double *c_prev,
                                  const double *dh, double *dc, double *scratch, Py_ssize_t H,
                                  int act, int ract)

#: Activation names -> the kind numbers of lstm_rows.h.
ACTIVATION_KINDS = {"tanh": 0, "relu": 1, "sigmoid": 2, "linear": 3, "hard_sigmoid": 4}


cdef void gemm(bint trans_a, bint trans_b, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
               floating alpha, floating *a, Py_ssize_t lda, floating *b, Py_ssize_t ldb,
               floating beta, floating *c, Py_ssize_t ldc) noexcept nogil:
    """Row-major C[m, n] = alpha * op(A) @ op(B) + beta * C through Fortran BLAS.

    BLAS is column-major, and a row-major matrix read column-major is its
    transpose: so row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T,
    i.e. the same call with the operands (and m, n) swapped and the transpose
    flags unchanged. Sizes were checked against INT_MAX by the caller.
    """
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    cdef int im = <int>n, i_n = <int>m, ik = <int>k
    cdef int ilda = <int>ldb, ildb = <int>lda, ildc = <int>ldc
    cdef Py_ssize_t row
    if m == 0 or n == 0:
        return
    if k == 0:
        if beta == 0:
            for row in range(m):
                memset(c + row * ldc, 0, n * sizeof(floating))
        return
    if floating is float:
        sgemm(&tb, &ta, &im, &i_n, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc)
    else:
        dgemm(&tb, &ta, &im, &i_n, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc)


cdef inline void forward_row(floating *gates, floating *c, floating *c_prev, floating *cell_act,
                             floating *h, Py_ssize_t H, int act, int ract) noexcept nogil:
    if floating is float:
        lstmeng_forward_row_f32(gates, c, c_prev, cell_act, h, H, act, ract)
    else:
        lstmeng_forward_row_f64(gates, c, c_prev, cell_act, h, H, act, ract)


cdef inline void backward_row(floating *gates, floating *cell_act, floating *c_prev,
                              floating *dh, floating *dc, floating *scratch, Py_ssize_t H,
                              int act, int ract) noexcept nogil:
    if floating is float:
        lstmeng_backward_row_f32(gates, cell_act, c_prev, dh, dc, scratch, H, act, ract)
    else:
        lstmeng_backward_row_f64(gates, cell_act, c_prev, dh, dc, scratch, H, act, ract)


cdef inline void scaled_copy(floating *dst, floating *src, floating *scale,
                             Py_ssize_t n) noexcept nogil:
    """dst = src * scale (elementwise), or a plain copy when scale is NULL."""
    cdef Py_ssize_t j
    if scale == NULL:
        memcpy(dst, src, n * sizeof(floating))
    else:
        for j in range(n):
            dst[j] = src[j] * scale[j]


cdef inline floating *optional_pointer(floating[:, ::1] array) noexcept nogil:
    return NULL if array is None else &array[0, 0]


def check_blas_sizes(*sizes):
    """Raise ValueError when a GEMM dimension would not fit BLAS's 32-bit int."""
    for size in sizes:
        if size > INT_MAX:
            raise ValueError(f"dimension {size} exceeds the BLAS int limit {INT_MAX}")


def forward(floating[:, :, ::1] x, floating[:, ::1] h0, floating[:, ::1] c0,
            floating[:, ::1] kernel, floating[:, ::1] recurrent_kernel, floating[::1] bias,
            const unsigned char[:, ::1] mask,
            floating[:, ::1] input_dropout_mask, floating[:, ::1] recurrent_dropout_mask,
            const Py_ssize_t[::1] order, const Py_ssize_t[::1] active,
            const Py_ssize_t[::1] offsets,
            int act, int ract, bint reverse, bint zero_output_for_mask,
            floating[:, :, ::1] sequence_outputs, floating[:, ::1] last_output,
            floating[:, ::1] h_out, floating[:, ::1] c_out,
            floating[:, ::1] packed_x, floating[:, ::1] gates,
            floating[:, ::1] c_prev_all, floating[:, ::1] cell_act_all,
            floating[:, ::1] h_in_all,
            floating[:, ::1] h_state, floating[:, ::1] c_state, floating[:, ::1] h_in_step,
            Py_ssize_t chunk_steps):
    """Whole-sequence forward of one layer and direction; writes into the given arrays.

    x: [B, T, I]; h0, c0: [B, H]; kernel: [I, 4H]; recurrent_kernel: [H, 4H];
    bias: [4H] or None; mask: [B, T] (uint8, 1 = real) or None when every
    packed row of a step is real; input_dropout_mask: [B, I] or None;
    recurrent_dropout_mask: [B, H] or None; order: [B]; active: [T];
    offsets: [T + 1] (see the module comment).
    sequence_outputs: [B, T, H] or None; last_output: [B, H] or None
        (exactly one is given). Rows of sequence_outputs that no step writes
        (finished rows of the variable-length path) are filled here.
    h_out, c_out: [B, H] final states (caller's row order).
    Training (h_in_all given): packed_x [N, I], gates [N, 4H],
        c_prev_all, cell_act_all, h_in_all [N, H] are the workspace and
        chunk_steps must be T. Inference (h_in_all None): packed_x
        [chunk_steps * B, I] and gates [chunk_steps * B, 4H] are reused per
        chunk of steps; nothing per step is kept.
    h_state, c_state: [B, H] scratch in packed row order; h_in_step: [B, H]
        scratch for h * recurrent dropout (inference).
    """
    cdef Py_ssize_t B = x.shape[0], T = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t H = recurrent_kernel.shape[0], G = 4 * H
    cdef bint training = h_in_all is not None
    cdef bint has_mask = mask is not None
    cdef bint return_sequences = sequence_outputs is not None
    cdef floating *bias_ptr = NULL if bias is None else &bias[0]
    cdef floating *in_drop = optional_pointer(input_dropout_mask)
    cdef floating *rec_drop = optional_pointer(recurrent_dropout_mask)
    cdef floating *c_prev_ptr = optional_pointer(c_prev_all)
    cdef floating *cell_act_ptr = optional_pointer(cell_act_all)
    cdef floating *h_in_ptr = optional_pointer(h_in_all)
    cdef floating *h_in
    cdef floating *row_gates
    cdef floating *out_row
    cdef Py_ssize_t step, chunk_first, chunk_last, t, t_lo, t_hi, base, rows, r, row, j
    cdef Py_ssize_t n_real
    cdef bint real
    # seen[r]: row r had a real step already; its "previous output" is then h.
    cdef unsigned char[::1] seen_view = np.zeros(B + 1, np.uint8)
    cdef unsigned char *seen = &seen_view[0]

    check_blas_sizes(offsets[T], G, I, H, chunk_steps * B)
    with nogil:
        for r in range(B):
            memcpy(&h_state[r, 0], &h0[order[r], 0], H * sizeof(floating))
            memcpy(&c_state[r, 0], &c0[order[r], 0], H * sizeof(floating))

        chunk_first = 0
        while chunk_first < T:
            chunk_last = min(chunk_first + chunk_steps, T)
            # Input times of this chunk of processing steps, and their packed rows.
            if reverse:
                t_lo, t_hi = T - chunk_last, T - chunk_first
            else:
                t_lo, t_hi = chunk_first, chunk_last
            base = 0 if training else offsets[t_lo]
            pack_chunk(x, in_drop, order, active, offsets, t_lo, t_hi, base, packed_x)
            rows = offsets[t_hi] - offsets[t_lo]
            # The input projection of every step in the chunk: one GEMM, bias folded in
            # by starting from broadcast bias rows (beta = 1).
            row_gates = &gates[offsets[t_lo] - base, 0]
            if bias_ptr != NULL:
                for r in range(rows):
                    memcpy(row_gates + r * G, bias_ptr, G * sizeof(floating))
            gemm(False, False, rows, G, I, <floating>1, &packed_x[offsets[t_lo] - base, 0], I,
                 &kernel[0, 0], G, <floating>(1 if bias_ptr != NULL else 0), row_gates, G)

            for step in range(chunk_first, chunk_last):
                t = T - 1 - step if reverse else step
                n_real = active[t]
                if n_real == 0:
                    continue
                row_gates = &gates[offsets[t] - base, 0]
                # h(t-1) as it enters the recurrence (after recurrent dropout).
                if training:
                    h_in = h_in_ptr + offsets[t] * H
                    for r in range(n_real):
                        scaled_copy(h_in + r * H, &h_state[r, 0],
                                    NULL if rec_drop == NULL else rec_drop + order[r] * H, H)
                elif rec_drop != NULL:
                    h_in = &h_in_step[0, 0]
                    for r in range(n_real):
                        scaled_copy(h_in + r * H, &h_state[r, 0], rec_drop + order[r] * H, H)
                else:
                    h_in = &h_state[0, 0]
                gemm(False, False, n_real, G, H, <floating>1, h_in, H, &recurrent_kernel[0, 0], G,
                     <floating>1, row_gates, G)

                for r in range(n_real):
                    row = order[r]
                    real = not has_mask or mask[row, t]
                    if real:
                        forward_row(row_gates + r * G, &c_state[r, 0],
                                    NULL if not training else c_prev_ptr + (offsets[t] + r) * H,
                                    NULL if not training else cell_act_ptr + (offsets[t] + r) * H,
                                    &h_state[r, 0], H, act, ract)
                        seen[r] = 1
                    if return_sequences:
                        out_row = &sequence_outputs[row, t, 0]
                        if real or (seen[r] and not zero_output_for_mask):
                            memcpy(out_row, &h_state[r, 0], H * sizeof(floating))
                        else:
                            memset(out_row, 0, H * sizeof(floating))
            chunk_first = chunk_last

        # Rows outside active[t] (finished rows of the variable-length path) are masked
        # steps: they output the carried h once a real step came, else zeros.
        for r in range(B):
            row = order[r]
            if return_sequences:
                for t in range(T):
                    if r >= active[t]:
                        out_row = &sequence_outputs[row, t, 0]
                        # Forward, these steps come after the real ones; reversed, before.
                        if seen[r] and not zero_output_for_mask and not reverse:
                            memcpy(out_row, &h_state[r, 0], H * sizeof(floating))
                        else:
                            memset(out_row, 0, H * sizeof(floating))
            else:
                # The last processed step's output.
                t = 0 if reverse else T - 1
                real = r < active[t] and (not has_mask or mask[row, t])
                if real or (seen[r] and not zero_output_for_mask):
                    memcpy(&last_output[row, 0], &h_state[r, 0], H * sizeof(floating))
                else:
                    memset(&last_output[row, 0], 0, H * sizeof(floating))
            memcpy(&h_out[row, 0], &h_state[r, 0], H * sizeof(floating))
            memcpy(&c_out[row, 0], &c_state[r, 0], H * sizeof(floating))


cdef void pack_chunk(floating[:, :, ::1] x, floating *in_drop, const Py_ssize_t[::1] order,
                     const Py_ssize_t[::1] active, const Py_ssize_t[::1] offsets,
                     Py_ssize_t t_begin, Py_ssize_t t_end, Py_ssize_t base,
                     floating[:, ::1] packed) noexcept nogil:
    """Gather x[order[r], t] (times input dropout) into packed row offsets[t] + r - base."""
    cdef Py_ssize_t I = x.shape[2], t, r
    for t in range(t_begin, t_end):
        for r in range(active[t]):
            scaled_copy(&packed[offsets[t] + r - base, 0], &x[order[r], t, 0],
                        NULL if in_drop == NULL else in_drop + order[r] * I, I)


def backward(floating[:, :, ::1] doutputs_sequence, floating[:, ::1] doutputs_last,
             floating[:, ::1] dh, floating[:, ::1] dc,
             floating[:, ::1] kernel, floating[:, ::1] recurrent_kernel,
             const unsigned char[:, ::1] mask,
             floating[:, ::1] input_dropout_mask, floating[:, ::1] recurrent_dropout_mask,
             const Py_ssize_t[::1] order, const Py_ssize_t[::1] active,
             const Py_ssize_t[::1] offsets,
             int act, int ract, bint reverse, bint zero_output_for_mask,
             floating[:, ::1] packed_x, floating[:, ::1] gates,
             floating[:, ::1] c_prev_all, floating[:, ::1] cell_act_all,
             floating[:, ::1] h_in_all,
             floating[:, :, ::1] dx, floating[:, ::1] dh0, floating[:, ::1] dc0,
             floating[:, ::1] dkernel, floating[:, ::1] drecurrent_kernel, floating[::1] dbias):
    """Backward of `forward` (training); the workspace arrays are overwritten.

    doutputs_sequence: [B, T, H] or None; doutputs_last: [B, H] or None
    (exactly one given); dh, dc: [B, H] gradients of the final states;
    workspace arrays as written by `forward`: packed_x [N, I], gates [N, 4H]
    (become the gate-input gradients dz), c_prev_all, cell_act_all,
    h_in_all [N, H]. Outputs: dx [B, T, I] (must be zero on entry: rows
    outside the packed steps get no gradient), dh0, dc0 [B, H], dkernel
    [I, 4H], drecurrent_kernel [H, 4H], dbias [4H].
    """
    cdef Py_ssize_t B = dh.shape[0], T = offsets.shape[0] - 1
    cdef Py_ssize_t I = kernel.shape[0], H = recurrent_kernel.shape[0], G = 4 * H
    cdef Py_ssize_t N = offsets[T]
    cdef bint has_mask = mask is not None
    cdef bint return_sequences = doutputs_sequence is not None
    cdef floating *in_drop = optional_pointer(input_dropout_mask)
    cdef floating *rec_drop = optional_pointer(recurrent_dropout_mask)
    cdef Py_ssize_t step, t, r, row, j, n_real, position, t_last
    cdef bint real, reaches_h
    cdef floating *row_gates
    cdef floating *dy
    cdef floating *dx_row
    cdef floating total

    dtype = np.asarray(dh).dtype
    # dh_carry: gradient reaching h for rows whose previous backward step (the later step
    # in processing order) was masked or not processed; dh_recurrent: dz @ R^T of rows
    # whose previous backward step was real. Both in packed row order.
    cdef floating[:, ::1] dh_carry = np.empty((B, H), dtype)
    cdef floating[:, ::1] dh_recurrent = np.empty((max(B, 1), H), dtype)
    cdef floating[:, ::1] dc_state = np.empty((B, H), dtype)
    cdef floating[::1] dh_total = np.empty(H, dtype)
    cdef floating[::1] scratch = np.empty(5 * H + 1, dtype)
    cdef unsigned char[::1] previous_real = np.zeros(B + 1, np.uint8)
    # first_real[r]: processing position of row r's first real step (T if none).
    cdef Py_ssize_t[::1] first_real = np.full(B + 1, T, np.intp)
    cdef Py_ssize_t[::1] last_real = np.full(B + 1, -1, np.intp)

    check_blas_sizes(N, G, I, H)
    with nogil:
        for position in range(T):
            t = T - 1 - position if reverse else position
            for r in range(active[t]):
                if not has_mask or mask[order[r], t]:
                    if first_real[r] == T:
                        first_real[r] = position
                    last_real[r] = position
        t_last = 0 if reverse else T - 1
        for r in range(B):
            row = order[r]
            memcpy(&dh_carry[r, 0], &dh[row, 0], H * sizeof(floating))
            memcpy(&dc_state[r, 0], &dc[row, 0], H * sizeof(floating))
            if not return_sequences:
                # The last output is h on rows where it is not zero (see forward).
                if (last_real[r] == T - 1) or (last_real[r] >= 0 and not zero_output_for_mask):
                    for j in range(H):
                        dh_carry[r, j] += doutputs_last[row, j]
            elif not zero_output_for_mask and last_real[r] >= 0:
                # Steps outside active[t] after the row's last real step repeat h.
                for t in range(T):
                    position = T - 1 - t if reverse else t
                    if r >= active[t] and position > first_real[r]:
                        for j in range(H):
                            dh_carry[r, j] += doutputs_sequence[row, t, j]

        for step in range(T - 1, -1, -1):
            t = T - 1 - step if reverse else step
            n_real = active[t]
            if n_real == 0:
                continue
            row_gates = &gates[offsets[t], 0]
            for r in range(n_real):
                row = order[r]
                real = not has_mask or mask[row, t]
                # Gradient reaching h(t): from the recurrence (or the carry) plus this
                # step's output, when that output is h (a real step, or a masked one
                # repeating h after an earlier real step).
                if previous_real[r]:
                    scaled_copy(&dh_total[0], &dh_recurrent[r, 0],
                                NULL if rec_drop == NULL else rec_drop + row * H, H)
                else:
                    memcpy(&dh_total[0], &dh_carry[r, 0], H * sizeof(floating))
                if return_sequences:
                    reaches_h = real or (step > first_real[r] and not zero_output_for_mask)
                    if reaches_h:
                        dy = &doutputs_sequence[row, t, 0]
                        for j in range(H):
                            dh_total[j] += dy[j]
                if real:
                    backward_row(row_gates + r * G, &cell_act_all[offsets[t] + r, 0],
                                 &c_prev_all[offsets[t] + r, 0], &dh_total[0], &dc_state[r, 0],
                                 &scratch[0], H, act, ract)
                else:
                    memcpy(&dh_carry[r, 0], &dh_total[0], H * sizeof(floating))
                    memset(row_gates + r * G, 0, G * sizeof(floating))
                previous_real[r] = real
            # dh(t-1) = dz(t) @ R^T for the step's rows.
            gemm(False, True, n_real, H, G, <floating>1, row_gates, G, &recurrent_kernel[0, 0], G,
                 <floating>0, &dh_recurrent[0, 0], H)

        for r in range(B):
            row = order[r]
            if previous_real[r]:
                scaled_copy(&dh0[row, 0], &dh_recurrent[r, 0],
                            NULL if rec_drop == NULL else rec_drop + row * H, H)
            else:
                memcpy(&dh0[row, 0], &dh_carry[r, 0], H * sizeof(floating))
            memcpy(&dc0[row, 0], &dc_state[r, 0], H * sizeof(floating))

        # Weight gradients over all packed rows: dK = X^T dz, dR = H_in^T dz, db = sum dz.
        gemm(True, False, I, G, N, <floating>1, &packed_x[0, 0], I, &gates[0, 0], G,
             <floating>0, &dkernel[0, 0], G)
        gemm(True, False, H, G, N, <floating>1, &h_in_all[0, 0], H, &gates[0, 0], G,
             <floating>0, &drecurrent_kernel[0, 0], G)
        memset(&dbias[0], 0, G * sizeof(floating))
        for r in range(N):
            row_gates = &gates[r, 0]
            for j in range(G):
                dbias[j] += row_gates[j]
        # dx = dz @ K^T, written over packed_x (consumed above), then scattered.
        gemm(False, True, N, I, G, <floating>1, &gates[0, 0], G, &kernel[0, 0], G,
             <floating>0, &packed_x[0, 0], I)
        for t in range(T):
            for r in range(active[t]):
                row = order[r]
                scaled_copy(&dx[row, t, 0], &packed_x[offsets[t] + r, 0],
                            NULL if in_drop == NULL else in_drop + row * I, I)
