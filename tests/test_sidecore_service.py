"""``exitless sidecore`` against hostile peers, in process (no KVM): every bad connection is detached
with a log line, the service never raises, never keeps a detached peer's fds, never serves more than
its limit, and a good VM's I/O goes on, byte for byte, throughout (issue 12 item 2).

The good VM is the vhost-user test driver (:class:`test_vhost_user_backend.Session`) with the disk
handed over by EXITLESS_SET_BACKEND first, as ``run --sidecore`` does.
"""
from __future__ import annotations

import logging
import gc
import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from exitless.devices.virtio.constants import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from exitless.sidecore.service import ServiceConfigError, SidecoreService
from exitless.vhost_user import protocol as P
from exitless.vhost_user.frontend import Frontend, FrontendError

from fds import open_fds
from test_vhost_user_backend import MIB, UVA_A, GuestRam, Session, pattern
from test_vhost_user_hostile import _make_fd, memfd, messages, table

DISK_BYTES = 1 * MIB


def backend_payload(*, version=P.BACKEND_VERSION, device=2, flags=0, queues=1, qsize=256,
                    serial=b"sidecore-test") -> bytes:
    return P.BACKEND.pack(version, device, flags, queues, qsize, serial)


def hello_with(disk, **kw):
    """A ``hello`` for :class:`Session`: EXITLESS_SET_BACKEND with ``disk`` opened read-write."""
    def hello(fe: Frontend) -> None:
        fd = os.open(disk, os.O_RDWR | os.O_CLOEXEC)
        try:
            assert fe.request(P.EXITLESS_SET_BACKEND, backend_payload(**kw), [fd], expect_reply=True) == P.U64.pack(0)
        finally:
            os.close(fd)
    return hello


