"""A small x86-64 instruction decoder: exactly what the instruction fallback emulates.

Decodes legacy prefixes, REX, the opcode (one-byte map, 0F map, x87 escapes),
ModRM, SIB and displacement, and computes memory operands' effective addresses
(RIP-relative included) — Intel SDM vol. 2, chapter 2 ("Instruction Format") and
section 2.2.1 (REX).  It does not know every opcode: :func:`decode` refuses an
opcode outside :data:`OPCODES` with :class:`DecodeError`, so the caller stops the
VM instead of guessing an instruction's length.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ExitlessError

#: legacy prefixes (SDM 2.1.1): lock/rep, segment overrides, operand size, address size
SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
LEGACY_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x66, 0x67, *SEGMENT_PREFIXES})
MAX_LENGTH = 15  # SDM 2.3.11: longer is #GP

#: opcodes the fallback knows, by their bytes after the prefixes: has a ModRM byte?
OPCODES: dict[bytes, bool] = {
    b"\xcc": False,            # INT3
    b"\x9b": False,            # FWAIT
    b"\x0f\x05": False,        # SYSCALL
    b"\x0f\x07": False,        # SYSRET
    b"\x0f\x01": True,         # group 7: SWAPGS (F8), CLAC (CA), STAC (CB)
    b"\x0f\xae": True,         # group 15: FXSAVE/FXRSTOR/LDMXCSR/STMXCSR, fences
    b"\x0f\xb8": True,         # POPCNT (F3 prefix)
    **{bytes([op]): True for op in range(0xD8, 0xE0)},   # x87 escapes (FNINIT = DB E3, FNSTSW, FLDCW...)
}

#: general-purpose register names by number (REX-extended), in kvm_regs field names
GPR = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
       "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


class DecodeError(ExitlessError, ValueError):
    """The bytes are not an instruction this decoder knows (or are cut short)."""


@dataclass(frozen=True)
class Instruction:
    """One decoded instruction.

    ``raw`` is its bytes (``length`` of them); ``opcode`` the opcode bytes after
    prefixes and REX; ``modrm``/``sib`` the raw bytes or None; ``disp`` the
    sign-extended displacement; ``rip_relative`` marks ModRM mod=00 rm=101 in
    64-bit mode (SDM 2.2.1.6).
    """

    raw: bytes
    prefixes: bytes
    rex: int
    opcode: bytes
    modrm: int | None = None
    sib: int | None = None
    disp: int = 0
    rip_relative: bool = False

    @property
    def length(self) -> int:
        return len(self.raw)

    @property
    def rex_w(self) -> bool:
        return bool(self.rex & 8)

    @property
    def mod(self) -> int:
        return (self.modrm or 0) >> 6

    @property
    def reg(self) -> int:
        """ModRM.reg extended by REX.R (for group opcodes, the /digit without REX.R: see ``digit``)."""
        return ((self.modrm or 0) >> 3 & 7) | (8 if self.rex & 4 else 0)

    @property
    def digit(self) -> int:
        return (self.modrm or 0) >> 3 & 7

    @property
    def rm(self) -> int:
        """ModRM.rm extended by REX.B (a register number when mod == 3)."""
        return ((self.modrm or 0) & 7) | (8 if self.rex & 1 else 0)

    @property
    def is_memory(self) -> bool:
        return self.modrm is not None and self.mod != 3

    @property
    def segment(self) -> str | None:
        """The segment override prefix, if any ('fs', 'gs'... — only fs/gs have a base in long mode)."""
        seg = None
        for p in self.prefixes:
            seg = SEGMENT_PREFIXES.get(p, seg)
        return seg

    def has_prefix(self, p: int) -> bool:
        return p in self.prefixes

    @property
    def operand_size(self) -> int:
        """Bytes of a general-purpose operand in 64-bit mode: 8 with REX.W, 2 with 66, else 4."""
        return 8 if self.rex_w else 2 if self.has_prefix(0x66) else 4

    def effective_address(self, regs, segment_bases: dict[str, int] | None = None) -> int:
        """The linear address of the memory operand (64-bit mode; 67 truncates to 32 bits).

        ``regs`` is a :class:`kvm_regs` (RIP = this instruction's address);
        ``segment_bases`` gives the fs/gs bases for an override prefix.
        """
        if not self.is_memory:
            raise DecodeError("the instruction has no memory operand")
        if self.rip_relative:
            ea = regs.rip + self.length + self.disp
        else:
            ea = self.disp
            if self.sib is not None:
                scale, index, base = 1 << (self.sib >> 6), (self.sib >> 3 & 7) | (8 if self.rex & 2 else 0), \
                    (self.sib & 7) | (8 if self.rex & 1 else 0)
                if index != 4:                      # index 100 (without REX.X) means none
                    ea += getattr(regs, GPR[index]) * scale
                if not (base & 7 == 5 and self.mod == 0):   # base 101 with mod 00: disp32, no base
                    ea += getattr(regs, GPR[base])
            else:
                ea += getattr(regs, GPR[self.rm])
        if self.has_prefix(0x67):
            ea &= 0xFFFF_FFFF
        seg = self.segment
        if seg in ("fs", "gs") and segment_bases:
            ea += segment_bases[seg]
        return ea & 0xFFFF_FFFF_FFFF_FFFF


def decode(code: bytes) -> Instruction:
    """Decode the 64-bit-mode instruction at the start of ``code``.

    Raises :class:`DecodeError` if the opcode is not in :data:`OPCODES`, or the
    bytes end before the instruction does, or it is longer than 15 bytes.
    """
    i = 0
    n = min(len(code), MAX_LENGTH)
    while i < n and code[i] in LEGACY_PREFIXES:
        i += 1
    prefixes = bytes(code[:i])
    rex = 0
    if i < n and 0x40 <= code[i] <= 0x4F:
        rex = code[i]
        i += 1
    opcode = None
    for size in (1, 2):
        if i + size <= n and bytes(code[i:i + size]) in OPCODES:
            opcode = bytes(code[i:i + size])
            break
    if opcode is None:
        raise DecodeError(f"opcode {bytes(code[i:i + 3]).hex(' ') or '(none)'} is not one the fallback knows")
    i += len(opcode)
    if not OPCODES[opcode]:
        return Instruction(bytes(code[:i]), prefixes, rex, opcode)

    def need(k: int) -> None:
        if i + k > n:
            raise DecodeError(f"instruction {bytes(code[:n]).hex(' ')} is cut short")

    need(1)
    modrm = code[i]
    i += 1
    mod, rm = modrm >> 6, modrm & 7
    sib, disp, rip_relative = None, 0, False
    if mod != 3:
        if rm == 4:
            need(1)
            sib = code[i]
            i += 1
        if mod == 0 and rm == 5:
            rip_relative, disp_size = True, 4
        elif mod == 0 and sib is not None and sib & 7 == 5:
            disp_size = 4
        else:
            disp_size = (0, 1, 4)[mod]
        need(disp_size)
        disp = int.from_bytes(code[i:i + disp_size], "little", signed=True)
        i += disp_size
    return Instruction(bytes(code[:i]), prefixes, rex, opcode, modrm, sib, disp, rip_relative)
