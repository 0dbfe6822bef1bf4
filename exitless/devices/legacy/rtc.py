"""The PC's CMOS RTC (Motorola MC146818) at ports 0x70 (index) and 0x71 (data).

It tells the time of the host (UTC), in BCD and 24-hour mode unless the guest
switches status register B to binary or 12-hour mode.  A guest that sets the
clock (``hwclock -w``: SET bit, write the fields, clear SET) moves an offset
from host time, never the host's clock.  Status A never shows an update in
progress, status D reports valid RAM and time; register 0x32 holds the
century (BCD).  CMOS RAM 0x0E-0x7F is plain storage, with the PC memory-size
bytes (0x15-0x18, 0x30-0x31, 0x34-0x35, 0x5B-0x5D) filled in for firmware-aware guests.

Not emulated: alarm, periodic and update-ended *interrupts* (IRQ 8); status C
reports the update-ended flag when a second has passed since it was last read,
which is what pollers look at.
"""
from __future__ import annotations

import calendar
import threading
import time
from datetime import datetime, timezone
from typing import Callable

INDEX_PORT, DATA_PORT = 0x70, 0x71
RTC_IRQ = 8

SEC, SEC_ALARM, MIN, MIN_ALARM, HOUR, HOUR_ALARM, WEEKDAY, DAY, MONTH, YEAR = range(10)
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
NMI_DISABLE = 0x80

A_UIP = 0x80
A_DEFAULT = 0x26            # 32.768 kHz time base, 1024 Hz periodic rate
B_SET, B_PIE, B_AIE, B_UIE, B_DM_BINARY, B_24H = 0x80, 0x40, 0x20, 0x10, 0x04, 0x02
C_IRQF, C_UF = 0x80, 0x10
D_VRT = 0x80
HOUR_PM = 0x80

_TIME_FIELDS = (SEC, MIN, HOUR, DAY, MONTH, YEAR, CENTURY)


#: The Gregorian calendar repeats every 400 years (146,097 days): a guest clock set past
#: year 9999 (or before year 1) wraps by whole cycles instead of leaving datetime's range.
GREGORIAN_CYCLE = 146_097 * 86_400
_MIN_TS = -62_135_596_800          # 0001-01-01T00:00:00Z
_MAX_TS = 253_402_300_799          # 9999-12-31T23:59:59Z


def to_bcd(value: int) -> int:
    if not 0 <= value <= 99:
        raise ValueError(f"{value} does not fit in two BCD digits")
    return (value // 10) << 4 | value % 10


def from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0xF)


def register_bcd(value: int) -> int:
    """What a two-digit BCD register shows for ``value``: its last two decimal digits.

    A guest can store anything (an hour of 165 written as 0xFF in BCD, 200 in binary
    mode read back in BCD); the register has two digits, so reading never fails.
    """
    return to_bcd(value % 100)


