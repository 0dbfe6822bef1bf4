"""A hostile vhost-user frontend: every bad message is refused (failure reply or closed
connection), no fd leaks, and the back-end keeps serving the next frontend."""
from __future__ import annotations

import fcntl
import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exitless.devices.virtio.blk import VirtioBlk
from exitless.devices.virtio.constants import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from exitless.vhost_user import VhostUserBackend, VhostUserServer
from exitless.vhost_user import protocol as P
from exitless.vhost_user.frontend import Frontend

from fds import open_fds
from test_vhost_user_backend import MIB, UVA_A, Session, pattern

REPLY_ACK = 1 << P.PROTOCOL_F_REPLY_ACK


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "disk.img"
    path.write_bytes(b"\0" * MIB)
    return path


@pytest.fixture(scope="module")
def own_disk(tmp_path_factory):
    """A disk of the tests that open their own device: ``server``'s device holds ``disk``'s image lock."""
    path = tmp_path_factory.mktemp("hostile-own") / "disk.img"
    path.write_bytes(b"\0" * MIB)
    return path


@pytest.fixture(scope="module")
def server(disk):
    dev = VirtioBlk(disk)
    srv = VhostUserServer(str(disk.parent / "vu.sock"), dev, "kick", io_timeout=0.5).start()
    yield srv
    srv.stop()
    dev.close()


def acked(path: str) -> Frontend:
    fe = Frontend.connect(path)
    fe.get_features()
    fe.set_protocol_features(fe.get_protocol_features())
    fe.set_owner()
    return fe


def refused(fe: Frontend, request: int, payload: bytes = b"", fds=(), **kw) -> str:
    """Send a bad message asking for an ack; 'failed' if refused with a reply, 'closed' if disconnected."""
    fe.send(request, payload, fds, need_reply=True, **kw)
    try:
        req, flags, body = fe.recv()
    except Exception:
        return "closed"
    assert req == request and flags & P.FLAG_REPLY
    if request == P.GET_CONFIG:
        return "failed" if body == b"" else "accepted"
    return "failed" if struct.unpack("<Q", body)[0] else "accepted"


def still_serving(path: str) -> None:
    with Frontend.connect(path) as fe:
        assert fe.get_features() >> P.F_PROTOCOL_FEATURES & 1


def memfd(size: int = MIB, seal: int = 0) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seal)
    return fd


def table(*regions) -> bytes:
    return P.MEM_HEAD.pack(len(regions), 0) + b"".join(P.MEM_REGION.pack(*r) for r in regions)


