"""The back-end side of one vhost-user connection: message handling and the data plane.

The device is exitless's own :class:`~exitless.devices.virtio.device.VirtioDevice`
(e.g. :class:`~exitless.devices.virtio.blk.VirtioBlk`) and its rings are the
same :class:`~exitless.devices.virtio.queue.Virtqueue` objects the built-in
virtio-pci transport uses; this module is just another transport.

Ring life cycle (vhost-user.rst, "Ring states"): a ring is *started* by
SET_VRING_KICK (its kick fd is watched from then on; with the
``VHOST_USER_VRING_NOFD_MASK`` bit there is no fd and the ring is polled) and
*stopped* by GET_VRING_BASE, which reports ``last_avail_idx``.  If
``VHOST_USER_F_PROTOCOL_FEATURES`` was negotiated a ring is also disabled
until SET_VRING_ENABLE(1); otherwise it is enabled from the start.  A ring is
*live* -- its requests are processed -- when it is started, enabled, has a
size and addresses inside the memory table.  (A disabled-but-started ring
should be processed "without side effects"; a block device has no such
mode, so it is simply not processed.)

Data plane: one :class:`~exitless.sidecore.loop.SidecoreLoop` on a thread
(the session's own, or one shared by several sessions: ``dataplane``, attached
to and detached from as the session reconfigures) serves every live ring, with
a :class:`VringPollable` per ring, in the mode chosen by ``io``:

* ``kick`` (loop mode ``notify``): sleep on the kick eventfds, as the
  built-in VMM's ioeventfd path does;
* ``poll``: guest notifications suppressed (EVENT_IDX / NO_NOTIFY), the avail
  rings watched by the GIL-free C spin; kicks are never needed;
* ``adaptive``: ``poll`` while busy, ``kick`` after an idle window (arm:
  publish avail_event, fence, re-check).

If any live ring has no kick fd (NOFD), the loop polls regardless of ``io``.

Reconfiguration: every message that changes what the data plane reads
(memory, ring geometry, fds, features, enable state) first stops the loop
(joining its thread), records each live ring's ``last_avail_idx``, resets
the device, applies the change and starts a fresh loop.  So the control
thread and the data plane never touch the same state concurrently, and no
mapping is unmapped while the C spin may read it.

Errors: a message that is malformed or not acceptable raises
:class:`ProtocolError`; the server answers it with a failure when the
frontend asked for a reply (REPLY_ACK) and otherwise closes the connection.
A ring the device finds broken puts the device in NEEDS_RESET and writes
the rings' error eventfds (SET_VRING_ERR).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
from dataclasses import dataclass

from exitless.devices.virtio.constants import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1
from exitless.devices.virtio.device import VirtioDevice
from exitless.sidecore.loop import QUEUE_BUDGET, SidecoreLoop, SidecoreThread
from exitless.sidecore.spin import address_of

from . import protocol as P
from .memory import VhostMemory
from .protocol import Message, ProtocolError

log = logging.getLogger("exitless.vhost_user")

IO_MODES = ("kick", "poll", "adaptive")
LOOP_MODE = {"kick": "notify", "poll": "poll", "adaptive": "adaptive"}
PROTOCOL_FEATURES = (1 << P.PROTOCOL_F_MQ) | (1 << P.PROTOCOL_F_REPLY_ACK) | (1 << P.PROTOCOL_F_CONFIG)
VRING_F_LOG = 1 << 0          # vhost_vring_addr.flags: log used-ring writes (migration; not supported)


def _eventfd(fd: int, what: str) -> int:
    """Check that a received fd is an eventfd and make it non-blocking (so a write never blocks us)."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise ProtocolError(f"{what}: bad fd: {e.strerror}") from None
    if target != "anon_inode:[eventfd]":
        raise ProtocolError(f"{what}: fd is {target!r}, not an eventfd")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_NONBLOCK:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    return fd


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass
class Ring:
    """What the frontend told us about one vring."""

    num: int = 0
    addr: P.VringAddr | None = None
    base: int = 0                 # last_avail_idx to start from / the one recorded when stopped
    kick_fd: int = -1
    nofd_poll: bool = False       # SET_VRING_KICK with the NOFD bit: poll instead of kicks
    call_fd: int = -1
    err_fd: int = -1
    started: bool = False
    enabled: bool = False
    live: bool = False            # part of the running data plane
    errors: int = 0

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            _close(getattr(self, name))
            setattr(self, name, -1)


