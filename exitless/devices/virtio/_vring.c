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
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <sched.h>
#include <unistd.h>

#include "../../cpu_relax.h"

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
/* serve(jobs, watches, timeout_ns, budget, times, yield_ns=0, extend_ns=0, limit_ns=0)
 *   -> (reason, index, [(last_avail, shadow_avail, used_idx, avail_event, signalled_used, signalled_valid,
 *                        completed, last_work_ns, interrupts)] per blk job, or a net job's result (see
 *       net_job_new), idle_ns, yields)
 *
 * A sidecore round for many virtio-blk queues and virtio-net queue pairs at once, without the GIL (a net
 * job -- a tuple whose first item is "net" -- is described with net_job_new below): visit every job in
 * turn, take at most `budget` chains from it (blk_run), and at the end of the pass, for each queue that completed
 * some, decide the interrupt as Virtqueue.should_signal does and write the queue's irqfd (call_fd; -1:
 * the caller signals) -- so a completion reaches the guest with no Python in between.  Spin (pause)
 * while nothing is available, until `timeout_ns` have passed (reason 0; at least one pass is made),
 * a job's next chain is for Python (reason 1, index = that job: the caller pops it), or one of
 * `watches` ([(address, expected u32)], the words of pollables served in Python) changed (reason 2,
 * index = that watch).  One visit takes at most `budget` chains, so a flooded queue delays the others by
 * one budget per pass (issue 12's fairness); a pair's visit takes at most `budget` TX frames.
 *
 * extend_ns, limit_ns: while busy, the round goes on -- each pass with work moves the end to at least
 * extend_ns after it (0: never), but never past limit_ns after the start (the adaptive sidecore: timeout_ns
 * is when every idle window could run out, and work seen in C pushes that on by at least the shortest
 * window, so a busy round is not cut at each window to let Python find out that nothing is to be armed).
 *
 * yield_ns: once no queue has had work for this long (0: never), the idle spin calls sched_yield() at
 * each of its clock reads (every 64 pauses): a runnable thread waiting for this CPU -- on a host with
 * fewer cores than threads, often a vCPU of a VM this round serves -- runs instead of the spin, and
 * with nobody waiting the call returns at once.  `yields` counts the calls.
 *
 * jobs: [(ring, last_avail, shadow_avail, used_idx, avail_event, event_idx, notify_enabled,
 *         signalled_used, signalled_valid, fd, capacity_sectors, max_request_bytes, writable_disk, call_fd)]
 * times: None, or 5 u64 (as blk_batch) to which the phases are added; idle_ns (this thread's CPU
 * time spinning with nothing to do) is measured only then, else 0.
 * The caller keeps every ring's memory mapped and every fd open for the duration of the call (the
 * sidecore loop detaches a queue only between rounds). */
#define MAX_JOBS 1024
#define SERVE_IOV (MAX_SEGS + 1)     /* iovecs of a round: a blk request's, or a frame's plus the bounce buffer */
struct netjob;
static struct netjob *net_job_new(PyObject *t);
static void net_job_free(struct netjob *n);
static int net_job_pass(struct netjob *n, unsigned budget, seg_t *segs, seg_t *segs2, struct iovec *iov);
static void net_job_signal(struct netjob *n);
static int net_job_reason(const struct netjob *n);
static PyObject *net_job_result(const struct netjob *n, unsigned long long last_work);

typedef struct {
    struct netjob *net;       /* a virtio-net pair (the fields below are then unused but last_work) */
    Ring *ring;
    qstate_t st;
    int fd, writable, call_fd;
    uint64_t capacity, max_bytes, last_work;
    unsigned done, irqs;
    int signal_due;           /* completed chains this pass: decide (and send) its interrupt at the pass's end */
} job_t;

static PyObject *vring_serve(PyObject *self, PyObject *args)
{
    PyObject *jobs_obj, *watch_obj, *times_obj;
    unsigned long long timeout_ns, yield_ns = 0, extend_ns = 0, limit_ns = 0;
    unsigned int budget;
    if (!PyArg_ParseTuple(args, "OOKIO|KKK", &jobs_obj, &watch_obj, &timeout_ns, &budget, &times_obj, &yield_ns,
                          &extend_ns, &limit_ns))
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
    int any_net = 0;
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
        PyObject *ring, *item = PySequence_Fast_GET_ITEM(jobs_seq, i);
        unsigned int last, shadow, used_idx, avail_event, signalled_used;
        int evt, notify_enabled, signalled_valid;
        if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) && PyUnicode_Check(PyTuple_GET_ITEM(item, 0))) {
            if ((j->net = net_job_new(item)) == NULL)
                goto done;
            any_net = 1;
            continue;
        }
        if (!PyArg_ParseTuple(item, "O!IIIIppIpiKKpi;serve: a job tuple",
                              &RingType, &ring, &last, &shadow, &used_idx, &avail_event, &evt, &notify_enabled,
                              &signalled_used, &signalled_valid, &j->fd, &j->capacity, &j->max_bytes, &j->writable,
                              &j->call_fd))
            goto done;
        Py_INCREF(ring);
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
    uint64_t idle = 0, busy = 0, yields = 0;
    seg_t *segs = PyMem_Malloc(MAX_SEGS * sizeof(seg_t));
    seg_t *segs2 = any_net ? PyMem_Malloc(MAX_SEGS * sizeof(seg_t)) : NULL;   /* a frame's spill buffers */
    struct iovec *iov = PyMem_Malloc(SERVE_IOV * sizeof(struct iovec));
    if (segs == NULL || iov == NULL || (any_net && segs2 == NULL)) {
        PyMem_Free(segs);
        PyMem_Free(segs2);
        PyMem_Free(iov);
        if (times)
            PyBuffer_Release(&tb);
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const uint64_t start = now_ns(), cpu_start = times ? thread_cpu_ns() : 0;
    const uint64_t limit = start + (limit_ns > timeout_ns ? limit_ns : timeout_ns);
    uint64_t deadline = start + timeout_ns;
    uint64_t last_busy = start;
    for (unsigned iter = 1;; iter++) {
        int worked = 0;
        for (Py_ssize_t i = 0; i < nj && !reason; i++) {
            job_t *j = &jobs[i];
            if (j->net) {
                uint64_t t_busy = times ? thread_cpu_ns() : 0;
                if (net_job_pass(j->net, budget, segs, segs2, iov)) {
                    worked = 1;
                    j->last_work = now_ns();
                }
                if (times)
                    busy += thread_cpu_ns() - t_busy;
                if (net_job_reason(j->net)) {
                    reason = 1;
                    index = (long)i;
                }
                continue;
            }
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
                j->signal_due = 1;
            }
            if (times)
                busy += thread_cpu_ns() - t_busy;
            if (more) {
                reason = 1;
                index = (long)i;
            }
        }
        /* The interrupts of the pass, after every queue's completions of it are published: a write to
         * an irqfd wakes a halted vCPU (~15-20 µs of this thread's CPU on a nested host), and the woken
         * vCPU thread may preempt this one on its CPU -- so no queue's completions wait behind another
         * queue's interrupt.  want_signal() is the same decision at this point: a queue's used.idx does
         * not move between its visit and here. */
        if (worked) {
            uint64_t t_busy = times ? thread_cpu_ns() : 0;
            for (Py_ssize_t i = 0; i < nj; i++) {
                job_t *j = &jobs[i];
                if (j->net) {         /* its queues that published; one with no call fd returns to Python */
                    net_job_signal(j->net);
                    if (!reason && net_job_reason(j->net)) {
                        reason = 1;
                        index = (long)i;
                    }
                    continue;
                }
                if (!j->signal_due)
                    continue;
                j->signal_due = 0;
                if (j->call_fd >= 0 && want_signal(j->ring, &j->st)) {
                    static const uint64_t one = 1;
                    /* EAGAIN: a counter at its maximum (a hostile peer's fd) already signals */
                    if (write(j->call_fd, &one, sizeof one) == sizeof one)
                        j->irqs++;
                }
            }
            if (times)
                busy += thread_cpu_ns() - t_busy;
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
            last_busy = now_ns();
            if (extend_ns && last_busy + extend_ns > deadline)
                deadline = last_busy + extend_ns < limit ? last_busy + extend_ns : limit;
            if (last_busy >= deadline)
                break;
            continue;
        }
        cpu_relax();
        if ((iter & 63) == 0 || timeout_ns == 0) {
            uint64_t t = now_ns();
            if (t >= deadline)
                break;
            if (yield_ns && t - last_busy >= yield_ns) {
                sched_yield();
                yields++;
            }
        }
    }
    if (times)
        idle = thread_cpu_ns() - cpu_start - busy;
    Py_END_ALLOW_THREADS
    PyMem_Free(segs);
    PyMem_Free(segs2);
    PyMem_Free(iov);
    if (times)
        PyBuffer_Release(&tb);
    PyObject *list = PyList_New(nj);
    if (list == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < nj; i++) {
        job_t *j = &jobs[i];
        PyObject *t = j->net ? net_job_result(j->net, j->last_work)
                             : Py_BuildValue("(IIIIIOIKI)", j->st.last, j->st.shadow, j->st.used_idx, j->st.avail_event,
                                             j->st.signalled_used, j->st.signalled_valid ? Py_True : Py_False,
                                             j->done, (unsigned long long)j->last_work, j->irqs);
        if (t == NULL) {
            Py_DECREF(list);
            goto done;
        }
        PyList_SET_ITEM(list, i, t);
    }
    result = Py_BuildValue("(ilNKK)", reason, index, list, (unsigned long long)idle, (unsigned long long)yields);
