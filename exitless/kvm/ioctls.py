"""KVM ioctl request numbers, computed from the kernel's ``_IOC`` encoding.

Numbers are derived from (direction, type, nr, size-of-struct) exactly as
``<asm-generic/ioctl.h>`` does, with the struct sizes taken from the ctypes
mirrors in :mod:`exitless.kvm.structs`.  ``tests/test_kvm_abi.py`` compiles a C
program against ``<linux/kvm.h>`` and checks every number and struct layout.
"""
from __future__ import annotations

import ctypes

from . import structs as S

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2

KVMIO = 0xAE


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    assert size < (1 << _IOC_SIZEBITS)
    return (direction << _IOC_DIRSHIFT) | (typ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _IO(nr: int) -> int:
    return _IOC(_IOC_NONE, KVMIO, nr, 0)


def _IOR(nr: int, ctype) -> int:
    return _IOC(_IOC_READ, KVMIO, nr, ctypes.sizeof(ctype))


def _IOW(nr: int, ctype) -> int:
    return _IOC(_IOC_WRITE, KVMIO, nr, ctypes.sizeof(ctype))


def _IOWR(nr: int, ctype) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, KVMIO, nr, ctypes.sizeof(ctype))


# system ioctls
KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(0x02, S.kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(0x05, S.kvm_cpuid2)

# VM ioctls
KVM_CREATE_VCPU = _IO(0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, S.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = _IO(0x60)
KVM_IRQ_LINE = _IOW(0x61, S.kvm_irq_level)
KVM_SET_GSI_ROUTING = _IOW(0x6A, S.kvm_irq_routing)
KVM_IRQFD = _IOW(0x76, S.kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(0x77, S.kvm_pit_config)
KVM_IOEVENTFD = _IOW(0x79, S.kvm_ioeventfd)
KVM_ENABLE_CAP = _IOW(0xA3, S.kvm_enable_cap)
KVM_SIGNAL_MSI = _IOW(0xA5, S.kvm_msi)
KVM_GET_STATS_FD = _IO(0xCE)

# vCPU ioctls
KVM_RUN = _IO(0x80)
KVM_GET_REGS = _IOR(0x81, S.kvm_regs)
KVM_SET_REGS = _IOW(0x82, S.kvm_regs)
KVM_GET_SREGS = _IOR(0x83, S.kvm_sregs)
KVM_SET_SREGS = _IOW(0x84, S.kvm_sregs)
KVM_GET_MSRS = _IOWR(0x88, S.kvm_msrs)
KVM_SET_MSRS = _IOW(0x89, S.kvm_msrs)
KVM_GET_FPU = _IOR(0x8C, S.kvm_fpu)
KVM_SET_FPU = _IOW(0x8D, S.kvm_fpu)
KVM_GET_LAPIC = _IOR(0x8E, S.kvm_lapic_state)
KVM_SET_LAPIC = _IOW(0x8F, S.kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(0x90, S.kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(0x91, S.kvm_cpuid2)
KVM_GET_TSC_KHZ = _IO(0xA3)
KVM_GET_XSAVE = _IOR(0xA4, S.kvm_xsave)
KVM_SET_XSAVE = _IOW(0xA5, S.kvm_xsave)
KVM_TRANSLATE = _IOWR(0x85, S.kvm_translation)
KVM_SET_GUEST_DEBUG = _IOW(0x9B, S.kvm_guest_debug)
KVM_GET_VCPU_EVENTS = _IOR(0x9F, S.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(0xA0, S.kvm_vcpu_events)

ALL = {k: v for k, v in globals().items() if k.startswith("KVM_") and isinstance(v, int)}
