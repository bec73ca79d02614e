/*
 * The recurrent product of one step in float32, C[rows, G] += A[rows, K] @ B
 * with B [K, G], for the thin shapes of an LSTM step (rows = one thread's
 * share of the batch; B the recurrent kernel, or its transpose in the
 * backward, the same B at every step).
 *
 * Why not BLAS here: a BLAS GEMM packs B again at every call, and for a step
 * B is the whole recurrent kernel (H x 4H, megabytes) while A has only a few
 * rows, so repacking costs about as much as the arithmetic. Here B is packed
 * once per sequence (lstmeng_pack_panels_f32) into column panels of 16 floats
 * and each step runs register-blocked FMA kernels over them, chosen at run
 * time (lstm_cpu.h); on other CPUs, compilers or in float64 the caller uses
 * BLAS instead.
 *
 *  - AVX2+FMA: blocks of 6 x 16, 5 x 16 and 4 x 16 (12 / 10 / 8 ymm accumulators
 *    of 16), a single-row kernel for batch 1 and a tail of 1-3 rows.
 *  - AVX-512:  a panel row is one zmm. Blocks of up to 12 x 32 (two panels:
 *    24 of the 32 zmm registers accumulate, 2 hold the panel rows, the rest the
 *    broadcasts; a product's rows dealt evenly to as few blocks as that allows)
 *    and a single-row kernel for a row alone: 2 panel loads and 12 broadcasts
 *    feed 24 FMAs, within the two load ports of a Xeon core. The AVX2 kernel on
 *    an AVX-512 Xeon ran the step product at 1.8x the time OpenBLAS's AVX-512
 *    sgemm took for the same FLOPs (/work/shared/cpu/xeon-avx512-profile.md,
 *    43 % of an inference call); on a Zen 5 core this kernel reached 250-267 GFLOP/s at
 *    step shapes against the AVX2 kernel's 128-134 (C microbenchmark, one
 *    core). The AVX-512 path also runs the input projection, dx and (A read
 *    transposed in place) the weight gradients through it: see docs/cython.md.
 *
 * Packed layout: pairs of 16-column panels, interleaved (lstmeng_pack_panels_f32);
 * G must be a multiple of 32 (an even number of panels).
 */
#ifndef LSTMENG_LSTM_GEMM_H
#define LSTMENG_LSTM_GEMM_H

#include <stdint.h>
#include <string.h>

#define LSTMENG_PANEL 16

#include "lstm_cpu.h"
#include "lstm_transpose.h"

/* Floats per k of a packed block: a pair of 16-column panels, interleaved. The
 * kernels take panels in pairs (an AVX-512 block reads both per k; the AVX2
 * kernel one after the other), and with the pair's two 64-byte rows of one k
 * adjacent a pair streams as one sequence of 128-byte rows. A single row
 * (batch 1) is bound by streaming B from L2, and one stream instead of two
 * 8 KB apart read it at 199 GB/s instead of 137 on a Zen 5 core (C
 * microbenchmark, AVX-512, H = 128: 1.32 instead of 1.91 us per step). */
#define LSTMENG_PAIR (2 * LSTMENG_PANEL)

/* Pack the [K, G] block of a row-major matrix with row stride ld into pairs:
 * packed[(pair * K + k) * 32 + c] = B[k, pair * 32 + c], where B[k, col] =
 * b[k * ld + col], or with transpose B[k, col] = b[col * ld + k] (b^T's block).
 * Panel p (16 columns) then starts at packed + (p / 2) * K * 32 + (p % 2) * 16
 * with a row stride of 32 floats. A thread owning a slice of the units packs
 * its own columns. */
