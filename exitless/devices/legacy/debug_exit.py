"""The guest's exit-status port, QEMU's isa-debug-exit convention: ``outl status, 0xf4`` stops the VM.

The same guest binary reports success or failure in exitless and under QEMU
(``-device isa-debug-exit,iobase=0xf4,iosize=4``, where QEMU exits with
``(status << 1) | 1``).
"""
from __future__ import annotations

from ...exits import GuestStop, VmExit


class DebugExit:
    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        status = int.from_bytes(data, "little")
        raise GuestStop(VmExit("debug-exit", status, f"guest wrote exit status {status}"))
