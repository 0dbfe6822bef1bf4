"""The one place that calls ``ioctl(2)``: through ctypes, so the GIL is released.

``KVM_RUN`` blocks for as long as the guest runs; calling it through a ctypes
foreign function (not ``fcntl.ioctl``) lets other Python threads run meanwhile
and hands ``EINTR`` back to the caller instead of retrying behind its back.
"""
from __future__ import annotations

from ..errors import ExitlessError
import ctypes
import errno as _errno
import os

from .ioctls import ALL

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int

_NAMES = {v: k for k, v in ALL.items()}


class KvmError(ExitlessError, OSError):
    """A KVM ioctl failed; the message names the ioctl and the errno."""

    def __init__(self, request: int, err: int, what: str = ""):
        name = _NAMES.get(request, f"ioctl {request:#x}")
        self.ioctl = name
        msg = f"{name} failed: {_errno.errorcode.get(err, err)} ({os.strerror(err)})"
        if what:
            msg += f" [{what}]"
        super().__init__(err, msg)


def ioctl(fd: int, request: int, arg=None, *, what: str = "") -> int:
    """ioctl(fd, request, arg) where arg is None, an int, or a ctypes object (passed by reference)."""
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = ctypes.c_void_p(arg)
    else:
        ptr = ctypes.cast(ctypes.byref(arg), ctypes.c_void_p)
    ret = _ioctl(fd, request, ptr)
    if ret < 0:
        raise KvmError(request, ctypes.get_errno(), what)
    return ret


def ioctl_raw(fd: int, request: int, arg: int = 0) -> int:
    """ioctl returning -errno instead of raising: for the KVM_RUN hot loop (EINTR/EAGAIN are normal)."""
    ret = _ioctl(fd, request, ctypes.c_void_p(arg))
    return -ctypes.get_errno() if ret < 0 else ret
