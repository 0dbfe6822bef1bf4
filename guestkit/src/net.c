/* guestkit: virtio-net driver (VIRTIO 1.2 section 5.1) and the `net` app.
 *
 * One queue pair: receiveq0 (queue 0) and transmitq0 (queue 1) -- or, with pair=N (N > 0), MQ and the
 * control queue are negotiated, VQ_PAIRS_SET N+1 is sent (VIRTIO 1.2 section 5.1.6.5.5) and only pair N's
 * queues (2N, 2N+1) are set up: the device then detaches the TAP's other queues, so the host's replies
 * come back on that pair.  Every RX buffer is one
 * device-writable descriptor of RX_BUF bytes (12-byte virtio_net_hdr_v1 + a full frame), every
 * TX chain one device-readable descriptor (header + frame, contiguous).  Completions are polled
 * (no interrupts: used_event is kept far ahead with EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT
 * otherwise).  No offloads are negotiated: the guest computes its own checksums.
 *
 * intx=1 (test=rr): MSI-X stays off and the function's INTx line (config 0x3C, through the IOAPIC,
 * level-triggered) wakes the guest, which sleeps (hlt) until each reply arrives: used_event asks for an
 * interrupt at the next RX completion, and the handler reads the ISR register (read-to-clear, which
 * lowers the line) before the EOI.  A 10 ms LAPIC tick is the watchdog; the counters show whether the
 * replies were announced by INTx (intx_irqs, isr_queue) and that the line dropped (no storm).
 * Seen on this host (kvm_pvm, in-kernel IOAPIC): every assertion is delivered twice -- the LAPIC's IRR
 * holds the vector again right after the EOI, although the VMM lowered the line (KVM_IRQ_LINE 0) at the
 * ISR read, even 200 us before the EOI; the second delivery reads ISR 0 (isr_zero).  Not understood yet.
 *
 * The peer is the host side of the TAP: the app resolves its MAC with ARP, answers ARP requests
 * for its own address, and talks ICMP echo (the host kernel is the responder) or sends frames of
 * a local experimental EtherType (0x88B5) that the host drops.
 */
#include "virtio.h"

#define VIRTIO_ID_NET_MODERN 0x1041
#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_MRG_RXBUF 15
#define VIRTIO_NET_F_STATUS 16
#define VIRTIO_NET_F_CTRL_VQ 17
#define VIRTIO_NET_F_MQ 22
#define VIRTIO_NET_CTRL_MQ 4
#define VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 0
#define VIRTIO_NET_S_LINK_UP 1
#define HDR_LEN 12
#define RX_BUF 2048
#define TX_BUF_SMALL 2048
#define TX_BUF_TSO 69632 /* a 64 KiB GSO frame, its headers and the virtio header, page multiple */
#define VIRTIO_NET_F_CSUM 0
#define VIRTIO_NET_F_HOST_TSO4 11
#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_HDR_GSO_TCPV4 1
#define TSO_MSS 1448
#define TSO_MAX (14 + 65535)
#define ETH_MIN 60
#define ETH_MAX 1514
#define MAX_QSIZE 1024
#define ETHERTYPE_IP 0x0800
#define ETHERTYPE_ARP 0x0806
#define ETHERTYPE_LOCAL 0x88B5
#define ICMP_ID 0x4758
#define MAX_SAMPLES (1u << 20)

static struct vdev vd;
static struct virtq rxq, txq, ctrlq;
static u16 pair;                   /* the queue pair used (pair=N; 0: no MQ) */
static u8 *rxbufs, *txbufs;
static u16 qsize;
static u16 tx_free_head[MAX_QSIZE]; /* stack of free TX descriptor slots */
static u32 tx_nfree;
static u8 my_mac[6], peer_mac[6];
static u8 my_ip[4], peer_ip[4];
static bool have_peer_mac;
static bool event_idx;
static bool intx;                  /* RX completions announced by INTx (see the file comment) */
#define VEC_INTX 0x41
static u64 intx_isr_queue, intx_isr_config, intx_isr_zero;
static u32 tx_buf = TX_BUF_SMALL;
/* counters */
static u64 rx_frames, tx_frames, tx_completed, arp_answered, bad_num_buffers, bad_rx_len, other_frames;

