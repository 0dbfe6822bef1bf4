"""A doorbell register that lives in RAM shared with the sidecore: a shadow word and an EventIdx.

This is the NVMe Doorbell Buffer Config protocol (and virtio's EVENT_IDX) on a
single register.  The driver writes each new value to the shadow word.  While
the sidecore polls, the EventIdx is left where the driver will never cross it,
so the driver never rings the real (ioeventfd) doorbell and never exits.
Before sleeping, the sidecore *arms*: it publishes EventIdx = the last value it
consumed, issues a full fence, then re-reads the shadow.  The driver does the
mirror image (store shadow, fence, load EventIdx, ring if
``vring_need_event``).  Whichever order the two run in, either the driver sees
the new EventIdx and rings, or the sidecore sees the new shadow and stays
awake: no lost wake-up.
"""
from __future__ import annotations


from ..devices.base import Register, RegisterDevice
from .spin import address_of, drain_eventfd, store_fence_load


class SharedRegister:
    """A Pollable (see :mod:`exitless.sidecore.loop`) for one doorbell register of a device."""

    def __init__(self, device: RegisterDevice, reg: Register, page: memoryview, wake_fd: int | None = None):
        self.device = device
        self.reg = reg
        self.page = page
        self.shadow_off = device.shadow_offset(reg)
        self.event_off = device.event_idx_offset(reg)
        self.shadow_addr = address_of(page[self.shadow_off:])
        self.event_addr = address_of(page[self.event_off:])
        # whole-word views: a struct.pack_into store is byte by byte, and a driver reading a
        # half-written EventIdx could decide not to ring (a lost wake-up)
        self._shadow = page[self.shadow_off:self.shadow_off + 4].cast("I")
        self._event = page[self.event_off:self.event_off + 4].cast("I")
        self.wake_fd = wake_fd
        self.last = self._shadow[0]
        self.disarm()

    def poll(self) -> bool:
        value = self._shadow[0]
        if value == self.last:
            return False
        self.last = value
        self.device.on_doorbell(self.reg, value)
        return True

    def watches(self) -> list[tuple[int, int]]:
        return [(self.shadow_addr, self.last)]

    def arm(self) -> bool:
        """Ask the driver to ring on its next write; True if a write already slipped in."""
        return store_fence_load(self.event_addr, self.last, self.shadow_addr) != self.last

    def disarm(self) -> None:
        self._event[0] = (self.last - 1) & 0xFFFFFFFF

    def drain(self) -> None:
        drain_eventfd(self.wake_fd)
