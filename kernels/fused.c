/*
 * fused.c: the GenARM guidance kernel, built as genarm_local._fused.
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
 * Why C. With Gemma-3's 262,144-token vocabulary numpy spends ~4.6 ms per token on this (a dozen full passes over
 * temporaries and three exponentials per token). Here every input row is read once, dst is written twice, there is
 * one exponential per token, a polynomial the compiler vectorises, and the GIL is released so other threads go on.
 *
 * How, per row, in blocks of BLOCK tokens that stay in L1:
 *   A. mixed[t] = sum_j c_j * x_j[t]. In float32 when that is provably within 2^-14 (real logits), else in double
 *      (logits scaled by 1000, masked or corrupt tokens), see mix_block_f32. The block's max m_b is taken,
 *      rel[t] = mixed[t] - m_b <= 0 is stored in dst and sum_t exp(rel[t]) is folded into the row's running
 *      (max M, sum S), the streaming logsumexp. Storing values relative to their own block's max keeps the tokens
 *      that matter, those near the max, exact in float32.
 *   B. dst[t] = rel[t] + (m_b - M - log S), over dst only.
 * A row can be split between threads by blocks (pass A), a batch by rows.
 *
 * Masked tokens: a token that is -inf in any row with nonzero weight is -inf in the output, whatever the sign of
 * the weight (p^alpha of a token a model forbids is taken as 0, never as +inf). Rows with weight 0 are not read.
 * NaN or +inf in a row read, or a row with no token left, is reported as FloatingPointError naming the row and
 * the sequence; dst's contents are then unspecified.
 *
 * dst may be the base row itself (same address and stride: the normal in-place use on llama.cpp's logits), since
 * each block is read in full before it is written; any other overlap with an input is refused.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef _WIN32
#include <windows.h>
#else
#include <pthread.h>
#endif

#define BLOCK 1024              /* tokens per block: 4 KiB of floats (8 KiB of doubles), well inside L1 */
#define MAX_THREADS 64
#define MIN_TOKENS_PER_THREAD 65536 /* below this a thread costs more to start (~30 us) than it saves */
#define LANES 8    /* independent accumulators, one AVX2 vector of floats: sums need no reassociation */

#ifdef _MSC_VER
#define RESTRICT __restrict
#else
#define RESTRICT restrict
#endif

/* The hot functions are compiled twice where GCC can dispatch at load time (glibc ifunc): once for the x86-64
 * baseline (SSE2), once for AVX2 + FMA. Wheels are moved between machines, so -march=native is not an option. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#define HOT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HOT_CLONES
#endif

static inline float float_from_bits(uint32_t bits)
{
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* exp(x) for x <= 0, written so compilers vectorise it (a call to libm's expf stops the vectoriser).
 * exp(x) = 2^n * e^r with n = round(x / ln 2) and |r| <= ln(2)/2; e^r by a degree-5 polynomial fitted for least
 * maximum relative error on that interval (7.5e-8). Evaluated in float32 the whole is within 4e-7 of exp(x) for
 * x in [-87, 0]. Below -87 (-inf included) it returns exp(-87) ~ 1.6e-38: such terms are only ever summed next to
 * exp(0) = 1. NaN gives an unspecified value: the exact path checks for NaN itself. */
static inline float exp_nonpos(float x)
{
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it leaves round(y) in the low mantissa bits */
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.44269504f + round_magic;
    float n = t - round_magic;
    float r = x - n * 0.693147182f; /* ln 2 rounded: costs |n| * 2e-9 relative, nothing next to the polynomial */
    float p = 1.0000001f + r * (0.9999997f + r * (0.49998894f + r * (0.16667575f + r * (0.041915383f
              + r * 0.0082976548f))));
    /* Multiply by 2^n by adding n to p's exponent field. t's bit pattern is 0x4B400000 + n, and shifting it left
     * by 23 keeps exactly n << 23. p's exponent is 126 or 127 and n >= -126, so the result stays a float (at worst
     * a value below 2^-126 read wrongly, which the sums cannot notice). */
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
 * path; and with `last`, *max_key = the largest mixed value's order key. The flags are constants at every call
 * site, so each combination compiles to its own straight loop. */
static inline void mix_f32(float *RESTRICT mixed, const float *RESTRICT x0, float c0, const float *RESTRICT x1,
                           float c1, Py_ssize_t n, int add, int pair, int last, uint32_t *abs0, uint32_t *abs1,
                           int32_t *max_key)
{
    uint32_t a0 = 0, a1 = 0;
    int32_t best = INT32_MIN;
    for (Py_ssize_t t = 0; t < n; t++) {
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
        }
    }
    *abs0 = a0;
    if (pair)
        *abs1 = a1;
    if (last)
        *max_key = best;
}

