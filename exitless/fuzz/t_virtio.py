"""Fuzz targets ``virtqueue`` and ``virtio_blk``: rings and requests in fuzzed guest memory."""
from __future__ import annotations

import os
import struct
import tempfile

from ..devices.virtio.blk import VirtioBlk
from ..devices.virtio.constants import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_F_VERSION_1,
)
from ..devices.virtio.queue import Virtqueue
from ..memory import GuestMemory, GuestMemoryError
from . import InvariantViolation
from .data import FuzzInput
from .ring import DriverRing

# Guest RAM of the harnesses: two adjacent regions (buffers may straddle them), a hole, and a
# third region, so every translation path of the queue is reachable.
RAM_LAYOUT = [(0x0, 0x10000), (0x10000, 0x10000), (0x30000, 0x1000)]
DESC, AVAIL, USED = 0x0, 0x1000, 0x2000        # fuzzed rings (size <= 256)
HEAP, HEAP_END = 0x3000, 0x20000               # what the fuzzed descriptors usually point into
CHECK_RING, CHECK_BUF = 0x30000, 0x30400        # the valid request of check(), in the third region
MAX_POPS = 64


def fuzz_memory() -> GuestMemory:
    return GuestMemory.create(RAM_LAYOUT, name="exitless-fuzz-ram")


def write_span(mem: GuestMemory, gpa: int, data: bytes) -> None:
    """Write ``data`` at ``gpa`` even across adjacent regions (GuestMemory.write stays in one)."""
    while data:
        r = next(r for r in mem.regions if r.gpa <= gpa < r.end)
        n = min(len(data), r.end - gpa)
        mem.write(gpa, data[:n])
        gpa, data = gpa + n, data[n:]


def clear(mem: GuestMemory) -> None:
    for r in mem.regions:
        mem.fill(r.gpa, r.size)


def fill_rings(mem: GuestMemory, inp: FuzzInput, size: int) -> None:
    """Descriptor table and available ring straight from the input, then some of the buffer area."""
    mem.write(DESC, inp.take(16 * size))
    mem.write(AVAIL, inp.take(4 + 2 * size + 2))
    write_span(mem, HEAP, inp.rest(inp.u16() % (HEAP_END - HEAP)))


def _tmpdir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class VirtqueueHarness:
    def __init__(self):
        self.mem = fuzz_memory()
        self.q = Virtqueue(self.mem, 256)
        self.chains = 0

    def run(self, data: bytes) -> None:
        inp, mem, q = FuzzInput(data), self.mem, self.q
        clear(mem)
        q.reset()
        q.size = 1 << (inp.u8() % 9)
        mode = inp.u8()
        q.event_idx, q.indirect, q.ready = bool(mode & 1), bool(mode & 2), True
        q.desc_addr, q.avail_addr, q.used_addr = DESC, AVAIL, USED
        if mode & 4:                                   # fuzzed ring geometry
            q.desc_addr, q.avail_addr, q.used_addr = inp.u32() % 0x40000, inp.u32() % 0x40000, inp.u32() % 0x40000
        q.last_avail_idx = inp.u16()
        q.used_idx = inp.u16()
        fill_rings(mem, inp, q.size)
        q.validate()
        pops = 0
        while inp.remaining:
            op = inp.u8() % 6
            if op == 0 and pops < MAX_POPS:
                pops += 1
                chain = q.pop()
                if chain is None:
                    continue
                self.chains += 1
                self._exercise(chain, inp)
                q.push(chain.head, inp.u32())
            elif op == 1:
                q.should_signal()
            elif op == 2:
                q.disable_notifications()
            elif op == 3:
                q.enable_notifications()
            elif op == 4:                              # the driver publishes more (or moves avail.idx back)
                mem.write(AVAIL + 2, inp.take(2))
            else:
                q.has_work()

    @staticmethod
    def _exercise(chain, inp: FuzzInput) -> None:
        """Touch the chain as a device would; the only accepted failure is a bad buffer."""
        segs = chain.segments
        if sum(n for _, n, w in segs if not w) != chain.readable_len or \
                sum(n for _, n, w in segs if w) != chain.writable_len:
            raise InvariantViolation(f"segment lengths disagree with {chain!r}")
        try:
            if chain.readable_len:
                off = inp.u32() % chain.readable_len
                chain.read(off, min(chain.readable_len - off, inp.u16()))
            if chain.writable_len:
                off = inp.u32() % chain.writable_len
                chain.write(off, bytes(min(chain.writable_len - off, inp.u16() % 4096)))
        except GuestMemoryError:
            if chain.error is None:
                raise InvariantViolation(f"a buffer of a chain without error is outside RAM: {chain!r}") from None

    def check(self) -> None:
        q, mem = self.q, self.mem
        q.reset()
        ring = DriverRing(mem, CHECK_RING, 4)
        q.size, q.desc_addr, q.avail_addr, q.used_addr, q.ready = 4, ring.desc, ring.avail, ring.used, True
        q.validate()
        head = ring.offer([(CHECK_BUF, 16, False), (CHECK_BUF + 16, 64, True)])
        chain = q.pop()
        if chain is None or chain.head != head or chain.error or (chain.readable_len, chain.writable_len) != (16, 64):
            raise InvariantViolation(f"a valid chain came back as {chain!r}")
        chain.write(0, b"x" * 64)
        q.push(head, 64)
        if ring.used_elements() != [(head, 64)] or q.pop() is not None:
            raise InvariantViolation("a valid chain was not completed exactly once")
        q.reset()

    def counters(self) -> dict:
        return {"refused": self.mem.refused, "chains": self.chains}


