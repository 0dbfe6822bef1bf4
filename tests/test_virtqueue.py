"""Split virtqueue tests: a test driver plays the guest, laying out rings in a GuestMemory.

No KVM needed.  The ``Driver`` helper below is also used by tests/test_virtio_blk.py.
"""
from __future__ import annotations

import multiprocessing
import os
import struct
import time
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exitless.devices.virtio.constants import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
)
from exitless.devices.virtio.queue import (
    BARRIER_KIND,
    DescriptorChain,
    Virtqueue,
    VirtqueueError,
    full_barrier,
    vring_need_event,
)
from exitless.fdwait import wait_readable
from exitless.memory import GuestMemory, GuestMemoryError

MiB = 1 << 20
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


# ---------------------------------------------------------------------------
# the test driver
# ---------------------------------------------------------------------------
class Driver:
    """The guest side of one split virtqueue, written the way a guest driver would.

    Rings live at ``ring_base``; buffers and indirect tables come from a bump
    allocator over ``[heap, heap_end)`` that wraps around.
    """

    def __init__(self, mem: GuestMemory, size: int = 16, *, max_size: int | None = None,
                 event_idx: bool = False, indirect: bool = False, ring_base: int = 0x1000,
                 heap: int = 0x100000, heap_end: int = 0x800000, queue: Virtqueue | None = None):
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.desc = ring_base
        self.avail = self.desc + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        mem.fill(self.desc, self.used + 6 + 8 * size - self.desc)
        # Indices and flags shared with the (concurrent) device go through u16 views:
        # single 2-byte loads/stores, as a real driver's (struct.pack_into is not atomic).
        self._avail_h = mem.view(self.avail, 6 + 2 * size).cast("H")
        self._used_h = mem.view(self.used, 6 + 8 * size).cast("H")
        self.heap_start = self.heap = heap
        self.heap_end = heap_end
        self.free: deque[int] = deque(range(size))
        self.chains: dict[int, list[int]] = {}
        self.avail_idx = 0
        self.kick_old = 0         # avail idx at the last kick decision
        self.last_used = 0
        self.kicks = 0
        q = queue if queue is not None else Virtqueue(mem, max_size or size)
        q.size, q.desc_addr, q.avail_addr, q.used_addr = size, self.desc, self.avail, self.used
        q.event_idx, q.indirect, q.ready = event_idx, indirect, True
        q.validate()
        self.q = q

    # -- memory -------------------------------------------------------------------
    def alloc(self, n: int, align: int = 16) -> int:
        gpa = (self.heap + align - 1) & ~(align - 1)
        if gpa + n > self.heap_end:
            gpa = (self.heap_start + align - 1) & ~(align - 1)
        self.heap = gpa + n
        return gpa

    def put_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    # -- offering buffers -------------------------------------------------------------
    def add(self, out=(), in_=(), *, indirect: bool = False, publish: bool = True, align: int = 16):
        """Offer a chain: ``out`` device-readable buffers (bytes), ``in_`` writable sizes.

        Returns ``(head, [gpa of each writable buffer])``.
        """
        bufs = []
        for data in out:
            gpa = self.alloc(len(data), align)
            self.mem.write(gpa, data)
            bufs.append((gpa, len(data), 0))
        in_gpas = []
        for n in in_:
            gpa = self.alloc(n, align)
            self.mem.fill(gpa, n, 0xEE)
            bufs.append((gpa, n, WRITE))
            in_gpas.append(gpa)
        if indirect:
            table = self.alloc(16 * len(bufs))
            for i, (gpa, n, f) in enumerate(bufs):
                self.put_desc(i, gpa, n, f | (NEXT if i + 1 < len(bufs) else 0), i + 1, table=table)
            head = self.free.popleft()
            self.put_desc(head, table, 16 * len(bufs), INDIRECT)
            self.chains[head] = [head]
        else:
            idxs = [self.free.popleft() for _ in bufs]
            for k, (i, (gpa, n, f)) in enumerate(zip(idxs, bufs)):
                last = k + 1 == len(idxs)
                self.put_desc(i, gpa, n, f | (0 if last else NEXT), 0 if last else idxs[k + 1])
            head = idxs[0]
            self.chains[head] = idxs
        self.offer(head, publish=publish)
        return head, in_gpas

    def offer(self, head: int, publish: bool = True) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self) -> bool:
        """Expose new entries (avail.idx), then decide whether to kick, like a driver does."""
        self._avail_h[1] = self.avail_idx
        full_barrier()
        if self.event_idx:
            event = self._used_h[2 + 4 * self.size]
            kick = vring_need_event(event, self.avail_idx, self.kick_old)
        else:
            kick = not (self._used_h[0] & VRING_USED_F_NO_NOTIFY)
        self.kick_old = self.avail_idx
        self.kicks += kick
        return kick

    # -- used ring --------------------------------------------------------------------
    def used_idx(self) -> int:
        return self._used_h[1]

    def get_used(self) -> list[tuple[int, int]]:
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            i, n = struct.unpack("<II", self.mem.read(self.used + 4 + 8 * (self.last_used % self.size), 8))
            out.append((i, n))
            self.free.extend(self.chains.pop(i, ()))  # raw (put_desc/offer) chains are not tracked
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def set_used_event(self, value: int) -> None:
        self._avail_h[2 + self.size] = value

    def set_no_interrupt(self, on: bool) -> None:
        self._avail_h[0] = VRING_AVAIL_F_NO_INTERRUPT if on else 0


