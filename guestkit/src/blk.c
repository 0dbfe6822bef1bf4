/* guestkit app "blk": virtio-blk driver over modern virtio-pci (VIRTIO 1.2, 5.2)
 * with split virtqueues, MSI-X or polling, EVENT_IDX, and a workload generator. */
#include "virtio.h"
#include "workload.h"

#define VIRTIO_ID_BLK_MODERN 0x1042

#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_MQ 12
#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_F_WRITE_ZEROES 14

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13
#define VIRTIO_BLK_WZ_F_UNMAP 1

#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define STATUS_UNTOUCHED 0xFF /* sentinel: device never wrote the status byte */

/* virtio_blk_config offsets */
#define BLKCFG_CAPACITY 0
#define BLKCFG_SEG_MAX 12
#define BLKCFG_BLK_SIZE 20
#define BLKCFG_NUM_QUEUES 34
#define BLKCFG_MAX_DISCARD_SECTORS 36
#define BLKCFG_MAX_WRITE_ZEROES_SECTORS 48

#define SECTOR 512
#define MAX_QUEUES 16
#define VEC_BASE 0x40 /* LAPIC vector = VEC_BASE + MSI-X entry */

struct blk_hdr {
    u32 type;
    u32 reserved;
    u64 sector;
};

struct req {
    struct blk_hdr *hdr;
    volatile u8 *status;
    u8 *data;
    struct vring_desc *itab; /* indirect table (3 entries) when indirect is used */
    struct virtq *vq;
    u16 head;
    bool busy;
    u32 type;
    u32 len;
    u64 sector;
    u64 nbytes; /* disk bytes covered (discard / write zeroes) */
    u64 t_submit;
};

struct blk_dwz_seg { /* struct virtio_blk_discard_write_zeroes */
    u64 sector;
    u32 num_sectors;
    u32 flags;
};


/* ---- driver state ---- */
static struct vdev vd;
static struct virtq vqs[MAX_QUEUES];
static u32 nq = 1;
static u16 qsize;
static bool use_irq = true, want_event_idx = true;
static u32 apic;
static struct req reqs[WL_MAX_QD];
static u64 capacity; /* sectors */
static u32 blk_size, seg_max;
static u64 timer_irqs_run, irqs_run;
#define config_irqs (irq_counts[VEC_BASE])
static u64 queue_irqs(void)
{
    u64 n = 0;
    for (u32 e = 1; e < 1 + MAX_QUEUES; e++)
        n += irq_counts[VEC_BASE + e];
    return n;
}
static u64 timeout_cyc;
static u64 resets;
static bool use_indirect;

/* ---- interrupts ---- */
static u32 msix_entry_for_queue(u32 q)
{
    u32 n = vd.pci.msix_n;
    return n > 1 + q ? 1 + q : (n > 1 ? n - 1 : 0);
}

/* ---- device bring-up ---- */
static bool blk_init_device(bool quiet)
{
    u64 want = (1ULL << VIRTIO_F_VERSION_1) | (1ULL << VIRTIO_BLK_F_FLUSH) |
               (1ULL << VIRTIO_BLK_F_RO) | (1ULL << VIRTIO_BLK_F_BLK_SIZE) |
               (1ULL << VIRTIO_BLK_F_SEG_MAX) | (1ULL << VIRTIO_BLK_F_MQ) |
               (1ULL << VIRTIO_BLK_F_DISCARD) | (1ULL << VIRTIO_BLK_F_WRITE_ZEROES);
    if (want_event_idx)
        want |= 1ULL << VIRTIO_F_EVENT_IDX;
    if (use_indirect)
        want |= 1ULL << VIRTIO_F_INDIRECT_DESC;
    if (!vdev_negotiate(&vd, want, 1ULL << VIRTIO_F_VERSION_1))
        return false;
    bool ev = (vd.features >> VIRTIO_F_EVENT_IDX) & 1;
    if (vd.pci.msix_n) {
        if (!vdev_set_config_vector(&vd, 0))
            panic("device rejected msix_config vector (read back 0xffff)");
    }
    for (u32 q = 0; q < nq; q++) {
        u16 vec = vd.pci.msix_n ? (u16)msix_entry_for_queue(q) : VIRTIO_MSI_NO_VECTOR;
        if (!virtq_setup(&vd, &vqs[q], q, qsize, vec, ev))
            panic("device rejected queue_msix_vector %u for queue %u", vec, q);
        struct virtq *vq = &vqs[q];
        if (!use_irq) {
            if (ev)
                *virtq_used_event(vq) = 0x7FFF; /* far away: no interrupts */
            else
                vq->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
        }
    }
    vdev_driver_ok(&vd);
    if (vdev_status(&vd) & (VIRTIO_S_NEEDS_RESET | VIRTIO_S_FAILED))
        return false;
    if (!quiet)
        printf("guestkit: virtio-blk %02x:%02x.%x common=%#lx features=%#llx queues=%u qsize=%u\n",
               vd.pci.bus, vd.pci.dev, vd.pci.fn, (unsigned long)vd.common, vd.features, nq, qsize);
    return true;
}

