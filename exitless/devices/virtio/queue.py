"""The device side of a VIRTIO 1.2 split virtqueue (spec §2.7), over checked guest memory.

One implementation for every virtio device and every transport: the built-in
virtio-pci transport and the vhost-user backend both construct a
:class:`Virtqueue`, fill in its geometry, call :meth:`Virtqueue.validate` and
then drive it with :meth:`pop` / :meth:`push` / :meth:`should_signal` and the
notification helpers.

Error model
-----------
The guest is untrusted.  Nothing it writes into a ring can make this code touch
host memory outside guest RAM (every access goes through
:class:`exitless.memory.GuestMemory`, which bounds-checks) or raise anything but
the two documented outcomes:

* :class:`VirtqueueError` -- the *ring* is broken and cannot be trusted any more:
  geometry invalid (:meth:`validate`), the available index moved by more than
  the queue size, a head or ``next`` index out of range, a loop, a chain of
  more than ``max_size`` buffer descriptors (see below), ``INDIRECT`` used
  without being negotiated, a nested indirect table, ``INDIRECT`` together with ``NEXT``, an indirect table
  whose length is zero or not a multiple of 16 or that lies outside RAM.  The
  queue marks itself :attr:`Virtqueue.broken` (further :meth:`pop` calls raise
  again, :meth:`has_work` is False) until :meth:`reset`; the device should set
  DEVICE_NEEDS_RESET (``VirtioDevice.handle_queue`` does).
* :attr:`DescriptorChain.error` (a string, else ``None``) -- the chain is
  structurally fine and was consumed from the ring, but one of its *buffers*
  lies (partly) outside guest RAM, a device-readable buffer follows a
  device-writable one, or the chain is longer than 2**32 bytes.  The device
  fails that one request (e.g. virtio-blk writes IOERR into the status byte if
  that byte itself is addressable) and pushes it back; the queue keeps going.
  The access helpers raise :class:`~exitless.memory.GuestMemoryError` for a
  byte range that touches a bad buffer and work for the rest (so a device can
  still write a status byte that lies in a good buffer).

Zero-length descriptors carry no buffer and are dropped from the chain.

Chain length: a direct chain cannot exceed ``size`` descriptors without a loop.
The spec also forbids chains "longer than the Queue Size of the device"; for
indirect tables the limit applied is the device's *maximum* queue size
(``max_size``, which devices derive limits such as virtio-blk's ``seg_max``
from), not the possibly smaller size the driver chose: Linux sizes indirect
tables from ``seg_max`` and only warns about longer chains when it does *not*
use indirect descriptors, so a driver that shrank the ring would otherwise be
reset for ordinary requests.

Memory ordering
---------------
The guest driver runs concurrently on another CPU.  Python executes our loads
and stores in program order (each is a C call into ``struct``); the hardware
may not:

* x86-64 (TSO): loads are not reordered with loads, stores not with stores, so
  "read avail.idx, then the ring entry and descriptors" and "write the used
  element, then used.idx" need no fence.  The one reordering x86 does is a
  *later load passing an earlier store* (store buffer), which is exactly the
  publish-then-recheck pattern of :meth:`enable_notifications` (store
  avail_event / used.flags, then load avail.idx) and of :meth:`should_signal`
  (store used.idx, then load used_event / avail.flags).  Both use
  :func:`full_barrier`.
* Weakly ordered CPUs (aarch64): the read and write sides also need barriers;
  :data:`WEAK_ORDERING` turns them on (a full barrier each; correct, not tuned).

Single-copy atomicity matters as much as ordering: every 16-bit field the
driver reads or writes concurrently (avail.idx/flags/ring/used_event,
used.idx/flags/avail_event) is accessed through ``memoryview.cast("H")`` item
get/set, which CPython performs as one 2-byte load or store.
``struct.pack_into`` must not be used for them -- it zeroes the destination
before writing it, and its ``"<H"`` codec stores one byte at a time -- and
neither must ``GuestMemory.write_u16``/``read_u16``, which are built on it: a
driver could see used.idx go 0x01FF -> 0x0100 -> 0x0200 and read garbage used
elements (``test_used_idx_is_never_seen_torn`` catches exactly that).
Descriptors are read with ``struct`` because the driver does not change them
while they are available; every value is read once and then validated.

:func:`full_barrier` executes a real barrier instruction.  When the sidecore's
C extension (``exitless.sidecore._spin``) is built it is its ``fence()``,
``__atomic_thread_fence(__ATOMIC_SEQ_CST)``, which GCC 12 compiles to
``lock or qword [rsp], 0`` on x86-64 (~40 ns a call).  Otherwise it is the same
kind of instruction (``lock or dword [rsp], 0``; ``dmb ish`` on aarch64) in a
6/8-byte stub in an executable page, called through ctypes (~0.1-0.2 µs,
mostly ctypes overhead), so nothing has to be built.  A LOCK-prefixed
instruction is a full barrier on x86 (Intel SDM vol. 3A, "Memory Ordering in
P6 and More Recent Processor Families": reads or writes cannot be reordered
with I/O instructions, locked instructions, or serializing instructions);
Linux's ``smp_mb()`` on x86-64 is the same ``lock; addl $0,-4(%rsp)`` idiom.

A system call is *not* used as a barrier: SYSCALL is not a serializing
instruction, and the kernel promises no barrier on entry or exit --
``kernel/sched/membarrier.c`` adds explicit ``smp_mb()`` calls commented
"system call entry is not a mb" / "exit from system call is not a mb", and
even ``membarrier()`` returns before them for a single-threaded process.
(Kernel-entry side effects such as a CR3 write under page-table isolation do
serialize, but only on CPUs and configurations that use them.)  If the
executable stub cannot be created (a W^X policy), the last fallback is an
uncontended ``threading.Lock`` acquire/release, which glibc implements with
LOCK-prefixed read-modify-writes: a full barrier on x86, only an
acquire/release pair elsewhere.  :data:`BARRIER_KIND` says which is in use.

C fast path
-----------
When the extension ``exitless/devices/virtio/_vring.c`` is built (and
``EXITLESS_VRING`` is not ``python``; see :data:`C_VRING`), :meth:`validate`
also builds a ``_vring.Ring`` over the same three areas and the largest RAM
region.  :meth:`pop` then walks a chain in C first, with every check of the
Python walk; a chain that C would not accept exactly as Python does (anything
refused, flagged with ``error``, crossing into another region, or longer than
1024 buffers) is walked again by the Python code below, which decides.  A
device can also run a whole batch in C with :meth:`c_batch` (virtio-blk
IN/OUT does, with the GIL released); it stops, without consuming it, at the
first chain it does not handle, and the caller pops that one here.  The same
ring state (``last_avail_idx``, the avail.idx shadow, ``used_idx``,
avail_event) is carried in and out of C, so both paths can take turns on one
queue.  ``tests/conftest.py`` runs the queue and virtio-blk tests under both,
``tests/test_vring_paths.py`` checks that they agree.

Threading
---------
A queue is driven by one thread at a time (the transport guarantees it);
nothing here takes locks.  Geometry attributes are read only by
:meth:`validate`, which snapshots them for the hot path, so a transport must
call :meth:`validate` after changing them (``VirtioDevice.activate`` does).
"""
from __future__ import annotations