@pytest.fixture
def mem():
    m = GuestMemory.create([(0, 16 * MiB)])
    yield m
    m.close()


def _in_ram(mem: GuestMemory, view: memoryview) -> bool:
    return any(view.obj is m for m in mem._maps)


# ---------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------
def _geom(mem, size=16, desc=0x1000, avail=0x2000, used=0x3000, evt=False, max_size=256):
    q = Virtqueue(mem, max_size)
    q.size, q.desc_addr, q.avail_addr, q.used_addr, q.event_idx = size, desc, avail, used, evt
    return q


def test_validate_accepts_good_geometry(mem):
    q = _geom(mem)
    q.validate()
    assert q.configured and not q.has_work() and q.pop() is None


@pytest.mark.parametrize("size", [0, 3, 100, 512, -1, 65536])
def test_validate_rejects_bad_size(mem, size):
    with pytest.raises(VirtqueueError):
        _geom(mem, size=size).validate()


def test_constructor_rejects_bad_max_size(mem):
    for bad in (0, 3, 65536):
        with pytest.raises(ValueError):
            Virtqueue(mem, bad)


@pytest.mark.parametrize("field,value", [
    ("desc_addr", 0x1008),            # descriptor table must be 16-aligned
    ("avail_addr", 0x2001),           # avail ring 2-aligned
    ("used_addr", 0x3002),            # used ring 4-aligned
    ("desc_addr", 16 * MiB),          # outside RAM
    ("desc_addr", 16 * MiB - 16 * 8), # straddles the end of RAM
    ("avail_addr", 16 * MiB - 4),
    ("used_addr", 16 * MiB - 4),
    ("used_addr", 1 << 63),
    ("avail_addr", -2),
])
def test_validate_rejects_bad_areas(mem, field, value):
    q = _geom(mem)
    setattr(q, field, value)
    with pytest.raises(VirtqueueError):
        q.validate()
    assert not q.configured and q.pop() is None and not q.has_work()


def test_validate_event_idx_needs_trailing_fields(mem):
    # Without EVENT_IDX a used ring ending exactly at the end of RAM is fine; with it,
    # avail_event (2 more bytes) would be outside.
    size = 16
    used = 16 * MiB - (4 + 8 * size)
    _geom(mem, used=used).validate()
    with pytest.raises(VirtqueueError):
        _geom(mem, used=used, evt=True).validate()


def test_unconfigured_queue_is_inert(mem):
    q = Virtqueue(mem, 16)
    assert q.pop() is None and not q.has_work() and not q.should_signal()
    assert q.enable_notifications() is False
    with pytest.raises(VirtqueueError):
        q.push(0, 0)


# ---------------------------------------------------------------------------
# normal operation
# ---------------------------------------------------------------------------
def test_simple_chain_zero_copy(mem):
    d = Driver(mem)
    head, (ingpa,) = d.add([b"hello", b" world"], [8])
    q = d.q
    assert q.has_work()
    c = q.pop()
    assert isinstance(c, DescriptorChain) and c.error is None
    assert c.head == head
    assert [s[2] for s in c.segments] == [False, False, True]
    assert c.readable_len == 11 and c.writable_len == 8 and c.total_len == 19
    assert b"".join(c.readable_views()) == b"hello world"
    assert c.read(3, 5) == b"lo wo"
    # writable views are windows on guest RAM: writing them writes the guest buffer
    (w,) = c.writable_views()
    w[:3] = b"abc"
    assert mem.read(ingpa, 3) == b"abc"
    assert c.write(5, b"xyz") == 3
    assert mem.read(ingpa, 8) == b"abc\xee\xeexyz"
    assert all(_in_ram(mem, v) for v in c.readable_views() + c.writable_views())
    assert q.pop() is None and not q.has_work()
    q.push(head, 8)
    assert d.get_used() == [(head, 8)]
    assert q.used_idx == 1 and q.last_avail_idx == 1


