"""``exitless sidecore`` serving virtio-net queue pairs (``run --net tap=…,io=poll|adaptive --sidecore PATH``).

* Guest-kit VMs -- separate ``python3 -m exitless run`` processes -- with NICs on TAPs in a network namespace
  the test creates (10.0.<k>.0/24, the namespace's kernel answers) and one with a disk, all on one
  confined service: request/response and flood traffic checked, one NIC VM SIGKILLed mid-flood while the
  others finish, and the service back to its fds and threads once all have gone.
* Hostile hand-overs (an unknown device type, fds that are not TAP queues, missing fds...) are refused
  with a log line; the service and the VM it already serves go on, and no fd stays behind.
* The VM side driven register by register: the NIC's link follows the TAP (down, then up again) as the
  service reports it, and a service that goes away shows as link down, not as a device needing a reset.

Nothing outside the namespaces the tests create is touched.
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exitless import confine
from exitless.bench.soak import lost_sectors_of
from exitless.guestkit import guestkit_path
from exitless.vhost_user import protocol as P
from exitless.vhost_user.frontend import Frontend
from exitless.vhost_user.protocol import ProtocolError

try:
    import netns as N
    from fds import open_fds
    from test_sidecore_service import Running, hello_with, roundtrip
    from test_sidecore_service_vms import DISK_BYTES, Vm, confined_service, counts, images, wait_for
    from test_vhost_user_backend import DriverRing, Session
except ImportError:  # pragma: no cover - tests/ as a package
    from tests import netns as N
    from tests.fds import open_fds
    from tests.test_sidecore_service import Running, hello_with, roundtrip
    from tests.test_sidecore_service_vms import DISK_BYTES, Vm, confined_service, counts, images, wait_for
    from tests.test_vhost_user_backend import DriverRing, Session

pytestmark = pytest.mark.skipif(N.can_make_netns() is not None, reason=N.can_make_netns() or "")


def nic_vm(ns: str, tap: str, io: str, app: str, k: int, sock, timeout: int = 180) -> Vm:
    """A guest-kit VM whose one NIC (on ``tap``, subnet 10.0.``k``.0/24) the service serves."""
    return Vm(None, io, f"{app} ip=10.0.{k}.2 peer=10.0.{k}.1", sock, timeout,
              devices=["--net", f"tap={tap},io={io},netns={ns}"], probed="guestkit: virtio-net")


@pytest.mark.kvm
@pytest.mark.skipif(not confine.status()[0], reason=confine.status()[1])
@pytest.mark.parametrize("mode", ["poll", "adaptive"])
def test_two_nics_and_a_disk_on_one_service_one_nic_killed_mid_flood(tmp_path, mode):
    from exitless.net.tap import create_tap

    img, = images(tmp_path, ("d",), DISK_BYTES)
    with N.netns_only() as ns:
        for k in (1, 2, 3):
            create_tap(f"exlsn{k}", ns, address=f"10.0.{k}.1/24")
        with confined_service(tmp_path, mode) as (svc, sock, vms):
            base = counts(svc.proc.pid)
            # the victim floods for far longer than the test; the others run meanwhile
            victim = nic_vm(ns, "exlsn3", "adaptive", "net test=flood n=100000000 qd=16 size=64 max_timeouts=1000000",
                            3, sock)
            vms.append(victim)
            victim.wait_probed()
            rr = nic_vm(ns, "exlsn1", "poll", "net test=rr n=500 size=100", 1, sock)
            flood = nic_vm(ns, "exlsn2", "adaptive", "net test=flood n=5000 qd=16 size=64 max_timeouts=0", 2, sock)
            disk = Vm(img, "poll", "blk rw=fill bs=4096 qd=8 seed=11", sock)
            vms += [rr, flood, disk]
            for vm in (rr, flood, disk):
                vm.wait_probed()
            log = svc.text()
            assert log.count("serves its NIC") == 3 and log.count("serves its disk") == 1, log
            victim.kill()                            # SIGKILL mid-flood: no goodbye on the socket
            assert victim.proc.returncode == -signal.SIGKILL
            wait_for(lambda: "vm#1 detached" in svc.text(), 30, svc.text)
            res = rr.result()
            assert res["ops"] == 500 and res["errors"] == 0 and res["timeouts"] == 0, res
            assert res["bad_num_buffers"] == 0 and res["link_up"] == 1 and res["mrg_rxbuf"] == 1, res
            if mode == "poll":    # the service saw the driver's TX frames without a kick
                assert res["notifies"] == 0, res
            res = flood.result()
            assert res["ops"] == 5000 and res["errors"] == 0 and res["timeouts"] == 0, res
            assert res["bad_num_buffers"] == 0, res
            res = disk.result()
            assert res["errors"] == 0 and res["ops"] == DISK_BYTES // 4096, res
            assert lost_sectors_of(img.read_bytes(), 11) == 0
            wait_for(lambda: svc.text().count(" detached ") == 4, 30, svc.text)
            assert svc.proc.poll() is None          # every VM gone, the service still serves
            wait_for(lambda: counts(svc.proc.pid) == base, 30,
                     lambda: f"service fds/threads {counts(svc.proc.pid)} != {base} at start\n{svc.text()}")


def test_cli_refuses_what_the_service_cannot_serve(tmp_path):
    """``--net …,io=shared --sidecore``: the control queue stays in the VMM, whose shared-path doorbell is a
    RAM page nothing there watches -- refused in one line, exit 2, before anything boots; a trap or ioeventfd
    NIC stays in the VMM (as a disk does), so with nothing else --sidecore would serve nothing: refused."""
    base = [sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()), "--sidecore",
            str(tmp_path / "none.sock"), "--append", "info"]
    r = subprocess.run(base + ["--net", "tap=exlnone0,io=shared"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "io=shared with --sidecore" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    r = subprocess.run(base + ["--net", "tap=exlnone0,io=poll,queues=8"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "at most 7 queue pairs" in r.stderr, r.stderr
    for io in ("trap", "ioeventfd"):
        r = subprocess.run(base + ["--net", f"tap=exlnone0,io={io}"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "no --disk, --nvme or --net on a polled path" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------------------
# hostile hand-overs
# ---------------------------------------------------------------------------------------------------------
def net_payload(*, device=1, flags=0, queues=2, qsize=256, serial=b"52:54:00:12:34:56") -> bytes:
    return P.BACKEND.pack(P.BACKEND_VERSION, device, flags, queues, qsize, serial)


def _tun_fd(ns: str, name: str, flags: int, hdr: int = 12) -> int:
    """An fd on /dev/net/tun attached (TUNSETIFF ``flags``) to ``name`` in namespace ``ns`` (created if
    missing), with a ``hdr``-byte vnet header if it has one."""
    from exitless.net import tap as T

    def attach() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, T.TUNSETIFF, T._ifreq(name, flags))
            if flags & T.IFF_VNET_HDR:
                fcntl.ioctl(fd, T.TUNSETVNETHDRSZ, struct.pack("i", hdr))
        except BaseException:
            os.close(fd)
            raise
        return fd
    return T._in_netns(ns, attach)


@pytest.fixture(scope="module")
def taps():
    """A namespace with a single-queue and a multi-queue TAP; yields ``{kind: fd maker}``."""
    from exitless.net import tap as T

    with N.netns_only() as ns:
        vnet = T.IFF_TAP | T.IFF_NO_PI | T.IFF_VNET_HDR
        T.create_tap("exlhq1", ns)
        T.create_tap("exlhq2", ns, queues=2)
        T.create_tap("exlhq3", ns, queues=2)
        yield {
            "tap": lambda: _tun_fd(ns, "exlhq1", vnet),
            "mq0": lambda: _tun_fd(ns, "exlhq2", vnet | T.IFF_MULTI_QUEUE),
            "other mq": lambda: _tun_fd(ns, "exlhq3", vnet | T.IFF_MULTI_QUEUE),
            "tun": lambda: _tun_fd(ns, "exlhtun", 0x0001 | T.IFF_NO_PI),            # IFF_TUN: no Ethernet
            "no vnet header": lambda: _tun_fd(ns, "exlhnv", T.IFF_TAP | T.IFF_NO_PI),
            "10-byte header": lambda: _tun_fd(ns, "exlh10", vnet, hdr=10),
            "unattached": lambda: os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC),
        }


def _pipe() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def _refusals() -> dict[str, tuple[bytes, list[str], str]]:
    """case -> (payload, fd kinds, what the log line says): each must be refused, for that reason."""
    ok1 = net_payload(queues=2)
    ok2 = net_payload(queues=4)
    return {
        "unknown device type": (net_payload(device=7, queues=2), ["tap"], "virtio device 7 is not served"),
        "no fds": (ok1, [], "0 fds, expected 2"),
        "the TAP fd only (no config fd)": (ok1, ["tap"], "1 fds, expected 2"),
        "one TAP fd for two pairs": (ok2, ["mq0", "eventfd"], "2 fds, expected 3"),
        "a pipe for a TAP": (ok1, ["pipe", "eventfd"], "not a TAP queue"),
        "a socket for a TAP": (ok1, ["socket", "eventfd"], "not a TAP queue"),
        "an eventfd for a TAP": (ok1, ["eventfd", "eventfd"], "not a TAP queue"),
        "an unattached /dev/net/tun": (ok1, ["unattached", "eventfd"], "not an attached TAP queue"),
        "a TUN, not a TAP": (ok1, ["tun", "eventfd"], "has flags"),
        "a TAP without the vnet header": (ok1, ["no vnet header", "eventfd"], "has flags"),
        "a 10-byte vnet header": (ok1, ["10-byte header", "eventfd"], "vnet header is 10 bytes"),
        "a multi-queue TAP's queue for one pair": (ok1, ["mq0", "eventfd"], "has flags"),
        "a single-queue TAP's queue in a two-pair NIC": (ok2, ["tap", "mq0", "eventfd"], "has flags"),
        "two pairs on two TAPs": (ok2, ["mq0", "other mq", "eventfd"], "one TAP per NIC"),
        "a pipe for the config fd": (ok1, ["tap", "pipe"], "not an eventfd"),
        "an odd queue count": (net_payload(queues=3), ["tap", "eventfd"], "RX/TX pairs"),
        "no queues": (net_payload(queues=0), ["eventfd"], "RX/TX pairs"),
        "17 pairs": (net_payload(queues=34), ["eventfd"] * 18, "more than 8 fds"),   # vhost-user's limit
        "8 pairs (7 fds)": (net_payload(queues=16), ["eventfd"] * 7, "7 fds, expected 9"),
        "flags": (net_payload(flags=P.BACKEND_F_RO), ["tap", "eventfd"], "mean nothing for a NIC"),
        "a multicast MAC": (net_payload(serial=b"01:00:5e:00:00:01"), ["tap", "eventfd"], "multicast"),
        "not a MAC": (net_payload(serial=b"my nic"), ["tap", "eventfd"], "MAC address"),
    }


@pytest.fixture
def service(tmp_path):
    run = Running(tmp_path / "s.sock", io_timeout=1.0)
    yield run
    run.stop()


@pytest.mark.parametrize("case", sorted(_refusals()))
def test_hostile_nic_hand_over_is_refused_and_the_service_lives(service, taps, tmp_path, case, caplog):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    payload, kinds, why = _refusals()[case]
    makers = {**taps, "pipe": _pipe, "eventfd": _eventfd,
              "socket": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach()}
    good = Session(service.svc.path, hello=hello_with(disk))
    try:
        fds0 = open_fds()
        fe = Frontend.connect(service.svc.path)
        fds = [makers[k]() for k in kinds]
        try:
            with caplog.at_level(logging.INFO, "exitless.sidecore.service"):
                fe.send(P.EXITLESS_SET_BACKEND, payload, fds, need_reply=True)
                assert fe.closed_by_peer(10)
                service.wait_detached(1)
        finally:
            for fd in fds:
                os.close(fd)
            fe.close()
        refused = [r.getMessage() for r in caplog.records if "detached" in r.getMessage()
                   and "refused" in r.getMessage()]
        assert len(refused) == 1 and why in refused[0], caplog.text
        assert service.svc.errors == 1 and service.svc.dataplane.error is None
        roundtrip(good, 5)                       # the VM already served never noticed
        assert open_fds() == fds0                # the service closed every fd it was handed
    finally:
        good.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(queues=st.integers(0, 9), flags=st.sampled_from([0, P.BACKEND_F_RO, P.BACKEND_F_DIRECT, 1 << 9]),
       serial=st.sampled_from(["52:54:00:12:34:56", "01:00:5e:00:00:01", "", "52:54:00:12:34", "\x7f" * 20]),
       kinds=st.lists(st.sampled_from(["mq0", "eventfd", "pipe", "socket"]), min_size=8, max_size=8),
       first=st.sampled_from(["mq0", "tun", "no vnet header", "10-byte header", "unattached"]))
def test_any_nic_hand_over_builds_a_device_or_is_refused_and_closes_every_fd(taps, queues, flags, serial, kinds,
                                                                               first):
    """The service's NIC builder on any payload with the fd count the protocol lets through: a device (its
    ``close`` closes the fds) or ProtocolError (the fds closed already) -- never another error, never an fd left."""
    from exitless.sidecore.service_net import served_nic

    makers = {**taps, "pipe": _pipe, "eventfd": _eventfd,
              "socket": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach()}
    n = queues // 2 + 1
    if n > P.MAX_FDS:
        return                                   # the server refuses the message before any builder sees it
    before = open_fds()
    fds = [makers[k]() for k in ([first] + kinds)[:n - 1]] + [makers[kinds[-1]]()]
    spec = P.Backend(P.BACKEND_VERSION, 1, flags, queues, 256, serial)
    try:
        dev, what = served_nic(spec, fds, "vm#1")
    except ProtocolError:
        pass
    else:
        assert queues % 2 == 0 and flags == 0 and "TAP" in what
        dev.close()
    assert open_fds() == before


def test_a_good_hand_over_offers_the_vmms_features_minus_the_control_queue(service, taps):
    """Two pairs on a multi-queue TAP are accepted; the device offered is ``serve net``'s (no control queue)."""
    from exitless.devices.virtio.net import CTRL_FEATURES, VirtioNet

    class _Tap:
        fds = [0, 1]
        name = "x"
    fe = Frontend.connect(service.svc.path)
    fds = [taps["mq0"](), taps["mq0"](), _eventfd()]     # two queues of one multi-queue TAP
    try:
        assert fe.request(P.EXITLESS_SET_BACKEND, net_payload(queues=4), fds, expect_reply=True) == P.U64.pack(0)
        offered = fe.get_features() & ~(1 << P.F_PROTOCOL_FEATURES)
        vmm = VirtioNet(_Tap(), queue_pairs=2).device_features()
        assert offered == vmm & ~CTRL_FEATURES and vmm & CTRL_FEATURES
        assert fe.get_queue_num() == 4
    finally:
        for fd in fds:
            os.close(fd)
        fe.close()
    service.wait_detached(1)


