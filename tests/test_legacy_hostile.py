"""Legacy devices under a hostile or buggy guest (issue 14 §3, §5).

§3: every buffer a guest (or frontend) can fill is bounded, and overflow is
reported the way the hardware reports it -- the 16550's receiver overruns
(LSR.OE), the i8042 drops answers nobody reads, the bench marker keeps two
marks, the boot console keeps a tail, a vhost-user message keeps at most 8 fds.
§5: no sequence of guest accesses -- any port of the UART, the CMOS RTC, the
i8042 or the ACPI PM1a blocks, any size, any value -- raises inside the VMM.
"""
from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from exitless.boot.acpi import PM1A_CNT_LEN, PM1A_CNT_PORT, PM1A_EVT_LEN, PM1A_EVT_PORT, RESET_PORT
from exitless.boot.linux import BootConsole
from exitless.bus import Bus
from exitless.devices.legacy import i8042 as K
from exitless.devices.legacy import rtc as R
from exitless.devices.legacy import serial as U
from exitless.devices.legacy.acpi_pm import AcpiPm, ResetControl
from exitless.devices.legacy.bench_marker import BenchMarker
from exitless.exits import GuestStop

from fds import open_fds
from test_legacy_devices import Clock

COM1 = 0x3F8
LSR_OE = 0x02


class Line:
    """An IRQ line as a device drives it: records the level, and that it only ever changes."""

    def __init__(self):
        self.level, self.redundant = 0, 0

    def __call__(self, *args) -> None:
        level = args[-1]
        assert level in (0, 1)
        self.redundant += level == self.level
        self.level = level


# --------------------------------------------------------------------------- §3: the UART, the input


@pytest.mark.kvm
def test_uart_loopback_flood_overruns_instead_of_growing() -> None:
    """MCR = 0x18 (loopback | OUT2), 200,000 bytes to THR, RBR never read."""
    from exitless.vm import Machine, VmConfig
    with Machine(VmConfig(mem_mib=32)) as m:
        pio, uart = m.pio, m.serial
        pio.write(COM1 + U.MCR, b"\x18")
        for i in range(200_000):
            pio.write(COM1, bytes([i & 0xFF]))
        assert len(uart._rx) == 1 and uart.overruns == 199_999          # character mode: one holding byte
        assert pio.read(COM1 + U.LSR, 1)[0] & LSR_OE
        assert not pio.read(COM1 + U.LSR, 1)[0] & LSR_OE               # cleared by the read
        assert pio.read(COM1, 1) == bytes([199_999 & 0xFF])             # the last character overwrote it
        pio.write(COM1 + U.IIR_FCR, b"\x01")                            # FIFO mode: 16 bytes
        for i in range(200_000):
            pio.write(COM1, bytes([i & 0xFF]))
        assert len(uart._rx) == U.RX_FIFO_SIZE
        assert pio.read(COM1 + U.LSR, 1)[0] & (LSR_OE | 1) == LSR_OE | 1
        assert [pio.read(COM1, 1)[0] for _ in range(17)] == list(range(16)) + [0]   # the first 16 kept
        assert m.pio.device_errors == 0


def test_uart_host_input_beyond_the_backlog_is_dropped_and_counted() -> None:
    uart = U.Serial(lambda b: None)
    uart.write(U.IIR_FCR, b"\x01")
    data = bytes(range(256)) * 40                                       # 10,240 bytes
    uart.feed(data)
    held = len(uart._rx) + len(uart._backlog)
    assert held == U.HOST_BACKLOG and uart.rx_dropped == len(data) - held
    out = bytes(uart.read(U.RBR_THR_DLL, 1)[0] for _ in range(held))    # trickles in as the guest reads
    assert out == data[:held] and not uart.read(U.LSR, 1)[0] & 1
    assert uart.overruns == 0                                           # flow control, not an overrun


def test_uart_overrun_raises_the_line_status_interrupt() -> None:
    line = Line()
    uart = U.Serial(lambda b: None, line)
    uart.write(U.MCR, bytes([U.MCR_LOOP | U.MCR_OUT2]))
    uart.write(U.IER_DLM, bytes([U.IER_RLS]))
    uart.write(U.RBR_THR_DLL, b"a")
    assert line.level == 0
    uart.write(U.RBR_THR_DLL, b"b")                                     # overrun
    assert line.level == 1 and uart.read(U.IIR_FCR, 1)[0] & 0x0F == U.IIR_RLS
    assert uart.read(U.LSR, 1)[0] & LSR_OE and line.level == 0


# --------------------------------------------------------------------------- §3: the other buffers


def test_i8042_output_buffer_is_bounded() -> None:
    kbc = K.I8042()
    for i in range(10_000):
        kbc.write(4, bytes([K.CMD_WRITE_KBD_OBUF]))
        kbc.write(0, bytes([i & 0xFF]))
        kbc.write(0, bytes([K.KBD_CMD_IDENTIFY]))                       # three answers each
    assert len(kbc._out) == K.OUTPUT_BUFFER_SIZE and kbc.out_dropped == 4 * 10_000 - K.OUTPUT_BUFFER_SIZE
    assert kbc.read(0, 1) == b"\x00"                                    # the oldest answers are the ones kept


