/*
 * Per-row elementwise work of the LSTM kernels in _cython_lstm.pyx: gate
 * nonlinearities, cell update and their derivatives, for one batch row of
 * H units at a time (the row's 4H gates stay in L1 while all of it runs).
 *
 * Why C and not Cython: the row loops must vectorise, and on x86-64 that
 * means AVX2 where the CPU has it while the binary still runs everywhere.
 * GCC/Clang `target_clones` compile each row function twice (AVX2 and
 * baseline) and pick one at load time; Cython cannot attach that attribute.
 * exp is a branch-free polynomial (Cody-Waite range reduction) instead of
 * libm's, because a libm call in the loop stops vectorisation; inputs are
 * clamped first so |x| ~ 1e4 gives finite, saturated results. float32 rows
 * with the default activations (tanh, sigmoid) go through the fused AVX2
 * kernels of lstm_rows_fast.h (AVX-512 or AVX2) where the CPU has them; these
 * generic loops do the rest (other activations, float64, the last n % 8
 * units after the AVX2 kernel).
 *
 * Activation kinds (same numbers as in _cython_lstm.pyx):
 *   0 tanh, 1 relu, 2 sigmoid, 3 linear, 4 hard_sigmoid (Keras 3:
 *   clip(x/6 + 0.5, 0, 1)).
 * Gate order within a row of 4H: i, f, g (cell candidate), o.
 */
#ifndef LSTMENG_LSTM_ROWS_H
#define LSTMENG_LSTM_ROWS_H

#include <stdint.h>
#include <string.h>

#include "lstm_rows_fast.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) \
    && defined(__linux__) && !defined(LSTMENG_NO_CLONES)
#define LSTMENG_SIMD __attribute__((target_clones("avx2", "default")))
#else
#define LSTMENG_SIMD
#endif

enum { LSTMENG_TANH = 0, LSTMENG_RELU = 1, LSTMENG_SIGMOID = 2, LSTMENG_LINEAR = 3,
       LSTMENG_HARD_SIGMOID = 4 };

/* Clamping bounds of exp's argument: finite results with a normal scale 2^k. */
#define LSTMENG_EXP_MIN_f32 -87.0f
#define LSTMENG_EXP_MAX_f32 88.0f
#define LSTMENG_EXP_MIN_f64 -708.0
#define LSTMENG_EXP_MAX_f64 709.0

/* exp for float32, x already clamped to [-87, 88]. (The clamp runs as its own
 * loop: GCC does not if-convert it inside this function, which would leave
 * the exp loop scalar.) */
static inline float lstmeng_exp_f32(float x) {
    /* Adding 1.5 * 2^23 rounds to the nearest integer, which then sits in the low mantissa bits. */
    const float shifted = x * 1.44269504088896341f + 12582912.0f;
    const float k = shifted - 12582912.0f;
    union { float f; int32_t i; } bits = { shifted };
    const int32_t k_int = bits.i - 0x4B400000;
    const float r = (x - k * 0.693359375f) - k * (-2.12194440e-4f);
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    bits.i = (k_int + 127) << 23; /* k_int + 127 >= 1 after the clamp */
    return p * bits.f;
}

/* exp for float64, x already clamped to [-708, 709]; Taylor to r^13 (error < 1e-17 on |r| <= ln2/2). */
static inline double lstmeng_exp_f64(double x) {
    const double shifted = x * 1.4426950408889634074 + 6755399441055744.0;
    const double k = shifted - 6755399441055744.0;
    union { double f; int64_t i; } bits = { shifted };
    const int64_t k_int = bits.i - INT64_C(0x4338000000000000);
    const double r = (x - k * 6.93145751953125e-1) - k * 1.42860682030941723212e-6;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    bits.i = (k_int + 1023) << 52; /* k_int + 1023 >= 2 after the clamp */
    return p * bits.f;
}

/*
 * The row functions, written once for both float types. T is the float type,
 * S the suffix (f32/f64).
 *
 * lstmeng_act_S(kind, in, out, n): out[j] = act(in[j]); in == out allowed.
 * lstmeng_dact_S(kind, y, out, n): out[j] = act'(x) written from y = act(x).
 *
 * lstmeng_forward_row_S(gates, c, c_prev, h, n, stride, act, ract)
 *   gates: the i, f, g, o gate pre-activations of n units at gates, gates + stride,
 *          gates + 2 stride, gates + 3 stride (stride = H for a whole row of 4H;
 *          a thread owning units u0 .. u0 + n - 1 passes gates + u0 and stride H);
 *          activated gates out
 *   c:     [n]  cell state in, new cell state out
 *   c_prev: [n] or NULL: where to keep c(t-1) for the backward
 *   h:     [n]  new hidden state out
 *
 * lstmeng_backward_row_S(gates, c_prev, dh, dc, scratch, n, stride, act, ract)
 *   gates:    activated gates in (laid out as above), gate-input gradients dz out
 *   c_prev:   [n]  c(t-1) from the forward; c(t) = f c(t-1) + i g and act(c(t))
 *             are recomputed here (the same arithmetic as the forward's), which
 *             is cheaper than keeping a [T, B, H] array of them alive
 *   dh:       [n]  gradient reaching h(t) (output + carried)
 *   dc:       [n]  gradient of c(t) in, of c(t-1) out
 *   scratch:  [6n]
 */