class Running:
    """A :class:`SidecoreService` serving on a thread; :meth:`stop` ends it and checks it ended cleanly."""

    def __init__(self, path, mode="poll", **kw):
        self.svc = SidecoreService(str(path), mode, **kw).listen()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            self.svc.serve_forever()
        except BaseException as e:    # would be a bug: the test fails on it
            self.error = e

    def wait_clients(self, n: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.svc.clients != n:
            assert time.monotonic() < deadline, f"{self.svc.clients} clients, expected {n}"
            time.sleep(0.02)

    def wait_detached(self, n: int, timeout: float = 30.0) -> None:
        """Until ``n`` connections in all have been detached (logged, fds closed)."""
        deadline = time.monotonic() + timeout
        while self.svc.detached < n:
            assert time.monotonic() < deadline, f"{self.svc.detached} detached, expected {n}"
            time.sleep(0.02)

    def stop(self) -> None:
        self.svc.request_stop()
        self.thread.join(30)
        self.svc.close()
        assert not self.thread.is_alive() and self.error is None, self.error


@pytest.fixture
def disk(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(DISK_BYTES))
    return p


def roundtrip(s: Session, seed: int, sector: int = 0) -> None:
    """Write a pattern to ``sector`` and read it back through the service."""
    data = pattern(4096, seed)
    s.ram.mem.write(0x20000, data)
    assert s.io(VIRTIO_BLK_T_OUT, sector, 0x20000, 4096) == VIRTIO_BLK_S_OK
    s.ram.mem.fill(0x40000, 4096)
    assert s.io(VIRTIO_BLK_T_IN, sector, 0x40000, 4096) == VIRTIO_BLK_S_OK
    assert s.ram.mem.read(0x40000, 4096) == data


@pytest.mark.parametrize("mode", ["poll", "adaptive"])
def test_two_vms_share_the_loop_and_detach(tmp_path, mode):
    fds0 = open_fds()
    disks = []
    for k in range(2):
        p = tmp_path / f"d{k}.img"
        p.write_bytes(bytes(DISK_BYTES))
        disks.append(p)
    run = Running(tmp_path / "s.sock", mode)
    try:
        a = Session(run.svc.path, hello=hello_with(disks[0]))
        b = Session(run.svc.path, hello=hello_with(disks[1]))
        assert len(run.svc.dataplane.loop.pollables) == 2      # one loop, both rings
        assert not [t for t in threading.enumerate() if t.name.endswith("-dataplane")]
        for i in range(8):
            roundtrip(a, i, 8 * i)
            roundtrip(b, 100 + i, 8 * i)
        assert disks[0].read_bytes()[:4096] == pattern(4096, 0)
        assert disks[1].read_bytes()[:4096] == pattern(4096, 100)
        a.close()
        run.wait_detached(1)
        roundtrip(b, 7)
        b.close()
        run.wait_detached(2)
        assert run.svc.dataplane.loop.pollables == []
    finally:
        run.stop()
    assert open_fds() == fds0


def _refusals(disk):
    rw = lambda: os.open(disk, os.O_RDWR | os.O_CLOEXEC)  # noqa: E731
    ro = lambda: os.open(disk, os.O_RDONLY | os.O_CLOEXEC)  # noqa: E731

    def pipe():
        r, w = os.pipe()
        os.close(w)
        return r

    def sock():
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach()

    ok = backend_payload()
    return {
        "first message is not EXITLESS_SET_BACKEND": (P.GET_FEATURES, b"", []),
        "another version": (P.EXITLESS_SET_BACKEND, backend_payload(version=2), [rw]),
        "not a virtio-blk": (P.EXITLESS_SET_BACKEND, backend_payload(device=1), [rw]),
        "unknown flags": (P.EXITLESS_SET_BACKEND, backend_payload(flags=1 << 7), [rw]),
        "no queues": (P.EXITLESS_SET_BACKEND, backend_payload(queues=0), [rw]),
        "too many queues": (P.EXITLESS_SET_BACKEND, backend_payload(queues=2**32 - 1), [rw]),
        "queue size not a power of two": (P.EXITLESS_SET_BACKEND, backend_payload(qsize=3), [rw]),
        "huge queue size": (P.EXITLESS_SET_BACKEND, backend_payload(qsize=1 << 31), [rw]),
        "serial not ASCII": (P.EXITLESS_SET_BACKEND, backend_payload(serial=b"\xff" * 20), [rw]),
        "short payload": (P.EXITLESS_SET_BACKEND, ok[:-1], [rw]),
        "no fd": (P.EXITLESS_SET_BACKEND, ok, []),
        "two fds without direct": (P.EXITLESS_SET_BACKEND, ok, [rw, rw]),
        "a pipe": (P.EXITLESS_SET_BACKEND, ok, [pipe]),
        "a socket": (P.EXITLESS_SET_BACKEND, ok, [sock]),
        "an eventfd": (P.EXITLESS_SET_BACKEND, ok, [lambda: os.eventfd(0)]),
        "an empty memfd": (P.EXITLESS_SET_BACKEND, ok, [lambda: os.memfd_create("empty")]),
        "read-only fd for a writable disk": (P.EXITLESS_SET_BACKEND, ok, [ro]),
        "direct without O_DIRECT": (P.EXITLESS_SET_BACKEND, backend_payload(flags=P.BACKEND_F_DIRECT), [rw, rw]),
    }


@pytest.fixture
def service(tmp_path):
    run = Running(tmp_path / "s.sock", io_timeout=1.0)
    yield run
    run.stop()


@pytest.mark.parametrize("case", sorted(_refusals("x")))
def test_bad_first_message_is_detached(service, disk, case, caplog):
    request, payload, makers = _refusals(disk)[case]
    good = Session(service.svc.path, hello=hello_with(disk))
    try:
        fds0 = open_fds()
        fe = Frontend.connect(service.svc.path)
        fds = [m() for m in makers]
        try:
            with caplog.at_level(logging.INFO, "exitless.sidecore.service"):
                fe.send(request, payload, fds, need_reply=True)
                assert fe.closed_by_peer(10)
                service.wait_detached(1)
        finally:
            for fd in fds:
                os.close(fd)
            fe.close()
        assert [r for r in caplog.records if "detached" in r.getMessage() and "refused" in r.getMessage()]
        roundtrip(good, 5)                       # the good VM never noticed
        assert open_fds() == fds0
    finally:
        good.close()


@pytest.mark.parametrize("case", ["silent", "stalled mid-message", "gone mid-message", "huge size", "garbage"])
def test_broken_streams_are_detached(service, disk, case, caplog):
    good = Session(service.svc.path, hello=hello_with(disk))
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(service.svc.path)
        with caplog.at_level(logging.INFO, "exitless.sidecore.service"):
            if case == "stalled mid-message":
                s.sendall(P.HEADER.pack(P.EXITLESS_SET_BACKEND, 1, P.BACKEND.size) + b"\1\0")
            elif case == "gone mid-message":
                s.sendall(P.HEADER.pack(P.EXITLESS_SET_BACKEND, 1, P.BACKEND.size) + b"\1\0")
                s.close()
            elif case == "huge size":
                s.sendall(P.HEADER.pack(P.EXITLESS_SET_BACKEND, 1, 2**32 - 1))
            elif case == "garbage":
                s.sendall(os.urandom(64))
            if case != "gone mid-message":
                s.settimeout(10)
                try:
                    assert s.recv(16) == b""        # the service hung up (after io_timeout for the quiet ones)
                except ConnectionResetError:
                    pass
                s.close()
            service.wait_detached(1)
        assert [r for r in caplog.records if "detached" in r.getMessage()]
        roundtrip(good, 9)
    finally:
        good.close()


def test_memory_that_could_shrink_or_rings_outside_it_are_refused(service, disk, tmp_path):
    """After a good EXITLESS_SET_BACKEND: a region in a plain file (not a memfd: it could be truncated
    under the service, SIGBUS) and a ring outside the memory are refused; the VM is then detached."""
    fe = Frontend.connect(service.svc.path)
    try:
        hello_with(disk)(fe)
        fe.set_protocol_features(1 << P.PROTOCOL_F_REPLY_ACK)
        fe.set_features((1 << 32) | (1 << P.F_PROTOCOL_FEATURES))
        plain = tmp_path / "ram"
        plain.write_bytes(bytes(MIB))
        fd = os.open(plain, os.O_RDWR)
        try:
            with pytest.raises(FrontendError):
                fe.set_mem_table([(0, MIB, UVA_A, 0)], [fd])
        finally:
            os.close(fd)
        m = memfd()
        try:
            with pytest.raises(FrontendError):        # a region bigger than its memfd
                fe.set_mem_table([(0, 4 * MIB, UVA_A, 0)], [m])
            fe.set_mem_table([(0, MIB, UVA_A, 0)], [m])
        finally:
            os.close(m)
        fe.set_vring_num(0, 64)
        with pytest.raises(FrontendError):            # a ring past the end of the memory
            fe.set_vring_addr(0, UVA_A + MIB - 0x100, UVA_A, UVA_A + 0x1000)
    finally:
        fe.close()
    service.wait_detached(1)


def test_connections_beyond_the_limit_are_refused(tmp_path, disk, caplog):
    run = Running(tmp_path / "s.sock", max_clients=2)
    try:
        with caplog.at_level(logging.INFO, "exitless.sidecore.service"):
            a = Session(run.svc.path, hello=hello_with(disk))
            b = Frontend.connect(run.svc.path)
            run.wait_clients(2)
            c = Frontend.connect(run.svc.path)
            assert c.closed_by_peer(10)
            c.close()
        assert run.svc.refused == 1 and "refused: already serving 2 VMs" in caplog.text
        roundtrip(a, 3)
        b.close()
        a.close()
        run.wait_detached(2)
    finally:
        run.stop()


def test_bad_configuration_is_the_users_error(tmp_path):
    with pytest.raises(ServiceConfigError):
        SidecoreService(str(tmp_path / "s"), "notify")
    with pytest.raises(ServiceConfigError):
        SidecoreService(str(tmp_path / "s"), "poll", max_clients=0)
    with pytest.raises(ServiceConfigError):
        SidecoreService(str(tmp_path / "s"), "adaptive", poll_max_ns=1000)
    with pytest.raises(ServiceConfigError):
        SidecoreService(str(tmp_path / "s"), "poll", idle_yield_ns=-1)


# ---------------------------------------------------------------------------------------------- the kind
_HELLOS = st.sampled_from(["good", "none", "bad-version", "bad-fd", "ro-fd"])


class ServiceUnderAttack(RuleBasedStateMachine):
    """Hostile connections come, send any message stream (with any fds), stall, cut messages short and
    go, while one good VM does I/O; after every step the good VM's write-then-read is byte for byte,
    the service and its loop are alive and within their limit; at the end every fd is back."""

    conns = Bundle("conns")

    def __init__(self):
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="sidecore-attack-")
        self.disk = os.path.join(self.dir, "disk.img")
        with open(self.disk, "wb") as f:
            f.truncate(DISK_BYTES)
        self.fds0 = open_fds()
        self.run = Running(os.path.join(self.dir, "s.sock"), "poll", io_timeout=0.5, max_clients=6)
        self.good = Session(self.run.svc.path, hello=hello_with(self.disk))
        self.round = 0
        self.open: list[Frontend] = []

    @rule(target=conns, hello=_HELLOS)
    def connect(self, hello):
        fe = Frontend.connect(self.run.svc.path, timeout=2)
        self.open.append(fe)
        try:
            if hello == "good":
                hello_with(self.disk)(fe)
                fe.set_protocol_features(1 << P.PROTOCOL_F_REPLY_ACK)
            elif hello != "none":
                fd = (os.eventfd(0) if hello == "bad-fd" else
                      os.open(self.disk, os.O_RDONLY if hello == "ro-fd" else os.O_RDWR))
                try:
                    fe.send(P.EXITLESS_SET_BACKEND, backend_payload(version=0 if hello == "bad-version" else 1),
                            [fd])
                finally:
                    os.close(fd)
        except (OSError, FrontendError):
            pass    # refused beyond the limit, or hung up on: both fine
        return fe

    @rule(fe=conns, msgs=st.lists(messages(), min_size=1, max_size=6))
    def send_messages(self, fe, msgs):
        for request, flags, payload, kinds in msgs:
            fds = [_make_fd(k) for k in kinds]
            try:
                fe.send(request, payload, fds, flags=flags)
            except OSError:
                return
            finally:
                for fd in fds:
                    os.close(fd)

    @rule(fe=conns, data=st.binary(min_size=1, max_size=64))
    def send_bytes(self, fe, data):
        try:
            fe.sock.sendall(data)
        except OSError:
            pass

    @rule(fe=consumes(conns), cut=st.integers(1, 40))
    def hang_up_mid_message(self, fe, cut):
        msg = P.encode(P.SET_VRING_ADDR, P.ADDR.pack(0, 0, UVA_A, UVA_A, UVA_A, 0))
        try:
            fe.sock.sendall(msg[:cut])
        except OSError:
            pass
        fe.close()

    @rule(fe=consumes(conns))
    def hang_up(self, fe):
        fe.close()

    @invariant()
    def the_good_vm_goes_on(self):
        if not hasattr(self, "good"):
            return
        self.round += 1
        roundtrip(self.good, self.round, 8 * (self.round % 64))
        assert self.run.error is None and self.run.thread.is_alive()
        assert self.run.svc.dataplane.error is None and self.run.svc.dataplane.thread.is_alive()
        assert self.run.svc.clients <= 6

    def teardown(self):
        try:
            for fe in self.open:
                fe.close()
            # every hostile connection accepted (or refused at the limit) and detached
            self.run.wait_detached(len(self.open) - self.run.svc.refused)
            self.run.wait_clients(1)
            roundtrip(self.good, 255)
            self.good.close()
            self.run.wait_detached(len(self.open) - self.run.svc.refused + 1)
            assert self.run.svc.dataplane.loop.pollables == []
        finally:
            self.run.stop()
        # what must hold is that every fd a hostile VM handed over is closed once it is gone; an fd
        # kept by an object in a reference cycle (an exception's frames) goes at the next collection
        deadline = time.monotonic() + 5
        while open_fds() != self.fds0 and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
        assert open_fds() == self.fds0, sorted(os.listdir("/proc/self/fd"))
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


