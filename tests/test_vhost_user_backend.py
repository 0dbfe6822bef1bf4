"""vhost-user back-end driven by a Python frontend and a Python "guest driver", in process.

The guest RAM is two memfds (one region each, the second at a non-zero mmap
offset) with frontend-virtual addresses unrelated to the guest-physical ones,
so every translation the back-end does is exercised: ring addresses as UVAs,
buffers as GPAs, buffers straddling the two regions.
"""
from __future__ import annotations

import os
import struct
import time

import pytest

from exitless.devices.virtio.blk import VirtioBlk
from exitless.devices.virtio.constants import (
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
from exitless.devices.virtio.queue import vring_need_event
from exitless.fdwait import wait_readable
from exitless.memory import GuestMemory, Region
from exitless.vhost_user import VhostUserServer
from exitless.vhost_user import protocol as P
from exitless.vhost_user.frontend import Frontend, FrontendError

MIB = 1 << 20
UVA_A = 0x7F00_1234_0000      # frontend-virtual base of region A (gpa 0)
UVA_B = 0x5500_0000_0000      # ... of region B (gpa 1 MiB, file offset 1 MiB)
RING_GPA = 0x18_0000          # rings live in region B
DISK_BYTES = 1 * MIB
QSIZE = 64

F_DESC_NEXT, F_DESC_WRITE = 1, 2


def gpa_to_uva(gpa: int) -> int:
    return UVA_A + gpa if gpa < MIB else UVA_B + (gpa - MIB)


class GuestRam:
    """Two memfds = two regions; the test's view of them is an ordinary GuestMemory."""

    def __init__(self, open_file=None):
        """``open_file(name)``: an fd for each region's file instead of a memfd (taken over, closed by close())."""
        new = open_file or (lambda name: os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
        self.fd_a = new("vu-test-a")
        self.fd_b = new("vu-test-b")
        os.ftruncate(self.fd_a, MIB)
        os.ftruncate(self.fd_b, 2 * MIB)
        self.mem = GuestMemory(-1, [Region(0, MIB, 0, self.fd_a), Region(MIB, MIB, MIB, self.fd_b)], owns_fd=False)

    def table(self) -> tuple[list[tuple[int, int, int, int]], list[int]]:
        return [(0, MIB, UVA_A, 0), (MIB, MIB, UVA_B, MIB)], [self.fd_a, self.fd_b]

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd_a)
        os.close(self.fd_b)


class DriverRing:
    """The driver side of a split ring (what Linux's virtio_ring does), with EVENT_IDX if ``evt``."""

    def __init__(self, mem: GuestMemory, size: int = QSIZE, base: int = RING_GPA, evt: bool = True):
        self.mem, self.size, self.evt = mem, size, evt
        self.desc, self.avail, self.used = base, base + 0x1000, base + 0x2000
        mem.fill(base, 0x3000)
        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(size))
        self.chains: dict[int, list[int]] = {}

    def uvas(self) -> tuple[int, int, int]:
        return gpa_to_uva(self.desc), gpa_to_uva(self.used), gpa_to_uva(self.avail)

    def add(self, bufs: list[tuple[int, int, bool]]) -> tuple[int, bool]:
        """Make a chain available; returns (head, whether the device wants a kick)."""
        ids = [self.free.pop(0) for _ in bufs]
        for i, (d, (gpa, length, w)) in enumerate(zip(ids, bufs)):
            last = i == len(ids) - 1
            flags = (0 if last else F_DESC_NEXT) | (F_DESC_WRITE if w else 0)
            self.mem.write(self.desc + 16 * d, struct.pack("<QIHH", gpa, length, flags, 0 if last else ids[i + 1]))
        self.chains[ids[0]] = ids
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), ids[0])
        old = self.avail_idx
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)
        return ids[0], self.needs_kick(old)

    def needs_kick(self, old: int) -> bool:
        if self.evt:
            return vring_need_event(self.mem.read_u16(self.used + 4 + 8 * self.size), self.avail_idx, old)
        return not self.mem.read_u16(self.used) & 1

    def reap(self) -> list[tuple[int, int]]:
        out = []
        idx = self.mem.read_u16(self.used + 2)
        while self.last_used != idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = struct.unpack("<II", self.mem.read(slot, 8))
            out.append((head, length))
            self.free.extend(self.chains.pop(head))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.evt:   # interrupt me on the next completion
            self.mem.write_u16(self.avail + 4 + 2 * self.size, self.last_used)
        return out


