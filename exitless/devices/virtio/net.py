"""virtio-net (VIRTIO 1.2 §5.1) on a host TAP device (or anything with the same fd semantics).

Queues: ``receiveq0, transmitq0, ..., receiveqN-1, transmitqN-1`` and, with
``ctrl_queue=True``, the control queue last (§5.1.2).  A vhost-user frontend
(QEMU) keeps the control queue itself, so the back-end builds the device
without it.

Every frame on every queue starts with the 12-byte ``struct virtio_net_hdr_v1``
(VERSION_1 is required).  The TAP is opened with ``IFF_VNET_HDR`` and
``TUNSETVNETHDRSZ 12`` (:mod:`exitless.net.tap`), so headers pass through in
both directions and checksum/segmentation offloads cost nothing here.

Transmit (§5.1.6.2): a TX chain is header + frame, device-readable.  The
header is copied and checked (the guest may change its buffer meanwhile), then
``writev(header copy, frame views...)`` sends it zero-copy.  A chain is
dropped -- used length 0, counted in :attr:`VirtioNet.stats` -- if it has a
bad buffer, a device-writable part, fewer than 12 + 14 bytes, a frame larger
than :data:`MAX_FRAME`, a NEEDS_CSUM request whose ``csum_start + csum_offset
+ 2`` lies past the frame or that CSUM was not negotiated for, a GSO type that
was not negotiated (HOST_TSO4/6, HOST_ECN; UFO is not offered), a GSO frame
without NEEDS_CSUM, with ``gso_size`` 0 or with ``hdr_len`` past the frame.

Receive (§5.1.6.3-4): the device takes the driver's RX buffers off the ring as
they arrive and holds them (at most the queue size: a head the driver offers
again while we hold it is a broken ring).  Frames are read from the TAP fd
with ``readv`` straight into those buffers: one chain without MRG_RXBUF, as
many chains as the frame needs with it (header first; ``num_buffers`` says how
many).  A bounce buffer completes the scatter list up to :data:`MAX_RX` bytes,
so a frame never gets truncated; one that does not fit the guest's buffers is
dropped (``rx_dropped``) and the buffers are reused for the next.  ``num_buffers``
is always written (the kernel skips those two bytes).  Without GUEST_CSUM the
header's flags are cleared (the TAP then delivers only checksummed frames).

RX backlog: none in this process.  The TAP fd is read only while the guest
has buffers; otherwise frames wait in the kernel's TAP queue (``txqueuelen``
frames, then the kernel drops), and the TAP fd is not watched until the driver
posts buffers again -- so a guest that never posts costs no CPU and no memory.

Waiting for the TAP (:class:`TapRxPollable`): one-shot Linux AIO polls
(``IOCB_CMD_POLL``, :mod:`exitless.sidecore.aio_poll`), re-armed only after a
read returned EAGAIN (submission re-checks readiness, so a frame that arrived
between the EAGAIN and the re-arm completes it at once: no lost wake-up).  The
kernel reports a completion by advancing a word in memory -- which a polling
sidecore watches in its GIL-free C spin like any doorbell -- and by signalling
an eventfd, which a sleeping sidecore waits on.  No helper thread, no GIL.

Control queue (§5.1.6.5): RX mode (promiscuous, all-multi, all-uni, no-multi,
no-uni, no-broadcast), the MAC filter table (64 entries per table; more means
"all"), the MAC address, announce acks and the number of queue pairs (MQ).
The filter is applied on receive; until the driver sets a mode the device is
promiscuous (as QEMU's).

Link state: STATUS ``LINK_UP`` drops when the TAP refuses I/O (interface down:
EIO; deleted: EBADFD) and comes back when a write succeeds; every change raises
a configuration interrupt.  The device keeps running and counts the drops.  A
deleted TAP's fds are dead for good: a thread then tries every
:data:`REATTACH_INTERVAL` seconds to attach the backend again (``reattach()``,
:meth:`exitless.net.tap.Tap.reattach`: only to an interface of the same name that
exists again, keeping the fd numbers), and on success brings the link up and
wakes the sidecore, which watches the TAP again.  Until then the pair's fd is
not watched (no spinning on a dead fd) and TX frames are dropped.

Fast path: the common case of TX and RX runs in C with the GIL released
(``_vring.Ring.net_tx_batch``, ``net_rx_take``, ``net_rx_pump``; see
``_vring.c``), with every check of this model; whatever it does not take --
bad chains, errors, the link down, buffers outside the main RAM region -- it
leaves, unconsumed, to the code here.  On a polling sidecore (poll, and adaptive while
busy) every pair of every NIC is served in C for a spin slice, beside the other devices'
queues (:meth:`VirtioNet.pair_job`, a net job of ``_vring.serve``; the loop's C round):
TX, newly posted RX buffers, the pump and the re-arm of the TAP's readiness poll, the
interrupts to a vhost-user call fd, with Python once per slice instead of once per
batch.  ``EXITLESS_VRING=python`` turns it off; ``tests/test_net_paths.py`` checks that
the three agree.

Threading: TX of a pair is driven by one thread at a time (the transport's
rule).  RX of a pair -- its RX queue's kicks and its TAP's readiness -- may come
from two threads (on the trap path the vCPU thread handles the kick, a
host-side sidecore thread the TAP), so the held buffers and the pump are
guarded by a per-pair lock; elsewhere one sidecore serves both, uncontended.
"""
from __future__ import annotations

import errno
import hashlib
from array import array
import logging
import os
import struct
import threading
from typing import Protocol

from ...sidecore.aio_poll import AioPoll
from ...sidecore.loop import QUEUE_BUDGET
from .constants import (
    VIRTIO_ID_NET,
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_ANNOUNCE_ACK,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_OK,
    VIRTIO_NET_S_ANNOUNCE,
    VIRTIO_NET_S_LINK_UP,
)
from . import queue as _queue
from .device import VirtioDevice
from .queue import DescriptorChain, Virtqueue, VirtqueueError

_vring = _queue._vring
_tx_batch = _vring.Ring.net_tx_batch if _vring is not None else None
_rx_take = _vring.Ring.net_rx_take if _vring is not None else None
_rx_pump = _vring.Ring.net_rx_pump if _vring is not None else None
# a net job's reasons for returning to Python (see _vring.c, net_job_new)
_NS_DEADLINE, _NS_TX, _NS_RX_TAKE, _NS_RX_PUMP, _NS_SIGNAL, _NS_WATCH, _NS_ARM = range(7)
# net_rx_pump's status word (ctl[2]); see _vring.c
_RX_BUDGET_DONE, _RX_EMPTY, _RX_EAGAIN, _RX_ERROR, _RX_EOF, _RX_DEFER_USE, _RX_PENDING = range(7)
# ctl words: held start, held count, status, value, reads, then the counters below
_RX_COUNTERS = ("rx_packets", "rx_bytes", "rx_gso", "rx_dropped", "rx_filtered")
_TX_COUNTERS = ("tx_packets", "tx_bytes", "tx_gso", "tx_dropped")

