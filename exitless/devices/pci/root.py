"""PCI bus 0 behind the type-1 configuration mechanism (ports 0xCF8/0xCFC), with a host bridge.

Linux probes it with ``pci=conf1`` and no ACPI: the address latch must read
back, and an absent function reads all-ones.  BARs are assigned here (as
firmware would) from the PCI window of the 32-bit hole, naturally aligned.
"""
from __future__ import annotations

import struct
import threading

from ...errors import ExitlessError
from ...x86 import layout as L
from .device import BAR0, COMMAND, PciDevice

# Config-space bytes whose value decides decoding: COMMAND (its Memory Space bit) and BAR0-5.
# A write anywhere else (capabilities, MSI-X control, the interrupt line, ...) cannot change
# what any function decodes, so it does not re-derive the buses (PCI 3.0 §6.2.2, §6.2.5.1).
_DECODE_RANGES = ((COMMAND, COMMAND + 2), (BAR0, BAR0 + 24))

CONFIG_ADDRESS, CONFIG_DATA = 0xCF8, 0xCFC
HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE = 0x1B36, 0x0008   # a generic host bridge, no chipset quirks
CLASS_HOST_BRIDGE = 0x060000
PCI_IRQS = (10, 11, 5, 9)  # INTx GSIs by slot, as the guest's interrupt-line register says


class PciResourceError(ExitlessError, ValueError):
    """No free slot, or no room in the PCI MMIO window, for another device (too many devices asked for)."""


class HostBridge(PciDevice):
    def __init__(self):
        super().__init__(vendor=HOST_BRIDGE_VENDOR, device=HOST_BRIDGE_DEVICE, class_code=CLASS_HOST_BRIDGE,
                         interrupt_pin=0)

    def map_bar(self, index, address):
        pass

    def unmap_bar(self, index, address):
        pass


class PciRoot:
    def __init__(self, pio_bus, window: tuple[int, int] = (L.PCI_MMIO_START, L.PCI_MMIO_END)):
        """``window``: the host bridge's memory window [start, end), where BARs are assigned and decode."""
        self._lock = threading.Lock()
        self.devices: dict[int, PciDevice] = {}
        self.address = 0
        self.window = window
        self._next_bar, self._window_end = window
        self.add(HostBridge(), slot=0)
        pio_bus.insert(CONFIG_ADDRESS, 4, _AddressPort(self), "pci-config-address")
        pio_bus.insert(CONFIG_DATA, 4, _DataPort(self), "pci-config-data")

    def add(self, dev: PciDevice, slot: int | None = None) -> int:
        """Plug ``dev`` into the next free slot, assign its BARs and turn decoding on."""
        if slot is None:
            slot = next((s for s in range(1, 32) if (s << 3) not in self.devices), None)
            if slot is None:
                raise PciResourceError("all 31 PCI slots are taken: too many devices")
        devfn = slot << 3
        if devfn in self.devices:
            raise ValueError(f"PCI slot {slot} is taken")
        for bar in sorted(dev.bars.values(), key=lambda b: -b.size):
            base = (self._next_bar + bar.size - 1) & ~(bar.size - 1)
            if base + bar.size > self._window_end:
                raise PciResourceError(f"the PCI MMIO window is full: no room for {type(dev).__name__}'s BAR{bar.index} "
                                       f"({bar.size:#x} bytes): too many devices")
            dev.set_bar_address(bar.index, base)
            self._next_bar = base + bar.size
        if dev.config[0x3D]:
            dev.intx_gsi = dev.config[0x3C] = PCI_IRQS[slot % 4]
        dev.devfn = devfn
        with self._lock:
            self.devices[devfn] = dev
            if dev.bars:
                dev.enable_decoding()
                self.sync_decoding()
        return slot

    def sync_decoding(self) -> None:
        """Make the buses match every function's config space (PCI 3.0 §6.2.2, §6.2.5.1).

        First every stale mapping goes (a BAR moved, or decoding turned off), then every BAR
        that should decode and is not mapped is mapped, function by function, BAR by BAR.  A
        BAR the buses refuse (it overlaps another: undefined decode) stays unmapped until a
        later config write lets it in.  Called with the lock held.
        """
        # Only a function whose mappings differ from what its config space says has anything to
        # do (the one just written, or one holding a BAR the buses refused): the others cost a
        # dict comparison.
        wants = [(d, d.decoded_bars(self.window)) for _, d in sorted(self.devices.items())]
        for d, want in wants:
            if d.mapped != want:
                d.unmap_stale(want)
        for d, want in wants:
            if d.mapped != want:
                d.map_pending(want)

    def _target(self) -> tuple[PciDevice | None, int]:
        a = self.address
        if not a & 0x8000_0000 or (a >> 16) & 0xFF != 0:
            return None, 0
        return self.devices.get((a >> 8) & 0xFF), a & 0xFC

    def read_data(self, offset: int, size: int) -> bytes:
        with self._lock:
            dev, reg = self._target()
            if dev is None:
                return b"\xff" * size
            return dev.config_read(reg + offset, size).to_bytes(size, "little")

    def write_data(self, offset: int, data: bytes) -> None:
        with self._lock:
            dev, reg = self._target()
            if dev is not None:
                start, end = reg + offset, reg + offset + len(data)
                dev.config_write(start, len(data), int.from_bytes(data, "little"))
                if any(start < hi and lo < end for lo, hi in _DECODE_RANGES):
                    self.sync_decoding()


class _AddressPort:
    def __init__(self, root: PciRoot):
        self.root = root

    def read(self, offset: int, size: int) -> bytes:
        return self.root.address.to_bytes(4, "little")[offset:offset + size]

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0 and len(data) == 4:
            self.root.address = struct.unpack("<I", data)[0] & 0x80FF_FFFC


class _DataPort:
    def __init__(self, root: PciRoot):
        self.root = root

    def read(self, offset: int, size: int) -> bytes:
        return self.root.read_data(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.root.write_data(offset, data)
