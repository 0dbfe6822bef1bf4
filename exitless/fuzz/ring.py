"""The driver's side of a split virtqueue, just enough for the harnesses' ``check()``: lay out a
ring, offer chains, read the used ring back.  (VIRTIO 1.2 §2.7; little-endian, native x86.)"""
from __future__ import annotations

import struct

from ..devices.virtio.constants import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from ..memory import GuestMemory

_DESC = struct.Struct("<QIHH")


class DriverRing:
    """A ring of ``size`` entries at guest-physical ``base``: descriptors, then avail, then used
    (4-aligned); ``ring_bytes(size)`` bytes in all.  Buffers are the caller's business."""

    def __init__(self, mem: GuestMemory, base: int, size: int, event_idx: bool = False):
        self.mem, self.size, self.event_idx = mem, size, event_idx
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        mem.fill(base, self.ring_bytes(size))
        self.avail_idx = 0
        self.next_desc = 0
        self.last_used = 0

    @staticmethod
    def ring_bytes(size: int) -> int:
        return ((16 * size + 6 + 2 * size + 3) & ~3) + 6 + 8 * size

    def offer(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Make one chain of ``(gpa, length, device_writable)`` available; returns its head."""
        ids = [(self.next_desc + i) % self.size for i in range(len(buffers))]
        self.next_desc = (self.next_desc + len(buffers)) % self.size
        for i, (gpa, length, w) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if w else 0)
            self.mem.write(self.desc + 16 * ids[i], _DESC.pack(gpa, length, flags, 0 if last else ids[i + 1]))
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), ids[0])
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)
        return ids[0]

    def used_elements(self) -> list[tuple[int, int]]:
        """``(head, written)`` of every used element since the last call."""
        out = []
        idx = self.mem.read_u16(self.used + 2)
        while self.last_used != idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            out.append(struct.unpack("<II", self.mem.read(slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out
