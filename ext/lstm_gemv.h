/*
 * A few rows times a matrix in float32, Y[m, n] = A[m, k] @ B (+ Y), for the
 * unpacked products of a small batch (a cell step, a short call): each row of Y
 * is a GEMV; the kernels compute a block of rows in one pass over B (3 rows, 4 on
 * AVX-512), and lstmeng_gemv_f32 takes m rows as blocks of that many.
 *
 * Why not BLAS's SGEMV (what these products used before, one call per row): at a
 * cell step's sizes B is L2-resident and the product is a stream of it, and one
 * SGEMV per row streams B m times. And an OpenBLAS with its own threads splits a
 * GEMV this size over them, so the caller had to hold BLAS to one thread around
 * every such call (threads.single_threaded_blas: ~2 us a call). These kernels
 * need neither.
 *
 * B is the caller's matrix as it is stored, never packed (packing is what does
 * not pay for so few rows):
 *   b_transposed: B^T stored [n, k] (row stride ldb), PyTorch's weight_ih /
 *       weight_hh layout: each Y[r, j] is a dot product of a row of it with
 *       A[r]. Four rows of B^T at a time (AVX2 with three rows of A: two), a
 *       vector accumulator per row of A and of B^T over k (masked tail), summed
 *       across lanes at the end.
 *   otherwise:    B stored [k, n] (row stride ldb), lstmeng's kernel layout:
 *       partial sums of up to LSTMENG_GEMV_CHUNK columns per row of A
 *       (L1-resident) take A[r, kk] * B[kk, chunk] from four (AVX2: eight) rows
 *       of B at a time, so that many contiguous streams feed them at any size
 *       (column blocks of 128 held in registers had walked a 16 MiB B with
 *       16 KiB jumps: 0.56x SGEMV's speed).
 * Measured against one OpenBLAS SGEMV per row on the Zen 5 guest, one thread
 * (benchmarks/gemv_rows.c, three runs; docs/benchmarks/cpu-avx512-2026-11-26.md,
 * "Session 13"): one row of [64, 512] about even to 1.5x faster; three rows
 * 1.8-2.7x (AVX-512, lstmeng's layout); three rows of [1024, 4096] (16 MiB,
 * memory-bound) 2.0-2.8x on AVX-512, 1.3-1.9x on AVX2.
 *
 * Each Y[r, j] is summed in an order fixed by the kernel family alone (the
 * lanes per vector; in the column form over k in order, in every family),
 * never by m, by r or by which other outputs share a pass: a row's results are
 * bitwise the same in a batch of any size (tests/test_backend_cython.py checks
 * 1-16 rows, and 24 and 31 on AVX-512, whose GEMV takes up to 32).
 * accumulate: Y = product + Y (Y read once, after the sum), else Y = product
 * (Y's old values never read).
 */
#ifndef LSTMENG_LSTM_GEMV_H
#define LSTMENG_LSTM_GEMV_H

#include <stdint.h>

#include "lstm_cpu.h"

/* Rows of A per pass over B: a register block (the dot form's accumulators are 4 x
 * block vectors, the column form's broadcasts as many), 3 rows on the AVX2 family's 16
 * registers, 4 on AVX-512's 32. Four rather than three on AVX-512 (session 16,
 * benchmarks/gemv_rows.c, one core): 8 rows of [128, 512] 7.3-7.5 -> 4.7 us on PyTorch's
 * layout, 4.7 -> 4.5 on lstmeng's; 16 rows of [512, 2048] 284-306 -> 170-177 and
 * 280-285 -> 212 us. Six rows per pass gained as much at 16 rows and less at 8. */
#define LSTMENG_GEMV_BLOCK_ROWS 3
#define LSTMENG_GEMV_AVX512_BLOCK_ROWS 4

