/* mix.h: the C interface of the GenARM guidance kernel (mix.c). No Python here; fused.c is the Python face. */
#ifndef GENARM_MIX_H
#define GENARM_MIX_H

#include <stddef.h>

typedef enum {
    MIX_OK,
    MIX_MASKED_BLOCK,    /* internal: a block with no token left */
    MIX_NAN,             /* NaN in input `input` of sequence `sequence` */
    MIX_POSINF,          /* +inf in input `input` of sequence `sequence` */
    MIX_OVERFLOW,        /* weights times logits overflow a double */
    MIX_ROW_MASKED,      /* input `input` is -inf for every token */
    MIX_NO_COMMON_TOKEN, /* the inputs' -inf masks leave no token */
    MIX_NO_MEMORY,
} MixStatus;

/* MixResult.input of an error in the guard's base row (which need not be an input: its weight may be 0). */
#define MIX_GUARD_INPUT (-1)

/* What to mix: n_rows sequences of n_vocab tokens. Input j (only those with nonzero weight) has its row r at
 * row0[j] + r * stride[j]; the result for row r goes to dst + r * dst_stride, which may be an input's own rows
 * (same address and stride) but must not overlap them otherwise. Weights are plain (w0, alpha_1, ...).
 * With guard_min_p in (0, 1], the base-plausibility guard: guard_row0 + r * guard_stride is sequence r's base row,
 * read raw whatever its weight, and every token whose logit there is below its max + ln(guard_min_p) is -inf in the
 * result. guard_min_p = 0: no guard (guard_row0 is not read). */
typedef struct {
    float *dst;
    ptrdiff_t dst_stride, n_vocab, n_rows;
    int n_in;
    const float *const *row0;
    const ptrdiff_t *stride;
    const double *weight;
    const float *guard_row0;
    ptrdiff_t guard_stride;
    double guard_min_p;
} MixSpec;

typedef struct {
    MixStatus status;
    ptrdiff_t sequence; /* with an error: the row at fault */
    int input;          /* with an error: the index j of the input at fault, or MIX_GUARD_INPUT */
} MixResult;

/* Write the guarded log_softmax(sum_j weight[j] * input_j) into every row of dst, on up to n_threads threads (fewer
 * where a thread would have under MIN_TOKENS_PER_THREAD tokens: see mix.c). The same bits on any number of threads.
 * Thread-safe; touches no Python object. */
MixResult genarm_mix_rows(const MixSpec *spec, int n_threads);

#endif
