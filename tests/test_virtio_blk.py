"""virtio-blk on a temp file, driven through real virtqueues by the test driver (no KVM)."""
from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import struct
import tempfile

import pytest

from exitless.devices.virtio import blk as blkmod
from exitless.devices import hostio
from exitless.devices.hostio import transfer as _transfer
from exitless.devices.virtio.blk import VirtioBlk
from exitless.devices.virtio.constants import (
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_GET_LIFETIME,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
)
from exitless.memory import GuestMemory

try:
    from test_virtqueue import NEXT, WRITE, Driver
except ImportError:  # pragma: no cover - tests/ as a package
    from tests.test_virtqueue import NEXT, WRITE, Driver

MiB = 1 << 20
DISK = 4 * MiB
SECTORS = DISK // 512


@functools.lru_cache(maxsize=None)
def _pattern(n: int, seed: int = 0) -> bytes:
    """Deterministic, sector-distinct bytes."""
    sectors = [struct.pack("<QQ", i, seed).ljust(16, b"\0") * 32 for i in range((n + 511) // 512)]
    return b"".join(sectors)[:n]


@pytest.fixture(scope="module")
def workdir():
    # Not /tmp: it may be tmpfs, which refuses O_DIRECT.
    base = "/var/tmp" if os.path.isdir("/var/tmp") else os.path.dirname(os.path.abspath(__file__))
    d = tempfile.mkdtemp(prefix="exitless-blk-", dir=base)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def disk(workdir):
    fd, path = tempfile.mkstemp(suffix=".img", dir=workdir)
    os.close(fd)
    with open(path, "wb") as f:
        f.write(_pattern(DISK))
    yield path
    os.unlink(path)


def _file(path: str, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


class Rig:
    """A VirtioBlk activated on test-driver queues, as a transport would."""

    def __init__(self, path, features=None, event_idx=True, **kw):
        self.mem = GuestMemory.create([(0, 32 * MiB)])
        self.dev = VirtioBlk(path, **kw)
        self.signals: list[int] = []
        self.resets = 0
        self.dev.on_needs_reset = self._on_reset
        if features is None:
            features = self.dev.device_features()
        if not event_idx:
            features &= ~(1 << VIRTIO_F_RING_EVENT_IDX)
        assert self.dev.features_ok(features)
        self.features = features
        queues = self.dev.create_queues(self.mem)
        self.drivers = [
            Driver(self.mem, size=self.dev.queue_max_size, event_idx=bool(features >> VIRTIO_F_RING_EVENT_IDX & 1),
                   indirect=True, ring_base=0x10000 + i * 0x20000, heap=0x400000 + i * 0x800000,
                   heap_end=0x400000 + (i + 1) * 0x800000, queue=q)
            for i, q in enumerate(queues)
        ]
        self.dev.activate(self.mem, queues, features, self.signals.append)

    def _on_reset(self):
        self.resets += 1

    def request(self, rtype, sector=0, out=b"", in_len=0, qi=0, *, split_header=False, indirect=False,
                one_in=False, align=16, extra_out=()):
        hdr = struct.pack("<IIQ", rtype, 0, sector)
        outs = [hdr[:5], hdr[5:]] if split_header else [hdr]
        if out:
            outs.append(out)
        outs.extend(extra_out)
        ins = [in_len + 1] if one_in else ([in_len] if in_len else []) + [1]
        d = self.drivers[qi]
        head, gpas = d.add(outs, ins, indirect=indirect, align=align)
        done = self.dev.handle_queue(qi)
        used = d.get_used()
        assert done == 1 and len(used) == 1 and used[0][0] == head
        status_gpa = gpas[-1] + (in_len if one_in else 0)
        status = self.mem.read_u8(status_gpa)
        data = self.mem.read(gpas[0], in_len) if in_len else b""
        return status, used[0][1], data

    def close(self):
        self.dev.close()
        self.mem.close()


@pytest.fixture
def rig(disk):
    r = Rig(disk)
    yield r
    r.close()


# ---------------------------------------------------------------------------
# construction, features, config
# ---------------------------------------------------------------------------
def test_missing_backing_file(workdir):
    path = os.path.join(workdir, "does-not-exist.img")
    with pytest.raises(FileNotFoundError) as ei:
        VirtioBlk(path)
    assert ei.value.filename == path and "does not exist" in str(ei.value)


def test_serial_too_long(disk):
    with pytest.raises(ValueError):
        VirtioBlk(disk, serial="x" * 21)


def test_features_and_config(disk):
    with VirtioBlk(disk) as dev:
        assert dev.device_id == VIRTIO_ID_BLOCK == 2
        f = dev.device_features()
        for bit in (VIRTIO_F_VERSION_1, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_BLK_F_SEG_MAX,
                    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES):
            assert f >> bit & 1, bit
        assert not f >> VIRTIO_BLK_F_RO & 1 and not f >> VIRTIO_BLK_F_MQ & 1
        assert dev.num_queues == 1 and dev.queue_max_size == 256
        cfg = dev.read_config(0, 96)
        capacity, size_max, seg_max = struct.unpack_from("<QII", cfg, 0)
        assert (capacity, size_max, seg_max) == (SECTORS, 0, 254)
        assert struct.unpack_from("<I", cfg, 20)[0] == 512                      # blk_size
        assert struct.unpack_from("<H", cfg, 34)[0] == 1                        # num_queues
        max_dsec, max_dseg, dalign, max_wz, max_wzseg = struct.unpack_from("<5I", cfg, 36)
        assert max_dsec > 0 and max_dseg > 0 and dalign == 1 and max_wz > 0 and max_wzseg > 0
        assert cfg[56] == 1                                                     # write_zeroes_may_unmap
        assert dev.read_config(0, 4) == struct.pack("<I", SECTORS)
        assert dev.read_config(94, 8) == b"\0" * 8                              # past the end: zeros
        assert dev.read_config(4096, 4) == b"\0" * 4
        dev.write_config(0, b"\xff" * 8)                                        # ignored
        assert dev.read_config(0, 8) == struct.pack("<Q", SECTORS)
        assert not dev.features_ok(1 << VIRTIO_BLK_F_FLUSH)                     # no VERSION_1
        assert not dev.features_ok((1 << VIRTIO_F_VERSION_1) | (1 << 60))       # not offered


def test_read_only_and_multiqueue_features(disk):
    with VirtioBlk(disk, read_only=True, num_queues=4, queue_size=128) as dev:
        f = dev.device_features()
        assert f >> VIRTIO_BLK_F_RO & 1 and f >> VIRTIO_BLK_F_MQ & 1
        assert not f >> VIRTIO_BLK_F_DISCARD & 1 and not f >> VIRTIO_BLK_F_WRITE_ZEROES & 1
        assert struct.unpack_from("<H", dev.read_config(34, 2))[0] == 4
        assert struct.unpack_from("<I", dev.read_config(12, 4))[0] == 126


def test_partial_tail_sector_not_exposed(workdir):
    path = os.path.join(workdir, "odd.img")
    with open(path, "wb") as f:
        f.write(b"\1" * (512 * 3 + 100))
    with VirtioBlk(path) as dev:
        assert dev.capacity == 3
    os.unlink(path)


# ---------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------
def test_read(rig, disk):
    status, used_len, data = rig.request(VIRTIO_BLK_T_IN, sector=3, in_len=8192)
    assert status == VIRTIO_BLK_S_OK and used_len == 8193
    assert data == _file(disk, 3 * 512, 8192)
    assert rig.signals == [0]


def test_write_reaches_the_file(rig, disk):
    payload = _pattern(4096, seed=99)
    status, used_len, _ = rig.request(VIRTIO_BLK_T_OUT, sector=10, out=payload)
    assert status == VIRTIO_BLK_S_OK and used_len == 1
    assert _file(disk, 10 * 512, 4096) == payload
    assert _file(disk, 9 * 512, 512) == _pattern(DISK)[9 * 512:10 * 512]
    status, used_len, data = rig.request(VIRTIO_BLK_T_IN, sector=10, in_len=4096)
    assert data == payload


def test_header_split_and_data_with_status_in_one_buffer(rig, disk):
    # framing independence: header in two descriptors, data + status in one writable buffer
    status, used_len, data = rig.request(VIRTIO_BLK_T_IN, sector=1, in_len=1024, split_header=True, one_in=True)
    assert status == VIRTIO_BLK_S_OK and used_len == 1025 and data == _file(disk, 512, 1024)
    payload = _pattern(1024, seed=5)
    status, _, _ = rig.request(VIRTIO_BLK_T_OUT, sector=7, out=payload[:100], extra_out=[payload[100:]],
                               split_header=True)
    assert status == VIRTIO_BLK_S_OK and _file(disk, 7 * 512, 1024) == payload


def test_indirect_request(rig, disk):
    status, used_len, data = rig.request(VIRTIO_BLK_T_IN, sector=0, in_len=2048, indirect=True)
    assert status == VIRTIO_BLK_S_OK and used_len == 2049 and data == _file(disk, 0, 2048)


def test_many_segments(rig, disk):
    # 200 data segments of 512 bytes (seg_max is 254)
    d = rig.drivers[0]
    hdr = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 16)
    head, gpas = d.add([hdr], [512] * 200 + [1], indirect=True)
    assert rig.dev.handle_queue(0) == 1
    assert d.get_used() == [(head, 200 * 512 + 1)]
    got = b"".join(rig.mem.read(g, 512) for g in gpas[:-1])
    assert got == _file(disk, 16 * 512, 200 * 512) and rig.mem.read_u8(gpas[-1]) == VIRTIO_BLK_S_OK


def test_flush_syncs(rig, monkeypatch):
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(blkmod.os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    rig.request(VIRTIO_BLK_T_OUT, sector=0, out=b"\0" * 512)
    assert calls == []                                   # write-back cache: writes don't sync...
    status, used_len, _ = rig.request(VIRTIO_BLK_T_FLUSH)
    assert status == VIRTIO_BLK_S_OK and used_len == 1
    assert calls == [rig.dev.fd]                         # ...FLUSH does, before completing


def test_write_through_without_flush_feature(disk, monkeypatch):
    calls = []
    monkeypatch.setattr(blkmod.os, "fdatasync", lambda fd: calls.append(fd))
    probe = VirtioBlk(disk)
    base = probe.device_features()
    probe.close()           # before the rig opens the image for writing: it holds the image lock
    r = Rig(disk, features=base & ~(1 << VIRTIO_BLK_F_FLUSH))
    try:
        assert rig_status(r.request(VIRTIO_BLK_T_OUT, sector=0, out=b"\1" * 512)) == VIRTIO_BLK_S_OK
        assert calls == [r.dev.fd]
    finally:
        r.close()


def rig_status(res):
    return res[0]


def test_get_id(disk):
    r = Rig(disk, serial="disk-serial-1")
    try:
        status, used_len, data = r.request(VIRTIO_BLK_T_GET_ID, in_len=20)
        assert status == VIRTIO_BLK_S_OK and used_len == 21
        assert data == b"disk-serial-1".ljust(20, b"\0")
    finally:
        r.close()


def test_default_serial(rig):
    status, _, data = rig.request(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert status == VIRTIO_BLK_S_OK and data.startswith(b"exitless-") and len(data.rstrip(b"\0")) == 20


def _segs(*segs):
    return b"".join(struct.pack("<QII", *s) for s in segs)


def test_discard(rig, disk):
    status, used_len, _ = rig.request(VIRTIO_BLK_T_DISCARD, out=_segs((8, 16, 0), (100, 8, 0)))
    assert status == VIRTIO_BLK_S_OK and used_len == 1
    assert _file(disk, 8 * 512, 16 * 512) == bytes(16 * 512)
    assert _file(disk, 100 * 512, 8 * 512) == bytes(8 * 512)
    assert _file(disk, 24 * 512, 512) == _pattern(DISK)[24 * 512:25 * 512]
    assert os.path.getsize(disk) == DISK


@pytest.mark.parametrize("segs,expect", [
    (_segs((8, 16, 1)), VIRTIO_BLK_S_UNSUPP),              # unmap flag is invalid for discard
    (_segs((8, 16, 4)), VIRTIO_BLK_S_UNSUPP),              # unknown flag
    (_segs((SECTORS - 1, 2, 0)), VIRTIO_BLK_S_IOERR),      # beyond capacity
    (_segs((0, 1 << 23, 0)), VIRTIO_BLK_S_IOERR),          # more than max_discard_sectors
    (_segs((0, 1, 0))[:15], VIRTIO_BLK_S_IOERR),           # not a whole segment
    (b"", VIRTIO_BLK_S_IOERR),                             # no segment
    (_segs(*[(i, 1, 0) for i in range(33)]), VIRTIO_BLK_S_IOERR),  # more than max_discard_seg
], ids=["unmap", "unknown-flag", "beyond-capacity", "too-many-sectors", "partial-seg", "empty", "too-many-segs"])
def test_discard_invalid(rig, disk, segs, expect):
    status, used_len, _ = rig.request(VIRTIO_BLK_T_DISCARD, out=segs)
    assert status == expect and used_len == 1
    assert _file(disk, 0, 16 * 512) == _pattern(DISK)[:16 * 512]


@pytest.mark.parametrize("unmap", [0, 1])
def test_write_zeroes(rig, disk, unmap):
    status, used_len, _ = rig.request(VIRTIO_BLK_T_WRITE_ZEROES, out=_segs((5, 3, unmap), (200, 64, unmap)))
    assert status == VIRTIO_BLK_S_OK and used_len == 1
    assert _file(disk, 5 * 512, 3 * 512) == bytes(3 * 512)
    assert _file(disk, 200 * 512, 64 * 512) == bytes(64 * 512)
    assert _file(disk, 8 * 512, 512) == _pattern(DISK)[8 * 512:9 * 512]
    assert os.path.getsize(disk) == DISK


def test_write_zeroes_fallback_without_fallocate(rig, disk, monkeypatch):
    def nope(fd, mode, offset, length):
        raise OSError(errno.EOPNOTSUPP, "no")
    monkeypatch.setattr(blkmod, "fallocate", nope)
    status, _, _ = rig.request(VIRTIO_BLK_T_WRITE_ZEROES, out=_segs((5, 2048 + 3, 0)))
    assert status == VIRTIO_BLK_S_OK and _file(disk, 5 * 512, (2048 + 3) * 512) == bytes((2048 + 3) * 512)
    status, _, _ = rig.request(VIRTIO_BLK_T_DISCARD, out=_segs((5000, 3, 0)))
    assert status == VIRTIO_BLK_S_OK                    # discard is advisory


def test_read_only_disk(disk):
    r = Rig(disk, read_only=True)
    try:
        assert r.features >> VIRTIO_BLK_F_RO & 1
        status, used_len, _ = r.request(VIRTIO_BLK_T_OUT, sector=0, out=b"\xff" * 512)
        assert status == VIRTIO_BLK_S_IOERR and used_len == 1
        for t in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            status, _, _ = r.request(t, out=_segs((0, 1, 0)))
            assert status in (VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP)
        assert _file(disk, 0, 512) == _pattern(DISK)[:512]
        status, _, data = r.request(VIRTIO_BLK_T_IN, sector=0, in_len=512)
        assert status == VIRTIO_BLK_S_OK and data == _pattern(DISK)[:512]
    finally:
        r.close()


@pytest.mark.parametrize("rtype", [2, 3, 5, 99, VIRTIO_BLK_T_GET_LIFETIME, 0xFFFFFFFF])
def test_unsupported_type(rig, rtype):
    status, used_len, _ = rig.request(rtype)
    assert status == VIRTIO_BLK_S_UNSUPP and used_len == 1


@pytest.mark.parametrize("rtype,sector,n", [
    (VIRTIO_BLK_T_IN, SECTORS, 512),            # starts at the end
    (VIRTIO_BLK_T_IN, SECTORS - 1, 1024),       # crosses the end
    (VIRTIO_BLK_T_IN, 2**64 - 1, 512),          # absurd sector
    (VIRTIO_BLK_T_IN, 0, 100),                  # not a multiple of 512
    (VIRTIO_BLK_T_OUT, SECTORS - 1, 1024),
    (VIRTIO_BLK_T_OUT, 2**63, 512),
    (VIRTIO_BLK_T_OUT, 0, 513),
])
def test_out_of_range(rig, disk, rtype, sector, n):
    if rtype == VIRTIO_BLK_T_IN:
        status, used_len, _ = rig.request(rtype, sector=sector, in_len=n)
    else:
        status, used_len, _ = rig.request(rtype, sector=sector, out=b"\xaa" * n)
    assert status == VIRTIO_BLK_S_IOERR and used_len == 1
    assert _file(disk, DISK - 1024, 1024) == _pattern(DISK)[-1024:]
    assert not rig.dev.needs_reset


def test_read_at_the_very_end(rig, disk):
    status, _, data = rig.request(VIRTIO_BLK_T_IN, sector=SECTORS - 2, in_len=1024)
    assert status == VIRTIO_BLK_S_OK and data == _pattern(DISK)[-1024:]


def test_request_too_large(rig, monkeypatch):
    monkeypatch.setattr(VirtioBlk, "MAX_REQUEST_BYTES", 4096)
    status, _, _ = rig.request(VIRTIO_BLK_T_IN, sector=0, in_len=8192)
    assert status == VIRTIO_BLK_S_IOERR
    status, _, _ = rig.request(VIRTIO_BLK_T_IN, sector=0, in_len=4096)
    assert status == VIRTIO_BLK_S_OK


def test_short_header(rig):
    d = rig.drivers[0]
    head, gpas = d.add([b"\0" * 8], [1])
    rig.dev.handle_queue(0)
    assert d.get_used() == [(head, 1)] and rig.mem.read_u8(gpas[0]) == VIRTIO_BLK_S_IOERR


def test_no_status_byte(rig, caplog):
    d = rig.drivers[0]
    head, _ = d.add([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [])
    with caplog.at_level(logging.WARNING):
        assert rig.dev.handle_queue(0) == 1
    assert d.get_used() == [(head, 0)] and not rig.dev.needs_reset
    assert "no status byte" in caplog.text


def test_data_buffer_outside_ram(rig):
    d = rig.drivers[0]
    hdr = 0x300000
    rig.mem.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
    d.put_desc(0, hdr, 16, NEXT, 1)
    d.put_desc(1, 64 * MiB, 512, WRITE | NEXT, 2)      # beyond the 32 MiB of RAM
    d.put_desc(2, 0x300100, 1, WRITE)
    d.offer(0)
    assert rig.dev.handle_queue(0) == 1
    assert d.get_used() == [(0, 1)] and rig.mem.read_u8(0x300100) == VIRTIO_BLK_S_IOERR
    assert not rig.dev.needs_reset
    # status byte itself outside RAM: returned with length 0, nothing written
    d.put_desc(3, hdr, 16, NEXT, 4)
    d.put_desc(4, 0x300200, 512, WRITE | NEXT, 5)
    d.put_desc(5, 64 * MiB, 1, WRITE)
    d.offer(3)
    assert rig.dev.handle_queue(0) == 1
    assert d.get_used() == [(3, 0)] and not rig.dev.needs_reset


def test_broken_ring_sets_needs_reset(rig):
    d = rig.drivers[0]
    d.add([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [512, 1])      # one good request first
    d.put_desc(10, 0x300000, 16, NEXT, 10)                              # then a loop
    d.offer(10)
    assert rig.dev.handle_queue(0) == 1                                 # no exception
    assert rig.dev.needs_reset and rig.resets == 1
    assert len(d.get_used()) == 1                                       # the good one completed
    assert rig.signals == [0]
    assert rig.dev.handle_queue(0) == 0 and rig.resets == 1
    # the driver resets the device and starts again
    rig.dev.reset()
    assert not rig.dev.needs_reset and not rig.dev.activated


def test_signal_suppression(disk):
    r = Rig(disk, event_idx=False)
    try:
        d = r.drivers[0]
        d.set_no_interrupt(True)
        r.request(VIRTIO_BLK_T_IN, sector=0, in_len=512)
        assert r.signals == []
        d.set_no_interrupt(False)
        r.request(VIRTIO_BLK_T_IN, sector=0, in_len=512)
        assert r.signals == [0]
    finally:
        r.close()


def test_batch_signals_once(rig):
    d = rig.drivers[0]
    for i in range(10):
        d.add([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, i)], [512, 1], publish=False)
    d.publish()
    assert rig.dev.handle_queue(0) == 10
    assert len(d.get_used()) == 10 and rig.signals == [0]


def test_multiqueue(disk):
    r = Rig(disk, num_queues=2)
    try:
        status, _, data = r.request(VIRTIO_BLK_T_IN, sector=4, in_len=512, qi=1)
        assert status == VIRTIO_BLK_S_OK and data == _file(disk, 2048, 512) and r.signals == [1]
        assert r.dev.handle_queue(0) == 0 and r.dev.handle_queue(7) == 0
    finally:
        r.close()


def test_polling_mode_leaves_notifications_disabled(rig):
    q = rig.dev.queues[0]
    q.disable_notifications()                    # a sidecore owns the queue
    rig.request(VIRTIO_BLK_T_IN, sector=0, in_len=512)
    assert not q.notifications_enabled
    q.enable_notifications()
    rig.request(VIRTIO_BLK_T_IN, sector=0, in_len=512)
    assert q.notifications_enabled               # kick-driven: re-armed after draining


def test_reset_and_reactivate(disk):
    r = Rig(disk)
    try:
        r.request(VIRTIO_BLK_T_IN, sector=0, in_len=512)
        r.dev.reset()
        assert r.dev.queues == [] and r.dev.handle_queue(0) == 0
        queues = r.dev.create_queues(r.mem)
        r.drivers = [Driver(r.mem, size=256, event_idx=True, indirect=True, ring_base=0x10000, queue=queues[0])]
        r.dev.activate(r.mem, queues, r.features, r.signals.append)
        status, _, data = r.request(VIRTIO_BLK_T_IN, sector=1, in_len=512)
        assert status == VIRTIO_BLK_S_OK and data == _pattern(DISK)[512:1024]
    finally:
        r.close()


def test_activate_with_bad_ring_needs_reset(disk):
    mem = GuestMemory.create([(0, MiB)])
    dev = VirtioBlk(disk)
    try:
        hit = []
        dev.on_needs_reset = lambda: hit.append(1)
        (q,) = dev.create_queues(mem)
        q.size, q.desc_addr, q.avail_addr, q.used_addr, q.ready = 256, 2 * MiB, 0, 0x1000, True
        dev.activate(mem, [q], dev.device_features(), lambda i: None)
        assert dev.needs_reset and hit == [1]
    finally:
        dev.close()
        mem.close()


# ---------------------------------------------------------------------------
# transfer helper
# ---------------------------------------------------------------------------
def test_transfer_batches_and_short_io():
    views = [memoryview(bytearray(3)) for _ in range(2500)]            # > IOV_MAX views
    calls = []

    def fake(fd, bufs, offset):
        calls.append((len(bufs), offset))
        n = min(sum(len(b) for b in bufs), 1000)                       # short transfers
        return n
    assert _transfer(fake, 0, views, 100) == 7500
    assert all(c[0] <= hostio._IOV_MAX for c in calls)
    assert calls[0][1] == 100 and sum(1 for _ in calls) >= 8
    with pytest.raises(OSError):
        _transfer(lambda fd, b, o: 0, 0, views, 0)
    # one-call fast path, with a short first transfer
    small = [memoryview(bytearray(100)) for _ in range(10)]
    calls.clear()
    assert _transfer(fake, 0, small, 0, 1000) == 1000 and len(calls) == 1
    calls.clear()

    def short(fd, bufs, offset):
        calls.append(offset)
        return min(sum(len(b) for b in bufs), 250)
    assert _transfer(short, 0, small, 0, 1000) == 1000 and calls == [0, 250, 500, 750]
    with pytest.raises(OSError):
        _transfer(lambda fd, b, o: 0, 0, small, 0, 1000)


# ---------------------------------------------------------------------------
# O_DIRECT
# ---------------------------------------------------------------------------
def _odirect_supported(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        return f"O_DIRECT open refused on {os.path.dirname(path)}: {e}"
    try:
        import mmap
        buf = mmap.mmap(-1, 4096)
        try:
            os.preadv(fd, [buf], 0)
        except OSError as e:
            return f"O_DIRECT read refused on {os.path.dirname(path)}: {e}"
        finally:
            buf.close()
    finally:
        os.close(fd)
    return None


@pytest.fixture
def direct_rig(disk):
    why = _odirect_supported(disk)
    if why:
        pytest.skip(why)
    r = Rig(disk, direct=True)
    yield r
    r.close()


def test_direct_aligned(direct_rig, disk):
    r = direct_rig
    assert r.dev.dio_align in (512, 4096)
    payload = _pattern(8192, seed=3)
    status, _, _ = r.request(VIRTIO_BLK_T_OUT, sector=16, out=payload, align=4096)
    assert status == VIRTIO_BLK_S_OK and _file(disk, 16 * 512, 8192) == payload
    status, used_len, data = r.request(VIRTIO_BLK_T_IN, sector=16, in_len=8192, align=4096)
    assert status == VIRTIO_BLK_S_OK and used_len == 8193 and data == payload


def test_direct_unaligned_memory_uses_bounce_buffer(direct_rig, disk, monkeypatch):
    r = direct_rig
    bounced = []
    real = VirtioBlk._bounce
    monkeypatch.setattr(VirtioBlk, "_bounce", lambda self, *a: (bounced.append(1), real(self, *a)))
    d = r.drivers[0]
    hdr, buf, st_ = 0x300000, 0x300208, 0x310000          # data buffer 8 bytes past a 512 boundary
    payload = _pattern(4096, seed=11)
    r.mem.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 24))
    r.mem.write(buf, payload)
    d.put_desc(0, hdr, 16, NEXT, 1)
    d.put_desc(1, buf, 4096, NEXT, 2)
    d.put_desc(2, st_, 1, WRITE)
    d.offer(0)
    assert r.dev.handle_queue(0) == 1 and r.mem.read_u8(st_) == VIRTIO_BLK_S_OK
    assert _file(disk, 24 * 512, 4096) == payload
    r.mem.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
    r.mem.fill(buf, 4096)
    d.put_desc(3, hdr, 16, NEXT, 4)
    d.put_desc(4, buf, 4096, WRITE | NEXT, 5)
    d.put_desc(5, st_, 1, WRITE)
    d.offer(3)
    assert r.dev.handle_queue(0) == 1 and r.mem.read_u8(st_) == VIRTIO_BLK_S_OK
    assert r.mem.read(buf, 4096) == _file(disk, 0, 4096)
    assert len(bounced) == 2


def test_direct_unaligned_disk_range_uses_buffered_fd(direct_rig, disk):
    r = direct_rig
    r.dev.dio_align = 4096               # as on a 4K-native disk: sector 1 is then misaligned
    payload = _pattern(512, seed=21)
    status, _, _ = r.request(VIRTIO_BLK_T_OUT, sector=1, out=payload, align=4096)
    assert status == VIRTIO_BLK_S_OK and _file(disk, 512, 512) == payload
    status, _, data = r.request(VIRTIO_BLK_T_IN, sector=1, in_len=512, align=4096)
    assert status == VIRTIO_BLK_S_OK and data == payload
    # and direct I/O afterwards sees the buffered write
    status, _, data = r.request(VIRTIO_BLK_T_IN, sector=0, in_len=4096, align=4096)
    assert data[512:1024] == payload


def test_direct_write_zeroes_and_flush(direct_rig, disk):
    status, _, _ = direct_rig.request(VIRTIO_BLK_T_WRITE_ZEROES, out=_segs((8, 8, 0)))
    assert status == VIRTIO_BLK_S_OK and _file(disk, 4096, 4096) == bytes(4096)
    assert direct_rig.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK


# ---------------------------------------------------------------------------
# the device base class: internal errors, logging
# ---------------------------------------------------------------------------
def test_internal_error_stops_the_device_without_raising(rig, monkeypatch, caplog):
    def boom(self, qi, chain):
        raise RuntimeError("device bug")
    monkeypatch.setattr(VirtioBlk, "process", boom)
    rig.drivers[0].add([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
    with caplog.at_level(logging.ERROR):
        assert rig.dev.handle_queue(0) == 0
    assert rig.dev.needs_reset and rig.resets == 1
    assert "device bug" in caplog.text and "Traceback" in caplog.text
    # nothing that pins frames (exceptions, exc_info) is kept in log records
    for rec in caplog.records:
        assert rec.exc_info is None
        assert all(isinstance(a, (int, float, str)) for a in (rec.args or ()))


def test_log_rate_limit(caplog):
    from exitless.devices.virtio.device import RateLimitedLog
    lg = logging.getLogger("exitless.virtio.test")
    rl = RateLimitedLog(lg, burst=3, interval=3600)
    with caplog.at_level(logging.WARNING, logger="exitless.virtio.test"):
        for i in range(100):
            rl(logging.WARNING, "message %d about %s", i, ValueError("x"))
    assert [r.getMessage() for r in caplog.records] == ["message 0 about x", "message 1 about x", "message 2 about x"]
