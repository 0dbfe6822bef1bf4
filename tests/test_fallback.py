"""The instruction fallback: decoder, each emulated instruction against its architectural result.

Two layers:
- real ring-0 guests (tests/asmguest.py) execute INT3, FWAIT, LDMXCSR/STMXCSR, FNINIT...:
  on VMX/SVM the CPU runs them, on kvm_pvm KVM's emulator gives up and exitless's fallback
  finishes them; the guest checks the architectural result either way, and on kvm_pvm the
  fallback's counts show it did the work;
- the instructions this host's KVM emulates itself (SYSRET, SWAPGS, CLAC/STAC, POPCNT...)
  run through the fallback on a software vCPU model, so their emulation is checked too.
"""
from __future__ import annotations

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import given, settings
from hypothesis import strategies as st

from exitless.doctor import kvm_flavour
from exitless.kvm import constants as C
from exitless.kvm import structs as S
from exitless.memory import GuestMemory
from exitless.vm import Machine, VmConfig
from exitless.x86 import fallback as F
from exitless.x86.decode import DecodeError, decode
from tests.asmguest import build_guest

PVM = kvm_flavour() == "pvm"


# --------------------------------------------------------------------------- decoder


def test_decode_lengths_and_fields():
    assert decode(b"\xcc\x90").length == 1
    i = decode(b"\x0f\xae\x15\x10\x00\x00\x00")          # ldmxcsr 0x10(%rip)
    assert (i.length, i.digit, i.rip_relative, i.disp) == (7, 2, True, 0x10)
    i = decode(b"\x0f\xae\x5c\x8b\xf8")                  # stmxcsr -8(%rbx,%rcx,4)
    assert (i.length, i.digit, i.sib, i.disp, i.rip_relative) == (5, 3, 0x8B, -8, False)
    i = decode(b"\x41\x0f\xae\x14\x24")                  # ldmxcsr (%r12): SIB with REX.B base
    assert i.length == 5 and i.rex == 0x41
    i = decode(b"\xf3\x48\x0f\xb8\xc1")                  # popcnt %rcx, %rax
    assert (i.length, i.reg, i.rm, i.operand_size, i.has_prefix(0xF3)) == (5, 0, 1, 8, True)
    assert decode(b"\x48\x0f\x07").rex_w                 # sysretq
    assert decode(b"\xdb\xe3").modrm == 0xE3             # fninit
    assert decode(b"\x65\x0f\xae\x14\x25\x00\x10\x00\x00").segment == "gs"  # ldmxcsr %gs:0x1000
    assert decode(b"\x0f\xae\x94\x24\x00\x01\x00\x00").disp == 0x100       # disp32 after SIB


def test_effective_address():
    regs = S.kvm_regs(rip=0x1000, rbx=0x2000, rcx=3, r12=0x5000, rbp=0x7000)
    assert decode(b"\x0f\xae\x15\x10\x00\x00\x00").effective_address(regs) == 0x1000 + 7 + 0x10
    assert decode(b"\x0f\xae\x5c\x8b\xf8").effective_address(regs) == 0x2000 + 12 - 8
    assert decode(b"\x41\x0f\xae\x14\x24").effective_address(regs) == 0x5000
    assert decode(b"\x0f\xae\x55\x08").effective_address(regs) == 0x7008          # rbp + disp8
    assert decode(b"\x0f\xae\x14\x25\x00\x30\x00\x00").effective_address(regs) == 0x3000  # no base, no index
    gs = decode(b"\x65\x0f\xae\x14\x25\x00\x10\x00\x00")
    assert gs.effective_address(regs, {"fs": 0, "gs": 0xFFFF_8880_0000_0000}) == 0xFFFF_8880_0000_1000
    assert decode(b"\x67\x0f\xae\x13").effective_address(S.kvm_regs(rbx=0x1_2345_6789)) == 0x2345_6789


@pytest.mark.parametrize("code", [b"", b"\x0f", b"\x0f\xae", b"\x0f\xae\x15\x10", b"\x90", b"\x0f\x0b",
                                  b"\x66" * 15 + b"\xcc"])
def test_decode_refuses_unknown_or_short(code):
    with pytest.raises(DecodeError):
        decode(code)


@given(st.binary(max_size=20))
@settings(max_examples=300, deadline=None)
def test_decode_raises_only_decode_error(code):
    try:
        i = decode(code)
    except DecodeError:
        return
    assert 1 <= i.length <= 15 and code.startswith(i.raw)


