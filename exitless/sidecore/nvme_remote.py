"""The VM's side of NVMe queue pairs served by ``exitless sidecore`` (``run --nvme …,io=poll --sidecore PATH``).

:class:`RemoteQueuePairs` is one NVMe controller's connection to the service
(:mod:`exitless.sidecore.nvme_protocol` describes the messages).  At construction: SET_BACKEND with
the namespace's fd(s) and two eventfds the service writes (a bad shadow doorbell value; a pair that
cannot go on), then SET_MEM_TABLE with the guest RAM memfd.  :meth:`attach` and :meth:`detach` are
called by :class:`~exitless.devices.nvme.pci.NvmePci` on the vCPU thread, under the controller's
lock, while it handles the admin command (or register write) that binds or unbinds a pair: each
waits for the service's answer, so a pair is served (or refused) when the command completes, and
taken back -- the service no longer touching it -- before the guest learns that its queue is
deleted or its controller reset.

A relay thread turns the service's eventfds into the controller's asynchronous event (Invalid
Doorbell Value) or fatal status, and a service that hangs up while it serves pairs into the fatal
status too: the driver resets the controller, and the pairs it creates next are served by this VMM
(their handover fails).
"""
from __future__ import annotations

import errno
import logging
import os

from ..vhost_user import protocol as P
from ..vhost_user.frontend import FrontendError
from ..vhost_user.protocol import ProtocolError
from . import nvme_protocol as N
from .remote import RemoteSidecoreError, ServiceLink

log = logging.getLogger("exitless.sidecore.remote")