ServiceUnderAttack.TestCase.settings = settings(max_examples=25, stateful_step_count=12, deadline=None,
                                               suppress_health_check=list(HealthCheck))
test_service_under_attack = ServiceUnderAttack.TestCase


def test_cli_usage_errors(tmp_path):
    """``exitless sidecore`` with a taken socket or a bad limit: one line, exit 2; SIGTERM: exit 0."""
    import subprocess
    import sys

    try:
        from serveproc import ServeProcess
    except ImportError:  # run from the repository root as a package
        from tests.serveproc import ServeProcess

    sock = tmp_path / "s.sock"
    svc = ServeProcess(None, ["--socket", str(sock), "--no-confine"], tmp_path / "log", command=("sidecore",))
    try:
        for args, words in ((["--socket", str(sock)], "another process is listening"),
                            (["--socket", str(tmp_path / "t.sock"), "--max-vms", "0"], "--max-vms"),
                            (["--socket", str(tmp_path / "t.sock"), "--max-vms", "1025"], "--max-vms 1025"),
                            (["--socket", str(tmp_path / "t.sock"), "--poll-max-us", "3"], "--poll-max-us 3"),
                            (["--socket", str(tmp_path / "no" / "dir.sock")], "cannot listen here")):
            r = subprocess.run([sys.executable, "-m", "exitless", "sidecore", *args], capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        assert svc.stop() == 0          # SIGTERM: a clean stop
    assert "NOT confined" in svc.text() and not sock.exists()


@st.composite
def _backends(draw):
    return P.Backend(P.BACKEND_VERSION, draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, P.BACKEND_FLAGS)),
                     draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)),
                     draw(st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=20)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60) | st.binary(min_size=P.BACKEND.size, max_size=P.BACKEND.size), _backends())
