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
 *  - AVX2+FMA: 6 x 16 and 4 x 16 blocks (12 / 8 ymm accumulators of 16).
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
        const __m256 p0 = _mm256_loadu_ps(panel + k * LSTMENG_PAIR);
        const __m256 p1 = _mm256_loadu_ps(panel + k * LSTMENG_PAIR + 8);
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

/* One row of A times a panel pair, k unrolled by two: 8 independent FMA chains
 * reading the pair's 128 bytes of each k in order. */
LSTMENG_AVX2_FMA static inline void lstmeng_row_f32(const float *a, const float *pair_data,
                                                      int64_t K, float *c) {
    __m256 e0 = _mm256_setzero_ps(), e1 = _mm256_setzero_ps(), e2 = _mm256_setzero_ps();
    __m256 e3 = _mm256_setzero_ps(), o0 = _mm256_setzero_ps(), o1 = _mm256_setzero_ps();
    __m256 o2 = _mm256_setzero_ps(), o3 = _mm256_setzero_ps();
    int64_t k;
    for (k = 0; k + 1 < K; k += 2) {
        const float *p = pair_data + k * LSTMENG_PAIR;
        const __m256 x = _mm256_broadcast_ss(a + k), y = _mm256_broadcast_ss(a + k + 1);
        e0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p), e0);
        e1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p + 8), e1);
        e2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p + 16), e2);
        e3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p + 24), e3);
        o0 = _mm256_fmadd_ps(y, _mm256_loadu_ps(p + 32), o0);
        o1 = _mm256_fmadd_ps(y, _mm256_loadu_ps(p + 40), o1);
        o2 = _mm256_fmadd_ps(y, _mm256_loadu_ps(p + 48), o2);
        o3 = _mm256_fmadd_ps(y, _mm256_loadu_ps(p + 56), o3);
    }
    if (k < K) {
        const float *p = pair_data + k * LSTMENG_PAIR;
        const __m256 x = _mm256_broadcast_ss(a + k);
        e0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p), e0);
        e1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p + 8), e1);
        e2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p + 16), e2);
        e3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p + 24), e3);
    }
    _mm256_storeu_ps(c, _mm256_add_ps(_mm256_loadu_ps(c), _mm256_add_ps(e0, o0)));
    _mm256_storeu_ps(c + 8, _mm256_add_ps(_mm256_loadu_ps(c + 8), _mm256_add_ps(e1, o1)));
    _mm256_storeu_ps(c + 16, _mm256_add_ps(_mm256_loadu_ps(c + 16), _mm256_add_ps(e2, o2)));
    _mm256_storeu_ps(c + 24, _mm256_add_ps(_mm256_loadu_ps(c + 24), _mm256_add_ps(e3, o3)));
}

