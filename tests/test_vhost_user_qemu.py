"""End to end: QEMU (TCG) boots Debian's cloud kernel with ``-device vhost-user-blk-pci`` served by
``exitless serve blk``; Linux's own virtio_blk driver does the I/O, the host checks the bytes.

Every back-end I/O path (kick, poll, adaptive); an ext2 file system checked by the host's
``e2fsck``; and a QEMU killed with SIGKILL in the middle of its I/O, after which the same back-end
serves a new QEMU that reads the disk correctly.  Also the CLI's error exits.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hostfs import assert_clean_with
from tests.serveproc import ServeProcess

from exitless.boot.initramfs import parse_exit_status

QEMU = shutil.which("qemu-system-x86_64")
PATTERN_BYTES = 4 << 20
SERVE = [sys.executable, "-m", "exitless.cli", "serve", "blk"]

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="session")
def guest(tmp_path_factory):
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 not installed")
    from exitless.guest import fetch_guest
    from exitless.guest.fetch import CACHE_ENV

    env = os.environ.get(CACHE_ENV)
    return fetch_guest(Path(env) if env else tmp_path_factory.getbasetemp() / "exitless-guest-cache")


@pytest.fixture(scope="session")
def pattern() -> bytes:
    return random.Random(1234).randbytes(PATTERN_BYTES)


def initrd(guest, tmp_path: Path, command: str, pattern: bytes | None = None) -> Path:
    from exitless.boot.initramfs import DEFAULT_APPLETS, build_initramfs

    path = tmp_path / f"initrd-{hashlib.sha1(command.encode()).hexdigest()[:8]}"
    extra = {"/pattern": pattern} if pattern is not None else None
    path.write_bytes(build_initramfs(guest.busybox, modules=["virtio_pci", "virtio_blk"],
                                     modules_root=guest.modules_root, command=command, extra_files=extra,
                                     applets=(*DEFAULT_APPLETS, "taskset")))
    return path


def qemu_cmd(guest, rd: Path, sock: str, mem_mib: int = 256, queues: int = 1) -> list[str]:
    return [QEMU, "-machine", "q35,memory-backend=mem", "-accel", "tcg", "-smp", str(queues), "-m", f"{mem_mib}M",
            "-object", f"memory-backend-memfd,id=mem,size={mem_mib}M,share=on",
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", str(guest.vmlinuz), "-initrd", str(rd), "-append", "console=ttyS0 panic=-1 quiet",
            "-chardev", f"socket,id=c0,path={sock}", "-device", f"vhost-user-blk-pci,chardev=c0,num-queues={queues}"]


def run_qemu(cmd: list[str], timeout: float = 120, until: bytes | None = None, kill_after: float = 0.0):
    """Run QEMU until it exits (or, with ``until``, SIGKILL it ``kill_after`` s after that console text)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    os.set_blocking(proc.stdout.fileno(), False)
    out = bytearray()
    deadline = time.monotonic() + timeout
    seen = None
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            chunk = proc.stdout.read()
            if chunk:
                out += chunk
            if until is not None and seen is None and until in out:
                seen = time.monotonic()
            if seen is not None and time.monotonic() - seen >= kill_after:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and seen is None:
            proc.kill()
        proc.wait()
        out += proc.stdout.read() or b""
    return proc.returncode, out.decode(errors="replace")


class Backend(ServeProcess):
    """``exitless serve blk`` as a child process, its log in a file."""

    def __init__(self, tmp_path: Path, disk: Path, io: str, sock: str | None = None, queues: int = 1):
        self.sock = sock or str(tmp_path / f"blk-{io}.sock")
        super().__init__("blk", ["--socket", self.sock, "--disk", str(disk), "--io", io, "--queues", str(queues)],
                         tmp_path / f"serve-{io}.log")


def make_disk(tmp_path: Path, size: int) -> Path:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(size)
    return disk


# With two queues (and two vCPUs) the write is issued from CPU 1 and the read from CPU 0, so
# Linux's blk-mq puts them on different virtqueues.
DD_TEST = (
    "cat /sys/block/vda/size\n"
    "{on1}dd if=/pattern of=/dev/vda bs=64k oflag=direct conv=fsync 2>/dev/null || exit 10\n"
    "{on0}dd if=/dev/vda bs=64k iflag=direct 2>/dev/null | sha256sum\n"
    "dd if=/pattern bs=64k 2>/dev/null | sha256sum\n"
    "grep virtio0-req /proc/interrupts\n"
)


