/* guestkit app "nvme": an NVMe driver written from the NVMe 1.4 specification, with shadow
 * doorbells (Doorbell Buffer Config, 5.7), MSI-X or polled completions, several I/O queue pairs,
 * PRP lists (optionally starting mid-page and chained), and the blk app's workloads. */
#include "gk.h"
#include "pci.h"
#include "workload.h"

#define NVME_VENDOR 0x1B36 /* QEMU's and exitless's NVMe controllers */
#define NVME_DEVICE 0x0010

#define REG_CAP 0x00
#define REG_VS 0x08
#define REG_CC 0x14
#define REG_CSTS 0x1C
#define REG_AQA 0x24
#define REG_ASQ 0x28
#define REG_ACQ 0x30
#define CSTS_RDY 1
#define CSTS_CFS 2

#define OP_FLUSH 0x00
#define OP_WRITE 0x01
#define OP_READ 0x02
#define OP_WRITE_ZEROES 0x08
#define OP_DSM 0x09
#define ADM_DELETE_SQ 0x00
#define ADM_CREATE_SQ 0x01
#define ADM_DELETE_CQ 0x04
#define ADM_CREATE_CQ 0x05
#define ADM_IDENTIFY 0x06
#define ADM_SET_FEATURES 0x09
#define ADM_DBBUF 0x7C
#define OACS_DBBUF (1u << 8)
#define ONCS_DSM (1u << 2)
#define ONCS_WRITE_ZEROES (1u << 3)

#define PAGE 4096
#define SECTOR 512
#define MAX_QUEUES 16
#define ADMIN_QSIZE 16
#define VEC_BASE 0x40 /* LAPIC vector = VEC_BASE + MSI-X entry (entry 0: admin CQ, q: I/O CQ q) */
#define STATUS_PENDING 0xFFFF

struct sqe {
    u32 cdw0, nsid, rsvd2, rsvd3;
    u64 mptr, prp1, prp2;
    u32 cdw10, cdw11, cdw12, cdw13, cdw14, cdw15;
};
struct cqe {
    u32 dw0, dw1;
    u16 sq_head, sq_id, cid, status; /* status bit 0 = phase */
};

struct queue {
    u16 qid, size;
    volatile struct sqe *sq;
    volatile struct cqe *cq;
    u16 sq_tail, cq_head, phase;
    u16 sq_db_old, cq_db_old; /* values last written to the shadow slots */
    bool cq_dirty;
};

struct req {
    struct queue *q;
    u16 cid;
    bool busy;
    u8 op;
    u32 len;
    u64 slba; /* in LBAs */
    u64 sector; /* in 512-byte sectors (pattern) */
    u8 *data;
    u64 *prp_list; /* two pages: chaining room */
    u16 status;
    u64 t_submit;
};


static struct pci_dev pd;
static uptr regs;
static u64 cap;
static u32 dstrd;
static struct queue admin, ioq[MAX_QUEUES];
static u32 nq = 1, qsize, lba_size;
static struct req reqs[WL_MAX_QD];
static bool use_irq = true, use_dbbuf;
static volatile u32 *shadow, *event_idx;
static u64 nsze, timeout_cyc, oacs, oncs, mdts;
static u64 doorbells, sq_doorbells, cq_doorbells, shadow_writes;
static u32 prp_off;
static u64 cycle_every, next_cycle, cycles, resets; /* cycle=N: every N ops delete/re-create the queues or reset */
static char serial[21], model[41];

static u64 inflight;

static u64 queue_irqs(void)
{
    u64 n = 0;
    for (u32 e = 1; e <= MAX_QUEUES; e++)
        n += irq_counts[VEC_BASE + e];
    return n;
}


/* ---- doorbells: MMIO, or shadow + EventIdx (NVMe 1.4 5.7; Linux nvme_dbbuf_update_and_check_event) ---- */
static bool need_event(u16 event, u16 new_idx, u16 old)
{
    return (u16)(new_idx - event - 1) < (u16)(new_idx - old);
}

static uptr db_addr(u32 qid, bool cq) { return regs + 0x1000 + (2 * qid + cq) * (4u << dstrd); }