# ---------------------------------------------------------------------------------------------------------
# the VM side, driven register by register
# ---------------------------------------------------------------------------------------------------------
def driver_ok(pci, mem, features: int, queues: int) -> list:
    """What a driver does up to DRIVER_OK: features (``features`` and VERSION_1), then ``queues`` rings of
    64 (:class:`DriverRing`, returned) -- rx0, tx0, ..., ctrl."""
    pci.common_write(0x14, 1, 0x3)                                   # ACKNOWLEDGE | DRIVER
    for select in (0, 1):
        pci.common_write(0x08, 4, select)
        pci.common_write(0x0C, 4, (features | 1 << 32) >> (32 * select) & 0xFFFFFFFF)
    pci.common_write(0x14, 1, 0xB)                                   # FEATURES_OK
    assert pci.status & 0x8
    rings = []
    for q in range(queues):
        ring = DriverRing(mem, size=64, base=0x10_0000 + q * 0x4000)
        rings.append(ring)
        pci.common_write(0x16, 2, q)
        pci.common_write(0x18, 2, 64)
        for off, gpa in ((0x20, ring.desc), (0x28, ring.avail), (0x30, ring.used)):
            pci.common_write(off, 8, gpa)
        pci.common_write(0x1C, 2, 1)
    pci.common_write(0x14, 1, 0xF)                                   # DRIVER_OK: the pairs to the service
    return rings