class Session:
    """A frontend session with one ring set up, and the guest's blk request helpers."""

    def __init__(self, path: str, *, evt: bool = True, protocol: bool = True, nofd: bool = False,
                 enable: bool = True, base: int = 0, ram: GuestRam | None = None, queues: int = 1, hello=None):
        """``hello(frontend)``: what to send first (``exitless sidecore`` wants EXITLESS_SET_BACKEND)."""
        self.ram = ram or GuestRam()
        self.fe = Frontend.connect(path)
        if hello is not None:
            hello(self.fe)
        new = lambda: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # noqa: E731
        self.kicks_fd = [new() for _ in range(queues)]
        self.calls_fd = [new() for _ in range(queues)]
        self.errs_fd = [new() for _ in range(queues)]
        self.kick, self.call, self.err = self.kicks_fd[0], self.calls_fd[0], self.errs_fd[0]
        self.nofd = nofd
        self.kicks = 0
        self.interrupts = 0
        try:
            self._set_up(evt, protocol, enable, base, queues)
        except BaseException:        # a refused set-up (hostile-memory tests) leaks no fd
            self.close(ram=ram is None)
            raise

    def _set_up(self, evt: bool, protocol: bool, enable: bool, base: int, queues: int) -> None:
        fe = self.fe
        feats = fe.get_features()
        assert feats >> P.F_PROTOCOL_FEATURES & 1 and feats >> VIRTIO_F_VERSION_1 & 1
        want = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_F_RING_INDIRECT_DESC)
        if evt:
            want |= 1 << VIRTIO_F_RING_EVENT_IDX
        if protocol:
            pf = fe.get_protocol_features()
            assert pf >> P.PROTOCOL_F_CONFIG & 1 and pf >> P.PROTOCOL_F_REPLY_ACK & 1 and pf >> P.PROTOCOL_F_MQ & 1
            fe.set_protocol_features(pf)
            assert fe.get_queue_num() >= queues
            want |= 1 << P.F_PROTOCOL_FEATURES
        fe.set_owner()
        fe.set_features(want)
        regions, fds = self.ram.table()
        fe.set_mem_table(regions, fds)
        self.rings = []
        for q in range(queues):
            ring = DriverRing(self.ram.mem, base=RING_GPA + 0x4000 * q, evt=evt)
            self.rings.append(ring)
            ring.avail_idx = ring.last_used = base
            self.ram.mem.write_u16(ring.avail + 2, base)
            self.ram.mem.write_u16(ring.used + 2, base)
            fe.set_vring_num(q, QSIZE)
            fe.set_vring_base(q, base)
            desc, used, avail = ring.uvas()
            fe.set_vring_addr(q, desc, used, avail)
            fe.set_vring_kick(q, None if self.nofd else self.kicks_fd[q])
            fe.set_vring_call(q, self.calls_fd[q])
            fe.set_vring_err(q, self.errs_fd[q])
            if protocol and enable:
                fe.set_vring_enable(q, True)
        self.ring = self.rings[0]

    # -- requests --------------------------------------------------------------------------------------
    def submit(self, rtype: int, sector: int, data_gpa: int, nbytes: int, slot: int, q: int = 0) -> int:
        hdr = 0x8000 + 0x40 * slot + 0x1000 * q    # header and status bytes in region A
        status = hdr + 0x20
        self.ram.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        self.ram.mem.write_u8(status, 0xEE)
        bufs = [(hdr, 16, False)]
        if nbytes:
            bufs.append((data_gpa, nbytes, rtype == VIRTIO_BLK_T_IN))
        bufs.append((status, 1, True))
        head, kick = self.rings[q].add(bufs)
        if kick and not self.nofd:
            os.eventfd_write(self.kicks_fd[q], 1)
            self.kicks += 1
        return status

    def wait(self, n: int, timeout: float = 10.0, q: int = 0) -> list[tuple[int, int]]:
        done: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(done) < n:
            done += self.rings[q].reap()
            if len(done) >= n:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(done)} of {n} requests completed")
            if wait_readable(self.calls_fd[q], min(left, 0.05)):
                os.eventfd_read(self.calls_fd[q])
                self.interrupts += 1
        return done

    def io(self, rtype: int, sector: int, data_gpa: int, nbytes: int) -> int:
        status = self.submit(rtype, sector, data_gpa, nbytes, 0)
        self.wait(1)
        return self.ram.mem.read_u8(status)

    def err_count(self) -> int:
        try:
            return os.eventfd_read(self.err)
        except BlockingIOError:
            return 0

    def close(self, ram: bool = True) -> None:
        self.fe.close()
        for fd in self.kicks_fd + self.calls_fd + self.errs_fd:
            os.close(fd)
        if ram:
            self.ram.close()


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"\0" * DISK_BYTES)
    return path


