"""virtio-net's C fast path (``_vring.Ring.net_tx_batch`` / ``net_rx_take`` / ``net_rx_pump``), the pair
served in C for a spin slice (a net job of ``_vring.serve``, the sidecore loop's C round) and the pure-Python model
agree, on hostile input too.

The same guest program -- TX chains with any header, any length, split anyhow, or raw descriptors
(wild addresses, loops, huge lengths); RX buffer layouts with unusable chains, duplicate heads and
buffers in a second RAM region that the C ring cannot reach (so C hands frames half-way to Python);
frames of any size and header from the TAP side; RX filter modes -- runs on two devices, one per path.
What the guest and the TAP see must be identical: used rings, the bytes of every used buffer, the
frames on the TAP, the counters, and whether the device needed a reset.  No KVM.
"""
from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from exitless.devices.virtio import queue as qmod
from exitless.devices.virtio.constants import (
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF,
)
from exitless.devices.virtio.net import HDR_LEN, MAX_FRAME
from exitless.sidecore import loop as loop_mod
from exitless.sidecore.loop import SidecoreLoop, SidecoreThread
from exitless.sidecore.spin import WatchedLock

try:
    from test_virtio_net import BCAST, MAC, MiB, Rig, hdr
except ImportError:  # pragma: no cover - tests/ as a package
    from tests.test_virtio_net import BCAST, MAC, MiB, Rig, hdr

pytestmark = pytest.mark.skipif(qmod._vring is None, reason="the C extension _vring is not built")

NEXT, WRITE, INDIRECT = 1, 2, 4
HIGH = 0x1_0000_0000          # a second RAM region: the C ring translates only the largest one
REGIONS = [(0, 64 * MiB), (HIGH, 1 * MiB)]
_WILD = st.sampled_from([64 * MiB - 8, 64 * MiB, HIGH - 16, HIGH + MiB - 4, 1 << 40, (1 << 64) - 16])


PATHS = ("python", "c", "serve")


