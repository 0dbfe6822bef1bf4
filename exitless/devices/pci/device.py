"""A PCI function's configuration space: identity, BARs, command register, capabilities, INTx.

Config space is a 256-byte array plus a mask of the bits the guest may write.
BAR sizing falls out of the mask (write all-ones, read back ``~(size-1)``).

Decoding (PCI 3.0 §6.2.2, §6.2.5.1): while COMMAND.MEMORY is set, the function
responds at the addresses in its BARs.  What is actually mapped is kept in
:attr:`PciDevice.mapped` and reconciled with config space by the bus
(:meth:`exitless.devices.pci.root.PciRoot.sync_decoding`) after every config
write: stale ranges are unmapped first, then every BAR that should decode and
does not is mapped.  A map the buses refuse (the guest made BARs overlap: a
guest error with undefined decode) leaves that BAR unmapped -- the others are
mapped regardless -- and is retried at the next config write, so once the
guest restores a valid layout every BAR decodes where config space says.

INTx (PCI 3.0 §6.2.2-6.2.3): the line's level is a function of state, recomputed
by :meth:`PciDevice.update_intx` whenever it may change: STATUS.INTERRUPT
(bit 3) shows the device's pending interrupt, and the line is asserted while
that bit is set and COMMAND.INTERRUPT_DISABLE (bit 10) is clear.
"""
from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass

from ...bus import BusError

log = logging.getLogger(__name__)

COMMAND, STATUS = 0x04, 0x06
CMD_IO, CMD_MEMORY, CMD_BUS_MASTER, CMD_INTX_DISABLE = 0x1, 0x2, 0x4, 0x400
STATUS_CAP_LIST, STATUS_INTX = 0x10, 0x08
BAR0 = 0x10
BAR_TYPE_64 = 0x4   # memory BAR type bits [2:1] = 10b
CAP_PTR, INTERRUPT_LINE, INTERRUPT_PIN = 0x34, 0x3C, 0x3D
CONFIG_SIZE = 256


@dataclass
class Bar:
    index: int
    size: int          # a power of two, at least 4 KiB
    address: int = 0   # assigned by the bus, or moved by the guest
    is64: bool = False  # a 64-bit memory BAR: it also takes the next BAR register (the high dword)

    def __post_init__(self):
        if self.is64 and self.index == 5:
            raise ValueError("BAR5 cannot be 64-bit: the high dword would be BAR6")
        if self.size < 4096 or self.size & (self.size - 1):
            raise ValueError(f"BAR{self.index}: size {self.size:#x} must be a power of two >= 4 KiB")