static void reqs_bind(void)
{
    for (u32 k = 0; k < wl.qd; k++) {
        reqs[k].vq = &vqs[k % nq];
        reqs[k].head = (u16)(use_indirect ? k / nq : 3 * (k / nq));
        reqs[k].busy = false;
    }
}

/* ---- request submission / completion ---- */
static void req_post(struct req *r)
{
    struct virtq *vq = r->vq;
    u16 h = r->head;
    struct vring_desc *d = vq->desc;
    if (use_indirect) {
        d = r->itab;
        h = 0;
    }
    r->hdr->type = r->type;
    r->hdr->reserved = 0;
    r->hdr->sector = r->sector;
    *r->status = STATUS_UNTOUCHED;
    d[h].addr = (u64)(uptr)r->hdr;
    d[h].len = sizeof(struct blk_hdr);
    d[h].flags = VRING_DESC_F_NEXT;
    if (r->len) {
        bool dev_writes = r->type == VIRTIO_BLK_T_IN || r->type == VIRTIO_BLK_T_GET_ID;
        d[h].next = h + 1;
        d[h + 1].addr = (u64)(uptr)r->data;
        d[h + 1].len = r->len;
        d[h + 1].flags = VRING_DESC_F_NEXT | (dev_writes ? VRING_DESC_F_WRITE : 0);
        d[h + 1].next = h + 2;
    } else {
        d[h].next = h + 2;
    }
    d[h + 2].addr = (u64)(uptr)r->status;
    d[h + 2].len = 1;
    d[h + 2].flags = VRING_DESC_F_WRITE;
    d[h + 2].next = 0;
    if (use_indirect) {
        if (!r->len) { /* header -> status: compact the table to 2 entries */
            d[1] = d[2];
            d[0].next = 1;
        }
        h = r->head;
        vq->desc[h].addr = (u64)(uptr)r->itab;
        vq->desc[h].len = (r->len ? 3 : 2) * sizeof(struct vring_desc);
        vq->desc[h].flags = VRING_DESC_F_INDIRECT;
        vq->desc[h].next = 0;
    }
    vq->avail->ring[vq->avail_idx & (vq->size - 1)] = h;
    vq->avail_idx++;
    r->busy = true;
    r->t_submit = rdtsc();
}

static void kick_all(void)
{
    for (u32 q = 0; q < nq; q++)
        virtq_kick(&vqs[q]);
}

static u32 inflight;

static void req_complete(struct req *r, u64 now)
{
    u8 st = *r->status;
    r->busy = false;
    inflight--;
    enum io_op op = r->type == VIRTIO_BLK_T_IN ? IO_READ : r->type == VIRTIO_BLK_T_OUT ? IO_WRITE
                  : r->type == VIRTIO_BLK_T_FLUSH ? IO_FLUSH : r->type == VIRTIO_BLK_T_DISCARD ? IO_DISCARD
                  : r->type == VIRTIO_BLK_T_WRITE_ZEROES ? IO_WRITE_ZEROES : IO_IDENT;
    u64 bytes = op == IO_DISCARD || op == IO_WRITE_ZEROES ? r->nbytes : r->len;
    wl_complete(op, st != VIRTIO_BLK_S_OK ? st : 0, bytes, r->data, r->sector, now - r->t_submit);
}

