"""AIO readiness polls (exitless.sidecore.aio_poll): the kernel reports an fd's readiness in memory."""
from __future__ import annotations

import os
import socket
import time

import pytest

from exitless.sidecore.aio_poll import AioPoll, AioPollError
from exitless.sidecore.spin import wait_for_change


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    yield a, b, efd
    a.close()
    b.close()
    os.close(efd)


def test_readiness_moves_the_tail_word_and_signals_the_eventfd(pair):
    a, b, efd = pair
    p = AioPoll(a.fileno(), efd)
    try:
        t0 = p.tail()
        p.arm()
        assert wait_for_change([(p.tail_addr, t0)], 20_000_000) == -1     # nothing to read: no completion
        b.send(b"frame")
        assert wait_for_change([(p.tail_addr, t0)], 2_000_000_000) == 0   # the GIL-free spin sees it
        assert p.tail() == t0 + 1 and os.eventfd_read(efd) == 1 and p.reap() == 1
        # one-shot: a second frame does not complete anything until re-armed...
        b.send(b"again")
        time.sleep(0.02)
        assert p.tail() == t0 + 1
        # ...and re-arming while the fd is already readable completes at once (no lost wake-up)
        p.arm()
        assert wait_for_change([(p.tail_addr, t0 + 1)], 2_000_000_000) == 0
        assert p.reap() == 1
    finally:
        p.close()


def test_close_cancels_a_pending_poll_and_bad_fds_are_refused(pair):
    a, b, efd = pair
    p = AioPoll(a.fileno(), efd)
    p.arm()
    p.close()
    p.close()                                   # idempotent
    bad = AioPoll(12345, efd)                   # not an open fd
    try:
        with pytest.raises(AioPollError):
            bad.arm()
    finally:
        bad.close()