/* Which float32 products the caller (_cython_lstm.pyx's gemm) gives these kernels
 * rather than BLAS's SGEMM: up to LSTMENG_GEMV_MAX_ROWS rows (on the AVX-512 family
 * LSTMENG_GEMV_AVX512_MAX_ROWS); on the AVX2 family up to
 * LSTMENG_GEMV_AVX2_STREAMED_MAX_ROWS rows of a B over LSTMENG_GEMV_AVX2_CACHED_FLOATS
 * (4 MiB); on the scalar family (plain loops) one block, as before these measurements.
 * Why more than one block: OpenBLAS's SGEMM packs all of B at every call, which a
 * step-sized product cannot amortise. Crossovers measured with benchmarks/gemv_rows.c
 * (one thread, Zen 5, session 16): at [128, 512] SGEMM took 23-27 us for 1-8 rows and
 * 35 for 16, these kernels 2-7 and 13 us (lstmeng's layout), 2-14 and 27 (PyTorch's),
 * falling behind from 24-32 rows (AVX2 and PyTorch's layout first); at [512, 2048]
 * (4 MiB) 16 rows 0.29-0.33 ms (AVX-512), 0.44-0.52 (AVX2) against 0.59; at [1024,
 * 4096] (16 MiB, streamed at every pass) AVX-512 1.9-2.3 ms against 2.5 at 16 rows,
 * while the AVX2 dot form falls behind from 8 rows (2.4 against 1.8 ms). Session 17,
 * with four-row passes on AVX-512 (LSTMENG_GEMV_AVX512_MAX_ROWS): 24 and 32 rows took
 * 58-70 / 90-93 us at [256, 1024], 0.30-0.37 / 0.40-0.49 ms at [512, 2048] and
 * 1.6-1.7 / 2.1-2.3 ms at [1024, 4096] against SGEMM's 179-180 / 216-217 us, 0.71 / 0.86
 * ms and 2.86 / 3.45-3.51 ms; the AVX2 kernels stay at 16 (24 rows in lstmeng's layout:
 * 195 against SGEMM's 179 us at [256, 1024]). */
#define LSTMENG_GEMV_MAX_ROWS 16
#define LSTMENG_GEMV_AVX512_MAX_ROWS 32
#define LSTMENG_GEMV_AVX2_STREAMED_MAX_ROWS 6
#define LSTMENG_GEMV_AVX2_CACHED_FLOATS (1 << 20)
#define LSTMENG_GEMV_SCALAR_MAX_ROWS 3

static inline int lstmeng_gemv_takes_f32(int64_t m, int64_t n, int64_t k) {
    if (lstmeng_isa == LSTMENG_ISA_SCALAR) return m <= LSTMENG_GEMV_SCALAR_MAX_ROWS;
    if (lstmeng_isa == LSTMENG_ISA_AVX2 && n * k > LSTMENG_GEMV_AVX2_CACHED_FLOATS)
        return m <= LSTMENG_GEMV_AVX2_STREAMED_MAX_ROWS;
    return m <= (lstmeng_isa == LSTMENG_ISA_AVX512 ? LSTMENG_GEMV_AVX512_MAX_ROWS : LSTMENG_GEMV_MAX_ROWS);
}

/* Whether these kernels took an unpacked float32 product of m rows under the rows limit
 * the packing rules were measured against (LSTMENG_GEMV_MAX_ROWS on every family), for
 * _cython_lstm.pyx's packing_pays and packs_input_kernel: products of 17-32 rows, which
 * the AVX-512 GEMV takes since session 17, count as SGEMM's there, so a call packs where
 * it packed before. */
static inline int lstmeng_gemv_took_f32(int64_t m, int64_t n, int64_t k) {
    return m <= LSTMENG_GEMV_MAX_ROWS && lstmeng_gemv_takes_f32(m, n, k);
}

/* Columns of one column-form chunk: its partial sums, 4 KiB per row of A, stay
 * in L1 while the chunk's segments of four rows of B at a time stream past. */
#define LSTMENG_GEMV_CHUNK 1024

/* The body of a family's entry point: its dot-form or column-form kernel on blocks
 * of up to block_rows rows (at most 4), with the block's row count a compile-time
 * constant (each call inlines the kernel for that M). A row's sums do not depend
 * on which block it is in or on the other rows of its block. */