class Rtc:
    """One object for both ports: offset 0 is the index port, 1 the data port."""

    def __init__(self, clock: Callable[[], float] = time.time, mem_size: int = 0):
        self.clock = clock
        self._lock = threading.Lock()
        self.index = 0
        self.nmi_disabled = False
        self.cmos = bytearray(128)
        self.cmos[REG_A] = A_DEFAULT
        self.cmos[REG_B] = B_24H
        self.cmos[REG_D] = D_VRT
        self.offset = 0.0              # guest time - host time, seconds
        self._pending: dict[int, int] | None = None   # fields being set (binary), while SET is on
        self._last_c_read = int(clock())
        if mem_size:
            self._memory_size_bytes(mem_size)

    # -- bus ------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self.index | (NMI_DISABLE if self.nmi_disabled else 0) if offset == 0 else self._read(self.index)
        return bytes([value]) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            if offset == 0:
                self.index = data[0] & 0x7F
                self.nmi_disabled = bool(data[0] & NMI_DISABLE)
            else:
                self._write(self.index, data[0])

    # -- the time -------------------------------------------------------
    def now(self) -> datetime:
        """The guest's wall-clock time (UTC)."""
        ts = int(self.clock() + self.offset)
        if ts > _MAX_TS:
            ts -= ((ts - _MAX_TS - 1) // GREGORIAN_CYCLE + 1) * GREGORIAN_CYCLE
        elif ts < _MIN_TS:
            ts += ((_MIN_TS - ts - 1) // GREGORIAN_CYCLE + 1) * GREGORIAN_CYCLE
        return datetime.fromtimestamp(ts, timezone.utc)

    def _fields(self) -> dict[int, int]:
        if self._pending is not None:
            return dict(self._pending)
        t = self.now()
        return {SEC: t.second, MIN: t.minute, HOUR: t.hour, DAY: t.day, MONTH: t.month,
                YEAR: t.year % 100, CENTURY: t.year // 100, WEEKDAY: (t.isoweekday() % 7) + 1}

    def _encode(self, reg: int, value: int) -> int:
        b = self.cmos[REG_B]
        pm = 0
        if reg in (HOUR, HOUR_ALARM) and not b & B_24H:
            pm = HOUR_PM if value >= 12 else 0
            value = value % 12 or 12
        return ((value & 0xFF) if b & B_DM_BINARY else register_bcd(value)) | pm

    def _decode(self, reg: int, raw: int) -> int:
        b = self.cmos[REG_B]
        pm = False
        if reg in (HOUR, HOUR_ALARM) and not b & B_24H:
            pm, raw = bool(raw & HOUR_PM), raw & ~HOUR_PM
        value = raw if b & B_DM_BINARY else from_bcd(raw)
        if reg in (HOUR, HOUR_ALARM) and not b & B_24H:
            value = value % 12 + (12 if pm else 0)
        return value

    def _apply(self, fields: dict[int, int]) -> bool:
        """Make ``fields`` the current time; False if they are not (yet) a valid date."""
        try:
            year = fields[CENTURY] * 100 + fields[YEAR]
            ts = calendar.timegm(datetime(year, fields[MONTH], fields[DAY], fields[HOUR], fields[MIN],
                                          fields[SEC]).timetuple())
        except (ValueError, OverflowError):
            return False
        self.offset = ts - int(self.clock())
        return True

    # -- registers ------------------------------------------------------
    def _read(self, reg: int) -> int:
        if reg in _TIME_FIELDS or reg == WEEKDAY:
            return self._encode(reg, self._fields()[reg])
        if reg == REG_A:
            return self.cmos[REG_A] & ~A_UIP
        if reg == REG_C:
            now = int(self.clock())
            flags = C_UF if now != self._last_c_read else 0
            self._last_c_read = now
            return flags
        return self.cmos[reg]

    def _write(self, reg: int, value: int) -> None:
        if reg in _TIME_FIELDS:
            fields = self._fields()
            fields[reg] = self._decode(reg, value)
            if self.cmos[REG_B] & B_SET or not self._apply(fields):
                self._pending = fields   # applied when SET clears (or the date becomes valid)
            else:
                self._pending = None
        elif reg == WEEKDAY:
            pass                          # derived from the date
        elif reg == REG_B:
            was_set = self.cmos[REG_B] & B_SET
            if value & B_SET and not was_set and self._pending is None:
                self._pending = self._fields()   # the clock stops while SET is on
            self.cmos[REG_B] = value
            if was_set and not value & B_SET and self._pending is not None:
                self._apply(self._pending)
                self._pending = None
        elif reg == REG_A:
            self.cmos[REG_A] = value & ~A_UIP
        elif reg in (REG_C, REG_D):
            pass                          # read-only
        else:
            self.cmos[reg] = value

    def _memory_size_bytes(self, mem_size: int) -> None:
        """The PC BIOS's CMOS memory-size fields (base KiB, extended KiB, 64 KiB units above 16 MiB / 4 GiB)."""
        low = min(mem_size, 0xC000_0000)
        high = mem_size - low
        ext_kib = min((low - (1 << 20)) >> 10, 0xFFFF) if low > 1 << 20 else 0
        above16 = min((low - (16 << 20)) >> 16, 0xFFFF) if low > 16 << 20 else 0
        above4g = high >> 16
        c = self.cmos
        c[0x15], c[0x16] = 640 & 0xFF, 640 >> 8
        c[0x17], c[0x18] = ext_kib & 0xFF, ext_kib >> 8
        c[0x30], c[0x31] = ext_kib & 0xFF, ext_kib >> 8
        c[0x34], c[0x35] = above16 & 0xFF, above16 >> 8
        c[0x5B], c[0x5C], c[0x5D] = above4g & 0xFF, (above4g >> 8) & 0xFF, (above4g >> 16) & 0xFF