/* consume used entries of every queue; returns number completed */
static u32 reap(void)
{
    u32 done = 0;
    u64 now = 0;
    for (u32 q = 0; q < nq; q++) {
        struct virtq *vq = &vqs[q];
        u16 uidx = virtq_used_idx(vq);
        if (uidx == vq->last_used)
            continue;
        if (!now)
            now = rdtsc();
        barrier();
        while (vq->last_used != uidx) {
            struct vring_used_elem e = vq->used->ring[vq->last_used & (vq->size - 1)];
            vq->last_used++;
            u32 id = e.id;
            if (id >= vq->size || (!use_indirect && id % 3))
                panic("device returned bad used id %u on queue %u", id, q);
            u32 k = (use_indirect ? id : id / 3) * nq + q;
            if (k >= wl.qd || !reqs[k].busy)
                panic("device completed an idle request (id %u, queue %u)", id, q);
            req_complete(&reqs[k], now);
            done++;
        }
        if (!use_irq && vq->event_idx)
            *virtq_used_event(vq) = vq->last_used + 0x7FFF;
    }
    return done;
}

static bool any_used(void)
{
    for (u32 q = 0; q < nq; q++)
        if (virtq_used_idx(&vqs[q]) != vqs[q].last_used)
            return true;
    return false;
}

/* wait until at least one completion is available; false on timeout */
static bool wait_any(void)
{
    u64 t0 = rdtsc();
    u32 spins = 0;
    for (;;) {
        if (any_used())
            return true;
        if (use_irq) {
            irq_flag = 0; /* any interrupt from here on cancels the sleep */
            for (u32 q = 0; q < nq; q++)
                if (vqs[q].event_idx)
                    *virtq_used_event(&vqs[q]) = vqs[q].last_used;
            mfence();
            if (any_used())
                return true;
            wait_for_irq(&irq_flag); /* woken by the queue MSI-X or the watchdog tick */
            if (rdtsc() - t0 > timeout_cyc)
                return any_used();
        } else {
            cpu_pause();
            if ((++spins & 255) == 0 && rdtsc() - t0 > timeout_cyc)
                return any_used();
        }
    }
}

/* ---- workload (workload.c generates; here it becomes a virtio-blk request) ---- */
static u32 dwz_chunk; /* sectors per discard / write-zeroes request */
static bool wz_unmap;

/* fill in the next request; false when the workload is exhausted */
static bool gen_next(struct req *r, u64 t_start)
{
    struct io_next io;
    if (!wl_next(&io, r->data, t_start))
        return false;
    static const u32 type[] = {[IO_READ] = VIRTIO_BLK_T_IN, [IO_WRITE] = VIRTIO_BLK_T_OUT,
                               [IO_FLUSH] = VIRTIO_BLK_T_FLUSH, [IO_DISCARD] = VIRTIO_BLK_T_DISCARD,
                               [IO_WRITE_ZEROES] = VIRTIO_BLK_T_WRITE_ZEROES, [IO_IDENT] = VIRTIO_BLK_T_GET_ID};
    r->type = type[io.op];
    r->sector = io.block;
    r->len = io.blocks * SECTOR;
    if (io.op == IO_DISCARD || io.op == IO_WRITE_ZEROES) {
        struct blk_dwz_seg *seg = (struct blk_dwz_seg *)r->data;
        seg->sector = io.block;
        seg->num_sectors = io.blocks;
        seg->flags = (io.op == IO_WRITE_ZEROES && wz_unmap) ? VIRTIO_BLK_WZ_F_UNMAP : 0;
        r->sector = 0; /* header sector is unused for these commands */
        r->len = sizeof(*seg);
        r->nbytes = (u64)io.blocks * SECTOR;
    } else if (io.op == IO_IDENT) {
        r->len = 20;
    }
    return true;
}

/* run the generator with up to qd requests in flight; false on timeout */
static bool run_loop(u64 t_start)
{
    for (;;) {
        bool posted = false;
        for (u32 k = 0; k < wl.qd && !wl.gen_done; k++) {
            if (reqs[k].busy)
                continue;
            if (!gen_next(&reqs[k], t_start))
                break;
            req_post(&reqs[k]);
            inflight++;
            posted = true;
        }
        if (posted)
            kick_all();
        if (!inflight)
            return true;
        if (!wait_any())
            return false;
        reap();
    }
}

