"""The NVMe controller on PCI (class 01-08-02), with a choice of I/O path for its doorbells.

BAR0 (64-bit, 16 KiB) holds the controller registers and, from 0x1000, the
doorbells (DSTRD = 0: SQ y tail at 0x1000 + 8y, CQ y head at 0x1004 + 8y);
BAR4 holds the MSI-X table (one vector per completion queue: the admin CQ and
every I/O CQ may name its own) and PBA.  Without MSI-X the controller raises
INTx (level: asserted while an interrupt-enabled CQ holds unconsumed entries).

The admin queue's doorbells always trap (Linux never shadows them, and admin
commands are rare).  The I/O queues' doorbells, per path:

- ``trap``: MMIO to the vCPU thread, which runs the queue; with shadow doorbells
  the controller keeps EventIdx at the last value seen, so the driver rings
  each time and its write is handled at once.
- ``ioeventfd``: once the driver sent Doorbell Buffer Config, one ioeventfd per
  doorbell (SQ tail and CQ head) wakes a ``notify`` sidecore, which takes the
  value from the shadow page (an eventfd carries no value, so before 0x7C the
  doorbells trap).
- ``shared`` / ``poll``: once 0x7C arrived, a polling sidecore watches the
  shadow doorbell page and parks EventIdx, so the driver never rings.
- ``adaptive``: ``poll`` while busy; when idle publish EventIdx = last value
  seen, fence, re-read the shadow slot, and sleep on the ioeventfds.

Before Doorbell Buffer Config the non-trap paths fall back to trapped
doorbells, and say so in the log once.

With ``service`` (``run --sidecore PATH``, the polled paths only) the controller is split: the
admin queue, registers, asynchronous events, reset and Doorbell Buffer Config stay here, and each I/O
queue pair is handed to the ``exitless sidecore`` service once it has shadow doorbells
(:class:`~exitless.sidecore.nvme_remote.RemoteQueuePairs`; the protocol:
:mod:`exitless.sidecore.nvme_protocol`), and taken back -- synchronously -- at Delete I/O SQ, reset
and VM exit.  A pair the service cannot take (a CQ shared by two SQs, MSI-X off, a refusal) is served
here with trapped doorbells (EventIdx armed), as before Doorbell Buffer Config.
"""
from __future__ import annotations

import logging
import os
import struct

from ...sidecore.engine import SidecoreGroup
from ...sidecore.paths import MODE_OF_PATH, PATHS, REMOTE_PATHS
from ...sidecore.spin import address_of, drain_eventfd
from ..pci.device import Bar, PciDevice
from ..pci.msix import CAP_ID_MSIX, Msix
from . import constants as K
from .controller import CompletionQueue, NvmeController
from .namespace import Namespace

log = logging.getLogger(__name__)

BAR_REGS, BAR_MSIX = 0, 4
BAR_REGS_SIZE = 0x4000


