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
FOOTER = r"""
exit_with_eax:
    mov $0xf4, %dx
    out %eax, %dx
1:  cli
    hlt
    jmp 1b
"""


def build_guest(tmp: Path, name: str, body: str, data: str = "") -> Path:
    if not (shutil.which("as") and shutil.which("ld")):
        raise RuntimeError("binutils (as, ld) are needed to build test guests")
    src = tmp / f"{name}.S"
    src.write_text(HEADER + body + FOOTER + "\n    .data\n" + data + "\n")
    obj, elf = tmp / f"{name}.o", tmp / f"{name}.elf"
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    (tmp / "guest.ld").write_text(LINKER_SCRIPT)
    subprocess.run(["ld", "-m", "elf_i386", "--no-warn-rwx-segments", "-T", str(tmp / "guest.ld"),
                    "-o", str(elf), str(obj)], check=True)
    return elf
