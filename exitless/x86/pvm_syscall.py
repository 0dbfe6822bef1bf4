"""System calls from user mode on a kvm_pvm host: the VMM repairs what KVM delivers.

What this host does (measured with a ring-0 test guest, tests/test_pvm_syscall.py): a
SYSCALL executed in guest user mode sets RCX (the return address) and R11 (RFLAGS) as
the architecture says and jumps to ``MSR_LSTAR`` — but stays in user mode (CPL 3,
CS = the user's).  kvm_pvm was written for guests that use its paravirtual event ABI
(``MSR_PVM_EVENT_ENTRY``, ``MSR_PVM_VCPU_STRUCT``), which an unmodified kernel never
sets up.  An unmodified Linux then takes a page fault on its own ``entry_SYSCALL_64``
(supervisor-only text fetched at CPL 3) and kills the process ("segfault at
ffffffff81c00080 ip ffffffff81c00080 ... error 15").

The repair: a breakpoint (INT3) on the first instruction of the guest's page-fault
handler, found through the guest's own IDT (IDTR from ``KVM_GET_SREGS``, gate 14).
Ring-0 code is emulated here and KVM's emulator cannot execute INT3, so each time the
guest enters its #PF handler the VMM gets an emulation failure exit at that address.
If the exception frame on the stack is the botched system call (from CPL 3, RIP =
CR2 = LSTAR) the VMM turns the vCPU into the state an architectural SYSCALL would have
produced (SDM vol. 2B, SYSCALL): RIP = LSTAR, RSP = the user's RSP, RFLAGS = the user's
RFLAGS (R11) & ~IA32_FMASK, RCX/R11 as the hardware left them, CPL 0 (already: the
exception delivery put the vCPU there).  Any other page fault continues into the
handler past the displaced first instruction, which must be one without effect
(ENDBR64 or a NOP) for the breakpoint to be planted.

The breakpoint is planted (and moved, when the kernel changes its IDT during boot)
from :meth:`SyscallRepair.poll`, which the vCPU loop calls on ordinary exits at most
every :data:`POLL_INTERVAL` seconds.  Only a Machine on a kvm_pvm host creates one:
on VMX/SVM user SYSCALL works and nothing here runs.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter

from ..kvm import structs as S
from .fallback import MSR_LSTAR, MSR_SYSCALL_MASK, RFLAGS_RF

log = logging.getLogger(__name__)

PF_VECTOR = 14
INT3 = 0xCC
POLL_INTERVAL = 0.2  # seconds between looks at the guest's IDT
#: first instructions of a #PF handler that have no effect, so the handler may start one past them
NO_EFFECT = (bytes.fromhex("f30f1efa"),   # ENDBR64
             bytes.fromhex("0f1f440000"), bytes.fromhex("0f1f4000"), bytes.fromhex("0f1f00"),
             bytes.fromhex("6690"), bytes.fromhex("90"))


def gate_offset(gate: bytes) -> int:
    """The handler address in a 16-byte long-mode IDT gate (SDM vol. 3A, figure 6-8)."""
    return (int.from_bytes(gate[0:2], "little") | int.from_bytes(gate[6:8], "little") << 16
            | int.from_bytes(gate[8:12], "little") << 32)


class SyscallRepair:
    """The #PF-handler breakpoint for one VM (shared by its vCPUs).

    ``memory`` is the guest's GuestMemory.  ``counts``: ``syscall`` (botched system
    calls turned into SYSCALL entries), ``page fault`` (other faults passed on),
    ``planted`` (breakpoints written).
    """

    def __init__(self, memory):
        self.memory = memory
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._site: tuple[int, int, bytes] | None = None   # (guest-virtual, guest-physical, displaced insn)
        self._next_poll = 0.0
        self.interval = POLL_INTERVAL
        self._refused: set[int] = set()

    # -- planting --------------------------------------------------------
    def poll(self, vcpu) -> None:
        """Look at the guest's IDT (rate-limited) and keep the breakpoint on its #PF handler."""
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + self.interval
        sregs = vcpu.get_sregs()
        if not (sregs.cr0 & 0x8000_0000 and sregs.efer & 0x400) or sregs.idt.limit < 16 * PF_VECTOR + 15:
            return
        gate = _read_virtual(vcpu, self.memory, sregs.idt.base + 16 * PF_VECTOR, 16)
        if gate is None:
            return
        handler = gate_offset(gate)
        with self._lock:
            if self._site is not None and self._site[0] == handler:
                if self.memory.read(self._site[1], 1)[0] != INT3:   # the kernel rewrote its text: plant again
                    self._plant(vcpu, handler)
                return
            self._unplant()
            self._plant(vcpu, handler)

    def _plant(self, vcpu, handler: int) -> None:
        tr = vcpu.translate(handler)
        if not tr.valid:
            return
        code = self.memory.read(tr.physical_address, 8) if self.memory.contains(tr.physical_address, 8) else b""
        displaced = next((n for n in NO_EFFECT if code.startswith(n)), None)
        if displaced is None:
            if handler not in self._refused:      # Linux's early IDT (push $14; jmp) is replaced at trap_init
                self._refused.add(handler)
                log.info("pvm: the guest's #PF handler at %#x starts with %s, not an ENDBR64/NOP: no breakpoint, "
                            "so user-mode system calls cannot be repaired", handler, code.hex(" "))
            return
        self.memory.write(tr.physical_address, bytes([INT3]))
        self._site = (handler, tr.physical_address, displaced)
        self.counts["planted"] += 1
        log.info("pvm: breakpoint on the guest's #PF handler at %#x (displaced %s)", handler, displaced.hex(" "))

    def _unplant(self) -> None:
        if self._site is None:
            return
        _, gpa, displaced = self._site
        if self.memory.read(gpa, 1)[0] == INT3:       # still ours (not freed and reused by the guest)
            self.memory.write(gpa, displaced[:1])
        self._site = None

    # -- hits ------------------------------------------------------------
    def on_int3(self, vcpu, regs: S.kvm_regs, sregs: S.kvm_sregs) -> str | None:
        """Called by the instruction fallback for an INT3 at ``regs.rip`` (CPL 0).

        Returns the name of what was done (the registers were set), or None if the
        INT3 is not this breakpoint (then it is the guest's own).
        """
        site = self._site
        if site is None or regs.rip != site[0]:
            return None
        frame = _read_virtual(vcpu, self.memory, regs.rsp, 48) or bytes(48)   # unreadable: not a syscall
        error_code, rip, cs, rflags, user_rsp, ss = (int.from_bytes(frame[i:i + 8], "little") for i in range(0, 48, 8))
        msrs = vcpu.get_msrs([MSR_LSTAR, MSR_SYSCALL_MASK])
        lstar = msrs[MSR_LSTAR]
        if cs & 3 == 3 and rip == lstar and sregs.cr2 == lstar:
            # the SYSCALL the hardware began at CPL 3: RCX = return RIP, R11 = user RFLAGS (already set)
            regs.rip = lstar
            regs.rsp = user_rsp
            regs.rflags = (regs.r11 & ~msrs[MSR_SYSCALL_MASK] & ~RFLAGS_RF) | 2
            vcpu.set_regs(regs)
            self.counts["syscall"] += 1
            return "pvm syscall"
        regs.rip += len(site[2])
        vcpu.set_regs(regs)
        self.counts["page fault"] += 1
        return "pvm page fault"


def _read_virtual(vcpu, memory, linear: int, length: int) -> bytes | None:
    """``length`` bytes at a guest-virtual address (may cross one page), or None if unmapped or not RAM."""
    out = bytearray()
    while len(out) < length:
        addr = linear + len(out)
        chunk = min(length - len(out), 4096 - addr % 4096)
        tr = vcpu.translate(addr)
        if not tr.valid or not memory.contains(tr.physical_address, chunk):
            return None
        out += memory.read(tr.physical_address, chunk)
    return bytes(out)
