"""MSI-X: the capability, the vector table and the pending-bit array, delivered through KVM irqfds.

Each vector the guest unmasks gets a KVM MSI route (its address/data) and an
irqfd; firing it is one ``eventfd_write`` from whichever thread completed the
I/O — the vCPU thread, a device thread or a sidecore — with no VM exit.  A
masked vector (per entry, or the whole function) latches its pending bit and
fires when unmasked, as the spec requires.
"""
from __future__ import annotations

import struct
import threading

from ...x86.irq import IrqRouter, MsiVector

CAP_ID_MSIX = 0x11
CTRL_ENABLE, CTRL_MASKALL = 1 << 15, 1 << 14
ENTRY_SIZE = 16
PBA_OFFSET = 0x800
NO_VECTOR = 0xFFFF


class Msix:
    def __init__(self, router: IrqRouter, num_vectors: int, bar: int):
        if not 1 <= num_vectors <= PBA_OFFSET // ENTRY_SIZE:
            raise ValueError(f"MSI-X: {num_vectors} vectors")
        self.router = router
        self.n = num_vectors
        self.bar = bar
        self.table = bytearray(num_vectors * ENTRY_SIZE)
        for i in range(num_vectors):
            struct.pack_into("<I", self.table, i * ENTRY_SIZE + 12, 1)  # masked at reset
        self.pending = [False] * num_vectors
        self.vectors: list[MsiVector | None] = [None] * num_vectors
        self.control = 0
        self.cap_offset = 0
        self._lock = threading.Lock()
        self.fired = 0

    def capability(self) -> tuple[bytes, bytes]:
        """(body, writable mask) for PciDevice.add_capability."""
        body = struct.pack("<HII", self.n - 1, 0 | self.bar, PBA_OFFSET | self.bar)
        writable = struct.pack("<HII", CTRL_ENABLE | CTRL_MASKALL, 0, 0)
        return body, writable

    def control_written(self, control: int) -> None:
        with self._lock:
            self.control = control & (CTRL_ENABLE | CTRL_MASKALL)
            self._deliver_unmasked()

    @property
    def enabled(self) -> bool:
        return bool(self.control & CTRL_ENABLE)

    # -- table BAR (a BusDevice) -----------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            if offset + size <= len(self.table):
                return bytes(self.table[offset:offset + size])
            if PBA_OFFSET <= offset < PBA_OFFSET + 8 * ((self.n + 63) // 64):
                bits = sum(1 << i for i, p in enumerate(self.pending) if p)
                raw = bits.to_bytes(8 * ((self.n + 63) // 64), "little")
                o = offset - PBA_OFFSET
                return raw[o:o + size].ljust(size, b"\0")
            return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        if offset + len(data) > len(self.table) or offset % len(data):
            return  # PBA and beyond are read-only
        with self._lock:
            self.table[offset:offset + len(data)] = data
            self._entry_changed(offset // ENTRY_SIZE)

    def _entry(self, i: int) -> tuple[int, int, bool]:
        lo, hi, data, ctrl = struct.unpack_from("<IIII", self.table, i * ENTRY_SIZE)
        return (hi << 32) | lo, data, bool(ctrl & 1)

    def _entry_changed(self, i: int) -> None:
        address, data, masked = self._entry(i)
        if not masked and address:
            self._vector(i).program(address, data)
            if self.pending[i] and self._deliverable(i):
                self.pending[i] = False
                self.vectors[i].fire()

    def _vector(self, i: int) -> MsiVector:
        if self.vectors[i] is None:
            self.vectors[i] = self.router.allocate_msi()
        return self.vectors[i]

    def _deliverable(self, i: int) -> bool:
        address, _, masked = self._entry(i)
        return self.enabled and not self.control & CTRL_MASKALL and not masked and bool(address)

    def _deliver_unmasked(self) -> None:
        for i in range(self.n):
            if self.pending[i] and self._deliverable(i):
                self._entry_changed(i)

    # -- the device side ----------------------------------------------------
    def irqfd(self, i: int) -> int:
        """The KVM irqfd of vector ``i`` (allocated now if the guest has not programmed it yet), for a
        device whose completions are signalled by another process (``exitless sidecore``).  Writing it
        bypasses masking and the pending bit: the known limit of every such device."""
        return self._vector(i).fd

    def fire(self, i: int) -> bool:
        """Signal vector ``i``; returns False if it had to stay pending (masked, or unprogrammed)."""
        if not 0 <= i < self.n:
            return False
        vec = self.vectors[i]
        if vec is not None and self._deliverable(i):
            vec.fire()
            self.fired += 1
            return True
        with self._lock:
            if vec is not None and self._deliverable(i):
                vec.fire()
                return True
            self.pending[i] = True
            return False