# --------------------------------------------------------------------------- a software vCPU


class SoftVcpu:
    """The vCPU calls the fallback makes, on plain state (flat identity paging, CPL from cs.selector)."""

    def __init__(self, code: bytes, *, cpl: int = 0, mem_size: int = 0x10000):
        # a multiple of the page size (GuestMemory's unit)
        self.regs = S.kvm_regs(rip=0x1000, rflags=0x2)
        self.sregs = S.kvm_sregs(efer=0x500)
        self.sregs.cs = S.kvm_segment(selector=0x10 | cpl, l=1, dpl=cpl, type=0xB, s=1, present=1)
        self.fpu = S.kvm_fpu(fcw=0x37F, mxcsr=0x1F80)
        self.msrs = {F.MSR_STAR: 0x0023_0010 << 32, F.MSR_KERNEL_GS_BASE: 0xFFFF_8880_0001_0000}
        self.events = S.kvm_vcpu_events()
        self.memory = GuestMemory.create([(0, mem_size)])   # guest-physical 0.. = the flat linear space
        self.memory.write(self.regs.rip, code)

    def get_regs(self):
        return S.kvm_regs.from_buffer_copy(self.regs)

    def set_regs(self, r):
        self.regs = S.kvm_regs.from_buffer_copy(r)

    def get_sregs(self):
        return S.kvm_sregs.from_buffer_copy(self.sregs)

    def set_sregs(self, s):
        self.sregs = S.kvm_sregs.from_buffer_copy(s)

    def get_fpu(self):
        return S.kvm_fpu.from_buffer_copy(self.fpu)

    def set_fpu(self, f):
        self.fpu = S.kvm_fpu.from_buffer_copy(f)

    def get_mxcsr(self):
        return self.fpu.mxcsr

    def set_mxcsr(self, value):
        self.fpu.mxcsr = value

    def get_msrs(self, indices):
        return {i: self.msrs.get(i, 0) for i in indices}

    def set_msrs(self, msrs):
        self.msrs.update(msrs)

    def get_vcpu_events(self):
        return S.kvm_vcpu_events.from_buffer_copy(self.events)

    def set_vcpu_events(self, e):
        self.events = S.kvm_vcpu_events.from_buffer_copy(e)

    def translate(self, addr):
        ok = self.memory.contains(addr)
        return S.kvm_translation(linear_address=addr, physical_address=addr, valid=int(ok), writeable=int(ok))


def emulation_failure_run(code: bytes | None) -> S.kvm_run:
    """A kvm_run as KVM fills it on an emulation failure (instruction bytes in data[1..2])."""
    run = S.kvm_run(exit_reason=C.KVM_EXIT_INTERNAL_ERROR)
    ie = run.u.internal
    ie.suberror = C.KVM_INTERNAL_ERROR_EMULATION
    if code is None:
        ie.ndata = 1
        return run
    ie.ndata = 3
    ie.data[0] = C.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    raw = bytes([len(code)]) + code.ljust(15, b"\x90")
    ie.data[1], ie.data[2] = int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")
    return run


def soft_run(code: bytes, *, bytes_in_exit: bool = True, **kw) -> tuple[SoftVcpu, F.InstructionFallback, str | None]:
    v = SoftVcpu(code, **kw)
    fb = F.InstructionFallback(v, v.memory)
    why = fb.handle(emulation_failure_run(code if bytes_in_exit else None))
    return v, fb, why


def test_exit_bytes_layout():
    run = emulation_failure_run(b"\x0f\xae\x15\x10\x00\x00\x00")
    assert F.emulation_failure_bytes(run.u.internal) == b"\x0f\xae\x15\x10\x00\x00\x00"
    assert F.emulation_failure_bytes(emulation_failure_run(None).u.internal) is None


def test_soft_sysretq():
    v = SoftVcpu(b"\x48\x0f\x07")
    v.regs.rcx, v.regs.r11 = 0x40_1000, 0x246 | (1 << 16) | (1 << 17)   # RF and VM are cleared by SYSRET
    fb = F.InstructionFallback(v, v.memory)
    assert fb.handle(emulation_failure_run(b"\x48\x0f\x07")) is None
    assert v.regs.rip == 0x40_1000 and v.regs.rflags == 0x246
    assert (v.sregs.cs.selector, v.sregs.cs.dpl, v.sregs.cs.l) == (0x33, 3, 1)
    assert (v.sregs.ss.selector, v.sregs.ss.dpl) == (0x2B, 3)
    assert fb.counts == {"sysret64": 1}


