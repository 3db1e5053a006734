/*
 * threads.c: the worker pool behind genarm_parallel_run (threads.h), on Win32 threads or pthreads.
 *
 * Why a pool. The kernel used to start its threads on every call: starting and joining one costs 16-30 us, and the
 * calling thread then waited for the late starter's fixed half, so on one 262,144-token row 2 threads were slower
 * than 1 (227 vs 166 us on a Xeon, 112-136 vs 80-86 us on an AMD EPYC), and much slower on a busy machine, where a
 * thread may wait milliseconds to be scheduled. A pool worker wakes in ~8 us, the caller never waits for a share
 * nobody has started, nor for a worker that has nothing left to do: measured, 2 threads were never slower than 1
 * (see mix.c, next to MIN_TOKENS_PER_THREAD).
 *
 * How a call runs. The calling thread posts the loop and starts on it at once; a worker that wakes in time joins
 * and claims chunks from the same cursor (one atomic add per chunk). Between phases the calling thread waits only
 * for chunks already claimed, runs `between` and opens the next phase; workers spin for it a little, then leave the
 * call (nothing depends on them). The call returns as soon as its last chunk is done: the state a late worker may
 * still read is reference-counted, so nobody waits for a worker that has nothing to do (on a busy machine it may
 * not run for a while).
 *
 * Several threads may call at once: one call holds the pool, the others run alone on their own threads meanwhile.
 * A child process after fork() has no workers: pthread_atfork empties the pool there.
 */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* clock_gettime under a strict -std=c99 */
#endif

#include "threads.h"

#include <stdint.h>
#include <stdlib.h>

#define MAX_WORKERS (MAX_THREADS - 1)
#define PHASE_SHIFT 48 /* the cursor holds the phase above this bit and the next unclaimed item below it */
#define ITEM_BITS ((INT64_C(1) << PHASE_SHIFT) - 1)
#define SPIN_NS 50000             /* a wait spins this long, then yields between checks: see wait_step */
#define WORKER_PATIENCE_NS 100000 /* a worker waits this long for the next phase, then leaves the call */

static void worker_main(uintptr_t seen);

#ifdef _WIN32
#include <windows.h>

typedef struct {
    SRWLOCK lock;
    CONDITION_VARIABLE changed;
} Monitor;
#define MONITOR_INIT {SRWLOCK_INIT, CONDITION_VARIABLE_INIT}
static void monitor_enter(Monitor *m)
{
    AcquireSRWLockExclusive(&m->lock);
}
static void monitor_leave(Monitor *m)
{
    ReleaseSRWLockExclusive(&m->lock);
}
static void monitor_wait(Monitor *m)
{
    SleepConditionVariableSRW(&m->changed, &m->lock, INFINITE, 0);
}
static void monitor_notify(Monitor *m)
{
    WakeAllConditionVariable(&m->changed);
}

typedef HANDLE Thread;
static DWORD WINAPI thread_entry(LPVOID seen)
{
    worker_main((uintptr_t)seen);
    return 0;
}
static int thread_start(Thread *thread, uintptr_t seen)
{
    *thread = CreateThread(NULL, 0, thread_entry, (LPVOID)seen, 0, NULL);
    return *thread != NULL;
}
static void thread_join(Thread thread)
{
    WaitForSingleObject(thread, INFINITE);
    CloseHandle(thread);
}

/* Interlocked operations are full barriers. */
static int64_t atomic_add(volatile int64_t *p, int64_t v)
{
    return InterlockedExchangeAdd64((volatile LONG64 *)p, v);
}
static int64_t atomic_load(volatile int64_t *p)
{
    return InterlockedCompareExchange64((volatile LONG64 *)p, 0, 0);
}
static void atomic_store(volatile int64_t *p, int64_t v)
{
    InterlockedExchange64((volatile LONG64 *)p, v);
}
static void cpu_relax(void)
{
    YieldProcessor();
}
static void yield_core(void)
{
    SwitchToThread();
}
static int64_t now_ns(void)
{
    LARGE_INTEGER count, frequency;
    QueryPerformanceCounter(&count);
    QueryPerformanceFrequency(&frequency);
    return (int64_t)((double)count.QuadPart * 1e9 / (double)frequency.QuadPart);
}
static void after_fork_reset(void (*reset)(void))
{
    (void)reset; /* no fork() on Windows */
}
#else
#include <pthread.h>
#include <signal.h>
#include <sched.h>
#include <time.h>

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t changed;
} Monitor;
#define MONITOR_INIT {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER}
static void monitor_enter(Monitor *m)
{
    pthread_mutex_lock(&m->lock);
}
static void monitor_leave(Monitor *m)
{
    pthread_mutex_unlock(&m->lock);
}
static void monitor_wait(Monitor *m)
{
    pthread_cond_wait(&m->changed, &m->lock);
}
static void monitor_notify(Monitor *m)
{
    pthread_cond_broadcast(&m->changed);
}

