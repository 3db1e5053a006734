/*
 * fused.c: the Python face of the GenARM guidance kernel (mix.c), the extension module genarm_local.core._fused.
 *
 * One function, mix(), turns its arguments into a MixSpec: rows given as float32 buffers (numpy arrays, ctypes
 * arrays: anything with the buffer protocol) or as raw addresses (what llama_get_logits_ith returns), never copied.
 * It checks everything it can check (types, formats, contiguity, lengths against n_vocab * n_rows, null addresses,
 * overlaps) so that bad arguments raise TypeError or ValueError instead of crashing, runs the kernel with the GIL
 * released, and turns the kernel's numerical failures into FloatingPointError naming the row and the sequence.
 * The kernel's worker threads (threads.c) are stopped and joined at interpreter exit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "mix.h"
#include "threads.h"

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
        unsigned long long address = PyLong_AsUnsignedLongLong(obj);
        if (PyErr_Occurred() || address > UINTPTR_MAX) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s is not an address: %R", src->name, obj);
            return -1;
        }
        if (address == 0) {
            PyErr_Format(PyExc_ValueError, "%s is a null address", src->name);
            return -1;
        }
        src->ptr = (float *)(uintptr_t)address;
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

/* Raise the exception for a failed mix; label maps the kernel's inputs to sources. */
static void raise_mix_error(MixResult result, const Source *sources, const int *label)
{
    MixStatus status = result.status;
    const char *name = sources[result.input == MIX_GUARD_INPUT ? 1 : label[result.input]].name;
    Py_ssize_t r = result.sequence;
    if (status == MIX_NO_MEMORY)
        PyErr_NoMemory();
    else if (status == MIX_NAN)
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
    "mix(dst, base, arms, weights, base_weight, n_vocab, n_rows, base_stride, arm_strides, n_threads,\n"
    "    guard_min_p=0.0)\n--\n\n"
    "Write log_softmax(base_weight*base + sum_i weights[i]*arms[i]) into dst for n_rows sequences, masking\n"
    "(-inf) tokens whose base logit is below max(base) + ln(guard_min_p) when guard_min_p > 0.\n"
    "Rows are float32 buffers or addresses (int); dst shares base_stride. Weight-0 rows are not read (the base\n"
    "is, under the guard).\n"
    "Use genarm_local.core.mixing.mix_logprobs, which documents the arguments.");

static PyObject *mix(PyObject *self, PyObject *args)
{
    PyObject *dst_obj, *base_obj, *arms_obj, *weights_obj, *strides_obj;
    PyObject *arms = NULL, *weights = NULL, *strides = NULL, *result = NULL;
    double base_weight, guard_min_p = 0.0;
    Py_ssize_t n_vocab, n_rows, base_stride, n_arms = 0, n_sources = 0;
    int n_threads;
    Source *sources = NULL; /* [0] = dst, [1] = base, [2 + i] = ARM i */
    int *label = NULL;      /* input j of the kernel is sources[label[j]] */
    const float **row0 = NULL;
    ptrdiff_t *stride = NULL;
    double *weights_in = NULL;
    MixSpec spec = {0};
    (void)self;

    if (!PyArg_ParseTuple(args, "OOOOdnnnOi|d:mix", &dst_obj, &base_obj, &arms_obj, &weights_obj, &base_weight,
                          &n_vocab, &n_rows, &base_stride, &strides_obj, &n_threads, &guard_min_p))
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
    if (!(guard_min_p >= 0.0 && guard_min_p <= 1.0)) {
        PyErr_SetString(PyExc_ValueError, "guard_min_p must be between 0 and 1");
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

    size_t n_inputs = (size_t)n_arms + 1;
    sources = PyMem_Calloc(n_inputs + 1, sizeof *sources);
    label = PyMem_Calloc(n_inputs, sizeof *label);
    row0 = PyMem_Calloc(n_inputs, sizeof *row0);
    stride = PyMem_Calloc(n_inputs, sizeof *stride);
    weights_in = PyMem_Calloc(n_inputs, sizeof *weights_in);
    if (!sources || !label || !row0 || !stride || !weights_in) {
        PyErr_NoMemory();
        goto done;
    }

    /* dst and base first, then every ARM; a source with weight 0 is neither opened nor read, but for the base
     * under the guard, which reads it raw. */
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
        int guard_reads = s == 1 && guard_min_p > 0.0;
        if (weight == 0.0 && !guard_reads)
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
        if (guard_reads) {
            spec.guard_row0 = src->ptr;
            spec.guard_stride = src->stride;
            spec.guard_min_p = guard_min_p;
        }
        if (weight == 0.0)
            continue;
        label[spec.n_in] = (int)s;
        row0[spec.n_in] = src->ptr;
        stride[spec.n_in] = src->stride;
        weights_in[spec.n_in] = weight;
        spec.n_in++;
    }
    spec.dst = sources[0].ptr;
    spec.dst_stride = base_stride;
    spec.n_vocab = n_vocab;
    spec.n_rows = n_rows;
    spec.row0 = row0;
    spec.stride = stride;
    spec.weight = weights_in;

    MixResult mixed;
    Py_BEGIN_ALLOW_THREADS
    mixed = genarm_mix_rows(&spec, n_threads);
    Py_END_ALLOW_THREADS
    if (mixed.status != MIX_OK) {
        raise_mix_error(mixed, sources, label);
        goto done;
    }
    result = Py_NewRef(Py_None);

done:
    for (Py_ssize_t s = 0; s < n_sources; s++)
        source_close(&sources[s]);
    PyMem_Free(sources);
    PyMem_Free(label);
    PyMem_Free(row0);
    PyMem_Free(stride);
    PyMem_Free(weights_in);
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
    static int stop_registered;
    if (!stop_registered && Py_AtExit(genarm_threads_stop) == 0)
        stop_registered = 1;
    return PyModule_Create(&fused_module);
}