def test_soft_sysret_noncanonical_is_gp_and_changes_nothing():
    v = SoftVcpu(b"\x48\x0f\x07")
    v.regs.rcx = 0x0000_8000_0000_0000
    fb = F.InstructionFallback(v, v.memory)
    assert fb.handle(emulation_failure_run(b"\x48\x0f\x07")) is None
    assert v.regs.rip == 0x1000 and v.sregs.cs.selector == 0x10
    assert (v.events.exception.injected, v.events.exception.nr, v.events.exception.has_error_code) == (1, F.GP, 1)


def test_soft_swapgs():
    v = SoftVcpu(b"\x0f\x01\xf8")
    v.sregs.gs.base = 0x7F00_0000_0000
    fb = F.InstructionFallback(v, v.memory)
    assert fb.handle(emulation_failure_run(b"\x0f\x01\xf8")) is None
    assert v.sregs.gs.base == 0xFFFF_8880_0001_0000 and v.msrs[F.MSR_KERNEL_GS_BASE] == 0x7F00_0000_0000
    assert v.regs.rip == 0x1003


def test_soft_privileged_at_cpl3_is_gp():
    for code in (b"\x0f\x01\xf8", b"\x48\x0f\x07", b"\x0f\x01\xca"):
        v, fb, why = soft_run(code, cpl=3)
        assert why is None and v.events.exception.nr == F.GP and v.regs.rip == 0x1000


def test_soft_clac_stac():
    v, _, _ = soft_run(b"\x0f\x01\xcb")
    assert v.regs.rflags & F.RFLAGS_AC and v.regs.rip == 0x1003
    v = SoftVcpu(b"\x0f\x01\xca")
    v.regs.rflags |= F.RFLAGS_AC
    F.InstructionFallback(v, v.memory).handle(emulation_failure_run(b"\x0f\x01\xca"))
    assert not v.regs.rflags & F.RFLAGS_AC


@pytest.mark.parametrize("value,size", [(0, 8), (0xF0F0_0000_0000_0001, 8), (0xFFFF_FFFF_FFFF_FFFF, 4), (0x8001, 2)])
def test_soft_popcnt(value, size):
    prefix = {8: b"\xf3\x48", 4: b"\xf3", 2: b"\x66\xf3"}[size]
    code = prefix + b"\x0f\xb8\xc1"                      # popcnt %rcx, %rax (operand size from the prefixes)
    v = SoftVcpu(code)
    v.regs.rcx, v.regs.rax, v.regs.rflags = value, 0xDEAD_BEEF_DEAD_BEEF, 0x8D7
    F.InstructionFallback(v, v.memory).handle(emulation_failure_run(code))
    expect = bin(value & ((1 << 8 * size) - 1)).count("1")
    if size == 2:
        expect |= 0xDEAD_BEEF_DEAD_0000
    assert v.regs.rax == expect
    assert v.regs.rflags & 0x8D5 == (0x40 if value & ((1 << 8 * size) - 1) == 0 else 0)


def test_soft_x87_control_and_status():
    code = b"\xd9\x3c\x25\x00\x20\x00\x00"               # fnstcw 0x2000
    v, _, _ = soft_run(code)
    assert v.memory.read(0x2000, 2) == (0x37F).to_bytes(2, "little")
    v = SoftVcpu(b"\xd9\x2c\x25\x00\x20\x00\x00")        # fldcw 0x2000
    v.memory.write(0x2000, (0x27F).to_bytes(2, "little"))
    F.InstructionFallback(v, v.memory).handle(emulation_failure_run(b"\xd9\x2c\x25\x00\x20\x00\x00"))
    assert v.fpu.fcw == 0x27F
    v = SoftVcpu(b"\xdf\xe0")                            # fnstsw %ax
    v.fpu.fsw = 0x3800
    F.InstructionFallback(v, v.memory).handle(emulation_failure_run(b"\xdf\xe0"))
    assert v.regs.rax & 0xFFFF == 0x3800 and v.regs.rip == 0x1002
    v = SoftVcpu(b"\xdb\xe2")                            # fnclex keeps TOP and condition codes
    v.fpu.fsw = 0xB8FF
    F.InstructionFallback(v, v.memory).handle(emulation_failure_run(b"\xdb\xe2"))
    assert v.fpu.fsw == 0x3800