/* issue one request synchronously on slot 0 (all others idle); false on timeout */
static bool run_one(u32 type, u64 sector, u32 len)
{
    struct req *r = &reqs[0];
    r->type = type;
    r->sector = sector;
    r->len = len;
    req_post(r);
    inflight++;
    kick_all();
    while (inflight) {
        if (!wait_any())
            return false;
        reap();
    }
    return true;
}

/* ---- malformed requests ---- */
enum outcome { OC_IOERR, OC_UNSUPP, OC_NEEDS_RESET, OC_OK, OC_NO_STATUS, OC_TIMEOUT, OC_OTHER };
static const char *const oc_names[] = {"ioerr", "unsupp", "needs_reset", "accepted",
                                       "no_status", "timeout", "other_status"};

static void blk_reinit(void)
{
    resets++;
    if (!blk_init_device(true))
        panic("device did not come back after reset");
    reqs_bind();
    inflight = 0;
}

/* post a hand-made chain at head 'h' (descriptors already written) and observe */
static enum outcome malformed_post(u16 h, volatile u8 *status, u64 case_cyc, bool avail_jump)
{
    struct virtq *vq = &vqs[0];
    *status = STATUS_UNTOUCHED;
    vq->avail->ring[vq->avail_idx & (vq->size - 1)] = h;
    vq->avail_idx++;
    if (avail_jump)
        vq->avail_idx += vq->size + 1; /* claims more new buffers than the ring holds */
    virtq_kick(vq);
    u64 t0 = rdtsc();
    u32 spins = 0;
    enum outcome oc = OC_TIMEOUT;
    for (;;) {
        if (virtq_used_idx(vq) != vq->last_used) {
            barrier();
            vq->last_used++;
            u8 st = *status;
            oc = st == VIRTIO_BLK_S_IOERR    ? OC_IOERR
                 : st == VIRTIO_BLK_S_UNSUPP ? OC_UNSUPP
                 : st == VIRTIO_BLK_S_OK     ? OC_OK
                 : st == STATUS_UNTOUCHED    ? OC_NO_STATUS
                                             : OC_OTHER;
            break;
        }
        if ((++spins & 1023) == 0) {
            if (vdev_status(&vd) & VIRTIO_S_NEEDS_RESET) {
                oc = OC_NEEDS_RESET;
                break;
            }
            if (rdtsc() - t0 > case_cyc)
                break;
        }
        cpu_pause();
    }
    /* a device may both complete and ask for reset */
    if (oc != OC_NEEDS_RESET && (vdev_status(&vd) & VIRTIO_S_NEEDS_RESET))
        oc = OC_NEEDS_RESET;
    if (oc == OC_NEEDS_RESET || oc == OC_TIMEOUT || avail_jump)
        blk_reinit();
    return oc;
}