/* ---- byte order and checksums ---- */
static inline u16 be16(u16 v) { return (u16)((v << 8) | (v >> 8)); }
static inline void put_be16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static inline u16 get_be16(const u8 *p) { return (u16)((p[0] << 8) | p[1]); }

static u16 inet_csum(const u8 *p, u32 n)
{
    u64 s = 0;
    for (u32 i = 0; i + 1 < n; i += 2)
        s += get_be16(p + i);
    if (n & 1)
        s += (u64)p[n - 1] << 8;
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return (u16)~s;
}

static bool parse_ip(const char *s, u8 out[4])
{
    for (int i = 0; i < 4; i++) {
        u32 v = 0, digits = 0;
        while (*s >= '0' && *s <= '9') {
            v = v * 10 + (u32)(*s++ - '0');
            digits++;
        }
        if (!digits || v > 255 || (i < 3 && *s++ != '.'))
            return false;
        out[i] = (u8)v;
    }
    return *s == 0;
}

/* ---- queues ---- */
static void used_event_ahead(struct virtq *vq)
{
    /* polled completions: ask for an interrupt only ~32K completions from now, and move it along;
     * intx: an RX interrupt at the next completion */
    if (event_idx)
        *virtq_used_event(vq) = (u16)(vq->last_used + (intx && vq == &rxq ? 0 : 0x7FFF));
}

/* INTx handler (ring 0, before the EOI): the ISR read clears the condition and drops the line */
static void intx_ack(void)
{
    u8 isr = mmio_r8(vd.isr);
    if (isr & 1)
        intx_isr_queue++;
    if (isr & 2)
        intx_isr_config++;
    if (!isr)
        intx_isr_zero++;
}

/* MSI-X stays off; the INTx line of the function is routed to VEC_INTX and enabled */
static bool intx_setup(void)
{
    u8 gsi = pci_cfg_read8(&vd.pci, 0x3C);
    if (!gsi || gsi >= 24 || !pci_cfg_read8(&vd.pci, 0x3D))
        return false;
    ioapic_route_level(gsi, VEC_INTX, intx_ack);
    lapic_timer_periodic_ns(10000000ULL); /* watchdog: a lost interrupt costs 10 ms, not a hang */
    pci_cfg_write16(&vd.pci, PCI_COMMAND, pci_cfg_read16(&vd.pci, PCI_COMMAND) & ~PCI_CMD_INTX_DISABLE);
    return true;
}

static void rx_post(u16 id)
{
    rxq.desc[id].addr = (u64)(uptr)(rxbufs + (u64)id * RX_BUF);
    rxq.desc[id].len = RX_BUF;
    rxq.desc[id].flags = VRING_DESC_F_WRITE;
    rxq.avail->ring[rxq.avail_idx % qsize] = id;
    rxq.avail_idx++;
}

static void tx_reclaim(void)
{
    u16 idx = virtq_used_idx(&txq);
    while (txq.last_used != idx) {
        barrier();
        u16 id = (u16)txq.used->ring[txq.last_used % qsize].id;
        txq.last_used++;
        tx_completed++;
        if (id < qsize && tx_nfree < qsize)
            tx_free_head[tx_nfree++] = id;
    }
    used_event_ahead(&txq);
}

/* a TX slot's frame area (after the header); NULL if the ring is full */
static u8 *tx_slot(u16 *id)
{
    if (!tx_nfree)
        tx_reclaim();
    if (!tx_nfree)
        return NULL;
    *id = tx_free_head[--tx_nfree];
    u8 *b = txbufs + (u64)*id * tx_buf;
    memset(b, 0, HDR_LEN); /* flags 0, GSO_NONE, num_buffers 0 */
    return b + HDR_LEN;
}

static void tx_queue(u16 id, u32 frame_len, bool kick)
{
    txq.desc[id].addr = (u64)(uptr)(txbufs + (u64)id * tx_buf);
    txq.desc[id].len = HDR_LEN + frame_len;
    txq.desc[id].flags = 0;
    txq.avail->ring[txq.avail_idx % qsize] = id;
    txq.avail_idx++;
    tx_frames++;
    if (kick)
        virtq_kick(&txq);
}

