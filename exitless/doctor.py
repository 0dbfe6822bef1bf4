"""``exitless doctor``: can this host run exitless guests, and what will they see?

Recognises the KVM flavour (VMX, SVM, or the software-nested ``kvm_pvm``
backend), lists the capabilities the VMM relies on, and prints the CPUID the
guest will get, with the features that matter for guest code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from . import confine
from .kvm import constants as C
from .kvm.api import Kvm
from .kvm.syscall import KvmError
from .x86.cpu import cpuid_leaf

REQUIRED_CAPS = ("KVM_CAP_IRQCHIP", "KVM_CAP_USER_MEMORY", "KVM_CAP_IOEVENTFD", "KVM_CAP_IRQFD",
                 "KVM_CAP_IRQ_ROUTING", "KVM_CAP_PIT2", "KVM_CAP_SET_TSS_ADDR", "KVM_CAP_EXT_CPUID",
                 "KVM_CAP_IMMEDIATE_EXIT")
USEFUL_CAPS = ("KVM_CAP_BINARY_STATS_FD", "KVM_CAP_SIGNAL_MSI", "KVM_CAP_GET_TSC_KHZ",
               "KVM_CAP_TSC_DEADLINE_TIMER", "KVM_CAP_X2APIC_API", "KVM_CAP_READONLY_MEM")
LEAF1_ECX = {0: "sse3", 9: "ssse3", 19: "sse4.1", 20: "sse4.2", 23: "popcnt", 26: "xsave", 28: "avx", 24: "tsc-deadline",
             21: "x2apic", 31: "hypervisor"}
LEAF1_EDX = {0: "fpu", 4: "tsc", 5: "msr", 9: "apic", 25: "sse", 26: "sse2"}
#: Linux's /proc/cpuinfo names of the features above, where they differ.
CPUINFO_NAMES = {"sse3": "pni", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "tsc-deadline": "tsc_deadline_timer"}


@dataclass
class Report:
    usable: bool
    flavour: str = "unknown"
    problems: list[str] = field(default_factory=list)
    caps: dict[str, int] = field(default_factory=dict)
    cpu_features: list[str] = field(default_factory=list)
    missing_features: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_vcpus: int = 0
    #: kvm_pvm only: what guest ring-3 code sees (CPUID is not intercepted there: the host's bits)
    ring3_features: list[str] | None = None
    ring3_missing: list[str] | None = None


def host_cpu_features(cpuinfo: str | None = None) -> set[str]:
    """The features of :data:`LEAF1_ECX`/:data:`LEAF1_EDX` the host CPU has, by our names (``/proc/cpuinfo``)."""
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    names = [*LEAF1_ECX.values(), *LEAF1_EDX.values()]
    return {n for n in names if CPUINFO_NAMES.get(n, n) in flags}


#: (kernel module, flavour, what a benchmark row says of such a host), in the order they are looked for
KVM_MODULES = (("kvm_pvm", "pvm", "kvm_pvm (software nested KVM: guest ring 0 emulated)"),
               ("kvm_intel", "vmx", "kvm_intel (VMX)"), ("kvm_amd", "svm", "kvm_amd (SVM)"))


def kvm_flavour() -> str:
    """``pvm``, ``vmx`` or ``svm``: which KVM module this host has loaded (``unknown`` for none)."""
    mods = Path("/sys/module")
    for name, flavour, _ in KVM_MODULES:
        if (mods / name).exists():
            return flavour
    return "unknown"


def kvm_module(flavour: str) -> str:
    """The KVM module of a :func:`kvm_flavour` value (``kvm_pvm``, ``kvm_intel``, ``kvm_amd``; else the flavour)."""
    return next((mod for mod, f, _ in KVM_MODULES if f == flavour), flavour)


def host_label(flavour: str) -> str:
    """What a benchmark says about the host it ran on, for a :func:`kvm_flavour` value."""
    return next((label for _, f, label in KVM_MODULES if f == flavour), f"{flavour} (no KVM module known)")


def diagnose(device: str = "/dev/kvm") -> Report:
    if not os.path.exists(device):
        return Report(False, problems=[f"{device} does not exist: is the kvm module loaded (and is this a VM "
                                       "without nested virtualisation)?"])
    try:
        kvm = Kvm(device)
    except (KvmError, RuntimeError) as e:
        return Report(False, problems=[str(e)])
    try:
        rep = Report(True, flavour=kvm_flavour())
        for name in REQUIRED_CAPS + USEFUL_CAPS:
            rep.caps[name] = kvm.check_extension(getattr(C, name))
        rep.max_vcpus = kvm.check_extension(C.KVM_CAP_MAX_VCPUS)
        for name in REQUIRED_CAPS:
            if not rep.caps[name]:
                rep.usable = False
                rep.problems.append(f"missing {name}")
        entries = kvm.supported_cpuid()
        leaf1 = cpuid_leaf(entries, 1)
        if leaf1 is not None:
            for bits, reg in ((LEAF1_ECX, leaf1.ecx), (LEAF1_EDX, leaf1.edx)):
                for bit, feat in bits.items():
                    (rep.cpu_features if reg >> bit & 1 else rep.missing_features).append(feat)
        if rep.flavour == "pvm":
            host = host_cpu_features()
            order = [*LEAF1_ECX.values(), *LEAF1_EDX.values()]
            rep.ring3_features = [f for f in order if f in host]
            rep.ring3_missing = [f for f in order if f not in host]
            rep.notes += [
                "software-nested KVM (kvm_pvm): guest ring-0 code goes through KVM's instruction emulator "
                "(~1 µs per instruction) while ring-3 code runs natively; the guest kit runs its drivers in ring 3.",
                "an unmodified Linux kernel boots here in minutes, not seconds; `exitless run` adds the kernel "
                "parameters this host needs (noxsave, clearcpuid, mitigations=off...) and says so, finishes "
                "the instructions KVM's emulator cannot and repairs user-mode system calls.",
                "ring-0 guest code must stay within the ring-0 CPUID above: an instruction outside it ends in a KVM "
                "emulation failure unless exitless finishes it; ring-3 code runs natively and its CPUID shows the host's "
                "features (kvm_pvm does not intercept CPUID in ring 3).",
            ]
        return rep
    finally:
        kvm.close()


def format_report(rep: Report) -> str:
    lines = [f"/dev/kvm: {'usable' if rep.usable else 'NOT usable'}", f"KVM flavour: {rep.flavour}"]
    lines += [f"  problem: {p}" for p in rep.problems]
    if rep.caps:
        lines.append("capabilities: " + ", ".join(f"{k[8:].lower()}={v}" for k, v in rep.caps.items()))
        lines.append(f"max vCPUs per VM: {rep.max_vcpus}")
        if rep.ring3_features is None:
            lines.append("guest CPUID offers: " + " ".join(rep.cpu_features))
            lines.append("guest CPUID lacks:  " + (" ".join(rep.missing_features) or "-"))
        else:
            lines.append("guest CPUID in ring 0 (what KVM_SET_CPUID gives) offers: " + " ".join(rep.cpu_features))
            lines.append("guest CPUID in ring 0 lacks:  " + (" ".join(rep.missing_features) or "-"))
            lines.append("guest CPUID in ring 3 (not intercepted on kvm_pvm: the host's bits) offers: " +
                         " ".join(rep.ring3_features))
            lines.append("guest CPUID in ring 3 lacks:  " + (" ".join(rep.ring3_missing or []) or "-"))
    lines += [f"note: {n}" for n in rep.notes]
    ok, how = confine.status(probe=True)
    lines.append(f"back-end confinement: {'available' if ok else 'NOT available'} ({how})")
    return "\n".join(lines)
