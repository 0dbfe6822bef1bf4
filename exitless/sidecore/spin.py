"""Python face of the C spin helpers: host addresses of guest memory and GIL-free waits."""
from __future__ import annotations

import ctypes
import os
import threading
import time
from array import array

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


class WatchedLock:
    """A re-entrant lock that a GIL-free spin may hold for a whole slice: every acquisition first
    bumps :attr:`word` (a u32 at :attr:`word_address`), which such a spin watches -- a thread that wants
    the lock makes the holder return within one pass instead of waiting out its slice.  Use as a context
    manager (or :meth:`acquire` / :meth:`release`), as ``threading.RLock``.

    The bump is a plain store, not an atomic increment: two threads may store the same value, but the
    word still differs from what a spin that started before either saw.  A re-entrant acquisition by
    the holder does not bump it (the holder is not waiting: a sidecore that takes the lock once per
    queue pair of one device must not end its own round).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._word = array("I", [0])
        self.word_address = self._word.buffer_info()[0]
        self._owner: int | None = None    # the holding thread's ident (another thread never sees its own)
        self._depth = 0

    @property
    def word(self) -> int:
        return self._word[0]

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = threading.get_ident()
        if self._owner != me:
            self._word[0] = (self._word[0] + 1) & 0xFFFFFFFF
        if not self._lock.acquire(blocking, timeout):
            return False
        self._owner = me
        self._depth += 1
        return True

    def release(self) -> None:
        self._depth -= 1
        if not self._depth:
            self._owner = None
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
