"""VMCALL from guest ring 0, and the KVM paravirtual features that depend on it.

Linux with more than one vCPU uses hypercalls when KVM offers the features: IPIs
(``KVM_HC_SEND_IPI``), PV spinlock kicks (``KVM_HC_KICK_CPU``) and yields to a
preempted vCPU (``KVM_HC_SCHED_YIELD``).  On kvm_pvm a VMCALL from guest ring 0 never
completes (the vCPU stays on it; likely KVM's emulator, whose em_hypercall patches the
instruction and lets the guest re-execute it, which is emulated again), so exitless offers none of those
features there (``exitless.x86.cpu.KVM_HYPERCALL_FEATURES``).  The test measures the host
and checks the VMM's CPUID agrees with it, so it fails on a host where the two disagree.
"""
from contextlib import closing

import pytest

from exitless.doctor import kvm_flavour
from exitless.kvm.api import Kvm
from exitless.vm import Machine, VmConfig
from exitless.x86 import cpu as X
from tests.asmguest import build_guest

pytestmark = pytest.mark.kvm
KVM_HC_VAPIC_POLL_IRQ = 1     # a hypercall that does nothing and returns 0
BODY = r"""
    mov $1, %eax
    xor %ebx, %ebx
    vmcall
    add $0x42, %eax
    jmp exit_with_eax
"""


def kvm_features(cpuid) -> int:
    leaf = X.cpuid_leaf(cpuid, X.CPUID_KVM_FEATURES)
    return leaf.eax if leaf is not None else 0


def test_guest_cpuid_without_hypercalls_keeps_every_other_feature():
    with closing(Kvm()) as kvm:
        full = kvm_features(X.guest_cpuid(kvm, 0, 2))
        without = kvm_features(X.guest_cpuid(kvm, 0, 2, hypercalls=False))
    assert without == full & ~X.KVM_HYPERCALL_FEATURES


def test_vmcall_works_wherever_the_vmm_offers_hypercall_features(tmp_path):
    elf = build_guest(tmp_path, "vmcall", BODY, ring0=True)
    with Machine(VmConfig(mem_mib=64, cpus=2)) as m:
        offered = kvm_features(m.cpuid) & X.KVM_HYPERCALL_FEATURES
        m.boot_pvh(elf)
        result = m.run(timeout=5)
        rip = m.vcpus[0].get_regs().rip
    if result.kind == "timeout":           # the hypercall never returned: the guest must not be offered any
        assert kvm_flavour() == "pvm", f"VMCALL hangs on a {kvm_flavour()} host (rip={rip:#x})"
        assert offered == 0, f"hypercall features {offered:#x} offered where VMCALL never returns"
    else:
        assert result.status == 0x42, result            # returned 0 (KVM_HC_VAPIC_POLL_IRQ)
        with closing(Kvm()) as kvm:
            assert offered == kvm_features(kvm.supported_cpuid()) & X.KVM_HYPERCALL_FEATURES