static void lstmeng_pack_panels_f32(const float *b, int64_t K, int64_t G, int64_t ld,
                                    int transpose, float *packed) {
    int64_t pair, k, k0, col;
    if (!transpose) {
        /* Tiles of 8 rows of b by every pair: the 8 rows (8 x 4G bytes) stay in L1/L2
         * while each pair takes its 32 columns of them. Against one pair at a time
         * down all K rows: 1.08-1.7x at K = 256-1024 (C microbenchmark), where the
         * column walk touched a page per row. */
        for (k0 = 0; k0 < K; k0 += 8) {
            const int64_t k1 = k0 + 8 < K ? k0 + 8 : K;
            for (pair = 0; pair < G / LSTMENG_PAIR; pair++)
                for (k = k0; k < k1; k++) {
                    float *out = packed + (pair * K + k) * LSTMENG_PAIR;
                    const float *in = b + k * ld + pair * LSTMENG_PAIR;
                    for (col = 0; col < LSTMENG_PAIR; col++) out[col] = in[col];
                }
        }
        return;
    }
    /* Transposed: B[k, col] = b[col * ld + k], so a pair's [K, 32] block is the transpose
     * of b's [32, K] block at its first column: lstm_transpose.h's 8 x 8 register tiles.
     * The element-by-element loop it replaced took 14-24 us of a 65-90 us batch-1 call at
     * (T, I, H) = (16, 64, 128) in PyTorch's layout (lstmeng.torch's weights). */
    for (pair = 0; pair < G / LSTMENG_PAIR; pair++)
        lstmeng_transpose_f32(LSTMENG_PAIR, K, b + pair * LSTMENG_PAIR * ld, ld, packed + pair * K * LSTMENG_PAIR,
                              LSTMENG_PAIR);
}

/* Products with at most this many k (a cell step's weight gradients, K = its rows; an
 * input projection of a few features) go through C a block of rows at a time
 * (lstmeng_gemm_packed_avx2_f32, lstmeng_gemm_avx512_f32). */
#define LSTMENG_SMALL_K 8

#if LSTMENG_HAVE_AVX2_FMA

/* Rows of A per AVX2 block: ROWS x 2 ymm accumulators (12 of the 16 registers; 2 hold
 * the panel's row, the rest the broadcasts). */
#define LSTMENG_AVX2_BLOCK_ROWS 6
#ifndef LSTMENG_AVX2_ROW_GROUP
/* Rows of A per pass over all of B in tall products (a multiple of 6): a group's A
 * (96 rows of K = 256: 96 KB) stays in L2 while every panel passes over it, also in
 * the 256-512 KB L2 of the AVX2 cores (Haswell to Zen 3). */
#define LSTMENG_AVX2_ROW_GROUP 96
#endif

/* ROWS rows of A times one panel (16 columns, a row stride of 32 floats in its pair):
 * 2 ROWS independent FMA chains from zero, added to C at the end: C = start + the
 * chains, start C's row or the panel's 16 bias columns when bias is not NULL (C's old
 * values then not read). Called with constant ROWS (4 to 6), so after inlining the
 * row loops unroll and the accumulators stay in registers. Each row's chain is the
 * same in any block. */
LSTMENG_AVX2_FMA static inline __attribute__((always_inline)) void lstmeng_block_avx2_f32(
        const int rows, const float *a, int64_t lda, const float *panel, int64_t K, float *c, int64_t ldc,
        const float *bias) {
    __m256 low[LSTMENG_AVX2_BLOCK_ROWS], high[LSTMENG_AVX2_BLOCK_ROWS];
    int64_t k;
    int r;
    for (r = 0; r < rows; r++) {
        low[r] = _mm256_setzero_ps();
        high[r] = _mm256_setzero_ps();
    }
    for (k = 0; k < K; k++) {
        const __m256 p0 = _mm256_loadu_ps(panel + k * LSTMENG_PAIR);
        const __m256 p1 = _mm256_loadu_ps(panel + k * LSTMENG_PAIR + 8);
        for (r = 0; r < rows; r++) {
            const __m256 x = _mm256_broadcast_ss(a + r * lda + k);
            low[r] = _mm256_fmadd_ps(x, p0, low[r]);
            high[r] = _mm256_fmadd_ps(x, p1, high[r]);
        }
    }
    for (r = 0; r < rows; r++) {
        const float *start = bias != NULL ? bias : c + r * ldc;
        _mm256_storeu_ps(c + r * ldc, _mm256_add_ps(_mm256_loadu_ps(start), low[r]));
        _mm256_storeu_ps(c + r * ldc + 8, _mm256_add_ps(_mm256_loadu_ps(start + 8), high[r]));
    }
}

