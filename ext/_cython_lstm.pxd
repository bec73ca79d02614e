# C-level interface of the "cython" backend's kernels (_cython_lstm.pyx): the C
# headers they call, the structs a call is described by, and the kernel
# signatures. See the .pyx module comment for the packed-row layout, the part
# and unit splits, and the threading.
#
# A call builds its structs once, in the Python-level `forward` / `backward`,
# and every kernel below takes them by pointer instead of dozens of positional
# pointers, so an array cannot be passed in the wrong place:
#   - LstmProblem: the sizes, the packed-row layout, the options and the barrier
#     flags; read-only while the call runs;
#   - LstmBuffers: the forward's arrays (inputs, weights, outputs, workspace,
#     scratch), which the backward reads again;
#   - LstmGradients: the backward's arrays (incoming gradients, gradients out,
#     the time loop's scratch);
#   - TeamShare: what one thread runs (a part's rows, a range of units) and that
#     thread's scratch.
#
# The float arrays are `void *`: a Cython struct cannot hold a fused type. Every
# array of one call has the call's element type (the fused memoryviews of the
# Python-level function see to that); each kernel is specialised on `floating`
# and casts the pointers it uses once, at its top. Kernels that take no float
# array otherwise take `floating zero` (the value 0 of the call's type), which
# only selects the float32 or float64 specialisation.
#
# Shapes use B batch, T steps, I input features, H units, G = 4H gate columns,
# P parts, N packed rows.

from libc.stdint cimport int64_t
from cython cimport floating

cdef extern from "lstm_rows.h" nogil:
    int lstmeng_fast_rows
    void lstmeng_forward_row_f32(float *gates, float *c, float *c_prev, float *h,
                                 Py_ssize_t n, Py_ssize_t stride, int act, int ract)
    void lstmeng_forward_row_f64(double *gates, double *c, double *c_prev, double *h,
                                 Py_ssize_t n, Py_ssize_t stride, int act, int ract)
    void lstmeng_backward_row_f32(float *gates, const float *c_prev, const float *dh, float *dc,
                                  float *scratch, Py_ssize_t n, Py_ssize_t stride, int act, int ract)
    void lstmeng_backward_row_f64(double *gates, const double *c_prev, const double *dh,
                                  double *dc, double *scratch, Py_ssize_t n, Py_ssize_t stride,
                                  int act, int ract)

cdef extern from "lstm_cpu.h" nogil:
    int lstmeng_avx2_fma_supported()
    int lstmeng_avx512_supported()
    int lstmeng_best_isa()
    int lstmeng_isa
    const int LSTMENG_ISA_SCALAR, LSTMENG_ISA_AVX2, LSTMENG_ISA_AVX512
    void lstmeng_prefetch_row(const void *p, int64_t bytes, int for_write)
    int64_t lstmeng_l1d_bytes()

cdef extern from "lstm_gemm.h" nogil:
    void lstmeng_pack_panels_f32(const float *b, Py_ssize_t K, Py_ssize_t G, Py_ssize_t ld,
                                 int transpose, float *packed)
    void lstmeng_gemm_packed_f32(Py_ssize_t rows, Py_ssize_t G, Py_ssize_t K, const float *a,
                                 Py_ssize_t lda, const float *packed, float *c, Py_ssize_t ldc)
    void lstmeng_gemm_packed_bias_f32(Py_ssize_t rows, Py_ssize_t G, Py_ssize_t K, const float *a,
                                      Py_ssize_t lda, const float *packed, const float *bias, float *c,
                                      Py_ssize_t ldc)
    void lstmeng_gemm_at_packed_f32(Py_ssize_t rows, Py_ssize_t G, Py_ssize_t K, const float *a,
                                    Py_ssize_t lda, const float *packed, const float *start, float *c,
                                    Py_ssize_t ldc)

