"""The base class of every virtio device (VIRTIO 1.2), independent of the transport.

A device is a small subclass::

    class VirtioRng(VirtioDevice):
        DEVICE_ID = VIRTIO_ID_RNG
        NUM_QUEUES = 1
        QUEUE_MAX_SIZE = 256
        FEATURES = 0                      # device-specific feature *mask*

        def config_bytes(self) -> bytes:  # the device configuration layout
            return b""

        def process(self, queue_index, chain):
            n = chain.write(0, os.urandom(min(chain.writable_len, 4096)))
            return n                      # bytes written -> pushed to the used ring

The transport (virtio-pci, vhost-user, ...) owns feature negotiation, the
status register and the queue registers; it calls :meth:`activate` at
DRIVER_OK, :meth:`handle_queue` when a queue was kicked (or from a polling
sidecore), and :meth:`reset` when the driver writes status 0.

Threading: a given queue is handled by one thread at a time (the transport
guarantees it).  Different queues of one device may be handled by different
threads concurrently, so a device's ``process`` must only share state between
queues that is safe for that (virtio-blk shares an fd and uses positional
I/O).  ``activate``, ``reset``, ``read_config`` and ``write_config`` are called
by the transport with no queue handler running (it stops its pollers first).

Errors: guest mistakes never raise out of :meth:`handle_queue`.  A broken ring
(:class:`VirtqueueError`) sets :attr:`needs_reset` and calls
:attr:`on_needs_reset` (the transport sets DEVICE_NEEDS_RESET and raises a
configuration-change interrupt); a bad buffer in an otherwise valid chain is
the device's business (``chain.error``; typically an error status).  All are
logged through :mod:`logging` with rate limiting.
"""
from __future__ import annotations

import logging
import time
from time import monotonic_ns as _now
import traceback
from typing import Callable

from exitless.memory import GuestMemory, GuestMemoryError

from .constants import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
from ...sidecore import breakdown as _breakdown
from .queue import DescriptorChain, Virtqueue, VirtqueueError

__all__ = ["RateLimitedLog", "VirtioDevice", "COMMON_FEATURES"]

log = logging.getLogger("exitless.virtio")

#: Transport/ring features every device offers.
COMMON_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_EVENT_IDX) | (1 << VIRTIO_F_RING_INDIRECT_DESC)