/* One row of A times a panel pair over k = k_begin .. k_end - 1, k unrolled by
 * two, added to 8 independent FMA chains reading the pair's 128 bytes of each k in
 * order: acc[j] takes the pair's columns 8j .. 8j + 7 at k_begin, k_begin + 2, ..., acc[4
 * + j] at k_begin + 1, k_begin + 3, ... (an odd last k goes to acc[j]). */
LSTMENG_AVX2_FMA static inline __attribute__((always_inline)) void lstmeng_row_chains_avx2_f32(
        const float *a, const float *pair_data, int64_t k_begin, int64_t k_end, __m256 acc[8]) {
    int64_t k;
    int j;
    for (k = k_begin; k + 1 < k_end; k += 2) {
        const float *p = pair_data + k * LSTMENG_PAIR;
        const __m256 x = _mm256_broadcast_ss(a + k), y = _mm256_broadcast_ss(a + k + 1);
        for (j = 0; j < 4; j++) {
            acc[j] = _mm256_fmadd_ps(x, _mm256_loadu_ps(p + 8 * j), acc[j]);
            acc[4 + j] = _mm256_fmadd_ps(y, _mm256_loadu_ps(p + LSTMENG_PAIR + 8 * j), acc[4 + j]);
        }
    }
    if (k < k_end) {
        const float *p = pair_data + k * LSTMENG_PAIR;
        const __m256 x = _mm256_broadcast_ss(a + k);
        for (j = 0; j < 4; j++) acc[j] = _mm256_fmadd_ps(x, _mm256_loadu_ps(p + 8 * j), acc[j]);
    }
}

/* One row of A times a panel pair over all of K (a single row: 8 chains instead of a
 * block's 2, for batch 1): c[0 .. 31] = start + the chains' sums (acc[j] + acc[4 + j]
 * for columns 8j .. 8j + 7), start the pair's 32 bias columns, or c itself when bias
 * is NULL. */
