"""Numbers from the VIRTIO 1.2 specification used by the queue, the devices and the transports.

Feature bits are *bit numbers*; use ``1 << VIRTIO_F_VERSION_1`` to build a mask.
Everything else (status bits, flags, request types) is a value or mask as named.
"""
from __future__ import annotations

# -- device ids (spec §5) ------------------------------------------------------
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_VSOCK = 19

# -- device status field (spec §2.1) ---------------------------------------------
VIRTIO_STATUS_ACKNOWLEDGE = 0x01
VIRTIO_STATUS_DRIVER = 0x02
VIRTIO_STATUS_DRIVER_OK = 0x04
VIRTIO_STATUS_FEATURES_OK = 0x08
VIRTIO_STATUS_DEVICE_NEEDS_RESET = 0x40
VIRTIO_STATUS_FAILED = 0x80

# -- reserved (device-independent) feature bits (spec §6) --------------------------
VIRTIO_F_RING_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33  # never offered: the device sees guest-physical addresses
VIRTIO_F_RING_PACKED = 34      # not implemented (split rings only)
VIRTIO_F_IN_ORDER = 35         # not offered
VIRTIO_F_ORDER_PLATFORM = 36   # not offered
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_RING_RESET = 40

# Short aliases with the names the Linux headers use.
VIRTIO_RING_F_INDIRECT_DESC = VIRTIO_F_RING_INDIRECT_DESC
VIRTIO_RING_F_EVENT_IDX = VIRTIO_F_RING_EVENT_IDX

# -- split virtqueue (spec §2.7) -------------------------------------------------
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_DESC_SIZE = 16
VIRTQ_USED_ELEM_SIZE = 8

VRING_AVAIL_F_NO_INTERRUPT = 1   # avail.flags, written by the driver (without EVENT_IDX)
VRING_USED_F_NO_NOTIFY = 1       # used.flags, written by the device (without EVENT_IDX)
VIRTQ_AVAIL_F_NO_INTERRUPT = VRING_AVAIL_F_NO_INTERRUPT
VIRTQ_USED_F_NO_NOTIFY = VRING_USED_F_NO_NOTIFY

VIRTQ_MAX_SIZE = 32768
VIRTQ_DESC_ALIGN = 16
VIRTQ_AVAIL_ALIGN = 2
VIRTQ_USED_ALIGN = 4

# -- block device (spec §5.2) ------------------------------------------------------
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
VIRTIO_BLK_F_LIFETIME = 15
VIRTIO_BLK_F_SECURE_ERASE = 16
VIRTIO_BLK_F_ZONED = 17

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_SECTOR_SIZE = 512
VIRTIO_BLK_ID_BYTES = 20
VIRTIO_BLK_REQ_HDR_SIZE = 16          # le32 type, le32 reserved, le64 sector
VIRTIO_BLK_DISCARD_SEG_SIZE = 16      # le64 sector, le32 num_sectors, le32 flags
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