def test_stream_helpers_span_descriptors(mem):
    d = Driver(mem)
    d.add([b"ab", b"cdef", b"g"], [3, 2, 4])
    c = d.q.pop()
    assert c.read(1, 5) == b"bcdef"
    assert [bytes(v) for v in c.readable(1, 5)] == [b"b", b"cdef"]
    assert [len(v) for v in c.writable(2, 4)] == [1, 2, 1]
    c.write(0, b"123456789")
    assert b"".join(bytes(v) for v in c.writable_views()) == b"123456789"
    with pytest.raises(ValueError):
        c.read(5, 3)
    with pytest.raises(ValueError):
        c.write(8, b"xx")


def test_zero_length_descriptors_are_dropped(mem):
    d = Driver(mem)
    d.put_desc(0, 0x200000, 4, NEXT, 1)
    d.put_desc(1, 0xdead_beef_0000, 0, NEXT, 2)   # zero length: no buffer, address irrelevant
    d.put_desc(2, 0x200010, 2, WRITE)
    d.offer(0)
    c = d.q.pop()
    assert c.error is None and len(c.segments) == 2 and c.readable_len == 4 and c.writable_len == 2


def test_indirect_chain(mem):
    d = Driver(mem, indirect=True)
    head, (g,) = d.add([b"hdr", b"payload"], [1], indirect=True)
    c = d.q.pop()
    assert c.error is None and c.head == head
    assert c.read(0, 10) == b"hdrpayload" and c.writable_len == 1
    c.write(0, b"\x07")
    assert mem.read_u8(g) == 7


def test_direct_descriptors_followed_by_indirect(mem):
    # spec 2.7.5.3.2: zero or more direct descriptors followed by one indirect one
    d = Driver(mem, indirect=True)
    table = 0x300000
    d.put_desc(0, 0x200100, 2, WRITE, 0, table=table)
    d.put_desc(3, 0x200000, 4, NEXT, 5)
    d.put_desc(5, table, 16, INDIRECT)
    mem.write(0x200000, b"abcd")
    d.offer(3)
    c = d.q.pop()
    assert c.error is None and c.read(0, 4) == b"abcd" and c.writable_len == 2


def test_buffer_spanning_adjacent_regions_is_split(mem):
    end = 16 * MiB
    mem.add_region(end, 4096)                 # RAM continues at 16 MiB in a second mapping
    d = Driver(mem)
    d.put_desc(0, end - 8, 16, WRITE)
    d.offer(0)
    c = d.q.pop()
    assert c.error is None and c.writable_len == 16
    assert [(g, n) for g, n, _ in c.segments] == [(end - 8, 8), (end, 8)]
    c.write(0, bytes(range(16)))
    assert mem.read(end - 8, 8) == bytes(range(8)) and mem.read(end, 8) == bytes(range(8, 16))


def test_buffers_in_a_second_region_and_in_the_hole():
    m = GuestMemory.create([(0, 2 * MiB), (1 << 32, MiB)])     # low RAM, PCI hole, high RAM
    try:
        d = Driver(m, heap=0x100000, heap_end=0x200000)
        d.put_desc(0, (1 << 32) + 0x100, 64, NEXT, 1)          # high RAM: fine
        d.put_desc(1, 0xC000_0000, 16, WRITE)                  # in the hole: bad buffer
        d.offer(0)
        c = d.q.pop()
        assert c.error and "outside guest RAM" in c.error
        m.write((1 << 32) + 0x100, b"high")
        assert c.read(0, 4) == b"high"
        d.put_desc(2, 2 * MiB - 8, 16, WRITE)                  # runs off low RAM into the hole
        d.offer(2)
        assert d.q.pop().error
    finally:
        m.close()


def test_validate_restates_disabled_notifications(mem):
    d = Driver(mem)
    q = d.q
    q.disable_notifications()
    q.validate()                                              # e.g. re-validated at DRIVER_OK
    assert mem.read_u16(d.used) == VRING_USED_F_NO_NOTIFY and not q.notifications_enabled
    q.enable_notifications()
    q.validate()
    assert mem.read_u16(d.used) == 0


def test_wraparound_over_65536_requests(mem):
    d = Driver(mem, size=8)
    q = d.q
    for i in range(70_000):
        payload = struct.pack("<I", i)
        head, _ = d.add([payload], [4], publish=False)
        if i % 3 == 0:
            head2, _ = d.add([payload], [4], publish=False)
        d.publish()
        while (c := q.pop()) is not None:
            assert c.error is None and c.read(0, 4) == payload
            c.write(0, payload)
            q.push(c.head, 4)
        assert d.get_used()
        assert not d.chains
    assert q.last_avail_idx == d.avail_idx == q.used_idx == d.used_idx()
    assert d.avail_idx == (70_000 + 23_334) & 0xFFFF


