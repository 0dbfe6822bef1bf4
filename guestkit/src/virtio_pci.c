/* guestkit: modern virtio-pci transport (VIRTIO 1.2 section 4.1) */
#include "virtio.h"

bool vdev_probe(struct vdev *vd, u16 pci_device_id, u32 index)
{
    memset(vd, 0, sizeof(*vd));
    if (!pci_find(0x1af4, pci_device_id, index, &vd->pci))
        return false;
    struct pci_dev *d = &vd->pci;
    pci_enable(d);
    /* walk the vendor-specific capabilities; take the first of each type */
    for (u16 cap = pci_find_cap(d, PCI_CAP_ID_VNDR, 0); cap; cap = pci_find_cap(d, PCI_CAP_ID_VNDR, cap)) {
        u8 cfg_type = pci_cfg_read8(d, cap + 3);
        u8 bar = pci_cfg_read8(d, cap + 4);
        u32 off = pci_cfg_read32(d, cap + 8);
        u32 len = pci_cfg_read32(d, cap + 12);
        if (bar > 5)
            continue; /* reserved BAR values are to be ignored */
        uptr *slot = NULL;
        switch (cfg_type) {
        case VIRTIO_PCI_CAP_COMMON_CFG: slot = &vd->common; break;
        case VIRTIO_PCI_CAP_NOTIFY_CFG: slot = &vd->notify; break;
        case VIRTIO_PCI_CAP_ISR_CFG: slot = &vd->isr; break;
        case VIRTIO_PCI_CAP_DEVICE_CFG: slot = &vd->devcfg; break;
        default: continue;
        }
        if (*slot)
            continue;
        u64 base = pci_bar_addr(d, bar);
        if (d->bar_io[bar])
            continue; /* we only drive memory BARs */
        *slot = (uptr)(base + off);
        if (cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG)
            vd->notify_mult = pci_cfg_read32(d, cap + 16);
        if (cfg_type == VIRTIO_PCI_CAP_DEVICE_CFG)
            vd->devcfg_len = len;
    }
    if (!vd->common || !vd->notify || !vd->devcfg)
        panic("virtio %02x:%02x.%x: missing common/notify/device capability", d->bus, d->dev, d->fn);
    pci_enable(d); /* BARs may have been (re)assigned above */
    vd->num_queues = mmio_r16(vd->common + VPC_NUM_QUEUES);
    return true;
}

u8 vdev_status(struct vdev *vd) { return mmio_r8(vd->common + VPC_STATUS); }

static void set_status(struct vdev *vd, u8 s) { mmio_w8(vd->common + VPC_STATUS, s); }

void vdev_reset(struct vdev *vd)
{
    set_status(vd, 0);
    u64 t0 = rdtsc(), lim = ns_to_tsc(1000000000ULL);
    while (vdev_status(vd) != 0) {
        if (rdtsc() - t0 > lim)
            panic("virtio: device did not complete reset");
        cpu_pause();
    }
}

bool vdev_negotiate(struct vdev *vd, u64 want, u64 need)
{
    vdev_reset(vd);
    set_status(vd, VIRTIO_S_ACKNOWLEDGE);
    set_status(vd, VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER);
    mmio_w32(vd->common + VPC_DFSELECT, 0);
    u64 f = mmio_r32(vd->common + VPC_DF);
    mmio_w32(vd->common + VPC_DFSELECT, 1);
    f |= (u64)mmio_r32(vd->common + VPC_DF) << 32;
    vd->dev_features = f;
    if ((f & need) != need) {
        set_status(vd, VIRTIO_S_FAILED);
        return false;
    }
    u64 g = f & (want | need);
    mmio_w32(vd->common + VPC_GFSELECT, 0);
    mmio_w32(vd->common + VPC_GF, (u32)g);
    mmio_w32(vd->common + VPC_GFSELECT, 1);
    mmio_w32(vd->common + VPC_GF, (u32)(g >> 32));
    set_status(vd, VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER | VIRTIO_S_FEATURES_OK);
    if (!(vdev_status(vd) & VIRTIO_S_FEATURES_OK)) {
        set_status(vd, VIRTIO_S_FAILED);
        return false;
    }
    vd->features = g;
    return true;
}

void vdev_driver_ok(struct vdev *vd)
{
    set_status(vd, VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER | VIRTIO_S_FEATURES_OK |
                       VIRTIO_S_DRIVER_OK);
}

