"""virtio-net end to end with the guest kit's own driver (`net` app): exitless's VMM on real KVM under
every I/O path, with a TAP in a network namespace the test creates; the namespace's kernel is the
responder (ARP, ICMP echo).  The same ELF under QEMU's virtio-net-pci with ``-netdev tap,vhost=off``
(QEMU's own device model) and with ``-netdev vhost-user`` served by ``exitless serve net``.

Addresses are 10.0.0.0/24 inside the namespace; nothing outside it is touched.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from exitless.guestkit import guestkit_path
from exitless.net.spec import NetSpec, NetSpecError, add_nic
from exitless.vm import Machine, VmConfig

try:
    import netns as N
except ImportError:  # pragma: no cover - tests/ as a package
    from tests import netns as N

pytestmark = pytest.mark.skipif(N.can_make_netns() is not None, reason=N.can_make_netns() or "")
QEMU = shutil.which("qemu-system-x86_64")
TAP = "exlgk0"
TAP_MQ = "exlgk1"


@pytest.fixture(scope="module")
def ns():
    with N.netns_with_tap(TAP) as name:
        yield name


def run_exitless(ns: str, app: str, path: str, timeout: float = 120):
    out = bytearray()
    with Machine(VmConfig(mem_mib=128, console=out.extend)) as m:
        nic = add_nic(m, NetSpec(TAP, io=path, netns=ns))
        m.boot_pvh(guestkit_path(), app)
        exit = m.run(timeout=timeout)
        stats = dict(nic.device.stats)
    lines = [x for x in out.decode(errors="replace").splitlines() if x.startswith('{"app":')]
    assert lines, out.decode(errors="replace")[-2000:]
    return exit, json.loads(lines[-1]), stats


@pytest.mark.kvm
@pytest.mark.parametrize("path", ["trap", "ioeventfd", "shared", "poll", "adaptive"])
def test_guestkit_ping_pong_and_flood_on_every_path(ns, path):
    n = 200
    exit, res, stats = run_exitless(ns, f"net test=rr n={n} size=100", path)
    assert exit.kind == "debug-exit" and exit.status == 0, (exit, res)
    assert res["ops"] == n and res["errors"] == 0 and res["timeouts"] == 0
    assert res["bad_num_buffers"] == 0 and res["link_up"] == 1 and res["mrg_rxbuf"] == 1
    assert stats["tx_packets"] >= n and stats["rx_packets"] >= n and stats["tx_bad"] == 0
    if path == "poll":
        assert res["notifies"] == 0        # the driver never had to ring: notifications suppressed
    exit, res, _ = run_exitless(ns, "net test=flood n=2000 qd=16 size=64 max_timeouts=0", path)
    assert exit.status == 0 and res["ops"] == 2000 and res["errors"] == 0, res


@pytest.fixture(scope="module")
def ns_mq():
    """A second namespace with a two-queue TAP (10.0.1.1): a second NIC's, with MQ offered."""
    with N.netns_with_tap(TAP_MQ, queues=2, address="10.0.1.1/24") as name:
        yield name


@pytest.mark.kvm
@pytest.mark.parametrize("path", ["poll", "adaptive"])
def test_two_nics_one_with_two_pairs_on_one_sidecore(ns, ns_mq, path):
    """Two NICs -- the second with two queue pairs (MQ) -- on one shared sidecore: the guest kit drives each
    in turn (``index=``; on the second, its pair 1: MQ negotiated, VQ_PAIRS_SET 2 on the control queue),
    and each NIC's pair is served by the one loop's C round (its ``c_slices``), whichever NIC and pair."""
    from exitless.net.spec import add_nics

    for index, ip, pair in ((1, "10.0.1", 1), (0, "10.0.0", 0)):
        out = bytearray()
        with Machine(VmConfig(mem_mib=128, console=out.extend)) as m:
            groups: dict = {}
            nics = add_nics(m, [NetSpec(TAP, io=path, netns=ns), NetSpec(TAP_MQ, io=path, netns=ns_mq, queues=2)],
                            groups=groups)
            assert len(groups) == 1 and all(nic.sidecore is None for nic in nics)   # one loop serves both
            for group in groups.values():
                group.start_on(m)
            m.boot_pvh(guestkit_path(), f"net test=rr n=200 index={index} pair={pair} ip={ip}.2 peer={ip}.1")
            exit = m.run(timeout=120)
            stats = [dict(nic.device.stats) for nic in nics]
        lines = [x for x in out.decode(errors="replace").splitlines() if x.startswith('{"app":')]
        assert lines, out.decode(errors="replace")[-2000:]
        res = json.loads(lines[-1])
        assert exit.kind == "debug-exit" and exit.status == 0, (exit, res)
        assert res["ops"] == 200 and res["errors"] == 0 and res["timeouts"] == 0 and res["pair"] == pair, res
        used, idle = stats[index], stats[1 - index]
        assert used["ctrl_ok"] == (1 if pair else 0), used
        assert used["tx_packets"] >= 200 and used["rx_packets"] >= 200 and idle["tx_packets"] == 0, stats
        assert used["c_slices"] > 0, stats


