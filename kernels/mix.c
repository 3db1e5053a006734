/*
 * mix.c: the GenARM guidance kernel, in plain C; fused.c makes it the Python module genarm_local.core._fused.
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
 * The base-plausibility guard (min_p = tau in [0, 1], off at 0). Before mixing, every token whose base probability
 * is below tau times that of the base's most likely token, i.e. whose raw base logit is below max(base) + ln tau,
 * is masked: the ARMs re-rank only what the base finds plausible and can never promote what it finds absurd (the
 * adaptive plausibility constraint of contrastive decoding, Li et al., "Contrastive Decoding", ACL 2023). The guard
 * reads the base row raw, whatever its weight w0 (even 0); the tokens left are mixed and renormalised as above.
 * The base's argmax always passes, so a row is emptied only if other masks remove that too (reported as today).
 * With tau = 0 nothing of the guard runs: the bits are those of the unguarded kernel.
 *
 * Why C. With Gemma-3's 262,144-token vocabulary numpy spends ~4.5 ms per token on this (a dozen full passes over
 * temporaries, three exponentials per token). Here every input row is read once and dst twice, there is one
 * exponential per token, a polynomial the compiler vectorises, and no lock, so the caller can drop the GIL.
 *
 * How, per row, in blocks of BLOCK tokens that stay in L1, in log2 units (weights times log2 e, so that the
 * exponential is a bare 2^y):
 *   G. (guard only) the base row's max, hence the cutoff below which a token is masked.
 *   A. mixed[t] = sum_j c_j * x_j[t]: in float32 where that is provably within 2^-14 nats (real logits), else in
 *      double (logits scaled by 1000, masked or corrupt tokens); see mix_block_f32. Tokens under the guard's
 *      cutoff become -inf. With the block's max m_b, rel[t] = mixed[t] - m_b <= 0 goes to dst, and the block's
 *      (m_b, sum_t 2^rel[t]) are kept; folded in block order they give the row's logsumexp (max M, sum S).
 *      Values relative to their own block's max keep the tokens that matter, those near the max, exact in float32.
 *   B. dst[t] = (rel[t] + m_b - M - log2 S) * ln 2, over dst only.
 * A batch is shared between threads by rows, one row by blocks, each pass in turn (threads.c). Every block is
 * computed the same way and folded in the same order whoever computes it, so the result does not depend on the
 * number of threads, bit for bit.
 *
 * Masked tokens: a token that is -inf in any row with nonzero weight is -inf in the output, whatever the sign of
 * the weight (p^alpha of a token a model forbids is taken as 0, never as +inf). Rows with weight 0 are not read
 * (but for the guard's base). A NaN or +inf in a row read, or a row with no token left, is reported (MixResult
 * names the input and the sequence); dst's contents are then unspecified.
 *
 * dst may be the base rows themselves (same address and stride: the normal in-place use on llama.cpp's logits),
 * since each block is read in full before it is written, and the guard's pass G ends before pass A starts.
 */
#include "mix.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mix_block.h"
#include "threads.h"

/* Threads. A batch is shared by rows, one row by chunks of CHUNK_BLOCKS blocks (16 chunks for Gemma-3's vocabulary; 8
 * and 16 measured alike, 32 worse), each thread with at least MIN_TOKENS_PER_THREAD tokens (~20 us of work on the
 * machine below, so that a worker's ~8 us wake-up cannot eat the gain).
 * Measured on a 2-vCPU AMD EPYC VM shared with other work, median us, 1 thread vs 2 (bench/bench_kernel.py): one
 * 262,144-token row, base + 1 ARM, 83 vs 83; + 3 ARMs 115 vs 115; a batch of 8 rows 692 vs 666; the same with the
 * logits just written by two threads, as after a decode: 86 vs 83, 121 vs 115, 728 vs 713. So 2 threads tie with 1
 * here (two threads of pure arithmetic on its two vCPUs run at 1.2x one, as SMT siblings would) and never lose, even
 * with every core busy; the per-call threads this pool replaced lost 40-70% on one row (112-136 vs 80-86 us) and
 * 1.2-4.6x on the batch. On real, idle cores (a Xeon VM ran the batch of 8 rows 1.7x faster on 2 per-call threads) the
 * second thread should pay on one row as well: its wake-up is small against the row's 80-170 us. */