static void ring(struct queue *q, bool cq)
{
    u16 value = cq ? q->cq_head : q->sq_tail;
    if (use_dbbuf && q->qid) {
        u32 slot = 2 * q->qid + cq;
        u16 *old = cq ? &q->cq_db_old : &q->sq_db_old;
        u16 prev = *old;
        shadow[slot] = value;
        shadow_writes++;
        *old = value;
        mfence(); /* the slot store before the EventIdx load: the controller does the mirror image */
        if (!need_event((u16)event_idx[slot], value, prev))
            return;
    }
    mmio_w32(db_addr(q->qid, cq), value);
    if (!q->qid)
        return; /* the counters are about the I/O queues (admin doorbells always ring) */
    doorbells++;
    if (cq)
        cq_doorbells++;
    else
        sq_doorbells++;
}

/* ---- admin commands (polled) ---- */
static bool wait_reg(u32 mask, u32 want, u64 ms)
{
    u64 t0 = rdtsc(), lim = ns_to_tsc(ms * 1000000ULL);
    while ((mmio_r32(regs + REG_CSTS) & mask) != want) {
        if (mmio_r32(regs + REG_CSTS) & CSTS_CFS)
            return false;
        if (rdtsc() - t0 > lim)
            return false;
        cpu_pause();
    }
    return true;
}

static void sq_put(struct queue *q, const struct sqe *e)
{
    volatile struct sqe *s = &q->sq[q->sq_tail];
    memcpy((void *)s, e, sizeof(*e));
    q->sq_tail = (u16)((q->sq_tail + 1) % q->size);
}

/* next completion of q, if any (advances the head; the caller rings the CQ doorbell) */
static bool cq_pop(struct queue *q, struct cqe *out)
{
    volatile struct cqe *c = &q->cq[q->cq_head];
    if ((c->status & 1) != q->phase)
        return false;
    barrier();
    *out = *(struct cqe *)c;
    if (++q->cq_head == q->size) {
        q->cq_head = 0;
        q->phase ^= 1;
    }
    q->cq_dirty = true;
    return true;
}

static u16 admin_cid;
/* returns the status field (sct << 8 | sc), 0xFFFF on timeout; *dw0 = result */
static u16 admin_cmd(struct sqe *e, u32 *dw0, u64 ms)
{
    e->cdw0 = (e->cdw0 & 0xFFFF) | (u32)(++admin_cid) << 16;
    sq_put(&admin, e);
    ring(&admin, false);
    u64 t0 = rdtsc(), lim = ns_to_tsc(ms * 1000000ULL);
    struct cqe c;
    for (;;) {
        if (cq_pop(&admin, &c)) {
            ring(&admin, true);
            if (c.cid != admin_cid)
                continue; /* a stale completion (e.g. of a timed-out command) */
            if (dw0)
                *dw0 = c.dw0;
            return (c.status >> 1) & 0x7FF; /* SCT, SC (without More/DNR) */
        }
        if (rdtsc() - t0 > lim)
            return STATUS_PENDING;
        cpu_pause();
    }
}

static noreturn void fail_json(const char *rw, const char *msg)
{
    json_begin("nvme");
    json_str("rw", rw);
    json_str("error", msg);
    json_end();
    gk_exit(EXIT_FAIL);
}

static void identify(u32 cns, u32 nsid, void *buf, const char *rw)
{
    struct sqe e = {0};
    e.cdw0 = ADM_IDENTIFY;
    e.nsid = nsid;
    e.prp1 = (u64)(uptr)buf;
    e.cdw10 = cns;
    if (admin_cmd(&e, NULL, 2000))
        fail_json(rw, cns == 1 ? "Identify Controller failed" : "Identify Namespace failed");
}

static u16 create_pair(struct queue *q, u32 qid, u32 size)
{
    q->qid = (u16)qid;
    q->size = (u16)size;
    if (!q->sq) { /* a queue re-created (cycle=N) reuses its pages */
        q->sq = heap_alloc(ALIGN_UP(size * sizeof(struct sqe), PAGE), PAGE);
        q->cq = heap_alloc(ALIGN_UP(size * sizeof(struct cqe), PAGE), PAGE);
    }
    memset((void *)q->cq, 0, ALIGN_UP(size * sizeof(struct cqe), PAGE)); /* no stale phase tags */
    q->phase = 1;
    q->sq_tail = q->cq_head = q->sq_db_old = q->cq_db_old = 0;
    q->cq_dirty = false;
    struct sqe e = {0};
    e.cdw0 = ADM_CREATE_CQ;
    e.prp1 = (u64)(uptr)q->cq;
    e.cdw10 = qid | (size - 1) << 16;
    e.cdw11 = 1 | (use_irq ? 2 : 0) | (pd.msix_n > qid ? qid : 0) << 16; /* PC, IEN, IV */
    u16 st = admin_cmd(&e, NULL, 2000);
    if (st)
        return st;
    memset(&e, 0, sizeof(e));
    e.cdw0 = ADM_CREATE_SQ;
    e.prp1 = (u64)(uptr)q->sq;
    e.cdw10 = qid | (size - 1) << 16;
    e.cdw11 = 1 | qid << 16; /* PC, CQID */
    return admin_cmd(&e, NULL, 2000);
}

