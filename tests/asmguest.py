"""Build tiny PVH guests from a few lines of 32-bit assembly, for vCPU and bus tests."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

HEADER = r"""
    .code32
    .section .note.Xen, "a", @note
    .balign 4
    .long 4, 4, 18          /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start
    .text
    .globl _start
_start:
    mov $0x90000, %esp
"""
LINKER_SCRIPT = """
ENTRY(_start)
SECTIONS {
    . = 0x100000;
    .text : { *(.text) }
    .note : { *(.note.Xen) }
    .data : { *(.data) }
    .bss : { *(.bss) }
}
"""
# Enter long mode with static identity page tables (2 MiB pages over the first 1 GiB);
# on software-nested KVM only paged 64-bit code runs natively.
LONG_MODE_PROLOGUE = r"""
    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax              /* PAE */
    mov %eax, %cr4
    mov $0xc0000080, %ecx       /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax        /* PG | PE */
    mov %eax, %cr0
    lgdt gdt64_ptr
    ljmp $0x08, $long_entry
    .code64
long_entry:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x90000, %rsp
"""
LONG_MODE_DATA = r"""
    .balign 4096
pml4: .long pdpt + 0x3, 0
    .fill 511, 8, 0
pdpt: .long pd + 0x3, 0
    .fill 511, 8, 0
pd:
    .set i, 0
    .rept 512
    .quad (i << 21) + 0x83
    .set i, i + 1
    .endr
gdt64: .quad 0, 0x00af9a000000ffff, 0x00cf92000000ffff
gdt64_ptr: .word 23
    .long gdt64
"""
FOOTER = r"""
exit_with_eax:
    mov $0xf4, %dx
    out %eax, %dx
1:  cli
    hlt
    jmp 1b
"""


def build_guest(tmp: Path, name: str, body: str, data: str = "", long_mode: bool = False) -> Path:
    if not (shutil.which("as") and shutil.which("ld")):
        raise RuntimeError("binutils (as, ld) are needed to build test guests")
    src = tmp / f"{name}.S"
    if long_mode:
        body, data = LONG_MODE_PROLOGUE + body, LONG_MODE_DATA + data
    src.write_text(HEADER + body + FOOTER + "\n    .data\n" + data + "\n")
    obj, elf = tmp / f"{name}.o", tmp / f"{name}.elf"
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    (tmp / "guest.ld").write_text(LINKER_SCRIPT)
    subprocess.run(["ld", "-m", "elf_i386", "--no-warn-rwx-segments", "-T", str(tmp / "guest.ld"),
                    "-o", str(elf), str(obj)], check=True)
    return elf