class PciDevice:
    def __init__(self, *, vendor: int, device: int, class_code: int, revision: int = 0,
                 subsystem_vendor: int = 0, subsystem: int = 0, bars: list[Bar] = (), interrupt_pin: int = 1):
        self.config = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.bars = {b.index: b for b in bars}
        struct.pack_into("<HH", self.config, 0, vendor, device)
        struct.pack_into("<I", self.config, 0x08, (class_code << 8) | revision)
        struct.pack_into("<HH", self.config, 0x2C, subsystem_vendor, subsystem)
        self.config[INTERRUPT_PIN] = interrupt_pin
        self._mask(COMMAND, 2, CMD_IO | CMD_MEMORY | CMD_BUS_MASTER | CMD_INTX_DISABLE)
        self.wmask[INTERRUPT_LINE] = 0xFF
        for b in bars:
            self._mask(BAR0 + 4 * b.index, 4, ~(b.size - 1) & 0xFFFFFFF0)
            if b.is64:
                self.config[BAR0 + 4 * b.index] = BAR_TYPE_64
                self._mask(BAR0 + 4 * b.index + 4, 4, 0xFFFFFFFF)
        self._last_cap = None
        self.devfn = None
        self.mapped: dict[int, int] = {}      # bar index -> address where it is mapped on the buses now
        self.map_refusals = 0                 # BAR maps the buses refused (overlapping BARs)
        self._decoded_key: tuple | None = None  # decoded_bars()'s memo: (COMMAND, BARs, window) -> dict
        self._decoded: dict[int, int] = {}
        # INTx: the GSI is the slot's wiring, fixed when the function is plugged in (the guest-writable
        # Interrupt Line register is only a note for its driver).
        self.intx_gsi: int | None = None
        self._intx_lock = threading.Lock()
        self._intx_level = 0

    def _mask(self, offset: int, size: int, bits: int) -> None:
        self.wmask[offset:offset + size] = (bits & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    # -- capabilities ----------------------------------------------------
    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (``body`` excludes the id/next bytes); returns its offset."""
        offset = 0x40 if self._last_cap is None else (self._last_cap + self._cap_len + 3) & ~3
        length = 2 + len(body)
        if offset + length > CONFIG_SIZE:
            raise ValueError("PCI capability list overflows config space")
        self.config[offset] = cap_id
        self.config[offset + 2:offset + length] = body
        if writable:
            self.wmask[offset + 2:offset + 2 + len(writable)] = writable
        if self._last_cap is None:
            self.config[CAP_PTR] = offset
            struct.pack_into("<H", self.config, STATUS, struct.unpack_from("<H", self.config, STATUS)[0] | STATUS_CAP_LIST)
        else:
            self.config[self._last_cap + 1] = offset
        self._last_cap, self._cap_len = offset, length
        return offset

    # -- config access (from the bus) --------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A guest write; the caller (the bus) then reconciles decoding (:meth:`PciRoot.sync_decoding`)."""
        old_cmd = self.command
        for i in range(min(size, CONFIG_SIZE - offset)):
            b = (value >> (8 * i)) & 0xFF
            m = self.wmask[offset + i]
            self.config[offset + i] = (self.config[offset + i] & ~m) | (b & m)
        self.config_written(offset, size, value)
        if (self.command ^ old_cmd) & CMD_INTX_DISABLE:
            self.update_intx()

    def config_written(self, offset: int, size: int, value: int) -> None:
        """Hook for capabilities with side effects (MSI-X enable, ...)."""

    @property
    def command(self) -> int:
        return struct.unpack_from("<H", self.config, COMMAND)[0]

    @property
    def pci_status(self) -> int:
        """The STATUS register (offset 0x06)."""
        return struct.unpack_from("<H", self.config, STATUS)[0]

    def bar_address(self, index: int) -> int:
        lo = struct.unpack_from("<I", self.config, BAR0 + 4 * index)[0] & 0xFFFFFFF0
        if self.bars[index].is64:
            lo |= struct.unpack_from("<I", self.config, BAR0 + 4 * index + 4)[0] << 32
        return lo

    def set_bar_address(self, index: int, address: int) -> None:
        bar = self.bars[index]
        struct.pack_into("<I", self.config, BAR0 + 4 * index, (address & 0xFFFFFFF0) | (BAR_TYPE_64 if bar.is64 else 0))
        if bar.is64:
            struct.pack_into("<I", self.config, BAR0 + 4 * index + 4, address >> 32)
        bar.address = address

    # -- decoding ---------------------------------------------------------------
    def decoded_bars(self, window: tuple[int, int]) -> dict[int, int]:
        """{bar index: address} of the BARs that decode according to config space.

        COMMAND.MEMORY set, a non-zero address, and the whole BAR inside the host
        bridge's PCI ``window`` [start, end) -- an address outside it (RAM, the
        irqchip) never reaches the PCI bus.  The dict is shared (kept until COMMAND
        or a BAR register changes): do not modify it.
        """
        # A pure function of COMMAND, the BAR registers and the window: recomputed only when one
        # changed (the bus asks after every config write that may move a BAR, for every function).
        key = (bytes(self.config[COMMAND:COMMAND + 2]), bytes(self.config[BAR0:BAR0 + 24]), window)
        if key == self._decoded_key:
            return self._decoded
        want = {}
        if self.command & CMD_MEMORY:
            lo, hi = window
            for i, bar in self.bars.items():
                a = self.bar_address(i)
                if a and lo <= a and a + bar.size <= hi:
                    want[i] = a
        self._decoded_key, self._decoded = key, want
        return want

    def unmap_stale(self, want: dict[int, int]) -> None:
        """Unmap every BAR mapped where ``want`` (:meth:`decoded_bars`) no longer says it decodes."""
        for i, addr in sorted(self.mapped.items()):
            if want.get(i) != addr:
                self.unmap_bar(i, addr)
                del self.mapped[i]

    def map_pending(self, want: dict[int, int]) -> bool:
        """Map every BAR of ``want`` (:meth:`decoded_bars`) that is not mapped; True if any got mapped.

        A map the buses refuse (:class:`BusError`: the range overlaps another BAR) leaves
        that BAR unmapped, to be retried; the other BARs are mapped regardless.
        """
        progress = False
        for i, addr in sorted(want.items()):
            if i in self.mapped:
                continue
            try:
                self.map_bar(i, addr)
            except BusError as e:
                self.map_refusals += 1
                if self.map_refusals <= 10:   # the message, not the exception: its traceback holds vCPU frames
                    log.warning("PCI %02x.%d BAR%d at %#x not decoded: %s", (self.devfn or 0) >> 3,
                                (self.devfn or 0) & 7, i, addr, str(e))
                continue
            self.bars[i].address = addr
            self.mapped[i] = addr
            progress = True
        return progress

    def enable_decoding(self) -> None:
        """What firmware leaves behind: BARs assigned and memory decoding on (the bus then syncs)."""
        struct.pack_into("<H", self.config, COMMAND, self.command | CMD_MEMORY | CMD_BUS_MASTER)

    # -- INTx ------------------------------------------------------------------
    def intx_pending(self) -> bool:
        """The device's own interrupt condition (what STATUS.INTERRUPT shows); a device overrides it."""
        return False

    def update_intx(self) -> None:
        """Recompute STATUS.INTERRUPT and the INTx level from state; drive the line if the level changed.

        Call after anything :meth:`intx_pending` depends on, and after COMMAND.INTERRUPT_DISABLE changes.
        Safe from any thread: the last caller leaves the line matching the state it saw.
        """
        with self._intx_lock:
            pending = self.intx_pending()
            status = self.pci_status & ~STATUS_INTX | (STATUS_INTX if pending else 0)
            struct.pack_into("<H", self.config, STATUS, status)
            level = int(pending and not self.command & CMD_INTX_DISABLE)
            if level != self._intx_level and self.intx_gsi is not None:
                self._intx_level = level
                self.drive_intx(self.intx_gsi, level)

    @property
    def intx_level(self) -> int:
        """The level this function drives on its INTx line now."""
        return self._intx_level

    # -- what a device implements --------------------------------------------
    def drive_intx(self, gsi: int, level: int) -> None:
        """Set the INTx line (GSI ``gsi``) to ``level``; only devices with an interrupt pin need it."""
        raise NotImplementedError

    def map_bar(self, index: int, address: int) -> None:
        """Put BAR ``index`` on the buses at ``address``; raise :class:`BusError` (having mapped nothing)
        if the range is taken."""
        raise NotImplementedError

    def unmap_bar(self, index: int, address: int) -> None:
        raise NotImplementedError