#define MIN_TOKENS_PER_THREAD 65536
#define CHUNK_BLOCKS 16
/* One thread's scratch, and its first error. */
typedef struct {
    const float **rows; /* the current row of each input */
    double *offsets;    /* with sums: each block's (max, sum of 2^(x - max)) in a row of its own */
    double *sums;
    MixStatus status;
    ptrdiff_t at; /* with an error: the sequence (a batch) or the block (one shared row) at fault */
    int which;    /* with an error: the input at fault */
} Worker;

/* A MixSpec with what the loops need: weights in log2 units (2^(c x) = e^(weight x)), also as floats; the threads'
 * scratch; and for one row shared by threads, its per-block results. */
typedef struct {
    float *dst;
    ptrdiff_t dst_stride, n_vocab, n_blocks;
    int n_in, n_workers;
    const float *const *row0;
    const ptrdiff_t *stride;
    double *c;
    float *c32;
    const float *guard_row0; /* NULL: no guard */
    ptrdiff_t guard_stride;
    double log_min_p;
    Worker *workers;
    /* One row shared by blocks: */
    int first_pass;    /* PASS_G with the guard, else PASS_A */
    double *offsets;   /* with sums: every block's (max, sum), as Worker's */
    double *sums;
    float *guard_maxima; /* every block's base max */
    float cutoff;
    double log2_sum_exp;
} Mix;

enum { PASS_G, PASS_A, PASS_B };

/* Pass A over blocks [b_begin, b_end) of one row: each block's (max, sum) in offsets[b] and sums[b]. rows are the
 * mix's inputs at this row, guard its base row under the guard. On error, *failed is the block, *which the input. */