#define LSTMENG_DEFINE_ROWS(T, S, EXP)                                                          \
    /* out[j] = scale * in[j] clamped to exp's range */                                        \
    static inline void lstmeng_clamped_##S(const T *in, T *out, int64_t n, T scale) {           \
        int64_t j;                                                                              \
        for (j = 0; j < n; j++) {                                                               \
            const T v = scale * in[j];                                                          \
            out[j] = v < LSTMENG_EXP_MIN_##S ? LSTMENG_EXP_MIN_##S : v;                         \
        }                                                                                       \
        for (j = 0; j < n; j++) out[j] = out[j] > LSTMENG_EXP_MAX_##S ? LSTMENG_EXP_MAX_##S : out[j]; \
    }                                                                                           \
    static inline void lstmeng_act_##S(int kind, const T *in, T *out, int64_t n) {              \
        int64_t j;                                                                              \
        switch (kind) {                                                                         \
        case LSTMENG_TANH: /* 1 - 2 / (exp(2x) + 1) */                                         \
            lstmeng_clamped_##S(in, out, n, (T)2);                                              \
            for (j = 0; j < n; j++) out[j] = (T)1 - (T)2 / (EXP(out[j]) + (T)1);                \
            break;                                                                              \
        case LSTMENG_RELU:                                                                      \
            for (j = 0; j < n; j++) out[j] = in[j] > (T)0 ? in[j] : (T)0;                       \
            break;                                                                              \
        case LSTMENG_SIGMOID: /* 1 / (1 + exp(-x)) */                                          \
            lstmeng_clamped_##S(in, out, n, (T)-1);                                             \
            for (j = 0; j < n; j++) out[j] = (T)1 / ((T)1 + EXP(out[j]));                       \
            break;                                                                              \
        case LSTMENG_HARD_SIGMOID:                                                              \
            for (j = 0; j < n; j++) {                                                           \
                const T v = in[j] / (T)6 + (T)0.5;                                              \
                out[j] = v < (T)0 ? (T)0 : v;                                                   \
            }                                                                                   \
            for (j = 0; j < n; j++) out[j] = out[j] > (T)1 ? (T)1 : out[j];                     \
            break;                                                                              \
        default: /* linear */                                                                   \
            if (in != out) memcpy(out, in, (size_t)n * sizeof(T));                              \
        }                                                                                       \
    }                                                                                           \
    static inline void lstmeng_dact_##S(int kind, const T *y, T *out, int64_t n) {              \
        int64_t j;                                                                              \
        switch (kind) {                                                                         \
        case LSTMENG_TANH:                                                                      \
            for (j = 0; j < n; j++) out[j] = (T)1 - y[j] * y[j];                                \
            break;                                                                              \
        case LSTMENG_RELU:                                                                      \
            for (j = 0; j < n; j++) out[j] = y[j] > (T)0 ? (T)1 : (T)0;                         \
            break;                                                                              \
        case LSTMENG_SIGMOID:                                                                   \
            for (j = 0; j < n; j++) out[j] = y[j] * ((T)1 - y[j]);                              \
            break;                                                                              \
        case LSTMENG_HARD_SIGMOID: /* flat outside (0, 1), slope 1/6 inside */                 \
            for (j = 0; j < n; j++) out[j] = y[j] > (T)0 ? (T)1 / (T)6 : (T)0;                 \
            for (j = 0; j < n; j++) out[j] = y[j] < (T)1 ? out[j] : (T)0;                       \
            break;                                                                              \
        default: /* linear */                                                                   \
            for (j = 0; j < n; j++) out[j] = (T)1;                                              \
        }                                                                                       \
    }                                                                                           \
    LSTMENG_SIMD static void lstmeng_forward_row_generic_##S(T *gates, T *c, T *c_prev, T *h,   \
                                                             int64_t n, int64_t stride, int act, \
                                                             int ract) {                        \
        int64_t j;                                                                              \
        T *in_gate = gates, *forget_gate = gates + stride, *candidate = gates + 2 * stride;     \
        T *out_gate = gates + 3 * stride;                                                       \
        lstmeng_act_##S(ract, in_gate, in_gate, n);                                             \
        lstmeng_act_##S(ract, forget_gate, forget_gate, n);                                     \
        lstmeng_act_##S(act, candidate, candidate, n);                                          \
        lstmeng_act_##S(ract, out_gate, out_gate, n);                                           \
        if (c_prev != NULL) memcpy(c_prev, c, (size_t)n * sizeof(T));                           \
        for (j = 0; j < n; j++) c[j] = forget_gate[j] * c[j] + in_gate[j] * candidate[j];       \
        lstmeng_act_##S(act, c, h, n); /* act(c), then scaled in place */                      \
        for (j = 0; j < n; j++) h[j] = out_gate[j] * h[j];                                      \
    }                                                                                           \
    LSTMENG_SIMD static void lstmeng_backward_row_generic_##S(T *gates, const T *c_prev,        \
                                                              const T *dh, T *dc, T *scratch,   \
                                                              int64_t n, int64_t stride,        \
                                                              int act, int ract) {              \
        int64_t j;                                                                              \
        T *in_gate = gates, *forget_gate = gates + stride, *candidate = gates + 2 * stride;     \
        T *out_gate = gates + 3 * stride;                                                       \
        T *d_in = scratch, *d_forget = scratch + n, *d_candidate = scratch + 2 * n;             \
        T *d_out = scratch + 3 * n, *cell_act = scratch + 4 * n, *d_cell = scratch + 5 * n;     \
        /* c(t) exactly as the forward computed it, then act(c(t)) */                          \
        for (j = 0; j < n; j++) cell_act[j] = forget_gate[j] * c_prev[j] + in_gate[j] * candidate[j]; \
        lstmeng_act_##S(act, cell_act, cell_act, n);                                            \
        /* derivatives of each nonlinearity, from its output */                                \
        lstmeng_dact_##S(ract, in_gate, d_in, n);                                               \
        lstmeng_dact_##S(ract, forget_gate, d_forget, n);                                       \
        lstmeng_dact_##S(act, candidate, d_candidate, n);                                       \
        lstmeng_dact_##S(ract, out_gate, d_out, n);                                             \
        lstmeng_dact_##S(act, cell_act, d_cell, n);                                             \
        for (j = 0; j < n; j++) {                                                               \
            const T i = in_gate[j], f = forget_gate[j], g = candidate[j], o = out_gate[j];      \
            const T dc_total = dc[j] + dh[j] * o * d_cell[j];                                   \
            in_gate[j] = dc_total * g * d_in[j];                                                \
            forget_gate[j] = dc_total * c_prev[j] * d_forget[j];                                \
            candidate[j] = dc_total * i * d_candidate[j];                                       \
            out_gate[j] = dh[j] * cell_act[j] * d_out[j];                                       \
            dc[j] = dc_total * f;                                                               \
        }                                                                                       \
    }

