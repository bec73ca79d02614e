/*
 * Fused AVX2+FMA row kernels for the default activations (tanh, sigmoid) in
 * float32: the whole per-row step in one pass over eight units at a time,
 * every value in registers. The generic row functions of lstm_rows.h make
 * several passes per activation (clamp, clamp, exp and divide), each
 * through memory; here each unit's five activations cost one exp and one
 * reciprocal each, and nothing is stored but the results.
 *
 * exp is lstm_rows.h's polynomial (same coefficients, same clamping, so the
 * same saturation for |x| ~ 1e4). 1 / d is the hardware reciprocal estimate
 * refined by one Newton step (relative error below 3e-7, against 6e-8 for a
 * division): the division unit is the slowest part of the generic loop.
 * NaN propagates as in the generic code (min/max take NaN from the second
 * operand, which is the value here).
 *
 * AVX-512 (16 lanes, the same arithmetic): exp scales by 2^k with
 * vscalefps instead of building the exponent bits, the reciprocal estimate
 * is vrcp14ps (relative error 2^-14 before the Newton step, against 2^-12),
 * and the last n % 16 units run in the same code under a lane mask, so a row
 * never falls back to the generic loops (a slice of 8 units, or H = 100,
 * stays in registers). Why AVX-512 here at all: the gate kernel was 7.6 % of
 * an AVX-512 Xeon's inference profile (/work/shared/cpu/xeon-avx512-profile.md)
 * and twice the lanes halve its instruction count.
 *
 * The AVX2 functions handle the first n - n % 8 units and return how many
 * they did; the caller finishes the rest with the generic code. The AVX-512
 * functions do all n. The forward's
 * cell update c = f c(t-1) + i g is written exactly as the backward
 * recomputes it, so act(c(t)) is the same in both.
 */
#ifndef LSTMENG_LSTM_ROWS_FAST_H
#define LSTMENG_LSTM_ROWS_FAST_H

#include <stdint.h>

#include "lstm_cpu.h"

#if LSTMENG_HAVE_AVX2_FMA
#define LSTMENG_HAVE_FAST_ROWS 1

LSTMENG_AVX2_FMA static inline __m256 lstmeng_exp8(__m256 x) {
    /* x already clamped to [-87, 88]; see lstmeng_exp_f32 */
    const __m256 shifted = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                           _mm256_set1_ps(12582912.0f));
    const __m256 k = _mm256_sub_ps(shifted, _mm256_set1_ps(12582912.0f));
    const __m256i k_int = _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(0x4B400000));
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256 scale = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(k_int, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(p, scale);
}

/* 1 / d for d >= 1: estimate, then one Newton step r (2 - d r). */
LSTMENG_AVX2_FMA static inline __m256 lstmeng_reciprocal8(__m256 d) {
    const __m256 r = _mm256_rcp_ps(d);
    return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
}

/* clamp(scale * x) to exp's range, NaN kept */
LSTMENG_AVX2_FMA static inline __m256 lstmeng_exp_argument8(__m256 x, float scale) {
    const __m256 v = _mm256_mul_ps(_mm256_set1_ps(scale), x);
    return _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), v));
}

