"""A PCI function's configuration space: identity, BARs, command register, capabilities.

Config space is a 256-byte array plus a mask of the bits the guest may write.
BAR sizing falls out of the mask (write all-ones, read back ``~(size-1)``).
A device decodes its BARs only while COMMAND.MEMORY is set, as Linux expects
when it clears the bit around sizing; BAR moves and decode changes are handed
to :meth:`PciDevice.bars_changed`, where the device (re)maps its windows.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

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
        self._decoding: dict[int, int] = {}  # bar index -> address currently mapped

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
        old_cmd = self.command
        old_bars = {i: self.bar_address(i) for i in self.bars}
        for i in range(min(size, CONFIG_SIZE - offset)):
            b = (value >> (8 * i)) & 0xFF
            m = self.wmask[offset + i]
            self.config[offset + i] = (self.config[offset + i] & ~m) | (b & m)
        self.config_written(offset, size, value)
        if self.command != old_cmd or any(self.bar_address(i) != a for i, a in old_bars.items()):
            self._update_decoding()

    def config_written(self, offset: int, size: int, value: int) -> None:
        """Hook for capabilities with side effects (MSI-X enable, ...)."""

    @property
    def command(self) -> int:
        return struct.unpack_from("<H", self.config, COMMAND)[0]

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

    def _update_decoding(self) -> None:
        """Map BARs that should decode (memory enabled, non-zero address) and unmap the rest."""
        want = {}
        if self.command & CMD_MEMORY:
            want = {i: self.bar_address(i) for i in self.bars if self.bar_address(i)}
        for i in self.bars:
            old, new = self._decoding.get(i), want.get(i)
            if old != new:
                if old is not None:
                    self.unmap_bar(i, old)
                if new is not None:
                    self.bars[i].address = new
                    self.map_bar(i, new)
        self._decoding = want

    def enable_decoding(self) -> None:
        """What firmware leaves behind: BARs assigned and memory decoding on."""
        struct.pack_into("<H", self.config, COMMAND, self.command | CMD_MEMORY | CMD_BUS_MASTER)
        self._update_decoding()

    # -- what a device implements --------------------------------------------
    def map_bar(self, index: int, address: int) -> None:
        raise NotImplementedError

    def unmap_bar(self, index: int, address: int) -> None:
        raise NotImplementedError
