/* mix.h: the C interface of the GenARM guidance arithmetic (mix.c). No Python here; fused.c is the Python face. */
#ifndef GENARM_MIX_H
#define GENARM_MIX_H

#include <stddef.h>

typedef enum {
    MIX_OK,
    MIX_NAN,           /* NaN in input `input` */
    MIX_POSINF,        /* +inf in input `input` */
    MIX_ALL_MASKED,    /* input `input` is -inf for every token */
    MIX_NO_TOKEN_LEFT, /* the -inf masks (and the guard) leave no token */
    MIX_OVERFLOW,      /* alpha times logits beyond float32 */
} MixStatus;

#define MIX_MAX_ARMS 1024 /* ARM rows one call mixes at most */
#define MIX_BASE (-1) /* MixResult.input of the base row (of log_softmax's src) */

typedef struct {
    MixStatus status;
    int input; /* with an error: MIX_BASE or the ARM's index */
} MixResult;

/* dst[t] = base[t] + sum_i alphas[i] * (arms[i][t] - logsumexp(arms[i])) over n_vocab tokens for positive weights,
 * one-sided for negative ones, with the guard when guard_min_p > 0 (mix.c says how). arms[i] is not read where
 * alphas[i] == 0. dst may be base. n_arms <= MIX_MAX_ARMS. */
MixResult genarm_guide(float *dst, const float *base, const float *const *arms, const double *alphas, int n_arms,
                       ptrdiff_t n_vocab, double guard_min_p);

/* dst = log_softmax(scale * src), scale > 0. dst may be src. */
MixResult genarm_log_softmax(float *dst, const float *src, ptrdiff_t n_vocab, double scale);

#endif
