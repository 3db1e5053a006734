/*
 * mix.c: the GenARM guidance kernel, in plain C; fused.c makes it the Python module genarm_local._fused.
 *
 * What it computes. For each sequence r of a batch, one row of log-probabilities
 *
 *     out = w0 * log_softmax(base) + sum_i alpha_i * log_softmax(arm_i)  -  logsumexp(same)
 *
 * that is log p with p proportional to p_base^w0 * prod_i p_arm_i^alpha_i (GenARM, Xu et al., ICLR 2025, the
 * decoding distribution of section 4; w0 = 1 in the paper). log_softmax(x) is x minus a constant per row, and the
 * final normalisation removes any constant, so out = log_softmax(w0 * base + sum_i alpha_i * arm_i): the
 * per-input logsumexps are never needed.
 *
 * Why C. With Gemma-3's 262,144-token vocabulary numpy spends ~4.5 ms per token on this (a dozen full passes over
 * temporaries, three exponentials per token). Here every input row is read once and dst twice, there is one
 * exponential per token, a polynomial the compiler vectorises, and no lock, so the caller can drop the GIL.
 *
 * How, per row, in blocks of BLOCK tokens that stay in L1, in log2 units (weights times log2 e, so that the
 * exponential is a bare 2^y):
 *   A. mixed[t] = sum_j c_j * x_j[t]: in float32 where that is provably within 2^-14 nats (real logits), else in
 *      double (logits scaled by 1000, masked or corrupt tokens); see mix_block_f32. With the block's max m_b,
 *      rel[t] = mixed[t] - m_b <= 0 goes to dst and sum_t 2^rel[t] is folded into the row's running (max M,
 *      sum S), a streaming logsumexp. Values relative to their own block's max keep the tokens that matter, those
 *      near the max, exact in float32.
 *   B. dst[t] = (rel[t] + m_b - M - log2 S) * ln 2, over dst only.
 * One row can be split between threads by blocks (pass A), a batch by rows.
 *
 * Masked tokens: a token that is -inf in any row with nonzero weight is -inf in the output, whatever the sign of
 * the weight (p^alpha of a token a model forbids is taken as 0, never as +inf). Rows with weight 0 are not read.
 * A NaN or +inf in a row read, or a row with no token left, is reported (MixResult names the input and the
 * sequence); dst's contents are then unspecified.
 *
 * dst may be the base rows themselves (same address and stride: the normal in-place use on llama.cpp's logits),
 * since each block is read in full before it is written.
 */
#include "mix.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _WIN32
#include <windows.h>
#else
#include <pthread.h>
#endif

#define BLOCK 1024                  /* tokens per block: 4 KiB of floats (8 KiB of doubles), well inside L1 */
#define LANES 8                     /* independent accumulators, one AVX2 vector of floats: no reassociation */
#define MAX_THREADS 64
#define MIN_TOKENS_PER_THREAD 65536 /* below this a thread costs more to start (~30 us) than it saves */
#define LOG2E 1.4426950408889634
#define LN2 0.6931471805599453

#ifdef _MSC_VER
#define RESTRICT __restrict
#else
#define RESTRICT restrict
#endif

/* The hot functions are compiled twice where GCC can dispatch at load time (glibc ifunc): once for the x86-64
 * baseline (SSE2), once for AVX2 (+ FMA from GCC 12, which knows x86-64-v3). Wheels are moved between machines, so
 * -march=native is not an option. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#if __GNUC__ >= 12
#define HOT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HOT_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#else
#define HOT_CLONES
#endif

static inline float float_from_bits(uint32_t bits)
{
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* 2^y for y <= 0, written so compilers vectorise it (a call to libm's exp2f or expf stops the vectoriser). The
 * kernel keeps mixed values in log2 units (weights multiplied by log2 e), so this is its whole exponential.
 * 2^y = 2^n * 2^f with n = round(y) and |f| <= 1/2; 2^f by a degree-5 polynomial fitted for least maximum relative
 * error on [-1/2, 1/2] (7.5e-8; 2.1e-7 once evaluated in float32). Valid for y >= -126; with `clamp` (a constant
 * at every call site), smaller y and -inf give 2^-126, a term that cannot show in a sum next to 2^0 = 1. NaN gives
 * an unspecified value: the exact path checks for NaN itself. */
