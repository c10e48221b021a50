/* A persistent pool of worker threads: ert_parallel(fn, ctx, nth) runs fn(ctx, slot, nth)
 * on the caller (slot 0) and on up to nth-1 workers (slots 1..), and returns when all
 * that joined are done. The work inside fn must be taken dynamically (an atomic counter
 * in ctx), never split by slot: a worker that has not joined by the time the others
 * have taken all the work does not run at all.
 *
 * Why: decode starts a few hundred regions per token, each a few to a few hundred
 * microseconds. Creating threads (or an OpenMP team) per region costs more than the
 * work, and a barrier that waits for every thread collapses when the cores are shared
 * with other processes: one descheduled thread stalls each region for a time slice.
 * Here the caller closes the region once the work is taken and waits only for workers
 * still inside it. Idle workers spin on a generation counter for SPIN_NS, then sleep
 * on a condition variable, so a burst of regions runs at spin latency and an idle
 * process takes no CPU.
 *
 * One region at a time: concurrent callers are serialized by a mutex, and a call from
 * inside a region runs serially on that thread. After fork() the child starts with no
 * workers and creates its own. */
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
#elif defined(__aarch64__) || (defined(__arm__) && __ARM_ARCH >= 7) /* yield: ARMv6K and later */
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

#define CLOSED (1 << 30) /* in P.state: the region takes no more workers */

static struct {
    pthread_mutex_t call;       /* one region at a time */
    pthread_mutex_t lock;       /* guards the sleeps of idle workers */
    pthread_cond_t wake;
    atomic_uint generation;     /* incremented to start a region */
    atomic_int state;           /* workers inside the region, | CLOSED */
    atomic_int joined;          /* workers that joined this region: their slots */
    atomic_int sleepers;        /* workers asleep on `wake` */
    ert_task_fn fn;
    void *ctx;
    int nth;
    int nworkers;               /* threads started */
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, CLOSED, 0, 0,
       NULL, NULL, 0, 0};

static _Thread_local int t_in_region;

static long elapsed_ns(const struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000000000L + (t.tv_nsec - t0->tv_nsec);
}

/* An idle worker: spin until the generation moves past `seen`, then sleep. */
static void wait_for_region(unsigned seen) {
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; atomic_load(&P.generation) == seen; i++) {
        CPU_RELAX();
        if ((i & 255) == 255 && elapsed_ns(&t0) > SPIN_NS) {
            pthread_mutex_lock(&P.lock);
            atomic_fetch_add(&P.sleepers, 1);
            while (atomic_load(&P.generation) == seen) pthread_cond_wait(&P.wake, &P.lock);
            atomic_fetch_sub(&P.sleepers, 1);
            pthread_mutex_unlock(&P.lock);
            return;
        }
    }
}

static void *worker(void *arg) {
    unsigned seen = (unsigned)(uintptr_t)arg; /* the generation before this worker was started */
    t_in_region = 1;
    for (;;) {
        wait_for_region(seen);
        seen = atomic_load(&P.generation);
        if (!(atomic_fetch_add(&P.state, 1) & CLOSED)) { /* joined: the fields are this region's */
            const int slot = atomic_fetch_add(&P.joined, 1) + 1;
            if (slot < P.nth) P.fn(P.ctx, slot, P.nth);
        }
        atomic_fetch_sub(&P.state, 1);
    }
    return NULL;
}

static void forget_workers(void) { P.nworkers = 0; } /* in a forked child: they do not exist */

static int nprocs(void) { /* read once: sysconf reads sysfs, ~7 us, and every matmul asks */
    static int n;
    if (!n) {
        long v = sysconf(_SC_NPROCESSORS_ONLN);
        n = v < 1 ? 1 : v > MAX_WORKERS + 1 ? MAX_WORKERS + 1 : (int)v;
    }
    return n;
}

int ert_max_threads(void) { return nprocs(); }

int ert_clamp_threads(int threads) { return threads <= 0 || threads > ert_max_threads() ? ert_max_threads() : threads; }

void ert_parallel(ert_task_fn fn, void *ctx, int nth) {
    if (nth > nprocs()) nth = nprocs(); /* never oversubscribe */
    if (nth <= 1 || t_in_region) { /* the caller alone: it takes all the work */
        fn(ctx, 0, 1);
        return;
    }
    pthread_mutex_lock(&P.call);
    while (P.nworkers < nth - 1) {
        static int atfork_set;
        if (!atfork_set) atfork_set = pthread_atfork(NULL, NULL, forget_workers) == 0;
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, worker, (void *)(uintptr_t)atomic_load(&P.generation));
        pthread_attr_destroy(&attr);
        if (rc) break;
        P.nworkers++;
    }
    if (nth > P.nworkers + 1) nth = P.nworkers + 1; /* could not start more threads */
    P.fn = fn;
    P.ctx = ctx;
    P.nth = nth;
    atomic_store(&P.joined, 0);
    atomic_fetch_and(&P.state, ~CLOSED); /* open (publishes the fields to workers that join) */
    atomic_fetch_add(&P.generation, 1);
    if (atomic_load(&P.sleepers)) {
        pthread_mutex_lock(&P.lock);
        pthread_cond_broadcast(&P.wake);
        pthread_mutex_unlock(&P.lock);
    }
    t_in_region = 1;
    fn(ctx, 0, nth);
    t_in_region = 0;
    atomic_fetch_or(&P.state, CLOSED);
    while (atomic_load(&P.state) & ~CLOSED) CPU_RELAX(); /* workers inside are finishing taken work */
    pthread_mutex_unlock(&P.call);
}
