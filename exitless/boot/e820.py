"""The BIOS e820 memory map a directly-booted Linux guest is given in its zero page.

With no firmware in the guest, the e820 map is the kernel's only description of
which guest-physical addresses are RAM.  The layout mimics a PC closely enough
that Linux's early code is content:

* ``[0, 0x9FC00)`` usable: conventional memory.  Linux needs low RAM for the
  real-mode trampoline that starts the other CPUs (SMP), so it must be RAM.
* ``[0x9FC00, 0xA0000)`` reserved: where a BIOS keeps its EBDA.
* ``[0xA0000, 0xE0000)`` absent: the legacy VGA/option-ROM hole.
* ``[0xE0000, 0x100000)`` reserved: the BIOS area, where exitless puts the ACPI
  tables (Linux scans it for the RSDP) -- reserved so the kernel never reuses it.
* RAM from 1 MiB up, as the VMM mapped it; the 32-bit PCI MMIO hole
  (default ``[0xC0000000, 4 GiB)``) is left out of the map entirely so the
  kernel's PCI code sees it as free address space for BARs.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5

LOW_RAM_END = 0x9FC00
EBDA_START = 0x9FC00
EBDA_END = 0xA0000
BIOS_AREA_START = 0xE0000
BIOS_AREA_END = 0x100000
HIGH_RAM_START = 0x100000
PCI_HOLE_START = 0xC0000000
PCI_HOLE_END = 0x1_0000_0000
#: The default 32-bit PCI hole; matches the ACPI PCI0 MMIO window default (plus IO-APIC/LAPIC pages).
PCI_HOLE = (PCI_HOLE_START, PCI_HOLE_END)

_ENTRY = struct.Struct("<QQI")


@dataclass(frozen=True, order=True)
class E820Entry:
    """One ``struct boot_e820_entry``: ``[addr, addr+size)`` of ``type``."""

    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size

    def pack(self) -> bytes:
        """The 20-byte little-endian form stored at boot_params.e820_table."""
        return _ENTRY.pack(self.addr, self.size, self.type)


def ram_layout(mem_size: int, *, pci_hole: tuple[int, int] = PCI_HOLE) -> list[tuple[int, int]]:
    """Split ``mem_size`` bytes of guest RAM around the PCI hole, as a PC would (see
    :func:`exitless.memory.x86_layout`); feed it to both the memory setup and :func:`build_e820`."""
    from ..memory import x86_layout

    if mem_size <= HIGH_RAM_START:
        raise ValueError(f"guest RAM of {mem_size:#x} bytes is too small; Linux needs more than 1 MiB")
    return x86_layout(mem_size, *pci_hole)


def build_e820(
    ram: Iterable[tuple[int, int]],
    *,
    pci_hole: tuple[int, int] = PCI_HOLE,
    reserved: Iterable[E820Entry | tuple[int, int, int]] = (),
) -> list[E820Entry]:
    """The sorted e820 map for guest RAM regions ``[(gpa, size), ...]``.

    ``reserved`` adds entries (e.g. ``(gpa, size, E820_ACPI)``) that are carved
    out of RAM where they overlap it.  RAM overlapping the PCI hole is an error:
    MMIO would shadow it and the guest would corrupt memory it thinks it owns.
    """
    regions = sorted((g, s) for g, s in ram if s > 0)
    for (g1, s1), (g2, _) in zip(regions, regions[1:]):
        if g1 + s1 > g2:
            raise ValueError(f"RAM regions overlap at {g2:#x}")
    hole_start, hole_end = pci_hole
    for g, s in regions:
        if g < hole_end and g + s > hole_start:
            raise ValueError(f"RAM [{g:#x}, {g + s:#x}) overlaps the PCI hole [{hole_start:#x}, {hole_end:#x})")

    fixed = [E820Entry(EBDA_START, EBDA_END - EBDA_START, E820_RESERVED),
             E820Entry(BIOS_AREA_START, BIOS_AREA_END - BIOS_AREA_START, E820_RESERVED)]
    extra = [e if isinstance(e, E820Entry) else E820Entry(*e) for e in reserved]
    holes = [(e.addr, e.end) for e in fixed + extra] + [(LOW_RAM_END, HIGH_RAM_START)]

    usable: list[tuple[int, int]] = []
    for g, s in regions:
        usable.extend(_subtract((g, g + s), holes))
    entries = [E820Entry(a, b - a, E820_RAM) for a, b in _merge(usable)]
    entries += fixed + extra
    entries.sort()
    for a, b in zip(entries, entries[1:]):
        if a.end > b.addr:
            raise ValueError(f"e820 entries overlap: {a} and {b}")
    return entries


def _subtract(span: tuple[int, int], holes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    pieces = [span]
    for hs, he in holes:
        nxt = []
        for a, b in pieces:
            if he <= a or hs >= b:
                nxt.append((a, b))
                continue
            if a < hs:
                nxt.append((a, hs))
            if he < b:
                nxt.append((he, b))
        pieces = nxt
    return pieces


def _merge(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