__all__ = ["CTRL_FEATURES", "HDR_LEN", "MAX_FRAME", "MAX_RX", "NetBackend", "TapRxPollable", "VirtioNet", "parse_mac", "format_mac"]

#: struct virtio_net_hdr_v1: flags u8, gso_type u8, hdr_len, gso_size, csum_start, csum_offset, num_buffers (le16)
_HDR = struct.Struct("<BBHHHHH")
HDR_LEN = _HDR.size
ETH_HLEN = 14
#: Largest frame (without the virtio header) accepted on TX and delivered on RX: a 64 KiB GSO frame
#: with an Ethernet and a VLAN header (Linux's virtio_net sizes its "big" RX buffers for this).
MAX_FRAME = 65535 + ETH_HLEN + 4
MAX_RX = HDR_LEN + MAX_FRAME
#: Frames moved per RX pump call before the sidecore looks at its other queues.
RX_BUDGET = 64
MAC_TABLE_ENTRIES = 64
#: Largest control command data read (two MAC tables of 4096 entries fit): longer ones get ERR.
CTRL_DATA_MAX = 2 * (4 + 6 * 4096)
_IOV_MAX = max(os.sysconf("SC_IOV_MAX"), 16) if hasattr(os, "sysconf") else 1024
_CONFIG = struct.Struct("<6sHHHIB3x")   # mac, status, max_virtqueue_pairs, mtu, speed, duplex (+pad to 20)
_TUN_F_CSUM, _TUN_F_TSO4, _TUN_F_TSO6, _TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
# errno values that mean "the TAP is down or gone" (not a problem of this one frame)
_LINK_ERRNOS = (errno.EIO, errno.EBADFD, errno.ENODEV, errno.ENXIO, errno.EPIPE, errno.ENETDOWN)
# ... and those that mean "the interface was deleted": its fds never work again, the backend must be re-attached
_GONE_ERRNOS = (errno.EBADFD, errno.ENODEV, errno.ENXIO)
#: Seconds between two attempts to re-attach a deleted TAP (see the module docstring).
REATTACH_INTERVAL = 0.5
#: The features that come with the control queue, offered only by a device that has one.  Without our
#: own control queue (vhost-user; a NIC whose pairs the sidecore service serves) the frontend keeps it and
#: offers these itself -- GUEST_ANNOUNCE too: QEMU passes it through to the driver, which then requires a
#: control queue.
CTRL_FEATURES = sum(1 << b for b in (VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_RX_EXTRA,
                                      VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_GUEST_ANNOUNCE))

log = logging.getLogger("exitless.virtio.net")


class NetBackend(Protocol):
    """What the device needs of its host side (:class:`exitless.net.tap.Tap` is one).

    ``fds[i]``: non-blocking fd of queue pair ``i`` carrying one frame (with its 12-byte
    virtio-net header) per read/write.
    """

    fds: list[int]

    def set_offload(self, offloads: int) -> None: ...
    def set_queue_enabled(self, index: int, enabled: bool) -> None: ...


def parse_mac(text: str) -> bytes:
    """``"52:54:00:12:34:56"`` -> 6 bytes; ValueError if malformed or multicast."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"MAC address {text!r}: six hex bytes separated by ':'")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"MAC address {text!r}: six hex bytes separated by ':'") from None
    if mac[0] & 1:
        raise ValueError(f"MAC address {text} is a multicast address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class _Pair:
    """Per queue-pair state.

    RX buffers the device holds are a FIFO of heads (``held``, u16 per queue slot; start and count in
    ``ctl[0]``/``ctl[1]``), shared with the C pump, which updates it in place.  A held chain is walked
    again, with every check, when a frame goes into it: the heads are all the device keeps.
    """

    def __init__(self, index: int):
        self.index = index
        self.held = array("H")              # FIFO of held heads (sized at activation: the RX queue size)
        self.held_heads = bytearray()       # 1 for each head we hold
        #: held start, held count, then the C pump's status, value, reads and counters (see _vring.c)
        self.ctl = array("Q", bytes(8 * 10))
        self.txc = array("Q", bytes(8 * 4))  # the C TX batch's counters (tx_packets, tx_bytes, tx_gso, tx_dropped)
        # a chain popped after the first held one was returned at once: the held ones are then not the last
        # ones popped, and quiesce cannot rewind last_avail_idx over them (it returns them unused instead)
        self.returned_after_held = False
        self.armed = False                  # a one-shot readiness poll on the TAP fd is pending
        self.gone = False                   # the fd reported the TAP gone: never watched again
        self.poller: TapRxPollable | None = None
        # RX of a pair may be driven from two threads on the trap path (the vCPU thread handles the
        # RX queue's kick, a sidecore thread the TAP fd): the pump and the held buffers are guarded.
        # Re-entrant: a sidecore's C round holds it from pair_job to pair_done, which pumps in Python.
        self.lock = threading.RLock()
        # The spill of an RX frame past its first buffer (MRG_RXBUF), one per pair: two pairs are pumped
        # concurrently (different locks, readv without the GIL), so a shared one mixes their frames.
        self.bounce = memoryview(bytearray(MAX_RX))

    @property
    def held_count(self) -> int:
        return self.ctl[1]

    def held_at(self, k: int) -> int:
        """The ``k``-th held head (0: the next one a frame goes into)."""
        return self.held[(self.ctl[0] + k) % len(self.held)]

    def hold(self, head: int) -> None:
        self.held_heads[head] = 1
        self.held[(self.ctl[0] + self.ctl[1]) % len(self.held)] = head
        self.ctl[1] += 1

    def release_first(self) -> int:
        head = self.held_at(0)
        self.held_heads[head] = 0
        self.ctl[0] = (self.ctl[0] + 1) % len(self.held)
        self.ctl[1] -= 1
        if not self.ctl[1]:
            self.returned_after_held = False
        return head

    def clear_held(self, size: int | None = None) -> None:
        """Forget the held buffers; ``size``: the RX queue's size (None keeps the current one)."""
        if size is not None and size != len(self.held):
            self.held = array("H", bytes(2 * size))
            self.held_heads = bytearray(size)
        else:
            self.held_heads[:] = bytes(len(self.held_heads))
        self.ctl[0] = self.ctl[1] = 0
        self.returned_after_held = False


