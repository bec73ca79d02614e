# Fused LSTM forward and backward kernels for the "cython" backend.
#
# Layout. The batch rows are split into P *parts* (P = threads, or 1); batch
# rows are independent in an LSTM, so each part runs the whole sequence on its
# own thread with no synchronisation per step. Every per-step array is packed
# part-major, then time-major (cuDNN's packed layout, per part): in part p,
# step t owns the packed rows offsets[p, t] .. offsets[p, t] + active[p, t] of
# arrays such as gates [N, 4H] (N = offsets[P - 1, T]); packed row i of that
# step is batch row order[row_begin[p] + i].
#   - general path: parts are contiguous row ranges, active[p, t] = part size,
#     and a [B, T] mask decides per row and step whether the step is real;
#   - variable-length path (right-padded batch): rows sorted by decreasing
#     length and dealt round-robin to the parts (so they stay balanced), each
#     part sorted again, active[p, t] = its rows longer than t: the finished
#     rows of a step are not in it, so they cost no GEMM rows and no
#     elementwise work.
#
# Per step the forward does one recurrent GEMM into the gate rows (which hold
# the input projection, computed for all of a part's steps by one GEMM
# beforehand, bias folded in), then one pass over the step's rows for
# nonlinearities, cell update, masking and output write. The backward does one
# pass for the gate gradients and one GEMM for dh per step; then the weight
# gradients as two GEMMs over all packed rows (split by gate columns across
# the threads), the bias gradient as a column sum, and dx as one GEMM per part.
#
# Threads: one pool, OpenMP's. When P > 1 the caller has set BLAS to one thread
# for the duration of the call, so each BLAS call runs on the OpenMP thread
# that makes it. The GIL is released for the whole sequence.
#
# Shapes use B batch, T steps, I input features, H units, G = 4H gate columns,
# N packed rows. All index arithmetic is Py_ssize_t (64-bit).

from libc.string cimport memcpy, memset
from libc.limits cimport INT_MAX
from cython cimport floating
from cython.parallel cimport prange
from scipy.linalg.cython_blas cimport sgemm, dgemm, sgemv, dgemv

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

cdef extern from "lstm_gemm.h" nogil:
    int lstmeng_packed_gemm_supported()
    void lstmeng_pack_panels_f32(const float *b, Py_ssize_t K, Py_ssize_t G, int transpose,
                                 float *packed)
    void lstmeng_gemm_packed_f32(Py_ssize_t rows, Py_ssize_t G, Py_ssize_t K, const float *a,
                                 Py_ssize_t lda, const float *packed, float *c, Py_ssize_t ldc)

cdef extern from *:
    """
    #ifdef _OPENMP
    #define LSTMENG_HAVE_OPENMP 1
    #else
    #define LSTMENG_HAVE_OPENMP 0
    #endif
    """
    int LSTMENG_HAVE_OPENMP

#: Whether this build runs parts on OpenMP threads (else parts run one after another).
HAVE_OPENMP = bool(LSTMENG_HAVE_OPENMP)

#: Whether float32 steps use the packed-panel FMA kernel of lstm_gemm.h (else BLAS).
PACKED_GEMM = bool(lstmeng_packed_gemm_supported())
cdef bint packed_gemm = PACKED_GEMM

#: Activation names -> the kind numbers of lstm_rows.h.
ACTIVATION_KINDS = {"tanh": 0, "relu": 1, "sigmoid": 2, "linear": 3, "hard_sigmoid": 4}