def test_set_vring_base_resume(mem):
    """vhost-user style: a queue resumed from saved indices continues where the old one stopped."""
    d = Driver(mem, size=16)
    for _ in range(5):
        d.add([b"x"], [1])
    q = d.q
    for _ in range(3):
        c = q.pop()
        q.push(c.head, 1)
    saved_avail, saved_used = q.last_avail_idx, q.used_idx
    q2 = Virtqueue(mem, 16)
    q2.size, q2.desc_addr, q2.avail_addr, q2.used_addr = 16, d.desc, d.avail, d.used
    q2.validate()
    q2.last_avail_idx = saved_avail
    q2.used_idx = q2.ring_used_idx()
    assert q2.used_idx == saved_used
    assert q2.ring_avail_idx() == 5
    heads = [q2.pop().head for _ in range(2)]
    assert q2.pop() is None and len(heads) == 2


# ---------------------------------------------------------------------------
# malformed rings: VirtqueueError
# ---------------------------------------------------------------------------
def _broken(d: Driver, match: str):
    with pytest.raises(VirtqueueError, match=match):
        d.q.pop()
    assert d.q.broken and not d.q.has_work()
    with pytest.raises(VirtqueueError):
        d.q.pop()               # stays broken
    d.q.reset()
    assert not d.q.broken and not d.q.configured


def test_head_index_out_of_range(mem):
    d = Driver(mem, size=16)
    d.offer(16)
    _broken(d, "head index")


def test_next_index_out_of_range(mem):
    d = Driver(mem, size=16)
    d.put_desc(0, 0x200000, 8, NEXT, 40)
    d.offer(0)
    _broken(d, "next index")


@pytest.mark.parametrize("links", [[0], [0, 1], [2, 5, 7, 5]])
def test_descriptor_loop(mem, links):
    d = Driver(mem, size=8)
    # build a chain following `links`, with the last link pointing back at an earlier one
    for a, b in zip(links, links[1:] + [links[0] if len(links) < 4 else 5]):
        d.put_desc(a, 0x200000, 8, NEXT, b)
    d.offer(links[0])
    _broken(d, "loop")


def test_avail_idx_jump_larger_than_size(mem):
    d = Driver(mem, size=8)
    mem.write_u16(d.avail + 2, 9)
    _broken(d, "avail idx jumped")


def test_avail_idx_jump_backwards(mem):
    d = Driver(mem, size=8)
    for _ in range(3):
        d.add([b"x"], [1])
    for _ in range(3):
        d.q.pop()
    mem.write_u16(d.avail + 2, 1)          # "un-exposing" buffers: looks like a jump of 65534
    _broken(d, "avail idx jumped")


def test_indirect_not_negotiated(mem):
    d = Driver(mem, indirect=False)
    d.put_desc(0, 0x300000, 16, INDIRECT)
    d.offer(0)
    _broken(d, "not negotiated")


def test_nested_indirect(mem):
    d = Driver(mem, indirect=True)
    d.put_desc(0, 0x300100, 16, INDIRECT, table=0x300000)
    d.put_desc(0, 0x300000, 16, INDIRECT)
    d.offer(0)
    _broken(d, "nested")


def test_indirect_with_next(mem):
    d = Driver(mem, indirect=True)
    d.put_desc(0, 0x300000, 16, INDIRECT | NEXT, 1)
    d.offer(0)
    _broken(d, "INDIRECT and NEXT")


@pytest.mark.parametrize("length", [0, 8, 24])
def test_indirect_bad_length(mem, length):
    d = Driver(mem, indirect=True)
    d.put_desc(0, 0x300000, length, INDIRECT)
    d.offer(0)
    _broken(d, "multiple of 16")


@pytest.mark.parametrize("addr", [16 * MiB - 16, 1 << 40, 0xFFFF_FFFF_FFFF_FFF0])
def test_indirect_table_outside_ram(mem, addr):
    d = Driver(mem, indirect=True)
    d.put_desc(0, addr, 32, INDIRECT)
    d.offer(0)
    _broken(d, "outside guest RAM")


def test_indirect_next_out_of_table(mem):
    d = Driver(mem, indirect=True)
    d.put_desc(0, 0x200000, 4, NEXT, 2, table=0x300000)   # table has 2 entries
    d.put_desc(0, 0x300000, 32, INDIRECT)
    d.offer(0)
    _broken(d, "indirect table")


def test_indirect_loop(mem):
    d = Driver(mem, indirect=True)
    d.put_desc(0, 0x200000, 4, NEXT, 1, table=0x300000)
    d.put_desc(1, 0x200000, 4, NEXT, 0, table=0x300000)
    d.put_desc(0, 0x300000, 32, INDIRECT)
    d.offer(0)
    _broken(d, "loop")


def test_indirect_chain_longer_than_max_size(mem):
    d = Driver(mem, size=8, max_size=8, indirect=True)
    table = 0x300000
    n = 9
    for i in range(n):
        d.put_desc(i, 0x200000, 4, NEXT if i + 1 < n else 0, i + 1, table=table)
    d.put_desc(0, table, 16 * n, INDIRECT)
    d.offer(0)
    _broken(d, "more than 8 descriptors")


