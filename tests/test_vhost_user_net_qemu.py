"""End to end: QEMU (TCG) boots Debian's cloud kernel with ``-netdev vhost-user`` served by
``exitless serve net`` on a TAP in a network namespace the test creates.  Linux's own virtio_net
brings eth0 up, pings the namespace's kernel (10.0.0.1) and moves 16 MiB over TCP each way to a
responder listening inside the namespace; both ends compare MD5 sums.  Under kick, poll and adaptive.

Nothing outside the test's namespace is touched: the TAP, its address and the responder's sockets
all live in it, and it is deleted afterwards.
"""
from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import pytest

from tests.serveproc import ServeProcess

from exitless.boot.initramfs import parse_exit_status

try:
    import netns as N
    from test_vhost_user_qemu import QEMU, guest, run_qemu  # noqa: F401  (guest is a fixture)
except ImportError:  # pragma: no cover - tests/ as a package
    from tests import netns as N
    from tests.test_vhost_user_qemu import QEMU, guest, run_qemu  # noqa: F401

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(N.can_make_netns() is not None, reason=N.can_make_netns() or "")]

BYTES = 16 << 20
UP_PORT, DOWN_PORT = 5001, 5002
GUEST_MAC = "52:54:00:c0:ff:ee"

NET_TEST = (
    "ip link set lo up; ip link set eth0 up; ip addr add 10.0.0.2/24 dev eth0\n"
    "cat /sys/class/net/eth0/address\n"
    "ping -c 3 -W 10 10.0.0.1 || exit 10\n"
    f"dd if=/dev/urandom of=/tmp/up bs=1M count={BYTES >> 20} 2>/dev/null\n"
    "echo UP $(md5sum < /tmp/up)\n"
    f"nc 10.0.0.1 {UP_PORT} < /tmp/up > /tmp/up.ack || exit 11\n"
    "echo ACK $(cat /tmp/up.ack)\n"
    f"echo DOWN $(nc 10.0.0.1 {DOWN_PORT} < /dev/null | md5sum)\n"
    "echo QUEUES $(ls /sys/class/net/eth0/queues/)\n"
)


class NetBackend(ServeProcess):
    """``exitless serve net`` as a child process, its log in a file."""

    def __init__(self, tmp_path: Path, ns: str, tap: str, io: str, queues: int = 1):
        self.sock = str(tmp_path / f"net-{io}.sock")
        super().__init__("net", ["--socket", self.sock, "--tap", tap, "--netns", ns, "--io", io,
                                 "--queues", str(queues)], tmp_path / f"serve-net-{io}.log")


@pytest.fixture(scope="module")
def net_initrd(guest, tmp_path_factory):
    from exitless.boot.initramfs import DEFAULT_APPLETS, build_initramfs

    path = tmp_path_factory.mktemp("net") / "initrd-net"
    path.write_bytes(build_initramfs(guest.busybox, modules=["virtio_pci", "virtio_net"],
                                     modules_root=guest.modules_root, command=NET_TEST,
                                     applets=(*DEFAULT_APPLETS, "ping", "nc")))
    return path


def qemu_net_cmd(guest, rd: Path, sock: str, mem_mib: int = 256, queues: int = 1) -> list[str]:
    mq = f",queues={queues}" if queues > 1 else ""
    return [QEMU, "-machine", "q35,memory-backend=mem", "-accel", "tcg", "-smp", str(queues), "-m", f"{mem_mib}M",
            "-object", f"memory-backend-memfd,id=mem,size={mem_mib}M,share=on",
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", str(guest.vmlinuz), "-initrd", str(rd), "-append", "console=ttyS0 panic=-1 quiet",
            "-chardev", f"socket,id=c0,path={sock}", "-netdev", f"vhost-user,id=n0,chardev=c0{mq}",
            # vectors=0 (INTx): QEMU 7.2 under TCG dereferences its NULL irqfd table when a vhost-user
            # net device unmasks an MSI-X vector (vhost_net_start turns guest notifier masking off for
            # vhost-user; kvm_virtio_pci_irqfd_use then runs without KVM) and segfaults at 0x28.
            # romfile= keeps iPXE's option ROM out of the boot.
            "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC},vectors=0,romfile=" + (",mq=on" if mq else "")]


# kick and adaptive with two queue pairs (two vCPUs, a multi-queue TAP): Linux's virtio_net uses MQ, and
# adaptive serves both pairs in one C round while busy.  (Not with a back-end that never stops polling:
# two TCG vCPUs and a spinning back-end on a loaded 2-core host starve the guest into RCU stalls.)
@pytest.mark.parametrize("io,queues", [("kick", 2), ("poll", 1), ("adaptive", 1), ("adaptive", 2)])
def test_linux_virtio_net_pings_and_moves_16_mib_each_way(guest, net_initrd, tmp_path, io, queues):
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 not installed")
    down = random.Random(7).randbytes(BYTES)
    with N.netns_with_tap("exlnet0", queues=queues) as ns:
        responder = N.TcpResponder(ns, down, up_port=UP_PORT, down_port=DOWN_PORT)
        be = NetBackend(tmp_path, ns, "exlnet0", io, queues)
        try:
            rc, console = run_qemu(qemu_net_cmd(guest, net_initrd, be.sock, queues=queues), timeout=240)
            assert parse_exit_status(console) == 0, console[-3000:]
        finally:
            assert be.stop() == 0
            responder.close()
        assert GUEST_MAC in console
        assert "QUEUES " + " ".join([f"rx-{i}" for i in range(queues)] + [f"tx-{i}" for i in range(queues)]) \
            in console, console[-2000:]
        assert re.search(r"3 packets transmitted, 3 packets received", console), console[-3000:]
        up = re.search(r"^UP ([0-9a-f]{32})", console, re.M)
        assert up and responder.received_md5 == up.group(1), (responder.errors, console[-2000:])
        assert f"ACK {up.group(1)}" in console
        assert re.search(rf"^DOWN {hashlib.md5(down).hexdigest()}", console, re.M), (responder.errors,
                                                                                      console[-2000:])
        assert not responder.errors
        log = be.text()
        assert "frontend connected" in log and "Traceback" not in log, log[-3000:]
        assert "confined (seccomp)" in log, log[:2000]      # Linux's traffic went through the filtered back-end
        stats = dict(re.findall(r"(\w+) (\d+)", log.rsplit("vhost-user-net: ", 1)[-1]))
        assert int(stats["rx_packets"]) > 100 and int(stats["tx_packets"]) > 100, log[-1000:]
        assert int(stats["tx_bad"]) == 0, log[-1000:]
        # TSO both ways: Linux sent GSO frames (HOST_TSO) and the TAP delivered GSO frames (GUEST_TSO)
        assert int(stats["tx_gso"]) > 0 and int(stats["rx_gso"]) > 0, log[-1000:]
        # poll and adaptive serve the pair in the sidecore's C round (Python once per slice, the call fd
        # written from C); kick never does
        if io == "kick":
            assert int(stats["c_slices"]) == 0, log[-1000:]
        else:
            assert int(stats["c_slices"]) > 0, log[-1000:]