/* Fast path for one block, float32 throughout. Fails (returns 0) when the block holds a non-finite value or when
 * float32 could be off by more than 2^-14: fl(sum_j c_j x_j) errs by at most (n_in + 1) * 2^-24 * sum_j |c_j x_j|
 * (one rounding for each weight and each multiply-add), which the per-input maxima bound. Real logits (|x| below
 * ~100, a few ARMs) pass; logits scaled by 1000 or masked tokens take the exact path. */
static inline int mix_block_f32(float *RESTRICT mixed, const float *const *rows, const float *c32, const double *c,
                                int n_in, Py_ssize_t b0, Py_ssize_t n, float *max)
{
    uint32_t abs0 = 0, abs1 = 0;
    int32_t max_key = INT32_MIN;
    double bound; /* sum_j |c_j| max|x_j|: NaN or inf when the block holds one */
    if (n_in == 1) {
        mix_f32(mixed, rows[0] + b0, c32[0], NULL, 0.0f, n, 0, 0, 1, &abs0, NULL, &max_key);
        bound = fabs(c[0]) * float_from_bits(abs0);
    } else {
        /* The first two inputs in one pass, any others one by one; the max rides on the last pass. */
        mix_f32(mixed, rows[0] + b0, c32[0], rows[1] + b0, c32[1], n, 0, 1, n_in == 2, &abs0, &abs1, &max_key);
        bound = fabs(c[0]) * float_from_bits(abs0) + fabs(c[1]) * float_from_bits(abs1);
        for (int j = 2; j < n_in; j++) {
            if (j < n_in - 1)
                mix_f32(mixed, rows[j] + b0, c32[j], NULL, 0.0f, n, 1, 0, 0, &abs0, NULL, &max_key);
            else
                mix_f32(mixed, rows[j] + b0, c32[j], NULL, 0.0f, n, 1, 0, 1, &abs0, NULL, &max_key);
            bound += fabs(c[j]) * float_from_bits(abs0);
        }
    }
    *max = from_order_key32(max_key);
    return bound * (n_in + 1) <= 1024.0; /* (n_in + 1) * 2^-24 * bound <= 2^-14 */
}

/* dst[t] = mixed[t] - m (exact near the max), returning sum_t exp(dst[t]). */
static inline double shift_sum_exp_f32(float *RESTRICT dst, const float *RESTRICT mixed, float m, Py_ssize_t n)
{
    float lane[LANES];
    Py_ssize_t t = 0;
    for (int l = 0; l < LANES; l++)
        lane[l] = 0.0f;
    for (; t + LANES <= n; t += LANES)
        for (int l = 0; l < LANES; l++) {
            float r = mixed[t + l] - m;
            dst[t + l] = r;
            lane[l] += exp_nonpos(r);
        }
    for (; t < n; t++) {
        float r = mixed[t] - m;
        dst[t] = r;
        lane[0] += exp_nonpos(r);
    }
    double s = 0.0;
    for (int l = 0; l < LANES; l++)
        s += lane[l];
    return s;
}

/* Exact path: mixed[t] += c * x[t] in double, with a -inf in x giving -inf for either sign of c. For c < 0,
 * (x - x) turns a +inf or NaN input into NaN, so a corrupt value cannot pass for a masked token. */
static inline void add_weighted_f64(double *RESTRICT mixed, const float *RESTRICT x, double c, Py_ssize_t n)
{
    if (c > 0) {
        for (Py_ssize_t t = 0; t < n; t++)
            mixed[t] += c * (double)x[t];
    } else {
        for (Py_ssize_t t = 0; t < n; t++) {
            double xd = x[t], term = c * xd + (xd - xd);
            mixed[t] += xd == -INFINITY ? -INFINITY : term;
        }
    }
}

