"""Boot an ELF kernel through the PVH entry (``XEN_ELFNOTE_PHYS32_ENTRY``).

PVH is the simplest x86 boot ABI that Linux's vmlinux, QEMU's ``-kernel`` and
our guest kit all share: load the PT_LOAD segments at their physical
addresses, build an ``hvm_start_info`` (command line, memory map, modules),
and enter in 32-bit flat protected mode with EBX pointing at it.
"""
from __future__ import annotations

from ..errors import ExitlessError
import io
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.construct import ConstructError
from elftools.elf.elffile import ELFFile

from ..memory import GuestMemory, GuestMemoryError
from .e820 import build_e820
from ..x86 import layout as L

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
HVM_START_INFO = struct.Struct("<IIIIQQQQII")   # version 1, 56 bytes
HVM_MEMMAP_ENTRY = struct.Struct("<QQII")
HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")


class KernelImageError(ExitlessError, ValueError):
    """The file is not a kernel we can boot (with the reason)."""


@dataclass
class PvhKernel:
    entry: int
    segments: list[tuple[int, bytes, int]]  # (paddr, file bytes, memsz)

    @property
    def end(self) -> int:
        return max(p + m for p, _, m in self.segments)


def parse_pvh_elf(data: bytes, name: str = "kernel") -> PvhKernel:
    """Read the PVH entry note and the loadable segments of an ELF image."""
    if data[:4] != b"\x7fELF":
        raise KernelImageError(f"{name}: not an ELF file (a bzImage needs the Linux loader)")
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf["e_machine"] not in ("EM_X86_64", "EM_386"):
            raise KernelImageError(f"{name}: ELF for {elf['e_machine']}, not x86")
        entry = None
        segments = []
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_NOTE":
                for note in seg.iter_notes():
                    if note["n_name"] == "Xen" and note["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY:
                        desc = note["n_descdata"]
                        raw = desc if isinstance(desc, bytes) else desc.encode("latin-1")
                        entry = int.from_bytes(raw[:8] if len(raw) >= 8 else raw[:4], "little")
            elif seg["p_type"] == "PT_LOAD" and seg["p_memsz"]:
                segments.append((seg["p_paddr"], seg.data(), seg["p_memsz"]))
    except (ELFError, ConstructError, struct.error, ValueError, OverflowError) as e:   # pyelftools' errors
        if isinstance(e, KernelImageError):
            raise
        raise KernelImageError(f"{name}: malformed ELF ({e})") from e
    if entry is None:
        raise KernelImageError(f"{name}: no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
    if not segments:
        raise KernelImageError(f"{name}: no loadable segments")
    if entry >= 1 << 32:
        raise KernelImageError(f"{name}: PVH entry {entry:#x} is not a 32-bit address")
    return PvhKernel(entry, segments)


def load_pvh(mem: GuestMemory, kernel: PvhKernel, cmdline: str, ram: list[tuple[int, int]],
             modules: list[tuple[int, int]] = (), rsdp: int = 0) -> int:
    """Place the kernel and its start info in guest RAM; returns the start-info address (EBX)."""
    for paddr, data, memsz in kernel.segments:
        if paddr < L.KERNEL_LOAD:
            raise KernelImageError(f"segment at {paddr:#x} overlaps the boot area below 1 MiB")
        try:
            mem.write(paddr, data)
            mem.fill(paddr + len(data), memsz - len(data))
        except GuestMemoryError as e:
            raise KernelImageError(f"kernel segment {paddr:#x}+{memsz:#x} does not fit in guest RAM") from e
    raw_cmdline = cmdline.encode() + b"\0"
    if len(raw_cmdline) > L.CMDLINE_MAX:
        raise KernelImageError(f"command line longer than {L.CMDLINE_MAX} bytes")
    mem.write(L.CMDLINE, raw_cmdline)
    memmap = pvh_memmap(ram)
    for i, (addr, size, typ) in enumerate(memmap):
        mem.write(L.PVH_MEMMAP + i * HVM_MEMMAP_ENTRY.size, HVM_MEMMAP_ENTRY.pack(addr, size, typ, 0))
    for i, (addr, size) in enumerate(modules):
        mem.write(L.PVH_MODLIST + i * HVM_MODLIST_ENTRY.size, HVM_MODLIST_ENTRY.pack(addr, size, 0, 0))
    info = HVM_START_INFO.pack(HVM_START_MAGIC, 1, 0, len(modules), L.PVH_MODLIST if modules else 0,
                               L.CMDLINE, rsdp, L.PVH_MEMMAP, len(memmap), 0)
    mem.write(L.PVH_START_INFO, info)
    return L.PVH_START_INFO


def pvh_memmap(ram: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """The e820-style map the guest sees (the same one a bzImage gets in its zero page)."""
    return [(e.addr, e.size, e.type) for e in build_e820(ram)]