def _rig(path: str, **kw) -> Rig:
    saved = qmod.C_VRING
    qmod.C_VRING = path != "python"
    try:
        r = Rig(regions=REGIONS, **kw)
    finally:
        qmod.C_VRING = saved
    pairs = r.dev.queue_pairs
    if pairs > 1:        # every pair live (the driver's VQ_PAIRS_SET)
        assert r.ctrl(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", pairs)) == 0  # OK
    if path == "serve":   # as VirtioPci + a poll-mode sidecore: a transport lock and the TAP's readiness poll
        r.dev.transport_lock = WatchedLock()
        r.dev.backend_pollables("poll")
        for pair in range(pairs):
            r.dev.handle_queue(2 * pair)      # the RX queue is looked at once (it sizes the held FIFO)
    return r


def _loop(*rigs: Rig, mode: str = "poll") -> SidecoreLoop:
    """A sidecore loop over every pair of ``rigs`` (their TAP pollables: each serves its pair in C)."""
    loop = SidecoreLoop([p.poller for r in rigs for p in r.dev._pairs], mode)
    with loop._cond:
        loop._apply_pending()
    return loop


def _serve(*rigs: Rig) -> None:
    """Serve every pair of ``rigs`` in the loop's C round until a round finds nothing to do (each round:
    until its 1 ms slice passed or a job returned to Python)."""
    loop = _loop(*rigs)
    try:
        while True:
            before = [(_stats(r), [p.held_count for p in r.dev._pairs], r.dev.needs_reset) for r in rigs]
            if not loop._poll_round(None):
                return
            if [(_stats(r), [p.held_count for p in r.dev._pairs], r.dev.needs_reset) for r in rigs] == before:
                return
    finally:
        loop.close()


def _stats(r: Rig) -> dict:
    """The device's counters but ``c_slices`` (how often the C round served a pair: path-dependent)."""
    return {k: v for k, v in r.dev.stats.items() if k != "c_slices"}


def _pump(r: Rig, path: str) -> None:
    if path == "serve":
        _serve(r)
    r.dev.rx_pump(0)


def _drain(sock: socket.socket) -> list[bytes]:
    sock.setblocking(False)
    out = []
    while True:
        try:
            out.append(sock.recv(1 << 17))
        except BlockingIOError:
            return out


def _frame(n: int, dst: bytes, seed: int) -> bytes:
    return (dst + b"\x02\x00\x00\x00\x00\x09" + bytes((i * 13 + seed) & 0xFF for i in range(max(n - 12, 0))))[:n]


# -- TX -----------------------------------------------------------------------------------------------
# 256/257: the largest frame C copies whole and writes with write(2), the smallest it hands to writev
_lengths = st.sampled_from([0, 1, 11, 13, 14, 20, 60, 60, 64, 64, 256, 257, 1514, 9000, MAX_FRAME, MAX_FRAME + 1])
# near-valid headers (each field valid or just past a limit) reach every check of check_tx_header
_header = st.tuples(st.sampled_from([0, 1, 1, 2, 3, 0xFF]), st.sampled_from([0, 0, 1, 3, 4, 0x81, 0x84, 0x7F]),
                    st.sampled_from([0, 54, 60, 61, 0xFFFF]) | st.integers(0, 0xFFFF),
                    st.sampled_from([0, 1448, 1448]),
                    st.sampled_from([0, 34, 42, 44, 0xFFFF]),
                    st.sampled_from([6, 16, 16, 0xFFFF]))
_good_tx = st.tuples(st.just("frame"), _header, _lengths, st.sampled_from(["one", "split", "indirect", "high",
                                                                            "writable"]))
_raw = st.tuples(_WILD | st.integers(0x200000, 0x200100), st.sampled_from([0, 1, 12, 100, 0xFFFF_FFFF]),
                 st.integers(0, 7), st.integers(0, 70))
_raw_tx = st.tuples(st.just("raw"), st.lists(_raw, min_size=1, max_size=3))
_tx_features = st.sets(st.sampled_from([VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
                                        VIRTIO_NET_F_HOST_ECN]))


def _tx_drop(offered: set) -> tuple:
    """Features left out so that the rest is a valid set (TSO needs CSUM, ECN needs a TSO)."""
    drop = {VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN} - offered
    if VIRTIO_NET_F_CSUM in drop:
        drop |= {VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6}
    if {VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6} <= drop:
        drop.add(VIRTIO_NET_F_HOST_ECN)
    return tuple(drop)


def _add_tx(r: Rig, chain, seed: int, pair: int = 0) -> None:
    d = r.drivers[2 * pair + 1]
    if chain[0] == "raw":
        idxs = [d.free.popleft() for _ in chain[1] if d.free]
        for i, (addr, ln, flags, nxt) in zip(idxs, chain[1]):
            d.put_desc(i, addr, ln, flags, nxt if nxt < 64 else idxs[0])
        if idxs:
            d.offer(idxs[0])
        return
    _, h, n, shape = chain
    data = hdr(*h) + _frame(n, MAC, seed)
    if shape == "one":
        d.add([data], [])
    elif shape == "split":
        d.add([p for p in (data[:5], data[5:19], data[19:]) if p], [])
    elif shape == "indirect":
        d.add([data[:7], data[7:]] if len(data) > 7 else [data], [], indirect=True)
    elif shape == "writable":
        d.add([data], [16])
    else:   # the frame body in the second RAM region: C hands the chain to Python
        gpa = HIGH + (seed % 4) * 0x20000
        r.mem.write(gpa, data[12:])
        head, _ = d.add([data[:12]], [])
        tail = d.free.popleft()
        d.put_desc(head, d.heap - 12, 12, NEXT, tail)
        d.put_desc(tail, gpa, len(data) - 12, 0, 0)


def _tx_observe(r: Rig) -> tuple:
    return (r.drivers[1].get_used(), _drain(r.tap.peers[0]), _stats(r), r.resets, r.dev.needs_reset)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(features=_tx_features, chains=st.lists(_good_tx | _raw_tx, min_size=1, max_size=6),
       budgets=st.lists(st.sampled_from([None, 1, 2, 5]), min_size=1, max_size=3))
@example(features={VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4}, budgets=[None],         # ECN not negotiated
         chains=[("frame", (1, 0x81, 54, 1448, 34, 16), 1514, "one"), ("frame", (1, 1, 54, 1448, 34, 16), 1514, "one")])
@example(features={VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO6}, budgets=[None],         # TSO4 not negotiated
         chains=[("frame", (1, 1, 54, 1448, 34, 16), 1514, "split"), ("frame", (1, 4, 54, 1448, 34, 16), 1514, "one")])
@example(features={VIRTIO_NET_F_CSUM}, budgets=[None],                                 # the checksum field's end
         chains=[("frame", (1, 0, 0, 0, 44, 16), 60, "one"), ("frame", (1, 0, 0, 0, 42, 16), 60, "one")])
@example(features=set(), budgets=[None],                    # either side of C's whole-frame copy (TX_COPY_MAX)
         chains=[("frame", (0, 0, 0, 0, 0, 6), 256, "split"), ("frame", (0, 0, 0, 0, 0, 6), 257, "indirect"),
                 ("frame", (0, 0, 0, 0, 0, 6), 256, "indirect"), ("frame", (0, 0, 0, 0, 0, 6), 257, "split"),
                 ("frame", (0, 0, 0, 0, 0, 6), 64, "one"), ("frame", (0, 0, 0, 0, 0, 6), 257, "one")])
def test_tx_paths_agree(features, chains, budgets):
    seen = []
    for path in PATHS:
        r = _rig(path, drop=_tx_drop(features))
        try:
            for i, chain in enumerate(chains):
                _add_tx(r, chain, i)
            if path == "serve":
                _serve(r)
            for b in budgets + [None]:
                r.dev.handle_queue(1, b)
            seen.append(_tx_observe(r))
        finally:
            r.close()
    assert seen[0] == seen[1] == seen[2]


# -- RX -----------------------------------------------------------------------------------------------
_good_buf = st.tuples(st.just("bufs"), st.lists(st.sampled_from([1, 6, 12, 13, 64, 200, 1000, 1526, 1526, 2048, 2048,
                                                                  4096, 4096]), min_size=1, max_size=3), st.booleans())
# mostly good buffers; a ring error (a loop, a head offered twice) ends the run for both paths, so it
# comes at most once, after the first buffers (``ring_error``)
_rx_buf = st.one_of(
    _good_buf, _good_buf, _good_buf, _good_buf,
    st.tuples(st.just("readable"), st.sampled_from([1, 20])),
    st.tuples(st.just("high"), st.sampled_from([12, 100, 1526, 4096])),
    st.tuples(st.just("high"), st.sampled_from([12, 100, 1526, 4096])),
    st.tuples(st.just("wild"), _WILD),
)
_ring_error = st.sampled_from([None] * 9 + [("dup", 0), ("dup", 2), ("loop", 0)])
_rx_frame = st.tuples(st.sampled_from([0, 5, 12, 13, 18, 60, 60, 60, 300, 300, 1514, 1514, 3000, 9000, 65000]),
                      st.sampled_from([MAC, BCAST, b"\x01\x00\x5e\x00\x00\x01", b"\x02\xaa\xbb\xcc\xdd\xee"]),
                      st.sampled_from([0, 1, 2]), st.sampled_from([0, 1, 4]))
_rx_mode = st.sampled_from(["promisc", "promisc", "strict", "allmulti", "table", "nobcast"])


def _rx_features(mrg: bool, csum: bool) -> tuple:
    drop = [VIRTIO_NET_F_MRG_RXBUF] if not mrg else []
    if not csum:
        drop += [VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN]
    return tuple(drop)


def _set_mode(r: Rig, mode: str) -> None:
    if mode == "promisc":
        return
    r.ctrl(VIRTIO_NET_CTRL_RX, 0, b"\0")                         # promiscuous off
    if mode == "allmulti":
        r.ctrl(VIRTIO_NET_CTRL_RX, 1, b"\1")
    elif mode == "table":
        uc, mc = [b"\x02\xaa\xbb\xcc\xdd\xee"], [b"\x01\x00\x5e\x00\x00\x01"]
        r.ctrl(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET,
               struct.pack("<I", len(uc)) + b"".join(uc) + struct.pack("<I", len(mc)) + b"".join(mc))
    elif mode == "nobcast":
        r.ctrl(VIRTIO_NET_CTRL_RX, 5, b"\1")


def _post(r: Rig, bufs: list, high_at: list) -> list:
    d = r.drivers[0]
    out = []
    for b in bufs:
        if not d.free:
            break
        kind = b[0]
        if kind == "bufs":
            head, gpas = d.add([], b[1], indirect=b[2])
            out.append((head, gpas, b[1]))
        elif kind == "readable":
            d.add([b"r" * b[1]], [2048])
        elif kind == "high":
            gpa = HIGH + 0x1000 * len(high_at)
            high_at.append(gpa)
            i = d.free.popleft()
            d.put_desc(i, gpa, b[1], WRITE)
            d.offer(i)
            out.append((i, [gpa], [b[1]]))
        elif kind == "wild":
            i = d.free.popleft()
            d.put_desc(i, b[1], 2048, WRITE)
            d.offer(i)
        elif kind == "dup" and out:
            d.offer(out[b[1] % len(out)][0])
        elif kind == "loop":
            a, c = d.free.popleft(), d.free.popleft()
            d.put_desc(a, 0x100000, 64, NEXT | WRITE, c)
            d.put_desc(c, 0x100100, 64, NEXT | WRITE, a)
            d.offer(a)
    return out


def _rx_observe(r: Rig, posted: list) -> tuple:
    used = r.drivers[0].get_used()
    lens = {h: (g, s) for h, g, s in posted}
    data = []
    for head, n in used:
        if head in lens and n:
            gpas, sizes = lens[head]
            data.append(b"".join(r.mem.read(g, s) for g, s in zip(gpas, sizes))[:n])
    return used, data, _stats(r), r.resets, r.dev.needs_reset, r.dev._pairs[0].held_count


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mrg=st.booleans(), csum=st.booleans(), mode=_rx_mode,
       first=st.lists(_rx_buf, min_size=0, max_size=10), frames=st.lists(_rx_frame, min_size=1, max_size=8),
       later=st.lists(_rx_buf, min_size=0, max_size=6), pumps=st.integers(1, 3), ring_error=_ring_error)