done:
    for (Py_ssize_t i = 0; jobs != NULL && i < nj; i++) {
        net_job_free(jobs[i].net);
        Py_XDECREF((PyObject *)jobs[i].ring);
    }
    PyMem_Free(jobs);
    PyMem_Free(waddr);
    PyMem_Free(wval);
    Py_DECREF(jobs_seq);
    Py_DECREF(watch_seq);
    return result;
}


/* ---------------------------------------------------------------------------------------------- */
/* virtio-net (§5.1.6) over a TAP fd carrying one frame with its 12-byte virtio_net_hdr_v1 per read/write.
 * net.py is the model; these batches do exactly what VirtioNet._tx / the RX pump do for the common case
 * and hand everything else back, unconsumed, to Python. */
#define NET_HDR 12
#define ETH_HLEN 14
#define NET_MAX_FRAME (65535 + ETH_HLEN + 4)
#define NET_MAX_RX (NET_HDR + NET_MAX_FRAME)
#define HDR_F_NEEDS_CSUM 1
#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_TCPV6 4
#define GSO_ECN 0x80
/* offer bits of net_tx_batch (the negotiated features the TX header check needs) */
#define TXF_CSUM 1
#define TXF_TSO4 2
#define TXF_TSO6 4
#define TXF_ECN 8
#define NET_IOV_MAX 1024
#define RX_PUBLISH_EVERY 8   /* used.idx stores of the RX pump: every 8 frames and at its end */

/* The ring state a batch carries in and out (Virtqueue's _last_avail, _shadow_avail, _used_idx, _avail_event). */
typedef struct {
    uint32_t last, shadow, used_idx, avail_event;
    int evt, notify_enabled;
} rstate_t;

static inline void rstate_norm(rstate_t *s)
{
    s->last &= 0xFFFF;
    s->shadow &= 0xFFFF;
    s->used_idx &= 0xFFFF;
    s->avail_event &= 0xFFFF;
}

static int get_u64s(PyObject *obj, Py_buffer *b, Py_ssize_t n, const char *what);

