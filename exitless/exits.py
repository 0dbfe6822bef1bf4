"""Why a VM stops, and how a device handler asks it to."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class VmExit:
    """Why a VM stopped: ``kind`` is one of debug-exit, shutdown (power-off), reset, triple-fault,
    crash, stopped, timeout, error."""

    kind: str
    status: int = 0
    message: str = ""
    vcpu: int | None = None
    registers: str = ""

    @property
    def ok(self) -> bool:
        return self.kind in ("debug-exit", "shutdown", "reset", "stopped") and self.status == 0


class GuestStop(Exception):
    """Raised by a device handler to stop the VM (e.g. the guest wrote its exit status)."""

    def __init__(self, exit: VmExit):
        super().__init__(exit.kind)
        self.exit = exit
