"""virtio-net device model, driven through real virtqueues by the test driver, over a fake TAP
(a SOCK_SEQPACKET socketpair: one frame per read/write, like a TAP fd with a vnet header).
No KVM, no network namespace."""
from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exitless.devices.virtio.constants import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_ANNOUNCE,
    VIRTIO_NET_S_LINK_UP,
)
from exitless.devices.virtio.net import HDR_LEN, MAX_FRAME, VirtioNet, format_mac, parse_mac
from exitless.memory import GuestMemory
from exitless.sidecore.loop import SidecoreLoop, SidecoreThread

try:
    from test_virtqueue import Driver
except ImportError:  # pragma: no cover - tests/ as a package
    from tests.test_virtqueue import Driver

MiB = 1 << 20
MAC = bytes.fromhex("525400abcdef")
BCAST = b"\xff" * 6


SO_SNDBUFFORCE = 32   # <asm-generic/socket.h>: SO_SNDBUF beyond wmem_max (CAP_NET_ADMIN)


class FakeTap:
    """Queue ``i`` is one end of a SOCK_SEQPACKET socketpair; the test holds the other (``peers[i]``)."""

    def __init__(self, queues: int = 1):
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(queues)]
        for a, b in pairs:
            a.setblocking(False)
            # a test may queue several 64 KiB frames before the device reads any: with the default
            # send buffer (~208 KiB) the test's own send() then blocked forever
            try:
                b.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
            except OSError:          # not root: as much as net.core.wmem_max allows
                b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        self._socks = [a for a, _ in pairs]
        self.peers = [b for _, b in pairs]
        self.fds = [a.fileno() for a in self._socks]
        self.name = "fake"
        self.offloads: list[int] = []
        self.enabled: dict[int, bool] = {}

    def set_offload(self, offloads: int) -> None:
        self.offloads.append(offloads)

    def set_queue_enabled(self, index: int, enabled: bool) -> None:
        self.enabled[index] = enabled

    def close(self) -> None:
        for s in self._socks + self.peers:
            s.close()


def hdr(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0, num_buffers=0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


def frame(n: int, dst: bytes = MAC, seed: int = 0) -> bytes:
    body = bytes((i * 7 + seed) & 0xFF for i in range(n - 12))
    return dst + b"\x02\x00\x00\x00\x00\x01" + body


ALL = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_EVENT_IDX)


class Rig:
    """A VirtioNet activated on test-driver queues, as a transport would."""

    def __init__(self, features=None, pairs=1, ctrl=True, queue_size=64, drop=(), tap=None, regions=None):
        self.mem = GuestMemory.create(regions or [(0, 64 * MiB)])
        self.tap = FakeTap(pairs) if tap is None else tap
        self.dev = VirtioNet(self.tap, mac=MAC, queue_size=queue_size, ctrl_queue=ctrl)
        self.signals: list[int] = []
        self.config_irqs = 0
        self.resets = 0
        self.dev.on_needs_reset = self._on_reset
        self.dev.on_config_changed = self._on_config
        if features is None:
            features = self.dev.device_features()
        for bit in drop:
            features &= ~(1 << bit)
        assert self.dev.features_ok(features), hex(features)
        self.features = features
        queues = self.dev.create_queues(self.mem)
        self.drivers = [
            Driver(self.mem, size=queue_size, event_idx=bool(features >> VIRTIO_F_RING_EVENT_IDX & 1),
                   indirect=True, ring_base=0x10000 + i * 0x10000, heap=0x200000 + i * 0x600000,
                   heap_end=0x200000 + (i + 1) * 0x600000, queue=q)
            for i, q in enumerate(queues)
        ]
        self.dev.activate(self.mem, queues, features, self.signals.append)
        self.posted: dict[int, tuple[list, list]] = {}   # RX head -> (gpas, sizes), latest posting

    def _on_reset(self):
        self.resets += 1

    def _on_config(self):
        self.config_irqs += 1

    def close(self):
        self.dev.close()
        self.tap.close()
        self.mem.close()

    # -- guest side helpers --
    def send(self, data: bytes, header: bytes | None = None, pair=0, split=False):
        d = self.drivers[2 * pair + 1]
        h = hdr() if header is None else header
        outs = [h, data] if not split else [h[:5], h[5:] + data[:3], data[3:]]
        head, _ = d.add([o for o in outs if o], [])
        self.dev.handle_queue(2 * pair + 1)
        return d.get_used()

    def post(self, sizes, pair=0, kick=True):
        """Post one RX chain per entry of ``sizes`` (an int, or a list of buffer sizes for one chain)."""
        d = self.drivers[2 * pair]
        out = []
        for s in sizes:
            head, gpas = d.add([], [s] if isinstance(s, int) else list(s))
            out.append((head, gpas, [s] if isinstance(s, int) else list(s)))
            self.posted[head] = out[-1][1:]
        if kick:
            self.dev.handle_queue(2 * pair)
        return out

    def rx_payload(self, posted, used) -> list[bytes]:
        """The bytes of used RX buffers, in used order (each: (head, len))."""
        by_head = dict(self.posted)
        by_head.update({h: (g, s) for h, g, s in posted})
        out = []
        for head, n in used:
            gpas, sizes = by_head[head]
            data = b""
            for g, s in zip(gpas, sizes):
                take = min(s, n - len(data))
                data += self.mem.read(g, take)
                if len(data) == n:
                    break
            out.append(data)
        return out

    def ctrl(self, cls, cmd, data=b"", ack=1):
        d = self.drivers[-1]
        head, gpas = d.add([bytes([cls, cmd]) + data], [ack] if ack else [])
        self.dev.handle_queue(len(self.drivers) - 1)
        used = d.get_used()
        assert [h for h, _ in used] == [head]
        return self.mem.read(gpas[0], 1)[0] if ack else None


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def recv(tap: FakeTap, pair=0, timeout=2.0) -> bytes:
    tap.peers[pair].settimeout(timeout)
    return tap.peers[pair].recv(1 << 17)


