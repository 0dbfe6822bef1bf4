"""A hostile vhost-user frontend against ``serve net``'s back-end (virtio-net on a multi-queue TAP).

``tests/test_vhost_user_hostile.py`` and the ``vhost_user`` fuzz target drive the virtio-blk
back-end only.  Here the same message sequences go to :class:`VirtioNet` with two queue pairs
and no control queue (as ``serve net`` runs it), after an optional valid set-up whose rings
and buffers hold random bytes: TX headers, descriptor chains and RX buffers are whatever the
frontend put there, and the data plane runs on them while the messages arrive.

Invariants: ``handle()`` answers or raises ProtocolError; the device's catch-all
(``internal_errors``) stays at zero; closing the session leaves the device reset and no fd open.
"""
from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from exitless.devices.virtio.net import VirtioNet
from exitless.vhost_user import VhostUserBackend
from exitless.vhost_user import protocol as P

from netns import can_make_netns, netns_with_tap
from test_vhost_user_backend import MIB, UVA_A
from test_vhost_user_hostile import _make_fd, deliver, memfd, messages, open_fds, table

pytestmark = pytest.mark.skipif(can_make_netns() is not None, reason=str(can_make_netns()))

PAIRS = 2
RING_SIZE = 64


@pytest.fixture(scope="module")
def tap():
    from exitless.net.tap import Tap

    with netns_with_tap("exlvuh0", queues=PAIRS) as ns:
        t = Tap.open("exlvuh0", queues=PAIRS, netns=ns)
        try:
            yield t
        finally:
            t.close()


def _ring_addrs(index: int) -> tuple[int, int, int]:
    """desc, avail, used frontend addresses of ring ``index`` (16 KiB apart inside the 1 MiB region)."""
    base = UVA_A + 0x4000 * index
    return base, base + 0x1000, base + 0x2000


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(live=st.booleans(), features=st.integers(0, 2**64 - 1), ram=st.binary(min_size=0, max_size=0x8000),
       seq=st.lists(messages(), max_size=10))
@example(live=True, features=1 << 1 | 1 << 9, ram=b"", seq=[])     # GUEST_CSUM + GUEST_ECN, no GUEST_TSO4/6
def test_net_backend_handles_any_message_sequence(tap, live, features, ram, seq):
    dev = VirtioNet(tap, queue_pairs=PAIRS, queue_size=RING_SIZE, ctrl_queue=False)
    before = open_fds()
    b = VhostUserBackend(dev, "poll")
    offered = b.offered_features()
    good, kicks = [], []
    if live:
        fd = memfd()
        # random rings and buffers (avail.idx, descriptors, TX headers, frames): what the frontend wrote
        os.pwrite(fd, ram, 0)
        good.append((P.SET_FEATURES, 1, P.U64.pack(offered & features | 1 << 32), []))
        good.append((P.SET_MEM_TABLE, 1, table((0, MIB, UVA_A, 0)), [fd]))
        for i in range(2 * PAIRS):
            desc, avail, used = _ring_addrs(i)
            good += [(P.SET_VRING_NUM, 1, P.STATE.pack(i, RING_SIZE), []),
                     (P.SET_VRING_ADDR, 1, P.ADDR.pack(i, 0, desc, used, avail, 0), []),
                     (P.SET_VRING_CALL, 1, P.U64.pack(i), ["eventfd"])]
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            kicks.append(kick)
            good.append((P.SET_VRING_KICK, 1, P.U64.pack(i), [os.dup(kick)]))
            good.append((P.SET_VRING_ENABLE, 1, P.STATE.pack(i, 1), []))
    try:
        for i, (request, flags, payload, kinds) in enumerate(good + seq):
            if live and i == len(good):
                for k in kicks:                  # let the data plane chew on the random rings
                    os.eventfd_write(k, 1)
                time.sleep(0.02)
            deliver(b, P.Message(request, flags, payload, [k if isinstance(k, int) else _make_fd(k) for k in kinds]))
        time.sleep(0.01)
    finally:
        b.close()
        dev.close()
        for k in kicks:
            os.close(k)
    assert dev.internal_errors == 0
    assert not dev.activated and b.worker is None
    assert open_fds() <= before


def test_set_features_refuses_a_feature_without_its_prerequisites(tap):
    """GUEST_ECN without GUEST_TSO4/6 (virtio 1.2 §5.1.3.1): the TAP refuses such offloads, and the error
    escaped from activation as a "socket error" that closed the connection.  Now SET_FEATURES itself
    fails (a REPLY_ACK frontend hears it); MQ without a control queue of ours is fine (QEMU keeps it)."""
    from exitless.devices.virtio.constants import VIRTIO_F_VERSION_1
    from exitless.devices.virtio.net import (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
                                             VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MQ)

    dev = VirtioNet(tap, queue_pairs=PAIRS, queue_size=RING_SIZE, ctrl_queue=False)
    b = VhostUserBackend(dev, "poll")
    try:
        bad = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_ECN
        with pytest.raises(P.ProtocolError, match="requires"):
            b.handle(P.Message(P.SET_FEATURES, 1, P.U64.pack(bad), []))
        with pytest.raises(P.ProtocolError, match="requires"):
            b.handle(P.Message(P.SET_FEATURES, 1, P.U64.pack(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_HOST_TSO4), []))
        good = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MQ | 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4
        assert b.handle(P.Message(P.SET_FEATURES, 1, P.U64.pack(good | 1 << P.F_PROTOCOL_FEATURES), [])) is None
        assert b.features >> VIRTIO_NET_F_MQ & 1
    finally:
        b.close()
        dev.close()
