"""Instruction fallback: the VMM finishes instructions KVM's emulator cannot.

On a host where guest ring-0 code runs through KVM's instruction emulator
(kvm_pvm), the emulator lacks some instructions an unmodified kernel uses
(INT3 delivery in long mode, x87/SSE control, SWAPGS...).  KVM then exits with
``KVM_EXIT_INTERNAL_ERROR``/``KVM_INTERNAL_ERROR_EMULATION``; since Linux 5.14
the exit carries the instruction bytes (``struct kvm_run.emulation_failure``:
``data[0]`` = flags, bit 0 ``KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES``;
``data[1]`` byte 0 = ``insn_size``, bytes 1..15 = ``insn_bytes``;
``prepare_emulation_failure_exit`` in arch/x86/kvm/x86.c).  At CPL 0 KVM has
also queued a #UD, which the fallback withdraws when it emulates the instruction.

:class:`InstructionFallback` decodes the instruction (:mod:`exitless.x86.decode`),
computes its architectural effect on the registers, FPU state (``KVM_GET/SET_FPU``; MXCSR through ``KVM_GET/SET_XSAVE``, which
KVM_GET/SET_FPU leave out),
MSRs and guest memory (linear addresses through ``KVM_TRANSLATE``), and delivers
any exception it raises through ``KVM_SET_VCPU_EVENTS``.  Anything else stays an
error: the VM stops with the bytes, their disassembly and the registers.  On
VMX/SVM hosts guest code runs on the CPU and the fallback should never fire.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from ..errors import ExitlessError
from ..kvm import constants as C
from ..kvm import structs as S
from ..memory import GuestMemoryError
from .decode import GPR, DecodeError, Instruction, decode

log = logging.getLogger(__name__)

# exception vectors (SDM vol. 3, table 6-1)
BP, UD, GP, PF = 3, 6, 13, 14
MSR_STAR, MSR_LSTAR, MSR_SYSCALL_MASK = 0xC000_0081, 0xC000_0082, 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102
RFLAGS_AC, RFLAGS_RF = 1 << 18, 1 << 16
#: SYSRET loads RFLAGS from R11 with these bits kept (SDM SYSRET: R11 & 3C7FD7H | 2)
SYSRET_RFLAGS_MASK = 0x3C7FD7
#: MXCSR bits LDMXCSR accepts (MXCSR_MASK of a CPU with DAZ); others are #GP(0) (SDM 10.2.3)
MXCSR_MASK = 0xFFFF
FCW_INIT = 0x037F   # FNINIT (SDM 8.1.5)
PAGE = 4096


class EmulationFailure(ExitlessError, RuntimeError):
    """An emulation failure the fallback cannot finish: the message names the instruction."""


class GuestException(Exception):
    """The emulated instruction raises an architectural exception (vector, error code)."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None):
        super().__init__(f"vector {vector}")
        self.vector, self.error_code, self.cr2 = vector, error_code, cr2


def emulation_failure_bytes(internal: S.kvm_run_internal) -> bytes | None:
    """The instruction bytes KVM put in an emulation-failure exit, or None if it gave none."""
    if internal.ndata < 3 or not internal.data[0] & C.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
        return None
    raw = b"".join(internal.data[i].to_bytes(8, "little") for i in (1, 2))
    size = raw[0]
    return raw[1:1 + min(size, 15)] if size else None


def disassemble(code: bytes, address: int) -> str:
    """One line of AT&T disassembly of the first instruction in ``code`` (capstone), or its bytes."""
    try:
        import capstone
    except ImportError:
        return f"{code.hex(' ')} (capstone is not installed)"
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.syntax = capstone.CS_OPT_SYNTAX_ATT
    for insn in md.disasm(code, address):
        return f"{insn.mnemonic} {insn.op_str}".strip() + f"  ({bytes(insn.bytes).hex(' ')})"
    return f"{code.hex(' ')} (not a valid instruction)"


@dataclass
class _State:
    """The vCPU's registers as the emulation reads and changes them."""

    regs: S.kvm_regs
    sregs: S.kvm_sregs
    sregs_dirty: bool = False


