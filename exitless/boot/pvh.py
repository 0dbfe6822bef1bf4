"""Boot an ELF kernel through the PVH entry (``XEN_ELFNOTE_PHYS32_ENTRY``).

PVH is the simplest x86 boot ABI that Linux's vmlinux, QEMU's ``-kernel`` and
our guest kit all share: load the PT_LOAD segments at their physical
addresses, build an ``hvm_start_info`` (command line, memory map, modules),
and enter in 32-bit flat protected mode with EBX pointing at it.
"""
from __future__ import annotations

from ..errors import ExitlessError
import io
import os
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


@dataclass(frozen=True)
class LoadSegment:
    """One checked PT_LOAD: ``data`` is its p_filesz bytes of file, ``memsz`` >= len(data)."""

    index: int      # its program header's index, for messages
    paddr: int      # guest-physical load address
    vaddr: int
    data: bytes
    memsz: int


#: e_phentsize by ELF class (gABI: Elf32_Phdr, Elf64_Phdr).
_PHENTSIZE = {"ELFCLASS32": 32, "ELFCLASS64": 56}


def elf_load_segments(elf: ELFFile, size: int, name: str) -> list[LoadSegment]:
    """The PT_LOAD segments of ``elf`` (a file of ``size`` bytes), every header checked before use.

    Checked against the file: the program header table and each segment's file bytes
    (``p_offset + p_filesz``) lie within it.  Against itself: ``p_filesz <= p_memsz``
    (ELF gABI, "Program Header"), ``e_phentsize`` is the class's, and no two segments
    overlap in guest-physical memory.  Against the machine: each segment lies between
    1 MiB (below is the boot data: zero page, command line, page tables) and the 32-bit
    MMIO hole (no RAM there).  Segments with ``p_memsz == 0`` are skipped.

    Raises :class:`KernelImageError` naming the field and its values.
    """
    h = elf.header
    if h["e_ident"]["EI_DATA"] != "ELFDATA2LSB":
        raise KernelImageError(f"{name}: e_ident[EI_DATA] is {h['e_ident']['EI_DATA']}: x86 kernels are little-endian")
    phoff, phnum, phentsize = h["e_phoff"], h["e_phnum"], h["e_phentsize"]
    if phnum:
        want = _PHENTSIZE[h["e_ident"]["EI_CLASS"]]
        if phentsize != want:
            raise KernelImageError(f"{name}: e_phentsize is {phentsize}, an {h['e_ident']['EI_CLASS']} "
                                   f"program header is {want} bytes")
        if phoff + phnum * phentsize > size:
            raise KernelImageError(f"{name}: the program headers (e_phoff {phoff:#x}, e_phnum {phnum}, e_phentsize "
                                   f"{phentsize}) run past the end of the {size:#x}-byte file")
    segments: list[LoadSegment] = []
    for i in range(phnum):
        ph = elf.get_segment(i).header
        if ph["p_type"] not in ("PT_LOAD", "PT_NOTE"):
            continue
        what = f"{name}: program header {i} ({ph['p_type']}"
        offset, filesz, memsz, paddr = ph["p_offset"], ph["p_filesz"], ph["p_memsz"], ph["p_paddr"]
        if offset + filesz > size:
            raise KernelImageError(f"{what}): p_offset {offset:#x} + p_filesz {filesz:#x} runs past the end of "
                                   f"the {size:#x}-byte file")
        if ph["p_type"] != "PT_LOAD" or not memsz:
            continue
        what += f" at p_paddr {paddr:#x})"
        if filesz > memsz:
            raise KernelImageError(f"{what}: p_filesz {filesz:#x} is larger than p_memsz {memsz:#x} "
                                   "(the ELF gABI forbids it)")
        if paddr < L.KERNEL_LOAD:
            raise KernelImageError(f"{what}: below 1 MiB, where the boot data goes")
        if paddr + memsz > L.MMIO_HOLE_START:
            raise KernelImageError(f"{what}: p_paddr + p_memsz {memsz:#x} ends at {paddr + memsz:#x}, inside or "
                                   f"above the 32-bit MMIO hole at {L.MMIO_HOLE_START:#x}, where there is no RAM")
        for other in segments:
            if other.paddr < paddr + memsz and paddr < other.paddr + other.memsz:
                raise KernelImageError(f"{what}: p_paddr..+p_memsz {paddr:#x}..{paddr + memsz:#x} overlaps "
                                       f"program header {other.index} at {other.paddr:#x}..{other.paddr + other.memsz:#x}")
        segments.append(LoadSegment(i, paddr, ph["p_vaddr"], elf.get_segment(i).data(), memsz))
    if not segments:
        raise KernelImageError(f"{name}: no loadable segments")
    return segments