def test_bench_marker_keeps_two_marks() -> None:
    marker = BenchMarker(lambda: {"exits": 1, "io_exits": 1})
    for i in range(10_000):
        marker.write(0, struct.pack("<I", i % 4))
    assert marker.start.phase == 1 and marker.end.phase == 2 and len(vars(marker)) == 4
    assert marker.window() is not None


def test_boot_console_keeps_a_bounded_tail() -> None:
    con = BootConsole()
    for _ in range(300):
        con(b"x" * 10_000)                                              # 3 MB, never a newline
    con(b"\nlast line\n")
    assert len(con.data) <= 2 * con.KEEP_BYTES and con.text.endswith("last line\n")
    assert len(con._line) == 0 and max(len(line) for _, line in con.lines) <= con.MAX_LINE
    for i in range(3 * con.KEEP_LINES):
        con(b"%d\n" % i)
    assert len(con.lines) <= 2 * con.KEEP_LINES and con.lines[-1][1] == str(3 * con.KEEP_LINES - 1)


def test_vhost_user_message_keeps_at_most_max_fds() -> None:
    """One message whose pieces each carry 8 fds: the server keeps none beyond 8, leaks none."""
    from exitless.vhost_user import protocol as P
    from exitless.vhost_user import server as S
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = [os.eventfd(0) for _ in range(P.MAX_FDS)]
    before = open_fds()
    try:
        payload = struct.pack("<Q", 0)
        pieces = [P.HEADER.pack(P.SET_OWNER, P.VERSION, len(payload))] + [payload[i:i + 1] for i in range(8)]
        for piece in pieces:
            a.sendmsg([piece], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        with pytest.raises(S.TooManyFds):
            S.recv_message(b, 1.0)
        assert open_fds() == before
    finally:
        for fd in fds:
            os.close(fd)
        a.close()
        b.close()


# --------------------------------------------------------------------------- §5: the RTC, the input


def test_rtc_value_written_in_binary_read_back_in_bcd() -> None:
    """Binary mode (register B bit 2), a time field written, BCD mode, read back."""
    rtc = R.Rtc(clock=lambda: 1_700_000_000.0)

    def reg(index: int, value: int | None = None) -> int:
        rtc.write(0, bytes([index]))
        if value is None:
            return rtc.read(1, 1)[0]
        rtc.write(1, bytes([value]))
        return value
    for set_bit in (0, R.B_SET):
        for field in (R.SEC, R.MIN, R.HOUR, R.DAY, R.MONTH, R.YEAR, R.CENTURY):
            reg(R.REG_B, R.B_24H | R.B_DM_BINARY | set_bit)
            reg(field, 0xC8)                                            # 200: a fine byte, not two BCD digits
            reg(R.REG_B, R.B_24H | set_bit)
            value = reg(field)
            assert value >> 4 <= 9 and value & 0xF <= 9                 # two BCD digits, whatever was stored
            reg(R.REG_B, R.B_24H | R.B_DM_BINARY)                       # SET off: applied (or not, if no date)
    rtc.offset = R._MAX_TS - 1_700_000_000 + 3600                       # the clock ran past 9999-12-31
    assert reg(R.YEAR) is not None and rtc.now().year <= 9999


# --------------------------------------------------------------------------- §5 (and §3): the kind


PORTS = ([(COM1, 8), (R.INDEX_PORT, 2), (K.DATA_PORT, 1), (K.STATUS_PORT, 1), (PM1A_EVT_PORT, PM1A_EVT_LEN),
          (PM1A_CNT_PORT, PM1A_CNT_LEN), (RESET_PORT, 1)])
ADDRESSES = sorted({base + i for base, n in PORTS for i in range(n)})


class LegacyDevices(RuleBasedStateMachine):
    """The PC's legacy devices on a PIO bus, as a vCPU drives them; any access, any size, any value."""

    def __init__(self):
        super().__init__()
        self.clock = Clock(1_700_000_000.0)
        self.lines = {"com1": Line(), "kbd": Line(), "sci": Line()}
        self.out = bytearray()
        self.uart = U.Serial(self.collect, self.lines["com1"])
        self.rtc = R.Rtc(clock=self.clock, mem_size=256 << 20)
        self.kbc = K.I8042(self.lines["kbd"])
        self.pm = AcpiPm(self.lines["sci"])
        self.bus = Bus("pio")
        self.bus.insert(COM1, 8, self.uart, "com1")
        self.bus.insert(R.INDEX_PORT, 2, self.rtc, "rtc")
        self.bus.insert(K.DATA_PORT, 1, self.kbc.data_port, "i8042-data")
        self.bus.insert(K.STATUS_PORT, 1, self.kbc.command_port, "i8042-cmd")
        self.bus.insert(PM1A_EVT_PORT, PM1A_EVT_LEN, self.pm.event, "pm1a-evt")
        self.bus.insert(PM1A_CNT_PORT, PM1A_CNT_LEN, self.pm.control_block, "pm1a-cnt")
        self.bus.insert(RESET_PORT, 1, ResetControl(), "reset")
        self.stops = 0

    def collect(self, data: bytes) -> None:
        self.out += data
        del self.out[:-64]

    def access(self, fn, *args):
        try:
            return fn(*args)
        except GuestStop:           # poweroff / reset: a legitimate end of the machine, not a VMM error
            self.stops += 1

    @rule(addr=st.sampled_from(ADDRESSES), size=st.sampled_from([1, 2, 4]))
    def read(self, addr, size):
        data = self.access(self.bus.read, addr, size)
        assert data is None or len(data) == size

    @rule(addr=st.sampled_from(ADDRESSES), size=st.sampled_from([1, 2, 4]), value=st.integers(0, 0xFFFFFFFF))
    def write(self, addr, size, value):
        self.access(self.bus.write, addr, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))

    @rule(index=st.integers(0, 0xFF), value=st.integers(0, 0xFF), read_back=st.booleans())
    def cmos_register(self, index, value, read_back):
        """An index write then a data access: the RTC's real access pattern (random ports rarely pair up)."""
        self.access(self.bus.write, R.INDEX_PORT, bytes([index]))
        if read_back:
            self.access(self.bus.read, R.INDEX_PORT + 1, 1)
        else:
            self.access(self.bus.write, R.INDEX_PORT + 1, bytes([value]))

    @rule(seconds=st.one_of(st.integers(0, 3), st.integers(0, 1 << 40)))
    def time_passes(self, seconds):
        self.clock.t += seconds

    @rule(data=st.binary(max_size=64), repeat=st.integers(1, 200))
    def host_types(self, data, repeat):
        self.uart.feed(data * repeat)

    @invariant()
    def nothing_raised_and_nothing_grew(self):
        assert self.bus.device_errors == 0, "a device model raised (logged by the bus)"
        assert len(self.uart._rx) <= self.uart.rx_capacity and len(self.uart._backlog) <= U.HOST_BACKLOG
        assert len(self.kbc._out) <= K.OUTPUT_BUFFER_SIZE
        for name, line in self.lines.items():
            assert line.redundant == 0, f"{name}: the line was set to the level it already had"