cdef void gemm(bint trans_a, bint trans_b, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
               floating alpha, floating *a, Py_ssize_t lda, floating *b, Py_ssize_t ldb,
               floating beta, floating *c, Py_ssize_t ldc) noexcept nogil:
    """Row-major C[m, n] = alpha * op(A) @ op(B) + beta * C through Fortran BLAS.

    BLAS is column-major, and a row-major matrix read column-major is its
    transpose: so row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T,
    i.e. the same call with the operands (and m, n) swapped and the transpose
    flags unchanged. A single row (batch of one) goes to GEMV, which BLAS
    libraries serve much faster than a GEMM with one column. Sizes were checked
    against INT_MAX by the caller.
    """
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    cdef int im = <int>n, i_n = <int>m, ik = <int>k, one = 1
    cdef int ilda = <int>ldb, ildb = <int>lda, ildc = <int>ldc
    cdef Py_ssize_t row
    if m == 0 or n == 0:
        return
    if k == 0:
        if beta == 0:
            for row in range(m):
                memset(c + row * ldc, 0, n * sizeof(floating))
        return
    if m == 1 and not trans_a:
        # c[n] = op(B)^T-as-stored times the row a[k]: column-major B is [n, k] ('N')
        # when B is row-major [k, n], and [k, n] read transposed ('T') when it is [n, k].
        if trans_b:
            if floating is float:
                sgemv(b'T', &ik, &im, &alpha, b, &ilda, a, &one, &beta, c, &one)
            else:
                dgemv(b'T', &ik, &im, &alpha, b, &ilda, a, &one, &beta, c, &one)
        else:
            if floating is float:
                sgemv(b'N', &im, &ik, &alpha, b, &ilda, a, &one, &beta, c, &one)
            else:
                dgemv(b'N', &im, &ik, &alpha, b, &ilda, a, &one, &beta, c, &one)
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


cdef inline floating *rows_of(floating *array, Py_ssize_t row, Py_ssize_t width) noexcept nogil:
    """Pointer to row ``row`` of a row-major [*, width] array, or NULL when array is NULL."""
    return NULL if array == NULL else array + row * width


cdef inline floating *pointer2(floating[:, ::1] array) noexcept nogil:
    return NULL if array is None else &array[0, 0]


cdef inline floating *pointer1(floating[::1] array) noexcept nogil:
    return NULL if array is None or array.shape[0] == 0 else &array[0]


cdef float *packed_panels(floating[:, ::1] matrix, bint transpose, Py_ssize_t columns,
                          object keep):
    """The float32 matrix (or its transpose) packed for lstm_gemm.h, or NULL for BLAS.

    matrix: [K, columns] (or [columns, K] with transpose). ``keep`` (a list)
    holds the packed array alive for the call.
    """
    cdef float[::1] packed
    if floating is double:
        return NULL
    else:
        if not packed_gemm or columns % 32 != 0 or matrix.shape[0] * matrix.shape[1] == 0:
            return NULL
        packed = np.empty(matrix.shape[0] * matrix.shape[1], np.float32)
        keep.append(packed)
        lstmeng_pack_panels_f32(&matrix[0, 0], matrix.shape[1] if transpose else matrix.shape[0],
                                columns, transpose, &packed[0])
        return &packed[0]


def check_blas_sizes(*sizes):
    """Raise ValueError when a GEMM dimension would not fit BLAS's 32-bit int."""
    for size in sizes:
        if size > INT_MAX:
            raise ValueError(f"dimension {size} exceeds the BLAS int limit {INT_MAX}")