LSTMENG_AVX2_FMA static inline __m256 lstmeng_sigmoid8(__m256 x) {
    /* 1 / (1 + exp(-x)) */
    const __m256 e = lstmeng_exp8(lstmeng_exp_argument8(x, -1.0f));
    return lstmeng_reciprocal8(_mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

LSTMENG_AVX2_FMA static inline __m256 lstmeng_tanh8(__m256 x) {
    /* 1 - 2 / (exp(2x) + 1) */
    const __m256 e = lstmeng_exp8(lstmeng_exp_argument8(x, 2.0f));
    return _mm256_fnmadd_ps(_mm256_set1_ps(2.0f), lstmeng_reciprocal8(_mm256_add_ps(e, _mm256_set1_ps(1.0f))),
                            _mm256_set1_ps(1.0f));
}

/* See lstmeng_forward_row_f32 (lstm_rows.h) for the arguments. */
LSTMENG_AVX2_FMA static int64_t lstmeng_forward_row_fast_f32(float *gates, float *c, float *c_prev,
                                                           float *h, int64_t n, int64_t stride) {
    int64_t j;
    for (j = 0; j + 8 <= n; j += 8) {
        const __m256 i = lstmeng_sigmoid8(_mm256_loadu_ps(gates + j));
        const __m256 f = lstmeng_sigmoid8(_mm256_loadu_ps(gates + stride + j));
        const __m256 g = lstmeng_tanh8(_mm256_loadu_ps(gates + 2 * stride + j));
        const __m256 o = lstmeng_sigmoid8(_mm256_loadu_ps(gates + 3 * stride + j));
        const __m256 previous = _mm256_loadu_ps(c + j);
        const __m256 cell = _mm256_fmadd_ps(f, previous, _mm256_mul_ps(i, g));
        _mm256_storeu_ps(gates + j, i);
        _mm256_storeu_ps(gates + stride + j, f);
        _mm256_storeu_ps(gates + 2 * stride + j, g);
        _mm256_storeu_ps(gates + 3 * stride + j, o);
        if (c_prev != NULL) _mm256_storeu_ps(c_prev + j, previous);
        _mm256_storeu_ps(c + j, cell);
        _mm256_storeu_ps(h + j, _mm256_mul_ps(o, lstmeng_tanh8(cell)));
    }
    return j;
}

/* See lstmeng_backward_row_f32 (lstm_rows.h) for the arguments. */
LSTMENG_AVX2_FMA static int64_t lstmeng_backward_row_fast_f32(float *gates, const float *c_prev,
                                                            const float *dh, float *dc, int64_t n,
                                                            int64_t stride) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t j;
    for (j = 0; j + 8 <= n; j += 8) {
        const __m256 i = _mm256_loadu_ps(gates + j), f = _mm256_loadu_ps(gates + stride + j);
        const __m256 g = _mm256_loadu_ps(gates + 2 * stride + j);
        const __m256 o = _mm256_loadu_ps(gates + 3 * stride + j);
        const __m256 previous = _mm256_loadu_ps(c_prev + j), grad_h = _mm256_loadu_ps(dh + j);
        const __m256 cell_act = lstmeng_tanh8(_mm256_fmadd_ps(f, previous, _mm256_mul_ps(i, g)));
        /* dc_total = dc + dh o (1 - act(c)^2) */
        const __m256 dc_total = _mm256_fmadd_ps(_mm256_mul_ps(grad_h, o),
                                                _mm256_fnmadd_ps(cell_act, cell_act, one),
                                                _mm256_loadu_ps(dc + j));
        /* sigmoid' = s (1 - s), tanh' = 1 - t^2 */
        _mm256_storeu_ps(gates + j, _mm256_mul_ps(_mm256_mul_ps(dc_total, g),
                                                  _mm256_mul_ps(i, _mm256_sub_ps(one, i))));
        _mm256_storeu_ps(gates + stride + j, _mm256_mul_ps(_mm256_mul_ps(dc_total, previous),
                                                           _mm256_mul_ps(f, _mm256_sub_ps(one, f))));
        _mm256_storeu_ps(gates + 2 * stride + j, _mm256_mul_ps(_mm256_mul_ps(dc_total, i),
                                                               _mm256_fnmadd_ps(g, g, one)));
        _mm256_storeu_ps(gates + 3 * stride + j, _mm256_mul_ps(_mm256_mul_ps(grad_h, cell_act),
                                                               _mm256_mul_ps(o, _mm256_sub_ps(one, o))));
        _mm256_storeu_ps(dc + j, _mm256_mul_ps(dc_total, f));
    }
    return j;
}
#else
#define LSTMENG_HAVE_FAST_ROWS 0
#endif

#if LSTMENG_HAVE_AVX512

/* exp on 16 lanes, x already clamped to [-87, 88]: lstmeng_exp8's range
 * reduction and polynomial (the same k, r and p), then p * 2^k by vscalefps. */
LSTMENG_AVX512 static inline __m512 lstmeng_exp16(__m512 x) {
    const __m512 shifted = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f),
                                           _mm512_set1_ps(12582912.0f));
    const __m512 k = _mm512_sub_ps(shifted, _mm512_set1_ps(12582912.0f));
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, k);
}

/* 1 / d for d >= 1: 14-bit estimate, then one Newton step r (2 - d r). */
LSTMENG_AVX512 static inline __m512 lstmeng_reciprocal16(__m512 d) {
    const __m512 r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

/* clamp(scale * x) to exp's range, NaN kept (min/max return the second operand on NaN) */
LSTMENG_AVX512 static inline __m512 lstmeng_exp_argument16(__m512 x, float scale) {
    const __m512 v = _mm512_mul_ps(_mm512_set1_ps(scale), x);
    return _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), v));
}