#define LSTMENG_GEMV_BY_ROWS(dot_rows, axpy_rows, block_rows)                          \
    do {                                                                                 \
        int64_t first;                                                                   \
        for (first = 0; first < m; first += (block_rows)) {                              \
            const int64_t rows = m - first < (block_rows) ? m - first : (block_rows);    \
            const float *block_a = a + first * lda;                                      \
            float *block_y = y + first * ldy;                                            \
            switch (rows) {                                                              \
            case 1: LSTMENG_GEMV_BLOCK(dot_rows, axpy_rows, 1); break;                   \
            case 2: LSTMENG_GEMV_BLOCK(dot_rows, axpy_rows, 2); break;                   \
            case 3: LSTMENG_GEMV_BLOCK(dot_rows, axpy_rows, 3); break;                   \
            default: if ((block_rows) >= 4) LSTMENG_GEMV_BLOCK(dot_rows, axpy_rows, 4); break; \
            }                                                                            \
        }                                                                                \
    } while (0)
#define LSTMENG_GEMV_BLOCK(dot_rows, axpy_rows, M)                                       \
    do {                                                                                 \
        if (b_transposed) dot_rows(M, n, k, block_a, lda, b, ldb, accumulate, block_y, ldy);  \
        else axpy_rows(M, n, k, block_a, lda, b, ldb, accumulate, block_y, ldy);         \
    } while (0)

#if defined(__GNUC__) || defined(__clang__)
#define LSTMENG_INLINE inline __attribute__((always_inline))
#else
#define LSTMENG_INLINE inline
#endif

static void lstmeng_gemv_scalar_f32(int64_t m, int b_transposed, int64_t n, int64_t k, const float *a,
                                    int64_t lda, const float *b, int64_t ldb, int accumulate, float *y,
                                    int64_t ldy) {
    int64_t r, j, kk;
    for (r = 0; r < m; r++, a += lda, y += ldy)
        for (j = 0; j < n; j++) {
            float sum = 0.0f;
            if (b_transposed)
                for (kk = 0; kk < k; kk++) sum += b[j * ldb + kk] * a[kk];
            else
                for (kk = 0; kk < k; kk++) sum += a[kk] * b[kk * ldb + j];
            y[j] = accumulate ? sum + y[j] : sum;
        }
}

#if LSTMENG_HAVE_AVX512
/* The lane sums of four vectors as one 4-float vector [sum s0, sum s1, sum s2, sum s3]:
 * pairs of lanes added by unpacking, then quarters by shuffling, then the four 128-bit
 * blocks; 11 instructions where four _mm512_reduce_add_ps take about 32, which had cost
 * as many instructions as a 3-row dot-form pass's 48 FMAs at k = 64 (session 16). The
 * order of the additions is fixed (it is this function's), so a row's sums still do not
 * depend on the other rows. */