cdef extern from "lstm_halves.h" nogil:
    const int LSTMENG_HALVES_OWN, LSTMENG_HALVES_OTHER
    ctypedef struct LstmengHalvesOrder:
        int64_t out_blocks, pairs, pieces, early, own_turn, other_turn, own_start, other_start
    LstmengHalvesOrder lstmeng_halves_order(Py_ssize_t H, Py_ssize_t k_split, Py_ssize_t u0, Py_ssize_t width,
                                            int out_blocks, int k_blocks, int member, int64_t l1_bytes)
    void lstmeng_halves_order_next(LstmengHalvesOrder *order)
    void lstmeng_row_halves_member_f32(Py_ssize_t H, Py_ssize_t k_split, Py_ssize_t u0, int k_blocks,
                                       const float *a, const float *packed, float *c, int phase,
                                       const LstmengHalvesOrder *order)
    void lstmeng_row_halves_whole_f32(Py_ssize_t H, Py_ssize_t k_split, Py_ssize_t u0, int k_blocks,
                                      const float *a, const float *packed, float *c,
                                      const LstmengHalvesOrder *order)
    void lstmeng_pack_halves_f32(const float *m, Py_ssize_t H, Py_ssize_t k_split, Py_ssize_t u0,
                                 Py_ssize_t width, int out_blocks, int k_blocks, Py_ssize_t ld_i,
                                 Py_ssize_t ld_j, int paired, float *packed)

cdef extern from "lstm_gemv.h" nogil:
    bint lstmeng_gemv_takes_f32(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k)
    bint lstmeng_gemv_took_f32(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k)
    void lstmeng_gemv_f32(Py_ssize_t m, int b_transposed, Py_ssize_t n, Py_ssize_t k, const float *a,
                          Py_ssize_t lda, const float *b, Py_ssize_t ldb, int accumulate, float *y,
                          Py_ssize_t ldy)

cdef extern from "lstm_transpose.h" nogil:
    void lstmeng_transpose_f32(Py_ssize_t rows, Py_ssize_t cols, const float *src, Py_ssize_t lds, float *dst,
                               Py_ssize_t ldd)
    void lstmeng_transpose_f64(Py_ssize_t rows, Py_ssize_t cols, const double *src, Py_ssize_t lds, double *dst,
                               Py_ssize_t ldd)

cdef extern from "lstm_sync.h" nogil:
    const int LSTMENG_FLAG_STRIDE
    const int LSTMENG_SLOW_WAIT_NS
    int lstmeng_team_size()
    int lstmeng_thread_index()
    void lstmeng_barrier_wait(int64_t *flags, int64_t member, int64_t team, int64_t calls)
    void lstmeng_barrier_arrive(int64_t *flags, int64_t member, int64_t calls)
    void lstmeng_barrier_depart(int64_t *flags, int64_t member, int64_t team, int64_t calls)
    void lstmeng_team_slow_waits(const int64_t *flags, int64_t team, int64_t *barriers,
                                 int64_t *slow_wait_ns)
    void lstmeng_progress_publish(int64_t *slot, int64_t value)
    int64_t lstmeng_progress_claim(int64_t *counter)
    bint lstmeng_progress_claim_exact(int64_t *counter, int64_t item)
    int64_t lstmeng_progress_wait(const int64_t *slot, int64_t value)


cdef struct Layout:
    # Which batch rows each part runs, and where each step's rows are packed (see
    # the .pyx module comment). uniform: active and offsets are [P] (per part: its
    # rows, its first packed row) and every step of a part has the same rows.
    const Py_ssize_t *order      # [B]: packed row order -> batch row
    const Py_ssize_t *row_begin  # [P + 1]: part p has rows row_begin[p] .. row_begin[p + 1] - 1
    const Py_ssize_t *active     # [P, T], or [P] when uniform: rows of each step
    const Py_ssize_t *offsets    # [P, T + 1], or [P] when uniform: first packed row of each step
    Py_ssize_t T
    bint uniform