def nothing_pending(tap: FakeTap, pair=0) -> bool:
    tap.peers[pair].setblocking(False)
    try:
        tap.peers[pair].recv(1 << 17)
    except BlockingIOError:
        return True
    return False


# ---------------------------------------------------------------------------
# identity, features, configuration
# ---------------------------------------------------------------------------
def test_features_and_config(rig):
    f = rig.dev.device_features()
    for bit in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_F_VERSION_1):
        assert f >> bit & 1, bit
    assert not f >> VIRTIO_NET_F_MQ & 1          # one pair: no MQ
    mac, status, pairs = struct.unpack_from("<6sHH", rig.dev.read_config(0, 10))
    assert (mac, status, pairs) == (MAC, VIRTIO_NET_S_LINK_UP, 1)
    assert rig.dev.num_queues == 3
    # offloads follow the negotiated GUEST_* features
    assert rig.tap.offloads[-1] == 0x0F


def test_feature_dependencies():
    tap = FakeTap(2)
    dev = VirtioNet(tap, queue_pairs=2)
    full = dev.device_features()
    assert full >> VIRTIO_NET_F_MQ & 1
    assert dev.features_ok(full)
    assert not dev.features_ok(full & ~(1 << VIRTIO_NET_F_CSUM))          # HOST_TSO4 needs CSUM
    assert not dev.features_ok(full & ~(1 << VIRTIO_NET_F_GUEST_CSUM))    # GUEST_TSO needs GUEST_CSUM
    assert not dev.features_ok(full & ~(1 << VIRTIO_NET_F_CTRL_VQ))       # MQ, CTRL_RX... need CTRL_VQ
    assert not dev.features_ok(full & ~(1 << VIRTIO_F_VERSION_1))
    minimal = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC)
    assert dev.features_ok(minimal)
    tap.close()


def test_constructor_and_mac_parsing():
    tap = FakeTap(1)
    with pytest.raises(ValueError):
        VirtioNet(tap, queue_pairs=2)
    with pytest.raises(ValueError):
        VirtioNet(tap, mac=b"\x01\x02\x03\x04\x05\x06")         # multicast
    assert VirtioNet(tap, ctrl_queue=False).num_queues == 2
    assert parse_mac("52:54:00:AB:cd:ef") == MAC and format_mac(MAC) == "52:54:00:ab:cd:ef"
    for bad in ("52:54:00:ab:cd", "zz:54:00:ab:cd:ef", "01:00:5e:00:00:01", ""):
        with pytest.raises(ValueError):
            parse_mac(bad)
    tap.close()