static void app_blk_malformed(u64 bad_addr, u64 case_ms)
{
    struct virtq *vq = &vqs[0];
    struct req *r = &reqs[0];
    struct vring_desc *d = vq->desc;
    const u64 case_cyc = ns_to_tsc(case_ms * 1000000ULL);
    static const char *const names[] = {"desc_oob", "chain_loop", "chain_too_long", "next_oob",
                                        "hdr_short", "huge_len", "sector_oob", "bad_type",
                                        "avail_jump", "indirect_nested", "indirect_len"};
    const u32 ncases = use_indirect ? ARRAY_SIZE(names) : ARRAY_SIZE(names) - 2;
    enum outcome res[ARRAY_SIZE(names)];
    bool all_ok = true;
    for (u32 c = 0; c < ncases; c++) {
        vq = &vqs[0];
        d = vq->desc;
        u16 sz = vq->size;
        /* a valid 1-sector read at head 0, then break it per case */
        r->hdr->type = VIRTIO_BLK_T_IN;
        r->hdr->reserved = 0;
        r->hdr->sector = 0;
        d[0] = (struct vring_desc){(u64)(uptr)r->hdr, sizeof(struct blk_hdr), VRING_DESC_F_NEXT, 1};
        d[1] = (struct vring_desc){(u64)(uptr)r->data, SECTOR, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2};
        d[2] = (struct vring_desc){(u64)(uptr)r->status, 1, VRING_DESC_F_WRITE, 0};
        bool jump = false;
        switch (c) {
        case 0: /* data buffer outside guest RAM (two pages: QEMU bounces one page
                 * of unassigned space but must fail the second) */
            d[1].addr = bad_addr;
            d[1].len = 8192;
            break;
        case 1: /* 0 -> 1 -> 0 ... */
            d[1].next = 0;
            break;
        case 2: /* every descriptor in one chain, the last pointing back to 0 */
            for (u16 i = 0; i < sz; i++) {
                d[i].addr = (u64)(uptr)r->data;
                d[i].len = SECTOR;
                d[i].flags = VRING_DESC_F_NEXT | (i ? VRING_DESC_F_WRITE : 0);
                d[i].next = (u16)((i + 1) % sz);
            }
            d[0].addr = (u64)(uptr)r->hdr;
            d[0].len = sizeof(struct blk_hdr);
            break;
        case 3: /* next index beyond the table */
            d[1].next = sz;
            break;
        case 4: /* header descriptor shorter than struct virtio_blk_req header */
            d[0].len = 8;
            break;
        case 5: /* data buffer of ~4 GiB */
            d[1].len = 0xFFFFF000u;
            break;
        case 6: /* sector beyond capacity */
            r->hdr->sector = capacity;
            break;
        case 7: /* unknown request type */
            r->hdr->type = 0x7fff0000u;
            break;
        case 8: /* avail index moved by more than the queue size */
            jump = true;
            break;
        case 9: /* an indirect table that contains an INDIRECT descriptor */
        case 10: /* indirect table length not a multiple of 16 */
            r->itab[0] = d[0];
            r->itab[1] = d[1];
            r->itab[2] = d[2];
            if (c == 9)
                r->itab[1] = (struct vring_desc){(u64)(uptr)r->itab, 48, VRING_DESC_F_INDIRECT, 0};
            d[0] = (struct vring_desc){(u64)(uptr)r->itab, c == 9 ? 48 : 40, VRING_DESC_F_INDIRECT, 0};
            break;
        }
        enum outcome oc = malformed_post(0, r->status, case_cyc, jump);
        res[c] = oc;
        if (oc != OC_IOERR && oc != OC_UNSUPP && oc != OC_NEEDS_RESET)
            all_ok = false;
        printf("guestkit: malformed %s -> %s\n", names[c], oc_names[oc]);
    }
    /* the device must still work */
    wl.errors = 0;
    bool final_ok = run_one(VIRTIO_BLK_T_IN, 0, 4096) && wl.errors == 0;
    json_begin("blk");
    json_str("rw", "malformed");
    for (u32 c = 0; c < ncases; c++)
        json_str(names[c], oc_names[res[c]]);
    json_str("final_read", final_ok ? "ok" : "failed");
    json_u64("resets", resets);
    json_u64("config_irqs", config_irqs);
    json_hex("bad_addr", bad_addr);
    json_u64("tsc_khz", tsc_khz);
    json_end();
    gk_exit(all_ok && final_ok ? EXIT_OK : EXIT_FAIL);
}

/* ---- the start gate ----
 * Several VMs measured side by side must start their loops at the same moment: each boots, sets up
 * its device, prints "guestkit: blk waiting at the gate", then reads the last 4096 bytes of its disk
 * every millisecond (halting on a 1 ms LAPIC tick in between) until its first 8 bytes hold `gate=`'s
 * token, which the host writes into every image at once.  The gate block is outside the workload's
 * range, and the gate's reads are not counted. */
#define GATE_BYTES 4096u
static u64 gate_token;