cdef struct LstmProblem:
    # What a call computes; the same for every thread and read-only while it runs.
    Py_ssize_t batch               # B
    Py_ssize_t steps               # T
    Py_ssize_t inputs              # I (not `I`: complex.h defines I as a macro)
    Py_ssize_t units               # H
    Py_ssize_t gate_columns        # G = 4H
    Py_ssize_t parts               # P (layout.row_begin has P + 1 entries)
    Py_ssize_t packed_rows         # N, the training workspace's rows
    Layout layout
    const unsigned char *mask      # [B, T] uint8, 1 = real step; NULL: every packed row is real
    int act, ract                  # activation kinds (lstm_rows.h) of the cell and of the gates
    bint reverse                   # process the steps from T - 1 down to 0
    bint zero_output_for_mask      # masked steps output zeros instead of repeating h
    bint training                  # forward: write the workspace (h_in_all, c_prev_all)
    bint weights_transposed        # kernel given as K^T [4H, I], recurrent kernel as R^T [4H, H]
    bint recurrent_halves          # batch 1: each step's recurrent product in halves (product_in_halves;
                                   # the recurrent kernel packed for it)
    Py_ssize_t chunk_steps         # forward: steps whose input projection is one GEMM
    Py_ssize_t part_chunk_rows     # forward: rows of packed_x (and inference gates) per part
    int64_t *barrier_flags         # [team, LSTMENG_FLAG_STRIDE]: lstm_sync.h's flags
    int64_t *projection_claims     # pipelined forward: [0] chunks claimed so far, [LSTMENG_FLAG_STRIDE]
                                   # 1 once the other thread has projected its last chunk,
                                   # [2 * LSTMENG_FLAG_STRIDE] chunks the time loop has finished;
                                   # NULL otherwise
    int64_t *projection_done       # pipelined forward: [chunks] 1 once a chunk's projection is in
    Py_ssize_t projection_slots    # pipelined forward: slots of packed_x / inference gates chunks take in turn


cdef struct LstmBuffers:
    # The forward's arrays, row-major, all of the call's element type (void *: see
    # the top of this file). The backward reads x, the weights, the dropout masks
    # and the workspace again.
    void *x                        # [B, T, I]
    void *h0                       # [B, H]
    void *c0                       # [B, H]
    void *kernel                   # [I, 4H] (K^T [4H, I] when weights_transposed), or NULL when I = 0
    void *recurrent_kernel         # [H, 4H] (R^T [4H, H] when weights_transposed)
    void *bias                     # [4H], or NULL
    void *input_dropout            # [B, I] scale per batch row and input, or NULL
    void *recurrent_dropout        # [B, H] scale per batch row and unit, or NULL
    void *sequence_outputs         # [B, T, H], or NULL (then last_output is given)
    void *last_output              # [B, H], or NULL
    void *h_out                    # [B, H] final states, caller's row order
    void *c_out                    # [B, H]
    void *packed_x                 # forward: [P * part_chunk_rows, I]; backward: [N, I]
    void *gates                    # training: [N, 4H] (the backward turns it into dz);
                                   # inference: [P * part_chunk_rows, 4H], reused per chunk
    void *c_prev_all               # [N, H] c(t - 1) per packed row, or NULL (inference)
    void *h_in_all                 # [N, H] h(t - 1) after recurrent dropout, or NULL
    void *h_state                  # [B, H] h in packed row order (forward scratch)
    void *c_state                  # [B, H] c in packed row order (forward scratch)
    void *h_in_step                # [2, B, H] alternating h(t - 1) of inference steps


