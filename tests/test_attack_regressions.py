"""Regression tests from the security review of the branch 'attack' (hostile guest / frontend inputs).

No KVM needed; every case is short.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exitless.devices.virtio import queue as qmod
from exitless.devices.virtio.constants import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT
from exitless.devices.virtio.queue import Virtqueue, VirtqueueError
from exitless.memory import GuestMemory

MiB = 1 << 20
NEXT, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ring(mem: GuestMemory, size: int = 16) -> Virtqueue:
    q = Virtqueue(mem, size)
    q.size, q.desc_addr, q.avail_addr, q.used_addr = size, 0x1000, 0x2000, 0x3000
    q.indirect, q.ready = True, True
    q.validate()
    return q


@pytest.mark.parametrize("vring", ["c", "python"])
def test_indirect_table_of_zero_length_descriptors_is_walked_in_bounded_time(vring, monkeypatch):
    """Finding 1 (DoS): an indirect table may be as long as guest RAM (len/16 entries, here 3 Mi).  Zero-length
    descriptors are not counted against max_chain, and the loop check is ``steps >= len/16``, so a cycle of
    zero-length descriptors is walked len/16 times -- by C (GIL held in Ring.walk) and then again by Python
    (~0.3 us a step, GIL held): ~1 s here for 64 MiB, ~85 s per request for a 4 GiB guest, repeatable after
    every device reset.  The spec bounds a chain to the queue size; the walk must stop after O(max_size)."""
    if vring == "c" and qmod._vring is None:
        pytest.skip("C extension not built")
    monkeypatch.setattr(qmod, "C_VRING", vring == "c")
    mem = GuestMemory.create([(0, 64 * MiB)])
    try:
        q = _ring(mem)
        table = 16 * MiB
        entries = bytearray(16 * 65536)     # next is u16: a cycle through the first 64 Ki entries
        for i in range(65536):
            struct.pack_into("<QIHH", entries, 16 * i, 0, 0, NEXT, (i + 1) & 0xFFFF)
        mem.write(table, bytes(entries))
        n = (64 * MiB - table) // 16
        mem.write(0x1000, struct.pack("<QIHH", table, 16 * n, INDIRECT, 0))
        mem.write(0x2000 + 4, struct.pack("<H", 0))
        mem.write(0x2000 + 2, struct.pack("<H", 1))            # avail.idx = 1
        steps = [0]
        real = qmod._desc_unpack

        def counting(buf, off):
            steps[0] += 1
            return real(buf, off)

        monkeypatch.setattr(qmod, "_desc_unpack", counting)
        t0 = time.monotonic()
        with pytest.raises(VirtqueueError):
            q.pop()
        elapsed = time.monotonic() - t0
        assert steps[0] <= 4 * q.max_size + 2, f"Python walked {steps[0]} descriptors of a {n}-entry table"
        assert elapsed < 0.2, f"one chain took {elapsed:.2f} s"
    finally:
        mem.close()


_SIGBUS_SCRIPT = textwrap.dedent("""
    import fcntl, os, mmap, sys
    sys.path.insert(0, sys.argv[1])
    from exitless.vhost_user import memory as vm
    from exitless.vhost_user.protocol import MemRegion, ProtocolError
    size = 2 * mmap.PAGESIZE
    fd = os.memfd_create("frontend-ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    real = fcntl.fcntl
    def racing_fcntl(f, cmd, *args):
        # the frontend (which holds the same memfd) truncates it between the back-end's size check and its
        # seal: here, deterministically, just before the back-end reads the seals
        if cmd == vm.F_GET_SEALS:
            os.ftruncate(f, 0)
        return real(f, cmd, *args)
    vm.fcntl.fcntl = racing_fcntl
    try:
        mem = vm.VhostMemory([MemRegion(0, size, 0x7f0000000000, 0)], [os.dup(fd)])
    except ProtocolError as e:
        print("refused:", e)
        sys.exit(0)
    print("mapped; touching guest RAM")
    sys.stdout.flush()
    mem.guest.read(0, 16)     # SIGBUS: the page is beyond the end of the (now empty) file
    print("read ok")
""")


def test_mem_table_is_sealed_before_its_size_is_checked(tmp_path):
    """Checked, sound: VhostMemory._check_file checks st_size >= mmap_offset + size *before* it adds
    F_SEAL_SHRINK, so a frontend can truncate its memfd in between.  This is safe only because the seal comes
    before the mapping and Python's mmap.mmap re-checks the file size ("mmap length is greater than file
    size" -> ProtocolError).  This guards that order: a change to map first, or to map through another API
    without that check, would turn the race into a SIGBUS of the back-end."""
    script = tmp_path / "race.py"
    script.write_text(_SIGBUS_SCRIPT)
    r = subprocess.run([sys.executable, str(script), ROOT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"back-end died (status {r.returncode}): {r.stdout} {r.stderr[-500:]}"


@pytest.mark.parametrize("concurrent", [False, True], ids=["one-after-the-other", "at-once"])
def test_rx_of_two_queue_pairs_at_once_delivers_each_frame_intact(concurrent):
    """Finding 3 (RX data corruption): with VIRTIO_NET_F_MRG_RXBUF a frame longer than the first held buffer
    is read (readv, GIL released) into that buffer plus ``VirtioNet._bounce``, and the spill is then copied
    into the next buffers.  The bounce buffer is one per *device*, but the RX pump of each queue pair is
    guarded only by that pair's lock, and two pairs are pumped concurrently in the VMM: on the trap path the
    vCPU thread pumps the pair whose RX queue was kicked while the host-side sidecore thread pumps another
    pair's TAP fd.  One pair's readv then overwrites the spill of the other before it is copied: the guest
    gets a frame whose tail is another queue's traffic (with GUEST_CSUM the TAP marks it checksum-valid, so
    the guest's TCP accepts the corrupted payload)."""
    import threading
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_virtio_net import Rig, frame
    from exitless.devices.virtio.constants import VIRTIO_NET_CTRL_MQ
    r = Rig(pairs=2, queue_size=64)
    try:
        assert r.dev.mrg_rxbuf
        assert r.ctrl(VIRTIO_NET_CTRL_MQ, 0, struct.pack("<H", 2)) == 0      # VQ_PAIRS_SET 2: OK
        bad = []
        for rnd in range(30):
            frames = [frame(60000, seed=rnd * 2 + p) for p in range(2)]
            posted = [r.post([64] + [8192] * 8, pair=p) for p in range(2)]
            for p in range(2):
                r.tap.peers[p].send(bytes(12) + frames[p])
            go = threading.Barrier(2)

            def pump(p):
                go.wait(10)
                r.dev.rx_pump(p)

            if concurrent:
                ts = [threading.Thread(target=pump, args=(p,)) for p in range(2)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
            else:
                for p in range(2):
                    r.dev.rx_pump(p)
            for p in range(2):
                used = r.drivers[2 * p].get_used()
                data = b"".join(r.rx_payload(posted[p], used))
                if data[12:] != frames[p]:
                    bad.append((rnd, p))
        assert not bad, f"corrupted RX frames (round, pair): {bad}"
    finally:
        r.close()


def test_quiesce_rewinds_to_the_held_rx_buffers_not_past_a_returned_one():
    """Finding 4 (ring state, low): ``VirtioNet.quiesce`` (vhost-user GET_VRING_BASE, every data-plane
    restart) rewinds ``last_avail_idx`` by ``len(held)``, assuming the held RX buffers are the last ones
    popped.  An unusable RX chain (writable part < 12 bytes, chain.error, too many segments) popped after a
    usable one is *returned at once* (used, length 0) and not held.  The rewind then lands on that returned
    chain's slot: on restart it is completed a second time (a driver sees a used id it does not own), and the
    held buffer before it is never returned.  Fix: then return the held buffers used with length 0."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_virtio_net import Rig
    r = Rig()
    try:
        q = r.dev.queues[0]
        (a, _, _), = r.post([2048])          # usable: held by the device
        (b, _, _), = r.post([4])             # unusable: returned empty at once
        assert [h for h, _ in r.drivers[0].get_used()] == [b]
        assert q.last_avail_idx == 2
        r.dev.quiesce()
        # Resuming at the recorded base re-offers slots [base, 2): none of them may hold a completed chain,
        # and A must be re-offered or returned.
        base = q.last_avail_idx
        completed = {b} | {h for h, _ in r.drivers[0].get_used()}
        reoffered = {r.mem.read_u16(r.drivers[0].avail + 4 + 2 * s) for s in range(base, 2)}
        assert not reoffered & {b}, f"resume base {base}: chain {b}, already completed, would be taken again"
        assert a in reoffered | completed, f"chain {a} is neither re-offered nor returned"
    finally:
        r.close()


def test_nvme_guest_triggered_warnings_are_rate_limited(tmp_path, caplog):
    """Finding 5 (host log flood): the NVMe controller logs every ignored doorbell write, every bad PRP
    layout, every Doorbell Buffer Config refusal with a plain ``log.warning`` -- one host log line per guest
    action, unbounded.  With shadow doorbells the guest does not even exit: flipping an SQ tail slot between
    bad values makes the polling sidecore log at its own speed (host disk / journal filled, CPU burnt).  The
    virtio devices use RateLimitedLog for exactly this; the NVMe controller should too."""
    import logging
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from nvme_driver import DATA, Driver
    from exitless.devices.nvme import constants as K
    from exitless.devices.nvme.controller import NvmeController
    from exitless.devices.nvme.namespace import Namespace
    img = tmp_path / "ns.img"
    img.write_bytes(bytes(1 << 20))
    mem = GuestMemory.create([(0, 8 << 20)])
    ns = Namespace(img, lba_size=512)
    try:
        ctrl = NvmeController(mem, ns, max_io_queues=2, num_vectors=3)
        d = Driver(mem, ctrl)
        assert d.enable() == K.CSTS_RDY
        assert d.create_pair(1, size=16) == 0
        caplog.set_level(logging.WARNING, logger="exitless.devices.nvme")
        for i in range(2000):
            d.wreg(K.DOORBELL_BASE + 8, 16 + (i & 1))                 # SQ 1 tail >= size: ignored, logged
        for _ in range(200):                                           # reads with a PRP1 outside RAM
            assert d.cmd(1, K.NVM_READ, nsid=1, prp1=1 << 40, cdw12=0)[0] != 0
        n = sum(1 for rec in caplog.records if rec.name.startswith("exitless.devices.nvme"))
        assert n <= 50, f"{n} host log lines for 2200 guest actions"
    finally:
        ns.close()
        mem.close()


def _unsealable_memory(kind: str, where):
    """``open_file`` for :class:`GuestRam`: region files that cannot be sealed against shrinking."""
    import fcntl

    def open_file(name: str) -> int:
        if kind == "memfd sealed without F_SEAL_SHRINK":
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, 2 * MiB)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
            return fd
        path = os.path.join(where if kind == "file on a disk file system" else "/dev/shm", f"exitless-{name}-{os.getpid()}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.unlink(path)          # the fd keeps it; nothing is left behind
        return fd
    return open_file


@pytest.mark.parametrize("kind", ["file on a disk file system", "tmpfs file opened by path",
                                  "memfd sealed without F_SEAL_SHRINK"])
def test_serve_blk_refuses_memory_a_frontend_could_truncate(tmp_path, kind):
    """A vhost-user frontend whose guest memory is a file it can truncate would kill ``serve blk`` with
    SIGBUS (the rings and buffers are loads and stores into the mapping), and with it every other
    frontend that process serves.  So memory that cannot be sealed against shrinking is refused unless
    ``--allow-unsealed-memory`` says the frontend is trusted: the attacker truncates and kicks anyway,
    and the frontend on the other socket keeps being served."""
    from serveproc import ServeProcess
    from test_sidecore_service import roundtrip
    from test_vhost_user_backend import GuestRam, Session

    if kind == "tmpfs file opened by path" and not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    disks = [tmp_path / f"d{k}.img" for k in range(2)]
    for d in disks:
        d.write_bytes(b"\0" * MiB)
    socks = [str(tmp_path / f"vu{k}.sock") for k in range(2)]
    srv = ServeProcess("blk", ["--socket", socks[0], "--disk", str(disks[0]), "--socket", socks[1],
                               "--disk", str(disks[1])], tmp_path / "serve.log")
    ram = GuestRam(_unsealable_memory(kind, str(tmp_path)))
    try:
        with pytest.raises(Exception):
            s = Session(socks[0], ram=ram)      # refused: SET_MEM_TABLE fails, or the back-end hangs up
            s.close(ram=False)
        os.ftruncate(ram.fd_b, 0)              # what the attack would have done next: the rings' pages go
        assert srv.proc.poll() is None, srv.text()
        good = Session(socks[1])
        try:
            roundtrip(good, seed=5)
        finally:
            good.close()
        assert "sealed against shrinking" in srv.text()
    finally:
        ram.mem.close()
        os.close(ram.fd_a)
        os.close(ram.fd_b)
        assert srv.stop() == 0, srv.text()


def test_serve_blk_allow_unsealed_memory_trusts_the_frontend(tmp_path):
    """``--allow-unsealed-memory``: a file-backed frontend (QEMU's memory-backend-file) is served, with a
    warning that names the risk."""
    from serveproc import ServeProcess
    from test_sidecore_service import roundtrip
    from test_vhost_user_backend import GuestRam, Session

    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * MiB)
    sock = str(tmp_path / "vu.sock")
    srv = ServeProcess("blk", ["--socket", sock, "--disk", str(disk), "--allow-unsealed-memory"],
                       tmp_path / "serve.log")
    try:
        s = Session(sock, ram=GuestRam(_unsealable_memory("file on a disk file system", str(tmp_path))))
        try:
            roundtrip(s, seed=9)
        finally:
            s.close()
        assert "--allow-unsealed-memory" in srv.text()
    finally:
        assert srv.stop() == 0, srv.text()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b
                                                     and b not in (b".", b"..")))
def test_a_disk_path_of_any_bytes_gets_an_ascii_serial(tmp_path, name):
    """``run --disk $'\\xff.img'`` was a UnicodeEncodeError traceback: the GET_ID serial (virtio-blk) and the
    NVMe serial hash the path's bytes, whatever their encoding."""
    from exitless.devices.nvme.namespace import Namespace
    from exitless.devices.virtio.blk import VirtioBlk

    path = os.path.join(os.fsencode(tmp_path), name)
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    try:
        for make in (VirtioBlk, Namespace):
            dev = make(os.fsdecode(path))
            try:
                assert dev.serial.isascii() and len(dev.serial) <= 20, dev.serial
            finally:
                dev.close()
    finally:
        os.unlink(path)
