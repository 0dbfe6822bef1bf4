"""An i8042 keyboard controller with no keyboard or mouse behind it worth the name.

It exists so that a guest which probes for a PC keyboard controller gets quick,
sane answers instead of timeouts, and so that the classic reset -- command
0xFE ("pulse output line 0") on port 0x64 -- stops the VM with
``VmExit("reset")``.  Linux only probes it when ACPI does not say "no 8042"
(``acpi=off``, ``i8042.nopnp``) or for ``reboot=k``.

Ports: 0x60 data (read output buffer / write data), 0x64 status (read) and
command (write).  Controller commands answered: read/write the configuration
byte (0x20/0x60), controller self-test (0xAA -> 0x55), port tests (0xAB, 0xA9
-> 0x00), port disable/enable (0xAD/0xAE, 0xA7/0xA8), output-port read/write
(0xD0/0xD1; clearing bit 0 resets), loop-back writes (0xD2, 0xD3), write to
the aux device (0xD4: answered with 0xFE, "no device"), and the reset pulse
(0xFE, or any 0xF0-0xFF with bit 0 clear).  Bytes written to the keyboard
are ACKed (0xFA); ``0xFF`` (reset) also returns the self-test pass 0xAA and
``0xF2`` (identify) an MF2 keyboard's ID.  Output bytes raise IRQ 1 (keyboard)
or IRQ 12 (aux) when the configuration byte enables them.

The output side holds at most :data:`OUTPUT_BUFFER_SIZE` bytes (the controller's
output register plus a keyboard's small internal buffer; Linux's i8042 driver
flushes up to 16): a guest that keeps asking for answers without reading them
loses the newest ones, counted in :attr:`I8042.out_dropped`.
"""
from __future__ import annotations

import collections
import threading
from typing import Callable

from ...exits import GuestStop, VmExit

DATA_PORT, STATUS_PORT = 0x60, 0x64
KBD_IRQ, AUX_IRQ = 1, 12

# status register
STS_OBF, STS_IBF, STS_SYS, STS_CMD, STS_AUX_OBF = 0x01, 0x02, 0x04, 0x08, 0x20
# controller configuration byte
CTR_KBDINT, CTR_AUXINT, CTR_SYS, CTR_KBDDIS, CTR_AUXDIS, CTR_XLATE = 0x01, 0x02, 0x04, 0x10, 0x20, 0x40

CMD_READ_CTR, CMD_WRITE_CTR = 0x20, 0x60
CMD_AUX_DISABLE, CMD_AUX_ENABLE, CMD_AUX_TEST = 0xA7, 0xA8, 0xA9
CMD_SELF_TEST, CMD_KBD_TEST, CMD_KBD_DISABLE, CMD_KBD_ENABLE = 0xAA, 0xAB, 0xAD, 0xAE
CMD_READ_INPUT, CMD_READ_OUTPUT, CMD_WRITE_OUTPUT = 0xC0, 0xD0, 0xD1
CMD_WRITE_KBD_OBUF, CMD_WRITE_AUX_OBUF, CMD_WRITE_AUX = 0xD2, 0xD3, 0xD4
CMD_RESET = 0xFE

KBD_ACK, KBD_RESEND, KBD_SELFTEST_OK = 0xFA, 0xFE, 0xAA
KBD_CMD_IDENTIFY, KBD_CMD_RESET = 0xF2, 0xFF
OUTPUT_PORT_RESET_LINE = 0x01   # output port bit 0: 0 = hold the CPU in reset
OUTPUT_PORT_A20 = 0x02
OUTPUT_BUFFER_SIZE = 16         # bytes waiting to be read at port 0x60 (I8042_BUFFER_SIZE in Linux)