HOT_CLONES
static MixStatus mix_blocks(const Mix *mix, float *dst, const float *const *rows, const float *guard, float cutoff,
                            ptrdiff_t b_begin, ptrdiff_t b_end, double *offsets, double *sums, ptrdiff_t *failed,
                            int *which)
{
    float mixed[BLOCK];
    for (ptrdiff_t b = b_begin; b < b_end; b++) {
        ptrdiff_t b0 = b * BLOCK, n = mix->n_vocab - b0 < BLOCK ? mix->n_vocab - b0 : BLOCK;
        float max32, min32;
        double m, s;
        if (mix->n_in > 0
            && mix_block_f32(mixed, rows, mix->c32, mix->c, mix->n_in, guard, cutoff, b0, n, &max32, &min32)) {
            m = max32;
            if (max32 == -INFINITY) /* all under the guard's cutoff: -inf in pass B */
                s = 0.0;
            else if (max32 - min32 <= 125.0f) /* real logits: a block spans ~80 */
                s = shift_sum_exp2_f32(dst + b0, mixed, max32, n, 0);
            else
                s = shift_sum_exp2_f32(dst + b0, mixed, max32, n, 1);
        } else {
            MixStatus status = mix_block_f64(dst, rows, mix->c, mix->n_in, guard, cutoff, b0, n, &m, &s, which);
            if (status == MIX_MASKED_BLOCK) {
                /* Filled with -inf in pass B: if the whole row is masked, dst (maybe the base) is still intact. */
                m = -INFINITY;
                s = 0.0;
            } else if (status != MIX_OK) {
                *failed = b;
                return status;
            }
        }
        offsets[b] = m;
        sums[b] = s;
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

/* The row's log2 of its sum of exponentials from its blocks, folded in block order; -inf when nothing is left.
 * Compiled like the passes, so that the fold rounds as it did inside pass A (FMA in the AVX2 build). */
HOT_CLONES
static double fold_blocks(const double *offsets, const double *sums, ptrdiff_t n_blocks)
{
    double row_max = -INFINITY, row_sum = 0.0;
    for (ptrdiff_t b = 0; b < n_blocks; b++)
        fold(&row_max, &row_sum, offsets[b], sums[b]);
    return row_max == -INFINITY ? -INFINITY : row_max + log2(row_sum);
}

/* One whole row r, all passes. */
static MixStatus mix_row(const Mix *mix, Worker *worker, ptrdiff_t r, ptrdiff_t *failed, int *which)
{
    float *dst = mix->dst + r * mix->dst_stride;
    const float *guard = NULL;
    float cutoff = 0.0f;
    for (int j = 0; j < mix->n_in; j++)
        worker->rows[j] = mix->row0[j] + r * mix->stride[j];
    if (mix->guard_row0) {
        float max;
        guard = mix->guard_row0 + r * mix->guard_stride;
        *which = MIX_GUARD_INPUT;
        MixStatus status = guard_max(guard, mix->n_vocab, &max);
        if (status != MIX_OK)
            return status;
        if (max == -INFINITY)
            return MIX_ROW_MASKED;
        cutoff = guard_cutoff(max, mix->log_min_p);
    }
    MixStatus status = mix_blocks(mix, dst, worker->rows, guard, cutoff, 0, mix->n_blocks, worker->offsets,
                                  worker->sums, failed, which);
    if (status != MIX_OK)
        return status;
    double log2_sum_exp = fold_blocks(worker->offsets, worker->sums, mix->n_blocks);
    if (log2_sum_exp == -INFINITY) /* nothing was written: the inputs are intact for the diagnosis */
        return explain_all_masked(worker->rows, mix->n_in, mix->n_vocab, which);
    normalize_blocks(dst, worker->offsets, mix->n_vocab, 0, mix->n_blocks, log2_sum_exp);
    return MIX_OK;
}

static void fail(Worker *worker, MixStatus status, ptrdiff_t at, int which)
{
    worker->status = status;
    worker->at = at;
    worker->which = which;
}

/* ParallelLoop body over the rows of a batch. A worker's rows come in increasing order, so after its first error
 * the rest cannot hold the batch's first. */
static void mix_row_range(void *ctx, int worker_index, int pass, ptrdiff_t begin, ptrdiff_t end)
{
    const Mix *mix = ctx;
    Worker *worker = &mix->workers[worker_index];
    (void)pass;
    for (ptrdiff_t r = begin; r < end && worker->status == MIX_OK; r++) {
        ptrdiff_t block;
        int which = 0;
        MixStatus status = mix_row(mix, worker, r, &block, &which);
        if (status != MIX_OK)
            fail(worker, status, r, which);
    }
}

/* ParallelLoop body over the blocks of one row, one pass at a time. */
static void mix_block_range(void *ctx, int worker_index, int pass, ptrdiff_t begin, ptrdiff_t end)
{
    Mix *mix = ctx;
    Worker *worker = &mix->workers[worker_index];
    if (worker->status != MIX_OK)
        return;
    if (pass + mix->first_pass == PASS_G) {
        for (ptrdiff_t b = begin; b < end; b++) {
            ptrdiff_t b0 = b * BLOCK, n = mix->n_vocab - b0 < BLOCK ? mix->n_vocab - b0 : BLOCK;
            MixStatus status = guard_max(mix->guard_row0 + b0, n, &mix->guard_maxima[b]);
            if (status != MIX_OK) {
                fail(worker, status, b, MIX_GUARD_INPUT);
                return;
            }
        }
    } else if (pass + mix->first_pass == PASS_A) {
        ptrdiff_t block = 0;
        int which = 0;
        MixStatus status = mix_blocks(mix, mix->dst, mix->row0, mix->guard_row0, mix->cutoff,
                                      begin, end, mix->offsets, mix->sums, &block, &which);
        if (status != MIX_OK)
            fail(worker, status, block, which);
    } else {
        normalize_blocks(mix->dst, mix->offsets, mix->n_vocab, begin, end, mix->log2_sum_exp);
    }
}

/* The first error in row (or block) order over all workers, or NULL. */
static const Worker *first_error(const Mix *mix)
{
    const Worker *first = NULL;
    for (int i = 0; i < mix->n_workers; i++) {
        const Worker *worker = &mix->workers[i];
        if (worker->status != MIX_OK && (!first || worker->at < first->at))
            first = worker;
    }
    return first;
}

/* Between the passes over one shared row: the guard's cutoff after pass G, the row's normalisation after pass A.
 * 0 stops the loop (an error, now in first_error). */
static int between_passes(void *ctx, int pass)
{
    Mix *mix = ctx;
    if (first_error(mix))
        return 0;
    if (pass + mix->first_pass == PASS_G) {
        float max = -INFINITY;
        for (ptrdiff_t b = 0; b < mix->n_blocks; b++)
            max = mix->guard_maxima[b] > max ? mix->guard_maxima[b] : max;
        if (max == -INFINITY) {
            fail(&mix->workers[0], MIX_ROW_MASKED, 0, MIX_GUARD_INPUT);
            return 0;
        }
        mix->cutoff = guard_cutoff(max, mix->log_min_p);
        return 1;
    }
    mix->log2_sum_exp = fold_blocks(mix->offsets, mix->sums, mix->n_blocks);
    if (mix->log2_sum_exp == -INFINITY) {
        int which = 0;
        MixStatus status = explain_all_masked(mix->row0, mix->n_in, mix->n_vocab, &which);
        fail(&mix->workers[0], status, 0, which);
        return 0;
    }
    return 1;
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
    int shared_row = spec->n_rows == 1 && n_threads > 1;

    /* One allocation for every scratch array, doubles first for alignment. */
    size_t n_in = (size_t)spec->n_in, n_workers = (size_t)n_threads, blocks = (size_t)n_blocks;
    size_t doubles = n_in + 2 * (n_workers + 1) * blocks;
    size_t size = doubles * sizeof(double) + n_workers * sizeof(Worker) + n_workers * n_in * sizeof(const float *)
                  + (n_in + blocks) * sizeof(float);
    char *scratch = calloc(size ? size : 1, 1);
    if (!scratch)
        return result;
    Mix mix = {0};
    mix.dst = spec->dst;
    mix.dst_stride = spec->dst_stride;
    mix.n_vocab = spec->n_vocab;
    mix.n_blocks = n_blocks;
    mix.n_in = spec->n_in;
    mix.n_workers = n_threads;
    mix.row0 = spec->row0;
    mix.stride = spec->stride;
    mix.c = (double *)scratch;
    mix.offsets = mix.c + n_in;
    mix.sums = mix.offsets + blocks;
    double *worker_blocks = mix.sums + blocks;
    mix.workers = (Worker *)(mix.c + doubles);
    const float **rows = (const float **)(mix.workers + n_workers);
    mix.c32 = (float *)(rows + n_workers * n_in);
    mix.guard_maxima = mix.c32 + n_in;
    for (int j = 0; j < spec->n_in; j++) {
        mix.c[j] = spec->weight[j] * LOG2E;
        mix.c32[j] = (float)mix.c[j];
    }
    for (size_t i = 0; i < n_workers; i++) {
        mix.workers[i].rows = rows + i * n_in;
        mix.workers[i].offsets = worker_blocks + 2 * i * blocks;
        mix.workers[i].sums = mix.workers[i].offsets + blocks;
        mix.workers[i].status = MIX_OK;
    }
    if (spec->guard_min_p > 0.0) {
        mix.guard_row0 = spec->guard_row0;
        mix.guard_stride = spec->guard_stride;
        mix.log_min_p = log(spec->guard_min_p);
    }

    ParallelLoop loop = {spec->n_rows, 1, 1, mix_row_range, NULL, &mix};
    if (shared_row) {
        mix.first_pass = mix.guard_row0 ? PASS_G : PASS_A;
        loop = (ParallelLoop){n_blocks, CHUNK_BLOCKS, PASS_B + 1 - mix.first_pass, mix_block_range, between_passes,
                              &mix};
    }
    genarm_parallel_run(&loop, n_threads);

    const Worker *failed = first_error(&mix);
    result.status = failed ? failed->status : MIX_OK;
    if (failed) {
        result.sequence = shared_row ? 0 : failed->at;
        result.input = failed->which;
    }
    free(scratch);
    return result;
}
