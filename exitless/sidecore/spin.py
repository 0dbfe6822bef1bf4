"""Python face of the C spin helpers: host addresses of guest memory and GIL-free waits."""
from __future__ import annotations

import ctypes
import os
import time

from . import _spin

fence = _spin.fence
store_fence_load = _spin.store_fence_load
store16_fence_load16 = _spin.store16_fence_load16


def address_of(view: memoryview) -> int:
    """Host virtual address of the first byte of a writable memoryview (of an mmap)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def wait_for_change(watches: list[tuple[int, int]], timeout_ns: int) -> int:
    """Spin with the GIL released until the u32 at one of ``(address, expected)`` differs.

    Returns the index of the changed word, or -1 after ``timeout_ns``.
    """
    return _spin.watch(watches, timeout_ns)


def wait_until(watches: list[tuple[int, int]], deadline_ns: int) -> int:
    """Spin with the GIL released until the u32 at one of ``(address, expected)`` differs, or until
    ``time.monotonic_ns()`` reaches ``deadline_ns``; the words are looked at at least once.

    Returns ``time.monotonic_ns()`` at return (the same clock, read in C), so that a sidecore's busy
    round needs no clock read of its own.  Without watches (``[]``) it sleeps until the deadline.
    """
    if watches:
        return _spin.watch_until(watches, deadline_ns)
    delay = deadline_ns - time.monotonic_ns()
    if delay > 0:
        time.sleep(delay / 1e9)
    return time.monotonic_ns()


def drain_eventfd(fd: int | None) -> int:
    """Reset a non-blocking eventfd's counter (a wake-up that has been seen); returns the counter read
    (the number of signals since the last read: for an ioeventfd, the guest's register writes), 0 if none."""
    if fd is not None:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            pass
    return 0
