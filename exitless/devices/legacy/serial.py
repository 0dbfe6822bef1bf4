"""A 16550A UART: the guest's console on COM1.

Enough of the chip for Linux's 8250 driver and for polled boot consoles:
divisor latch, FIFO control, line/modem status, scratch, loopback, and the
receive-data / transmit-empty interrupts on an IRQ line.
"""
from __future__ import annotations

import collections
import threading
from typing import Callable

# register offsets
RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
IER_RDA, IER_THRE, IER_RLS, IER_MS = 1, 2, 4, 8
IIR_NONE, IIR_THRE, IIR_RDA, IIR_FIFO = 0x01, 0x02, 0x04, 0xC0
LCR_DLAB = 0x80
MCR_OUT2, MCR_LOOP = 0x08, 0x10
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
MSR_CTS, MSR_DSR, MSR_DCD = 0x10, 0x20, 0x80
RX_FIFO_SIZE = 64


class Serial:
    """COM port; ``output`` receives what the guest transmits, ``feed()`` delivers host input."""

    def __init__(self, output: Callable[[bytes], None], set_irq: Callable[[int], None] | None = None):
        self.output = output
        self.set_irq = set_irq or (lambda level: None)
        self._lock = threading.Lock()
        self._rx: collections.deque[int] = collections.deque()
        self.ier = 0
        self.lcr = 0x03
        self.mcr = MCR_OUT2
        self.scr = 0
        self.fcr = 0
        self.dll, self.dlm = 0x0C, 0x00  # 9600 baud, what firmware leaves
        self._thre_pending = True
        self._irq_level = 0

    # host side
    def feed(self, data: bytes) -> None:
        with self._lock:
            for b in data:
                if len(self._rx) < RX_FIFO_SIZE * 64:
                    self._rx.append(b)
            self._update_irq()

    # guest side (a BusDevice on the PIO bus)
    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self._read(offset)
            self._update_irq()
        return bytes([value]) + b"\0" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._write(offset, data[0])
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
            fifo = IIR_FIFO if self.fcr & 1 else 0
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
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
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
                self._rx.append(value)
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
            self.fcr = value
            if value & 0x2:
                self._rx.clear()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value

    def _update_irq(self) -> None:
        pending = (self.ier & IER_RDA and self._rx) or (self.ier & IER_THRE and self._thre_pending)
        level = 1 if pending and (self.mcr & MCR_OUT2) else 0
        if level != self._irq_level:
            self._irq_level = level
            self.set_irq(level)