cdef struct LstmGradients:
    # The backward's arrays, of the call's element type (void *: see the top).
    void *doutputs_sequence        # [B, T, H], or NULL (then doutputs_last is given)
    void *doutputs_last            # [B, H], or NULL
    void *dh                       # [B, H] gradient of the final h
    void *dc                       # [B, H] gradient of the final c
    void *dx                       # [B, T, I], zero on entry
    void *dh0                      # [B, H]
    void *dc0                      # [B, H]
    void *dkernel                  # [I, 4H], or NULL when I = 0
    void *drecurrent_kernel        # [H, 4H]
    void *dbias                    # [4H]
    # State of the time loop, in packed row order.
    void *dh_carry                 # [B, H] gradient reaching h past masked/unprocessed steps
    void *dh_recurrent             # [B, H] dz(t) @ R^T of the last processed step
    void *dc_state                 # [B, H]
    void *dbias_partial            # [threads, 4H] each thread's column sums of dz
    float *kernel_t_packed         # K^T [4H, I] packed for dx (float32), or NULL (BLAS)
    float *gradient_panels         # [column threads, WEIGHT_GRADIENT_CHUNK * column block]
    const float *zero_row          # [4H] zeros: the start of a weight-gradient product's first chunk
    Py_ssize_t column_block        # gate columns per thread in the weight gradients


cdef struct TeamShare:
    # What one thread runs: units u0 .. u1 - 1 of part `part`'s rows. A whole
    # part (u0 = 0, u1 = H) is a team of one; a unit split is one member of a team
    # that covers all units of the part, and every member makes the same sequence
    # of barrier calls.
    Py_ssize_t part
    Py_ssize_t u0, u1
    Py_ssize_t team, member
    int64_t barriers               # barrier calls made so far
    Py_ssize_t steps_run           # forward steps with rows run so far (picks h_in_step's half)
    LstmengHalvesOrder halves_order  # batch 1 in halves: the order of this step's product
    float *kernel_packed           # forward: this slice of the input kernel packed, or NULL (BLAS)
    float *recurrent_packed        # this slice of R (forward) or R^T (backward) packed, or NULL
    # Scratch of the thread that runs the share (indexed by packed row where [B]).
    unsigned char *seen            # forward [B]: the row had a real step
    void *dh_total                 # backward [H]
    void *scratch                  # backward [6H]
    void *dbias_partial            # backward [4H]: this thread's row of dbias_partial
    unsigned char *previous_real   # backward [B]: the row's later step was real
    Py_ssize_t *first_real         # backward [B]: position of the row's first real step
    Py_ssize_t *last_real          # backward [B]: position of its last real step
    int64_t *pipeline_progress     # backward: where the time loop publishes how many packed
                                   # rows have their final dz (pipelined backward), or NULL
    float *dx_step                 # backward: [part rows, I] this thread's dx of a step when
                                   # the time loop computes dx (step_input_gradients), or NULL


cdef struct Pipeline:
    # The pipelined backward (see pipeline_work): while one thread runs the time
    # loop, the others compute the weight gradients and dx of the rows whose dz
    # is final. Work items in the order their rows become final.
    Py_ssize_t items
    const Py_ssize_t *kind         # [items] PIPELINE_WEIGHTS: a chunk of the weight gradients;
                                   # PIPELINE_DX: one of the canonical dx shares
    const Py_ssize_t *first        # [items] first packed row
    const Py_ssize_t *end          # [items] one past the last packed row
    const Py_ssize_t *column_block # [items] the weight-gradient column block (gradients.column_block wide)
    const int64_t *threshold       # [items] the time loop's progress the item waits for
    int64_t *progress              # packed rows whose dz is final (the time loop's count)
    int64_t *next_item             # items claimed so far
    int64_t *finished              # items finished so far
    float *partials                # [chunks, I + H, 4H]: each chunk's share of dK, then of dR
    float *packed_dx               # [N, I]: dz @ K^T in packed rows, before the scatter
    int64_t *inputs_ready          # [chunks]: 1 once a chunk's inputs are in packed_x
    bint inputs_in_place           # X is x itself (batch 1, no input dropout): nothing copied
    Py_ssize_t column_threads      # column blocks of the weight gradients (gradient_panels' rows)


# Building a call's structs (these raise: they run before the GIL is released).
cdef Layout make_layout(const Py_ssize_t[::1] order, const Py_ssize_t[::1] row_begin,
                        const Py_ssize_t[:, ::1] active, const Py_ssize_t[:, ::1] offsets,
                        Py_ssize_t T)
