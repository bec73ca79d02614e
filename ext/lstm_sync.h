/*
 * Thread-team helpers for the unit-split kernels of _cython_lstm.pyx.
 *
 * Why: a small batch cannot be split over threads by rows (each thread's
 * per-step product would be a few rows thin), so its threads split the
 * *units* instead and must exchange h(t) after every step: one barrier per
 * step. OpenMP's own barrier cannot be used there (Cython runs the team in a
 * `parallel` block whose body calls our functions; an orphaned
 * `omp barrier` would be legal, but we also need the team size and an
 * inexpensive spin), so this is a small flag barrier: each member publishes
 * how many barriers it has reached on its own cache line and waits until
 * every other member's count has caught up. Unlike a shared counter, no line
 * is written by two threads, so a barrier between two cores costs about one
 * cache-line transfer each way.
 *
 * lstmeng_team_size(), lstmeng_thread_index(): the calling OpenMP thread's
 * team size and index (1 and 0 without OpenMP: the kernels then run one slice).
 *
 * lstmeng_barrier_wait(flags, member, team, calls): returns once every
 * member of the team has made its (calls + 1)-th call. Acquire/release
 * ordering makes every write made before the call visible to every thread
 * after it. A thread spins for a while
 * and then yields its core, so a machine with more runnable threads than cores
 * (two layers on two Python threads, say) still makes progress.
 * lstmeng_barrier_arrive + lstmeng_barrier_depart are the same barrier in two
 * halves, with work in between that needs only the member's own results (the
 * batch-1 products in halves: lstm_halves.h, lstmeng_row_halves_member_f32).
 *
 * The time of each wait that had to yield (another member was
 * LSTMENG_SPINS_BEFORE_YIELD pauses, ~5 us, late: on an idle machine a
 * barrier completes in well under a microsecond) is added up, in
 * nanoseconds, in the member's LSTMENG_SLOW_WAIT_NS slot; after the team has
 * joined, the caller reads how long the split lost waiting
 * (lstmeng_team_slow_waits) and the backend stops splitting for a while when
 * that is a noticeable part of the call (issue 17: with another process on
 * one of two cores, a batch-1 training step took 19.3 ms split, 2.2 ms on one
 * thread). Time, not a count: with a CPU-bound process on the other core, 2
 * slow waits of 501 cost 15 ms of a 1.4 ms forward (each waits for a
 * scheduler time slice), while 500 short ones may cost little.
 */
#ifndef LSTMENG_LSTM_SYNC_H
#define LSTMENG_LSTM_SYNC_H

#include <sched.h>
#include <stdint.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* How many pause instructions a waiting member spins before it starts to
 * yield its core (about 5 us on Zen 3, where a pause takes ~65 cycles). A
 * barrier between two running cores completes in well under a microsecond,
 * so longer spins only matter when a member is not running: with more
 * threads than cores (OMP_NUM_THREADS above the cores, another busy
 * process), every step's barrier then cost the whole spin before the waiter
 * gave its core to the member it waits for (4,096 pauses: a batch-1 forward
 * with two threads on one core took 4-5 ms instead of 0.2). */
#define LSTMENG_SPINS_BEFORE_YIELD 256

/* Each member's count of barrier calls lives LSTMENG_FLAG_STRIDE int64s (128
 * bytes) from the next one's: never on a shared cache line, aligned or not. */
#define LSTMENG_FLAG_STRIDE 16
/* Slot (within a member's LSTMENG_FLAG_STRIDE) of its nanoseconds of slow waits:
 * written by that member only, read after the team joins. */
#define LSTMENG_SLOW_WAIT_NS 1

static inline int64_t lstmeng_now_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

static inline int lstmeng_team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

