/*
 * Thread-team helpers for the unit-split kernels of _cython_lstm.pyx.
 *
 * Why: a small batch cannot be split over threads by rows (each thread's
 * per-step product would be a few rows thin), so its threads split the
 * *units* instead and must exchange h(t) after every step: one barrier per
 * step. OpenMP's own barrier cannot be used there (Cython runs the team in a
 * `parallel` block whose body calls our functions; an orphaned
 * `omp barrier` would be legal, but we also need the team size and an
 * inexpensive spin), so this is a small sense-counting spin barrier.
 *
 * lstmeng_team_size(), lstmeng_thread_index(): the calling OpenMP thread's
 * team size and index (1 and 0 without OpenMP: the kernels then run one slice).
 *
 * lstmeng_barrier_wait(barrier, team): returns once `team` threads have
 * called it for this round. Acquire/release ordering makes every write made
 * before the call visible to every thread after it. A thread spins for a while
 * and then yields its core, so a machine with more runnable threads than cores
 * (two layers on two Python threads, say) still makes progress.
 */
#ifndef LSTMENG_LSTM_SYNC_H
#define LSTMENG_LSTM_SYNC_H

#include <sched.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    int64_t arrived;    /* threads arrived in the current round */
    int64_t generation; /* rounds completed */
} lstmeng_barrier;

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

static inline void lstmeng_barrier_init(lstmeng_barrier *barrier) {
    barrier->arrived = 0;
    barrier->generation = 0;
}

static inline void lstmeng_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline void lstmeng_barrier_wait(lstmeng_barrier *barrier, int64_t team) {
    int64_t generation, spins = 0;
    if (team <= 1) return;
    generation = __atomic_load_n(&barrier->generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&barrier->arrived, 1, __ATOMIC_ACQ_REL) == team) {
        __atomic_store_n(&barrier->arrived, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&barrier->generation, generation + 1, __ATOMIC_RELEASE);
        return;
    }
    while (__atomic_load_n(&barrier->generation, __ATOMIC_ACQUIRE) == generation) {
        if (++spins < 4096) lstmeng_cpu_relax();
        else sched_yield();
    }
}

#endif