/* next received frame (pointer after the header) or NULL; *id to recycle with rx_done */
static u8 *rx_next(u32 *len, u16 *id)
{
    if (rxq.last_used == virtq_used_idx(&rxq))
        return NULL;
    barrier();
    struct vring_used_elem e = rxq.used->ring[rxq.last_used % qsize];
    rxq.last_used++;
    used_event_ahead(&rxq);
    *id = (u16)e.id;
    if (e.id >= qsize || e.len <= HDR_LEN || e.len > RX_BUF) {
        bad_rx_len++;
        if (e.id < qsize)
            rx_post((u16)e.id);
        return NULL;
    }
    u8 *b = rxbufs + (u64)e.id * RX_BUF;
    /* the device fills num_buffers whatever was negotiated; our buffers always hold a frame */
    if (b[10] != 1 || b[11] != 0)
        bad_num_buffers++;
    rx_frames++;
    *len = e.len - HDR_LEN;
    return b + HDR_LEN;
}

static void rx_done(u16 id)
{
    rx_post(id);
    /* the device holds plenty of buffers: publish recycled ones in batches of a quarter ring */
    if ((u16)(rxq.avail_idx - rxq.kicked_idx) >= qsize / 4)
        virtq_kick(&rxq);
}

/* ---- frames ---- */
static u32 build_eth(u8 *f, const u8 *dst, u16 type)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, my_mac, 6);
    put_be16(f + 12, type);
    return 14;
}

static bool send_arp(u16 op, const u8 *dst_mac, const u8 *target_mac, const u8 *target_ip)
{
    u16 id;
    u8 *f = tx_slot(&id);
    if (!f)
        return false;
    u32 n = build_eth(f, dst_mac, ETHERTYPE_ARP);
    u8 *a = f + n;
    put_be16(a, 1);
    put_be16(a + 2, ETHERTYPE_IP);
    a[4] = 6;
    a[5] = 4;
    put_be16(a + 6, op);
    memcpy(a + 8, my_mac, 6);
    memcpy(a + 14, my_ip, 4);
    memcpy(a + 18, target_mac, 6);
    memcpy(a + 24, target_ip, 4);
    memset(a + 28, 0, ETH_MIN - n - 28);
    tx_queue(id, ETH_MIN, true);
    return true;
}

static u8 payload_byte(u32 seq, u32 i) { return (u8)(seq * 31 + i * 7 + 1); }

/* ICMP echo request of 'size' frame bytes, sequence number 'seq' */
static bool send_echo(u32 seq, u32 size, bool kick)
{
    u16 id;
    u8 *f = tx_slot(&id);
    if (!f)
        return false;
    u32 n = build_eth(f, peer_mac, ETHERTYPE_IP);
    u8 *ip = f + n, *icmp = ip + 20;
    u32 plen = size - 14 - 20 - 8;
    ip[0] = 0x45;
    ip[1] = 0;
    put_be16(ip + 2, (u16)(20 + 8 + plen));
    put_be16(ip + 4, (u16)seq);
    put_be16(ip + 6, 0x4000);
    ip[8] = 64;
    ip[9] = 1;
    put_be16(ip + 10, 0);
    memcpy(ip + 12, my_ip, 4);
    memcpy(ip + 16, peer_ip, 4);
    put_be16(ip + 10, inet_csum(ip, 20));
    icmp[0] = 8;
    icmp[1] = 0;
    put_be16(icmp + 2, 0);
    put_be16(icmp + 4, ICMP_ID);
    put_be16(icmp + 6, (u16)seq);
    for (u32 i = 0; i < plen; i++)
        icmp[8 + i] = payload_byte(seq, i);
    put_be16(icmp + 2, inet_csum(icmp, 8 + plen));
    tx_queue(id, size, kick);
    return true;
}

static bool send_raw(u32 seq, u32 size, bool kick)
{
    u16 id;
    u8 *f = tx_slot(&id);
    if (!f)
        return false;
    u32 n = build_eth(f, peer_mac, ETHERTYPE_LOCAL);
    for (u32 i = n; i < size; i++)
        f[i] = payload_byte(seq, i);
    tx_queue(id, size, kick);
    return true;
}

static void put_be32(u8 *p, u32 v)
{
    put_be16(p, (u16)(v >> 16));
    put_be16(p + 2, (u16)v);
}