typedef pthread_t Thread;
static void *thread_entry(void *seen)
{
    worker_main((uintptr_t)seen);
    return NULL;
}
/* Workers start with every signal blocked (a thread inherits its creator's mask): the kernel then delivers Ctrl-C
   to a thread that can act on it, Python's main thread, and never to a worker that would leave the main thread
   asleep in a blocking read. */
static int thread_start(Thread *thread, uintptr_t seen)
{
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &previous);
    int started = pthread_create(thread, NULL, thread_entry, (void *)seen) == 0;
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    return started;
}
static void thread_join(Thread thread)
{
    pthread_join(thread, NULL);
}

/* Chunks are published by the release of `done` and taken by the acquire of the cursor, and the other way round. */
static int64_t atomic_add(int64_t *p, int64_t v)
{
    return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL);
}
static int64_t atomic_load(int64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static void atomic_store(int64_t *p, int64_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}
static void yield_core(void)
{
    sched_yield();
}
static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}
static void after_fork_reset(void (*reset)(void))
{
    pthread_atfork(NULL, NULL, reset);
}
#endif

/* One call of genarm_parallel_run. */
typedef struct {
    const ParallelLoop *loop; /* read only for chunks claimed, which the caller waits for */
    ptrdiff_t n_items, chunk;
    int64_t n_phases;
    int64_t cursor;          /* phase << PHASE_SHIFT | next unclaimed item; phase n_phases: the call is over */
    int64_t done;            /* items finished, all phases so far */
    int64_t refs;            /* the caller and each worker that joined; the last to let go frees the run */
    int joined, max_workers; /* under the pool's lock */
} Run;

static struct {
    Monitor monitor;
    Thread threads[MAX_WORKERS];
    int n_workers, busy, stopping, fork_handled;
    uintptr_t generation; /* bumped whenever a call is posted */
    Run *run;             /* the call workers may join, or NULL */
} pool = {.monitor = MONITOR_INIT};

/* Run the chunk that `claim` holds, if its phase had one left, and count it done. */
static int run_chunk(Run *run, int worker, int64_t claim)
{
    ptrdiff_t begin = (ptrdiff_t)(claim & ITEM_BITS);
    if (begin >= run->n_items)
        return 0;
    ptrdiff_t end = run->n_items - begin < run->chunk ? run->n_items : begin + run->chunk;
    run->loop->body(run->loop->ctx, worker, (int)(claim >> PHASE_SHIFT), begin, end);
    atomic_add(&run->done, end - begin);
    return 1;
}

/* One step of a wait that started at `start`: spin for about as long as a chunk takes, then yield, since on a busy
 * machine the thread awaited may be queued behind this one on the same core. Yielding after 3 us instead measured
 * worse: a yield can hand the core to another process for a whole time slice. Returns the time waited so far. */
static int64_t wait_step(int64_t start)
{
    int64_t waited = now_ns() - start;
    if (waited < SPIN_NS)
        cpu_relax();
    else
        yield_core();
    return waited;
}

/* 0 when the worker gave up waiting for the phase after `phase`. */
static int await_phase_after(Run *run, int64_t phase)
{
    int64_t start = now_ns();
    while (atomic_load(&run->cursor) >> PHASE_SHIFT == phase)
        if (wait_step(start) > WORKER_PATIENCE_NS)
            return 0;
    return 1;
}

/* A worker's share: chunks of whatever phase is open, until the call is over or the next phase is slow to come. */
static void take_part(Run *run, int worker)
{
    for (;;) {
        int64_t claim = atomic_add(&run->cursor, run->chunk), phase = claim >> PHASE_SHIFT;
        if (phase >= run->n_phases)
            return;
        if (!run_chunk(run, worker, claim) && !await_phase_after(run, phase))
            return;
    }
}