cdef LstmProblem make_problem(const Py_ssize_t[::1] order, const Py_ssize_t[::1] row_begin,
                              const Py_ssize_t[:, ::1] active, const Py_ssize_t[:, ::1] offsets,
                              Py_ssize_t B, Py_ssize_t T, Py_ssize_t I, Py_ssize_t H,
                              const unsigned char[:, ::1] mask, int act, int ract,
                              bint reverse, bint zero_output_for_mask,
                              int64_t *barrier_flags) except *
cdef TeamShare whole_part(Py_ssize_t part, Py_ssize_t H) noexcept nogil
cdef tuple team_barrier_stats(const int64_t *flags, Py_ssize_t team)

# BLAS (row-major through operand swapping) and the step products.
cdef void gemm(bint trans_a, bint trans_b, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
               floating alpha, floating *a, Py_ssize_t lda, floating *b, Py_ssize_t ldb,
               floating beta, floating *c, Py_ssize_t ldc) noexcept nogil
cdef void pack_weight_slice(const float *weights, Py_ssize_t K, Py_ssize_t H, Py_ssize_t u0,
                            Py_ssize_t width, bint stored_transposed, float *packed) noexcept nogil
cdef void pack_recurrent_transpose_slice(const float *recurrent_kernel, Py_ssize_t H,
                                         Py_ssize_t u0, Py_ssize_t width, bint stored_transposed,
                                         float *packed) noexcept nogil
cdef float *pack_slice(float *base, const float *weights, Py_ssize_t K, Py_ssize_t H,
                       Py_ssize_t u0, Py_ssize_t u1, bint transpose,
                       bint stored_transposed) noexcept nogil
cdef void gates_product(Py_ssize_t rows, Py_ssize_t K, floating *a, Py_ssize_t lda,
                        floating *weights, bint stored_transposed, float *packed, floating *gates,
                        Py_ssize_t H, Py_ssize_t u0, Py_ssize_t width, bint accumulate,
                        floating *bias) noexcept nogil
cdef void hidden_gradient_product(Py_ssize_t rows, Py_ssize_t H, floating *dz,
                                  floating *recurrent_kernel, bint stored_transposed,
                                  float *packed_t, floating *dh, Py_ssize_t u0,
                                  Py_ssize_t width) noexcept nogil
cdef void copy_step_inputs(const LstmProblem *problem, Py_ssize_t part, Py_ssize_t t,
                           floating *x, floating *in_drop, floating *packed_x,
                           Py_ssize_t shift) noexcept nogil
cdef void team_wait(const LstmProblem *problem, TeamShare *share) noexcept nogil

# The forward of one share, and its phases.
cdef void forward_part(const LstmProblem *problem, const LstmBuffers *buffers,
                       TeamShare *share, floating zero) noexcept nogil
cdef void load_initial_state(const LstmProblem *problem, const LstmBuffers *buffers,
                             TeamShare *share, floating zero) noexcept nogil
cdef Py_ssize_t chunk_gate_shift(const LstmProblem *problem, Py_ssize_t part, Py_ssize_t slot,
                                 Py_ssize_t chunk_first, Py_ssize_t chunk_last) noexcept nogil
cdef Py_ssize_t project_chunk(const LstmProblem *problem, const LstmBuffers *buffers,
                              TeamShare *share, Py_ssize_t chunk_first, Py_ssize_t chunk_last,
                              Py_ssize_t slot, floating zero) noexcept nogil
cdef void projection_ahead(const LstmProblem *problem, const LstmBuffers *buffers, TeamShare *share,
                           floating zero) noexcept nogil
cdef void recurrent_step_product(const LstmProblem *problem, const LstmBuffers *buffers,
                                 TeamShare *share, Py_ssize_t t,
                                 floating *step_gates) noexcept nogil
cdef void cell_rows(const LstmProblem *problem, const LstmBuffers *buffers, TeamShare *share,
                    Py_ssize_t t, floating *step_gates) noexcept nogil
cdef void publish_part_outputs(const LstmProblem *problem, const LstmBuffers *buffers,
                               TeamShare *share, floating zero) noexcept nogil