class VringPollable:
    """One live vring as seen by the sidecore loop (compare ``virtio.pci.QueuePollable``)."""

    def __init__(self, device: VirtioDevice, index: int, kick_fd: int, call_fd: int = -1):
        self.device = device
        self.index = index
        self.call_fd = call_fd      # the frontend's interrupt eventfd (a KVM irqfd), written by the C round
        self.served_by = None       # the pollable whose C job serves this ring (a virtio-net pair's)
        self.q = device.queues[index]
        self.wake_fd = kick_fd if kick_fd >= 0 else None
        self.done = 0                                           # requests completed
        self._avail = device.mem.view(self.q.avail_addr, 4)     # flags, idx
        self._avail_addr = address_of(self._avail)
        self._avail_flags = self._avail[:2].cast("H")      # loaded whole, never torn

    def _ok(self) -> bool:
        return not self.device.needs_reset and not self.q.broken

    def poll(self) -> bool:
        if not self._ok() or not self.q.has_work():
            return False
        n = self.device.handle_queue(self.index, QUEUE_BUDGET)   # at most a round's share: see sidecore.loop
        self.done += n
        return n > 0

    def has_work(self) -> bool:
        """Requests are available (the sidecore loop's test before serving an armed ring in C)."""
        return self._ok() and self.q.has_work()

    def c_job(self) -> tuple | None:
        """This ring as a job of the loop's C round (``_vring.serve``), or None (polled in Python)."""
        return self.device.serve_job(self.index, self.call_fd) if self._ok() else None

    def c_done(self, result: tuple) -> tuple[int, int]:
        """The C round's result for this ring: ``(completed, last_work_ns)``."""
        n, last_work, _irqs = self.q.served(result)
        self.done += n
        return n, last_work

    def watches(self) -> list[tuple[int, int]]:
        if not self._ok():
            return []
        flags = self._avail_flags[0]
        return [(self._avail_addr, flags | (self.q.last_avail_idx << 16))]

    def arm(self) -> bool:
        return self.q.enable_notifications() if self._ok() else False

    def disarm(self) -> None:
        if self._ok():
            self.q.disable_notifications()

    def drain(self) -> None:
        if self.wake_fd is not None:
            try:
                os.read(self.wake_fd, 8)
            except OSError:
                pass


