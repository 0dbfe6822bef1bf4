"""Fuzz target ``virtio_net``: TX chains with fuzzed virtio-net headers, control-queue commands and
RX buffer layouts, against a fake TAP (a SOCK_SEQPACKET socketpair: one frame per read/write, like
a TAP fd with ``IFF_VNET_HDR``).  VIRTIO 1.2 §5.1."""
from __future__ import annotations

import socket
import struct

from ..devices.virtio.constants import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_OK,
)
from ..devices.virtio.net import HDR_LEN, VirtioNet
from ..devices.virtio.queue import Virtqueue
from ..memory import GuestMemory
from . import InvariantViolation
from .data import FuzzInput
from .ring import DriverRing
from .t_virtio import clear, write_span

RAM_LAYOUT = [(0x0, 0x10000), (0x10000, 0x10000), (0x30000, 0x4000)]
DESC, AVAIL, USED = 0x0, 0x1000, 0x2000       # queue i's rings at +0x400·i (desc), +0x100·i (avail, used)
HEAP, HEAP_END = 0x3000, 0x20000
CHECK_RINGS, CHECK_BUF = 0x30000, 0x32000      # check(): three 4-entry rings, then buffers
MAC = bytes.fromhex("525400f0220a")
MAX_OPS = 24
RX, TX, CTRL = 0, 1, 2


class FakeTap:
    """One queue pair: the device reads/writes ``fds[0]``; the harness holds ``peer``."""

    def __init__(self):
        self._sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.setblocking(False)
        self.peer.setblocking(False)
        self.fds = [self._sock.fileno()]
        self.name = "fuzz"

    def set_offload(self, offloads: int) -> None:
        pass

    def set_queue_enabled(self, index: int, enabled: bool) -> None:
        pass

    def inject(self, frame: bytes) -> None:
        try:
            self.peer.send(frame)
        except BlockingIOError:
            pass                    # the "TAP queue" is full: the frame is dropped, as a TAP does

    def drain(self) -> list[bytes]:
        """Frames the device sent; also empties frames it has not read."""
        out = []
        for s, keep in ((self.peer, True), (self._sock, False)):
            while True:
                try:
                    frame = s.recv(1 << 17)
                except BlockingIOError:
                    break
                if keep:
                    out.append(frame)
        return out


class NetHarness:
    def __init__(self):
        self.mem = GuestMemory.create(RAM_LAYOUT, name="exitless-fuzz-net")
        self.tap = FakeTap()
        self.dev = VirtioNet(self.tap, mac=MAC, queue_size=16, ctrl_queue=True)
        self.kicks = 0

    def _queues(self, rings: list[tuple[int, int, int]], size: int) -> list[Virtqueue]:
        out = []
        for desc, avail, used in rings:
            q = Virtqueue(self.mem, self.dev.queue_max_size)
            q.size, q.desc_addr, q.avail_addr, q.used_addr, q.ready = size, desc, avail, used, True
            out.append(q)
        return out

    def run(self, data: bytes) -> None:
        inp, mem, dev = FuzzInput(data), self.mem, self.dev
        clear(mem)
        self.tap.drain()
        features = (dev.device_features() & inp.u64()) | 1 << VIRTIO_F_VERSION_1
        if not dev.features_ok(features):
            features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_CTRL_VQ
        size = 1 << (inp.u8() % 5)
        rings = [(DESC + 0x400 * i, AVAIL + 0x100 * i, USED + 0x100 * i) for i in range(3)]
        for desc, avail, _ in rings:
            mem.write(desc, inp.take(16 * size))
            mem.write(avail, inp.take(4 + 2 * size + 2))
        write_span(mem, HEAP, inp.rest(inp.u16() % (HEAP_END - HEAP)))    # headers, frames, ctrl commands
        dev.activate(mem, self._queues(rings, size), features, lambda i: None)
        try:
            for _ in range(1 + inp.u8() % MAX_OPS):
                op = inp.u8() % 6
                if op <= 2:
                    self.kicks += 1
                    dev.handle_queue(op)
                elif op == 3:                              # a frame from the host: header + bytes
                    self.tap.inject(inp.take(HDR_LEN) + inp.rest(inp.u16() % 2048))
                    dev.rx_pump(0)
                elif op == 4:                              # the driver publishes more (or a wild idx)
                    mem.write(rings[inp.u8() % 3][1] + 2, inp.take(2))
                else:
                    dev.set_link(inp.flag())
                    dev.announce()
        finally:
            dev.quiesce()
            dev.reset()
        if dev.internal_errors:
            raise InvariantViolation(f"virtio-net raised internally {dev.internal_errors} times (see the log)")

    def check(self) -> None:
        """A driver's valid session: one frame out, a control command, one frame in."""
        mem, dev, tap = self.mem, self.dev, self.tap
        tap.drain()
        dev.set_link(True)
        rings = [DriverRing(mem, CHECK_RINGS + 0x200 * i, 4) for i in range(3)]
        queues = self._queues([(r.desc, r.avail, r.used) for r in rings], 4)
        features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_NET_F_CTRL_RX
        dev.activate(mem, queues, features, lambda i: None)
        try:
            frame = MAC + b"\x02\x00\x00\x00\x00\x01" + bytes(range(48))
            hdr, body, ack = CHECK_BUF, CHECK_BUF + 0x100, CHECK_BUF + 0x80
            mem.write(hdr, bytes(HDR_LEN))
            mem.write(body, frame)
            head = rings[TX].offer([(hdr, HDR_LEN, False), (body, len(frame), False)])
            dev.handle_queue(TX)
            sent = tap.drain()
            if [h for h, _ in rings[TX].used_elements()] != [head] or sent != [bytes(HDR_LEN) + frame]:
                raise InvariantViolation(f"a valid TX chain was not sent: {sent!r}, needs_reset={dev.needs_reset}")
            mem.write(hdr, bytes([VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, 1]))
            mem.write_u8(ack, 0xFF)
            head = rings[CTRL].offer([(hdr, 3, False), (ack, 1, True)])
            dev.handle_queue(CTRL)
            if rings[CTRL].used_elements() != [(head, 1)] or mem.read_u8(ack) != VIRTIO_NET_OK:
                raise InvariantViolation(f"a valid control command failed: ack {mem.read_u8(ack)}")
            rx = CHECK_BUF + 0x800
            mem.fill(rx, 0x800)
            head = rings[RX].offer([(rx, 0x800, True)])
            dev.handle_queue(RX)
            tap.inject(bytes(HDR_LEN) + frame)
            dev.rx_pump(0)
            used = rings[RX].used_elements()
            if used != [(head, HDR_LEN + len(frame))] or mem.read(rx + HDR_LEN, len(frame)) != frame:
                raise InvariantViolation(f"a valid frame was not received: used {used}")
        finally:
            dev.reset()

    def counters(self) -> dict:
        s = self.dev.stats
        return {"refused": self.mem.refused, "kicks": self.kicks, "tx_packets": s["tx_packets"],
                "tx_bad": s["tx_bad"], "rx_packets": s["rx_packets"], "rx_dropped": s["rx_dropped"],
                "ctrl_ok": s["ctrl_ok"], "ctrl_err": s["ctrl_err"]}