LSTMENG_AVX512
static inline __m128 lstmeng_sum4_avx512(__m512 s0, __m512 s1, __m512 s2, __m512 s3) {
    /* Per 128-bit block: [s0 lanes 0+2, s1 0+2, s0 1+3, s1 1+3] and the same for s2, s3. */
    const __m512 pairs01 = _mm512_add_ps(_mm512_unpacklo_ps(s0, s1), _mm512_unpackhi_ps(s0, s1));
    const __m512 pairs23 = _mm512_add_ps(_mm512_unpacklo_ps(s2, s3), _mm512_unpackhi_ps(s2, s3));
    /* Per block: [s0, s1, s2, s3] summed over the block's four lanes. */
    const __m512 blocks = _mm512_add_ps(_mm512_shuffle_ps(pairs01, pairs23, _MM_SHUFFLE(1, 0, 1, 0)),
                                        _mm512_shuffle_ps(pairs01, pairs23, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 halves = _mm256_add_ps(_mm512_castps512_ps256(blocks), _mm512_extractf32x8_ps(blocks, 1));
    return _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps(halves, 1));
}

/* Dot form, M rows of A (a compile-time constant where inlined: the loops over
 * rows unroll and the 4 x M accumulators stay in registers). */
LSTMENG_AVX512
static LSTMENG_INLINE void lstmeng_gemv_dot_avx512_rows(const int M, int64_t n, int64_t k, const float *a,
                                                        int64_t lda, const float *b, int64_t ldb,
                                                        int accumulate, float *y, int64_t ldy) {
    const int64_t k_full = k - k % 16;
    const __mmask16 tail = (__mmask16)((1u << (k % 16)) - 1u);
    int64_t j = 0, kk;
    int r, q;
    for (; j < n; j += 4) {
        const int outputs = n - j < 4 ? (int)(n - j) : 4;
        const float *rows[4];
        __m512 s[LSTMENG_GEMV_AVX512_BLOCK_ROWS][4];
        for (q = 0; q < 4; q++) rows[q] = b + (j + (q < outputs ? q : 0)) * ldb;
        for (r = 0; r < M; r++)
            for (q = 0; q < 4; q++) s[r][q] = _mm512_setzero_ps();
        for (kk = 0; kk < k_full; kk += 16) {
            const __m512 b0 = _mm512_loadu_ps(rows[0] + kk), b1 = _mm512_loadu_ps(rows[1] + kk);
            const __m512 b2 = _mm512_loadu_ps(rows[2] + kk), b3 = _mm512_loadu_ps(rows[3] + kk);
            for (r = 0; r < M; r++) {
                const __m512 av = _mm512_loadu_ps(a + r * lda + kk);
                s[r][0] = _mm512_fmadd_ps(b0, av, s[r][0]);
                s[r][1] = _mm512_fmadd_ps(b1, av, s[r][1]);
                s[r][2] = _mm512_fmadd_ps(b2, av, s[r][2]);
                s[r][3] = _mm512_fmadd_ps(b3, av, s[r][3]);
            }
        }
        if (tail) {
            const __m512 b0 = _mm512_maskz_loadu_ps(tail, rows[0] + k_full);
            const __m512 b1 = _mm512_maskz_loadu_ps(tail, rows[1] + k_full);
            const __m512 b2 = _mm512_maskz_loadu_ps(tail, rows[2] + k_full);
            const __m512 b3 = _mm512_maskz_loadu_ps(tail, rows[3] + k_full);
            for (r = 0; r < M; r++) {
                const __m512 av = _mm512_maskz_loadu_ps(tail, a + r * lda + k_full);
                s[r][0] = _mm512_fmadd_ps(b0, av, s[r][0]);
                s[r][1] = _mm512_fmadd_ps(b1, av, s[r][1]);
                s[r][2] = _mm512_fmadd_ps(b2, av, s[r][2]);
                s[r][3] = _mm512_fmadd_ps(b3, av, s[r][3]);
            }
        }
        for (r = 0; r < M; r++) {
            const __mmask8 lanes = (__mmask8)((1u << outputs) - 1u);
            float *out = y + r * ldy + j;
            __m128 sums = lstmeng_sum4_avx512(s[r][0], s[r][1], s[r][2], s[r][3]);
            if (accumulate) sums = _mm_add_ps(sums, _mm_maskz_loadu_ps(lanes, out));
            _mm_mask_storeu_ps(out, lanes, sums);
        }
    }
}

/* Column form, M rows of A (see lstmeng_gemv_dot_avx512_rows). */
LSTMENG_AVX512
static LSTMENG_INLINE void lstmeng_gemv_axpy_avx512_rows(const int M, int64_t n, int64_t k, const float *a,
                                                         int64_t lda, const float *b, int64_t ldb,
                                                         int accumulate, float *y, int64_t ldy) {
    float sum[LSTMENG_GEMV_AVX512_BLOCK_ROWS][LSTMENG_GEMV_CHUNK];
    int64_t j0, j, kk;
    int r;
    for (j0 = 0; j0 < n; j0 += LSTMENG_GEMV_CHUNK) {
        const int64_t width = n - j0 < LSTMENG_GEMV_CHUNK ? n - j0 : LSTMENG_GEMV_CHUNK;
        const int64_t vectors = (width + 15) / 16;
        const __mmask16 tail = width % 16 ? (__mmask16)((1u << (width % 16)) - 1u) : (__mmask16)0xFFFF;
        const float *row = b + j0;
        for (r = 0; r < M; r++)
            for (j = 0; j < vectors * 16; j += 16) _mm512_storeu_ps(sum[r] + j, _mm512_setzero_ps());
        for (kk = 0; kk + 4 <= k; kk += 4, row += 4 * ldb) {
            __m512 av[LSTMENG_GEMV_AVX512_BLOCK_ROWS][4];
            for (r = 0; r < M; r++) {
                av[r][0] = _mm512_set1_ps(a[r * lda + kk]);
                av[r][1] = _mm512_set1_ps(a[r * lda + kk + 1]);
                av[r][2] = _mm512_set1_ps(a[r * lda + kk + 2]);
                av[r][3] = _mm512_set1_ps(a[r * lda + kk + 3]);
            }
            for (j = 0; j < vectors * 16; j += 16) {
                const __mmask16 lanes = j + 16 <= width ? (__mmask16)0xFFFF : tail;
                const __m512 b0 = _mm512_maskz_loadu_ps(lanes, row + j);
                const __m512 b1 = _mm512_maskz_loadu_ps(lanes, row + ldb + j);
                const __m512 b2 = _mm512_maskz_loadu_ps(lanes, row + 2 * ldb + j);
                const __m512 b3 = _mm512_maskz_loadu_ps(lanes, row + 3 * ldb + j);
                for (r = 0; r < M; r++) {
                    __m512 s = _mm512_loadu_ps(sum[r] + j);
                    s = _mm512_fmadd_ps(b0, av[r][0], s);
                    s = _mm512_fmadd_ps(b1, av[r][1], s);
                    s = _mm512_fmadd_ps(b2, av[r][2], s);
                    s = _mm512_fmadd_ps(b3, av[r][3], s);
                    _mm512_storeu_ps(sum[r] + j, s);
                }
            }
        }
        for (; kk < k; kk++, row += ldb)
            for (j = 0; j < vectors * 16; j += 16) {
                const __mmask16 lanes = j + 16 <= width ? (__mmask16)0xFFFF : tail;
                const __m512 b0 = _mm512_maskz_loadu_ps(lanes, row + j);
                for (r = 0; r < M; r++)
                    _mm512_storeu_ps(sum[r] + j, _mm512_fmadd_ps(b0, _mm512_set1_ps(a[r * lda + kk]),
                                                                 _mm512_loadu_ps(sum[r] + j)));
            }
        for (r = 0; r < M; r++)
            for (j = 0; j < vectors * 16; j += 16) {
                const __mmask16 lanes = j + 16 <= width ? (__mmask16)0xFFFF : tail;
                float *out = y + r * ldy + j0 + j;
                __m512 total = _mm512_loadu_ps(sum[r] + j);
                if (accumulate) total = _mm512_add_ps(total, _mm512_maskz_loadu_ps(lanes, out));
                _mm512_mask_storeu_ps(out, lanes, total);
            }
    }
}

LSTMENG_AVX512
static void lstmeng_gemv_avx512_f32(int64_t m, int b_transposed, int64_t n, int64_t k, const float *a,
                                    int64_t lda, const float *b, int64_t ldb, int accumulate, float *y,
                                    int64_t ldy) {
    LSTMENG_GEMV_BY_ROWS(lstmeng_gemv_dot_avx512_rows, lstmeng_gemv_axpy_avx512_rows,
                         LSTMENG_GEMV_AVX512_BLOCK_ROWS);
}
#endif

#if LSTMENG_HAVE_AVX2_FMA
LSTMENG_AVX2_FMA
static inline float lstmeng_sum_lanes_avx2(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* Lanes 0 .. count - 1 of a 256-bit mask (count in 0 .. 8) for maskload / maskstore. */
LSTMENG_AVX2_FMA
static inline __m256i lstmeng_lanes_avx2(int64_t count) {
    const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)count), index);
}