class VirtioNet(VirtioDevice):
    """virtio-net over ``backend`` (a :class:`NetBackend`, e.g. a TAP).

    ``VirtioNet(backend, mac=None, queue_pairs=None, queue_size=256, ctrl_queue=True)``: ``mac``
    is 6 bytes (default: 52:54:00 plus a hash of the backend's name); ``queue_pairs``
    defaults to ``len(backend.fds)`` and may not exceed it.
    """

    DEVICE_ID = VIRTIO_ID_NET

    def __init__(self, backend: NetBackend, mac: bytes | None = None, queue_pairs: int | None = None,
                 queue_size: int = 256, ctrl_queue: bool = True):
        pairs = len(backend.fds) if queue_pairs is None else queue_pairs
        if not 1 <= pairs <= len(backend.fds):
            raise ValueError(f"virtio-net: {pairs} queue pairs but the backend has {len(backend.fds)} queue(s)")
        super().__init__(num_queues=2 * pairs + (1 if ctrl_queue else 0), queue_max_size=queue_size)
        self.backend = backend
        self.queue_pairs = pairs
        self.ctrl_queue = ctrl_queue
        if mac is None:
            seed = str(getattr(backend, "name", id(backend))).encode()
            mac = b"\x52\x54\x00" + hashlib.sha1(seed).digest()[:3]
        if len(mac) != 6 or mac[0] & 1:
            raise ValueError(f"virtio-net: bad MAC address {mac!r}")
        self.default_mac = bytes(mac)
        self.link_up = True
        #: counters: frames and bytes moved, GSO frames among them (offloads passed through),
        #: drops (TAP full/down, frame too big for the guest's buffers), filtered by the RX mode,
        #: bad TX chains, control commands, link changes; ``c_slices``: a queue pair served by the
        #: sidecore's C round for a slice (:meth:`pair_job`), once per pair per slice
        self.stats = dict.fromkeys(("rx_packets", "rx_bytes", "rx_gso", "rx_dropped", "rx_filtered",
                                    "tx_packets", "tx_bytes", "tx_gso", "tx_dropped", "tx_bad", "ctrl_ok",
                                    "ctrl_err", "link_changes", "c_slices"), 0)
        self._pairs = [_Pair(i) for i in range(pairs)]
        self._closing = threading.Event()
        self._reattacher: threading.Thread | None = None
        self._reattach_lock = threading.Lock()
        self._reset_net_state()

    def _reset_net_state(self) -> None:
        self.mac = self.default_mac
        self.status_announce = False
        self.active_pairs = 1
        # RX filter (§5.1.6.5.1): promiscuous until the driver says otherwise, like QEMU.
        self.promisc = True
        self.allmulti = self.alluni = self.nomulti = self.nouni = self.nobcast = False
        self.uc_table: set[bytes] = set()
        self.mc_table: set[bytes] = set()
        self.uc_overflow = self.mc_overflow = False
        self.mrg_rxbuf = self.guest_csum = False
        self._filter_blob: bytes | None = None     # the RX filter for the C pump (None: promiscuous)
        self._tx_offer = 0                         # the TX offloads negotiated, as net_tx_batch's bits
        for p in self._pairs:
            with p.lock:
                p.clear_held()

    # -- features and configuration -------------------------------------------------------
    def features(self) -> int:
        bits = [VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN,
                VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN]
        if self.queue_pairs > 1:
            bits.append(VIRTIO_NET_F_MQ)
        f = CTRL_FEATURES if self.ctrl_queue else 0
        for b in bits:
            f |= 1 << b
        return f

    #: feature -> features it requires (spec §5.1.3.1)
    _REQUIRES = {
        VIRTIO_NET_F_GUEST_TSO4: (VIRTIO_NET_F_GUEST_CSUM,), VIRTIO_NET_F_GUEST_TSO6: (VIRTIO_NET_F_GUEST_CSUM,),
        VIRTIO_NET_F_GUEST_ECN: (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6),
        VIRTIO_NET_F_HOST_TSO4: (VIRTIO_NET_F_CSUM,), VIRTIO_NET_F_HOST_TSO6: (VIRTIO_NET_F_CSUM,),
        VIRTIO_NET_F_HOST_ECN: (VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6),
        VIRTIO_NET_F_CTRL_RX: (VIRTIO_NET_F_CTRL_VQ,), VIRTIO_NET_F_CTRL_RX_EXTRA: (VIRTIO_NET_F_CTRL_RX,),
        VIRTIO_NET_F_GUEST_ANNOUNCE: (VIRTIO_NET_F_CTRL_VQ,), VIRTIO_NET_F_MQ: (VIRTIO_NET_F_CTRL_VQ,),
        VIRTIO_NET_F_CTRL_MAC_ADDR: (VIRTIO_NET_F_CTRL_VQ,),
    }

    def features_ok(self, driver_features: int) -> bool:
        """Offered subset with VERSION_1, and every feature's prerequisites (for ECN: one of them).
        Without a control queue of ours (vhost-user) the frontend keeps one: CTRL_VQ counts as there."""
        if not super().features_ok(driver_features):
            return False
        if not self.ctrl_queue:
            driver_features |= 1 << VIRTIO_NET_F_CTRL_VQ
        for bit, needs in self._REQUIRES.items():
            if driver_features >> bit & 1:
                have = [driver_features >> n & 1 for n in needs]
                ok = any(have) if bit in (VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_HOST_ECN) else all(have)
                if not ok:
                    return False
        return True

    def config_bytes(self) -> bytes:
        status = (VIRTIO_NET_S_LINK_UP if self.link_up else 0) | (VIRTIO_NET_S_ANNOUNCE if self.status_announce else 0)
        return _CONFIG.pack(self.mac, status, self.queue_pairs, 0, 0xFFFFFFFF, 0xFF)  # speed/duplex unknown

    def set_link(self, up: bool) -> None:
        """Change STATUS LINK_UP (e.g. the TAP went down) and raise a configuration interrupt."""
        if up != self.link_up:
            self.link_up = up
            self.stats["link_changes"] += 1
            log.warning("virtio-net: link %s", "up" if up else "down (TAP refuses I/O)")
            self.config_changed()

    def announce(self) -> None:
        """Ask the driver to announce itself (gratuitous ARP after a move): STATUS ANNOUNCE + config irq."""
        if self.has_feature(VIRTIO_NET_F_GUEST_ANNOUNCE):
            self.status_announce = True
            self.config_changed()

    # -- life cycle ------------------------------------------------------------------------------
    def rx_queue(self, pair: int) -> int:
        return 2 * pair

    def tx_queue(self, pair: int) -> int:
        return 2 * pair + 1

    @property
    def ctrl_index(self) -> int | None:
        return 2 * self.queue_pairs if self.ctrl_queue else None

    def on_activate(self) -> None:
        self.mrg_rxbuf = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        self.guest_csum = self.has_feature(VIRTIO_NET_F_GUEST_CSUM)
        off = 0
        if self.guest_csum:
            off |= _TUN_F_CSUM
            if self.has_feature(VIRTIO_NET_F_GUEST_TSO4):
                off |= _TUN_F_TSO4
            if self.has_feature(VIRTIO_NET_F_GUEST_TSO6):
                off |= _TUN_F_TSO6
            if self.has_feature(VIRTIO_NET_F_GUEST_ECN):
                off |= _TUN_F_TSO_ECN
        self.backend.set_offload(off)
        self._tx_offer = sum(bit for feature, bit in ((VIRTIO_NET_F_CSUM, 1), (VIRTIO_NET_F_HOST_TSO4, 2),
                                                      (VIRTIO_NET_F_HOST_TSO6, 4), (VIRTIO_NET_F_HOST_ECN, 8))
                             if self.has_feature(feature))
        # With a control queue only the first pair works until VQ_PAIRS_SET (§5.1.6.5.5); without
        # one (vhost-user) the frontend enables pairs by enabling their rings.
        self.active_pairs = 1 if self.ctrl_queue else self.queue_pairs
        for p in self._pairs:
            rxq = self.queues[self.rx_queue(p.index)] if self.rx_queue(p.index) < len(self.queues) else None
            with p.lock:
                p.clear_held(rxq.size if rxq is not None and rxq.configured else 0)
        self._apply_active_pairs()

    def _apply_active_pairs(self) -> None:
        for p in self._pairs:
            self.backend.set_queue_enabled(p.index, self._rx_live(p.index))

    def _rx_live(self, pair: int) -> bool:
        if pair >= self.active_pairs:
            return False
        i = self.rx_queue(pair)
        return i < len(self.queues) and self.queues[i].configured

    def quiesce(self) -> None:
        """Give the RX buffers the device holds unused back to the ring (rewind ``last_avail_idx``).

        Called by a transport before it records where to resume a stopped ring
        (vhost-user GET_VRING_BASE): held buffers are the last ones popped, in order -- unless an unusable
        chain was returned after one of them; then they are returned used, with length 0, instead (a rewind
        would re-offer the chain already completed).
        """
        for p in self._pairs:
            i = self.rx_queue(p.index)
            with p.lock:
                if p.held_count and i < len(self.queues) and self.queues[i].configured:
                    q = self.queues[i]
                    if p.returned_after_held:
                        q.push_many([(p.held_at(k), 0) for k in range(p.held_count)])
                    else:
                        q.last_avail_idx = q.last_avail_idx - p.held_count
                p.clear_held()

    def on_reset(self) -> None:
        self._reset_net_state()
        self.backend.set_offload(0)

    def close(self) -> None:
        """Stop re-attaching, cancel the TAP pollables' readiness polls (the backend is the caller's to close)."""
        self._closing.set()
        t = self._reattacher
        if t is not None:
            t.join(5)
        for p in self._pairs:
            if p.poller is not None:
                p.poller.close()
                p.poller = None

    # -- sidecore integration --------------------------------------------------------------------
    def backend_pollables(self, mode: str) -> list:
        """One :class:`TapRxPollable` per queue pair (the same in every sidecore mode; kept across
        activations and vhost-user sessions until :meth:`close`)."""
        for p in self._pairs:
            if p.poller is None:
                p.poller = TapRxPollable(self, p.index)
        return [p.poller for p in self._pairs]

    def queue_server(self, index: int):
        """The pair's :class:`TapRxPollable` for its RX and TX queues (its job of the sidecore's C round
        serves them, in poll and adaptive mode)."""
        if index < 2 * self.queue_pairs:
            return self._pairs[index // 2].poller
        return None

    # -- queue dispatch ----------------------------------------------------------------------------
    def handle_queue(self, index: int, budget: int | None = None) -> int:
        """TX and control queues: the base class's drain loop (``budget``: see there); an RX queue:
        take the posted buffers and fill them from the TAP.  Returns the number of chains completed."""
        if index < 2 * self.queue_pairs and index % 2 == 0:
            return self._handle_rx(index // 2)
        return super().handle_queue(index, budget)

    def fast_path(self, q: Virtqueue, index: int, limit: int) -> tuple[int, bool]:
        """TX in C (``_vring.Ring.net_tx_batch``, GIL released): the leading run of at most ``limit`` valid
        frames, written to the TAP, then an RX pump of the pair (see below).  It stops, unconsumed, at a
        chain :meth:`_tx` must drop (and log), at a write that failed other than with EAGAIN, and at once
        while the link is down (the first good write brings it up, in Python).  Returns ``(completed,
        more)`` as :attr:`VirtioDevice.fast_path`.  Control queue: everything to :meth:`process`."""
        if index == self.ctrl_index or not self.link_up or q._cring is None:
            return 0, True
        p = self._pairs[index // 2]
        n, more = q.c_batch(_tx_batch, self.backend.fds[p.index], self._tx_offer, p.txc, max_batch=limit)
        if n:
            _fold(p.txc, 0, _TX_COUNTERS, self.stats)
            # The TAP's kernel side ran in our writev (a local peer answers there, e.g. an ICMP echo or
            # ARP reply): its answer is usually queued already.  Take it now rather than after the
            # readiness poll's completion is noticed on the next round of the sidecore.
            if p.ctl[1] and not p.gone:
                self.rx_pump(p.index)
        return n, more

    def pair_job(self, pair: int, tx_call: int = -1, rx_call: int = -1) -> tuple | None:
        """Queue pair ``pair`` -- TX frames, RX buffers, the TAP's readiness poll -- as a net job of the
        sidecore's C round (``_vring.serve``, GIL released; see ``_vring.c``), or None when it cannot be
        served in C now (no C ring, not live, link down, the TAP gone, an interrupt not decided yet): then
        its queues and TAP are polled in Python.  ``tx_call`` / ``rx_call``: the eventfds (vhost-user call
        fds) C writes when the driver wants a used-buffer notification; -1: C returns and
        :meth:`pair_done` raises it (the VMM's MSI-X).  The caller holds :meth:`pair_locks` from this call
        until :meth:`pair_done`, and keeps the queues' memory mapped meanwhile."""
        p = self._pairs[pair]
        if _vring is None or p.poller is None or p.gone or not self.activated or self.needs_reset \
                or not self.link_up or not self._rx_live(pair):
            return None
        tq, rq = self.queues[self.tx_queue(pair)], self.queues[self.rx_queue(pair)]
        if not (tq.configured and rq.configured) or len(p.held) != rq.size:
            return None
        ts, rs = tq.serve_state(), rq.serve_state()
        if ts is None or rs is None:
            return None
        poller = p.poller
        return ("net", tq._cring, ts, rq._cring, rs, RX_BUDGET, self.backend.fds[pair], self._tx_offer, p.txc,
                p.held, p.held_heads, p.ctl, p.bounce, self.mrg_rxbuf, self.guest_csum, self._rx_filter(),
                poller.aio.serve_args(poller.seen, p.armed), tx_call, rx_call)

    def pair_locks(self, pair: int) -> tuple:
        """The locks a C round serving ``pair`` holds (in this order): the transport's (a
        :class:`~exitless.sidecore.spin.WatchedLock`, whose word the round watches: a thread that wants
        it ends the round), if any, and the pair's RX lock."""
        p = self._pairs[pair]
        return (p.lock,) if self.transport_lock is None else (self.transport_lock, p.lock)

    def pair_done(self, pair: int, result: tuple) -> tuple[int, int]:
        """Take back pair ``pair`` from the C round's ``result`` for its :meth:`pair_job`: ring states,
        counters, the TAP poll's state; raise the interrupts C left to Python and do what it handed back
        (a chain to drop, a TAP error, a frame to finish).  Returns ``(frames moved, last_work_ns)``."""
        (reason, value, ntx, nrx, tstate, rstate, seen, armed, tx_signal, rx_signal, last_work, _irqs) = result
        p = self._pairs[pair]
        tx_i, rx_i = self.tx_queue(pair), self.rx_queue(pair)
        tq, rq = self.queues[tx_i], self.queues[rx_i]
        tq.take_serve_state(tstate)
        rq.take_serve_state(rstate)
        p.poller.seen, p.armed = seen, armed
        _fold(p.txc, 0, _TX_COUNTERS, self.stats)
        _fold(p.ctl, 5, _RX_COUNTERS, self.stats)
        self.stats["c_slices"] += 1
        status, pending = p.ctl[2], int(p.ctl[3])
        if tx_signal:
            self._raise(tx_i)
        if rx_signal:
            self._raise(rx_i)
        if reason == _NS_TX:                # a chain for _tx (to drop and log), or a write that failed
            self.handle_queue(tx_i, QUEUE_BUDGET)
        elif reason == _NS_RX_TAKE:         # an RX chain to return unused (or a broken ring)
            self._handle_rx(pair)
        elif reason == _NS_RX_PUMP:         # a TAP error or end of file, a held chain C cannot use
            if status == _RX_PENDING:       # a frame C read whose spill buffers it could not walk
                self._rx_finish_pending(p, rq, pending)
            self.rx_pump(pair)
        elif reason == _NS_ARM:             # the TAP cannot be watched any more (closed, or gone)
            self.log(logging.WARNING, "virtio-net: cannot watch TAP queue %d: %s", pair, os.strerror(value))
            p.gone = True
        return ntx + nrx, last_work

    def _rx_finish_pending(self, p: _Pair, q: Virtqueue, n: int) -> None:
        """Deliver the ``n``-byte frame the C pump read into the first held buffer (and the bounce buffer)
        but could not finish (RX_PENDING: a spill buffer it cannot walk)."""
        with p.lock:
            try:
                if self._rx_frame(p, q, self._held_chain(q, p.held_at(0)), n):
                    self.notify(self.rx_queue(p.index))
            except VirtqueueError as e:
                self.notify(self.rx_queue(p.index))
                self._set_needs_reset(self.rx_queue(p.index), e)

    def process(self, queue_index: int, chain: DescriptorChain) -> int:
        if queue_index == self.ctrl_index:
            return self._ctrl(chain)
        self._tx(queue_index // 2, chain)
        return 0

    # -- transmit -------------------------------------------------------------------------------------
    def _tx_drop(self, chain: DescriptorChain, why: str) -> None:
        self.stats["tx_bad"] += 1
        self.log(logging.WARNING, "virtio-net: TX chain %d dropped: %s", chain.head, why)

    def check_tx_header(self, hdr: bytes, frame_len: int) -> str | None:
        """Why a TX header is unacceptable for a frame of ``frame_len`` bytes, or None (spec §5.1.6.2.1)."""
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _nb = _HDR.unpack(hdr)
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            if not self.has_feature(VIRTIO_NET_F_CSUM):
                return "NEEDS_CSUM without VIRTIO_NET_F_CSUM"
            if csum_start + csum_offset + 2 > frame_len:
                return f"checksum at {csum_start}+{csum_offset} is past the {frame_len}-byte frame"
        if gso_type != VIRTIO_NET_HDR_GSO_NONE:
            base = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
            need = {VIRTIO_NET_HDR_GSO_TCPV4: VIRTIO_NET_F_HOST_TSO4,
                    VIRTIO_NET_HDR_GSO_TCPV6: VIRTIO_NET_F_HOST_TSO6}.get(base)
            if need is None or not self.has_feature(need):
                return f"GSO type {gso_type:#x} not negotiated"
            if gso_type & VIRTIO_NET_HDR_GSO_ECN and not self.has_feature(VIRTIO_NET_F_HOST_ECN):
                return "GSO ECN without VIRTIO_NET_F_HOST_ECN"
            if not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                return "GSO frame without NEEDS_CSUM"
            if gso_size == 0:
                return "GSO frame with gso_size 0"
            if hdr_len > frame_len:
                return f"hdr_len {hdr_len} is past the {frame_len}-byte frame"
        return None

    def _tx(self, pair: int, chain: DescriptorChain) -> None:
        if chain.error:
            return self._tx_drop(chain, chain.error)
        if chain.writable_len:
            return self._tx_drop(chain, "TX chain has device-writable buffers")
        frame_len = chain.readable_len - HDR_LEN
        if frame_len < ETH_HLEN:
            return self._tx_drop(chain, f"{chain.readable_len} bytes: no header and Ethernet frame")
        if frame_len > MAX_FRAME:
            return self._tx_drop(chain, f"{frame_len}-byte frame is larger than {MAX_FRAME}")
        hdr = bytearray(chain.read(0, HDR_LEN))      # our copy: what we checked is what we send
        why = self.check_tx_header(hdr, frame_len)
        if why:
            return self._tx_drop(chain, why)
        hdr[0] &= VIRTIO_NET_HDR_F_NEEDS_CSUM
        hdr[10] = hdr[11] = 0
        iov = [hdr, *chain.readable(HDR_LEN, frame_len)]
        if len(iov) > _IOV_MAX:
            iov = [hdr, b"".join(iov[1:])]
        try:
            os.writev(self.backend.fds[pair], iov)
        except BlockingIOError:
            self.stats["tx_dropped"] += 1      # the TAP's queue is full: like a NIC, drop
            return None
        except OSError as e:
            self.stats["tx_dropped"] += 1
            if e.errno in _LINK_ERRNOS:
                self.set_link(False)
                if e.errno in _GONE_ERRNOS:
                    self._tap_gone()
            else:  # EINVAL & co: the kernel refused this frame's header
                self.log(logging.WARNING, "virtio-net: TAP refused a frame: %s", e.strerror)
            return None
        self.stats["tx_packets"] += 1
        self.stats["tx_bytes"] += frame_len
        if hdr[1]:
            self.stats["tx_gso"] += 1
        if not self.link_up:
            self.set_link(True)
        return None

    # -- receive ----------------------------------------------------------------------------------------
    def _handle_rx(self, pair: int) -> int:
        if self.needs_reset or not self.activated or pair >= self.queue_pairs:
            return 0
        index = self.rx_queue(pair)
        q = self.queues[index] if index < len(self.queues) else None
        if q is None or not q.configured:
            return 0
        p = self._pairs[pair]
        with p.lock:
            return self._handle_rx_locked(index, q, p)

    def _handle_rx_locked(self, index: int, q: Virtqueue, p: _Pair) -> int:
        rearm = q.notifications_enabled
        done = 0
        try:
            if len(p.held) != q.size and not p.held_count:
                p.clear_held(q.size)
            if rearm:
                q.disable_notifications()
            while True:
                done += self._take_rx_buffers(index, q, p)
                if not rearm or not q.enable_notifications():
                    break
                q.disable_notifications()
            if not p.armed:
                done += self._rx_pump_locked(p)
            if done:
                self.notify(index)      # unusable buffers returned empty (the pump signals its own)
        except VirtqueueError as e:
            self.notify(index)
            self._set_needs_reset(index, e)
        return done

    def _take_rx_buffers(self, index: int, q: Virtqueue, p: _Pair) -> int:
        """Hold every available RX buffer (C takes the usable ones; Python decides about the others).
        Returns the number returned empty."""
        returned = 0
        while True:
            if q._cring is not None and not q.broken:
                _n, more = q.c_batch(_rx_take, p.held, p.held_heads, p.ctl, publishes=False)
                if not more:
                    return returned
            chain = q.pop()
            if chain is None:
                return returned
            returned += self._take_rx_buffer(index, p, chain)

    def _take_rx_buffer(self, index: int, p: _Pair, chain: DescriptorChain) -> int:
        """Hold a posted RX buffer; one that cannot carry a header is returned unused (counted as done)."""
        head = chain.head
        if head >= len(p.held_heads) or p.held_heads[head]:
            raise VirtqueueError(f"RX head {head} offered again while the device holds it")
        if chain.error or chain.readable_len or chain.writable_len < HDR_LEN \
                or len(chain.segments) >= _IOV_MAX:
            self.log(logging.WARNING, "virtio-net: RX chain %d unusable (%s); returned empty", head,
                     chain.error or f"{chain.readable_len} readable / {chain.writable_len} writable bytes")
            self.queues[index].push(head, 0)
            if p.held_count:
                p.returned_after_held = True
            return 1
        p.hold(head)
        return 0

    @staticmethod
    def _held_chain(q: Virtqueue, head: int) -> DescriptorChain:
        """Held chain ``head`` walked again, with every check, now that a frame goes into it.  It was
        usable when taken: if it is not any more, the driver changed a buffer the device owns."""
        chain = q._walk(head)
        if chain.error or chain.readable_len or chain.writable_len < HDR_LEN or len(chain.segments) >= _IOV_MAX:
            q.broken = True
            raise VirtqueueError(f"RX chain {head} changed while the device held it")
        return chain

    def rx_pump(self, pair: int) -> int:
        """Move up to :data:`RX_BUDGET` frames from the TAP fd of ``pair`` into held RX buffers.

        Re-arms the TAP fd when it is drained (EAGAIN); leaves it unarmed when the
        guest has no buffer (its next RX kick pumps again) or the budget ran out.
        Signals the RX queue if the driver wants it.  Returns frames delivered.
        """
        p = self._pairs[pair]
        with p.lock:
            try:
                return self._rx_pump_locked(p)
            except VirtqueueError as e:
                self.notify(self.rx_queue(pair))
                self._set_needs_reset(self.rx_queue(pair), e)
                return 0

    def _rx_pump_locked(self, p: _Pair) -> int:
        """The pump: the C one (``_vring.Ring.net_rx_pump``, GIL released) while it can, this model
        for what it hands back (see ``_vring.c``: the same checks, the same order)."""
        pair = p.index
        if p.gone or not self.activated or self.needs_reset or not self._rx_live(pair):
            return 0
        index = self.rx_queue(pair)
        q = self.queues[index]
        fd = self.backend.fds[pair]
        delivered = 0
        budget = RX_BUDGET
        ctl = p.ctl
        try:
            while ctl[1] and budget > 0:
                if q._cring is not None and not q.broken:
                    n, _more = q.c_batch(_rx_pump, fd, p.held, p.held_heads, ctl, p.bounce, self.mrg_rxbuf,
                                         self.guest_csum, self._rx_filter(), max_batch=budget)
                    delivered += n
                    budget -= ctl[4]
                    _fold(ctl, 5, _RX_COUNTERS, self.stats)
                    status = ctl[2]
                    if status == _RX_EAGAIN:
                        self._arm(p)
                        break
                    if status == _RX_ERROR:
                        self._rx_error(p, int(ctl[3]))
                        break
                    if status == _RX_EOF:
                        self._rx_eof(p)
                        break
                    if status == _RX_PENDING:   # a frame read by C whose spill buffers C could not walk
                        delivered += self._rx_frame(p, q, self._held_chain(q, p.held_at(0)), int(ctl[3]))
                        continue
                    if status != _RX_DEFER_USE:  # budget spent, or out of buffers
                        break
                # one frame here (the first held chain did not walk in C, or no C ring)
                budget -= 1
                got = self._rx_read(p, q, fd)
                if got is None:
                    break
                delivered += got
        finally:
            # Out of buffers: the TAP stays unarmed and the driver's next RX kick pumps again.
            if delivered:
                self.notify(index)
        return delivered

    def _rx_read(self, p: _Pair, q: Virtqueue, fd: int) -> int | None:
        """Read one frame into the first held buffer (and the bounce buffer); returns 1 if delivered,
        0 if dropped or filtered, None if the pump stops (drained, or the TAP refuses)."""
        first = self._held_chain(q, p.held_at(0))
        cap = first.writable_len
        iov = first.writable_views()
        if cap < MAX_RX:
            iov.append(p.bounce[:MAX_RX - cap])
        try:
            n = os.readv(fd, iov)
        except BlockingIOError:
            self._arm(p)
            return None
        except OSError as e:
            self._rx_error(p, e.errno)
            return None
        if n == 0:          # end of file: the other side is gone (a TAP never returns 0)
            self._rx_eof(p)
            return None
        return self._rx_frame(p, q, first, n)

    def _rx_error(self, p: _Pair, err: int) -> None:
        self.stats["rx_dropped"] += 1
        if err in _LINK_ERRNOS:
            self.set_link(False)
            if err != errno.EIO:
                p.gone = True   # the interface is gone: its fd stays readable/erroring forever
                if err in _GONE_ERRNOS:
                    self._tap_gone()
                return
            self._arm(p)
            return
        self.log(logging.WARNING, "virtio-net: TAP read: %s", os.strerror(err))

    def _rx_eof(self, p: _Pair) -> None:
        self.stats["rx_dropped"] += 1
        self.set_link(False)
        p.gone = True

    def _rx_frame(self, p: _Pair, q: Virtqueue, first: DescriptorChain, n: int) -> int:
        """An ``n``-byte frame (header included) was read into ``first`` (the first held buffer) and, past
        its end, into the bounce buffer: deliver it (1) or count it dropped or filtered (0)."""
        stats = self.stats
        cap = first.writable_len
        spills: list[DescriptorChain] = []
        if n <= HDR_LEN:
            stats["rx_dropped"] += 1        # empty
            return 0
        if n > cap:
            if not self.mrg_rxbuf:
                stats["rx_dropped"] += 1    # larger than the buffer the guest gave
                return 0
            room = 0
            for k in range(1, p.held_count):
                if room >= n - cap:
                    break
                spills.append(self._held_chain(q, p.held_at(k)))
                room += spills[-1].writable_len
            if room < n - cap:
                stats["rx_dropped"] += 1    # larger than all the buffers the guest gave
                return 0
        if not self.promisc and not self._accept(_stream_bytes(first.writable_views() + [p.bounce], HDR_LEN, 6), n):
            stats["rx_filtered"] += 1
            return 0
        stats["rx_packets"] += 1
        stats["rx_bytes"] += n - HDR_LEN
        self._deliver(p, q, first, spills, n)
        return 1

    def _accept(self, dst: bytes, n: int) -> bool:
        """The RX filter on the destination MAC ``dst`` of an ``n``-byte frame (header included)."""
        if self.promisc:
            return True
        if n < HDR_LEN + 6:
            return False
        if dst[0] & 1:
            if dst == b"\xff" * 6:
                return not self.nobcast
            if self.nomulti:
                return False
            return self.allmulti or self.mc_overflow or dst in self.mc_table
        if self.nouni:
            return False
        return self.alluni or self.uc_overflow or dst == self.mac or dst in self.uc_table

    def _rx_filter(self) -> bytes | None:
        """:meth:`_accept` as data for the C pump: None when promiscuous, else mode bits, the MAC, and
        the unicast and multicast tables (a count byte and 6-byte entries each; at most
        :data:`MAC_TABLE_ENTRIES`, more is an overflow)."""
        if self.promisc:
            return None
        blob = self._filter_blob
        if blob is None:
            mode = 0
            for bit, on in enumerate((self.allmulti, self.alluni, self.nomulti, self.nouni, self.nobcast,
                                      self.uc_overflow, self.mc_overflow)):
                mode |= on << bit
            uc, mc = sorted(self.uc_table), sorted(self.mc_table)
            blob = self._filter_blob = (bytes([mode]) + self.mac + bytes([len(uc)]) + b"".join(uc)
                                        + bytes([len(mc)]) + b"".join(mc))
        return blob

    def _deliver(self, p: _Pair, q: Virtqueue, first: DescriptorChain, spills: list[DescriptorChain], n: int) -> None:
        """Hand the buffers holding an ``n``-byte frame (header included) to the driver.

        The frame was read into the first held buffer and, past its end, into the bounce
        buffer; that spill is copied into ``spills``, the next held buffers (MRG_RXBUF;
        :meth:`_rx_frame` checked they have room).  Most frames fit the first buffer and are never copied.
        """
        p.release_first()
        used = [(first.head, min(first.writable_len, n))]
        left = n - first.writable_len
        off = 0
        bounce = p.bounce
        for rx in spills:
            p.release_first()
            take = min(rx.writable_len, left)
            rx.write(0, bounce[off:off + take])
            used.append((rx.head, take))
            off += take
            left -= take
        hdr = bytearray(_stream_bytes(first.writable_views(), 0, HDR_LEN))
        if not self.guest_csum:
            hdr[0] = 0       # §5.1.6.3.2: flags zero without GUEST_CSUM
        elif hdr[1]:
            self.stats["rx_gso"] += 1
        hdr[10:12] = len(used).to_bytes(2, "little")   # num_buffers: the kernel leaves it unwritten
        first.write(0, hdr)
        q.push_many(used)

    # -- a deleted TAP coming back ---------------------------------------------------------------------
    def _tap_gone(self) -> None:
        """The TAP was deleted: start the thread that re-attaches the backend once the name exists again
        (a backend without ``reattach``, e.g. a socket, stays down)."""
        if not hasattr(self.backend, "reattach") or self._closing.is_set():
            return
        with self._reattach_lock:
            if self._reattacher is not None:
                return
            self.log(logging.WARNING, "virtio-net: TAP %s is gone: link down; re-attaching when it exists again",
                     getattr(self.backend, "name", "?"))
            self._reattacher = threading.Thread(target=self._reattach_loop, name="virtio-net-reattach", daemon=True)
            self._reattacher.start()

    def _reattach_loop(self) -> None:
        try:
            while not self._closing.wait(REATTACH_INTERVAL):
                try:
                    self.backend.reattach()
                except OSError:        # TapError: not there (yet), or not attachable: try again later
                    continue
                self._reattached()
                return
        finally:
            with self._reattach_lock:
                self._reattacher = None

    def _reattached(self) -> None:
        """The backend's fds work again: watch them, link up (configuration interrupt), wake the sidecore."""
        for p in self._pairs:
            with p.lock:
                p.gone = False
                p.armed = False         # the old file's poll (if any) completed: arm anew on the new one
        if self.activated:
            self._apply_active_pairs()
        log.warning("virtio-net: TAP %s is back: re-attached", getattr(self.backend, "name", "?"))
        self.set_link(True)
        for p in self._pairs:
            if p.poller is not None:
                os.eventfd_write(p.poller.wake_fd, 1)    # a sleeping sidecore looks at the pair again

    def _arm(self, p: _Pair) -> None:
        if not p.armed and p.poller is not None:
            if p.poller.arm_tap():
                p.armed = True
            else:               # the fd cannot be watched any more (closed, or the TAP is gone)
                p.gone = True

    # -- control queue -------------------------------------------------------------------------------
    def _ctrl(self, chain: DescriptorChain) -> int:
        """One control command: class u8, command u8, data (readable); ack u8 (the last writable byte)."""
        if chain.error or chain.writable_len < 1:
            self.stats["ctrl_err"] += 1
            self.log(logging.WARNING, "virtio-net: control chain %d has no ack byte or a bad buffer: %s",
                     chain.head, chain.error or "no writable byte")
            return 0
        ok = 2 <= chain.readable_len <= 2 + CTRL_DATA_MAX
        if ok:
            cls, cmd = chain.read(0, 2)
            ok = self._ctrl_command(cls, cmd, chain.read(2, chain.readable_len - 2))
        self.stats["ctrl_ok" if ok else "ctrl_err"] += 1
        self._filter_blob = None        # the RX mode, the MAC or its tables may have changed
        chain.write(chain.writable_len - 1, bytes([VIRTIO_NET_OK if ok else VIRTIO_NET_ERR]))
        return 1

    def _ctrl_command(self, cls: int, cmd: int, data: bytes) -> bool:
        if cls == VIRTIO_NET_CTRL_RX and self.has_feature(VIRTIO_NET_F_CTRL_RX):
            names = ["promisc", "allmulti"]
            if self.has_feature(VIRTIO_NET_F_CTRL_RX_EXTRA):
                names += ["alluni", "nomulti", "nouni", "nobcast"]
            if cmd >= len(names) or len(data) != 1:
                return False
            setattr(self, names[cmd], bool(data[0]))
            return True
        if cls == VIRTIO_NET_CTRL_MAC:
            if cmd == VIRTIO_NET_CTRL_MAC_ADDR_SET and self.has_feature(VIRTIO_NET_F_CTRL_MAC_ADDR):
                if len(data) != 6 or data[0] & 1:
                    return False
                self.mac = bytes(data)
                return True
            if cmd == VIRTIO_NET_CTRL_MAC_TABLE_SET and self.has_feature(VIRTIO_NET_F_CTRL_RX):
                tables = []
                off = 0
                for _ in range(2):      # unicast, then multicast: le32 entries, entries * 6 bytes
                    if off + 4 > len(data):
                        return False
                    (entries,) = struct.unpack_from("<I", data, off)
                    off += 4
                    if off + 6 * entries > len(data):
                        return False
                    # More than we keep: receive every address of that kind (QEMU's overflow rule).
                    tables.append(None if entries > MAC_TABLE_ENTRIES else
                                  {bytes(data[off + 6 * i:off + 6 * i + 6]) for i in range(entries)})
                    off += 6 * entries
                if off != len(data):
                    return False
                uc, mc = tables
                self.uc_overflow, self.uc_table = uc is None, uc or set()
                self.mc_overflow, self.mc_table = mc is None, mc or set()
                return True
            return False
        if cls == VIRTIO_NET_CTRL_ANNOUNCE and cmd == VIRTIO_NET_CTRL_ANNOUNCE_ACK \
                and self.has_feature(VIRTIO_NET_F_GUEST_ANNOUNCE) and not data:
            self.status_announce = False
            return True
        if cls == VIRTIO_NET_CTRL_MQ and cmd == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET \
                and self.has_feature(VIRTIO_NET_F_MQ) and len(data) == 2:
            (n,) = struct.unpack("<H", data)
            if not VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= n <= self.queue_pairs:
                return False
            self.active_pairs = n
            self._apply_active_pairs()
            return True
        return False


def _fold(ctl: array, first: int, names: tuple, stats: dict) -> None:
    """Add the C counters ``ctl[first:first+len(names)]`` to ``stats`` and zero them."""
    for i, name in enumerate(names, first):
        v = ctl[i]
        if v:
            stats[name] += v
            ctl[i] = 0


def _stream_bytes(iov: list, offset: int, n: int) -> bytes:
    """Bytes ``[offset, offset+n)`` of the stream formed by ``iov``."""
    out = bytearray()
    pos = 0
    for v in iov:
        ln = len(v)
        if pos + ln > offset:
            lo = max(offset - pos, 0)
            out += v[lo:lo + n - len(out)]
            if len(out) == n:
                break
        pos += ln
    return bytes(out)


class TapRxPollable:
    """The TAP fd of one queue pair as a sidecore pollable (see :mod:`exitless.sidecore.loop`).

    Readiness comes from an AIO poll (:mod:`exitless.sidecore.aio_poll`): the kernel advances a
    word in memory, which a polling sidecore watches in its GIL-free spin, and signals
    ``wake_fd``, on which a sleeping one waits.  The same in every mode.

    With the C extension it is also the pair's server in the sidecore's C round (``c_job`` /
    ``c_done``): its RX and TX queues' pollables name it as their ``served_by``, and the loop
    neither polls nor watches them while the pair has a job.  ``call_fds``: ``(tx, rx)`` eventfds
    the C round writes for the queues' interrupts (a vhost-user back-end's call fds); -1: Python
    raises them (the VMM's MSI-X).
    """

    def __init__(self, device: VirtioNet, pair: int):
        self.device = device
        self.pair = pair
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self.aio = AioPoll(device.backend.fds[pair], self.wake_fd)
        except BaseException:
            os.close(self.wake_fd)
            raise
        self.seen = self.aio.tail()     # the completion ring's tail last consumed
        self.call_fds = (-1, -1)        # (tx, rx) interrupt eventfds for the C round; -1: Python raises it

    def arm_tap(self) -> bool:
        """Ask for one readiness event (the kernel checks at once: no lost wake-up); False if refused."""
        try:
            self.aio.arm()
            return True
        except OSError as e:
            self.device.log(logging.WARNING, "virtio-net: cannot watch TAP queue %d: %s", self.pair, e.strerror)
            return False

    def _event_seen(self) -> bool:
        tail = self.aio.tail()
        if tail == self.seen:
            return False
        self.seen = tail
        self.aio.reap()
        return True

    # -- Pollable -----------------------------------------------------------------------------------
    def poll(self) -> bool:
        dev = self.device
        p = dev._pairs[self.pair]
        if self._event_seen():
            with p.lock:        # after its completion was seen the poll is spent: the fd is unwatched
                p.armed = False
        if p.armed or not p.held_count:
            return False
        return dev.rx_pump(self.pair) > 0

    def watches(self) -> list[tuple[int, int]]:
        return [(self.aio.tail_addr, self.seen)]

    # -- the sidecore's C round: the whole pair (its two queues and this TAP) in C ---------------------
    def c_locks(self) -> tuple:
        """Held by the loop from :meth:`c_job` to :meth:`c_done` (:meth:`VirtioNet.pair_locks`)."""
        return self.device.pair_locks(self.pair)

    def c_job(self) -> tuple | None:
        """The pair as a job of ``_vring.serve`` (:meth:`VirtioNet.pair_job`), or None (polled in Python)."""
        return self.device.pair_job(self.pair, *self.call_fds)

    def c_done(self, result: tuple) -> tuple[int, int]:
        """The C round's result for the pair: ``(frames moved, last_work_ns)``."""
        return self.device.pair_done(self.pair, result)

    def set_call_fd(self, index: int, fd: int) -> None:
        """Queue ``index`` (this pair's RX or TX queue) raises its interrupt by writing eventfd ``fd``
        from the C round (a vhost-user call fd; -1: Python raises it).  The caller keeps ``fd`` open
        while a loop serves the pair."""
        tx, rx = self.call_fds
        if index == self.device.tx_queue(self.pair):
            tx = fd
        elif index == self.device.rx_queue(self.pair):
            rx = fd
        else:
            raise ValueError(f"queue {index} is not of queue pair {self.pair}")
        self.call_fds = (tx, rx)

    def has_work(self) -> bool:
        """Frames to send, RX buffers posted, or the TAP readable (or not watched while buffers are held)."""
        dev = self.device
        p = dev._pairs[self.pair]
        if self.aio.tail() != self.seen or (not p.armed and p.held_count and not p.gone):
            return True
        if not dev.activated or dev.needs_reset:
            return False
        for i in (dev.tx_queue(self.pair), dev.rx_queue(self.pair)):
            if i < len(dev.queues) and dev.queues[i].configured and dev.queues[i].has_work():
                return True
        return False

    def arm(self) -> bool:
        p = self.device._pairs[self.pair]
        return self.aio.tail() != self.seen or (not p.armed and bool(p.held_count) and not p.gone)

    def disarm(self) -> None:
        pass

    def drain(self) -> None:
        try:
            os.eventfd_read(self.wake_fd)
        except OSError:
            pass

    def close(self) -> None:
        """Cancel the poll and unmap its ring: the sidecore watching it must have stopped."""
        self.aio.close()
        os.close(self.wake_fd)
        self.device._pairs[self.pair].armed = False
