/* mix_block.h: the arithmetic of one block of tokens for mix.c (the kernel's row plan and entry point).
 *
 * A header only so that each file holds one idea: mix.c alone includes it, so every function below still lives in
 * mix.c's translation unit, with the same inlining, vectorisation and FMA contraction as when it was written there
 * (the object code is byte-identical). Nothing here is part of an interface.
 */
#ifndef GENARM_MIX_BLOCK_H
#define GENARM_MIX_BLOCK_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "mix.h"

#define BLOCK 1024 /* tokens per block: 4 KiB of floats (8 KiB of doubles), well inside L1 */
#define LANES 8    /* independent accumulators, one AVX2 vector of floats: no reassociation */

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

/* For helpers of the hot functions that a compiler might leave out of line, and so out of the AVX2 build. */
#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define ALWAYS_INLINE __forceinline
#else
#define ALWAYS_INLINE inline
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

/* What one pass of mix_f32 does besides mixed[t] = c0 * x0[t] (a constant at every call site, so that each
 * combination compiles to its own straight loop). */
enum {
    F32_ADD = 1,   /* add to mixed[t] instead of overwriting it */
    F32_PAIR = 2,  /* and + c1 * x1[t] */
    F32_LAST = 4,  /* the last pass: also the order keys of the largest and smallest result */
    F32_GUARD = 8, /* with F32_LAST: -inf where guard[t] < cutoff, before the extremes */
};

/* Fast path, one pass over one or two inputs, in float32 (see the flags). Also *abs0 (*abs1) = the largest |x| as
 * bits, in which inf and NaN compare above every finite value, so the caller can bound the rounding error and send
 * blocks with masked or corrupt tokens down the exact path. */
static ALWAYS_INLINE void mix_f32(float *RESTRICT mixed, const float *RESTRICT x0, float c0,
                                  const float *RESTRICT x1, float c1, const float *RESTRICT guard, float cutoff,
                                  ptrdiff_t n, int flags, uint32_t *abs0, uint32_t *abs1, int32_t *max_key,
                                  int32_t *min_key)
{
    uint32_t a0 = 0, a1 = 0;
    int32_t best = INT32_MIN, worst = INT32_MAX;
    for (ptrdiff_t t = 0; t < n; t++) {
        float v0 = x0[t], sum = c0 * v0;
        uint32_t b0 = abs_bits(v0);
        a0 = b0 > a0 ? b0 : a0;
        if (flags & F32_PAIR) {
            float v1 = x1[t];
            uint32_t b1 = abs_bits(v1);
            a1 = b1 > a1 ? b1 : a1;
            sum += c1 * v1;
        }
        if (flags & F32_ADD)
            sum += mixed[t];
        if (flags & F32_GUARD)
            sum = guard[t] < cutoff ? -INFINITY : sum;
        mixed[t] = sum;
        if (flags & F32_LAST) {
            int32_t key = order_key32(sum);
            best = key > best ? key : best;
            worst = key < worst ? key : worst;
        }
    }
    *abs0 = a0;
    if (flags & F32_PAIR)
        *abs1 = a1;
    if (flags & F32_LAST) {
        *max_key = best;
        *min_key = worst;
    }
}

/* Fast path for one block [b0, b0 + n), float32 throughout; c32 are the weights in log2 units. Fails (returns 0)
 * when the block holds a non-finite value or when float32 could be off by more than 2^-14 nats: fl(sum_j c_j x_j)
 * errs by at most (n_in + 1) * 2^-24 * sum_j |c_j x_j| (the products' roundings, the weights' and one per
 * addition, each bounded by the sum), and the per-input maxima bound that sum. Real logits (|x| below ~100, a few
 * ARMs) pass; logits scaled by 1000 or masked tokens take the exact path. Leaves the block's largest and smallest
 * mixed values (-inf both when the guard, given a base row, masked the whole block). */
