/* A persistent pool of worker threads: ert_parallel(fn, ctx, nth) runs fn(ctx, i, nth)
 * for i = 0 .. nth-1 at once, the caller being thread 0, and returns when all are done.
 *
 * Decode starts a few hundred parallel regions per token, each a few microseconds to a
 * few hundred long: creating threads (or an OpenMP team that falls asleep) per region
 * costs more than the work. Workers here wait for the next region by spinning on a
 * generation counter for SPIN_NS, then sleep on a condition variable, so a burst of
 * regions runs at spin latency and an idle process takes no CPU.
 *
 * One region at a time: concurrent callers are serialized by a mutex, and a call from
 * inside a region (a worker's fn calling ert_parallel) runs serially on that thread.
 * After fork() the child starts with no workers and creates its own. */
#define ERT_BUILDING
#include "edgert.h"

#include <pthread.h>
#include <stdint.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#define MAX_WORKERS 63
#define SPIN_NS 200000L /* 0.2 ms: longer than the gaps between a token's regions */

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__) || defined(__arm__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

static struct {
    pthread_mutex_t call;       /* one region at a time */
    pthread_mutex_t lock;       /* guards the sleeps below */
    pthread_cond_t wake, done;
    atomic_uint generation;     /* incremented to start a region */
    atomic_int pending;         /* workers still running the current region */
    atomic_int sleepers;        /* workers (or the caller) waiting on a condition */
    ert_task_fn fn;
    void *ctx;
    int nth;
    int nworkers;               /* threads started (ids 1..nworkers) */
    unsigned start_gen[MAX_WORKERS + 1]; /* the generation before a worker's first region */
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
       PTHREAD_COND_INITIALIZER, 0, 0, 0, NULL, NULL, 0, 0, {0}};

static _Thread_local int t_in_region;

static long elapsed_ns(const struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000000000L + (t.tv_nsec - t0->tv_nsec);
}

/* Waits until *cond() holds: spin, then sleep on cv (signalled under P.lock). */
static void wait_for(int (*cond)(unsigned), unsigned arg, pthread_cond_t *cv) {
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; !cond(arg); i++) {
        CPU_RELAX();
        if ((i & 255) == 255 && elapsed_ns(&t0) > SPIN_NS) {
            pthread_mutex_lock(&P.lock);
            atomic_fetch_add(&P.sleepers, 1);
            while (!cond(arg)) pthread_cond_wait(cv, &P.lock);
            atomic_fetch_sub(&P.sleepers, 1);
            pthread_mutex_unlock(&P.lock);
            return;
        }
    }
}

static int started(unsigned seen) { return atomic_load(&P.generation) != seen; }
static int finished(unsigned unused) { (void)unused; return atomic_load(&P.pending) == 0; }

/* Wakes sleepers after a state change they wait for (made before this call). */
static void wake_all(pthread_cond_t *cv) {
    if (atomic_load(&P.sleepers)) {
        pthread_mutex_lock(&P.lock);
        pthread_cond_broadcast(cv);
        pthread_mutex_unlock(&P.lock);
    }
}

static void *worker(void *arg) {
    const int id = (int)(intptr_t)arg;
    unsigned seen = P.start_gen[id]; /* not P.generation: the first region may have started already */
    t_in_region = 1;
    for (;;) {
        wait_for(started, seen, &P.wake);
        seen = atomic_load(&P.generation);
        if (id < P.nth) P.fn(P.ctx, id, P.nth);
        if (atomic_fetch_sub(&P.pending, 1) == 1) wake_all(&P.done);
    }
    return NULL;
}

static void forget_workers(void) { P.nworkers = 0; } /* in a forked child: they do not exist */

static int nprocs(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > MAX_WORKERS + 1 ? MAX_WORKERS + 1 : (int)n;
}

int ert_max_threads(void) { return nprocs(); }

void ert_parallel(ert_task_fn fn, void *ctx, int nth) {
    if (nth > nprocs()) nth = nprocs(); /* never oversubscribe */
    if (nth <= 1 || t_in_region) {
        for (int i = 0; i < (nth < 1 ? 1 : nth); i++) fn(ctx, i, nth < 1 ? 1 : nth);
        return;
    }
    pthread_mutex_lock(&P.call);
    while (P.nworkers < nth - 1) {
        static int atfork_set;
        if (!atfork_set) atfork_set = pthread_atfork(NULL, NULL, forget_workers) == 0;
        pthread_t t;
        pthread_attr_t attr;
        P.start_gen[P.nworkers + 1] = atomic_load(&P.generation);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, worker, (void *)(intptr_t)(P.nworkers + 1));
        pthread_attr_destroy(&attr);
        if (rc) break;
        P.nworkers++;
    }
    if (nth > P.nworkers + 1) nth = P.nworkers + 1; /* could not start more threads */
    P.fn = fn;
    P.ctx = ctx;
    P.nth = nth;
    atomic_store(&P.pending, P.nworkers);
    atomic_fetch_add(&P.generation, 1);
    wake_all(&P.wake);
    t_in_region = 1;
    fn(ctx, 0, nth);
    t_in_region = 0;
    wait_for(finished, 0, &P.done);
    pthread_mutex_unlock(&P.call);
}
