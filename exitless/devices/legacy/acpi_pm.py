"""ACPI fixed hardware: the PM1a event and control blocks, and the reset register.

The FADT built by :mod:`exitless.boot.acpi` puts PM1a_EVT_BLK (status, enable;
2 bytes each) at port 0x600 and PM1a_CNT_BLK at 0x604, and the reset register
at 0xCF9.  What the guest gets from them:

* ``poweroff``: Linux writes ``SLP_TYP | SLP_EN`` to PM1a_CNT with the
  SLP_TYP the DSDT's ``\\_S5_`` names (5); the VM stops with
  ``VmExit("shutdown")``.  Other sleep states (S1/S3/S4) are not offered by
  the DSDT; a write asking for them is ignored.
* ``reboot``: ACPI's reset register (value 6) or the PCI "reset control"
  register at 0xCF9 (RST_CPU, bit 2) stops the VM with ``VmExit("reset")``.
* PM1 status bits are write-1-to-clear, the SCI (ISA IRQ 9, level) is raised
  while an enabled status bit is set; :meth:`AcpiPm.power_button` sets
  PWRBTN_STS for a guest that wants to react to one.  SCI_EN reads as set: the
  FADT has no SMI_CMD, so the machine is always in ACPI mode.
"""
from __future__ import annotations

import threading
from typing import Callable

from ...boot.acpi import PM1_CNT_SCI_EN, PM1_CNT_SLP_EN, PM1_CNT_SLP_TYP_MASK, PM1_CNT_SLP_TYP_SHIFT, SLP_TYP_S5
from ...exits import GuestStop, VmExit

PM1_STS_TMR, PM1_STS_PWRBTN, PM1_STS_SLPBTN, PM1_STS_WAK = 1 << 0, 1 << 8, 1 << 9, 1 << 15
PM1_STS_MASK = 0x8F31   # TMR, BM, GBL, PWRBTN, SLPBTN, RTC, PCIEXP_WAKE, WAK
RESET_RST_CPU = 1 << 2  # 0xCF9 bit 2: "reset CPU" (value 6 = SYS_RST | RST_CPU)


class AcpiPm:
    """PM1a event block (4 ports) and control block (2 ports); one object, two bus ranges."""

    def __init__(self, set_sci: Callable[[int], None] | None = None):
        self.set_sci = set_sci or (lambda level: None)
        self._lock = threading.Lock()
        self.status = 0
        self.enable = 0
        self.control = PM1_CNT_SCI_EN
        self._sci = 0
        self.event = Pm1Event(self)
        self.control_block = Pm1Control(self)

    # host side
    def power_button(self) -> None:
        with self._lock:
            self.status |= PM1_STS_PWRBTN
            self._update_sci()

    def _update_sci(self) -> None:
        level = 1 if self.status & self.enable and self.control & PM1_CNT_SCI_EN else 0
        if level != self._sci:
            self._sci = level
            self.set_sci(level)

    def _write_control(self, value: int) -> None:
        if value & PM1_CNT_SLP_EN:
            slp_typ = (value & PM1_CNT_SLP_TYP_MASK) >> PM1_CNT_SLP_TYP_SHIFT
            if slp_typ == SLP_TYP_S5:
                raise GuestStop(VmExit("shutdown", 0, "the guest powered off (ACPI S5)"))
        # SLP_EN is write-only; SCI_EN stays set (no legacy mode to go back to).
        self.control = (value & ~PM1_CNT_SLP_EN) | PM1_CNT_SCI_EN


def _read_reg(value: int, offset: int, size: int) -> bytes:
    return (value >> (8 * offset) & ((1 << 8 * size) - 1)).to_bytes(size, "little")


class Pm1Event:
    """PM1a_EVT_BLK: PM1_STS at +0 (write 1 to clear), PM1_EN at +2."""

    def __init__(self, pm: AcpiPm):
        self.pm = pm

    def read(self, offset: int, size: int) -> bytes:
        with self.pm._lock:
            return _read_reg(self.pm.status | self.pm.enable << 16, offset, size)

    def write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little") << 8 * offset
        mask = ((1 << 8 * len(data)) - 1) << 8 * offset
        with self.pm._lock:
            pm = self.pm
            pm.status &= ~(value & 0xFFFF)
            if mask >> 16:
                pm.enable = (pm.enable & ~(mask >> 16)) | ((value >> 16) & mask >> 16 & PM1_STS_MASK)
            pm._update_sci()


class Pm1Control:
    """PM1a_CNT_BLK (16 bits): SCI_EN, SLP_TYP, SLP_EN."""

    def __init__(self, pm: AcpiPm):
        self.pm = pm

    def read(self, offset: int, size: int) -> bytes:
        with self.pm._lock:
            return _read_reg(self.pm.control, offset, size)

    def write(self, offset: int, data: bytes) -> None:
        mask = ((1 << 8 * len(data)) - 1) << 8 * offset
        with self.pm._lock:
            value = (self.pm.control & ~mask & 0xFFFF) | (int.from_bytes(data, "little") << 8 * offset & 0xFFFF)
            self.pm._write_control(value)


class ResetControl:
    """Port 0xCF9: the FADT reset register and the PCI reset-control register, one byte."""

    def __init__(self):
        self.value = 0

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self.value]) + b"\0" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        value = data[0]
        if value & RESET_RST_CPU:
            raise GuestStop(VmExit("reset", 0, f"the guest reset the machine (port 0xcf9 <- {value:#x})"))
        self.value = value & ~RESET_RST_CPU