/* C[rows, G] += A[rows, K] @ B, B packed by lstmeng_pack_panels_f32 (AVX2+FMA). */
LSTMENG_AVX2_FMA static void lstmeng_gemm_packed_avx2_f32(int64_t rows, int64_t G, int64_t K,
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
            const float *panel_data = packed + pair * K * LSTMENG_PANEL + (panel - pair) * LSTMENG_PANEL;
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
#endif

/* The batch-1 products in halves (lstmeng_row_halves_member_f32,
 * lstmeng_row_halves_whole_f32): c += a @ M for output units u0 .. u0 + width - 1 of
 * every output block (the forward: a = h(t - 1) [H], M = R, c = the gates [4H], 4
 * output blocks, 1 k block; the backward: a = dz(t) [4H], M = R^T, c = dh(t - 1)
 * [H], 1 output block, 4 k blocks). Each output column's sum is taken over the two
 * halves of every k block apart (k < k_split and k >= k_split), each half by the
 * single-row kernel's chains from zero: the column's own half first (the one that
 * holds its unit), then the other, c = (c + own) + other.
 *
 * Why halves: in a two-member unit split (each member's units one half), a member's
 * own half of a is ready once it has computed it, while the partner's half comes
 * over the barrier. Phase LSTMENG_HALVES_OWN adds own halves (before the barrier's
 * wait), LSTMENG_HALVES_OTHER the rest (after it). A whole share (one thread, or a
 * member of a team of three or more) takes a pair's two halves together. The same
 * sums in the same order for every column whoever runs them, so the results are
 * bitwise the same. u0, width and k_split are multiples of 32 (a panel pair's
 * columns share a half). */
#define LSTMENG_HALVES_OWN 1
#define LSTMENG_HALVES_OTHER 2

/* Whether the output columns of units unit .. unit + 31 take the half k < k_split
 * first (their own half: the one that holds their units), else k >= k_split. */
static inline int lstmeng_own_half_is_low(int64_t unit, int64_t k_split) { return unit < k_split; }

/* The rows of every k block that the output pair of unit `unit` takes in one half
 * (own: the one that holds its unit, else the other), starting at *k0. */
static inline int64_t lstmeng_half_rows(int64_t H, int64_t k_split, int64_t unit, int own, int64_t *k0) {
    const int low = lstmeng_own_half_is_low(unit, k_split) == own;
    *k0 = low ? 0 : k_split;
    return low ? k_split : H - k_split;
}

/* Pack one output pair's rows of one half, k block after k block; returns the end. */
static inline float *lstmeng_pack_half_f32(const float *m, int64_t H, int64_t k_split, int64_t unit, int out_block,
                                           int k_blocks, int own, int64_t ld_i, int64_t ld_j, float *packed) {
    int64_t k0;
    const int64_t rows = lstmeng_half_rows(H, k_split, unit, own, &k0);
    int k_block;
    for (k_block = 0; k_block < k_blocks; k_block++) {
        const float *block = m + (k_block * H + k0) * ld_i + (out_block * H + unit) * ld_j;
        if (ld_j == 1)
            lstmeng_pack_panels_f32(block, rows, LSTMENG_PAIR, ld_i, 0, packed);
        else
            lstmeng_pack_panels_f32(block, rows, LSTMENG_PAIR, ld_j, 1, packed);
        packed += rows * LSTMENG_PAIR;
    }
    return packed;
}

/* Pack a share's matrix for the products in halves: M [k_blocks * H, out_blocks * H]
 * with M[i, j] = m[i * ld_i + j * ld_j], output units u0 .. u0 + width - 1 of every
 * output block, as panel pairs (32 output columns), each pair's rows split into its
 * own half of every k block and its other half.
 *
 * paired = 0, for a member of a two-member split: first every pair's own rows
 * (output blocks in order, pairs in order, k blocks in order), then every pair's
 * other rows, so that each phase of the product reads one contiguous stream.
 * Measured: with a pair's two halves adjacent, each phase read 8 KB pieces 8 KB
 * apart and a member's forward product took 1.05-1.15 us a step instead of
 * 0.80-0.86 (most likely the hardware prefetcher losing the stream at every jump;
 * this guest has no counters to say).
 * paired = 1, for a whole share that turns (lstmeng_halves_order), which reads pair
 * by pair: each pair's own rows, then its other rows, pair after pair. */
static void lstmeng_pack_halves_f32(const float *m, int64_t H, int64_t k_split, int64_t u0, int64_t width,
                                    int out_blocks, int k_blocks, int64_t ld_i, int64_t ld_j, int paired,
                                    float *packed) {
    int own, out_block;
    int64_t pair;
    if (paired) {
        for (out_block = 0; out_block < out_blocks; out_block++)
            for (pair = 0; pair < width / LSTMENG_PAIR; pair++)
                for (own = 1; own >= 0; own--)
                    packed = lstmeng_pack_half_f32(m, H, k_split, u0 + pair * LSTMENG_PAIR, out_block, k_blocks,
                                                   own, ld_i, ld_j, packed);
        return;
    }
    for (own = 1; own >= 0; own--)
        for (out_block = 0; out_block < out_blocks; out_block++)
            for (pair = 0; pair < width / LSTMENG_PAIR; pair++)
                packed = lstmeng_pack_half_f32(m, H, k_split, u0 + pair * LSTMENG_PAIR, out_block, k_blocks, own,
                                               ld_i, ld_j, packed);
}

/* The order in which a share's products in halves take their output pairs ("pieces":
 * out_block * pairs + pair), step after step.
 *
 * Why: a batch-1 step is bound by streaming the share's packed weights from L2 into
 * L1 (a member of a two-member split: 128 KB of R at H = 128), and whatever a step
 * reads last is still in L1 when the next one starts, if the next one starts with
 * it. One fixed order starts every step with what the end of the last one evicted.
 * So each step starts some pieces earlier than the last one did, on the pieces the
 * last one read last:
 * - a whole share (paired layout, pair by pair): `own_turn` pairs back a step;
 * - a member of a two-member split (own halves first): before the barrier only the
 *   `early` own pieces the last step read last (in L1), after it every other piece
 *   (the last step's last `other_turn` of them first) and then the remaining own
 *   pieces, the next step's early ones. An other sum that comes before its own sum
 *   waits in a buffer, so each column is still (c + own) + other.
 * As many pieces as fit in L1 less LSTMENG_HALVES_L1_RESERVE (the step's gates,
 * states and outputs pass through L1 too); the member's early pieces first, at most
 * half of them (they must be among the last step's late ones).
 *
 * Measured (Zen 5, 48 KB L1; the previous build, this build in one
 * fixed order and this build turning, calls interleaved in rotating order, the median
 * of the per-round ratios): a two-member split at (1, 500, 64, 128) 1.00-1.07x
 * inference (four runs of 400 rounds against 2f5f3ce), 1.00-1.02x training; one
 * thread at (1, 500, 32, 64) 1.04-1.12x inference, 1.03-1.06x training, at (1, 200,
 * 32, 96) 1.04x. Two identical paths differed by up to 8 % in runs of 100 rounds,
 * so single ratios are rough. With the rows on their own cache lines (session 18's
 * next change), this build turning against itself in one order (halves_l1_size(0)):
 * split (1, 500, 64, 128) 1.07x inference, 1.05x training, two runs each. (A whole
 * share read pair by pair in one fixed order,
 * at H = 128 where it does not turn, was 0.99x of the two passes in the backward:
 * a share that does not turn keeps them.) In a C
 * microbenchmark of the product alone (one core): R of H = 64 on one thread 349 ns a
 * step in one order, 229 starting 48 KB back, 365 at 56 KB (more than L1 holds
 * evicts what it meant to reuse). The first version found each next piece with
 * divisions (three a pair) and gained nothing. */
#define LSTMENG_HALVES_L1_RESERVE 8192
/* A share turns only when what stays in L1 is at least 1 / LSTMENG_HALVES_MIN_RESIDENT_PARTS
 * of it: a member's turn also shortens its pass before the barrier (from all its own
 * pieces to the early ones), which then covers less of the partner's lateness, and
 * at (1, 200, 256, 256) (2 of 16 own pieces early, 6 % of the share resident) the
 * split ran 0.91-1.09x in three interleaved runs; a whole share at H = 128 (2 of 16
 * pairs) gained nothing measurable. */
#define LSTMENG_HALVES_MIN_RESIDENT_PARTS 4
#define LSTMENG_HALVES_MAX_PIECES 32

typedef struct {
    int64_t out_blocks, pairs, pieces;   /* output blocks; pairs per block; pairs of all blocks */
    int64_t early;           /* member: own pieces before the barrier (pieces: all); whole: unused */
    int64_t own_turn;        /* own (member) or whole (paired) pieces a step starts earlier */
    int64_t other_turn;      /* member: other pieces a step starts earlier */
    int64_t own_start;       /* this step's first own (or whole) piece */
    int64_t other_start;     /* this step's first other piece (member) */
} LstmengHalvesOrder;

/* The order of a share's products in halves at its first step: units u0 .. u0 +
 * width - 1 of every output block; member: a member of a two-member split (its
 * units in one half), else a whole share; l1_bytes: the core's L1 data cache (0:
 * one fixed order). */
static inline LstmengHalvesOrder lstmeng_halves_order(int64_t H, int64_t k_split, int64_t u0, int64_t width,
                                                      int out_blocks, int k_blocks, int member, int64_t l1_bytes) {
    LstmengHalvesOrder order;
    int64_t k0, own_bytes, other_bytes, turn, early, other_turn = 0;
    const int64_t budget = l1_bytes - LSTMENG_HALVES_L1_RESERVE;
    order.out_blocks = out_blocks;
    order.pairs = width / LSTMENG_PAIR;
    order.pieces = out_blocks * order.pairs;
    order.early = order.pieces;
    order.own_turn = order.other_turn = order.own_start = order.other_start = 0;
    own_bytes = (int64_t)k_blocks * lstmeng_half_rows(H, k_split, u0, 1, &k0) * LSTMENG_PAIR * (int64_t)sizeof(float);
    other_bytes = (int64_t)k_blocks * H * LSTMENG_PAIR * (int64_t)sizeof(float) - own_bytes;
    if (order.pieces < 2 || order.pieces > LSTMENG_HALVES_MAX_PIECES || budget <= 0
        || order.pieces * (own_bytes + other_bytes) <= budget)
        return order;   /* one order: nothing to gain, or no room */
    if (!member) {
        turn = budget / (own_bytes + other_bytes);   /* whole pairs (a whole share's are all alike) */
        if (turn >= order.pieces) turn = order.pieces - 1;
        if (turn * LSTMENG_HALVES_MIN_RESIDENT_PARTS >= order.pieces) order.own_turn = turn;
        return order;
    }
    if (own_bytes == 0 || budget < own_bytes) return order;
    early = budget / own_bytes;
    if (early > order.pieces / 2) early = order.pieces / 2;
    if (other_bytes > 0) other_turn = (budget - early * own_bytes) / other_bytes;
    if (other_turn >= order.pieces) other_turn = order.pieces - 1;
    if ((early * own_bytes + other_turn * other_bytes) * LSTMENG_HALVES_MIN_RESIDENT_PARTS
        < order.pieces * (own_bytes + other_bytes))
        return order;
    order.early = order.own_turn = early;
    order.other_turn = other_turn;
    return order;
}

/* The next step's order: each start `turn` pieces earlier, wrapping around. */
static inline void lstmeng_halves_order_next(LstmengHalvesOrder *order) {
    order->own_start -= order->own_turn;
    if (order->own_start < 0) order->own_start += order->pieces;
    order->other_start -= order->other_turn;
    if (order->other_start < 0) order->other_start += order->pieces;
}

/* A walk over a share's pieces from `first` on, wrapping around, with counters
 * instead of divisions. */
typedef struct {
    int64_t piece, out_block, pair;
} LstmengPairWalk;

static inline LstmengPairWalk lstmeng_pair_walk(int64_t first, int64_t pairs) {
    LstmengPairWalk walk = {first, 0, first};
    while (pairs > 0 && walk.pair >= pairs) {   /* at most out_blocks - 1 times */
        walk.pair -= pairs;
        walk.out_block++;
    }
    return walk;
}

static inline void lstmeng_pair_walk_next(LstmengPairWalk *walk, int64_t pairs, int64_t pieces) {
    walk->piece++;
    if (++walk->pair == pairs) {
        walk->pair = 0;
        walk->out_block++;
    }
    if (walk->piece == pieces) walk->piece = walk->out_block = walk->pair = 0;
}

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

/* Products with at most this many k (a cell step's weight gradients, K = its rows) go
 * through C a block of rows at a time (see lstmeng_gemm_avx512_f32). */
#define LSTMENG_AVX512_SMALL_K 8

/* C[rows, G] += A[rows, K] @ B, B packed by lstmeng_pack_panels_f32 (AVX-512), or
 * C = bias + A @ B when bias (G floats, the same for every row) is not NULL.
 * Panel pairs outside, rows inside, as in the AVX2 kernel: B streams once per
 * step and each pair (K x 32 floats) serves every row block from L1/L2. Taller
 * products (the input projection: a chunk of 1024 rows) go through the rows in
 * groups of LSTMENG_AVX512_ROW_GROUP, so a group's A stays in L2 while every
 * panel pair passes over it. With few k (LSTMENG_AVX512_SMALL_K) the groups are
 * one block of rows: there C is the traffic (rows x G written, B only K x G), and
 * pair by pair over all rows wrote it column strip by column strip, G floats
 * apart; a block of rows at a time writes it row after row. A cell step's weight
 * gradients at (I, H) = (256, 512) (K = 1, C 6 MB) took 360 us pair by pair, where
 * NumPy fills 6 MB in 97. Each element of C is the same sum either way. */
LSTMENG_AVX512 static inline __attribute__((always_inline)) void lstmeng_gemm_avx512_f32(
        int64_t rows, int64_t G, int64_t K, const float *a, const int64_t row_step,
        const int64_t k_step, const float *packed, float *c, int64_t ldc, const float *bias) {
    const int64_t group_rows = K <= LSTMENG_AVX512_SMALL_K ? LSTMENG_AVX512_BLOCK_ROWS : LSTMENG_AVX512_ROW_GROUP;
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

/* The sums of one output pair over `rows` rows of every k block from k0 on, its
 * panels packed k block after k block from `panels`: the single-row kernel's
 * chains from zero, summed. */
LSTMENG_AVX512 static inline __attribute__((always_inline)) void lstmeng_halves_piece_avx512_f32(
        int64_t H, int64_t k0, int64_t rows, int k_blocks, const float *a, const float *panels, __m512 *left,
        __m512 *right) {
    __m512 acc[8];
    int k_block, lane;
    for (lane = 0; lane < 8; lane++) acc[lane] = _mm512_setzero_ps();
    for (k_block = 0; k_block < k_blocks; k_block++) {
        lstmeng_row_chains_avx512_f32(a + k_block * H + k0, 1, panels, 0, rows, acc);
        panels += rows * LSTMENG_PAIR;
    }
    lstmeng_row_chains_sum_avx512_f32(acc, left, right);
}

/* out[0 .. 31] += (left, right). */
LSTMENG_AVX512 static inline __attribute__((always_inline)) void lstmeng_add_pair_avx512_f32(
        float *out, __m512 left, __m512 right) {
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), left));
    _mm512_storeu_ps(out + LSTMENG_PANEL, _mm512_add_ps(_mm512_loadu_ps(out + LSTMENG_PANEL), right));
}

