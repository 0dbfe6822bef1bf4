"""Address-space buses: the PIO and MMIO ranges that devices claim, and exit dispatch.

A trapped access (KVM_EXIT_IO / KVM_EXIT_MMIO) is routed by address to the device
that claimed the range, as a device on a real address bus "monitors the bus and
responds to accesses of its assigned space".  Lookups read an immutable sorted
snapshot, so vCPU threads never take a lock while devices are added or moved.
"""
from __future__ import annotations

from .errors import ExitlessError
import bisect
import logging
import traceback
import threading
from dataclasses import dataclass
from typing import Protocol

from .exits import GuestStop

log = logging.getLogger(__name__)


class BusDevice(Protocol):
    """What a device on a bus implements; offsets are relative to the range base."""

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class BusError(ExitlessError, ValueError):
    pass


@dataclass(frozen=True)
class Range:
    base: int
    length: int
    device: BusDevice
    name: str

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """A sorted set of non-overlapping ranges; unclaimed reads return all-ones."""

    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self._ranges: tuple[Range, ...] = ()
        self._bases: tuple[int, ...] = ()
        self.unclaimed = 0  # accesses that hit no device (a buggy or probing guest)
        self.device_errors = 0  # device handlers that raised

    def insert(self, base: int, length: int, device: BusDevice, name: str = "") -> Range:
        if length <= 0 or base < 0:
            raise BusError(f"{self.name}: bad range {base:#x}+{length:#x}")
        r = Range(base, length, device, name or type(device).__name__)
        with self._lock:
            for other in self._ranges:
                if other.base < r.end and r.base < other.end:
                    raise BusError(f"{self.name}: {r.name} at {base:#x}+{length:#x} overlaps {other.name} "
                                   f"at {other.base:#x}+{other.length:#x}")
            ranges = tuple(sorted(self._ranges + (r,), key=lambda x: x.base))
            self._ranges, self._bases = ranges, tuple(x.base for x in ranges)
        return r

    def remove(self, base: int) -> None:
        with self._lock:
            ranges = tuple(x for x in self._ranges if x.base != base)
            if len(ranges) == len(self._ranges):
                raise BusError(f"{self.name}: nothing at {base:#x}")
            self._ranges, self._bases = ranges, tuple(x.base for x in ranges)

    def find(self, addr: int) -> Range | None:
        ranges, bases = self._ranges, self._bases
        i = bisect.bisect_right(bases, addr) - 1
        if i >= 0 and addr < ranges[i].end:
            return ranges[i]
        return None

    def read(self, addr: int, size: int) -> bytes:
        r = self.find(addr)
        if r is None or addr + size > r.end:
            self.unclaimed += 1
            return b"\xff" * size
        try:
            data = r.device.read(addr - r.base, size)
        except GuestStop:
            raise
        except Exception:
            self._device_failed(r, "read", addr)
            return b"\xff" * size
        if len(data) != size:
            raise BusError(f"{r.name}.read returned {len(data)} bytes for a {size}-byte access")
        return data

    def write(self, addr: int, data: bytes) -> None:
        r = self.find(addr)
        if r is None or addr + len(data) > r.end:
            self.unclaimed += 1
            return
        try:
            r.device.write(addr - r.base, data)
        except GuestStop:
            raise
        except Exception:
            self._device_failed(r, "write", addr)

    def _device_failed(self, r: Range, op: str, addr: int) -> None:
        """A device model raised: a VMM bug, logged loudly, but the guest and the VMM go on.

        The traceback is logged as text: a LogRecord holding the exception would keep the
        vCPU frames (and their views on kvm_run and guest RAM) alive after the VM closes.
        """
        self.device_errors += 1
        if self.device_errors <= 10:
            log.error("%s: %s %s at %#x raised\n%s", self.name, r.name, op, addr, traceback.format_exc())

    def __iter__(self):
        return iter(self._ranges)