class RateLimitedLog:
    """At most ``burst`` messages per ``interval`` seconds; the rest are counted and summarised.

    Arguments are formatted to text before they reach :mod:`logging`: an exception
    object (or ``exc_info``) kept in a LogRecord by a handler that stores records
    would keep its traceback's frames -- and the memoryviews they hold on guest RAM
    or a vCPU's kvm_run page -- alive, and those mappings then cannot be closed.
    """

    def __init__(self, logger: logging.Logger, burst: int = 10, interval: float = 5.0):
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._window = 0.0
        self._count = 0
        self._suppressed = 0

    def __call__(self, level: int, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._window >= self.interval:
            if self._suppressed:
                self.logger.log(level, "%d similar messages suppressed", self._suppressed)
            self._window, self._count, self._suppressed = now, 0, 0
        if self._count < self.burst:
            self._count += 1
            if args:
                msg = msg % tuple(a if isinstance(a, (int, float, str)) else str(a) for a in args)
            self.logger.log(level, "%s", msg)
        else:
            self._suppressed += 1


class VirtioDevice:
    """Transport-independent virtio device.  Subclasses set the class attributes and override
    :meth:`config_bytes` and :meth:`process` (and, if needed, :meth:`write_config`,
    :meth:`on_activate`, :meth:`on_reset`)."""

    #: virtio device id (spec §5): 1 = net, 2 = block, ...
    DEVICE_ID: int = 0
    #: device-specific features offered (a mask of ``1 << bit``); see also :meth:`features`.
    FEATURES: int = 0
    NUM_QUEUES: int = 1
    QUEUE_MAX_SIZE: int = 256
    #: ``fast_path(queue, queue_index, limit) -> (completed, more)``: completes (pushes, publishes) the
    #: leading run of at most ``limit`` available chains that it handles itself and returns ``more=True``
    #: if it stopped at a chain that :meth:`process` must handle; None (the default) sends every chain
    #: through :meth:`process`.  It must do exactly what :meth:`process` would do for the chains it takes.
    fast_path: Callable[[Virtqueue, int, int], tuple[int, bool]] | None = None

    def __init__(self, num_queues: int | None = None, queue_max_size: int | None = None):
        self.num_queues = self.NUM_QUEUES if num_queues is None else num_queues
        self.queue_max_size = self.QUEUE_MAX_SIZE if queue_max_size is None else queue_max_size
        if self.num_queues < 1:
            raise ValueError("a virtio device needs at least one queue")
        q = self.queue_max_size
        if not (0 < q <= 32768) or q & (q - 1):
            raise ValueError(f"queue size {q} is not a power of two in 1..32768")
        #: Set by the transport: called once when the device enters DEVICE_NEEDS_RESET.
        self.on_needs_reset: Callable[[], None] | None = None
        #: Set by the transport: called when the configuration space changed (config interrupt).
        self.on_config_changed: Callable[[], None] | None = None
        #: the transport's lock (a :class:`~exitless.sidecore.spin.WatchedLock`), set by a transport whose
        #: device model runs under it: a C loop serving queues for a whole spin slice holds it and watches
        #: its word (:meth:`VirtioNet.pair_locks`); None where the device has no such transport
        self.transport_lock = None
        self.log = RateLimitedLog(log)
        #: Exceptions other than a broken ring that escaped :meth:`process`: bugs in exitless
        #: (each also logged, and the device put in NEEDS_RESET).  Fuzz targets require it to stay 0.
        self.internal_errors = 0
        self._clear_state()

    def _clear_state(self) -> None:
        self.mem: GuestMemory | None = None
        self.queues: list[Virtqueue] = []
        self.driver_features = 0
        self.needs_reset = False
        self.activated = False
        self._signal: Callable[[int], None] | None = None

    # -- identity and features ----------------------------------------------------
    @property
    def device_id(self) -> int:
        return self.DEVICE_ID

    def features(self) -> int:
        """Device-specific features offered (override when they depend on construction arguments)."""
        return self.FEATURES

    def device_features(self) -> int:
        """Everything offered: VERSION_1, EVENT_IDX, INDIRECT_DESC plus :meth:`features`."""
        return COMMON_FEATURES | self.features()

    def features_ok(self, driver_features: int) -> bool:
        """May the transport accept FEATURES_OK for ``driver_features``?  (A subset of the
        offered features that includes VERSION_1: legacy drivers are not supported.)"""
        return (not driver_features & ~self.device_features()) and bool(driver_features >> VIRTIO_F_VERSION_1 & 1)

    def has_feature(self, bit: int) -> bool:
        """Was feature ``bit`` negotiated (valid after :meth:`activate`)?"""
        return bool(self.driver_features >> bit & 1)

    def queue_server(self, index: int):
        """The backend pollable (:meth:`backend_pollables`) whose job of the sidecore's C round serves
        queue ``index`` (it has ``c_job``; the transport makes it the queue pollable's ``served_by``),
        or None: the queue is polled and watched as usual."""
        return None

    # -- configuration space ----------------------------------------------------------
    def config_bytes(self) -> bytes:
        """The whole device configuration structure, little-endian (override)."""
        return b""

    def read_config(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; bytes past the structure read as zero."""
        if offset < 0 or length <= 0:
            return b"\0" * max(length, 0)
        cfg = self.config_bytes()
        chunk = cfg[offset:offset + length]
        return chunk + b"\0" * (length - len(chunk))

    def write_config(self, offset: int, data: bytes) -> None:
        """Driver write to the configuration space: ignored unless a device overrides it."""

    def config_changed(self) -> None:
        """A device calls this after changing its configuration (e.g. disk resize)."""
        if self.on_config_changed is not None:
            self.on_config_changed()

    # -- life cycle ---------------------------------------------------------------------
    def create_queues(self, mem: GuestMemory) -> list[Virtqueue]:
        """Convenience for transports: one :class:`Virtqueue` per queue, at ``queue_max_size``."""
        return [Virtqueue(mem, self.queue_max_size) for _ in range(self.num_queues)]

    def activate(self, mem: GuestMemory, queues: list[Virtqueue], driver_features: int,
                 signal: Callable[[int], None]) -> None:
        """DRIVER_OK: start using ``queues`` (one per queue index; those not ``ready`` are ignored).

        Sets each ready queue's ``event_idx``/``indirect`` from ``driver_features``
        and validates it; an invalid ring puts the device in NEEDS_RESET.
        ``signal(queue_index)`` raises that queue's used-buffer interrupt.
        """
        self.mem = mem
        self.queues = list(queues)
        self.driver_features = driver_features
        self._signal = signal
        self.needs_reset = False
        evt = bool(driver_features >> VIRTIO_F_RING_EVENT_IDX & 1)
        ind = bool(driver_features >> VIRTIO_F_RING_INDIRECT_DESC & 1)
        for i, q in enumerate(self.queues):
            q.event_idx = evt
            q.indirect = ind
            if q.ready:
                try:
                    q.validate()
                except VirtqueueError as e:
                    self._set_needs_reset(i, e)
        self.activated = True
        self.on_activate()

    def on_activate(self) -> None:
        """Hook for subclasses, after :meth:`activate` stored its arguments."""

    def reset(self) -> None:
        """Device reset (status 0): reset the queues given to :meth:`activate` and forget them and
        the negotiated state."""
        self.on_reset()
        for q in self.queues:
            q.reset()
        self._clear_state()

    def on_reset(self) -> None:
        """Hook for subclasses, before the queues are reset."""

    def quiesce(self) -> None:
        """The transport stops serving the queues and will resume them later from each queue's
        ``last_avail_idx`` (vhost-user GET_VRING_BASE): a device that took chains off a ring
        without using them (virtio-net's RX buffers) gives them back here."""

    def serve_job(self, index: int, call_fd: int) -> tuple | None:
        """Queue ``index`` as a job of ``_vring.serve`` (completed in C, its interrupt written to
        ``call_fd``), or None: this device or queue is served by :meth:`handle_queue` (the default)."""
        return None

    def backend_pollables(self, mode: str) -> list:
        """Pollables for the device's host-side event sources (a TAP's receive side) that the
        sidecore serving its queues in ``mode`` (``notify``/``poll``/``adaptive``) must serve too."""
        return []

    # -- request processing -----------------------------------------------------------
    def process(self, queue_index: int, chain: DescriptorChain) -> int | None:
        """Handle one chain; return the bytes written into its device-writable part (it is then
        pushed to the used ring) or None if the device keeps it and will call :meth:`complete`."""
        raise NotImplementedError

    def handle_queue(self, index: int, budget: int | None = None) -> int:
        """Process what is available on queue ``index``; return the number of chains completed.

        ``budget``: take at most this many chains (a sidecore's per-queue share of one round, so
        that a flooded queue cannot starve the others it serves: the caller comes back for the
        rest); None takes everything.  A return value equal to ``budget`` means chains may remain.

        If the queue's notifications are enabled (kick-driven), they are disabled
        while draining and re-enabled afterwards with the no-lost-wake-up re-check.
        If the caller disabled them (a polling sidecore owns the queue), this only
        drains and leaves them disabled.

        Batching: one pass takes every available chain; the completions of the
        pass are published with one used.idx store (:meth:`Virtqueue.push_many`)
        and the interrupt is decided once for the pass (:meth:`Virtqueue.should_signal`,
        which honours used_event / NO_INTERRUPT).  When :attr:`fast_path` is set, it
        completes the leading run of chains it can handle (in C, without the GIL),
        and every chain it leaves goes through :meth:`process` here.
        """
        if self.needs_reset or not self.activated or not 0 <= index < len(self.queues):
            return 0
        q = self.queues[index]
        if not q.configured:
            return 0
        bd = _breakdown.ACTIVE
        fast = self.fast_path
        rearm = q.notifications_enabled
        done = counted = 0
        completions: list[tuple[int, int]] = []
        try:
            if rearm:
                q.disable_notifications()
            while True:
                while budget is None or done < budget:
                    if fast is not None:
                        if completions:  # keep the used ring in request order across the two paths
                            q.push_many(completions)
                            completions.clear()
                        n, more = fast(q, index, q.size if budget is None else budget - done)
                        done += n
                        if not more or (budget is not None and done >= budget):
                            break
                    if bd is None:
                        chain = q.pop()
                        if chain is None:
                            break
                        written = self._process_one(index, chain)
                    else:
                        chain, written = self._one_timed(index, q, bd)
                        if chain is None:
                            break
                    if written is not None:
                        completions.append((chain.head, written))
                        done += 1
                if bd is None:
                    self._publish(index, q, completions)
                else:
                    t0 = _now()
                    self._publish(index, q, completions, push_only=True)
                    t1 = _now()
                    self._publish(index, q, completions)
                    bd.add("used_write", t1 - t0)
                    bd.add("interrupt", _now() - t1)
                    bd.requests += done - counted
                    bd.batches += done > counted
                    counted = done
                if budget is not None and done >= budget:
                    if rearm:  # the caller comes back for the rest; until then a kick is still wanted
                        q.enable_notifications()
                    break
                if not rearm or not q.enable_notifications():
                    break
                q.disable_notifications()
        except VirtqueueError as e:
            self._publish(index, q, completions)  # completions before the breakage still get delivered
            self._set_needs_reset(index, e)
        except Exception as e:  # a device bug: keep the VMM alive, stop the device
            self.internal_errors += 1
            self.log(logging.ERROR, "virtio device %d queue %d: internal error:\n%s", self.DEVICE_ID, index,
                     traceback.format_exc())
            if completions:  # the chains processed before the bug are answered
                q.push_many(completions)
            self._set_needs_reset(index, e)
        return done

    def _publish(self, index: int, q: Virtqueue, completions: list[tuple[int, int]], push_only: bool = False) -> None:
        """Push a pass's completions (one used.idx store), then one interrupt decision."""
        if completions:
            q.push_many(completions)
            completions.clear()
        if not push_only and q.should_signal():
            self._raise(index)

    def _one_timed(self, index: int, q: Virtqueue, bd) -> tuple[DescriptorChain | None, int | None]:
        """``q.pop()`` and ``process`` with the phases timed into ``bd`` (see :mod:`exitless.sidecore.breakdown`)."""
        t0 = _now()
        head = q._next_head()
        t1 = _now()
        bd.add("ring_read", t1 - t0)
        if head is None:
            return None, None
        chain = q._walk(head)
        t2 = _now()
        io0 = bd.ns["host_io"]
        written = self._process_one(index, chain)
        t3 = _now()
        bd.add("chain_walk", t2 - t1)
        bd.add("request_parse", t3 - t2 - (bd.ns["host_io"] - io0))
        return chain, written

    def _process_one(self, index: int, chain: DescriptorChain) -> int | None:
        try:
            return self.process(index, chain)
        except GuestMemoryError as e:
            # The device touched a bad buffer of a chain it had not checked: fail just that chain.
            self.log(logging.WARNING, "virtio device %d queue %d chain %d: %s", self.DEVICE_ID, index,
                     chain.head, e)
            return 0

    def complete(self, queue_index: int, head: int, written: int, notify: bool = True) -> None:
        """Push a chain that :meth:`process` deferred (returned None), and signal if needed."""
        q = self.queues[queue_index]
        q.push(head, written)
        if notify and q.should_signal():
            self._raise(queue_index)

    def notify(self, queue_index: int) -> None:
        """Signal queue ``queue_index`` if the driver wants it (after ``complete(..., notify=False)``)."""
        if self.queues[queue_index].should_signal():
            self._raise(queue_index)

    def _raise(self, index: int) -> None:
        if self._signal is not None:
            self._signal(index)

    def _set_needs_reset(self, index: int, err: BaseException) -> None:
        if self.needs_reset:
            return
        self.needs_reset = True
        self.log(logging.WARNING, "virtio device %d queue %d: %s; device needs reset", self.DEVICE_ID, index, err)
        if self.on_needs_reset is not None:
            self.on_needs_reset()