/* One half's pass of a member in the fixed order (a member whose share fits in L1, or
 * an L1 too small to keep any of it): every pair's own half (own = 1) or other half
 * (own = 0), pairs in order, straight from the packed layout. */
LSTMENG_AVX512 static inline __attribute__((always_inline)) void lstmeng_halves_pass_avx512_f32(
        int64_t H, int64_t k_split, int64_t u0, int64_t width, int out_blocks, int k_blocks,
        const float *a, const float *panels, float *c, int own) {
    int out_block;
    int64_t pair, k0, rows;
    __m512 left, right;
    for (out_block = 0; out_block < out_blocks; out_block++) {
        for (pair = 0; pair < width / LSTMENG_PAIR; pair++) {
            const int64_t unit = u0 + pair * LSTMENG_PAIR;
            rows = lstmeng_half_rows(H, k_split, unit, own, &k0);
            if (rows == 0) continue;   /* k_split = 0 (H = 32): no other half */
            lstmeng_halves_piece_avx512_f32(H, k0, rows, k_blocks, a, panels, &left, &right);
            panels += k_blocks * rows * LSTMENG_PAIR;
            lstmeng_add_pair_avx512_f32(c + out_block * H + unit, left, right);
        }
    }
}

/* A member of a two-member split (the matrix packed with paired = 0), phase
 * LSTMENG_HALVES_OWN or LSTMENG_HALVES_OTHER, in the order `order`
 * (lstmeng_halves_order). */
