"""The C fast path (exitless/devices/virtio/_vring.c) and the pure-Python data plane agree.

tests/conftest.py already runs every case of test_virtqueue.py and test_virtio_blk.py under both;
here random (hostile) rings and random virtio-blk request mixes go through both side by side:

* a chain walk: C accepts a chain exactly when Python accepts it without error, with the same
  segments; whatever Python refuses (VirtqueueError) or flags (chain.error), C leaves to Python;
* a device: the same requests on two copies of one disk give the same used ring, status bytes,
  data read and disk contents, whichever path completed which request.

No KVM needed.
"""
from __future__ import annotations

import os
import shutil
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exitless.devices.virtio import queue as qmod
from exitless.devices.virtio.blk import VirtioBlk
from exitless.devices.virtio.constants import (
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)
from exitless.devices.virtio.queue import Virtqueue, VirtqueueError
from exitless.memory import GuestMemory

try:
    from test_virtqueue import HEAP, RAM, RING_SIZE, TABLE_ENTRIES, Driver, _desc, _ind_desc, _table_desc
except ImportError:  # run from the repository root as a package
    from tests.test_virtqueue import HEAP, RAM, RING_SIZE, TABLE_ENTRIES, Driver, _desc, _ind_desc, _table_desc

pytestmark = pytest.mark.skipif(qmod._vring is None, reason="the C extension _vring is not built")

_MEM: list[GuestMemory] = []


def _mem() -> GuestMemory:
    if not _MEM:
        _MEM.append(GuestMemory.create([(0, RAM)]))
    return _MEM[0]


def _python_walk(q: Virtqueue, head: int):
    """Virtqueue._walk with the C ring set aside: ("error", why) | ("chain", segments, rlen, wlen, error)."""
    ring, q._cring = q._cring, None
    broken = q.broken
    try:
        c = q._walk(head)
    except VirtqueueError as e:
        return ("raise", str(e))
    finally:
        q._cring = ring
        q.broken = broken
    return ("chain", [tuple(s) for s in c.segments], c.readable_len, c.writable_len, c.error)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    descs=st.lists(st.integers(0, 4).flatmap(lambda k: _ind_desc if k == 0 else _desc),
                   min_size=RING_SIZE, max_size=RING_SIZE),
    table=st.lists(st.integers(0, 8).flatmap(lambda k: _ind_desc if k == 0 else _table_desc),
                   min_size=TABLE_ENTRIES, max_size=TABLE_ENTRIES),
    head=st.integers(0, RING_SIZE - 1) | st.integers(0, 0xFFFF),
    indirect=st.booleans(),
    max_size=st.sampled_from([RING_SIZE, 4 * RING_SIZE]),
)
def test_walk_agrees(descs, table, head, indirect, max_size):
    m = _mem()
    m.fill(0, RAM)
    for i, (a, n, f, nx) in enumerate(table):
        m.write(HEAP + 16 * i, struct.pack("<QIHH", a, n, f, nx))
    for i, (a, n, f, nx) in enumerate(descs):
        m.write(0x1000 + 16 * i, struct.pack("<QIHH", a, n, f, nx))
    saved = qmod.C_VRING
    qmod.C_VRING = True
    try:
        q = Virtqueue(m, max_size)
        q.size, q.desc_addr, q.avail_addr, q.used_addr = RING_SIZE, 0x1000, 0x2000, 0x3000
        q.indirect = indirect
        q.validate()
    finally:
        qmod.C_VRING = saved
    py = _python_walk(q, head)
    c = q._cring.walk(head)
    if py[0] == "chain" and py[4] is None:          # valid: C must take it, identically (one RAM region here)
        assert c is not None
        segs, rlen, wlen = c
        assert (segs, rlen, wlen) == (py[1], py[2], py[3])
    else:                                           # refused or flagged: C leaves it to Python
        assert c is None


# ---------------------------------------------------------------------------
# virtio-blk: random request mixes through both paths
# ---------------------------------------------------------------------------
MiB = 1 << 20
DISK_SECTORS = 64
_req = st.tuples(
    st.sampled_from([VIRTIO_BLK_T_IN] * 6 + [VIRTIO_BLK_T_OUT] * 4 + [VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
                                                                        VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES,
                                                                        3, 0xFFFF_FFFF]),
    st.integers(0, DISK_SECTORS + 2) | st.sampled_from([2**63, 2**64 - 1]),      # sector
    st.sampled_from([0, 1, 511, 512, 1024, 4096, 4608]),                        # data bytes
    st.integers(0, 3),                                                           # layout
)


