"""``exitless sidecore`` serving real KVM guests (issue 12 items 2 and 6).

Three guest-kit VMs -- separate ``python3 -m exitless run … --sidecore PATH`` processes, on the
``shared``, ``poll`` and ``adaptive`` paths -- on one confined service: one is SIGKILLed mid-I/O,
the other two fill their disks and verify them (in the guest and byte for byte on the host), and
once every VM has gone the service is back to the fds and threads it had when it started serving.
Linux's own virtio_blk mounts, reads and writes ext4 on two disks the service serves (a slow boot on
kvm_pvm), and the VM side is driven register by register for device reset and a service that dies.
"""
from __future__ import annotations

import contextlib
import json
import struct
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from exitless import confine
from exitless.bench.soak import lost_sectors_of
from exitless.guestkit import guestkit_path

try:
    from hostfs import assert_clean_with, make_ext4, require_e2fsprogs
    from serveproc import ServeProcess
except ImportError:  # run from the repository root as a package
    from tests.hostfs import assert_clean_with, make_ext4, require_e2fsprogs
    from tests.serveproc import ServeProcess

pytestmark = pytest.mark.kvm
DISK_BYTES = 16 << 20


class Vm:
    """``python3 -m exitless run`` of the guest kit with one disk on the service; stdout collected.
    ``device``: its option (``--nvme``: an NVMe controller, ``options`` after its path); ``devices``: other
    device options instead (``["--net", "tap=…,io=poll"]``); ``probed``: the guest kit's line(s) once its
    driver found the device."""

    def __init__(self, image: Path | None, io: str, app: str, sock: Path, timeout: int = 180, *,
                 device: str = "--disk", options: str = "", devices: list[str] | None = None,
                 probed: str | tuple[str, ...] = ("guestkit: virtio-blk", "guestkit: nvme")):
        devices = devices if devices is not None else [device, f"{image},io={io}{options}"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()), "--mem", "64M",
             *devices, "--sidecore", str(sock), "--timeout", str(timeout), "--append", app],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.probe_line = probed
        self.lines: list[str] = []
        self.probed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if line.startswith(self.probe_line):    # the driver found the device: I/O starts now
                self.probed.set()

    def wait_probed(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.probed.wait(0.1):
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()

    def result(self, timeout: float = 180) -> dict:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        out = [x for x in self.lines if x.startswith('{"app":')]
        assert rc == 0 and out, self.output()
        return json.loads(out[-1])

    def output(self) -> str:
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
        return "".join(self.lines)[-2000:] + err[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def counts(pid: int) -> tuple[int, int]:
    """(open fds, threads) of process ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what()
        time.sleep(0.1)


def images(tmp_path: Path, names, nbytes: int) -> list[Path]:
    """Empty (sparse) images ``tmp_path/NAME.img`` of ``nbytes`` each."""
    out = []
    for name in names:
        p = tmp_path / f"{name}.img"
        with open(p, "wb") as f:
            f.truncate(nbytes)
        out.append(p)
    return out


@contextlib.contextmanager
def confined_service(tmp_path: Path, mode: str):
    """An ``exitless sidecore --mode MODE`` process for a test's VMs: yields ``(service, socket path, vms)``
    (append every :class:`Vm` started to ``vms``: they are killed on the way out).  On the way out it checks
    that the service stops cleanly (exit 0), logged no traceback, seccomp kill or refusal, and removed its
    socket although confined."""
    sock = tmp_path / "sidecore.sock"
    svc = ServeProcess(None, ["--socket", str(sock), "--mode", mode], tmp_path / "sidecore.log", command=("sidecore",))
    vms: list[Vm] = []
    try:
        assert "confined (seccomp)" in svc.text()
        yield svc, sock, vms
    finally:
        for vm in vms:
            vm.kill()
        rc = svc.stop()
    log = svc.text()
    assert rc == 0, log
    assert "Traceback" not in log and "SIGSYS" not in log and "internal error" not in log, log
    assert "): refused" not in log, log
    assert not sock.exists()


@pytest.mark.skipif(not confine.status()[0], reason=confine.status()[1])
@pytest.mark.parametrize("mode", ["poll", "adaptive"])
def test_three_vms_on_one_service_one_killed_mid_io(tmp_path, mode):
    a_img, b_img, v_img = images(tmp_path, ("a", "b", "victim"), DISK_BYTES)
    with confined_service(tmp_path, mode) as (svc, sock, vms):
        base = counts(svc.proc.pid)
        # the victim writes for a long time on the shared path; a and b fill their disks meanwhile
        victim = Vm(v_img, "shared", "blk rw=randwrite bs=4096 qd=16 ms=60000 seed=3", sock)
        vms.append(victim)
        victim.wait_probed()
        a = Vm(a_img, "poll", "blk rw=fill bs=4096 qd=8 seed=11", sock)
        b = Vm(b_img, "adaptive", "blk rw=fill bs=4096 qd=4 seed=22", sock)
        vms += [a, b]
        a.wait_probed()
        b.wait_probed()
        up = counts(svc.proc.pid)
        assert up[0] > base[0]                  # each VM's memfd, eventfds and disk fd are in the service
        victim.kill()                           # SIGKILL, mid-I/O: no goodbye on the socket
        assert victim.proc.returncode == -signal.SIGKILL
        wait_for(lambda: "vm#1 detached" in svc.text(), 30, svc.text)
        for vm, img, seed in ((a, a_img, 11), (b, b_img, 22)):
            res = vm.result()
            assert res["errors"] == 0 and res["ops"] == DISK_BYTES // 4096 and res["flushes"] == 1, res
            assert lost_sectors_of(img.read_bytes(), seed) == 0          # byte for byte on the host
        # and read back by the guest, through the service again
        checks = [Vm(img, io, f"blk rw=verify bs=16384 qd=4 seed={seed}", sock)
                  for img, io, seed in ((a_img, "adaptive", 11), (b_img, "poll", 22))]
        vms += checks
        for vm in checks:
            res = vm.result()
            assert res["errors"] == 0 and res["verify_errors"] == 0, res
        wait_for(lambda: svc.text().count(" detached ") == 5, 30, svc.text)
        assert svc.proc.poll() is None          # every VM gone, the service still serves
        wait_for(lambda: counts(svc.proc.pid) == base, 30,
                 lambda: f"service fds/threads {counts(svc.proc.pid)} != {base} at start\n{svc.text()}")
        for vm in range(1, 6):
            assert f"vm#{vm} detached" in svc.text()


def test_run_without_a_service_is_a_usage_error(tmp_path):
    """``run --sidecore`` pointing at nothing: one line, exit 2, before the guest boots."""
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    r = subprocess.run([sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()),
                        "--disk", f"{img},io=poll", "--sidecore", str(tmp_path / "none.sock"), "--append", "info"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "cannot reach the sidecore service" in r.stderr and "Traceback" not in r.stderr
    # a disk on a path the service does not serve stays in the VMM; with no polled disk at all, --sidecore
    # would do nothing: refused (tests/test_cli_args.py)
    r = subprocess.run([sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()),
                        "--disk", f"{img},io=ioeventfd", "--sidecore", str(tmp_path / "none.sock"),
                        "--append", "blk rw=fill bs=4096 qd=4 seed=1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no --disk, --nvme or --net on a polled path" in r.stderr, r.stdout + r.stderr


def test_device_reset_detaches_and_a_dead_service_needs_reset(tmp_path):
    """The VM side, driven register by register from Python: DRIVER_OK hands the queue to the service
    (a request completes through it), a device reset (status 0) takes it off the service's loop, a second
    DRIVER_OK brings it back, and a service that goes away leaves the device in DEVICE_NEEDS_RESET."""
    from exitless.devices.virtio.blk import VirtioBlk
    from exitless.devices.virtio.constants import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
    from exitless.devices.virtio.pci import VirtioPci
    from exitless.vm import Machine, VmConfig
    from test_sidecore_service import Running, pattern
    from test_vhost_user_backend import DriverRing

    img = tmp_path / "d.img"
    img.write_bytes(pattern(1 << 20, 5))
    run = Running(tmp_path / "s.sock", "poll")
    loop = run.svc.dataplane.loop
    try:
        with Machine(VmConfig(mem_mib=64, console=lambda b: None)) as m:
            pci = VirtioPci(m, VirtioBlk(img), "poll", service=run.svc.path)
            ring_gpa = 0x10_0000

            def driver_ok() -> DriverRing:
                ring = DriverRing(m.mem, size=64, base=ring_gpa)
                pci.common_write(0x14, 1, 0x3)                       # ACKNOWLEDGE | DRIVER
                pci.common_write(0x08, 4, 1)
                pci.common_write(0x0C, 4, 1)                         # VIRTIO_F_VERSION_1
                pci.common_write(0x14, 1, 0xB)                       # FEATURES_OK
                pci.common_write(0x16, 2, 0)
                pci.common_write(0x18, 2, 64)
                for off, gpa in ((0x20, ring.desc), (0x28, ring.avail), (0x30, ring.used)):
                    pci.common_write(off, 8, gpa)
                pci.common_write(0x1C, 2, 1)
                pci.common_write(0x14, 1, 0xF)                       # DRIVER_OK: to the service
                return ring

            ring = driver_ok()
            wait_for(lambda: len(loop.pollables) == 1, 10, lambda: f"{len(loop.pollables)} pollables")
            hdr, data, status = 0x20_0000, 0x20_1000, 0x20_2000
            m.mem.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 8))
            ring.add([(hdr, 16, False), (data, 4096, True), (status, 1, True)])
            wait_for(lambda: ring.reap(), 10, lambda: "no completion from the service")
            assert m.mem.read_u8(status) == VIRTIO_BLK_S_OK
            assert m.mem.read(data, 4096) == pattern(1 << 20, 5)[4096:8192]
            pci.common_write(0x14, 1, 0)                             # device reset
            assert loop.pollables == [] and pci.status == 0
            driver_ok()
            wait_for(lambda: len(loop.pollables) == 1, 10, lambda: f"{len(loop.pollables)} pollables")
            run.stop()                                               # the service goes away
            wait_for(lambda: pci.status & 0x40, 10, lambda: f"status {pci.status:#x}")   # DEVICE_NEEDS_RESET
            pci.common_write(0x14, 1, 0)                             # the driver resets and tries again:
            driver_ok()
            assert pci.status & 0x40                                 # told at once, not left waiting
    finally:
        run.stop()


#: the guest's script: Linux's own virtio_blk mounts both disks (io=poll, io=adaptive), reads the host's file,
#: writes its own; then any virtio error of dmesg
LINUX_SCRIPT = r"""
for d in a b; do
  mount -t ext4 /dev/vd$d /mnt && cat /mnt/hello.txt && echo written by Linux on vd$d > /mnt/new.txt &&
    seq 1 20000 > /mnt/pattern.txt && umount /mnt
done
dmesg | grep -iE 'virtio|vd[ab]' | grep -iE 'error|fail|warn|bad|timeout' | sed 's/^/DMESG: /'
exit 7
"""


@pytest.mark.skipif(not confine.status()[0], reason=confine.status()[1])
def test_linux_virtio_blk_through_the_service(tmp_path):
    """Linux's own virtio_blk on two disks whose queues an adaptive, confined service serves (one vCPU:
    on kvm_pvm a boot takes 10-45 minutes: by hand, at nice 19 on a loaded host, 43 min)."""
    from exitless.doctor import kvm_flavour

    if kvm_flavour() == "pvm" and os.environ.get("EXITLESS_SLOW_LINUX") != "1":
        # CI already spends two Linux boots on kvm_pvm (tests/test_linux_boot.py, tests/linux_io.py);
        # a third (10-45 min here) does not fit its budget.  It passed by hand on this host (session 3):
        # EXITLESS_SLOW_LINUX=1 python3 -m pytest tests/test_sidecore_service_vms.py -k linux
        pytest.skip("kvm_pvm: a third Linux boot does not fit CI's budget; EXITLESS_SLOW_LINUX=1 runs it")

    require_e2fsprogs()
    images = [make_ext4(tmp_path / f"{n}.img", {"hello.txt": "from the host\n"}) for n in "ab"]
    sock = tmp_path / "s.sock"
    svc = ServeProcess(None, ["--socket", str(sock), "--mode", "adaptive"], tmp_path / "svc.log",
                       command=("sidecore",))
    try:
        r = subprocess.run([sys.executable, "-m", "exitless", "run", "--disk", f"{images[0]},io=poll",
                            "--disk", f"{images[1]},io=adaptive", "--sidecore", str(sock), "--timeout", "3000",
                            "--", "sh", "-c", LINUX_SCRIPT], capture_output=True, text=True, timeout=3100,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 7, r.stdout[-3000:] + r.stderr[-3000:]
        assert r.stdout == "from the host\n" * 2, r.stdout + r.stderr[-3000:]
        wait_for(lambda: svc.text().count(" detached ") == 2, 30, svc.text)
    finally:
        assert svc.stop() == 0
    assert "Traceback" not in svc.text(), svc.text()
    pattern = "".join(f"{i}\n" for i in range(1, 20001))
    for letter, img in zip("ab", images):
        assert_clean_with(img, {"/new.txt": f"written by Linux on vd{letter}\n", "/pattern.txt": pattern})