from ...errors import ExitlessError
import ctypes
import mmap
import os
import platform
import struct
import sys
import threading
from typing import Callable

from exitless.memory import GuestMemory, GuestMemoryError

try:  # the C fast path (exitless/devices/virtio/_vring.c), when built
    from . import _vring
except ImportError:  # pragma: no cover - a tree where build_ext has not run
    _vring = None

from .constants import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_MAX_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
)

__all__ = [
    "BARRIER_KIND",
    "C_VRING",
    "DescriptorChain",
    "Virtqueue",
    "VirtqueueError",
    "WEAK_ORDERING",
    "full_barrier",
    "vring_need_event",
]


#: Use the C fast path (:mod:`._vring`) for queues validated from now on: chain walks in :meth:`Virtqueue.pop`
#: and device batches (:meth:`Virtqueue.c_batch`).  On when the extension is built, unless
#: ``EXITLESS_VRING=python``; the tests run the queue and virtio-blk cases under both settings.
C_VRING = _vring is not None and os.environ.get("EXITLESS_VRING", "c") != "python"


class VirtqueueError(ExitlessError):
    """The ring (or the queue's geometry) is malformed: the device needs a reset."""


# ---------------------------------------------------------------------------
# memory barrier
# ---------------------------------------------------------------------------
_MACHINE = platform.machine().lower()
WEAK_ORDERING = _MACHINE not in ("x86_64", "amd64", "i386", "i686", "x86")

_FENCE_CODE = {
    # lock or dword ptr [rsp], 0 ; ret   -- ORs zero into the return address slot
    "x86_64": bytes((0xF0, 0x83, 0x0C, 0x24, 0x00, 0xC3)),
    "amd64": bytes((0xF0, 0x83, 0x0C, 0x24, 0x00, 0xC3)),
    # dmb ish ; ret
    "aarch64": struct.pack("<II", 0xD5033BBF, 0xD65F03C0),
    "arm64": struct.pack("<II", 0xD5033BBF, 0xD65F03C0),
}

