"""Fuzz target ``vhost_user``: a fuzzed message stream, with fds, against a live server.

Each input becomes one frontend connection: its messages (real request codes with payloads
built from the input, or raw bytes) and fds chosen from a pool (guest RAM memfd, eventfds,
/dev/null, a pipe) go down a unix socket to a :class:`~exitless.vhost_user.VhostUserServer`
whose ``_serve`` loop -- framing, fd checks, :class:`VhostUserBackend`, the data-plane thread
-- runs until the connection ends.  ``check()`` then connects a well-behaved frontend, sets up a
ring and reads one sector through the data plane, and verifies that no fd or thread leaked.
"""
from __future__ import annotations

import array
import os
import socket
import struct
import tempfile
import threading
import time

from ..devices.virtio.blk import VirtioBlk
from ..devices.virtio.constants import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_F_VERSION_1
from ..memory import GuestMemory, Region
from ..vhost_user import VhostUserServer
from ..vhost_user import protocol as P
from ..vhost_user.frontend import Frontend
from . import InvariantViolation
from .data import FuzzInput
from .ring import DriverRing

MIB = 1 << 20
UVA = 0x7F00_0000_0000          # the frontend's address of guest RAM (gpa 0)
RING = 0x80000                  # fuzzed rings live here (gpa), as do check()'s
BUF = 0x90000
MAX_MESSAGES = 48
REQUESTS = (P.GET_FEATURES, P.SET_FEATURES, P.SET_OWNER, P.RESET_OWNER, P.SET_MEM_TABLE, P.SET_VRING_NUM,
            P.SET_VRING_ADDR, P.SET_VRING_BASE, P.GET_VRING_BASE, P.SET_VRING_KICK, P.SET_VRING_CALL,
            P.SET_VRING_ERR, P.GET_PROTOCOL_FEATURES, P.SET_PROTOCOL_FEATURES, P.GET_QUEUE_NUM,
            P.SET_VRING_ENABLE, P.GET_CONFIG, P.SET_CONFIG, P.SET_LOG_BASE, P.SET_STATUS)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