LSTMENG_AVX2_FMA static inline __attribute__((always_inline)) void lstmeng_row_avx2_f32(
        const float *a, const float *pair_data, int64_t K, float *c, const float *bias) {
    const float *start = bias != NULL ? bias : c;
    __m256 acc[8];
    int j;
    for (j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    lstmeng_row_chains_avx2_f32(a, pair_data, 0, K, acc);
    for (j = 0; j < 4; j++)
        _mm256_storeu_ps(c + 8 * j,
                         _mm256_add_ps(_mm256_loadu_ps(start + 8 * j), _mm256_add_ps(acc[j], acc[4 + j])));
}

/* Rows r0 .. r1 - 1 of C times one panel pair: each panel by blocks of 6 rows, the
 * last 4 or 5 rows by one block of that many, and the last 1 to 3 rows by the
 * single-row kernel over the pair (row by row). Measured one Zen 5 core, C
 * microbenchmark, GFLOP/s at (G, K) = (1024, 256), three runs: blocks of 6 rows
 * 125-127, of 4 117-118; 5 rows as one block 115-122, as 4 + a single row 104-116; 2
 * rows as single rows 85-88 and as the 4-row block with 2 repeated rows 66; 32 rows as
 * 6 x 5 + 2 single rows 127-129, dealt evenly to blocks (6, 6, 5, 5, 5, 5) 125.
 * bias_pair: NULL (C += the product) or the pair's 32 bias columns (C = bias + the
 * product). */
LSTMENG_AVX2_FMA static inline __attribute__((always_inline)) void lstmeng_pair_avx2_f32(
        int64_t r0, int64_t r1, int64_t K, const float *a, int64_t lda, const float *pair_data, float *c_pair,
        int64_t ldc, const float *bias_pair) {
    const int64_t full = (r1 - r0) / LSTMENG_AVX2_BLOCK_ROWS * LSTMENG_AVX2_BLOCK_ROWS;
    const int64_t tail = (r1 - r0) % LSTMENG_AVX2_BLOCK_ROWS;
    const int64_t single_from = tail >= 4 ? r1 : r0 + full;
    int64_t r;
    int panel;
    for (panel = 0; panel < 2; panel++) {
        const float *panel_data = pair_data + panel * LSTMENG_PANEL;
        const float *bias = bias_pair != NULL ? bias_pair + panel * LSTMENG_PANEL : NULL;
        float *c = c_pair + panel * LSTMENG_PANEL;
        for (r = r0; r < r0 + full; r += LSTMENG_AVX2_BLOCK_ROWS)
            lstmeng_block_avx2_f32(6, a + r * lda, lda, panel_data, K, c + r * ldc, ldc, bias);
        if (tail == 5)
            lstmeng_block_avx2_f32(5, a + r * lda, lda, panel_data, K, c + r * ldc, ldc, bias);
        else if (tail == 4)
            lstmeng_block_avx2_f32(4, a + r * lda, lda, panel_data, K, c + r * ldc, ldc, bias);
    }
    for (r = single_from; r < r1; r++)
        lstmeng_row_avx2_f32(a + r * lda, pair_data, K, c_pair + r * ldc, bias_pair);
}

/* C[rows, G] += A[rows, K] @ B (row stride lda), B packed by lstmeng_pack_panels_f32
 * (AVX2+FMA), or C = bias + A @ B when bias (G floats, the same for every row) is not
 * NULL. Panel pairs outside, rows inside: B (the recurrent kernel, often larger than
 * L2) streams once per step and each panel (K x 16 floats) serves every row block from
 * L1/L2 while A (a few rows) stays in L2 (the other order re-read all of B once per
 * six rows: 70 -> 99 GFLOP/s at (rows, G, K) = (16, 2048, 512) on the Zen 3). Taller
 * products (the input projection's chunks) go through the rows in groups of
 * LSTMENG_AVX2_ROW_GROUP so a group's A stays in L2 while every pair passes over it,
 * and products with few k (LSTMENG_SMALL_K) a block of rows at a time, as in the
 * AVX-512 kernel below. (On the Zen 5, 1 MB of L2, groups of 96, 192, 384 and none
 * ran 1024 rows at 122-129 GFLOP/s alike; the group is for the smaller L2 of the
 * AVX2 cores.) */
LSTMENG_AVX2_FMA static void lstmeng_gemm_packed_avx2_f32(int64_t rows, int64_t G, int64_t K, const float *a,
                                                        int64_t lda, const float *packed, float *c, int64_t ldc,
                                                        const float *bias) {
    const int64_t group_rows = K <= LSTMENG_SMALL_K ? LSTMENG_AVX2_BLOCK_ROWS : LSTMENG_AVX2_ROW_GROUP;
    int64_t pair, group, group_end;
    for (group = 0; group < rows; group = group_end) {
        group_end = rows - group <= group_rows + group_rows / 2 ? rows : group + group_rows;
        for (pair = 0; pair + 1 < G / LSTMENG_PANEL; pair += 2)
            lstmeng_pair_avx2_f32(group, group_end, K, a, lda, packed + pair * K * LSTMENG_PANEL,
                                  c + pair * LSTMENG_PANEL, ldc, bias != NULL ? bias + pair * LSTMENG_PANEL : NULL);
    }
}
#endif

#if LSTMENG_HAVE_AVX512

/* Rows of A per AVX-512 block: ROWS x 2 zmm accumulators (24 of 32 registers). */
#define LSTMENG_AVX512_BLOCK_ROWS 12
#ifndef LSTMENG_AVX512_ROW_GROUP
/* Rows of A per pass over all of B in tall products (a multiple of 12). */
#define LSTMENG_AVX512_ROW_GROUP 192
#endif

/* A's element (r, k) is a[r * row_step + k * k_step] in the AVX-512 functions:
 * (lda, 1) for a row-major A, (1, lda) for the transpose of a row-major matrix
 * (the weight gradients' X^T and H_in^T, read in place: a block's 12 rows are
 * then 12 consecutive floats at each k). The drivers pass constants for one of
 * the two, so each instantiation has the addressing of its own layout. */

/* ROWS rows of A times two adjacent panels (32 columns): 2 ROWS independent FMA
 * chains in zmm registers, of which the first STORED rows are added to C. Called
 * with constant ROWS (4 to 12), so after inlining the row loops unroll and the
 * accumulators stay in registers. STORED < ROWS (the 2 or 3 rows at the end of a
 * step): the surplus rows repeat A's last stored row and are dropped, so a tail
 * of 2 or 3 rows runs the 4-row code. gcc compiled a 3-row block with every FMA
 * reading its panel from memory (9 loads per k), and a variable-length step of
 * 3 or 7 rows cost more than one of 4 or 8. Each row's chain is the same
 * either way, so C is bitwise the same. */
LSTMENG_AVX512 static inline __attribute__((always_inline)) void lstmeng_block_avx512_f32(
        const int rows, const int stored, const float *a, const int64_t row_step, const int64_t k_step,
        const float *panels, int64_t K, float *c, int64_t ldc, const float *bias) {
    __m512 left[LSTMENG_AVX512_BLOCK_ROWS], right[LSTMENG_AVX512_BLOCK_ROWS];
    int64_t a_row[LSTMENG_AVX512_BLOCK_ROWS];
    int64_t k;
    int r;
    for (r = 0; r < rows; r++) a_row[r] = (r < stored ? r : stored - 1) * row_step;
    /* From zero, C added at the end: a product over K in chunks (the weight
     * gradients, 256 rows of dz at a time) then sums each chunk apart, which kept
     * their float32 error at BLAS's (4.5e-6 -> below 1e-6 of the largest value
     * at (256, 50, 128, 128), N = 12800). */
    for (r = 0; r < rows; r++) {
        left[r] = _mm512_setzero_ps();
        right[r] = _mm512_setzero_ps();
    }
    for (k = 0; k < K; k++) {
        const __m512 p0 = _mm512_loadu_ps(panels + k * LSTMENG_PAIR);
        const __m512 p1 = _mm512_loadu_ps(panels + k * LSTMENG_PAIR + LSTMENG_PANEL);
        for (r = 0; r < rows; r++) {
            const __m512 x = _mm512_set1_ps(a[a_row[r] + k * k_step]);
            left[r] = _mm512_fmadd_ps(x, p0, left[r]);
            right[r] = _mm512_fmadd_ps(x, p1, right[r]);
        }
    }
    for (r = 0; r < stored; r++) {
        const float *start = bias != NULL ? bias : c + r * ldc;
        _mm512_storeu_ps(c + r * ldc, _mm512_add_ps(_mm512_loadu_ps(start), left[r]));
        _mm512_storeu_ps(c + r * ldc + LSTMENG_PANEL,
                         _mm512_add_ps(_mm512_loadu_ps(start + LSTMENG_PANEL), right[r]));
    }
}

/* One row of A times two (interleaved) panels over k = k_begin .. k_end - 1, k
 * unrolled by four, added to 8 independent FMA chains (one row alone would
 * leave 2 chains, a quarter of the FMA units busy; a batch-1 step is all rows
 * like this, bound by reading the panels from L2 in one 128-byte-per-k
 * stream): lanes 2j and 2j + 1 take k = 4i + j of the left and right panel. */
LSTMENG_AVX512 static inline __attribute__((always_inline)) void lstmeng_row_chains_avx512_f32(
        const float *a, const int64_t k_step, const float *panels, int64_t k_begin, int64_t k_end,
        __m512 acc[8]) {
    const float *q = panels, *s = panels + LSTMENG_PANEL;
    int64_t k;
    int lane;
    for (k = k_begin; k + 3 < k_end; k += 4) {
        for (lane = 0; lane < 4; lane++) {
            const __m512 x = _mm512_set1_ps(a[(k + lane) * k_step]);
            acc[2 * lane] = _mm512_fmadd_ps(x, _mm512_loadu_ps(q + (k + lane) * LSTMENG_PAIR),
                                            acc[2 * lane]);
            acc[2 * lane + 1] = _mm512_fmadd_ps(x, _mm512_loadu_ps(s + (k + lane) * LSTMENG_PAIR),
                                                acc[2 * lane + 1]);
        }
    }
    for (; k < k_end; k++) {
        const __m512 x = _mm512_set1_ps(a[k * k_step]);
        acc[0] = _mm512_fmadd_ps(x, _mm512_loadu_ps(q + k * LSTMENG_PAIR), acc[0]);
        acc[1] = _mm512_fmadd_ps(x, _mm512_loadu_ps(s + k * LSTMENG_PAIR), acc[1]);
    }
}

/* The chains' sums for the pair's two panels: (0 + 2) + (4 + 6) and (1 + 3) + (5 + 7). */
LSTMENG_AVX512 static inline __attribute__((always_inline)) void lstmeng_row_chains_sum_avx512_f32(
        const __m512 acc[8], __m512 *left, __m512 *right) {
    *left = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[4], acc[6]));
    *right = _mm512_add_ps(_mm512_add_ps(acc[1], acc[3]), _mm512_add_ps(acc[5], acc[7]));
}

