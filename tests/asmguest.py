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
# After LONG_MODE_PROLOGUE: Linux's GDT layout (kernel CS 0x10, DS 0x18, user32 CS 0x23, user DS 0x2b,
# user CS 0x33, TSS 0x40 with RSP0 = 0x70000), user-accessible identity pages, an IDT whose vector N
# (0..31) records the exception frame in `frame` (vector, then error code if any / RIP, CS...) and
# exits with status 0x100 + N, SSE enabled (CR4.OSFXSR/OSXMMEXCPT), and the SYSCALL MSRs
# (STAR as Linux sets it, LSTAR = syscall_entry, which the body defines; FMASK = IF|TF|DF|AC...).
# 32-bit ELF objects cannot hold 64-bit absolute relocations: data is addressed RIP-relative.
RING0_SETUP = r"""
    orq $4, pml4(%rip)
    orq $4, pdpt(%rip)
    mov $pd, %edi
    mov $512, %ecx
9:  orq $4, (%rdi)
    add $8, %rdi
    loop 9b
    mov %cr3, %rax
    mov %rax, %cr3
    lgdt ring0_gdt_ptr(%rip)
    pushq $0x10
    lea 9f(%rip), %rax
    pushq %rax
    lretq
9:  mov $0x18, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov %ax, %es
    mov $ring0_tss, %eax
    mov %ax, ring0_gdt_tss+2(%rip)
    shr $16, %eax
    mov %al, ring0_gdt_tss+4(%rip)
    mov %ah, ring0_gdt_tss+7(%rip)
    mov $0x40, %ax
    ltr %ax
    mov $ring0_idt, %edi
    mov $ring0_stubs, %esi
    xor %ecx, %ecx
9:  mov %esi, %eax
    mov %ax, (%rdi)
    movw $0x10, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    shr $16, %eax
    mov %ax, 6(%rdi)
    movq $0, 8(%rdi)
    add $16, %rdi
    add $16, %rsi
    inc %ecx
    cmp $32, %ecx
    jne 9b
    lidt ring0_idt_ptr(%rip)
    mov %cr4, %rax
    or $0x600, %eax
    mov %rax, %cr4
    mov %cr0, %rax
    and $~0x4, %eax             /* EM off, MP on: x87 and SSE usable */
    or $0x2, %eax
    mov %rax, %cr0
    mov $0xc0000080, %ecx
    rdmsr
    or $1, %eax                 /* EFER.SCE */
    wrmsr
    mov $0xc0000081, %ecx
    xor %eax, %eax
    mov $0x00230010, %edx
    wrmsr
    mov $0xc0000082, %ecx
    mov $syscall_entry, %eax
    xor %edx, %edx
    wrmsr
    mov $0xc0000084, %ecx
    mov $0x47700, %eax
    xor %edx, %edx
    wrmsr
    jmp ring0_body
    .balign 16
ring0_stubs:
    .set v, 0
    .rept 32
    .balign 16
    movl $v, %eax
    jmp ring0_fault
    .set v, v + 1
    .endr
ring0_fault:
    mov %rax, frame(%rip)
    lea frame+8(%rip), %rdi
    mov %rsp, %rsi
    mov $6, %ecx
    rep movsq
    add $0x100, %eax
    jmp exit_with_eax
ring0_body:
"""
RING0_DATA = r"""
    .balign 16
ring0_gdt: .quad 0, 0, 0x00af9b000000ffff, 0x00cf93000000ffff, 0x00cffb000000ffff, 0x00cff3000000ffff
    .quad 0x00affb000000ffff, 0
ring0_gdt_tss: .quad 0x0000890000000067, 0
ring0_gdt_end:
ring0_gdt_ptr: .word ring0_gdt_end - ring0_gdt - 1
    .long ring0_gdt, 0
    .balign 16
ring0_idt: .fill 64, 8, 0
ring0_idt_ptr: .word 511
    .long ring0_idt, 0
    .balign 16
ring0_tss: .long 0
    .long 0x70000, 0
    .fill 23, 4, 0
    .balign 16
frame: .fill 8, 8, 0
"""
FOOTER = r"""
exit_with_eax:
    mov $0xf4, %dx
    out %eax, %dx
1:  cli
    hlt
    jmp 1b
"""


def build_guest(tmp: Path, name: str, body: str, data: str = "", long_mode: bool = False,
                ring0: bool = False) -> Path:
    """An ELF PVH guest from ``body`` (code) and ``data``; ``long_mode`` enters 64-bit mode first,
    ``ring0`` (implies long_mode) adds RING0_SETUP: GDT, TSS, IDT recording faults, SSE, SYSCALL MSRs."""
    if not (shutil.which("as") and shutil.which("ld")):
        raise RuntimeError("binutils (as, ld) are needed to build test guests")
    src = tmp / f"{name}.S"
    if ring0:
        body, data, long_mode = RING0_SETUP + body, RING0_DATA + data, True
    if long_mode:
        body, data = LONG_MODE_PROLOGUE + body, LONG_MODE_DATA + data
    if "syscall_entry:" not in body and ring0:
        body += "\nsyscall_entry:\n    mov $0x5c, %eax\n    jmp exit_with_eax\n"
    src.write_text(HEADER + body + FOOTER + "\n    .data\n" + data + "\n")
    obj, elf = tmp / f"{name}.o", tmp / f"{name}.elf"
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    (tmp / "guest.ld").write_text(LINKER_SCRIPT)
    subprocess.run(["ld", "-m", "elf_i386", "--no-warn-rwx-segments", "-T", str(tmp / "guest.ld"),
                    "-o", str(elf), str(obj)], check=True)
    return elf
