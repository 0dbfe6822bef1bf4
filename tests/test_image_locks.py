"""Two processes cannot open one image for writing: image locks (QEMU's OFD-lock protocol, shared with it).

Before, ``exitless run --disk a.img`` in two shells (or beside ``serve blk --disk a.img``, or beside a
QEMU using a.img) opened the image twice for writing without a word, and the two guests' caches
corrupted it.  Every backing file a device opens itself takes the locks of
:mod:`exitless.devices.imagelock`: a writer excludes every other user, readers coexist, and
exitless and QEMU see each other's locks.  The error is one line naming the holder.
"""
from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from exitless.devices.hostio import BackingError
from exitless.devices.imagelock import lock_holders
from exitless.devices.nvme.namespace import Namespace
from exitless.devices.virtio.blk import VirtioBlk
from exitless.errors import ExitlessError

from serveproc import ServeProcess

ROOT = Path(__file__).resolve().parents[1]


class ImageUsers(RuleBasedStateMachine):
    """Devices (virtio-blk or NVMe, read-only or not, direct or not) open and close two images in any
    order; each open file description is a separate lock owner, as another process would be.  An open
    succeeds exactly when no writer holds the image and, for a writer, nobody holds it."""

    opened = Bundle("opened")

    def __init__(self):
        super().__init__()
        import tempfile
        self.dir = tempfile.TemporaryDirectory()
        self.paths = []
        for i in range(2):
            p = os.path.join(self.dir.name, f"img{i}.img")
            with open(p, "wb") as f:
                f.truncate(64 * 1024)
            self.paths.append(p)
        self.users: dict[int, list[bool]] = {0: [], 1: []}       # image -> read_only of each open device
        self.devices: list = []

    @rule(target=opened, image=st.integers(0, 1), read_only=st.booleans(), nvme=st.booleans(),
          direct=st.booleans())
    def open(self, image, read_only, nvme, direct):
        holders = self.users[image]
        allowed = not any(not ro for ro in holders) and (read_only or not holders)
        try:
            dev = (Namespace(self.paths[image], read_only=read_only, direct=direct) if nvme else
                   VirtioBlk(self.paths[image], read_only=read_only, direct=direct))
        except BackingError as e:
            assert isinstance(e, ExitlessError)
            if direct and "O_DIRECT" in str(e):       # a file system without O_DIRECT (tmpfs)
                return None
            assert not allowed, f"refused although allowed: {e}"
            assert "locked by this process" in str(e) and e.filename == self.paths[image], str(e)
            return None
        assert allowed, f"image {image} opened {'ro' if read_only else 'rw'} beside {holders}"
        holders.append(read_only)
        self.devices.append(dev)
        return (image, read_only, dev)

    @rule(entry=consumes(opened))
    def close(self, entry):
        if entry is None:
            return
        image, read_only, dev = entry
        dev.close()
        self.devices.remove(dev)
        self.users[image].remove(read_only)

    @invariant()
    def held_exactly_while_open(self):
        """Byte 100 (consistent read) is locked by someone else exactly while a device has the image."""
        for image, holders in self.users.items():
            fd = os.open(self.paths[image], os.O_RDONLY | os.O_CLOEXEC)
            try:
                probe = struct.pack("hhxxxxqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, 100, 1, 0)
                locked = struct.unpack("hhxxxxqqixxxx", fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))[0] != fcntl.F_UNLCK
                assert locked == bool(holders)
            finally:
                os.close(fd)

    def teardown(self):
        for dev in self.devices:
            dev.close()
        self.dir.cleanup()


ImageUsers.TestCase.settings = settings(max_examples=60, stateful_step_count=12, deadline=None)
TestImageUsers = ImageUsers.TestCase


