"""The modern virtio-pci transport (VIRTIO 1.2 §4.1), with a choice of I/O path for the queues.

BAR0 holds the common configuration (trapped: it is control, not data path),
the ISR byte and the device configuration.  BAR2 holds the notify registers,
one 4 KiB page per queue (``notify_off_multiplier`` = 4096), so that each
queue's doorbell can be, depending on the path:

- ``trap``: MMIO; the vCPU thread runs the queue in its exit handler;
- ``ioeventfd``: MMIO with an ioeventfd per queue; a ``notify`` sidecore runs it;
- ``shared``: RAM shared with a polling sidecore, which sees the driver's write
  to the page (and re-arms it with a sentinel) — the doorbell costs no exit;
- ``poll``: the sidecore polls the avail rings with guest notifications
  suppressed (EVENT_IDX / NO_NOTIFY), the doorbell is never written;
- ``adaptive``: ``poll`` while busy; when idle, re-enable notifications (publish
  avail_event, fence, re-check) and sleep on the ioeventfds.

BAR4 holds the MSI-X table and PBA.  Completions interrupt through irqfds.

With ``service`` (``run --sidecore PATH``) a polled path's queues are served by the
``exitless sidecore`` service instead of a sidecore of this VMM: the device model here
answers configuration only, and at DRIVER_OK the queues go to the service
(:class:`~exitless.sidecore.remote.RemoteQueues`).

Without MSI-X the function interrupts on its INTx line, whose level is a function
of state (:meth:`PciDevice.update_intx`): asserted while ISR is non-zero, MSI-X is
disabled and COMMAND.INTERRUPT_DISABLE is clear; reading ISR (§4.1.4.5) and a
device reset (§2.4: no notifications after reset) de-assert it.
"""
from __future__ import annotations

import logging
import os
import struct
import threading

from ...sidecore.engine import SidecoreGroup
from ...sidecore.loop import QUEUE_BUDGET
from ...sidecore.paths import MODE_OF_PATH, PATHS, REMOTE_PATHS
from ...bus import BusError
from ...memory import GuestMemoryError
from ...sidecore.spin import WatchedLock, address_of, drain_eventfd, fence
from ..pci.device import Bar, PciDevice
from ..pci.msix import CAP_ID_MSIX, NO_VECTOR, Msix
from .constants import (VIRTIO_ID_NET, VIRTIO_STATUS_DEVICE_NEEDS_RESET, VIRTIO_STATUS_DRIVER_OK,
                        VIRTIO_STATUS_FEATURES_OK)
from .device import VirtioDevice

log = logging.getLogger(__name__)

VIRTIO_VENDOR = 0x1AF4
CAP_VENDOR = 0x09
CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE, CFG_PCI = 1, 2, 3, 4, 5
COMMON_OFF, ISR_OFF, DEVICE_OFF = 0x0000, 0x1000, 0x2000
COMMON_LEN, DEVICE_LEN = 0x40, 0x1000
NOTIFY_MULTIPLIER = 4096
BAR_CFG, BAR_NOTIFY, BAR_MSIX = 0, 2, 4
NOTIFY_SENTINEL = 0xFFFF_FFFF
#: Where a shared notify page waits while its BAR does not decode: a guest-physical address above
#: any CPU's physical address width (52 bits), so that its old address is free for another BAR.
PARKED_GPA = 1 << 56
CLASS_BY_DEVICE = {1: 0x020000, 2: 0x018000}   # net: ethernet; blk: mass storage (other)


class _QueueState:
    def __init__(self, size: int):
        self.size = size
        self.msix_vector = NO_VECTOR
        self.enable = 0
        self.desc = self.driver = self.device = 0