/* ---- I/O ---- */
/* fill PRP1/PRP2 for len bytes at r->data (page-aligned), with a PRP list starting prp_off bytes
 * into its page and chaining to the second list page when it runs out of room */
static void build_prps(struct req *r, struct sqe *e, u32 len)
{
    u64 a = (u64)(uptr)r->data;
    e->prp1 = a;
    u32 npages = (len + PAGE - 1) / PAGE;
    if (npages <= 1) {
        e->prp2 = 0;
        return;
    }
    if (npages == 2) {
        e->prp2 = a + PAGE;
        return;
    }
    u64 *l = (u64 *)((u8 *)r->prp_list + prp_off);
    e->prp2 = (u64)(uptr)l;
    u32 room = (PAGE - prp_off) / 8, left = npages - 1;
    u64 p = a + PAGE;
    while (left) {
        if (left > room) {
            for (u32 i = 0; i < room - 1; i++, p += PAGE, left--)
                l[i] = p;
            u64 *next = (u64 *)((u8 *)r->prp_list + PAGE);
            l[room - 1] = (u64)(uptr)next;
            l = next;
            room = PAGE / 8;
        } else {
            for (u32 i = 0; left; i++, p += PAGE, left--)
                l[i] = p;
        }
    }
}

static void req_post(struct req *r)
{
    struct sqe e = {0};
    e.cdw0 = r->op | (u32)r->cid << 16;
    e.nsid = 1;
    if (r->op == OP_READ || r->op == OP_WRITE || r->op == OP_WRITE_ZEROES) {
        e.cdw10 = (u32)r->slba;
        e.cdw11 = (u32)(r->slba >> 32);
        e.cdw12 = r->len / lba_size - 1;
        if (r->op != OP_WRITE_ZEROES)
            build_prps(r, &e, r->len);
    } else if (r->op == OP_DSM) {
        u32 *range = (u32 *)r->data; /* context attributes, NLB, SLBA */
        range[0] = 0;
        range[1] = r->len / lba_size;
        *(u64 *)&range[2] = r->slba;
        e.prp1 = (u64)(uptr)r->data;
        e.cdw10 = 0;   /* one range */
        e.cdw11 = 4;   /* AD: deallocate */
    }
    r->status = STATUS_PENDING;
    sq_put(r->q, &e);
    r->busy = true;
    r->t_submit = rdtsc();
}

static void req_complete(struct req *r, u16 status, u64 now)
{
    r->busy = false;
    r->status = status;
    inflight--;
    enum io_op op = r->op == OP_READ ? IO_READ : r->op == OP_WRITE ? IO_WRITE : r->op == OP_FLUSH ? IO_FLUSH
                  : r->op == OP_DSM ? IO_DISCARD : IO_WRITE_ZEROES;
    wl_complete(op, status, r->len, r->data, r->sector, now - r->t_submit);
}

static u32 reap(void)
{
    u32 done = 0;
    u64 now = 0;
    struct cqe c;
    for (u32 i = 0; i < nq; i++) {
        struct queue *q = &ioq[i];
        while (cq_pop(q, &c)) {
            if (!now)
                now = rdtsc();
            u32 k = c.cid;
            if (k >= wl.qd || !reqs[k].busy || reqs[k].q != q)
                panic("controller completed an idle command (cid %u, sq %u)", k, c.sq_id);
            req_complete(&reqs[k], (c.status >> 1) & 0x7FF, now);
            done++;
        }
        if (q->cq_dirty) {
            q->cq_dirty = false;
            ring(q, true);
        }
    }
    return done;
}

static bool any_cqe(void)
{
    for (u32 i = 0; i < nq; i++)
        if ((ioq[i].cq[ioq[i].cq_head].status & 1) == ioq[i].phase)
            return true;
    return false;
}

static bool wait_any(void)
{
    u64 t0 = rdtsc();
    u32 spins = 0;
    for (;;) {
        if (any_cqe())
            return true;
        if (use_irq) {
            irq_flag = 0;
            mfence();
            if (any_cqe())
                return true;
            wait_for_irq(&irq_flag);
            if (rdtsc() - t0 > timeout_cyc)
                return any_cqe();
        } else {
            cpu_pause();
            if ((++spins & 255) == 0 && rdtsc() - t0 > timeout_cyc)
                return any_cqe();
        }
    }
}

