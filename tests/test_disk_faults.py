"""Real disk faults under virtio-blk and NVMe: ENOSPC from a small tmpfs, EIO on chosen ranges and
failed fsyncs from a FUSE pass-through (tests/faultfs.py).  Requests fail with VIRTIO_BLK_S_IOERR
(NVMe: Write Fault / Unrecovered Read Error), the device keeps serving, a failed flush is never
reported as success, acknowledged data stays."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exitless.devices.virtio.blk import VirtioBlk
from exitless.devices.virtio.constants import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_F_VERSION_1,
)
from exitless.devices.virtio.queue import Virtqueue
from exitless.fdwait import wait_readable
from exitless.fuzz.ring import DriverRing
from exitless.memory import GuestMemory, Region

MIB = 1 << 20
HERE = Path(__file__).parent
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def _mounted(path: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.ismount(path):
            return True
        time.sleep(0.05)
    return False


class FaultFs:
    def __init__(self, root: Path):
        self.back, self.mnt, self.ctl = root / "back", root / "mnt", root / "faults.json"
        self.back.mkdir()
        self.mnt.mkdir()
        self.set()
        self.proc = subprocess.Popen([sys.executable, str(HERE / "faultfs.py"), str(self.back), str(self.mnt),
                                      str(self.ctl)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not _mounted(self.mnt):
            self.proc.kill()
            raise RuntimeError(f"faultfs did not mount: {self.proc.stderr.read().decode()[-500:]}")

    def set(self, **rules) -> None:
        tmp = self.ctl.with_suffix(".tmp")
        tmp.write_text(json.dumps(rules))
        os.replace(tmp, self.ctl)          # a new inode: faultfs notices the change on its next call

    def disk(self, name: str, size: int) -> tuple[Path, Path]:
        """(path through the faulty mount, path of the backing file)."""
        with open(self.back / name, "wb") as f:
            f.truncate(size)
        return self.mnt / name, self.back / name

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.mnt)], check=False)
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def faultfs(tmp_path):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    fs = FaultFs(tmp_path)
    try:
        yield fs
    finally:
        fs.close()


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "exitless-enospc", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


class BlkDriver:
    """One virtio-blk queue driven directly (no VM): each request is offered, handled, checked."""

    def __init__(self, dev: VirtioBlk, features: int | None = None):
        self.mem = GuestMemory.create([(0, MIB)])
        self.dev = dev
        self.ring = DriverRing(self.mem, 0x1000, 16)
        q = Virtqueue(self.mem, dev.queue_max_size)
        q.size, q.desc_addr, q.avail_addr, q.used_addr, q.ready = 16, self.ring.desc, self.ring.avail, \
            self.ring.used, True
        f = dev.device_features() if features is None else features
        dev.activate(self.mem, [q], f | (1 << VIRTIO_F_VERSION_1), lambda i: None)

    def request(self, rtype: int, sector: int = 0, data: bytes | None = None, nbytes: int = 0) -> tuple[int, bytes]:
        hdr, status, buf = 0x8000, 0x8100, 0x10000
        self.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        self.mem.write_u8(status, 0xFF)
        bufs = [(hdr, 16, False)]
        if data is not None:
            self.mem.write(buf, data)
            bufs.append((buf, len(data), False))
        elif nbytes:
            bufs.append((buf, nbytes, True))
        self.ring.offer(bufs + [(status, 1, True)])
        assert self.dev.handle_queue(0) == 1 and len(self.ring.used_elements()) == 1
        assert not self.dev.needs_reset and self.dev.internal_errors == 0
        return self.mem.read_u8(status), self.mem.read(buf, nbytes) if nbytes else b""


@pytest.fixture
def blk_on():
    made = []

    def make(path, **kw):
        dev = VirtioBlk(path, **kw)
        made.append(dev)
        return BlkDriver(dev)

    yield make
    for d in made:
        d.close()


def test_eio_fails_only_requests_touching_the_bad_range(faultfs, blk_on):
    path, back = faultfs.disk("d.img", MIB)
    drv = blk_on(path)
    assert drv.request(VIRTIO_BLK_T_OUT, 128, b"A" * 4096)[0] == VIRTIO_BLK_S_OK
    faultfs.set(eio_write=[[128 * 512, 4096]], eio_read=[[256 * 512, 512]])
    assert drv.request(VIRTIO_BLK_T_OUT, 128, b"B" * 4096)[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_OUT, 0, b"C" * 4096)[0] == VIRTIO_BLK_S_OK         # elsewhere: fine
    assert drv.request(VIRTIO_BLK_T_IN, 256, nbytes=512)[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_IN, 128, nbytes=4096) == (VIRTIO_BLK_S_OK, b"A" * 4096)  # acked data kept
    faultfs.set()
    assert drv.request(VIRTIO_BLK_T_OUT, 128, b"D" * 4096)[0] == VIRTIO_BLK_S_OK        # the fault went away
    assert drv.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
    assert back.read_bytes()[:4096] == b"C" * 4096 and back.read_bytes()[128 * 512:][:4096] == b"D" * 4096


def test_failed_flush_is_reported_and_stays_failed(faultfs, blk_on):
    path, back = faultfs.disk("d.img", MIB)
    drv = blk_on(path)
    assert drv.request(VIRTIO_BLK_T_OUT, 8, b"E" * 512)[0] == VIRTIO_BLK_S_OK
    assert drv.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
    faultfs.set(fail_fsync=True)
    assert drv.request(VIRTIO_BLK_T_OUT, 9, b"F" * 512)[0] == VIRTIO_BLK_S_OK
    assert drv.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_IOERR
    faultfs.set()
    # The host's fsync would succeed now, but the writes of the failed flush may be gone: never OK again.
    assert drv.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_IN, 8, nbytes=512) == (VIRTIO_BLK_S_OK, b"E" * 512)   # still serving reads
    assert back.read_bytes()[8 * 512:9 * 512] == b"E" * 512                                 # flushed before: kept


def test_write_through_write_fails_when_its_sync_fails(faultfs):
    path, _ = faultfs.disk("d.img", MIB)
    with VirtioBlk(path) as dev:
        drv = BlkDriver(dev, features=dev.device_features() & ~(1 << 9))     # no VIRTIO_BLK_F_FLUSH
        assert not dev.writeback
        faultfs.set(fail_fsync=True)
        assert drv.request(VIRTIO_BLK_T_OUT, 0, b"G" * 512)[0] == VIRTIO_BLK_S_IOERR


@needs_root
def test_enospc_fails_writes_keeps_acknowledged_ones(small_tmpfs, blk_on):
    path = small_tmpfs / "d.img"
    with open(path, "wb") as f:
        f.truncate(MIB)                 # sparse: 1 MiB of disk on a 256 KiB filesystem
    drv = blk_on(path)
    acked, failed = [], 0
    for block in range(MIB // 4096):
        status, _ = drv.request(VIRTIO_BLK_T_OUT, block * 8, bytes([block % 251 + 1]) * 4096)
        if status == VIRTIO_BLK_S_OK:
            acked.append(block)
        else:
            assert status == VIRTIO_BLK_S_IOERR
            failed += 1
    assert acked and failed > 100          # the filesystem filled up part way
    assert drv.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
    for block in acked:
        assert drv.request(VIRTIO_BLK_T_IN, block * 8, nbytes=4096) == (VIRTIO_BLK_S_OK, bytes([block % 251 + 1]) * 4096)
    os.truncate(small_tmpfs / "d.img", MIB)  # (nothing freed: the device keeps serving the same way)
    assert drv.request(VIRTIO_BLK_T_OUT, acked[0] * 8, b"H" * 4096)[0] == VIRTIO_BLK_S_OK   # rewrite in place


# -- end to end: the guest kit's driver on a real KVM guest, and `exitless serve blk` -------------
DISK = 2 * MIB


@pytest.mark.kvm
def test_guest_sees_ioerr_vmm_goes_on_and_acknowledged_data_stays(faultfs):
    from test_virtio_blk_e2e import pattern, run_guest

    path, back = faultfs.disk("g.img", DISK)
    exit, res = run_guest(path, "blk rw=fill bs=4096 qd=4 seed=5")
    assert exit.status == 0 and res["errors"] == 0
    bad = (MIB, 64 << 10)
    faultfs.set(eio_write=[list(bad)])
    exit, res = run_guest(path, "blk rw=fill bs=4096 qd=4 seed=6")
    assert exit.kind == "debug-exit", exit                      # the VMM ran the guest to its end
    assert res["errors"] == bad[1] // 4096 and res["first_error_status"] == VIRTIO_BLK_S_IOERR
    assert res["ops"] == DISK // 4096 - bad[1] // 4096 and res["flushes"] == 1
    old, new, disk = pattern(5, DISK), pattern(6, DISK), back.read_bytes()
    lo, hi = bad[0], bad[0] + bad[1]
    assert disk[:lo] == new[:lo] and disk[hi:] == new[hi:]      # every acknowledged write is there
    assert disk[lo:hi] == old[lo:hi]                            # the failed ones changed nothing
    faultfs.set(fail_fsync=True)
    exit, res = run_guest(path, "blk rw=fill bs=65536 qd=4 seed=7")
    assert exit.kind == "debug-exit" and res["errors"] == 1 and res["flushes"] == 0   # the flush failed


@pytest.mark.kvm
@needs_root
def test_guest_fills_a_full_filesystem(small_tmpfs):
    from test_virtio_blk_e2e import pattern, run_guest

    path = small_tmpfs / "g.img"
    with open(path, "wb") as f:
        f.truncate(DISK)
    exit, res = run_guest(path, "blk rw=fill bs=4096 qd=1 seed=8")
    assert exit.kind == "debug-exit" and res["errors"] > 0 and res["first_error_status"] == VIRTIO_BLK_S_IOERR
    want, disk = pattern(8, DISK), path.read_bytes()
    written = sum(disk[i:i + 4096] == want[i:i + 4096] for i in range(0, DISK, 4096))
    assert written == res["ops"] > 0                            # exactly the acknowledged blocks hold data
    exit, res = run_guest(path, f"blk rw=verify bs=4096 qd=1 seed=8 size={written * 4096}")
    assert exit.status == 0 and res["verify_errors"] == 0       # and a new VMM reads them back


def test_serve_blk_keeps_serving_through_faults(faultfs, tmp_path):
    from exitless.vhost_user import protocol as P
    from exitless.vhost_user.frontend import Frontend

    path, back = faultfs.disk("s.img", MIB)
    sock = tmp_path / "vu.sock"
    proc = subprocess.Popen([sys.executable, "-m", "exitless.cli", "serve", "blk", "--socket", str(sock),
                             "--disk", str(path)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        fd = os.memfd_create("vu-fault", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, MIB)
        mem = GuestMemory(-1, [Region(0, MIB, 0, fd)], owns_fd=False)
        kick, call = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2))
        uva = 0x7F00_0000_0000
        with Frontend.connect(str(sock)) as fe:
            fe.set_owner()
            fe.set_features((1 << VIRTIO_F_VERSION_1) | (1 << P.F_PROTOCOL_FEATURES) | (1 << 9))
            fe.set_protocol_features(1 << P.PROTOCOL_F_REPLY_ACK)
            fe.set_mem_table([(0, MIB, uva, 0)], [fd])
            ring = DriverRing(mem, 0x1000, 16)
            fe.set_vring_num(0, 16)
            fe.set_vring_base(0, 0)
            fe.set_vring_addr(0, uva + ring.desc, uva + ring.used, uva + ring.avail)
            fe.set_vring_call(0, call)
            fe.set_vring_kick(0, kick)
            fe.set_vring_enable(0, True)

            def request(rtype, sector=0, data=None):
                mem.write(0x8000, struct.pack("<IIQ", rtype, 0, sector))
                mem.write_u8(0x8100, 0xFF)
                bufs = [(0x8000, 16, False)] + ([(0x10000, len(data), False)] if data else []) + [(0x8100, 1, True)]
                if data:
                    mem.write(0x10000, data)
                ring.offer(bufs)
                os.eventfd_write(kick, 1)
                end = time.monotonic() + 10
                while not ring.used_elements():
                    assert time.monotonic() < end, "no completion"
                    wait_readable(call, 0.05)
                return mem.read_u8(0x8100)

            assert request(VIRTIO_BLK_T_OUT, 0, b"I" * 512) == VIRTIO_BLK_S_OK
            assert request(VIRTIO_BLK_T_FLUSH) == VIRTIO_BLK_S_OK
            faultfs.set(eio_write=[[4096, 512]], fail_fsync=True)
            assert request(VIRTIO_BLK_T_OUT, 8, b"J" * 512) == VIRTIO_BLK_S_IOERR
            assert request(VIRTIO_BLK_T_OUT, 16, b"K" * 512) == VIRTIO_BLK_S_OK
            assert request(VIRTIO_BLK_T_FLUSH) == VIRTIO_BLK_S_IOERR
            faultfs.set()
            assert request(VIRTIO_BLK_T_FLUSH) == VIRTIO_BLK_S_IOERR     # sticky: never OK after a lost flush
            assert request(VIRTIO_BLK_T_OUT, 8, b"L" * 512) == VIRTIO_BLK_S_OK
        assert proc.poll() is None                                       # still serving
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status      # and confined all along
        assert back.read_bytes()[:512] == b"I" * 512
        mem.close()
        os.close(fd)
    finally:
        proc.terminate()
        proc.wait(10)


# -- NVMe: the same faults under the NVMe controller (NVMe 1.4 §4.6.1.2.2 media errors) -------------
@pytest.fixture
def nvme_on():
    from test_nvme import Rig

    made = []

    def make(path):
        rig = Rig(path)
        made.append(rig)
        assert rig.drv.enable() and rig.drv.create_pair(1) == 0
        return rig

    yield make
    for r in made:
        r.close()


def _nvme_io(rig, opcode, slba, data=None, nbytes=0):
    """One NVM command on I/O queue 1 (512-byte LBAs, PRP1 only: at most 4 KiB); (status, data read)."""
    from nvme_driver import DATA
    from test_nvme import rw

    from exitless.devices.nvme import constants as K

    n = len(data) if data is not None else nbytes
    if data is not None:
        rig.mem.write(DATA, data)
    if opcode == K.NVM_FLUSH:
        status = rig.drv.cmd(1, K.NVM_FLUSH, nsid=1)[0]
    else:
        status = rw(rig.drv, 1, opcode, slba, max(1, n // 512), DATA)
    assert rig.ctrl.csts & K.CSTS_RDY and not rig.ctrl.csts & K.CSTS_CFS    # never controller-fatal
    return status, rig.mem.read(DATA, nbytes) if nbytes else b""


def test_nvme_eio_fails_only_commands_touching_the_bad_range(faultfs, nvme_on):
    from exitless.devices.nvme import constants as K

    path, back = faultfs.disk("n.img", MIB)
    rig = nvme_on(path)
    assert _nvme_io(rig, K.NVM_WRITE, 128, b"A" * 4096)[0] == K.SC_SUCCESS
    faultfs.set(eio_write=[[128 * 512, 4096]], eio_read=[[256 * 512, 512]])
    assert _nvme_io(rig, K.NVM_WRITE, 128, b"B" * 4096)[0] == K.SC_WRITE_FAULT
    assert _nvme_io(rig, K.NVM_WRITE, 0, b"C" * 4096)[0] == K.SC_SUCCESS                 # elsewhere: fine
    assert _nvme_io(rig, K.NVM_READ, 256, nbytes=512)[0] == K.SC_UNRECOVERED_READ_ERROR
    assert _nvme_io(rig, K.NVM_READ, 128, nbytes=4096) == (K.SC_SUCCESS, b"A" * 4096)  # acked data kept
    faultfs.set()
    assert _nvme_io(rig, K.NVM_WRITE, 128, b"D" * 4096)[0] == K.SC_SUCCESS               # the fault went away
    assert _nvme_io(rig, K.NVM_FLUSH, 0)[0] == K.SC_SUCCESS
    assert back.read_bytes()[:4096] == b"C" * 4096 and back.read_bytes()[128 * 512:][:4096] == b"D" * 4096


def test_nvme_failed_flush_is_reported_and_stays_failed(faultfs, nvme_on):
    from exitless.devices.nvme import constants as K

    path, back = faultfs.disk("n.img", MIB)
    rig = nvme_on(path)
    assert _nvme_io(rig, K.NVM_WRITE, 8, b"E" * 512)[0] == K.SC_SUCCESS
    assert _nvme_io(rig, K.NVM_FLUSH, 0)[0] == K.SC_SUCCESS
    faultfs.set(fail_fsync=True)
    assert _nvme_io(rig, K.NVM_WRITE, 9, b"F" * 512)[0] == K.SC_SUCCESS
    assert _nvme_io(rig, K.NVM_FLUSH, 0)[0] == K.SC_WRITE_FAULT
    faultfs.set()
    assert _nvme_io(rig, K.NVM_FLUSH, 0)[0] == K.SC_WRITE_FAULT                 # sticky, as for virtio-blk
    assert _nvme_io(rig, K.NVM_READ, 8, nbytes=512) == (K.SC_SUCCESS, b"E" * 512)
    assert back.read_bytes()[8 * 512:9 * 512] == b"E" * 512


@needs_root
def test_nvme_enospc_fails_writes_keeps_acknowledged_ones(small_tmpfs, nvme_on):
    from exitless.devices.nvme import constants as K

    path = small_tmpfs / "n.img"
    with open(path, "wb") as f:
        f.truncate(MIB)                 # sparse: 1 MiB of namespace on a 256 KiB filesystem
    rig = nvme_on(path)
    acked, failed = [], 0
    for block in range(MIB // 4096):
        status = _nvme_io(rig, K.NVM_WRITE, block * 8, bytes([block % 251 + 1]) * 4096)[0]
        if status == K.SC_SUCCESS:
            acked.append(block)
        else:
            assert status == K.SC_WRITE_FAULT
            failed += 1
    assert acked and failed > 100
    assert _nvme_io(rig, K.NVM_FLUSH, 0)[0] == K.SC_SUCCESS
    for block in acked:
        assert _nvme_io(rig, K.NVM_READ, block * 8, nbytes=4096) == (K.SC_SUCCESS, bytes([block % 251 + 1]) * 4096)


@pytest.mark.kvm
def test_nvme_guest_sees_write_fault_vmm_goes_on_and_acknowledged_data_stays(faultfs):
    """The guest kit's NVMe driver on a real KVM guest, its namespace on the failing filesystem."""
    from test_nvme_e2e import pattern, run_guest

    from exitless.devices.nvme import constants as K

    path, back = faultfs.disk("g.img", DISK)
    exit, res, _ = run_guest(path, "nvme rw=fill bs=4096 qd=4 queues=1 seed=5", queues=1)
    assert exit.status == 0 and res["errors"] == 0
    bad = (MIB, 64 << 10)
    faultfs.set(eio_write=[list(bad)])
    exit, res, _ = run_guest(path, "nvme rw=fill bs=4096 qd=4 queues=1 seed=6", queues=1)
    assert exit.kind == "debug-exit", exit                      # the VMM ran the guest to its end
    assert res["errors"] == bad[1] // 4096 and int(res["first_error_status"], 0) == K.SC_WRITE_FAULT, res  # "0x280"
    old, new, disk = pattern(5, DISK), pattern(6, DISK), back.read_bytes()
    lo, hi = bad[0], bad[0] + bad[1]
    assert disk[:lo] == new[:lo] and disk[hi:] == new[hi:]      # every acknowledged write is there
    assert disk[lo:hi] == old[lo:hi]                            # the failed ones changed nothing
