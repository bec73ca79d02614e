/* Can part of a batch-1 step's weight stream stay in L1 across steps? (issue 17)

   A batch-1 unit-split step streams each core's 128 KB half of the recurrent
   kernel from L2 (docs/cython.md: the bound of batch-1 inference). L1D is
   48 KB, 12-way, 64 sets; the set of a line is address bits 6-11, i.e. its
   line within a 4 KB page. The idea tried here: give a resident part of the
   weights lines 0-47 of its pages only, and the streamed rest lines 48-63
   only, so that streaming never evicts the resident part (which LRU over a
   128 KB stream otherwise does every step), cutting the L2 traffic by the
   resident share.

   The kernel below is the shape of the recurrent product of one core's
   share: 4 column blocks of 64 floats (256 gate columns) x K = 128 rows of h,
   row-major panels, one broadcast h[k] and 4 FMAs of 16 lanes per row of a
   block, two chains per block. "contiguous": the panels as they are packed
   today; "partitioned, n of 4 blocks": n blocks (32 KB each) laid out for
   sets 0-47, the rest for sets 48-63.

   Build and run (one thread; any AVX-512 CPU):
       gcc -O3 -march=native -o /tmp/l1_sets benchmarks/l1_sets.c && /tmp/l1_sets

   Zen 5 guest, 2026-11-27 (ns per step, best of 7 x 20000 steps, three rounds):
       contiguous 688-704; partitioned 0 of 4: 686-718, 1 of 4: 850-863, 2 of 4: 997-1017.
   Slower, not faster: the resident blocks do not stay resident, or the page-strided
   stream (16 lines of every 4 KB page) defeats the L2 prefetchers; not pursued. */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define K 128
#define BLOCKS 4
#define LINE_FLOATS 16
#define PAGE_FLOATS 1024
#define RESIDENT_ROWS_PER_PAGE 12  /* a k-row of a block is 256 B = 4 lines: lines 0-47 */
#define STREAMED_ROWS_PER_PAGE 4   /* lines 48-63 */

static float *contiguous, *resident_pages, *streamed_pages;
static int resident_blocks;
static float h[K] __attribute__((aligned(64)));
static float y[BLOCKS * 64] __attribute__((aligned(64)));

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static inline const float *row_contiguous(int block, int k) {
    return contiguous + ((size_t)block * K + k) * 64;
}

static inline const float *row_partitioned(int block, int k) {
    if (block < resident_blocks) {
        size_t row = (size_t)block * K + k;
        return resident_pages + (row / RESIDENT_ROWS_PER_PAGE) * PAGE_FLOATS + (row % RESIDENT_ROWS_PER_PAGE) * 64;
    }
    size_t row = (size_t)(block - resident_blocks) * K + k;
    return streamed_pages + (row / STREAMED_ROWS_PER_PAGE) * PAGE_FLOATS + 48 * LINE_FLOATS
           + (row % STREAMED_ROWS_PER_PAGE) * 64;
}

/* One step: y[block] = h @ W[:, block] for every block, then h from y (a dependency, as in the recurrence). */
#define STEP(ROW)                                                                                         \
    for (int b = 0; b < BLOCKS; b++) {                                                                    \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                       \
        __m512 c0 = a0, c1 = a0, c2 = a0, c3 = a0;                                                        \
        for (int k = 0; k < K; k += 2) {                                                                  \
            const float *w = ROW(b, k), *v = ROW(b, k + 1);                                               \
            __m512 hk = _mm512_set1_ps(h[k]), hv = _mm512_set1_ps(h[k + 1]);                              \
            a0 = _mm512_fmadd_ps(hk, _mm512_load_ps(w), a0);                                              \
            a1 = _mm512_fmadd_ps(hk, _mm512_load_ps(w + 16), a1);                                         \
            a2 = _mm512_fmadd_ps(hk, _mm512_load_ps(w + 32), a2);                                         \
            a3 = _mm512_fmadd_ps(hk, _mm512_load_ps(w + 48), a3);                                         \
            c0 = _mm512_fmadd_ps(hv, _mm512_load_ps(v), c0);                                              \
            c1 = _mm512_fmadd_ps(hv, _mm512_load_ps(v + 16), c1);                                         \
            c2 = _mm512_fmadd_ps(hv, _mm512_load_ps(v + 32), c2);                                         \
            c3 = _mm512_fmadd_ps(hv, _mm512_load_ps(v + 48), c3);                                         \
        }                                                                                                 \
        _mm512_store_ps(y + b * 64, _mm512_add_ps(a0, c0));                                               \
        _mm512_store_ps(y + b * 64 + 16, _mm512_add_ps(a1, c1));                                          \
        _mm512_store_ps(y + b * 64 + 32, _mm512_add_ps(a2, c2));                                          \
        _mm512_store_ps(y + b * 64 + 48, _mm512_add_ps(a3, c3));                                          \
    }                                                                                                     \
    for (int k = 0; k < K; k++) h[k] = y[k] * 1e-3f;

#define BEST_NS_PER_STEP(ROW, result)                                                                     \
    do {                                                                                                  \
        double best = 1e9;                                                                                \
        for (int repeat = 0; repeat < 7; repeat++) {                                                      \
            double start = now();                                                                         \
            for (int s = 0; s < 20000; s++) { STEP(ROW) }                                                 \
            double t = (now() - start) / 20000;                                                           \
            if (t < best) best = t;                                                                       \
        }                                                                                                 \
        result = best * 1e9;                                                                              \
    } while (0)

int main(void) {
    contiguous = aligned_alloc(4096, BLOCKS * K * 64 * sizeof(float));
    resident_pages = aligned_alloc(4096, 64 * 4096);
    streamed_pages = aligned_alloc(4096, 200 * 4096);
    for (int i = 0; i < BLOCKS * K * 64; i++) contiguous[i] = (i % 7) * 1e-3f;
    memset(resident_pages, 0, 64 * 4096);
    memset(streamed_pages, 0, 200 * 4096);
    for (int k = 0; k < K; k++) h[k] = 1e-3f * k;
    for (int round = 0; round < 3; round++) {
        double ns;
        BEST_NS_PER_STEP(row_contiguous, ns);
        printf("contiguous (all from L2): %.1f ns/step\n", ns);
        for (resident_blocks = 0; resident_blocks <= 2; resident_blocks++) {
            BEST_NS_PER_STEP(row_partitioned, ns);
            printf("partitioned, %d of 4 blocks (32 KB each) in L1 sets 0-47: %.1f ns/step\n", resident_blocks, ns);
        }
    }
    printf("(checksum %g)\n", y[3]);
    return 0;
}