def test_rx_paths_agree(mrg, csum, mode, first, frames, later, pumps, ring_error):
    seen = []
    for path in PATHS:
        r = _rig(path, drop=_rx_features(mrg, csum))
        try:
            _set_mode(r, mode)
            high_at: list = []
            posted = _post(r, first + ([ring_error] if ring_error else []), high_at)
            r.dev.handle_queue(0)
            for i, (n, dst, flags, gso) in enumerate(frames):
                r.tap.peers[0].send(hdr(flags, gso, 54, 1448, 34, 16, 0x5555) + _frame(n, dst, i))
            for _ in range(pumps):
                _pump(r, path)
            posted += _post(r, later, high_at)
            if path == "serve":        # new buffers are taken by the serve loop itself
                _serve(r)
            r.dev.handle_queue(0)
            _pump(r, path)
            seen.append(_rx_observe(r, posted))
        finally:
            r.close()
    assert seen[0] == seen[1] == seen[2]


@settings(max_examples=60, deadline=None)
@given(mode=_rx_mode, frames=st.lists(_rx_frame, min_size=1, max_size=8))
def test_rx_filter_paths_agree(mode, frames):
    """Every RX mode against every kind of destination, into plenty of good buffers."""
    test_rx_paths_agree.hypothesis.inner_test(False, False, mode, [("bufs", [2048], False)] * 10, frames, [], 1, None)


