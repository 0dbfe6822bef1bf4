"""virtio-net on a real TAP inside a network namespace the test creates: the host kernel answers ARP
and ICMP echo sent through the device model's TX queue, and its answers come back through RX (every
sidecore mode).  Also: the TAP going down, coming back, and disappearing mid-run; attach errors.
No KVM (the test driver plays the guest); addresses are 10.0.0.0/24 inside the namespace only."""
from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exitless.devices.virtio.net import HDR_LEN
from exitless.net.tap import Tap, TapError, check_name

try:
    import netns as N
    from test_virtio_net import Rig
except ImportError:  # pragma: no cover - tests/ as a package
    from tests import netns as N
    from tests.test_virtio_net import Rig

why = N.can_make_netns()
pytestmark = pytest.mark.skipif(why is not None, reason=why or "")


@pytest.fixture(scope="module")
def ns():
    with N.netns_with_tap("exltap0") as name:
        yield name


@pytest.fixture(params=["python", "c"])
def rig(ns, request):
    """The device on the namespace's TAP, on the pure-Python data path and on the C fast path."""
    from exitless.devices.virtio import queue

    tap = Tap.open("exltap0", netns=ns)
    saved, queue.C_VRING = queue.C_VRING, request.param == "c" and queue._vring is not None
    try:
        r = Rig(tap=tap, queue_size=64)
    finally:
        queue.C_VRING = saved
    r.dev.mac = N.GUEST_MAC
    yield r
    r.dev.close()
    tap.close()


