"""File-descriptor readiness that the kernel reports *in memory*: Linux AIO ``IOCB_CMD_POLL``.

A polling sidecore spins on memory words in C with the GIL released; a host fd (a TAP) is not a
memory word.  An AIO context's completion ring is: ``io_setup(2)`` maps ``struct aio_ring`` into
our address space (the context id *is* its address) and the kernel advances ``aio_ring.tail``
(a u32 at offset 12) when a submitted iocb completes.  An ``IOCB_CMD_POLL`` iocb (Linux ≥ 4.18)
completes once the fd is ready, so "the TAP has a frame" becomes "the tail word changed" — no
thread, no GIL.  The same iocb carries ``IOCB_FLAG_RESFD``: the kernel also signals an eventfd,
which a sleeping (``notify``/``adaptive``) sidecore waits on.

One-shot, like ``EPOLLONESHOT``: :meth:`AioPoll.arm` submits one poll; after its completion is
seen, reap it (:meth:`reap`) and re-arm once the fd was drained.  The kernel evaluates readiness
at submission, so a frame that arrived before the re-arm completes it at once (no lost wake-up).

Syscall numbers are x86-64's (``arch/x86/entry/syscalls/syscall_64.tbl``); the iocb layout is
``<linux/aio_abi.h>`` on a little-endian machine.
"""
from __future__ import annotations

import ctypes
import errno
import os
import select
import struct

from ..errors import ExitlessError

__all__ = ["AioPoll", "AioPollError", "SYSCALLS"]

_SYS_IO_SETUP, _SYS_IO_DESTROY, _SYS_IO_GETEVENTS, _SYS_IO_SUBMIT = 206, 207, 208, 209
#: What an :class:`AioPoll` calls, by name: a confined back-end that polls a TAP this way must be
#: allowed them (``exitless.confine.confine(extra=SYSCALLS)``); an AIO context only reaches fds
#: the process already holds.
SYSCALLS = ("io_setup", "io_destroy", "io_getevents", "io_submit")
_IOCB_CMD_POLL = 5
_IOCB_FLAG_RESFD = 1
_RING_TAIL_OFFSET = 12             # struct aio_ring { id, nr, head, tail, ... } (u32 each)
_IOCB = struct.Struct("<QIIHhIQQqQII")   # data, key, rw_flags, opcode, reqprio, fildes, buf, nbytes, offset,
#                                          reserved2, flags, resfd: 64 bytes
_EVENT_SIZE = 32                   # struct io_event: data, obj, res, res2

try:  # the same system calls from the sidecore's C extension, without ctypes' per-call cost
    from ._spin import aio_reap as _c_reap, aio_submit1 as _c_submit1
except ImportError:  # pragma: no cover - a tree where build_ext has not run
    _c_reap = _c_submit1 = None

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class AioPollError(ExitlessError, OSError):
    """The kernel refused an AIO poll (no AIO, or the fd cannot be polled)."""


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise AioPollError(e, f"{what}: {os.strerror(e)}")
    return ret


class AioPoll:
    """``POLLIN`` on ``fd`` reported in the word at :attr:`tail_addr` (and on eventfd ``resfd``)."""

    def __init__(self, fd: int, resfd: int, events: int = select.POLLIN):
        ctx = ctypes.c_ulong(0)
        _check(_syscall(_SYS_IO_SETUP, 4, ctypes.byref(ctx)), "io_setup")
        self.ctx = ctx.value
        self.tail_addr = self.ctx + _RING_TAIL_OFFSET
        self._tail = ctypes.c_uint32.from_address(self.tail_addr)
        self._iocb = ctypes.create_string_buffer(
            _IOCB.pack(0, 0, 0, _IOCB_CMD_POLL, 0, fd, events, 0, 0, 0, _IOCB_FLAG_RESFD, resfd), _IOCB.size)
        self._iocbs = (ctypes.c_void_p * 1)(ctypes.addressof(self._iocb))
        self._iocb_addr = ctypes.addressof(self._iocb)
        self._events = ctypes.create_string_buffer(_EVENT_SIZE * 4)
        self._events_addr = ctypes.addressof(self._events)
        self._zero = ctypes.create_string_buffer(struct.pack("<qq", 0, 0), 16)   # timespec {0, 0}

    def serve_args(self, seen: int, armed: bool) -> tuple:
        """``(ctx, iocb address, tail address, seen, armed, events address)``: this poll for a C loop that
        reaps and re-arms it itself (a net job of ``_vring.serve``; ``seen``: the tail last consumed, ``armed``:
        whether a poll is pending).  The buffers stay valid until :meth:`close`."""
        return (self.ctx, self._iocb_addr, self.tail_addr, seen, armed, self._events_addr)

    def tail(self) -> int:
        """The completion ring's tail: it moves when a poll completed."""
        return self._tail.value

    def arm(self) -> None:
        """Submit one poll.  Raises :class:`AioPollError` if the kernel refuses it."""
        if _c_submit1 is not None:
            r = _c_submit1(self.ctx, self._iocb_addr)
            if r < 0:
                raise AioPollError(-r, f"io_submit(IOCB_CMD_POLL): {os.strerror(-r)}")
            return
        _check(_syscall(_SYS_IO_SUBMIT, ctypes.c_ulong(self.ctx), 1, self._iocbs), "io_submit(IOCB_CMD_POLL)")

    def reap(self) -> int:
        """Consume completed events (never blocks); returns how many."""
        if _c_reap is not None:
            return max(_c_reap(self.ctx, self._events_addr, 4), 0)
        n = _syscall(_SYS_IO_GETEVENTS, ctypes.c_ulong(self.ctx), 0, 4, self._events, self._zero)
        return max(n, 0)

    def close(self) -> None:
        if self.ctx:
            ret = _syscall(_SYS_IO_DESTROY, ctypes.c_ulong(self.ctx))   # cancels a pending poll
            if ret < 0 and ctypes.get_errno() not in (errno.EINVAL,):
                raise AioPollError(ctypes.get_errno(), "io_destroy")
            self.ctx = 0
            self._tail = None