LSTMENG_AVX512 static void lstmeng_row_halves_member_avx512_f32(
        int64_t H, int64_t k_split, int64_t u0, int k_blocks, const float *a, const float *packed, float *c,
        int phase, const LstmengHalvesOrder *order) {
    const int64_t pairs = order->pairs, pieces = order->pieces;
    int64_t own_k0, other_k0, i, after_own_start;
    const int64_t own_rows = lstmeng_half_rows(H, k_split, u0, 1, &own_k0);
    const int64_t other_rows = lstmeng_half_rows(H, k_split, u0, 0, &other_k0);
    const int64_t own_stride = k_blocks * own_rows * LSTMENG_PAIR, other_stride = k_blocks * other_rows * LSTMENG_PAIR;
    const float *other_panels = packed + pieces * own_stride;
    float other_sums[LSTMENG_HALVES_MAX_PIECES * LSTMENG_PAIR];
    LstmengPairWalk walk;
    __m512 left, right, own_left, own_right;
    float *out;
    if (order->early == pieces) {   /* the fixed order */
        lstmeng_halves_pass_avx512_f32(H, k_split, u0, pairs * LSTMENG_PAIR, (int)order->out_blocks, k_blocks, a,
                                       phase == LSTMENG_HALVES_OWN ? packed : other_panels, c,
                                       phase == LSTMENG_HALVES_OWN);
        return;
    }
    if (phase == LSTMENG_HALVES_OWN) {
        if (own_rows == 0) return;   /* k_split = 0 (H = 32): no own half */
        for (walk = lstmeng_pair_walk(order->own_start, pairs), i = 0; i < order->early;
             i++, lstmeng_pair_walk_next(&walk, pairs, pieces)) {
            lstmeng_halves_piece_avx512_f32(H, own_k0, own_rows, k_blocks, a, packed + walk.piece * own_stride,
                                            &left, &right);
            lstmeng_add_pair_avx512_f32(c + walk.out_block * H + u0 + walk.pair * LSTMENG_PAIR, left, right);
        }
        return;
    }
    if (other_rows > 0) {
        for (walk = lstmeng_pair_walk(order->other_start, pairs), i = 0; i < pieces;
             i++, lstmeng_pair_walk_next(&walk, pairs, pieces)) {
            lstmeng_halves_piece_avx512_f32(H, other_k0, other_rows, k_blocks, a,
                                            other_panels + walk.piece * other_stride, &left, &right);
            after_own_start = walk.piece - order->own_start;
            if (after_own_start < 0) after_own_start += pieces;
            if (after_own_start < order->early) {   /* its own sum is in c already */
                lstmeng_add_pair_avx512_f32(c + walk.out_block * H + u0 + walk.pair * LSTMENG_PAIR, left, right);
            } else {
                _mm512_storeu_ps(other_sums + walk.piece * LSTMENG_PAIR, left);
                _mm512_storeu_ps(other_sums + walk.piece * LSTMENG_PAIR + LSTMENG_PANEL, right);
            }
        }
    }
    /* The own pieces not taken before the barrier, last: the next step's early ones. */
    i = order->own_start + order->early;
    for (walk = lstmeng_pair_walk(i >= pieces ? i - pieces : i, pairs), i = order->early; i < pieces;
         i++, lstmeng_pair_walk_next(&walk, pairs, pieces)) {
        out = c + walk.out_block * H + u0 + walk.pair * LSTMENG_PAIR;
        left = _mm512_loadu_ps(out);
        right = _mm512_loadu_ps(out + LSTMENG_PANEL);
        if (own_rows > 0) {
            lstmeng_halves_piece_avx512_f32(H, own_k0, own_rows, k_blocks, a, packed + walk.piece * own_stride,
                                            &own_left, &own_right);
            left = _mm512_add_ps(left, own_left);
            right = _mm512_add_ps(right, own_right);
        }
        if (other_rows > 0) {
            left = _mm512_add_ps(left, _mm512_loadu_ps(other_sums + walk.piece * LSTMENG_PAIR));
            right = _mm512_add_ps(right, _mm512_loadu_ps(other_sums + walk.piece * LSTMENG_PAIR + LSTMENG_PANEL));
        }
        _mm512_storeu_ps(out, left);
        _mm512_storeu_ps(out + LSTMENG_PANEL, right);
    }
}

