"""Unit tests of the legacy PC devices a Linux guest needs: CMOS RTC, i8042, ACPI PM1a and reset port.

No KVM: the devices are driven through a PIO ``Bus`` exactly as the vCPU loop
drives them, and their stop requests (``GuestStop``) are checked.
"""
from __future__ import annotations

import calendar
from datetime import datetime, timezone

import pytest

from exitless.boot.acpi import PM1A_CNT_PORT, PM1A_EVT_PORT, RESET_PORT, RESET_VALUE, SLP_TYP_S5
from exitless.bus import Bus
from exitless.devices.legacy import i8042 as K
from exitless.devices.legacy import rtc as R
from exitless.devices.legacy.acpi_pm import PM1_STS_PWRBTN, AcpiPm, ResetControl
from exitless.exits import GuestStop

# 2024-02-29 23:59:58 UTC, a Thursday (leap day, late in the day: BCD digits above 9 everywhere).
T0 = calendar.timegm((2024, 2, 29, 23, 59, 58))


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def rtc_bus():
    clock = Clock(T0)
    rtc = R.Rtc(clock=clock, mem_size=512 << 20)
    bus = Bus("pio")
    bus.insert(R.INDEX_PORT, 2, rtc, "rtc")
    return bus, rtc, clock


def cmos(bus: Bus, reg: int) -> int:
    bus.write(0x70, bytes([reg]))
    return bus.read(0x71, 1)[0]


def cmos_write(bus: Bus, reg: int, value: int) -> None:
    bus.write(0x70, bytes([reg]))
    bus.write(0x71, bytes([value]))


# --------------------------------------------------------------------------- RTC


def test_rtc_reports_host_time_in_bcd(rtc_bus):
    bus, _, _ = rtc_bus
    assert [cmos(bus, r) for r in (R.SEC, R.MIN, R.HOUR, R.DAY, R.MONTH, R.YEAR, R.CENTURY)] == \
        [0x58, 0x59, 0x23, 0x29, 0x02, 0x24, 0x20]
    assert cmos(bus, R.WEEKDAY) == 5            # Sunday = 1: Thursday = 5
    assert cmos(bus, R.REG_B) & R.B_24H and not cmos(bus, R.REG_B) & R.B_DM_BINARY
    assert cmos(bus, R.REG_D) == R.D_VRT        # valid RAM and time
    assert not cmos(bus, R.REG_A) & R.A_UIP     # never "update in progress"


def test_rtc_follows_the_clock_across_midnight_and_month(rtc_bus):
    bus, _, clock = rtc_bus
    clock.t += 3
    assert [cmos(bus, r) for r in (R.SEC, R.MIN, R.HOUR, R.DAY, R.MONTH, R.YEAR)] == [0x01, 0x00, 0x00, 0x01, 0x03, 0x24]


def test_rtc_binary_and_12_hour_modes(rtc_bus):
    bus, _, _ = rtc_bus
    cmos_write(bus, R.REG_B, R.B_DM_BINARY | R.B_24H)
    assert [cmos(bus, r) for r in (R.SEC, R.MIN, R.HOUR, R.DAY, R.YEAR)] == [58, 59, 23, 29, 24]
    cmos_write(bus, R.REG_B, 0)                 # BCD, 12-hour: 23h is 11 PM
    assert cmos(bus, R.HOUR) == R.HOUR_PM | 0x11


def test_rtc_set_time_moves_an_offset_not_the_host(rtc_bus):
    bus, rtc, clock = rtc_bus
    cmos_write(bus, R.REG_B, R.B_SET | R.B_24H)          # hwclock -w: stop updates, write the fields
    for reg, value in ((R.SEC, 0x00), (R.MIN, 0x30), (R.HOUR, 0x12), (R.DAY, 0x15), (R.MONTH, 0x06),
                       (R.YEAR, 0x99), (R.CENTURY, 0x19)):
        cmos_write(bus, reg, value)
    clock.t += 100                                        # frozen while SET is on
    assert cmos(bus, R.MIN) == 0x30 and cmos(bus, R.SEC) == 0x00
    cmos_write(bus, R.REG_B, R.B_24H)                     # release: the clock runs from the new time
    clock.t += 61
    assert rtc.now() == datetime(1999, 6, 15, 12, 31, 1, tzinfo=timezone.utc)
    assert [cmos(bus, r) for r in (R.YEAR, R.CENTURY, R.WEEKDAY)] == [0x99, 0x19, 3]   # a Tuesday