/* The caller's wait for the chunks workers claimed. */
static void await_done(Run *run, int64_t target)
{
    int64_t start = now_ns();
    while (atomic_load(&run->done) < target)
        wait_step(start);
}

static void let_go(Run *run)
{
    if (atomic_add(&run->refs, -1) == 1)
        free(run);
}

/* The calling thread's part: its own chunks, and each phase closed and the next opened once its chunks are done. */
static void lead(Run *run)
{
    const ParallelLoop *loop = run->loop;
    for (int phase = 0;;) {
        while (run_chunk(run, 0, atomic_add(&run->cursor, loop->chunk)))
            ;
        await_done(run, (int64_t)(phase + 1) * loop->n_items);
        if (phase + 1 == loop->n_phases || !loop->between(loop->ctx, phase))
            break;
        phase++;
        atomic_store(&run->cursor, (int64_t)phase << PHASE_SHIFT);
    }
    atomic_store(&run->cursor, (int64_t)loop->n_phases << PHASE_SHIFT);
}

static void worker_main(uintptr_t seen)
{
    monitor_enter(&pool.monitor);
    for (;;) {
        while (!pool.stopping && (!pool.run || pool.generation == seen))
            monitor_wait(&pool.monitor);
        if (pool.stopping)
            break;
        seen = pool.generation;
        Run *run = pool.run;
        if (run->joined == run->max_workers)
            continue;
        int worker = ++run->joined;
        atomic_add(&run->refs, 1);
        monitor_leave(&pool.monitor);
        take_part(run, worker);
        let_go(run);
        monitor_enter(&pool.monitor);
    }
    monitor_leave(&pool.monitor);
}

static void reset_in_fork_child(void)
{
    Monitor fresh = MONITOR_INIT;
    pool.monitor = fresh;
    pool.n_workers = pool.busy = pool.stopping = 0;
    pool.run = NULL;
}

/* Post the call to the pool, starting workers up to `helpers` first; 0 when it runs alone. */
static int post(Run *run, int helpers)
{
    monitor_enter(&pool.monitor);
    if (pool.busy || pool.stopping) {
        monitor_leave(&pool.monitor);
        return 0;
    }
    if (!pool.fork_handled) {
        after_fork_reset(reset_in_fork_child);
        pool.fork_handled = 1;
    }
    if (helpers > MAX_WORKERS)
        helpers = MAX_WORKERS;
    while (pool.n_workers < helpers && thread_start(&pool.threads[pool.n_workers], pool.generation))
        pool.n_workers++;
    run->max_workers = helpers < pool.n_workers ? helpers : pool.n_workers;
    if (run->max_workers > 0) {
        pool.busy = 1;
        pool.run = run;
        pool.generation++;
        monitor_notify(&pool.monitor);
    }
    monitor_leave(&pool.monitor);
    return run->max_workers > 0;
}

static void run_alone(const ParallelLoop *loop)
{
    for (int phase = 0; phase < loop->n_phases; phase++) {
        loop->body(loop->ctx, 0, phase, 0, loop->n_items);
        if (phase + 1 < loop->n_phases && !loop->between(loop->ctx, phase))
            return;
    }
}

void genarm_parallel_run(const ParallelLoop *loop, int n_threads)
{
    Run *run = n_threads > 1 && loop->n_items > loop->chunk ? calloc(1, sizeof *run) : NULL;
    if (run) {
        run->loop = loop;
        run->n_items = loop->n_items;
        run->chunk = loop->chunk;
        run->n_phases = loop->n_phases;
        run->refs = 1;
    }
    if (!run || !post(run, n_threads - 1)) {
        free(run);
        run_alone(loop);
        return;
    }
    lead(run);
    monitor_enter(&pool.monitor);
    pool.run = NULL; /* no worker joins from here on */
    pool.busy = 0;
    monitor_leave(&pool.monitor);
    let_go(run);
}

void genarm_threads_stop(void)
{
    monitor_enter(&pool.monitor);
    pool.stopping = 1;
    monitor_notify(&pool.monitor);
    int n_workers = pool.n_workers;
    monitor_leave(&pool.monitor);
    for (int i = 0; i < n_workers; i++)
        thread_join(pool.threads[i]);
    monitor_enter(&pool.monitor);
    pool.n_workers = pool.stopping = 0;
    monitor_leave(&pool.monitor);
}