class VhostUserHarness:
    def __init__(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="exitless-fuzz-")
        img = os.path.join(self.tmp.name, "disk.img")
        with open(img, "wb") as f:
            f.truncate(MIB)
        self.dev = VirtioBlk(img, queue_size=64)
        self.server = VhostUserServer(os.path.join(self.tmp.name, "vu.sock"), self.dev, "kick", io_timeout=2.0)
        self.server.listen()
        self.ram_fd = os.memfd_create("exitless-fuzz-vu", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.ram_fd, MIB)
        self.mem = GuestMemory(-1, [Region(0, MIB, 0, self.ram_fd)], owns_fd=False)
        self.events = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
        self.null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        self.pipe = os.pipe()
        self.pool = [self.ram_fd, *self.events, self.null, self.pipe[0]]
        self.messages = 0
        self.sync_dataplane = _ServeOnAttach()
        self.threads = threading.active_count()
        self.fds = _fd_count()
        self.fd_names = _fds()

    # -- one fuzzed connection ---------------------------------------------------------------------
    def _payload(self, inp: FuzzInput, request: int) -> tuple[bytes, list[int]]:
        """A payload shaped for ``request`` with fuzzed fields (or, one time in 4, raw bytes)."""
        if inp.u8() & 3 == 0:
            n = inp.u8() % 4
            return inp.take(inp.u16() % 512), [inp.pick(self.pool) for _ in range(n)]
        v = inp.u8()
        if request in (P.SET_FEATURES, P.SET_PROTOCOL_FEATURES, P.SET_LOG_BASE, P.SET_STATUS):
            return struct.pack("<Q", inp.u64() if v & 1 else (1 << VIRTIO_F_VERSION_1) | (1 << P.F_PROTOCOL_FEATURES)
                               | (1 << 28) | (1 << 29)), []
        if request == P.SET_MEM_TABLE:
            n = 1 + v % 2
            regions = b"".join(P.MEM_REGION.pack(
                0 if not v & 2 else inp.u64(), MIB if not v & 4 else inp.u32(), UVA if not v & 8 else inp.u64(),
                0 if not v & 16 else inp.u32()) for _ in range(n))
            return P.MEM_HEAD.pack(n, 0) + regions, [self.ram_fd if not v & 32 else inp.pick(self.pool)
                                                     for _ in range(n)]
        if request in (P.SET_VRING_NUM, P.SET_VRING_BASE, P.GET_VRING_BASE, P.SET_VRING_ENABLE):
            return P.STATE.pack(inp.u8() % 3 if v & 1 else 0, inp.u32() if v & 2 else (16 if v & 4 else 1)), []
        if request == P.SET_VRING_ADDR:
            desc, avail, used = UVA + RING, UVA + RING + 0x1000, UVA + RING + 0x2000
            if v & 1:
                desc, avail, used = (UVA + inp.u32() % (2 * MIB)) if v & 2 else inp.u64(), UVA + inp.u32() % (2 * MIB), \
                    UVA + inp.u32() % (2 * MIB)
            return P.ADDR.pack(inp.u8() % 2 if v & 4 else 0, inp.u32() if v & 8 else 0, desc, used, avail, 0), []
        if request in (P.SET_VRING_KICK, P.SET_VRING_CALL, P.SET_VRING_ERR):
            index = (inp.u8() % 2) | (P.VRING_NOFD_MASK if v & 1 else 0) | (inp.u64() << 9 if v & 2 else 0)
            return struct.pack("<Q", index & 0xFFFF_FFFF_FFFF_FFFF), ([] if v & 1 else [inp.pick(self.pool)])
        if request in (P.GET_CONFIG, P.SET_CONFIG):
            size = inp.u8() % 64 if v & 1 else 8
            return P.CONFIG_HEAD.pack(inp.u16() % 300 if v & 2 else 0, size, 0) + inp.take(size), []
        return b"", []

    def run(self, data: bytes) -> None:
        inp = FuzzInput(data)
        head = inp.u16()
        self.mem.write(RING, inp.take(head % 0x3000))               # rings and buffers, as the guest left them
        # Bit 15: the rings run on a data-plane thread of their own (started and joined at every
        # reconfiguration, ~4 ms under load, and racing the control plane), else on this thread at
        # each start (_ServeOnAttach: deterministic, a tenth of the cost).  libFuzzer keeps both.
        self.server.dataplane = None if head & 0x8000 else self.sync_dataplane
        client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with client:
                client.settimeout(5)
                for _ in range(MAX_MESSAGES):
                    if not inp.remaining:
                        break
                    kind = inp.u8()
                    if kind == 0xFF:                                       # the guest kicks ring 0
                        os.eventfd_write(self.events[0], 1)
                        continue
                    request = REQUESTS[kind % len(REQUESTS)] if kind < 0xF0 else inp.u32()
                    payload, fds = self._payload(inp, request)
                    flags = P.VERSION | (P.FLAG_NEED_REPLY if inp.u8() & 1 else 0)
                    if kind == 0xFE:
                        flags = inp.u32()
                    self.messages += 1
                    data = P.HEADER.pack(request, flags, len(payload)) + payload
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
                    try:
                        client.sendmsg([data], anc)
                    except OSError:      # the server closed the connection already
                        break
                client.shutdown(socket.SHUT_WR)
                self.server._serve(server)
        finally:
            server.close()
            self.server.dataplane = None

    def check(self) -> None:
        """A well-behaved frontend on a new connection reads one sector through the data plane, on
        this thread alone: its messages (no REPLY_ACK, so none is answered) and the kick are written
        before the server reads the first, and while this check runs the server's sessions hand
        their rings to :class:`_ServeOnAttach` instead of a data-plane thread.  (Two threads waking
        each other for every message cost ~5 ms per check on a loaded machine; the fuzzed streams in
        ``run`` keep the threaded data plane.)"""
        if self.dev.internal_errors:
            raise InvariantViolation(f"virtio-blk raised internally {self.dev.internal_errors} times")
        kick, call = self.events[1], self.events[2]
        for fd in (kick, call):
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
        client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ring = DriverRing(self.mem, RING, 16)
        hdr, data, status = BUF, BUF + 0x200, BUF + 0x100
        self.mem.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
        self.mem.write_u8(status, 0xFF)
        ring.offer([(hdr, 16, False), (data, 512, True), (status, 1, True)])
        os.eventfd_write(kick, 1)
        try:
            with Frontend(client) as fe:
                fe.set_owner()
                fe.set_features((1 << VIRTIO_F_VERSION_1) | (1 << P.F_PROTOCOL_FEATURES))
                fe.set_protocol_features(0)
                fe.set_mem_table([(0, MIB, UVA, 0)], [self.ram_fd])
                fe.set_vring_num(0, 16)
                fe.set_vring_base(0, 0)
                fe.set_vring_addr(0, UVA + ring.desc, UVA + ring.used, UVA + ring.avail)
                fe.set_vring_call(0, call)
                fe.set_vring_kick(0, kick)
                fe.set_vring_enable(0, True)
                client.shutdown(socket.SHUT_WR)
                self.server.dataplane = self.sync_dataplane
                try:
                    self.server._serve(server)
                finally:
                    self.server.dataplane = None
        finally:
            server.close()
        used = ring.used_elements()
        if len(used) != 1 or self.mem.read_u8(status) != VIRTIO_BLK_S_OK:
            raise InvariantViolation(f"a valid vhost-user session failed after the input: used {used}, "
                                     f"status {self.mem.read_u8(status)}")
        deadline = time.monotonic() + 5
        while threading.active_count() > self.threads and time.monotonic() < deadline:
            time.sleep(0.001)
        if threading.active_count() != self.threads or _fd_count() != self.fds:
            new = {fd: what for fd, what in _fds().items() if self.fd_names.get(fd) != what}
            raise InvariantViolation(f"leak: {threading.active_count()} threads (was {self.threads}), "
                                     f"{_fd_count()} fds (was {self.fds}; new or changed: {new})")

    def counters(self) -> dict:
        return {"refused": self.mem.refused, "messages": self.messages, "protocol_errors": self.server.errors}


