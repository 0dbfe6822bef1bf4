"""Python face of the C spin helpers: host addresses of guest memory and GIL-free waits."""
from __future__ import annotations

import ctypes
import os

from . import _spin

fence = _spin.fence
store_fence_load = _spin.store_fence_load
store16_fence_load16 = _spin.store16_fence_load16


def address_of(view: memoryview) -> int:
    """Host virtual address of the first byte of a writable memoryview (of an mmap)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def wait_for_change(watches: list[tuple[int, int]], timeout_ns: int, yield_after_ns: int = 0) -> int:
    """Spin with the GIL released until the u32 at one of ``(address, expected)`` differs.

    After ``yield_after_ns`` (ns; 0: never) without a change, the spin yields the CPU between
    checks (``sched_yield``), so a vCPU thread queued behind it on an oversubscribed host runs.
    Returns the index of the changed word, or -1 after ``timeout_ns``.
    """
    return _spin.watch(watches, timeout_ns, yield_after_ns)


def drain_eventfd(fd: int | None) -> None:
    """Reset a non-blocking eventfd's counter (a wake-up that has been seen)."""
    if fd is not None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
