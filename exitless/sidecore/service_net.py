"""A virtio-net NIC whose RX/TX queue pairs the ``exitless sidecore`` service serves (``run --net
tap=NAME,io=poll|adaptive --sidecore PATH``): both sides of the hand-over.

Split as QEMU splits virtio-net with a vhost-user-net back-end (and as ``exitless serve net`` does):

* the **VMM** keeps the virtio-pci function, the device configuration and the **control queue** (RX
  mode, MAC table, announce acks, VQ_PAIRS_SET): its own :class:`~exitless.devices.virtio.net.VirtioNet`
  answers them, served by a small ``notify`` sidecore on the control queue's ioeventfd (Linux's driver
  kicks the control queue and busy-waits for the ack).  It attaches the TAP itself (by name, in its
  network namespace, with its privileges) and hands the queue fds over;
* the **service** builds a ``VirtioNet(ctrl_queue=False)`` on those fds -- the device ``serve net``
  builds -- and serves its pairs (and the TAPs' readiness, :class:`~exitless.devices.virtio.net.TapRxPollable`)
  from the one loop that serves every other VM's queues: they are ordinary pollables of it (the pair's
  rings are :class:`~exitless.vhost_user.backend.VringPollable` objects, as under ``serve net``), so whatever the
  loop does for a vhost-user NIC pair it does for these.

Hand-over (:class:`RemoteNic`): EXITLESS_SET_BACKEND with device id 1, ``num_queues`` = 2 x pairs, the
MAC as its serial, and the fds: one TAP queue per pair (IFF_MULTI_QUEUE when several), then a
*config eventfd*.  The service checks each fd is a queue of one TAP with the vnet header
(:meth:`~exitless.net.tap.ReceivedTap.adopt`) and refuses anything else with a log line.  The
features the service's device offers must be exactly the VMM's model's minus
:data:`~exitless.devices.virtio.net.CTRL_FEATURES` (the control queue's, which the VMM keeps); the
driver's features go over without those.  Queue pairs the driver has not enabled with VQ_PAIRS_SET
are set up but disabled (SET_VRING_ENABLE 0), and enabled when it does -- as QEMU does with
vhost-user-net; the service's device then attaches or detaches the TAP queue.

Link status (what the VM's driver sees):

* the TAP goes down or is deleted: the service's device drops frames, counts them and clears LINK_UP;
  it writes the config eventfd (vhost-user's BACKEND_CONFIG_CHANGE_MSG without a back-end channel),
  the VMM reads the status with GET_CONFIG and its device shows link down (configuration interrupt).
  A TAP that comes back up brings the link up the same way.  A *deleted* TAP stays down: the service
  cannot re-attach it (the name is not its namespace's, the privileges are dropped) -- restart the VM;
* the service goes away (killed, stopped) or refuses the queues: the VM's NIC shows **link down**,
  with a log line, where a disk would show DEVICE_NEEDS_RESET: a NIC whose back-end is gone is a
  cable pulled out (QEMU's vhost-user-net does the same when its back-end disconnects), and the
  driver keeps the interface, its addresses and routes.  A broken ring (a guest bug) still needs a
  reset, as on every other path.

The RX filter (RX mode, MAC table) is the VMM's and is not applied by the service, which delivers
every frame the TAP gives (as with QEMU's vhost back-ends); the guest's stack drops what is not its.
"""
from __future__ import annotations

import errno
import logging
import os

from ..devices.virtio.net import CTRL_FEATURES, VirtioNet, format_mac, parse_mac
from ..devices.virtio.constants import VIRTIO_NET_S_LINK_UP
from ..net.tap import ReceivedTap, TUNGETIFF, TUNGETVNETHDRSZ, TUNSETOFFLOAD, TUNSETQUEUE, TapError
from ..vhost_user import protocol as P
from ..vhost_user.backend import _eventfd
from ..vhost_user.frontend import FrontendError
from ..vhost_user.protocol import ProtocolError
from .remote import RemoteQueues