# -- several pairs, several NICs: one C round serves them all ------------------------------------------
# no broken rings here: once a device needs a reset, what its other pairs did before depends on the order
# they were visited in (pair by pair here, round-robin in C) -- one pair's broken ring is test_tx/rx_paths_agree's
_pair_work = st.tuples(st.lists(_good_tx, max_size=4), st.lists(_good_buf, max_size=5), st.lists(_rx_frame, max_size=5))


def _pairs_observe(r: Rig, posted: list) -> list:
    out = []
    for pair, got in enumerate(posted):
        lens = {h: (g, s) for h, g, s in got}
        used = r.drivers[2 * pair].get_used()
        data = [b"".join(r.mem.read(g, s) for g, s in zip(*lens[h]))[:n] for h, n in used if h in lens and n]
        out.append((r.drivers[2 * pair + 1].get_used(), _drain(r.tap.peers[pair]), used, data,
                    r.dev._pairs[pair].held_count))
    return [out, _stats(r), r.resets, r.dev.needs_reset]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mrg=st.booleans(), nics=st.lists(st.lists(_pair_work, min_size=1, max_size=3), min_size=1, max_size=2))
def test_several_pairs_and_nics_paths_agree(mrg, nics):
    """Every pair of every NIC (MQ: 1-3 pairs each, 1-2 NICs) with its own TX chains, RX buffers and TAP
    frames: the C round serving all the pairs at once (one loop, the budget per pair and pass), the C
    batches pair by pair, and the Python model leave the same rings, bytes, frames and counters."""
    seen = []
    for path in PATHS:
        rigs = [_rig(path, pairs=len(work), drop=_rx_features(mrg, True)) for work in nics]
        try:
            posted = []
            for r, work in zip(rigs, nics):
                posted.append([])
                for pair, (tx, bufs, frames) in enumerate(work):
                    for i, chain in enumerate(tx):
                        _add_tx(r, chain, 10 * pair + i, pair)
                    posted[-1].append(_post_pair(r, pair, bufs))
                    if path != "serve":
                        r.dev.handle_queue(2 * pair)
                    for i, (n, dst, flags, gso) in enumerate(frames):
                        r.tap.peers[pair].send(hdr(flags, gso, 54, 1448, 34, 16, 0x5555) + _frame(n, dst, i))
            if path == "serve":
                _serve(*rigs)
            for r, work in zip(rigs, nics):     # what is left (or everything, off the C round)
                for pair in range(len(work)):
                    r.dev.handle_queue(2 * pair + 1)
                    r.dev.handle_queue(2 * pair)
                    r.dev.rx_pump(pair)
            seen.append([_pairs_observe(r, p) for r, p in zip(rigs, posted)])
            if path == "serve" and any(work for work in nics):
                assert all(r.dev.stats["c_slices"] for r in rigs)
        finally:
            for r in rigs:
                r.close()
    assert seen[0] == seen[1] == seen[2]


