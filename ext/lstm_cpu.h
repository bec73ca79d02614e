/*
 * Whether the AVX2+FMA kernels can be built and run: one answer for the
 * packed step product (lstm_gemm.h) and the fused gate rows (lstm_rows_fast.h).
 *
 * LSTMENG_HAVE_AVX2_FMA: 1 where the compiler can emit them (x86 with GCC or
 * Clang's target attribute; LSTMENG_NO_CLONES switches them off at build time).
 * lstmeng_avx2_fma_supported(): 1 when this CPU runs them, checked at run time,
 * so one wheel serves CPUs with and without AVX2.
 */
#ifndef LSTMENG_LSTM_CPU_H
#define LSTMENG_LSTM_CPU_H

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) \
    && !defined(LSTMENG_NO_CLONES)
#define LSTMENG_HAVE_AVX2_FMA 1
#include <immintrin.h>
#define LSTMENG_AVX2_FMA __attribute__((target("avx2,fma")))
#else
#define LSTMENG_HAVE_AVX2_FMA 0
#endif

static int lstmeng_avx2_fma_supported(void) {
#if LSTMENG_HAVE_AVX2_FMA
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

#endif