/* the held FIFO (u16[]), held_flags (u8[]) and ctl (u64[nctl]) of net_rx_take / net_rx_pump; -1 (nothing held) on error */
static int get_held(PyObject *held, PyObject *flags, PyObject *ctl, Py_ssize_t nctl, Py_buffer *hb, Py_buffer *fb,
                    Py_buffer *cb, const char *what)
{
    if (PyObject_GetBuffer(held, hb, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        return -1;
    if (PyObject_GetBuffer(flags, fb, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(hb);
        return -1;
    }
    if (get_u64s(ctl, cb, nctl, what) < 0) {
        PyBuffer_Release(hb);
        PyBuffer_Release(fb);
        return -1;
    }
    return 0;
}

static void release3(Py_buffer *a, Py_buffer *b, Py_buffer *c)
{
    PyBuffer_Release(a);
    PyBuffer_Release(b);
    PyBuffer_Release(c);
}

/* The next available head without consuming it: 1 (head in *head), 0 (none), -1 (avail.idx jumped by more
 * than the queue size: Python raises for it). */
static inline int peek_head(const Ring *r, rstate_t *s, uint16_t *head)
{
    volatile uint16_t *avail = (volatile uint16_t *)r->avail.buf;
    if (s->last == s->shadow) {
        uint16_t idx = __atomic_load_n(&avail[1], __ATOMIC_ACQUIRE);
        if (idx == s->last)
            return 0;
        if (((idx - s->last) & 0xFFFF) > r->size)
            return -1;
        s->shadow = idx;
    }
    *head = __atomic_load_n(&avail[2 + (s->last & (r->size - 1))], __ATOMIC_RELAXED);
    return 1;
}

/* consume the entry peek_head returned, as Virtqueue._next_head does (avail_event included) */
static inline void consume_head(const Ring *r, rstate_t *s)
{
    uint16_t *used16 = (uint16_t *)r->used.buf;
    s->last = (s->last + 1) & 0xFFFF;
    if (s->evt) {
        uint32_t i = 2 + 4 * r->size;
        if (s->notify_enabled) {
            __atomic_store_n(&used16[i], (uint16_t)s->last, __ATOMIC_RELAXED);
        } else if (((s->last - s->avail_event) & 0xFFFF) >= 0x4000) {
            s->avail_event = (s->last - 1) & 0xFFFF;
            __atomic_store_n(&used16[i], (uint16_t)s->avail_event, __ATOMIC_RELAXED);
        }
    }
}

/* a used element; used.idx is published by publish_used */
static inline void put_used(const Ring *r, rstate_t *s, uint32_t head, uint32_t len)
{
    uint32_t *elems = (uint32_t *)((uint8_t *)r->used.buf + 4);
    uint32_t i = (s->used_idx & (r->size - 1)) << 1;
    __atomic_store_n(&elems[i], head, __ATOMIC_RELAXED);
    __atomic_store_n(&elems[i + 1], len, __ATOMIC_RELAXED);
    s->used_idx = (s->used_idx + 1) & 0xFFFF;
}

static inline void publish_used(const Ring *r, const rstate_t *s)
{
    __atomic_store_n(&((uint16_t *)r->used.buf)[1], (uint16_t)s->used_idx, __ATOMIC_RELEASE);
}

/* copy stream bytes [off, off+n) of the segments with writable flag w into / out of `buf` */
static void stream_copy(const Ring *r, const seg_t *segs, int nseg, int w, uint64_t off, uint8_t *buf, uint64_t n,
                        int to_guest)
{
    uint64_t pos = 0, end = off + n;
    for (int i = 0; i < nseg && pos < end; i++) {
        if ((int)segs[i].w != w)
            continue;
        uint64_t nxt = pos + segs[i].len;
        if (nxt > off) {
            uint64_t lo = off > pos ? off - pos : 0, hi = end < nxt ? end - pos : segs[i].len;
            uint8_t *g = (uint8_t *)r->ram.buf + (segs[i].gpa - r->ram_gpa) + lo;
            if (to_guest)
                memcpy(g, buf + (pos + lo - off), (size_t)(hi - lo));
            else
                memcpy(buf + (pos + lo - off), g, (size_t)(hi - lo));
        }
        pos = nxt;
    }
}

/* VirtioNet.check_tx_header: 0 if the header is acceptable for a frame of frame_len bytes */
static int tx_header_bad(const uint8_t *h, uint32_t frame_len, unsigned offer)
{
    uint8_t flags = h[0], gso = h[1];
    uint16_t hdr_len, gso_size, csum_start, csum_offset;
    memcpy(&hdr_len, h + 2, 2);
    memcpy(&gso_size, h + 4, 2);
    memcpy(&csum_start, h + 6, 2);
    memcpy(&csum_offset, h + 8, 2);
    if (flags & HDR_F_NEEDS_CSUM) {
        if (!(offer & TXF_CSUM))
            return 1;
        if ((uint32_t)csum_start + csum_offset + 2 > frame_len)
            return 1;
    }
    if (gso != GSO_NONE) {
        unsigned base = gso & ~GSO_ECN & 0xFF;
        unsigned need = base == GSO_TCPV4 ? TXF_TSO4 : base == GSO_TCPV6 ? TXF_TSO6 : 0;
        if (!need || !(offer & need))
            return 1;
        if ((gso & GSO_ECN) && !(offer & TXF_ECN))
            return 1;
        if (!(flags & HDR_F_NEEDS_CSUM) || gso_size == 0 || hdr_len > frame_len)
            return 1;
    }
    return 0;
}

static int get_u64s(PyObject *obj, Py_buffer *b, Py_ssize_t n, const char *what)
{
    if (PyObject_GetBuffer(obj, b, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        return -1;
    if (b->len < n * (Py_ssize_t)sizeof(uint64_t) || ((uintptr_t)b->buf & 7)) {
        PyBuffer_Release(b);
        PyErr_Format(PyExc_ValueError, "%s: an aligned buffer of %zd u64", what, n);
        return -1;
    }
    return 0;
}

/* How far ahead of the frame being written tx_run prefetches: the buffer of the chain TX_PREFETCH_AHEAD entries
 * on, and the descriptor of the one twice as far (so that the buffer's address is in cache when it is read).
 * The driver wrote those lines on its own CPU just before; each is a cross-CPU miss (~0.1-0.2 us here), and a
 * TAP write (~0.3 us) is long enough to hide it. */
#define TX_PREFETCH_AHEAD 4
/* Frames up to this many bytes (without the virtio header) are copied whole into the sidecore's own buffer and
 * sent with one write(2); larger ones go to writev straight from guest RAM.  For a 64-byte frame the copy and
 * write cost ~0.13 us less than the kernel's copy out of the guest's freshly written (cross-CPU) lines
 * (docs/results/net-pps.md, session 5). */
#define TX_COPY_MAX 256

/* the head `ahead` entries after s->last if that entry was already seen available (never past the shadow
 * avail.idx), else -1 */
static inline int head_ahead(const Ring *r, const rstate_t *s, unsigned ahead)
{
    if (((s->shadow - s->last) & 0xFFFF) <= ahead)
        return -1;
    uint16_t h = __atomic_load_n(&((const volatile uint16_t *)r->avail.buf)[2 + ((s->last + ahead) & (r->size - 1))],
                                 __ATOMIC_RELAXED);
    return h < r->size ? h : -1;
}

/* Prefetch (a hint: nothing is checked or consumed) the first 128 bytes of the first buffer of the chain
 * `ahead` entries on, and the descriptor of the chain 2 * `ahead` on.  Only addresses inside guest RAM. */
static inline void tx_prefetch(const Ring *r, const rstate_t *s, unsigned ahead)
{
    int h = head_ahead(r, s, 2 * ahead);
    if (h >= 0)
        __builtin_prefetch((const uint8_t *)r->desc.buf + ((size_t)h << 4), 0, 3);
    h = head_ahead(r, s, ahead);
    if (h < 0)
        return;
    const uint8_t *d = (const uint8_t *)r->desc.buf + ((size_t)h << 4);
    uint64_t addr = __atomic_load_n((const uint64_t *)d, __ATOMIC_RELAXED);
    uint32_t len = __atomic_load_n((const uint32_t *)(d + 8), __ATOMIC_RELAXED);
    if (len > 128)
        len = 128;
    const uint8_t *p = len ? ram_ptr(r, addr, len) : NULL;
    if (p == NULL)
        return;
    __builtin_prefetch(p, 0, 3);
    if ((((uintptr_t)p + len - 1) >> 6) != ((uintptr_t)p >> 6))
        __builtin_prefetch(p + len - 1, 0, 3);
}

/* The TX batch, without the GIL: at most max_batch frames written to `fd`, one used.idx store.  Returns
 * the number completed; *more_out is set when the next chain is for VirtioNet._tx (see net_tx_batch). */
static unsigned tx_run(Ring *r, rstate_t *s, unsigned max_batch, int fd, unsigned offer, uint64_t *ctr, int *more_out,
                       seg_t *segs, struct iovec *iov)
{
    unsigned int done = 0;
    int more = 0;
    uint16_t head;
    while (done < max_batch) {
        int p = peek_head(r, s, &head);
        if (p == 0)
            break;
        if (p < 0) {
            more = 1;
            break;
        }
        uint64_t rlen = 0, wlen = 0;
        int nseg = walk(r, head, segs, &rlen, &wlen);
        /* what VirtioNet._tx drops (and logs), or a chain of more pieces than one writev takes */
        if (nseg < 0 || wlen || rlen < NET_HDR + ETH_HLEN || rlen - NET_HDR > NET_MAX_FRAME || nseg + 1 > NET_IOV_MAX) {
            more = 1;
            break;
        }
        uint32_t frame_len = (uint32_t)(rlen - NET_HDR);
        /* our copy of the header -- of the whole frame when it is small: what we checked is what we send */
        uint8_t copy[NET_HDR + TX_COPY_MAX];
        const int whole = frame_len <= TX_COPY_MAX;
        stream_copy(r, segs, nseg, 0, 0, copy, whole ? NET_HDR + frame_len : NET_HDR, 0);
        uint8_t *hdr = copy;
        if (tx_header_bad(hdr, frame_len, offer)) {
            more = 1;
            break;
        }
        hdr[0] &= HDR_F_NEEDS_CSUM;
        hdr[10] = hdr[11] = 0;
        tx_prefetch(r, s, TX_PREFETCH_AHEAD);
        ssize_t got;
        if (whole) {
            do
                got = write(fd, copy, NET_HDR + frame_len);
            while (got < 0 && errno == EINTR);
        } else {
            iov[0].iov_base = hdr;
            iov[0].iov_len = NET_HDR;
            int niov = 1 + make_iov(r, segs, nseg, 0, NET_HDR, frame_len, iov + 1);
            do
                got = writev(fd, iov, niov);
            while (got < 0 && errno == EINTR);
        }
        if (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            more = 1;     /* Python writes it again, drops it and decides about the link */
            break;
        }
        if (got < 0) {
            ctr[3]++;     /* the TAP's queue is full: like a NIC, drop */
        } else {
            ctr[0]++;
            ctr[1] += frame_len;
            if (hdr[1])
                ctr[2]++;
        }
        consume_head(r, s);
        put_used(r, s, head, 0);
        done++;
    }
    if (done)
        publish_used(r, s);
    *more_out = more;
    return done;
}

/* net_tx_batch(last_avail, shadow_avail, used_idx, avail_event, event_idx, notify_enabled, max_batch, times,
 *              fd, offer, counters) -> (completed, more, last_avail, shadow_avail, used_idx, avail_event)
 * offer: TXF_* bits negotiated; counters: writable u64[4] to which tx_packets, tx_bytes, tx_gso and
 * tx_dropped (TAP queue full) are added.  Stops before consuming a chain VirtioNet._tx would drop
 * (bad chain or header: it logs why) or that C cannot walk, and before a frame whose write failed other
 * than with EAGAIN (Python writes it again and decides about the link).  times: unused (None). */
static PyObject *ring_net_tx_batch(Ring *r, PyObject *args)
{
    unsigned int max_batch, offer;
    int fd;
    PyObject *times_obj, *ctr_obj;
    rstate_t s;
    if (!PyArg_ParseTuple(args, "IIIIppIOiIO", &s.last, &s.shadow, &s.used_idx, &s.avail_event, &s.evt,
                          &s.notify_enabled, &max_batch, &times_obj, &fd, &offer, &ctr_obj))
        return NULL;
    Py_buffer cb;
    if (get_u64s(ctr_obj, &cb, 4, "net_tx_batch counters") < 0)
        return NULL;
    rstate_norm(&s);
    unsigned int done = 0;
    int more = 0;
    if (s.last == s.shadow && __atomic_load_n(&((volatile uint16_t *)r->avail.buf)[1], __ATOMIC_ACQUIRE) == s.last) {
        PyBuffer_Release(&cb);
        return Py_BuildValue("(IOIIII)", 0, Py_False, s.last, s.shadow, s.used_idx, s.avail_event);
    }
    seg_t segs[MAX_SEGS];
    struct iovec iov[NET_IOV_MAX];
    Py_BEGIN_ALLOW_THREADS
    done = tx_run(r, &s, max_batch, fd, offer, (uint64_t *)cb.buf, &more, segs, iov);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&cb);
    return Py_BuildValue("(IOIIII)", done, more ? Py_True : Py_False, s.last, s.shadow, s.used_idx, s.avail_event);
}

/* is an RX chain usable (VirtioNet._take_rx_buffer): nothing device-readable, room for the header, and
 * (with the bounce buffer) at most IOV_MAX pieces */
static inline int rx_usable(int nseg, uint64_t rlen, uint64_t wlen)
{
    return nseg >= 0 && rlen == 0 && wlen >= NET_HDR && nseg < NET_IOV_MAX;
}

/* The held RX buffers: a FIFO of heads (start ctl[0], count ctl[1], capacity hcap), a flag per head
 * (flen of them), the pump's ctl words, its bounce buffer and the RX filter (NULL: promiscuous). */
typedef struct {
    uint16_t *held;
    uint8_t *hflags;
    Py_ssize_t flen;
    uint64_t *ctl;
    uint64_t hcap;
    uint8_t *bounce;
    int mrg, guest_csum;
    const uint8_t *filt;
    Py_ssize_t filt_len;
} rxheld_t;

/* The Python buffers one RX delivery works on: the held heads, their flags, the control words, the bounce
 * buffer and the optional MAC filter -- taken together (rx_buffers_get) and released together
 * (rx_buffers_release) by every entry point that receives frames. */
typedef struct {
    Py_buffer hb, fb, cb, bb, filt;
    int have_filt;
} rxbufs_t;

/* 0 with every buffer held and *x pointing into them, or -1 with a Python exception and none held.
 * ``who`` names the entry point in the errors. */
static int rx_buffers_get(rxbufs_t *b, rxheld_t *x, PyObject *held_obj, PyObject *flags_obj, PyObject *ctl_obj,
                          PyObject *bounce_obj, PyObject *filter_obj, int mrg, int guest_csum, const char *who)
{
    char what[64];
    snprintf(what, sizeof what, "%s ctl", who);
    if (get_held(held_obj, flags_obj, ctl_obj, 10, &b->hb, &b->fb, &b->cb, what) < 0)
        return -1;
    if (PyObject_GetBuffer(bounce_obj, &b->bb, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        goto fail_c;
    if (b->bb.len < NET_MAX_RX) {
        PyErr_Format(PyExc_ValueError, "%s: the bounce buffer is smaller than MAX_RX", who);
        goto fail_b;
    }
    b->have_filt = 0;
    if (filter_obj != Py_None) {
        if (PyObject_GetBuffer(filter_obj, &b->filt, PyBUF_SIMPLE) < 0)
            goto fail_b;
        b->have_filt = 1;
    }
    *x = (rxheld_t){(uint16_t *)b->hb.buf, (uint8_t *)b->fb.buf, b->fb.len, (uint64_t *)b->cb.buf,
                    (uint64_t)b->hb.len / 2, (uint8_t *)b->bb.buf, mrg, guest_csum,
                    b->have_filt ? (const uint8_t *)b->filt.buf : NULL, b->have_filt ? b->filt.len : 0};
    return 0;
fail_b:
    PyBuffer_Release(&b->bb);
fail_c:
    release3(&b->hb, &b->fb, &b->cb);
    return -1;
}

static void rx_buffers_release(rxbufs_t *b)
{
    if (b->have_filt)
        PyBuffer_Release(&b->filt);
    PyBuffer_Release(&b->bb);
    release3(&b->hb, &b->fb, &b->cb);
}

/* The RX take, without the GIL: every available usable chain, at most max_batch, appended to the held
 * FIFO.  Returns the number taken; *more_out is set at a chain Python must look at (see net_rx_take). */
static unsigned rx_take_run(Ring *r, rstate_t *s, unsigned max_batch, rxheld_t *x, int *more_out, seg_t *segs)
{
    unsigned int done = 0;
    int more = 0;
    uint16_t head;
    uint64_t *ctl = x->ctl;
    while (done < max_batch) {
        int p = peek_head(r, s, &head);
        if (p == 0)
            break;
        uint64_t rlen = 0, wlen = 0;
        if (p < 0 || head >= (uint64_t)x->flen || x->hflags[head] || ctl[1] >= x->hcap) {
            more = 1;
            break;
        }
        int nseg = walk(r, head, segs, &rlen, &wlen);
        if (!rx_usable(nseg, rlen, wlen)) {
            more = 1;
            break;
        }
        x->hflags[head] = 1;
        x->held[(ctl[0] + ctl[1]) % x->hcap] = head;
        ctl[1]++;
        consume_head(r, s);
        done++;
    }
    *more_out = more;
    return done;
}

/* net_rx_take(last_avail, shadow_avail, used_idx, avail_event, event_idx, notify_enabled, max_batch, times,
 *             held, held_flags, ctl) -> (taken, more, last_avail, shadow_avail, used_idx, avail_event)
 * Takes every available RX chain that VirtioNet._take_rx_buffer would hold: appends its head to the FIFO
 * held (u16[queue size], start ctl[0], count ctl[1]) and marks held_flags[head].  Stops, unconsumed, at
 * a chain Python must look at (unusable: it is returned empty and logged; offered again while held; one
 * C cannot walk). */
static PyObject *ring_net_rx_take(Ring *r, PyObject *args)
{
    unsigned int max_batch;
    PyObject *times_obj, *held_obj, *flags_obj, *ctl_obj;
    rstate_t s;
    if (!PyArg_ParseTuple(args, "IIIIppIOOOO", &s.last, &s.shadow, &s.used_idx, &s.avail_event, &s.evt,
                          &s.notify_enabled, &max_batch, &times_obj, &held_obj, &flags_obj, &ctl_obj))
        return NULL;
    Py_buffer hb, fb, cb;
    if (get_held(held_obj, flags_obj, ctl_obj, 2, &hb, &fb, &cb, "net_rx_take ctl") < 0)
        return NULL;
    rxheld_t x = {(uint16_t *)hb.buf, (uint8_t *)fb.buf, fb.len, (uint64_t *)cb.buf, (uint64_t)hb.len / 2};
    rstate_norm(&s);
    unsigned int done = 0;
    int more = 0;
    seg_t segs[MAX_SEGS];
    Py_BEGIN_ALLOW_THREADS
    done = rx_take_run(r, &s, max_batch, &x, &more, segs);
    Py_END_ALLOW_THREADS
    release3(&hb, &fb, &cb);
    return Py_BuildValue("(IOIIII)", done, more ? Py_True : Py_False, s.last, s.shadow, s.used_idx, s.avail_event);
}

/* RX filter (VirtioNet._accept) from a blob built by Python: mode bits, the MAC, then the unicast
 * and multicast tables (count byte + 6-byte entries each); NULL means promiscuous. */
#define RXF_ALLMULTI 1
#define RXF_ALLUNI 2
#define RXF_NOMULTI 4
#define RXF_NOUNI 8
#define RXF_NOBCAST 16
#define RXF_UC_OVERFLOW 32
#define RXF_MC_OVERFLOW 64

static int table_has(const uint8_t *t, Py_ssize_t left, const uint8_t *mac, const uint8_t **next)
{
    int found = 0;
    if (left < 1) {
        *next = NULL;
        return 0;
    }
    unsigned n = t[0];
    if ((Py_ssize_t)(1 + 6 * n) > left) {
        *next = NULL;
        return 0;
    }
    for (unsigned i = 0; i < n && !found; i++)
        found = memcmp(t + 1 + 6 * i, mac, 6) == 0;
    *next = t + 1 + 6 * n;
    return found;
}

static int rx_accept(const uint8_t *f, Py_ssize_t flen, const uint8_t dst[6])
{
    if (f == NULL)
        return 1;
    if (flen < 7)
        return 0;
    uint8_t mode = f[0];
    const uint8_t *mac = f + 1, *mc;
    static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    int in_uc = table_has(f + 7, flen - 7, dst, &mc);
    if (dst[0] & 1) {
        if (memcmp(dst, bcast, 6) == 0)
            return !(mode & RXF_NOBCAST);
        if (mode & RXF_NOMULTI)
            return 0;
        const uint8_t *end;
        return (mode & (RXF_ALLMULTI | RXF_MC_OVERFLOW)) ||
               (mc != NULL && table_has(mc, flen - (mc - f), dst, &end));
    }
    if (mode & RXF_NOUNI)
        return 0;
    return (mode & (RXF_ALLUNI | RXF_UC_OVERFLOW)) || memcmp(dst, mac, 6) == 0 || in_uc;
}

enum { RX_BUDGET_DONE, RX_EMPTY, RX_EAGAIN, RX_ERROR, RX_EOF, RX_DEFER_USE, RX_PENDING };

/* The RX pump, without the GIL (see net_rx_pump): at most max_reads readv calls on `fd`, one used.idx
 * store for the frames delivered.  Sets ctl[2] (status), ctl[3] (value) and ctl[4] (reads) and adds to
 * the counters ctl[5..9]; returns the frames delivered. */
static unsigned rx_pump_run(Ring *r, rstate_t *sp, unsigned max_reads, int fd, rxheld_t *x, seg_t *segs, seg_t *segs2,
                            struct iovec *iov)
{
    rstate_t s = *sp;
    uint16_t *held = x->held;
    uint8_t *hflags = x->hflags;
    uint64_t *ctl = x->ctl;
    const uint64_t hcap = x->hcap;
    uint8_t *bounce = x->bounce;
    const int mrg = x->mrg, guest_csum = x->guest_csum, have_filt = x->filt != NULL;
    unsigned int delivered = 0, reads = 0;
    uint64_t status = RX_BUDGET_DONE, value = 0;
    while (reads < max_reads) {
        if (ctl[1] == 0 || hcap == 0) {
            status = RX_EMPTY;
            break;
        }
        uint16_t head = held[ctl[0] % hcap];
        uint64_t rlen = 0, wlen = 0;
        int nseg = walk(r, head, segs, &rlen, &wlen);
        if (!rx_usable(nseg, rlen, wlen)) {
            status = RX_DEFER_USE;
            break;
        }
        uint64_t cap = wlen;
        int niov = make_iov(r, segs, nseg, 1, 0, wlen, iov);
        if (cap < NET_MAX_RX) {
            iov[niov].iov_base = bounce;
            iov[niov].iov_len = NET_MAX_RX - cap;
            niov++;
        }
        ssize_t n;
        do
            n = readv(fd, iov, niov);
        while (n < 0 && errno == EINTR);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                status = RX_EAGAIN;
            } else {
                status = RX_ERROR;
                value = (uint64_t)errno;
            }
            break;
        }
        reads++;
        if (n == 0) {
            status = RX_EOF;
            break;
        }
        if ((uint64_t)n <= NET_HDR) {
            ctl[8]++;       /* empty, or larger than the buffers the guest gave */
            continue;
        }
        /* MRG_RXBUF: the held buffers after the first, each walked again, until the spill fits */
        uint64_t spill = (uint64_t)n > cap ? (uint64_t)n - cap : 0;
        unsigned nspill = 0;
        if (spill) {
            if (!mrg) {
                ctl[8]++;
                continue;
            }
            uint64_t room = 0;
            int walk_failed = 0;
            for (uint64_t k = 1; k < ctl[1] && room < spill; k++) {
                uint16_t h2 = held[(ctl[0] + k) % hcap];
                uint64_t r2 = 0, w2 = 0;
                int n2 = walk(r, h2, segs2, &r2, &w2);
                if (!rx_usable(n2, r2, w2)) {
                    walk_failed = 1;
                    break;
                }
                room += w2;
                nspill++;
            }
            if (walk_failed) {
                status = RX_PENDING;
                value = (uint64_t)n;
                break;
            }
            if (room < spill) {
                ctl[8]++;
                continue;
            }
        }
        /* the RX filter on the destination MAC: stream bytes 12..17 (first buffer, then the bounce) */
        if (have_filt) {
            uint8_t dst[6];
            if ((uint64_t)n < NET_HDR + 6) {
                ctl[9]++;
                continue;
            }
            for (int i = 0; i < 6; i++) {
                uint64_t off = NET_HDR + i;
                if (off < cap)
                    stream_copy(r, segs, nseg, 1, off, &dst[i], 1, 0);
                else
                    dst[i] = bounce[off - cap];
            }
            if (!rx_accept(x->filt, x->filt_len, dst)) {
                ctl[9]++;
                continue;
            }
        }
        /* deliver: the first buffer (already holding the frame's start), then the spill copied on */
        uint8_t hdr[NET_HDR];
        stream_copy(r, segs, nseg, 1, 0, hdr, NET_HDR, 0);
        if (!guest_csum)
            hdr[0] = 0;     /* §5.1.6.3.2: flags zero without GUEST_CSUM */
        else if (hdr[1])
            ctl[7]++;
        uint16_t nb = (uint16_t)(1 + nspill);
        memcpy(hdr + 10, &nb, 2);  /* num_buffers: the kernel leaves it unwritten */
        stream_copy(r, segs, nseg, 1, 0, hdr, NET_HDR, 1);
        hflags[head] = 0;
        put_used(r, &s, head, (uint32_t)((uint64_t)n < cap ? (uint64_t)n : cap));
        ctl[0] = (ctl[0] + 1) % hcap;
        ctl[1]--;
        uint64_t off = 0, left = spill;
        for (unsigned k = 0; k < nspill; k++) {
            uint16_t h2 = held[ctl[0] % hcap];
            uint64_t r2 = 0, w2 = 0;
            int n2 = walk(r, h2, segs2, &r2, &w2);   /* walked above: the same result (descriptors
                                                       * may change under a hostile driver: re-checked) */
            if (n2 < 0)
                w2 = 0;
            uint64_t take = w2 < left ? w2 : left;
            if (n2 >= 0)
                stream_copy(r, segs2, n2, 1, 0, bounce + off, take, 1);
            hflags[h2] = 0;
            put_used(r, &s, h2, (uint32_t)take);
            ctl[0] = (ctl[0] + 1) % hcap;
            ctl[1]--;
            off += take;
            left -= take;
        }
        ctl[5]++;
        ctl[6] += (uint64_t)n - NET_HDR;
        delivered++;
        /* a polling driver starts on the first frames while the rest are read: with a batch of echoes
         * the guest answers the first replies (and sends anew) while the pump is still reading */
        if (delivered % RX_PUBLISH_EVERY == 0)
            publish_used(r, &s);
    }
    if (delivered % RX_PUBLISH_EVERY)
        publish_used(r, &s);
    if (delivered)
        publish_used(r, &s);
    ctl[2] = status;
    ctl[3] = value;
    ctl[4] = reads;
    *sp = s;
    return delivered;
}

/* net_rx_pump(last_avail, shadow_avail, used_idx, avail_event, event_idx, notify_enabled, max_reads, times,
 *             fd, held, held_flags, ctl, bounce, mrg_rxbuf, guest_csum, filter)
 *   -> (delivered, more, last_avail, shadow_avail, used_idx, avail_event)
 * The RX pump of VirtioNet (_rx_pump_locked) over the held FIFO, without the GIL: readv from the TAP
 * straight into the first held buffer (then the bounce buffer up to NET_MAX_RX), MRG_RXBUF spill into the
 * next held buffers, the RX filter, the header (flags cleared without GUEST_CSUM, num_buffers), used
 * elements, one used.idx store.  Held chains are walked again, with every check, when they are used.
 * ctl: u64[10] = held start, held count, status (RX_*), value (errno for RX_ERROR, frame bytes for
 * RX_PENDING), reads (readv calls made), then rx_packets, rx_bytes, rx_gso, rx_dropped, rx_filtered
 * (added to).  RX_DEFER_USE: the first held chain did not walk in C (Python uses it); RX_PENDING: a frame of
 * `value` bytes was read into the first held buffer and the bounce buffer, and a spill buffer did not walk
 * in C: Python finishes that frame. */
static PyObject *ring_net_rx_pump(Ring *r, PyObject *args)
{
    unsigned int max_reads;
    int fd, mrg, guest_csum;
    PyObject *times_obj, *held_obj, *flags_obj, *ctl_obj, *bounce_obj, *filter_obj;
    rstate_t s;
    if (!PyArg_ParseTuple(args, "IIIIppIOiOOOOppO", &s.last, &s.shadow, &s.used_idx, &s.avail_event, &s.evt,
                          &s.notify_enabled, &max_reads, &times_obj, &fd, &held_obj, &flags_obj, &ctl_obj,
                          &bounce_obj, &mrg, &guest_csum, &filter_obj))
        return NULL;
    rxbufs_t bufs;
    rxheld_t x;
    if (rx_buffers_get(&bufs, &x, held_obj, flags_obj, ctl_obj, bounce_obj, filter_obj, mrg, guest_csum,
                       "net_rx_pump") < 0)
        return NULL;
    rstate_norm(&s);
    unsigned int delivered = 0;
    /* segs of the first chain, then of each spill chain in turn */
    static __thread seg_t segs[MAX_SEGS], segs2[MAX_SEGS];
    struct iovec iov[NET_IOV_MAX + 1];
    Py_BEGIN_ALLOW_THREADS
    delivered = rx_pump_run(r, &s, max_reads, fd, &x, segs, segs2, iov);
    Py_END_ALLOW_THREADS
    uint64_t status = x.ctl[2];
    rx_buffers_release(&bufs);
    return Py_BuildValue("(IOIIII)", delivered, status == RX_BUDGET_DONE ? Py_True : Py_False, s.last, s.shadow,
                         s.used_idx, s.avail_event);
}

/* ---------------------------------------------------------------------------------------------- */
/* net jobs of serve(): a virtio-net queue pair served in C for a spin slice, beside virtio-blk queues, so
 * that the sidecore's Python runs once per slice, not once per batch of frames -- for every pair of every
 * NIC of the loop (MQ pairs, several NICs).  One visit of a pair (net_job_pass): the AIO poll's completion
 * (the TAP became readable) is reaped; newly posted RX buffers are taken (rx_take_run); TX frames are
 * written (tx_run, at most `budget`: the same per-visit share as a blk queue's); the TAP is read into held
 * buffers (rx_pump_run, at most rx_budget reads) if it may hold frames (its poll fired or is not armed, or
 * frames were just written: a local peer answers inside our writev); a drained TAP gets its one-shot poll
 * re-armed (io_submit: the kernel checks readiness at once, so no wake-up is lost).  At the end of each
 * pass the interrupt of each queue that published is decided as Virtqueue.should_signal does and written
 * to its call fd (vhost-user) -- or, with call fd -1 (the VMM's MSI-X, which Python masks and routes), the
 * round returns and Python raises it.
 *
 * job: ("net", tx_ring, tx_state, rx_ring, rx_state, rx_budget, fd, offer, txc, held, held_flags, ctl,
 *       bounce, mrg_rxbuf, guest_csum, filter, aio, tx_call_fd, rx_call_fd)
 *   state: (last_avail, shadow_avail, used_idx, avail_event, event_idx, notify_enabled, signalled_used,
 *           signalled_valid) of each queue; aio: (ctx, iocb_address, tail_address, tail_seen, armed,
 *           events_address (room for 4 io_events)); the rest as net_tx_batch / net_rx_take / net_rx_pump.
 *   result: (reason, value, tx_done, rx_done, (tx last, shadow, used_idx, avail_event, signalled_used,
 *           signalled_valid), (the same for rx), tail_seen, armed, tx_signal, rx_signal, last_work_ns, irqs)
 * reason (the job's own): NS_DEADLINE (nothing for Python); NS_TX (the next TX chain is for VirtioNet._tx);
 * NS_RX_TAKE (the next RX chain is for Python); NS_RX_PUMP (the pump's status ctl[2] is for Python: an
 * error, end of file, a chain it cannot walk, a frame to finish); NS_SIGNAL (tx_signal / rx_signal: Python
 * raises that interrupt); NS_ARM (re-arming the poll failed: value = errno).  Any but NS_DEADLINE ends the
 * round with serve()'s reason 1.  Both rings must be of the same guest RAM region; with notifications
 * enabled (the shared path's doorbell page) avail_event follows as Virtqueue.pop moves it. */
enum { NS_DEADLINE, NS_TX, NS_RX_TAKE, NS_RX_PUMP, NS_SIGNAL, NS_WATCH, NS_ARM };
_Static_assert(NET_IOV_MAX + 1 <= SERVE_IOV, "serve's iovecs hold a frame and the bounce buffer");

struct netjob {
    Ring *tx, *rx;                       /* references held by the job */
    rstate_t ts, rs;
    uint32_t tsig, rsig, seen;
    int tsig_valid, rsig_valid, fd, armed, tx_call, rx_call;
    unsigned rx_budget, offer;
    unsigned long long ctx, iocb, tail_addr, events;
    Py_buffer txcb;
    rxbufs_t bufs;
    rxheld_t x;
    int have_txc, have_bufs;
    int reason;
    long value;
    unsigned long long tx_done, rx_done;
    int tx_due, rx_due;                  /* published this pass: decide the interrupt at its end */
    int tx_signal, rx_signal;            /* an interrupt for Python to raise */
    unsigned irqs;
};

static void net_job_free(struct netjob *n)
{
    if (n == NULL)
        return;
    if (n->have_bufs)
        rx_buffers_release(&n->bufs);
    if (n->have_txc)
        PyBuffer_Release(&n->txcb);
    Py_XDECREF((PyObject *)n->tx);
    Py_XDECREF((PyObject *)n->rx);
    PyMem_Free(n);
}

/* a net job from its tuple (see above), every buffer held; NULL with a Python exception */
static struct netjob *net_job_new(PyObject *t)
{
    struct netjob *n = PyMem_Calloc(1, sizeof(*n));
    if (n == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    const char *kind;
    PyObject *tx_obj, *rx_obj, *txc_obj, *held_obj, *flags_obj, *ctl_obj, *bounce_obj, *filter_obj;
    int mrg, guest_csum;
    if (!PyArg_ParseTuple(t, "sO!(IIIIppIp)O!(IIIIppIp)IiIOOOOOppO(KKKIpK)ii;serve: a net job tuple", &kind,
                          &RingType, &tx_obj, &n->ts.last, &n->ts.shadow, &n->ts.used_idx, &n->ts.avail_event,
                          &n->ts.evt, &n->ts.notify_enabled, &n->tsig, &n->tsig_valid, &RingType, &rx_obj,
                          &n->rs.last, &n->rs.shadow, &n->rs.used_idx, &n->rs.avail_event, &n->rs.evt,
                          &n->rs.notify_enabled, &n->rsig, &n->rsig_valid, &n->rx_budget, &n->fd, &n->offer, &txc_obj,
                          &held_obj, &flags_obj, &ctl_obj, &bounce_obj, &mrg, &guest_csum, &filter_obj, &n->ctx,
                          &n->iocb, &n->tail_addr, &n->seen, &n->armed, &n->events, &n->tx_call, &n->rx_call))
        goto fail;
    if (strcmp(kind, "net") != 0) {
        PyErr_Format(PyExc_ValueError, "serve: unknown job kind %s", kind);
        goto fail;
    }
    Py_INCREF(tx_obj);
    n->tx = (Ring *)tx_obj;
    Py_INCREF(rx_obj);
    n->rx = (Ring *)rx_obj;
    if (!n->tx->have_used || !n->rx->have_used || n->tx->ram.buf != n->rx->ram.buf || !n->tail_addr) {
        PyErr_SetString(PyExc_ValueError, "serve: a net job needs two initialised rings of one RAM region");
        goto fail;
    }
    if (get_u64s(txc_obj, &n->txcb, 4, "serve: net job counters") < 0)
        goto fail;
    n->have_txc = 1;
    if (rx_buffers_get(&n->bufs, &n->x, held_obj, flags_obj, ctl_obj, bounce_obj, filter_obj, mrg, guest_csum,
                       "serve: net job") < 0)
        goto fail;
    n->have_bufs = 1;
    rstate_norm(&n->ts);
    rstate_norm(&n->rs);
    n->tsig &= 0xFFFF;
    n->rsig &= 0xFFFF;
    return n;
fail:
    net_job_free(n);
    return NULL;
}

/* One visit of a pair, without the GIL; returns 1 if anything moved (frames or RX buffers).  Sets
 * n->reason when Python must look at the pair (the visit then stops). */
static int net_job_pass(struct netjob *n, unsigned budget, seg_t *segs, seg_t *segs2, struct iovec *iov)
{
    int worked = 0, more = 0, fired = 0;
    Ring *tx = n->tx, *rx = n->rx;
    uint64_t *ctl = n->x.ctl;
    uint32_t t = __atomic_load_n((const volatile uint32_t *)(uintptr_t)n->tail_addr, __ATOMIC_ACQUIRE);
    if (t != n->seen) {          /* the poll completed: it is spent (one-shot); reap its event */
        struct timespec zero = {0, 0};
        n->seen = t;
        n->armed = 0;
        fired = 1;
        (void)syscall(SYS_io_getevents, (unsigned long)n->ctx, 0L, 4L, (void *)(uintptr_t)n->events, &zero);
    }
    if (n->rs.last != n->rs.shadow
        || __atomic_load_n(&((const volatile uint16_t *)rx->avail.buf)[1], __ATOMIC_ACQUIRE) != n->rs.last) {
        if (rx_take_run(rx, &n->rs, rx->size, &n->x, &more, segs))
            worked = 1;
        if (more) {
            n->reason = NS_RX_TAKE;
            return worked;
        }
    }
    unsigned sent = 0;
    if (n->ts.last != n->ts.shadow
        || __atomic_load_n(&((const volatile uint16_t *)tx->avail.buf)[1], __ATOMIC_ACQUIRE) != n->ts.last) {
        sent = tx_run(tx, &n->ts, budget, n->fd, n->offer, (uint64_t *)n->txcb.buf, &more, segs, iov);
        if (sent) {
            worked = 1;
            n->tx_done += sent;
            n->tx_due = 1;
        }
        if (more) {
            n->reason = NS_TX;
            return worked;
        }
    }
    if (ctl[1] && (!n->armed || fired || sent)) {
        unsigned d = rx_pump_run(rx, &n->rs, n->rx_budget, n->fd, &n->x, segs, segs2, iov);
        if (d) {
            worked = 1;
            n->rx_done += d;
            n->rx_due = 1;
        }
        uint64_t status = ctl[2];
        if (status == RX_EAGAIN) {
            if (!n->armed) {     /* drained: one readiness poll */
                void *iocbs[1] = {(void *)(uintptr_t)n->iocb};
                if (syscall(SYS_io_submit, (unsigned long)n->ctx, 1L, iocbs) != 1) {
                    n->reason = NS_ARM;
                    n->value = errno;
                    return worked;
                }
                n->armed = 1;
            }
        } else if (status == RX_BUDGET_DONE) {
            worked = 1;
        } else if (status != RX_EMPTY) {
            n->reason = NS_RX_PUMP;
        }
    }
    return worked;
}

/* The interrupt of one queue that published this pass: decided as Virtqueue.should_signal does, then
 * written to call_fd, or (call_fd -1) left to Python in *py_signal.  Returns 1 if an irq was written. */
static int net_queue_signal(const Ring *r, const rstate_t *s, uint32_t *sig_used, int *sig_valid, int call_fd,
                            int *py_signal)
{
    qstate_t q = {0};
    q.used_idx = s->used_idx;
    q.evt = s->evt;
    q.signalled_used = *sig_used;
    q.signalled_valid = *sig_valid;
    int want = want_signal(r, &q);
    *sig_used = q.signalled_used & 0xFFFF;
    *sig_valid = q.signalled_valid;
    if (!want)
        return 0;
    if (call_fd < 0) {
        *py_signal = 1;
        return 0;
    }
    static const uint64_t one = 1;
    /* EAGAIN: a counter at its maximum (a hostile peer's fd) already signals */
    return write(call_fd, &one, sizeof one) == sizeof one;
}

/* the end of a pass for a pair: its queues' interrupts; sets NS_SIGNAL if Python must raise one */
static void net_job_signal(struct netjob *n)
{
    if (n->tx_due) {
        n->tx_due = 0;
        n->irqs += net_queue_signal(n->tx, &n->ts, &n->tsig, &n->tsig_valid, n->tx_call, &n->tx_signal);
    }
    if (n->rx_due) {
        n->rx_due = 0;
        n->irqs += net_queue_signal(n->rx, &n->rs, &n->rsig, &n->rsig_valid, n->rx_call, &n->rx_signal);
    }
    if ((n->tx_signal || n->rx_signal) && n->reason == NS_DEADLINE)
        n->reason = NS_SIGNAL;
}

static int net_job_reason(const struct netjob *n)
{
    return n->reason;
}

static PyObject *net_job_result(const struct netjob *n, unsigned long long last_work)
{
    return Py_BuildValue("(ilKK(IIIIIO)(IIIIIO)IOOOKI)", n->reason, n->value, n->tx_done, n->rx_done, n->ts.last,
                         n->ts.shadow, n->ts.used_idx, n->ts.avail_event, n->tsig, n->tsig_valid ? Py_True : Py_False,
                         n->rs.last, n->rs.shadow, n->rs.used_idx, n->rs.avail_event, n->rsig,
                         n->rsig_valid ? Py_True : Py_False, n->seen, n->armed ? Py_True : Py_False,
                         n->tx_signal ? Py_True : Py_False, n->rx_signal ? Py_True : Py_False, last_work, n->irqs);
}

static PyMethodDef ring_methods[] = {
    {"walk", (PyCFunction)ring_walk, METH_O,
     "walk(head) -> ([(gpa, len, writable)], readable_len, writable_len), or None: Python decides"},
    {"blk_batch", (PyCFunction)ring_blk_batch, METH_VARARGS,
     "virtio-blk IN/OUT batch without the GIL -> (completed, more, last_avail, shadow_avail, used_idx, avail_event)"},
    {"net_tx_batch", (PyCFunction)ring_net_tx_batch, METH_VARARGS,
     "virtio-net TX batch (walk, header check, writev to the TAP) without the GIL -> as blk_batch"},
    {"net_rx_take", (PyCFunction)ring_net_rx_take, METH_VARARGS,
     "virtio-net: hold every usable available RX chain -> as blk_batch"},
    {"net_rx_pump", (PyCFunction)ring_net_rx_pump, METH_VARARGS,
     "virtio-net RX: frames from the TAP into held buffers without the GIL -> as blk_batch; status in ctl"},
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
     "serve(jobs, watches, timeout_ns, budget, times, yield_ns=0, extend_ns=0, limit_ns=0) -> (reason, index, "
     "[per-job state], idle_ns, "
     "yields): "
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