def _post_pair(r: Rig, pair: int, bufs: list) -> list:
    d = r.drivers[2 * pair]
    out = []
    for _, sizes, indirect in bufs:
        if not d.free:
            break
        head, gpas = d.add([], sizes, indirect=indirect)
        out.append((head, gpas, sizes))
    return out


# -- adaptive: C while busy, then every queue and TAP armed, asleep, and woken by either ------------------
def _pci_pollables(r: Rig, mode: str) -> tuple:
    """What a VirtioPci gives its sidecore (a QueuePollable per queue, with its kick eventfd; the TAP
    pollables, each serving its pair's two queues) over ``r``'s device; returns ``(kick fds, pollables)``."""
    from types import SimpleNamespace

    from exitless.devices.virtio.pci import QueuePollable

    t = SimpleNamespace(device=r.dev, lock=WatchedLock(), path=mode, machine=SimpleNamespace(mem=r.mem),
                        wake_fds=[os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in r.dev.queues])
    r.dev.transport_lock = t.lock
    queues = [QueuePollable(t, i) for i in range(len(r.dev.queues))]
    taps = r.dev.backend_pollables(mode)
    for qp in queues:
        qp.served_by = r.dev.queue_server(qp.index)
    for q in r.dev.queues:        # a polled path: the driver is asked not to kick (VirtioPci's activation)
        q.disable_notifications()
    return t.wake_fds, queues + taps