class InstructionFallback:
    """Finishes the instructions KVM's emulator gives up on, for one vCPU.

    ``memory`` is the guest's :class:`exitless.memory.GuestMemory`.  ``counts``
    counts what was done by mnemonic (``int3``, ``ldmxcsr``...), ``exception N``
    for exceptions delivered, and what the breakpoints did (``pvm syscall``...).  :meth:`handle` is called with the vCPU's
    ``kvm_run`` after an emulation failure; it returns None when the guest may
    resume, or the message to stop the VM with.
    """

    def __init__(self, vcpu, memory, breakpoints=None):
        self.vcpu = vcpu
        self.memory = memory
        #: VMM breakpoints (``on_int3(vcpu, regs, sregs) -> name | None``, ``poll(vcpu)``): the kvm_pvm
        #: system-call repair (:mod:`exitless.x86.pvm_syscall`); None elsewhere
        self.breakpoints = breakpoints
        self.counts: Counter[str] = Counter()
        self._handlers = {
            b"\xcc": self._int3, b"\x9b": self._fwait, b"\x0f\x07": self._sysret,
            b"\x0f\x01": self._group7, b"\x0f\xae": self._group15, b"\x0f\xb8": self._popcnt,
            b"\xd9": self._x87_d9, b"\xdb": self._x87_db, b"\xdd": self._x87_dd, b"\xdf": self._x87_df,
        }

    # -- entry point -------------------------------------------------------
    def handle(self, run: S.kvm_run) -> str | None:
        regs, sregs = self.vcpu.get_regs(), self.vcpu.get_sregs()
        code = emulation_failure_bytes(run.u.internal)
        if code is None:
            try:
                code = self.read_virtual(sregs.cs.base + regs.rip, 15, sregs, partial=True)
            except GuestException:
                return f"emulation failure at rip={regs.rip:#x}: KVM gave no instruction bytes and RIP is unmapped"
        try:
            if not (sregs.efer & 0x400 and sregs.cs.l):
                raise EmulationFailure("the fallback emulates 64-bit code only")
            insn = decode(code)
            if insn.opcode == b"\xcc" and self.breakpoints is not None:
                name = self.breakpoints.on_int3(self.vcpu, regs, sregs)
                if name is not None:          # the VMM's own breakpoint, handled: the guest never sees it
                    self._withdraw_ud()
                    self.counts[name] += 1
                    return None
            handler = self._handlers.get(insn.opcode)
            if handler is None:
                raise EmulationFailure("no emulation for this opcode")
            state = _State(regs, sregs)
            try:
                name = handler(insn, state)
                state.regs.rip = (state.regs.rip + insn.length) & 0xFFFF_FFFF_FFFF_FFFF
                self._commit(state)
                self.counts[name] += 1
                if name == "int3":
                    self._inject(BP)
                else:
                    self._withdraw_ud()
            except GuestException as e:   # a fault: nothing was committed (faults are restartable, SDM 6.5)
                self._withdraw_ud()
                self.counts[f"exception {e.vector}"] += 1
                self._inject(e.vector, e.error_code, e.cr2)
            return None
        except (DecodeError, EmulationFailure) as e:
            return (f"KVM cannot emulate `{disassemble(code, regs.rip)}` at rip={regs.rip:#x} "
                    f"(cpl {sregs.cs.selector & 3}), nor can the fallback: {e}")

    def tick(self) -> None:
        """Called by the vCPU loop on ordinary exits: lets the breakpoints follow the guest."""
        self.breakpoints.poll(self.vcpu)

    def _commit(self, state: _State) -> None:
        self.vcpu.set_regs(state.regs)
        if state.sregs_dirty:
            self.vcpu.set_sregs(state.sregs)

    # -- exceptions ---------------------------------------------------------
    def _withdraw_ud(self) -> None:
        """Drop the #UD KVM queued when it gave up (it queues one at CPL 0 before exiting)."""
        ev = self.vcpu.get_vcpu_events()
        if (ev.exception.injected or ev.exception.pending) and ev.exception.nr == UD:
            ev.exception.injected = ev.exception.pending = 0
            self.vcpu.set_vcpu_events(ev)

    def _inject(self, vector: int, error_code: int | None = None, cr2: int | None = None) -> None:
        if cr2 is not None:
            sregs = self.vcpu.get_sregs()
            sregs.cr2 = cr2
            self.vcpu.set_sregs(sregs)
        ev = self.vcpu.get_vcpu_events()
        # "injected", not "pending": without KVM_CAP_EXCEPTION_PAYLOAD, KVM_SET_VCPU_EVENTS ignores pending
        ev.exception.injected, ev.exception.pending = 1, 0
        ev.exception.nr = vector
        ev.exception.has_error_code = int(error_code is not None)
        ev.exception.error_code = error_code or 0
        ev.exception_has_payload = 0
        self.vcpu.set_vcpu_events(ev)

    # -- guest memory ----------------------------------------------------
    def _gpa(self, linear: int, write: bool, sregs: S.kvm_sregs) -> int:
        tr = self.vcpu.translate(linear)
        cpl = sregs.cs.selector & 3
        if not tr.valid or (write and not tr.writeable and sregs.cr0 & (1 << 16)):
            raise GuestException(PF, (2 if write else 0) | (4 if cpl == 3 else 0) | int(bool(tr.valid)), linear)
        return tr.physical_address

    def read_virtual(self, linear: int, length: int, sregs: S.kvm_sregs, *, partial: bool = False) -> bytes:
        """Read ``length`` bytes at a guest-virtual address (page by page); #PF if unmapped.

        ``partial``: stop at the first unmapped page instead (an instruction fetch near a page end).
        """
        out = bytearray()
        while len(out) < length:
            addr = linear + len(out)
            chunk = min(length - len(out), PAGE - addr % PAGE)
            try:
                out += self.memory.read(self._gpa(addr, False, sregs), chunk)
            except GuestException:
                if partial and out:
                    break
                raise
            except GuestMemoryError:    # mapped, but not RAM (MMIO): not something these instructions do
                if partial and out:
                    break
                raise GuestException(GP, 0) from None
        return bytes(out)

    def write_virtual(self, linear: int, data: bytes, sregs: S.kvm_sregs) -> None:
        done = 0
        while done < len(data):
            addr = linear + done
            chunk = min(len(data) - done, PAGE - addr % PAGE)
            try:
                self.memory.write(self._gpa(addr, True, sregs), data[done:done + chunk])
            except GuestMemoryError:
                raise GuestException(GP, 0) from None  # not RAM (MMIO): not something these instructions do
            done += chunk

    def _ea(self, insn: Instruction, state: _State) -> int:
        s = state.sregs
        return insn.effective_address(state.regs, {"fs": s.fs.base, "gs": s.gs.base})

    # -- the instructions ------------------------------------------------
    def _int3(self, insn: Instruction, state: _State) -> str:
        # a trap: the #BP frame's RIP is the next instruction (SDM INT3); delivered after the commit
        return "int3"

    def _fwait(self, insn: Instruction, state: _State) -> str:
        # waits for pending unmasked x87 exceptions: with none pending (FSW.ES clear) it does nothing
        fpu = self.vcpu.get_fpu()
        if fpu.fsw & 0x80:
            raise EmulationFailure("FWAIT with a pending x87 exception (#MF is not emulated)")
        return "fwait"

    def _cpl0(self, state: _State) -> None:
        if state.sregs.cs.selector & 3:
            raise GuestException(GP, 0)

    def _sysret(self, insn: Instruction, state: _State) -> str:
        """SYSRET (SDM vol. 2B): back to CPL 3 at RCX with RFLAGS from R11; CS/SS from STAR[63:48]."""
        self._cpl0(state)
        r, s = state.regs, state.sregs
        star = self.vcpu.get_msrs([MSR_STAR])[MSR_STAR]
        base = star >> 48 & 0xFFFF
        if insn.rex_w:
            if not _canonical(r.rcx):
                raise GuestException(GP, 0)
            cs_sel, rip, long_mode = (base + 16) | 3, r.rcx, 1
        else:
            cs_sel, rip, long_mode = base | 3, r.rcx & 0xFFFF_FFFF, 0
        s.cs = S.kvm_segment(base=0, limit=0xFFFF_FFFF, selector=cs_sel, type=0xB, present=1, dpl=3, db=1 - long_mode,
                             s=1, l=long_mode, g=1)
        s.ss = S.kvm_segment(base=0, limit=0xFFFF_FFFF, selector=(base + 8) | 3, type=0x3, present=1, dpl=3, db=1,
                             s=1, l=0, g=1)
        state.sregs_dirty = True
        r.rflags = (r.r11 & SYSRET_RFLAGS_MASK) | 2
        # RIP is set so that the common "+= length" lands on the target
        r.rip = (rip - insn.length) & 0xFFFF_FFFF_FFFF_FFFF
        return "sysret64" if insn.rex_w else "sysret32"

    def _group7(self, insn: Instruction, state: _State) -> str:
        modrm = insn.modrm
        if modrm == 0xF8:                     # SWAPGS: GS.base <-> IA32_KERNEL_GS_BASE (SDM vol. 2B)
            self._cpl0(state)
            kernel_gs = self.vcpu.get_msrs([MSR_KERNEL_GS_BASE])[MSR_KERNEL_GS_BASE]
            self.vcpu.set_msrs({MSR_KERNEL_GS_BASE: state.sregs.gs.base})
            state.sregs.gs.base = kernel_gs
            state.sregs_dirty = True
            return "swapgs"
        if modrm in (0xCA, 0xCB):             # CLAC / STAC: RFLAGS.AC
            self._cpl0(state)
            if modrm == 0xCA:
                state.regs.rflags &= ~RFLAGS_AC
            else:
                state.regs.rflags |= RFLAGS_AC
            return "clac" if modrm == 0xCA else "stac"
        raise EmulationFailure(f"0f 01 {modrm:02x} is not emulated")

    def _group15(self, insn: Instruction, state: _State) -> str:
        if not insn.is_memory or insn.digit not in (2, 3):
            raise EmulationFailure(f"0f ae /{insn.digit} is not emulated")
        ea = self._ea(insn, state)
        if insn.digit == 2:                   # LDMXCSR m32
            value = int.from_bytes(self.read_virtual(ea, 4, state.sregs), "little")
            if value & ~MXCSR_MASK:
                raise GuestException(GP, 0)
            self.vcpu.set_mxcsr(value)
            return "ldmxcsr"
        self.write_virtual(ea, self.vcpu.get_mxcsr().to_bytes(4, "little"), state.sregs)   # STMXCSR m32
        return "stmxcsr"

    def _popcnt(self, insn: Instruction, state: _State) -> str:
        if not insn.has_prefix(0xF3):
            raise EmulationFailure("0f b8 without F3 (JMPE) is not emulated")
        size = insn.operand_size
        if insn.is_memory:
            src = int.from_bytes(self.read_virtual(self._ea(insn, state), size, state.sregs), "little")
        else:
            src = getattr(state.regs, GPR[insn.rm]) & ((1 << 8 * size) - 1)
        count = bin(src).count("1")
        dest = GPR[insn.reg]
        if size == 2:
            setattr(state.regs, dest, (getattr(state.regs, dest) & ~0xFFFF) | count)
        else:
            setattr(state.regs, dest, count)  # a 32-bit result zero-extends
        # flags: ZF = (src == 0); OF SF AF CF PF cleared
        state.regs.rflags = (state.regs.rflags & ~0x8D5) | (0x40 if src == 0 else 0)
        return "popcnt"

    def _x87_d9(self, insn: Instruction, state: _State) -> str:
        if insn.is_memory and insn.digit in (5, 7):       # FLDCW m16 / FNSTCW m16
            ea = self._ea(insn, state)
            fpu = self.vcpu.get_fpu()
            if insn.digit == 5:
                fpu.fcw = int.from_bytes(self.read_virtual(ea, 2, state.sregs), "little")
                self.vcpu.set_fpu(fpu)
                return "fldcw"
            self.write_virtual(ea, fpu.fcw.to_bytes(2, "little"), state.sregs)
            return "fnstcw"
        raise EmulationFailure(f"d9 {insn.modrm:02x} is not emulated")

    def _x87_db(self, insn: Instruction, state: _State) -> str:
        if insn.modrm == 0xE3:                            # FNINIT (SDM 8.1.5 / FINIT)
            fpu = self.vcpu.get_fpu()
            fpu.fcw, fpu.fsw, fpu.ftwx = FCW_INIT, 0, 0   # ftwx is the abridged tag word: 0 = all empty
            fpu.last_opcode, fpu.last_ip, fpu.last_dp = 0, 0, 0
            self.vcpu.set_fpu(fpu)
            return "fninit"
        if insn.modrm == 0xE2:                            # FNCLEX
            fpu = self.vcpu.get_fpu()
            fpu.fsw &= 0x7F00
            self.vcpu.set_fpu(fpu)
            return "fnclex"
        raise EmulationFailure(f"db {insn.modrm:02x} is not emulated")

    def _x87_dd(self, insn: Instruction, state: _State) -> str:
        if insn.is_memory and insn.digit == 7:            # FNSTSW m16
            self.write_virtual(self._ea(insn, state), self.vcpu.get_fpu().fsw.to_bytes(2, "little"), state.sregs)
            return "fnstsw"
        raise EmulationFailure(f"dd {insn.modrm:02x} is not emulated")

    def _x87_df(self, insn: Instruction, state: _State) -> str:
        if insn.modrm == 0xE0:                            # FNSTSW AX
            state.regs.rax = (state.regs.rax & ~0xFFFF) | self.vcpu.get_fpu().fsw
            return "fnstsw"
        raise EmulationFailure(f"df {insn.modrm:02x} is not emulated")


def _canonical(addr: int) -> bool:
    top = addr >> 47
    return top == 0 or top == 0x1FFFF