/* Dot form on AVX2: four rows of B^T at a time, two for three rows of A (the
 * accumulators, one per row of A and of B^T, and the loads fit 16 ymm registers). */
LSTMENG_AVX2_FMA
static LSTMENG_INLINE void lstmeng_gemv_dot_avx2_rows(const int M, int64_t n, int64_t k, const float *a,
                                                      int64_t lda, const float *b, int64_t ldb, int accumulate,
                                                      float *y, int64_t ldy) {
    const int GROUP = M == 3 ? 2 : 4;
    const int64_t k_full = k - k % 8;
    const __m256i tail = lstmeng_lanes_avx2(k % 8);
    int64_t j = 0, kk;
    int r, q;
    for (; j < n; j += GROUP) {
        const int outputs = n - j < GROUP ? (int)(n - j) : GROUP;
        const float *rows[4];
        __m256 s[LSTMENG_GEMV_BLOCK_ROWS][4];
        for (q = 0; q < GROUP; q++) rows[q] = b + (j + (q < outputs ? q : 0)) * ldb;
        for (r = 0; r < M; r++)
            for (q = 0; q < GROUP; q++) s[r][q] = _mm256_setzero_ps();
        for (kk = 0; kk < k_full; kk += 8) {
            __m256 bv[4];
            for (q = 0; q < GROUP; q++) bv[q] = _mm256_loadu_ps(rows[q] + kk);
            for (r = 0; r < M; r++) {
                const __m256 av = _mm256_loadu_ps(a + r * lda + kk);
                for (q = 0; q < GROUP; q++) s[r][q] = _mm256_fmadd_ps(bv[q], av, s[r][q]);
            }
        }
        if (k_full < k) {
            __m256 bv[4];
            for (q = 0; q < GROUP; q++) bv[q] = _mm256_maskload_ps(rows[q] + k_full, tail);
            for (r = 0; r < M; r++) {
                const __m256 av = _mm256_maskload_ps(a + r * lda + k_full, tail);
                for (q = 0; q < GROUP; q++) s[r][q] = _mm256_fmadd_ps(bv[q], av, s[r][q]);
            }
        }
        for (r = 0; r < M; r++)
            for (q = 0; q < outputs; q++) {
                const float sum = lstmeng_sum_lanes_avx2(s[r][q]);
                float *out = y + r * ldy + j + q;
                *out = accumulate ? sum + *out : sum;
            }
    }
}

