/* GIL-free spinning on guest memory for sidecores.
 *
 * A pure-Python polling loop holds the GIL, so every other Python thread of the
 * VMM (a vCPU returning from a trapped access, a device thread) waits up to the
 * interpreter's switch interval for it.  The sidecore therefore spins here, in C,
 * with the GIL released, and only takes the GIL when a watched word changed.
 * It also gives Python the full memory barrier (mfence) that the
 * "publish EventIdx, then re-read the shadow value" handshake needs: on x86 a
 * store followed by a load from another address may be reordered through the
 * store buffer, and no pure-Python operation guarantees a fence.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "../cpu_relax.h"

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}


/* The watch list of watch() and watch_until(): a sequence of (address, expected u32) pairs,
 * parsed (with the GIL) into host addresses and values before spinning. */
#define MAX_WATCHES 256
struct watches {
    Py_ssize_t n;
    uintptr_t *a;
    uint32_t *s;
    uintptr_t a_stack[MAX_WATCHES];
    uint32_t s_stack[MAX_WATCHES];
};

static void watches_free(struct watches *w)
{
    if (w->a != w->a_stack) {
        PyMem_Free(w->a);
        PyMem_Free(w->s);
    }
}

/* 0 on success; -1 with an exception set (an empty or malformed list, no memory). */
static int watches_parse(PyObject *seq, struct watches *w)
{
    w->a = w->a_stack;
    w->s = w->s_stack;
    PyObject *fast = PySequence_Fast(seq, "watch: a sequence of (address, value) pairs");
    if (fast == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    w->n = n;
    if (n == 0) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "watch: at least one (address, value) pair");
        return -1;
    }
    if (n > MAX_WATCHES) {
        w->a = PyMem_Malloc(n * sizeof(*w->a));
        w->s = PyMem_Malloc(n * sizeof(*w->s));
        if (w->a == NULL || w->s == NULL) {
            PyMem_Free(w->a);
            PyMem_Free(w->s);
            w->a = w->a_stack;
            w->s = w->s_stack;
            Py_DECREF(fast);
            PyErr_NoMemory();
            return -1;
        }
    }
    int ok = 1;
    for (Py_ssize_t i = 0; i < n && ok; i++) {
        unsigned long long addr, value;
        ok = PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "KK;watch: (address, value) pairs", &addr, &value);
        w->a[i] = (uintptr_t)addr;
        w->s[i] = (uint32_t)value;
    }
    Py_DECREF(fast);
    if (!ok) {
        watches_free(w);
        return -1;
    }
    return 0;
}

/* Spin (call without the GIL) until a watched word differs from its expected value -- its index --
 * or CLOCK_MONOTONIC reaches deadline_ns (-1).  The words are always looked at once, even past the
 * deadline.  The clock is read every 64 pauses only: a read costs more than a look at the words. */
static long watches_spin(const struct watches *w, uint64_t deadline_ns)
{
    for (unsigned iter = 0;; iter++) {
        for (Py_ssize_t i = 0; i < w->n; i++)
            if (*(volatile const uint32_t *)w->a[i] != w->s[i])
                return (long)i;
        cpu_relax();
        if ((iter & 63) == 0 && now_ns() >= deadline_ns)
            return -1;
    }
}

/* The body of watch() and watch_until(): parse (watches, t), spin without the GIL until a word
 * changed or the deadline (now + t if relative, else t) passed; *found = the index or -1, *now =
 * CLOCK_MONOTONIC at return.  0, or -1 with an exception set. */
static int watch_call(PyObject *args, int relative, long *found, uint64_t *now)
{
    PyObject *seq;
    unsigned long long t;
    struct watches w;
    if (!PyArg_ParseTuple(args, "OK", &seq, &t) || watches_parse(seq, &w) < 0)
        return -1;
    Py_BEGIN_ALLOW_THREADS
    *found = watches_spin(&w, relative ? now_ns() + t : t);
    *now = now_ns();
    Py_END_ALLOW_THREADS
    watches_free(&w);
    return 0;
}

/* watch([(address, expected u32), ...], timeout_ns) -> index or -1
 * Spin until the u32 at some address differs from its expected value; return its index,
 * or -1 once timeout_ns have passed. */
static PyObject *spin_watch(PyObject *self, PyObject *args)
{
    long found;
    uint64_t now;
    return watch_call(args, 1, &found, &now) < 0 ? NULL : PyLong_FromLong(found);
}

