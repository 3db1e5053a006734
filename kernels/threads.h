/* threads.h: how the kernel shares work between threads (threads.c). mix.c describes the work as a ParallelLoop
 * and never sees a thread, a lock or an atomic. */
#ifndef GENARM_THREADS_H
#define GENARM_THREADS_H

#include <stddef.h>

#define MAX_THREADS 64

/* Items [0, n_items) processed `n_phases` times over: phase p calls body(ctx, worker, p, begin, end) on chunks of
 * at most `chunk` items, each chunk exactly once, on whichever thread is free; then, once every chunk of phase p is
 * done, the calling thread alone runs between(ctx, p) (not after the last phase); a zero from it ends the loop.
 * `worker` (0 = the calling thread, then 1, 2, ... in joining order, below n_threads) lets the body keep scratch
 * per thread. Chunks are handed out in increasing order, so a thread's own chunks increase too. */
typedef struct {
    ptrdiff_t n_items, chunk;
    int n_phases;
    void (*body)(void *ctx, int worker, int phase, ptrdiff_t begin, ptrdiff_t end);
    int (*between)(void *ctx, int phase);
    void *ctx;
} ParallelLoop;

/* Run the loop on the calling thread with the help of up to n_threads - 1 workers of a pool started on first use.
 * Helpers may join late or not at all (the calling thread then does their share): with n_threads = 1, or while
 * another thread's call holds the pool, the calling thread runs everything alone. Returns when every chunk is done
 * and no worker touches `loop` any more. Thread-safe. */
void genarm_parallel_run(const ParallelLoop *loop, int n_threads);

/* Stop and join the pool's workers (at interpreter exit); a later genarm_parallel_run starts new ones. */
void genarm_threads_stop(void);

#endif