/* Column form on AVX2 (see lstmeng_gemv_axpy_avx512_rows): eight rows of B per
 * pass over the partial sums, whose load and store then come once per 8 FMAs;
 * full vectors load B with plain loads, which fold into the FMAs (16 ymm). */
LSTMENG_AVX2_FMA
static LSTMENG_INLINE void lstmeng_gemv_axpy_avx2_rows(const int M, int64_t n, int64_t k, const float *a,
                                                       int64_t lda, const float *b, int64_t ldb, int accumulate,
                                                       float *y, int64_t ldy) {
    float sum[LSTMENG_GEMV_BLOCK_ROWS][LSTMENG_GEMV_CHUNK];
    int64_t j0, j, kk;
    int r, p;
    for (j0 = 0; j0 < n; j0 += LSTMENG_GEMV_CHUNK) {
        const int64_t width = n - j0 < LSTMENG_GEMV_CHUNK ? n - j0 : LSTMENG_GEMV_CHUNK;
        const int64_t full = width - width % 8;
        const __m256i all = lstmeng_lanes_avx2(8), tail = lstmeng_lanes_avx2(width % 8);
        const float *row = b + j0;
        for (r = 0; r < M; r++)
            for (j = 0; j < width; j += 8) _mm256_storeu_ps(sum[r] + j, _mm256_setzero_ps());
        for (kk = 0; kk + 8 <= k; kk += 8, row += 8 * ldb)
            for (r = 0; r < M; r++) {
                __m256 av[8];
                for (p = 0; p < 8; p++) av[p] = _mm256_broadcast_ss(a + r * lda + kk + p);
                for (j = 0; j < full; j += 8) {
                    __m256 s = _mm256_loadu_ps(sum[r] + j);
                    for (p = 0; p < 8; p++) s = _mm256_fmadd_ps(_mm256_loadu_ps(row + p * ldb + j), av[p], s);
                    _mm256_storeu_ps(sum[r] + j, s);
                }
                if (full < width) {
                    __m256 s = _mm256_loadu_ps(sum[r] + full);
                    for (p = 0; p < 8; p++) s = _mm256_fmadd_ps(_mm256_maskload_ps(row + p * ldb + full, tail), av[p], s);
                    _mm256_storeu_ps(sum[r] + full, s);
                }
            }
        for (; kk < k; kk++, row += ldb)
            for (r = 0; r < M; r++) {
                const __m256 a0 = _mm256_broadcast_ss(a + r * lda + kk);
                for (j = 0; j < full; j += 8)
                    _mm256_storeu_ps(sum[r] + j, _mm256_fmadd_ps(_mm256_loadu_ps(row + j), a0, _mm256_loadu_ps(sum[r] + j)));
                if (full < width)
                    _mm256_storeu_ps(sum[r] + full, _mm256_fmadd_ps(_mm256_maskload_ps(row + full, tail), a0,
                                                                    _mm256_loadu_ps(sum[r] + full)));
            }
        for (r = 0; r < M; r++)
            for (j = 0; j < width; j += 8) {
                const __m256i lanes = j < full ? all : tail;
                float *out = y + r * ldy + j0 + j;
                __m256 total = _mm256_loadu_ps(sum[r] + j);
                if (accumulate) total = _mm256_add_ps(total, _mm256_maskload_ps(out, lanes));
                _mm256_maskstore_ps(out, lanes, total);
            }
    }
}

