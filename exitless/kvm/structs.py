"""ctypes mirrors of the ``<linux/kvm.h>`` structures the VMM uses (x86-64).

Flexible array members are declared with length 0 and the variable-size
ioctls (CPUID, MSRs, GSI routing) build a sized buffer with :func:`sized`.
Layouts are checked against the kernel headers by ``tests/test_kvm_abi.py``.
"""
from __future__ import annotations

import ctypes
from ctypes import c_int16, c_int32, c_uint8, c_uint16, c_uint32, c_uint64


class _S(ctypes.Structure):
    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n, *_ in self._fields_ if not n.startswith("pad"))
        return f"{type(self).__name__}({fields})"


class kvm_userspace_memory_region(_S):
    _fields_ = [("slot", c_uint32), ("flags", c_uint32), ("guest_phys_addr", c_uint64),
                ("memory_size", c_uint64), ("userspace_addr", c_uint64)]


class kvm_regs(_S):
    _fields_ = [(n, c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(_S):
    _fields_ = [("base", c_uint64), ("limit", c_uint32), ("selector", c_uint16), ("type", c_uint8),
                ("present", c_uint8), ("dpl", c_uint8), ("db", c_uint8), ("s", c_uint8), ("l", c_uint8),
                ("g", c_uint8), ("avl", c_uint8), ("unusable", c_uint8), ("padding", c_uint8)]


class kvm_dtable(_S):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(_S):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
                ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", c_uint64), ("cr2", c_uint64), ("cr3", c_uint64), ("cr4", c_uint64), ("cr8", c_uint64),
                ("efer", c_uint64), ("apic_base", c_uint64),
                ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_fpu(_S):
    _fields_ = [("fpr", (c_uint8 * 16) * 8), ("fcw", c_uint16), ("fsw", c_uint16), ("ftwx", c_uint8),
                ("pad1", c_uint8), ("last_opcode", c_uint16), ("last_ip", c_uint64), ("last_dp", c_uint64),
                ("xmm", (c_uint8 * 16) * 16), ("mxcsr", c_uint32), ("pad2", c_uint32)]


class kvm_vcpu_events_exception(_S):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("has_error_code", c_uint8), ("pending", c_uint8),
                ("error_code", c_uint32)]


class kvm_vcpu_events_interrupt(_S):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class kvm_vcpu_events_nmi(_S):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class kvm_vcpu_events_smi(_S):
    _fields_ = [("smm", c_uint8), ("pending", c_uint8), ("smm_inside_nmi", c_uint8), ("latched_init", c_uint8)]


class kvm_vcpu_events(_S):
    _fields_ = [("exception", kvm_vcpu_events_exception), ("interrupt", kvm_vcpu_events_interrupt),
                ("nmi", kvm_vcpu_events_nmi), ("sipi_vector", c_uint32), ("flags", c_uint32),
                ("smi", kvm_vcpu_events_smi), ("triple_fault_pending", c_uint8), ("reserved", c_uint8 * 26),
                ("exception_has_payload", c_uint8), ("exception_payload", c_uint64)]


class kvm_translation(_S):
    _fields_ = [("linear_address", c_uint64), ("physical_address", c_uint64), ("valid", c_uint8),
                ("writeable", c_uint8), ("usermode", c_uint8), ("pad", c_uint8 * 5)]


class kvm_guest_debug_arch(_S):
    _fields_ = [("debugreg", c_uint64 * 8)]


class kvm_guest_debug(_S):
    _fields_ = [("control", c_uint32), ("pad", c_uint32), ("arch", kvm_guest_debug_arch)]


XSAVE_MXCSR_WORD = 24 // 4


class kvm_xsave(_S):
    """The XSAVE image; bytes 0..511 are the FXSAVE legacy area (MXCSR at offset 24, SDM 10.5.1)."""
    _fields_ = [("region", c_uint32 * 1024)]


class kvm_lapic_state(_S):
    _fields_ = [("regs", ctypes.c_char * 1024)]


class kvm_msr_entry(_S):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(_S):
    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", kvm_msr_entry * 0)]


class kvm_msr_list(_S):
    _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * 0)]


