"""Several vhost-user frontends served at once from one polling loop (issue 12 item 3).

Three disks, three sockets, three servers, one shared :class:`SidecoreLoop` on one thread: two
frontends write and read back their disks in interleaved batches while a third disconnects with
requests in flight and then a garbage-sending client connects to its socket; the two go on to the
end, byte for byte, on the one loop (no per-session data-plane thread), and when everything is
detached the loop serves nothing and the fds are back to where they started.  No KVM needed.
"""
from __future__ import annotations

import os
import socket
import threading

import pytest

from exitless.devices.virtio.blk import VirtioBlk
from exitless.devices.virtio.constants import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from exitless.sidecore.loop import SidecoreLoop, SidecoreThread
from exitless.vhost_user import VhostUserServer
from exitless.vhost_user.backend import LOOP_MODE

try:
    from fds import open_fds
    from test_vhost_user_backend import DISK_BYTES, Session, pattern
except ImportError:  # run from the repository root as a package
    from tests.fds import open_fds
    from tests.test_vhost_user_backend import DISK_BYTES, Session, pattern


@pytest.mark.parametrize("io", ["kick", "poll", "adaptive"])
def test_frontends_share_one_loop_and_survive_a_bad_one(tmp_path, io):
    fds0 = open_fds()
    loop = SidecoreLoop([], LOOP_MODE[io], poll_ns=64_000, name="shared-dataplane")
    worker = SidecoreThread(loop).start()
    disks, devs, servers = [], [], []
    try:
        for k in range(3):
            p = tmp_path / f"d{k}.img"
            p.write_bytes(bytes(DISK_BYTES))
            disks.append(p)
            devs.append(VirtioBlk(p, queue_size=256))
            servers.append(VhostUserServer(str(tmp_path / f"vu{k}.sock"), devs[k], io, dataplane=loop,
                                           name=f"vu{k}").start())
        a, b, c = (Session(s.path) for s in servers)
        try:
            # no session started a data-plane thread of its own: all rings are on the shared loop
            assert not [t for t in threading.enumerate() if t.name.endswith("#1-dataplane")]
            assert len(loop.pollables) == 3
            # c: requests in flight, then the connection goes away
            c.ram.mem.write(0x20000, pattern(4096, 99))
            for k in range(4):
                c.submit(VIRTIO_BLK_T_OUT, 8 * k, 0x20000, 4096, k)
            c.close(ram=False)
            assert servers[2].wait_connections(1, 10)
            c.ram.close()
            # then a client that sends garbage to the same socket
            g = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            g.connect(servers[2].path)
            g.sendall(b"\xff" * 64)
            g.settimeout(10)
            try:
                assert g.recv(16) == b""      # the server dropped it...
            except ConnectionResetError:      # ...with our unread garbage still queued
                pass
            g.close()
            assert servers[2].wait_connections(2, 10)
            assert len(loop.pollables) == 2   # c's ring left the loop; a's and b's never stopped

            # a and b: interleaved batches of 4 writes each, then read back
            for s, seed in ((a, 1), (b, 2)):
                s.data = pattern(64 * 4096, seed)
            for batch in range(16):
                for s in (a, b):
                    statuses = []
                    for k in range(4):
                        i = batch * 4 + k
                        gpa = 0x20000 + 0x1000 * k
                        s.ram.mem.write(gpa, s.data[i * 4096:(i + 1) * 4096])
                        statuses.append(s.submit(VIRTIO_BLK_T_OUT, 8 * i, gpa, 4096, k))
                    s.statuses = statuses
                for s in (a, b):
                    s.wait(4)
                    assert [s.ram.mem.read_u8(st) for st in s.statuses] == [VIRTIO_BLK_S_OK] * 4
            for s in (a, b):
                assert s.io(VIRTIO_BLK_T_FLUSH, 0, 0, 0) == VIRTIO_BLK_S_OK
                for i in (0, 17, 63):
                    assert s.io(VIRTIO_BLK_T_IN, 8 * i, 0x40000, 4096) == VIRTIO_BLK_S_OK
                    assert s.ram.mem.read(0x40000, 4096) == s.data[i * 4096:(i + 1) * 4096]
            assert disks[0].read_bytes()[:64 * 4096] == a.data
            assert disks[1].read_bytes()[:64 * 4096] == b.data
        finally:
            a.close()
            b.close()
        assert servers[0].wait_connections(1, 10) and servers[1].wait_connections(1, 10)
        assert loop.pollables == []           # every session detached from the shared loop
        assert worker.error is None and worker.thread.is_alive()
    finally:
        for s in servers:
            s.stop()
        worker.stop()
        for d in devs:
            d.close()
    assert open_fds() == fds0


def test_serve_blk_cli_several_pairs(tmp_path):
    """``exitless serve blk`` with two --socket/--disk pairs: two frontends at once, one of them drops
    mid-I/O, the other finishes; SIGTERM ends it with status 0.  Unpaired options exit 2."""
    import signal
    import subprocess
    import sys
    import time

    r = subprocess.run([sys.executable, "-m", "exitless.cli", "serve", "blk", "--socket", str(tmp_path / "a.sock"),
                        "--socket", str(tmp_path / "b.sock"), "--disk", str(tmp_path / "x.img")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "2 --socket for 1 --disk" in r.stderr and "Traceback" not in r.stderr

    disks = [tmp_path / f"d{k}.img" for k in range(2)]
    socks = [str(tmp_path / f"s{k}.sock") for k in range(2)]
    for d in disks:
        d.write_bytes(bytes(DISK_BYTES))
    cmd = [sys.executable, "-m", "exitless.cli", "serve", "blk", "--io", "adaptive"]
    for s, d in zip(socks, disks):
        cmd += ["--socket", s, "--disk", str(d)]
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not all(os.path.exists(s) for s in socks):
            assert proc.poll() is None and time.monotonic() < deadline, open(tmp_path / "serve.log").read()
            time.sleep(0.05)
        a, b = Session(socks[0]), Session(socks[1])
        try:
            b.ram.mem.write(0x20000, pattern(4096, 7))
            for k in range(4):
                b.submit(VIRTIO_BLK_T_OUT, 8 * k, 0x20000, 4096, k)
            b.close()                                    # gone with requests in flight
            data = pattern(32 * 4096, 5)
            for i in range(32):
                a.ram.mem.write(0x20000, data[i * 4096:(i + 1) * 4096])
                assert a.io(VIRTIO_BLK_T_OUT, 8 * i, 0x20000, 4096) == VIRTIO_BLK_S_OK
            assert a.io(VIRTIO_BLK_T_FLUSH, 0, 0, 0) == VIRTIO_BLK_S_OK
            assert disks[0].read_bytes()[:len(data)] == data
            b2 = Session(socks[1])                       # the dropped socket serves a new frontend
            try:
                assert b2.io(VIRTIO_BLK_T_IN, 0, 0x30000, 4096) == VIRTIO_BLK_S_OK
            finally:
                b2.close()
        finally:
            a.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.seek(0)
        text = log.read()
        log.close()
    assert "Traceback" not in text and "vhost-user-blk1" in text, text
