"""The service's side of NVMe queue pairs: one VM's handed-over I/O queue pairs, served from the loop.

``exitless sidecore`` (:mod:`exitless.sidecore.service`) dispatches a connection whose first message is
``EXITLESS_NVME_SET_BACKEND`` here; :mod:`exitless.sidecore.nvme_protocol` describes the messages.
A :class:`NvmeQueueSession` holds that VM's namespace (its disk fds), memory (its memfd) and a
:class:`ServedController` -- the I/O half of the VM's controller, the same command, PRP, shadow
doorbell and EventIdx code as the VMM's (:class:`~exitless.devices.nvme.controller.NvmeController`)
with the pairs handed over and nothing else -- whose pairs the service's loop serves.

Everything a VM sends is checked before it is used: rings, shadow and EventIdx pages inside its
memory table, ids and sizes in range, head/tail/phase values possible, one SQ per CQ, fds that are
eventfds.  A refused ATTACH_QP is answered with a failure (the VM serves that pair itself); a
message of another kind or with wrong fds ends the connection, and :meth:`NvmeQueueSession.close`
then takes every pair off the loop before the memory is unmapped and the fds closed.
"""
from __future__ import annotations

import logging
import os

from ..devices.nvme import constants as K
from ..devices.nvme.controller import CompletionQueue, NvmeController, SubmissionQueue
from ..devices.nvme.namespace import LBA_SIZES, Namespace, NamespaceError
from ..devices.nvme.pci import QueuePairPollable
from ..vhost_user import protocol as P
from ..vhost_user.backend import VhostUserBackend, _eventfd
from ..vhost_user.memory import VhostMemory
from ..vhost_user.protocol import Message, ProtocolError
from . import nvme_protocol as N
from .loop import SidecoreLoop, SidecoreThread

log = logging.getLogger("exitless.sidecore.service")

MAX_QID = 64                      # NvmePci's most I/O queue pairs
SESSION_REQUESTS = (P.SET_MEM_TABLE, N.EXITLESS_NVME_ATTACH_QP, N.EXITLESS_NVME_DETACH_QP, N.EXITLESS_NVME_GET_COUNTERS)
MAX_QUEUE_ENTRIES = NvmeController.MQES + 1


_write_event = VhostUserBackend._write_event    # an eventfd write that a full counter or a VM gone cannot fail


class ServedController(NvmeController):
    """The I/O queue pairs of one VM's controller, served by the service.

    ``mem`` (the VM's :class:`~exitless.memory.GuestMemory`), ``ns`` its namespace, ``max_qid`` the
    highest queue id; ``event_fd``/``fatal_fd``: eventfds written when a shadow doorbell value is bad
    (the VMM sends the asynchronous event) or the pairs cannot go on (the VMM sets CSTS.CFS).  Always
    "ready": the VMM owns CC/CSTS, and takes the pairs back before a reset.
    """

    def __init__(self, mem, ns: Namespace, max_qid: int, event_fd: int, fatal_fd: int):
        super().__init__(mem, ns, max_io_queues=max_qid, num_vectors=1)
        self.irq = self._signal
        self.csts = K.CSTS_RDY
        self.park_event_idx = True       # poll, and adaptive while busy (arm() publishes when idle)
        self.irqfds: dict[int, int] = {}     # CQ id -> the KVM irqfd of its MSI-X vector
        self.event_fd, self.fatal_fd = event_fd, fatal_fd
        self.ioeventfd_doorbells = 0

    def _signal(self, cq: CompletionQueue | None) -> None:
        if cq is not None and cq.ien:
            fd = self.irqfds.get(cq.cqid)
            if fd is not None:
                _write_event(fd)

    def _bad_doorbell(self, info: int, why: str) -> None:
        # the asynchronous event is the VMM's (it owns the admin queue): tell it, and count
        self.stats["bad_doorbells"] += 1
        self.log(logging.WARNING, "NVMe (served): ignored doorbell write: %s", why)
        _write_event(self.event_fd)

    def _fatal(self, why: str) -> None:
        super()._fatal(why)
        _write_event(self.fatal_fd)