class _ServeOnAttach:
    """The shared data plane a :class:`~exitless.vhost_user.backend.VhostUserBackend` attaches its
    rings to (the interface of :class:`~exitless.sidecore.loop.SidecoreLoop` it uses), serving
    them on the caller's thread at once: consume the kick, then poll each ring until it has no
    more work -- one round of a notify-mode loop, without the loop's thread."""

    mode = "notify"

    def attach(self, pollables: list, timeout: float = 5.0) -> bool:
        for p in pollables:
            p.drain()
            while p.poll():
                pass
        return True

    def detach(self, pollables: list, timeout: float = 5.0) -> bool:
        return True


def make_vhost_user() -> VhostUserHarness:
    return VhostUserHarness()


def seeds_vhost_user() -> list[bytes]:
    def msg(request, v=0, extra=b""):
        return bytes([REQUESTS.index(request), 1, v]) + extra + bytes([1])   # shaped payload, NEED_REPLY

    setup = (msg(P.SET_OWNER) + msg(P.SET_FEATURES) + msg(P.GET_PROTOCOL_FEATURES)
             + msg(P.SET_MEM_TABLE) + msg(P.SET_VRING_NUM, 4) + msg(P.SET_VRING_ADDR)
             + msg(P.SET_VRING_KICK, 0, bytes([0, 1])) + msg(P.SET_VRING_CALL, 0, bytes([0, 2])))
    ring = struct.pack("<H", 0)
    return [ring + setup,
            ring + setup + bytes([0xFF]) + msg(P.GET_VRING_BASE) + msg(P.SET_VRING_ENABLE, 0),
            ring + msg(P.GET_CONFIG, 1, bytes([20])) + msg(P.SET_CONFIG),
            ring + msg(P.SET_MEM_TABLE, 6, struct.pack("<QI", 1 << 40, 4096)),
            ring + msg(P.SET_MEM_TABLE, 1) + msg(P.SET_VRING_NUM, 3, struct.pack("<BI", 1, 1 << 20))]
