"""The 64-bit entry state of Linux's boot protocol, built by the VMM instead of firmware.

Documentation/arch/x86/boot.rst ("64-bit BOOT PROTOCOL"): the kernel is entered
in long mode with paging on, the range holding the kernel, the zero page and
the command line identity-mapped, a GDT whose ``__BOOT_CS`` (0x10) is a flat
64-bit code segment and ``__BOOT_DS`` (0x18) a flat data segment (CS and
DS/ES/SS loaded with them), interrupts off and RSI pointing at ``boot_params``.

The page tables here identity-map the first 4 GiB with 2 MiB pages: one PML4
entry, one PDPT with four entries, four page directories of 512 entries.  They
live in low RAM at ``layout.PML4_START`` (6 pages, below the command line);
the kernel replaces them with its own very early and never looks back.
"""
from __future__ import annotations

import struct

from ..kvm import structs as S
from ..kvm.api import Vcpu
from ..memory import GuestMemory
from . import layout as L
from .cpu import CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME

PAGE = 4096
PTE_PRESENT, PTE_RW, PTE_PS = 1 << 0, 1 << 1, 1 << 7
IDENTITY_GIB = 4                      # first 4 GiB, as 2 MiB pages

PML4_GPA = L.PML4_START
PDPT_GPA = PML4_GPA + PAGE
PD_GPA = PDPT_GPA + PAGE              # IDENTITY_GIB consecutive pages
PAGE_TABLES_END = PD_GPA + IDENTITY_GIB * PAGE

BOOT_CS, BOOT_DS, BOOT_TSS = 0x10, 0x18, 0x20   # Linux's __BOOT_CS / __BOOT_DS
GDT_GPA = L.BOOT_GDT
#: null, null, 64-bit code, data, 32-bit TSS (a TSS is needed only so TR is valid)
GDT_ENTRIES = (0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00008B0000000067)

CR0_MP, CR0_WP, CR0_AM = 1 << 1, 1 << 16, 1 << 18
CR4_PGE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 7, 1 << 9, 1 << 10
EFER_SCE = 1 << 0

assert PAGE_TABLES_END <= L.CMDLINE, "the boot page tables must stay below the command line"


def identity_page_tables(gib: int = IDENTITY_GIB) -> list[tuple[int, bytes]]:
    """``[(gpa, 4 KiB page), ...]``: PML4, PDPT and ``gib`` page directories (2 MiB pages)."""
    if not 1 <= gib <= 512:
        raise ValueError("identity map of 1..512 GiB")
    pml4 = bytearray(PAGE)
    struct.pack_into("<Q", pml4, 0, PDPT_GPA | PTE_PRESENT | PTE_RW)
    pdpt = bytearray(PAGE)
    pages = [(PML4_GPA, bytes(pml4)), (PDPT_GPA, b"")]
    for g in range(gib):
        pd_gpa = PD_GPA + g * PAGE
        struct.pack_into("<Q", pdpt, 8 * g, pd_gpa | PTE_PRESENT | PTE_RW)
        pd = struct.pack("<512Q", *(((g << 30) | (i << 21)) | PTE_PRESENT | PTE_RW | PTE_PS for i in range(512)))
        pages.append((pd_gpa, pd))
    pages[1] = (PDPT_GPA, bytes(pdpt))
    return pages


def gdt_bytes() -> bytes:
    return struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES)


def write_boot_tables(mem: GuestMemory) -> None:
    """Write the GDT and the identity page tables into guest RAM."""
    for gpa, page in identity_page_tables():
        mem.write(gpa, page)
    mem.write(GDT_GPA, gdt_bytes())


def _segment(selector: int) -> S.kvm_segment:
    """The hidden part of a segment register, exactly as the GDT entry would load it."""
    desc = GDT_ENTRIES[selector >> 3]
    access = (desc >> 40) & 0xFF
    flags = (desc >> 52) & 0xF
    return S.kvm_segment(base=0, limit=0xFFFFFFFF if flags & 0x8 else 0xFFFF, selector=selector,
                         type=access & 0xF, s=(access >> 4) & 1, dpl=(access >> 5) & 3, present=access >> 7,
                         avl=flags & 1, l=(flags >> 1) & 1, db=(flags >> 2) & 1, g=(flags >> 3) & 1)


def set_long_mode_entry(vcpu: Vcpu, entry: int, *, rsi: int = 0, rsp: int = 0) -> None:
    """Enter ``entry`` in 64-bit mode with the tables of :func:`write_boot_tables`, RSI as given."""
    sregs = vcpu.get_sregs()
    sregs.cs = _segment(BOOT_CS)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _segment(BOOT_DS))
    tr = _segment(BOOT_TSS)
    tr.limit = 0x67
    sregs.tr = tr
    sregs.ldt = S.kvm_segment(type=0x2, present=1, unusable=1)
    sregs.gdt = S.kvm_dtable(base=GDT_GPA, limit=len(GDT_ENTRIES) * 8 - 1)
    sregs.idt = S.kvm_dtable(base=0, limit=0)
    sregs.cr3 = PML4_GPA
    sregs.cr4 = CR4_PAE
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    vcpu.set_regs(S.kvm_regs(rip=entry, rsi=rsi, rsp=rsp, rflags=0x2))
    vcpu.set_fpu(S.kvm_fpu(fcw=0x37F, mxcsr=0x1F80))
