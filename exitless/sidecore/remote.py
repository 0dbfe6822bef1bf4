"""The VM's side of ``exitless sidecore``: one virtio-pci device whose queues the service polls.

``run --sidecore PATH`` gives each polled disk a :class:`RemoteQueues`: a connection to the service
(:mod:`exitless.sidecore.service` describes the protocol: vhost-user plus EXITLESS_SET_BACKEND).

* At construction: EXITLESS_SET_BACKEND with the disk's fd(s), the feature handshake (the service's
  device must offer exactly what the VM's own model offers), SET_OWNER, and SET_MEM_TABLE with the
  guest RAM memfd (one region per RAM range; the "frontend virtual address" of a region is its
  guest-physical address, so ring addresses go over unchanged).
* At DRIVER_OK (:meth:`activate`): the negotiated features, then per enabled queue its size, base 0,
  ring addresses, interrupt fd, error fd, kick fd and enable.  The interrupt fd is the KVM irqfd of
  the queue's MSI-X vector when that vector is programmed and MSI-X is on -- a completion then
  interrupts the guest straight from the service -- else an eventfd relayed here to
  ``VirtioPci.signal_queue`` (INTx, no vector).  The kick fd is the queue's ioeventfd (``poll`` and
  ``adaptive`` paths: the service sleeps on it in adaptive mode), or "no fd: poll" (``shared``: the
  doorbell page is RAM and the service polls the avail ring instead).
* At a device reset (:meth:`deactivate`): GET_VRING_BASE for each started queue, which stops it.
* :meth:`close` (VM exit) closes the connection; a killed VMM's connection closes with it.  Either
  way the service detaches the queues.

A service that refuses a message, or goes away, leaves the device in DEVICE_NEEDS_RESET with a log
line (a guest driver then resets it; its queues stay unserved): the VMM itself goes on.
Known limit: a guest that masks a queue's MSI-X vector after DRIVER_OK still gets that vector's
interrupts (a KVM irqfd has no mask); Linux and the guest kit do not mask live vectors.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import threading

from ..errors import ExitlessError
from ..vhost_user import protocol as P
from ..vhost_user.frontend import Frontend, FrontendError

log = logging.getLogger("exitless.sidecore.remote")

#: Protocol features the VM asks for (if offered): REPLY_ACK makes every request synchronous, so a
#: queue is served (or refused) by the time the driver's DRIVER_OK write returns.
WANTED_PROTOCOL = 1 << P.PROTOCOL_F_REPLY_ACK


def _unreachable_hint(path: str) -> str:
    """What to do when nothing answers at ``path``: it is no socket, or no service listens on it."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return " (it is not a socket: give the --socket PATH of a running `exitless sidecore`)"
    except OSError:
        pass
    return f" (start one first: `exitless sidecore --socket {path}`)"


class RemoteSidecoreError(ExitlessError, OSError):
    """The sidecore service cannot be reached or refused the disk (the message says which and why)."""