static inline float exp2_nonpos(float y, int clamp)
{
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it leaves round(y) in the low mantissa bits */
    if (clamp)
        y = y < -126.0f ? -126.0f : y;
    float t = y + round_magic;
    float n = t - round_magic;
    float f = y - n; /* exact */
    float p = 1.0000001f + f * (0.69314694f + f * (0.2402212f + f * (0.055507131f + f * (0.0096755419f
              + f * 0.0013276472f))));
    /* Multiply by 2^n by adding n to p's exponent field. t's bit pattern is 0x4B400000 + n; shifted left by 23 it
     * is n << 23. p lies in [0.70, 1.42] (exponent 126 or 127), so n >= -126 leaves a float (at worst a value below
     * 2^-126 read wrongly, which no sum can notice). */
    uint32_t t_bits, p_bits;
    memcpy(&t_bits, &t, sizeof t_bits);
    memcpy(&p_bits, &p, sizeof p_bits);
    return float_from_bits(p_bits + (t_bits << 23));
}

/* Float keys that order like the floats they come from: negative values get their magnitude bits flipped.
 * Compilers vectorise an integer max but not a floating-point one without -ffinite-math-only (NaN makes
 * `a > b ? a : b` order-dependent), so maxima below are taken over keys. */
static inline int32_t order_key32(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (int32_t)(bits ^ ((0u - (bits >> 31)) >> 1));
}

