"""``exitless sidecore``: one polling loop serving the polled virtqueues of many VMs, as a service.

A VM started with ``exitless run … --sidecore PATH`` connects to the service's unix socket once
per polled disk or NIC and hands the device over (:mod:`exitless.sidecore.remote` is that side; a
NIC's RX/TX pairs go over with its TAP fds, :mod:`exitless.sidecore.service_net`).

Protocol: vhost-user (QEMU ``docs/interop/vhost-user.rst``) with one extension message.  vhost-user
already carries exactly what a polled queue needs -- the guest's memfd and its regions
(SET_MEM_TABLE), ring geometry and addresses (SET_VRING_NUM/ADDR/BASE), the kick eventfd or "no fd:
poll" (SET_VRING_KICK), the interrupt eventfd (SET_VRING_CALL: the VM passes its KVM irqfd, so a
completion interrupts the guest with no hop through the VMM), stop and the consumed index
(GET_VRING_BASE) -- and exitless has a back-end for it whose handling of hostile frontends is
property-tested and fuzzed (:mod:`exitless.vhost_user`).  A protocol of our own would re-do all of
that.  What vhost-user lacks is the device's backing store: a vhost-user back-end owns its disk.  So
the first message of a connection is ``EXITLESS_SET_BACKEND`` (:mod:`exitless.vhost_user.protocol`:
a version, the virtio device id, ro/direct flags, queue count and size, the GET_ID serial, and the
disk's fd(s) by SCM_RIGHTS); the service builds that VM's device model on those fds, answers u64 0,
and from then on the connection is an ordinary vhost-user session.  The version field lets either
side refuse a peer it does not understand.

Other device families start their connection with a first message of their own and speak their own
messages over the same framing; the service dispatches on that first message (:func:`_families`) and
serves the family's session from the same loop.  NVMe I/O queue pairs are one
(:mod:`exitless.sidecore.nvme_protocol`).

Every session's rings are attached to one :class:`~exitless.sidecore.loop.SidecoreLoop` (the
engine's loop with per-queue budget and per-queue adaptive windows) between its rounds, and
detached when the session reconfigures or ends.  Each connection has a control thread of its own
(so a peer stalling mid-message delays nobody else's control messages); the data plane is the one
loop thread.

A peer that breaks the protocol (garbage, a truncated message, wrong fds, ring addresses outside its
memory, huge sizes, memory that is not a sealed memfd, a disconnect mid-message) is detached with a
log line: its rings leave the loop, its memory is unmapped, its fds closed, its thread ends.  The
other VMs' rings never stop being served.  At most ``max_clients`` connections are served at once;
further ones are refused with a log line, so the service's memory and fds stay bounded.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time

from ..devices.virtio.blk import BackingFileError, VirtioBlk
from ..devices.virtio.constants import VIRTIO_ID_BLOCK, VIRTIO_ID_NET
from ..errors import ExitlessError
from ..vhost_user import protocol as P
from ..vhost_user.backend import LOOP_MODE, VhostUserBackend
from ..vhost_user.server import (PeerClosed, ProtocolError, TooManyFds, close_socket, listen_socket, peer_name,
                                 recv_message, run_session)
from .loop import ADAPTIVE_MAX_NS, ADAPTIVE_MIN_NS, IDLE_YIELD_NS, SidecoreLoop, SidecoreThread
from .service_net import served_nic

log = logging.getLogger("exitless.sidecore.service")

MODES = ("poll", "adaptive")
MAX_CLIENTS = 64
#: The largest queue a client may ask for (the virtio-blk model's own maximum is 32768; a ring that
#: large would let one client make the service map and walk far more than it needs).
MAX_QUEUE_SIZE = 1024
MAX_QUEUES = 16


def _activity(session, device) -> str:
    """What a detached VM's device did, for its log line: a NIC's frames (and the C round's slices that
    served them), a disk's requests."""
    stats = getattr(device, "stats", None)
    if isinstance(stats, dict) and "tx_packets" in stats:
        return (f"{stats['tx_packets']} frames sent, {stats['rx_packets']} received, "
                f"{stats.get('c_slices', 0)} C slices")
    return f"{session.completed if session is not None else 0} requests"


def _families() -> dict:
    """Device families besides virtio-blk, by the request number of a connection's first message: a
    factory ``(first message, name, loop, poll_ns) -> session`` (``handle``, ``error_reply``, ``name``,
    ``completed``, ``describe()``, ``close()``), raising ProtocolError for a first message it refuses.
    Each family's messages and session live in modules of their own."""
    from . import nvme_protocol, nvme_service

    return {nvme_protocol.EXITLESS_NVME_SET_BACKEND: nvme_service.open_session}


class ServiceConfigError(ExitlessError, ValueError):
    """``exitless sidecore`` was given a bad mode or client limit."""