LSTMENG_AVX512 static inline __m512 lstmeng_sigmoid16(__m512 x) {
    const __m512 e = lstmeng_exp16(lstmeng_exp_argument16(x, -1.0f));
    return lstmeng_reciprocal16(_mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

LSTMENG_AVX512 static inline __m512 lstmeng_tanh16(__m512 x) {
    const __m512 e = lstmeng_exp16(lstmeng_exp_argument16(x, 2.0f));
    return _mm512_fnmadd_ps(_mm512_set1_ps(2.0f),
                            lstmeng_reciprocal16(_mm512_add_ps(e, _mm512_set1_ps(1.0f))),
                            _mm512_set1_ps(1.0f));
}

/* Lanes 0 .. count - 1 of a 16-lane mask (count <= 16). */
LSTMENG_AVX512 static inline __mmask16 lstmeng_lanes16(int64_t count) {
    return (__mmask16)(count >= 16 ? 0xFFFF : (1u << count) - 1u);
}

/* Units j .. j + 15 of a forward row (lanes outside `lanes` neither read nor written). */
LSTMENG_AVX512 static inline __attribute__((always_inline)) void lstmeng_forward_lanes16(
        float *gates, float *c, float *c_prev, float *h, int64_t j, int64_t stride,
        __mmask16 lanes) {
    const __m512 i = lstmeng_sigmoid16(_mm512_maskz_loadu_ps(lanes, gates + j));
    const __m512 f = lstmeng_sigmoid16(_mm512_maskz_loadu_ps(lanes, gates + stride + j));
    const __m512 g = lstmeng_tanh16(_mm512_maskz_loadu_ps(lanes, gates + 2 * stride + j));
    const __m512 o = lstmeng_sigmoid16(_mm512_maskz_loadu_ps(lanes, gates + 3 * stride + j));
    const __m512 previous = _mm512_maskz_loadu_ps(lanes, c + j);
    const __m512 cell = _mm512_fmadd_ps(f, previous, _mm512_mul_ps(i, g));
    _mm512_mask_storeu_ps(gates + j, lanes, i);
    _mm512_mask_storeu_ps(gates + stride + j, lanes, f);
    _mm512_mask_storeu_ps(gates + 2 * stride + j, lanes, g);
    _mm512_mask_storeu_ps(gates + 3 * stride + j, lanes, o);
    if (c_prev != NULL) _mm512_mask_storeu_ps(c_prev + j, lanes, previous);
    _mm512_mask_storeu_ps(c + j, lanes, cell);
    _mm512_mask_storeu_ps(h + j, lanes, _mm512_mul_ps(o, lstmeng_tanh16(cell)));
}

/* See lstmeng_forward_row_f32 (lstm_rows.h) for the arguments; does all n units. */
LSTMENG_AVX512 static int64_t lstmeng_forward_row_avx512_f32(float *gates, float *c, float *c_prev,
                                                             float *h, int64_t n, int64_t stride) {
    int64_t j;
    for (j = 0; j + 16 <= n; j += 16)
        lstmeng_forward_lanes16(gates, c, c_prev, h, j, stride, (__mmask16)0xFFFF);
    if (j < n) lstmeng_forward_lanes16(gates, c, c_prev, h, j, stride, lstmeng_lanes16(n - j));
    return n;
}

/* Units j .. j + 15 of a backward row (see lstmeng_backward_row_fast_f32). */
LSTMENG_AVX512 static inline __attribute__((always_inline)) void lstmeng_backward_lanes16(
        float *gates, const float *c_prev, const float *dh, float *dc, int64_t j, int64_t stride,
        __mmask16 lanes) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 i = _mm512_maskz_loadu_ps(lanes, gates + j);
    const __m512 f = _mm512_maskz_loadu_ps(lanes, gates + stride + j);
    const __m512 g = _mm512_maskz_loadu_ps(lanes, gates + 2 * stride + j);
    const __m512 o = _mm512_maskz_loadu_ps(lanes, gates + 3 * stride + j);
    const __m512 previous = _mm512_maskz_loadu_ps(lanes, c_prev + j);
    const __m512 grad_h = _mm512_maskz_loadu_ps(lanes, dh + j);
    const __m512 cell_act = lstmeng_tanh16(_mm512_fmadd_ps(f, previous, _mm512_mul_ps(i, g)));
    /* dc_total = dc + dh o (1 - act(c)^2) */
    const __m512 dc_total = _mm512_fmadd_ps(_mm512_mul_ps(grad_h, o),
                                            _mm512_fnmadd_ps(cell_act, cell_act, one),
                                            _mm512_maskz_loadu_ps(lanes, dc + j));
    /* sigmoid' = s (1 - s), tanh' = 1 - t^2 */
    _mm512_mask_storeu_ps(gates + j, lanes,
                          _mm512_mul_ps(_mm512_mul_ps(dc_total, g),
                                        _mm512_mul_ps(i, _mm512_sub_ps(one, i))));
    _mm512_mask_storeu_ps(gates + stride + j, lanes,
                          _mm512_mul_ps(_mm512_mul_ps(dc_total, previous),
                                        _mm512_mul_ps(f, _mm512_sub_ps(one, f))));
    _mm512_mask_storeu_ps(gates + 2 * stride + j, lanes,
                          _mm512_mul_ps(_mm512_mul_ps(dc_total, i), _mm512_fnmadd_ps(g, g, one)));
    _mm512_mask_storeu_ps(gates + 3 * stride + j, lanes,
                          _mm512_mul_ps(_mm512_mul_ps(grad_h, cell_act),
                                        _mm512_mul_ps(o, _mm512_sub_ps(one, o))));
    _mm512_mask_storeu_ps(dc + j, lanes, _mm512_mul_ps(dc_total, f));
}

/* See lstmeng_backward_row_f32 (lstm_rows.h) for the arguments; does all n units. */
LSTMENG_AVX512 static int64_t lstmeng_backward_row_avx512_f32(float *gates, const float *c_prev,
                                                              const float *dh, float *dc,
                                                              int64_t n, int64_t stride) {
    int64_t j;
    for (j = 0; j + 16 <= n; j += 16)
        lstmeng_backward_lanes16(gates, c_prev, dh, dc, j, stride, (__mmask16)0xFFFF);
    if (j < n) lstmeng_backward_lanes16(gates, c_prev, dh, dc, j, stride, lstmeng_lanes16(n - j));
    return n;
}
#endif

#endif