def test_soft_memory_operand_fault_is_page_fault():
    v, fb, why = soft_run(b"\x0f\xae\x14\x25\x00\x00\x10\x00")   # ldmxcsr 0x100000: beyond the flat memory
    assert why is None and v.regs.rip == 0x1000
    assert (v.events.exception.nr, v.sregs.cr2) == (F.PF, 0x100000)


def test_soft_fetches_bytes_when_kvm_gives_none():
    v, fb, why = soft_run(b"\x0f\x01\xcb", bytes_in_exit=False)
    assert why is None and fb.counts == {"stac": 1}


def test_soft_unknown_instruction_stops_with_disassembly():
    v, fb, why = soft_run(b"\x0f\x0b")
    assert why is not None and "ud2" in why and "rip=0x1000" in why
    assert v.regs.rip == 0x1000 and not fb.counts


@given(st.binary(min_size=1, max_size=15), st.sampled_from([0, 3]))
@settings(max_examples=300, deadline=None)
def test_soft_any_bytes_resume_or_stop_cleanly(code, cpl):
    """Whatever a hostile guest makes KVM report, the fallback resumes or stops with a message."""
    v, fb, why = soft_run(code, cpl=cpl)
    assert why is None or isinstance(why, str)


# --------------------------------------------------------------------------- real guests


def _symbols(elf) -> dict[str, int]:
    with open(elf, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        return {s.name: s["st_value"] for s in symtab.iter_symbols() if s.name}


def run_ring0(tmp_path, body: str, data: str = ""):
    """Run ``body`` at CPL 0 in 64-bit mode; returns (exit, symbols, the fault frame words, the ``out_*``
    words, fallback counts)."""
    elf = build_guest(tmp_path, "fb", body, data, ring0=True)
    syms = _symbols(elf)
    with Machine(VmConfig(mem_mib=64)) as m:
        m.boot_pvh(elf)
        result = m.run(timeout=30)
        frame = [m.mem.read_u64(syms["frame"] + 8 * i) for i in range(7)]
        words = {k: m.mem.read_u64(v) for k, v in syms.items() if k.startswith("out_")}
        return result, syms, frame, words, m.fallback_counts()


@pytest.mark.kvm
def test_guest_int3_delivers_breakpoint_after_the_instruction(tmp_path):
    result, syms, frame, _, counts = run_ring0(tmp_path, "here:\n    int3\nafter:\n    nop\n    ud2\n")
    assert result.status == 0x100 + F.BP, result
    assert frame[:3] == [F.BP, syms["after"], 0x10]          # vector, RIP = the next instruction, CS
    if PVM:
        assert counts.get("int3") == 1


@pytest.mark.kvm
def test_guest_sse_and_x87_control(tmp_path):
    body = r"""
    fninit
    fwait
    fnstcw out_fcw(%rip)
    ldmxcsr mx_in(%rip)
    lea out_mx(%rip), %rbx
    xor %ecx, %ecx
    stmxcsr (%rbx,%rcx,4)
    fnstsw out_fsw(%rip)
    mov $0x42, %eax
    jmp exit_with_eax
    """
    data = "mx_in: .long 0x9fc0, 0\nout_fcw: .quad 0\nout_mx: .quad 0\nout_fsw: .quad 0x5555\n"
    result, _, _, words, counts = run_ring0(tmp_path, body, data)
    assert result.status == 0x42, result
    assert words["out_fcw"] == 0x37F and words["out_mx"] == 0x9FC0 and words["out_fsw"] & 0xFFFF == 0
    if PVM:
        assert counts.get("ldmxcsr") == 1 and counts.get("stmxcsr") == 1, counts


@pytest.mark.kvm
def test_guest_ldmxcsr_reserved_bit_is_gp(tmp_path):
    body = "    ldmxcsr bad(%rip)\n    mov $0x42, %eax\n    jmp exit_with_eax\n"
    result, _, frame, _, _ = run_ring0(tmp_path, body, "bad: .long 0x10000\n")
    assert result.status == 0x100 + F.GP and frame[1] == 0       # #GP(0)
