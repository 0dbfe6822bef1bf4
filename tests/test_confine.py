"""Confinement of back-end processes: the seccomp filter refuses what they do not need (the process
dies with SIGSYS, nothing else does), the normal path works under it, and the VMM reports a death."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exitless import confine
from exitless.devices.doorbell import DoorbellDevice
from exitless.memory import GuestMemory
from exitless.sidecore.process import DeviceSpec, SidecoreProcess

pytestmark = pytest.mark.skipif(not confine.status()[0], reason=confine.status()[1])
PROBE = """
import os, socket, sys
from exitless.confine import confine
assert confine()
print("confined", open("/proc/self/status").read().count("NoNewPrivs:\\t1"), flush=True)
{action}
print("survived", flush=True)
"""


def _run(action: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE.format(action=action)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


@pytest.mark.parametrize("action", ["socket.socket()", "os.fork()", "os.execv('/bin/true', ['true'])",
                                    "open('/tmp/exitless-confine-probe', 'w')", "os.kill(os.getppid(), 0)"])
def test_forbidden_syscall_kills_the_confined_process(action):
    p = _run(action)
    assert p.returncode == -signal.SIGSYS, (p.stdout, p.stderr)
    assert p.stdout == "confined 1\n"
    assert not os.path.exists("/tmp/exitless-confine-probe")


def test_allowed_work_and_opt_out():
    p = _run("import threading; t = threading.Thread(target=print, args=('thread',)); t.start(); t.join(); "
             "r, w = os.pipe(); os.write(w, b'x'); assert os.read(r, 1) == b'x'; open('/etc/hostname').read()")
    assert p.returncode == 0 and p.stdout.endswith("survived\n"), p.stderr
    p = subprocess.run([sys.executable, "-c", "from exitless.confine import confine; import socket; "
                        "print(confine()); socket.socket()"], capture_output=True, text=True,
                       env={**os.environ, "EXITLESS_CONFINE": "0"}, timeout=60)
    assert p.returncode == 0 and p.stdout == "False\n"


def _ring(mem: GuestMemory, page: int, value: int) -> None:
    dev = DoorbellDevice()
    reg = dev.doorbells()[0]
    mem.write_u32(page + dev.shadow_offset(reg), value)


def _ack(mem: GuestMemory, page: int) -> int:
    dev = DoorbellDevice()
    return mem.read_u32(page + dev.shared_area_offset())


def test_sidecore_process_confined_serves_and_its_death_is_reported(monkeypatch, caplog):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    with GuestMemory.create([(0, 1 << 20)]) as mem:
        page = 0x1000
        side = SidecoreProcess(mem, [DeviceSpec("confine_probe:ForbiddenDevice", page)], "poll", 64_000)
        try:
            status = Path(f"/proc/{side.proc.pid}/status").read_text()
            assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status     # filtered, no new privileges
            _ring(mem, page, 1)                                                # the normal path, confined
            deadline = time.monotonic() + 10
            while _ack(mem, page) != 1:
                assert time.monotonic() < deadline, "the confined sidecore did not answer"
                time.sleep(0.001)
            with caplog.at_level(logging.ERROR, logger="exitless.sidecore.process"):
                _ring(mem, page, 0xBAD)                                        # now a forbidden syscall
                side.proc.wait(10)
                deadline = time.monotonic() + 5
                while "seccomp" not in caplog.text and time.monotonic() < deadline:
                    time.sleep(0.01)
            assert side.proc.returncode == -signal.SIGSYS
            assert "killed by its seccomp filter" in caplog.text               # the VMM says so, at once
        finally:
            side.stop()
        assert "seccomp" in side.report["error"]
        mem.write_u32(0x2000, 7)                                               # this process goes on
        assert mem.read_u32(0x2000) == 7


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_serve_blk_drops_to_another_user_and_serves(tmp_path):
    from exitless.vhost_user.frontend import Frontend

    disk, sock = tmp_path / "d.img", tmp_path / "vu.sock"
    disk.write_bytes(bytes(1 << 20))
    proc = subprocess.Popen([sys.executable, "-m", "exitless.cli", "serve", "blk", "--socket", str(sock),
                             "--disk", str(disk), "--user", "nobody"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while "serving" not in (line := proc.stderr.readline()):
            assert line and time.monotonic() < deadline, "serve blk did not start"
        assert "confined (seccomp)" in line
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uid = next(l for l in status.splitlines() if l.startswith("Uid:")).split()[1:]
        assert set(uid) == {"65534"} and "Seccomp:\t2" in status
        with Frontend.connect(str(sock)) as fe:           # the socket was made before the drop
            assert fe.get_features() >> 32 & 1             # VIRTIO_F_VERSION_1: it answers
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert not sock.exists()                               # removed at exit although the server may not


@pytest.mark.parametrize("device", ["blk", "net"])
def test_serve_confined_a_forbidden_syscall_ends_only_it(tmp_path, monkeypatch, device):
    """``serve blk`` / ``serve net`` are confined after setup (the disk opened; the TAP attached in a
    namespace); a forbidden system call in the device model kills the server alone with SIGSYS --
    reported as its exit status, and to the frontend as a closed connection -- while its disk or TAP,
    the socket-removing helper and this process go on.  (Their data paths under the filter:
    tests/test_disk_faults.py, tests/test_vhost_user_net_qemu.py.)"""
    from exitless.vhost_user import protocol as P
    from exitless.vhost_user.frontend import Frontend

    try:
        from tests import netns as N
    except ImportError:
        import netns as N
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    sock, log = tmp_path / "vu.sock", tmp_path / "serve.log"
    with contextlib.ExitStack() as stack:
        if device == "net":
            if N.can_make_netns() is not None:
                pytest.skip(N.can_make_netns())
            ns = stack.enter_context(N.netns_with_tap("exlcnf0"))
            args = ["--tap", "exlcnf0", "--netns", ns]
        else:
            disk = tmp_path / "d.img"
            disk.write_bytes(bytes(1 << 20))
            args = ["--disk", str(disk)]
        with open(log, "wb") as f:
            proc = subprocess.Popen([sys.executable, "-c", "import sys, confine_probe; "
                                     "sys.exit(confine_probe.serve_main(sys.argv[1:]))",
                                     "serve", device, "--socket", str(sock), *args],
                                    stdout=subprocess.DEVNULL, stderr=f)
        try:
            deadline = time.monotonic() + 20
            while "serving" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            assert "confined (seccomp)" in log.read_text()
            status = Path(f"/proc/{proc.pid}/status").read_text()
            assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status
            with Frontend.connect(str(sock)) as fe:
                fe.set_owner()                                      # the control plane works confined
                fe.set_features((1 << 32) | (1 << P.F_PROTOCOL_FEATURES))
                fe.set_protocol_features(1 << P.PROTOCOL_F_CONFIG)
                assert len(fe.get_config(0, 6)) == 6                # capacity / the MAC
                fe.send(P.GET_CONFIG, P.CONFIG_HEAD.pack(0xBA, 3, 0) + bytes(3))
                assert fe.closed_by_peer(10)                        # the frontend sees it go
            assert proc.wait(10) == -signal.SIGSYS, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if device == "net":
            from pyroute2 import NetNS
            with NetNS(ns, flags=0) as n:
                assert n.link_lookup(ifname="exlcnf0")              # the TAP is still there
        else:
            assert disk.stat().st_size == 1 << 20
        deadline = time.monotonic() + 5
        while sock.exists() and time.monotonic() < deadline:       # the helper forked before confinement
            time.sleep(0.05)                                       # removed the socket
        assert not sock.exists()
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("flags,uid,seccomp", [(["--user", "nobody"], "65534", "2"), (["--no-confine"], "0", "0")])
def test_serve_net_user_and_no_confine(tmp_path, flags, uid, seccomp):
    """``serve net --user`` drops to that user after attaching its TAP (and stays confined);
    ``--no-confine`` leaves the filter off and says so."""
    from exitless.vhost_user import protocol as P
    from exitless.vhost_user.frontend import Frontend

    try:
        from tests import netns as N
        from tests.serveproc import ServeProcess
    except ImportError:
        import netns as N
        from serveproc import ServeProcess
    if N.can_make_netns() is not None:
        pytest.skip(N.can_make_netns())
    sock = tmp_path / "net.sock"
    with N.netns_with_tap("exlcnf1") as ns:
        be = ServeProcess("net", ["--socket", str(sock), "--tap", "exlcnf1", "--netns", ns, *flags],
                          tmp_path / "serve.log", ready_s=20)
        try:
            assert ("NOT confined" if seccomp == "0" else "confined (seccomp)") in be.text()
            status = Path(f"/proc/{be.proc.pid}/status").read_text()
            assert set(next(l for l in status.splitlines() if l.startswith("Uid:")).split()[1:]) == {uid}
            assert f"Seccomp:\t{seccomp}" in status
            with Frontend.connect(str(sock)) as fe:
                fe.set_features((1 << 32) | (1 << P.F_PROTOCOL_FEATURES))
                fe.set_protocol_features(1 << P.PROTOCOL_F_CONFIG)
                assert len(fe.get_config(0, 6)) == 6
        finally:
            assert be.stop() == 0, be.text()
    assert not sock.exists()


def test_doctor_says_confinement_is_available_because_it_was_tried():
    """doctor's line comes from a confined child that was killed for a forbidden call, not from a guess."""
    from exitless.doctor import Report, format_report

    text = format_report(Report(True, flavour="vmx", caps={}, cpu_features=[], missing_features=[]))
    line = next(l for l in text.splitlines() if l.startswith("back-end confinement:"))
    assert line.startswith("back-end confinement: available (seccomp filter via") and "SIGSYS" in line, line


def test_probe_tells_a_filter_that_does_not_hold(monkeypatch):
    monkeypatch.setattr(confine, "confine", lambda **kw: False)       # as if the filter were never loaded
    ok, why = confine.probe_filter()
    assert not ok and "lived" in why
    assert confine.status(probe=True)[0] is False