class NvmePci(PciDevice):
    """``NvmePci(machine, namespace, path="trap", queues=4, poll_ns=64_000, sidecore=None, service=None)``.

    ``queues``: I/O queue pairs offered (1..64).  ``sidecore``: a group shared with
    other devices, started by the caller after the last one joined; by default the
    device gets a sidecore of its own (for every path but ``trap``).  ``service``: the
    socket of an ``exitless sidecore`` that serves the I/O queue pairs instead (a polled
    path only); raises :class:`~exitless.sidecore.remote.RemoteSidecoreError` if it cannot
    be reached or refuses the namespace.
    """

    def __init__(self, machine, namespace: Namespace, path: str = "trap", *, queues: int = 4,
                 poll_ns: int = 64_000, sidecore: SidecoreGroup | None = None, service: str | None = None):
        if path not in PATHS:
            raise ValueError(f"I/O path {path!r}: one of {', '.join(PATHS)}")
        if service is not None and (path not in REMOTE_PATHS or sidecore is not None):
            raise ValueError(f"the {path} path cannot be served by a sidecore service")
        super().__init__(vendor=K.PCI_VENDOR_REDHAT, device=K.PCI_DEVICE_EXITLESS_NVME, revision=2,
                         class_code=K.PCI_CLASS_NVME, subsystem_vendor=K.PCI_VENDOR_REDHAT,
                         subsystem=K.PCI_DEVICE_EXITLESS_NVME,
                         bars=[Bar(BAR_REGS, BAR_REGS_SIZE, is64=True), Bar(BAR_MSIX, 0x1000)])
        self.machine = machine
        self.path = path
        self.msix = Msix(machine.irq_router, queues + 1, BAR_MSIX)
        body, writable = self.msix.capability()
        self.msix.cap_offset = self.add_capability(CAP_ID_MSIX, body, writable)
        self.ctrl = NvmeController(machine.mem, namespace, max_io_queues=queues, num_vectors=queues + 1,
                                   irq=self._irq, listener=self)
        # with a service, a pair served here traps (EventIdx armed); the service parks its own pairs'
        self.ctrl.park_event_idx = path in ("shared", "poll", "adaptive") and service is None
        self.wake_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(queues)] \
            if path in ("ioeventfd", "adaptive") else []
        self._bound: set[int] = set()         # I/O queues whose doorbells are shadowed
        self._ioeventfds: dict[int, int] = {}  # qid -> BAR0 address the ioeventfds are registered at
        self._bar0 = None
        self._warned_fallback = False
        self.ioeventfd_doorbells = 0           # summed by QueuePairPollable.drain (one sidecore thread)
        self.sidecore = None
        self.remote = None
        self.handovers = 0                     # pairs the service took
        self._warned_local: set[str] = set()
        self.slot = machine.pci.add(self)
        machine.add_worker(self)
        if service is not None:
            from ...sidecore.nvme_remote import RemoteQueuePairs   # the VM side of the service (it imports vhost_user)

            self.remote = RemoteQueuePairs(service, self)
        elif path != "trap":
            pollables = [QueuePairPollable(self.ctrl, qid, self.wake_fds[qid - 1] if self.wake_fds else None, self)
                         for qid in range(1, queues + 1)]
            if sidecore is None:
                self.sidecore = SidecoreGroup(MODE_OF_PATH[path], poll_ns=poll_ns, name=f"sidecore-nvme{self.slot}")
                self.sidecore.add(pollables, MODE_OF_PATH[path])
                self.sidecore.start()
            else:
                sidecore.add(pollables, MODE_OF_PATH[path])

    # -- BARs ---------------------------------------------------------------------------------
    def map_bar(self, index: int, address: int) -> None:
        if index == BAR_MSIX:
            self.machine.mmio.insert(address, self.bars[index].size, self.msix, "nvme-msix")
            return
        self.machine.mmio.insert(address, BAR_REGS_SIZE, _Registers(self), "nvme-regs")
        self._bar0 = address
        with self.ctrl.lock:
            for qid in self._bound:
                if self.remote is None or qid in self.ctrl.remote:   # a pair served here traps
                    self._register_ioeventfds(qid)

    def unmap_bar(self, index: int, address: int) -> None:
        self.machine.mmio.remove(address)
        if index == BAR_REGS:
            with self.ctrl.lock:
                for qid in list(self._ioeventfds):
                    self._unregister_ioeventfds(qid)
            self._bar0 = None

    def config_written(self, offset: int, size: int, value: int) -> None:
        cap = self.msix.cap_offset
        if offset <= cap + 2 < offset + size or offset <= cap + 3 < offset + size:
            self.msix.control_written(struct.unpack_from("<H", self.config, cap + 2)[0])
            self.update_intx()          # INTx is not used while MSI-X is enabled

    # -- shadow doorbells bound / unbound (the controller's listener; its lock is held) ----------
    def dbbuf_bound(self, qid: int) -> None:
        self._bound.add(qid)
        if self.remote is not None:
            self._hand_over(qid)
            return
        self._register_ioeventfds(qid)
        if self.wake_fds:
            os.eventfd_write(self.wake_fds[qid - 1], 1)   # let the sidecore look at the new queue

    def dbbuf_unbound(self, qid: int) -> None:
        self._bound.discard(qid)
        if self.remote is not None:
            self._take_back(qid, resume=False)   # the pair goes away (delete, reset) or is bound anew
        self._unregister_ioeventfds(qid)

    def write_cache_changed(self) -> None:
        """Set Features (Volatile Write Cache): the served pairs get the new setting (taken back, handed over)."""
        if self.remote is not None:
            for qid in list(self.ctrl.remote):
                self._take_back(qid, resume=False)
                self._hand_over(qid)

    # -- pairs served by the sidecore service (the controller's lock held) ------------------------------
    def _local(self, why: str) -> None:
        if why not in self._warned_local:
            self._warned_local.add(why)
            log.warning("NVMe %02x: %s: this VMM serves that queue pair (trapped doorbells)", self.slot, why)

    def _hand_over(self, qid: int) -> None:
        ctrl = self.ctrl
        sq = ctrl.sqs[qid]
        cq = ctrl.cqs[sq.cqid]
        if len(cq.sqs) > 1:
            # one owner per CQ: the pair already served comes back, and both are served here
            for other in cq.sqs:
                self._take_back(other.sqid, resume=True)
            self._local(f"CQ {cq.cqid} is shared by several SQs")
            return
        if cq.ien and not self.msix.enabled:
            self._local("MSI-X is off (INTx is this VMM's)")
            return
        wake = self.wake_fds[qid - 1] if self.wake_fds else None
        if wake is not None:
            self._register_ioeventfds(qid)       # before the service may arm EventIdx
        if self.remote.attach(sq, cq, ctrl.dbbuf, self.msix.irqfd(cq.iv) if cq.ien else None, wake,
                              bool(ctrl.features[K.FEAT_VOLATILE_WRITE_CACHE])):
            ctrl.remote[qid] = cq.cqid
            self.handovers += 1
        else:
            self._unregister_ioeventfds(qid)

    def _take_back(self, qid: int, *, resume: bool) -> None:
        """Pair ``qid`` back from the service, if it serves it; ``resume``: serve it here from now on."""
        ctrl = self.ctrl
        cqid = ctrl.remote.pop(qid, None)
        if cqid is None:
            return
        st = self.remote.detach(qid)
        self._unregister_ioeventfds(qid)
        if st is None:
            return                               # the service failed: the controller is fatal
        sq, cq = ctrl.sqs[qid], ctrl.cqs[cqid]
        sq.head, sq.tail, sq.shadow_seen = st.sq_head, st.sq_tail, st.sq_shadow_seen
        cq.head, cq.tail, cq.phase, cq.shadow_seen = st.cq_head, st.cq_tail, st.cq_phase, st.cq_shadow_seen
        self._add_counters(st.counters)
        if resume:
            ctrl.service_queue(qid)              # what the driver wrote meanwhile; EventIdx armed

    def _register_ioeventfds(self, qid: int) -> None:
        if not self.wake_fds or self._bar0 is None or qid in self._ioeventfds:
            return
        for off in (8 * qid, 8 * qid + 4):            # SQ qid tail, CQ qid head
            self.machine.vm.ioeventfd(self.wake_fds[qid - 1], self._bar0 + K.DOORBELL_BASE + off, 4)
        self._ioeventfds[qid] = self._bar0

    def _unregister_ioeventfds(self, qid: int) -> None:
        bar0 = self._ioeventfds.pop(qid, None)
        if bar0 is None:
            return
        for off in (8 * qid, 8 * qid + 4):
            self.machine.vm.ioeventfd(self.wake_fds[qid - 1], bar0 + K.DOORBELL_BASE + off, 4, deassign=True)

    # -- interrupts -----------------------------------------------------------------------------
    def _irq(self, cq: CompletionQueue | None) -> None:
        if cq is not None and self.msix.enabled:
            if cq.ien:
                self.msix.fire(cq.iv)
            return
        self.update_intx()

    def intx_pending(self) -> bool:
        """§7.5.1.1: with MSI-X off, asserted while an interrupt-enabled CQ holds unconsumed entries."""
        return not self.msix.enabled and self.ctrl.intx_asserted()

    def drive_intx(self, gsi: int, level: int) -> None:
        self.machine.vm.irq_line(gsi, level)

    def mmio_doorbell(self, offset: int, value: int) -> None:
        qid = (offset - K.DOORBELL_BASE) // 8
        if qid and self.path != "trap" and self.ctrl.shadow is None and not self._warned_fallback:
            self._warned_fallback = True
            log.warning("NVMe %02x: the driver has not sent Doorbell Buffer Config: I/O doorbells trap "
                        "(the %s path needs shadow doorbells)", self.slot, self.path)
        self.ctrl.write_register(offset, 4, value)

    def stats(self) -> dict:
        """The controller's counters, plus ``ioeventfd_doorbells``: I/O doorbell writes KVM turned into
        eventfd signals (summed from the eventfd counters as the sidecore drains them), and
        ``handovers``: the pairs a sidecore service took (whose counters are fetched from it first).
        """
        if self.remote is not None:
            with self.ctrl.lock:
                if self.ctrl.remote:
                    self._add_counters(self.remote.counters())
        return dict(self.ctrl.stats, path=self.path, msix_fired=self.msix.fired,
                    ioeventfd_doorbells=self.ioeventfd_doorbells, handovers=self.handovers)

    def _add_counters(self, counters: dict) -> None:
        ctrl = self.ctrl
        for key, n in counters.items():
            table = ctrl.stats if key in ctrl.stats else ctrl.smart
            table[key] += n

    def stop(self) -> None:
        if self.remote is not None:              # the pairs back (their counters with them), then hang up
            with self.ctrl.lock:
                for qid in list(self.ctrl.remote):
                    self._take_back(qid, resume=False)
            self.remote.close()
            self.remote = None
        if self.sidecore is not None:
            self.sidecore.stop()
            self.sidecore = None
        for fd in self.wake_fds:
            os.close(fd)
        self.wake_fds = []
        self.ctrl.ns.close()