class serving:
    """``with serving(disk, io) as srv:`` a started back-end (its device model is ``srv.device``),
    stopped and its disk closed on the way out."""

    def __init__(self, disk, io: str, *, num_queues: int = 1, **kw):
        self.dev = VirtioBlk(disk, queue_size=256, num_queues=num_queues)
        self.srv = VhostUserServer(str(disk.parent / f"vu-{io}.sock"), self.dev, io, **kw).start()

    def __enter__(self):
        return self.srv

    def __exit__(self, *exc) -> None:
        self.srv.stop()
        self.dev.close()


@pytest.fixture(params=["kick", "poll", "adaptive"])
def server(request, disk):
    with serving(disk, request.param) as srv:
        yield srv


def write_span(mem: GuestMemory, gpa: int, data: bytes) -> None:
    """Write across region boundaries (GuestMemory.view does not span regions)."""
    while data:
        r = next(r for r in mem.regions if r.gpa <= gpa < r.end)
        n = min(len(data), r.end - gpa)
        mem.write(gpa, data[:n])
        gpa, data = gpa + n, data[n:]


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed + (i >> 9)) & 0xFF for i in range(n))


def test_blk_io_every_path(server, disk):
    s = Session(server.path)
    try:
        assert s.fe.get_config(0, 8) == struct.pack("<Q", DISK_BYTES // 512)   # capacity
        mem = s.ram.mem
        # 32 writes of 8 KiB, 4 in flight at a time; data buffers straddle the region boundary
        data = pattern(32 * 8192, 3)
        for batch in range(8):
            statuses = []
            for k in range(4):
                i = batch * 4 + k
                gpa = MIB - 0x1000 if k == 0 else 0x20000 + 0x3000 * k   # k=0: 4 KiB in A, 4 KiB in B
                write_span(mem, gpa, data[i * 8192:(i + 1) * 8192])
                statuses.append(s.submit(VIRTIO_BLK_T_OUT, i * 16, gpa, 8192, k))
            s.wait(4)
            assert [mem.read_u8(st) for st in statuses] == [VIRTIO_BLK_S_OK] * 4
        assert s.io(VIRTIO_BLK_T_FLUSH, 0, 0, 0) == VIRTIO_BLK_S_OK
        assert disk.read_bytes()[:len(data)] == data
        # read it back into region B
        for i in range(32):
            assert s.io(VIRTIO_BLK_T_IN, i * 16, MIB + 0x10000, 8192) == VIRTIO_BLK_S_OK
            assert mem.read(MIB + 0x10000, 8192) == data[i * 8192:(i + 1) * 8192]
        assert s.interrupts > 0
        if server.io == "poll":
            assert s.kicks <= 1      # the back-end suppressed notifications
        assert s.fe.get_vring_base(0) == 4 * 8 + 1 + 32
        assert s.err_count() == 0
    finally:
        s.close()
    assert server.wait_connections(1, 10)


def test_resume_from_vring_base_on_a_new_connection(disk):
    with serving(disk, "kick") as srv:
        s = Session(srv.path)
        for i in range(5):
            s.ram.mem.write(0x20000, pattern(4096, i))
            assert s.io(VIRTIO_BLK_T_OUT, 8 * i, 0x20000, 4096) == VIRTIO_BLK_S_OK
        base = s.fe.get_vring_base(0)
        assert base == 5
        ram = s.ram
        s.close(ram=False)
        assert srv.wait_connections(1, 10)
        # The same guest memory and ring, picked up by a new session where the last one stopped.
        s2 = Session(srv.path, ram=ram, base=base)
        try:
            assert s2.io(VIRTIO_BLK_T_IN, 8 * 3, 0x30000, 4096) == VIRTIO_BLK_S_OK
            assert ram.mem.read(0x30000, 4096) == pattern(4096, 3)
            assert s2.fe.get_vring_base(0) == base + 1
        finally:
            s2.close()


def test_nofd_kick_means_polling(disk):
    """SET_VRING_KICK with VHOST_USER_VRING_NOFD_MASK: no kick fd, the back-end polls (even in kick mode)."""
    with serving(disk, "kick") as srv:
        s = Session(srv.path, nofd=True)
        try:
            assert srv.session.loop_mode == "poll"
            s.ram.mem.write(0x20000, pattern(4096, 9))
            assert s.io(VIRTIO_BLK_T_OUT, 0, 0x20000, 4096) == VIRTIO_BLK_S_OK
            assert disk.read_bytes()[:4096] == pattern(4096, 9)
        finally:
            s.close()


def test_ring_waits_for_enable_when_protocol_features_negotiated(disk):
    with serving(disk, "kick") as srv:
        s = Session(srv.path, enable=False)
        try:
            st = s.submit(VIRTIO_BLK_T_IN, 0, 0x20000, 512, 0)
            time.sleep(0.3)
            assert s.ring.reap() == [] and s.ram.mem.read_u8(st) == 0xEE     # started but disabled
            s.fe.set_vring_enable(0, True)
            s.wait(1)
            assert s.ram.mem.read_u8(st) == VIRTIO_BLK_S_OK
            s.fe.set_vring_enable(0, False)
            st = s.submit(VIRTIO_BLK_T_IN, 0, 0x20000, 512, 1)
            time.sleep(0.2)
            assert s.ring.reap() == []
            s.fe.set_vring_enable(0, True)
            s.wait(1)
        finally:
            s.close()


def test_without_protocol_features_rings_start_enabled(disk):
    with serving(disk, "adaptive") as srv:
        s = Session(srv.path, protocol=False, evt=False)
        try:
            for i in range(20):
                assert s.io(VIRTIO_BLK_T_IN, i, 0x20000, 512) == VIRTIO_BLK_S_OK
        finally:
            s.close()


@pytest.mark.parametrize("io", ["kick", "poll", "adaptive"])
def test_disconnect_mid_io_leaves_the_backend_ready(disk, io):
    with serving(disk, io) as srv:
        for round_ in range(3):
            s = Session(srv.path)
            for k in range(16):      # submit and vanish without waiting
                s.submit(VIRTIO_BLK_T_OUT, 64 * k, 0x20000, 32768, k)
            s.close()
            assert srv.wait_connections(round_ + 1, 10)
        assert srv.session is None and not srv.device.activated
        s = Session(srv.path)
        try:
            s.ram.mem.write(0x20000, pattern(4096, 1))
            assert s.io(VIRTIO_BLK_T_OUT, 0, 0x20000, 4096) == VIRTIO_BLK_S_OK
            assert s.io(VIRTIO_BLK_T_IN, 0, 0x30000, 4096) == VIRTIO_BLK_S_OK
            assert s.ram.mem.read(0x30000, 4096) == pattern(4096, 1)
        finally:
            s.close()


def test_broken_ring_signals_the_error_eventfd(disk):
    with serving(disk, "kick") as srv:
        s = Session(srv.path)
        try:
            assert s.io(VIRTIO_BLK_T_IN, 0, 0x20000, 512) == VIRTIO_BLK_S_OK
            s.ram.mem.write_u16(s.ring.avail + 2, s.ring.avail_idx + 1000)   # avail idx jumps by > size
            os.eventfd_write(s.kick, 1)
            deadline = time.monotonic() + 5
            while s.err_count() == 0:
                assert time.monotonic() < deadline, "no error notification"
                time.sleep(0.01)
            assert srv.device.needs_reset
            assert s.fe.get_vring_base(0) == 1   # still answers; the ring is stopped now
        finally:
            s.close()
        assert srv.wait_connections(1, 10) and not srv.device.needs_reset


def test_reply_ack_failure_keeps_the_connection(disk):
    with serving(disk, "kick") as srv:
        s = Session(srv.path)
        try:
            with pytest.raises(FrontendError, match="SET_VRING_NUM failed"):
                s.fe.set_vring_num(0, 1000)
            assert s.io(VIRTIO_BLK_T_IN, 0, 0x20000, 512) == VIRTIO_BLK_S_OK
        finally:
            s.close()


def test_second_frontend_is_turned_away(disk):
    with serving(disk, "kick") as srv:
        s = Session(srv.path)
        try:
            other = Frontend.connect(srv.path)
            assert other.closed_by_peer(5)
            other.close()
            assert srv.rejected == 1
            assert s.io(VIRTIO_BLK_T_IN, 0, 0x20000, 512) == VIRTIO_BLK_S_OK
        finally:
            s.close()


@pytest.mark.parametrize("io", ["kick", "poll", "adaptive"])
def test_two_queues_one_data_plane(disk, io):
    with serving(disk, io, num_queues=2) as srv:
        s = Session(srv.path, queues=2)
        try:
            assert srv.session.loop_mode == io and [r.live for r in srv.session.rings] == [True, True]
            mem = s.ram.mem
            for i in range(16):
                q = i % 2
                mem.write(0x20000 + 0x2000 * i, pattern(4096, i))
                st = s.submit(VIRTIO_BLK_T_OUT, 8 * i, 0x20000 + 0x2000 * i, 4096, i, q=q)
                s.wait(1, q=q)
                assert mem.read_u8(st) == VIRTIO_BLK_S_OK
            for i in range(16):
                q = (i + 1) % 2
                assert s.submit(VIRTIO_BLK_T_IN, 8 * i, 0x60000, 4096, 0, q=q)
                s.wait(1, q=q)
                assert mem.read(0x60000, 4096) == pattern(4096, i)
            assert [s.fe.get_vring_base(q) for q in (0, 1)] == [16, 16]
        finally:
            s.close()
        assert srv.wait_connections(1, 10)


def test_set_config_is_acked_and_reset_owner_stops_the_rings(disk):
    with serving(disk, "kick") as srv:
        s = Session(srv.path)
        try:
            s.fe.request(P.SET_CONFIG, P.CONFIG_HEAD.pack(0x20, 1, 0) + b"\x01")   # REPLY_ACK: raises on failure
            assert s.fe.get_config(0, 8) == struct.pack("<Q", DISK_BYTES // 512)
            assert s.io(VIRTIO_BLK_T_IN, 0, 0x20000, 512) == VIRTIO_BLK_S_OK
            s.fe.request(P.RESET_OWNER)
            assert srv.session.worker is None and not any(r.live for r in srv.session.rings)
            assert s.fe.get_vring_base(0) == 1
        finally:
            s.close()
