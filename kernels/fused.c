/*
 * fused.c: the Python face of mix.c, the extension module genarm_local.core._fused.
 *
 * Rows come as addresses: genarm_local.core.mixing resolves buffers and ctypes pointers, checks types, lengths and
 * overlaps, and keeps the buffers exported while the kernel runs. Here: the arguments are parsed, null rows refused,
 * the arithmetic run with the GIL released, and its failures raised as FloatingPointError naming the row at fault.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "mix.h"

static PyObject *raise_error(MixResult result, const char *name)
{
    if (result.status == MIX_NAN)
        return PyErr_Format(PyExc_FloatingPointError, "NaN in %s", name);
    if (result.status == MIX_POSINF)
        return PyErr_Format(PyExc_FloatingPointError, "+inf in %s: logits must be finite or -inf", name);
    if (result.status == MIX_ALL_MASKED)
        return PyErr_Format(PyExc_FloatingPointError, "%s is -inf for every token: nothing to sample", name);
    if (result.status == MIX_NO_TOKEN_LEFT)
        return PyErr_Format(PyExc_FloatingPointError, "no token is left: the -inf masks of the base and ARM rows "
                            "(and the guard, if on) do not overlap");
    return PyErr_Format(PyExc_FloatingPointError, "weights times logits overflow float32: weights too large");
}

static float *row_at(PyObject *address, const char *name)
{
    void *row = PyLong_AsVoidPtr(address);
    if (row == NULL && !PyErr_Occurred())
        PyErr_Format(PyExc_ValueError, "%s is a null address", name);
    return row;
}

PyDoc_STRVAR(guide_doc, "guide(dst, base, arms, alphas, n_vocab, guard_min_p)\n--\n\n"
                        "Rows as addresses (int); see genarm_local.core.mixing.guide.");

static PyObject *guide(PyObject *self, PyObject *args)
{
    PyObject *dst_address, *base_address, *arm_addresses, *alpha_values, *done = NULL;
    Py_ssize_t n_vocab;
    double guard_min_p;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOO!O!nd:guide", &dst_address, &base_address, &PyTuple_Type, &arm_addresses,
                          &PyTuple_Type, &alpha_values, &n_vocab, &guard_min_p))
        return NULL;
    Py_ssize_t n_arms = PyTuple_GET_SIZE(arm_addresses);
    if (n_vocab <= 0 || n_arms != PyTuple_GET_SIZE(alpha_values) || n_arms > MIX_MAX_ARMS)
        return PyErr_Format(PyExc_ValueError, "need n_vocab > 0 and one alpha per ARM row (at most 1024)");
    float *dst = row_at(dst_address, "dst"), *base = dst ? row_at(base_address, "base row") : NULL;
    const float **arms = PyMem_Calloc(n_arms + 1, sizeof *arms);
    double *alphas = PyMem_Calloc(n_arms + 1, sizeof *alphas);
    if (!arms || !alphas)
        PyErr_NoMemory();
    for (Py_ssize_t i = 0; base && arms && alphas && i < n_arms && !PyErr_Occurred(); i++) {
        char name[32];
        snprintf(name, sizeof name, "ARM row %zd", i);
        alphas[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(alpha_values, i));
        if (alphas[i] != 0.0 && !PyErr_Occurred()) /* alpha 0: the row is not read */
            arms[i] = row_at(PyTuple_GET_ITEM(arm_addresses, i), name);
    }
    if (!PyErr_Occurred()) {
        MixResult result;
        Py_BEGIN_ALLOW_THREADS
        result = genarm_guide(dst, base, arms, alphas, (int)n_arms, n_vocab, guard_min_p);
        Py_END_ALLOW_THREADS
        if (result.status == MIX_OK) {
            done = Py_NewRef(Py_None);
        } else {
            char name[32] = "base row";
            if (result.input != MIX_BASE)
                snprintf(name, sizeof name, "ARM row %d", result.input);
            raise_error(result, name);
        }
    }
    PyMem_Free(arms);
    PyMem_Free(alphas);
    return done;
}

PyDoc_STRVAR(log_softmax_doc, "log_softmax(dst, src, n_vocab, scale)\n--\n\n"
                              "Rows as addresses (int); see genarm_local.core.mixing.log_softmax.");

static PyObject *log_softmax(PyObject *self, PyObject *args)
{
    PyObject *dst_address, *src_address;
    Py_ssize_t n_vocab;
    double scale;
    MixResult result;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOnd:log_softmax", &dst_address, &src_address, &n_vocab, &scale))
        return NULL;
    if (n_vocab <= 0 || !(scale > 0.0))
        return PyErr_Format(PyExc_ValueError, "need n_vocab > 0 and scale > 0");
    float *dst = row_at(dst_address, "dst"), *src = dst ? row_at(src_address, "src") : NULL;
    if (!src)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    result = genarm_log_softmax(dst, src, n_vocab, scale);
    Py_END_ALLOW_THREADS
    if (result.status == MIX_OVERFLOW)
        return PyErr_Format(PyExc_FloatingPointError, "scale times logits overflow float32");
    return result.status == MIX_OK ? Py_NewRef(Py_None) : raise_error(result, "src");
}

static PyMethodDef methods[] = {
    {"guide", guide, METH_VARARGS, guide_doc},
    {"log_softmax", log_softmax, METH_VARARGS, log_softmax_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fused",
    .m_doc = "GenARM guided decoding on one row of float32 logits; the API is genarm_local.core.mixing.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fused(void)
{
    return PyModule_Create(&module);
}
