"""The data structures the controller returns: Identify (NVMe 1.4 §5.15) and log pages (§5.14.1).

Pure functions of the namespace and a few controller constants; each returns
the structure's bytes (4 KiB for Identify, the log page's size for logs).
"""
from __future__ import annotations

import struct

from . import constants as K
from .namespace import Namespace


def identify_controller(ns: Namespace, *, mdts: int, acl: int, aerl: int) -> bytes:
    """Identify Controller (CNS 01h): OACS bit 8 (Doorbell Buffer Config), ONCS DSM + Write Zeroes, VWC."""
    d = bytearray(K.PAGE_SIZE)
    struct.pack_into("<HH", d, 0x00, K.PCI_VENDOR_REDHAT, K.PCI_VENDOR_REDHAT)   # VID, SSVID
    d[0x04:0x18] = ns.serial.encode().ljust(20)[:20]     # SN
    d[0x18:0x40] = b"exitless NVMe".ljust(40)            # MN
    d[0x40:0x48] = b"1.0".ljust(8)                       # FR
    d[0x48] = 6                                          # RAB
    d[0x4D] = mdts
    struct.pack_into("<HI", d, 0x4E, 0, K.VS_1_4)        # CNTLID, VER
    struct.pack_into("<H", d, 0x100, K.OACS_DBBUF)       # OACS
    d[0x102], d[0x103] = acl, aerl
    d[0x104] = 0x03                                      # FRMW: slot 1 read-only, one slot
    d[0x106] = 0                                         # ELPE: one error log entry
    struct.pack_into("<HH", d, 0x10C, 0x157, 0x175)      # WCTEMP, CCTEMP (kelvin)
    d[0x200], d[0x201] = K.SQES_LOG2 << 4 | K.SQES_LOG2, K.CQES_LOG2 << 4 | K.CQES_LOG2
    struct.pack_into("<HI", d, 0x202, 0, 1)              # MAXCMD, NN
    struct.pack_into("<H", d, 0x208, K.ONCS_DSM | K.ONCS_WRITE_ZEROES)
    d[0x20C] = 1                                         # VWC: a volatile write cache (the host page cache)
    d[0x300:0x400] = f"nqn.2026-11.io.exitless:nvme:{ns.serial}".encode().ljust(256, b"\0")   # SUBNQN
    struct.pack_into("<H", d, 0x800, 2500)               # power state 0: 25 W (centiwatts)
    return bytes(d)


def identify_namespace(ns: Namespace) -> bytes:
    """Identify Namespace (CNS 00h) of namespace 1: one LBA format, NGUID/EUI64, NSATTR write protect."""
    d = bytearray(K.PAGE_SIZE)
    struct.pack_into("<QQQ", d, 0, ns.nsze, ns.nsze, ns.nsze)   # NSZE, NCAP, NUSE
    d[0x19], d[0x1A] = 0, 0                              # NLBAF (0's based), FLBAS
    d[0x21] = 0x09                                       # DLFEAT: deallocated reads zero; WZ may deallocate
    d[0x63] = 1 if ns.read_only else 0                   # NSATTR bit 0: write protected
    d[0x68:0x78] = ns.nguid
    d[0x78:0x80] = ns.eui64
    struct.pack_into("<I", d, 0x80, (ns.lba_size.bit_length() - 1) << 16)   # LBAF0: LBADS
    return bytes(d)


def ns_id_descriptors(ns: Namespace) -> bytes:
    """Namespace Identification Descriptor list (CNS 03h): the NGUID and a name-based UUID.

    Linux 6.1 skips a namespace whose controller reports VS >= 1.3 and no descriptor."""
    uuid = bytearray(ns.nguid)
    uuid[6] = (uuid[6] & 0x0F) | 0x50                    # version 5 (name-based)
    uuid[8] = (uuid[8] & 0x3F) | 0x80                    # RFC 4122 variant
    return (struct.pack("<BBxx", K.NIDT_NGUID, 16) + ns.nguid +
            struct.pack("<BBxx", K.NIDT_UUID, 16) + bytes(uuid)).ljust(K.PAGE_SIZE, b"\0")


def smart_log(counters: dict[str, int]) -> bytes:
    """SMART / Health Information (log 02h): healthy, 37 °C, the data unit and command counters."""
    page = bytearray(512)
    struct.pack_into("<H", page, 1, 273 + 37)            # composite temperature (kelvin)
    page[3], page[4], page[5] = 100, 10, 0               # available spare, threshold, percentage used
    for i, key in enumerate(("data_units_read", "data_units_written", "host_reads", "host_writes")):
        struct.pack_into("<QQ", page, 32 + 16 * i, counters[key] & (2 ** 64 - 1), counters[key] >> 64)
    return bytes(page)


def firmware_slot_log() -> bytes:
    """Firmware Slot Information (log 03h): slot 1 active, revision "1.0"."""
    page = bytearray(512)
    page[0] = 1                                          # AFI
    page[8:16] = b"1.0".ljust(8)
    return bytes(page)