FRAME_GPA = 0x20_0000


def send_frame(mem, tx) -> None:
    """A broadcast frame behind a zero virtio-net header on TX ring ``tx``; waits until it is used."""
    from exitless.devices.virtio.net import HDR_LEN

    mem.write(FRAME_GPA, bytes(HDR_LEN) + b"\xff" * 6 + bytes.fromhex("525400000001") + b"\x08\x06" + bytes(46))
    tx.add([(FRAME_GPA, HDR_LEN + 60, False)])
    wait_for(lambda: tx.reap(), 10, lambda: "the service did not complete the TX chain")


@pytest.mark.kvm
def test_link_follows_the_tap_and_a_dead_service_is_link_down(tmp_path):
    """DRIVER_OK hands the pair to the service (a TX frame goes out through it); the TAP set down makes
    the service drop the next frame and the VM's NIC show link down (configuration interrupt, STATUS read
    back through GET_CONFIG); up again, the next frame brings the link up; then the service goes away:
    link down again, and the device does not need a reset."""
    from exitless.devices.virtio.constants import VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS
    from exitless.net.spec import NetSpec, add_nic
    from exitless.net.tap import create_tap
    from exitless.vm import Machine, VmConfig

    with N.netns_only() as ns:
        create_tap("exlsl0", ns, address="10.0.0.1/24")
        run = Running(tmp_path / "s.sock", "poll")
        loop = run.svc.dataplane.loop
        try:
            with Machine(VmConfig(mem_mib=64, console=lambda b: None)) as m:
                pci = add_nic(m, NetSpec("exlsl0", io="poll", netns=ns), service=run.svc.path)
                dev = pci.device
                rings = driver_ok(pci, m.mem, (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
                                  | (1 << VIRTIO_NET_F_CTRL_VQ), 3)
                wait_for(lambda: len(loop.pollables) == 3, 10, lambda: f"{len(loop.pollables)} pollables")
                tx = rings[1]
                send_frame(m.mem, tx)
                assert dev.link_up and dev.stats["tx_packets"] == 0   # the service sent it, not this model
                gen = pci.config_generation
                N.set_link(ns, "exlsl0", False)
                send_frame(m.mem, tx)                                 # EIO: dropped, link down
                wait_for(lambda: not dev.link_up, 10, lambda: "the VM's NIC still shows link up")
                assert pci.config_generation != gen                   # a configuration interrupt
                assert int.from_bytes(dev.read_config(6, 2), "little") & 1 == 0
                N.set_link(ns, "exlsl0", True)
                send_frame(m.mem, tx)                                 # written: link up again
                wait_for(lambda: dev.link_up, 10, lambda: "the VM's NIC did not come back up")
                run.stop()                                            # the service goes away
                wait_for(lambda: not dev.link_up, 10, lambda: "a NIC without its service shows link up")
                assert not pci.status & 0x40                          # link down, not DEVICE_NEEDS_RESET
                pci.common_write(0x14, 1, 0)                          # a reset and a new DRIVER_OK: still down
                driver_ok(pci, m.mem, 1 << VIRTIO_NET_F_STATUS, 3)
                assert not dev.link_up and not pci.status & 0x40
        finally:
            run.stop()


@pytest.mark.kvm
def test_vq_pairs_set_enables_the_second_pair_on_the_service(tmp_path):
    """Two pairs on a multi-queue TAP: at DRIVER_OK only pair 0 is served (§5.1.6.5.5: one pair until
    VQ_PAIRS_SET); the driver's VQ_PAIRS_SET 2 on the control queue -- answered by the VMM -- enables
    pair 1's rings on the service (SET_VRING_ENABLE), which then sends its frames; VQ_PAIRS_SET 1 takes
    it off again."""
    from exitless.devices.virtio.constants import (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                                                   VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ, VIRTIO_NET_OK)
    from exitless.net.spec import NetSpec, add_nic
    from exitless.net.tap import create_tap
    from exitless.vm import Machine, VmConfig

    with N.netns_only() as ns:
        create_tap("exlsq0", ns, queues=2, address="10.0.0.1/24")
        run = Running(tmp_path / "s.sock", "poll")
        loop = run.svc.dataplane.loop
        try:
            with Machine(VmConfig(mem_mib=64, console=lambda b: None)) as m:
                pci = add_nic(m, NetSpec("exlsq0", io="poll", queues=2, netns=ns), service=run.svc.path)
                rings = driver_ok(pci, m.mem, (1 << VIRTIO_NET_F_CTRL_VQ) | (1 << VIRTIO_NET_F_MQ), 5)
                # pair 0's two rings and both pairs' TAP pollables
                wait_for(lambda: len(loop.pollables) == 4, 10, lambda: f"{len(loop.pollables)} pollables")
                ctrl = rings[4]
                cmd, ack = 0x21_0000, 0x21_1000

                def vq_pairs_set(n: int) -> None:
                    m.mem.write(cmd, struct.pack("<BBH", VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, n))
                    m.mem.write(ack, b"\xee")
                    ctrl.add([(cmd, 4, False), (ack, 1, True)])
                    os.eventfd_write(pci.wake_fds[4], 1)               # the doorbell's ioeventfd
                    wait_for(lambda: ctrl.reap(), 10, lambda: "the VMM did not answer the control command")
                    assert m.mem.read(ack, 1)[0] == VIRTIO_NET_OK

                vq_pairs_set(2)
                wait_for(lambda: len(loop.pollables) == 6, 10, lambda: f"{len(loop.pollables)} pollables")
                send_frame(m.mem, rings[3])                           # tx1, through the service
                vq_pairs_set(1)
                wait_for(lambda: len(loop.pollables) == 4, 10, lambda: f"{len(loop.pollables)} pollables")
                assert pci.device.link_up and not pci.status & 0x40
        finally:
            run.stop()
