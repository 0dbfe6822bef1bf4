"""The NVMe controller (NVMe 1.4): registers, admin and I/O queues, commands, shadow doorbells.

Transport-independent: the controller sees guest RAM (:class:`GuestMemory`), a
:class:`Namespace`, and two callbacks — ``irq(cq)`` to signal a completion
queue's vector (``cq`` None: re-evaluate the INTx level after a CQ head moved)
and a ``listener`` told when an I/O queue's doorbells become shadowed (after
Doorbell Buffer Config) or stop being so.  :mod:`.pci` puts it on PCI and
wires the I/O paths.

Doorbells arrive two ways: :meth:`write_register` (an MMIO write, the value
known) and :meth:`service_queue` (a sidecore found a new value in the shadow
doorbell page).  Every doorbell value is checked (an SQ tail or CQ head must be
below the queue size, a CQ head cannot pass entries not yet posted): a bad one
is ignored and reported as an asynchronous event, as §5.2 prescribes.

Shadow doorbells (§5.7, Doorbell Buffer Config, opcode 0x7C): PRP1 is the
shadow doorbell page, PRP2 the EventIdx page; slot ``2y`` is SQ y's tail, ``2y+1``
CQ y's head.  Only I/O queues use them (Linux never shadows the admin queue).
EventIdx policy, chosen by the transport:

- *ring* (``park_event_idx`` False: trap, ioeventfd, adaptive asleep): EventIdx =
  the last value seen, so the driver's next write rings; after publishing it the
  controller fences and re-reads the shadow slot (the driver stores the slot,
  fences, then reads EventIdx — one side always sees the other).
- *parked* (poll, adaptive while busy): EventIdx = last seen − 1 (mod queue
  size), written as soon as a value is read: the driver can be at most size−1
  entries past it, so no window ``[old, new)`` it writes contains it (also
  across the wrap of the 0..size−1 indices): the driver never rings, the
  sidecore polls the shadow page.

A completion queue's EventIdx is parked unless a submission queue waits for
room in it (CQ full); then it is armed the same way (publish, fence, re-read:
the order QEMU got wrong before 7.2.1).

Split controller (``exitless sidecore``): ``remote`` names the I/O queue pairs another process
serves; their doorbells are not run here, and the listener takes a pair back (``dbbuf_unbound``)
before it is deleted, the controller reset or the shadow pages changed.

Failures: a command gets its spec status (with DNR); an admin queue or
completion queue the controller cannot access puts it in the fatal state
(CSTS.CFS) until the driver resets it.  Nothing touches host memory outside
guest RAM: every access goes through ``GuestMemory``'s checked views.
"""
from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable

from ...memory import GuestMemory, GuestMemoryError
from ...sidecore.spin import fence
from . import constants as K
from .identify import firmware_slot_log, identify_controller, identify_namespace, ns_id_descriptors, smart_log
from .namespace import Namespace
from .prp import PrpError, prp_segments

from ..virtio.device import RateLimitedLog

log = logging.getLogger(__name__)
# Exceptions are logged as str(e): a record holding the exception would keep its traceback's
# frames alive (the vCPU thread's, with views onto the kvm_run page) wherever records are kept.

HELD = object()   # an Asynchronous Event Request: completed later, when an event happens


@dataclass
class SubmissionQueue:
    sqid: int
    base: int          # guest-physical
    size: int          # entries
    cqid: int
    head: int = 0      # next entry the controller fetches
    tail: int = 0      # the driver's last tail doorbell value
    shadow_seen: int = 0   # raw last value read from the shadow slot (a bad one is not re-read in a loop)


@dataclass
class CompletionQueue:
    cqid: int
    base: int
    size: int
    ien: bool
    iv: int
    head: int = 0      # the driver's last head doorbell value
    tail: int = 0      # next entry the controller posts
    phase: int = 1
    shadow_seen: int = 0
    sqs: list[SubmissionQueue] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return (self.tail + 1) % self.size == self.head


class _NoListener:
    def dbbuf_bound(self, qid: int) -> None: ...
    def dbbuf_unbound(self, qid: int) -> None: ...
    def write_cache_changed(self) -> None: ...


