"""Initial x86 vCPU state: CPUID, LAPIC wiring, MSRs, and the registers of a boot entry.

The guest always gets what ``KVM_GET_SUPPORTED_CPUID`` reports (plus its own APIC
ID and the hypervisor bit): on software-nested hosts (kvm_pvm) an instruction
outside that set ends in an emulation failure, so guests must see the truth.  The
one thing taken away, on kvm_pvm only, is the KVM paravirtual features that need a
working VMCALL (:data:`KVM_HYPERCALL_FEATURES`).
"""
from __future__ import annotations

import ctypes
import struct

from ..kvm import structs as S
from ..kvm.api import Kvm, Vcpu

# CR0 / CR4 / EFER bits
CR0_PE, CR0_ET, CR0_NE, CR0_PG = 1 << 0, 1 << 4, 1 << 5, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10

# LAPIC registers and local-vector-table delivery modes
APIC_LVT_LINT0, APIC_LVT_LINT1 = 0x350, 0x360
APIC_MODE_NMI, APIC_MODE_EXTINT = 0x4, 0x7

MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE, MTRR_TYPE_WB = 1 << 11, 6
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK, MSR_KERNEL_GS_BASE = (
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102)

CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_KVM_FEATURES = 0x4000_0001      # KVM's paravirtual feature bits (Documentation/virt/kvm/x86/cpuid.rst)
KVM_FEATURE_PV_UNHALT, KVM_FEATURE_PV_SEND_IPI, KVM_FEATURE_PV_SCHED_YIELD = 1 << 7, 1 << 11, 1 << 13
#: The KVM paravirtual features a guest uses through the VMCALL hypercall: PV spinlocks kick a halted
#: waiter (KVM_HC_KICK_CPU), IPIs go as KVM_HC_SEND_IPI, and a yield to a preempted vCPU is
#: KVM_HC_SCHED_YIELD.  On kvm_pvm a VMCALL from guest ring 0 never completes (measured,
#: tests/test_pvm_hypercall.py: the vCPU stays on it; likely KVM's emulator, whose em_hypercall patches the
#: instruction and lets the guest re-execute it, which is emulated again), so there the guest must not be offered them: Linux
#: then sends IPIs through its x2APIC and spins natively.  A 1-vCPU Linux never makes these calls.
KVM_HYPERCALL_FEATURES = KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD


def guest_cpuid(kvm: Kvm, vcpu_id: int, num_cpus: int, *, hypercalls: bool = True) -> list[S.kvm_cpuid_entry2]:
    """The supported CPUID, personalised for one vCPU (APIC ID, topology count).

    ``hypercalls``: False leaves out :data:`KVM_HYPERCALL_FEATURES` (a host where VMCALL does not work).
    """
    entries = kvm.supported_cpuid()
    for e in entries:
        if e.function == CPUID_KVM_FEATURES and not hypercalls:
            e.eax &= ~KVM_HYPERCALL_FEATURES
        elif e.function == 1:
            e.ebx = (e.ebx & 0x0000FFFF) | (vcpu_id << 24) | (min(num_cpus, 255) << 16)
            e.ecx |= CPUID_1_ECX_HYPERVISOR
            if num_cpus > 1:
                e.edx |= 1 << 28  # HTT: the logical processor count above is meaningful
        elif e.function == 0xB:
            e.edx = vcpu_id
    return entries


def cpuid_leaf(entries: list[S.kvm_cpuid_entry2], function: int, index: int = 0) -> S.kvm_cpuid_entry2 | None:
    for e in entries:
        if e.function == function and e.index == index:
            return e
    return None


def setup_lapic(vcpu: Vcpu) -> None:
    """LINT0 as ExtINT (the 8259 behind it) and LINT1 as NMI, as PC firmware leaves them."""
    lapic = vcpu.get_lapic()
    raw = bytearray(bytes(lapic))  # not .regs: a c_char array stops at the first NUL
    for reg, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        (v,) = struct.unpack_from("<I", raw, reg)
        v = (v & ~0x700) | (mode << 8)
        struct.pack_into("<I", raw, reg, v)
    ctypes.memmove(ctypes.addressof(lapic), bytes(raw), len(raw))
    vcpu.set_lapic(lapic)


def setup_msrs(vcpu: Vcpu) -> None:
    vcpu.set_msrs({
        MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MSR_IA32_MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WB,
    })


def _flat_segment(selector: int, code: bool, long_mode: bool = False) -> S.kvm_segment:
    return S.kvm_segment(base=0, limit=0xFFFFFFFF, selector=selector, type=0xB if code else 0x3,
                         present=1, dpl=0, db=0 if (code and long_mode) else 1, s=1,
                         l=1 if (code and long_mode) else 0, g=1)


def set_protected_mode_entry(vcpu: Vcpu, entry: int, *, rbx: int = 0, rsi: int = 0) -> None:
    """32-bit flat protected mode, paging off: the PVH entry state (and Linux's 32-bit boot entry)."""
    sregs = vcpu.get_sregs()
    sregs.cs = _flat_segment(0x10, code=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _flat_segment(0x18, code=False))
    sregs.tr = S.kvm_segment(base=0, limit=0x67, selector=0x20, type=0xB, present=1, s=0)
    sregs.ldt = S.kvm_segment(type=0x2, present=1, unusable=1)
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & ~CR0_PG
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = S.kvm_regs(rip=entry, rflags=0x2, rbx=rbx, rsi=rsi)
    vcpu.set_regs(regs)
    fpu = S.kvm_fpu(fcw=0x37F, mxcsr=0x1F80)
    vcpu.set_fpu(fpu)


def describe_registers(vcpu: Vcpu) -> str:
    """A one-screen register dump for error reports (an internal error must never be silent)."""
    try:
        r, s = vcpu.get_regs(), vcpu.get_sregs()
    except OSError as e:  # the vCPU may be unusable after a failure
        return f"<registers unavailable: {e}>"
    gp = " ".join(f"{n}={getattr(r, n):#x}" for n, _ in S.kvm_regs._fields_)
    return (f"{gp}\ncs={s.cs.selector:#x} (base {s.cs.base:#x}, l={s.cs.l} db={s.cs.db}) "
            f"cr0={s.cr0:#x} cr3={s.cr3:#x} cr4={s.cr4:#x} efer={s.efer:#x}")