class I8042:
    """Both ports in one object: ``read``/``write`` take offsets from 0x60 (0 = data, 4 = status/command).

    Port 0x61 (speaker/NMI status) belongs to KVM's in-kernel PIT, so the bus
    gets two one-port ranges: :attr:`data_port` at 0x60, :attr:`command_port` at 0x64.
    """

    def __init__(self, set_irq: Callable[[int, int], None] | None = None):
        self.set_irq = set_irq or (lambda irq, level: None)
        self._lock = threading.Lock()
        self.ctr = CTR_KBDINT | CTR_SYS | CTR_XLATE   # what a BIOS leaves behind
        self.output_port = OUTPUT_PORT_RESET_LINE | OUTPUT_PORT_A20
        self.status_cmd = False   # last write went to the command port
        self._pending: int | None = None   # controller command waiting for its data byte
        self._out: collections.deque[tuple[int, bool]] = collections.deque()   # (byte, from aux)
        self.out_dropped = 0      # answers lost: the output buffer was full
        self._irq = {KBD_IRQ: 0, AUX_IRQ: 0}
        self.data_port = _Port(self, 0)
        self.command_port = _Port(self, STATUS_PORT - DATA_PORT)

    # bus interface: offset 0 = port 0x60, offset 4 = port 0x64
    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            if offset == 0:
                value = self._read_data()
            elif offset == STATUS_PORT - DATA_PORT:
                value = self._status()
            else:
                value = 0xFF
            self._update_irq()
        return bytes([value]) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            if offset == 0:
                self._write_data(data[0])
            elif offset == STATUS_PORT - DATA_PORT:
                self._command(data[0])
            self._update_irq()

    # -- internals ------------------------------------------------------
    def _status(self) -> int:
        s = STS_SYS if self.ctr & CTR_SYS else 0
        if self.status_cmd:
            s |= STS_CMD
        if self._out:
            s |= STS_OBF | (STS_AUX_OBF if self._out[0][1] else 0)
        return s

    def _read_data(self) -> int:
        if not self._out:
            return 0
        return self._out.popleft()[0]

    def _push(self, value: int, aux: bool = False) -> None:
        if len(self._out) >= OUTPUT_BUFFER_SIZE:
            self.out_dropped += 1
            return
        self._out.append((value & 0xFF, aux))

    def _update_irq(self) -> None:
        head_aux = self._out[0][1] if self._out else None
        want = {KBD_IRQ: int(head_aux is False and bool(self.ctr & CTR_KBDINT)),
                AUX_IRQ: int(head_aux is True and bool(self.ctr & CTR_AUXINT))}
        for irq, level in want.items():
            if level != self._irq[irq]:
                self._irq[irq] = level
                self.set_irq(irq, level)

    def _reset(self, how: str) -> None:
        raise GuestStop(VmExit("reset", 0, f"the guest reset the machine through the i8042 ({how})"))

    def _command(self, cmd: int) -> None:
        self.status_cmd = True
        self._pending = None
        if cmd == CMD_READ_CTR:
            self._push(self.ctr)
        elif cmd in (CMD_WRITE_CTR, CMD_WRITE_OUTPUT, CMD_WRITE_KBD_OBUF, CMD_WRITE_AUX_OBUF, CMD_WRITE_AUX):
            self._pending = cmd
        elif cmd == CMD_AUX_DISABLE:
            self.ctr |= CTR_AUXDIS
        elif cmd == CMD_AUX_ENABLE:
            self.ctr &= ~CTR_AUXDIS
        elif cmd in (CMD_AUX_TEST, CMD_KBD_TEST):
            self._push(0x00)
        elif cmd == CMD_SELF_TEST:
            self._out.clear()
            self._push(0x55)
        elif cmd == CMD_KBD_DISABLE:
            self.ctr |= CTR_KBDDIS
        elif cmd == CMD_KBD_ENABLE:
            self.ctr &= ~CTR_KBDDIS
        elif cmd == CMD_READ_INPUT:
            self._push(0x00)
        elif cmd == CMD_READ_OUTPUT:
            self._push(self.output_port)
        elif 0xF0 <= cmd <= 0xFF:
            if not cmd & OUTPUT_PORT_RESET_LINE:   # 0xFE (and 0xF0, 0xF2...): pulse the reset line
                self._reset(f"command {cmd:#x}")
        # anything else: ignored, as a real controller mostly does

    def _write_data(self, value: int) -> None:
        self.status_cmd = False
        cmd, self._pending = self._pending, None
        if cmd == CMD_WRITE_CTR:
            self.ctr = value
        elif cmd == CMD_WRITE_OUTPUT:
            self.output_port = value
            if not value & OUTPUT_PORT_RESET_LINE:
                self._reset(f"output port {value:#x}")
        elif cmd == CMD_WRITE_KBD_OBUF:
            self._push(value)
        elif cmd == CMD_WRITE_AUX_OBUF:
            self._push(value, aux=True)
        elif cmd == CMD_WRITE_AUX:
            self._push(KBD_RESEND, aux=True)   # no mouse: every byte is refused
        else:
            self._keyboard(value)

    def _keyboard(self, value: int) -> None:
        """A byte for the keyboard itself: ACK everything, answer reset and identify."""
        self._push(KBD_ACK)
        if value == KBD_CMD_RESET:
            self._push(KBD_SELFTEST_OK)
        elif value == KBD_CMD_IDENTIFY:
            self._push(0xAB)
            self._push(0x83)


class _Port:
    """One of the controller's two ports, as a one-port bus device."""

    def __init__(self, dev: I8042, offset: int):
        self.dev, self.offset = dev, offset

    def read(self, offset: int, size: int) -> bytes:
        return self.dev.read(self.offset + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.dev.write(self.offset + offset, data)