LSTMENG_AVX2_FMA
static void lstmeng_gemv_avx2_f32(int64_t m, int b_transposed, int64_t n, int64_t k, const float *a,
                                  int64_t lda, const float *b, int64_t ldb, int accumulate, float *y,
                                  int64_t ldy) {
    LSTMENG_GEMV_BY_ROWS(lstmeng_gemv_dot_avx2_rows, lstmeng_gemv_axpy_avx2_rows, LSTMENG_GEMV_BLOCK_ROWS);
}
#endif

/* Y[m, n] = A[m, k] @ B, plus Y's old values when accumulate, with the kernels of
 * lstmeng_isa (see the top of this file for B's two layouts), any m (blocks of the
 * family's block rows, B streamed once per block); A, Y row-major with row
 * strides lda, ldy. */
static void lstmeng_gemv_f32(int64_t m, int b_transposed, int64_t n, int64_t k, const float *a, int64_t lda,
                             const float *b, int64_t ldb, int accumulate, float *y, int64_t ldy) {
    if (m <= 0 || n <= 0) return;
#if LSTMENG_HAVE_AVX512
    if (lstmeng_isa == LSTMENG_ISA_AVX512) {
        lstmeng_gemv_avx512_f32(m, b_transposed, n, k, a, lda, b, ldb, accumulate, y, ldy);
        return;
    }
#endif
#if LSTMENG_HAVE_AVX2_FMA
    if (lstmeng_isa == LSTMENG_ISA_AVX2) {
        lstmeng_gemv_avx2_f32(m, b_transposed, n, k, a, lda, b, ldb, accumulate, y, ldy);
        return;
    }
#endif
    lstmeng_gemv_scalar_f32(m, b_transposed, n, k, a, lda, b, ldb, accumulate, y, ldy);
}

#endif