static bool gate_wait(u64 sector, u64 ms)
{
    printf("guestkit: blk waiting at the gate\n");
    bool verify = wl.verify_reads;
    wl.verify_reads = false; /* the gate block holds the token, not the pattern */
    u64 t0 = rdtsc(), limit = ns_to_tsc(ms * 1000000ULL);
    lapic_timer_periodic_ns(1000000ULL);
    bool open = false;
    while (!open && rdtsc() - t0 < limit) {
        if (!run_one(VIRTIO_BLK_T_IN, sector, GATE_BYTES) || wl.errors)
            break;
        open = *(volatile u64 *)reqs[0].data == gate_token;
        if (!open) {
            static volatile u32 never; /* sleep until the next interrupt: the 1 ms tick */
            wait_for_irq(&never);
        }
    }
    lapic_timer_stop();
    wl.verify_reads = verify;
    wl_stats_reset();
    return open;
}

/* ---- the app ---- */
static void print_results(u64 elapsed_cyc, const char *error)
{
    json_begin("blk");
    wl_json(elapsed_cyc);
    u64 notifies = 0;
    for (u32 q = 0; q < nq; q++)
        notifies += vqs[q].notifies;
    json_u64("notifies", notifies);
    json_u64("irqs", irqs_run);
    json_u64("timer_irqs", timer_irqs_run);
    json_str("irq", use_irq ? "msix" : "poll");
    json_u64("event_idx", (vd.features >> VIRTIO_F_EVENT_IDX) & 1);
    json_u64("queues", nq);
    json_u64("queue_size", qsize);
    json_u64("indirect", use_indirect);
    json_u64("capacity", capacity);
    json_hex("features", vd.features);
    if (wl.first_error_status != 0xFFFFFFFF)
        json_u64("first_error_status", wl.first_error_status);
    if (error)
        json_str("error", error);
    json_end();
}

static void fail_json(const char *rw, const char *msg)
{
    json_begin("blk");
    json_str("rw", rw);
    json_str("error", msg);
    json_end();
    gk_exit(EXIT_FAIL);
}