def test_indirect_chain_up_to_max_size_is_accepted(mem):
    # the driver chose a ring smaller than the device maximum; indirect chains may still be max_size long
    d = Driver(mem, size=4, max_size=16, indirect=True)
    table = 0x300000
    for i in range(16):
        d.put_desc(i, 0x200000 + 8 * i, 8, NEXT if i < 15 else WRITE, i + 1, table=table)
    d.put_desc(0, table, 16 * 16, INDIRECT)
    d.offer(0)
    c = d.q.pop()
    assert c.error is None and c.readable_len == 15 * 8 and c.writable_len == 8


def test_reset_clears_state(mem):
    d = Driver(mem)
    d.add([b"x"], [1])
    d.q.pop()
    d.q.disable_notifications()
    d.q.reset()
    assert (d.q.last_avail_idx, d.q.used_idx, d.q.configured, d.q.ready) == (0, 0, False, False)
    assert d.q.notifications_enabled and d.q.size == d.q.max_size


# ---------------------------------------------------------------------------
# bad buffers in well-formed chains: DescriptorChain.error
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("addr,length", [
    (16 * MiB, 1),                       # just past RAM
    (16 * MiB - 4, 8),                   # straddles the end
    (0xFFFF_FFFF_FFFF_FFFF, 2),          # wraps a 64-bit address
    (0x1000_0000_0000, 512),
    (0x1000, 0xFFFF_FFFF),               # huge length
])
def test_buffer_outside_ram(mem, addr, length):
    d = Driver(mem)
    d.put_desc(0, 0x200000, 16, NEXT, 1)
    d.put_desc(1, addr, length, WRITE | NEXT, 2)
    d.put_desc(2, 0x200100, 1, WRITE)
    d.offer(0)
    c = d.q.pop()
    assert c.error and "outside guest RAM" in c.error
    assert c.segments[1] == (addr, length, True)
    assert c.read(0, 16) == mem.read(0x200000, 16)        # the good readable part is usable
    with pytest.raises(GuestMemoryError):
        c.writable_views()
    with pytest.raises(GuestMemoryError):
        c.write(0, b"x")
    # the last writable byte (a status byte, say) is in a good buffer and can be written
    c.write(c.writable_len - 1, b"\x01")
    assert mem.read_u8(0x200100) == 1
    assert not d.q.broken
    d.q.push(c.head, 1)
    assert d.get_used() == [(0, 1)]


def test_readable_after_writable_is_flagged(mem):
    d = Driver(mem)
    d.put_desc(0, 0x200000, 4, WRITE | NEXT, 1)
    d.put_desc(1, 0x200010, 4, NEXT, 2)
    d.put_desc(2, 0x200020, 1, WRITE)
    d.offer(0)
    c = d.q.pop()
    assert c.error == "device-readable buffer after a device-writable one"


def test_chain_longer_than_4GiB_is_flagged():
    m = GuestMemory.create([(0, 16 * MiB)])
    try:
        d = Driver(m, size=4096, heap=0, heap_end=0)
        # 4096 descriptors all pointing at the same 1 MiB of RAM = 4 GiB total
        for i in range(4096):
            d.put_desc(i, 8 * MiB, MiB, NEXT if i < 4095 else 0, i + 1)
        d.offer(0)
        c = d.q.pop()
        assert c.error == "chain is longer than 2**32 bytes"
    finally:
        m.close()


# ---------------------------------------------------------------------------
# used-buffer notifications (should_signal)
# ---------------------------------------------------------------------------
def _complete(d: Driver, n: int) -> None:
    for _ in range(n):
        d.add([b"x"], [1])
    for _ in range(n):
        c = d.q.pop()
        d.q.push(c.head, 1)
    d.get_used()


def test_should_signal_without_event_idx(mem):
    d = Driver(mem)
    assert not d.q.should_signal()           # nothing pushed
    _complete(d, 1)
    assert d.q.should_signal()
    assert not d.q.should_signal()           # already handled
    d.set_no_interrupt(True)
    _complete(d, 2)
    assert not d.q.should_signal()
    d.set_no_interrupt(False)
    _complete(d, 1)
    assert d.q.should_signal()


def test_should_signal_event_idx(mem):
    d = Driver(mem, size=16, event_idx=True)
    q = d.q
    d.set_no_interrupt(True)                 # must be ignored with EVENT_IDX
    d.set_used_event(0)
    _complete(d, 1)
    assert q.should_signal()                 # entry written at used idx 0 == used_event
    d.set_used_event(5)
    _complete(d, 3)                          # used idx 1..3 -> 4: entries at 1,2,3
    assert not q.should_signal()
    _complete(d, 1)                          # entry at 4
    assert not q.should_signal()
    _complete(d, 1)                          # entry at 5 == used_event -> notify
    assert q.should_signal()
    _complete(d, 2)                          # 6, 7: past the event
    assert not q.should_signal()
    d.set_used_event(8)
    _complete(d, 4)                          # batch 8..11 crosses 8
    assert q.should_signal()


