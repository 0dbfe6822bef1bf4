"""The doorbell device: a register-write ping-pong, the purest form of device I/O.

The guest driver rings the doorbell with a sequence number; the device checks
that every value arrives exactly once and in order, then writes the value to
``ack`` and a status to ``status`` in the shared page, where the driver is
spinning.  ``exitless bench doorbell`` measures this round trip under every
I/O path; the guest side is the guest kit's ``doorbell`` app.
"""
from __future__ import annotations

from .base import Register, RegisterDevice, put_u32

ACK, STATUS = 0x00, 0x04            # in the device's shared area (page offset 0x80, 0x84)
STATUS_OK, STATUS_OUT_OF_ORDER = 0, 1


class DoorbellDevice(RegisterDevice):
    NAME = "doorbell"
    REGISTERS = (Register("doorbell", 0x0, 4, doorbell=True, readable=False),)

    def __init__(self):
        super().__init__()
        self.expected = 1
        self.handled = 0
        self.errors = 0

    def on_doorbell(self, reg: Register, value: int) -> None:
        if value == self.expected:
            status = STATUS_OK
            self.expected = (value + 1) & 0xFFFFFFFF
        else:  # a duplicate, a lost or reordered write, or garbage: answer with an error, go on
            status = STATUS_OUT_OF_ORDER
            self.errors += 1
            self.expected = (value + 1) & 0xFFFFFFFF
        self.handled += 1
        shared = self.shared
        put_u32(shared, STATUS, status)
        put_u32(shared, ACK, value)  # last: the driver spins on ack, then reads status

    def stats(self) -> dict:
        return {"handled": self.handled, "errors": self.errors, "expected": self.expected}