cdef void forward_part(
        Py_ssize_t part, Py_ssize_t B, Py_ssize_t T, Py_ssize_t I, Py_ssize_t H,
        floating *x, floating *h0, floating *c0, floating *kernel, floating *recurrent_kernel,
        float *recurrent_packed,
        floating *bias, const unsigned char *mask, floating *in_drop, floating *rec_drop,
        const Py_ssize_t[::1] order, const Py_ssize_t[::1] row_begin,
        const Py_ssize_t[:, ::1] active, const Py_ssize_t[:, ::1] offsets,
        int act, int ract, bint reverse, bint zero_output_for_mask,
        floating *sequence_outputs, floating *last_output, floating *h_out, floating *c_out,
        floating *packed_x, floating *gates, floating *c_prev_all, floating *cell_act_all,
        floating *h_in_all, floating *h_state, floating *c_state, floating *h_in_step,
        unsigned char *seen, Py_ssize_t chunk_steps, Py_ssize_t part_chunk_rows) noexcept nogil:
    """The whole forward sequence of one part's rows (see ``forward`` for the arguments)."""
    cdef Py_ssize_t G = 4 * H
    cdef Py_ssize_t r_begin = row_begin[part], r_end = row_begin[part + 1]
    cdef bint training = h_in_all != NULL
    cdef Py_ssize_t step, chunk_first, chunk_last, t, t_lo, t_hi, i, r, row, n_rows
    cdef Py_ssize_t buffer_shift, first_row, rows
    cdef floating *h_in
    cdef floating *step_gates
    cdef floating *out_row
    cdef bint real

    for r in range(r_begin, r_end):
        memcpy(h_state + r * H, h0 + order[r] * H, H * sizeof(floating))
        memcpy(c_state + r * H, c0 + order[r] * H, H * sizeof(floating))
        seen[r] = 0

    chunk_first = 0
    while chunk_first < T:
        chunk_last = min(chunk_first + chunk_steps, T)
        # Input times of this chunk of processing steps, and where their packed rows
        # live: in the workspace (training), or in this part's slice of the chunk buffer.
        if reverse:
            t_lo, t_hi = T - chunk_last, T - chunk_first
        else:
            t_lo, t_hi = chunk_first, chunk_last
        first_row = offsets[part, t_lo]
        buffer_shift = 0 if training else part * part_chunk_rows - first_row
        rows = offsets[part, t_hi] - first_row
        for t in range(t_lo, t_hi):
            for i in range(active[part, t]):
                row = order[r_begin + i]
                scaled_copy(packed_x + (offsets[part, t] + i + buffer_shift) * I, x + (row * T + t) * I,
                            rows_of(in_drop, row, I), I)
        # The input projection of every step in the chunk: one GEMM, bias folded in
        # by starting from broadcast bias rows (beta = 1).
        step_gates = gates + (first_row + buffer_shift) * G
        if bias != NULL:
            for i in range(rows):
                memcpy(step_gates + i * G, bias, G * sizeof(floating))
        gemm(False, False, rows, G, I, <floating>1, packed_x + (first_row + buffer_shift) * I, I,
             kernel, G, <floating>(1 if bias != NULL else 0), step_gates, G)

        for step in range(chunk_first, chunk_last):
            t = T - 1 - step if reverse else step
            n_rows = active[part, t]
            if n_rows == 0:
                continue
            step_gates = gates + (offsets[part, t] + buffer_shift) * G
            # h(t-1) as it enters the recurrence (after recurrent dropout).
            if training:
                h_in = h_in_all + offsets[part, t] * H
                for i in range(n_rows):
                    r = r_begin + i
                    scaled_copy(h_in + i * H, h_state + r * H, rows_of(rec_drop, order[r], H), H)
            elif rec_drop != NULL:
                h_in = h_in_step + r_begin * H
                for i in range(n_rows):
                    r = r_begin + i
                    scaled_copy(h_in + i * H, h_state + r * H, rec_drop + order[r] * H, H)
            else:
                h_in = h_state + r_begin * H
            if floating is float:
                if recurrent_packed != NULL:
                    lstmeng_gemm_packed_f32(n_rows, G, H, h_in, H, recurrent_packed, step_gates, G)
                else:
                    gemm(False, False, n_rows, G, H, <floating>1, h_in, H, recurrent_kernel, G,
                         <floating>1, step_gates, G)
            else:
                gemm(False, False, n_rows, G, H, <floating>1, h_in, H, recurrent_kernel, G,
                     <floating>1, step_gates, G)

            for i in range(n_rows):
                r = r_begin + i
                row = order[r]
                real = mask == NULL or mask[row * T + t]
                if real:
                    forward_row(step_gates + i * G, c_state + r * H,
                                rows_of(c_prev_all, offsets[part, t] + i, H),
                                rows_of(cell_act_all, offsets[part, t] + i, H),
                                h_state + r * H, H, act, ract)
                    seen[r] = 1
                if sequence_outputs != NULL:
                    out_row = sequence_outputs + (row * T + t) * H
                    if real or (seen[r] and not zero_output_for_mask):
                        memcpy(out_row, h_state + r * H, H * sizeof(floating))
                    else:
                        memset(out_row, 0, H * sizeof(floating))
        chunk_first = chunk_last

    for r in range(r_begin, r_end):
        row = order[r]
        i = r - r_begin
        if sequence_outputs != NULL:
            # Rows outside active[p, t] (finished rows of the variable-length path) are
            # masked steps: they repeat h once a real step came (forward, these steps
            # come after the real ones; reversed, before), else they are zeros.
            for t in range(T):
                if i >= active[part, t]:
                    out_row = sequence_outputs + (row * T + t) * H
                    if seen[r] and not zero_output_for_mask and not reverse:
                        memcpy(out_row, h_state + r * H, H * sizeof(floating))
                    else:
                        memset(out_row, 0, H * sizeof(floating))
        else:
            # The last processed step's output.
            t = 0 if reverse else T - 1
            real = i < active[part, t] and (mask == NULL or mask[row * T + t])
            if real or (seen[r] and not zero_output_for_mask):
                memcpy(last_output + row * H, h_state + r * H, H * sizeof(floating))
            else:
                memset(last_output + row * H, 0, H * sizeof(floating))
        memcpy(h_out + row * H, h_state + r * H, H * sizeof(floating))
        memcpy(c_out + row * H, c_state + r * H, H * sizeof(floating))