@pytest.mark.parametrize("io,queues", [("kick", 1), ("poll", 1), ("adaptive", 2)])
def test_linux_writes_and_reads_the_whole_disk(guest, pattern, tmp_path, io, queues):
    disk = make_disk(tmp_path, PATTERN_BYTES)
    cmd = DD_TEST.format(on0="taskset 1 " if queues > 1 else "", on1="taskset 2 " if queues > 1 else "")
    rd = initrd(guest, tmp_path, cmd, pattern)
    be = Backend(tmp_path, disk, io, queues=queues)
    try:
        rc, console = run_qemu(qemu_cmd(guest, rd, be.sock, queues=queues))
        assert parse_exit_status(console) == 0, console[-3000:]
        irqs = re.findall(r"^\s*\d+:((?:\s+\d+)+)\s+PCI-MSI.*virtio0-req\.(\d+)", console, re.M)
        assert len(irqs) == queues and all(sum(map(int, counts.split())) > 0 for counts, _q in irqs), irqs
        assert re.search(rf"^{PATTERN_BYTES // 512}\s*$", console, re.M), console[-2000:]   # /sys/block/vda/size
        sums = [l.split()[0] for l in console.splitlines() if l.endswith("  -")]
        assert sums == [hashlib.sha256(pattern).hexdigest()] * 2, console[-2000:]
        assert disk.read_bytes() == pattern                       # byte for byte, on the host
        assert "insmod failed" not in console
    finally:
        assert be.stop() == 0
    log = be.text()
    assert "frontend connected" in log and "frontend disconnected" in log and "Traceback" not in log
    assert not os.path.exists(be.sock)


EXT2_TEST = (
    "mke2fs -q /dev/vda || exit 10\n"
    "mount -t ext2 /dev/vda /mnt || exit 11\n"
    "mkdir /mnt/d && cp /pattern /mnt/d/pattern || exit 12\n"
    "for i in $(seq 1 40); do echo file $i > /mnt/d/f$i; done\n"
    "sync && umount /mnt && mount -t ext2 -o ro /dev/vda /mnt || exit 13\n"
    "sha256sum /mnt/d/pattern /mnt/d/f40; cat /mnt/d/f17\n"
    "umount /mnt\n"
)


def test_ext2_made_in_the_guest_passes_host_fsck(guest, pattern, tmp_path):
    if shutil.which("e2fsck") is None or shutil.which("debugfs") is None:
        pytest.skip("e2fsprogs not installed")
    disk = make_disk(tmp_path, 16 << 20)
    rd = initrd(guest, tmp_path, EXT2_TEST, pattern)
    be = Backend(tmp_path, disk, "adaptive")
    try:
        rc, console = run_qemu(qemu_cmd(guest, rd, be.sock))
        assert parse_exit_status(console) == 0, console[-3000:]
        assert f"{hashlib.sha256(pattern).hexdigest()}  /mnt/d/pattern" in console
        assert "file 17" in console
    finally:
        assert be.stop() == 0
    assert_clean_with(disk, {"/d/pattern": pattern, "/d/f33": b"file 33\n"})


BUSY_TEST = (
    "dd if=/pattern of=/dev/vda bs=64k oflag=direct conv=fsync 2>/dev/null || exit 10\n"
    "echo WRITTEN\n"
    "while :; do\n"
    "  dd if=/dev/vda of=/dev/null bs=128k iflag=direct 2>/dev/null\n"
    "  dd if=/pattern of=/dev/vda bs=16k oflag=direct 2>/dev/null\n"
    "done\n"
)
READ_TEST = "dd if=/dev/vda bs=64k iflag=direct 2>/dev/null | sha256sum\n"


def test_sigkilled_qemu_mid_io_then_a_new_qemu_is_served(guest, pattern, tmp_path):
    disk = make_disk(tmp_path, PATTERN_BYTES)
    be = Backend(tmp_path, disk, "poll")
    try:
        rc, console = run_qemu(qemu_cmd(guest, initrd(guest, tmp_path, BUSY_TEST, pattern), be.sock),
                               until=b"WRITTEN", kill_after=1.5)
        assert rc == -signal.SIGKILL, console[-2000:]
        deadline = time.monotonic() + 10
        while be.text().count("frontend disconnected") < 1:
            assert time.monotonic() < deadline, be.text()
            time.sleep(0.05)
        assert be.proc.poll() is None, "the back-end died with its frontend"
        # the killed guest only ever rewrote the same pattern: the disk must still hold it
        rc, console = run_qemu(qemu_cmd(guest, initrd(guest, tmp_path, READ_TEST), be.sock))
        assert parse_exit_status(console) == 0, console[-3000:]
        assert f"{hashlib.sha256(pattern).hexdigest()}  -" in console, console[-2000:]
    finally:
        assert be.stop() == 0
    log = be.text()
    assert log.count("frontend connected") == 2 and "Traceback" not in log, log
    assert disk.read_bytes() == pattern