/* One row of A times two panels over k = k_begin .. k_end - 1: the chains from zero, summed. */
LSTMENG_AVX512 static inline __attribute__((always_inline)) void lstmeng_row_span_avx512_f32(
        const float *a, const int64_t k_step, const float *panels, int64_t k_begin, int64_t k_end,
        __m512 *left, __m512 *right) {
    __m512 acc[8];
    int lane;
    for (lane = 0; lane < 8; lane++) acc[lane] = _mm512_setzero_ps();
    lstmeng_row_chains_avx512_f32(a, k_step, panels, k_begin, k_end, acc);
    lstmeng_row_chains_sum_avx512_f32(acc, left, right);
}

/* One row of A times a panel pair over all of K: C = start + the span's sums. */
LSTMENG_AVX512 static inline __attribute__((always_inline)) void lstmeng_row_avx512_f32(
        const float *a, const int64_t k_step, const float *panels, int64_t K, float *c,
        const float *bias) {
    const float *start = bias != NULL ? bias : c;
    __m512 left, right;
    lstmeng_row_span_avx512_f32(a, k_step, panels, 0, K, &left, &right);
    _mm512_storeu_ps(c, _mm512_add_ps(_mm512_loadu_ps(start), left));
    _mm512_storeu_ps(c + LSTMENG_PANEL, _mm512_add_ps(_mm512_loadu_ps(start + LSTMENG_PANEL), right));
}