@pytest.mark.kvm
@pytest.mark.parametrize("path", ["trap", "ioeventfd", "shared", "poll", "adaptive"])
def test_intx_without_msix_on_every_path(ns, path):
    """MSI-X off: the function's INTx line (IOAPIC, level-triggered) wakes the guest (hlt) for each reply,
    and its ISR read (read-to-clear) drops the line.  This once deadlocked the vCPU: raising INTx took the
    transport lock while the RX lock was held, the vCPU's RX kick the other way round."""
    n = 100
    exit, res, stats = run_exitless(ns, f"net test=rr n={n} intx=1", path, timeout=60)
    assert exit.kind == "debug-exit" and exit.status == 0, (exit, res)
    assert res["ops"] == n and res["errors"] == 0 and res["timeouts"] == 0, res
    # every reply was announced by an interrupt whose ISR read had the queue bit (a lost INTx would leave
    # the guest to its 10 ms watchdog tick instead)
    assert res["isr_queue"] >= n, res
    # the line drops once the ISR is read: no interrupt storm.  (KVM delivers each assertion at most
    # twice here: see the note in guestkit/src/net.c)
    assert res["intx_irqs"] <= 2 * res["rx_frames"] + 8, res
    assert stats["rx_packets"] >= n and stats["tx_packets"] >= n


@pytest.mark.kvm
def test_guestkit_tx_only_and_no_mrg(ns):
    exit, res, stats = run_exitless(ns, "net test=tx n=3000 size=1514", "adaptive")
    assert exit.status == 0 and res["ops"] == 3000, res
    assert stats["tx_packets"] >= 3000 and stats["tx_bytes"] >= 3000 * 1514
    # 64 KiB TCP frames with a GSO header: HOST_TSO4 passes them to the TAP, which segments them
    exit, res, stats = run_exitless(ns, "net test=tx n=300 tso=1", "poll")
    assert exit.status == 0 and res["ops"] == 300 and res["tso"] == 1, res
    assert stats["tx_gso"] >= 300 and stats["tx_bad"] == 0, stats
    # without MRG_RXBUF every 2 KiB buffer still gets num_buffers = 1
    exit, res, _ = run_exitless(ns, "net test=rr n=50 mrg=0 event_idx=0", "ioeventfd")
    assert exit.status == 0 and res["mrg_rxbuf"] == 0 and res["bad_num_buffers"] == 0, res


def test_net_spec_parsing():
    s = NetSpec.parse("tap=tap0,mac=52:54:00:00:00:01,io=poll,queues=2,netns=x")
    assert (s.tap, s.mac, s.io, s.queues, s.netns) == ("tap0", bytes.fromhex("525400000001"), "poll", 2, "x")
    assert NetSpec.parse("tap=t").io == "ioeventfd"
    for bad in ("", "tap=", "mac=52:54:00:00:00:01", "tap=t,io=warp", "tap=t,queues=0", "tap=t,queues=17",
                "tap=t,mac=01:00:00:00:00:00", "tap=t,tap=u", "tap=t,color=red", "tap=" + "x" * 16, "tap=t,ro"):
        with pytest.raises(NetSpecError):
            NetSpec.parse(bad)


# ---------------------------------------------------------------------------
# the same ELF under QEMU
# ---------------------------------------------------------------------------
def run_qemu(ns: str | None, netdev: list[str], app: str, *, mem_backend: bool = False, timeout: float = 120):
    cmd = [QEMU, "-machine", "q35" + (",memory-backend=mem" if mem_backend else ""), "-accel", "tcg",
           "-m", "256", "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
           "-nodefaults", "-kernel", str(guestkit_path()), "-append", app,
           "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", *netdev]
    if mem_backend:
        cmd += ["-object", "memory-backend-memfd,id=mem,size=256M,share=on"]
    if ns is not None:
        cmd = ["ip", "netns", "exec", ns] + cmd
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    out = p.stdout.decode(errors="replace").replace("\r", "") + p.stderr.decode(errors="replace")
    lines = [x for x in out.splitlines() if x.startswith('{"app":')]
    assert lines, out[-2000:]
    return (p.returncode >> 1 if p.returncode & 1 else None), json.loads(lines[-1])


