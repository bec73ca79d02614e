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
 * and each step runs 6 x 16 (and 4 x 16) register-blocked FMA kernels over them. The
 * kernel is AVX2+FMA code chosen at run time (lstmeng_avx2_fma_supported);
 * on other CPUs, compilers or in float64 the caller uses BLAS instead.
 *
 * Panel layout: packed[(panel * K + k) * 16 + c] = B[k, panel * 16 + c];
 * G must be a multiple of 32 (an even number of panels).
 */
#ifndef LSTMENG_LSTM_GEMM_H
#define LSTMENG_LSTM_GEMM_H

#include <stdint.h>
#include <string.h>

#define LSTMENG_PANEL 16

#include "lstm_cpu.h"

/* Pack the [K, G] block of a row-major matrix with row stride ld into panels:
 * B[k, col] = b[k * ld + col]; with transpose, B[k, col] = b[col * ld + k]
 * (b^T's block). A thread owning a slice of the units packs its own columns. */
static void lstmeng_pack_panels_f32(const float *b, int64_t K, int64_t G, int64_t ld,
                                    int transpose, float *packed) {
    int64_t panel, k, col;
    for (panel = 0; panel < G / LSTMENG_PANEL; panel++)
        for (k = 0; k < K; k++)
            for (col = 0; col < LSTMENG_PANEL; col++)
                packed[(panel * K + k) * LSTMENG_PANEL + col] =
                    transpose ? b[(panel * LSTMENG_PANEL + col) * ld + k]
                              : b[k * ld + panel * LSTMENG_PANEL + col];
}

#if LSTMENG_HAVE_AVX2_FMA

/* ROWS rows of A times one panel: 2 ROWS accumulators, two 8-float halves per
 * row. Called with a constant ROWS (6 for the main blocks, 4 for the rows a
 * part of 16 or 10 leaves), so after inlining the row loops unroll and every
 * accumulator lives in a register: 12 (or 8) independent FMA chains. */
LSTMENG_AVX2_FMA static inline __attribute__((always_inline)) void lstmeng_block_f32(
        const int rows, const float *a, int64_t lda, const float *panel, int64_t K, float *c,
        int64_t ldc) {
    __m256 low[6], high[6];
    int64_t k;
    int r;
    for (r = 0; r < rows; r++) {
        low[r] = _mm256_loadu_ps(c + r * ldc);
        high[r] = _mm256_loadu_ps(c + r * ldc + 8);
    }
    for (k = 0; k < K; k++) {
        const __m256 p0 = _mm256_loadu_ps(panel + k * LSTMENG_PANEL);
        const __m256 p1 = _mm256_loadu_ps(panel + k * LSTMENG_PANEL + 8);
        for (r = 0; r < rows; r++) {
            const __m256 x = _mm256_broadcast_ss(a + r * lda + k);
            low[r] = _mm256_fmadd_ps(x, p0, low[r]);
            high[r] = _mm256_fmadd_ps(x, p1, high[r]);
        }
    }
    for (r = 0; r < rows; r++) {
        _mm256_storeu_ps(c + r * ldc, low[r]);
        _mm256_storeu_ps(c + r * ldc + 8, high[r]);
    }
}