class VhostUserBackend:
    """One frontend session over ``device``.  :meth:`handle` takes a message and returns the reply bytes
    (or None); :meth:`close` ends the session and leaves ``device`` reset, ready for the next one.

    ``dataplane``: a running loop shared with other sessions (see above); ``sealed_only`` (default):
    refuse memory that is not a memfd sealed against shrinking (a frontend must not be able to crash
    the back-end, and the other frontends it serves, by truncating its file); False accepts it with a
    warning (``serve --allow-unsealed-memory``).
    """

    def __init__(self, device: VirtioDevice, io: str = "kick", *, poll_ns: int = 64_000, name: str = "vhost-user",
                 dataplane: SidecoreLoop | None = None, sealed_only: bool = True):
        if io not in IO_MODES:
            raise ValueError(f"io mode {io!r}: one of {', '.join(IO_MODES)}")
        self.device = device
        self.io = io
        self.poll_ns = poll_ns
        self.name = name
        self.rings = [Ring() for _ in range(device.num_queues)]
        self.features = 0               # acked by SET_FEATURES (including F_PROTOCOL_FEATURES)
        self.protocol_features = 0
        self.owner = False
        self.mem: VhostMemory | None = None
        self.sealed_only = sealed_only  # memory must be a memfd sealed against shrinking (VhostMemory)
        self.worker: SidecoreThread | None = None
        # a sidecore loop shared with other sessions (``exitless serve blk`` with several frontends):
        # this session's pollables are attached to it instead of a loop of its own
        self.dataplane = dataplane
        self._attached: list | None = None
        self.loop_mode: str | None = None
        self.restarts = 0
        self.completed = 0              # requests completed by data planes of this session
        self._pollables: list[VringPollable] = []
        self._leaked = False
        device.on_needs_reset = self._on_needs_reset
        device.on_config_changed = self._on_config_changed
        self._handlers = {
            P.GET_FEATURES: self._get_features,
            P.SET_FEATURES: self._set_features,
            P.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            P.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            P.SET_OWNER: self._set_owner,
            P.RESET_OWNER: self._reset_owner,
            P.SET_MEM_TABLE: self._set_mem_table,
            P.SET_VRING_NUM: self._set_vring_num,
            P.SET_VRING_ADDR: self._set_vring_addr,
            P.SET_VRING_BASE: self._set_vring_base,
            P.GET_VRING_BASE: self._get_vring_base,
            P.SET_VRING_KICK: self._set_vring_kick,
            P.SET_VRING_CALL: self._set_vring_call,
            P.SET_VRING_ERR: self._set_vring_err,
            P.GET_QUEUE_NUM: self._get_queue_num,
            P.SET_VRING_ENABLE: self._set_vring_enable,
            P.GET_CONFIG: self._get_config,
            P.SET_CONFIG: self._set_config,
        }

    # -- features -----------------------------------------------------------------------------------
    def offered_features(self) -> int:
        return self.device.device_features() | (1 << P.F_PROTOCOL_FEATURES)

    @property
    def protocol_negotiated(self) -> bool:
        return bool(self.features >> P.F_PROTOCOL_FEATURES & 1)

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features >> P.PROTOCOL_F_REPLY_ACK & 1)

    # -- dispatch -------------------------------------------------------------------------------------
    def handle(self, msg: Message) -> bytes | None:
        """Handle one message; return the reply to send, if any.

        Raises :class:`ProtocolError` for a message that is not accepted.  Fds
        the handler keeps are removed from ``msg.fds``; the caller closes the rest.
        """
        n = P.expected_fds(msg)
        if len(msg.fds) != n:
            raise ProtocolError(f"{msg.name}: {len(msg.fds)} fds, expected {n}")
        handler = self._handlers.get(msg.request)
        if handler is None:
            raise ProtocolError(f"{msg.name}: not supported by this backend")
        reply = handler(msg)
        if reply is None and msg.need_reply and self.reply_ack:
            reply = P.reply_u64(msg.request, 0)
        return reply

    def error_reply(self, msg: Message) -> bytes | None:
        """The failure reply for a rejected ``msg``, or None if the frontend expects none (then the
        connection is closed: the frontend cannot otherwise learn that its request failed)."""
        if msg.request == P.GET_CONFIG:
            return P.encode(P.GET_CONFIG, b"", reply=True)   # a zero-length payload is GET_CONFIG's error
        if msg.need_reply and self.reply_ack and msg.request not in (
                P.GET_FEATURES, P.GET_PROTOCOL_FEATURES, P.GET_VRING_BASE, P.GET_QUEUE_NUM):
            return P.reply_u64(msg.request, 1)
        return None

    def _ring(self, index: int, what: str) -> Ring:
        if not 0 <= index < len(self.rings):
            raise ProtocolError(f"{what}: vring {index} (this device has {len(self.rings)})")
        return self.rings[index]

    # -- messages -----------------------------------------------------------------------------------------
    def _get_features(self, msg: Message) -> bytes:
        P.no_payload(msg)
        return P.reply_u64(msg.request, self.offered_features())

    def _set_features(self, msg: Message) -> None:
        value = P.u64(msg)
        extra = value & ~self.offered_features()
        if extra:
            raise ProtocolError(f"SET_FEATURES: bits {extra:#x} were not offered")
        # The device's own rules (a feature without those it needs, e.g. virtio-net GUEST_ECN without
        # GUEST_TSO4/6: the TAP refused those offloads at activation and the error escaped as a
        # "socket error").  A virtio-pci transport checks them at FEATURES_OK; vhost-user has none.
        # VERSION_1 is left to the frontend here, as before.
        device_bits = value & ~(1 << P.F_PROTOCOL_FEATURES) | 1 << VIRTIO_F_VERSION_1
        if not self.device.features_ok(device_bits):
            raise ProtocolError(f"SET_FEATURES: {value:#x} has a feature without the features it requires "
                                "(virtio 1.2 §5.1.3.1 for virtio-net)")
        with self._reconfigure():
            self.features = value

    def _get_protocol_features(self, msg: Message) -> bytes:
        P.no_payload(msg)
        return P.reply_u64(msg.request, PROTOCOL_FEATURES)

    def _set_protocol_features(self, msg: Message) -> None:
        value = P.u64(msg)
        extra = value & ~PROTOCOL_FEATURES
        if extra:
            raise ProtocolError(f"SET_PROTOCOL_FEATURES: bits {extra:#x} were not offered")
        self.protocol_features = value

    def _set_owner(self, msg: Message) -> None:
        P.no_payload(msg)
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        # Deprecated; the spec recommends ignoring it or disabling every ring: we stop them.
        P.no_payload(msg)
        with self._reconfigure():
            for r in self.rings:
                r.started = False

    def _set_mem_table(self, msg: Message) -> None:
        regions = P.mem_table(msg)
        fds, msg.fds = msg.fds, []
        mem = VhostMemory(regions, fds, sealed_only=self.sealed_only)   # owns (and on error closes) the fds
        with self._reconfigure():
            old, self.mem = self.mem, mem
            if old is not None:
                old.close()
        log.debug("%s: memory table: %s", self.name, ", ".join(
            f"gpa {r.gpa:#x}+{r.size:#x} uva {r.uva:#x} off {r.mmap_offset:#x}" for r in regions))

    def _set_vring_num(self, msg: Message) -> None:
        index, num = P.state(msg)
        ring = self._ring(index, "SET_VRING_NUM")
        qmax = self.device.queue_max_size
        if not 0 < num <= qmax or num & (num - 1):
            raise ProtocolError(f"SET_VRING_NUM: size {num} of vring {index} is not a power of two in 1..{qmax}")
        with self._reconfigure():
            ring.num = num

    def _ring_areas(self, ring: Ring, addr: P.VringAddr) -> list[tuple[str, int, int]]:
        n = ring.num or 1
        evt = 2 if self.features >> VIRTIO_F_RING_EVENT_IDX & 1 else 0   # the trailing event words
        return [("descriptor table", addr.desc, 16 * n), ("available ring", addr.avail, 4 + 2 * n + evt),
                ("used ring", addr.used, 4 + 8 * n + evt)]

    def _set_vring_addr(self, msg: Message) -> None:
        addr = P.vring_addr(msg)
        ring = self._ring(addr.index, "SET_VRING_ADDR")
        if addr.flags & ~VRING_F_LOG:
            raise ProtocolError(f"SET_VRING_ADDR: unknown flags {addr.flags:#x}")
        if addr.flags & VRING_F_LOG:
            raise ProtocolError("SET_VRING_ADDR: dirty logging is not supported")
        if self.mem is None:
            raise ProtocolError("SET_VRING_ADDR before SET_MEM_TABLE")
        for name, uva, length in self._ring_areas(ring, addr):
            if not self.mem.contains_uva(uva, length):
                raise ProtocolError(f"SET_VRING_ADDR: vring {addr.index} {name} at frontend address {uva:#x} "
                                    f"(+{length:#x}) is outside the memory table")
        with self._reconfigure():
            ring.addr = addr

    def _set_vring_base(self, msg: Message) -> None:
        index, num = P.state(msg)
        ring = self._ring(index, "SET_VRING_BASE")
        if num > 0xFFFF:
            raise ProtocolError(f"SET_VRING_BASE: {num:#x} is not a split-ring index")
        with self._reconfigure():
            ring.base = num

    def _get_vring_base(self, msg: Message) -> bytes:
        index, _num = P.state(msg)
        ring = self._ring(index, "GET_VRING_BASE")
        with self._reconfigure():
            ring.started = False           # the ring stops here (its base is recorded by the stop)
            _close(ring.kick_fd)
            ring.kick_fd, ring.nofd_poll = -1, False
        return P.reply_state(msg.request, index, ring.base)

    def _vring_fd(self, msg: Message, what: str) -> tuple[Ring, int, bool]:
        index, nofd = P.vring_fd_index(msg)
        ring = self._ring(index, what)
        fd = -1
        if not nofd:
            fd = _eventfd(msg.fds[0], what)
            msg.fds = []
        return ring, fd, nofd

    def _set_vring_kick(self, msg: Message) -> None:
        ring, fd, nofd = self._vring_fd(msg, "SET_VRING_KICK")
        with self._reconfigure():
            _close(ring.kick_fd)
            ring.kick_fd, ring.nofd_poll = fd, nofd
            ring.started = True

    def _set_vring_call(self, msg: Message) -> None:
        ring, fd, _nofd = self._vring_fd(msg, "SET_VRING_CALL")
        with self._reconfigure():
            _close(ring.call_fd)
            ring.call_fd = fd
        if ring.live and fd >= 0:
            # a completion may have been pushed while there was no (or another) call fd
            self._write_event(fd)

    def _set_vring_err(self, msg: Message) -> None:
        ring, fd, _nofd = self._vring_fd(msg, "SET_VRING_ERR")
        with self._reconfigure():
            _close(ring.err_fd)
            ring.err_fd = fd

    def _get_queue_num(self, msg: Message) -> bytes:
        P.no_payload(msg)
        return P.reply_u64(msg.request, len(self.rings))

    def _set_vring_enable(self, msg: Message) -> None:
        index, num = P.state(msg)
        ring = self._ring(index, "SET_VRING_ENABLE")
        if num not in (0, 1):
            raise ProtocolError(f"SET_VRING_ENABLE: {num} is neither 0 nor 1")
        with self._reconfigure():
            ring.enabled = bool(num)

    def _get_config(self, msg: Message) -> bytes:
        offset, size, flags, _data = P.config(msg)
        return P.reply_config(offset, flags, self.device.read_config(offset, size) if size else b"")

    def _set_config(self, msg: Message) -> None:
        offset, _size, _flags, data = P.config(msg)
        with self._reconfigure():   # the device's config is written with no queue handler running
            self.device.write_config(offset, data)

    # -- data plane -------------------------------------------------------------------------------------------
    def _reconfigure(self):
        return _Reconfigure(self)

    def _ring_enabled(self, ring: Ring) -> bool:
        return ring.enabled if self.protocol_negotiated else True

    def stop_dataplane(self) -> None:
        stopped = self.worker is not None or self._attached is not None
        if self.worker is not None:
            self.worker.stop()
            if self.worker.thread.is_alive():   # stuck in I/O: never unmap memory under it
                log.error("%s: the data plane did not stop; its memory stays mapped", self.name)
                self._leaked = True
            self.worker = None
        if self._attached is not None:
            if not self.dataplane.detach(self._attached):   # the shared loop is stuck in I/O
                log.error("%s: the shared data plane did not let go; its memory stays mapped", self.name)
                self._leaked = True
            self._attached = None
        if stopped:
            self.loop_mode = None
            self.completed += sum(p.done for p in self._pollables)
            self._pollables = []
        dev = self.device
        if dev.activated or dev.needs_reset:
            dev.quiesce()
            for i, ring in enumerate(self.rings):
                if ring.live and i < len(dev.queues) and dev.queues[i].configured:
                    ring.base = dev.queues[i].last_avail_idx
            dev.reset()
        for ring in self.rings:
            ring.live = False

    def start_dataplane(self) -> None:
        dev = self.device
        if self.mem is None or self._leaked:
            return
        candidates = [i for i, r in enumerate(self.rings)
                      if r.started and self._ring_enabled(r) and r.num and r.addr is not None]
        if not candidates:
            return
        mem = self.mem.guest
        queues = dev.create_queues(mem)
        for i in candidates:
            ring, q = self.rings[i], queues[i]
            try:
                q.desc_addr = self.mem.uva_to_gpa(ring.addr.desc, 16 * ring.num)
                q.avail_addr = self.mem.uva_to_gpa(ring.addr.avail, 4 + 2 * ring.num)
                q.used_addr = self.mem.uva_to_gpa(ring.addr.used, 4 + 8 * ring.num)
            except ProtocolError as e:
                self._ring_error(i, f"cannot start: {e}")
                continue
            q.size = ring.num
            q.last_avail_idx = ring.base
            q.ready = True
        driver_features = self.features & ~((1 << P.F_PROTOCOL_FEATURES) | (1 << P.F_LOG_ALL))
        dev.activate(mem, queues, driver_features, self._signal)
        live = []
        for i in candidates:
            q = queues[i]
            if q.ready and q.configured:
                q.used_idx = q.ring_used_idx()
                self.rings[i].live = True
                live.append(i)
        if not live or dev.needs_reset:
            return
        want = self.io
        if want != "poll" and any(self.rings[i].nofd_poll or self.rings[i].kick_fd < 0 for i in live):
            want = "poll"    # a ring without a kick fd can only be polled
        mode = LOOP_MODE[want]
        if mode != "notify":
            for i in live:
                queues[i].disable_notifications()
        pollables = self._pollables = [VringPollable(dev, i, self.rings[i].kick_fd, self.rings[i].call_fd)
                                        for i in live]
        # the device's host side (a TAP's receive fd) is served by the same loop as its rings; a virtio-net
        # pair's is also the server of its two rings in the loop's C round, and writes their call fds
        served = pollables + dev.backend_pollables(mode)
        for vp in pollables:
            vp.served_by = dev.queue_server(vp.index)
        for i, ring in enumerate(self.rings):   # kept across sessions: no fd of an earlier one stays there
            server = dev.queue_server(i)
            if server is not None:
                server.set_call_fd(i, ring.call_fd if ring.live else -1)
        if self.dataplane is not None and self.dataplane.mode == mode:
            self.dataplane.attach(served)
            self._attached = served
        else:   # no shared loop, or it cannot serve this mode (a ring without a kick fd must be polled)
            self.worker = SidecoreThread(SidecoreLoop(served, mode, poll_ns=self.poll_ns,
                                                      name=f"{self.name}-dataplane")).start()
        self.loop_mode = want
        self.restarts += 1
        log.debug("%s: data plane up: rings %s, %s", self.name, live, want)

    # -- interrupts and errors ------------------------------------------------------------------------------
    @staticmethod
    def _write_event(fd: int) -> None:
        try:
            os.eventfd_write(fd, 1)
        except OSError as e:    # a full (hostile) counter, or a frontend gone: nothing to signal
            if e.errno not in (errno.EAGAIN, errno.EBADF):
                raise

    def _signal(self, index: int) -> None:
        fd = self.rings[index].call_fd
        if fd >= 0:
            self._write_event(fd)

    def _ring_error(self, index: int, why: str) -> None:
        ring = self.rings[index]
        ring.errors += 1
        log.warning("%s: vring %d: %s", self.name, index, why)
        if ring.err_fd >= 0:
            self._write_event(ring.err_fd)

    def _on_needs_reset(self) -> None:
        for i, ring in enumerate(self.rings):
            if ring.live or ring.started:
                ring.errors += 1
                if ring.err_fd >= 0:
                    self._write_event(ring.err_fd)

    def _on_config_changed(self) -> None:
        log.info("%s: device configuration changed (no back-end channel to tell the frontend)", self.name)

    # -- end of session -------------------------------------------------------------------------------------
    def close(self) -> None:
        self.stop_dataplane()
        for ring in self.rings:
            ring.close_fds()
        if self.mem is not None and not self._leaked:
            self.mem.close()
        self.mem = None
        self.device.on_needs_reset = None
        self.device.on_config_changed = None


class _Reconfigure:
    """``with backend._reconfigure(): change state`` -- stop the data plane, change, restart it."""

    def __init__(self, backend: VhostUserBackend):
        self.b = backend

    def __enter__(self):
        self.b.stop_dataplane()

    def __exit__(self, *exc):
        self.b.start_dataplane()
        return False