# ---------------------------------------------------------------------------
# transmit
# ---------------------------------------------------------------------------
def test_tx_frame_reaches_tap_with_header(rig):
    data = frame(1000)
    used = rig.send(data, hdr(flags=1, csum_start=34, csum_offset=16, num_buffers=7), split=True)
    assert used and used[0][1] == 0
    got = recv(rig.tap)
    assert got[HDR_LEN:] == data
    assert got[:HDR_LEN] == hdr(flags=1, csum_start=34, csum_offset=16)   # num_buffers cleared
    assert rig.dev.stats["tx_packets"] == 1 and rig.dev.stats["tx_bytes"] == 1000


def test_tx_tso_frame_passes_through(rig):
    data = frame(20000)
    rig.send(data, hdr(flags=1, gso_type=1, hdr_len=54, gso_size=1448, csum_start=34, csum_offset=16))
    got = recv(rig.tap)
    assert got[1] == 1 and got[HDR_LEN:] == data


@pytest.mark.parametrize("header,length,why", [
    (hdr(flags=1, csum_start=990, csum_offset=16), 1000, "checksum past the frame"),
    (hdr(flags=1, gso_type=1, hdr_len=2000, gso_size=1448, csum_start=34, csum_offset=16), 1000, "hdr_len"),
    (hdr(gso_type=1, gso_size=1448), 1000, "GSO without NEEDS_CSUM"),
    (hdr(flags=1, gso_type=1, gso_size=0, csum_start=34, csum_offset=16), 1000, "gso_size 0"),
    (hdr(flags=1, gso_type=3, gso_size=1000, csum_start=34, csum_offset=6), 1000, "UFO not offered"),
    (hdr(flags=1, gso_type=0x81, gso_size=1000, csum_start=34, csum_offset=16), 1000, "ECN"),
    (hdr(), 13, "runt"),
    (hdr(), MAX_FRAME + 1, "larger than 64 KiB + headers"),
])
def test_tx_bad_headers_are_dropped(header, length, why):
    r = Rig(drop=(VIRTIO_NET_F_HOST_ECN,))
    try:
        used = r.send(frame(length) if length >= 12 else b"x" * length, header)
        assert used and used[0][1] == 0, why
        assert r.dev.stats["tx_bad"] == 1, why
        assert nothing_pending(r.tap), why
        assert r.resets == 0
    finally:
        r.close()


def test_tx_offloads_not_negotiated_are_dropped():
    r = Rig(drop=(VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_CSUM))
    try:
        r.send(frame(100), hdr(flags=1, csum_start=34, csum_offset=16))
        r.send(frame(3000), hdr(flags=1, gso_type=1, gso_size=1448, csum_start=34, csum_offset=16))
        assert r.dev.stats["tx_bad"] == 2 and nothing_pending(r.tap)
    finally:
        r.close()


def test_tx_chain_with_no_buffer_or_writable_part(rig):
    d = rig.drivers[1]
    d.add([], [64])                      # only a writable buffer
    d.add([hdr()], [])                   # only a header
    d.put_desc(d.free[0], 0x3FFF_0000_0000, 100)      # a buffer outside guest RAM
    d.offer(d.free.popleft())
    rig.dev.handle_queue(1)
    assert [n for _, n in d.get_used()] == [0, 0, 0]
    assert rig.dev.stats["tx_bad"] == 3 and rig.resets == 0 and nothing_pending(rig.tap)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=st.integers(0, 255), gso_type=st.sampled_from([0, 1, 3, 4, 0x81, 0x84, 5, 0xFF]),
       hdr_len=st.integers(0, 0xFFFF), gso_size=st.integers(0, 0xFFFF), csum_start=st.integers(0, 0xFFFF),
       csum_offset=st.integers(0, 0xFFFF), length=st.integers(0, MAX_FRAME + 64),
       pieces=st.integers(1, 5))