@pytest.mark.qemu
def test_same_elf_under_qemu_tap(ns):
    if QEMU is None or shutil.which("ip") is None:
        pytest.skip("qemu-system-x86_64 or ip not installed")
    status, res = run_qemu(ns, ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
                                "-device", "virtio-net-pci,netdev=n0,disable-legacy=on,romfile="],
                           "net test=rr n=100 size=100")
    assert status == 0 and res["ops"] == 100 and res["bad_num_buffers"] == 0, res


@pytest.mark.qemu
def test_same_elf_under_qemu_with_exitless_vhost_user(ns, tmp_path):
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 not installed")
    sock = str(tmp_path / "gk-net.sock")
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        be = subprocess.Popen([sys.executable, "-m", "exitless.cli", "serve", "net", "--socket", sock, "--tap", TAP,
                               "--netns", ns, "--io", "poll"], stdout=subprocess.DEVNULL, stderr=f)
    try:
        deadline = time.monotonic() + 15
        while "serving" not in log.read_text():
            assert be.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        # vectors=0: see tests/test_vhost_user_net_qemu.py (QEMU 7.2 TCG + vhost-user-net + MSI-X).
        # Two QEMUs one after the other: the second session finds the device (and its TAP) ready again.
        for app in ("net test=rr n=100 size=100", "net test=flood n=500 qd=8"):
            status, res = run_qemu(None, ["-chardev", f"socket,id=c0,path={sock}",
                                          "-netdev", "vhost-user,id=n0,chardev=c0",
                                          "-device", "virtio-net-pci,netdev=n0,disable-legacy=on,vectors=0,romfile="],
                                   app, mem_backend=True)
            assert status == 0 and res["errors"] == 0 and res["bad_num_buffers"] == 0, res
            assert res["ops"] == (100 if "rr" in app else 500), res
    finally:
        be.terminate()
        assert be.wait(15) == 0
    assert "Traceback" not in log.read_text()


@pytest.mark.kvm
def test_cli_run_with_net(ns):
    """``exitless run --kernel guestkit.elf --net tap=…,netns=…,io=…``: the guest's status is run's."""
    cmd = [sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()), "--mem", "128M",
           "--append", "net test=rr n=20", "--net", f"tap={TAP},netns={ns},io=poll"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads([x for x in p.stdout.splitlines() if x.startswith('{"app":')][-1])
    assert res["ops"] == 20 and res["notifies"] == 0


@pytest.mark.kvm
def test_cli_net_errors(tmp_path):
    run = [sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()), "--append", "net"]
    p = subprocess.run(run + ["--net", "tap=x,io=warp"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "io='warp'" in p.stderr
    p = subprocess.run(run + ["--net", "tap=exlnone0,netns=exl-no-such-ns"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "network namespace 'exl-no-such-ns'" in p.stderr and "Traceback" not in p.stderr
    serve = [sys.executable, "-m", "exitless", "serve", "net", "--socket", str(tmp_path / "s.sock")]
    p = subprocess.run(serve + ["--tap", "exlnone0", "--netns", "exl-no-such-ns"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "network namespace" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run(serve + ["--tap", "t", "--mac", "01:00:00:00:00:00"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "multicast" in p.stderr


@pytest.mark.kvm
@pytest.mark.qemu
def test_bench_net_json_on_stdout():
    """``exitless bench net`` at a tiny size, exitless and QEMU rows over 2 rounds (structure only)."""
    from exitless.bench import net as B
    from exitless.bench.options import NET_TESTS

    assert tuple(t.name for t in B.TESTS) == NET_TESTS           # the CLI's choices are the bench's tests
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 not installed")
    r = subprocess.run([sys.executable, "-m", "exitless", "bench", "net", "--tests", "rr-64", "tx-64", "--paths",
                        "poll", "--scale", "0.01", "--rounds", "2", "--no-vhost", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)
    assert [(x["vmm"], x["path"], x["test"]) for x in rows] == [
        ("exitless", "poll", "rr-64"), ("qemu", "tap", "rr-64"), ("exitless", "poll", "tx-64"), ("qemu", "tap", "tx-64")]
    for x in rows:
        assert x["rounds"] == 2 and len(x["per_round"]["pps"]) == 2 and x["errors"] == 0 and x["pps"] > 0
    assert rows[0]["p50_us"] > 0 and "vhost=off" in rows[1]["note"]
    assert "rr64_p50_exitless_over_qemu" in r.stderr
    # exitless's vCPU and sidecore pinned to two CPUs by default, QEMU's vCPU and other threads the same way
    cpus = sorted(os.sched_getaffinity(0))
    want = {"vcpu": cpus[0], "sidecore": cpus[1]} if len(cpus) >= 2 else None
    want_qemu = {"vcpu": cpus[0], "other_threads": cpus[1]} if len(cpus) >= 2 else None
    assert [x.get("pinned", "absent") for x in rows] == [want, want_qemu, want, want_qemu]
    assert ("vCPU on CPU" in r.stderr) == (want is not None)