bool vdev_set_config_vector(struct vdev *vd, u16 vector)
{
    mmio_w16(vd->common + VPC_MSIX_CONFIG, vector);
    return mmio_r16(vd->common + VPC_MSIX_CONFIG) == vector;
}

u16 vdev_max_queue_size(struct vdev *vd, u16 q)
{
    mmio_w16(vd->common + VPC_Q_SELECT, q);
    return mmio_r16(vd->common + VPC_Q_SIZE);
}

bool virtq_setup(struct vdev *vd, struct virtq *vq, u16 q, u16 size, u16 msix_vector, bool event_idx)
{
    uptr c = vd->common;
    if (!vq->desc || vq->size != size) {
        /* desc: 16-byte aligned, avail: 2, used: 4; page-align each for clarity */
        vq->desc = heap_alloc(16ULL * size, 4096);
        vq->avail = heap_alloc(6 + 2ULL * size, 4096);
        vq->used = heap_alloc(6 + 8ULL * size, 4096);
    } else {
        memset(vq->desc, 0, 16ULL * size);
        memset(vq->avail, 0, 6 + 2ULL * size);
        memset(vq->used, 0, 6 + 8ULL * size);
    }
    vq->index = q;
    vq->size = size;
    vq->avail_idx = vq->kicked_idx = vq->last_used = 0;
    vq->event_idx = event_idx;
    mmio_w16(c + VPC_Q_SELECT, q);
    mmio_w16(c + VPC_Q_SIZE, size);
    mmio_w32(c + VPC_Q_DESCLO, (u32)(uptr)vq->desc);
    mmio_w32(c + VPC_Q_DESCHI, (u32)((u64)(uptr)vq->desc >> 32));
    mmio_w32(c + VPC_Q_AVAILLO, (u32)(uptr)vq->avail);
    mmio_w32(c + VPC_Q_AVAILHI, (u32)((u64)(uptr)vq->avail >> 32));
    mmio_w32(c + VPC_Q_USEDLO, (u32)(uptr)vq->used);
    mmio_w32(c + VPC_Q_USEDHI, (u32)((u64)(uptr)vq->used >> 32));
    mmio_w16(c + VPC_Q_MSIX, msix_vector);
    u16 got = mmio_r16(c + VPC_Q_MSIX);
    vq->msix_vector = got;
    u16 noff = mmio_r16(c + VPC_Q_NOFF);
    vq->notify_addr = vd->notify + (uptr)noff * vd->notify_mult;
    mmio_w16(c + VPC_Q_ENABLE, 1);
    return got == msix_vector;
}

void virtq_kick(struct virtq *vq)
{
    u16 new_idx = vq->avail_idx;
    u16 old = vq->kicked_idx;
    if (new_idx == old)
        return;
    barrier(); /* ring entries before idx (x86 keeps store order) */
    *(volatile u16 *)&vq->avail->idx = new_idx;
    mfence(); /* idx store before reading avail_event / used flags */
    bool need;
    if (vq->event_idx)
        need = vring_need_event(*virtq_avail_event(vq), new_idx, old);
    else
        need = !(*(volatile u16 *)&vq->used->flags & VRING_USED_F_NO_NOTIFY);
    vq->kicked_idx = new_idx;
    if (need) {
        mmio_w16(vq->notify_addr, vq->index);
        vq->notifies++;
    }
}

/* config space reads: retry while config_generation changes */
#define CFG_READ(bits)                                                   \
    u##bits vdev_cfg_read##bits(struct vdev *vd, u32 off)                \
    {                                                                    \
        u8 g0, g1;                                                       \
        u##bits v;                                                       \
        do {                                                             \
            g0 = mmio_r8(vd->common + VPC_CFG_GENERATION);               \
            v = mmio_r##bits(vd->devcfg + off);                          \
            g1 = mmio_r8(vd->common + VPC_CFG_GENERATION);               \
        } while (g0 != g1);                                              \
        return v;                                                        \
    }
CFG_READ(8)
CFG_READ(16)
CFG_READ(32)

u64 vdev_cfg_read64(struct vdev *vd, u32 off)
{
    u8 g0, g1;
    u64 v;
    do {
        g0 = mmio_r8(vd->common + VPC_CFG_GENERATION);
        v = mmio_r32(vd->devcfg + off);
        v |= (u64)mmio_r32(vd->devcfg + off + 4) << 32;
        g1 = mmio_r8(vd->common + VPC_CFG_GENERATION);
    } while (g0 != g1);
    return v;
}