static inline float from_order_key32(int32_t key)
{
    uint32_t bits = (uint32_t)key;
    bits ^= (0u - (bits >> 31)) >> 1;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static inline int64_t order_key64(double x)
{
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (int64_t)(bits ^ ((0u - (bits >> 63)) >> 1));
}

static inline double from_order_key64(int64_t key)
{
    uint64_t bits = (uint64_t)key;
    double x;
    bits ^= (0u - (bits >> 63)) >> 1;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static inline uint32_t abs_bits(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits & 0x7fffffffu;
}

/* Fast path, one pass over one or two inputs: mixed[t] = (add ? mixed[t] : 0) + c0 * x0[t] (+ c1 * x1[t] with
 * `pair`), in float32. Also *abs0 (*abs1) = the largest |x| as bits, in which inf and NaN compare above every finite
 * value, so the caller can bound the rounding error and send blocks with masked or corrupt tokens down the exact
 * path; and with `last`, the order keys of the largest and smallest mixed values. The flags are constants at every
 * call site, so each combination compiles to its own straight loop. */
static inline void mix_f32(float *RESTRICT mixed, const float *RESTRICT x0, float c0, const float *RESTRICT x1,
                           float c1, ptrdiff_t n, int add, int pair, int last, uint32_t *abs0, uint32_t *abs1,
                           int32_t *max_key, int32_t *min_key)
{
    uint32_t a0 = 0, a1 = 0;
    int32_t best = INT32_MIN, worst = INT32_MAX;
    for (ptrdiff_t t = 0; t < n; t++) {
        float v0 = x0[t], sum = c0 * v0;
        uint32_t b0 = abs_bits(v0);
        a0 = b0 > a0 ? b0 : a0;
        if (pair) {
            float v1 = x1[t];
            uint32_t b1 = abs_bits(v1);
            a1 = b1 > a1 ? b1 : a1;
            sum += c1 * v1;
        }
        if (add)
            sum += mixed[t];
        mixed[t] = sum;
        if (last) {
            int32_t key = order_key32(sum);
            best = key > best ? key : best;
            worst = key < worst ? key : worst;
        }
    }
    *abs0 = a0;
    if (pair)
        *abs1 = a1;
    if (last) {
        *max_key = best;
        *min_key = worst;
    }
}

/* Fast path for one block, float32 throughout; c32 are the weights in log2 units. Fails (returns 0) when the block
 * holds a non-finite value or when float32 could be off by more than 2^-14 nats: fl(sum_j c_j x_j) errs by at most
 * (n_in + 1) * 2^-24 * sum_j |c_j x_j| (the products' roundings, the weights' and one per addition, each bounded by
 * the sum), and the per-input maxima bound that sum. Real logits (|x| below ~100, a few ARMs) pass; logits scaled
 * by 1000 or masked tokens take the exact path. Leaves the block's largest and smallest mixed values. */
static inline int mix_block_f32(float *RESTRICT mixed, const float *const *rows, const float *c32, const double *c,
                                int n_in, ptrdiff_t b0, ptrdiff_t n, float *max, float *min)
{
    uint32_t abs0 = 0, abs1 = 0;
    int32_t max_key = INT32_MIN, min_key = INT32_MAX;
    double bound; /* sum_j |c_j| max|x_j|, log2 units: NaN or inf when the block holds one */
    if (n_in == 1) {
        mix_f32(mixed, rows[0] + b0, c32[0], NULL, 0.0f, n, 0, 0, 1, &abs0, NULL, &max_key, &min_key);
        bound = fabs(c[0]) * float_from_bits(abs0);
    } else {
        /* The first two inputs in one pass, any others one by one; the extremes ride on the last pass. */
        mix_f32(mixed, rows[0] + b0, c32[0], rows[1] + b0, c32[1], n, 0, 1, n_in == 2, &abs0, &abs1, &max_key,
                &min_key);
        bound = fabs(c[0]) * float_from_bits(abs0) + fabs(c[1]) * float_from_bits(abs1);
        for (int j = 2; j < n_in; j++) {
            if (j < n_in - 1)
                mix_f32(mixed, rows[j] + b0, c32[j], NULL, 0.0f, n, 1, 0, 0, &abs0, NULL, &max_key, &min_key);
            else
                mix_f32(mixed, rows[j] + b0, c32[j], NULL, 0.0f, n, 1, 0, 1, &abs0, NULL, &max_key, &min_key);
            bound += fabs(c[j]) * float_from_bits(abs0);
        }
    }
    *max = from_order_key32(max_key);
    *min = from_order_key32(min_key);
    return bound * (n_in + 1) * LN2 <= 1024.0; /* (n_in + 1) * 2^-24 * bound * ln 2 <= 2^-14 nats */
}

/* dst[t] = mixed[t] - m (exact near the max), returning sum_t 2^dst[t]; `clamp` is needed when mixed spans more
 * than 126. */
static inline double shift_sum_exp2_f32(float *RESTRICT dst, const float *RESTRICT mixed, float m, ptrdiff_t n,
                                        int clamp)
{
    float lane[LANES];
    ptrdiff_t t = 0;
    for (int l = 0; l < LANES; l++)
        lane[l] = 0.0f;
    for (; t + LANES <= n; t += LANES)
        for (int l = 0; l < LANES; l++) {
            float r = mixed[t + l] - m;
            dst[t + l] = r;
            lane[l] += exp2_nonpos(r, clamp);
        }
    for (; t < n; t++) {
        float r = mixed[t] - m;
        dst[t] = r;
        lane[0] += exp2_nonpos(r, clamp);
    }
    double s = 0.0;
    for (int l = 0; l < LANES; l++)
        s += lane[l];
    return s;
}

/* Exact path: mixed[t] += c * x[t] in double, with a -inf in x giving -inf for either sign of c. For c < 0,
 * (x - x) turns a +inf or NaN input into NaN, so a corrupt value cannot pass for a masked token. */
static inline void add_weighted_f64(double *RESTRICT mixed, const float *RESTRICT x, double c, ptrdiff_t n)
{
    if (c > 0) {
        for (ptrdiff_t t = 0; t < n; t++)
            mixed[t] += c * (double)x[t];
    } else {
        for (ptrdiff_t t = 0; t < n; t++) {
            double xd = x[t], term = c * xd + (xd - xd);
            mixed[t] += xd == -INFINITY ? -INFINITY : term;
        }
    }
}

/* Largest value (the caller has ruled out NaN). */
static inline double max_f64(const double *RESTRICT v, ptrdiff_t n)
{
    int64_t best = INT64_MIN;
    for (ptrdiff_t t = 0; t < n; t++) {
        int64_t key = order_key64(v[t]);
        best = key > best ? key : best;
    }
    return from_order_key64(best);
}

/* rel[t] = (float)(mixed[t] - m), returning sum_t 2^rel[t]. */
static inline double shift_sum_exp2_f64(float *RESTRICT rel, const double *RESTRICT mixed, double m, ptrdiff_t n)
{
    float lane[LANES];
    ptrdiff_t t = 0;
    for (int l = 0; l < LANES; l++)
        lane[l] = 0.0f;
    for (; t + LANES <= n; t += LANES)
        for (int l = 0; l < LANES; l++) {
            float r = (float)(mixed[t + l] - m);
            rel[t + l] = r;
            lane[l] += exp2_nonpos(r, 1);
        }
    for (; t < n; t++) {
        float r = (float)(mixed[t] - m);
        rel[t] = r;
        lane[0] += exp2_nonpos(r, 1);
    }
    double s = 0.0;
    for (int l = 0; l < LANES; l++)
        s += lane[l];
    return s;
}

/* Cold path: which input holds a NaN (preferred) or +inf in tokens [b0, b0 + n)? Neither: weights times logits
 * overflowed. */
static MixStatus find_bad_value(const float *const *rows, int n_in, ptrdiff_t b0, ptrdiff_t n, int *which)
{
    for (int j = 0; j < n_in; j++)
        for (ptrdiff_t t = b0; t < b0 + n; t++)
            if (isnan(rows[j][t])) {
                *which = j;
                return MIX_NAN;
            }
    for (int j = 0; j < n_in; j++)
        for (ptrdiff_t t = b0; t < b0 + n; t++)
            if (rows[j][t] == INFINITY) {
                *which = j;
                return MIX_POSINF;
            }
    *which = 0;
    return MIX_OVERFLOW;
}

/* Cold path: every token came out -inf. One row masks everything, or the rows' masks do not overlap. */
static MixStatus explain_all_masked(const float *const *rows, int n_in, ptrdiff_t n_vocab, int *which)
{
    for (int j = 0; j < n_in; j++) {
        ptrdiff_t t = 0;
        while (t < n_vocab && rows[j][t] == -INFINITY)
            t++;
        if (t == n_vocab) {
            *which = j;
            return MIX_ROW_MASKED;
        }
    }
    *which = 0;
    return MIX_NO_COMMON_TOKEN;
}

/* Exact path for one block: writes dst[b0 + t] = mixed - max, returns the max in *max and the sum of exponentials
 * in *sum, or MIX_MASKED_BLOCK (nothing written) when every token is -inf, or the error found. */
static inline MixStatus mix_block_f64(float *dst, const float *const *rows, const double *c, int n_in,
                                      ptrdiff_t b0, ptrdiff_t n, double *max, double *sum, int *which)
{
    double mixed[BLOCK];
    float rel[BLOCK];
    for (ptrdiff_t t = 0; t < n; t++)
        mixed[t] = 0.0;
    for (int j = 0; j < n_in; j++)
        add_weighted_f64(mixed, rows[j] + b0, c[j], n);
    int has_nan = 0;
    for (ptrdiff_t t = 0; t < n; t++)
        has_nan |= mixed[t] != mixed[t];
    double m = max_f64(mixed, n);
    if (has_nan || m == INFINITY) /* from a NaN or +inf input (NaN also from +inf meeting -inf) */
        return find_bad_value(rows, n_in, b0, n, which);
    if (m == -INFINITY)
        return MIX_MASKED_BLOCK;
    *max = m;
    *sum = shift_sum_exp2_f64(rel, mixed, m, n);
    /* Written only now: when dst is the base, the block's inputs stay intact for the error messages above. */
    memcpy(dst + b0, rel, (size_t)n * sizeof *dst);
    return MIX_OK;
}

/* The streaming logsumexp, in log2 units: fold a block with max m and sum of 2^(x - m) s into (row_max, row_sum). */
static void fold(double *row_max, double *row_sum, double m, double s)
{
    if (m == -INFINITY)
        return;
    if (m > *row_max) {
        *row_sum = *row_sum * exp2(*row_max - m) + s;
        *row_max = m;
    } else {
        *row_sum += s * exp2(m - *row_max);
    }
}

/* Pass A over blocks [b_begin, b_end) of one row: rows[j] are the n_in inputs with nonzero weight c[j], in log2
 * units (c32[j] the same in float32). Leaves each block's max in offsets[b] and folds the blocks into (*row_max,
 * *row_sum). On error, *which is the index into rows of the input at fault. */
HOT_CLONES
static MixStatus mix_blocks(float *dst, const float *const *rows, const double *c, const float *c32, int n_in,
                            ptrdiff_t n_vocab, ptrdiff_t b_begin, ptrdiff_t b_end, double *offsets,
                            double *row_max, double *row_sum, int *which)
{
    float mixed[BLOCK];
    for (ptrdiff_t b = b_begin; b < b_end; b++) {
        ptrdiff_t b0 = b * BLOCK, n = n_vocab - b0 < BLOCK ? n_vocab - b0 : BLOCK;
        float max32, min32;
        double m, s;
        if (n_in > 0 && mix_block_f32(mixed, rows, c32, c, n_in, b0, n, &max32, &min32)) {
            m = max32;
            if (max32 - min32 <= 125.0f) /* real logits: a block spans ~80 */
                s = shift_sum_exp2_f32(dst + b0, mixed, max32, n, 0);
            else
                s = shift_sum_exp2_f32(dst + b0, mixed, max32, n, 1);
        } else {
            MixStatus status = mix_block_f64(dst, rows, c, n_in, b0, n, &m, &s, which);
            if (status == MIX_MASKED_BLOCK) {
                /* Filled with -inf in pass B: if the whole row is masked, dst (maybe the base) is still intact. */
                m = -INFINITY;
                s = 0.0;
            } else if (status != MIX_OK) {
                return status;
            }
        }
        offsets[b] = m;
        fold(row_max, row_sum, m, s);
    }
    return MIX_OK;
}

/* Pass B over blocks [b_begin, b_end): shift each block from its own max to the row's normalisation, and from log2
 * units to nats. */
HOT_CLONES
static void normalize_blocks(float *dst, const double *offsets, ptrdiff_t n_vocab, ptrdiff_t b_begin,
                             ptrdiff_t b_end, double log2_sum_exp)
{
    for (ptrdiff_t b = b_begin; b < b_end; b++) {
        ptrdiff_t b0 = b * BLOCK, n = n_vocab - b0 < BLOCK ? n_vocab - b0 : BLOCK;
        float *out = dst + b0;
        if (offsets[b] == -INFINITY) {
            for (ptrdiff_t t = 0; t < n; t++)
                out[t] = -INFINITY;
        } else {
            float shift = (float)((offsets[b] - log2_sum_exp) * LN2);
            for (ptrdiff_t t = 0; t < n; t++)
                out[t] = out[t] * (float)LN2 + shift;
        }
    }
}

/* A MixSpec with what the loops need: weights in log2 units (2^(c x) = e^(weight x)), also as floats. */
typedef struct {
    float *dst;
    ptrdiff_t dst_stride, n_vocab, n_blocks;
    int n_in;
    const float *const *row0;
    const ptrdiff_t *stride;
    double *c;
    float *c32;
} Mix;

/* Mutex and condition variable. */
#ifdef _WIN32
typedef struct {
    SRWLOCK lock;
    CONDITION_VARIABLE changed;
} Monitor;
static void monitor_init(Monitor *m)
{
    InitializeSRWLock(&m->lock);
    InitializeConditionVariable(&m->changed);
}
static void monitor_destroy(Monitor *m)
{
    (void)m;
}
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
#else
typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t changed;
} Monitor;
static void monitor_init(Monitor *m)
{
    pthread_mutex_init(&m->lock, NULL);
    pthread_cond_init(&m->changed, NULL);
}
static void monitor_destroy(Monitor *m)
{
    pthread_cond_destroy(&m->changed);
    pthread_mutex_destroy(&m->lock);
}
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
#endif

/* The hand-over between threads sharing one row: each reports its pass A, then waits while the calling thread
 * combines them, so that every thread runs pass B over the blocks it wrote (still in its own cache). */
typedef struct {
    Monitor monitor;
    int reported;     /* worker threads done with pass A */
    int decided, go;  /* the row is combined; pass B goes ahead */
    double log2_sum_exp;
} RowShare;

/* One thread's share: whole rows [row_begin, row_end), or, with `share`, blocks [block_begin, block_end) of the
 * single row. */
typedef struct {
    const Mix *mix;
    ptrdiff_t row_begin, row_end, block_begin, block_end;
    RowShare *share;
    const float **rows; /* scratch: the current row of each input */
    double *offsets;    /* one per block of a row */
    MixStatus status;
    ptrdiff_t row; /* the sequence at fault, with status */
    int which;     /* the input at fault, with status */
    double row_max, row_sum;
} Job;

static void pass_a(Job *job, ptrdiff_t r, ptrdiff_t b_begin, ptrdiff_t b_end)
{
    const Mix *mix = job->mix;
    job->row = r;
    job->row_max = -INFINITY;
    job->row_sum = 0.0;
    for (int j = 0; j < mix->n_in; j++)
        job->rows[j] = mix->row0[j] + r * mix->stride[j];
    job->status = mix_blocks(mix->dst + r * mix->dst_stride, job->rows, mix->c, mix->c32, mix->n_in, mix->n_vocab,
                             b_begin, b_end, job->offsets, &job->row_max, &job->row_sum, &job->which);
}

/* A job of whole rows. */
static void run_rows(Job *job)
{
    const Mix *mix = job->mix;
    job->status = MIX_OK;
    for (ptrdiff_t r = job->row_begin; r < job->row_end && job->status == MIX_OK; r++) {
        pass_a(job, r, 0, mix->n_blocks);
        if (job->status != MIX_OK)
            break;
        if (job->row_max == -INFINITY) /* nothing was written: the inputs are intact for the diagnosis */
            job->status = explain_all_masked(job->rows, mix->n_in, mix->n_vocab, &job->which);
        else
            normalize_blocks(mix->dst + r * mix->dst_stride, job->offsets, mix->n_vocab, 0, mix->n_blocks,
                             job->row_max + log2(job->row_sum));
    }
}

/* A worker's part of a shared row. */
static void run_share(Job *job)
{
    RowShare *share = job->share;
    pass_a(job, 0, job->block_begin, job->block_end);
    monitor_enter(&share->monitor);
    share->reported++;
    monitor_notify(&share->monitor);
    while (!share->decided)
        monitor_wait(&share->monitor);
    int go = share->go;
    monitor_leave(&share->monitor);
    if (go)
        normalize_blocks(job->mix->dst, job->offsets, job->mix->n_vocab, job->block_begin, job->block_end,
                         share->log2_sum_exp);
}

static void run_job(Job *job)
{
    if (job->share)
        run_share(job);
    else
        run_rows(job);
}

#ifdef _WIN32
typedef HANDLE Thread;
static DWORD WINAPI thread_main(LPVOID job)
{
    run_job((Job *)job);
    return 0;
}
static int thread_start(Thread *thread, Job *job)
{
    *thread = CreateThread(NULL, 0, thread_main, job, 0, NULL);
    return *thread != NULL;
}
static void thread_join(Thread thread)
{
    WaitForSingleObject(thread, INFINITE);
    CloseHandle(thread);
}
#else
typedef pthread_t Thread;
static void *thread_main(void *job)
{
    run_job((Job *)job);
    return NULL;
}
static int thread_start(Thread *thread, Job *job)
{
    return pthread_create(thread, NULL, thread_main, job) == 0;
}
static void thread_join(Thread thread)
{
    pthread_join(thread, NULL);
}
#endif

/* One row split by blocks. Job 0 is this thread's; it combines the others' pass A and decides on pass B. A job
 * whose thread did not start is done here. */
static void run_shared_row(const Mix *mix, Job *jobs, int n_jobs)
{
    Thread threads[MAX_THREADS];
    int started[MAX_THREADS] = {0}, n_started = 0;
    RowShare share = {0};
    monitor_init(&share.monitor);
    for (int i = 1; i < n_jobs; i++) {
        jobs[i].share = &share;
        started[i] = thread_start(&threads[i], &jobs[i]);
        n_started += started[i];
    }
    for (int i = 0; i < n_jobs; i++)
        if (!started[i])
            pass_a(&jobs[i], 0, jobs[i].block_begin, jobs[i].block_end);
    monitor_enter(&share.monitor);
    while (share.reported < n_started)
        monitor_wait(&share.monitor);
    monitor_leave(&share.monitor);

    double row_max = -INFINITY, row_sum = 0.0;
    int ok = 1;
    for (int i = 0; i < n_jobs && ok; i++) {
        ok = jobs[i].status == MIX_OK;
        fold(&row_max, &row_sum, jobs[i].row_max, jobs[i].row_sum);
    }
    if (ok && row_max == -INFINITY) {
        jobs[0].status = explain_all_masked(jobs[0].rows, mix->n_in, mix->n_vocab, &jobs[0].which);
        ok = 0;
    }

    monitor_enter(&share.monitor);
    share.decided = 1;
    share.go = ok;
    share.log2_sum_exp = row_max + log2(row_sum);
    monitor_notify(&share.monitor);
    monitor_leave(&share.monitor);
    for (int i = 0; i < n_jobs; i++)
        if (!started[i] && ok)
            normalize_blocks(mix->dst, jobs[i].offsets, mix->n_vocab, jobs[i].block_begin, jobs[i].block_end,
                             share.log2_sum_exp);
    for (int i = 1; i < n_jobs; i++)
        if (started[i])
            thread_join(threads[i]);
    monitor_destroy(&share.monitor);
}

/* Rows split between jobs: job 0 here, the others on threads of their own (or here too, if one cannot start). */
static void run_row_jobs(Job *jobs, int n_jobs)
{
    Thread threads[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 1; i < n_jobs; i++)
        started[i] = thread_start(&threads[i], &jobs[i]);
    run_rows(&jobs[0]);
    for (int i = 1; i < n_jobs; i++) {
        if (started[i])
            thread_join(threads[i]);
        else
            run_rows(&jobs[i]);
    }
}

/* The whole call: n_threads jobs over rows (a batch) or over the blocks of the one row. Returns the first error in
 * row order, with its job in *failed. */
static MixStatus run_mix(const Mix *mix, ptrdiff_t n_rows, int n_threads, Job *jobs, const float **rows,
                         double *offsets, Job **failed)
{
    int shared_row = n_rows == 1 && n_threads > 1;
    for (int i = 0; i < n_threads; i++) {
        Job *job = &jobs[i];
        job->mix = mix;
        job->share = NULL;
        job->status = MIX_OK;
        job->rows = rows + (size_t)i * mix->n_in;
        if (shared_row) {
            job->block_begin = mix->n_blocks * i / n_threads;
            job->block_end = mix->n_blocks * (i + 1) / n_threads;
            job->offsets = offsets; /* one row: each job fills its own blocks */
        } else {
            job->row_begin = n_rows * i / n_threads;
            job->row_end = n_rows * (i + 1) / n_threads;
            job->offsets = offsets + (size_t)i * mix->n_blocks;
        }
    }
    if (shared_row)
        run_shared_row(mix, jobs, n_threads);
    else
        run_row_jobs(jobs, n_threads);
    for (int i = 0; i < n_threads; i++)
        if (jobs[i].status != MIX_OK) {
            *failed = &jobs[i];
            return jobs[i].status;
        }
    return MIX_OK;
}

MixResult genarm_mix_rows(const MixSpec *spec, int n_threads)
{
    MixResult result = {MIX_NO_MEMORY, 0, 0};
    ptrdiff_t n_blocks = (spec->n_vocab + BLOCK - 1) / BLOCK;
    ptrdiff_t useful = spec->n_rows * spec->n_vocab / MIN_TOKENS_PER_THREAD; /* a batch splits by rows */
    if (spec->n_rows > 1 && useful > spec->n_rows)
        useful = spec->n_rows;
    if (n_threads > MAX_THREADS)
        n_threads = MAX_THREADS;
    if (n_threads > useful)
        n_threads = useful > 1 ? (int)useful : 1;

    /* One allocation for every scratch array, doubles first for alignment. */
    size_t n_in = (size_t)spec->n_in, n_jobs = (size_t)n_threads;
    size_t doubles = n_in + n_jobs * (size_t)n_blocks, size = doubles * sizeof(double) + n_jobs * sizeof(Job)
                     + n_jobs * n_in * sizeof(const float *) + n_in * sizeof(float);
    char *scratch = malloc(size ? size : 1);
    if (!scratch)
        return result;
    Mix mix = {spec->dst, spec->dst_stride, spec->n_vocab, n_blocks, spec->n_in, spec->row0, spec->stride,
               (double *)scratch, NULL};
    double *offsets = mix.c + n_in;
    Job *jobs = (Job *)(offsets + n_jobs * (size_t)n_blocks);
    const float **rows = (const float **)(jobs + n_jobs);
    mix.c32 = (float *)(rows + n_jobs * n_in);
    for (int j = 0; j < spec->n_in; j++) {
        mix.c[j] = spec->weight[j] * LOG2E;
        mix.c32[j] = (float)mix.c[j];
    }

    Job *failed = NULL;
    result.status = run_mix(&mix, spec->n_rows, n_threads, jobs, rows, offsets, &failed);
    if (result.status != MIX_OK) {
        result.sequence = failed->row;
        result.input = failed->which;
    }
    free(scratch);
    return result;
}
