"""A 16550A UART: the guest's console on COM1.

Enough of the chip for Linux's 8250 driver and for polled boot consoles:
divisor latch, FIFO control, line/modem status, scratch, loopback, and the
receiver-line-status, receive-data and transmit-empty interrupts on an IRQ line.

The receiver holds what the chip holds (PC16550D datasheet): a 16-byte FIFO in
FIFO mode (FCR bit 0), one holding register otherwise.  A character that
arrives when it is full is an overrun: in FIFO mode the character is lost, in
character mode it overwrites the holding register; either way LSR.OE is set
until the guest reads LSR (and raises the receiver-line-status interrupt if
IER enables it).  That is how a guest writing into its own loopback sees
overflow.  Host input (:meth:`Serial.feed`, a terminal) waits in a bounded
backlog of :data:`HOST_BACKLOG` bytes and moves into the receiver as the guest
drains it, as a terminal with flow control would; what does not fit in the
backlog is dropped and counted in :attr:`Serial.rx_dropped`.  Transmitted bytes
go straight to ``output`` (nothing is buffered here).
"""
from __future__ import annotations

import collections
import threading
from typing import Callable

# register offsets
RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
IER_RDA, IER_THRE, IER_RLS, IER_MS = 1, 2, 4, 8
IIR_NONE, IIR_THRE, IIR_RDA, IIR_RLS, IIR_FIFO = 0x01, 0x02, 0x04, 0x06, 0xC0
FCR_ENABLE, FCR_CLEAR_RX, FCR_CLEAR_TX = 0x01, 0x02, 0x04
LCR_DLAB = 0x80
MCR_OUT2, MCR_LOOP = 0x08, 0x10
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MSR_CTS, MSR_DSR, MSR_DCD = 0x10, 0x20, 0x80
RX_FIFO_SIZE = 16          # the 16550's receive FIFO
HOST_BACKLOG = 4096        # host input waiting for room in the receiver


class Serial:
    """COM port; ``output`` receives what the guest transmits, ``feed()`` delivers host input."""

    def __init__(self, output: Callable[[bytes], None], set_irq: Callable[[int], None] | None = None):
        self.output = output
        self.set_irq = set_irq or (lambda level: None)
        self._lock = threading.Lock()
        self._rx: collections.deque[int] = collections.deque()       # the receiver: FIFO or holding register
        self._backlog: collections.deque[int] = collections.deque()  # host input not yet received
        self.rx_dropped = 0      # host input bytes dropped: the backlog was full
        self.overruns = 0        # characters lost to a full receiver (LSR.OE events)
        self._overrun = False    # LSR.OE, until LSR is read
        self.ier = 0
        self.lcr = 0x03
        self.mcr = MCR_OUT2
        self.scr = 0
        self.fcr = 0
        self.dll, self.dlm = 0x0C, 0x00  # 9600 baud, what firmware leaves
        self._thre_pending = True
        self._irq_level = 0

    @property
    def rx_capacity(self) -> int:
        """Bytes the receiver holds: the FIFO in FIFO mode, else the one holding register."""
        return RX_FIFO_SIZE if self.fcr & FCR_ENABLE else 1

    # host side
    def feed(self, data: bytes) -> None:
        with self._lock:
            room = HOST_BACKLOG - len(self._backlog)
            self._backlog.extend(data[:max(room, 0)])
            self.rx_dropped += max(len(data) - max(room, 0), 0)
            self._pull_host_input()
            self._update_irq()

    def _pull_host_input(self) -> None:
        """Move host input into the receiver while it has room (not in loopback: SIN is disconnected)."""
        if self.mcr & MCR_LOOP:
            return
        while self._backlog and len(self._rx) < self.rx_capacity:
            self._rx.append(self._backlog.popleft())

    def _receive(self, value: int) -> None:
        """A character arrives at the receiver (loopback): store it, or overrun."""
        if len(self._rx) < self.rx_capacity:
            self._rx.append(value)
            return
        self._overrun = True
        self.overruns += 1
        if not self.fcr & FCR_ENABLE:
            self._rx[-1] = value  # character mode: the new character overwrites the holding register

    # guest side (a BusDevice on the PIO bus)
    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self._read(offset)
            self._pull_host_input()
            self._update_irq()
        return bytes([value]) + b"\0" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._write(offset, data[0])
            self._pull_host_input()
            self._update_irq()

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self.dll
            return self._rx.popleft() if self._rx else 0
        if offset == IER_DLM:
            return self.dlm if dlab else self.ier
        if offset == IIR_FCR:
            fifo = IIR_FIFO if self.fcr & FCR_ENABLE else 0
            if self.ier & IER_RLS and self._overrun:
                return IIR_RLS | fifo
            if self.ier & IER_RDA and self._rx:
                return IIR_RDA | fifo
            if self.ier & IER_THRE and self._thre_pending:
                self._thre_pending = False  # reading IIR acknowledges THRE
                return IIR_THRE | fifo
            return IIR_NONE | fifo
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            value = LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0) | (LSR_OE if self._overrun else 0)
            self._overrun = False  # reading LSR clears the error bits
            return value
        if offset == MSR:
            if self.mcr & MCR_LOOP:  # loopback: outputs feed back to the inputs
                return ((self.mcr & 0x2) << 3) | ((self.mcr & 0x1) << 5) | ((self.mcr & 0x8) << 4) | ((self.mcr & 0x4) << 4)
            return MSR_CTS | MSR_DSR | MSR_DCD
        return self.scr  # SCR

    def _write(self, offset: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self.dll = value
            elif self.mcr & MCR_LOOP:
                self._receive(value)
                self._thre_pending = True
            else:
                self.output(bytes([value]))
                self._thre_pending = True
        elif offset == IER_DLM:
            if dlab:
                self.dlm = value
            else:
                if value & IER_THRE and not self.ier & IER_THRE:
                    self._thre_pending = True  # enabling THRE with an empty THR raises it
                self.ier = value & 0x0F
        elif offset == IIR_FCR:
            if (value ^ self.fcr) & FCR_ENABLE or value & FCR_CLEAR_RX:
                self._rx.clear()  # entering or leaving FIFO mode resets the FIFOs, as does bit 1
            self.fcr = value & ~(FCR_CLEAR_RX | FCR_CLEAR_TX)   # the clear bits are self-clearing
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value

    def _update_irq(self) -> None:
        pending = (self.ier & IER_RLS and self._overrun) or (self.ier & IER_RDA and self._rx) or \
            (self.ier & IER_THRE and self._thre_pending)
        level = 1 if pending and (self.mcr & MCR_OUT2) else 0
        if level != self._irq_level:
            self._irq_level = level
            self.set_irq(level)
