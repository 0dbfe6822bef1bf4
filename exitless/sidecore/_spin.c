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
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("pause" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* watch([(address, expected u32), ...], timeout_ns[, yield_after_ns]) -> index or -1
 * Spin until the u32 at some address differs from its expected value; return its index,
 * or -1 once timeout_ns have passed.  The list is read (with the GIL) before spinning.
 * After yield_after_ns of fruitless spinning (0: never) the spin calls sched_yield(2) between
 * checks: on an oversubscribed host the thread that will change the word (a vCPU of the same VMM,
 * in the same scheduling group) is often queued behind this spinner on its CPU, and every hand-off
 * then waited for the spinner's whole time slice.  On an idle CPU sched_yield returns at once.
 * The price: a spinner that gave its CPU away is late for the next change (loop.SPIN_YIELD_NS). */
#define MAX_WATCHES 256
static PyObject *spin_watch(PyObject *self, PyObject *args)
{
    PyObject *seq;
    unsigned long long timeout_ns, yield_after_ns = 0;
    if (!PyArg_ParseTuple(args, "OK|K", &seq, &timeout_ns, &yield_after_ns))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "watch: a sequence of (address, value) pairs");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n == 0) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "watch: at least one (address, value) pair");
        return NULL;
    }
    uintptr_t a_stack[MAX_WATCHES], *a = a_stack;
    uint32_t s_stack[MAX_WATCHES], *s = s_stack;
    if (n > MAX_WATCHES) {
        a = PyMem_Malloc(n * sizeof(*a));
        s = PyMem_Malloc(n * sizeof(*s));
        if (a == NULL || s == NULL) {
            PyMem_Free(a);
            PyMem_Free(s);
            Py_DECREF(fast);
            return PyErr_NoMemory();
        }
    }
    int ok = 1;
    for (Py_ssize_t i = 0; i < n && ok; i++) {
        unsigned long long addr, value;
        ok = PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "KK;watch: (address, value) pairs", &addr, &value);
        a[i] = (uintptr_t)addr;
        s[i] = (uint32_t)value;
    }
    Py_DECREF(fast);
    if (!ok) {
        if (a != a_stack) {
            PyMem_Free(a);
            PyMem_Free(s);
        }
        return NULL;
    }
    long found = -1;
    Py_BEGIN_ALLOW_THREADS
    uint64_t start = now_ns(), deadline = start + timeout_ns;
    uint64_t yield_at = yield_after_ns ? start + yield_after_ns : UINT64_MAX;
    int yielding = 0;
    for (unsigned iter = 0;; iter++) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (*(volatile const uint32_t *)a[i] != s[i]) {
                found = (long)i;
                break;
            }
        }
        if (found >= 0)
            break;
        if (yielding) {
            sched_yield();
        } else {
            cpu_relax();
        }
        if ((iter & 63) == 0 || yielding) {
            uint64_t t = now_ns();
            if (t >= deadline)
                break;
            yielding = t >= yield_at;
        }
    }
    Py_END_ALLOW_THREADS
    if (a != a_stack) {
        PyMem_Free(a);
        PyMem_Free(s);
    }
    return PyLong_FromLong(found);
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
    {"store_fence_load", spin_store_fence_load, METH_VARARGS, "u32 store, full fence, u32 load"},
    {"store16_fence_load16", spin_store16_fence_load16, METH_VARARGS, "u16 store, full fence, u16 load"},
    {"fence", spin_fence, METH_NOARGS, "a full memory barrier (mfence)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_spin", "GIL-free spinning and fences for sidecores", -1, methods};

PyMODINIT_FUNC PyInit__spin(void) { return PyModule_Create(&module); }