/* A block of 2 to 12 rows (`rows`, any value there) times one panel pair: the block
 * of exactly that many rows, or for 2 and 3 rows the 4-row block (see above). Each
 * case is its own unrolled copy of lstmeng_block_avx512_f32. */
#define LSTMENG_BLOCK_CASE(ROWS, STORED)                                                   \
    case STORED:                                                                          \
        lstmeng_block_avx512_f32(ROWS, STORED, a, row_step, k_step, panels, K, c, ldc, bias); \
        break;
LSTMENG_AVX512 static inline __attribute__((always_inline)) void lstmeng_block_of_avx512_f32(
        int rows, const float *a, const int64_t row_step, const int64_t k_step,
        const float *panels, int64_t K, float *c, int64_t ldc, const float *bias) {
    switch (rows) {
        LSTMENG_BLOCK_CASE(12, 12) LSTMENG_BLOCK_CASE(11, 11) LSTMENG_BLOCK_CASE(10, 10)
        LSTMENG_BLOCK_CASE(9, 9) LSTMENG_BLOCK_CASE(8, 8) LSTMENG_BLOCK_CASE(7, 7)
        LSTMENG_BLOCK_CASE(6, 6) LSTMENG_BLOCK_CASE(5, 5) LSTMENG_BLOCK_CASE(4, 4)
        LSTMENG_BLOCK_CASE(4, 3) LSTMENG_BLOCK_CASE(4, 2)
        default: break;
    }
}
#undef LSTMENG_BLOCK_CASE

