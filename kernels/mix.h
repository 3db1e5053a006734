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

/* What to mix: n_rows sequences of n_vocab tokens. Input j (only those with nonzero weight) has its row r at
 * row0[j] + r * stride[j]; the result for row r goes to dst + r * dst_stride, which may be an input's own rows
 * (same address and stride) but must not overlap them otherwise. Weights are plain (w0, alpha_1, ...). */
typedef struct {
    float *dst;
    ptrdiff_t dst_stride, n_vocab, n_rows;
    int n_in;
    const float *const *row0;
    const ptrdiff_t *stride;
    const double *weight;
} MixSpec;

typedef struct {
    MixStatus status;
    ptrdiff_t sequence; /* with an error: the row at fault */
    int input;          /* with an error: the index j of the input at fault */
} MixResult;

/* Write log_softmax(sum_j weight[j] * input_j) into every row of dst, on up to n_threads threads (fewer where a
 * thread would have under 65,536 tokens). Thread-safe; takes no locks and touches no Python object. */
MixResult genarm_mix_rows(const MixSpec *spec, int n_threads);

#endif