def _until(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.002)
    return True


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.integers(1, 2),
       steps=st.lists(st.tuples(st.sampled_from(["tx", "rx", "post"]), st.integers(0, 1),
                                st.sampled_from([0, 0, 0.0002, 0.003])), min_size=1, max_size=14))
def test_adaptive_pairs_run_in_c_then_sleep_armed_and_wake(pairs, steps):
    """An adaptive sidecore over a NIC's pairs (with kick eventfds, as VirtioPci): while frames come, the
    pairs are served in the C round; once idle, every queue is armed (EVENT_IDX: avail_event = the next
    index) and every TAP watched, and the loop sleeps; then a TX chain (its driver must kick) and a TAP
    frame are each delivered -- no lost wake-up -- and every frame arrives intact, in order."""
    r = _rig("c", pairs=pairs)
    kicks, pollables = _pci_pollables(r, "adaptive")
    loop = SidecoreLoop(pollables, "adaptive", poll_ns=16_000, poll_max_ns=64_000)
    th = SidecoreThread(loop).start()
    sent_tx: list[list[bytes]] = [[] for _ in range(pairs)]
    sent_rx: list[list[bytes]] = [[] for _ in range(pairs)]
    posted: list[dict] = [{} for _ in range(pairs)]
    got_rx: list[list[bytes]] = [[] for _ in range(pairs)]

    def publish(i: int) -> bool:
        kick = r.drivers[i].publish()
        if kick:
            os.eventfd_write(kicks[i], 1)
        return kick

    def post(pair: int, n: int) -> None:
        d = r.drivers[2 * pair]
        for _ in range(n):
            head, gpas = d.add([], [2048], publish=False)
            posted[pair][head] = gpas[0]
        publish(2 * pair)

    def tx(pair: int, seed: int) -> bool:
        data = _frame(60 + seed, BCAST, seed)
        r.drivers[2 * pair + 1].add([hdr() + data], [], publish=False)
        sent_tx[pair].append(data)
        return publish(2 * pair + 1)

    def rx(pair: int, seed: int) -> None:
        data = _frame(70 + seed, MAC, seed)
        r.tap.peers[pair].send(hdr() + data)
        sent_rx[pair].append(data)

    def delivered() -> bool:
        for pair in range(pairs):
            for head, n in r.drivers[2 * pair].get_used():
                got_rx[pair].append(r.mem.read(posted[pair].pop(head), n)[HDR_LEN:])
            r.drivers[2 * pair + 1].get_used()
        return all(len(got_rx[p]) == len(sent_rx[p]) for p in range(pairs)) and all(
            sum(r.tap.peer_seen[p]) == len(sent_tx[p]) for p in range(pairs))

    r.tap.peer_seen = [[] for _ in range(pairs)]

    def drain_peers() -> None:
        for p in range(pairs):
            for f in _drain(r.tap.peers[p]):
                r.tap.peer_seen[p].append(1)
                assert f[HDR_LEN:] == sent_tx[p][len(r.tap.peer_seen[p]) - 1]

    try:
        for pair in range(pairs):
            post(pair, 32)
        for k, (op, pair, pause) in enumerate(steps):
            pair %= pairs
            if op == "tx":
                tx(pair, k)
            elif op == "rx":
                rx(pair, k)
            else:
                post(pair, 1)
            if pause:
                time.sleep(pause)
        assert _until(lambda: (drain_peers(), delivered())[1]), th.error
        assert _until(lambda: r.dev.stats["c_slices"] > 0)      # the busy phase ran in C
        # idle: every window runs out; the loop arms everything and sleeps (and stays asleep)
        def asleep() -> bool:
            before = loop.sleeps
            time.sleep(0.02)
            return before > 0 and loop.sleeps == before
        for wake in ("kick", "tap"):
            assert _until(asleep), th.error
            for q in r.dev.queues[:2 * pairs]:
                assert q.notifications_enabled and r.mem.read_u16(q.used_addr + 4 + 8 * q.size) == q.last_avail_idx
            assert all(p.armed for p in r.dev._pairs[:pairs])
            if wake == "kick":
                assert tx(pairs - 1, 99)         # armed: the driver must kick, and the kick wakes the loop
            else:
                rx(pairs - 1, 98)                # the TAP's readiness poll wakes it
            assert _until(lambda: (drain_peers(), delivered())[1]), wake
        assert got_rx == sent_rx
        assert th.error is None and not r.dev.needs_reset
    finally:
        th.stop()
        for fd in kicks:
            os.close(fd)
        r.close()