_fence_keepalive: list = []


def _native_fence() -> Callable[[], None] | None:
    code = _FENCE_CODE.get(_MACHINE)
    if code is None:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mprotect = libc.mprotect
        mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        mprotect.restype = ctypes.c_int
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        page[: len(code)] = code
        anchor = ctypes.c_char.from_buffer(page)  # pins the mapping for the life of the process
        addr = ctypes.addressof(anchor)
        if mprotect(addr, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            return None
        fn = ctypes.CFUNCTYPE(None)(addr)
        fn()  # smoke test: it returns
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    _fence_keepalive.extend((page, anchor, fn))
    return fn


def _lock_fence() -> Callable[[], None]:
    lock = threading.Lock()
    acquire, release = lock.acquire, lock.release

    def fence() -> None:
        acquire()
        release()

    return fence


def _extension_fence() -> Callable[[], None] | None:
    try:  # the sidecore's C extension, when built: __atomic_thread_fence(SEQ_CST), a direct C call
        from exitless.sidecore._spin import fence
    except ImportError:
        return None
    return fence


_fn = _extension_fence()
if _fn is not None:
    full_barrier: Callable[[], None] = _fn
    BARRIER_KIND = "extension-seq-cst-fence"
else:
    _fn = _native_fence()
    if _fn is not None:
        full_barrier = _fn
        BARRIER_KIND = "native-lock-or" if not WEAK_ORDERING else "native-dmb"
    else:  # pragma: no cover - only where executable mappings are forbidden
        full_barrier = _lock_fence()
        BARRIER_KIND = "lock-rmw"
del _fn


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True if moving an index from ``old_idx`` to ``new_idx`` crossed ``event_idx`` (mod 2**16).

    Spec §2.7.7/§2.7.10: the other side asked to be notified once the index
    passes ``event_idx``, i.e. ``event_idx`` lies in ``[old_idx, new_idx)``.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


# ---------------------------------------------------------------------------
# descriptor chains
# ---------------------------------------------------------------------------
_DESC = struct.Struct("<QIHH")
_desc_unpack = _DESC.unpack_from
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("the virtqueue accesses ring fields in native byte order, which must be little-endian")

_F_NEXT = VIRTQ_DESC_F_NEXT
_F_WRITE = VIRTQ_DESC_F_WRITE
_F_INDIRECT = VIRTQ_DESC_F_INDIRECT


def _slice_views(views: list, total: int, offset: int, length: int | None, what: str) -> list[memoryview]:
    """Sub-range ``[offset, offset+length)`` of the byte stream formed by ``views`` (zero-copy).

    An ``int`` in ``views`` stands for a buffer of that length outside guest
    RAM; touching it raises GuestMemoryError.
    """
    if length is None:
        length = total - offset
    if offset < 0 or length < 0 or offset + length > total:
        raise ValueError(f"{what} range [{offset}, {offset + length}) outside the {total}-byte {what} area")
    out: list[memoryview] = []
    if length == 0:
        return out
    end = offset + length
    pos = 0
    for v in views:
        bad = v.__class__ is int
        n = v if bad else len(v)
        nxt = pos + n
        if nxt > offset:
            if bad:
                raise GuestMemoryError(f"{what} bytes [{pos}, {nxt}) of the chain are outside guest RAM")
            lo = offset - pos if offset > pos else 0
            hi = end - pos if end < nxt else n
            out.append(v if (lo == 0 and hi == n) else v[lo:hi])
            if nxt >= end:
                break
        pos = nxt
    return out


class DescriptorChain:
    """One available buffer, fully walked and validated by :meth:`Virtqueue.pop`.

    ``segments`` lists ``(gpa, length, device_writable)`` in chain order (a
    buffer that spans two adjacent RAM regions appears as two segments).  The
    device-readable bytes form one logical stream and the device-writable bytes
    another (spec §2.7.4: no assumption about how they are split into
    descriptors); the helpers below address those streams.
    """

    __slots__ = ("head", "segments", "error", "readable_len", "writable_len", "_rviews", "_wviews")

    def __init__(self, head: int, segments: list, rviews: list, wviews: list,
                 readable_len: int, writable_len: int, error: str | None = None):
        self.head = head
        self.segments: list[tuple[int, int, bool]] = segments
        self.error = error
        self.readable_len = readable_len
        self.writable_len = writable_len
        self._rviews = rviews
        self._wviews = wviews

    @property
    def total_len(self) -> int:
        return self.readable_len + self.writable_len

    def readable_views(self) -> list[memoryview]:
        """Zero-copy views of every device-readable buffer, in order."""
        return _slice_views(self._rviews, self.readable_len, 0, None, "readable")

    def writable_views(self) -> list[memoryview]:
        """Zero-copy views of every device-writable buffer, in order."""
        return _slice_views(self._wviews, self.writable_len, 0, None, "writable")

    def readable(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Views of bytes ``[offset, offset+length)`` of the device-readable stream."""
        return _slice_views(self._rviews, self.readable_len, offset, length, "readable")

    def writable(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Views of bytes ``[offset, offset+length)`` of the device-writable stream."""
        return _slice_views(self._wviews, self.writable_len, offset, length, "writable")

    def read(self, offset: int, length: int) -> bytes:
        """Copy ``length`` bytes of the device-readable stream (for headers)."""
        views = self.readable(offset, length)
        if len(views) == 1:
            return bytes(views[0])
        return b"".join(views)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Copy ``data`` into the device-writable stream at ``offset``; returns ``len(data)``."""
        pos = 0
        for v in self.writable(offset, len(data)):
            n = len(v)
            v[:] = data[pos:pos + n]
            pos += n
        return pos

    def __repr__(self) -> str:
        err = f" error={self.error!r}" if self.error else ""
        return (f"DescriptorChain(head={self.head}, segments={len(self.segments)}, "
                f"readable={self.readable_len}, writable={self.writable_len}{err})")


# ---------------------------------------------------------------------------
# the queue
# ---------------------------------------------------------------------------
class Virtqueue:
    """Device side of one split virtqueue.

    Transport-owned attributes (read by :meth:`validate` only):
    ``size``, ``desc_addr``, ``avail_addr``, ``used_addr``, ``ready``,
    ``event_idx`` (VIRTIO_F_RING_EVENT_IDX negotiated), ``indirect``
    (VIRTIO_F_RING_INDIRECT_DESC negotiated).

    Ring state, readable and settable (vhost-user GET/SET_VRING_BASE):
    ``last_avail_idx`` (next avail ring slot the device consumes) and
    ``used_idx`` (the device's copy of used.idx, next used slot it fills).
    """

    def __init__(self, mem: GuestMemory, max_size: int):
        if not (0 < max_size <= VIRTQ_MAX_SIZE) or max_size & (max_size - 1):
            raise ValueError(f"virtqueue max_size {max_size} is not a power of two in 1..{VIRTQ_MAX_SIZE}")
        self.mem = mem
        self.max_size = max_size
        self.reset()

    # -- configuration ------------------------------------------------------
    def reset(self) -> None:
        """Back to the post-reset state: unconfigured, indices zero, notifications enabled."""
        self.size = self.max_size
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.ready = False
        self.event_idx = False
        self.indirect = False
        self.broken = False
        self._last_avail = 0
        self._shadow_avail = 0
        self._used_idx = 0
        self._signalled_used = 0
        self._signalled_valid = False
        self._unsignalled = False
        self._notify_enabled = True
        self._avail_event = 0
        self._drop_views()

    def _drop_views(self) -> None:
        self._ram_key = None
        self._ram0 = (0, 0, None)
        self._desc = None
        self._avail = None       # avail ring as u16[]: flags, idx, ring[size], used_event
        self._used = None        # used ring as u16[]: flags, idx, (elements), avail_event
        self._used_elems = None  # used ring elements as u32[]: id, len, id, len, ...
        self._size = 0
        self._mask = 0
        self._evt = False
        self._ind = False
        self._used_event_i = 0
        self._avail_event_i = 0
        self._cring = None       # _vring.Ring over the same areas (C_VRING), pinning them like the views
        self._cram = None        # the RAM region view the C ring translates buffers in

    def validate(self) -> None:
        """Check the geometry and map the three ring areas; raise :class:`VirtqueueError` if bad.

        ``size`` must be a power of two <= ``max_size``; the descriptor table
        (16-aligned, 16*size bytes), the available ring (2-aligned, 4+2*size
        bytes, +2 with EVENT_IDX) and the used ring (4-aligned, 4+8*size
        bytes, +2 with EVENT_IDX) must each lie inside one contiguous run of
        guest RAM.  On success the views are cached for the hot path, along
        with ``size``, ``event_idx`` and ``indirect``.
        """
        self._drop_views()
        size = self.size
        if not isinstance(size, int) or size <= 0 or size & (size - 1) or size > self.max_size:
            raise VirtqueueError(f"queue size {size} is not a power of two in 1..{self.max_size}")
        evt = bool(self.event_idx)
        areas = (
            ("descriptor table", self.desc_addr, 16, 16 * size),
            ("available ring", self.avail_addr, 2, 4 + 2 * size + (2 if evt else 0)),
            ("used ring", self.used_addr, 4, 4 + 8 * size + (2 if evt else 0)),
        )
        views = []
        for name, addr, align, length in areas:
            if not isinstance(addr, int) or addr < 0 or addr % align:
                raise VirtqueueError(f"{name} address {addr!r} is not {align}-byte aligned")
            try:
                views.append(self.mem.view(addr, length))
            except GuestMemoryError as e:
                raise VirtqueueError(f"{name} [{addr:#x}, +{length:#x}) is not inside guest RAM") from e
        desc, avail, used = views
        # The 16-bit fields shared with a running driver are accessed through cast
        # memoryviews: item reads and writes are single 2-byte loads and stores.
        # struct.pack_into is not usable for them: it zeroes the field before
        # writing it, and the "<H" codecs move one byte at a time, so the driver
        # could observe a torn index (tests/test_virtqueue.py shows both).
        self._desc = desc
        self._avail = avail.cast("H")
        self._used = used.cast("H")
        self._used_elems = used[4:4 + 8 * size].cast("I")
        self._size = size
        self._mask = size - 1
        self._evt = evt
        self._ind = bool(self.indirect)
        self._used_event_i = 2 + size
        self._avail_event_i = 2 + 4 * size
        self._shadow_avail = self._last_avail
        self.broken = False
        if C_VRING:
            self._refresh_ram()
            gpa, _end, ram = self._ram0
            self._cring = _vring.Ring(ram, gpa, desc, avail, used, size, self.max_size, self._ind)
            self._cram = (gpa, ram)
        # (Re)state the notification-suppression state in the new ring.
        if self._notify_enabled:
            if evt:
                self._publish_avail_event(self._last_avail)
            else:
                self._used[0] = 0
        else:
            self.disable_notifications()

    @property
    def configured(self) -> bool:
        """True after a successful :meth:`validate` (and until :meth:`reset`)."""
        return self._desc is not None

    # -- indices (vhost-user GET/SET_VRING_BASE) ------------------------------
    @property
    def last_avail_idx(self) -> int:
        return self._last_avail

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        self._last_avail = self._shadow_avail = value & 0xFFFF

    @property
    def used_idx(self) -> int:
        return self._used_idx

    @used_idx.setter
    def used_idx(self, value: int) -> None:
        self._used_idx = value & 0xFFFF
        self._signalled_valid = False

    def ring_avail_idx(self) -> int:
        """avail.idx as the driver last wrote it (0 if unconfigured)."""
        return self._avail[1] if self._avail is not None else 0

    def ring_used_idx(self) -> int:
        """used.idx as it is in guest memory (to resume a queue: ``q.used_idx = q.ring_used_idx()``)."""
        return self._used[1] if self._used is not None else 0

    # -- consuming ---------------------------------------------------------------
    def has_work(self) -> bool:
        """Cheap poll: has the driver made buffers available that :meth:`pop` has not taken?"""
        avail = self._avail
        if avail is None or self.broken:
            return False
        return avail[1] != self._last_avail

    def _fail(self, msg: str) -> VirtqueueError:
        self.broken = True
        return VirtqueueError(msg)

    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, or return None if there is none (or the queue is unconfigured).

        Raises :class:`VirtqueueError` if the ring is malformed (see the module docstring).
        """
        head = self._next_head()
        return None if head is None else self._walk(head)

    def _next_head(self) -> int | None:
        """The ring half of :meth:`pop`: consume the next avail ring entry and return its head index."""
        avail = self._avail
        if avail is None:
            return None
        if self.broken:
            raise VirtqueueError("virtqueue is broken; it needs a reset")
        last = self._last_avail
        if last == self._shadow_avail:
            idx = avail[1]
            if idx == last:
                return None
            if ((idx - last) & 0xFFFF) > self._size:
                raise self._fail(f"avail idx jumped from {last} to {idx} (queue size {self._size})")
            self._shadow_avail = idx
            if WEAK_ORDERING:
                full_barrier()  # read the ring entries only after avail.idx
        head = avail[2 + (last & self._mask)]
        last = self._last_avail = (last + 1) & 0xFFFF
        if self._evt:
            if self._notify_enabled:
                self._used[self._avail_event_i] = last
            elif ((last - self._avail_event) & 0xFFFF) >= 0x4000:
                # keep the "disabled" avail_event behind the driver (see disable_notifications)
                self._publish_avail_event((last - 1) & 0xFFFF)
        return head

    def _walk(self, head: int) -> DescriptorChain:
        if self._cring is not None:
            walked = self._cring.walk(head)
            if walked is not None:  # C found a valid chain inside one region; otherwise Python decides
                segs, rlen, wlen = walked
                gpa0, ram = self._cram
                rviews, wviews = [], []
                for addr, length, w in segs:
                    (wviews if w else rviews).append(ram[addr - gpa0:addr - gpa0 + length])
                return DescriptorChain(head, segs, rviews, wviews, rlen, wlen)
        size = self._size
        if head >= size:
            raise self._fail(f"available head index {head} >= queue size {size}")
        max_chain = self.max_size
        view = self.mem.view
        if self.mem.regions is not self._ram_key:
            self._refresh_ram()
        r0_gpa, r0_end, r0_view = self._ram0
        table = self._desc
        limit = size           # entries in the table being walked
        steps = 0              # descriptors visited in that table
        ndesc = 0              # buffer descriptors in the whole chain
        idx = head
        indirect = False
        segs: list = []
        rviews: list = []
        wviews: list = []
        rlen = wlen = 0
        error = None
        while True:
            addr, length, flags, nxt = _desc_unpack(table, idx << 4)
            steps += 1
            if flags & _F_INDIRECT:
                if indirect:
                    raise self._fail(f"nested indirect descriptor in chain {head}")
                if not self._ind:
                    raise self._fail(f"INDIRECT descriptor in chain {head} but VIRTIO_F_INDIRECT_DESC not negotiated")
                if flags & _F_NEXT:
                    raise self._fail(f"descriptor {idx} of chain {head} has both INDIRECT and NEXT")
                if length == 0 or length & 15:
                    raise self._fail(f"indirect table length {length} of chain {head} is not a non-zero multiple of 16")
                try:
                    table = view(addr, length)
                except GuestMemoryError:
                    raise self._fail(f"indirect table [{addr:#x}, +{length:#x}) of chain {head} is outside guest RAM") from None
                indirect = True
                limit = length >> 4
                steps = 0
                idx = 0
                continue
            if indirect and steps > max_chain:
                # zero-length descriptors count too: a table may be as long as RAM, the chain may not
                raise self._fail(f"indirect chain {head} has more than {max_chain} descriptors")
            if length:
                ndesc += 1
                if ndesc > max_chain:
                    raise self._fail(f"chain {head} has more than {max_chain} descriptors")
                if r0_gpa <= addr and addr + length <= r0_end:   # fast path: inside the main RAM region
                    off = addr - r0_gpa
                    if flags & _F_WRITE:
                        segs.append((addr, length, True))
                        wviews.append(r0_view[off:off + length])
                        wlen += length
                    else:
                        segs.append((addr, length, False))
                        rviews.append(r0_view[off:off + length])
                        if wlen and error is None:
                            error = "device-readable buffer after a device-writable one"
                        rlen += length
                else:
                    w = bool(flags & _F_WRITE)
                    bad = self._add_slow(addr, length, w, segs, wviews if w else rviews)
                    if bad and error is None:
                        error = bad
                    if w:
                        wlen += length
                    else:
                        if wlen and error is None:
                            error = "device-readable buffer after a device-writable one"
                        rlen += length
            if not flags & _F_NEXT:
                break
            if nxt >= limit:
                raise self._fail(f"next index {nxt} >= {'indirect table' if indirect else 'queue'} size {limit} in chain {head}")
            if steps >= limit:
                raise self._fail(f"descriptor loop in chain {head}")
            idx = nxt
        if error is None and rlen + wlen > 0xFFFFFFFF:
            error = "chain is longer than 2**32 bytes"
        return DescriptorChain(head, segs, rviews, wviews, rlen, wlen, error)

    def _refresh_ram(self) -> None:
        """Cache one whole-region view per RAM region (taken through GuestMemory.view).

        Buffer translation then costs one range comparison for the first (usually
        the only, or the low) region instead of a GuestMemory.view call; other
        regions and buffers that span regions go through :meth:`_view_slow`.
        GuestMemory only ever adds regions (and replaces its ``regions`` list
        when it does), so the cache is refreshed when that list object changes.
        """
        mem = self.mem
        regions = mem.regions
        ram = tuple((r.gpa, r.end, mem.view(r.gpa, r.size)) for r in regions)
        self._ram0 = max(ram, key=lambda t: t[1] - t[0])
        self._ram_key = regions

    def _add_slow(self, addr: int, length: int, w: bool, segs: list, views: list) -> str | None:
        """Append a buffer outside the main region: another region, split across regions, or bad."""
        try:
            pieces = (self.mem.view(addr, length),)
        except GuestMemoryError:
            pieces = self._split_view(addr, length)
        if pieces is None:
            segs.append((addr, length, w))
            views.append(length)  # placeholder: a bad buffer of this length
            return f"buffer [{addr:#x}, +{length:#x}) is outside guest RAM"
        for v in pieces:
            n = len(v)
            segs.append((addr, n, w))
            views.append(v)
            addr += n
        return None

    def _split_view(self, gpa: int, length: int) -> tuple | None:
        """Views of a buffer that spans adjacent RAM regions, or None if any byte is outside RAM."""
        out = []
        end = gpa + length
        for r in self.mem.regions:
            if r.gpa <= gpa < r.end:
                n = min(end, r.end) - gpa
                try:
                    out.append(self.mem.view(gpa, n))
                except GuestMemoryError:
                    return None
                gpa += n
                if gpa == end:
                    return tuple(out)
        return None

    def c_batch(self, op: Callable, *device_args, times: bytearray | None = None,
                max_batch: int | None = None, publishes: bool = True) -> tuple[int, bool]:
        """Run a C batch of :mod:`._vring` (e.g. ``_vring.Ring.blk_batch``) over this queue's state.

        The C code takes available chains while it can complete them itself, pushes
        them and publishes used.idx once; it returns ``(completed, more)``, ``more``
        meaning "the next chain is for :meth:`pop` and the Python device model" (it
        has not been consumed).  Without a C ring (not built, ``C_VRING`` off, or
        a broken queue) this returns ``(0, True)``: everything goes through Python.
        ``times``: a 40-byte buffer to which the batch adds ns per phase (ring read,
        chain walk, request parse, host I/O, used write).  ``max_batch``: take at most this many
        chains (default: the queue size).  ``publishes=False``: the op only consumes chains (virtio-net's
        RX buffers, held for later), no used element is owed a notification.
        """
        ring = self._cring
        if ring is None or self.broken:
            return 0, True
        n, more, self._last_avail, self._shadow_avail, used_idx, self._avail_event = op(
            ring, self._last_avail, self._shadow_avail, self._used_idx, self._avail_event, self._evt,
            self._notify_enabled, self._size if max_batch is None else min(max_batch, self._size), times,
            *device_args)
        if n and publishes:
            self._used_idx = used_idx
            self._unsignalled = True
        return n, more

    def serve_state(self) -> tuple | None:
        """This queue's consumer state for a C loop that completes chains and decides their interrupts
        itself -- ``(last_avail, shadow_avail, used_idx, avail_event, event_idx, notify_enabled,
        signalled_used, signalled_valid)`` -- or None when it must stay with Python: no C ring, broken, or
        a completion pushed whose interrupt is not decided yet.  :meth:`take_serve_state` takes it back."""
        if self._cring is None or self.broken or self._unsignalled:
            return None
        return (self._last_avail, self._shadow_avail, self._used_idx, self._avail_event, self._evt,
                self._notify_enabled, self._signalled_used, self._signalled_valid)

    def take_serve_state(self, state: tuple) -> None:
        """Take back ``(last_avail, shadow_avail, used_idx, avail_event, signalled_used, signalled_valid)``
        from a C loop that had :meth:`serve_state`.  Its interrupt decisions were made in C (as
        :meth:`should_signal`), so nothing is left unsignalled."""
        (self._last_avail, self._shadow_avail, self._used_idx, self._avail_event, self._signalled_used,
         self._signalled_valid) = state

    def serve_job(self, *device_args, call_fd: int) -> tuple | None:
        """This queue's state as one job of ``_vring.serve`` (many queues served in C, interrupts
        included: see :meth:`served`), or None when it must be polled in Python this round (see
        :meth:`serve_state`; or notifications are enabled: kick-driven, :meth:`enable_notifications`
        handshakes in Python).  ``device_args``: the device's part of the job (for virtio-blk: fd, capacity
        in sectors, largest request in bytes, writable); ``call_fd``: the eventfd (a KVM irqfd) to write
        when the driver wants a used-buffer notification, -1 for none."""
        state = self.serve_state()
        return None if state is None or self._notify_enabled else (self._cring, *state, *device_args, call_fd)

    def served(self, result: tuple) -> tuple[int, int, int]:
        """Take back this queue's state from a ``_vring.serve`` result; returns ``(completed,
        last_work_ns, interrupts)`` (``last_work_ns``: CLOCK_MONOTONIC of its last completion).  The
        interrupt decisions were made in C (as :meth:`should_signal`), so nothing is left unsignalled."""
        *state, n, last_work, irqs = result
        self.take_serve_state(state)
        return n, last_work, irqs

    # -- completing ----------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes written to its writable part.

        The used element is stored before used.idx (spec §2.7.8); the stores
        are ordered on x86 and fenced on weakly ordered CPUs.
        """
        used = self._used
        if used is None:
            raise VirtqueueError("push on an unconfigured virtqueue")
        elems = self._used_elems
        if not 0 <= head < self._size:
            raise ValueError(f"push of head {head} outside queue size {self._size}")
        idx = self._used_idx
        i = (idx & self._mask) << 1
        elems[i] = head
        elems[i + 1] = written & 0xFFFFFFFF
        if WEAK_ORDERING:
            full_barrier()
        idx = self._used_idx = (idx + 1) & 0xFFFF
        used[1] = idx
        self._unsignalled = True

    def push_many(self, completions: list[tuple[int, int]]) -> None:
        """:meth:`push` for a batch of ``(head, written)``: every used element, then used.idx once.

        The driver sees the whole batch at once (one store of used.idx), as a
        batch completed by the C fast path is published.
        """
        used = self._used
        if used is None:
            raise VirtqueueError("push on an unconfigured virtqueue")
        elems = self._used_elems
        size, mask = self._size, self._mask
        idx = self._used_idx
        for head, written in completions:
            if not 0 <= head < size:
                raise ValueError(f"push of head {head} outside queue size {size}")
            i = (idx & mask) << 1
            elems[i] = head
            elems[i + 1] = written & 0xFFFFFFFF
            idx = (idx + 1) & 0xFFFF
        if not completions:
            return
        if WEAK_ORDERING:
            full_barrier()
        self._used_idx = idx
        used[1] = idx
        self._unsignalled = True

    def should_signal(self) -> bool:
        """After one or more :meth:`push` calls: does the driver want a used-buffer notification?

        Without EVENT_IDX: unless avail.flags has VRING_AVAIL_F_NO_INTERRUPT.
        With EVENT_IDX: if used.idx crossed ``used_event`` since the previous
        call (``vring_need_event(used_event, new, old)``), or on the first call
        after (re)configuration.  A full barrier orders our used.idx store
        before the load of the driver's suppression field (the driver does
        the mirror image: store used_event, fence, re-read used.idx).
        """
        if not self._unsignalled or self._avail is None:
            return False
        self._unsignalled = False
        full_barrier()
        new = self._used_idx
        if self._evt:
            old = self._signalled_used
            self._signalled_used = new
            if not self._signalled_valid:
                self._signalled_valid = True
                return True
            used_event = self._avail[self._used_event_i]
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not (self._avail[0] & VRING_AVAIL_F_NO_INTERRUPT)

    # -- available-buffer notification suppression ------------------------------------
    @property
    def notifications_enabled(self) -> bool:
        return self._notify_enabled

    def _publish_avail_event(self, value: int) -> None:
        self._avail_event = value
        self._used[self._avail_event_i] = value

    def disable_notifications(self) -> None:
        """Ask the driver not to notify (kick) us: we are polling.

        Without EVENT_IDX set VRING_USED_F_NO_NOTIFY in used.flags.  With
        EVENT_IDX publish ``avail_event = last_avail_idx - 1``: the driver kicks
        only when avail.idx moves across avail_event, and it is always at or
        ahead of ``last_avail_idx``, so that value is ~65535 entries ahead of it;
        :meth:`pop` moves it along every 16384 entries so it is never reached.
        Suppression is advisory: a late kick may still arrive.
        """
        self._notify_enabled = False
        if self._used is None:
            return
        if self._evt:
            self._publish_avail_event((self._last_avail - 1) & 0xFFFF)
        else:
            self._used[0] = VRING_USED_F_NO_NOTIFY

    def enable_notifications(self) -> bool:
        """Ask the driver to notify us again; return True if buffers arrived meanwhile.

        Publishes (used.flags = 0, or avail_event = last_avail_idx), then a full
        barrier, then re-reads avail.idx.  The driver does the mirror image
        (store avail.idx, fence, load flags/avail_event), so at least one side
        sees the other's store: either the driver kicks or this returns True.
        A caller that gets True must process the queue again (and may disable
        notifications again first) -- otherwise a wake-up is lost.
        """
        self._notify_enabled = True
        if self._used is None:
            return False
        if self._evt:
            self._publish_avail_event(self._last_avail)
        else:
            self._used[0] = 0
        full_barrier()
        return self.has_work()

    def __repr__(self) -> str:
        state = "broken" if self.broken else ("configured" if self.configured else "unconfigured")
        return (f"Virtqueue(size={self.size}, max={self.max_size}, {state}, "
                f"last_avail={self._last_avail}, used={self._used_idx})")