def forward(floating[:, :, ::1] x, floating[:, ::1] h0, floating[:, ::1] c0,
            floating[:, ::1] kernel, floating[:, ::1] recurrent_kernel, floating[::1] bias,
            const unsigned char[:, ::1] mask,
            floating[:, ::1] input_dropout_mask, floating[:, ::1] recurrent_dropout_mask,
            const Py_ssize_t[::1] order, const Py_ssize_t[::1] row_begin,
            const Py_ssize_t[:, ::1] active, const Py_ssize_t[:, ::1] offsets,
            int act, int ract, bint reverse, bint zero_output_for_mask,
            floating[:, :, ::1] sequence_outputs, floating[:, ::1] last_output,
            floating[:, ::1] h_out, floating[:, ::1] c_out,
            floating[:, ::1] packed_x, floating[:, ::1] gates,
            floating[:, ::1] c_prev_all, floating[:, ::1] cell_act_all,
            floating[:, ::1] h_in_all,
            floating[:, ::1] h_state, floating[:, ::1] c_state, floating[:, ::1] h_in_step,
            Py_ssize_t chunk_steps, Py_ssize_t part_chunk_rows):
    """Whole-sequence forward of one layer and direction; writes into the given arrays.

    x: [B, T, I]; h0, c0: [B, H]; kernel: [I, 4H]; recurrent_kernel: [H, 4H];
    bias: [4H] or None; mask: [B, T] (uint8, 1 = real) or None when every
    packed row of a step is real; input_dropout_mask: [B, I] or None;
    recurrent_dropout_mask: [B, H] or None; order: [B]; row_begin: [P + 1];
    active: [P, T]; offsets: [P, T + 1] (see the module comment).
    sequence_outputs: [B, T, H] or None; last_output: [B, H] or None
        (exactly one is given).
    h_out, c_out: [B, H] final states (caller's row order).
    Training (h_in_all given): packed_x [N, I], gates [N, 4H],
        c_prev_all, cell_act_all, h_in_all [N, H] are the workspace and
        chunk_steps must be T. Inference (h_in_all None): packed_x
        [P * part_chunk_rows, I] and gates [P * part_chunk_rows, 4H] are
        reused per chunk of chunk_steps steps; nothing per step is kept.
    h_state, c_state, h_in_step: [B, H] scratch in packed row order.
    """
    cdef Py_ssize_t B = x.shape[0], T = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t H = recurrent_kernel.shape[0], P = row_begin.shape[0] - 1, part
    cdef unsigned char[::1] seen = np.zeros(B + 1, np.uint8)
    cdef const unsigned char *mask_ptr = NULL if mask is None else &mask[0, 0]
    cdef floating *x_ptr = &x[0, 0, 0]
    cdef floating *h0_ptr = &h0[0, 0]
    cdef floating *c0_ptr = &c0[0, 0]
    cdef floating *kernel_ptr = pointer2(kernel)
    cdef floating *recurrent_ptr = &recurrent_kernel[0, 0]
    cdef floating *bias_ptr = pointer1(bias)
    cdef floating *in_drop = pointer2(input_dropout_mask)
    cdef floating *rec_drop = pointer2(recurrent_dropout_mask)
    cdef floating *sequence_ptr = NULL if sequence_outputs is None else &sequence_outputs[0, 0, 0]
    cdef floating *last_ptr = pointer2(last_output)
    cdef floating *h_out_ptr = &h_out[0, 0]
    cdef floating *c_out_ptr = &c_out[0, 0]
    cdef floating *packed_ptr = pointer2(packed_x)
    cdef floating *gates_ptr = pointer2(gates)
    cdef floating *c_prev_ptr = pointer2(c_prev_all)
    cdef floating *cell_act_ptr = pointer2(cell_act_all)
    cdef floating *h_in_ptr = pointer2(h_in_all)
    cdef floating *h_state_ptr = &h_state[0, 0]
    cdef floating *c_state_ptr = &c_state[0, 0]
    cdef floating *h_in_step_ptr = &h_in_step[0, 0]
    cdef unsigned char *seen_ptr = &seen[0]
    keep = []
    # recurrent_kernel [H, 4H] packed once for every step's product (float32, AVX2).
    cdef float *recurrent_packed = packed_panels(recurrent_kernel, False, 4 * H, keep)

    check_blas_sizes(offsets[P - 1, T], 4 * H, I, H, part_chunk_rows * P)
    with nogil:
        for part in prange(P, num_threads=P, schedule="static"):
            forward_part(part, B, T, I, H, x_ptr, h0_ptr, c0_ptr, kernel_ptr, recurrent_ptr,
                         recurrent_packed, bias_ptr, mask_ptr, in_drop, rec_drop, order, row_begin, active, offsets,
                         act, ract, reverse, zero_output_for_mask, sequence_ptr, last_ptr,
                         h_out_ptr, c_out_ptr, packed_ptr, gates_ptr, c_prev_ptr, cell_act_ptr,
                         h_in_ptr, h_state_ptr, c_state_ptr, h_in_step_ptr, seen_ptr,
                         chunk_steps, part_chunk_rows)