def test_backend_payload_decodes_or_is_refused(data, good):
    """EXITLESS_SET_BACKEND's decoder: any bytes give a Backend or ProtocolError (nothing else), and
    every well-formed payload round-trips."""
    try:
        b = P.backend(P.Message(P.EXITLESS_SET_BACKEND, 1, data))
        assert b.version == P.BACKEND_VERSION and not b.flags & ~P.BACKEND_FLAGS and b.serial.isascii()
        assert P.expected_fds(P.Message(P.EXITLESS_SET_BACKEND, 1, data)) in (1, 2)
    except P.ProtocolError:
        pass
    assert P.backend(P.Message(P.EXITLESS_SET_BACKEND, 1, P.encode_backend(good))) == good


@pytest.mark.parametrize("why", ["at --max-vms", "refuses the disk"])
def test_a_vm_refused_by_the_service_says_why_in_one_line(tmp_path, disk, why):
    """``run --sidecore`` beyond ``--max-vms`` printed "refused d.img: [Errno 32] Broken pipe": a VM whose
    hand-over the service refuses gets a RemoteSidecoreError that names the service, the disk and the
    likely reasons, without an errno prefix, and leaks no fd."""
    from types import SimpleNamespace

    from exitless.devices.virtio.blk import VirtioBlk
    from exitless.sidecore.remote import RemoteQueues, RemoteSidecoreError

    run = Running(tmp_path / "s.sock", max_clients=1)
    held = Frontend.connect(run.svc.path) if why == "at --max-vms" else None
    dev = VirtioBlk(disk, queue_size=4096 if why == "refuses the disk" else 256)
    try:
        if held is not None:
            run.wait_clients(1)
        before = open_fds()
        with pytest.raises(RemoteSidecoreError) as e:
            RemoteQueues(run.svc.path, SimpleNamespace(device=dev, slot=1, machine=None))
        msg = str(e.value)
        assert "Errno" not in msg and "\n" not in msg, msg
        assert msg.startswith(f"the sidecore service at {run.svc.path} refused {disk}: ") and "--max-vms" in msg, msg
        assert open_fds() <= before
    finally:
        dev.close()
        if held is not None:
            held.close()
        run.stop()