def make_virtio_net() -> NetHarness:
    return NetHarness()


# -- seed inputs (python3 -m exitless.fuzz --make-seeds writes them to corpus/) --------------------
_D = struct.Struct("<QIHH")
F_NEXT, F_WRITE = 1, 2


def _rings(size: int, chains: list[list[tuple[int, int, int, int]]]) -> bytes:
    """Three queues' descriptor tables and avail rings (as run() reads them): one chain per queue."""
    out = b""
    for descs in chains:
        out += b"".join(_D.pack(*d) for d in descs).ljust(16 * size, b"\0")
        n = 1 if descs else 0
        out += struct.pack("<HHH", 0, n, 0).ljust(4 + 2 * size + 2, b"\0")
    return out


def seeds_virtio_net() -> list[bytes]:
    all_features = struct.pack("<Q", (1 << 64) - 1)
    frame = MAC + b"\x02\x00\x00\x00\x00\x01" + bytes(range(48))
    out = []
    for vnet in (bytes(HDR_LEN),                                                         # plain
                 struct.pack("<BBHHHHH", 1, 0, 0, 0, 14, 16, 0),                          # NEEDS_CSUM
                 struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 0)):                     # TSO4
        heap = vnet.ljust(0x100, b"\0") + frame.ljust(0x100, b"\0") + bytes([0, 0, 1, 0])
        ctrl = [(HEAP + 0x200, 3, F_NEXT, 1), (HEAP + 0x300, 1, F_WRITE, 0)]
        rx = [(HEAP + 0x1000, 0x800, F_WRITE, 0)]
        tx = [(HEAP, HDR_LEN, F_NEXT, 1), (HEAP + 0x100, len(frame), 0, 0)]
        ops = bytes([1, 2, 0, 3]) + bytes(HDR_LEN) + struct.pack("<H", len(frame)) + frame
        out.append(all_features + bytes([2]) + _rings(4, [rx, tx, ctrl]) + struct.pack("<H", len(heap)) + heap
                   + bytes([3]) + ops)    # four ops: kick TX, CTRL, RX, a frame in
    # mergeable RX buffers spread over two chains, a MAC table command, an MQ command
    mac_table = struct.pack("<I", 1) + MAC + struct.pack("<I", 0)
    heap = bytes([1, 1]) + mac_table
    out.append(all_features + bytes([2]) +
               _rings(4, [[(HEAP + 0x1000, 40, F_NEXT | F_WRITE, 1), (HEAP + 0x2000, 40, F_WRITE, 0)], [],
                          [(HEAP, len(heap), F_NEXT, 1), (HEAP + 0x300, 1, F_WRITE, 0)]])
               + struct.pack("<H", len(heap)) + heap + bytes([2, 0, 2, 3]) + bytes(HDR_LEN)
               + struct.pack("<H", 100) + bytes(100))
    return out
