/*
 * mix.c: the arithmetic of GenARM guided decoding, one row of logits per call; fused.c is its Python face.
 *
 * genarm_guide: the guided logits of GenARM (Xu et al., ICLR 2025, sec. 4) on the base's logit scale,
 *
 *     dst[t] = base[t] + sum_{alpha_i > 0} alpha_i * (arm_i[t] - logsumexp(arm_i))
 *                      + sum_{alpha_i < 0} alpha_i * max(0, (arm_i[t] - logsumexp(arm_i)) - (base[t] - logsumexp(base))),
 *
 * which is log p_base + sum_i alpha_i log p_arm_i up to a constant per row for positive weights, so llama.cpp's
 * samplers act on it as on raw logits; with no alpha != 0 it is the base, bit for bit. A negative weight steers away
 * one-sidedly: p_base * min(1, p_base / p_arm)^|alpha| lowers the tokens the ARM rates above the base and leaves the
 * rest as the base has them (p_base * p_arm^alpha would also raise every token the ARM finds unlikely, junk
 * included: token salad at alpha = -1). A token that is -inf in the base or in an ARM with alpha != 0 is -inf,
 * whatever the sign of alpha: a token a model forbids is never raised. The
 * base-plausibility guard (tau = guard_min_p > 0; Li et al., "Contrastive Decoding", ACL 2023) also sets to -inf
 * every token whose raw base logit is below max(base) + ln tau: the ARMs re-rank what the base finds plausible.
 *
 * genarm_log_softmax: dst = scale * src - logsumexp(scale * src), for reported log-probabilities.
 *
 * Why C: over Gemma-3's 262,144 tokens numpy makes several passes over temporaries per row. Here each ARM is read
 * once for its logsumexp, then every row once more to write dst, in blocks that stay in L1 while the loops over
 * them run, and the exponential is a polynomial the compiler vectorises (a call to libm's expf stops the
 * vectoriser). The exponentials bound the time: one per token and ARM. No threads: the caller releases the GIL.
 */
#include "mix.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 1024 /* tokens per block: 4 KiB of each row, well inside L1 */
#define LANES 8    /* independent float accumulators, one AVX2 vector: vectorised without reassociating a sum */
#define LOG2E 1.4426950408889634
#define LN2 0.6931471805599453

/* The hot loops are compiled for AVX2 + FMA and for the x86-64 baseline, picked at load time (glibc's ifunc):
 * wheels move between machines, so no -march=native. */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__GLIBC__)
#define HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HOT
#endif

/* 2^y for y <= 0; y below -126 (and -inf) gives 2^-126, which no sum holding 2^0 = 1 can notice. 2^y = 2^n * 2^f
 * with n = round(y), |f| <= 1/2, 2^f by a degree-5 minimax polynomial (relative error 2e-7 in float32). */
static inline float exp2_nonpos(float y)
{
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it leaves round(y) in the low mantissa bits */
    y = y < -126.0f ? -126.0f : y;
    float t = y + round_magic, n = t - round_magic, f = y - n;
    float p = 1.0000001f
              + f * (0.69314694f + f * (0.2402212f + f * (0.055507131f + f * (0.0096755419f + f * 0.0013276472f))));
    uint32_t t_bits, p_bits;
    memcpy(&t_bits, &t, sizeof t);
    memcpy(&p_bits, &p, sizeof p);
    p_bits += t_bits << 23; /* n, from t's low bits, added to p's exponent: p in [0.7, 1.42] leaves a float */
    memcpy(&p, &p_bits, sizeof p);
    return p;
}

/* The largest of n floats, taken over keys that order like the floats (negative values get their magnitude bits
 * flipped): compilers vectorise an integer max, not `a > b ? a : b` on floats, which NaN makes order-dependent.
 * *nan is set when a NaN is among them, caught by its magnitude bits, as a negative NaN's key sorts below -inf's. */
static inline float max_of(const float *x, ptrdiff_t n, int *nan)
{
    int32_t best = INT32_MIN;
    uint32_t largest_magnitude = 0, bits;
    for (ptrdiff_t t = 0; t < n; t++) {
        memcpy(&bits, &x[t], sizeof bits);
        int32_t key = (int32_t)(bits ^ ((0u - (bits >> 31)) >> 1));
        best = key > best ? key : best;
        largest_magnitude = (bits & 0x7fffffffu) > largest_magnitude ? bits & 0x7fffffffu : largest_magnitude;
    }
    bits = (uint32_t)best ^ ((0u - ((uint32_t)best >> 31)) >> 1); /* the flip is its own inverse */
    float max;
    memcpy(&max, &bits, sizeof max);
    *nan |= largest_magnitude > 0x7f800000u;
    return max;
}