@pytest.mark.parametrize("path", ["python", "c"])
def test_rx_buffer_changed_while_held_breaks_the_ring(path):
    """A held RX buffer is walked again when a frame goes into it: the driver pointing it outside RAM
    meanwhile is a broken ring (needs reset), on both paths, and nothing is written anywhere."""
    r = _rig(path)
    try:
        d = r.drivers[0]
        head, _ = d.add([], [2048])
        r.dev.handle_queue(0)
        d.put_desc(head, 1 << 40, 2048, WRITE)
        r.tap.peers[0].send(hdr() + _frame(100, MAC, 0))
        assert r.dev.rx_pump(0) == 0
        assert r.dev.needs_reset and r.resets == 1 and r.dev.stats["rx_packets"] == 0
    finally:
        r.close()


def test_a_thread_that_wants_the_transport_lock_ends_the_serve_loop(monkeypatch):
    """The C round holds the transport lock for its whole slice; another thread's acquisition (a config
    access, a reset) bumps the word it watches, so the round returns after one pass, not at its deadline."""
    import threading

    r = _rig("serve")
    monkeypatch.setattr(loop_mod, "SPIN_SLICE_NS", 30_000_000_000)
    loop = _loop(r)
    try:
        lock = r.dev.transport_lock
        th = threading.Thread(target=loop._poll_round, args=(None,))
        th.start()
        while lock._lock.acquire(blocking=False):     # not bumping the word: wait until the loop holds it
            lock._lock.release()
            time.sleep(0.001)
        t0 = time.monotonic()
        with lock:
            waited = time.monotonic() - t0
        th.join(30)
        assert not th.is_alive() and waited < 5, waited
        assert r.dev.stats["c_slices"] == 1
    finally:
        loop.close()
        r.close()


def test_watched_lock_bumps_its_word_for_other_threads_only():
    """A thread that wants the lock bumps the word (a C round holding it returns); the holder taking it
    again (a second pair of the same device, a queue polled beside the round) does not end its own round."""
    import threading

    lock = WatchedLock()
    w0 = lock.word
    with lock:
        w1 = lock.word
        with lock:
            assert lock.word == w1
        assert w1 != w0 and lock.word == w1
        got = []
        th = threading.Thread(target=lambda: got.append(lock.acquire(timeout=5)) or lock.release())
        th.start()
        assert _until(lambda: lock.word != w1, 5)    # the waiter's bump, while we still hold it
    th.join(5)
    assert got == [True]
