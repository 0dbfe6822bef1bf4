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


# --------------------------------------------------------------------------- the repair on a software vCPU

from exitless.x86 import fallback as F  # noqa: E402
from exitless.x86.pvm_syscall import INT3, SyscallRepair  # noqa: E402
from tests.test_fallback import SoftVcpu, emulation_failure_run  # noqa: E402

IDT, HANDLER, STACK, LSTAR = 0x3000, 0x5000, 0x8000, 0x6000


def soft_guest(first: bytes = b"\x90\x90\x90\xfc") -> tuple[SoftVcpu, SyscallRepair, F.InstructionFallback]:
    v = SoftVcpu(b"\x90", mem_size=0x10000)
    v.sregs.cr0, v.sregs.idt.base, v.sregs.idt.limit = 0x8000_0011, IDT, 0xFFF
    gate = (HANDLER & 0xFFFF).to_bytes(2, "little") + b"\x10\x00\x00\x8e" + (HANDLER >> 16 & 0xFFFF).to_bytes(2, "little")
    v.memory.write(IDT + 16 * 14, gate + bytes(8))
    v.memory.write(HANDLER, first)
    v.msrs.update({F.MSR_LSTAR: LSTAR, F.MSR_SYSCALL_MASK: 0x47700})
    repair = SyscallRepair(v.memory)
    repair.interval = 0.0
    return v, repair, F.InstructionFallback(v, v.memory, repair)


def hit(v: SoftVcpu, fb: F.InstructionFallback, frame: list[int], cr2: int, at: int = HANDLER) -> str | None:
    v.memory.write(STACK, b"".join(x.to_bytes(8, "little") for x in frame))
    v.regs.rip, v.regs.rsp, v.sregs.cr2 = at, STACK, cr2
    v.events.exception.injected, v.events.exception.nr = 1, F.UD          # what KVM queued
    return fb.handle(emulation_failure_run(bytes([INT3])))


def test_soft_plant_and_syscall_repair():
    v, repair, fb = soft_guest()
    repair.poll(v)
    assert v.memory.read(HANDLER, 1) == bytes([INT3]) and repair.counts["planted"] == 1
    v.regs.rcx, v.regs.r11 = 0x40_1007, 0x10246                       # as the user's SYSCALL left them
    assert hit(v, fb, [0xF, LSTAR, 0x33, 0x246, 0x7FF0, 0x2B], cr2=LSTAR) is None
    assert (v.regs.rip, v.regs.rsp, v.regs.rflags) == (LSTAR, 0x7FF0, 0x46 | 2)   # IF masked, RF cleared
    assert (v.regs.rcx, v.regs.r11) == (0x40_1007, 0x10246)
    assert not v.events.exception.injected and fb.counts["pvm syscall"] == 1


def test_soft_other_faults_continue_into_the_handler():
    v, repair, fb = soft_guest()
    repair.poll(v)
    for frame, cr2 in (([6, 0x40_0000, 0x33, 0x246, 0x7FF0, 0x2B], 0x40_0000),    # a user fault elsewhere
                       ([0, LSTAR, 0x10, 0x46, 0x7FF0, 0x18], LSTAR),              # kernel mode
                       ([0xF, LSTAR, 0x33, 0x246, 0x7FF0, 0x2B], 0x1234)):         # CR2 is not LSTAR
        assert hit(v, fb, frame, cr2) is None
        assert v.regs.rip == HANDLER + 1 and v.regs.rsp == STACK and not v.events.exception.injected
    assert fb.counts["pvm page fault"] == 3


def test_soft_stack_unreadable_is_a_page_fault_not_a_guest_breakpoint():
    v, repair, fb = soft_guest()
    repair.poll(v)
    v.regs.rip, v.regs.rsp = HANDLER, 0xFFF8                             # the frame runs off guest memory
    assert fb.handle(emulation_failure_run(bytes([INT3]))) is None
    assert v.regs.rip == HANDLER + 1 and fb.counts["pvm page fault"] == 1


def test_soft_follows_the_idt_and_refuses_a_handler_it_cannot_step_over():
    v, repair, fb = soft_guest(first=b"\x6a\x0e\xe9\x00\x00\x00\x00")  # Linux's early handler: push $14; jmp
    repair.poll(v)
    assert v.memory.read(HANDLER, 1) == b"\x6a" and not repair.counts["planted"]
    other = 0x5800
    v.memory.write(other, b"\xf3\x0f\x1e\xfa")                        # ENDBR64
    gate = bytearray(v.memory.read(IDT + 16 * 14, 16))
    gate[0:2] = (other & 0xFFFF).to_bytes(2, "little")
    v.memory.write(IDT + 16 * 14, bytes(gate))
    repair.poll(v)
    assert v.memory.read(other, 1) == bytes([INT3])
    v.memory.write(other, b"\xf3")                                    # the kernel rewrote its text: plant again
    repair.poll(v)
    assert v.memory.read(other, 1) == bytes([INT3]) and repair.counts["planted"] == 2
    assert hit(v, fb, [0, 0, 0x10, 0, 0, 0], cr2=0, at=other) is None and v.regs.rip == other + 4   # ENDBR64 stepped over


def test_soft_guest_int3_elsewhere_is_the_guests():
    v, repair, fb = soft_guest()
    repair.poll(v)
    v.memory.write(0x1000, bytes([INT3]))
    v.regs.rip = 0x1000
    assert fb.handle(emulation_failure_run(bytes([INT3]))) is None
    assert v.regs.rip == 0x1001 and (v.events.exception.injected, v.events.exception.nr) == (1, F.BP)