class NvmeQueueSession:
    """One VM's NVMe controller on the service (see the module docstring).

    Built from the connection's first message ``msg`` (EXITLESS_NVME_SET_BACKEND; its fds are owned
    from here on); ``dataplane`` is the service's loop; a pair it cannot serve (no wake eventfd for an
    adaptive loop) goes to a polling loop of this session's own.  Raises :class:`ProtocolError` or
    :class:`~exitless.devices.nvme.namespace.NamespaceError` for a first message it does not accept.
    """

    def __init__(self, msg: Message, name: str, dataplane: SidecoreLoop, *, poll_ns: int = 64_000):
        fds, msg.fds = msg.fds, []
        self.name = name
        self.dataplane = dataplane
        self.poll_ns = poll_ns
        self.ns: Namespace | None = None
        self.mem: VhostMemory | None = None
        self.ctrl: ServedController | None = None
        self.pairs: dict[int, tuple[QueuePairPollable, SidecoreLoop, int | None]] = {}   # sqid -> (p, loop, wake)
        self.event_fd = self.fatal_fd = -1
        self._own: SidecoreThread | None = None
        self._leaked = False
        self._reported: dict[str, int] = {}
        self.completed = 0
        try:
            if len(fds) != N.expected_fds(msg):
                raise ProtocolError(f"{msg.name}: {len(fds)} fds, expected {N.expected_fds(msg)}")
            spec = N.backend(msg)
            if spec.lba_size not in LBA_SIZES:
                raise ProtocolError(f"{msg.name}: LBA size {spec.lba_size} (one of {LBA_SIZES})")
            if not 1 <= spec.max_qid <= MAX_QID:
                raise ProtocolError(f"{msg.name}: {spec.max_qid} I/O queues (1..{MAX_QID})")
            direct = bool(spec.flags & N.F_DIRECT)
            disk = (fds.pop(0), fds.pop(0) if direct else -1)
            self.event_fd, self.fatal_fd = fds.pop(0), fds.pop(0)     # owned (closed by close()) from here
            try:
                for fd in (self.event_fd, self.fatal_fd):
                    _eventfd(fd, f"{msg.name}: event/fatal fd")
            except BaseException:
                os.close(disk[0]) if disk[0] >= 0 else None
                os.close(disk[1]) if disk[1] >= 0 else None
                raise
            self.ns = Namespace(f"{name}'s namespace", lba_size=spec.lba_size, read_only=bool(spec.flags & N.F_RO),
                                direct=direct, fds=disk)
            self.max_qid = spec.max_qid
        except BaseException:
            for fd in fds:
                os.close(fd)
            self.close()
            raise

    def describe(self) -> str:
        return (f"an NVMe namespace of {self.ns.nsze} {self.ns.lba_size}-byte LBAs"
                f"{', read-only' if self.ns.read_only else ''}, up to {self.max_qid} I/O queue pairs")

    # -- messages ---------------------------------------------------------------------------------------------
    def handle(self, msg: Message) -> bytes | None:
        """One message after the first; the reply.  Raises ProtocolError (see :meth:`error_reply`)."""
        if msg.request not in SESSION_REQUESTS:
            raise ProtocolError(f"{msg.name}: not a message of an NVMe queue-pair session")
        n = N.expected_fds(msg)
        if len(msg.fds) != n:
            raise ProtocolError(f"{msg.name}: {len(msg.fds)} fds, expected {n}")
        if msg.request == P.SET_MEM_TABLE:
            self._set_mem_table(msg)
        elif msg.request == N.EXITLESS_NVME_ATTACH_QP:
            self._attach(msg)
        elif msg.request == N.EXITLESS_NVME_DETACH_QP:
            return self._detach(N.qid(msg))
        else:
            P.no_payload(msg)
            return P.encode(msg.request, N.encode_counts(self._delta()), reply=True)
        return P.reply_u64(msg.request, 0)

    def error_reply(self, msg: Message) -> bytes | None:
        """A refused request of this family is answered u64 1 (the VM then serves that pair itself);
        anything else ends the connection (None)."""
        if msg.request in SESSION_REQUESTS:
            return P.reply_u64(msg.request, 1)
        return None

    def _set_mem_table(self, msg: Message) -> None:
        if self.pairs:
            raise ProtocolError("SET_MEM_TABLE while queue pairs are served")
        regions = P.mem_table(msg)
        fds, msg.fds = msg.fds, []
        mem = VhostMemory(regions, fds)          # owns (and on error closes) the fds; sealed memfds only
        if any(r.uva != r.gpa for r in regions):
            mem.close()
            raise ProtocolError("SET_MEM_TABLE: a region's frontend address is not its guest-physical address")
        old, self.mem = self.mem, mem
        if old is not None:
            old.close()
        self.ctrl = ServedController(mem.guest, self.ns, self.max_qid, self.event_fd, self.fatal_fd)

    def _check(self, a: N.Attach) -> None:
        if self.ctrl is None:
            raise ProtocolError("EXITLESS_NVME_ATTACH_QP before SET_MEM_TABLE")
        mem = self.ctrl.mem
        for what, q in (("SQ", a.sqid), ("CQ", a.cqid)):
            if not 1 <= q <= self.max_qid:
                raise ProtocolError(f"ATTACH_QP: {what} id {q} (1..{self.max_qid})")
        if a.sqid in self.pairs:
            raise ProtocolError(f"ATTACH_QP: SQ {a.sqid} is served already")
        if any(self.ctrl.sqs[s].cqid == a.cqid for s in self.pairs):
            raise ProtocolError(f"ATTACH_QP: CQ {a.cqid} is served already, for another SQ")
        for what, size in (("SQ", a.sq_size), ("CQ", a.cq_size)):
            if not 2 <= size <= MAX_QUEUE_ENTRIES:
                raise ProtocolError(f"ATTACH_QP: {what} of {size} entries (2..{MAX_QUEUE_ENTRIES})")
        if a.sq_head >= a.sq_size or a.sq_tail >= a.sq_size or a.cq_head >= a.cq_size or \
                a.cq_tail >= a.cq_size or a.cq_phase > 1:
            raise ProtocolError(f"ATTACH_QP: SQ head/tail {a.sq_head}/{a.sq_tail} of {a.sq_size}, CQ head/tail/phase "
                                f"{a.cq_head}/{a.cq_tail}/{a.cq_phase} of {a.cq_size}")
        areas = (("SQ", a.sq_base, a.sq_size * K.SQ_ENTRY_SIZE), ("CQ", a.cq_base, a.cq_size * K.CQ_ENTRY_SIZE),
                 ("shadow doorbell page", a.shadow, K.PAGE_SIZE), ("EventIdx page", a.event_idx, K.PAGE_SIZE))
        for what, gpa, length in areas:
            if gpa % K.PAGE_SIZE or not mem.contains(gpa, length):
                raise ProtocolError(f"ATTACH_QP: the {what} at {gpa:#x} (+{length:#x}) is not page-aligned "
                                    "inside the memory table")
        if self.pairs and self.ctrl.dbbuf != (a.shadow, a.event_idx):
            raise ProtocolError("ATTACH_QP: shadow doorbell / EventIdx pages differ from those of the pairs served")

    def _attach(self, msg: Message) -> None:
        a = N.attach(msg)
        self._check(a)
        for fd in msg.fds:               # checked while the caller still closes them on an error
            _eventfd(fd, "ATTACH_QP: irqfd/wake fd")
        fds, msg.fds = msg.fds, []
        ctrl = self.ctrl
        irqfd = fds.pop(0) if a.flags & N.F_IRQFD else None
        wake = fds.pop(0) if a.flags & N.F_WAKE else None
        sq = SubmissionQueue(a.sqid, a.sq_base, a.sq_size, a.cqid, a.sq_head, a.sq_tail, a.sq_shadow_seen)
        cq = CompletionQueue(a.cqid, a.cq_base, a.cq_size, irqfd is not None, 0, a.cq_head, a.cq_tail, a.cq_phase,
                             a.cq_shadow_seen, [sq])
        with ctrl.lock:
            if not self.pairs:
                ctrl.dbbuf = (a.shadow, a.event_idx)
                ctrl.shadow = ctrl.mem.view(a.shadow, K.PAGE_SIZE).cast("I")
                ctrl.event_idx = ctrl.mem.view(a.event_idx, K.PAGE_SIZE).cast("I")
            ctrl.sqs[a.sqid], ctrl.cqs[a.cqid] = sq, cq
            if irqfd is not None:
                ctrl.irqfds[a.cqid] = irqfd
            ctrl.features[K.FEAT_VOLATILE_WRITE_CACHE] = int(bool(a.flags & N.F_VWC))
            ctrl.disarm(a.sqid)          # park EventIdx now: the driver stops ringing at once
        p = QueuePairPollable(ctrl, a.sqid, wake, ctrl)
        loop = self.dataplane
        if loop.mode != "poll" and wake is None:   # an adaptive loop sleeps: a pair it cannot wake is polled
            if self._own is None:
                self._own = SidecoreThread(SidecoreLoop([], "poll", poll_ns=self.poll_ns,
                                                        name=f"sidecore-{self.name}-poll")).start()
            loop = self._own.loop
        self.pairs[a.sqid] = (p, loop, wake)
        loop.attach([p])
        log.info("sidecore: %s serves NVMe SQ %d / CQ %d (%d/%d entries%s)", self.name, a.sqid, a.cqid, a.sq_size,
                 a.cq_size, ", woken by its doorbells" if wake is not None and loop is self.dataplane else ", polled")

    def _detach(self, sqid: int) -> bytes:
        if sqid not in self.pairs:
            raise ProtocolError(f"DETACH_QP: SQ {sqid} is not served")
        self._take_off(sqid)
        ctrl = self.ctrl
        with ctrl.lock:
            sq = ctrl.sqs.pop(sqid)
            cq = ctrl.cqs.pop(sq.cqid)
            fd = ctrl.irqfds.pop(cq.cqid, None)
            if fd is not None:
                os.close(fd)
        delta = self._delta()
        return P.encode(N.EXITLESS_NVME_DETACH_QP, N.encode_state(N.State(
            sq.head, sq.tail, sq.shadow_seen, cq.head, cq.tail, cq.phase, cq.shadow_seen, delta)), reply=True)

    def _delta(self) -> dict:
        """The counters (:data:`~exitless.sidecore.nvme_protocol.COUNTERS`) since the previous call."""
        ctrl = self.ctrl
        if ctrl is None:
            return {}
        with ctrl.lock:
            now = {k: ctrl.stats.get(k, ctrl.smart.get(k, 0)) for k in N.COUNTERS}
        delta = {k: v - self._reported.get(k, 0) for k, v in now.items()}
        self._reported = now
        self.completed += delta["io_commands"]
        return delta

    def _take_off(self, sqid: int) -> None:
        """Take pair ``sqid`` off its loop; from the return on, the loop does not touch it."""
        p, loop, wake = self.pairs.pop(sqid)
        if not loop.detach([p], timeout=10):
            log.error("sidecore: %s: the loop did not let go of SQ %d (stuck in host I/O); its memory stays "
                      "mapped", self.name, sqid)
            self._leaked = True
            raise ProtocolError(f"DETACH_QP: SQ {sqid}: the loop did not let go")
        if wake is not None:
            os.close(wake)

    # -- end --------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Take every pair off the loop, then unmap the memory and close every fd (idempotent)."""
        for sqid in list(self.pairs):
            try:
                self._take_off(sqid)
            except ProtocolError:
                pass
        if self._own is not None:
            self._own.stop()
            self._own = None
        if self.ctrl is not None:
            self.completed += self.ctrl.stats["io_commands"] - self._reported.get("io_commands", 0)
            for fd in self.ctrl.irqfds.values():
                os.close(fd)
            self.ctrl.irqfds = {}
            self.ctrl.shadow = self.ctrl.event_idx = None
            self.ctrl.sqs, self.ctrl.cqs = {}, {}
            self.ctrl = None
        if self.mem is not None and not self._leaked:
            self.mem.close()
        self.mem = None
        if self.ns is not None:
            self.ns.close()
            self.ns = None
        for name in ("event_fd", "fatal_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
            setattr(self, name, -1)


def open_session(msg: Message, name: str, dataplane: SidecoreLoop, poll_ns: int) -> NvmeQueueSession:
    """The service's factory for an EXITLESS_NVME_SET_BACKEND connection (:data:`exitless.sidecore.service.FAMILIES`).
    Raises ProtocolError for a first message it refuses (a namespace its fds cannot back included)."""
    try:
        return NvmeQueueSession(msg, name, dataplane, poll_ns=poll_ns)
    except NamespaceError as e:
        raise ProtocolError(f"{msg.name}: {e}") from None
