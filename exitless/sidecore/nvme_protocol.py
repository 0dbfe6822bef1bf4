"""The NVMe queue-pair messages of ``exitless sidecore``: a VMM hands I/O queue pairs to the service.

The controller is split (:mod:`exitless.devices.nvme.pci` with ``service=``): the admin queue, the
registers, asynchronous events, reset/CC.EN, Create/Delete I/O SQ/CQ and Doorbell Buffer Config stay
in the VMM, which also runs every queue pair before the driver's Doorbell Buffer Config (0x7C: an
eventfd carries no doorbell value, so those doorbells trap).  Once a pair has shadow doorbells its
SQ and CQ are handed to the service, which fetches, executes and completes its commands and signals
its interrupt, with no hop through the VMM.

Framing: vhost-user's (12-byte header, payload, fds by SCM_RIGHTS: :mod:`exitless.vhost_user.protocol`)
on the service's socket, one connection per NVMe controller.  Every request here is answered (the
VMM waits for each one, on the vCPU thread that runs the admin command): u64 0 accepted, u64 1
refused (the connection stays up; the VMM then serves that pair itself), except DETACH_QP, whose
answer is the pair's state.  A message of another kind, or with the wrong fds, ends the connection.

1. ``EXITLESS_NVME_SET_BACKEND`` (first message; :data:`BACKEND`): version, flags (``F_RO``,
   ``F_DIRECT``), the LBA size, the highest I/O queue id; fds: the namespace's backing file (opened
   O_DIRECT with ``F_DIRECT``), with ``F_DIRECT`` a buffered fd of the same file, then two eventfds
   the service writes: *event* (it ignored a bad shadow doorbell value: the VMM sends the
   asynchronous event, §5.2) and *fatal* (it cannot go on: the VMM sets CSTS.CFS).
2. ``SET_MEM_TABLE`` (vhost-user's payload and fds): guest RAM, one region per range, each region's
   "frontend address" its guest-physical address.
3. ``EXITLESS_NVME_ATTACH_QP`` (:data:`ATTACH`), per pair, at the pair's first moment with shadow
   doorbells (Doorbell Buffer Config, or Create I/O SQ after it): SQ and CQ ids, sizes and
   guest-physical bases, the state the VMM leaves them in (SQ head/tail, CQ head/tail/phase, the last
   shadow values seen), the shadow doorbell and EventIdx pages (the same for every pair of a
   connection), flags; fds: with ``F_IRQFD`` the CQ's MSI-X vector's KVM irqfd (none: the CQ's
   interrupts are off), with ``F_WAKE`` the eventfd the doorbells' ioeventfds signal (``adaptive``:
   the service may sleep on it; without one it polls the shadow slots).  ``F_VWC``: the volatile
   write cache is on (off: every write is flushed before it completes).  The service checks every
   ring and page against the memory table, parks EventIdx and serves the pair from its loop.
4. ``EXITLESS_NVME_DETACH_QP`` (u32 SQ id), at Delete I/O SQ, controller reset (CC.EN 0, a new
   Doorbell Buffer Config), a change of the write cache, VM exit: the service takes the pair off its
   loop -- it has stopped touching the rings when it answers -- and replies :data:`STATE`: where it
   left the queues (so the VMM goes on from there: no completion lost or posted twice) and what it
   did (counters).  The VMM answers the guest's command (or shows CSTS.RDY 0) only after that reply.
5. ``EXITLESS_NVME_GET_COUNTERS`` (no payload): what the served pairs did since the previous
   GET_COUNTERS or DETACH_QP reply (:data:`COUNTS`), so that the VMM's counters are current while
   pairs are served (``NvmePci.stats()``).

A connection that ends (VM exit, a VMM killed mid-I/O) detaches every pair of that VM.  A service that
goes away while it serves pairs, or breaks a pair, makes the VMM's controller fatal (CSTS.CFS): the
driver resets it, and the pairs it creates next are served by the VMM itself.  Known limit: the irqfd bypasses MSI-X masking, as
for virtio-blk (:mod:`exitless.sidecore.remote`); Linux and the guest kit do not mask live vectors.
"""
from __future__ import annotations

import struct
from dataclasses import astuple, dataclass

from ..vhost_user import protocol as P
from ..vhost_user.protocol import Message, ProtocolError

EXITLESS_NVME_SET_BACKEND = 0x4558_0101
EXITLESS_NVME_ATTACH_QP = 0x4558_0102
EXITLESS_NVME_DETACH_QP = 0x4558_0103
EXITLESS_NVME_GET_COUNTERS = 0x4558_0104
REQUESTS = (EXITLESS_NVME_SET_BACKEND, EXITLESS_NVME_ATTACH_QP, EXITLESS_NVME_DETACH_QP, EXITLESS_NVME_GET_COUNTERS)
for _r, _n in zip(REQUESTS, ("EXITLESS_NVME_SET_BACKEND", "EXITLESS_NVME_ATTACH_QP", "EXITLESS_NVME_DETACH_QP",
                             "EXITLESS_NVME_GET_COUNTERS")):
    P.REQUEST_NAMES[_r] = _n

VERSION = 1
BACKEND = struct.Struct("<IIII")          # version, flags, lba_size, max_qid
F_RO, F_DIRECT = 1 << 0, 1 << 1
BACKEND_FLAGS = F_RO | F_DIRECT