/* Largest value. A NaN may or may not win; either way it reaches the sum of exponentials, where it is caught. */
static inline double max_f64(const double *RESTRICT v, Py_ssize_t n)
{
    int64_t best = INT64_MIN;
    for (Py_ssize_t t = 0; t < n; t++) {
        int64_t key = order_key64(v[t]);
        best = key > best ? key : best;
    }
    return from_order_key64(best);
}

/* rel[t] = (float)(mixed[t] - m), returning sum_t exp(rel[t]). */
static inline double shift_sum_exp_f64(float *RESTRICT rel, const double *RESTRICT mixed, double m, Py_ssize_t n)
{
    float lane[LANES];
    Py_ssize_t t = 0;
    for (int l = 0; l < LANES; l++)
        lane[l] = 0.0f;
    for (; t + LANES <= n; t += LANES)
        for (int l = 0; l < LANES; l++) {
            float r = (float)(mixed[t + l] - m);
            rel[t + l] = r;
            lane[l] += exp_nonpos(r);
        }
    for (; t < n; t++) {
        float r = (float)(mixed[t] - m);
        rel[t] = r;
        lane[0] += exp_nonpos(r);
    }
    double s = 0.0;
    for (int l = 0; l < LANES; l++)
        s += lane[l];
    return s;
}

typedef enum {
    MIX_OK,
    MIX_MASKED_BLOCK,
    MIX_NAN,
    MIX_POSINF,
    MIX_OVERFLOW,
    MIX_ROW_MASKED,
    MIX_NO_COMMON_TOKEN,
} MixStatus;

/* Cold path: which input holds a NaN (preferred) or +inf in tokens [b0, b0 + n)? Neither: weights times logits
 * overflowed. */
static MixStatus find_bad_value(const float *const *rows, int n_in, Py_ssize_t b0, Py_ssize_t n, int *which)
{
    for (int j = 0; j < n_in; j++)
        for (Py_ssize_t t = b0; t < b0 + n; t++)
            if (isnan(rows[j][t])) {
                *which = j;
                return MIX_NAN;
            }
    for (int j = 0; j < n_in; j++)
        for (Py_ssize_t t = b0; t < b0 + n; t++)
            if (rows[j][t] == INFINITY) {
                *which = j;
                return MIX_POSINF;
            }
    *which = 0;
    return MIX_OVERFLOW;
}