class _Side:
    def __init__(self, path: str, use_c: bool, event_idx: bool):
        saved = qmod.C_VRING
        qmod.C_VRING = use_c
        try:
            self.mem = GuestMemory.create([(0, 8 * MiB)])
            self.dev = VirtioBlk(path, serial="vring-paths")   # GET_ID: the same on both sides
            feats = self.dev.device_features()
            if not event_idx:
                feats &= ~(1 << 29)
            q = self.dev.create_queues(self.mem)[0]
            self.d = Driver(self.mem, size=64, event_idx=event_idx, indirect=True, ring_base=0x10000,
                            heap=0x100000, heap_end=0x700000, queue=q)
            self.signals: list[int] = []
            self.dev.activate(self.mem, [q], feats, self.signals.append)
        finally:
            qmod.C_VRING = saved

    def close(self):
        self.dev.close()
        self.mem.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(_req, min_size=1, max_size=6), min_size=1, max_size=4),
       event_idx=st.booleans(), budget=st.sampled_from([None, 1, 2, 3]))
def test_blk_paths_agree(batches, event_idx, budget):
    tmp = tempfile.mkdtemp(prefix="exitless-vring-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    try:
        paths = []
        for name in ("py.img", "c.img"):
            p = os.path.join(tmp, name)
            with open(p, "wb") as f:
                f.write(bytes((i * 7 + i // 512) & 0xFF for i in range(DISK_SECTORS * 512)))
            paths.append(p)
        sides = [_Side(paths[0], False, event_idx), _Side(paths[1], True, event_idx)]
        try:
            for batch in batches:
                outcome = []
                for s in sides:
                    placed = []
                    for k, (rtype, sector, n, layout) in enumerate(batch):
                        hdr = struct.pack("<IIQ", rtype, 0, sector)
                        data = bytes(((k + 1) * 31 + i) & 0xFF for i in range(n))
                        if rtype == VIRTIO_BLK_T_IN or rtype == VIRTIO_BLK_T_GET_ID:
                            outs, ins = [hdr], ([n] if n else []) + [1]
                            if layout == 1 and n:
                                ins = [n + 1]                                    # data and status together
                        else:
                            outs, ins = ([hdr[:5], hdr[5:]] if layout == 1 else [hdr]) + ([data] if n else []), [1]
                        if layout == 3:
                            ins = ins + [1]                                      # an extra writable byte
                        head, gpas = s.d.add(outs, ins, indirect=layout == 2, publish=False)
                        placed.append((head, gpas, len(outs), ins))
                    s.d.publish()
                    done = 0
                    while True:   # a sidecore's rounds: at most ``budget`` chains each, until a short one
                        n = s.dev.handle_queue(0, budget)
                        done += n
                        if budget is None or n < budget:
                            break
                    used = s.d.get_used()
                    ins_bytes = [b"".join(s.mem.read(g, n) for g, n in zip(gpas[no:], ins))
                                 for head, gpas, no, ins in placed]
                    outcome.append((done, used, ins_bytes, len(s.signals), s.dev.needs_reset))
                assert outcome[0] == outcome[1]
            with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
                assert a.read() == b.read()
        finally:
            for s in sides:
                s.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_c_path_takes_the_common_case():
    """The fast path is really used: plain reads and writes complete without process()."""
    tmp = tempfile.mkdtemp(prefix="exitless-vring-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    try:
        p = os.path.join(tmp, "d.img")
        with open(p, "wb") as f:
            f.write(bytes(range(256)) * (DISK_SECTORS * 2))
        side = _Side(p, True, True)
        calls = []
        real = VirtioBlk.process
        side.dev.process = lambda qi, chain: (calls.append(chain.head), real(side.dev, qi, chain))[1]
        try:
            d = side.d
            for i in range(8):
                d.add([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, i)], [4096, 1], publish=False)
            d.add([struct.pack("<IIQ", VIRTIO_BLK_T_FLUSH, 0, 0)], [1], publish=False)   # Python's
            d.add([struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 1), b"\xAB" * 512], [1], publish=False)
            d.publish()
            assert side.dev.handle_queue(0) == 10
            assert len(calls) == 1                          # only the flush went through process()
            assert len(d.get_used()) == 10 and side.signals == [0]
            with open(p, "rb") as f:
                f.seek(512)
                assert f.read(512) == b"\xAB" * 512
        finally:
            side.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