class RemoteQueuePairs(ServiceLink):
    """The I/O queue pairs of NVMe controller ``pci`` (an :class:`~exitless.devices.nvme.pci.NvmePci`)
    that the ``exitless sidecore`` listening on ``path`` serves.  Raises :class:`RemoteSidecoreError`
    if the service cannot be reached or refuses the controller."""

    def __init__(self, path: str, pci, *, timeout: float = 10.0):
        self.path = path
        self.pci = pci
        self.event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fatal_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._link_init()
        try:
            self._connect(path, timeout)
            self._handshake()
        except BaseException:
            self.close()
            raise
        self._start_relay(f"sidecore-remote-nvme{pci.slot}")

    def _handshake(self) -> None:
        fe, ns = self.fe, self.pci.ctrl.ns
        flags = (N.F_RO if ns.read_only else 0) | (N.F_DIRECT if ns.direct else 0)
        fds = [ns.fd] + ([ns._fd_buffered] if ns.direct else []) + [self.event_fd, self.fatal_fd]
        try:
            body = fe.request(N.EXITLESS_NVME_SET_BACKEND,
                              N.encode_backend(N.Backend(flags, ns.lba_size, self.pci.ctrl.max_io_queues)), fds,
                              expect_reply=True)
            if body != P.U64.pack(0):
                raise FrontendError("EXITLESS_NVME_SET_BACKEND refused")
            fe.reply_ack = True          # every request of the family is answered: wait for each
            machine = self.pci.machine
            ram = {gpa for gpa, _ in machine.ram_layout}
            regions = [(r.gpa, r.size, r.gpa, r.offset) for r in machine.mem.regions if r.gpa in ram]
            fe.set_mem_table(regions, [machine.mem.fd] * len(regions))
        except (FrontendError, OSError) as e:
            raise RemoteSidecoreError(errno.EPROTO, f"the sidecore service at {self.path} refused the NVMe "
                                                    f"namespace {ns.path}: {e} (its log says why)") from None

    # -- pairs (the vCPU thread, the controller's lock held) ----------------------------------------------------
    def attach(self, sq, cq, dbbuf: tuple[int, int], irqfd: int | None, wake_fd: int | None, vwc: bool) -> bool:
        """Hand SQ ``sq`` and its CQ ``cq`` (the controller's queue objects) to the service, with the
        shadow doorbell / EventIdx pages ``dbbuf`` (guest-physical), the CQ's irqfd (None: interrupts
        off), the doorbells' wake eventfd (None: polled) and the write cache state; True once it
        serves them, False (logged) if it refused (the VMM serves them) or is gone."""
        if self._failed:
            return False
        flags = (N.F_IRQFD if irqfd is not None else 0) | (N.F_WAKE if wake_fd is not None else 0) | \
            (N.F_VWC if vwc else 0)
        a = N.Attach(sq_head=sq.head, sq_tail=sq.tail, sq_shadow_seen=sq.shadow_seen, cq_head=cq.head,
                     cq_tail=cq.tail, cq_phase=cq.phase, cq_shadow_seen=cq.shadow_seen, sqid=sq.sqid, cqid=cq.cqid,
                     sq_size=sq.size, cq_size=cq.size, sq_base=sq.base, cq_base=cq.base, flags=flags,
                     shadow=dbbuf[0], event_idx=dbbuf[1])
        fds = [fd for fd in (irqfd, wake_fd) if fd is not None]
        try:
            self.fe.request(N.EXITLESS_NVME_ATTACH_QP, N.encode_attach(a), fds)
        except FrontendError as e:
            if "closed the connection" in str(e):
                self._fail("closed the connection")
            else:
                log.warning("NVMe %02x: the sidecore service at %s refused SQ %d / CQ %d (its log says why): "
                            "this VMM serves them", self.pci.slot, self.path, sq.sqid, cq.cqid)
            return False
        except OSError as e:
            self._fail(f"failed: {e}")
            return False
        return True

    def detach(self, sqid: int) -> N.State | None:
        """Take pair ``sqid`` back; its state once the service no longer touches it, or None if the
        service failed to let go or is gone (the controller is then fatal)."""
        if self._failed:
            return None
        try:
            body = self.fe.request(N.EXITLESS_NVME_DETACH_QP, N.QID.pack(sqid), expect_reply=True)
            return N.state(body)
        except (FrontendError, ProtocolError, OSError) as e:
            self._fail(f"did not give back SQ {sqid}: {e}", lost=True)
            return None

    def counters(self) -> dict:
        """What the served pairs did since the previous call or DETACH (name -> count); {} if the
        service is gone (its failure is handled as in :meth:`detach`)."""
        if self._failed:
            return {}
        try:
            return N.counts(self.fe.request(N.EXITLESS_NVME_GET_COUNTERS, expect_reply=True))
        except (FrontendError, ProtocolError, OSError) as e:
            self._fail(f"did not answer GET_COUNTERS: {e}")
            return {}

    def _fail(self, why: str, *, lost: bool = False) -> None:
        """The service refused to go on or is gone: no pair goes to it any more.  If it serves pairs now
        (or ``lost``: it kept a pair's state), the controller is fatal (CSTS.CFS) until the driver resets
        it; the pairs it creates next are served by this VMM.  (Under the controller's lock: a handover
        on the vCPU thread is either complete, and then counted here, or sees the failure.)"""
        ctrl = self.pci.ctrl
        with ctrl.lock:
            first, self._failed = not self._failed, True
            fatal = lost or bool(ctrl.remote)
            if fatal:
                ctrl.remote_fatal(f"the sidecore service {why}")
        if first:
            log.error("NVMe %02x: the sidecore service at %s %s; %s", self.pci.slot, self.path, why,
                      "the controller is fatal (CSTS.CFS) until the driver resets it, and this VMM serves the "
                      "queue pairs it creates next" if fatal else "this VMM serves the queue pairs from now on")

    # -- the relay thread --------------------------------------------------------------------------------------
    def relay_handlers(self) -> dict:
        return {self.event_fd: lambda: self.pci.ctrl.remote_bad_doorbell("a shadow doorbell value the sidecore "
                                                                          "service ignored"),
                self.fatal_fd: lambda: self._fail("reported a queue pair it cannot serve (its log says why)",
                                                  lost=True)}

    def close(self) -> None:
        """Hang up (the service detaches whatever it still serves) and close the fds (idempotent)."""
        self._hang_up()
        for fd in (self.event_fd, self.fatal_fd):
            if fd >= 0:
                os.close(fd)
        self.event_fd = self.fatal_fd = -1