/* ---- workload (workload.c generates; here it becomes an NVMe command) ---- */
static bool gen_next(struct req *r, u64 t_start)
{
    struct io_next io;
    if (!wl_next(&io, r->data, t_start))
        return false;
    static const u8 op[] = {[IO_READ] = OP_READ, [IO_WRITE] = OP_WRITE, [IO_FLUSH] = OP_FLUSH,
                            [IO_DISCARD] = OP_DSM, [IO_WRITE_ZEROES] = OP_WRITE_ZEROES};
    if (io.op == IO_IDENT)
        return false; /* identify is an admin command: the app does it before any I/O */
    r->op = op[io.op];
    r->slba = io.block;
    r->sector = io.block * (lba_size / SECTOR);
    r->len = io.blocks * lba_size;
    return true;
}

static void cycle_queues(void);

static bool run_loop(u64 t_start)
{
    bool posted_q[MAX_QUEUES];
    for (;;) {
        memset(posted_q, 0, sizeof(posted_q));
        bool posted = false;
        bool cycling = cycle_every && wl.ops_done >= next_cycle && !wl.gen_done;
        if (cycling && !inflight) { /* quiesced: every command completed */
            cycle_queues();
            next_cycle = wl.ops_done + cycle_every;
            cycling = false;
        }
        for (u32 k = 0; k < wl.qd && !wl.gen_done && !cycling; k++) {
            if (reqs[k].busy)
                continue;
            if (!gen_next(&reqs[k], t_start))
                break;
            req_post(&reqs[k]);
            posted_q[reqs[k].q - ioq] = true;
            inflight++;
            posted = true;
        }
        if (posted)
            for (u32 i = 0; i < nq; i++)
                if (posted_q[i])
                    ring(&ioq[i], false);
        if (!inflight)
            return true;
        if (!wait_any())
            return false;
        reap();
    }
}

static bool run_one(u8 op, u64 slba, u32 len)
{
    struct req *r = &reqs[0];
    r->op = op;
    r->slba = slba;
    r->sector = slba * (lba_size / SECTOR);
    r->len = len;
    req_post(r);
    inflight++;
    ring(r->q, false);
    while (inflight) {
        if (!wait_any())
            return false;
        reap();
    }
    return true;
}

/* ---- malformed commands: each must fail with a status (or a bad doorbell be ignored) ---- */
static const char *outcome(u16 st)
{
    static char buf[16][16];
    static u32 n;
    char *b = buf[n++ & 15];
    if (st == STATUS_PENDING)
        return "timeout";
    if (st == 0)
        return "accepted";
    snprintf(b, 16, "sc_0x%03x", st & 0x7FF);
    return b;
}

static u16 io_raw(struct sqe *e, u64 case_cyc)
{
    struct queue *q = &ioq[0];
    e->cdw0 = (e->cdw0 & 0xFFFF) | 0u << 16; /* cid 0 = reqs[0] */
    reqs[0].busy = true;
    reqs[0].t_submit = rdtsc();
    inflight++;
    wl.errors = 0;
    wl.first_error_status = 0xFFFFFFFF;
    sq_put(q, e);
    ring(q, false);
    u64 t0 = rdtsc();
    while (rdtsc() - t0 < case_cyc) {
        if (any_cqe()) {
            reap();
            return wl.first_error_status == 0xFFFFFFFF ? 0 : (u16)wl.first_error_status;
        }
        cpu_pause();
    }
    return STATUS_PENDING;
}