cdef void backward_part(
        Py_ssize_t part, Py_ssize_t B, Py_ssize_t T, Py_ssize_t H,
        floating *doutputs_sequence, floating *doutputs_last, floating *dh, floating *dc,
        floating *recurrent_kernel, float *recurrent_t_packed, const unsigned char *mask,
        floating *rec_drop,
        const Py_ssize_t[::1] order, const Py_ssize_t[::1] row_begin,
        const Py_ssize_t[:, ::1] active, const Py_ssize_t[:, ::1] offsets,
        int act, int ract, bint reverse, bint zero_output_for_mask,
        floating *gates, floating *c_prev_all, floating *cell_act_all,
        floating *dh0, floating *dc0, floating *dh_carry, floating *dh_recurrent,
        floating *dc_state, floating *dh_total, floating *scratch,
        unsigned char *previous_real, Py_ssize_t *first_real, Py_ssize_t *last_real) noexcept nogil:
    """The backward time loop of one part's rows (see ``backward`` for the arguments)."""
    cdef Py_ssize_t G = 4 * H
    cdef Py_ssize_t r_begin = row_begin[part], r_end = row_begin[part + 1]
    cdef Py_ssize_t step, position, t, i, r, row, j, n_rows
    cdef bint real
    cdef floating *step_gates
    cdef floating *dy

    # Processing positions of each row's first and last real step (T / -1 if none).
    for r in range(r_begin, r_end):
        first_real[r] = T
        last_real[r] = -1
    for position in range(T):
        t = T - 1 - position if reverse else position
        for i in range(active[part, t]):
            r = r_begin + i
            if mask == NULL or mask[order[r] * T + t]:
                if first_real[r] == T:
                    first_real[r] = position
                last_real[r] = position

    for r in range(r_begin, r_end):
        row = order[r]
        i = r - r_begin
        previous_real[r] = 0
        memcpy(dh_carry + r * H, dh + row * H, H * sizeof(floating))
        memcpy(dc_state + r * H, dc + row * H, H * sizeof(floating))
        if doutputs_last != NULL:
            # The last output is h on the rows where it is not zero (see the forward).
            if last_real[r] == T - 1 or (last_real[r] >= 0 and not zero_output_for_mask):
                for j in range(H):
                    dh_carry[r * H + j] += doutputs_last[row * H + j]
        elif not zero_output_for_mask and last_real[r] >= 0:
            # Steps outside active[p, t] after the row's first real step repeat h.
            for t in range(T):
                position = T - 1 - t if reverse else t
                if i >= active[part, t] and position > first_real[r]:
                    for j in range(H):
                        dh_carry[r * H + j] += doutputs_sequence[(row * T + t) * H + j]

    for step in range(T - 1, -1, -1):
        t = T - 1 - step if reverse else step
        n_rows = active[part, t]
        if n_rows == 0:
            continue
        step_gates = gates + offsets[part, t] * G
        for i in range(n_rows):
            r = r_begin + i
            row = order[r]
            real = mask == NULL or mask[row * T + t]
            # Gradient reaching h(t): from the recurrence (or the carry) plus this
            # step's output when that output is h (a real step, or a masked one
            # repeating h after an earlier real step).
            if previous_real[r]:
                scaled_copy(dh_total, dh_recurrent + r * H, rows_of(rec_drop, row, H), H)
            else:
                memcpy(dh_total, dh_carry + r * H, H * sizeof(floating))
            if doutputs_sequence != NULL and (
                    real or (step > first_real[r] and not zero_output_for_mask)):
                dy = doutputs_sequence + (row * T + t) * H
                for j in range(H):
                    dh_total[j] += dy[j]
            if real:
                backward_row(step_gates + i * G, cell_act_all + (offsets[part, t] + i) * H,
                             c_prev_all + (offsets[part, t] + i) * H, dh_total, dc_state + r * H,
                             scratch, H, act, ract)
            else:
                memcpy(dh_carry + r * H, dh_total, H * sizeof(floating))
                memset(step_gates + i * G, 0, G * sizeof(floating))
            previous_real[r] = real
        # dh(t-1) = dz(t) @ R^T for the step's rows.
        if floating is float:
            if recurrent_t_packed != NULL:
                memset(dh_recurrent + r_begin * H, 0, n_rows * H * sizeof(float))
                lstmeng_gemm_packed_f32(n_rows, H, G, step_gates, G, recurrent_t_packed,
                                        dh_recurrent + r_begin * H, H)
            else:
                gemm(False, True, n_rows, H, G, <floating>1, step_gates, G, recurrent_kernel, G,
                     <floating>0, dh_recurrent + r_begin * H, H)
        else:
            gemm(False, True, n_rows, H, G, <floating>1, step_gates, G, recurrent_kernel, G,
                 <floating>0, dh_recurrent + r_begin * H, H)

    for r in range(r_begin, r_end):
        row = order[r]
        if previous_real[r]:
            scaled_copy(dh0 + row * H, dh_recurrent + r * H, rows_of(rec_drop, row, H), H)
        else:
            memcpy(dh0 + row * H, dh_carry + r * H, H * sizeof(floating))
        memcpy(dc0 + row * H, dc_state + r * H, H * sizeof(floating))


