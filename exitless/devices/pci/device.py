"""A PCI function's configuration space: identity, BARs, command register, capabilities.

Config space is a 256-byte array plus a mask of the bits the guest may write.
BAR sizing falls out of the mask (write all-ones, read back ``~(size-1)``).
A device decodes its BARs only while COMMAND.MEMORY is set, as Linux expects
when it clears the bit around sizing; BAR moves and decode changes are handed
to :meth:`PciDevice.bars_changed`, where the device (re)maps its windows.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from ...errors import ExitlessError

log = logging.getLogger(__name__)

COMMAND, STATUS = 0x04, 0x06
CMD_IO, CMD_MEMORY, CMD_BUS_MASTER, CMD_INTX_DISABLE = 0x1, 0x2, 0x4, 0x400
STATUS_CAP_LIST, STATUS_INTX = 0x10, 0x08
BAR0 = 0x10
CAP_PTR, INTERRUPT_LINE, INTERRUPT_PIN = 0x34, 0x3C, 0x3D
CONFIG_SIZE = 256


@dataclass
class Bar:
    index: int
    size: int          # a power of two, at least 4 KiB
    address: int = 0   # assigned by the bus, or moved by the guest

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
        self._last_cap = None
        self.devfn = None
        self._decoding: dict[int, int] = {}  # bar index -> address currently mapped
        self._undecodable: set[tuple[int, int]] = set()  # (bar, address) wanted but in conflict

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
        return struct.unpack_from("<I", self.config, BAR0 + 4 * index)[0] & 0xFFFFFFF0

    def set_bar_address(self, index: int, address: int) -> None:
        struct.pack_into("<I", self.config, BAR0 + 4 * index, address)
        self.bars[index].address = address

    def _update_decoding(self) -> None:
        """Map BARs that should decode (memory enabled, non-zero address) and unmap the rest."""
        want = {}
        if self.command & CMD_MEMORY:
            want = {i: self.bar_address(i) for i in self.bars if self.bar_address(i)}
        changed = [i for i in self.bars if self._decoding.get(i) != want.get(i)]
        for i in changed:            # unmap first: a guest swapping two BARs frees the place it moves to
            if i in self._decoding:
                self.unmap_bar(i, self._decoding.pop(i))
        for i in changed:
            if i in want:
                self.bars[i].address = want[i]
                try:
                    self.map_bar(i, want[i])
                except ExitlessError as e:
                    # The guest placed the BAR over another window or over RAM (PCI leaves
                    # overlapping BARs undefined): it does not decode while the conflict lasts;
                    # retry_decoding() maps it once the other window moved away.
                    if (i, want[i]) not in self._undecodable:
                        log.warning("PCI %s BAR%d at %#x not decoded: %s", self.devfn, i, want[i], e)
                    self._undecodable.add((i, want[i]))
                    continue
                self._decoding[i] = want[i]
        self._undecodable = {(i, a) for i, a in self._undecodable if want.get(i) == a and i not in self._decoding}

    def retry_decoding(self) -> None:
        """Map the BARs that could not decode because of a conflict (the bus calls this when
        another function's windows changed)."""
        if self._undecodable:
            self._update_decoding()

    def enable_decoding(self) -> None:
        """What firmware leaves behind: BARs assigned and memory decoding on."""
        struct.pack_into("<H", self.config, COMMAND, self.command | CMD_MEMORY | CMD_BUS_MASTER)
        self._update_decoding()

    # -- what a device implements --------------------------------------------
    def map_bar(self, index: int, address: int) -> None:
        raise NotImplementedError

    def unmap_bar(self, index: int, address: int) -> None:
        raise NotImplementedError
