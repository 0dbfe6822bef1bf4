/* C fast path for the split virtqueue (VIRTIO 1.2 §2.7) and virtio-blk IN/OUT (§5.2.6).
 *
 * The device model is defined in Python (queue.py, blk.py).  This file only
 * takes the *common, fully valid* case faster, and defers everything else:
 *
 *   Ring.walk(head)       walks and validates one chain exactly as
 *                         Virtqueue._walk does; returns its segments, or None
 *                         when Python must decide (anything it would refuse,
 *                         flag with chain.error, or that leaves the region).
 *   Ring.blk_batch(...)   takes every available chain in one pass, with the
 *                         GIL released: walk, parse the virtio-blk header,
 *                         preadv/pwritev straight between the disk and guest
 *                         RAM, status byte, used element; one used.idx store
 *                         for the batch.  It stops *before* consuming the first
 *                         chain that is not a plain, valid IN/OUT and returns
 *                         more=True: Python pops that chain and handles it
 *                         (errors, flush, get-id, discard, write-zeroes, ...).
 *
 * "Defer" never has a side effect on the ring, so the Python path sees the
 * chain exactly as if C had not looked at it -- the two paths cannot disagree
 * about what is valid, only about who does the work.  A failed or short host
 * I/O also defers: Python repeats the (idempotent) transfer and reports the
 * error status.
 *
 * Memory safety: guest RAM is one mapped region given as a writable buffer
 * (pinned while the Ring exists, like a memoryview).  Every guest-physical
 * range -- indirect table, data buffer -- is checked to lie inside it before
 * it is touched; the ring areas are buffers whose bounds Python validated.
 * Guest-written values are loaded once into locals and then checked.
 *
 * Ordering: avail.idx is loaded with acquire semantics before the ring entry
 * and descriptors; used elements and status bytes are stored before a release
 * store of used.idx; 16-bit ring fields are loaded and stored whole.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4
#define MAX_SEGS 1024          /* longer chains (and > IOV_MAX pieces) go to Python */
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define SECTOR 512

enum { PH_RING, PH_WALK, PH_PARSE, PH_IO, PH_USED, NPH };

typedef struct {
    uint64_t gpa;
    uint32_t len;
    uint32_t w;
} seg_t;

typedef struct {
    PyObject_HEAD
    Py_buffer ram, desc, avail, used;
    int have_ram, have_desc, have_avail, have_used;
    uint64_t ram_gpa;
    uint32_t size, max_chain;
    int indirect_ok;
} Ring;

static PyTypeObject RingType;

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("pause" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

static inline uint64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* host pointer of guest-physical [gpa, gpa+len) if it lies inside the region, else NULL */
static inline uint8_t *ram_ptr(const Ring *r, uint64_t gpa, uint64_t len)
{
    uint64_t size = (uint64_t)r->ram.len;
    if (gpa < r->ram_gpa)
        return NULL;
    uint64_t off = gpa - r->ram_gpa;
    if (off > size || len > size - off)
        return NULL;
    return (uint8_t *)r->ram.buf + off;
}

static inline void load_desc(const uint8_t *p, uint64_t *addr, uint32_t *len, uint16_t *flags, uint16_t *next)
{
    /* The driver must not change an available descriptor, but a hostile one may: each field is loaded
     * once (never re-read from guest memory later).  The ring's table is 16-aligned; an indirect table
     * need not be, and is then copied through volatile byte loads. */
    uint64_t lo, hi;
    if (((uintptr_t)p & 7) == 0) {
        lo = __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED);
        hi = __atomic_load_n((const uint64_t *)(p + 8), __ATOMIC_RELAXED);
    } else {
        uint8_t b[16];
        for (int i = 0; i < 16; i++)
            b[i] = ((const volatile uint8_t *)p)[i];
        memcpy(&lo, b, 8);
        memcpy(&hi, b + 8, 8);
    }
    *addr = lo;
    *len = (uint32_t)hi;
    *flags = (uint16_t)(hi >> 32);
    *next = (uint16_t)(hi >> 48);
}

/* Walk chain `head` with the checks of Virtqueue._walk.  Returns the number of
 * segments (zero-length descriptors dropped), or -1 if Python must handle the
 * chain: a ring error, a buffer error (chain.error), a buffer or indirect table
 * outside this region, or more than MAX_SEGS buffers. */