def test_tx_property_any_header_never_crashes(rig, flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
                                              length, pieces):
    """Whatever the header and length: the chain is completed, the device stays up, and what reaches
    the TAP is the frame with a header the device's checks accept."""
    h = hdr(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0xBEEF)
    data = os.urandom(length)
    cut = [len(data) * i // pieces for i in range(pieces + 1)]
    d = rig.drivers[1]
    d.add([h] + [data[a:b] for a, b in zip(cut, cut[1:]) if b > a], [])
    rig.dev.handle_queue(1)
    assert [n for _, n in d.get_used()] == [0]
    assert rig.resets == 0 and not rig.dev.needs_reset
    rig.tap.peers[0].setblocking(False)
    try:
        got = rig.tap.peers[0].recv(1 << 17)
    except BlockingIOError:
        return
    assert got[HDR_LEN:] == data
    assert rig.dev.check_tx_header(got[:HDR_LEN], len(data)) is None
    assert got[10:12] == b"\0\0" and not got[0] & ~1


# ---------------------------------------------------------------------------
# receive
# ---------------------------------------------------------------------------
def test_rx_without_mrg_rxbuf_fills_num_buffers():
    r = Rig(drop=(VIRTIO_NET_F_MRG_RXBUF,))
    try:
        posted = r.post([1526, 1526])
        for i in range(2):
            r.tap.peers[0].send(hdr(num_buffers=0) + frame(60 + i * 100, seed=i))
        r.dev.handle_queue(0)
        used = r.drivers[0].get_used()
        assert [n for _, n in used] == [HDR_LEN + 60, HDR_LEN + 160]
        for i, data in enumerate(r.rx_payload(posted, used)):
            assert data[:HDR_LEN] == hdr(num_buffers=1)           # filled although MRG_RXBUF is off
            assert data[HDR_LEN:] == frame(60 + i * 100, seed=i)
        assert r.signals and r.dev.stats["rx_packets"] == 2
    finally:
        r.close()


def test_rx_mergeable_spreads_a_frame_over_buffers(rig):
    posted = rig.post([256] * 10)
    big = frame(1000)
    rig.tap.peers[0].send(hdr() + big)
    rig.tap.peers[0].send(hdr() + frame(100, seed=3))
    rig.dev.handle_queue(0)
    used = rig.drivers[0].get_used()
    assert [n for _, n in used] == [256, 256, 256, 244, 112]
    datas = rig.rx_payload(posted, used)
    first = b"".join(datas[:4])
    assert first[:HDR_LEN] == hdr(num_buffers=4) and first[HDR_LEN:] == big
    assert datas[4][10:12] == b"\x01\x00" and datas[4][HDR_LEN:] == frame(100, seed=3)


def test_rx_header_flags_cleared_without_guest_csum():
    r = Rig(drop=(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, 8, 9))
    try:
        assert r.tap.offloads[-1] == 0
        posted = r.post([2048])
        r.tap.peers[0].send(hdr(flags=2) + frame(80))
        r.dev.handle_queue(0)
        (data,) = r.rx_payload(posted, r.drivers[0].get_used())
        assert data[0] == 0
    finally:
        r.close()


def test_rx_frame_larger_than_buffer_without_mrg_is_dropped_and_buffer_reused():
    r = Rig(drop=(VIRTIO_NET_F_MRG_RXBUF,))
    try:
        posted = r.post([600])
        r.tap.peers[0].send(hdr() + frame(1400))        # does not fit
        r.tap.peers[0].send(hdr() + frame(500, seed=9))
        r.dev.handle_queue(0)
        used = r.drivers[0].get_used()
        assert [n for _, n in used] == [HDR_LEN + 500]
        assert r.rx_payload(posted, used)[0][HDR_LEN:] == frame(500, seed=9)
        assert r.dev.stats["rx_dropped"] == 1
    finally:
        r.close()


def test_rx_frame_larger_than_all_mergeable_buffers_is_dropped(rig):
    rig.post([256] * 2)
    rig.tap.peers[0].send(hdr() + frame(3000))
    rig.dev.handle_queue(0)
    assert rig.drivers[0].get_used() == [] and rig.dev.stats["rx_dropped"] == 1


def test_rx_without_buffers_reads_nothing_and_holds_nothing(rig):
    """A guest that posts no buffers: frames stay in the (bounded) socket/TAP queue, none are read."""
    sent = 0
    rig.tap.peers[0].setblocking(False)
    try:
        while sent < 10000:
            rig.tap.peers[0].send(hdr() + frame(1000, seed=sent & 0xFF))
            sent += 1
    except BlockingIOError:
        pass
    assert sent < 10000            # the kernel queue is bounded: the sender is pushed back
    for _ in range(5):
        rig.dev.handle_queue(0)
        assert rig.dev.rx_pump(0) == 0
    assert rig.dev.stats["rx_packets"] == 0 and rig.dev.stats["rx_dropped"] == 0
    posted = rig.post([2048] * 8)
    used = rig.drivers[0].get_used()
    assert len(used) == 8
    assert [d[HDR_LEN:] for d in rig.rx_payload(posted, used)] == [frame(1000, seed=i) for i in range(8)]


def test_rx_unusable_buffers_are_returned_empty(rig):
    d = rig.drivers[0]
    d.add([], [8])                          # smaller than the header
    d.add([b"x" * 20], [2048])              # has a device-readable part
    d.put_desc(d.free[0], 0x3FFF_0000_0000, 2048, 2)   # outside RAM
    d.offer(d.free.popleft())
    rig.dev.handle_queue(0)
    assert [n for _, n in d.get_used()] == [0, 0, 0]
    assert rig.resets == 0


def test_rx_head_offered_twice_while_held_breaks_the_ring(rig):
    d = rig.drivers[0]
    head, _ = d.add([], [2048])
    rig.dev.handle_queue(0)
    d.offer(head)                       # the same head again: a driver bug
    rig.dev.handle_queue(0)
    assert rig.resets == 1 and rig.dev.needs_reset


def test_rx_ring_loop_breaks_the_ring_not_the_device(rig):
    d = rig.drivers[0]
    a, b = d.free.popleft(), d.free.popleft()
    d.put_desc(a, 0x100000, 64, 1 | 2, b)
    d.put_desc(b, 0x100100, 64, 1 | 2, a)
    d.offer(a)
    rig.dev.handle_queue(0)
    assert rig.dev.needs_reset and rig.resets == 1
    assert rig.dev.rx_pump(0) == 0       # a broken device moves nothing


def test_quiesce_gives_held_buffers_back(rig):
    rig.post([2048] * 5)
    q = rig.dev.queues[0]
    assert q.last_avail_idx == 5
    rig.tap.peers[0].send(hdr() + frame(100))
    rig.dev.rx_pump(0)
    rig.dev.quiesce()
    assert q.last_avail_idx == 5 - 4     # one buffer used, four given back


def test_link_down_when_tap_peer_goes_away(rig):
    rig.post([2048])
    rig.tap.peers[0].close()
    rig.send(frame(100))                 # EPIPE: dropped, link down
    assert rig.dev.stats["tx_dropped"] == 1 and not rig.dev.link_up and rig.config_irqs == 1
    status = struct.unpack_from("<H", rig.dev.read_config(6, 2))[0]
    assert not status & VIRTIO_NET_S_LINK_UP
    rig.dev.rx_pump(0)                   # EOF on receive: the queue stops being read, nothing crashes
    rig.dev.rx_pump(0)
    assert rig.dev._pairs[0].gone and rig.resets == 0


# ---------------------------------------------------------------------------
# control queue
# ---------------------------------------------------------------------------
def test_ctrl_rx_mode_and_mac_filter(rig):
    posted = rig.post([2048] * 8)
    assert rig.ctrl(VIRTIO_NET_CTRL_RX, 0, b"\0") == 0        # promisc off
    other = bytes.fromhex("525400000001")
    mcast = bytes.fromhex("333300000001")
    table = struct.pack("<I", 1) + other + struct.pack("<I", 1) + mcast
    assert rig.ctrl(VIRTIO_NET_CTRL_MAC, 0, table) == 0
    for i, dst in enumerate([MAC, bytes.fromhex("525400999999"), other, mcast, bytes.fromhex("01005e000001"),
                             BCAST]):
        rig.tap.peers[0].send(hdr() + frame(64, dst=dst, seed=i))
    rig.dev.rx_pump(0)
    used = rig.drivers[0].get_used()
    got = [d[HDR_LEN:HDR_LEN + 6] for d in rig.rx_payload(posted, used)]
    assert got == [MAC, other, mcast, BCAST]
    assert rig.dev.stats["rx_filtered"] == 2
    assert rig.ctrl(VIRTIO_NET_CTRL_RX, 5, b"\1") == 0        # no broadcast
    assert rig.ctrl(VIRTIO_NET_CTRL_RX, 1, b"\1") == 0        # all multicast
    rig.tap.peers[0].send(hdr() + frame(64, dst=BCAST))
    rig.tap.peers[0].send(hdr() + frame(64, dst=bytes.fromhex("01005e000001")))
    rig.dev.rx_pump(0)
    assert len(rig.drivers[0].get_used()) == 1


def test_ctrl_mac_addr_announce_mq_and_errors(rig):
    new = bytes.fromhex("525400112233")
    assert rig.ctrl(VIRTIO_NET_CTRL_MAC, 1, new) == 0
    assert rig.dev.read_config(0, 6) == new
    assert rig.ctrl(VIRTIO_NET_CTRL_MAC, 1, b"\x01" * 6) == 1        # multicast MAC refused
    rig.dev.announce()
    assert rig.dev.read_config(6, 2)[0] & VIRTIO_NET_S_ANNOUNCE and rig.config_irqs == 1
    assert rig.ctrl(VIRTIO_NET_CTRL_ANNOUNCE, 0) == 0
    assert not rig.dev.read_config(6, 2)[0] & VIRTIO_NET_S_ANNOUNCE
    assert rig.ctrl(VIRTIO_NET_CTRL_MQ, 0, b"\x01\x00") == 1          # MQ not offered with one pair
    assert rig.ctrl(VIRTIO_NET_CTRL_RX, 9, b"\1") == 1
    assert rig.ctrl(VIRTIO_NET_CTRL_RX, 0, b"\1\1") == 1
    assert rig.ctrl(99, 0) == 1
    table = struct.pack("<I", 0xFFFFFFFF)                              # huge entry count
    assert rig.ctrl(VIRTIO_NET_CTRL_MAC, 0, table) == 1
    assert rig.ctrl(VIRTIO_NET_CTRL_MAC, 0, struct.pack("<II", 0, 0) + b"x") == 1   # trailing byte
    assert rig.ctrl(VIRTIO_NET_CTRL_RX, 0, ack=0) is None               # no ack byte: returned, no crash
    assert rig.resets == 0


def test_ctrl_mac_table_overflow_means_all():
    r = Rig()
    try:
        r.post([2048] * 2)
        r.ctrl(VIRTIO_NET_CTRL_RX, 0, b"\0")
        many = struct.pack("<I", 65) + b"".join(bytes([0x52, 0, 0, 0, 0, i]) for i in range(65))
        assert r.ctrl(VIRTIO_NET_CTRL_MAC, 0, many + struct.pack("<I", 0)) == 0
        r.tap.peers[0].send(hdr() + frame(64, dst=bytes.fromhex("5254deadbeef")))
        r.dev.rx_pump(0)
        assert len(r.drivers[0].get_used()) == 1
    finally:
        r.close()


def test_mq_pairs_and_queue_enable():
    r = Rig(pairs=2)
    try:
        assert r.dev.num_queues == 5 and r.tap.enabled == {0: True, 1: False}
        assert r.ctrl(VIRTIO_NET_CTRL_MQ, 0, struct.pack("<H", 3)) == 1
        assert r.ctrl(VIRTIO_NET_CTRL_MQ, 0, struct.pack("<H", 2)) == 0
        assert r.tap.enabled == {0: True, 1: True}
        posted = r.post([2048], pair=1)
        r.tap.peers[1].send(hdr() + frame(70))
        r.dev.handle_queue(2)
        used = r.drivers[2].get_used()
        assert r.rx_payload(posted, used)[0][HDR_LEN:] == frame(70)
        r.send(frame(90), pair=1)
        assert recv(r.tap, 1)[HDR_LEN:] == frame(90)
    finally:
        r.close()


# ---------------------------------------------------------------------------
# the TAP as a sidecore pollable: frames arrive with nobody kicking, in every loop mode
# ---------------------------------------------------------------------------
class _RxRing:
    """The RX ring as a kick-less pollable (the test posts buffers before starting)."""

    def __init__(self, dev, wake_fd):
        self.dev, self.wake_fd = dev, wake_fd

    def poll(self):
        return self.dev.queues[0].has_work() and self.dev.handle_queue(0) > 0

    def watches(self):
        return []

    def arm(self):
        return self.dev.queues[0].has_work()

    def disarm(self):
        pass

    def drain(self):
        pass


@pytest.mark.parametrize("mode", ["notify", "poll", "adaptive"])
def test_tap_pollable_delivers_without_kicks(mode):
    r = Rig()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        r.post([2048] * 40, kick=False)
        r.dev.handle_queue(0)                   # take the buffers: from now on only the TAP wakes us
        loop = SidecoreLoop([_RxRing(r.dev, efd)] + r.dev.backend_pollables(mode), mode, poll_ns=20_000,
                            name="test-net")
        worker = SidecoreThread(loop).start()
        try:
            for burst in range(6):
                time.sleep(0.05 if burst % 2 else 0.002)   # let adaptive fall asleep between some bursts
                for i in range(5):
                    r.tap.peers[0].send(hdr() + frame(200, seed=burst * 5 + i))
                deadline = time.monotonic() + 5
                while r.dev.stats["rx_packets"] < 5 * (burst + 1) and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert r.dev.stats["rx_packets"] == 5 * (burst + 1), (mode, burst)
        finally:
            worker.stop()
        assert worker.error is None
        assert len(r.drivers[0].get_used()) == 30
    finally:
        os.close(efd)
        r.close()


def test_indirect_chains_on_rx_and_tx(rig):
    """VIRTIO_F_INDIRECT_DESC: an RX buffer split over an indirect table, a TX frame in one."""
    d = rig.drivers[0]
    head, gpas = d.add([], [10, 20, 2018], indirect=True)       # the header itself spans two buffers
    rig.dev.handle_queue(0)
    rig.tap.peers[0].send(hdr() + frame(300))
    rig.dev.rx_pump(0)
    used = d.get_used()
    assert used == [(head, HDR_LEN + 300)]
    data = rig.mem.read(gpas[0], 10) + rig.mem.read(gpas[1], 20) + rig.mem.read(gpas[2], 282)
    assert data[:HDR_LEN] == hdr(num_buffers=1) and data[HDR_LEN:] == frame(300)
    t = rig.drivers[1]
    t.add([hdr()[:7], hdr()[7:] + frame(500)[:100], frame(500)[100:]], [], indirect=True)
    rig.dev.handle_queue(1)
    assert [n for _, n in t.get_used()] == [0]
    assert recv(rig.tap)[HDR_LEN:] == frame(500)


@settings(max_examples=120, deadline=None)
@given(mrg=st.booleans(),
       buffers=st.lists(st.lists(st.integers(1, 3000), min_size=1, max_size=3), min_size=1, max_size=12),
       frames=st.lists(st.integers(0, 9000), min_size=1, max_size=6))
def test_rx_property_frames_land_whole_or_are_counted(mrg, buffers, frames):
    """Any RX buffer layout, any frame sizes: a frame is delivered whole (with num_buffers saying over how
    many buffers) or counted as dropped; buffers too small for a header come back empty; nothing breaks."""
    r = Rig(queue_size=64, drop=() if mrg else (VIRTIO_NET_F_MRG_RXBUF,))
    try:
        d = r.drivers[0]
        posted = []
        for sizes in buffers:
            head, gpas = d.add([], sizes)
            posted.append((head, gpas, sizes))
        r.dev.handle_queue(0)
        for i, n in enumerate(frames):
            r.tap.peers[0].send(hdr() + (frame(n, seed=i) if n >= 12 else b"\xab" * n))
        for _ in range(3):
            r.dev.rx_pump(0)
        used = d.get_used()
        assert r.resets == 0 and not r.dev.needs_reset
        datas = r.rx_payload(posted, used)
        got = []
        k = 0
        while k < len(used):
            head, n = used[k]
            if n == 0:                        # returned empty: too small for a header
                assert sum({h: s for h, _, s in posted}[head]) < HDR_LEN
                k += 1
                continue
            nb = int.from_bytes(datas[k][10:12], "little")
            assert nb >= 1 and (mrg or nb == 1)
            got.append(b"".join(datas[k:k + nb])[HDR_LEN:])
            k += nb
        expect = [frame(n, seed=i) if n >= 12 else b"\xab" * n for i, n in enumerate(frames)]
        # delivered frames are whole and in order; the others were counted
        it = iter(expect)
        for g in got:
            assert any(g == e for e in it)
        assert r.dev.stats["rx_packets"] == len(got)
        assert r.dev.stats["rx_packets"] + r.dev.stats["rx_dropped"] <= len(frames)
    finally:
        r.close()