/* Cold path: every token came out -inf. One row masks everything, or the rows' masks do not overlap. */
static MixStatus explain_all_masked(const float *const *rows, int n_in, Py_ssize_t n_vocab, int *which)
{
    for (int j = 0; j < n_in; j++) {
        Py_ssize_t t = 0;
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
                                      Py_ssize_t b0, Py_ssize_t n, double *max, double *sum, int *which)
{
    double mixed[BLOCK];
    float rel[BLOCK];
    for (Py_ssize_t t = 0; t < n; t++)
        mixed[t] = 0.0;
    for (int j = 0; j < n_in; j++)
        add_weighted_f64(mixed, rows[j] + b0, c[j], n);
    int has_nan = 0;
    for (Py_ssize_t t = 0; t < n; t++)
        has_nan |= mixed[t] != mixed[t];
    double m = max_f64(mixed, n);
    if (has_nan || m == INFINITY) /* from a NaN or +inf input (NaN also from +inf meeting -inf) */
        return find_bad_value(rows, n_in, b0, n, which);
    if (m == -INFINITY)
        return MIX_MASKED_BLOCK;
    *max = m;
    *sum = shift_sum_exp_f64(rel, mixed, m, n);
    /* Written only now: when dst is the base, the block's inputs stay intact for the error messages above. */
    memcpy(dst + b0, rel, (size_t)n * sizeof *dst);
    return MIX_OK;
}

/* The streaming logsumexp: fold a block with max m and sum of exp(x - m) s into (row_max, row_sum). */
static void fold(double *row_max, double *row_sum, double m, double s)
{
    if (m == -INFINITY)
        return;
    if (m > *row_max) {
        *row_sum = *row_sum * exp(*row_max - m) + s;
        *row_max = m;
    } else {
        *row_sum += s * exp(m - *row_max);
    }
}

/* Pass A over blocks [b_begin, b_end) of one row: rows[j] are the n_in inputs with nonzero weight c[j] (c32[j] the
 * same in float32). Leaves each block's max in offsets[b] and folds the blocks into (*row_max, *row_sum). On error,
 * *which is the index into rows of the input at fault. */
HOT_CLONES
static MixStatus mix_blocks(float *dst, const float *const *rows, const double *c, const float *c32, int n_in,
                            Py_ssize_t n_vocab, Py_ssize_t b_begin, Py_ssize_t b_end, double *offsets,
                            double *row_max, double *row_sum, int *which)
{
    float mixed[BLOCK];
    for (Py_ssize_t b = b_begin; b < b_end; b++) {
        Py_ssize_t b0 = b * BLOCK, n = n_vocab - b0 < BLOCK ? n_vocab - b0 : BLOCK;
        float m32;
        double m, s;
        if (n_in > 0 && mix_block_f32(mixed, rows, c32, c, n_in, b0, n, &m32)) {
            m = m32;
            s = shift_sum_exp_f32(dst + b0, mixed, m32, n);
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

/* Pass B: shift every block from its own max to the row's normalisation. */
HOT_CLONES
static void normalize_row(float *dst, const double *offsets, Py_ssize_t n_vocab, double logsumexp)
{
    for (Py_ssize_t b0 = 0; b0 < n_vocab; b0 += BLOCK) {
        Py_ssize_t n = n_vocab - b0 < BLOCK ? n_vocab - b0 : BLOCK;
        float *out = dst + b0;
        double offset = offsets[b0 / BLOCK];
        if (offset == -INFINITY) {
            for (Py_ssize_t t = 0; t < n; t++)
                out[t] = -INFINITY;
        } else {
            float shift = (float)(offset - logsumexp);
            for (Py_ssize_t t = 0; t < n; t++)
                out[t] += shift;
        }
    }
}

/* Everything one call mixes: the inputs with nonzero weight and where their rows start. */
typedef struct {
    float *dst;
    Py_ssize_t dst_stride, n_vocab, n_blocks;
    int n_in;
    float **row0;       /* first row of each input */
    Py_ssize_t *stride; /* floats between sequences, per input */
    double *c;
    float *c32;
} Mix;

/* One thread's share: whole rows [row_begin, row_end), or (split_row) pass A over blocks [block_begin, block_end)
 * of row row_begin only, the caller finishing the row. */
typedef struct {
    const Mix *mix;
    Py_ssize_t row_begin, row_end, block_begin, block_end;
    int split_row;
    const float **rows; /* scratch: the current row of each input */
    double *offsets;    /* one per block of a row */
    MixStatus status;
    Py_ssize_t row; /* the sequence at fault, with status */
    int which;      /* the input at fault, with status */
    double row_max, row_sum;
} Job;

static void point_rows(const Mix *mix, const float **rows, Py_ssize_t r)
{
    for (int j = 0; j < mix->n_in; j++)
        rows[j] = mix->row0[j] + r * mix->stride[j];
}

/* After pass A over a whole row: normalise it, or explain why there is nothing to normalise. */
static MixStatus finish_row(const Mix *mix, float *dst, const float *const *rows, const double *offsets,
                            double row_max, double row_sum, int *which)
{
    if (row_max == -INFINITY)
        return explain_all_masked(rows, mix->n_in, mix->n_vocab, which);
    normalize_row(dst, offsets, mix->n_vocab, row_max + log(row_sum));
    return MIX_OK;
}

static void run_job(Job *job)
{
    const Mix *mix = job->mix;
    job->status = MIX_OK;
    for (Py_ssize_t r = job->row_begin; r < job->row_end && job->status == MIX_OK; r++) {
        float *dst = mix->dst + r * mix->dst_stride;
        Py_ssize_t b_begin = job->split_row ? job->block_begin : 0;
        Py_ssize_t b_end = job->split_row ? job->block_end : mix->n_blocks;
        job->row = r;
        job->row_max = -INFINITY;
        job->row_sum = 0.0;
        point_rows(mix, job->rows, r);
        job->status = mix_blocks(dst, job->rows, mix->c, mix->c32, mix->n_in, mix->n_vocab, b_begin, b_end,
                                 job->offsets, &job->row_max, &job->row_sum, &job->which);
        if (job->status == MIX_OK && !job->split_row)
            job->status = finish_row(mix, dst, job->rows, job->offsets, job->row_max, job->row_sum, &job->which);
    }
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

/* Job 0 on the calling thread, the others on threads of their own (or here too, if a thread cannot start). */
static void run_jobs(Job *jobs, int n_jobs)
{
    Thread threads[MAX_THREADS];
    int started[MAX_THREADS];
    for (int i = 1; i < n_jobs; i++)
        started[i] = thread_start(&threads[i], &jobs[i]);
    run_job(&jobs[0]);
    for (int i = 1; i < n_jobs; i++) {
        if (started[i])
            thread_join(threads[i]);
        else
            run_job(&jobs[i]);
    }
}

/* The whole call, without the GIL: n_threads jobs over rows (a batch) or over the blocks of the one row. Returns the
 * first error in row order, with its job in *failed. */
static MixStatus run_mix(const Mix *mix, Py_ssize_t n_rows, int n_threads, Job *jobs, const float **rows,
                         double *offsets, Job **failed)
{
    int split_row = n_rows == 1 && n_threads > 1;
    for (int i = 0; i < n_threads; i++) {
        Job *job = &jobs[i];
        job->mix = mix;
        job->split_row = split_row;
        job->rows = rows + (size_t)i * mix->n_in;
        if (split_row) {
            job->row_begin = 0;
            job->row_end = 1;
            job->block_begin = mix->n_blocks * i / n_threads;
            job->block_end = mix->n_blocks * (i + 1) / n_threads;
            job->offsets = offsets; /* one row: each job fills its own blocks */
        } else {
            job->row_begin = n_rows * i / n_threads;
            job->row_end = n_rows * (i + 1) / n_threads;
            job->offsets = offsets + (size_t)i * mix->n_blocks;
        }
    }
    run_jobs(jobs, n_threads);
    for (int i = 0; i < n_threads; i++)
        if (jobs[i].status != MIX_OK) {
            *failed = &jobs[i];
            return jobs[i].status;
        }
    if (!split_row)
        return MIX_OK;
    double row_max = -INFINITY, row_sum = 0.0;
    for (int i = 0; i < n_threads; i++)
        fold(&row_max, &row_sum, jobs[i].row_max, jobs[i].row_sum);
    *failed = &jobs[0];
    jobs[0].status = finish_row(mix, mix->dst, jobs[0].rows, offsets, row_max, row_sum, &jobs[0].which);
    return jobs[0].status;
}

/* ---- Python glue: argument checking, buffers, GIL ---------------------------------------------------------- */

/* A row source: an int address or a float32 buffer, first element at ptr, rows `stride` floats apart. */
typedef struct {
    char name[32]; /* "dst", "base row", "ARM row 3" */
    float *ptr;
    Py_ssize_t stride;
    Py_buffer view;
    int has_view;
} Source;

static int native_float32_format(const char *format)
{
    if (format == NULL) /* PyBUF_FORMAT not honoured: unsigned bytes */
        return 0;
    if (*format == '@' || *format == '=')
        format++;
#if PY_LITTLE_ENDIAN
    else if (*format == '<')
        format++;
#else
    else if (*format == '>' || *format == '!')
        format++;
#endif
    return strcmp(format, "f") == 0;
}

/* Resolve obj to a float pointer with at least `needed` floats behind it. 0 on success, -1 with an exception. */
static int source_open(Source *src, PyObject *obj, Py_ssize_t needed, int writable)
{
    src->has_view = 0;
    if (PyLong_Check(obj) && !PyBool_Check(obj)) {
        src->ptr = (float *)PyLong_AsVoidPtr(obj);
        if (src->ptr == NULL) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "%s is a null address", src->name);
            return -1;
        }
        return 0;
    }
    if (!PyObject_CheckBuffer(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a float32 buffer or an address (int), not %.100s", src->name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (PyObject_GetBuffer(obj, &src->view, PyBUF_FORMAT | PyBUF_STRIDES) < 0)
        return -1;
    src->has_view = 1;
    if (src->view.itemsize != 4 || !native_float32_format(src->view.format)) {
        PyErr_Format(PyExc_TypeError, "%s must hold float32, got buffer format '%s'", src->name,
                     src->view.format ? src->view.format : "B");
        return -1;
    }
    if (!PyBuffer_IsContiguous(&src->view, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous buffer", src->name);
        return -1;
    }
    if (writable && src->view.readonly) {
        PyErr_Format(PyExc_ValueError, "%s is read-only", src->name);
        return -1;
    }
    if (src->view.len / 4 < needed) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd floats but needs %zd (n_rows, stride and n_vocab)", src->name,
                     src->view.len / 4, needed);
        return -1;
    }
    src->ptr = (float *)src->view.buf;
    return 0;
}

static void source_close(Source *src)
{
    if (src->has_view)
        PyBuffer_Release(&src->view);
    src->has_view = 0;
}

/* Floats spanned by n_rows rows of n_vocab at this stride, or -1 on overflow. */
static Py_ssize_t span(Py_ssize_t n_rows, Py_ssize_t stride, Py_ssize_t n_vocab)
{
    if (n_rows > 1 && stride > (PY_SSIZE_T_MAX / 4 - n_vocab) / (n_rows - 1))
        return -1;
    return (n_rows - 1) * stride + n_vocab;
}

/* dst may coincide with an input row for row (same start, same stride) but must not overlap it otherwise. */
static int check_overlap(const Source *dst, const Source *src, Py_ssize_t n_rows, Py_ssize_t n_vocab)
{
    if (dst->ptr == src->ptr && dst->stride == src->stride)
        return 0;
    const char *d0 = (const char *)dst->ptr, *s0 = (const char *)src->ptr;
    const char *d1 = d0 + 4 * span(n_rows, dst->stride, n_vocab), *s1 = s0 + 4 * span(n_rows, src->stride, n_vocab);
    if (d0 < s1 && s0 < d1) {
        PyErr_Format(PyExc_ValueError, "dst overlaps %s without being the same rows; write into the base row itself "
                     "or into a separate buffer", src->name);
        return -1;
    }
    return 0;
}

/* Raise the FloatingPointError for a failed job. */
static void raise_mix_error(MixStatus status, const Job *job, const Source *sources, const int *label)
{
    const char *name = job->mix->n_in > 0 ? sources[label[job->which]].name : "mix";
    Py_ssize_t r = job->row;
    if (status == MIX_NAN)
        PyErr_Format(PyExc_FloatingPointError, "NaN in %s (sequence %zd)", name, r);
    else if (status == MIX_POSINF)
        PyErr_Format(PyExc_FloatingPointError, "+inf in %s (sequence %zd): logits must be finite or -inf", name, r);
    else if (status == MIX_OVERFLOW)
        PyErr_Format(PyExc_FloatingPointError, "weights times logits overflow in sequence %zd: weights too large", r);
    else if (status == MIX_ROW_MASKED)
        PyErr_Format(PyExc_FloatingPointError, "%s (sequence %zd) is -inf for every token: nothing to sample", name,
                     r);
    else
        PyErr_Format(PyExc_FloatingPointError,
                     "no token of sequence %zd is allowed by every row: the -inf masks of the base and ARM rows do "
                     "not overlap", r);
}

PyDoc_STRVAR(mix_doc,
    "mix(dst, base, arms, weights, base_weight, n_vocab, n_rows, base_stride, arm_strides, n_threads)\n--\n\n"
    "Write log_softmax(base_weight*base + sum_i weights[i]*arms[i]) into dst for n_rows sequences.\n"
    "Rows are float32 buffers or addresses (int); dst shares base_stride. Weight-0 rows are not read.\n"
    "Use genarm_local.mixing.mix_logprobs, which documents the arguments.");

static PyObject *mix(PyObject *self, PyObject *args)
{
    PyObject *dst_obj, *base_obj, *arms_obj, *weights_obj, *strides_obj;
    PyObject *arms = NULL, *weights = NULL, *strides = NULL, *result = NULL;
    double base_weight;
    Py_ssize_t n_vocab, n_rows, base_stride, n_arms = 0, n_sources = 0;
    int n_threads;
    Source *sources = NULL; /* [0] = dst, [1] = base, [2 + i] = ARM i */
    int *label = NULL;      /* input j of the mix is sources[label[j]] */
    Mix mix = {0};
    Job *jobs = NULL;
    const float **rows = NULL;
    double *offsets = NULL;
    (void)self;

    if (!PyArg_ParseTuple(args, "OOOOdnnnOi:mix", &dst_obj, &base_obj, &arms_obj, &weights_obj, &base_weight,
                          &n_vocab, &n_rows, &base_stride, &strides_obj, &n_threads))
        return NULL;
    if (n_vocab <= 0 || n_rows <= 0) {
        PyErr_Format(PyExc_ValueError, "n_vocab and n_rows must be positive, got %zd and %zd", n_vocab, n_rows);
        return NULL;
    }
    if (base_stride < n_vocab) {
        PyErr_Format(PyExc_ValueError, "base_stride %zd is shorter than n_vocab %zd", base_stride, n_vocab);
        return NULL;
    }
    if (!isfinite(base_weight)) {
        PyErr_SetString(PyExc_ValueError, "base_weight must be finite");
        return NULL;
    }
    if (n_threads < 1) {
        PyErr_Format(PyExc_ValueError, "n_threads must be at least 1, got %d", n_threads);
        return NULL;
    }
    arms = PySequence_Fast(arms_obj, "arms must be a sequence");
    weights = arms ? PySequence_Fast(weights_obj, "weights must be a sequence") : NULL;
    strides = weights ? PySequence_Fast(strides_obj, "arm_strides must be a sequence") : NULL;
    if (!strides)
        goto done;
    n_arms = PySequence_Fast_GET_SIZE(arms);
    if (PySequence_Fast_GET_SIZE(weights) != n_arms || PySequence_Fast_GET_SIZE(strides) != n_arms) {
        PyErr_Format(PyExc_ValueError, "got %zd ARM rows, %zd weights and %zd strides; they must match", n_arms,
                     PySequence_Fast_GET_SIZE(weights), PySequence_Fast_GET_SIZE(strides));
        goto done;
    }
    if (n_arms > 1024) {
        PyErr_Format(PyExc_ValueError, "at most 1024 ARM rows, got %zd", n_arms);
        goto done;
    }

    /* Threads only where each has enough tokens to pay for itself; a batch splits by rows, one row by blocks. */
    mix.n_vocab = n_vocab;
    mix.n_blocks = (n_vocab + BLOCK - 1) / BLOCK;
    if (n_threads > MAX_THREADS)
        n_threads = MAX_THREADS;
    if (n_threads > n_rows * n_vocab / MIN_TOKENS_PER_THREAD)
        n_threads = (int)(n_rows * n_vocab / MIN_TOKENS_PER_THREAD);
    if (n_threads > 1 && n_rows > 1 && n_threads > n_rows)
        n_threads = (int)n_rows;
    if (n_threads < 1)
        n_threads = 1;

    size_t n_inputs = (size_t)n_arms + 1;
    sources = PyMem_Calloc(n_inputs + 1, sizeof *sources);
    label = PyMem_Calloc(n_inputs, sizeof *label);
    mix.row0 = PyMem_Calloc(n_inputs, sizeof *mix.row0);
    mix.stride = PyMem_Calloc(n_inputs, sizeof *mix.stride);
    mix.c = PyMem_Calloc(n_inputs, sizeof *mix.c);
    mix.c32 = PyMem_Calloc(n_inputs, sizeof *mix.c32);
    jobs = PyMem_Calloc((size_t)n_threads, sizeof *jobs);
    rows = PyMem_Calloc((size_t)n_threads * n_inputs, sizeof *rows);
    offsets = PyMem_Calloc((size_t)n_threads * (size_t)mix.n_blocks, sizeof *offsets);
    if (!sources || !label || !mix.row0 || !mix.stride || !mix.c || !mix.c32 || !jobs || !rows || !offsets) {
        PyErr_NoMemory();
        goto done;
    }

    /* dst and base first, then every ARM; a source with weight 0 is neither opened nor read. */
    for (Py_ssize_t s = 0; s < n_arms + 2; s++) {
        PyObject *obj;
        double weight;
        Source *src = &sources[s];
        if (s < 2) {
            obj = s == 0 ? dst_obj : base_obj;
            weight = s == 0 ? 1.0 : base_weight;
            src->stride = base_stride;
            snprintf(src->name, sizeof src->name, s == 0 ? "dst" : "base row");
        } else {
            PyObject *weight_obj = PySequence_Fast_GET_ITEM(weights, s - 2);
            obj = PySequence_Fast_GET_ITEM(arms, s - 2);
            snprintf(src->name, sizeof src->name, "ARM row %zd", s - 2);
            weight = PyFloat_AsDouble(weight_obj);
            if (weight == -1.0 && PyErr_Occurred()) {
                PyErr_Format(PyExc_TypeError, "weight of %s must be a number, not %.100s", src->name,
                             Py_TYPE(weight_obj)->tp_name);
                goto done;
            }
            if (!isfinite(weight)) {
                PyErr_Format(PyExc_ValueError, "weight of %s must be finite, got %R", src->name, weight_obj);
                goto done;
            }
            src->stride = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(strides, s - 2));
            if (src->stride == -1 && PyErr_Occurred())
                goto done;
            if (src->stride < n_vocab) {
                PyErr_Format(PyExc_ValueError, "stride of %s is %zd, shorter than n_vocab %zd", src->name,
                             src->stride, n_vocab);
                goto done;
            }
        }
        if (weight == 0.0)
            continue;
        Py_ssize_t needed = span(n_rows, src->stride, n_vocab);
        if (needed < 0) {
            PyErr_Format(PyExc_OverflowError, "%s: n_rows * stride is too large", src->name);
            goto done;
        }
        n_sources = s + 1;
        if (source_open(src, obj, needed, s == 0) < 0)
            goto done;
        if (s == 0)
            continue;
        if (check_overlap(&sources[0], src, n_rows, n_vocab) < 0)
            goto done;
        label[mix.n_in] = (int)s;
        mix.row0[mix.n_in] = src->ptr;
        mix.stride[mix.n_in] = src->stride;
        mix.c[mix.n_in] = weight;
        mix.c32[mix.n_in] = (float)weight;
        mix.n_in++;
    }
    mix.dst = sources[0].ptr;
    mix.dst_stride = base_stride;

    MixStatus status;
    Job *failed = NULL;
    Py_BEGIN_ALLOW_THREADS
    status = run_mix(&mix, n_rows, n_threads, jobs, rows, offsets, &failed);
    Py_END_ALLOW_THREADS
    if (status != MIX_OK) {
        raise_mix_error(status, failed, sources, label);
        goto done;
    }
    result = Py_NewRef(Py_None);

done:
    for (Py_ssize_t s = 0; s < n_sources; s++)
        source_close(&sources[s]);
    PyMem_Free(sources);
    PyMem_Free(label);
    PyMem_Free(mix.row0);
    PyMem_Free(mix.stride);
    PyMem_Free(mix.c);
    PyMem_Free(mix.c32);
    PyMem_Free(jobs);
    PyMem_Free(rows);
    PyMem_Free(offsets);
    Py_XDECREF(arms);
    Py_XDECREF(weights);
    Py_XDECREF(strides);
    return result;
}

static PyMethodDef fused_methods[] = {
    {"mix", mix, METH_VARARGS, mix_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fused_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fused",
    .m_doc = "GenARM guidance kernel: mixes base and ARM logits into log-probabilities.",
    .m_size = -1,
    .m_methods = fused_methods,
};

PyMODINIT_FUNC PyInit__fused(void)
{
    return PyModule_Create(&fused_module);
}
