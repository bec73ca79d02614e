/*
 * The batch-1 products in halves (lstmeng_row_halves_member_f32,
 * lstmeng_row_halves_whole_f32), float32: c += a @ M for output units u0 .. u0 + width - 1 of
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
 * columns share a half).
 *
 * One order logic for both kernel families: the walks over a share's pieces below
 * take a piece kernel (lstmeng_halves_piece_avx512_f32 or _avx2_f32: the single-row
 * chains of lstm_gemm.h over one piece, the pair's 32 column sums out) and each family
 * instantiates them under its target, where the piece kernel inlines through the
 * constant function pointer (gcc 12 -O3: no piece function is left in the built
 * extension, so a step makes no call per piece). The order a
 * step's sums are added in is the walks', so it is the same for both families; the
 * piece sums themselves differ between them (16- and 8-lane chains).
 */
#ifndef LSTMENG_LSTM_HALVES_H
#define LSTMENG_LSTM_HALVES_H

#include <stdint.h>

#include "lstm_cpu.h"
#include "lstm_gemm.h"

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


/* A piece kernel: the sums of one output pair over `rows` rows of every k block from
 * k0 on (a [k_blocks * H]), its panels packed k block after k block from `panels`,
 * into sums[0 .. 31]: the single-row kernel's chains from zero, summed. */
typedef void (*LstmengHalvesPiece)(int64_t H, int64_t k0, int64_t rows, int k_blocks, const float *a,
                                   const float *panels, float *sums);

/* out[0 .. 31] += sums[0 .. 31]. */
static inline __attribute__((always_inline)) void lstmeng_add_pair_f32(float *out, const float *sums) {
    int column;
    for (column = 0; column < LSTMENG_PAIR; column++) out[column] += sums[column];
}

/* One half's pass of a share in the fixed order (a member whose share fits in L1, an
 * L1 too small to keep any of it, or a whole share that does not turn): every pair's
 * own half (own = 1) or other half (own = 0), pairs in order, straight from the
 * packed layout (paired = 0). */
static inline __attribute__((always_inline)) void lstmeng_halves_pass_f32(
        int64_t H, int64_t k_split, int64_t u0, int64_t width, int out_blocks, int k_blocks,
        const float *a, const float *panels, float *c, int own, LstmengHalvesPiece piece) {
    int out_block;
    int64_t pair, k0, rows;
    float sums[LSTMENG_PAIR];
    for (out_block = 0; out_block < out_blocks; out_block++) {
        for (pair = 0; pair < width / LSTMENG_PAIR; pair++) {
            const int64_t unit = u0 + pair * LSTMENG_PAIR;
            rows = lstmeng_half_rows(H, k_split, unit, own, &k0);
            if (rows == 0) continue;   /* k_split = 0 (H = 32): no other half */
            piece(H, k0, rows, k_blocks, a, panels, sums);
            panels += k_blocks * rows * LSTMENG_PAIR;
            lstmeng_add_pair_f32(c + out_block * H + unit, sums);
        }
    }
}

/* A member of a two-member split (the matrix packed with paired = 0), phase
 * LSTMENG_HALVES_OWN or LSTMENG_HALVES_OTHER, in the order `order`
 * (lstmeng_halves_order). */