/* Rows r0 .. r1 - 1 of C times one panel pair, in as few passes over the pair as
 * 12-row blocks allow, the rows dealt evenly to the passes (13 rows: 7 + 6), each
 * pass one block of exactly its rows; a single row alone by the single-row kernel.
 * Why: the first pass streams the pair's panels (K x 128 bytes) in from L3 or L2,
 * every further pass again from L2, and a block's FMAs cost by its rows. Blocks
 * of 12, 8 and 4 rows only ran a part's step of 6 rows as two 4-row passes
 * (8 rows of FMAs and two streams) and one of 5 rows as 4 + a single row: at
 * (rows, I, H) = (r, 128, 512) on one Zen 5 core a step of 5, 6 or 7 rows took
 * 81, 107 and 110 us against 100 for 8 (dealt evenly: 69, 77 and 89), and the
 * shrinking parts of a variable-length batch go through every row count. Each
 * row's FMA chain is the same in every block, so C does not depend on how the
 * rows are dealt to blocks.
 * bias_pair: NULL (C += the product) or the pair's 32 bias columns (C = bias + the
 * product: C's old values are not read). */
LSTMENG_AVX512 static inline __attribute__((always_inline)) void lstmeng_pair_avx512_f32(
        int64_t r0, int64_t r1, int64_t K, const float *a, const int64_t row_step,
        const int64_t k_step, const float *panels, float *c_pair, int64_t ldc, const float *bias_pair) {
    int64_t passes = (r1 - r0 + LSTMENG_AVX512_BLOCK_ROWS - 1) / LSTMENG_AVX512_BLOCK_ROWS;
    if (r1 - r0 == 1) {
        lstmeng_row_avx512_f32(a + r0 * row_step, k_step, panels, K, c_pair + r0 * ldc, bias_pair);
        return;
    }
    for (; passes > 0; passes--) {
        const int rows = (int)((r1 - r0 + passes - 1) / passes);
        lstmeng_block_of_avx512_f32(rows, a + r0 * row_step, row_step, k_step, panels, K,
                                    c_pair + r0 * ldc, ldc, bias_pair);
        r0 += rows;
    }
}

/* C[rows, G] += A[rows, K] @ B, B packed by lstmeng_pack_panels_f32 (AVX-512), or
 * C = bias + A @ B when bias (G floats, the same for every row) is not NULL.
 * Panel pairs outside, rows inside, as in the AVX2 kernel: B streams once per
 * step and each pair (K x 32 floats) serves every row block from L1/L2. Taller
 * products (the input projection: a chunk of 1024 rows) go through the rows in
 * groups of LSTMENG_AVX512_ROW_GROUP, so a group's A stays in L2 while every
 * panel pair passes over it. With few k (LSTMENG_SMALL_K) the groups are
 * one block of rows: there C is the traffic (rows x G written, B only K x G), and
 * pair by pair over all rows wrote it column strip by column strip, G floats
 * apart; a block of rows at a time writes it row after row. A cell step's weight
 * gradients at (I, H) = (256, 512) (K = 1, C 6 MB) took 360 us pair by pair, where
 * NumPy fills 6 MB in 97. Each element of C is the same sum either way. */
LSTMENG_AVX512 static inline __attribute__((always_inline)) void lstmeng_gemm_avx512_f32(
        int64_t rows, int64_t G, int64_t K, const float *a, const int64_t row_step,
        const int64_t k_step, const float *packed, float *c, int64_t ldc, const float *bias) {
    const int64_t group_rows = K <= LSTMENG_SMALL_K ? LSTMENG_AVX512_BLOCK_ROWS : LSTMENG_AVX512_ROW_GROUP;
    int64_t pair, group, group_end;
    for (group = 0; group < rows; group = group_end) {
        group_end = rows - group <= group_rows + group_rows / 2 ? rows : group + group_rows;
        for (pair = 0; pair + 1 < G / LSTMENG_PANEL; pair += 2)
            lstmeng_pair_avx512_f32(group, group_end, K, a, row_step, k_step,
                                    packed + pair * K * LSTMENG_PANEL, c + pair * LSTMENG_PANEL, ldc,
                                    bias != NULL ? bias + pair * LSTMENG_PANEL : NULL);
    }
}

/* C[rows, G] += A[rows, K] @ B, A row-major (row stride lda). */
LSTMENG_AVX512 static void lstmeng_gemm_packed_avx512_f32(int64_t rows, int64_t G, int64_t K,
                                                         const float *a, int64_t lda,
                                                         const float *packed, float *c,
                                                         int64_t ldc) {
    lstmeng_gemm_avx512_f32(rows, G, K, a, lda, 1, packed, c, ldc, NULL);
}