/* A TCP/IPv4 segment of 'size' frame bytes that the host segments (HOST_TSO4): the virtio header asks
 * for GSO TCPV4 with MSS TSO_MSS and for the TCP checksum (NEEDS_CSUM: the field holds the
 * pseudo-header sum, as Linux's __tcp_v4_send_check leaves it). */
static bool send_tso(u32 seq, u32 size, bool kick)
{
    u16 id;
    u8 *f = tx_slot(&id);
    if (!f)
        return false;
    u8 *h = f - HDR_LEN;
    h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    h[1] = size - 54 > TSO_MSS ? VIRTIO_NET_HDR_GSO_TCPV4 : 0;
    *(u16 *)(h + 2) = 54;                /* hdr_len: Ethernet + IP + TCP */
    *(u16 *)(h + 4) = TSO_MSS;           /* gso_size */
    *(u16 *)(h + 6) = 34;                /* csum_start: the TCP header */
    *(u16 *)(h + 8) = 16;                /* csum_offset: TCP's checksum field */
    u32 n = build_eth(f, peer_mac, ETHERTYPE_IP);
    u8 *ip = f + n, *tcp = ip + 20;
    u32 tcp_len = size - 14 - 20;
    ip[0] = 0x45;
    ip[1] = 0;
    put_be16(ip + 2, (u16)(20 + tcp_len));
    put_be16(ip + 4, (u16)seq);
    put_be16(ip + 6, 0x4000);
    ip[8] = 64;
    ip[9] = 6;
    put_be16(ip + 10, 0);
    memcpy(ip + 12, my_ip, 4);
    memcpy(ip + 16, peer_ip, 4);
    put_be16(ip + 10, inet_csum(ip, 20));
    put_be16(tcp, 40000);
    put_be16(tcp + 2, 9);                /* discard: the host answers with a reset, or nothing */
    put_be32(tcp + 4, seq * 65536u);
    put_be32(tcp + 8, 0);
    tcp[12] = 5 << 4;
    tcp[13] = 0x18;                      /* PSH | ACK */
    put_be16(tcp + 14, 65535);
    put_be16(tcp + 18, 0);
    for (u32 i = 20; i < tcp_len; i += 64)
        tcp[i] = payload_byte(seq, i);   /* touch the payload (one byte per cache line) */
    u8 pseudo[12];
    memcpy(pseudo, my_ip, 4);
    memcpy(pseudo + 4, peer_ip, 4);
    pseudo[8] = 0;
    pseudo[9] = 6;
    put_be16(pseudo + 10, (u16)tcp_len);
    put_be16(tcp + 16, (u16)~inet_csum(pseudo, 12));
    tx_queue(id, size, kick);
    return true;
}

enum rx_kind { RX_NONE, RX_ARP_REPLY, RX_ECHO_REPLY, RX_OTHER };

/* classify one frame; answers ARP requests for our address.  For an echo reply: *seq and whether
 * the payload matches (*ok). */
static enum rx_kind rx_handle(const u8 *f, u32 len, u32 *seq, bool *ok)
{
    if (len < 14)
        return RX_OTHER;
    u16 type = get_be16(f + 12);
    if (type == ETHERTYPE_ARP && len >= 42) {
        const u8 *a = f + 14;
        u16 op = get_be16(a + 6);
        if (op == 2 && !memcmp(a + 14, peer_ip, 4)) {
            memcpy(peer_mac, a + 8, 6);
            have_peer_mac = true;
            return RX_ARP_REPLY;
        }
        if (op == 1 && !memcmp(a + 24, my_ip, 4)) {
            u8 mac[6], ip[4];
            memcpy(mac, a + 8, 6);
            memcpy(ip, a + 14, 4);
            if (send_arp(2, mac, mac, ip))
                arp_answered++;
        }
        return RX_OTHER;
    }
    if (type == ETHERTYPE_IP && len >= 14 + 20 + 8) {
        const u8 *ip = f + 14;
        u32 ihl = (ip[0] & 0xF) * 4u;
        u32 total = get_be16(ip + 2);
        if (ip[9] != 1 || ihl < 20 || total < ihl + 8 || 14 + total > len || memcmp(ip + 12, peer_ip, 4))
            return RX_OTHER;
        const u8 *icmp = ip + ihl;
        if (icmp[0] != 0 || get_be16(icmp + 4) != ICMP_ID)
            return RX_OTHER;
        *seq = get_be16(icmp + 6);
        u32 plen = total - ihl - 8;
        bool good = inet_csum(icmp, total - ihl) == 0;
        for (u32 i = 0; i < plen && good; i++)
            good = icmp[8 + i] == payload_byte(*seq, i);
        *ok = good;
        return RX_ECHO_REPLY;
    }
    other_frames++;
    return RX_OTHER;
}