# --------------------------------------------------------------------------- CLI errors (no QEMU)
def serve_status(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(SERVE + list(args), capture_output=True, text=True, timeout=timeout)


def test_cli_refuses_a_socket_with_a_live_listener(tmp_path):
    disk = make_disk(tmp_path, 1 << 20)
    sock_path = str(tmp_path / "taken.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sock_path)
    listener.listen(1)
    try:
        r = serve_status("--socket", sock_path, "--disk", str(disk))
        assert r.returncode == 2 and "another process is listening" in r.stderr, r.stderr
        assert os.path.exists(sock_path)
    finally:
        listener.close()
    # now it is stale: it is replaced, and removed again on SIGTERM
    be = Backend(tmp_path, disk, "kick", sock=sock_path)
    assert be.stop() == 0 and not os.path.exists(sock_path)


def test_cli_refuses_a_missing_disk_and_a_non_socket_path(tmp_path):
    r = serve_status("--socket", str(tmp_path / "s.sock"), "--disk", str(tmp_path / "nope.img"))
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr
    disk = make_disk(tmp_path, 1 << 20)
    r = serve_status("--socket", str(disk), "--disk", str(disk))
    assert r.returncode == 2 and "not a socket" in r.stderr, r.stderr
    assert disk.stat().st_size == 1 << 20


def test_cli_read_only_disk_is_offered_read_only(tmp_path):
    from exitless.devices.virtio.constants import VIRTIO_BLK_F_RO
    from exitless.vhost_user.frontend import Frontend

    disk = make_disk(tmp_path, 1 << 20)
    sock = str(tmp_path / "ro.sock")
    proc = subprocess.Popen(SERVE + ["--socket", sock, "--disk", f"{disk},ro"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with Frontend.connect(sock) as fe:
            assert fe.get_features() >> VIRTIO_BLK_F_RO & 1
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0



def test_two_qemus_on_one_serve_blk_one_killed(guest, pattern, tmp_path):
    """One ``exitless serve blk`` with two --socket/--disk pairs (one shared polling loop) serves two
    QEMUs at once: the first is SIGKILLed in the middle of its writes, the second writes and reads
    back its whole disk, byte for byte; then a third QEMU reads the killed one's disk through the
    same back-end."""
    disks = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        disks.append(make_disk(tmp_path / name, PATTERN_BYTES))
    socks = [str(tmp_path / "a.sock"), str(tmp_path / "b.sock")]
    log = tmp_path / "serve.log"
    cmd = SERVE + ["--io", "adaptive"]
    for s, d in zip(socks, disks):
        cmd += ["--socket", s, "--disk", str(d)]
    with open(log, "wb") as f:
        be = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f)
    try:
        deadline = time.monotonic() + 15
        while log.read_text().count("serving") < 2:
            assert be.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        doomed = "echo go; while :; do dd if=/pattern of=/dev/vda bs=64k oflag=direct 2>/dev/null; done\n"
        victim = subprocess.Popen(qemu_cmd(guest, initrd(guest, tmp_path, doomed, pattern), socks[0]),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            rc, console = run_qemu(qemu_cmd(guest, initrd(guest, tmp_path, DD_TEST.format(on0="", on1=""), pattern),
                                            socks[1]), timeout=240)
        finally:
            victim.kill()                # mid-I/O (it writes in a loop), or already done if it failed
            victim.wait()
        assert parse_exit_status(console) == 0, console[-3000:]
        sums = [l.split()[0] for l in console.splitlines() if l.endswith("  -")]
        assert sums == [hashlib.sha256(pattern).hexdigest()] * 2, console[-2000:]
        assert disks[1].read_bytes() == pattern
        # the killed frontend's socket serves the next QEMU
        rc, console = run_qemu(qemu_cmd(guest, initrd(guest, tmp_path, "cat /sys/block/vda/size\n"), socks[0]))
        assert parse_exit_status(console) == 0 and re.search(rf"^{PATTERN_BYTES // 512}\s*$", console, re.M), \
            console[-2000:]
    finally:
        be.send_signal(signal.SIGTERM)
        assert be.wait(15) == 0
    text = log.read_text()
    assert text.count("frontend disconnected") >= 3 and "Traceback" not in text, text