def _wait_rx(r, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    got = []
    while time.monotonic() < deadline:
        r.dev.rx_pump(0)
        used = r.drivers[0].get_used()
        got += used
        if len(got) >= n:
            break
        time.sleep(0.005)
    return got


def _frames(r, posted, used):
    out = []
    for data in r.rx_payload(posted, used):
        assert len(data) >= HDR_LEN
        out.append(data)
    return out


def _exchange(r, frame_out, want, n_posted=16):
    """Send ``frame_out``; return the first received frame for which ``want(frame)`` is not None."""
    posted = r.post([2048] * n_posted)
    deadline = time.monotonic() + 6
    seen = []
    resend = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= resend:
            # Retransmit like a real stack: until the kernel's link watcher has run (up to 1 s after the
            # TAP got its carrier) the namespace's qdisc drops what it sends.
            r.send(frame_out)
            resend = time.monotonic() + 1.0
        used = _wait_rx(r, 1, 0.2)
        for data in _frames(r, posted, used):
            assert data[10:12] == b"\x01\x00"             # num_buffers filled
            seen.append(data[HDR_LEN + 12:HDR_LEN + 14].hex())
            v = want(data[HDR_LEN:])
            if v is not None:
                return v
    raise AssertionError(f"no answer from the namespace's kernel: {seen} {r.dev.stats}")


def test_arp_and_ping_through_a_real_tap(rig):
    mac = _exchange(rig, N.arp_request(), N.parse_arp_reply)
    assert len(mac) == 6
    payload = bytes(range(56))
    for seq in range(3):
        ident, s, data = _exchange(rig, N.icmp_echo(mac, 0x1234, seq, payload), N.parse_echo_reply)
        assert (ident, s, data) == (0x1234, seq, payload)
    # A 4000-byte echo: IP-fragmented by the kernel into MTU-sized frames, each delivered.
    assert rig.dev.stats["tx_packets"] >= 4 and rig.dev.stats["rx_packets"] >= 4
    assert rig.resets == 0


def test_tap_offloads_follow_features(rig):
    assert rig.dev.backend.offloads == 0x0F     # CSUM|TSO4|TSO6|ECN: the guest negotiated all GUEST_*


def test_tap_down_up_and_deleted_mid_run(ns):
    from exitless.net.tap import create_tap

    create_tap("exltap1", ns, address="10.0.1.1/24")
    tap = Tap.open("exltap1", netns=ns)
    r = Rig(tap=tap)
    try:
        r.post([2048] * 4)
        r.send(N.arp_request(src_ip="10.0.1.2", target_ip="10.0.1.1"))
        assert r.dev.stats["tx_packets"] == 1 and r.dev.link_up
        N.set_link(ns, "exltap1", up=False)
        r.send(N.arp_request(src_ip="10.0.1.2", target_ip="10.0.1.1"))
        assert not r.dev.link_up and r.dev.stats["tx_dropped"] == 1 and r.config_irqs == 1
        N.set_link(ns, "exltap1", up=True)
        r.send(N.arp_request(src_ip="10.0.1.2", target_ip="10.0.1.1"))
        assert r.dev.link_up and r.config_irqs == 2
        N.delete_link(ns, "exltap1")
        for _ in range(3):
            r.send(N.arp_request(src_ip="10.0.1.2", target_ip="10.0.1.1"))
            r.dev.rx_pump(0)
        assert not r.dev.link_up and r.dev.stats["tx_dropped"] >= 3
        assert r.resets == 0 and not r.dev.needs_reset
    finally:
        r.dev.close()
        tap.close()


def test_multiqueue_tap(ns):
    from exitless.net.tap import create_tap

    create_tap("exlmq0", ns, queues=2, address="10.0.2.1/24")
    with Tap.open("exlmq0", queues=2, netns=ns) as tap:
        assert len(tap.fds) == 2
        tap.set_queue_enabled(1, False)
        tap.set_queue_enabled(1, True)
        tap.set_offload(0x02)           # TSO without CSUM: the kernel would refuse; dropped to none
        assert tap.offloads == 0
    with pytest.raises(TapError, match="flags"):
        Tap.open("exlmq0", queues=1, netns=ns)   # single-queue attach to a multi-queue TAP


def test_attach_errors(ns):
    with pytest.raises(TapError, match="namespace"):
        Tap.open("exltap9", netns="exl-no-such-namespace")
    for bad in ("", "x" * 16, "a/b", "a b"):
        with pytest.raises(TapError):
            check_name(bad)
    with pytest.raises(TapError, match="not a TAP|flags"):
        Tap.open("lo", netns=ns)


def test_a_tap_exitless_creates_is_up_and_says_so(ns):
    """A TAP that Tap.open creates is brought up (a down one drops every frame) and has a hint with an
    ``ip addr add`` line; it goes away with its fd.  A TAP that existed is left as it was (here: down)."""
    from pyroute2 import NetNS

    def flags(name):
        with NetNS(ns, flags=0) as ipr:
            links = ipr.get_links(ifname=name)
            return links[0]["flags"] if links else None

    with Tap.open("exlnew0", netns=ns) as tap:
        assert tap.created and flags("exlnew0") & 1       # IFF_UP
        assert f"ip -n {ns} addr add" in tap.hint() and "exlnew0" in tap.hint()
    assert flags("exlnew0") is None                      # not persistent
    N.set_link(ns, "exltap0", False)
    try:
        with Tap.open("exltap0", netns=ns) as tap:
            assert not tap.created and tap.hint() is None
            assert not flags("exltap0") & 1
    finally:
        N.set_link(ns, "exltap0", True)


@pytest.mark.kvm
def test_cli_run_prints_the_hint_for_a_tap_it_created(ns):
    """``exitless run --net tap=NEW,netns=NS``: the created TAP's hint reaches the user (stderr)."""
    import subprocess
    import sys

    from exitless.guestkit import guestkit_path

    cmd = [sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()), "--mem", "64M",
           "--append", "idle ms=10", "--net", f"tap=exlnew1,netns={ns},io=trap"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "created TAP exlnew1" in p.stderr and f"ip -n {ns} addr add" in p.stderr, p.stderr


def _teardown(worker, efd: int, r, tap) -> None:
    """Stop the test's sidecore (it must not have died), close its eventfd, the device and the TAP."""
    import os

    try:
        if worker is not None:
            worker.stop()
            assert worker.error is None
    finally:
        os.close(efd)
        r.dev.close()
        tap.close()


@pytest.mark.parametrize("mode", ["notify", "adaptive"])
def test_tap_deleted_under_a_running_sidecore(ns, mode):
    """The TAP disappears while a sidecore watches it: its readiness poll completes with an error, the
    read says EBADFD, the pair stops being watched (no busy loop), the link goes down, TX drops."""
    import os

    from exitless.net.tap import create_tap
    from exitless.sidecore.loop import SidecoreLoop, SidecoreThread

    try:
        from test_virtio_net import _RxRing
    except ImportError:  # pragma: no cover
        from tests.test_virtio_net import _RxRing

    name = f"exldel{mode[0]}"
    create_tap(name, ns, address=f"10.0.{3 if mode == 'notify' else 4}.1/24")
    tap = Tap.open(name, netns=ns)
    r = Rig(tap=tap)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    worker = None
    try:
        r.post([2048] * 8)
        loop = SidecoreLoop([_RxRing(r.dev, efd)] + r.dev.backend_pollables(mode), mode, name="test-del")
        worker = SidecoreThread(loop).start()
        time.sleep(0.1)
        N.delete_link(ns, name)
        deadline = time.monotonic() + 5
        while r.dev.link_up and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not r.dev.link_up and r.dev._pairs[0].gone
        polls = loop.polls
        time.sleep(0.3)
        assert loop.polls - polls < 50          # asleep, not spinning on a dead fd
        r.send(N.arp_request())
        assert r.dev.stats["tx_dropped"] >= 1 and r.resets == 0
    finally:
        _teardown(worker, efd, r, tap)


@pytest.mark.parametrize("mode", [None, "adaptive"])
def test_tap_deleted_and_created_again_recovers(ns, mode):
    """The TAP is deleted (link down, configuration interrupt, frames dropped, nothing spins) and created
    again with the same name: the device re-attaches by itself (same fd numbers), the link comes back up
    with another configuration interrupt, and frames flow both ways again -- with a sidecore asleep on
    the TAP (adaptive) too, which the re-attach wakes."""
    import os

    from exitless.devices.virtio import net
    from exitless.net.tap import create_tap
    from exitless.sidecore.loop import SidecoreLoop, SidecoreThread

    try:
        from test_virtio_net import _RxRing
    except ImportError:  # pragma: no cover
        from tests.test_virtio_net import _RxRing

    name, sub = f"exlre{'a' if mode else 'm'}", 5 if mode else 6
    host, guest = f"10.0.{sub}.1", f"10.0.{sub}.2"
    create_tap(name, ns, address=f"{host}/24")
    tap = Tap.open(name, netns=ns)
    fd0 = tap.fds[0]
    r = Rig(tap=tap)
    r.dev.mac = N.GUEST_MAC
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    worker = None
    arp = N.arp_request(src_ip=guest, target_ip=host)
    try:
        if mode:
            r.post([2048] * 32)
            loop = SidecoreLoop([_RxRing(r.dev, efd)] + r.dev.backend_pollables(mode), mode, name="test-re")
            worker = SidecoreThread(loop).start()

        def answered() -> bool:
            """ARP for the host's address until a reply comes back through RX."""
            before = r.dev.stats["rx_packets"]
            for _ in range(30):
                if not mode:
                    r.post([2048] * 2)
                r.send(arp)
                deadline = time.monotonic() + 0.3
                while time.monotonic() < deadline:
                    if not mode:
                        r.dev.rx_pump(0)
                    if r.dev.stats["rx_packets"] > before:
                        return True
                    time.sleep(0.005)
            return False

        assert answered()
        irqs = r.config_irqs
        N.delete_link(ns, name)
        r.send(arp)
        deadline = time.monotonic() + 5
        while r.dev.link_up and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not r.dev.link_up and r.config_irqs == irqs + 1
        status = int.from_bytes(r.dev.read_config(6, 2), "little")
        assert not status & 1                                   # VIRTIO_NET_S_LINK_UP cleared
        time.sleep(3 * net.REATTACH_INTERVAL)                   # not there: stays down, nothing crashes
        assert not r.dev.link_up and r.dev._reattacher is not None
        create_tap(name, ns, address=f"{host}/24")
        deadline = time.monotonic() + 10
        while not r.dev.link_up and time.monotonic() < deadline:
            time.sleep(0.02)
        assert r.dev.link_up and r.config_irqs == irqs + 2 and tap.fds[0] == fd0
        assert int.from_bytes(r.dev.read_config(6, 2), "little") & 1
        assert answered()                                       # TX and RX through the new TAP
        assert r.resets == 0 and not r.dev.needs_reset and r.dev.internal_errors == 0
    finally:
        _teardown(worker, efd, r, tap)


@given(st.lists(st.tuples(st.sampled_from(["t0", "t1", "exl-x"]), st.sampled_from([None, "ns0", "ns1"])),
                min_size=1, max_size=5))
def test_one_tap_given_to_two_nics_is_refused_by_name(pairs):
    """``--net tap=A --net tap=A`` failed with "already attached by another process": a TAP named twice
    (in one namespace) is refused before anything is opened; the same name in two namespaces is two TAPs."""
    from exitless.net.spec import NetSpec, NetSpecError, refuse_shared_taps

    specs = [NetSpec(tap, netns=ns) for tap, ns in pairs]
    if len(set(pairs)) == len(pairs):
        refuse_shared_taps(specs)
    else:
        with pytest.raises(NetSpecError, match="is given to two NICs"):
            refuse_shared_taps(specs)