TestLegacyDevices = LegacyDevices.TestCase
TestLegacyDevices.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)


# --------------------------------------------------------------------------- end to end: a guest does it


def run_asm_guest(tmp_path, name: str, body: str, setup=None):
    from tests.asmguest import build_guest
    from exitless.vm import Machine, VmConfig
    elf = build_guest(tmp_path, name, body)
    with Machine(VmConfig(mem_mib=32, console=lambda b: None)) as m:
        if setup:
            setup(m)
        m.boot_pvh(elf)
        result = m.run(timeout=60)
        assert result.kind == "debug-exit", result
        assert m.pio.device_errors == 0
        return result.status


@pytest.mark.kvm
def test_guest_floods_its_uart_loopback(tmp_path) -> None:
    """A guest writes 5,000 bytes into its loopback and reads LSR twice, then RBR."""
    body = """
    mov $0x3fc, %dx
    mov $0x18, %al                  /* MCR: loopback | OUT2 */
    out %al, %dx
    mov $5000, %ecx
1:  mov $0x3f8, %dx
    mov %cl, %al
    out %al, %dx
    loop 1b
    mov $0x3fd, %dx
    in %dx, %al
    movzbl %al, %ebx                /* LSR: DR | OE | THRE | TEMT */
    in %dx, %al
    movzbl %al, %eax                /* LSR again: OE cleared by the first read */
    shl $8, %eax
    or %eax, %ebx
    mov $0x3f8, %dx
    in %dx, %al
    movzbl %al, %eax                /* RBR: the last character, which overwrote the holding register */
    shl $16, %eax
    or %ebx, %eax
    jmp exit_with_eax
    """
    assert run_asm_guest(tmp_path, "uart", body) == 0x01_61_63


@pytest.mark.kvm
def test_guest_writes_rtc_field_in_binary_and_reads_it_in_bcd(tmp_path) -> None:
    from exitless.boot.linux import add_pc_devices
    body = """
    .macro cmosw reg, val
    mov $\\reg, %al
    out %al, $0x70
    mov $\\val, %al
    out %al, $0x71
    .endm
    cmosw 0x0b, 0x06                /* register B: 24-hour, binary */
    cmosw 0x04, 0xc8                /* hours = 200 */
    cmosw 0x0b, 0x02                /* register B: 24-hour, BCD */
    mov $0x04, %al
    out %al, $0x70
    in $0x71, %al
    movzbl %al, %eax
    jmp exit_with_eax
    """
    assert run_asm_guest(tmp_path, "rtc", body, setup=add_pc_devices) == 0x00   # 200 shows its two digits, "00"