def make_virtqueue() -> VirtqueueHarness:
    return VirtqueueHarness()


class BlkHarness:
    DISK_BYTES = 64 << 10

    def __init__(self):
        self.mem = fuzz_memory()
        self.tmp = tempfile.TemporaryDirectory(prefix="exitless-fuzz-", dir=_tmpdir())
        path, ro_path = (os.path.join(self.tmp.name, name) for name in ("disk.img", "ro.img"))
        for p in (path, ro_path):       # two images: the writer's image lock keeps a reader off its image
            with open(p, "wb") as f:
                f.truncate(self.DISK_BYTES)
        self.rw = VirtioBlk(path, queue_size=16, serial="fuzz")
        self.ro = VirtioBlk(ro_path, read_only=True, queue_size=16)
        self.path = path
        self.requests = 0
        self.check_ring = None

    def run(self, data: bytes) -> None:
        inp, mem = FuzzInput(data), self.mem
        clear(mem)
        dev = self.ro if inp.u8() & 0x80 else self.rw
        features = (dev.device_features() & inp.u64()) | (1 << VIRTIO_F_VERSION_1)
        q = Virtqueue(mem, dev.queue_max_size)
        q.size = 1 << (inp.u8() % 5)
        q.desc_addr, q.avail_addr, q.used_addr, q.ready = DESC, AVAIL, USED, True
        fill_rings(mem, inp, q.size)
        dev.activate(mem, [q], features, lambda i: None)
        try:
            for _ in range(1 + inp.u8() % 4):
                self.requests += dev.handle_queue(0)
                mem.write(AVAIL + 2, inp.take(2))      # more requests (or a wild avail.idx)
        finally:
            dev.reset()
        if dev.internal_errors:
            raise InvariantViolation(f"virtio-blk raised internally {dev.internal_errors} times (see the log)")

    def check(self) -> None:
        dev, mem = self.rw, self.mem
        if os.stat(self.path).st_size != self.DISK_BYTES:
            raise InvariantViolation("the disk image changed size")
        q = Virtqueue(mem, dev.queue_max_size)
        ring = DriverRing(mem, CHECK_RING, 4)
        q.size, q.desc_addr, q.avail_addr, q.used_addr, q.ready = 4, ring.desc, ring.avail, ring.used, True
        dev.activate(mem, [q], dev.device_features(), lambda i: None)
        try:
            hdr, data, status = CHECK_BUF, CHECK_BUF + 0x40, CHECK_BUF + 0x30
            payload = os.urandom(512)
            for rtype, buf in ((VIRTIO_BLK_T_OUT, payload), (VIRTIO_BLK_T_IN, None), (VIRTIO_BLK_T_FLUSH, None),
                               (VIRTIO_BLK_T_GET_ID, None)):
                mem.write(hdr, struct.pack("<IIQ", rtype, 0, 7))
                mem.write_u8(status, 0xFF)
                bufs = [(hdr, 16, False)]
                if rtype == VIRTIO_BLK_T_OUT:
                    mem.write(data, buf)
                    bufs.append((data, 512, False))
                elif rtype == VIRTIO_BLK_T_IN:
                    mem.fill(data, 512)
                    bufs.append((data, 512, True))
                elif rtype == VIRTIO_BLK_T_GET_ID:
                    bufs.append((data, 20, True))
                ring.offer(bufs + [(status, 1, True)])
                dev.handle_queue(0)
                if mem.read_u8(status) != VIRTIO_BLK_S_OK or len(ring.used_elements()) != 1:
                    raise InvariantViolation(f"a valid request (type {rtype}) failed: status "
                                             f"{mem.read_u8(status)}, needs_reset={dev.needs_reset}")
                if rtype == VIRTIO_BLK_T_IN and mem.read(data, 512) != payload:
                    raise InvariantViolation("a sector read back differs from what was written")
        finally:
            dev.reset()

    def counters(self) -> dict:
        return {"refused": self.mem.refused, "requests": self.requests}


