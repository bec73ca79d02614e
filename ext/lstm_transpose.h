/*
 * dst = src^T for a row-major matrix: src [rows, cols] (row stride lds) into
 * dst [cols, rows] (row stride ldd). For the weight gradients lstmeng.torch hands
 * PyTorch: the kernels compute dK [I, 4H] and dR [H, 4H], PyTorch's parameters are
 * [4H, I] and [4H, H], and autograd adds a gradient of another layout into .grad
 * element by element (aten::add_ of a [512, 128] gradient read transposed: ~18-70
 * us a call, against ~3 us contiguous; a one-step lstmeng.torch.LSTM training call
 * at (64, 128) spent 37 % of its time there). NumPy's transposing copy of [128, 512]
 * took 74 us, torch's 26; this one a few (see lstmeng/torch.py, _weights_in_layout).
 *
 * float32 with AVX2 (every AVX-512 CPU has it): 8 x 8 tiles transposed in registers
 * (unpack, shuffle, lane permute), in blocks of 64 x 64 so that a block's rows and
 * columns stay in L1; the edges and float64 element by element, in the same blocks.
 * A copy: the same values whichever path runs.
 */
#ifndef LSTMENG_LSTM_TRANSPOSE_H
#define LSTMENG_LSTM_TRANSPOSE_H

#include <stdint.h>

#include "lstm_cpu.h"

#define LSTMENG_TRANSPOSE_BLOCK 64

#if LSTMENG_HAVE_AVX2_FMA
LSTMENG_AVX2_FMA
static inline void lstmeng_transpose_8x8_avx2(const float *src, int64_t lds, float *dst, int64_t ldd) {
    const __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + lds);
    const __m256 r2 = _mm256_loadu_ps(src + 2 * lds), r3 = _mm256_loadu_ps(src + 3 * lds);
    const __m256 r4 = _mm256_loadu_ps(src + 4 * lds), r5 = _mm256_loadu_ps(src + 5 * lds);
    const __m256 r6 = _mm256_loadu_ps(src + 6 * lds), r7 = _mm256_loadu_ps(src + 7 * lds);
    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(s0, s4, 0x20));
    _mm256_storeu_ps(dst + ldd, _mm256_permute2f128_ps(s1, s5, 0x20));
    _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(s2, s6, 0x20));
    _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(s3, s7, 0x20));
    _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(s0, s4, 0x31));
    _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(s1, s5, 0x31));
    _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(s2, s6, 0x31));
    _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(s3, s7, 0x31));
}

/* One block: rows i0 .. i1 - 1, columns j0 .. j1 - 1 of src. */
LSTMENG_AVX2_FMA
static void lstmeng_transpose_block_avx2_f32(const float *src, int64_t lds, float *dst, int64_t ldd, int64_t i0,
                                            int64_t i1, int64_t j0, int64_t j1) {
    int64_t i, j;
    for (i = i0; i + 8 <= i1; i += 8) {
        for (j = j0; j + 8 <= j1; j += 8) lstmeng_transpose_8x8_avx2(src + i * lds + j, lds, dst + j * ldd + i, ldd);
        for (; j < j1; j++)
            for (int64_t r = i; r < i + 8; r++) dst[j * ldd + r] = src[r * lds + j];
    }
    for (; i < i1; i++)
        for (j = j0; j < j1; j++) dst[j * ldd + i] = src[i * lds + j];
}
#endif

static void lstmeng_transpose_f32(int64_t rows, int64_t cols, const float *src, int64_t lds, float *dst,
                                  int64_t ldd) {
    int64_t i0, j0, i, j;
    for (i0 = 0; i0 < rows; i0 += LSTMENG_TRANSPOSE_BLOCK) {
        const int64_t i1 = i0 + LSTMENG_TRANSPOSE_BLOCK < rows ? i0 + LSTMENG_TRANSPOSE_BLOCK : rows;
        for (j0 = 0; j0 < cols; j0 += LSTMENG_TRANSPOSE_BLOCK) {
            const int64_t j1 = j0 + LSTMENG_TRANSPOSE_BLOCK < cols ? j0 + LSTMENG_TRANSPOSE_BLOCK : cols;
#if LSTMENG_HAVE_AVX2_FMA
            if (lstmeng_isa != LSTMENG_ISA_SCALAR) {
                lstmeng_transpose_block_avx2_f32(src, lds, dst, ldd, i0, i1, j0, j1);
                continue;
            }
#endif
            for (i = i0; i < i1; i++)
                for (j = j0; j < j1; j++) dst[j * ldd + i] = src[i * lds + j];
        }
    }
}

static void lstmeng_transpose_f64(int64_t rows, int64_t cols, const double *src, int64_t lds, double *dst,
                                  int64_t ldd) {
    int64_t i0, j0, i, j;
    for (i0 = 0; i0 < rows; i0 += LSTMENG_TRANSPOSE_BLOCK) {
        const int64_t i1 = i0 + LSTMENG_TRANSPOSE_BLOCK < rows ? i0 + LSTMENG_TRANSPOSE_BLOCK : rows;
        for (j0 = 0; j0 < cols; j0 += LSTMENG_TRANSPOSE_BLOCK) {
            const int64_t j1 = j0 + LSTMENG_TRANSPOSE_BLOCK < cols ? j0 + LSTMENG_TRANSPOSE_BLOCK : cols;
            for (i = i0; i < i1; i++)
                for (j = j0; j < j1; j++) dst[j * ldd + i] = src[i * lds + j];
        }
    }
}

#endif