def test_should_signal_event_idx_first_call_after_resume(mem):
    d = Driver(mem, event_idx=True)
    d.set_used_event(100)
    _complete(d, 1)
    assert d.q.should_signal()               # nothing known about the driver's state yet: signal
    _complete(d, 1)
    assert not d.q.should_signal()
    d.q.used_idx = d.q.used_idx              # vhost-user SET_VRING_BASE style: forget history
    _complete(d, 1)
    assert d.q.should_signal()


def test_should_signal_event_idx_wraps(mem):
    d = Driver(mem, size=8, event_idx=True)
    q = d.q
    # run the used index up to 0xFFFE
    for _ in range(0xFFFE // 4):
        _complete(d, 4)
    _complete(d, 0xFFFE % 4)
    q.should_signal()
    assert q.used_idx == 0xFFFE
    d.set_used_event(0xFFFF)
    _complete(d, 3)                          # entries at 0xFFFE, 0xFFFF, 0x0000
    assert q.should_signal()
    d.get_used()
    d.set_used_event(0x0002)
    _complete(d, 2)                          # entries at 1, 2
    assert q.should_signal()


@given(event=st.integers(0, 0xFFFF), old=st.integers(0, 0xFFFF), n=st.integers(0, 32768))
def test_vring_need_event_matches_definition(event, old, n):
    new = (old + n) & 0xFFFF
    crossed = any(((old + k) & 0xFFFF) == event for k in range(n))
    assert vring_need_event(event, new, old) == crossed


# ---------------------------------------------------------------------------
# available-buffer notifications (kicks) and the lost-wake-up rule
# ---------------------------------------------------------------------------
def _drain(q: Virtqueue) -> int:
    n = 0
    while (c := q.pop()) is not None:
        q.push(c.head, 0)
        n += 1
    return n


def test_notifications_without_event_idx(mem):
    d = Driver(mem)
    q = d.q
    _, _ = d.add([b"a"], [1])
    assert d.kicks == 1                              # enabled by default
    q.disable_notifications()
    assert mem.read_u16(d.used) == VRING_USED_F_NO_NOTIFY
    d.add([b"b"], [1])
    assert d.kicks == 1                              # suppressed
    _drain(q)
    d.get_used()
    # race: the driver adds a buffer while notifications are still disabled
    d.add([b"c"], [1])
    assert d.kicks == 1
    assert q.enable_notifications() is True         # ... so the device must see it on re-enable
    assert mem.read_u16(d.used) == 0
    _drain(q)
    assert q.enable_notifications() is False        # now empty: safe to sleep
    d.add([b"d"], [1])
    assert d.kicks == 2                              # and the next buffer kicks


def test_notifications_event_idx(mem):
    d = Driver(mem, size=8, event_idx=True)
    q = d.q
    d.add([b"a"], [1])
    assert d.kicks == 1                              # validate() published avail_event = 0
    q.disable_notifications()
    # a polling device: the driver must never be asked to kick, across index wrap-around
    for i in range(70_000):
        d.add([b"x"], [1])
        _drain(q)
        d.get_used()
    assert d.kicks == 1
    # race: buffer added while disabled, then enable -> True
    d.add([b"y"], [1])
    assert d.kicks == 1
    assert q.enable_notifications() is True
    assert mem.read_u16(d.used + 4 + 8 * d.size) == q.last_avail_idx
    _drain(q)
    d.get_used()
    assert q.enable_notifications() is False
    d.add([b"z"], [1])
    assert d.kicks == 2


def test_event_idx_enabled_mode_keeps_avail_event_current(mem):
    """A backend that never toggles notifications still gets a kick for every new batch."""
    d = Driver(mem, size=8, event_idx=True)
    q = d.q
    for i in range(70_000):
        assert d.add([b"x"], [1])[0] is not None
        assert d.kicks == i + 1
        _drain(q)
        d.get_used()


def _device_proc(mem, geom, n, kick_r, call_w, event_idx, result_w):
    """Child process: a sidecore that polls a little, then sleeps on the kick pipe."""
    size, desc, avail, used = geom
    q = Virtqueue(mem, size)
    q.size, q.desc_addr, q.avail_addr, q.used_addr, q.event_idx = size, desc, avail, used, event_idx
    q.validate()
    done = 0
    status = b"ok"
    try:
        while done < n:
            q.disable_notifications()
            while (c := q.pop()) is not None:
                c.write(0, c.read(0, 4))
                q.push(c.head, 4)
                done += 1
            if q.should_signal():
                os.write(call_w, b"c")
            if done >= n:
                break
            if q.enable_notifications():
                continue
            if not wait_readable(kick_r, 10.0):
                status = (f"lost wake-up: device asleep with {done}/{n} done, last_avail={q.last_avail_idx}, "
                          f"avail={q.ring_avail_idx()}, used={q.used_idx}").encode()
                break
            os.read(kick_r, 4096)
    except Exception as e:  # pragma: no cover - reported to the parent
        status = repr(e).encode()
    os.write(result_w, status)
    os._exit(0)


@pytest.mark.parametrize("event_idx", [False, True])
def test_no_lost_wakeups_across_processes(mem, event_idx):
    """Driver (this process) and device (a forked child) race on real CPUs.

    Both sides use the publish / full barrier / re-check protocol; a lost
    wake-up shows up as both sides asleep (a 10 s timeout).
    """
    n = 20000
    d = Driver(mem, size=8, event_idx=event_idx)
    kick_r, kick_w = os.pipe()
    call_r, call_w = os.pipe()
    res_r, res_w = os.pipe()
    os.set_blocking(kick_w, False)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_device_proc,
                    args=(mem, (d.size, d.desc, d.avail, d.used), n, kick_r, call_w, event_idx, res_w))
    p.start()
    try:
        sent = completed = 0
        deadline = time.monotonic() + 60
        while completed < n:
            assert time.monotonic() < deadline
            progressed = False
            while sent < n and d.free:
                d.add([struct.pack("<I", sent)], [4], publish=False)
                sent += 1
                progressed = True
            if progressed and d.publish():
                try:
                    os.write(kick_w, b"k")
                except BlockingIOError:
                    pass
            got = d.get_used()
            completed += len(got)
            if got or (sent < n and d.free):
                continue
            # nothing to do: enable used-buffer notifications, fence, re-check, then sleep
            if event_idx:
                d.set_used_event(d.last_used)
            else:
                d.set_no_interrupt(False)
            full_barrier()
            if d.used_idx() != d.last_used:
                continue
            assert wait_readable(call_r, 10.0), f"driver asleep with {completed}/{n} completed, device used={d.used_idx()}"
            os.read(call_r, 4096)
        res = os.read(res_r, 4096)
        assert res == b"ok", f"{res.decode()} (driver: {completed} completed, {sent} sent)"
    finally:
        p.join(15)
        if p.is_alive():
            p.kill()
        for fd in (kick_r, kick_w, call_r, call_w, res_r, res_w):
            os.close(fd)