void app_blk(void)
{
    static const char *const keys[] = {"rw", "bs", "qd", "n", "ms", "seed", "verify", "offset",
                                       "size", "fua", "flush_every", "event_idx", "irq", "queues",
                                       "qsize", "timeout_ms", "index", "bad_addr", "case_ms",
                                       "bar_window", "reassign_bars", "indirect", "expect",
                                       "unmap", "gate", "gate_ms", NULL};
    args_allow(keys);
    const char *rw = wl_parse();
    wz_unmap = arg_u64("unmap", 0) != 0;
    const char *irq = arg_str("irq", "msix");
    if (!strcmp(irq, "poll"))
        use_irq = false;
    else if (strcmp(irq, "msix"))
        usage_error("irq must be msix or poll");
    want_event_idx = arg_u64("event_idx", 1) != 0;
    const char *ind = arg_str("indirect", "auto");
    int indirect_mode = !strcmp(ind, "auto") ? 2 : !strcmp(ind, "1") ? 1 : !strcmp(ind, "0") ? 0 : -1;
    if (indirect_mode < 0)
        usage_error("indirect must be 0, 1 or auto");
    u64 nq_req = arg_u64("queues", 1);
    if (nq_req < 1 || nq_req > MAX_QUEUES)
        usage_error("queues must be 1..%u", MAX_QUEUES);
    u64 qsize_req = arg_u64("qsize", 0);
    if (qsize_req && (qsize_req & (qsize_req - 1) || qsize_req > 32768))
        usage_error("qsize must be a power of two <= 32768");
    timeout_cyc = ns_to_tsc(arg_u64("timeout_ms", 5000) * 1000000ULL);
    pci_bar_window = arg_hex("bar_window", pci_bar_window);
    pci_force_assign = arg_u64("reassign_bars", 0) != 0;

    lapic_init();
    apic = lapic_id();
    if (!vdev_probe(&vd, VIRTIO_ID_BLK_MODERN, (u32)arg_u64("index", 0)))
        fail_json(rw, "no virtio-blk (1af4:1042) device on PCI bus 0");
    if (msix_init(&vd.pci)) {
        for (u32 e = 0; e < vd.pci.msix_n && e < 1 + MAX_QUEUES; e++)
            msix_set(&vd.pci, e, apic, (u8)(VEC_BASE + e));
    } else if (use_irq) {
        fail_json(rw, "device has no MSI-X capability; use irq=poll");
    }

    /* queues: MQ tells how many exist */
    if (!vdev_negotiate(&vd, 1ULL << VIRTIO_BLK_F_MQ, 1ULL << VIRTIO_F_VERSION_1))
        fail_json(rw, "feature negotiation failed (no VIRTIO_F_VERSION_1?)");
    u32 dev_queues = 1;
    if (vd.features & (1ULL << VIRTIO_BLK_F_MQ))
        dev_queues = vdev_cfg_read16(&vd, BLKCFG_NUM_QUEUES);
    if (nq_req > dev_queues)
        fail_json(rw, "more queues requested than the device has");
    nq = (u32)nq_req;
    if (wl.mode == RW_MALFORMED || wl.mode == RW_IDENT || wl.mode == RW_FLUSH)
        nq = 1;
    /* queue size: enough for 3 descriptors per request slot, or 1 with an
     * indirect table per request (auto: only when 3 per slot do not fit) */
    bool ind_offered = (vd.dev_features >> VIRTIO_F_INDIRECT_DESC) & 1;
    if (indirect_mode == 1 && !ind_offered)
        fail_json(rw, "device does not offer VIRTIO_F_INDIRECT_DESC");
    u32 per_q = (wl.qd + nq - 1) / nq;
    u32 need = 16;
    while (need < 3 * per_q)
        need <<= 1;
    u32 qs = qsize_req ? (u32)qsize_req : MAX(256u, need);
    u16 devmax = vdev_max_queue_size(&vd, 0);
    if (!devmax)
        fail_json(rw, "queue 0 not available");
    if (qs > devmax)
        qs = devmax;
    qsize = (u16)qs;
    use_indirect = indirect_mode == 1 || (indirect_mode == 2 && ind_offered && 3 * per_q > qsize &&
                                          wl.mode != RW_MALFORMED);
    u32 qd_cap = use_indirect ? qsize * nq : (qsize / 3) * nq;
    u64 qd_capped_from = 0;
    if (wl.qd > qd_cap) {
        qd_capped_from = wl.qd;
        wl.qd = qd_cap;
    }

    if (!blk_init_device(false))
        fail_json(rw, "device initialisation failed");
    capacity = vdev_cfg_read64(&vd, BLKCFG_CAPACITY);
    if (vd.features & (1ULL << VIRTIO_BLK_F_BLK_SIZE))
        blk_size = vdev_cfg_read32(&vd, BLKCFG_BLK_SIZE);
    if (vd.features & (1ULL << VIRTIO_BLK_F_SEG_MAX))
        seg_max = vdev_cfg_read32(&vd, BLKCFG_SEG_MAX);

    /* request memory */
    for (u32 k = 0; k < wl.qd; k++) {
        reqs[k].hdr = heap_alloc(sizeof(struct blk_hdr), 16);
        reqs[k].status = heap_alloc(1, 16);
        reqs[k].data = heap_alloc(MAX(wl.bs, 4096u), 4096);
        reqs[k].itab = heap_alloc(3 * sizeof(struct vring_desc), 16);
    }
    reqs_bind();

    if (wl.mode == RW_MALFORMED) {
        u64 top = MAX(ram_top(), 0x100000000ULL);
        u64 bad = ALIGN_UP(top, 1ULL << 30) + (64ULL << 30);
        app_blk_malformed(arg_hex("bad_addr", bad), arg_u64("case_ms", 500));
    }

    bool writes = wl_writes();
    if (writes && (vd.features & (1ULL << VIRTIO_BLK_F_RO)))
        fail_json(rw, "device is read-only (VIRTIO_BLK_F_RO)");
    if (wl.flush_every && !(vd.features & (1ULL << VIRTIO_BLK_F_FLUSH)))
        fail_json(rw, "device does not offer VIRTIO_BLK_F_FLUSH");

    /* disk range */
    u64 off = arg_u64("offset", 0);
    u64 disk = capacity * SECTOR;
    if (off % SECTOR || off >= disk)
        fail_json(rw, "offset must be a multiple of 512 inside the disk");
    gate_token = arg_hex("gate", 0);
    if (gate_token && disk < off + GATE_BYTES + SECTOR)
        fail_json(rw, "gate needs a disk larger than offset + 4096 bytes");
    if (gate_token && (wl.mode == RW_FILL || wl.mode == RW_MALFORMED))
        fail_json(rw, "gate is for read/write workloads");
    u64 size = arg_u64("size", disk - off - (gate_token ? GATE_BYTES : 0));
    if (gate_token && off + size > disk - GATE_BYTES)
        fail_json(rw, "offset + size overlaps the gate block (the disk's last 4096 bytes)");
    if (!size || size % SECTOR || off + size > disk)
        fail_json(rw, "size must be a non-zero multiple of 512 inside the disk");
    wl.block_bytes = SECTOR;
    wl.range_start = off / SECTOR;
    wl.range_blocks = size / SECTOR;

    if (wl.mode == RW_DISCARD || wl.mode == RW_WRITE_ZEROES) {
        u32 bit = wl.mode == RW_DISCARD ? VIRTIO_BLK_F_DISCARD : VIRTIO_BLK_F_WRITE_ZEROES;
        if (!(vd.features & (1ULL << bit)))
            fail_json(rw, wl.mode == RW_DISCARD ? "device does not offer VIRTIO_BLK_F_DISCARD"
                                             : "device does not offer VIRTIO_BLK_F_WRITE_ZEROES");
        u32 mx = vdev_cfg_read32(&vd, wl.mode == RW_DISCARD ? BLKCFG_MAX_DISCARD_SECTORS
                                                         : BLKCFG_MAX_WRITE_ZEROES_SECTORS);
        dwz_chunk = wl.bs / SECTOR;
        if (mx && mx < dwz_chunk)
            dwz_chunk = mx;
    }
    wl.chunk_blocks = dwz_chunk;
    const char *plan_error = wl_plan();
    if (plan_error)
        fail_json(rw, plan_error);
    if (wl.mode == RW_FLUSH && !(vd.features & (1ULL << VIRTIO_BLK_F_FLUSH)))
        fail_json(rw, "device does not offer VIRTIO_BLK_F_FLUSH");

    if (gate_token && !gate_wait(capacity - GATE_BYTES / SECTOR, arg_u64("gate_ms", 120000)))
        fail_json(rw, "gate: the token never appeared in the disk's last 4096 bytes");

    u64 ticks0 = timer_ticks;
    u64 irqs0 = queue_irqs();
    if (use_irq)
        lapic_timer_periodic_ns(100000000ULL); /* 100 ms watchdog tick for hlt waits */
    bench_mark(BENCH_MARK_START);
    u64 t0 = rdtsc();
    bool ok = run_loop(t0);
    if (ok && wl.mode == RW_FILL && (vd.features & (1ULL << VIRTIO_BLK_F_FLUSH)))
        ok = run_one(VIRTIO_BLK_T_FLUSH, 0, 0);
    u64 t1 = rdtsc();
    bench_mark(BENCH_MARK_END);
    lapic_timer_stop();
    timer_irqs_run = timer_ticks - ticks0;
    irqs_run = queue_irqs() - irqs0;

    if (wl.mode == RW_IDENT) {
        char id[21];
        memcpy(id, reqs[0].data, 20);
        id[20] = 0;
        json_begin("blk");
        json_str("rw", "ident");
        json_str("id", id);
        json_u64("errors", wl.errors);
        json_u64("capacity", capacity);
        json_u64("blk_size", blk_size);
        json_u64("seg_max", seg_max);
        json_u64("num_queues", dev_queues);
        json_u64("queue_size_max", devmax);
        json_u64("msix_vectors", vd.pci.msix_n);
        json_hex("device_features", vd.dev_features);
        json_hex("features", vd.features);
        json_u64("tsc_khz", tsc_khz);
        if (!ok)
            json_str("error", "timeout");
        json_end();
        gk_exit(ok && !wl.errors ? EXIT_OK : EXIT_FAIL);
    }
    if (qd_capped_from)
        printf("guestkit: qd capped from %llu to %u by queue size %u\n", qd_capped_from, wl.qd, qsize);
    print_results(t1 - t0, ok ? NULL : "timeout waiting for completions");
    gk_exit(ok && !wl.errors && !wl.verify_errors ? EXIT_OK : EXIT_FAIL);
}