static MixStatus check(float max, int nan)
{
    return nan ? MIX_NAN : max == INFINITY ? MIX_POSINF : max == -INFINITY ? MIX_ALL_MASKED : MIX_OK;
}

HOT static MixStatus row_max(const float *x, ptrdiff_t n, float *max)
{
    int nan = 0;
    *max = max_of(x, n, &nan);
    return check(*max, nan);
}

/* *log2_sum = log2 sum_t 2^(c x[t]), c > 0, in one pass over x: per block, its max (the block is then in L1), then
 * 2^(c x - m) with m = c * (the max so far), summed in float lanes (vectorised without reassociating a sum) and
 * folded into a double, which is rescaled the few times the max grows. e^(scale x) = 2^(c x) for c = scale log2 e. */
HOT static MixStatus log2_sum_exp2(const float *x, ptrdiff_t n_vocab, float c, double *log2_sum)
{
    float max = -INFINITY, m = -INFINITY;
    double sum = 0.0;
    int nan = 0;
    for (ptrdiff_t b0 = 0; b0 < n_vocab && !nan && max < INFINITY; b0 += BLOCK) {
        ptrdiff_t n = n_vocab - b0 < BLOCK ? n_vocab - b0 : BLOCK;
        float block_max = max_of(x + b0, n, &nan), lane[LANES] = {0};
        if (block_max > max) {
            max = block_max;
            sum *= exp2((double)m - (double)(max * c));
            m = max * c; /* c x - m: one FMA where there is one, exact near the max */
        }
        if (max == -INFINITY) /* masked so far: nothing to add (and -inf - -inf would be NaN) */
            continue;
        for (ptrdiff_t v = 0; v < n / LANES; v++) /* counted in vectors: GCC vectorises this even under -fwrapv */
            for (int l = 0; l < LANES; l++)
                lane[l] += exp2_nonpos(x[b0 + v * LANES + l] * c - m);
        for (ptrdiff_t t = n / LANES * LANES; t < n; t++)
            lane[0] += exp2_nonpos(x[b0 + t] * c - m);
        for (int l = 0; l < LANES; l++)
            sum += lane[l];
    }
    *log2_sum = m + log2(sum);
    return check(max, nan) == MIX_OK && !isfinite(*log2_sum) ? MIX_OVERFLOW : check(max, nan);
}

/* The mixing pass, block by block: dst = base + k + sum_i alpha_i arm_i over the positive weights, plus
 * alpha_i max(0, arm_i - base + d_i) over the negative ones, masked; the guard's cutoff is -inf when off. |k| < 2^100,
 * so base + k is NaN, +inf or -inf exactly where the base is, even in place (the block's raw base is kept aside for
 * the negative weights); then, with clean ARMs, a NaN or +inf in dst is an overflow. Flags are or-ed as 0 / -1,
 * which compilers keep as vector masks. */
HOT static MixStatus mix_rows(float *dst, const float *base, const float *const *arms, const double *alphas,
                              const float *d, int n_arms, int n_active, int n_negative, float k, float cutoff,
                              ptrdiff_t n_vocab)
{
    int base_finite = 0, out_finite = 0, overflow = 0;
    float raw[BLOCK];
    for (ptrdiff_t b0 = 0; b0 < n_vocab; b0 += BLOCK) {
        ptrdiff_t n = n_vocab - b0 < BLOCK ? n_vocab - b0 : BLOCK;
        const float *x = base + b0;
        float *y = dst + b0;
        int bad_base = 0, finite = 0;
        if (n_negative)
            memcpy(raw, x, (size_t)n * sizeof *raw);
        for (ptrdiff_t t = 0; t < n; t++) {
            y[t] = x[t] < cutoff ? -INFINITY : n_active ? x[t] + k : x[t]; /* no x + 0.0f: -0.0 stays -0.0 */
            bad_base |= y[t] < INFINITY ? 0 : -1;
            finite |= y[t] > -INFINITY ? -1 : 0;
        }
        for (ptrdiff_t t = 0; bad_base && t < n; t++)
            if (isnan(y[t]))
                return MIX_NAN;
        if (bad_base)
            return MIX_POSINF;
        base_finite |= finite;
        for (int i = 0; i < n_arms; i++) {
            if (alphas[i] == 0.0) /* not read: the row may be NULL */
                continue;
            const float *a = arms[i] + b0, c = (float)alphas[i], shift = d[i];
            finite = 0;
            if (c > 0.0f)
                for (ptrdiff_t t = 0; t < n; t++) {
                    y[t] += a[t] == -INFINITY ? -INFINITY : c * a[t];
                    overflow |= y[t] < INFINITY ? 0 : -1;
                    finite |= y[t] > -INFINITY ? -1 : 0;
                }
            else /* a base token at -inf gives c * +inf = -inf: it stays -inf */
                for (ptrdiff_t t = 0; t < n; t++) {
                    float gain = a[t] - raw[t] + shift; /* log p_arm - log p_base */
                    y[t] += a[t] == -INFINITY ? -INFINITY : c * (gain > 0.0f ? gain : 0.0f);
                    overflow |= y[t] < INFINITY ? 0 : -1;
                    finite |= y[t] > -INFINITY ? -1 : 0;
                }
        }
        out_finite |= finite;
    }
    if (overflow)
        return MIX_OVERFLOW;
    return out_finite ? MIX_OK : base_finite ? MIX_NO_TOKEN_LEFT : MIX_ALL_MASKED;
}