/* A whole share: turning (the matrix packed with paired = 1), pair by pair from
 * order->own_start on, each pair's own half's sum and then its other half's; in one
 * fixed order (paired = 0), the two halves' passes. */
LSTMENG_AVX512 static void lstmeng_row_halves_whole_avx512_f32(
        int64_t H, int64_t k_split, int64_t u0, int k_blocks, const float *a, const float *packed, float *c,
        const LstmengHalvesOrder *order) {
    const int64_t pairs = order->pairs, pieces = order->pieces;
    LstmengPairWalk walk;
    int64_t i, k0, rows, own_rows = 0;
    int own;
    if (order->own_turn == 0) {
        /* One fixed order (packed with paired = 0): every own half, then every other half.
         * Pair by pair from the paired layout measured 0.99x of this for the backward
         * at H = 128 on one thread. */
        for (i = 0; i < pairs; i++) own_rows += lstmeng_half_rows(H, k_split, u0 + i * LSTMENG_PAIR, 1, &k0);
        lstmeng_halves_pass_avx512_f32(H, k_split, u0, pairs * LSTMENG_PAIR, (int)order->out_blocks, k_blocks, a,
                                       packed, c, 1);
        lstmeng_halves_pass_avx512_f32(H, k_split, u0, pairs * LSTMENG_PAIR, (int)order->out_blocks, k_blocks, a,
                                       packed + order->out_blocks * k_blocks * own_rows * LSTMENG_PAIR, c, 0);
        return;
    }
    for (walk = lstmeng_pair_walk(order->own_start, pairs), i = 0; i < pieces;
         i++, lstmeng_pair_walk_next(&walk, pairs, pieces)) {
        const int64_t unit = u0 + walk.pair * LSTMENG_PAIR;
        const float *panels = packed + walk.piece * k_blocks * H * LSTMENG_PAIR;
        float *out = c + walk.out_block * H + unit;
        __m512 left = _mm512_loadu_ps(out), right = _mm512_loadu_ps(out + LSTMENG_PANEL), sum_left, sum_right;
        for (own = 1; own >= 0; own--) {
            rows = lstmeng_half_rows(H, k_split, unit, own, &k0);
            if (rows == 0) continue;   /* k_split = 0 (H = 32): no other half */
            lstmeng_halves_piece_avx512_f32(H, k0, rows, k_blocks, a, panels, &sum_left, &sum_right);
            panels += k_blocks * rows * LSTMENG_PAIR;
            left = _mm512_add_ps(left, sum_left);
            right = _mm512_add_ps(right, sum_right);
        }
        _mm512_storeu_ps(out, left);
        _mm512_storeu_ps(out + LSTMENG_PANEL, right);
    }
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
    lstmeng_gemm_packed_avx2_f32(rows, G, K, a, lda, packed, c, ldc);
#else
    (void)rows; (void)G; (void)K; (void)a; (void)lda; (void)packed; (void)c; (void)ldc;
#endif
}