static noreturn void app_nvme_malformed(u64 bad_addr, u64 case_ms)
{
    u64 case_cyc = ns_to_tsc(case_ms * 1000000ULL);
    struct req *r = &reqs[0];
    const char *names[] = {"prp_oob", "prp2_offset", "list_oob", "list_unaligned", "lba_oob",
                           "bad_opcode", "bad_nsid", "over_mdts", "create_bad_qid", "dbbuf_unaligned",
                           "sq_tail_oob"};
    const u32 ncases = ARRAY_SIZE(names);
    const char *res[ARRAY_SIZE(names)];
    bool all_ok = true;
    for (u32 c = 0; c < ncases; c++) {
        struct sqe e = {0};
        e.cdw0 = OP_READ;
        e.nsid = 1;
        e.prp1 = (u64)(uptr)r->data;
        e.cdw12 = 8192 / lba_size - 1; /* 8 KiB read */
        e.prp2 = (u64)(uptr)r->data + PAGE;
        u16 st = STATUS_PENDING;
        bool admin_case = false;
        switch (c) {
        case 0: e.prp1 = bad_addr; break;
        case 1: e.prp2 += 0x100; break;
        case 2: e.cdw12 = 16384 / lba_size - 1; e.prp2 = bad_addr; break;
        case 3: /* valid entries at the page start, read from 4 bytes in: the list pointer is not
                 * qword-aligned (and the entries it would yield have page offsets) */
            for (u32 i = 0; i < 4; i++)
                r->prp_list[i] = (u64)(uptr)r->data + PAGE * (i + 1);
            e.cdw12 = 16384 / lba_size - 1;
            e.prp2 = (u64)(uptr)r->prp_list + 4;
            break;
        case 4: e.cdw10 = (u32)nsze; e.cdw11 = (u32)(nsze >> 32); break;
        case 5: e.cdw0 = 0x7F; break;
        case 6: e.nsid = 2; break;
        case 7:
            if (!mdts) {
                res[c] = "skipped";
                printf("guestkit: malformed %s -> skipped (MDTS 0: no limit)\n", names[c]);
                continue;
            }
            e.cdw12 = (u32)(((PAGE << mdts) + lba_size) / lba_size - 1);
            e.prp2 = bad_addr; /* must be refused before any PRP is read */
            break;
        case 8:
            admin_case = true;
            memset(&e, 0, sizeof(e));
            e.cdw0 = ADM_CREATE_SQ;
            e.prp1 = (u64)(uptr)r->prp_list;
            e.cdw10 = 0xFFF0 | 15u << 16;
            e.cdw11 = 1 | 1u << 16;
            st = admin_cmd(&e, NULL, case_ms);
            break;
        case 9:
            admin_case = true;
            if (!(oacs & OACS_DBBUF)) {
                res[c] = "skipped";
                continue;
            }
            memset(&e, 0, sizeof(e));
            e.cdw0 = ADM_DBBUF;
            e.prp1 = (u64)(uptr)shadow + 8;
            e.prp2 = (u64)(uptr)event_idx;
            st = admin_cmd(&e, NULL, case_ms);
            break;
        case 10: {
            /* a tail doorbell value beyond the queue: the controller must ignore it (5.2: an
             * asynchronous event at most), complete nothing, and keep working */
            admin_case = true;
            mmio_w32(db_addr(ioq[0].qid, false), ioq[0].size + 3u);
            doorbells++;
            u64 t0 = rdtsc();
            while (rdtsc() - t0 < case_cyc && !any_cqe())
                cpu_pause();
            bool fatal = mmio_r32(regs + REG_CSTS) & CSTS_CFS;
            res[c] = any_cqe() ? "completed" : fatal ? "fatal" : "ignored";
            if (any_cqe() || fatal)
                all_ok = false;
            mmio_w32(db_addr(ioq[0].qid, false), ioq[0].sq_tail); /* the real tail again */
            printf("guestkit: malformed %s -> %s\n", names[c], res[c]);
            continue;
        }
        }
        if (!admin_case)
            st = io_raw(&e, case_cyc);
        res[c] = outcome(st);
        if (st == 0 || st == STATUS_PENDING)
            all_ok = false;
        printf("guestkit: malformed %s -> %s\n", names[c], res[c]);
        if (st == STATUS_PENDING)
            break;
    }
    wl.errors = 0;
    wl.first_error_status = 0xFFFFFFFF;
    inflight = 0;
    reqs[0].busy = false;
    bool final_ok = run_one(OP_READ, 0, 4096) && wl.errors == 0;
    bool fatal = mmio_r32(regs + REG_CSTS) & CSTS_CFS;
    json_begin("nvme");
    json_str("rw", "malformed");
    for (u32 c = 0; c < ncases; c++)
        json_str(names[c], c < ncases && res[c] ? res[c] : "not_run");
    json_str("final_read", final_ok ? "ok" : "failed");
    json_u64("cfs", fatal);
    json_hex("bad_addr", bad_addr);
    json_u64("dbbuf", use_dbbuf);
    json_u64("tsc_khz", tsc_khz);
    json_end();
    gk_exit(all_ok && final_ok && !fatal ? EXIT_OK : EXIT_FAIL);
}

/* ---- results ---- */
static u64 irqs_run, timer_irqs_run;