/* watch_until([(address, expected u32), ...], deadline_ns) -> now_ns
 * Spin until some watched u32 differs from its expected value or CLOCK_MONOTONIC (the clock of
 * Python's time.monotonic_ns) reaches deadline_ns; return CLOCK_MONOTONIC at return.  The adaptive
 * sidecore takes that as the time its pollables' work was seen, so its busy rounds read no clock
 * in Python. */
static PyObject *spin_watch_until(PyObject *self, PyObject *args)
{
    long found;
    uint64_t now;
    return watch_call(args, 0, &found, &now) < 0 ? NULL : PyLong_FromUnsignedLongLong(now);
}

/* store_fence_load(store_addr, value, load_addr) -> u32
 * *store_addr = value (u32); full barrier; return *load_addr (u32). */
static PyObject *spin_store_fence_load(PyObject *self, PyObject *args)
{
    unsigned long long store_addr, load_addr;
    unsigned int value;
    if (!PyArg_ParseTuple(args, "KIK", &store_addr, &value, &load_addr))
        return NULL;
    *(volatile uint32_t *)(uintptr_t)store_addr = value;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t v = *(volatile const uint32_t *)(uintptr_t)load_addr;
    return PyLong_FromUnsignedLong(v);
}

/* store16_fence_load16: the same handshake for 16-bit virtqueue indices. */
static PyObject *spin_store16_fence_load16(PyObject *self, PyObject *args)
{
    unsigned long long store_addr, load_addr;
    unsigned int value;
    if (!PyArg_ParseTuple(args, "KIK", &store_addr, &value, &load_addr))
        return NULL;
    *(volatile uint16_t *)(uintptr_t)store_addr = (uint16_t)value;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t v = *(volatile const uint16_t *)(uintptr_t)load_addr;
    return PyLong_FromUnsignedLong(v);
}

static PyObject *spin_fence(PyObject *self, PyObject *noargs)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

/* aio_submit1(ctx, iocb_address) -> 1, or -errno: io_submit(2) of one iocb (aio_poll.AioPoll.arm).
 * aio_reap(ctx, events_address, n) -> events reaped, or -errno: io_getevents(2) without waiting.
 * The same system calls AioPoll makes through ctypes, without its per-call cost (several µs each here,
 * on the sidecore's path of every received frame). */
static PyObject *spin_aio_submit1(PyObject *self, PyObject *args)
{
    unsigned long long ctx, iocb;
    if (!PyArg_ParseTuple(args, "KK", &ctx, &iocb))
        return NULL;
    void *iocbs[1] = {(void *)(uintptr_t)iocb};
    long r = syscall(SYS_io_submit, (unsigned long)ctx, 1L, iocbs);
    return PyLong_FromLong(r < 0 ? -errno : r);
}

static PyObject *spin_aio_reap(PyObject *self, PyObject *args)
{
    unsigned long long ctx, events;
    long n;
    if (!PyArg_ParseTuple(args, "KKl", &ctx, &events, &n))
        return NULL;
    struct timespec zero = {0, 0};
    long r = syscall(SYS_io_getevents, (unsigned long)ctx, 0L, n, (void *)(uintptr_t)events, &zero);
    return PyLong_FromLong(r < 0 ? -errno : r);
}

static PyMethodDef methods[] = {
    {"aio_submit1", spin_aio_submit1, METH_VARARGS, "io_submit of one iocb -> 1 or -errno"},
    {"aio_reap", spin_aio_reap, METH_VARARGS, "io_getevents(ctx, 0, n, events, {0, 0}) -> count or -errno"},
    {"watch", spin_watch, METH_VARARGS, "watch([(address, value)], timeout_ns) -> index of the first changed word, or -1"},
    {"watch_until", spin_watch_until, METH_VARARGS,
     "watch_until([(address, value)], deadline_ns) -> CLOCK_MONOTONIC ns once a word changed or the deadline passed"},
    {"store_fence_load", spin_store_fence_load, METH_VARARGS, "u32 store, full fence, u32 load"},
    {"store16_fence_load16", spin_store16_fence_load16, METH_VARARGS, "u16 store, full fence, u16 load"},
    {"fence", spin_fence, METH_NOARGS, "a full memory barrier (mfence)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_spin", "GIL-free spinning and fences for sidecores", -1, methods};

PyMODINIT_FUNC PyInit__spin(void) { return PyModule_Create(&module); }