class NvmeController:
    """``NvmeController(mem, namespace, max_io_queues=4, num_vectors=5, irq=..., listener=...)``.

    ``max_io_queues`` I/O queue pairs (1..64) besides the admin pair; ``num_vectors``
    interrupt vectors a CQ may name (MSI-X table size).
    """

    MQES = 1023                 # CAP.MQES: largest queue, 0's based
    MDTS = 6                    # Identify MDTS: 2^6 pages = 256 KiB per command
    TO = 20                     # CAP.TO: 10 s in 500 ms units
    AERL = 3                    # four outstanding Asynchronous Event Requests
    ACL = 3
    MAX_DSM_RANGES = 256

    def __init__(self, mem: GuestMemory, namespace: Namespace, *, max_io_queues: int = 4, num_vectors: int = 5,
                 irq: Callable[[CompletionQueue | None], None] = lambda cq: None, listener=None):
        if not 1 <= max_io_queues <= 64:
            raise ValueError(f"NVMe: {max_io_queues} I/O queues (1..64)")
        self.mem = mem
        self.ns = namespace
        self.max_io_queues = max_io_queues
        self.num_vectors = num_vectors
        self.irq = irq
        self.listener = listener or _NoListener()
        self.park_event_idx = False
        self.lock = threading.RLock()
        self.log = RateLimitedLog(log)    # for what the guest can trigger at will
        self.cap = (self.MQES | 1 << 16 | self.TO << 24 | 1 << 37)   # CQR, TO, DSTRD 0, CSS NVM, MPS 4 KiB
        # mmio_doorbells counts every trapped doorbell write, io_mmio_doorbells those of I/O queues only
        # (the admin queue always traps); io_commands the I/O queues' commands: their ratio is the
        # MMIO doorbell writes per I/O a driver paid on the trap path (ioeventfd writes never get here)
        self.stats = {"commands": 0, "io_commands": 0, "dbbuf_configs": 0, "mmio_doorbells": 0,
                      "io_mmio_doorbells": 0, "shadow_doorbells": 0, "bad_doorbells": 0, "fatal": 0,
                      "read_bytes": 0, "write_bytes": 0}
        self.smart = {"data_units_read": 0, "data_units_written": 0, "host_reads": 0, "host_writes": 0}
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        # I/O queue pairs served elsewhere (``exitless sidecore``): SQ id -> its CQ id.  Their state here
        # is stale until taken back (the listener's dbbuf_unbound), so their doorbells are not ours
        self.remote: dict[int, int] = {}
        self.shadow = self.event_idx = None     # u32 views of the shadow doorbell and EventIdx pages
        self._reset_registers()
        self._id_ctrl = identify_controller(namespace, mdts=self.MDTS, acl=self.ACL, aerl=self.AERL)

    # -- state -------------------------------------------------------------------------------
    def _reset_registers(self) -> None:
        self.cc = 0
        self.csts = 0
        self.aqa = self.asq = self.acq = 0
        self.intms = 0
        self._reset_queues()

    def _reset_queues(self) -> None:
        """Controller reset (§7.3.2): I/O queues deleted, shadow doorbells forgotten, AERs dropped."""
        if self.shadow is not None:
            for qid in self.sqs:
                if qid:
                    self.listener.dbbuf_unbound(qid)
        self.sqs = {}
        self.cqs = {}
        self.remote = {}
        self.shadow = self.event_idx = None
        self.dbbuf = (0, 0)
        self.aers: list[int] = []           # CIDs of outstanding Asynchronous Event Requests
        self.events: list[int] = []         # event DW0s not yet reported
        self.features = {K.FEAT_ARBITRATION: 0, K.FEAT_POWER_MANAGEMENT: 0, K.FEAT_TEMPERATURE_THRESHOLD: 0x157,
                         K.FEAT_ERROR_RECOVERY: 0, K.FEAT_VOLATILE_WRITE_CACHE: 1,
                         K.FEAT_INTERRUPT_COALESCING: 0, K.FEAT_WRITE_ATOMICITY: 0,
                         K.FEAT_ASYNC_EVENT_CONFIG: 0}
        self.ivc: dict[int, int] = {}

    @property
    def ready(self) -> bool:
        return bool(self.csts & K.CSTS_RDY) and not self.csts & K.CSTS_CFS

    def remote_bad_doorbell(self, why: str) -> None:
        """Where a pair is served elsewhere: it found a bad shadow doorbell value (the asynchronous event
        is this controller's to send)."""
        with self.lock:
            self._bad_doorbell(K.AER_INFO_INVALID_DOORBELL_VALUE, why)

    def remote_fatal(self, why: str) -> None:
        """Where a pair is served elsewhere: it cannot go on (CSTS.CFS until the driver resets)."""
        with self.lock:
            self._fatal(why)

    def _fatal(self, why: str) -> None:
        self.log(logging.WARNING, "NVMe controller fatal status (CSTS.CFS): %s", why)
        self.stats["fatal"] += 1
        self.csts |= K.CSTS_CFS

    # -- registers (BAR0) -------------------------------------------------------------------------
    def read_register(self, offset: int, size: int) -> int:
        """A register read of ``size`` bytes (4 or 8) at BAR0 ``offset``."""
        with self.lock:
            regs = {K.REG_CAP: self.cap, K.REG_VS: K.VS_1_4, K.REG_INTMS: self.intms, K.REG_INTMC: self.intms,
                    K.REG_CC: self.cc, K.REG_CSTS: self.csts, K.REG_AQA: self.aqa, K.REG_ASQ: self.asq,
                    K.REG_ACQ: self.acq}
            base = offset & ~7 if (offset & ~7) in (K.REG_CAP, K.REG_ASQ, K.REG_ACQ) else offset
            value = regs.get(base, 0) >> (8 * (offset - base))
            return value & ((1 << (8 * size)) - 1)

    def write_register(self, offset: int, size: int, value: int) -> None:
        """A register or doorbell write from the driver (MMIO)."""
        if offset >= K.DOORBELL_BASE:
            if size == 4 and offset % 4 == 0:
                self._mmio_doorbell((offset - K.DOORBELL_BASE) // K.DOORBELL_STRIDE, value)
            return
        with self.lock:
            if size == 8 and offset in (K.REG_ASQ, K.REG_ACQ):
                self._write32(offset, value & 0xFFFFFFFF)
                self._write32(offset + 4, value >> 32)
            elif size == 4:
                self._write32(offset, value)

    def _write32(self, offset: int, value: int) -> None:
        enabled = self.cc & K.CC_EN
        if offset == K.REG_INTMS:
            self.intms |= value
            self.irq(None)
        elif offset == K.REG_INTMC:
            self.intms &= ~value
            self.irq(None)
        elif offset == K.REG_CC:
            self._write_cc(value)
        elif enabled:
            return          # AQA/ASQ/ACQ may change only while the controller is disabled
        elif offset == K.REG_AQA:
            self.aqa = value & 0x0FFF_0FFF
        elif offset in (K.REG_ASQ, K.REG_ASQ + 4, K.REG_ACQ, K.REG_ACQ + 4):
            name = "asq" if offset < K.REG_ACQ else "acq"
            cur = getattr(self, name)
            cur = (cur & ~0xFFFFFFFF) | value if offset % 8 == 0 else (cur & 0xFFFFFFFF) | (value << 32)
            setattr(self, name, cur & ~0xFFF)   # bits 11:0 are reserved: the queues are page-aligned

    def _write_cc(self, value: int) -> None:
        old = self.cc
        self.cc = value
        if value & K.CC_EN and not old & K.CC_EN:
            self._enable()
        elif old & K.CC_EN and not value & K.CC_EN:
            self._reset_queues()
            self.csts = 0
        shn = (value >> K.CC_SHN_SHIFT) & 3
        if shn and not (old >> K.CC_SHN_SHIFT) & 3:
            try:
                self.ns.flush()
            except OSError as e:
                log.error("NVMe shutdown: flush of %s failed: %s", self.ns.path, str(e))
            self.csts = (self.csts & ~(3 << K.CSTS_SHST_SHIFT)) | (K.SHST_COMPLETE << K.CSTS_SHST_SHIFT)
        elif not shn:
            self.csts &= ~(3 << K.CSTS_SHST_SHIFT)

    def _enable(self) -> None:
        asqs, acqs = (self.aqa & 0xFFF) + 1, ((self.aqa >> 16) & 0xFFF) + 1
        css, mps = (self.cc >> K.CC_CSS_SHIFT) & 7, (self.cc >> K.CC_MPS_SHIFT) & 0xF
        why = None
        if css != 0:
            why = f"CC.CSS {css}: only the NVM command set"
        elif mps != 0:
            why = f"CC.MPS {mps}: only 4 KiB pages"
        elif asqs < 2 or acqs < 2:
            why = f"admin queue sizes {asqs}/{acqs} (AQA): at least 2 entries"
        elif not self.mem.contains(self.asq, asqs * K.SQ_ENTRY_SIZE) or \
                not self.mem.contains(self.acq, acqs * K.CQ_ENTRY_SIZE):
            why = f"admin queues at ASQ {self.asq:#x} / ACQ {self.acq:#x} are outside guest RAM"
        if why:
            self._fatal(why)
            return
        cq = CompletionQueue(0, self.acq, acqs, True, 0)
        sq = SubmissionQueue(0, self.asq, asqs, 0)
        cq.sqs.append(sq)
        self.cqs[0], self.sqs[0] = cq, sq
        self.csts = K.CSTS_RDY

    # -- doorbells ---------------------------------------------------------------------------------
    def _mmio_doorbell(self, index: int, value: int) -> None:
        with self.lock:
            if not self.ready:
                return
            self.stats["mmio_doorbells"] += 1
            qid, is_cq = index >> 1, index & 1
            if qid:
                self.stats["io_mmio_doorbells"] += 1
                if (qid in self.remote.values()) if is_cq else (qid in self.remote):
                    # the pair is served elsewhere from the shadow slot, which the driver wrote first (§5.7);
                    # running it here too would race the service
                    return
            if is_cq:
                cq = self.cqs.get(qid)
                if cq is None:
                    self._bad_doorbell(K.AER_INFO_INVALID_DOORBELL_REGISTER, f"CQ {qid} head doorbell: no such queue")
                    return
                self._set_cq_head(cq, value)
                self.irq(None)
                for sq in cq.sqs:
                    self._run(sq)
            else:
                sq = self.sqs.get(qid)
                if sq is None:
                    self._bad_doorbell(K.AER_INFO_INVALID_DOORBELL_REGISTER, f"SQ {qid} tail doorbell: no such queue")
                    return
                if value >= sq.size:
                    self._bad_doorbell(K.AER_INFO_INVALID_DOORBELL_VALUE, f"SQ {qid} tail {value} >= size {sq.size}")
                    return
                sq.tail = value
                if self.shadow is not None and qid:
                    self.service_queue(qid)
                else:
                    self._run(sq)

    def _set_cq_head(self, cq: CompletionQueue, value: int) -> bool:
        """Accept a CQ head doorbell value if it lies in [head, tail] (cyclically)."""
        if value >= cq.size or (value - cq.head) % cq.size > (cq.tail - cq.head) % cq.size:
            self._bad_doorbell(K.AER_INFO_INVALID_DOORBELL_VALUE,
                               f"CQ {cq.cqid} head {value} outside [{cq.head}, {cq.tail}] (size {cq.size})")
            return False
        cq.head = value
        return True

    def _bad_doorbell(self, info: int, why: str) -> None:
        self.stats["bad_doorbells"] += 1
        self.log(logging.WARNING, "NVMe: ignored doorbell write: %s", why)
        self._event(K.AER_TYPE_ERROR | info << 8 | K.LOG_ERROR_INFORMATION << 16)

    def service_queue(self, qid: int) -> int:
        """Take I/O queue pair ``qid``'s shadow doorbells (SQ tail, CQ head) and run its SQ.

        Called by a sidecore (and by the MMIO path once shadow doorbells exist).
        Returns the number of commands completed.  In *ring* mode it ends with the
        publish-EventIdx / fence / re-read handshake, so no write goes unseen.
        """
        with self.lock:
            sq = self.sqs.get(qid)
            if sq is None or self.shadow is None or not self.ready:
                return 0
            cq = self.cqs[sq.cqid]
            done = 0
            while True:
                self._read_shadow(sq, cq)
                done += self._run(sq)
                if self.park_event_idx:
                    return done
                self.event_idx[2 * qid] = sq.tail
                stalled = sq.head != sq.tail and cq.full
                self.event_idx[2 * cq.cqid + 1] = cq.head if stalled else (cq.head - 1) % cq.size
                fence()
                if self.shadow[2 * qid] == sq.shadow_seen and \
                        (not stalled or self.shadow[2 * cq.cqid + 1] == cq.shadow_seen):
                    return done

    def _read_shadow(self, sq: SubmissionQueue, cq: CompletionQueue) -> None:
        tail = self.shadow[2 * sq.sqid]
        if tail != sq.shadow_seen:
            sq.shadow_seen = tail
            if tail >= sq.size:
                self._bad_doorbell(K.AER_INFO_INVALID_DOORBELL_VALUE, f"SQ {sq.sqid} shadow tail {tail}")
            else:
                self.stats["shadow_doorbells"] += 1
                sq.tail = tail
        if cq.cqid:
            head = self.shadow[2 * cq.cqid + 1]
            if head != cq.shadow_seen:
                cq.shadow_seen = head
                if self._set_cq_head(cq, head):
                    self.irq(None)
        if self.park_event_idx:
            # Park at once, not after running the queue: the driver may move up to size-1 entries
            # past what we consumed, and only an EventIdx based on the value just read stays out
            # of every window [old, new) it can then write.
            self._park(sq, cq)

    def _park(self, sq: SubmissionQueue, cq: CompletionQueue) -> None:
        self.event_idx[2 * sq.sqid] = (sq.tail - 1) % sq.size
        self.event_idx[2 * cq.cqid + 1] = (cq.head - 1) % cq.size

    def arm(self, qid: int) -> bool:
        """Before a sidecore sleeps: EventIdx = last seen (the CQ's only if an SQ waits for room), fence,
        re-read; True if the driver wrote meanwhile (process again instead of sleeping)."""
        with self.lock:
            sq = self.sqs.get(qid)
            if sq is None or self.shadow is None or not self.ready:
                return False
            cq = self.cqs[sq.cqid]
            stalled = sq.head != sq.tail
            self.event_idx[2 * qid] = sq.tail
            if stalled:
                self.event_idx[2 * cq.cqid + 1] = cq.head
            fence()
            return self.shadow[2 * qid] != sq.shadow_seen or \
                (stalled and self.shadow[2 * cq.cqid + 1] != cq.shadow_seen)

    def disarm(self, qid: int) -> None:
        with self.lock:
            sq = self.sqs.get(qid)
            if sq is not None and self.shadow is not None:
                self._park(sq, self.cqs[sq.cqid])

    def shadow_words(self, qid: int) -> list[tuple[int, int]]:
        """``(shadow slot index, value already consumed)`` of queue pair ``qid``: what a poller watches."""
        with self.lock:
            sq = self.sqs.get(qid)
            if sq is None or self.shadow is None or not self.ready:
                return []
            cq = self.cqs[sq.cqid]
            return [(2 * qid, sq.shadow_seen), (2 * cq.cqid + 1, cq.shadow_seen)]

    # -- the command loop -------------------------------------------------------------------------
    def _run(self, sq: SubmissionQueue) -> int:
        """Fetch and execute SQ entries while there are some and the CQ has room (lock held)."""
        cq = self.cqs[sq.cqid]
        done = 0
        while sq.head != sq.tail and self.ready:
            if cq.full:
                if cq.cqid and self.shadow is not None:
                    self._read_shadow(sq, cq)
                if cq.full:
                    break
            try:
                cmd = self.mem.view(sq.base + sq.head * K.SQ_ENTRY_SIZE, K.SQ_ENTRY_SIZE).cast("I").tolist()
            except GuestMemoryError:
                self._fatal(f"SQ {sq.sqid} entry {sq.head} is outside guest RAM")
                break
            sq.head = (sq.head + 1) % sq.size
            self.stats["commands"] += 1
            if sq.sqid:
                self.stats["io_commands"] += 1
            cid = cmd[0] >> 16
            try:
                result = self._admin(cmd) if sq.sqid == 0 else self._io(cmd)
            except OSError as e:
                # a failing disk can fail every command: rate-limited like any guest-triggered message
                self.log(logging.ERROR, "NVMe: I/O error on %s: %s", self.ns.path, str(e))
                result = (self._io_error_status(cmd) if sq.sqid else K.SC_INTERNAL_ERROR, 0)
            if result is HELD:
                continue
            status, dw0 = result
            if not self._post(cq, sq, cid, status, dw0):
                break
            done += 1
        if done:
            self.irq(cq)
        return done

    def _post(self, cq: CompletionQueue, sq: SubmissionQueue, cid: int, status: int, dw0: int) -> bool:
        try:
            entry = self.mem.view(cq.base + cq.tail * K.CQ_ENTRY_SIZE, K.CQ_ENTRY_SIZE).cast("I")
        except GuestMemoryError:
            self._fatal(f"CQ {cq.cqid} entry {cq.tail} is outside guest RAM")
            return False
        entry[0] = dw0 & 0xFFFFFFFF
        entry[1] = 0
        entry[2] = sq.head | sq.sqid << 16
        dnr = 1 if status else 0
        # DW3 last, in one store: the phase tag tells the driver the entry is complete
        entry[3] = cid | cq.phase << 16 | (status & 0xFF) << 17 | ((status >> 8) & 7) << 25 | dnr << 31
        cq.tail += 1
        if cq.tail == cq.size:
            cq.tail = 0
            cq.phase ^= 1
        return True

    # -- asynchronous events (§5.2) ---------------------------------------------------------------
    def _event(self, dw0: int) -> None:
        if dw0 in self.events or len(self.events) >= 8:
            return          # the spec masks an event type until its log page is read: keep one of each
        self.events.append(dw0)
        self._deliver_events()

    def _deliver_events(self) -> None:
        cq, sq = self.cqs.get(0), self.sqs.get(0)
        posted = False
        while self.aers and self.events and cq is not None and not cq.full:
            if not self._post(cq, sq, self.aers.pop(0), K.SC_SUCCESS, self.events.pop(0)):
                return
            posted = True
        if posted:
            self.irq(cq)

    # -- admin commands (§5) ------------------------------------------------------------------------
    def _admin(self, cmd: list[int]):
        op = cmd[0] & 0xFF
        if (cmd[0] >> 8) & 3 or (cmd[0] >> 14) & 3:
            return K.SC_INVALID_FIELD, 0          # fused operations and SGLs are not supported
        handler = {
            K.ADMIN_DELETE_SQ: self._delete_sq, K.ADMIN_CREATE_SQ: self._create_sq,
            K.ADMIN_GET_LOG_PAGE: self._get_log_page, K.ADMIN_DELETE_CQ: self._delete_cq,
            K.ADMIN_CREATE_CQ: self._create_cq, K.ADMIN_IDENTIFY: self._identify,
            K.ADMIN_ABORT: lambda c: (K.SC_SUCCESS, 1),            # bit 0: the command was not aborted
            K.ADMIN_SET_FEATURES: self._set_features, K.ADMIN_GET_FEATURES: self._get_features,
            K.ADMIN_ASYNC_EVENT_REQUEST: self._async_event_request,
            K.ADMIN_DOORBELL_BUFFER_CONFIG: self._doorbell_buffer_config,
        }.get(op)
        if handler is None:
            return K.SC_INVALID_OPCODE, 0
        return handler(cmd)

    @staticmethod
    def _prps(cmd: list[int]) -> tuple[int, int]:
        return cmd[6] | cmd[7] << 32, cmd[8] | cmd[9] << 32

    def _to_host(self, cmd: list[int], data: bytes) -> tuple[int, int]:
        """Copy a controller-to-host structure into the command's PRPs."""
        prp1, prp2 = self._prps(cmd)
        try:
            segs = prp_segments(self.mem, prp1, prp2, len(data))
        except PrpError as e:
            self.log(logging.WARNING, "NVMe admin command %#x: %s", cmd[0] & 0xFF, str(e))
            return e.status, 0
        pos = 0
        for gpa, n in segs:
            self.mem.write(gpa, data[pos:pos + n])
            pos += n
        return K.SC_SUCCESS, 0

    def _create_cq(self, cmd):
        qid, qsize = cmd[10] & 0xFFFF, (cmd[10] >> 16) + 1
        pc, ien, iv = cmd[11] & 1, bool(cmd[11] & 2), cmd[11] >> 16
        prp1 = self._prps(cmd)[0]
        if not 1 <= qid <= self.max_io_queues or qid in self.cqs:
            return K.SC_INVALID_QUEUE_IDENTIFIER, 0
        if qsize < 2 or qsize > self.MQES + 1:
            return K.SC_INVALID_QUEUE_SIZE, 0
        if iv >= self.num_vectors:
            return K.SC_INVALID_INTERRUPT_VECTOR, 0
        if not pc or (self.cc >> K.CC_IOCQES_SHIFT) & 0xF != K.CQES_LOG2:
            return K.SC_INVALID_FIELD, 0       # CAP.CQR: physically contiguous only; CC.IOCQES must be 16 bytes
        if prp1 % K.PAGE_SIZE:
            return K.SC_PRP_OFFSET_INVALID, 0
        if not self.mem.contains(prp1, qsize * K.CQ_ENTRY_SIZE):
            return K.SC_INVALID_FIELD, 0
        self.cqs[qid] = CompletionQueue(qid, prp1, qsize, ien, iv)
        return K.SC_SUCCESS, 0

    def _create_sq(self, cmd):
        qid, qsize = cmd[10] & 0xFFFF, (cmd[10] >> 16) + 1
        pc, cqid = cmd[11] & 1, cmd[11] >> 16
        prp1 = self._prps(cmd)[0]
        if not 1 <= qid <= self.max_io_queues or qid in self.sqs:
            return K.SC_INVALID_QUEUE_IDENTIFIER, 0
        if cqid == 0 or cqid not in self.cqs:
            return K.SC_COMPLETION_QUEUE_INVALID, 0
        if qsize < 2 or qsize > self.MQES + 1:
            return K.SC_INVALID_QUEUE_SIZE, 0
        if not pc or (self.cc >> K.CC_IOSQES_SHIFT) & 0xF != K.SQES_LOG2:
            return K.SC_INVALID_FIELD, 0
        if prp1 % K.PAGE_SIZE:
            return K.SC_PRP_OFFSET_INVALID, 0
        if not self.mem.contains(prp1, qsize * K.SQ_ENTRY_SIZE):
            return K.SC_INVALID_FIELD, 0
        sq = SubmissionQueue(qid, prp1, qsize, cqid)
        self.sqs[qid] = sq
        self.cqs[cqid].sqs.append(sq)
        if self.shadow is not None:
            self._bind_shadow(sq)
        return K.SC_SUCCESS, 0

    def _delete_sq(self, cmd):
        qid = cmd[10] & 0xFFFF
        if qid == 0 or qid not in self.sqs:
            return K.SC_INVALID_QUEUE_IDENTIFIER, 0
        if self.shadow is not None:
            self.listener.dbbuf_unbound(qid)     # first: a pair served elsewhere comes back before it goes
        sq = self.sqs.pop(qid)
        self.cqs[sq.cqid].sqs.remove(sq)
        return K.SC_SUCCESS, 0

    def _delete_cq(self, cmd):
        qid = cmd[10] & 0xFFFF
        if qid == 0 or qid not in self.cqs:
            return K.SC_INVALID_QUEUE_IDENTIFIER, 0
        if self.cqs[qid].sqs:
            return K.SC_INVALID_QUEUE_DELETION, 0
        del self.cqs[qid]
        return K.SC_SUCCESS, 0

    def _doorbell_buffer_config(self, cmd):
        prp1, prp2 = self._prps(cmd)
        if prp1 % K.PAGE_SIZE or prp2 % K.PAGE_SIZE or not prp1 or not prp2 or \
                not self.mem.contains(prp1, K.PAGE_SIZE) or not self.mem.contains(prp2, K.PAGE_SIZE):
            self.log(logging.WARNING, "NVMe Doorbell Buffer Config: shadow %#x / EventIdx %#x must be page-aligned guest RAM",
                        prp1, prp2)
            return K.SC_INVALID_FIELD, 0
        if self.shadow is not None:
            for qid in self.sqs:
                if qid:
                    self.listener.dbbuf_unbound(qid)
        self.dbbuf = (prp1, prp2)
        self.shadow = self.mem.view(prp1, K.PAGE_SIZE).cast("I")
        self.event_idx = self.mem.view(prp2, K.PAGE_SIZE).cast("I")
        self.stats["dbbuf_configs"] += 1
        for sq in list(self.sqs.values()):
            if sq.sqid:
                self._bind_shadow(sq)
        log.info("NVMe: shadow doorbells at %#x, EventIdx at %#x", prp1, prp2)
        return K.SC_SUCCESS, 0

    def _bind_shadow(self, sq: SubmissionQueue) -> None:
        """Seed an I/O queue pair's shadow and EventIdx slots with the current doorbell values."""
        cq = self.cqs[sq.cqid]
        self.shadow[2 * sq.sqid] = sq.shadow_seen = sq.tail
        self.shadow[2 * cq.cqid + 1] = cq.shadow_seen = cq.head
        if self.park_event_idx:
            self._park(sq, cq)
        else:
            self.event_idx[2 * sq.sqid] = sq.tail
            self.event_idx[2 * cq.cqid + 1] = (cq.head - 1) % cq.size
        self.listener.dbbuf_bound(sq.sqid)

    def _async_event_request(self, cmd):
        if len(self.aers) > self.AERL:
            return K.SC_ASYNC_EVENT_LIMIT_EXCEEDED, 0
        self.aers.append(cmd[0] >> 16)
        if self.events:
            # deliver after this command's slot is accounted for: the caller posts nothing for HELD
            self._deliver_events()
        return HELD

    # -- features (§5.21) -------------------------------------------------------------------------
    def _set_features(self, cmd):
        fid, save = cmd[10] & 0xFF, cmd[10] >> 31
        if save:
            return K.SC_FEATURE_NOT_SAVEABLE, 0
        value = cmd[11]
        if fid == K.FEAT_NUMBER_OF_QUEUES:
            if value & 0xFFFF == 0xFFFF or value >> 16 == 0xFFFF:
                return K.SC_INVALID_FIELD, 0
            n = self.max_io_queues - 1
            return K.SC_SUCCESS, n << 16 | n
        if fid == K.FEAT_INTERRUPT_VECTOR_CONFIG:
            if value & 0xFFFF >= self.num_vectors:
                return K.SC_INVALID_FIELD, 0
            self.ivc[value & 0xFFFF] = value
            return K.SC_SUCCESS, 0
        if fid not in self.features:
            return K.SC_INVALID_FIELD, 0
        self.features[fid] = value & 1 if fid == K.FEAT_VOLATILE_WRITE_CACHE else value
        changed = getattr(self.listener, "write_cache_changed", None)   # (a listener may not care)
        if fid == K.FEAT_VOLATILE_WRITE_CACHE and changed is not None:
            changed()
        return K.SC_SUCCESS, 0

    def _get_features(self, cmd):
        fid, sel = cmd[10] & 0xFF, (cmd[10] >> 8) & 7
        if sel == 3:          # supported capabilities: none saveable, none namespace-specific, all changeable
            return (K.SC_SUCCESS, 0b100) if fid in self.features or fid in (
                K.FEAT_NUMBER_OF_QUEUES, K.FEAT_INTERRUPT_VECTOR_CONFIG) else (K.SC_INVALID_FIELD, 0)
        if sel > 3:
            return K.SC_INVALID_FIELD, 0
        if fid == K.FEAT_NUMBER_OF_QUEUES:
            n = self.max_io_queues - 1
            return K.SC_SUCCESS, n << 16 | n
        if fid == K.FEAT_INTERRUPT_VECTOR_CONFIG:
            iv = cmd[11] & 0xFFFF
            return (K.SC_SUCCESS, self.ivc.get(iv, iv)) if iv < self.num_vectors else (K.SC_INVALID_FIELD, 0)
        if fid not in self.features:
            return K.SC_INVALID_FIELD, 0
        return K.SC_SUCCESS, self.features[fid]

    # -- log pages (§5.14) --------------------------------------------------------------------------
    def _get_log_page(self, cmd):
        lid = cmd[10] & 0xFF
        numd = ((cmd[10] >> 16) | (cmd[11] & 0xFFFF) << 16) + 1
        offset = cmd[12] | cmd[13] << 32
        if lid == K.LOG_ERROR_INFORMATION:
            page = bytes(K.ERROR_LOG_ENTRY_SIZE)
            self.events = [e for e in self.events if (e >> 16) & 0xFF != K.LOG_ERROR_INFORMATION]
        elif lid == K.LOG_SMART_HEALTH:
            page = smart_log(self.smart)
        elif lid == K.LOG_FIRMWARE_SLOT:
            page = firmware_slot_log()
        else:
            return K.SC_INVALID_LOG_PAGE, 0
        if offset % 4 or offset > len(page) or numd * 4 > (1 << self.MDTS) * K.PAGE_SIZE:
            return K.SC_INVALID_FIELD, 0
        data = page[offset:offset + numd * 4].ljust(numd * 4, b"\0")
        return self._to_host(cmd, data)

    # -- identify (§5.15) ----------------------------------------------------------------------------
    def _identify(self, cmd):
        cns, nsid = cmd[10] & 0xFF, cmd[1]
        if cns == K.CNS_CONTROLLER:
            data = self._id_ctrl
        elif cns == K.CNS_NAMESPACE:
            if nsid != 1:
                return K.SC_INVALID_NAMESPACE, 0
            data = identify_namespace(self.ns)
        elif cns == K.CNS_ACTIVE_NS_LIST:
            if nsid >= 0xFFFFFFFE:
                return K.SC_INVALID_NAMESPACE, 0
            data = struct.pack("<I", 1).ljust(K.PAGE_SIZE, b"\0") if nsid < 1 else bytes(K.PAGE_SIZE)
        elif cns == K.CNS_NS_ID_DESCRIPTORS:
            if nsid != 1:
                return K.SC_INVALID_NAMESPACE, 0
            data = ns_id_descriptors(self.ns)
        elif cns == K.CNS_CS_CONTROLLER:
            if (cmd[11] >> 24) & 0xFF != 0:                  # CSI: only the NVM command set
                return K.SC_INVALID_FIELD, 0
            data = bytes(K.PAGE_SIZE)                        # no command set specific limits
        else:
            return K.SC_INVALID_FIELD, 0
        return self._to_host(cmd, data)

    # -- NVM commands (§6) ------------------------------------------------------------------------
    @staticmethod
    def _io_error_status(cmd) -> int:
        """The status of an NVM command the host file failed (NVMe 1.4 §4.6.1.2.2, media errors): a
        Read is an Unrecovered Read Error; whatever writes the medium (Write, Flush, Write Zeroes,
        Dataset Management) a Write Fault."""
        return K.SC_UNRECOVERED_READ_ERROR if cmd[0] & 0xFF == K.NVM_READ else K.SC_WRITE_FAULT

    def _io(self, cmd: list[int]):
        op, nsid = cmd[0] & 0xFF, cmd[1]
        if (cmd[0] >> 8) & 3 or (cmd[0] >> 14) & 3:
            return K.SC_INVALID_FIELD, 0
        if op not in (K.NVM_FLUSH, K.NVM_WRITE, K.NVM_READ, K.NVM_WRITE_ZEROES, K.NVM_DATASET_MANAGEMENT):
            return K.SC_INVALID_OPCODE, 0
        if nsid != 1 and not (op == K.NVM_FLUSH and nsid == 0xFFFFFFFF):
            return K.SC_INVALID_NAMESPACE, 0
        if op == K.NVM_FLUSH:
            self.ns.flush()
            return K.SC_SUCCESS, 0
        if op == K.NVM_DATASET_MANAGEMENT:
            return self._dsm(cmd)
        slba, nlb = cmd[10] | cmd[11] << 32, (cmd[12] & 0xFFFF) + 1
        if slba + nlb > self.ns.nsze:
            return K.SC_LBA_OUT_OF_RANGE, 0
        if op != K.NVM_READ and self.ns.read_only:
            return K.SC_NAMESPACE_WRITE_PROTECTED, 0
        if op == K.NVM_WRITE_ZEROES:
            self.ns.zero(slba, nlb, deallocate=bool(cmd[12] >> 25 & 1))
            self._write_through()
            return K.SC_SUCCESS, 0
        nbytes = nlb * self.ns.lba_size
        if nbytes > (1 << self.MDTS) * K.PAGE_SIZE:
            return K.SC_INVALID_FIELD, 0
        prp1, prp2 = self._prps(cmd)
        try:
            segs = prp_segments(self.mem, prp1, prp2, nbytes)
        except PrpError as e:
            self.log(logging.WARNING, "NVMe %s at LBA %d: %s", "read" if op == K.NVM_READ else "write", slba, str(e))
            return e.status, 0
        views = [self.mem.view(gpa, n) for gpa, n in segs]
        units = (nbytes + 511_999) // 512_000
        if op == K.NVM_READ:
            self.ns.read(views, slba, nbytes)
            self.smart["host_reads"] += 1
            self.smart["data_units_read"] += units
            self.stats["read_bytes"] += nbytes
        else:
            self.ns.write(views, slba, nbytes)
            self.smart["host_writes"] += 1
            self.smart["data_units_written"] += units
            self.stats["write_bytes"] += nbytes
            if cmd[12] >> 30 & 1:                             # FUA
                self.ns.flush()
            else:
                self._write_through()
        return K.SC_SUCCESS, 0

    def _write_through(self) -> None:
        if not self.features[K.FEAT_VOLATILE_WRITE_CACHE]:
            self.ns.flush()             # no volatile write cache: data is durable when the command completes

    def _dsm(self, cmd):
        nr, deallocate = (cmd[10] & 0xFF) + 1, bool(cmd[11] & 0x4)
        if not deallocate:
            return K.SC_SUCCESS, 0      # integral-read/write hints: nothing to do
        if self.ns.read_only:
            return K.SC_NAMESPACE_WRITE_PROTECTED, 0
        prp1, prp2 = self._prps(cmd)
        try:
            segs = prp_segments(self.mem, prp1, prp2, 16 * nr)
        except PrpError as e:
            return e.status, 0
        raw = b"".join(self.mem.read(gpa, n) for gpa, n in segs)
        ranges = [struct.unpack_from("<IIQ", raw, 16 * i)[1:] for i in range(nr)]
        for nlb, slba in ranges:
            if slba + nlb > self.ns.nsze:
                return K.SC_LBA_OUT_OF_RANGE, 0
        for nlb, slba in ranges:
            if nlb:
                self.ns.deallocate(slba, nlb)
        self._write_through()
        return K.SC_SUCCESS, 0

    # -- INTx (§7.5.1.1) --------------------------------------------------------------------------
    def intx_asserted(self) -> bool:
        """Pin-based interrupt level: some interrupt-enabled CQ holds entries the driver has not consumed."""
        if self.intms & 1:
            return False
        return any(cq.ien and cq.head != cq.tail for cq in self.cqs.values())