_SEEN_GPA = 0x900000      # the reader publishes how far it has read (u32, stored whole)
_AHEAD_MAX = 0x4000      # the pusher never runs further ahead: a descheduled reader cannot see a wrap


def _pusher_proc(mem, geom, n):
    size, desc, avail, used = geom
    q = Virtqueue(mem, size)
    q.size, q.desc_addr, q.avail_addr, q.used_addr = size, desc, avail, used
    q.validate()
    for i in range(n):
        while i - mem.read_u32(_SEEN_GPA) >= _AHEAD_MAX:
            time.sleep(0)
        q.push(0, 0)
    os._exit(0)


def test_used_idx_is_never_seen_torn(mem):
    """The driver reads used.idx while the device (another process) bumps it: every value it
    sees must be a real one (a byte-wise store would expose e.g. 0x0100 between 0x01FF and 0x0200)."""
    d = Driver(mem, size=8)
    n = 200_000
    mem.write_u32(_SEEN_GPA, 0)
    p = multiprocessing.get_context("fork").Process(target=_pusher_proc,
                                                     args=(mem, (d.size, d.desc, d.avail, d.used), n))
    p.start()
    try:
        prev, seen, reads = 0, 0, 0
        while seen < n:
            v = d.used_idx()
            delta = (v - prev) & 0xFFFF
            assert delta < 0x8000, f"used.idx went from {prev:#06x} to {v:#06x}"
            seen += delta
            prev = v
            reads += 1
            mem.write_u32(_SEEN_GPA, seen)
        assert seen == n
    finally:
        p.join(30)


def test_full_barrier_kinds():
    from exitless.devices.virtio import queue as qmod
    full_barrier()
    assert BARRIER_KIND in ("extension-seq-cst-fence", "native-lock-or", "native-dmb", "lock-rmw")
    if qmod._MACHINE in ("x86_64", "amd64", "aarch64", "arm64"):
        stub = qmod._native_fence()      # the no-build fallback: a fence instruction in an executable page
        assert stub is not None
        for _ in range(1000):
            stub()
    qmod._lock_fence()()


