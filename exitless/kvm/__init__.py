"""Thin KVM bindings: ioctl numbers, structures, and the system/VM/vCPU fds."""
from .api import Kvm, Vcpu, Vm
from .stats import Stats
from .syscall import KvmError

__all__ = ["Kvm", "Vm", "Vcpu", "Stats", "KvmError"]