def make_virtio_blk() -> BlkHarness:
    return BlkHarness()


# -- seed inputs (python3 -m exitless.fuzz --make-seeds writes them to corpus/) --------------------
_D = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


def _ring_bytes(size: int, descs: list[tuple[int, int, int, int]], heads: list[int]) -> bytes:
    table = b"".join(_D.pack(*d) for d in descs).ljust(16 * size, b"\0")
    avail = struct.pack("<HH", 0, len(heads)) + b"".join(struct.pack("<H", h) for h in heads).ljust(2 * size, b"\0")
    return table + avail + b"\0\0"


def _heap(data: bytes) -> bytes:
    return struct.pack("<H", len(data)) + data


def seeds_virtqueue() -> list[bytes]:
    direct = _ring_bytes(4, [(HEAP, 16, F_NEXT, 1), (HEAP + 16, 64, F_WRITE, 0)], [0])
    indirect = _ring_bytes(4, [(HEAP, 32, F_INDIRECT, 0)], [0])
    table = _D.pack(HEAP + 0x100, 16, F_NEXT, 1) + _D.pack(0xFFF0, 0x40, F_WRITE, 0)   # straddles regions
    ops = bytes([0]) + struct.pack("<IHIH", 0, 16, 0, 64) + struct.pack("<I", 64) + bytes([1, 3, 2, 5])
    return [
        bytes([2, 0]) + struct.pack("<HH", 0, 0) + direct + _heap(b"") + ops,
        bytes([2, 3]) + struct.pack("<HH", 0, 0) + indirect + _heap(table) + ops,
        bytes([2, 1]) + struct.pack("<HH", 0xFFFF, 0xFFFF) + _ring_bytes(4, [(HEAP, 16, F_NEXT, 1), (HEAP + 16, 8, F_WRITE, 0)],
                                                                  [0, 0]) + _heap(b"") + ops + ops,
    ]


def seeds_virtio_blk() -> list[bytes]:
    out = []
    hdr, data, status = HEAP, HEAP + 0x200, HEAP + 0x1000
    for rtype, wdata in ((VIRTIO_BLK_T_IN, True), (VIRTIO_BLK_T_OUT, False), (VIRTIO_BLK_T_FLUSH, None),
                         (VIRTIO_BLK_T_GET_ID, True), (11, False), (13, False)):
        descs = [(hdr, 16, F_NEXT, 1)]
        if wdata is not None:
            n = 16 if rtype in (11, 13) else 1024
            descs.append((data, n, F_NEXT | (F_WRITE if wdata else 0), 2))
        descs.append((status, 1, F_WRITE, 0))
        body = struct.pack("<IIQ", rtype, 0, 3)
        if rtype in (11, 13):
            body = body.ljust(0x200, b"\0") + struct.pack("<QII", 8, 8, 1 if rtype == 13 else 0)
        out.append(bytes([0]) + struct.pack("<Q", (1 << 64) - 1) + bytes([2]) + _ring_bytes(4, descs, [0])
                   + _heap(body) + bytes([1]) + struct.pack("<H", 1))
    return out