MixResult genarm_guide(float *dst, const float *base, const float *const *arms, const double *alphas, int n_arms,
                       ptrdiff_t n_vocab, double guard_min_p)
{
    MixResult result = {MIX_OK, MIX_BASE};
    double k = 0.0;                 /* -sum_{alpha_i > 0} alpha_i logsumexp(arm_i) */
    double log2_sums[MIX_MAX_ARMS]; /* each active ARM's log2 sum exp */
    float d[MIX_MAX_ARMS];          /* negative weights: logsumexp(base) - logsumexp(arm_i) */
    int n_active = 0, n_negative = 0;
    if (n_arms > MIX_MAX_ARMS) {
        result.status = MIX_OVERFLOW;
        return result;
    }
    /* The ARMs first: read, never written, so an error here leaves dst as it was. */
    for (int i = 0; i < n_arms; i++) {
        d[i] = 0.0f;
        if (alphas[i] == 0.0)
            continue;
        result.input = i;
        result.status = log2_sum_exp2(arms[i], n_vocab, (float)LOG2E, &log2_sums[i]);
        if (result.status == MIX_OK && !isfinite((float)alphas[i]))
            result.status = MIX_OVERFLOW;
        if (result.status != MIX_OK)
            return result;
        if (alphas[i] > 0.0)
            k -= alphas[i] * log2_sums[i] * LN2;
        n_active++;
        n_negative += alphas[i] < 0.0;
    }
    result.input = MIX_BASE;
    if (!(fabs(k) < 0x1p100)) { /* logsumexps beyond any logit: weights too large */
        result.status = MIX_OVERFLOW;
        return result;
    }
    if (n_negative) {
        double base_log2_sum;
        result.status = log2_sum_exp2(base, n_vocab, (float)LOG2E, &base_log2_sum);
        if (result.status != MIX_OK)
            return result;
        for (int i = 0; i < n_arms; i++)
            if (alphas[i] < 0.0)
                d[i] = (float)((base_log2_sum - log2_sums[i]) * LN2);
    }
    /* The guard masks x < max + ln tau, compared in double; the smallest float at or above that threshold masks
     * exactly the same floats, and lets the blocks compare floats. */
    float cutoff = -INFINITY;
    if (guard_min_p > 0.0) {
        float max;
        result.status = row_max(base, n_vocab, &max);
        if (result.status != MIX_OK)
            return result;
        double threshold = (double)max + log(guard_min_p);
        cutoff = (float)threshold;
        if ((double)cutoff < threshold)
            cutoff = nextafterf(cutoff, INFINITY);
    }
    result.status = mix_rows(dst, base, arms, alphas, d, n_arms, n_active, n_negative, (float)k, cutoff, n_vocab);
    return result;
}

HOT static void shift(float *dst, const float *src, ptrdiff_t n, float c, float log2_sum)
{
    for (ptrdiff_t t = 0; t < n; t++)
        dst[t] = (src[t] * c - log2_sum) * (float)LN2;
}

MixResult genarm_log_softmax(float *dst, const float *src, ptrdiff_t n_vocab, double scale)
{
    MixResult result = {MIX_OVERFLOW, MIX_BASE};
    const float c = (float)(scale * LOG2E);
    double log2_sum;
    if (isfinite(c) && c > 0.0f)
        result.status = log2_sum_exp2(src, n_vocab, c, &log2_sum);
    if (result.status == MIX_OK)
        shift(dst, src, n_vocab, c, (float)log2_sum);
    return result;
}