log = logging.getLogger("exitless.sidecore.remote")

#: Most queue pairs a NIC may hand over: a vhost-user message carries at most 8 fds
#: (:data:`exitless.vhost_user.protocol.MAX_FDS`), a TAP queue per pair and the config eventfd.
MAX_PAIRS = P.MAX_FDS - 1
#: The ioctls the service makes on TAP fds it receives, on whatever fd number they arrive as (its
#: seccomp filter, ``exitless.confine.confine(ioctls=…)``): reading what the fd is, then the offloads
#: and queue attach/detach the guest's features and VQ_PAIRS_SET ask for.
SERVICE_IOCTLS = tuple((None, request) for request in (TUNGETIFF, TUNGETVNETHDRSZ, TUNSETOFFLOAD, TUNSETQUEUE))
_STATUS_OFFSET = 6           # struct virtio_net_config: mac[6], then status (le16)


# -- the service's side ---------------------------------------------------------------------------------------
class ServedNet(VirtioNet):
    """The service's model of a VM's NIC: ``VirtioNet(ctrl_queue=False)`` on a :class:`ReceivedTap`,
    writing ``config_fd`` (the VMM's eventfd) whenever its configuration -- the link -- changes.
    :meth:`close` closes the TAP fds and the eventfd too (the service owns them)."""

    def __init__(self, tap: ReceivedTap, config_fd: int, **kw):
        super().__init__(tap, ctrl_queue=False, **kw)
        self.config_fd = config_fd

    def config_changed(self) -> None:
        try:
            os.eventfd_write(self.config_fd, 1)
        except OSError as e:     # a full counter (a hostile VM) or a VMM gone: nothing left to tell
            if e.errno not in (errno.EAGAIN, errno.EBADF):
                raise

    def close(self) -> None:
        super().close()
        self.backend.close()
        if self.config_fd >= 0:
            os.close(self.config_fd)
            self.config_fd = -1


def served_nic(spec: P.Backend, fds: list[int], name: str) -> tuple[ServedNet, str]:
    """EXITLESS_SET_BACKEND for virtio-net: the device model and a description for the log.

    ``fds`` (owned from here on: closed if this raises): one TAP queue per pair, then the config
    eventfd.  Raises :class:`ProtocolError` for flags, an odd or too large queue count, a serial that
    is not a unicast MAC, an fd that is not a queue of one TAP with the vnet header, or a config fd
    that is not an eventfd.
    """
    try:
        if spec.flags:
            raise ProtocolError(f"EXITLESS_SET_BACKEND: flags {spec.flags:#x} mean nothing for a NIC")
        pairs, odd = divmod(spec.num_queues, 2)
        if odd or not 1 <= pairs <= MAX_PAIRS:
            raise ProtocolError(f"EXITLESS_SET_BACKEND: {spec.num_queues} queues is not 1..{MAX_PAIRS} RX/TX pairs")
        try:
            mac = parse_mac(spec.serial)
        except ValueError as e:
            raise ProtocolError(f"EXITLESS_SET_BACKEND: {e}") from None
        config_fd = _eventfd(fds[-1], "EXITLESS_SET_BACKEND config fd")
        try:
            tap = ReceivedTap.adopt(fds[:-1])
        except TapError as e:
            raise ProtocolError(f"EXITLESS_SET_BACKEND: TAP {e.strerror}") from None
        dev = ServedNet(tap, config_fd, mac=mac, queue_pairs=pairs, queue_size=spec.queue_size)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return dev, (f"NIC {format_mac(mac)} on TAP {tap.name} ({pairs} queue pair(s) of {spec.queue_size}; the "
                 f"VM keeps the control queue)")


