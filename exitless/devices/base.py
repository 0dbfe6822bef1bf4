"""Declare a device's registers once; the I/O path decides how each write reaches it.

A device author subclasses ``RegisterDevice``, lists its ``REGISTERS`` and says
which are *doorbells* (hot, written by the driver on every request) and which
are plain control registers.  Control registers always trap to the vCPU's
Python handler.  A doorbell's writes arrive through the path chosen when the
device is attached (see :mod:`exitless.sidecore.paths`): a trapped MMIO write,
an ioeventfd, or a shadow slot in a RAM page shared with a sidecore — the
device code is the same in every case: ``on_doorbell(register, value)``.

Shared page layout (one 4 KiB page per device): doorbell *k* has its shadow
word at ``k*128`` and its EventIdx word at ``k*128 + 64`` (separate cache
lines, so the guest's writes and the sidecore's do not bounce one line); the
device's own response area follows the slots (``shared_area``).
"""
from __future__ import annotations

from dataclasses import dataclass

SLOT_STRIDE = 128
EVENT_IDX_OFFSET = 64
SHARED_PAGE_SIZE = 4096


@dataclass(frozen=True)
class Register:
    name: str
    offset: int
    size: int = 4
    doorbell: bool = False
    readable: bool = True


class RegisterDevice:
    """Base class: a window of MMIO registers plus a page of memory shared with the guest."""

    NAME = "device"
    REGISTERS: tuple[Register, ...] = ()
    MMIO_SIZE = 4096

    def __init__(self):
        self._by_offset = {r.offset: r for r in self.REGISTERS}
        self.shared: memoryview | None = None  # the device's response area in the shared page

    # -- layout ---------------------------------------------------------
    @classmethod
    def doorbells(cls) -> list[Register]:
        return [r for r in cls.REGISTERS if r.doorbell]

    @classmethod
    def shadow_offset(cls, reg: Register) -> int:
        return cls.doorbells().index(reg) * SLOT_STRIDE

    @classmethod
    def event_idx_offset(cls, reg: Register) -> int:
        return cls.shadow_offset(reg) + EVENT_IDX_OFFSET

    @classmethod
    def shared_area_offset(cls) -> int:
        return len(cls.doorbells()) * SLOT_STRIDE

    def attach_shared(self, page: memoryview) -> None:
        """Called once the shared page is mapped (in the VMM or in a sidecore process)."""
        self.shared = page[self.shared_area_offset():]

    # -- what subclasses implement ---------------------------------------
    def on_doorbell(self, reg: Register, value: int) -> None:
        raise NotImplementedError

    def on_write(self, reg: Register, value: int) -> None:
        """A trapped write to a control register."""

    def on_read(self, reg: Register) -> int:
        return 0

    def stats(self) -> dict:
        """Counters reported by benchmarks and by a sidecore process when it stops."""
        return {}

    # -- the trap path (a BusDevice on the MMIO bus) ----------------------
    def read(self, offset: int, size: int) -> bytes:
        reg = self._by_offset.get(offset)
        if reg is None or not reg.readable or size != reg.size:
            return b"\xff" * size
        return self.on_read(reg).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        reg = self._by_offset.get(offset)
        if reg is None or len(data) != reg.size:
            return  # a write to no register, or of the wrong width: ignored as hardware would
        value = int.from_bytes(data, "little")
        if reg.doorbell:
            self.on_doorbell(reg, value)
        else:
            self.on_write(reg, value)


def u32_at(view: memoryview, offset: int) -> int:
    """One 32-bit load from shared memory (aligned ``offset``)."""
    return view[offset:offset + 4].cast("I")[0]


def put_u32(view: memoryview, offset: int, value: int) -> None:
    """One 32-bit store to shared memory: never torn, unlike struct.pack_into (byte by byte)."""
    view[offset:offset + 4].cast("I")[0] = value & 0xFFFFFFFF
