"""User-mode SYSCALL in a ring-0 test guest: architectural on every host, repaired by exitless on kvm_pvm.

The guest kernel puts LSTAR in supervisor-only text (as Linux does), takes one page
fault of its own in kernel mode (which its #PF handler, starting with ENDBR64, fixes
up), drops to user mode, where a SYSCALL must arrive at LSTAR at CPL 0 with RCX/R11/
RSP as the architecture defines; SYSRETQ returns the value to user mode.  On kvm_pvm
the SYSCALL arrives as a page fault at LSTAR from user mode, and exitless's
breakpoint on the #PF handler (exitless/x86/pvm_syscall.py) repairs it.
"""
import pytest
from elftools.elf.elffile import ELFFile

from exitless.doctor import kvm_flavour
from exitless.vm import Machine, VmConfig
from exitless.x86.pvm_syscall import gate_offset
from tests.asmguest import build_guest

pytestmark = pytest.mark.kvm
PVM = kvm_flavour() == "pvm"

BODY = r"""
    lea ring0_idt+16*14(%rip), %rdi      /* gate 14 -> pf_handler */
    mov $pf_handler, %eax
    mov %ax, (%rdi)
    shr $16, %eax
    mov %ax, 6(%rdi)
    out %al, $0x80                       /* an exit: the VMM looks at the new IDT */
    mov $0x40000000, %ebx                /* beyond the identity map: a kernel-mode #PF */
    mov (%rbx), %eax                     /* 2 bytes, skipped by pf_handler */
    mov $user_start, %esi
    mov $0x400000, %edi
    mov $user_end - user_start, %ecx
    rep movsb
    andq $~4, pd(%rip)                   /* the kernel's 2 MiB (LSTAR included): supervisor only */
    mov %cr3, %rax
    mov %rax, %cr3
    pushq $0x2b
    pushq $0x480000
    pushq $0x246
    pushq $0x33
    pushq $0x400000
    iretq
pf_handler:
    endbr64
    incq pf_count(%rip)
    mov %cr2, %rax
    mov %rax, pf_cr2(%rip)
    addq $2, 8(%rsp)
    add $8, %rsp
    iretq
syscall_entry:
    mov %rcx, out_rcx(%rip)
    mov %r11, out_r11(%rip)
    mov %rsp, out_rsp(%rip)
    mov %rax, out_rax(%rip)
    pushfq
    popq out_rflags(%rip)
    mov %cs, out_cs(%rip)
    mov $0x77, %eax
    sysretq
user_start:
    mov $0x1234, %eax
    syscall
    mov %rax, %rsp                       /* the #GP frame below carries it out */
    hlt
user_end:
"""
DATA = """
pf_count: .quad 0
pf_cr2: .quad 0
out_rcx: .quad 0
out_r11: .quad 0
out_rsp: .quad 0
out_rax: .quad 0
out_rflags: .quad 0
out_cs: .quad 0
"""


def test_gate_offset():
    gate = bytes.fromhex("8000 1000 008e c081 ffffffff 00000000".replace(" ", ""))
    assert gate_offset(gate) == 0xFFFF_FFFF_81C0_0080


def test_user_syscall_reaches_lstar_at_cpl0(tmp_path):
    elf = build_guest(tmp_path, "sc", BODY, DATA, ring0=True)
    with open(elf, "rb") as f:
        syms = {s.name: s["st_value"] for s in ELFFile(f).get_section_by_name(".symtab").iter_symbols() if s.name}
    with Machine(VmConfig(mem_mib=64)) as m:
        if m.syscall_repair is not None:
            m.syscall_repair.interval = 0.0
        m.boot_pvh(elf)
        result = m.run(timeout=30)
        out = {k: m.mem.read_u64(v) for k, v in syms.items() if k.startswith(("out_", "pf_")) and k != "pf_handler"}
        frame = [m.mem.read_u64(syms["frame"] + 8 * i) for i in range(7)]
        counts = dict(m.syscall_repair.counts) if m.syscall_repair is not None else {}
    user_syscall_end = 0x400000 + 5 + 2            # mov $0x1234,%eax (5 bytes) + syscall (2)
    assert result.status == 0x100 + 13, (result, out, frame, counts)      # the final hlt at CPL 3: #GP
    assert out["pf_count"] == 1 and out["pf_cr2"] == 0x40000000
    assert out["out_cs"] == 0x10 and out["out_rax"] == 0x1234
    assert out["out_rcx"] == user_syscall_end and out["out_r11"] & 0x3C7FD7 == 0x246 & 0x3C7FD7
    assert out["out_rsp"] == 0x480000 and not out["out_rflags"] & 0x200   # FMASK cleared IF
    # vector, error code, RIP (the hlt after the return), CS, RFLAGS, RSP (= the syscall's result)
    assert frame[0] == 13 and frame[2] == user_syscall_end + 3 and frame[3] == 0x33 and frame[5] == 0x77
    if PVM:
        assert counts["syscall"] == 1 and counts["page fault"] == 1, counts