static ALWAYS_INLINE int mix_block_f32(float *RESTRICT mixed, const float *const *rows, const float *c32,
                                       const double *c, int n_in, const float *guard, float cutoff, ptrdiff_t b0,
                                       ptrdiff_t n, float *max, float *min)
{
    uint32_t abs0 = 0, abs1 = 0;
    int32_t max_key = INT32_MIN, min_key = INT32_MAX;
    const float *g = guard ? guard + b0 : NULL;
    double bound; /* sum_j |c_j| max|x_j|, log2 units: NaN or inf when the block holds one */
    if (n_in == 1) {
        if (g)
            mix_f32(mixed, rows[0] + b0, c32[0], NULL, 0.0f, g, cutoff, n, F32_LAST | F32_GUARD, &abs0, NULL,
                    &max_key, &min_key);
        else
            mix_f32(mixed, rows[0] + b0, c32[0], NULL, 0.0f, NULL, 0.0f, n, F32_LAST, &abs0, NULL, &max_key,
                    &min_key);
        bound = fabs(c[0]) * float_from_bits(abs0);
    } else {
        /* The first two inputs in one pass, any others one by one; the extremes (and the guard) ride on the last. */
        if (n_in > 2)
            mix_f32(mixed, rows[0] + b0, c32[0], rows[1] + b0, c32[1], NULL, 0.0f, n, F32_PAIR, &abs0, &abs1,
                    &max_key, &min_key);
        else if (g)
            mix_f32(mixed, rows[0] + b0, c32[0], rows[1] + b0, c32[1], g, cutoff, n,
                    F32_PAIR | F32_LAST | F32_GUARD, &abs0, &abs1, &max_key, &min_key);
        else
            mix_f32(mixed, rows[0] + b0, c32[0], rows[1] + b0, c32[1], NULL, 0.0f, n, F32_PAIR | F32_LAST, &abs0,
                    &abs1, &max_key, &min_key);
        bound = fabs(c[0]) * float_from_bits(abs0) + fabs(c[1]) * float_from_bits(abs1);
        for (int j = 2; j < n_in; j++) {
            if (j < n_in - 1)
                mix_f32(mixed, rows[j] + b0, c32[j], NULL, 0.0f, NULL, 0.0f, n, F32_ADD, &abs0, NULL, &max_key,
                        &min_key);
            else if (g)
                mix_f32(mixed, rows[j] + b0, c32[j], NULL, 0.0f, g, cutoff, n, F32_ADD | F32_LAST | F32_GUARD,
                        &abs0, NULL, &max_key, &min_key);
            else
                mix_f32(mixed, rows[j] + b0, c32[j], NULL, 0.0f, NULL, 0.0f, n, F32_ADD | F32_LAST, &abs0, NULL,
                        &max_key, &min_key);
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
 * in *sum, or MIX_MASKED_BLOCK (nothing written) when every token is -inf, or the error found. A NaN or +inf is
 * reported even where the guard masks the token, as it is where another row masks it. */
static inline MixStatus mix_block_f64(float *dst, const float *const *rows, const double *c, int n_in,
                                      const float *guard, float cutoff, ptrdiff_t b0, ptrdiff_t n, double *max,
                                      double *sum, int *which)
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
    if (guard) {
        for (ptrdiff_t t = 0; t < n; t++)
            mixed[t] = guard[b0 + t] < cutoff ? -INFINITY : mixed[t];
        m = max_f64(mixed, n);
    }
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

/* Pass G over n tokens of the base row: their largest logit in *max, or NaN or +inf reported. NaN is caught by its
 * magnitude bits, since its order key can sort below -inf's. */
HOT_CLONES
static MixStatus guard_max(const float *base, ptrdiff_t n, float *max)
{
    int32_t best = INT32_MIN;
    uint32_t largest_abs = 0;
    for (ptrdiff_t t = 0; t < n; t++) {
        int32_t key = order_key32(base[t]);
        uint32_t bits = abs_bits(base[t]);
        best = key > best ? key : best;
        largest_abs = bits > largest_abs ? bits : largest_abs;
    }
    *max = from_order_key32(best);
    if (largest_abs > 0x7f800000u)
        return MIX_NAN;
    return *max == INFINITY ? MIX_POSINF : MIX_OK;
}

/* The guard masks x when x < max + ln(min_p), compared in double. The smallest float at or above that threshold
 * masks exactly the same floats, and lets pass A compare floats. */
static float guard_cutoff(float max, double log_min_p)
{
    double threshold = (double)max + log_min_p;
    float cutoff = (float)threshold;
    return (double)cutoff < threshold ? nextafterf(cutoff, INFINITY) : cutoff;
}

#endif
