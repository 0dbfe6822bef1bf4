"""virtio-blk over virtio-pci, driven by the guest kit's driver, under every I/O path on real KVM."""
import json
import signal
import struct
import subprocess
import sys

import pytest

from exitless.devices.virtio.blk import VirtioBlk
from exitless.devices.virtio.pci import VirtioPci
from exitless.guestkit import guestkit_path
from exitless.vm import Machine, VmConfig

pytestmark = pytest.mark.kvm
DISK_BYTES = 2 << 20
SEED = 11


def pattern(seed: int, nbytes: int, first_word: int = 0) -> bytes:
    k = (seed * 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF
    n = nbytes // 8
    return struct.pack(f"<{n}Q", *((first_word + i) ^ k for i in range(n)))


def run_guest(image, app, path="ioeventfd", read_only=False, timeout=240):
    out = bytearray()
    with Machine(VmConfig(mem_mib=128, console=out.extend)) as m:
        VirtioPci(m, VirtioBlk(image, read_only=read_only), path)
        m.boot_pvh(guestkit_path(), app)
        exit = m.run(timeout=timeout)
    lines = [x for x in out.decode(errors="replace").splitlines() if x.startswith('{"app":')]
    assert lines, out.decode(errors="replace")[-2000:]
    return exit, json.loads(lines[-1])


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(DISK_BYTES)
    return p


@pytest.mark.parametrize("path", ["trap", "ioeventfd", "shared", "poll", "adaptive"])
def test_fill_verify_and_host_check(image, path):
    exit, res = run_guest(image, f"blk rw=fill bs=4096 qd=8 seed={SEED}", path)
    assert exit.kind == "debug-exit" and exit.status == 0, (exit, res)
    assert res["errors"] == 0 and res["ops"] == DISK_BYTES // 4096 and res["flushes"] == 1
    assert image.read_bytes() == pattern(SEED, DISK_BYTES)            # byte for byte on the host
    exit, res = run_guest(image, f"blk rw=verify bs=16384 qd=4 seed={SEED}", path)
    assert exit.status == 0 and res["verify_errors"] == 0 and res["errors"] == 0
    if path == "poll":
        assert res["notifies"] == 0        # the driver never had to ring: notifications suppressed


def test_detects_corruption(image):
    """The verification can fail: flip one byte on the host and the guest must notice."""
    assert run_guest(image, f"blk rw=fill bs=4096 qd=8 seed={SEED}")[0].status == 0
    with open(image, "r+b") as f:
        f.seek(123456)
        b = f.read(1)
        f.seek(123456)
        f.write(bytes([b[0] ^ 0xFF]))
    exit, res = run_guest(image, f"blk rw=verify bs=4096 qd=4 seed={SEED}")
    assert exit.status != 0 and res["verify_errors"] >= 1


def test_read_only_disk_refuses_writes(image):
    image.write_bytes(pattern(3, DISK_BYTES))
    exit, res = run_guest(image, "blk rw=verify bs=4096 qd=4 seed=3", read_only=True)
    assert exit.status == 0 and res["verify_errors"] == 0
    # a write request to a read-only disk (the guest kit honours VIRTIO_BLK_F_RO unless forced)
    dev = VirtioBlk(image, read_only=True)
    try:
        assert dev.read_only and dev.device_features() & (1 << 5)
    finally:
        dev.close()
    assert image.read_bytes() == pattern(3, DISK_BYTES)


@pytest.mark.parametrize("path", ["trap", "poll"])
def test_hostile_driver_malformed_chains(image, path):
    """The guest kit posts loops, out-of-RAM buffers, over-long chains, bad indices: each request
    fails or the device asks for a reset, the VMM goes on, and a final read works."""
    exit, res = run_guest(image, "blk rw=malformed", path)
    assert exit.kind == "debug-exit" and exit.status == 0, res
    assert res["final_read"] == "ok"


def test_acknowledged_flush_survives_sigkill(tmp_path):
    """SIGKILL the VMM the moment the guest reports its flushed writes: the data is in the image.
    (The VMM keeps no data in userspace buffers; a flush completes only after fdatasync.)"""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(DISK_BYTES)
    proc = subprocess.Popen(
        [sys.executable, "-m", "exitless.cli", "run", "--kernel", str(guestkit_path()),
         "--append", f"blk rw=fill bs=65536 qd=4 seed={SEED}", "--disk", f"{image},io=ioeventfd", "--timeout", "240"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in proc.stdout:
            if line.startswith(b'{"app":"blk"'):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads(line)["flushes"] == 1
    assert image.read_bytes() == pattern(SEED, DISK_BYTES)


def test_one_sidecore_serves_two_multiqueue_disks(tmp_path):
    """Two disks with two queues each, on one polling sidecore thread: each filled with its own seed."""
    from exitless.disk import DiskSpec, add_disks

    images = [tmp_path / f"d{i}.img" for i in range(2)]
    for img in images:
        with open(img, "wb") as f:
            f.truncate(DISK_BYTES)
    out = bytearray()
    with Machine(VmConfig(mem_mib=128, console=out.extend)) as m:
        devs = add_disks(m, [DiskSpec(str(img), io="poll", queues=2) for img in images], one_sidecore=True)
        groups = [w for w in m.workers if type(w).__name__ == "SidecoreGroup"]
        assert len(groups) == 1 and len(groups[0].pollables) == 4 and all(d.sidecore is None for d in devs)
        m.boot_pvh(guestkit_path(), "blk rw=fill bs=4096 qd=16 queues=2 index=1 seed=21")
        assert m.run(timeout=240).status == 0, out.decode()[-1000:]
    assert images[1].read_bytes() == pattern(21, DISK_BYTES)
    assert images[0].read_bytes() == bytes(DISK_BYTES)  # the other disk untouched