/* One row of A times two panels, k unrolled by two: 8 independent FMA chains. */
LSTMENG_AVX2_FMA static inline void lstmeng_row_f32(const float *a, const float *panels,
                                                      int64_t K, float *c) {
    const float *q = panels, *s = panels + K * LSTMENG_PANEL;
    __m256 e0 = _mm256_setzero_ps(), e1 = _mm256_setzero_ps(), e2 = _mm256_setzero_ps();
    __m256 e3 = _mm256_setzero_ps(), o0 = _mm256_setzero_ps(), o1 = _mm256_setzero_ps();
    __m256 o2 = _mm256_setzero_ps(), o3 = _mm256_setzero_ps();
    int64_t k;
    for (k = 0; k + 1 < K; k += 2) {
        const __m256 x = _mm256_broadcast_ss(a + k), y = _mm256_broadcast_ss(a + k + 1);
        e0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(q + k * 16), e0);
        e1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(q + k * 16 + 8), e1);
        e2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(s + k * 16), e2);
        e3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(s + k * 16 + 8), e3);
        o0 = _mm256_fmadd_ps(y, _mm256_loadu_ps(q + k * 16 + 16), o0);
        o1 = _mm256_fmadd_ps(y, _mm256_loadu_ps(q + k * 16 + 24), o1);
        o2 = _mm256_fmadd_ps(y, _mm256_loadu_ps(s + k * 16 + 16), o2);
        o3 = _mm256_fmadd_ps(y, _mm256_loadu_ps(s + k * 16 + 24), o3);
    }
    if (k < K) {
        const __m256 x = _mm256_broadcast_ss(a + k);
        e0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(q + k * 16), e0);
        e1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(q + k * 16 + 8), e1);
        e2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(s + k * 16), e2);
        e3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(s + k * 16 + 8), e3);
    }
    _mm256_storeu_ps(c, _mm256_add_ps(_mm256_loadu_ps(c), _mm256_add_ps(e0, o0)));
    _mm256_storeu_ps(c + 8, _mm256_add_ps(_mm256_loadu_ps(c + 8), _mm256_add_ps(e1, o1)));
    _mm256_storeu_ps(c + 16, _mm256_add_ps(_mm256_loadu_ps(c + 16), _mm256_add_ps(e2, o2)));
    _mm256_storeu_ps(c + 24, _mm256_add_ps(_mm256_loadu_ps(c + 24), _mm256_add_ps(e3, o3)));
}

/* C[rows, G] += A[rows, K] @ B, B packed by lstmeng_pack_panels_f32. */
LSTMENG_AVX2_FMA static void lstmeng_gemm_packed_f32(int64_t rows, int64_t G, int64_t K,
                                                       const float *a, int64_t lda,
                                                       const float *packed, float *c, int64_t ldc) {
    int64_t pair, panel, r0;
    const int64_t blocked = rows - rows % 6;
    /* Panels outside, rows inside: B (the recurrent kernel, often larger than L2)
     * streams from memory once per step, and each panel (K x 16 floats) serves
     * every row block from L1/L2 while A (a few rows) stays in L2. The other
     * order re-read all of B once per six rows: measured 70 -> 99 GFLOP/s at
     * (rows, G, K) = (16, 2048, 512). */
    for (pair = 0; pair + 1 < G / LSTMENG_PANEL; pair += 2) {
        for (panel = pair; panel < pair + 2; panel++) {
            const float *panel_data = packed + panel * K * LSTMENG_PANEL;
            for (r0 = 0; r0 < blocked; r0 += 6)
                lstmeng_block_f32(6, a + r0 * lda, lda, panel_data, K, c + r0 * ldc + panel * LSTMENG_PANEL, ldc);
            if (rows - blocked >= 4)
                lstmeng_block_f32(4, a + blocked * lda, lda, panel_data, K,
                                   c + blocked * ldc + panel * LSTMENG_PANEL, ldc);
        }
        for (r0 = rows - blocked >= 4 ? blocked + 4 : blocked; r0 < rows; r0++)
            lstmeng_row_f32(a + r0 * lda, packed + pair * K * LSTMENG_PANEL, K,
                            c + r0 * ldc + pair * LSTMENG_PANEL);
    }
}
#else
static void lstmeng_gemm_packed_f32(int64_t rows, int64_t G, int64_t K, const float *a,
                                    int64_t lda, const float *packed, float *c, int64_t ldc) {
    (void)rows; (void)G; (void)K; (void)a; (void)lda; (void)packed; (void)c; (void)ldc;
}
#endif

#endif