static inline __attribute__((always_inline)) void lstmeng_row_halves_member_walk_f32(
        int64_t H, int64_t k_split, int64_t u0, int k_blocks, const float *a, const float *packed, float *c,
        int phase, const LstmengHalvesOrder *order, LstmengHalvesPiece piece) {
    const int64_t pairs = order->pairs, pieces = order->pieces;
    int64_t own_k0, other_k0, i, after_own_start;
    const int64_t own_rows = lstmeng_half_rows(H, k_split, u0, 1, &own_k0);
    const int64_t other_rows = lstmeng_half_rows(H, k_split, u0, 0, &other_k0);
    const int64_t own_stride = k_blocks * own_rows * LSTMENG_PAIR, other_stride = k_blocks * other_rows * LSTMENG_PAIR;
    const float *other_panels = packed + pieces * own_stride;
    float other_sums[LSTMENG_HALVES_MAX_PIECES * LSTMENG_PAIR], sums[LSTMENG_PAIR];
    LstmengPairWalk walk;
    float *out;
    int column;
    if (order->early == pieces) {   /* the fixed order */
        lstmeng_halves_pass_f32(H, k_split, u0, pairs * LSTMENG_PAIR, (int)order->out_blocks, k_blocks, a,
                                phase == LSTMENG_HALVES_OWN ? packed : other_panels, c,
                                phase == LSTMENG_HALVES_OWN, piece);
        return;
    }
    if (phase == LSTMENG_HALVES_OWN) {
        if (own_rows == 0) return;   /* k_split = 0 (H = 32): no own half */
        for (walk = lstmeng_pair_walk(order->own_start, pairs), i = 0; i < order->early;
             i++, lstmeng_pair_walk_next(&walk, pairs, pieces)) {
            piece(H, own_k0, own_rows, k_blocks, a, packed + walk.piece * own_stride, sums);
            lstmeng_add_pair_f32(c + walk.out_block * H + u0 + walk.pair * LSTMENG_PAIR, sums);
        }
        return;
    }
    if (other_rows > 0) {
        for (walk = lstmeng_pair_walk(order->other_start, pairs), i = 0; i < pieces;
             i++, lstmeng_pair_walk_next(&walk, pairs, pieces)) {
            after_own_start = walk.piece - order->own_start;
            if (after_own_start < 0) after_own_start += pieces;
            if (after_own_start < order->early) {   /* its own sum is in c already */
                piece(H, other_k0, other_rows, k_blocks, a, other_panels + walk.piece * other_stride, sums);
                lstmeng_add_pair_f32(c + walk.out_block * H + u0 + walk.pair * LSTMENG_PAIR, sums);
            } else {   /* its own sum comes last: the other sum waits */
                piece(H, other_k0, other_rows, k_blocks, a, other_panels + walk.piece * other_stride,
                      other_sums + walk.piece * LSTMENG_PAIR);
            }
        }
    }
    /* The own pieces not taken before the barrier, last: the next step's early ones,
     * each column (c + own) + other. */
    i = order->own_start + order->early;
    for (walk = lstmeng_pair_walk(i >= pieces ? i - pieces : i, pairs), i = order->early; i < pieces;
         i++, lstmeng_pair_walk_next(&walk, pairs, pieces)) {
        out = c + walk.out_block * H + u0 + walk.pair * LSTMENG_PAIR;
        if (own_rows > 0) {
            piece(H, own_k0, own_rows, k_blocks, a, packed + walk.piece * own_stride, sums);
            for (column = 0; column < LSTMENG_PAIR; column++) sums[column] += out[column];
        } else {
            for (column = 0; column < LSTMENG_PAIR; column++) sums[column] = out[column];
        }
        if (other_rows > 0)
            for (column = 0; column < LSTMENG_PAIR; column++)
                sums[column] += other_sums[walk.piece * LSTMENG_PAIR + column];
        for (column = 0; column < LSTMENG_PAIR; column++) out[column] = sums[column];
    }
}

/* A whole share: turning (the matrix packed with paired = 1), pair by pair from
 * order->own_start on, each pair's own half's sum and then its other half's; in one
 * fixed order (paired = 0), the two halves' passes. */