# The backward time loop of one share, and its phases.
cdef void backward_part(const LstmProblem *problem, const LstmBuffers *buffers,
                        const LstmGradients *gradients, TeamShare *share,
                        floating zero) noexcept nogil
cdef void find_real_steps(const LstmProblem *problem, TeamShare *share) noexcept nogil
cdef void load_output_gradients(const LstmProblem *problem, const LstmGradients *gradients,
                                TeamShare *share, floating zero) noexcept nogil
cdef void gate_gradient_rows(const LstmProblem *problem, const LstmBuffers *buffers,
                             const LstmGradients *gradients, TeamShare *share, Py_ssize_t step,
                             floating *step_gates) noexcept nogil
cdef void publish_state_gradients(const LstmProblem *problem, const LstmBuffers *buffers,
                                  const LstmGradients *gradients, TeamShare *share,
                                  floating zero) noexcept nogil

# The backward after the time loop: weight gradients and dx.
cdef void weight_gradient_columns(const LstmProblem *problem, const LstmBuffers *buffers,
                                  const LstmGradients *gradients, Py_ssize_t column_thread,
                                  Py_ssize_t threads, bint packed, floating zero) noexcept nogil
cdef void gemm_columns(Py_ssize_t I, Py_ssize_t H, Py_ssize_t G, Py_ssize_t N,
                       Py_ssize_t column_begin, Py_ssize_t column_end, floating *packed_x,
                       floating *h_in_all, floating *dz, floating *dkernel,
                       floating *drecurrent_kernel) noexcept nogil
cdef void gemm_columns_packed(Py_ssize_t I, Py_ssize_t H, Py_ssize_t G, Py_ssize_t N,
                              Py_ssize_t column_begin, Py_ssize_t column_end, float *packed_x,
                              float *h_in_all, float *dz, float *dkernel, float *drecurrent_kernel,
                              float *panels, const float *zero_row) noexcept nogil
cdef void sum_partials(floating *total, const floating *partials, Py_ssize_t count,
                       Py_ssize_t G, Py_ssize_t column_begin, Py_ssize_t column_end) noexcept nogil
cdef void dx_rows(Py_ssize_t row_first, Py_ssize_t row_end, Py_ssize_t I, Py_ssize_t G,
                  floating *kernel, bint stored_transposed, float *kernel_t_packed, floating *dz,
                  floating *packed_x) noexcept nogil
cdef void step_input_gradients(const LstmProblem *problem, const LstmBuffers *buffers,
                               const LstmGradients *gradients, TeamShare *share, Py_ssize_t t,
                               float *dz) noexcept nogil
cdef Py_ssize_t smallest_step(const LstmProblem *problem) noexcept nogil
cdef Py_ssize_t max_part_rows(const LstmProblem *problem) noexcept nogil
cdef void scatter_step_gradients(const LstmProblem *problem, Py_ssize_t part, Py_ssize_t t,
                                 const floating *step_dx, floating *dx,
                                 floating *in_drop) noexcept nogil

# The pipelined backward (one part, float32 through the packed kernel).
cdef void move_packed_rows(const LstmProblem *problem, Py_ssize_t first, Py_ssize_t end,
                           float *batch_major, float *packed, float *in_drop,
                           bint into_packed) noexcept nogil
cdef void weight_gradient_chunk(const LstmProblem *problem, const LstmBuffers *buffers,
                                const LstmGradients *gradients, const Pipeline *pipeline,
                                Py_ssize_t first, Py_ssize_t end, Py_ssize_t block,
                                float *panels) noexcept nogil
cdef void sum_chunk_partials(const Pipeline *pipeline, Py_ssize_t chunks, Py_ssize_t I, Py_ssize_t H,
                             float *dkernel, float *drecurrent_kernel) noexcept nogil
cdef void pipeline_work(const LstmProblem *problem, const LstmBuffers *buffers,
                        const LstmGradients *gradients, const Pipeline *pipeline,
                        Py_ssize_t member) noexcept nogil