def test_rtc_direct_field_write_and_nvram(rtc_bus):
    bus, rtc, _ = rtc_bus
    cmos_write(bus, R.HOUR, 0x05)
    assert cmos(bus, R.HOUR) == 0x05 and cmos(bus, R.MIN) == 0x59
    cmos_write(bus, 0x40, 0xA5)
    assert cmos(bus, 0x40) == 0xA5
    cmos_write(bus, R.REG_D, 0)                  # read-only
    assert cmos(bus, R.REG_D) == R.D_VRT
    bus.write(0x70, bytes([R.NMI_DISABLE | 0x40]))   # bit 7 of the index is the NMI mask, not the index
    assert rtc.nmi_disabled and bus.read(0x71, 1)[0] == 0xA5


def test_rtc_memory_size_bytes(rtc_bus):
    bus, _, _ = rtc_bus
    assert cmos(bus, 0x15) | cmos(bus, 0x16) << 8 == 640
    assert cmos(bus, 0x17) | cmos(bus, 0x18) << 8 == 0xFFFF              # KiB above 1 MiB, capped at 64 MiB
    assert cmos(bus, 0x34) | cmos(bus, 0x35) << 8 == (512 - 16) * 16     # 64 KiB units above 16 MiB


def test_rtc_status_c_reports_update_ended_once_per_second(rtc_bus):
    bus, _, clock = rtc_bus
    cmos(bus, R.REG_C)
    assert cmos(bus, R.REG_C) == 0
    clock.t += 1
    assert cmos(bus, R.REG_C) & R.C_UF
    assert cmos(bus, R.REG_C) == 0


def test_bcd_helpers():
    assert R.to_bcd(59) == 0x59 and R.from_bcd(0x59) == 59
    with pytest.raises(ValueError):
        R.to_bcd(100)


# --------------------------------------------------------------------------- i8042


@pytest.fixture
def kbc():
    irqs: list[tuple[int, int]] = []
    dev = K.I8042(lambda irq, level: irqs.append((irq, level)))
    bus = Bus("pio")
    bus.insert(K.DATA_PORT, 1, dev.data_port, "i8042-data")
    bus.insert(K.STATUS_PORT, 1, dev.command_port, "i8042-cmd")
    return bus, dev, irqs


def cmd(bus: Bus, c: int) -> None:
    bus.write(0x64, bytes([c]))


def status(bus: Bus) -> int:
    return bus.read(0x64, 1)[0]


def data(bus: Bus) -> int:
    assert status(bus) & K.STS_OBF, "no byte in the output buffer"
    return bus.read(0x60, 1)[0]


def test_i8042_reset_command_stops_the_vm(kbc):
    bus, _, _ = kbc
    with pytest.raises(GuestStop) as stop:
        cmd(bus, K.CMD_RESET)
    assert stop.value.exit.kind == "reset" and stop.value.exit.ok


def test_i8042_output_port_reset_line(kbc):
    bus, _, _ = kbc
    cmd(bus, K.CMD_READ_OUTPUT)
    port = data(bus)
    assert port & K.OUTPUT_PORT_RESET_LINE
    cmd(bus, K.CMD_WRITE_OUTPUT)
    bus.write(0x60, bytes([port | K.OUTPUT_PORT_A20]))   # A20 on, reset line high: nothing happens
    cmd(bus, K.CMD_WRITE_OUTPUT)
    with pytest.raises(GuestStop) as stop:
        bus.write(0x60, bytes([port & ~K.OUTPUT_PORT_RESET_LINE]))
    assert stop.value.exit.kind == "reset"


def test_i8042_answers_linux_probe_sequence(kbc):
    bus, dev, _ = kbc
    assert status(bus) & K.STS_SYS and not status(bus) & K.STS_OBF
    cmd(bus, K.CMD_SELF_TEST)
    assert data(bus) == 0x55
    cmd(bus, K.CMD_READ_CTR)
    ctr = data(bus)
    cmd(bus, K.CMD_WRITE_CTR)
    assert status(bus) & K.STS_CMD
    bus.write(0x60, bytes([ctr & ~K.CTR_KBDINT | K.CTR_AUXDIS]))
    cmd(bus, K.CMD_READ_CTR)
    assert data(bus) == ctr & ~K.CTR_KBDINT | K.CTR_AUXDIS
    cmd(bus, K.CMD_KBD_TEST)
    assert data(bus) == 0x00
    cmd(bus, K.CMD_AUX_TEST)
    assert data(bus) == 0x00
    cmd(bus, K.CMD_WRITE_AUX_OBUF)                    # Linux's AUX loop-back test
    bus.write(0x60, b"\x5a")
    assert status(bus) & K.STS_AUX_OBF and data(bus) == 0x5A
    cmd(bus, K.CMD_AUX_ENABLE)
    assert not dev.ctr & K.CTR_AUXDIS
    cmd(bus, K.CMD_WRITE_AUX)                         # no mouse: refused
    bus.write(0x60, b"\xf2")
    assert data(bus) == K.KBD_RESEND
    assert not status(bus) & K.STS_OBF