static inline int lstmeng_thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline void lstmeng_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* A barrier in two halves, for work that needs only the member's own results in
 * between (the batch-1 step's own half of h, lstmeng_row_halves_f32): arrive
 * says this member has made its call number `calls` (counting from 0),
 * depart returns once every member has. flags: [team * LSTMENG_FLAG_STRIDE]
 * int64, zero before the team's first call; calls: how many barrier calls this
 * member made before (the same count in every member, since all make the same
 * calls). */
static inline void lstmeng_barrier_arrive(int64_t *flags, int64_t member, int64_t calls) {
    __atomic_store_n(&flags[member * LSTMENG_FLAG_STRIDE], calls + 1, __ATOMIC_RELEASE);
}

static inline void lstmeng_barrier_depart(int64_t *flags, int64_t member, int64_t team, int64_t calls) {
    int64_t other, spins = 0, slow_since = 0;
    for (other = 0; other < team; other++) {
        if (other == member) continue;
        while (__atomic_load_n(&flags[other * LSTMENG_FLAG_STRIDE], __ATOMIC_ACQUIRE) <= calls) {
            if (++spins < LSTMENG_SPINS_BEFORE_YIELD) {
                lstmeng_cpu_relax();
            } else {
                if (spins == LSTMENG_SPINS_BEFORE_YIELD) slow_since = lstmeng_now_ns();
                sched_yield();
            }
        }
    }
    if (slow_since != 0)
        flags[member * LSTMENG_FLAG_STRIDE + LSTMENG_SLOW_WAIT_NS] += lstmeng_now_ns() - slow_since;
}

/* Both halves at once: returns once every member has made this call. */
static inline void lstmeng_barrier_wait(int64_t *flags, int64_t member, int64_t team, int64_t calls) {
    if (team <= 1) return;
    lstmeng_barrier_arrive(flags, member, calls);
    lstmeng_barrier_depart(flags, member, team, calls);
}

/* The pipelined calls (_cython_lstm.pyx: projection_ahead in the forward,
 * pipeline_work in the backward): one thread runs the time loop and raises a
 * progress count (chunks of steps done; packed rows whose dz is final); the others
 * claim work items in order and wait until what an item needs is done. Counts
 * only grow. */
static inline void lstmeng_progress_publish(int64_t *slot, int64_t value) {
    __atomic_store_n(slot, value, __ATOMIC_RELEASE);
}

/* The next unclaimed item's index (every caller gets a different one). */
static inline int64_t lstmeng_progress_claim(int64_t *counter) {
    return __atomic_fetch_add(counter, 1, __ATOMIC_ACQ_REL);
}

/* Claims item `item` if it is the next unclaimed one (returns 1), else returns 0
 * (another thread has claimed it). */
static inline int lstmeng_progress_claim_exact(int64_t *counter, int64_t item) {
    int64_t expected = item;
    return __atomic_compare_exchange_n(counter, &expected, item + 1, 0, __ATOMIC_ACQ_REL,
                                       __ATOMIC_ACQUIRE);
}

/* Returns once *slot >= value, every write made before that publish visible. Spins,
 * then sleeps LSTMENG_PROGRESS_NAP_NS at a time: the backward's helpers wait most of
 * the call for rows to finish, and a waiter that kept yielding stays runnable, so
 * on a busy machine it took time slices from the time loop's thread (a pipelined
 * forward took 6-8 ms instead of 1 beside a CPU-bound process). Returns the
 * nanoseconds it waited after the spins (0 when the wait was short): the time
 * loop's thread adds them up for the busy-machine rule, as the split's barriers do. */
#define LSTMENG_PROGRESS_NAP_NS 20000
static inline int64_t lstmeng_progress_wait(const int64_t *slot, int64_t value) {
    int64_t spins = 0, slow_since = 0;
    const struct timespec nap = {0, LSTMENG_PROGRESS_NAP_NS};
    while (__atomic_load_n(slot, __ATOMIC_ACQUIRE) < value) {
        if (++spins < LSTMENG_SPINS_BEFORE_YIELD) {
            lstmeng_cpu_relax();
        } else {
            if (spins == LSTMENG_SPINS_BEFORE_YIELD) slow_since = lstmeng_now_ns();
            nanosleep(&nap, NULL);
        }
    }
    return slow_since != 0 ? lstmeng_now_ns() - slow_since : 0;
}

/* After the team joined: the barriers each member made, and the longest time (ns)
 * any member spent in slow waits. */
static inline void lstmeng_team_slow_waits(const int64_t *flags, int64_t team, int64_t *barriers,
                                           int64_t *slow_wait_ns) {
    int64_t member;
    *barriers = 0;
    *slow_wait_ns = 0;
    for (member = 0; member < team; member++) {
        if (flags[member * LSTMENG_FLAG_STRIDE] > *barriers) *barriers = flags[member * LSTMENG_FLAG_STRIDE];
        if (flags[member * LSTMENG_FLAG_STRIDE + LSTMENG_SLOW_WAIT_NS] > *slow_wait_ns)
            *slow_wait_ns = flags[member * LSTMENG_FLAG_STRIDE + LSTMENG_SLOW_WAIT_NS];
    }
}

#endif