def _notes(blob: bytes, what: str):
    """The notes of a PT_NOTE segment: (n_type, name without its NUL, desc); sizes checked against the segment."""
    off = 0
    while off + 12 <= len(blob):
        namesz, descsz, n_type = struct.unpack_from("<III", blob, off)
        name_off = off + 12
        desc_off = name_off + (namesz + 3) // 4 * 4
        end = desc_off + (descsz + 3) // 4 * 4
        if desc_off + descsz > len(blob):
            raise KernelImageError(f"{what}: the note at {off:#x} (n_namesz {namesz:#x}, n_descsz {descsz:#x}) "
                                   f"runs past the segment's {len(blob):#x} bytes")
        yield n_type, blob[name_off:name_off + namesz].rstrip(b"\0"), blob[desc_off:desc_off + descsz]
        off = end


def parse_pvh_elf(data: bytes, name: str = "kernel") -> PvhKernel:
    """Read the PVH entry note and the loadable segments of an ELF image, every header checked
    (:func:`elf_load_segments`); the entry must lie in a segment's file bytes.

    Raises :class:`KernelImageError` naming what is wrong, before anything is loaded.
    """
    if data[:4] != b"\x7fELF":
        raise KernelImageError(f"{name}: not an ELF file (a bzImage needs the Linux loader)")
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf["e_machine"] not in ("EM_X86_64", "EM_386"):
            raise KernelImageError(f"{name}: ELF for {elf['e_machine']}, not x86")
        segments = elf_load_segments(elf, len(data), name)
        entry = None
        for i in range(elf.num_segments()):
            seg = elf.get_segment(i)
            if seg["p_type"] == "PT_NOTE":
                for n_type, n_name, desc in _notes(seg.data(), f"{name}: program header {i} (PT_NOTE)"):
                    if n_name == b"Xen" and n_type == XEN_ELFNOTE_PHYS32_ENTRY:
                        if len(desc) < 4:
                            raise KernelImageError(f"{name}: the PVH entry note's n_descsz is {len(desc)}, "
                                                   "less than a 32-bit address")
                        entry = int.from_bytes(desc[:8] if len(desc) >= 8 else desc[:4], "little")
    except (ELFError, struct.error, ValueError) as e:
        if isinstance(e, KernelImageError):
            raise
        raise KernelImageError(f"{name}: malformed ELF ({e})") from e
    if entry is None:
        raise KernelImageError(f"{name}: no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
    if entry >= 1 << 32:
        raise KernelImageError(f"{name}: PVH entry {entry:#x} is not a 32-bit address")
    if not any(s.paddr <= entry < s.paddr + len(s.data) for s in segments):
        raise KernelImageError(f"{name}: PVH entry {entry:#x} is not inside any PT_LOAD segment's file bytes")
    return PvhKernel(entry, [(s.paddr, s.data, s.memsz) for s in segments])


def load_pvh(mem: GuestMemory, kernel: PvhKernel, cmdline: str, ram: list[tuple[int, int]],
             modules: list[tuple[int, int]] = (), rsdp: int = 0) -> int:
    """Place the kernel and its start info in guest RAM; returns the start-info address (EBX)."""
    raw_cmdline = pvh_cmdline(cmdline)
    for paddr, data, memsz in kernel.segments:
        try:
            mem.write(paddr, data)
            mem.fill(paddr + len(data), memsz - len(data))
        except GuestMemoryError as e:
            raise KernelImageError(f"kernel segment {paddr:#x}+{memsz:#x} does not fit in guest RAM") from e
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


def pvh_cmdline(cmdline: str) -> bytes:
    """The NUL-terminated command line; :class:`KernelImageError` if it holds a NUL or is longer than its page
    allows.  The bytes are the user's (``os.fsencode``: an argument that is not UTF-8 comes back as given)."""
    raw = os.fsencode(cmdline)
    if b"\0" in raw:
        raise KernelImageError("kernel command line contains a NUL byte")
    raw += b"\0"
    if len(raw) > L.CMDLINE_MAX:
        raise KernelImageError(f"command line is {len(raw) - 1} bytes, longer than {L.CMDLINE_MAX - 1}")
    return raw


def pvh_memmap(ram: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """The e820-style map the guest sees (the same one a bzImage gets in its zero page)."""
    return [(e.addr, e.size, e.type) for e in build_e820(ram)]