class ServiceLink:
    """The VM side of one connection to the ``exitless sidecore`` service: the vhost-user frontend
    :attr:`fe`, and a relay thread that runs the callback of each eventfd the service writes
    (:meth:`relay_handlers`: fd -> callback) and calls ``self._fail(why)`` when the service hangs up.
    :class:`RemoteQueues` (virtio devices) and :class:`~exitless.sidecore.nvme_remote.RemoteQueuePairs`
    (NVMe queue pairs) are links."""

    def _link_init(self) -> None:
        self.fe: Frontend | None = None
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._failed = False
        self._watcher: threading.Thread | None = None

    def _connect(self, path: str, timeout: float) -> None:
        """Connect to the service at ``path``; :class:`RemoteSidecoreError` (with a hint) if there is none."""
        try:
            self.fe = Frontend.connect(path, timeout)
        except OSError as e:
            raise RemoteSidecoreError(e.errno or errno.EIO, f"cannot reach the sidecore service at {path}: "
                                                            f"{e.strerror or e}{_unreachable_hint(path)}") from None

    def relay_handlers(self) -> dict:
        """The eventfds the relay thread reads, each with what to do when it fires."""
        raise NotImplementedError

    def _fail(self, why: str) -> None:
        raise NotImplementedError

    def _start_relay(self, name: str) -> None:
        self._watcher = threading.Thread(target=self._watch, name=name, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        handlers = self.relay_handlers()
        poller = select.poll()
        for fd in (*handlers, self._stop_fd):
            poller.register(fd, select.POLLIN)
        sock = self.fe.sock.fileno()
        poller.register(sock, select.POLLRDHUP)
        while True:
            for fd, _ in poller.poll():
                if fd == self._stop_fd:
                    return
                if fd == sock:
                    poller.unregister(sock)
                    self._fail("closed the connection")
                    continue
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                handlers[fd]()

    def _hang_up(self) -> None:
        """Stop the relay thread, hang up (the service detaches what it serves for us) and close the
        link's own fds (idempotent)."""
        if self._watcher is not None:
            os.eventfd_write(self._stop_fd, 1)
            self._watcher.join(5)
            self._watcher = None
        if self.fe is not None:
            self._failed = True          # the watcher is gone: a hang-up from here on is ours
            try:
                self.fe.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.fe.close()
            self.fe = None
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1


class RemoteQueues(ServiceLink):
    """The queues of virtio-pci function ``pci`` (its ``device`` a :class:`~exitless.devices.virtio.blk.VirtioBlk`),
    served by the ``exitless sidecore`` listening on ``path``.  Raises :class:`RemoteSidecoreError`.

    A device of another kind subclasses it (:class:`~exitless.sidecore.service_net.RemoteNic`) and
    overrides :meth:`handover`, :meth:`expected_features`, :meth:`ring_enabled`, :meth:`on_failure` and
    the attributes :attr:`served` (the queues the service serves), :attr:`local_queues` (those this
    VMM serves itself) and :attr:`events` (more eventfds the relay thread watches: fd -> callback)."""

    served: range | None = None                   # None: every queue
    failure_effect = "the device needs a reset"   # what on_failure(broken=False) does, for the log
    wanted_protocol = WANTED_PROTOCOL
    local_queues: list[int] = []
    events: dict = {}

    def __init__(self, path: str, pci, *, timeout: float = 10.0):
        self.path = path
        self.pci = pci
        dev = pci.device
        n = dev.num_queues
        self._offer = 0
        self.started: list[int] = []
        self.relay_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]
        self.err_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._link_init()
        try:
            self._connect(path, timeout)
            self._handshake(dev)
        except BaseException:
            self.close()
            raise
        self._start_relay(f"sidecore-remote-virtio{pci.slot}")

    def handover(self, dev) -> tuple[int, list[int], str]:
        """EXITLESS_SET_BACKEND's flags, fds and serial for ``dev``: a disk's."""
        flags = (P.BACKEND_F_RO if dev.read_only else 0) | (P.BACKEND_F_DIRECT if dev.direct else 0)
        return flags, [dev.fd] + ([dev._fd_buffered] if dev.direct else []), dev.serial

    def what(self, dev) -> str:
        """The device, for messages: a disk's path."""
        return dev.path

    def expected_features(self, dev) -> int:
        """The device features the service's model must offer: exactly this VMM's model's."""
        return dev.device_features()

    def ring_enabled(self, index: int) -> bool:
        """Is queue ``index`` enabled at DRIVER_OK (SET_VRING_ENABLE 1)?  A disk's: always."""
        return True

    def _handshake(self, dev) -> None:
        fe = self.fe
        flags, fds, serial = self.handover(dev)
        n = len(self.served) if self.served is not None else dev.num_queues
        body = P.encode_backend(P.Backend(P.BACKEND_VERSION, dev.device_id, flags, n, dev.queue_max_size, serial))
        try:
            if fe.request(P.EXITLESS_SET_BACKEND, body, fds, expect_reply=True) != P.U64.pack(0):
                raise FrontendError("EXITLESS_SET_BACKEND refused")
            offered = fe.get_features()
            want = self.expected_features(dev) | (1 << P.F_PROTOCOL_FEATURES)
            if offered != want:
                raise FrontendError(f"its device offers features {offered:#x}, this VM's {want:#x} "
                                    "(a service of another exitless version?)")
            self._offer = offered
            fe.set_features(1 << P.F_PROTOCOL_FEATURES)
            fe.set_protocol_features(fe.get_protocol_features() & self.wanted_protocol)
            fe.set_owner()
            mem, ram = self.pci.machine.mem, {gpa for gpa, _ in self.pci.machine.ram_layout}
            regions = [(r.gpa, r.size, r.gpa, r.offset) for r in mem.regions if r.gpa in ram]
            fe.set_mem_table(regions, [mem.fd] * len(regions))
        except (FrontendError, OSError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            if isinstance(e, (BrokenPipeError, ConnectionResetError)) or "closed the connection" in why:
                # the service hangs up without a word when it already serves --max-vms VMs (it refuses before
                # reading anything, so that a flood of connections costs it nothing) or on a bad hand-over
                why = ("it closed the connection (it may already serve its --max-vms VMs, or refused the "
                       "hand-over: its log says which)")
            raise RemoteSidecoreError(errno.EPROTO, f"the sidecore service at {self.path} refused "
                                                    f"{self.what(dev)}: {why}") from None

    # -- the device's life cycle (called by VirtioPci on the vCPU thread, under its lock) --------------------
    def activate(self, driver_features: int, queues, kick_fds: list[int | None]) -> bool:
        """DRIVER_OK: hand the enabled queues (``queues``: virtio-pci queue states with ``size``,
        ``enable``, ``desc``/``driver``/``device`` guest-physical addresses, ``msix_vector``) to the service;
        False (logged) if it refused or is gone."""
        if self._failed:                 # the service is gone: the driver learns it at once, again
            self.on_failure(False)
            return False
        fe, msix = self.fe, self.pci.msix
        try:
            # (what the VMM's model offers beyond the service's -- a NIC's control queue -- stays here)
            fe.set_features(driver_features & self._offer | (1 << P.F_PROTOCOL_FEATURES))
            for i, st in enumerate(queues):
                if not st.enable or (self.served is not None and i not in self.served):
                    continue
                fe.set_vring_num(i, st.size)
                fe.set_vring_base(i, 0)
                fe.set_vring_addr(i, st.desc, st.device, st.driver)
                vec = msix.vectors[st.msix_vector] if msix.enabled and st.msix_vector < msix.n else None
                fe.set_vring_call(i, vec.fd if vec is not None and vec.address else self.relay_fds[i])
                fe.set_vring_err(i, self.err_fd)
                fe.set_vring_kick(i, kick_fds[i])
                self.started.append(i)
                fe.set_vring_enable(i, self.ring_enabled(i))
        except (FrontendError, OSError) as e:
            self._fail(f"refused the queues at DRIVER_OK: {e}")
            return False
        return True

    def deactivate(self) -> None:
        """Device reset: stop every started queue (GET_VRING_BASE); the service resets its device."""
        started, self.started = self.started, []
        if self._failed:
            return
        try:
            for i in started:
                self.fe.get_vring_base(i)
        except (FrontendError, OSError) as e:
            self._fail(f"failed to stop the queues at reset: {e}")

    def _fail(self, why: str, broken: bool = False) -> None:
        if not self._failed:
            self._failed = True
            log.error("virtio%d: the sidecore service at %s %s; %s and its queues are not served",
                      self.pci.slot, self.path, why, "the device needs a reset" if broken else self.failure_effect)
        self.on_failure(broken)

    def on_failure(self, broken: bool) -> None:
        """The service refused the queues or went away (``broken``: it reported a broken ring): a
        disk needs a reset (DEVICE_NEEDS_RESET and a configuration interrupt)."""
        self.pci.remote_failed()

    # -- the relay thread: INTx/no-vector interrupts, ring errors, the service going away ----------------------
    def relay_handlers(self) -> dict:
        handlers = {fd: (lambda i=i: self.pci.signal_queue(i)) for i, fd in enumerate(self.relay_fds)}
        handlers[self.err_fd] = lambda: self._fail("reported a broken ring", broken=True)
        handlers.update(self.events)
        return handlers

    def close(self) -> None:
        """Hang up (the service detaches the queues) and close the fds (idempotent)."""
        self._hang_up()
        for fd in self.relay_fds + [self.err_fd]:
            if fd >= 0:
                os.close(fd)
        self.relay_fds, self.err_fd = [], -1