def _exitless(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exitless", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_serve_blk_refuses_an_image_another_serve_blk_writes(tmp_path) -> None:
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    first = ServeProcess("blk", ["--socket", str(tmp_path / "a.sock"), "--disk", str(img)], tmp_path / "a.log")
    try:
        for spec in (str(img), f"{img},ro"):
            r = _exitless("serve", "blk", "--socket", str(tmp_path / "b.sock"), "--disk", spec)
            assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
            assert f"locked by pid {first.proc.pid} (python" in r.stderr, r.stderr
            assert not (tmp_path / "b.sock").exists()
    finally:
        assert first.stop() == 0
    # once the holder is gone the image is free again
    r = subprocess.run([sys.executable, "-c", "import sys; from exitless.devices.virtio.blk import VirtioBlk; "
                        "VirtioBlk(sys.argv[1]).close()", str(img)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_readers_share_an_image_across_processes(tmp_path) -> None:
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    first = ServeProcess("blk", ["--socket", str(tmp_path / "a.sock"), "--disk", f"{img},ro"], tmp_path / "a.log")
    try:
        second = ServeProcess("blk", ["--socket", str(tmp_path / "b.sock"), "--disk", f"{img},ro"],
                              tmp_path / "b.log")
        assert second.stop() == 0
    finally:
        assert first.stop() == 0


@pytest.mark.kvm
def test_run_refuses_a_disk_or_nvme_served_elsewhere(tmp_path) -> None:
    from exitless.guestkit import guestkit_path

    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    first = ServeProcess("blk", ["--socket", str(tmp_path / "a.sock"), "--disk", str(img)], tmp_path / "a.log")
    try:
        for opt in ("--disk", "--nvme"):
            r = _exitless("run", "--kernel", str(guestkit_path()), "--append", "info", opt, f"{img},ro")
            assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
            assert f"locked by pid {first.proc.pid}" in r.stderr and "read-only" in r.stderr, r.stderr
    finally:
        assert first.stop() == 0


@pytest.mark.kvm
def test_a_sidecore_service_holds_the_lock_of_the_disks_it_serves(tmp_path) -> None:
    """The lock travels with the fd handed to ``exitless sidecore``: the image stays locked while the service
    still has it, and is free once the VM is gone and the service has detached it."""
    from exitless.guestkit import guestkit_path

    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    sock = tmp_path / "sc.sock"
    service = ServeProcess(None, ["--socket", str(sock), "--no-confine"], tmp_path / "sc.log",
                           command=("sidecore",))
    try:
        vm = subprocess.Popen([sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()),
                               "--sidecore", str(sock), "--disk", f"{img},io=poll", "--append",
                               "blk rw=randread bs=4096 qd=1 ms=60000"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, cwd=ROOT)
        try:
            deadline = time.monotonic() + 120
            while "serves its disk" not in service.text():
                assert vm.poll() is None and time.monotonic() < deadline, service.text()
                time.sleep(0.1)
            r = _exitless("serve", "blk", "--socket", str(tmp_path / "b.sock"), "--disk", f"{img},ro")
            assert r.returncode == 2 and "locked by pid" in r.stderr, r.stderr      # the VMM, the service or both
            vm.kill()
            vm.wait()
            fd = os.open(img, os.O_RDONLY | os.O_CLOEXEC)
            try:
                deadline = time.monotonic() + 30
                while lock_holders(fd):
                    assert f"pid {service.proc.pid}" in lock_holders(fd)[0]
                    assert time.monotonic() < deadline, f"the service still locks the image: {service.text()}"
                    time.sleep(0.2)
            finally:
                os.close(fd)
        finally:
            if vm.poll() is None:
                vm.kill()
            vm.wait()
            vm.stderr.close()
    finally:
        assert service.stop() == 0
    r = _exitless("run", "--kernel", str(guestkit_path()), "--append", "info", "--disk", str(img))
    assert r.returncode == 0, r.stderr


@pytest.mark.qemu
def test_exitless_and_qemu_see_each_others_image_locks(tmp_path) -> None:
    import shutil

    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("no qemu-system-x86_64")
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))

    def start_qemu(ro: bool) -> subprocess.Popen:
        return subprocess.Popen([qemu, "-S", "-display", "none", "-nodefaults", "-machine", "accel=tcg",
                                 "-drive", f"file={img},format=raw,if=none,id=d0{',readonly=on' if ro else ''}",
                                 "-device", "virtio-blk-pci,drive=d0"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    probe = os.open(img, os.O_RDONLY | os.O_CLOEXEC)
    q = start_qemu(ro=False)
    try:
        deadline = time.monotonic() + 60
        while not lock_holders(probe):
            assert q.poll() is None and time.monotonic() < deadline, q.stderr.read()
            time.sleep(0.1)
        r = _exitless("serve", "blk", "--socket", str(tmp_path / "b.sock"), "--disk", f"{img},ro")
        assert r.returncode == 2 and f"locked by pid {q.pid} (qemu-system-x86_64)" in r.stderr, r.stderr
    finally:
        q.kill()
        q.wait()
        q.stderr.close()
        os.close(probe)
    served = ServeProcess("blk", ["--socket", str(tmp_path / "a.sock"), "--disk", str(img)], tmp_path / "a.log")
    try:
        q = start_qemu(ro=True)
        try:
            assert q.wait(60) != 0
            assert "lock" in q.stderr.read()
        finally:
            if q.poll() is None:
                q.kill()
                q.wait()
            q.stderr.close()
    finally:
        assert served.stop() == 0


def test_lock_off_is_serve_blks_alone(tmp_path) -> None:
    """``lock=off`` (back-ends kept up side by side that take turns on one image, ``bench vhost``): a
    ``serve blk`` so started opens an image another process writes; ``run --disk`` does not take it."""
    from exitless.disk import DiskSpec, DiskSpecError

    assert DiskSpec.parse("a.img,lock=off", ("ro", "direct", "lock")).lock is False
    assert DiskSpec.parse("a.img,lock=off", ("ro", "direct", "lock")).format() == "a.img,lock=off"
    for bad, why in (("a.img,lock=on", "lock takes only off"), ("a.img,lock", "lock takes only off")):
        with pytest.raises(DiskSpecError, match=why):
            DiskSpec.parse(bad, ("ro", "direct", "lock"))
    with pytest.raises(DiskSpecError, match="not accepted here"):
        DiskSpec.parse("a.img,lock=off")
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    first = ServeProcess("blk", ["--socket", str(tmp_path / "a.sock"), "--disk", str(img)], tmp_path / "a.log")
    try:
        second = ServeProcess("blk", ["--socket", str(tmp_path / "b.sock"), "--disk", f"{img},lock=off"],
                              tmp_path / "b.log")
        assert second.stop() == 0
    finally:
        assert first.stop() == 0


def test_a_file_system_without_ofd_locks_opens_unlocked_with_a_warning(tmp_path, monkeypatch, caplog) -> None:
    """As QEMU does: a file system that keeps no OFD locks (ENOLCK, EINVAL: some network file systems)
    is no reason to refuse the disk, but the user is told that it is unprotected."""
    import errno as E

    import exitless.devices.imagelock as imagelock

    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 16))
    real = imagelock.fcntl.fcntl

    def no_locks(fd, cmd, arg=0):
        if cmd in (fcntl.F_OFD_SETLK, fcntl.F_OFD_GETLK):
            raise OSError(E.ENOLCK, os.strerror(E.ENOLCK))
        return real(fd, cmd, arg)

    monkeypatch.setattr(imagelock.fcntl, "fcntl", no_locks)
    with caplog.at_level("WARNING", logger="exitless.devices.imagelock"):
        dev = VirtioBlk(img)
    try:
        assert "keeps no OFD locks" in caplog.text and "not locked" in caplog.text
    finally:
        dev.close()


def test_handed_over_fds_take_the_lock_too(tmp_path) -> None:
    """``exitless sidecore`` builds a disk from fds a VM hands it.  The VM's exitless locked them (the
    lock is the open file description's, so the service's copy holds it already); an fd opened without
    the lock -- another VMM, a hostile peer -- is locked by the service, and refused if another process
    uses the image."""
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 16))
    holder = VirtioBlk(img)                     # as another VM would
    try:
        fd = os.open(img, os.O_RDWR | os.O_CLOEXEC)
        with pytest.raises(BackingError, match="locked by this process"):
            VirtioBlk("vm#1's disk", fds=(fd, -1))       # owns fd from here on, even when it raises
        served = VirtioBlk("vm#2's disk", fds=(os.dup(holder.fd), -1), read_only=False)
        served.close()                                   # the same open file description: its own lock
    finally:
        holder.close()
    fd = os.open(img, os.O_RDWR | os.O_CLOEXEC)
    served = VirtioBlk("vm#3's disk", fds=(fd, -1))
    try:
        with pytest.raises(BackingError, match="locked by this process"):
            VirtioBlk(img, read_only=True)
    finally:
        served.close()
