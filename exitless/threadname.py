"""OS-level thread names, so that ``top -H``, ``ps -L``, ``perf`` and /proc show what each thread is.

Python's ``threading`` names live only inside the interpreter (before 3.14); the kernel's name of a
thread (``/proc/PID/task/TID/comm``, 15 bytes) stays the process's.  :func:`set_current` sets it with
``prctl(PR_SET_NAME)`` (prctl(2)), as QEMU names its vCPU threads ``CPU 0/KVM``.  Benchmarks tell vCPU
threads from the VMM's I/O threads by these names (:func:`is_vcpu`).
"""
from __future__ import annotations

import ctypes
import re

PR_SET_NAME = 15
#: The kernel keeps 15 bytes of a thread's name (TASK_COMM_LEN 16, with the NUL).
MAX_NAME = 15
#: vCPU thread names: exitless's ``vcpu0``…, QEMU's ``CPU 0/KVM``…
VCPU_NAME = re.compile(r"vcpu\d+|CPU \d+/KVM")

_libc = None


def set_current(name: str) -> bool:
    """Name the calling thread ``name`` (its first 15 bytes of UTF-8) for the kernel; False if prctl
    refused (a name is a convenience: never an error)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:MAX_NAME]), 0, 0, 0) == 0


def is_vcpu(comm: str) -> bool:
    """Is a thread with kernel name ``comm`` (``/proc/…/comm``, newline stripped) a vCPU thread?"""
    return VCPU_NAME.fullmatch(comm) is not None