static inline __attribute__((always_inline)) void lstmeng_row_halves_whole_walk_f32(
        int64_t H, int64_t k_split, int64_t u0, int k_blocks, const float *a, const float *packed, float *c,
        const LstmengHalvesOrder *order, LstmengHalvesPiece piece) {
    const int64_t pairs = order->pairs, pieces = order->pieces;
    LstmengPairWalk walk;
    int64_t i, k0, rows, own_rows = 0;
    int own;
    float sums[LSTMENG_PAIR];
    if (order->own_turn == 0) {
        /* One fixed order (packed with paired = 0): every own half, then every other half.
         * Pair by pair from the paired layout measured 0.99x of this for the backward
         * at H = 128 on one thread. */
        for (i = 0; i < pairs; i++) own_rows += lstmeng_half_rows(H, k_split, u0 + i * LSTMENG_PAIR, 1, &k0);
        lstmeng_halves_pass_f32(H, k_split, u0, pairs * LSTMENG_PAIR, (int)order->out_blocks, k_blocks, a,
                                packed, c, 1, piece);
        lstmeng_halves_pass_f32(H, k_split, u0, pairs * LSTMENG_PAIR, (int)order->out_blocks, k_blocks, a,
                                packed + order->out_blocks * k_blocks * own_rows * LSTMENG_PAIR, c, 0, piece);
        return;
    }
    for (walk = lstmeng_pair_walk(order->own_start, pairs), i = 0; i < pieces;
         i++, lstmeng_pair_walk_next(&walk, pairs, pieces)) {
        const int64_t unit = u0 + walk.pair * LSTMENG_PAIR;
        const float *panels = packed + walk.piece * k_blocks * H * LSTMENG_PAIR;
        for (own = 1; own >= 0; own--) {
            rows = lstmeng_half_rows(H, k_split, unit, own, &k0);
            if (rows == 0) continue;   /* k_split = 0 (H = 32): no other half */
            piece(H, k0, rows, k_blocks, a, panels, sums);
            panels += k_blocks * rows * LSTMENG_PAIR;
            lstmeng_add_pair_f32(c + walk.out_block * H + unit, sums);
        }
    }
}

#if LSTMENG_HAVE_AVX512
/* The AVX-512 piece kernel: lstm_gemm.h's 8 zmm chains, k unrolled by four. */
LSTMENG_AVX512 static inline __attribute__((always_inline)) void lstmeng_halves_piece_avx512_f32(
        int64_t H, int64_t k0, int64_t rows, int k_blocks, const float *a, const float *panels, float *sums) {
    __m512 acc[8], left, right;
    int k_block, lane;
    for (lane = 0; lane < 8; lane++) acc[lane] = _mm512_setzero_ps();
    for (k_block = 0; k_block < k_blocks; k_block++) {
        lstmeng_row_chains_avx512_f32(a + k_block * H + k0, 1, panels, 0, rows, acc);
        panels += rows * LSTMENG_PAIR;
    }
    lstmeng_row_chains_sum_avx512_f32(acc, &left, &right);
    _mm512_storeu_ps(sums, left);
    _mm512_storeu_ps(sums + LSTMENG_PANEL, right);
}

LSTMENG_AVX512 static void lstmeng_row_halves_member_avx512_f32(
        int64_t H, int64_t k_split, int64_t u0, int k_blocks, const float *a, const float *packed, float *c,
        int phase, const LstmengHalvesOrder *order) {
    lstmeng_row_halves_member_walk_f32(H, k_split, u0, k_blocks, a, packed, c, phase, order,
                                       lstmeng_halves_piece_avx512_f32);
}

LSTMENG_AVX512 static void lstmeng_row_halves_whole_avx512_f32(
        int64_t H, int64_t k_split, int64_t u0, int k_blocks, const float *a, const float *packed, float *c,
        const LstmengHalvesOrder *order) {
    lstmeng_row_halves_whole_walk_f32(H, k_split, u0, k_blocks, a, packed, c, order,
                                      lstmeng_halves_piece_avx512_f32);
}
#endif

#if LSTMENG_HAVE_AVX2_FMA
/* The AVX2 piece kernel: lstm_gemm.h's 8 ymm chains, k unrolled by two (the pair's
 * 32 columns are 4 ymm, so 8 chains take two k at a time; 16 registers leave no room
 * for more). Every half has an even number of rows (a multiple of 32), so each k
 * block starts its chains on an even k. */