class _Registers:
    """BAR0 as MMIO: registers below 0x1000, doorbells above (reached when not caught by an ioeventfd)."""

    def __init__(self, t: NvmePci):
        self.t = t

    def read(self, offset: int, size: int) -> bytes:
        return self.t.ctrl.read_register(offset, size).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        if offset >= K.DOORBELL_BASE and len(data) == 4:
            self.t.mmio_doorbell(offset, value)
        else:
            self.t.ctrl.write_register(offset, len(data), value)


class QueuePairPollable:
    """I/O queue pair ``qid`` of controller ``ctrl`` as seen by a sidecore (see :mod:`exitless.sidecore.loop`).

    ``wake_fd``: the eventfd its doorbells' ioeventfds signal (None: polled only); ``counts``: an
    object whose ``ioeventfd_doorbells`` the doorbell writes drained from it are added to.
    """

    def __init__(self, ctrl: NvmeController, qid: int, wake_fd: int | None, counts):
        self.ctrl = ctrl
        self.qid = qid
        self.wake_fd = wake_fd
        self.counts = counts
        self._page = (None, 0)     # (shadow page gpa, its host address)

    def poll(self) -> bool:
        return self.ctrl.service_queue(self.qid) > 0

    def watches(self) -> list[tuple[int, int]]:
        ctrl = self.ctrl
        words = ctrl.shadow_words(self.qid)
        if not words:
            return []
        gpa = ctrl.dbbuf[0]
        if self._page[0] != gpa:
            self._page = (gpa, address_of(ctrl.mem.view(gpa, K.PAGE_SIZE)))
        return [(self._page[1] + 4 * slot, value) for slot, value in words]

    def arm(self) -> bool:
        return self.ctrl.arm(self.qid)

    def disarm(self) -> None:
        self.ctrl.disarm(self.qid)

    def drain(self) -> None:
        # an eventfd's counter is the number of writes since the last read: each is one doorbell write
        self.counts.ioeventfd_doorbells += drain_eventfd(self.wake_fd)