# --------------------------------------------------------------------------- message-level refusals
def _mem_cases():
    r = (0, MIB, UVA_A, 0)
    return {
        "fewer fds than regions": (table(r, (MIB, MIB, UVA_A + MIB, 0)), 1),
        "more fds than regions": (table(r), 2),
        "no regions": (table(), 0),
        "nine regions": (P.MEM_HEAD.pack(9, 0) + P.MEM_REGION.pack(*r) * 9, 0),
        "overlapping guest-physical": (table(r, (MIB // 2, MIB, UVA_A + 4 * MIB, 0)), 2),
        "overlapping frontend-virtual": (table(r, (4 * MIB, MIB, UVA_A + MIB // 2, 0)), 2),
        "region beyond its file": (table((0, 2 * MIB, UVA_A, 0)), 1),
        "offset beyond its file": (table((0, MIB, UVA_A, MIB)), 1),
        "empty region": (table((0, 0, UVA_A, 0)), 1),
        "unaligned mmap offset": (table((0, 4096, UVA_A, 100)), 1),
        "wrapping region": (table((2**64 - 4096, 8192, UVA_A, 0)), 1),
        "short payload": (table(r)[:20], 1),
    }


@pytest.mark.parametrize("case", list(_mem_cases()))
def test_bad_memory_tables(server, case):
    payload, nfds = _mem_cases()[case]
    fds = [memfd() for _ in range(nfds)]
    before = open_fds()
    try:
        with acked(server.path) as fe:
            assert refused(fe, P.SET_MEM_TABLE, payload, fds) == "failed"
            assert fe.get_features()        # the same connection keeps working
    finally:
        for fd in fds:
            os.close(fd)
    time.sleep(0.05)
    assert open_fds() <= before, "the back-end kept fds of a refused message"


def test_region_fd_that_is_not_memory(server):
    r, w = os.pipe()
    try:
        with acked(server.path) as fe:
            assert refused(fe, P.SET_MEM_TABLE, table((0, MIB, UVA_A, 0)), [r]) == "failed"
    finally:
        os.close(r)
        os.close(w)


def test_memfd_that_may_shrink_is_sealed_or_refused(server):
    fd = memfd()
    try:
        with acked(server.path) as fe:
            fe.set_mem_table([(0, MIB, UVA_A, 0)], [fd])
            with pytest.raises(PermissionError):       # it was sealed against shrinking
                os.ftruncate(fd, 4096)
        sealed = memfd(seal=fcntl.F_SEAL_SEAL)            # can never be sealed now: refused
        with acked(server.path) as fe:
            assert refused(fe, P.SET_MEM_TABLE, table((0, MIB, UVA_A, 0)), [sealed]) == "failed"
        os.close(sealed)
    finally:
        os.close(fd)


def _with_table(fe: Frontend) -> int:
    fd = memfd()
    fe.set_mem_table([(0, MIB, UVA_A, 0)], [fd])
    return fd


RING_CASES = {
    "size 0": (P.SET_VRING_NUM, P.STATE.pack(0, 0)),
    "size not a power of two": (P.SET_VRING_NUM, P.STATE.pack(0, 3)),
    "size above the maximum": (P.SET_VRING_NUM, P.STATE.pack(0, 512)),
    "size 2**32-1": (P.SET_VRING_NUM, P.STATE.pack(0, 2**32 - 1)),
    "ring index 1 of 1": (P.SET_VRING_NUM, P.STATE.pack(1, 64)),
    "ring index 255": (P.SET_VRING_BASE, P.STATE.pack(255, 0)),
    "base beyond 16 bits": (P.SET_VRING_BASE, P.STATE.pack(0, 0x10000)),
    "descriptors outside the table": (P.SET_VRING_ADDR, P.ADDR.pack(0, 0, UVA_A + 2 * MIB, UVA_A, UVA_A + 0x1000, 0)),
    "used ring straddles the end": (P.SET_VRING_ADDR, P.ADDR.pack(0, 0, UVA_A, UVA_A + MIB - 8, UVA_A + 0x1000, 0)),
    "avail ring at a guest-physical address": (P.SET_VRING_ADDR, P.ADDR.pack(0, 0, UVA_A, UVA_A + 0x2000, 0x1000, 0)),
    "dirty logging": (P.SET_VRING_ADDR, P.ADDR.pack(0, 1, UVA_A, UVA_A + 0x2000, UVA_A + 0x1000, 0)),
    "unknown addr flags": (P.SET_VRING_ADDR, P.ADDR.pack(0, 6, UVA_A, UVA_A + 0x2000, UVA_A + 0x1000, 0)),
    "enable 2": (P.SET_VRING_ENABLE, P.STATE.pack(0, 2)),
    "short vring state": (P.SET_VRING_NUM, b"\0\0\0\0"),
    "long u64": (P.SET_FEATURES, b"\0" * 16),
    "features not offered": (P.SET_FEATURES, P.U64.pack(1 << 60)),
    "protocol features not offered": (P.SET_PROTOCOL_FEATURES, P.U64.pack(1 << P.PROTOCOL_F_INBAND_NOTIFICATIONS)),
    "kick with unknown bits": (P.SET_VRING_KICK, P.U64.pack(0x1_0000 | P.VRING_NOFD_MASK)),
    "kick without fd or NOFD": (P.SET_VRING_KICK, P.U64.pack(0)),
    "dirty log base": (P.SET_LOG_BASE, P.U64.pack(0)),
    "unknown request": (99, b""),
    "SET_OWNER with a payload": (P.SET_OWNER, b"\0" * 8),
}


@pytest.mark.parametrize("case", list(RING_CASES))
def test_bad_ring_and_feature_messages(server, case):
    request, payload = RING_CASES[case]
    with acked(server.path) as fe:
        fd = _with_table(fe)
        fe.set_features(1 << 32 | 1 << 29 | 1 << P.F_PROTOCOL_FEATURES)
        fe.set_vring_num(0, 64)
        assert refused(fe, request, payload) == "failed"
        fe.set_vring_addr(0, UVA_A, UVA_A + 0x2000, UVA_A + 0x1000)     # a good one is still accepted
        os.close(fd)


def test_ring_address_before_any_memory_table(server):
    with acked(server.path) as fe:
        assert refused(fe, P.SET_VRING_ADDR, P.ADDR.pack(0, 0, UVA_A, UVA_A + 0x2000, UVA_A + 0x1000, 0)) == "failed"


def test_bad_fds_on_vring_messages(server):
    r, w = os.pipe()
    efd = os.eventfd(0)
    try:
        with acked(server.path) as fe:
            assert refused(fe, P.SET_VRING_KICK, P.U64.pack(0), [r]) == "failed"             # a pipe
            assert refused(fe, P.SET_VRING_CALL, P.U64.pack(P.VRING_NOFD_MASK), [efd]) == "failed"  # NOFD + fd
            assert refused(fe, P.SET_VRING_ERR, P.U64.pack(0), [efd, efd]) == "failed"       # two fds
            assert refused(fe, P.SET_VRING_NUM, P.STATE.pack(0, 64), [efd]) == "failed"      # fd on a no-fd message
            assert refused(fe, P.SET_MEM_TABLE, table((0, MIB, UVA_A, 0)), [efd] * 9) == "failed"  # > 8 fds
            assert fe.get_queue_num() == 1
    finally:
        for fd in (r, w, efd):
            os.close(fd)


def test_get_config_out_of_range_is_an_empty_reply(server):
    with acked(server.path) as fe:
        assert refused(fe, P.GET_CONFIG, P.CONFIG_HEAD.pack(0, 1000, 0) + b"\0" * 1000) == "failed"
        assert refused(fe, P.GET_CONFIG, P.CONFIG_HEAD.pack(0, 8, 0)) == "failed"    # size says 8, no bytes
        assert len(fe.get_config(0, 60)) == 60


def test_errors_without_reply_ack_close_the_connection(server):
    with Frontend.connect(server.path) as fe:          # REPLY_ACK never negotiated
        fe.send(P.SET_VRING_NUM, P.STATE.pack(0, 3))
        assert fe.closed_by_peer()
    with Frontend.connect(server.path) as fe:          # a GET cannot carry a failure: closed
        efd = os.eventfd(0)
        fe.send(P.GET_FEATURES, b"", [efd])
        os.close(efd)
        assert fe.closed_by_peer()
    still_serving(server.path)


# --------------------------------------------------------------------------- framing: connection closed
FRAMING = {
    "version 2": P.HEADER.pack(P.GET_FEATURES, 2, 0),
    "version 0": P.HEADER.pack(P.GET_FEATURES, 0, 0),
    "reply flag on a request": P.HEADER.pack(P.GET_FEATURES, 1 | P.FLAG_REPLY, 0),
    "absurd size": P.HEADER.pack(P.SET_MEM_TABLE, 1, 1 << 30),
    "truncated header": b"\x01\x00\x00\x00\x01",
    "truncated payload": P.HEADER.pack(P.SET_FEATURES, 1, 8) + b"\0\0\0",
}


@pytest.mark.parametrize("case", list(FRAMING))
def test_broken_framing_closes_the_connection(server, case):
    with Frontend.connect(server.path) as fe:
        fe.send(0, raw=FRAMING[case])
        if case.startswith("truncated"):
            fe.sock.shutdown(socket.SHUT_WR)            # ... and then nothing: EOF mid-message
        assert fe.closed_by_peer()
    still_serving(server.path)


def test_stall_mid_message_times_out(server):
    with Frontend.connect(server.path) as fe:
        fe.send(0, raw=P.HEADER.pack(P.SET_FEATURES, 1, 8) + b"\0")   # 7 bytes never come
        t0 = time.monotonic()
        assert fe.closed_by_peer(5)
        assert time.monotonic() - t0 < 3
    still_serving(server.path)


# --------------------------------------------------------------------------- property tests
@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=64))
def test_header_parser_accepts_or_raises_framing_error(data):
    try:
        request, flags, size = P.parse_header(data[:P.HEADER_SIZE])
    except P.FramingError:
        return
    assert len(data) >= P.HEADER_SIZE and flags & 3 == 1 and not flags & P.FLAG_REPLY and size <= P.MAX_PAYLOAD


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_stream_parser_round_trip(data):
    try:
        msgs, rest = P.parse_stream(data)
    except P.FramingError:
        return
    assert b"".join(P.encode(m.request, m.payload) if m.flags == 1 else
                    P.HEADER.pack(m.request, m.flags, len(m.payload)) + m.payload for m in msgs) + rest == data


_REQ = st.one_of(st.integers(1, 41), st.integers(0, 2**32 - 1))
_SMALL = st.integers(0, 3) | st.integers(0, 2**32 - 1)
_ADDR = st.sampled_from([0, UVA_A, UVA_A + 0x1000, UVA_A + MIB - 4, 2**64 - 8]) | st.integers(0, 2**64 - 1)


@st.composite
def messages(draw):
    request = draw(st.sampled_from(sorted(P.REQUEST_NAMES)) | _REQ)
    kind = draw(st.sampled_from(["raw", "u64", "state", "addr", "mem", "config"]))
    if kind == "raw":
        payload = draw(st.binary(max_size=80))
    elif kind == "u64":
        payload = P.U64.pack(draw(st.sampled_from([0, 1, 0x100, 0x101, 1 << 30, 1 << 32]) | st.integers(0, 2**64 - 1)))
    elif kind == "state":
        payload = P.STATE.pack(draw(_SMALL), draw(st.sampled_from([0, 1, 2, 64, 256, 512]) | _SMALL))
    elif kind == "addr":
        payload = P.ADDR.pack(draw(_SMALL), draw(st.integers(0, 3)), draw(_ADDR), draw(_ADDR), draw(_ADDR), 0)
    elif kind == "mem":
        n = draw(st.integers(0, 3))
        regions = [(draw(st.sampled_from([0, MIB, 2**63]) | st.integers(0, 2**64 - 1)),
                    draw(st.sampled_from([0, 4096, MIB, 2 * MIB]) | st.integers(0, 2**64 - 1)),
                    draw(_ADDR), draw(st.sampled_from([0, 4096, 100]))) for _ in range(n)]
        payload = table(*regions)
    else:
        size = draw(st.integers(0, 300))
        payload = P.CONFIG_HEAD.pack(draw(st.integers(0, 300)), size, 0) + b"\0" * draw(st.sampled_from([size, 0, 3]))
    flags = draw(st.sampled_from([1, 1 | P.FLAG_NEED_REPLY]))
    fds = draw(st.lists(st.sampled_from(["eventfd", "memfd", "pipe"]), max_size=3))
    return request, flags, payload, fds


def deliver(b, msg: "P.Message") -> None:
    """Hand ``msg`` to back-end ``b`` as the server does: a refused message gets the error reply, its
    reply must parse as a message stream, and the fds it carried are closed afterwards."""
    try:
        reply = b.handle(msg)
        if reply is not None:
            P.parse_stream(reply)
    except P.ProtocolError:
        b.error_reply(msg)
    finally:
        for fd in msg.fds:
            os.close(fd)


def _make_fd(kind: str) -> int:
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC)
    if kind == "memfd":
        return memfd()
    r, w = os.pipe()
    os.close(w)
    return r


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.booleans(), st.lists(messages(), max_size=12))
def test_backend_handles_any_message_sequence(own_disk, live, seq):
    """Whatever a frontend sends, handle() answers or raises ProtocolError -- nothing else -- and
    closing the session releases every fd and leaves the device reset.  With ``live`` the
    sequence starts with a valid set-up, so the random messages hit a running data plane."""
    dev = VirtioBlk(own_disk)
    before = open_fds()
    b = VhostUserBackend(dev, "poll")
    good = [
        (P.SET_FEATURES, 1, P.U64.pack(1 << 32 | 1 << 29 | 1 << 28), []),
        (P.SET_MEM_TABLE, 1, table((0, MIB, UVA_A, 0)), ["memfd"]),
        (P.SET_VRING_NUM, 1, P.STATE.pack(0, 64), []),
        (P.SET_VRING_ADDR, 1, P.ADDR.pack(0, 0, UVA_A, UVA_A + 0x2000, UVA_A + 0x1000, 0), []),
        (P.SET_VRING_KICK, 1, P.U64.pack(0), ["eventfd"]),
        (P.SET_VRING_CALL, 1, P.U64.pack(0), ["eventfd"]),
    ] if live else []
    try:
        for i, (request, flags, payload, kinds) in enumerate(good + seq):
            if live and i == len(good):
                assert b.worker is not None, "the valid set-up did not start the data plane"
            deliver(b, P.Message(request, flags, payload, [_make_fd(k) for k in kinds]))
    finally:
        b.close()
        dev.close()
    assert not dev.activated and b.worker is None
    assert open_fds() <= before


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(min_size=1, max_size=60), min_size=1, max_size=6))
def test_server_survives_random_bytes(server, chunks):
    with Frontend.connect(server.path) as fe:
        for c in chunks:
            try:
                fe.sock.sendall(c)
            except OSError:
                break
    still_serving(server.path)


# --------------------------------------------------------------------------- and after all that
def test_a_good_frontend_still_gets_correct_io(server, disk):
    before = open_fds()
    s = Session(server.path)
    try:
        s.ram.mem.write(0x20000, pattern(8192, 77))
        assert s.io(VIRTIO_BLK_T_OUT, 16, 0x20000, 8192) == VIRTIO_BLK_S_OK
        assert s.io(VIRTIO_BLK_T_IN, 16, 0x40000, 8192) == VIRTIO_BLK_S_OK
        assert s.ram.mem.read(0x40000, 8192) == pattern(8192, 77)
    finally:
        s.close()
    assert server.wait_connections(server.connections, 10)
    assert disk.read_bytes()[16 * 512:16 * 512 + 8192] == pattern(8192, 77)
    assert open_fds() <= before
