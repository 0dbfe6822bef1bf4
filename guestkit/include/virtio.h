/* guestkit: modern virtio-pci transport and split virtqueues (VIRTIO 1.2) */
#ifndef GK_VIRTIO_H
#define GK_VIRTIO_H
#include "pci.h"

/* device status bits (2.1) */
#define VIRTIO_S_ACKNOWLEDGE 1
#define VIRTIO_S_DRIVER 2
#define VIRTIO_S_DRIVER_OK 4
#define VIRTIO_S_FEATURES_OK 8
#define VIRTIO_S_NEEDS_RESET 0x40
#define VIRTIO_S_FAILED 0x80

/* reserved feature bits (6) */
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32

/* virtio_pci_cap cfg_type (4.1.4) */
#define VIRTIO_PCI_CAP_COMMON_CFG 1
#define VIRTIO_PCI_CAP_NOTIFY_CFG 2
#define VIRTIO_PCI_CAP_ISR_CFG 3
#define VIRTIO_PCI_CAP_DEVICE_CFG 4

/* virtio_pci_common_cfg offsets (4.1.4.3) */
#define VPC_DFSELECT 0x00
#define VPC_DF 0x04
#define VPC_GFSELECT 0x08
#define VPC_GF 0x0C
#define VPC_MSIX_CONFIG 0x10
#define VPC_NUM_QUEUES 0x12
#define VPC_STATUS 0x14
#define VPC_CFG_GENERATION 0x15
#define VPC_Q_SELECT 0x16
#define VPC_Q_SIZE 0x18
#define VPC_Q_MSIX 0x1A
#define VPC_Q_ENABLE 0x1C
#define VPC_Q_NOFF 0x1E
#define VPC_Q_DESCLO 0x20
#define VPC_Q_DESCHI 0x24
#define VPC_Q_AVAILLO 0x28
#define VPC_Q_AVAILHI 0x2C
#define VPC_Q_USEDLO 0x30
#define VPC_Q_USEDHI 0x34

#define VIRTIO_MSI_NO_VECTOR 0xFFFF

/* split virtqueue (2.7) */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct vring_avail {
    u16 flags;
    u16 idx;
    u16 ring[]; /* [size], then u16 used_event */
};

struct vring_used_elem {
    u32 id;
    u32 len;
};

struct vring_used {
    u16 flags;
    u16 idx;
    struct vring_used_elem ring[]; /* [size], then u16 avail_event */
};

static inline bool vring_need_event(u16 event_idx, u16 new_idx, u16 old)
{
    return (u16)(new_idx - event_idx - 1) < (u16)(new_idx - old);
}

struct virtq {
    u16 index;
    u16 size;
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uptr notify_addr;
    u16 avail_idx;  /* driver's next avail index (shadow) */
    u16 kicked_idx; /* avail index at the last notification decision */
    u16 last_used;  /* next used index to consume */
    u16 msix_vector;
    bool event_idx;
    u64 notifies;
};

struct vdev {
    struct pci_dev pci;
    uptr common, notify, isr, devcfg;
    u32 notify_mult;
    u32 devcfg_len;
    u64 dev_features;
    u64 features; /* negotiated */
    u16 num_queues;
};

bool vdev_probe(struct vdev *vd, u16 pci_device_id, u32 index);
void vdev_reset(struct vdev *vd);
/* reset, ACK, DRIVER, negotiate (want & offered; 'need' must be offered),
 * FEATURES_OK (checked). Returns false (status FAILED set) on failure. */
bool vdev_negotiate(struct vdev *vd, u64 want, u64 need);
u8 vdev_status(struct vdev *vd);
void vdev_driver_ok(struct vdev *vd);
/* config vector: returns false when the device does not accept it */
bool vdev_set_config_vector(struct vdev *vd, u16 vector);
u16 vdev_max_queue_size(struct vdev *vd, u16 q);
/* allocate (first time) or clear ring memory and program queue q with 'size' entries;
 * msix_vector may be VIRTIO_MSI_NO_VECTOR; returns false if the vector is not accepted */
bool virtq_setup(struct vdev *vd, struct virtq *vq, u16 q, u16 size, u16 msix_vector, bool event_idx);
void virtq_kick(struct virtq *vq); /* publish avail idx and notify if needed */
static inline u16 virtq_used_idx(const struct virtq *vq)
{
    return *(volatile u16 *)&vq->used->idx;
}
static inline volatile u16 *virtq_used_event(struct virtq *vq)
{
    return (volatile u16 *)&vq->avail->ring[vq->size];
}
static inline volatile u16 *virtq_avail_event(struct virtq *vq)
{
    return (volatile u16 *)&vq->used->ring[vq->size];
}
/* device config space reads with config_generation retry */
u32 vdev_cfg_read32(struct vdev *vd, u32 off);
u64 vdev_cfg_read64(struct vdev *vd, u32 off);
u8 vdev_cfg_read8(struct vdev *vd, u32 off);
u16 vdev_cfg_read16(struct vdev *vd, u32 off);

#endif