ATTACH = struct.Struct("<7IIIIIQQIQQ")      # QueueState, then Attach's own fields, in order
F_IRQFD, F_WAKE, F_VWC = 1 << 0, 1 << 1, 1 << 2
ATTACH_FLAGS = F_IRQFD | F_WAKE | F_VWC
QID = struct.Struct("<I")
#: What DETACH_QP's reply counts (the service's controller counters since its previous reply; its bad
#: doorbells are the VMM's count already, through the event fd).
COUNTERS = ("io_commands", "commands", "shadow_doorbells", "read_bytes", "write_bytes",
            "host_reads", "host_writes", "data_units_read", "data_units_written")
STATE = struct.Struct(f"<7I{len(COUNTERS)}Q")
COUNTS = struct.Struct(f"<{len(COUNTERS)}Q")


@dataclass(frozen=True)
class Backend:
    """SET_BACKEND: ``flags`` (F_RO, F_DIRECT), ``lba_size`` bytes, ``max_qid`` the highest I/O queue id."""
    flags: int
    lba_size: int
    max_qid: int


@dataclass(frozen=True)
class QueueState:
    """Where a pair's queues are: SQ head (next entry fetched) and tail, CQ head, tail (next entry
    posted) and phase, and the last value read from each one's shadow doorbell slot."""
    sq_head: int
    sq_tail: int
    sq_shadow_seen: int
    cq_head: int
    cq_tail: int
    cq_phase: int
    cq_shadow_seen: int


@dataclass(frozen=True)
class Attach(QueueState):
    """ATTACH_QP: the state the VMM leaves the pair in, its geometry (bases guest-physical, sizes in
    entries), flags, and the shadow doorbell / EventIdx pages (guest-physical)."""
    sqid: int
    cqid: int
    sq_size: int
    cq_size: int
    sq_base: int
    cq_base: int
    flags: int
    shadow: int
    event_idx: int


@dataclass(frozen=True)
class State(QueueState):
    """DETACH_QP's reply: where the pair's queues were left, and ``counters`` (name -> count)."""
    counters: dict


def _exact(msg: Message, s: struct.Struct) -> tuple:
    if len(msg.payload) != s.size:
        raise ProtocolError(f"{msg.name}: payload is {len(msg.payload)} bytes, expected {s.size}")
    return s.unpack(msg.payload)


def backend(msg: Message) -> Backend:
    """Decode SET_BACKEND (version and flags checked; the sizes are the service's to check)."""
    version, flags, lba_size, max_qid = _exact(msg, BACKEND)
    if version != VERSION:
        raise ProtocolError(f"{msg.name}: version {version}, this service speaks {VERSION}")
    if flags & ~BACKEND_FLAGS:
        raise ProtocolError(f"{msg.name}: unknown flags {flags:#x}")
    return Backend(flags, lba_size, max_qid)


def attach(msg: Message) -> Attach:
    """Decode ATTACH_QP (flags checked; the ranges are the service's to check)."""
    a = Attach(*_exact(msg, ATTACH))
    if a.flags & ~ATTACH_FLAGS:
        raise ProtocolError(f"{msg.name}: unknown flags {a.flags:#x}")
    return a


def qid(msg: Message) -> int:
    return _exact(msg, QID)[0]


def expected_fds(msg: Message) -> int:
    """How many fds a message of this family carries (a function of its payload)."""
    if msg.request == EXITLESS_NVME_SET_BACKEND:
        return (2 if backend(msg).flags & F_DIRECT else 1) + 2     # the disk's fd(s), event, fatal
    if msg.request == EXITLESS_NVME_ATTACH_QP:
        flags = attach(msg).flags
        return bool(flags & F_IRQFD) + bool(flags & F_WAKE)
    return P.expected_fds(msg)


def encode_backend(b: Backend) -> bytes:
    return BACKEND.pack(VERSION, b.flags, b.lba_size, b.max_qid)


def encode_attach(a: Attach) -> bytes:
    return ATTACH.pack(*astuple(a))


def encode_state(s: State) -> bytes:
    return STATE.pack(*astuple(s)[:7], *(s.counters.get(k, 0) & 0xFFFF_FFFF_FFFF_FFFF for k in COUNTERS))


def encode_counts(counters: dict) -> bytes:
    return COUNTS.pack(*(counters.get(k, 0) & 0xFFFF_FFFF_FFFF_FFFF for k in COUNTERS))


def counts(payload: bytes) -> dict:
    """Decode GET_COUNTERS' reply payload; ProtocolError if it is not one."""
    if len(payload) != COUNTS.size:
        raise ProtocolError(f"EXITLESS_NVME_GET_COUNTERS: reply of {len(payload)} bytes, expected {COUNTS.size}")
    return dict(zip(COUNTERS, COUNTS.unpack(payload)))


def state(payload: bytes) -> State:
    """Decode DETACH_QP's reply payload; ProtocolError if it is not one."""
    if len(payload) != STATE.size:
        raise ProtocolError(f"EXITLESS_NVME_DETACH_QP: reply of {len(payload)} bytes, expected {STATE.size}")
    v = STATE.unpack(payload)
    return State(*v[:7], dict(zip(COUNTERS, v[7:])))