static void print_results(u64 elapsed_cyc, const char *error)
{
    json_begin("nvme");
    wl_json(elapsed_cyc);
    json_u64("doorbells", doorbells);
    json_u64("sq_doorbells", sq_doorbells);
    json_u64("cq_doorbells", cq_doorbells);
    json_u64("shadow_writes", shadow_writes);
    json_u64("cycles", cycles);
    json_u64("resets", resets);
    json_u64("irqs", irqs_run);
    json_u64("timer_irqs", timer_irqs_run);
    json_str("irq", use_irq ? "msix" : "poll");
    json_u64("dbbuf", use_dbbuf);
    json_u64("queues", nq);
    json_u64("queue_size", qsize);
    json_u64("lba_size", lba_size);
    json_u64("nsze", nsze);
    json_u64("capacity", nsze * (lba_size / SECTOR));
    json_hex("oacs", oacs);
    json_u64("mdts", mdts);
    if (wl.first_error_status != 0xFFFFFFFF)
        json_hex("first_error_status", wl.first_error_status);
    if (error)
        json_str("error", error);
    json_end();
}

/* ---- bring-up (NVMe 1.4 7.6.1), also for a reset mid-run (cycle=N) ---- */
static u64 ctrl_to_ms;
static bool want_dbbuf, dbbuf_required;

/* disable, set up the admin queue (pages allocated by the caller), enable */
static void ctrl_enable(const char *rw)
{
    mmio_w32(regs + REG_CC, 0);
    if (!wait_reg(CSTS_RDY, 0, ctrl_to_ms))
        fail_json(rw, "controller did not become ready for reset (CSTS.RDY stays 1)");
    admin.qid = 0;
    admin.size = ADMIN_QSIZE;
    admin.phase = 1;
    admin.sq_tail = admin.cq_head = 0;
    memset((void *)admin.cq, 0, PAGE);
    mmio_w32(regs + REG_AQA, (ADMIN_QSIZE - 1) | (ADMIN_QSIZE - 1) << 16);
    mmio_w32(regs + REG_ASQ, (u32)(uptr)admin.sq);
    mmio_w32(regs + REG_ASQ + 4, 0);
    mmio_w32(regs + REG_ACQ, (u32)(uptr)admin.cq);
    mmio_w32(regs + REG_ACQ + 4, 0);
    mmio_w32(regs + REG_CC, 1 | 6u << 16 | 4u << 20); /* EN, CSS NVM, MPS 4 KiB, IOSQES 64, IOCQES 16 */
    if (!wait_reg(CSTS_RDY | CSTS_CFS, CSTS_RDY, ctrl_to_ms))
        fail_json(rw, "controller did not become ready (CSTS.RDY) or reported a fatal status");
}

static void create_queues(const char *rw)
{
    for (u32 i = 0; i < nq; i++) {
        u16 st = create_pair(&ioq[i], i + 1, qsize);
        if (st)
            fail_json(rw, "Create I/O Completion/Submission Queue failed");
    }
}

/* Number of Queues, the I/O queue pairs, then shadow doorbells (after the queues, as Linux does) */
static void io_setup(const char *rw)
{
    struct sqe e = {0};
    u32 dw0 = 0;
    e.cdw0 = ADM_SET_FEATURES;
    e.cdw10 = 0x07; /* Number of Queues */
    e.cdw11 = (nq - 1) | (nq - 1) << 16;
    if (admin_cmd(&e, &dw0, 2000))
        fail_json(rw, "Set Features (Number of Queues) failed");
    if ((dw0 & 0xFFFF) + 1 < nq || (dw0 >> 16) + 1 < nq)
        fail_json(rw, "more queues requested than the controller allocates");
    create_queues(rw);
    use_dbbuf = false;
    if (want_dbbuf && (oacs & OACS_DBBUF)) {
        if (!shadow) {
            shadow = heap_alloc(PAGE, PAGE);
            event_idx = heap_alloc(PAGE, PAGE);
        }
        memset((void *)shadow, 0, PAGE);
        memset((void *)event_idx, 0, PAGE);
        memset(&e, 0, sizeof(e));
        e.cdw0 = ADM_DBBUF;
        e.prp1 = (u64)(uptr)shadow;
        e.prp2 = (u64)(uptr)event_idx;
        if (admin_cmd(&e, NULL, 2000))
            fail_json(rw, "Doorbell Buffer Config failed");
        use_dbbuf = true;
    } else if (want_dbbuf && dbbuf_required) {
        fail_json(rw, "controller does not support Doorbell Buffer Config (OACS bit 8)");
    }
}