class SidecoreService:
    """Listen on ``path`` and serve each connecting VM's polled disk from one loop in ``mode``.

    ``mode``: ``poll`` or ``adaptive`` (the loop's; a ring the VM gives no kick fd is polled
    regardless); ``poll_ns``: the adaptive initial idle window, ns; ``poll_max_ns``: the longest
    one; ``idle_yield_ns``: when the idle spin starts yielding its CPU (0: never; both
    :class:`~exitless.sidecore.loop.SidecoreLoop`'s); ``io_timeout``: seconds a
    message (and a connection's first message) may take to arrive once started; ``max_clients``:
    connections served at once.  Raises :class:`ServiceConfigError` for a bad mode, window or limit,
    :class:`~exitless.vhost_user.server.SocketPathError` if the path cannot be listened on.
    """

    def __init__(self, path: str, mode: str = "poll", *, poll_ns: int = 64_000, poll_max_ns: int = ADAPTIVE_MAX_NS,
                 idle_yield_ns: int = IDLE_YIELD_NS, io_timeout: float = 10.0, max_clients: int = MAX_CLIENTS):
        if mode not in MODES:
            raise ServiceConfigError(f"sidecore mode {mode!r}: one of {', '.join(MODES)}")
        if not 1 <= max_clients <= 1024:
            raise ServiceConfigError(f"--max-vms {max_clients}: between 1 and 1024")
        self.path = os.fspath(path)
        self.mode = mode
        self.poll_ns = poll_ns
        self.io_timeout = io_timeout
        self.max_clients = max_clients
        self.sock: socket.socket | None = None
        if poll_max_ns < ADAPTIVE_MIN_NS:
            raise ServiceConfigError(f"--poll-max-us {poll_max_ns / 1000:g}: at least {ADAPTIVE_MIN_NS / 1000:g} µs")
        if idle_yield_ns < 0:
            raise ServiceConfigError(f"--idle-yield-us {idle_yield_ns / 1000:g}: 0 (never) or more")
        self.dataplane = SidecoreThread(SidecoreLoop([], LOOP_MODE[mode], poll_ns=poll_ns, poll_max_ns=poll_max_ns,
                                                     idle_yield_ns=idle_yield_ns, name="sidecore-service"))
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._lock = threading.Lock()
        self._clients: dict[int, threading.Thread] = {}
        # counters (logs and tests)
        self.connections = 0
        self.detached = 0
        self.refused = 0
        self.messages = 0
        self.errors = 0

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def clients(self) -> int:
        """Connections being served now."""
        with self._lock:
            return len(self._clients)

    # -- life cycle -------------------------------------------------------------------------------------------
    def listen(self) -> "SidecoreService":
        self.sock, self._ino = listen_socket(self.path, 16)
        self.dataplane.start()      # now, so that the service's threads are all there once it says "serving"
        return self

    def request_stop(self) -> None:
        """From a signal handler or another thread: every connection ends, then :meth:`serve_forever`."""
        self._stopping = True
        if self._stop_fd >= 0:       # (after close() there is nothing left to stop)
            os.eventfd_write(self._stop_fd, 1)

    def serve_forever(self) -> None:
        """Accept VMs until :meth:`request_stop`; then detach them all and stop the loop."""
        assert self.sock is not None, "listen() first"
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        try:
            while not self._stopping:
                events = dict(poller.poll(1000))
                if self.dataplane.error is not None:   # a bug in the data plane: say so, do not serve a dead loop
                    raise self.dataplane.error
                if self._stopping or self.sock.fileno() not in events:
                    continue
                try:
                    conn, _ = self.sock.accept()
                except OSError as e:
                    log.warning("sidecore: accept: %s", e)
                    continue
                self._admit(conn)
        finally:
            self._stopping = True
            os.eventfd_write(self._stop_fd, 1)
            with self._lock:
                threads = list(self._clients.values())
            for t in threads:
                t.join(self.io_timeout + 5)

    def _admit(self, conn: socket.socket) -> None:
        with self._lock:
            if len(self._clients) >= self.max_clients:
                self.refused += 1
                log.warning("sidecore: %s refused: already serving %d VMs (--max-vms)", peer_name(conn),
                            len(self._clients))
                conn.close()
                return
            self.connections += 1
            cid = self.connections
            t = threading.Thread(target=self._client, args=(conn, cid), name=f"sidecore-vm{cid}", daemon=True)
            self._clients[cid] = t
        t.start()

    def close(self) -> None:
        """Stop the loop, remove the socket (if still ours) and close what :meth:`listen` opened (after
        :meth:`serve_forever` has returned, or instead of it; idempotent)."""
        if self._stop_fd < 0:
            return
        if self.dataplane.thread.ident is not None:
            self.dataplane.stop()
        else:
            self.dataplane.loop.close()
        if self.sock is not None:
            close_socket(self.sock, self.path, self._ino)
            self.sock = None
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1

    # -- one VM ---------------------------------------------------------------------------------------------------
    def _client(self, conn: socket.socket, cid: int) -> None:
        name = f"vm#{cid}"
        peer = peer_name(conn)
        t0 = time.monotonic()
        device = session = None
        why = "closed the connection"
        try:
            log.info("sidecore: %s connected (%s)", name, peer)
            device = self._handshake(conn, name)
            if device is None:
                why = "backend stopping" if self._stopping else "closed the connection"
                return
            if isinstance(device, tuple):                # a virtio device model and its description
                device, what = device
                session = VhostUserBackend(device, self.mode, poll_ns=self.poll_ns, name=f"sidecore {name}",
                                           dataplane=self.dataplane.loop)
                log.info("sidecore: %s serves its %s", name, what)
            else:                                        # another family's session (_families)
                session, device = device, None
                log.info("sidecore: %s serves %s", name, session.describe())
            why = run_session(conn, session, self, self._stop_fd, self.io_timeout)
        except (ProtocolError, BackingFileError, OSError) as e:
            self.errors += 1
            why = f"refused: {e}"
        except Exception as e:     # a bug: this VM is detached, the service and the other VMs go on
            self.errors += 1
            why = f"internal error: {type(e).__name__}: {e}"
            log.exception("sidecore: %s: internal error", name)
        finally:
            if session is not None:
                session.close()
            if device is not None:
                device.close()
            conn.close()
            (log.warning if why.startswith(("refused", "protocol", "internal", "socket")) else log.info)(
                "sidecore: %s detached (%s): %s after %.1f s, %s", name, peer, why,
                time.monotonic() - t0, _activity(session, device))
            with self._lock:
                self._clients.pop(cid, None)
                self.detached += 1

    def _handshake(self, conn: socket.socket, name: str):
        """The connection's first message: EXITLESS_SET_BACKEND gives the VM's device as a device model (a
        disk, a NIC: :data:`DEVICES`) and its description, another family's first message
        (:func:`_families`) that family's session; None if the peer left (or the service stops) before
        sending it.  Raises ProtocolError or BackingFileError for anything else."""
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        events = dict(poller.poll(int(self.io_timeout * 1000)))
        if self._stopping:
            return None
        if conn.fileno() not in events:
            raise ProtocolError(f"no EXITLESS_SET_BACKEND within {self.io_timeout:g} s")
        try:
            msg = recv_message(conn, self.io_timeout)
        except PeerClosed:
            return None
        except TooManyFds as t:
            raise ProtocolError(str(t)) from None
        self.messages += 1
        family = _families().get(msg.request)
        try:
            made = family(msg, name, self.dataplane.loop, self.poll_ns) if family is not None else \
                self._virtio(msg, name)
        finally:
            for fd in msg.fds:        # those the device or session did not take
                os.close(fd)
            msg.fds = []
        try:
            conn.sendall(P.reply_u64(msg.request, 0))
        except BaseException:
            (made[0] if isinstance(made, tuple) else made).close()
            raise
        return made

    @staticmethod
    def _virtio(msg, name: str) -> tuple[object, str]:
        """The device model (:data:`DEVICES`) of a first message EXITLESS_SET_BACKEND, taking its fds from
        ``msg``, and its description.  Raises ProtocolError or BackingFileError."""
        if msg.request != P.EXITLESS_SET_BACKEND:
            raise ProtocolError(f"the first message is {msg.name}, not EXITLESS_SET_BACKEND")
        spec = P.backend(msg)
        if len(msg.fds) != P.expected_fds(msg):
            raise ProtocolError(f"{msg.name}: {len(msg.fds)} fds, expected {P.expected_fds(msg)}")
        if spec.device_id not in DEVICES:
            raise ProtocolError(f"{msg.name}: virtio device {spec.device_id} is not served ("
                                + ", ".join(f"{kind}: {k}" for k, (kind, _) in DEVICES.items()) + ")")
        q = spec.queue_size
        if not 1 <= q <= MAX_QUEUE_SIZE or q & (q - 1):
            raise ProtocolError(f"{msg.name}: queue size {q} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        fds, msg.fds = msg.fds, []
        return DEVICES[spec.device_id][1](spec, fds, name)      # owns the fds from here on


def virtio_blk(spec: P.Backend, fds: list[int], name: str) -> tuple[VirtioBlk, str]:
    """EXITLESS_SET_BACKEND for a disk (``fds``, owned: the disk, and its buffered fd with
    BACKEND_F_DIRECT); raises ProtocolError or BackingFileError."""
    direct = bool(spec.flags & P.BACKEND_F_DIRECT)
    fds = (fds[0], fds[1] if direct else -1)
    if not 1 <= spec.num_queues <= MAX_QUEUES:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        raise ProtocolError(f"EXITLESS_SET_BACKEND: {spec.num_queues} queues (1..{MAX_QUEUES})")
    dev = VirtioBlk(f"{name}'s disk", read_only=bool(spec.flags & P.BACKEND_F_RO), direct=direct,
                    num_queues=spec.num_queues, queue_size=spec.queue_size, serial=spec.serial, fds=fds)
    return dev, (f"disk {dev.serial} ({dev.capacity} sectors{', read-only' if dev.read_only else ''}, "
                 f"{dev.num_queues} queue(s) of {dev.queue_max_size})")


#: The device models the service builds, by virtio device id: (name, ``build(spec, fds, name)`` -> (device,
#: description)); the NIC's is :mod:`exitless.sidecore.service_net`.
DEVICES = {VIRTIO_ID_BLOCK: ("virtio-blk", virtio_blk), VIRTIO_ID_NET: ("virtio-net", served_nic)}