# ---------------------------------------------------------------------------
# property test: random rings
# ---------------------------------------------------------------------------
RAM = 64 * 1024
RING_SIZE = 8
HEAP = 0x4000        # indirect tables (random descriptors) live here; buffers point around it
TABLE_ENTRIES = 32
_near_heap = st.integers(HEAP, HEAP + 0x1000)
_addr = st.one_of(
    _near_heap, _near_heap,
    st.integers(RAM - 64, RAM + 64),                       # around the end of RAM
    st.sampled_from([0, HEAP, RAM - 16, RAM, 0xFFFF_FFFF_FFFF_FFF0, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)
_len = st.one_of(st.integers(0, 64), st.sampled_from([1, 16, 32, 48, 128, RAM, 0xFFFF_FFFF]),
                 st.integers(0, 2**32 - 1))
_flags = st.sampled_from([0, NEXT, WRITE, NEXT | WRITE] * 4 + [INDIRECT, INDIRECT | NEXT, 8, 0xFFFF])
_desc = st.tuples(_addr, _len, _flags,
                  st.integers(0, 5).flatmap(lambda k: st.integers(0, 0xFFFF) if k == 0 else st.integers(0, RING_SIZE)))
# a descriptor pointing at (part of) the indirect-table area
_ind_desc = st.tuples(st.integers(0, TABLE_ENTRIES - 1).map(lambda k: HEAP + 16 * k),
                      st.integers(1, 8).map(lambda m: 16 * m) | _len,
                      st.sampled_from([INDIRECT, INDIRECT | WRITE, INDIRECT | NEXT]), st.integers(0, RING_SIZE))
_table_desc = st.tuples(_addr, _len, _flags,
                        st.integers(0, 5).flatmap(lambda k: st.integers(0, 0xFFFF) if k == 0 else st.integers(0, 8)))


_PROP_MEM: list[GuestMemory] = []


def _prop_mem() -> GuestMemory:
    if not _PROP_MEM:
        _PROP_MEM.append(GuestMemory.create([(0, RAM)]))
    return _PROP_MEM[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    descs=st.lists(st.integers(0, 4).flatmap(lambda k: _ind_desc if k == 0 else _desc),
                   min_size=RING_SIZE, max_size=RING_SIZE),
    table=st.lists(st.integers(0, 8).flatmap(lambda k: _ind_desc if k == 0 else _table_desc),
                   min_size=TABLE_ENTRIES, max_size=TABLE_ENTRIES),
    ring=st.lists(st.integers(0, RING_SIZE - 1), min_size=RING_SIZE, max_size=RING_SIZE),
    bad_head=st.none() | st.tuples(st.integers(0, RING_SIZE - 1), st.integers(0, 0xFFFF)),
    avail_idx=st.integers(0, RING_SIZE) | st.integers(0, 0xFFFF),
    indirect=st.integers(0, 3).map(bool),
    max_size=st.sampled_from([RING_SIZE, 4 * RING_SIZE]),
)
def test_pop_never_escapes_ram(descs, table, ring, bad_head, avail_idx, indirect, max_size):
    """Random rings: pop() returns None, a chain inside RAM (or flagged bad), or raises VirtqueueError."""
    if bad_head is not None:
        ring[bad_head[0]] = bad_head[1]
    m = _prop_mem()
    m.fill(0, RAM)
    if True:
        for i, (a, n, f, nx) in enumerate(table):
            m.write(HEAP + 16 * i, struct.pack("<QIHH", a, n, f, nx))
        q = Virtqueue(m, max_size)
        q.size, q.desc_addr, q.avail_addr, q.used_addr = RING_SIZE, 0x1000, 0x2000, 0x3000
        q.indirect = indirect
        q.validate()
        for i, (a, n, f, nx) in enumerate(descs):
            m.write(0x1000 + 16 * i, struct.pack("<QIHH", a, n, f, nx))
        for i, h in enumerate(ring):
            m.write_u16(0x2000 + 4 + 2 * i, h)
        m.write_u16(0x2002, avail_idx)
        for _ in range(RING_SIZE + 1):
            try:
                c = q.pop()
            except VirtqueueError:
                assert q.broken
                return
            if c is None:
                assert avail_idx == q.last_avail_idx
                return
            assert isinstance(c, DescriptorChain)
            assert 0 <= c.head < RING_SIZE
            assert len(c.segments) <= max_size
            assert c.readable_len == sum(n for _, n, w in c.segments if not w)
            assert c.writable_len == sum(n for _, n, w in c.segments if w)
            if c.error is None:
                for gpa, n, _ in c.segments:
                    assert n > 0 and m.contains(gpa, n)
                for v in c.readable_views() + c.writable_views():
                    assert _in_ram(m, v)
            else:
                assert any(not m.contains(g, n) for g, n, _ in c.segments) or "after" in c.error \
                    or "2**32" in c.error
            q.push(c.head, 0)