class kvm_cpuid_entry2(_S):
    _fields_ = [("function", c_uint32), ("index", c_uint32), ("flags", c_uint32), ("eax", c_uint32),
                ("ebx", c_uint32), ("ecx", c_uint32), ("edx", c_uint32), ("padding", c_uint32 * 3)]


class kvm_cpuid2(_S):
    _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", kvm_cpuid_entry2 * 0)]


class kvm_irq_level(_S):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class kvm_pit_config(_S):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class kvm_ioeventfd(_S):
    _fields_ = [("datamatch", c_uint64), ("addr", c_uint64), ("len", c_uint32), ("fd", c_int32),
                ("flags", c_uint32), ("pad", c_uint8 * 36)]


class kvm_irqfd(_S):
    _fields_ = [("fd", c_uint32), ("gsi", c_uint32), ("flags", c_uint32), ("resamplefd", c_uint32),
                ("pad", c_uint8 * 16)]


class kvm_enable_cap(_S):
    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4), ("pad", c_uint8 * 64)]


class kvm_msi(_S):
    _fields_ = [("address_lo", c_uint32), ("address_hi", c_uint32), ("data", c_uint32), ("flags", c_uint32),
                ("devid", c_uint32), ("pad", c_uint8 * 12)]


class kvm_irq_routing_irqchip(_S):
    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class kvm_irq_routing_msi(_S):
    _fields_ = [("address_lo", c_uint32), ("address_hi", c_uint32), ("data", c_uint32), ("devid", c_uint32)]


class _routing_u(ctypes.Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi), ("pad", c_uint32 * 8)]


class kvm_irq_routing_entry(_S):
    _fields_ = [("gsi", c_uint32), ("type", c_uint32), ("flags", c_uint32), ("pad", c_uint32), ("u", _routing_u)]


class kvm_irq_routing(_S):
    _fields_ = [("nr", c_uint32), ("flags", c_uint32), ("entries", kvm_irq_routing_entry * 0)]


# --- struct kvm_run (the shared page of a vCPU) ---------------------------------
class kvm_run_io(_S):
    _fields_ = [("direction", c_uint8), ("size", c_uint8), ("port", c_uint16), ("count", c_uint32),
                ("data_offset", c_uint64)]


class kvm_run_mmio(_S):
    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32), ("is_write", c_uint8)]


class kvm_run_fail_entry(_S):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class kvm_run_internal(_S):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_system_event(_S):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_exception(_S):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class _run_exit_u(ctypes.Union):
    _fields_ = [("io", kvm_run_io), ("mmio", kvm_run_mmio), ("fail_entry", kvm_run_fail_entry),
                ("internal", kvm_run_internal), ("system_event", kvm_run_system_event),
                ("ex", kvm_run_exception), ("padding", ctypes.c_char * 256)]


class kvm_run(_S):
    _fields_ = [("request_interrupt_window", c_uint8), ("immediate_exit", c_uint8), ("padding1", c_uint8 * 6),
                ("exit_reason", c_uint32), ("ready_for_interrupt_injection", c_uint8), ("if_flag", c_uint8),
                ("flags", c_uint16), ("cr8", c_uint64), ("apic_base", c_uint64), ("u", _run_exit_u)]


# --- binary statistics (KVM_GET_STATS_FD) ----------------------------------------
class kvm_stats_header(_S):
    _fields_ = [("flags", c_uint32), ("name_size", c_uint32), ("num_desc", c_uint32), ("id_offset", c_uint32),
                ("desc_offset", c_uint32), ("data_offset", c_uint32)]


class kvm_stats_desc(_S):
    _fields_ = [("flags", c_uint32), ("exponent", c_int16), ("size", c_uint16), ("offset", c_uint32),
                ("bucket_size", c_uint32)]


def sized(header_type, entry_type, entries: int):
    """A ctypes class for ``header_type`` whose flexible array holds ``entries`` elements."""
    fields = list(header_type._fields_[:-1]) + [(header_type._fields_[-1][0], entry_type * entries)]
    return type(f"{header_type.__name__}_{entries}", (_S,), {"_fields_": fields})
