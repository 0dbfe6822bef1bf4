"""Waiting for one file descriptor to become readable, whatever its number.

``select.select`` cannot take a descriptor ≥ FD_SETSIZE (1024): a process that holds many guests'
eventfds, sockets and memfds (a sidecore service, a long test session) gets ``ValueError`` from it.
``poll(2)`` has no such limit, so every single-fd wait in exitless goes through here.
"""
from __future__ import annotations

import select
from typing import IO


def wait_readable(fd: int | IO, timeout_s: float | None = None) -> bool:
    """Block until ``fd`` (a descriptor number or an object with ``fileno()``) is readable, has hung up
    or is in error, or until ``timeout_s`` seconds (None: no limit; ≤ 0: just look) have passed.

    Returns True if the descriptor is ready (a read will not block), False on timeout.  An interrupted
    wait (EINTR) is retried by Python itself (PEP 475) with the remaining time.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    timeout_ms = None if timeout_s is None else max(0, int(timeout_s * 1000))
    return bool(poller.poll(timeout_ms))
