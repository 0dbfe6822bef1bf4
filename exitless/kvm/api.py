"""Thin, typed wrappers over the three KVM file descriptors: system, VM and vCPU.

Modelled on rust-vmm's kvm-ioctls: ``Kvm`` opens ``/dev/kvm``, ``Vm`` owns a VM
fd, ``Vcpu`` owns a vCPU fd and its mmap'ed ``struct kvm_run``.  No policy
lives here; the VMM layers above decide what to call and when.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os

from . import constants as C
from . import ioctls as I
from . import structs as S
from .stats import Stats
from .syscall import KvmError, ioctl, ioctl_raw

KVM_DEVICE = "/dev/kvm"
KVM_API_VERSION = 12
MAX_CPUID_ENTRIES = 256
MAX_MSR_ENTRIES = 1024


class Kvm:
    """The system fd: capabilities, supported CPUID, and VM creation."""

    def __init__(self, path: str = KVM_DEVICE):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(I.KVM_GET_API_VERSION, e.errno, f"cannot open {path}") from e
        version = ioctl(self.fd, I.KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(I.KVM_GET_API_VERSION, errno.EPROTO,
                           f"{path}: KVM API version {version}, expected {KVM_API_VERSION}")
        self.api_version = version

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, I.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, I.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[S.kvm_cpuid_entry2]:
        buf_t = S.sized(S.kvm_cpuid2, S.kvm_cpuid_entry2, MAX_CPUID_ENTRIES)
        buf = buf_t(nent=MAX_CPUID_ENTRIES)
        ioctl(self.fd, I.KVM_GET_SUPPORTED_CPUID, buf)
        return [S.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def msr_index_list(self) -> list[int]:
        buf_t = S.sized(S.kvm_msr_list, ctypes.c_uint32, MAX_MSR_ENTRIES)
        buf = buf_t(nmsrs=MAX_MSR_ENTRIES)
        ioctl(self.fd, I.KVM_GET_MSR_INDEX_LIST, buf)
        return list(buf.indices[: buf.nmsrs])

    def create_vm(self) -> "Vm":
        return Vm(self, ioctl(self.fd, I.KVM_CREATE_VM, 0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vm:
    """A VM fd: memory slots, the in-kernel irqchip, eventfds and vCPU creation."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = S.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=gpa,
                                               memory_size=size, userspace_addr=host_addr)
        ioctl(self.fd, I.KVM_SET_USER_MEMORY_REGION, region, what=f"slot {slot} gpa {gpa:#x} size {size:#x}")

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, I.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, I.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        ioctl(self.fd, I.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = C.KVM_PIT_SPEAKER_DUMMY) -> None:
        ioctl(self.fd, I.KVM_CREATE_PIT2, S.kvm_pit_config(flags=flags))

    def irq_line(self, irq: int, level: int) -> None:
        ioctl(self.fd, I.KVM_IRQ_LINE, S.kvm_irq_level(irq=irq, level=level))

    def ioeventfd(self, fd: int, addr: int, length: int, *, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        flags = (C.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (C.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= C.KVM_IOEVENTFD_FLAG_DATAMATCH
        arg = S.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        ioctl(self.fd, I.KVM_IOEVENTFD, arg, what=f"{'pio' if pio else 'mmio'} {addr:#x}/{length}")

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        arg = S.kvm_irqfd(fd=fd, gsi=gsi, flags=C.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0)
        ioctl(self.fd, I.KVM_IRQFD, arg, what=f"gsi {gsi}")

    def set_gsi_routing(self, entries: list[S.kvm_irq_routing_entry]) -> None:
        """Replace the whole GSI routing table (callers keep the irqchip routes in ``entries``)."""
        buf = S.sized(S.kvm_irq_routing, S.kvm_irq_routing_entry, len(entries))(nr=len(entries))
        for i, e in enumerate(entries):
            buf.entries[i] = e
        ioctl(self.fd, I.KVM_SET_GSI_ROUTING, buf)

    def signal_msi(self, address: int, data: int) -> int:
        msi = S.kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        return ioctl(self.fd, I.KVM_SIGNAL_MSI, msi)

    def stats(self) -> Stats:
        return Stats(ioctl(self.fd, I.KVM_GET_STATS_FD))

    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        return Vcpu(self, vcpu_id, ioctl(self.fd, I.KVM_CREATE_VCPU, vcpu_id))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vcpu:
    """A vCPU fd with its ``kvm_run`` page; ``run()`` is one KVM_RUN (GIL released)."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int):
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self._mmap = mmap.mmap(fd, vm.kvm.vcpu_mmap_size(), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct = S.kvm_run.from_buffer(self._mmap)
        self.run_page = memoryview(self._mmap)

    def run(self) -> int:
        """One KVM_RUN; returns 0, or -errno (EINTR when kicked, EAGAIN...)."""
        return ioctl_raw(self.fd, I.KVM_RUN)

    def _get(self, request: int, ctype):
        obj = ctype()
        ioctl(self.fd, request, obj)
        return obj

    def get_regs(self) -> S.kvm_regs:
        return self._get(I.KVM_GET_REGS, S.kvm_regs)

    def set_regs(self, regs: S.kvm_regs) -> None:
        ioctl(self.fd, I.KVM_SET_REGS, regs)

    def get_sregs(self) -> S.kvm_sregs:
        return self._get(I.KVM_GET_SREGS, S.kvm_sregs)

    def set_sregs(self, sregs: S.kvm_sregs) -> None:
        ioctl(self.fd, I.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> S.kvm_fpu:
        return self._get(I.KVM_GET_FPU, S.kvm_fpu)

    def set_fpu(self, fpu: S.kvm_fpu) -> None:
        ioctl(self.fd, I.KVM_SET_FPU, fpu)

    def get_xsave(self) -> S.kvm_xsave:
        return self._get(I.KVM_GET_XSAVE, S.kvm_xsave)

    def set_xsave(self, xsave: S.kvm_xsave) -> None:
        ioctl(self.fd, I.KVM_SET_XSAVE, xsave)

    def get_mxcsr(self) -> int:
        """MXCSR, from the XSAVE image (KVM_GET_FPU's ``mxcsr`` is not filled in by KVM)."""
        return self.get_xsave().region[S.XSAVE_MXCSR_WORD]

    def set_mxcsr(self, value: int) -> None:
        """Set MXCSR through KVM_SET_XSAVE (KVM_SET_FPU ignores ``mxcsr``)."""
        xs = self.get_xsave()
        xs.region[S.XSAVE_MXCSR_WORD] = value
        self.set_xsave(xs)

    def get_vcpu_events(self) -> S.kvm_vcpu_events:
        return self._get(I.KVM_GET_VCPU_EVENTS, S.kvm_vcpu_events)

    def set_vcpu_events(self, events: S.kvm_vcpu_events) -> None:
        ioctl(self.fd, I.KVM_SET_VCPU_EVENTS, events)

    def translate(self, linear_address: int) -> S.kvm_translation:
        """KVM_TRANSLATE: the guest-physical address of a guest-virtual one under the vCPU's current paging."""
        tr = S.kvm_translation(linear_address=linear_address)
        ioctl(self.fd, I.KVM_TRANSLATE, tr)
        return tr

    def set_guest_debug(self, control: int, debugreg: tuple[int, ...] = ()) -> None:
        dbg = S.kvm_guest_debug(control=control)
        for i, v in enumerate(debugreg):
            dbg.arch.debugreg[i] = v
        ioctl(self.fd, I.KVM_SET_GUEST_DEBUG, dbg)

    def get_lapic(self) -> S.kvm_lapic_state:
        return self._get(I.KVM_GET_LAPIC, S.kvm_lapic_state)

    def set_lapic(self, lapic: S.kvm_lapic_state) -> None:
        ioctl(self.fd, I.KVM_SET_LAPIC, lapic)

    def set_cpuid(self, entries: list[S.kvm_cpuid_entry2]) -> None:
        buf = S.sized(S.kvm_cpuid2, S.kvm_cpuid_entry2, len(entries))(nent=len(entries))
        for i, e in enumerate(entries):
            buf.entries[i] = e
        ioctl(self.fd, I.KVM_SET_CPUID2, buf)

    def set_msrs(self, msrs: dict[int, int]) -> int:
        buf = S.sized(S.kvm_msrs, S.kvm_msr_entry, len(msrs))(nmsrs=len(msrs))
        for i, (index, value) in enumerate(msrs.items()):
            buf.entries[i] = S.kvm_msr_entry(index=index, data=value)
        return ioctl(self.fd, I.KVM_SET_MSRS, buf)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf = S.sized(S.kvm_msrs, S.kvm_msr_entry, len(indices))(nmsrs=len(indices))
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        n = ioctl(self.fd, I.KVM_GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def tsc_khz(self) -> int:
        return ioctl(self.fd, I.KVM_GET_TSC_KHZ)

    def stats(self) -> Stats:
        return Stats(ioctl(self.fd, I.KVM_GET_STATS_FD))

    def close(self) -> None:
        if self.fd >= 0:
            del self.run_struct
            self.run_page.release()
            self._mmap.close()
            os.close(self.fd)
            self.fd = -1