# -- the VM's side ---------------------------------------------------------------------------------------------
class _PairsOnService:
    """The VMM's model's back-end while the service serves the pairs: the TAP's fds (so that the model
    counts its pairs), no offloads of its own (the service's model sets them on the same files), and
    VQ_PAIRS_SET turned into SET_VRING_ENABLE of the pair's rings (:meth:`RemoteNic.set_pair_enabled`)."""

    def __init__(self, tap, remote: "RemoteNic"):
        self.name = tap.name
        self.fds = tap.fds
        self.remote = remote

    def set_offload(self, offloads: int) -> None:
        pass

    def set_queue_enabled(self, index: int, enabled: bool) -> None:
        self.remote.set_pair_enabled(index, enabled)


class RemoteNic(RemoteQueues):
    """The queue pairs of virtio-net function ``pci`` served by the ``exitless sidecore`` at ``path``
    (see the module docstring); the control queue (:attr:`local_queues`) stays in this VMM.
    Raises :class:`~exitless.sidecore.remote.RemoteSidecoreError`."""

    failure_effect = "the NIC shows link down"
    wanted_protocol = RemoteQueues.wanted_protocol | 1 << P.PROTOCOL_F_CONFIG     # GET_CONFIG: the link

    def __init__(self, path: str, pci, *, timeout: float = 10.0):
        dev = pci.device
        self.config_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.pairs_enabled = [False] * dev.queue_pairs
        self.local_queues = [dev.ctrl_index] if dev.ctrl_index is not None else []
        self.served = range(2 * dev.queue_pairs)
        self.events = {self.config_fd: self._config_changed}
        self.tap = dev.backend
        try:
            super().__init__(path, pci, timeout=timeout)
        except BaseException:
            self._close_config_fd()
            raise
        dev.backend = _PairsOnService(self.tap, self)

    def handover(self, dev) -> tuple[int, list[int], str]:
        return 0, [*self.tap.fds, self.config_fd], format_mac(dev.default_mac)

    def what(self, dev) -> str:
        return f"the NIC on TAP {self.tap.name}"

    def expected_features(self, dev) -> int:
        return dev.device_features() & ~CTRL_FEATURES

    def ring_enabled(self, index: int) -> bool:
        return self.pairs_enabled[index // 2]

    def set_pair_enabled(self, pair: int, enabled: bool) -> None:
        """The VMM's model enables or disables pair ``pair`` (activation, VQ_PAIRS_SET): so do the
        service's rings, once started (at DRIVER_OK :meth:`activate` enables those enabled by then)."""
        if self.pairs_enabled[pair] == enabled:
            return
        self.pairs_enabled[pair] = enabled
        rings = [i for i in (2 * pair, 2 * pair + 1) if i in self.started]
        if self._failed or not rings:
            return
        try:
            for i in rings:
                self.fe.set_vring_enable(i, enabled)
        except (FrontendError, OSError) as e:
            self._fail(f"refused to {'enable' if enabled else 'disable'} queue pair {pair}: {e}")

    def on_failure(self, broken: bool) -> None:
        """A broken ring needs a reset (as on every path); a service that refused or went away is a
        link down (see the module docstring)."""
        if broken:
            super().on_failure(broken)
        else:
            self.pci.device.set_link(False)

    def _config_changed(self) -> None:
        """The service's device changed its configuration: read its status (GET_CONFIG) and show it."""
        with self.pci.lock:              # the connection is the vCPU's and the control queue's too
            if self._failed or self.fe is None:
                return
            try:
                status = int.from_bytes(self.fe.get_config(_STATUS_OFFSET, 2), "little")
            except (FrontendError, OSError) as e:     # the service is gone or broken
                self._fail(f"did not answer GET_CONFIG: {e}")
                return
            up = bool(status & VIRTIO_NET_S_LINK_UP)
            if up != self.pci.device.link_up:
                log.warning("virtio%d: the sidecore service says the link of TAP %s is %s", self.pci.slot,
                            self.tap.name, "up" if up else "down")
            self.pci.device.set_link(up)

    def close(self) -> None:
        super().close()
        self._close_config_fd()

    def _close_config_fd(self) -> None:
        if self.config_fd >= 0:
            os.close(self.config_fd)
            self.config_fd = -1