def test_i8042_keyboard_commands_and_irq(kbc):
    bus, _, irqs = kbc
    bus.write(0x60, bytes([K.KBD_CMD_RESET]))        # CTR has KBDINT set: IRQ 1 while a byte waits
    assert irqs[-1] == (K.KBD_IRQ, 1)
    assert data(bus) == K.KBD_ACK
    assert data(bus) == K.KBD_SELFTEST_OK
    assert irqs[-1] == (K.KBD_IRQ, 0)
    bus.write(0x60, bytes([K.KBD_CMD_IDENTIFY]))
    assert [data(bus) for _ in range(3)] == [K.KBD_ACK, 0xAB, 0x83]
    bus.write(0x60, b"\xed")                         # set LEDs: ACK
    assert data(bus) == K.KBD_ACK


# --------------------------------------------------------------------------- ACPI PM1a and the reset port


@pytest.fixture
def pm():
    sci: list[int] = []
    dev = AcpiPm(sci.append)
    bus = Bus("pio")
    bus.insert(PM1A_EVT_PORT, 4, dev.event, "pm1a-evt")
    bus.insert(PM1A_CNT_PORT, 2, dev.control_block, "pm1a-cnt")
    bus.insert(RESET_PORT, 1, ResetControl(), "reset")
    return bus, dev, sci


def u16(v: int) -> bytes:
    return v.to_bytes(2, "little")


def test_pm1a_s5_powers_off(pm):
    bus, _, _ = pm
    assert int.from_bytes(bus.read(PM1A_CNT_PORT, 2), "little") & 1        # SCI_EN: always in ACPI mode
    bus.write(PM1A_CNT_PORT, u16(SLP_TYP_S5 << 10))                        # ACPICA writes SLP_TYP first...
    with pytest.raises(GuestStop) as stop:
        bus.write(PM1A_CNT_PORT, u16(SLP_TYP_S5 << 10 | 1 << 13))           # ...then SLP_EN
    assert stop.value.exit.kind == "shutdown" and stop.value.exit.ok


def test_pm1a_s5_by_byte_writes(pm):
    bus, _, _ = pm
    bus.write(PM1A_CNT_PORT, b"\x01")
    with pytest.raises(GuestStop):
        bus.write(PM1A_CNT_PORT + 1, bytes([(SLP_TYP_S5 << 2) | 0x20]))   # high byte: SLP_TYP bits 10-12, SLP_EN 13


def test_pm1a_other_sleep_states_do_not_stop(pm):
    bus, _, _ = pm
    for typ in (0, 1, 3):
        bus.write(PM1A_CNT_PORT, u16(typ << 10 | 1 << 13))
    value = int.from_bytes(bus.read(PM1A_CNT_PORT, 2), "little")
    assert not value & 1 << 13                                             # SLP_EN reads 0


def test_pm1_status_enable_and_sci(pm):
    bus, dev, sci = pm
    dev.power_button()
    assert int.from_bytes(bus.read(PM1A_EVT_PORT, 2), "little") & PM1_STS_PWRBTN
    assert sci == []                                                       # not enabled: no SCI
    bus.write(PM1A_EVT_PORT + 2, u16(PM1_STS_PWRBTN))
    assert int.from_bytes(bus.read(PM1A_EVT_PORT + 2, 2), "little") == PM1_STS_PWRBTN
    assert sci == [1]
    bus.write(PM1A_EVT_PORT, u16(PM1_STS_PWRBTN))                          # write 1 to clear
    assert int.from_bytes(bus.read(PM1A_EVT_PORT, 2), "little") == 0 and sci == [1, 0]
    bus.write(PM1A_EVT_PORT, (PM1_STS_PWRBTN << 16).to_bytes(4, "little"))  # 32-bit write: status 0, enable
    assert int.from_bytes(bus.read(PM1A_EVT_PORT + 2, 2), "little") == PM1_STS_PWRBTN


def test_reset_port(pm):
    bus, _, _ = pm
    bus.write(RESET_PORT, b"\x02")              # Linux's 0xCF9 method writes 2, then 6
    assert bus.read(RESET_PORT, 1) == b"\x02"
    with pytest.raises(GuestStop) as stop:
        bus.write(RESET_PORT, bytes([RESET_VALUE]))
    assert stop.value.exit.kind == "reset"