/* C[rows, G] = bias (every row) + A[rows, K] @ B: AVX-512 only (the caller checks
 * lstmeng_isa, and for the other kernels fills C with bias rows and accumulates). */
static void lstmeng_gemm_packed_bias_f32(int64_t rows, int64_t G, int64_t K, const float *a,
                                         int64_t lda, const float *packed, const float *bias,
                                         float *c, int64_t ldc) {
#if LSTMENG_HAVE_AVX512
    lstmeng_gemm_packed_bias_avx512_f32(rows, G, K, a, lda, packed, bias, c, ldc);
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

/* A member of a two-member split's product in halves (its matrix packed with paired =
 * 0), phase LSTMENG_HALVES_OWN (before the step's barrier) or LSTMENG_HALVES_OTHER
 * (after it), in the step's order. AVX-512 only (the caller checks lstmeng_isa). */
static void lstmeng_row_halves_member_f32(int64_t H, int64_t k_split, int64_t u0, int k_blocks, const float *a,
                                          const float *packed, float *c, int phase,
                                          const LstmengHalvesOrder *order) {
#if LSTMENG_HAVE_AVX512
    lstmeng_row_halves_member_avx512_f32(H, k_split, u0, k_blocks, a, packed, c, phase, order);
#else
    (void)H; (void)k_split; (void)u0; (void)k_blocks; (void)a; (void)packed; (void)c; (void)phase; (void)order;
#endif
}

/* A whole share's product in halves (one thread, or a member of a team of three or
 * more; its matrix packed with paired = 1), in the step's order. AVX-512 only (the
 * caller checks lstmeng_isa). */
static void lstmeng_row_halves_whole_f32(int64_t H, int64_t k_split, int64_t u0, int k_blocks, const float *a,
                                         const float *packed, float *c, const LstmengHalvesOrder *order) {
#if LSTMENG_HAVE_AVX512
    lstmeng_row_halves_whole_avx512_f32(H, k_split, u0, k_blocks, a, packed, c, order);
#else
    (void)H; (void)k_split; (void)u0; (void)k_blocks; (void)a; (void)packed; (void)c; (void)order;
#endif
}

#endif