/* C[rows, G] = bias[G] (every row) + A[rows, K] @ B, A row-major: the input
 * projection with its bias, without first filling C with bias rows (at batch 1 the
 * 4 copies per row took 5 % of a unit-split member's step). The same sum as
 * filling C and adding (one rounding of bias + the product). */
LSTMENG_AVX512 static void lstmeng_gemm_packed_bias_avx512_f32(int64_t rows, int64_t G, int64_t K,
                                                              const float *a, int64_t lda,
                                                              const float *packed, const float *bias,
                                                              float *c, int64_t ldc) {
    lstmeng_gemm_avx512_f32(rows, G, K, a, lda, 1, packed, c, ldc, bias);
}

/* C[rows, G] += A^T[rows, K] @ B for a row-major A [K, rows] (row stride lda), read
 * in place: the weight gradients X^T dz and H_in^T dz (lstmeng_gemm_at_packed_f32). */
LSTMENG_AVX512 static void lstmeng_gemm_at_packed_avx512_f32(int64_t rows, int64_t G, int64_t K,
                                                            const float *a, int64_t lda,
                                                            const float *packed, const float *start,
                                                            float *c, int64_t ldc) {
    lstmeng_gemm_avx512_f32(rows, G, K, a, 1, lda, packed, c, ldc, start);
}

#endif

/* C[rows, G] += A[rows, K] @ B with the kernels of lstmeng_isa (AVX2 or
 * AVX-512; the caller uses BLAS when it is LSTMENG_ISA_SCALAR). */
static void lstmeng_gemm_packed_f32(int64_t rows, int64_t G, int64_t K, const float *a,
                                    int64_t lda, const float *packed, float *c, int64_t ldc) {
#if LSTMENG_HAVE_AVX512
    if (lstmeng_isa == LSTMENG_ISA_AVX512) {
        lstmeng_gemm_packed_avx512_f32(rows, G, K, a, lda, packed, c, ldc);
        return;
    }
#endif
#if LSTMENG_HAVE_AVX2_FMA
    lstmeng_gemm_packed_avx2_f32(rows, G, K, a, lda, packed, c, ldc, NULL);
#else
    (void)rows; (void)G; (void)K; (void)a; (void)lda; (void)packed; (void)c; (void)ldc;
#endif
}

/* C[rows, G] = bias (every row) + A[rows, K] @ B with the kernels of lstmeng_isa
 * (AVX2 or AVX-512; the caller uses BLAS when it is LSTMENG_ISA_SCALAR). */
static void lstmeng_gemm_packed_bias_f32(int64_t rows, int64_t G, int64_t K, const float *a,
                                         int64_t lda, const float *packed, const float *bias,
                                         float *c, int64_t ldc) {
#if LSTMENG_HAVE_AVX512
    if (lstmeng_isa == LSTMENG_ISA_AVX512) {
        lstmeng_gemm_packed_bias_avx512_f32(rows, G, K, a, lda, packed, bias, c, ldc);
        return;
    }
#endif
#if LSTMENG_HAVE_AVX2_FMA
    lstmeng_gemm_packed_avx2_f32(rows, G, K, a, lda, packed, c, ldc, bias);
#else
    (void)rows; (void)G; (void)K; (void)a; (void)lda; (void)packed; (void)bias; (void)c; (void)ldc;
#endif
}

/* C[rows, G] += A^T @ B, A [K, rows] row-major (lda), B packed; or C = start + A^T @ B
 * when start (G floats, the same for every row: zeros for a product's first chunk) is
 * not NULL, C's old values not read. AVX-512 only (the caller checks lstmeng_isa and
 * uses BLAS otherwise). */
static void lstmeng_gemm_at_packed_f32(int64_t rows, int64_t G, int64_t K, const float *a,
                                       int64_t lda, const float *packed, const float *start, float *c,
                                       int64_t ldc) {
#if LSTMENG_HAVE_AVX512
    lstmeng_gemm_at_packed_avx512_f32(rows, G, K, a, lda, packed, start, c, ldc);
#else
    (void)rows; (void)G; (void)K; (void)a; (void)lda; (void)packed; (void)start; (void)c; (void)ldc;
#endif
}

#endif