/* poll RX once: handle at most one frame */
static enum rx_kind rx_poll(u32 *seq, bool *ok)
{
    u32 len;
    u16 id;
    u8 *f = rx_next(&len, &id);
    if (!f)
        return RX_NONE;
    enum rx_kind k = rx_handle(f, len, seq, ok);
    rx_done(id);
    return k;
}

/* ---- result line ---- */
static void mac_str(char *buf, const u8 *m)
{
    snprintf(buf, 18, "%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
}

static noreturn void fail_json(const char *test, const char *msg)
{
    json_begin("net");
    json_str("test", test);
    json_str("error", msg);
    json_end();
    gk_exit(EXIT_FAIL);
}

/* VQ_PAIRS_SET n on the control queue: class, command, le16 pairs; the device's ack byte must be OK (0) */
static bool set_pairs(u16 n)
{
    u8 *cmd = heap_alloc(8, 8);
    cmd[0] = VIRTIO_NET_CTRL_MQ;
    cmd[1] = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET;
    cmd[2] = (u8)n;
    cmd[3] = (u8)(n >> 8);
    cmd[4] = 0xFF;   /* the ack, written by the device */
    ctrlq.desc[0].addr = (u64)(uptr)cmd;
    ctrlq.desc[0].len = 4;
    ctrlq.desc[0].flags = VRING_DESC_F_NEXT;
    ctrlq.desc[0].next = 1;
    ctrlq.desc[1].addr = (u64)(uptr)(cmd + 4);
    ctrlq.desc[1].len = 1;
    ctrlq.desc[1].flags = VRING_DESC_F_WRITE;
    ctrlq.avail->ring[0] = 0;
    ctrlq.avail_idx = 1;
    virtq_kick(&ctrlq);
    u64 t0 = rdtsc(), limit = ns_to_tsc(2000000000ULL);
    while (virtq_used_idx(&ctrlq) != 1)
        if (rdtsc() - t0 > limit)
            return false;
    barrier();
    return *(volatile u8 *)(cmd + 4) == 0;
}

static bool net_init(u32 want_qsize, bool want_mrg, bool want_event_idx, bool tso)
{
    u64 want = (1ULL << VIRTIO_F_VERSION_1) | (1ULL << VIRTIO_NET_F_MAC) | (1ULL << VIRTIO_NET_F_STATUS);
    u64 mq = (1ULL << VIRTIO_NET_F_CTRL_VQ) | (1ULL << VIRTIO_NET_F_MQ);
    if (pair)
        want |= mq;
    if (tso)
        want |= (1ULL << VIRTIO_NET_F_CSUM) | (1ULL << VIRTIO_NET_F_HOST_TSO4);
    if (want_mrg)
        want |= 1ULL << VIRTIO_NET_F_MRG_RXBUF;
    if (want_event_idx)
        want |= 1ULL << VIRTIO_F_EVENT_IDX;
    if (!vdev_negotiate(&vd, want, 1ULL << VIRTIO_F_VERSION_1))
        return false;
    if (tso && (vd.features & want) != want)
        return false;
    u16 max_pairs = 1;
    if (pair) {
        if ((vd.features & mq) != mq)
            return false;
        max_pairs = vdev_cfg_read16(&vd, 8);
        if (pair >= max_pairs)
            return false;
    }
    event_idx = (vd.features >> VIRTIO_F_EVENT_IDX) & 1;
    if ((vd.features >> VIRTIO_NET_F_MAC) & 1) {
        for (u32 i = 0; i < 6; i++)
            my_mac[i] = vdev_cfg_read8(&vd, i);
    } else {
        static const u8 def[6] = {0x52, 0x54, 0x00, 0x47, 0x4b, 0x01};
        memcpy(my_mac, def, 6);
    }
    u16 max = vdev_max_queue_size(&vd, 2 * pair);
    u16 max1 = vdev_max_queue_size(&vd, 2 * pair + 1);
    qsize = (u16)MIN(MIN(want_qsize, (u32)max), (u32)max1);
    if (!qsize || qsize & (qsize - 1))
        return false;
    if (vd.pci.msix_n)
        vdev_set_config_vector(&vd, VIRTIO_MSI_NO_VECTOR);
    virtq_setup(&vd, &rxq, 2 * pair, qsize, VIRTIO_MSI_NO_VECTOR, event_idx);
    virtq_setup(&vd, &txq, 2 * pair + 1, qsize, VIRTIO_MSI_NO_VECTOR, event_idx);
    if (pair)
        virtq_setup(&vd, &ctrlq, 2 * max_pairs, 2, VIRTIO_MSI_NO_VECTOR, false);
    if (!event_idx) {
        rxq.avail->flags = intx ? 0 : VRING_AVAIL_F_NO_INTERRUPT;
        txq.avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
    }
    used_event_ahead(&rxq);
    used_event_ahead(&txq);
    if (!rxbufs) {
        rxbufs = heap_alloc((u64)MAX_QSIZE * RX_BUF, 4096);
        txbufs = heap_alloc((u64)qsize * tx_buf, 4096);
    }
    for (u16 i = 0; i < qsize; i++)
        rx_post(i);
    tx_nfree = 0;
    for (u16 i = qsize; i > 0; i--)
        tx_free_head[tx_nfree++] = (u16)(i - 1);
    vdev_driver_ok(&vd);
    if (vdev_status(&vd) & (VIRTIO_S_NEEDS_RESET | VIRTIO_S_FAILED))
        return false;
    if (pair && !set_pairs(pair + 1))
        return false;
    virtq_kick(&rxq);
    return true;
}

void app_net(void)
{
    static const char *const keys[] = {"test", "n", "warmup", "size", "qd", "ip", "peer", "qsize", "mrg", "tso",
                                       "event_idx", "timeout_ms", "max_timeouts", "index", "bar_window",
                                       "intx", "pair", NULL};
    args_allow(keys);
    const char *test = arg_str("test", "rr");
    bool rr = !strcmp(test, "rr"), flood = !strcmp(test, "flood"), tx_only = !strcmp(test, "tx");
    if (!rr && !flood && !tx_only)
        usage_error("test must be rr, flood or tx");
    u64 n = arg_u64("n", 1000), warmup = arg_u64("warmup", 10);
    bool tso = arg_u64("tso", 0) != 0;
    if (tso && !tx_only)
        usage_error("tso=1 needs test=tx");
    u64 size = arg_u64("size", tso ? TSO_MAX : 64);
    if (size < ETH_MIN || size > (tso ? TSO_MAX : ETH_MAX))
        usage_error("size must be %u..%u frame bytes", ETH_MIN, tso ? TSO_MAX : ETH_MAX);
    if (tso) {
        if (size < 54 + 1)
            usage_error("tso=1: size must leave TCP payload");
        tx_buf = TX_BUF_TSO;
    }
    intx = arg_u64("intx", 0) != 0;
    if (intx && !rr)
        usage_error("intx=1 needs test=rr");
    u64 qd = arg_u64("qd", flood ? 32 : 1);
    u64 want_qsize = arg_u64("qsize", 256);
    if (!want_qsize || want_qsize > MAX_QSIZE || want_qsize & (want_qsize - 1))
        usage_error("qsize must be a power of two <= %u", MAX_QSIZE);
    if (qd < 1 || qd > want_qsize / 2)
        usage_error("qd must be 1..qsize/2");
    if (n < 1 || n > 0xFFFFFFFFULL)
        usage_error("n must be >= 1");
    if (!parse_ip(arg_str("ip", "10.0.0.2"), my_ip) || !parse_ip(arg_str("peer", "10.0.0.1"), peer_ip))
        usage_error("ip= and peer= are dotted IPv4 addresses");
    u64 timeout = ns_to_tsc(arg_u64("timeout_ms", 2000) * 1000000ULL);
    u64 max_timeouts = arg_u64("max_timeouts", 3);
    pci_bar_window = arg_hex("bar_window", pci_bar_window);
    u64 want_pair = arg_u64("pair", 0);
    if (want_pair > 0x7FFF)
        usage_error("pair must be 0..32767");
    pair = (u16)want_pair;

    if (!vdev_probe(&vd, VIRTIO_ID_NET_MODERN, (u32)arg_u64("index", 0)))
        fail_json(test, "no virtio-net (1af4:1041) device on PCI bus 0");
    if (intx && !intx_setup())
        fail_json(test, "intx=1: the function has no INTx line (interrupt pin/line)");
    if (!net_init((u32)want_qsize, arg_u64("mrg", 1) != 0, arg_u64("event_idx", 1) != 0, tso))
        fail_json(test, tso ? "virtio-net initialisation failed (CSUM + HOST_TSO4 not offered?)"
                            : "virtio-net initialisation failed (features or queues refused)");
    u16 status = ((vd.features >> VIRTIO_NET_F_STATUS) & 1) ? vdev_cfg_read16(&vd, 6) : VIRTIO_NET_S_LINK_UP;
    printf("guestkit: virtio-net %02x:%02x.%x features=%#llx qsize=%u status=%u\n", vd.pci.bus, vd.pci.dev,
           vd.pci.fn, vd.features, qsize, status);

    /* resolve the peer's MAC (and let it learn ours) */
    u32 seq;
    bool ok;
    /* retransmit every 200 ms: a host that just attached the TAP drops what it sends until its link
     * watcher has run (up to a second) */
    u64 arp_every = ns_to_tsc(200000000ULL);
    for (u32 attempt = 0; attempt < 25 && !have_peer_mac; attempt++) {
        if (!send_arp(1, (const u8 *)"\xff\xff\xff\xff\xff\xff", (const u8 *)"\0\0\0\0\0\0", peer_ip))
            fail_json(test, "TX ring full before the first frame");
        u64 t0 = rdtsc();
        while (!have_peer_mac && rdtsc() - t0 < arp_every)
            if (rx_poll(&seq, &ok) == RX_NONE)
                cpu_pause();
    }
    if (!have_peer_mac)
        fail_json(test, "no ARP reply from the peer");

    /* every frame sent so far (ARP) is completed before the measurement starts */
    for (u64 t0 = rdtsc(); tx_nfree < qsize && rdtsc() - t0 < timeout;)
        tx_reclaim();
    u64 *samples = NULL, nsamples = 0;
    if (rr)
        samples = heap_alloc(8 * MIN(n, (u64)MAX_SAMPLES), 8);
    u64 errors = 0, timeouts = 0, done = 0, lat_sum = 0, lat_min = ~0ULL, lat_max = 0;
    u64 notifies0 = rxq.notifies + txq.notifies;
    u64 t_start = 0, t_end;
    bool aborted = false;
    if (rr) {
        for (u64 i = 0; i < warmup + n; i++) {
            if (i == warmup) {
                bench_mark(BENCH_MARK_START);
                t_start = rdtsc();
                notifies0 = rxq.notifies + txq.notifies;
            }
            u16 s = (u16)i;
            u64 t0 = rdtsc();
            if (!send_echo(s, (u32)size, true)) {
                errors++;
                continue;
            }
            bool got = false;
            for (;;) {
                enum rx_kind k = rx_poll(&seq, &ok);
                if (k == RX_ECHO_REPLY && (u16)seq == s) {
                    got = true;
                    break;
                }
                if (k == RX_NONE) {
                    if (rdtsc() - t0 > timeout)
                        break;
                    if (intx) {
                        /* sleep until the INTx (or the watchdog tick): flag cleared, ring re-checked */
                        irq_flag = 0;
                        if (rxq.last_used == virtq_used_idx(&rxq))
                            wait_for_irq(&irq_flag);
                    } else {
                        cpu_pause();
                    }
                }
            }
            u64 dt = rdtsc() - t0;
            if (!got) {
                timeouts++;
                if (max_timeouts && timeouts >= max_timeouts) {
                    aborted = true;
                    break;
                }
                continue;
            }
            if (!ok)
                errors++;
            if (i >= warmup) {
                done++;
                if (nsamples < MAX_SAMPLES)
                    samples[nsamples++] = dt;
                lat_sum += dt;
                lat_min = MIN(lat_min, dt);
                lat_max = MAX(lat_max, dt);
            }
        }
    } else {
        /* flood: keep qd echoes in flight; tx: send n frames as fast as the ring allows */
        bench_mark(BENCH_MARK_START);
        t_start = rdtsc();
        u64 sent = 0, inflight = 0, last_progress = rdtsc(), completed0 = tx_completed;
        while (done < n) {
            bool progress = false;
            if (tx_only) {
                while (sent < n && (tso ? send_tso((u32)sent, (u32)size, false)
                                        : send_raw((u32)sent, (u32)size, false))) {
                    sent++;
                    progress = true;
                }
                virtq_kick(&txq);
                tx_reclaim();
                if (tx_completed - completed0 != done)
                    progress = true;
                done = tx_completed - completed0;
            } else {
                bool queued = false;
                while (inflight < qd && sent < n && send_echo((u32)sent, (u32)size, false)) {
                    sent++;
                    inflight++;
                    queued = true;
                }
                if (queued)
                    virtq_kick(&txq);
                enum rx_kind k;
                while ((k = rx_poll(&seq, &ok)) != RX_NONE) {
                    if (k == RX_ECHO_REPLY) {
                        done++;
                        if (inflight)
                            inflight--;
                        if (!ok)
                            errors++;
                        progress = true;
                    }
                }
                tx_reclaim();
            }
            if (progress) {
                last_progress = rdtsc();
            } else if (rdtsc() - last_progress > timeout) {
                /* lost frames (the host may drop under load): count them and refill the window */
                timeouts += inflight ? inflight : 1;
                inflight = 0;
                last_progress = rdtsc();
                if (sent >= n || (max_timeouts && timeouts >= max_timeouts * qd)) {
                    aborted = sent < n || done < n;
                    break;
                }
            } else {
                cpu_pause();
            }
        }
    }
    t_end = rdtsc();
    bench_mark(BENCH_MARK_END);
    u64 ens = tsc_to_ns(t_end - t_start);
    if (rr)
        sort_u64(samples, nsamples);
    char mb[18], pb[18];
    mac_str(mb, my_mac);
    mac_str(pb, peer_mac);
    json_begin("net");
    json_str("test", test);
    json_u64("size", size);
    json_u64("tso", tso);
    json_u64("qd", qd);
    json_u64("ops", done);
    json_u64("errors", errors);
    json_u64("timeouts", timeouts);
    json_u64("elapsed_us", ens / 1000);
    json_u64("pps", ens ? done * 1000000000ULL / ens : 0);
    json_u64("mbit_s", ens ? done * size * 8000ULL / ens : 0);
    if (rr) {
        json_u64("p50_ns", tsc_to_ns(percentile_sorted(samples, nsamples, 500)));
        json_u64("p99_ns", tsc_to_ns(percentile_sorted(samples, nsamples, 990)));
        json_u64("mean_ns", done ? tsc_to_ns(lat_sum) / done : 0);
        json_u64("min_ns", done ? tsc_to_ns(lat_min) : 0);
        json_u64("max_ns", tsc_to_ns(lat_max));
    }
    json_u64("rx_frames", rx_frames);
    json_u64("tx_frames", tx_frames);
    json_u64("notifies", rxq.notifies + txq.notifies - notifies0);
    json_u64("arp_answered", arp_answered);
    json_u64("bad_num_buffers", bad_num_buffers);
    json_u64("bad_rx_len", bad_rx_len);
    json_u64("other_frames", other_frames);
    json_u64("event_idx", event_idx);
    json_u64("mrg_rxbuf", (vd.features >> VIRTIO_NET_F_MRG_RXBUF) & 1);
    json_u64("queue_size", qsize);
    json_u64("pair", pair);
    json_u64("link_up", status & VIRTIO_NET_S_LINK_UP);
    json_str("mac", mb);
    json_str("peer_mac", pb);
    json_hex("features", vd.features);
    json_u64("tsc_khz", tsc_khz);
    if (intx) {
        json_u64("intx_irqs", irq_counts[VEC_INTX]);
        json_u64("isr_queue", intx_isr_queue);
        json_u64("isr_config", intx_isr_config);
        json_u64("isr_zero", intx_isr_zero);
        json_u64("watchdog_ticks", timer_ticks);
    }
    if (aborted)
        json_u64("aborted", 1);
    json_end();
    bool good = !errors && !timeouts && !aborted && !bad_num_buffers && !bad_rx_len && done == n;
    gk_exit(good ? EXIT_OK : EXIT_FAIL);
}