static int walk(const Ring *r, uint32_t head, seg_t *segs, uint64_t *rlen_out, uint64_t *wlen_out)
{
    if (head >= r->size)
        return -1;
    const uint8_t *table = (const uint8_t *)r->desc.buf;
    uint32_t limit = r->size, steps = 0, ndesc = 0, idx = head;
    int indirect = 0;
    uint64_t rlen = 0, wlen = 0;
    for (;;) {
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next;
        load_desc(table + ((size_t)idx << 4), &addr, &len, &flags, &next);
        steps++;
        if (flags & F_INDIRECT) {
            if (indirect || !r->indirect_ok || (flags & F_NEXT) || len == 0 || (len & 15))
                return -1;
            const uint8_t *t = ram_ptr(r, addr, len);
            if (t == NULL)
                return -1;
            table = t;
            indirect = 1;
            limit = len >> 4;
            steps = 0;
            idx = 0;
            continue;
        }
        if (indirect && steps > r->max_chain)
            return -1;  /* zero-length descriptors count too: Python refuses the chain */
        if (len) {
            ndesc++;
            if (ndesc > r->max_chain || ndesc > MAX_SEGS)
                return -1;
            if (ram_ptr(r, addr, len) == NULL)
                return -1;
            seg_t *s = &segs[ndesc - 1];
            s->gpa = addr;
            s->len = len;
            if (flags & F_WRITE) {
                s->w = 1;
                wlen += len;
            } else {
                if (wlen)
                    return -1;  /* device-readable after device-writable: chain.error */
                s->w = 0;
                rlen += len;
            }
        }
        if (!(flags & F_NEXT))
            break;
        if (next >= limit || steps >= limit)
            return -1;
        idx = next;
    }
    if (rlen + wlen > 0xFFFFFFFFull)
        return -1;
    *rlen_out = rlen;
    *wlen_out = wlen;
    return (int)ndesc;
}

/* iovecs for stream bytes [start, start+n) of the readable (w=0) or writable (w=1) segments */
static int make_iov(const Ring *r, const seg_t *segs, int nseg, int w, uint64_t start, uint64_t n, struct iovec *iov)
{
    int k = 0;
    uint64_t pos = 0, end = start + n;
    for (int i = 0; i < nseg && pos < end; i++) {
        if ((int)segs[i].w != w)
            continue;
        uint64_t nxt = pos + segs[i].len;
        if (nxt > start) {
            uint64_t lo = start > pos ? start - pos : 0;
            uint64_t hi = end < nxt ? end - pos : segs[i].len;
            iov[k].iov_base = (uint8_t *)r->ram.buf + (segs[i].gpa - r->ram_gpa) + lo;
            iov[k].iov_len = (size_t)(hi - lo);
            k++;
        }
        pos = nxt;
    }
    return k;
}

