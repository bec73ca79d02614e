/*
 * ext/lstm_gemv.h against OpenBLAS's SGEMV (one call per row) and SGEMM (one call for
 * all rows), one thread, on the same arrays: first a correctness check of every
 * kernel family, layout, row count (1-8: one block of rows and more), accumulate
 * flag and some odd sizes against a double-precision sum (and of each row against
 * the same row computed alone, bitwise), then the best of many timings at a cell
 * step's sizes and at a 16 MiB matrix, for 1 to 32 rows: the crossover with SGEMM
 * is what LSTMENG_GEMV_MAX_ROWS is set from. Exits non-zero on a failure.
 *
 * Build and run (the OpenBLAS SciPy ships, whose symbols carry a scipy_ prefix):
 *   SO=$(python -c "import glob, os, scipy; print(glob.glob(os.path.dirname(scipy.__file__) + '.libs/libscipy_openblas-*.so')[0])")
 *   gcc -O3 -I ext -o /tmp/gemv_rows benchmarks/gemv_rows.c $SO -Wl,-rpath,$(dirname $SO) -lm && /tmp/gemv_rows
 *
 * Columns: "T" is PyTorch's layout (B^T stored [n, k]: the dot-form kernels), "N"
 * lstmeng's ([k, n]: the column-form kernels); ns per call of m rows.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "lstm_gemv.h"

extern void scipy_sgemv_(const char *, const int *, const int *, const float *, const float *, const int *,
                         const float *, const int *, const float *, float *, const int *);
extern void scipy_sgemm_(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *,
                         const int *);
extern void scipy_openblas_set_num_threads(int);

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static float uniform(void) { return (rand() % 2001 - 1000) / 1000.0f; }

static int check(void) {
    static const int sizes[][2] = {{1, 1}, {3, 5}, {17, 19}, {33, 64}, {130, 7}, {512, 64}, {100, 129},
                                   {4, 16}, {5, 15}, {1030, 21}};
    int failures = 0, isa, s, transposed, accumulate, m, j, kk, row;
    for (isa = LSTMENG_ISA_SCALAR; isa <= lstmeng_best_isa(); isa++)
        for (s = 0; s < 10; s++)
            for (transposed = 0; transposed < 2; transposed++)
                for (accumulate = 0; accumulate < 2; accumulate++)
                    for (m = 1; m <= 8; m++) {
                        const int n = sizes[s][0], k = sizes[s][1];
                        const int ldb = (transposed ? k : n) + 3, lda = k + 2, ldy = n + 5;
                        float *b = malloc(sizeof(float) * ldb * (transposed ? n : k));
                        float *a = malloc(sizeof(float) * lda * m), *alone = malloc(sizeof(float) * n);
                        float *y = malloc(sizeof(float) * (ldy * m + 16));
                        double *want = malloc(sizeof(double) * (ldy * m + 16));
                        for (j = 0; j < ldb * (transposed ? n : k); j++) b[j] = uniform();
                        for (j = 0; j < lda * m; j++) a[j] = uniform();
                        for (j = 0; j < ldy * m + 16; j++) want[j] = y[j] = uniform();
                        for (row = 0; row < m; row++)
                            for (j = 0; j < n; j++) {
                                double sum = 0;
                                for (kk = 0; kk < k; kk++)
                                    sum += (double)a[row * lda + kk] * (transposed ? b[j * ldb + kk] : b[kk * ldb + j]);
                                want[row * ldy + j] = accumulate ? sum + want[row * ldy + j] : sum;
                            }
                        for (j = 0; j < n; j++) alone[j] = y[(m - 1) * ldy + j];
                        lstmeng_isa = isa;
                        lstmeng_gemv_f32(m, transposed, n, k, a, lda, b, ldb, accumulate, y, ldy);
                        lstmeng_gemv_f32(1, transposed, n, k, a + (m - 1) * lda, lda, b, ldb, accumulate, alone, n);
                        for (j = 0; j < ldy * m + 16; j++)
                            if (fabs(y[j] - want[j]) > 1e-4 * (1 + k)) {
                                printf("FAIL isa %d m %d n %d k %d transposed %d accumulate %d at %d: %g, want %g\n",
                                       isa, m, n, k, transposed, accumulate, j, y[j], want[j]);
                                failures++;
                                break;
                            }
                        for (j = 0; j < n; j++)
                            if (alone[j] != y[(m - 1) * ldy + j]) {
                                printf("FAIL isa %d m %d n %d k %d: row %d differs from the row alone\n", isa, m, n,
                                       k, m - 1);
                                failures++;
                                break;
                            }
                        free(b); free(a); free(alone); free(y); free(want);
                    }
    printf("check: %d failures\n", failures);
    return failures;
}

int main(void) {
    static const int shapes[][2] = {{64, 512}, {128, 512}, {256, 1024}, {512, 2048}, {1024, 4096}};
    static const int row_counts[] = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32};
    const float one = 1, zero = 0;
    const int inc = 1;
    int s, c, m, r, it, isa;
    scipy_openblas_set_num_threads(1);
    if (check()) return 1;
    printf("ns per call of m rows; T: B^T stored [n, k] (PyTorch's layout), N: B stored [k, n] (lstmeng's)\n");
    for (s = 0; s < 5; s++)
        for (c = 0; c < 10; c++) {
            int k = shapes[s][0], n = shapes[s][1];
            float *w, *x, *y;
            double best[8] = {1e18, 1e18, 1e18, 1e18, 1e18, 1e18, 1e18, 1e18}, t;
            m = row_counts[c];
            w = malloc(sizeof(float) * n * k); x = malloc(sizeof(float) * k * m); y = malloc(sizeof(float) * n * m);
            for (r = 0; r < n * k; r++) w[r] = uniform();
            for (r = 0; r < k * m; r++) x[r] = uniform();
            for (it = 0; it < (n * k > 1000000 ? 60 : 1500); it++) {
                t = now_ns();
                for (r = 0; r < m; r++) scipy_sgemv_("T", &k, &n, &one, w, &k, x + r * k, &inc, &zero, y + r * n, &inc);
                t = now_ns() - t; if (t < best[0]) best[0] = t;
                t = now_ns();
                for (r = 0; r < m; r++) scipy_sgemv_("N", &n, &k, &one, w, &n, x + r * k, &inc, &zero, y + r * n, &inc);
                t = now_ns() - t; if (t < best[1]) best[1] = t;
                /* Row-major Y = X W^T (W [n, k]) and Y = X W (W [k, n]), as column-major Y^T. */
                t = now_ns(); scipy_sgemm_("T", "N", &n, &m, &k, &one, w, &k, x, &k, &zero, y, &n); t = now_ns() - t;
                if (t < best[2]) best[2] = t;
                t = now_ns(); scipy_sgemm_("N", "N", &n, &m, &k, &one, w, &n, x, &k, &zero, y, &n); t = now_ns() - t;
                if (t < best[3]) best[3] = t;
                for (isa = LSTMENG_ISA_AVX2; isa <= lstmeng_best_isa(); isa++) {
                    lstmeng_isa = isa;
                    t = now_ns(); lstmeng_gemv_f32(m, 1, n, k, x, k, w, k, 0, y, n); t = now_ns() - t;
                    if (t < best[2 + 2 * isa]) best[2 + 2 * isa] = t;
                    t = now_ns(); lstmeng_gemv_f32(m, 0, n, k, x, k, w, n, 0, y, n); t = now_ns() - t;
                    if (t < best[3 + 2 * isa]) best[3 + 2 * isa] = t;
                }
            }
            printf("m=%2d k=%4d n=%4d | SGEMV T %8.0f N %8.0f | SGEMM T %8.0f N %8.0f | AVX2 T %8.0f N %8.0f"
                   " | AVX-512 T %8.0f N %8.0f\n", m, k, n, best[0], best[1], best[2], best[3], best[4], best[5],
                   best[6], best[7]);
            free(w); free(x); free(y);
        }
    return 0;
}
