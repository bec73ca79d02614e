/*
 * Which hand-written SIMD kernels can be built and run: one answer for the
 * packed step product (lstm_gemm.h) and the fused gate rows (lstm_rows_fast.h).
 *
 * Two instruction sets, each compiled into the same binary with GCC/Clang's
 * target attribute (the rest of the build stays baseline x86-64, so one wheel
 * runs everywhere) and chosen once at import from what the CPU reports:
 *   AVX2 + FMA:   8-lane kernels, 16 ymm registers (Haswell, Zen 1-3);
 *   AVX-512 F/BW/DQ/VL + FMA: 16-lane kernels, 32 zmm registers, masked
 *                 tails (Skylake-SP and later Xeons, Zen 4/5).
 *
 * LSTMENG_HAVE_AVX2_FMA / LSTMENG_HAVE_AVX512: 1 where the compiler can emit
 * them (x86 with GCC or Clang; LSTMENG_NO_CLONES switches both off at build time).
 * lstmeng_avx2_fma_supported(), lstmeng_avx512_supported(): 1 when this CPU
 * runs them (the OS saving zmm state is part of __builtin_cpu_supports).
 *
 * lstmeng_isa: the kernels in use, one of LSTMENG_ISA_*; set at import to the
 * best the CPU runs (lstmeng_best_isa()) and lowered by tests
 * (_cython_lstm.select_kernels, from lstmeng.testing.kernel_overrides) to
 * run every path on one machine. Read once per
 * call of a kernel (a step's product, a row), never inside its loops.
 */
#ifndef LSTMENG_LSTM_CPU_H
#define LSTMENG_LSTM_CPU_H

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) \
    && !defined(LSTMENG_NO_CLONES)
#define LSTMENG_HAVE_AVX2_FMA 1
#define LSTMENG_HAVE_AVX512 1
#include <immintrin.h>
#define LSTMENG_AVX2_FMA __attribute__((target("avx2,fma")))
#define LSTMENG_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#else
#define LSTMENG_HAVE_AVX2_FMA 0
#define LSTMENG_HAVE_AVX512 0
#endif

#include <stdint.h>
#include <unistd.h>

/* Kernel families, in increasing order of preference. SCALAR: no hand-written
 * SIMD (BLAS for the step product, the compiler-vectorised generic rows). */
enum { LSTMENG_ISA_SCALAR = 0, LSTMENG_ISA_AVX2 = 1, LSTMENG_ISA_AVX512 = 2 };

static int lstmeng_avx2_fma_supported(void) {
#if LSTMENG_HAVE_AVX2_FMA
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

static int lstmeng_avx512_supported(void) {
#if LSTMENG_HAVE_AVX512
    __builtin_cpu_init();
    return lstmeng_avx2_fma_supported() && __builtin_cpu_supports("avx512f")
           && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")
           && __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

static int lstmeng_best_isa(void) {
    if (lstmeng_avx512_supported()) return LSTMENG_ISA_AVX512;
    if (lstmeng_avx2_fma_supported()) return LSTMENG_ISA_AVX2;
    return LSTMENG_ISA_SCALAR;
}

static int lstmeng_isa = LSTMENG_ISA_SCALAR;

/* Bytes of one core's L1 data cache, as the C library reports it (sysconf); 32 KB,
 * the smallest of the cores these kernels target, where it reports nothing. The
 * batch-1 products in halves keep that much of the weights in L1 across steps
 * (lstm_halves.h, lstmeng_halves_order). */
static int64_t lstmeng_l1d_bytes(void) {
    long reported = -1;
#ifdef _SC_LEVEL1_DCACHE_SIZE
    reported = sysconf(_SC_LEVEL1_DCACHE_SIZE);
#endif
    return reported >= 16384 && reported <= (1L << 20) ? (int64_t)reported : 32768;
}

/* Asks the caches for the 64-byte lines of [p, p + bytes) ahead of their use: for
 * writing (an output row about to be stored) when for_write, else for reading. For
 * rows visited in an order the hardware prefetcher cannot follow (the variable-length
 * layout's rows are sorted by length, so their caller rows come in no stride). */
static inline void lstmeng_prefetch_row(const void *p, int64_t bytes, int for_write) {
    const char *line = (const char *)p, *end = (const char *)p + bytes;
    for (; line < end; line += 64) {
        if (for_write) __builtin_prefetch(line, 1, 3);
        else __builtin_prefetch(line, 0, 3);
    }
}

#endif