/* the whole transfer, retrying short I/O; 0 on success, -1 on an error or end of file */
static int transfer(int fd, int is_read, struct iovec *iov, int niov, uint64_t offset, uint64_t nbytes)
{
    while (nbytes) {
        ssize_t got = is_read ? preadv(fd, iov, niov, (off_t)offset) : pwritev(fd, iov, niov, (off_t)offset);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        nbytes -= (uint64_t)got;
        offset += (uint64_t)got;
        while (niov && (size_t)got >= iov->iov_len) {
            got -= (ssize_t)iov->iov_len;
            iov++;
            niov--;
        }
        if (niov && got) {
            iov->iov_base = (uint8_t *)iov->iov_base + got;
            iov->iov_len -= (size_t)got;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
static void ring_release(Ring *r)
{
    if (r->have_ram) PyBuffer_Release(&r->ram);
    if (r->have_desc) PyBuffer_Release(&r->desc);
    if (r->have_avail) PyBuffer_Release(&r->avail);
    if (r->have_used) PyBuffer_Release(&r->used);
    r->have_ram = r->have_desc = r->have_avail = r->have_used = 0;
}

static void ring_dealloc(Ring *r)
{
    ring_release(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static int ring_init(Ring *r, PyObject *args, PyObject *kw)
{
    PyObject *ram, *desc, *avail, *used;
    unsigned long long ram_gpa;
    unsigned int size, max_chain;
    int indirect_ok;
    if (!PyArg_ParseTuple(args, "OKOOOIIp", &ram, &ram_gpa, &desc, &avail, &used, &size, &max_chain, &indirect_ok))
        return -1;
    ring_release(r);
    if (PyObject_GetBuffer(ram, &r->ram, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) return -1;
    r->have_ram = 1;
    if (PyObject_GetBuffer(desc, &r->desc, PyBUF_SIMPLE) < 0) return -1;
    r->have_desc = 1;
    if (PyObject_GetBuffer(avail, &r->avail, PyBUF_SIMPLE) < 0) return -1;
    r->have_avail = 1;
    if (PyObject_GetBuffer(used, &r->used, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) return -1;
    r->have_used = 1;
    if (size == 0 || (size & (size - 1)) || size > 32768 || max_chain == 0
        || (uint64_t)r->desc.len < 16ull * size || (uint64_t)r->avail.len < 4ull + 2ull * size
        || (uint64_t)r->used.len < 4ull + 8ull * size) {
        PyErr_SetString(PyExc_ValueError, "Ring: bad size or ring areas smaller than the queue size needs");
        return -1;
    }
    r->ram_gpa = ram_gpa;
    r->size = size;
    r->max_chain = max_chain;
    r->indirect_ok = indirect_ok;
    return 0;
}

/* walk(head) -> (segments [(gpa, len, writable)], readable_len, writable_len) or None */
static PyObject *ring_walk(Ring *r, PyObject *arg)
{
    unsigned long head = PyLong_AsUnsignedLong(arg);
    if (head == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    seg_t segs[MAX_SEGS];
    uint64_t rlen, wlen;
    int n = walk(r, head > 0xFFFF ? 0xFFFFFFFFu : (uint32_t)head, segs, &rlen, &wlen);
    if (n < 0)
        Py_RETURN_NONE;
    PyObject *list = PyList_New(n);
    if (list == NULL)
        return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("(KIO)", (unsigned long long)segs[i].gpa, segs[i].len,
                                    segs[i].w ? Py_True : Py_False);
        if (t == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, t);
    }
    return Py_BuildValue("(NKK)", list, (unsigned long long)rlen, (unsigned long long)wlen);
}

/* One queue's consumer state, as Virtqueue keeps it (_last_avail, _shadow_avail, _used_idx,
 * _avail_event, _evt, _notify_enabled, _signalled_used, _signalled_valid). */
typedef struct {
    uint32_t last, shadow, used_idx, avail_event, signalled_used;
    int evt, notify_enabled, signalled_valid;
} qstate_t;

/* The batch itself, called without the GIL: at most max_batch plain IN/OUT chains, one used.idx
 * store for them.  Returns the number completed; *more is set when the next chain is for Python
 * (see the file comment). */
static unsigned blk_run(Ring *r, qstate_t *st, unsigned max_batch, uint64_t *times, int fd, uint64_t capacity,
                        uint64_t max_bytes, int writable_disk, int *more_out, seg_t *segs, struct iovec *iov)
{
    volatile uint16_t *avail = (volatile uint16_t *)r->avail.buf;
    uint16_t *used16 = (uint16_t *)r->used.buf;
    uint32_t *elems = (uint32_t *)((uint8_t *)r->used.buf + 4);
    const uint32_t size = r->size, mask = size - 1, avail_event_i = 2 + 4 * size;
    uint32_t last = st->last & 0xFFFF, shadow = st->shadow & 0xFFFF, used_idx = st->used_idx & 0xFFFF;
    uint32_t avail_event = st->avail_event & 0xFFFF;
    const int evt = st->evt, notify_enabled = st->notify_enabled;
    unsigned int done = 0;
    int more = 0;
    uint64_t t0 = times ? now_ns() : 0, t1;
    while (done < max_batch) {
        if (last == shadow) {
            uint16_t idx = __atomic_load_n(&avail[1], __ATOMIC_ACQUIRE);
            if (idx == last)
                break;
            if (((idx - last) & 0xFFFF) > size) {   /* Python raises for this */
                more = 1;
                break;
            }
            shadow = idx;
        }
        uint16_t head = __atomic_load_n(&avail[2 + (last & mask)], __ATOMIC_RELAXED);
        if (times) { t1 = now_ns(); times[PH_RING] += t1 - t0; t0 = t1; }
        uint64_t rlen, wlen;
        int nseg = walk(r, head, segs, &rlen, &wlen);
        if (times) { t1 = now_ns(); times[PH_WALK] += t1 - t0; t0 = t1; }
        if (nseg < 0 || rlen < 16 || wlen < 1) {
            more = 1;
            break;
        }
        /* the 16-byte header: the first readable bytes, however they are split */
        uint8_t hdr[16];
        uint64_t got = 0;
        for (int i = 0; i < nseg && got < 16; i++) {
            uint64_t n = segs[i].len < 16 - got ? segs[i].len : 16 - got;
            memcpy(hdr + got, (uint8_t *)r->ram.buf + (segs[i].gpa - r->ram_gpa), n);
            got += n;
        }
        uint32_t type;
        uint64_t sector;
        memcpy(&type, hdr, 4);
        memcpy(&sector, hdr + 8, 8);
        int is_read = type == BLK_T_IN;
        uint64_t nbytes = is_read ? wlen - 1 : rlen - 16;
        if ((type != BLK_T_IN && type != BLK_T_OUT) || (!is_read && !writable_disk)
            || nbytes % SECTOR || nbytes > max_bytes || sector > capacity || nbytes / SECTOR > capacity - sector) {
            more = 1;
            break;
        }
        int niov = make_iov(r, segs, nseg, is_read, is_read ? 0 : 16, nbytes, iov);
        if (times) { t1 = now_ns(); times[PH_PARSE] += t1 - t0; t0 = t1; }
        if (nbytes && transfer(fd, is_read, iov, niov, sector * SECTOR, nbytes) < 0) {
            more = 1;     /* Python repeats the transfer and reports the error */
            break;
        }
        if (times) { t1 = now_ns(); times[PH_IO] += t1 - t0; t0 = t1; }
        /* status: the last writable byte */
        for (int i = nseg - 1; i >= 0; i--) {
            if (segs[i].w) {
                *((uint8_t *)r->ram.buf + (segs[i].gpa - r->ram_gpa) + segs[i].len - 1) = 0;  /* VIRTIO_BLK_S_OK */
                break;
            }
        }
        if (times) { t1 = now_ns(); times[PH_PARSE] += t1 - t0; t0 = t1; }
        uint32_t i = (used_idx & mask) << 1;
        __atomic_store_n(&elems[i], (uint32_t)head, __ATOMIC_RELAXED);
        __atomic_store_n(&elems[i + 1], (uint32_t)(is_read ? wlen : 1), __ATOMIC_RELAXED);
        used_idx = (used_idx + 1) & 0xFFFF;
        /* consume the avail entry, as Virtqueue._next_head does */
        last = (last + 1) & 0xFFFF;
        if (evt) {
            if (notify_enabled) {
                __atomic_store_n(&used16[avail_event_i], (uint16_t)last, __ATOMIC_RELAXED);
            } else if (((last - avail_event) & 0xFFFF) >= 0x4000) {
                avail_event = (last - 1) & 0xFFFF;
                __atomic_store_n(&used16[avail_event_i], (uint16_t)avail_event, __ATOMIC_RELAXED);
            }
        }
        done++;
        if (times) { t1 = now_ns(); times[PH_USED] += t1 - t0; t0 = t1; }
    }
    if (done)  /* one used.idx store for the batch, after every element and status byte */
        __atomic_store_n(&used16[1], (uint16_t)used_idx, __ATOMIC_RELEASE);
    if (times) times[PH_USED] += now_ns() - t0;
    st->last = last;
    st->shadow = shadow;
    st->used_idx = used_idx;
    st->avail_event = avail_event;
    *more_out = more;
    return done;
}

/* After a published batch: does the driver want a used-buffer notification?  Virtqueue.should_signal
 * (VIRTIO 1.2 §2.7.10): a full barrier orders the used.idx store before the load of used_event (or
 * avail.flags); the driver does the mirror image. */
static int want_signal(const Ring *r, qstate_t *st)
{
    const volatile uint16_t *avail = (const volatile uint16_t *)r->avail.buf;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t now = st->used_idx & 0xFFFF;
    if (st->evt) {
        uint32_t old = st->signalled_used & 0xFFFF;
        st->signalled_used = now;
        if (!st->signalled_valid) {
            st->signalled_valid = 1;
            return 1;
        }
        if ((uint64_t)r->avail.len < 6ull + 2ull * r->size)   /* no used_event field: always */
            return 1;
        uint32_t used_event = __atomic_load_n(&avail[2 + r->size], __ATOMIC_RELAXED);
        return ((now - used_event - 1) & 0xFFFF) < ((now - old) & 0xFFFF);
    }
    return !(__atomic_load_n(&avail[0], __ATOMIC_RELAXED) & 1);   /* VRING_AVAIL_F_NO_INTERRUPT */
}

/* blk_batch(last_avail, shadow_avail, used_idx, avail_event, event_idx, notify_enabled, max_batch, times,
 *           fd, capacity_sectors, max_request_bytes, writable_disk)
 *   -> (completed, more, last_avail, shadow_avail, used_idx, avail_event)
 * times: None, or a writable buffer of 5 u64 to which ns per phase are added
 * (ring read, chain walk, request parse, host I/O, used write). */
static PyObject *ring_blk_batch(Ring *r, PyObject *args)
{
    unsigned int last, shadow, used_idx, avail_event, max_batch;
    int evt, notify_enabled, fd, writable_disk;
    unsigned long long capacity, max_bytes;
    PyObject *times_obj;
    if (!PyArg_ParseTuple(args, "IIIIppIOiKKp", &last, &shadow, &used_idx, &avail_event, &evt, &notify_enabled,
                          &max_batch, &times_obj, &fd, &capacity, &max_bytes, &writable_disk))
        return NULL;
    Py_buffer tb;
    uint64_t *times = NULL;
    if (times_obj != Py_None) {
        if (PyObject_GetBuffer(times_obj, &tb, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
            return NULL;
        if (tb.len < (Py_ssize_t)(NPH * sizeof(uint64_t))) {
            PyBuffer_Release(&tb);
            PyErr_SetString(PyExc_ValueError, "blk_batch: times needs 5 u64");
            return NULL;
        }
        times = (uint64_t *)tb.buf;
    }
    qstate_t st = {last & 0xFFFF, shadow & 0xFFFF, used_idx & 0xFFFF, avail_event & 0xFFFF, 0, evt, notify_enabled, 0};
    unsigned int done = 0;
    int more = 0;
    const volatile uint16_t *avail = (const volatile uint16_t *)r->avail.buf;
    if (st.last == st.shadow && __atomic_load_n(&avail[1], __ATOMIC_ACQUIRE) == st.last) {
        /* nothing available: answer without giving up and retaking the GIL */
        if (times)
            PyBuffer_Release(&tb);
        return Py_BuildValue("(IOIIII)", 0, Py_False, st.last, st.shadow, st.used_idx, st.avail_event);
    }
    seg_t segs[MAX_SEGS];            /* 32 KiB of stack in all: sidecore threads have megabytes */
    struct iovec iov[MAX_SEGS];
    Py_BEGIN_ALLOW_THREADS
    done = blk_run(r, &st, max_batch, times, fd, capacity, max_bytes, writable_disk, &more, segs, iov);
    Py_END_ALLOW_THREADS
    if (times)
        PyBuffer_Release(&tb);
    return Py_BuildValue("(IOIIII)", done, more ? Py_True : Py_False, st.last, st.shadow, st.used_idx,
                         st.avail_event);
}

/* ---------------------------------------------------------------------------------------------- */
/* serve(jobs, watches, timeout_ns, budget, times)
 *   -> (reason, index, [(last_avail, shadow_avail, used_idx, avail_event, signalled_used, signalled_valid,
 *                        completed, last_work_ns, interrupts)] per job, idle_ns)
 *
 * A sidecore round for many virtio-blk queues at once, without the GIL: visit every job in turn, take
 * at most `budget` chains from it (blk_run), and when a visit completed some, decide the interrupt
 * as Virtqueue.should_signal does and write the queue's irqfd (call_fd; -1: the caller signals) --
 * so a completion reaches the guest with no Python in between.  Spin (pause) while nothing is
 * available, until `timeout_ns` have passed (reason 0; at least one pass is made), a job's next
 * chain is for Python (reason 1, index = that job: the caller pops it), or one of `watches`
 * ([(address, expected u32)], the words of pollables served in Python) changed (reason 2, index =
 * that watch).  One visit takes at most `budget` chains, so a flooded queue delays the others by
 * one budget per pass (issue 12's fairness).
 *
 * jobs: [(ring, last_avail, shadow_avail, used_idx, avail_event, event_idx, notify_enabled,
 *         signalled_used, signalled_valid, fd, capacity_sectors, max_request_bytes, writable_disk, call_fd)]
 * times: None, or 5 u64 (as blk_batch) to which the phases are added; idle_ns (this thread's CPU
 * time spinning with nothing to do) is measured only then, else 0.
 * The caller keeps every ring's memory mapped and every fd open for the duration of the call (the
 * sidecore loop detaches a queue only between rounds). */
#define MAX_JOBS 1024
typedef struct {
    Ring *ring;
    qstate_t st;
    int fd, writable, call_fd;
    uint64_t capacity, max_bytes, last_work;
    unsigned done, irqs;
} job_t;

static PyObject *vring_serve(PyObject *self, PyObject *args)
{
    PyObject *jobs_obj, *watch_obj, *times_obj;
    unsigned long long timeout_ns;
    unsigned int budget;
    if (!PyArg_ParseTuple(args, "OOKIO", &jobs_obj, &watch_obj, &timeout_ns, &budget, &times_obj))
        return NULL;
    if (budget == 0) {
        PyErr_SetString(PyExc_ValueError, "serve: budget must be at least 1");
        return NULL;
    }
    PyObject *jobs_seq = PySequence_Fast(jobs_obj, "serve: jobs must be a sequence");
    if (jobs_seq == NULL)
        return NULL;
    PyObject *watch_seq = PySequence_Fast(watch_obj, "serve: watches must be a sequence");
    if (watch_seq == NULL) {
        Py_DECREF(jobs_seq);
        return NULL;
    }
    Py_ssize_t nj = PySequence_Fast_GET_SIZE(jobs_seq), nw = PySequence_Fast_GET_SIZE(watch_seq);
    job_t *jobs = NULL;
    uintptr_t *waddr = NULL;
    uint32_t *wval = NULL;
    PyObject *result = NULL;
    Py_buffer tb;
    uint64_t *times = NULL;
    Py_ssize_t held = 0;      /* rings INCREF'd so far */
    if (nj > MAX_JOBS || nw > MAX_JOBS) {
        PyErr_SetString(PyExc_ValueError, "serve: at most 1024 jobs and 1024 watches");
        goto done;
    }
    jobs = PyMem_Calloc(nj ? nj : 1, sizeof(*jobs));
    waddr = PyMem_Calloc(nw ? nw : 1, sizeof(*waddr));
    wval = PyMem_Calloc(nw ? nw : 1, sizeof(*wval));
    if (jobs == NULL || waddr == NULL || wval == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < nj; i++) {
        job_t *j = &jobs[i];
        PyObject *ring;
        unsigned int last, shadow, used_idx, avail_event, signalled_used;
        int evt, notify_enabled, signalled_valid;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(jobs_seq, i), "O!IIIIppIpiKKpi;serve: a job tuple",
                              &RingType, &ring, &last, &shadow, &used_idx, &avail_event, &evt, &notify_enabled,
                              &signalled_used, &signalled_valid, &j->fd, &j->capacity, &j->max_bytes, &j->writable,
                              &j->call_fd))
            goto done;
        Py_INCREF(ring);
        held = i + 1;
        j->ring = (Ring *)ring;
        if (!j->ring->have_used) {
            PyErr_SetString(PyExc_ValueError, "serve: a Ring that was never initialised");
            goto done;
        }
        j->st = (qstate_t){last & 0xFFFF, shadow & 0xFFFF, used_idx & 0xFFFF, avail_event & 0xFFFF,
                           signalled_used & 0xFFFF, evt, notify_enabled, signalled_valid};
    }
    for (Py_ssize_t i = 0; i < nw; i++) {
        unsigned long long addr, value;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(watch_seq, i), "KK;serve: (address, value) watches", &addr,
                              &value))
            goto done;
        waddr[i] = (uintptr_t)addr;
        wval[i] = (uint32_t)value;
    }
    if (times_obj != Py_None) {
        if (PyObject_GetBuffer(times_obj, &tb, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
            goto done;
        if (tb.len < (Py_ssize_t)(NPH * sizeof(uint64_t))) {
            PyBuffer_Release(&tb);
            PyErr_SetString(PyExc_ValueError, "serve: times needs 5 u64");
            goto done;
        }
        times = (uint64_t *)tb.buf;
    }
    int reason = 0;
    long index = -1;
    uint64_t idle = 0, busy = 0;
    seg_t *segs = PyMem_Malloc(MAX_SEGS * sizeof(seg_t));
    struct iovec *iov = PyMem_Malloc(MAX_SEGS * sizeof(struct iovec));
    if (segs == NULL || iov == NULL) {
        PyMem_Free(segs);
        PyMem_Free(iov);
        if (times)
            PyBuffer_Release(&tb);
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const uint64_t start = now_ns(), deadline = start + timeout_ns, cpu_start = times ? thread_cpu_ns() : 0;
    for (unsigned iter = 1;; iter++) {
        int worked = 0;
        for (Py_ssize_t i = 0; i < nj && !reason; i++) {
            job_t *j = &jobs[i];
            const volatile uint16_t *avail = (const volatile uint16_t *)j->ring->avail.buf;
            if (j->st.last == j->st.shadow && __atomic_load_n(&avail[1], __ATOMIC_ACQUIRE) == j->st.last)
                continue;
            int more = 0;
            uint64_t t_busy = times ? thread_cpu_ns() : 0;
            unsigned n = blk_run(j->ring, &j->st, budget, times, j->fd, j->capacity, j->max_bytes, j->writable,
                                 &more, segs, iov);
            if (n) {
                worked = 1;
                j->done += n;
                j->last_work = now_ns();
                if (j->call_fd >= 0 && want_signal(j->ring, &j->st)) {
                    static const uint64_t one = 1;
                    /* EAGAIN: a counter at its maximum (a hostile peer's fd) already signals */
                    if (write(j->call_fd, &one, sizeof one) == sizeof one)
                        j->irqs++;
                }
            }
            if (times)
                busy += thread_cpu_ns() - t_busy;
            if (more) {
                reason = 1;
                index = (long)i;
            }
        }
        for (Py_ssize_t i = 0; i < nw && !reason; i++) {
            if (*(volatile const uint32_t *)waddr[i] != wval[i]) {
                reason = 2;
                index = (long)i;
            }
        }
        if (reason)
            break;
        if (worked) {
            if (now_ns() >= deadline)
                break;
            continue;
        }
        cpu_relax();
        if (((iter & 63) == 0 || timeout_ns == 0) && now_ns() >= deadline)
            break;
    }
    if (times)
        idle = thread_cpu_ns() - cpu_start - busy;
    Py_END_ALLOW_THREADS
    PyMem_Free(segs);
    PyMem_Free(iov);
    if (times)
        PyBuffer_Release(&tb);
    PyObject *list = PyList_New(nj);
    if (list == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < nj; i++) {
        job_t *j = &jobs[i];
        PyObject *t = Py_BuildValue("(IIIIIOIKI)", j->st.last, j->st.shadow, j->st.used_idx, j->st.avail_event,
                                    j->st.signalled_used, j->st.signalled_valid ? Py_True : Py_False, j->done,
                                    (unsigned long long)j->last_work, j->irqs);
        if (t == NULL) {
            Py_DECREF(list);
            goto done;
        }
        PyList_SET_ITEM(list, i, t);
    }
    result = Py_BuildValue("(ilNK)", reason, index, list, (unsigned long long)idle);
done:
    for (Py_ssize_t i = 0; i < held; i++)
        Py_DECREF((PyObject *)jobs[i].ring);
    PyMem_Free(jobs);
    PyMem_Free(waddr);
    PyMem_Free(wval);
    Py_DECREF(jobs_seq);
    Py_DECREF(watch_seq);
    return result;
}

static PyMethodDef ring_methods[] = {
    {"walk", (PyCFunction)ring_walk, METH_O,
     "walk(head) -> ([(gpa, len, writable)], readable_len, writable_len), or None: Python decides"},
    {"blk_batch", (PyCFunction)ring_blk_batch, METH_VARARGS,
     "virtio-blk IN/OUT batch without the GIL -> (completed, more, last_avail, shadow_avail, used_idx, avail_event)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "exitless.devices.virtio._vring.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Ring(ram, ram_gpa, desc, avail, used, size, max_chain, indirect): one split virtqueue's areas "
              "(buffers: a RAM region starting at guest-physical ram_gpa, the descriptor table, avail and used rings)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ring_init,
    .tp_dealloc = (destructor)ring_dealloc,
    .tp_methods = ring_methods,
};

static PyMethodDef module_methods[] = {
    {"serve", vring_serve, METH_VARARGS,
     "serve(jobs, watches, timeout_ns, budget, times) -> (reason, index, [per-job state], idle_ns): "
     "many virtio-blk queues served and their irqfds written without the GIL"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_vring",
                                    "C fast path for split virtqueues and virtio-blk IN/OUT", -1, module_methods};

PyMODINIT_FUNC PyInit__vring(void)
{
    if (PyType_Ready(&RingType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(&RingType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