def backward(floating[:, :, ::1] doutputs_sequence, floating[:, ::1] doutputs_last,
             floating[:, ::1] dh, floating[:, ::1] dc,
             floating[:, ::1] kernel, floating[:, ::1] recurrent_kernel,
             const unsigned char[:, ::1] mask,
             floating[:, ::1] input_dropout_mask, floating[:, ::1] recurrent_dropout_mask,
             const Py_ssize_t[::1] order, const Py_ssize_t[::1] row_begin,
             const Py_ssize_t[:, ::1] active, const Py_ssize_t[:, ::1] offsets,
             int act, int ract, bint reverse, bint zero_output_for_mask,
             floating[:, ::1] packed_x, floating[:, ::1] gates,
             floating[:, ::1] c_prev_all, floating[:, ::1] cell_act_all,
             floating[:, ::1] h_in_all,
             floating[:, :, ::1] dx, floating[:, ::1] dh0, floating[:, ::1] dc0,
             floating[:, ::1] dkernel, floating[:, ::1] drecurrent_kernel, floating[::1] dbias,
             Py_ssize_t threads=1):
    """Backward of `forward` (training); the workspace arrays are overwritten.

    doutputs_sequence: [B, T, H] or None; doutputs_last: [B, H] or None
    (exactly one given); dh, dc: [B, H] gradients of the final states;
    workspace arrays as written by `forward`: packed_x [N, I], gates [N, 4H]
    (become the gate-input gradients dz), c_prev_all, cell_act_all,
    h_in_all [N, H]. Outputs: dx [B, T, I] (must be zero on entry: steps
    outside the packed rows get no gradient), dh0, dc0 [B, H], dkernel
    [I, 4H], drecurrent_kernel [H, 4H], dbias [4H]. threads: how many
    threads share the weight-gradient GEMMs (by gate columns), also when the
    batch is a single part.
    """
    cdef Py_ssize_t B = dh.shape[0], P = row_begin.shape[0] - 1, T = offsets.shape[1] - 1
    cdef Py_ssize_t I = kernel.shape[0], H = recurrent_kernel.shape[0], G = 4 * H
    cdef Py_ssize_t N = offsets[P - 1, T]
    cdef Py_ssize_t part, t, i, r, row, j, column_begin, column_end
    # Gate columns per thread for the weight gradients, a multiple of 16 (whole cache lines).
    cdef Py_ssize_t column_threads = max(1, threads) if LSTMENG_HAVE_OPENMP else 1
    cdef Py_ssize_t column_block = ((G + column_threads - 1) // column_threads + 15) // 16 * 16
    dtype = np.asarray(dh).dtype
    # Per-row state of the backward time loop, in packed row order: dh_carry is the
    # gradient reaching h for rows whose later step was masked or not processed,
    # dh_recurrent = dz @ R^T for rows whose later step was real.
    cdef floating[:, ::1] dh_carry = np.empty((B, H), dtype)
    cdef floating[:, ::1] dh_recurrent = np.empty((B, H), dtype)
    cdef floating[:, ::1] dc_state = np.empty((B, H), dtype)
    cdef floating[:, ::1] dh_total = np.empty((P, H), dtype)
    cdef floating[:, ::1] scratch = np.empty((P, 5 * H), dtype)
    cdef unsigned char[::1] previous_real = np.zeros(B + 1, np.uint8)
    cdef Py_ssize_t[::1] first_real = np.empty(B + 1, np.intp)
    cdef Py_ssize_t[::1] last_real = np.empty(B + 1, np.intp)
    cdef const unsigned char *mask_ptr = NULL if mask is None else &mask[0, 0]
    cdef floating *dseq = NULL if doutputs_sequence is None else &doutputs_sequence[0, 0, 0]
    cdef floating *dlast = pointer2(doutputs_last)
    cdef floating *dh_ptr = &dh[0, 0]
    cdef floating *dc_ptr = &dc[0, 0]
    cdef floating *kernel_ptr = pointer2(kernel)
    cdef floating *recurrent_ptr = &recurrent_kernel[0, 0]
    cdef floating *in_drop = pointer2(input_dropout_mask)
    cdef floating *rec_drop = pointer2(recurrent_dropout_mask)
    cdef floating *packed_ptr = pointer2(packed_x)
    cdef floating *gates_ptr = pointer2(gates)
    cdef floating *c_prev_ptr = pointer2(c_prev_all)
    cdef floating *cell_act_ptr = pointer2(cell_act_all)
    cdef floating *h_in_ptr = pointer2(h_in_all)
    cdef floating *dx_ptr = &dx[0, 0, 0]
    cdef floating *dh0_ptr = &dh0[0, 0]
    cdef floating *dc0_ptr = &dc0[0, 0]
    cdef floating *dkernel_ptr = pointer2(dkernel)
    cdef floating *drecurrent_ptr = &drecurrent_kernel[0, 0]
    cdef floating *dbias_ptr = &dbias[0]
    cdef floating *dh_carry_ptr = &dh_carry[0, 0]
    cdef floating *dh_recurrent_ptr = &dh_recurrent[0, 0]
    cdef floating *dc_state_ptr = &dc_state[0, 0]
    cdef floating *dh_total_ptr = &dh_total[0, 0]
    cdef floating *scratch_ptr = &scratch[0, 0]
    cdef unsigned char *previous_real_ptr = &previous_real[0]
    cdef Py_ssize_t *first_real_ptr = &first_real[0]
    cdef Py_ssize_t *last_real_ptr = &last_real[0]
    keep = []
    # R^T [4H, H] packed once for every step's dh product (float32, AVX2).
    cdef float *recurrent_t_packed = packed_panels(recurrent_kernel, True, H, keep)

    check_blas_sizes(N, G, I, H)
    with nogil:
        for part in prange(P, num_threads=P, schedule="static"):
            backward_part(part, B, T, H, dseq, dlast, dh_ptr, dc_ptr, recurrent_ptr,
                          recurrent_t_packed, mask_ptr,
                          rec_drop, order, row_begin, active, offsets, act, ract, reverse,
                          zero_output_for_mask, gates_ptr, c_prev_ptr, cell_act_ptr, dh0_ptr,
                          dc0_ptr, dh_carry_ptr, dh_recurrent_ptr, dc_state_ptr,
                          dh_total_ptr + part * H, scratch_ptr + part * 5 * H, previous_real_ptr,
                          first_real_ptr, last_real_ptr)

        # Weight gradients over all packed rows, each thread a block of gate columns:
        # dK = X^T dz, dR = H_in^T dz, db = column sums of dz.
        for part in prange(column_threads, num_threads=column_threads, schedule="static"):
            column_begin = part * column_block
            column_end = min(G, column_begin + column_block)
            if column_begin < column_end:
                gemm_columns(I, H, G, N, column_begin, column_end, packed_ptr, h_in_ptr, gates_ptr,
                             dkernel_ptr, drecurrent_ptr, dbias_ptr)

        # dx = dz @ K^T, one GEMM per part written over its packed_x rows (consumed
        # above), then scattered to [B, T, I] with the input dropout mask.
        for part in prange(P, num_threads=P, schedule="static"):
            dx_part(part, T, I, G, kernel_ptr, gates_ptr, packed_ptr, dx_ptr, in_drop,
                    order, row_begin, active, offsets)


cdef void gemm_columns(Py_ssize_t I, Py_ssize_t H, Py_ssize_t G, Py_ssize_t N,
                       Py_ssize_t column_begin, Py_ssize_t column_end, floating *packed_x,
                       floating *h_in_all, floating *dz, floating *dkernel,
                       floating *drecurrent_kernel, floating *dbias) noexcept nogil:
    """Gate columns column_begin .. column_end - 1 of dK [I, G], dR [H, G] and db [G]."""
    cdef Py_ssize_t width = column_end - column_begin, r, j
    cdef floating *dz_row
    gemm(True, False, I, width, N, <floating>1, packed_x, I, dz + column_begin, G,
         <floating>0, dkernel + column_begin, G)
    gemm(True, False, H, width, N, <floating>1, h_in_all, H, dz + column_begin, G,
         <floating>0, drecurrent_kernel + column_begin, G)
    memset(dbias + column_begin, 0, width * sizeof(floating))
    for r in range(N):
        dz_row = dz + r * G + column_begin
        for j in range(width):
            dbias[column_begin + j] += dz_row[j]


cdef void dx_part(Py_ssize_t part, Py_ssize_t T, Py_ssize_t I, Py_ssize_t G, floating *kernel,
                  floating *dz, floating *packed_x, floating *dx, floating *in_drop,
                  const Py_ssize_t[::1] order, const Py_ssize_t[::1] row_begin,
                  const Py_ssize_t[:, ::1] active, const Py_ssize_t[:, ::1] offsets) noexcept nogil:
    """dx of one part's rows: dz @ K^T into its packed rows, then scattered into dx [B, T, I]."""
    cdef Py_ssize_t first_row = offsets[part, 0], rows = offsets[part, T] - first_row, t, i, row
    gemm(False, True, rows, I, G, <floating>1, dz + first_row * G, G, kernel, G,
         <floating>0, packed_x + first_row * I, I)
    for t in range(T):
        for i in range(active[part, t]):
            row = order[row_begin[part] + i]
            scaled_copy(dx + (row * T + t) * I, packed_x + (offsets[part, t] + i) * I,
                        rows_of(in_drop, row, I), I)