class VirtioPci(PciDevice):
    def __init__(self, machine, device: VirtioDevice, path: str = "trap", *, poll_ns: int = 64_000,
                 sidecore: SidecoreGroup | None = None, service: str | None = None):
        """``sidecore``: a group shared with other devices, which the caller starts with
        ``group.start_on(machine)`` after the last device joined (so that it stops before
        any of them); by default the device gets a sidecore of its own.  ``service``: the
        socket of an ``exitless sidecore`` that serves the queues instead (a polled path; a
        virtio-net device keeps its control queue here); raises :class:`~exitless.sidecore.remote.RemoteSidecoreError`
        if it cannot be reached or refuses the device."""
        if path not in PATHS:
            raise ValueError(f"I/O path {path!r}: one of {', '.join(PATHS)}")
        if service is not None and (path not in REMOTE_PATHS or sidecore is not None):
            raise ValueError(f"the {path} path cannot be served by a sidecore service")
        n = device.num_queues
        notify_size = max(4096, 1 << (n * NOTIFY_MULTIPLIER - 1).bit_length())
        super().__init__(vendor=VIRTIO_VENDOR, device=0x1040 + device.device_id, revision=1,
                         class_code=CLASS_BY_DEVICE.get(device.device_id, 0xFF0000),
                         subsystem_vendor=VIRTIO_VENDOR, subsystem=device.device_id,
                         bars=[Bar(BAR_CFG, 0x4000), Bar(BAR_NOTIFY, notify_size), Bar(BAR_MSIX, 0x1000)])
        self.machine = machine
        self.device = device
        self.path = path
        # a C loop may hold it for a spin slice; a thread that wants it makes that loop return (WatchedLock)
        self.lock = WatchedLock()
        # ISR bits and the INTx level only: device threads raise interrupts while holding locks of their
        # own (virtio-net's per-pair RX lock), which the transport lock, held around handle_queue, nests
        # outside -- taking the transport lock there deadlocked the vCPU (ABBA) as soon as INTx was used
        self._isr_lock = threading.Lock()
        device.transport_lock = self.lock
        self.msix = Msix(machine.irq_router, n + 1, BAR_MSIX)
        self._add_virtio_cap(CFG_COMMON, BAR_CFG, COMMON_OFF, COMMON_LEN)
        self._add_virtio_cap(CFG_NOTIFY, BAR_NOTIFY, 0, notify_size, struct.pack("<I", NOTIFY_MULTIPLIER))
        self._add_virtio_cap(CFG_ISR, BAR_CFG, ISR_OFF, 1)
        self._add_virtio_cap(CFG_DEVICE, BAR_CFG, DEVICE_OFF, DEVICE_LEN)
        body, writable = self.msix.capability()
        self.msix.cap_offset = self.add_capability(CAP_ID_MSIX, body, writable)
        # VIRTIO_PCI_CAP_PCI_CFG: a window into the BARs through config space (the spec requires it)
        self.pci_cfg_cap = self._add_virtio_cap(CFG_PCI, 0, 0, 0, b"\0" * 4,
                                                writable=b"\0" * 2 + b"\xff" + b"\0" * 3 + b"\xff" * 12)
        device.on_needs_reset = self._needs_reset
        device.on_config_changed = self._config_interrupt
        self._reset_transport()
        # I/O path plumbing
        self.wake_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)] \
            if path in ("ioeventfd", "poll", "adaptive") else []
        self.notify_region = None
        self._ioeventfds_at = None
        self.sidecore = None
        self.remote = None
        self.slot = machine.pci.add(self)
        machine.add_worker(self)
        if service is not None:
            # the VM side of the service (it imports vhost_user); a NIC keeps its control queue here
            if device.device_id == VIRTIO_ID_NET:
                from ...sidecore.service_net import RemoteNic as Remote
            else:
                from ...sidecore.remote import RemoteQueues as Remote
            self.remote = Remote(service, self)
            if self.remote.local_queues:     # on their ioeventfds (Linux kicks the control queue and waits)
                self.sidecore = SidecoreGroup("notify", name=f"ctrl-virtio{self.slot}")
                self.sidecore.add([QueuePollable(self, q) for q in self.remote.local_queues], "notify")
                self.sidecore.start()
        elif path != "trap":
            # plus the device's host side (a TAP's receive fd), served by the same sidecore as its queues
            queues = [QueuePollable(self, q) for q in range(n)]
            pollables = queues + device.backend_pollables(MODE_OF_PATH[path])
            for qp in queues:   # a queue a backend pollable serves in C: its words are not watched meanwhile
                qp.served_by = device.queue_server(qp.index)
            if sidecore is None:
                self.sidecore = SidecoreGroup(MODE_OF_PATH[path], poll_ns=poll_ns, name=f"sidecore-virtio{self.slot}")
                self.sidecore.add(pollables, MODE_OF_PATH[path])
                self.sidecore.start()
            else:
                sidecore.add(pollables, MODE_OF_PATH[path])
        elif pollables := device.backend_pollables("notify"):
            # trap: the queues run on the vCPU threads, the host side needs a thread of its own
            self.sidecore = SidecoreGroup("notify", name=f"host-side-virtio{self.slot}")
            self.sidecore.add(pollables, "notify")
            self.sidecore.start()

    def _add_virtio_cap(self, cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b"",
                        writable: bytes | None = None) -> int:
        body = struct.pack("<BBBBBBII", 16 + len(extra), cfg_type, bar, 0, 0, 0, offset, length) + extra
        return self.add_capability(CAP_VENDOR, body, writable)

    # -- VIRTIO_PCI_CAP_PCI_CFG window ------------------------------------------
    def _pci_cfg_target(self, offset: int, size: int):
        """(bar, offset, length) if a config access hits the pci_cfg_data window, else None."""
        data = self.pci_cfg_cap + 16
        if not (data <= offset and offset + size <= data + 4):
            return None
        bar = self.config[self.pci_cfg_cap + 4]
        boff, length = struct.unpack_from("<II", self.config, self.pci_cfg_cap + 8)
        if length not in (1, 2, 4) or bar not in self.bars or boff + length > self.bars[bar].size:
            return None
        return bar, boff, length

    def _bar_device(self, bar: int):
        return {BAR_CFG: _CfgWindow(self), BAR_NOTIFY: _NotifyWindow(self), BAR_MSIX: self.msix}[bar]

    def config_read(self, offset: int, size: int) -> int:
        target = self._pci_cfg_target(offset, size)
        if target is None:
            return super().config_read(offset, size)
        bar, boff, length = target
        return int.from_bytes(self._bar_device(bar).read(boff, length), "little")

    def _reset_transport(self) -> None:
        self.status = 0
        self.device_feature_select = self.driver_feature_select = 0
        self.driver_features = 0
        self.msix_config = NO_VECTOR
        self.config_generation = 0
        self.queue_select = 0
        with self._isr_lock:
            self.isr = 0
        self.queues = [_QueueState(self.device.queue_max_size) for _ in range(self.device.num_queues)]
        self.update_intx()

    # -- BAR mapping (called by PciDevice when decoding changes) ----------------
    def map_bar(self, index: int, address: int) -> None:
        mmio = self.machine.mmio
        size = self.bars[index].size
        if index == BAR_CFG:
            mmio.insert(address, size, _CfgWindow(self), f"virtio{self.device.device_id}-cfg")
        elif index == BAR_MSIX:
            mmio.insert(address, size, self.msix, "virtio-msix")
        elif index == BAR_NOTIFY:
            # On every path the MMIO bus holds the notify range, so that an overlap with any other
            # BAR is refused there; on the shared path KVM's RAM slot answers before the bus is asked.
            mmio.insert(address, size, _NotifyWindow(self), "virtio-notify")
            if self.path == "shared":
                try:
                    self._map_notify_page(address, size)
                except GuestMemoryError as e:
                    mmio.remove(address)
                    raise BusError(f"virtio-notify page at {address:#x}: {e}") from e
            else:
                for q, fd in enumerate(self.wake_fds):
                    self.machine.vm.ioeventfd(fd, address + q * NOTIFY_MULTIPLIER, 0)
                self._ioeventfds_at = address

    def _map_notify_page(self, address: int, size: int) -> None:
        if self.notify_region is None:
            self.notify_region = self.machine.add_ram_page(address, size)
            view = self.machine.mem.view(address, size)
            self.notify_words = [view[q * NOTIFY_MULTIPLIER:q * NOTIFY_MULTIPLIER + 4].cast("I")
                                 for q in range(self.device.num_queues)]
            for word in self.notify_words:
                word[0] = NOTIFY_SENTINEL
            self.notify_view = view
        else:
            self.notify_region = self.machine.remap_ram_page(self.notify_region, address)

    def unmap_bar(self, index: int, address: int) -> None:
        self.machine.mmio.remove(address)
        if index == BAR_NOTIFY and self.path == "shared":
            self.machine.unmap_ram_page(self.notify_region)
            # out of the way, so that its old address can take another BAR
            self.notify_region = self.machine.mem.move_region(self.notify_region,
                                                              PARKED_GPA + self.notify_region.offset)
        elif index == BAR_NOTIFY and self._ioeventfds_at is not None:
            for q, fd in enumerate(self.wake_fds):
                self.machine.vm.ioeventfd(fd, address + q * NOTIFY_MULTIPLIER, 0, deassign=True)
            self._ioeventfds_at = None

    def config_written(self, offset: int, size: int, value: int) -> None:
        target = self._pci_cfg_target(offset, size)
        if target is not None:
            bar, boff, length = target
            self._bar_device(bar).write(boff, (value & ((1 << (8 * length)) - 1)).to_bytes(length, "little"))
            return
        cap = self.msix.cap_offset
        if offset <= cap + 2 < offset + size or offset <= cap + 3 < offset + size:
            self.msix.control_written(struct.unpack_from("<H", self.config, cap + 2)[0])
            self.update_intx()        # INTx is not used while MSI-X is enabled

    # -- interrupts --------------------------------------------------------------
    def signal_queue(self, q: int) -> None:
        if not self.status & VIRTIO_STATUS_DRIVER_OK:
            return                      # reset, or not yet live: no notifications (§2.4, §3.1)
        if self.msix.enabled:
            vec = self.queues[q].msix_vector
            if vec != NO_VECTOR:
                self.msix.fire(vec)
        else:
            self._intx(0x1)

    def _config_interrupt(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self.msix.enabled:
            with self._isr_lock:
                self.isr |= 0x2         # §4.1.4.5.1: set before any configuration change notification
            if self.msix_config != NO_VECTOR:
                self.msix.fire(self.msix_config)
        else:
            self._intx(0x2)

    def _intx(self, bits: int) -> None:
        with self._isr_lock:
            self.isr |= bits
            self.update_intx()

    def drive_intx(self, gsi: int, level: int) -> None:
        self.machine.vm.irq_line(gsi, level)

    def intx_pending(self) -> bool:
        """§4.1.4.5.1: with MSI-X disabled, STATUS.INTERRUPT is the OR of the ISR bits."""
        return bool(self.isr) and not self.msix.enabled

    def _needs_reset(self) -> None:
        self.status |= VIRTIO_STATUS_DEVICE_NEEDS_RESET
        self._config_interrupt()

    def remote_failed(self) -> None:
        """The sidecore service refused the queues, broke a ring or went away (logged by the caller)."""
        if self.status & VIRTIO_STATUS_DRIVER_OK and not self.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET:
            self._needs_reset()

    # -- common configuration ------------------------------------------------------
    def common_read(self, offset: int, size: int) -> int:
        q = self.queues[self.queue_select] if self.queue_select < len(self.queues) else None
        fields = {
            0x00: self.device_feature_select,
            0x04: (self.device.device_features() >> (32 * self.device_feature_select)) & 0xFFFFFFFF
            if self.device_feature_select < 2 else 0,
            0x08: self.driver_feature_select,
            0x0C: (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF
            if self.driver_feature_select < 2 else 0,
            0x10: self.msix_config, 0x12: self.device.num_queues, 0x14: self.status, 0x15: self.config_generation,
            0x16: self.queue_select,
            0x18: q.size if q else 0, 0x1A: q.msix_vector if q else NO_VECTOR, 0x1C: q.enable if q else 0,
            0x1E: self.queue_select if q else 0,
            0x20: q.desc & 0xFFFFFFFF if q else 0, 0x24: q.desc >> 32 if q else 0,
            0x28: q.driver & 0xFFFFFFFF if q else 0, 0x2C: q.driver >> 32 if q else 0,
            0x30: q.device & 0xFFFFFFFF if q else 0, 0x34: q.device >> 32 if q else 0,
        }
        return fields.get(offset, 0) & ((1 << (8 * size)) - 1)

    def common_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            q = self.queues[self.queue_select] if self.queue_select < len(self.queues) else None
            live = self.status & VIRTIO_STATUS_DRIVER_OK
            if offset == 0x00:
                self.device_feature_select = value
            elif offset == 0x08:
                self.driver_feature_select = value
            elif offset == 0x0C and self.driver_feature_select < 2 and not self.status & VIRTIO_STATUS_FEATURES_OK:
                shift = 32 * self.driver_feature_select
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
            elif offset == 0x10:
                self.msix_config = value if value == NO_VECTOR or value < self.msix.n else NO_VECTOR
            elif offset == 0x14:
                self._write_status(value & 0xFF)
            elif offset == 0x16:
                self.queue_select = value
            elif q is not None and not live:
                if offset == 0x18:
                    if value and value <= self.device.queue_max_size and not value & (value - 1):
                        q.size = value
                elif offset == 0x1A:
                    q.msix_vector = value if value == NO_VECTOR or value < self.msix.n else NO_VECTOR
                elif offset == 0x1C:
                    q.enable = value & 1
                elif offset in (0x20, 0x24, 0x28, 0x2C, 0x30, 0x34):
                    name = {0x20: "desc", 0x28: "driver", 0x30: "device"}[offset & ~0x7]
                    cur = getattr(q, name)
                    cur = (cur & ~0xFFFFFFFF) | value if offset % 8 == 0 else (cur & 0xFFFFFFFF) | (value << 32)
                    if size == 8:
                        cur = value
                    setattr(q, name, cur)
            elif q is not None and offset == 0x1A:
                q.msix_vector = value if value == NO_VECTOR or value < self.msix.n else NO_VECTOR

    def _write_status(self, value: int) -> None:
        if value == 0:
            if self.remote is not None:
                self.remote.deactivate()
            if self.device.activated or self.device.needs_reset:
                self.device.reset()
            self._reset_transport()
            self._wake_sidecore()
            return
        new = value & ~self.status
        if new & VIRTIO_STATUS_FEATURES_OK and not self.device.features_ok(self.driver_features):
            value &= ~VIRTIO_STATUS_FEATURES_OK  # the driver reads it back and gives up
        self.status = value | (self.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET)
        if new & VIRTIO_STATUS_DRIVER_OK and self.status & VIRTIO_STATUS_FEATURES_OK:
            self._activate()

    def _activate(self) -> None:
        if self.remote is not None:
            if self.remote.local_queues:     # the model here serves them (and learns which pairs are on)
                self._activate_model()
            # a kick fd only where the guest's doorbell write reaches one (not the shared path's RAM page)
            kicks = [fd if self.path != "shared" else None for fd in self.wake_fds] or [None] * len(self.queues)
            self.remote.activate(self.driver_features, self.queues, kicks)
            self._wake_sidecore()
            return
        vqs = self._activate_model()
        if self.path in ("poll", "adaptive"):
            for vq in vqs:
                if vq.configured:
                    vq.disable_notifications()
        self._wake_sidecore()

    def _activate_model(self) -> list:
        """DRIVER_OK for the device model here: its queues as the driver set them up."""
        vqs = self.device.create_queues(self.machine.mem)
        for vq, st in zip(vqs, self.queues):
            vq.size, vq.desc_addr, vq.avail_addr, vq.used_addr = st.size, st.desc, st.driver, st.device
            vq.ready = bool(st.enable)
        self.device.activate(self.machine.mem, vqs, self.driver_features, self.signal_queue)
        return vqs

    def _wake_sidecore(self) -> None:
        for fd in self.wake_fds:
            os.eventfd_write(fd, 1)

    def isr_read(self) -> int:
        """Read-to-clear (§4.1.4.5): the INTx line drops."""
        with self._isr_lock:
            value, self.isr = self.isr, 0
            self.update_intx()
            return value

    def notify(self, q: int) -> None:
        """A trapped doorbell write (the trap path), handled on the vCPU thread."""
        with self.lock:
            if 0 <= q < self.device.num_queues:
                self.device.handle_queue(q)

    def stop(self) -> None:
        if self.sidecore is not None:  # our own; a shared group is a worker of the machine itself
            self.sidecore.stop()
            self.sidecore = None
        if self.remote is not None:    # the service detaches the queues before our fds close
            self.remote.close()
            self.remote = None
        for fd in self.wake_fds:
            os.close(fd)
        self.wake_fds = []
        close = getattr(self.device, "close", None)
        if close:
            close()


class _CfgWindow:
    """BAR0: common configuration, ISR, device configuration."""

    def __init__(self, t: VirtioPci):
        self.t = t

    def read(self, offset: int, size: int) -> bytes:
        t = self.t
        if COMMON_OFF <= offset < COMMON_OFF + COMMON_LEN:
            return t.common_read(offset - COMMON_OFF, size).to_bytes(size, "little")
        if offset == ISR_OFF:
            return t.isr_read().to_bytes(size, "little")
        if DEVICE_OFF <= offset < DEVICE_OFF + DEVICE_LEN:
            return t.device.read_config(offset - DEVICE_OFF, size)
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        t = self.t
        if COMMON_OFF <= offset < COMMON_OFF + COMMON_LEN:
            t.common_write(offset - COMMON_OFF, len(data), int.from_bytes(data, "little"))
        elif DEVICE_OFF <= offset < DEVICE_OFF + DEVICE_LEN:
            with t.lock:
                t.device.write_config(offset - DEVICE_OFF, data)


class _NotifyWindow:
    """BAR2 as MMIO: a trapped notify write (only reached on the trap path; ioeventfd catches the rest)."""

    def __init__(self, t: VirtioPci):
        self.t = t

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        self.t.notify(offset // NOTIFY_MULTIPLIER)


class QueuePollable:
    """One virtqueue as seen by a sidecore (see :mod:`exitless.sidecore.loop`).

    Each :meth:`poll` completes at most ``budget`` chains (default :data:`QUEUE_BUDGET`); a queue left
    with chains is a *backlog*: polled again next round even though its doorbell word was re-armed, and
    watched through its avail.idx, which is then already ahead, so the loop does not spin or sleep.
    """

    def __init__(self, t: VirtioPci, index: int, budget: int = QUEUE_BUDGET):
        self.t = t
        self.index = index
        self.budget = budget
        self.backlog = False
        self.served_by = None   # the pollable that serves this queue in C during the spin (VirtioNet's pair)
        self.wake_fd = t.wake_fds[index] if t.wake_fds else None
        self.shared = t.path == "shared"
        self._notify_addr = None
        self._avail_of = None   # the Virtqueue whose avail word is cached below
        self._avail_word = self._avail_addr = None

    def _queue(self):
        dev = self.t.device
        if not dev.activated or dev.needs_reset or self.index >= len(dev.queues):
            return None
        q = dev.queues[self.index]
        return q if q.configured else None

    def poll(self) -> bool:
        q = self._queue()
        if q is None:
            return False
        if self.shared:
            word = self.t.notify_words[self.index]
            if word[0] != NOTIFY_SENTINEL:
                word[0] = NOTIFY_SENTINEL  # re-arm the doorbell page (one whole-word store)...
                fence()                    # ...before looking at the ring
            elif not self.backlog:
                return False
        elif not q.has_work():
            self.backlog = False
            return False
        with self.t.lock:
            n = self.t.device.handle_queue(self.index, self.budget)
        self.backlog = n >= self.budget
        return n > 0 or self.shared

    def watches(self) -> list[tuple[int, int]]:
        q = self._queue()
        if q is None:
            return []
        if self.shared and not self.backlog:
            if self._notify_addr is None:
                self._notify_addr = address_of(self.t.notify_view[self.index * NOTIFY_MULTIPLIER:])
            return [(self._notify_addr, NOTIFY_SENTINEL)]
        if self._avail_of is not q:  # a new ring (activation): its avail flags+idx word, as one u32
            view = self.t.machine.mem.view(q.avail_addr, 4)
            self._avail_word, self._avail_addr, self._avail_of = view.cast("I"), address_of(view), q
        # the word with the driver's current flags and our consumed index: a new avail.idx changes it
        return [(self._avail_addr, (self._avail_word[0] & 0xFFFF) | (q.last_avail_idx << 16))]

    def arm(self) -> bool:
        q = self._queue()
        return q.enable_notifications() if q is not None else False

    def disarm(self) -> None:
        q = self._queue()
        if q is not None:
            q.disable_notifications()

    def drain(self) -> None:
        drain_eventfd(self.wake_fd)