LSTMENG_DEFINE_ROWS(float, f32, lstmeng_exp_f32)
LSTMENG_DEFINE_ROWS(double, f64, lstmeng_exp_f64)

/* Whether float32 rows with tanh / sigmoid take the fused kernels of
 * lstm_rows_fast.h (those of lstmeng_isa: AVX-512 or AVX2): set once at
 * import from what the CPU supports; tests switch it off to run the generic
 * code on the same CPU. */
static int lstmeng_fast_rows = 0;

static inline int lstmeng_use_fast_rows(int act, int ract) {
    return LSTMENG_HAVE_FAST_ROWS && lstmeng_fast_rows && lstmeng_isa != LSTMENG_ISA_SCALAR
           && act == LSTMENG_TANH && ract == LSTMENG_SIGMOID;
}

static inline void lstmeng_forward_row_f32(float *gates, float *c, float *c_prev, float *h,
                                           int64_t n, int64_t stride, int act, int ract) {
    int64_t done = 0;
#if LSTMENG_HAVE_FAST_ROWS
    if (lstmeng_use_fast_rows(act, ract)) {
#if LSTMENG_HAVE_AVX512
        if (lstmeng_isa == LSTMENG_ISA_AVX512)
            done = lstmeng_forward_row_avx512_f32(gates, c, c_prev, h, n, stride);
        else
#endif
            done = lstmeng_forward_row_fast_f32(gates, c, c_prev, h, n, stride);
    }
#endif
    if (done < n)
        lstmeng_forward_row_generic_f32(gates + done, c + done, c_prev == NULL ? NULL : c_prev + done,
                                        h + done, n - done, stride, act, ract);
}

static inline void lstmeng_backward_row_f32(float *gates, const float *c_prev, const float *dh,
                                            float *dc, float *scratch, int64_t n, int64_t stride,
                                            int act, int ract) {
    int64_t done = 0;
#if LSTMENG_HAVE_FAST_ROWS
    if (lstmeng_use_fast_rows(act, ract)) {
#if LSTMENG_HAVE_AVX512
        if (lstmeng_isa == LSTMENG_ISA_AVX512)
            done = lstmeng_backward_row_avx512_f32(gates, c_prev, dh, dc, n, stride);
        else
#endif
            done = lstmeng_backward_row_fast_f32(gates, c_prev, dh, dc, n, stride);
    }
#endif
    if (done < n)
        lstmeng_backward_row_generic_f32(gates + done, c_prev + done, dh + done, dc + done, scratch,
                                         n - done, stride, act, ract);
}

#define lstmeng_forward_row_f64 lstmeng_forward_row_generic_f64
#define lstmeng_backward_row_f64 lstmeng_backward_row_generic_f64

#endif