LSTMENG_AVX2_FMA static inline __attribute__((always_inline)) void lstmeng_halves_piece_avx2_f32(
        int64_t H, int64_t k0, int64_t rows, int k_blocks, const float *a, const float *panels, float *sums) {
    __m256 acc[8];
    int k_block, j;
    for (j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    for (k_block = 0; k_block < k_blocks; k_block++) {
        lstmeng_row_chains_avx2_f32(a + k_block * H + k0, panels, 0, rows, acc);
        panels += rows * LSTMENG_PAIR;
    }
    for (j = 0; j < 4; j++) _mm256_storeu_ps(sums + 8 * j, _mm256_add_ps(acc[j], acc[4 + j]));
}

LSTMENG_AVX2_FMA static void lstmeng_row_halves_member_avx2_f32(
        int64_t H, int64_t k_split, int64_t u0, int k_blocks, const float *a, const float *packed, float *c,
        int phase, const LstmengHalvesOrder *order) {
    lstmeng_row_halves_member_walk_f32(H, k_split, u0, k_blocks, a, packed, c, phase, order,
                                       lstmeng_halves_piece_avx2_f32);
}

LSTMENG_AVX2_FMA static void lstmeng_row_halves_whole_avx2_f32(
        int64_t H, int64_t k_split, int64_t u0, int k_blocks, const float *a, const float *packed, float *c,
        const LstmengHalvesOrder *order) {
    lstmeng_row_halves_whole_walk_f32(H, k_split, u0, k_blocks, a, packed, c, order,
                                      lstmeng_halves_piece_avx2_f32);
}
#endif

/* A member of a two-member split's product in halves (its matrix packed with paired =
 * 0), phase LSTMENG_HALVES_OWN (before the step's barrier) or LSTMENG_HALVES_OTHER
 * (after it), in the step's order, with the kernels of lstmeng_isa (AVX-512 or AVX2;
 * the caller checks that it is one of them). */
static void lstmeng_row_halves_member_f32(int64_t H, int64_t k_split, int64_t u0, int k_blocks, const float *a,
                                          const float *packed, float *c, int phase,
                                          const LstmengHalvesOrder *order) {
#if LSTMENG_HAVE_AVX512
    if (lstmeng_isa == LSTMENG_ISA_AVX512) {
        lstmeng_row_halves_member_avx512_f32(H, k_split, u0, k_blocks, a, packed, c, phase, order);
        return;
    }
#endif
#if LSTMENG_HAVE_AVX2_FMA
    lstmeng_row_halves_member_avx2_f32(H, k_split, u0, k_blocks, a, packed, c, phase, order);
#else
    (void)H; (void)k_split; (void)u0; (void)k_blocks; (void)a; (void)packed; (void)c; (void)phase; (void)order;
#endif
}

/* A whole share's product in halves (one thread, or a member of a team of three or
 * more; its matrix packed with paired = 1 where its order turns), in the step's order,
 * with the kernels of lstmeng_isa (AVX-512 or AVX2; the caller checks). */
static void lstmeng_row_halves_whole_f32(int64_t H, int64_t k_split, int64_t u0, int k_blocks, const float *a,
                                         const float *packed, float *c, const LstmengHalvesOrder *order) {
#if LSTMENG_HAVE_AVX512
    if (lstmeng_isa == LSTMENG_ISA_AVX512) {
        lstmeng_row_halves_whole_avx512_f32(H, k_split, u0, k_blocks, a, packed, c, order);
        return;
    }
#endif
#if LSTMENG_HAVE_AVX2_FMA
    lstmeng_row_halves_whole_avx2_f32(H, k_split, u0, k_blocks, a, packed, c, order);
#else
    (void)H; (void)k_split; (void)u0; (void)k_blocks; (void)a; (void)packed; (void)c; (void)order;
#endif
}

#endif