/* cycle=N, with every command completed: odd cycles delete every I/O queue pair (SQ, then CQ) and
 * create it again; even ones reset the controller (CC.EN 0) and bring it up again */
static void cycle_queues(void)
{
    const char *rw = rw_names[wl.mode];
    cycles++;
    if (cycles % 2) {
        for (u32 i = 0; i < nq; i++) {
            struct sqe e = {0};
            e.cdw0 = ADM_DELETE_SQ;
            e.cdw10 = ioq[i].qid;
            if (admin_cmd(&e, NULL, 2000))
                fail_json(rw, "Delete I/O Submission Queue failed");
            memset(&e, 0, sizeof(e));
            e.cdw0 = ADM_DELETE_CQ;
            e.cdw10 = ioq[i].qid;
            if (admin_cmd(&e, NULL, 2000))
                fail_json(rw, "Delete I/O Completion Queue failed");
        }
        create_queues(rw);
    } else {
        resets++;
        ctrl_enable(rw);
        io_setup(rw);
    }
}

void app_nvme(void)
{
    static const char *const keys[] = {"rw", "bs", "qd", "n", "ms", "seed", "verify", "offset", "size",
                                       "fua", "flush_every", "irq", "queues", "qsize", "timeout_ms", "index",
                                       "bad_addr", "case_ms", "bar_window", "reassign_bars", "expect", "dbbuf",
                                       "prp_off", "cycle", NULL};
    args_allow(keys);
    const char *rw = wl_parse();
    const char *irq = arg_str("irq", "msix");
    if (!strcmp(irq, "poll"))
        use_irq = false;
    else if (strcmp(irq, "msix"))
        usage_error("irq must be msix or poll");
    u64 nq_req = arg_u64("queues", 1);
    if (nq_req < 1 || nq_req > MAX_QUEUES)
        usage_error("queues must be 1..%u", MAX_QUEUES);
    nq = (u32)nq_req;
    if (wl.mode == RW_MALFORMED || wl.mode == RW_IDENT || wl.mode == RW_FLUSH)
        nq = 1;
    cycle_every = next_cycle = arg_u64("cycle", 0);
    prp_off = (u32)arg_u64("prp_off", 0);
    if (prp_off % 8 || prp_off >= PAGE)
        usage_error("prp_off must be a multiple of 8 below 4096");
    timeout_cyc = ns_to_tsc(arg_u64("timeout_ms", 5000) * 1000000ULL);
    pci_bar_window = arg_hex("bar_window", pci_bar_window);
    pci_force_assign = arg_u64("reassign_bars", 0) != 0;

    lapic_init();
    u32 apic = lapic_id();
    if (!pci_find(NVME_VENDOR, NVME_DEVICE, (u32)arg_u64("index", 0), &pd))
        fail_json(rw, "no NVMe controller (1b36:0010) on PCI bus 0");
    if ((pci_cfg_read32(&pd, 0x08) >> 8) != 0x010802)
        fail_json(rw, "PCI function 1b36:0010 is not class 01-08-02");
    regs = (uptr)pci_bar_addr(&pd, 0);
    pci_enable(&pd);
    if (msix_init(&pd)) {
        for (u32 e = 0; e < pd.msix_n && e <= MAX_QUEUES; e++)
            msix_set(&pd, e, apic, (u8)(VEC_BASE + e));
    } else if (use_irq) {
        fail_json(rw, "controller has no MSI-X capability; use irq=poll");
    }

    /* controller bring-up (NVMe 1.4 7.6.1) */
    cap = (u64)mmio_r32(regs + REG_CAP) | (u64)mmio_r32(regs + REG_CAP + 4) << 32;
    dstrd = (cap >> 32) & 0xF;
    u32 mqes = (u32)(cap & 0xFFFF) + 1;
    ctrl_to_ms = (((cap >> 24) & 0xFF) + 1) * 500;
    admin.sq = heap_alloc(PAGE, PAGE);
    admin.cq = heap_alloc(PAGE, PAGE);
    ctrl_enable(rw);

    u8 *id = heap_alloc(PAGE, PAGE);
    identify(1, 0, id, rw);
    oacs = *(u16 *)(id + 0x100);
    oncs = *(u16 *)(id + 0x208);
    mdts = id[0x4D];
    memcpy(serial, id + 4, 20);
    memcpy(model, id + 0x18, 40);
    identify(0, 1, id, rw);
    nsze = *(u64 *)id;
    u32 flbas = id[0x1A] & 0xF;
    lba_size = 1u << ((*(u32 *)(id + 0x80 + 4 * flbas) >> 16) & 0xFF);
    if (lba_size < SECTOR || lba_size > PAGE)
        fail_json(rw, "unsupported LBA size");
    if (wl.bs % lba_size)
        fail_json(rw, "bs is not a multiple of the LBA size");

    u32 per_q = (wl.qd + nq - 1) / nq;
    u64 qs_req = arg_u64("qsize", 0);
    qsize = qs_req ? (u32)qs_req : MAX(64u, per_q + 1);
    if (qsize > mqes)
        qsize = mqes;
    if (qsize < 2 || qsize - 1 < per_q)
        fail_json(rw, "queue size too small for qd (each queue holds size-1 commands)");
    want_dbbuf = arg_u64("dbbuf", 1);
    dbbuf_required = arg_present("dbbuf");
    io_setup(rw);
    printf("guestkit: nvme %02x:%02x.%x regs=%#lx model='%s' lba=%u nsze=%llu queues=%u qsize=%u dbbuf=%u\n",
           pd.bus, pd.dev, pd.fn, (unsigned long)regs, model, lba_size, nsze, nq, qsize, use_dbbuf);

    for (u32 k = 0; k < wl.qd; k++) {
        reqs[k].q = &ioq[k % nq];
        reqs[k].cid = (u16)k;
        reqs[k].data = heap_alloc(MAX(wl.bs, (u32)PAGE) + 2 * PAGE, PAGE);
        reqs[k].prp_list = heap_alloc(2 * PAGE, PAGE);
    }

    if (wl.mode == RW_MALFORMED) {
        u64 top = MAX(ram_top(), 0x100000000ULL);
        app_nvme_malformed(arg_hex("bad_addr", ALIGN_UP(top, 1ULL << 30) + (64ULL << 30)), arg_u64("case_ms", 500));
    }
    if (wl.mode == RW_IDENT) {
        json_begin("nvme");
        json_str("rw", "ident");
        json_str("serial", serial);
        json_str("model", model);
        json_hex("oacs", oacs);
        json_hex("oncs", oncs);
        json_u64("mdts", mdts);
        json_u64("nsze", nsze);
        json_u64("lba_size", lba_size);
        json_u64("mqes", mqes);
        json_u64("msix_vectors", pd.msix_n);
        json_hex("vs", mmio_r32(regs + REG_VS));
        json_u64("dbbuf", use_dbbuf);
        json_u64("errors", 0);
        json_u64("tsc_khz", tsc_khz);
        json_end();
        gk_exit(EXIT_OK);
    }
    if (wl.mode == RW_DISCARD && !(oncs & ONCS_DSM))
        fail_json(rw, "controller does not support Dataset Management (ONCS bit 2)");
    if (wl.mode == RW_WRITE_ZEROES && !(oncs & ONCS_WRITE_ZEROES))
        fail_json(rw, "controller does not support Write Zeroes (ONCS bit 3)");

    u64 disk = nsze * lba_size;
    u64 off = arg_u64("offset", 0);
    if (off % lba_size || off >= disk)
        fail_json(rw, "offset must be a multiple of the LBA size inside the namespace");
    u64 size = arg_u64("size", disk - off);
    if (!size || size % lba_size || off + size > disk)
        fail_json(rw, "size must be a non-zero multiple of the LBA size inside the namespace");
    wl.block_bytes = lba_size;
    wl.range_start = off / lba_size;
    wl.range_blocks = size / lba_size;
    wl.chunk_blocks = wl.bs / lba_size;
    const char *plan_error = wl_plan();
    if (plan_error)
        fail_json(rw, plan_error);

    u64 ticks0 = timer_ticks, irqs0 = queue_irqs();
    if (use_irq)
        lapic_timer_periodic_ns(100000000ULL);
    bench_mark(BENCH_MARK_START);
    u64 t0 = rdtsc();
    bool ok = run_loop(t0);
    if (ok && wl.mode == RW_FILL)
        ok = run_one(OP_FLUSH, 0, 0);
    u64 t1 = rdtsc();
    bench_mark(BENCH_MARK_END);
    lapic_timer_stop();
    timer_irqs_run = timer_ticks - ticks0;
    irqs_run = queue_irqs() - irqs0;
    print_results(t1 - t0, ok ? NULL : "timeout waiting for completions");
    gk_exit(ok && !wl.errors && !wl.verify_errors ? EXIT_OK : EXIT_FAIL);
}
