"""The listening side: a unix socket, one frontend at a time, messages with fds over SCM_RIGHTS.

``VhostUserServer(path, device, io).listen()`` then ``serve_forever()`` (or
``start()`` for a thread).  Each accepted connection gets a fresh
:class:`~exitless.vhost_user.backend.VhostUserBackend` over the same device;
when the frontend goes away -- cleanly, by crashing, or because it sent
something unacceptable -- the session is closed (data plane stopped, device
reset, memory unmapped, fds closed) and the next connection is served.
A second frontend that connects while one is being served is told so in the
log and disconnected.

Framing: a message is read with ``recvmsg`` (header, then payload), fds
collected from every piece; more than 8 fds (``MSG_CTRUNC``) fail the message.
Once a message has started, the rest must arrive within ``io_timeout``
seconds, so a frontend that stalls mid-message cannot wedge the backend.
"""
from __future__ import annotations

from ..errors import ExitlessError
import array
import logging
import os
import select
import socket
import stat
import struct
import threading
import time

from exitless.devices.virtio.device import VirtioDevice

from . import protocol as P
from .backend import IO_MODES, VhostUserBackend
from .protocol import FramingError, Message, ProtocolError

log = logging.getLogger("exitless.vhost_user")

_FD_SPACE = socket.CMSG_SPACE(P.MAX_FDS * 4)


class SocketPathError(ExitlessError, OSError):
    """The socket path cannot be used (a live listener is there, or it is not a socket)."""


class PeerClosed(Exception):
    """The frontend closed the connection between messages."""


def claim_socket_path(path: str) -> None:
    """Make ``path`` bindable: remove a stale socket, refuse a live listener or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(2)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)          # nobody listens: a stale socket from a previous run
        return
    except OSError as e:
        raise SocketPathError(f"{path}: cannot tell whether it is in use: {e.strerror}") from None
    finally:
        probe.close()
    raise SocketPathError(f"{path}: another process is listening on this socket")


def listen_socket(path: str, backlog: int) -> tuple[socket.socket, int]:
    """A unix stream socket listening on ``path`` (a stale socket file there is replaced) and the inode
    of its file (for :func:`close_socket`).  Raises :class:`SocketPathError` for a path in use or one
    that cannot be bound (no such directory, no permission, too long: the user's path)."""
    claim_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(backlog)
        return sock, os.stat(path).st_ino
    except OSError as e:
        sock.close()
        raise SocketPathError(f"{path}: cannot listen here: {e.strerror or e}") from e
    except BaseException:
        sock.close()
        raise


def close_socket(sock: socket.socket, path: str, ino: int) -> None:
    """Close a socket of :func:`listen_socket` and remove its file if it is still ours (inode ``ino``)."""
    sock.close()
    try:
        if os.stat(path).st_ino == ino:
            os.unlink(path)
    except OSError:
        pass


def _fds_from(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[:len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def recv_message(conn: socket.socket, io_timeout: float = 10.0) -> Message:
    """Read one message; raises PeerClosed on a clean EOF before it, FramingError on a broken stream,
    TooManyFds (its ``msg`` without fds) when more than :data:`~exitless.vhost_user.protocol.MAX_FDS` came.

    The caller has waited until ``conn`` is readable.  Fds received before an
    error are closed here.
    """
    fds: list[int] = []
    truncated = False

    def read(n: int, first: bool) -> bytes:
        nonlocal truncated
        buf = bytearray()
        while len(buf) < n:
            try:
                data, anc, flags, _ = conn.recvmsg(n - len(buf), _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
            except socket.timeout:
                raise FramingError(f"the frontend stalled mid-message ({len(buf)} of {n} bytes)") from None
            except ConnectionResetError:
                data, anc, flags = b"", [], 0
            fds.extend(_fds_from(anc))
            if flags & socket.MSG_CTRUNC:
                truncated = True
            if len(fds) > P.MAX_FDS:      # fds sent with every piece of one message: keep none beyond the cap
                for fd in fds[P.MAX_FDS:]:
                    os.close(fd)
                del fds[P.MAX_FDS:]
                truncated = True
            if not data:
                if first and not buf:
                    raise PeerClosed()
                raise FramingError(f"connection closed mid-message ({len(buf)} of {n} bytes)")
            buf += data
            first = False
        return bytes(buf)

    conn.settimeout(io_timeout)
    try:
        request, flags, size = P.parse_header(read(P.HEADER_SIZE, True))
        payload = read(size, False) if size else b""
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    msg = Message(request, flags, payload, fds)
    if truncated:
        for fd in fds:
            os.close(fd)
        msg.fds = []
        raise TooManyFds(msg)
    return msg


class TooManyFds(Exception):
    """More fds than fit in one message arrived (the kernel dropped the rest)."""

    def __init__(self, msg: Message):
        super().__init__(f"{msg.name}: more than {P.MAX_FDS} fds")
        self.msg = msg


def peer_name(conn: socket.socket) -> str:
    """``pid P uid U`` of the process at the other end of unix socket ``conn`` (for log lines)."""
    try:
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return f"pid {pid} uid {uid}"
    except OSError:
        return "unknown peer"


class VhostUserServer:
    """Serve ``device`` on the unix socket ``path`` to one vhost-user frontend at a time.

    ``dataplane``: a running :class:`~exitless.sidecore.loop.SidecoreLoop` that the sessions' rings
    are attached to (several servers, one per disk, then share one polling loop); None gives each
    session a loop of its own.  ``sealed_only``: see :class:`~exitless.vhost_user.backend.VhostUserBackend`.
    """

    def __init__(self, path: str, device: VirtioDevice, io: str = "kick", *, poll_ns: int = 64_000,
                 io_timeout: float = 10.0, name: str = "vhost-user", dataplane=None, sealed_only: bool = True):
        if io not in IO_MODES:
            raise ValueError(f"io mode {io!r}: one of {', '.join(IO_MODES)}")
        self.path = os.fspath(path)
        self.device = device
        self.io = io
        self.poll_ns = poll_ns
        self.io_timeout = io_timeout
        self.name = name
        self.dataplane = dataplane   # a SidecoreLoop shared with other servers' sessions, or None
        self.sealed_only = sealed_only
        self.sock: socket.socket | None = None
        self.session: VhostUserBackend | None = None
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._thread: threading.Thread | None = None
        # counters (for logs and tests)
        self.connections = 0
        self.rejected = 0
        self.messages = 0
        self.errors = 0
        self.served = threading.Condition()

    # -- life cycle -------------------------------------------------------------------------------------
    def listen(self) -> "VhostUserServer":
        self.sock, self._ino = listen_socket(self.path, 4)
        return self

    def start(self) -> "VhostUserServer":
        """Serve on a daemon thread (tests, benchmarks)."""
        if self.sock is None:
            self.listen()
        self._thread = threading.Thread(target=self.serve_forever, name=f"{self.name}-server", daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Async-signal-safe enough for a Python signal handler: sets a flag and writes an eventfd."""
        self._stopping = True
        os.eventfd_write(self._stop_fd, 1)

    def stop(self) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(10)
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            close_socket(self.sock, self.path, self._ino)
            self.sock = None
        if self._stop_fd >= 0 and (self._thread is None or not self._thread.is_alive()):
            os.close(self._stop_fd)
            self._stop_fd = -1

    # -- serving ------------------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        assert self.sock is not None, "listen() first"
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        while not self._stopping:
            events = dict(poller.poll())
            if self._stopping:
                break
            if self.sock.fileno() in events:
                try:
                    conn, _ = self.sock.accept()
                except OSError as e:
                    log.warning("%s: accept: %s", self.name, e)
                    continue
                self._serve(conn)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def _serve(self, conn: socket.socket) -> None:
        self.connections += 1
        peer = peer_name(conn)
        log.info("%s: frontend connected (%s), connection %d", self.name, peer, self.connections)
        session = self.session = VhostUserBackend(self.device, self.io, poll_ns=self.poll_ns,
                                                  name=f"{self.name}#{self.connections}", dataplane=self.dataplane,
                                                  sealed_only=self.sealed_only)
        t0 = time.monotonic()
        n0 = self.messages
        why = "closed the connection"
        try:
            why = run_session(conn, session, self, self._stop_fd, self.io_timeout, self.sock.fileno(),
                              self._reject_extra)
        finally:
            session.close()
            self.session = None
            conn.close()
            log.info("%s: frontend disconnected (%s): %s after %d messages, %d requests, %.1f s", self.name, peer,
                     why, self.messages - n0, session.completed, time.monotonic() - t0)
            with self.served:
                self.served.notify_all()

    def _reject_extra(self) -> None:
        try:
            extra, _ = self.sock.accept()
        except OSError:
            return
        self.rejected += 1
        log.warning("%s: a second frontend connected (%s) while one is served: disconnected", self.name,
                    peer_name(extra))
        extra.close()

    def wait_connections(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` connections have ended (tests)."""
        deadline = time.monotonic() + timeout
        with self.served:
            while self.connections < n or self.session is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.served.wait(min(left, 0.1))
        return True


def run_session(conn: socket.socket, session: VhostUserBackend, owner, stop_fd: int, io_timeout: float,
                idle_fd: int | None = None, on_idle=None) -> str:
    """Feed ``session`` the messages arriving on ``conn`` until the frontend leaves, breaks the protocol
    or ``owner.stopping`` (``stop_fd`` written); returns why it ended (for the log line).

    ``owner`` counts ``messages`` and ``errors`` (attributes it has).  ``idle_fd``/``on_idle``: a further
    fd watched while the frontend is quiet and what to do when it is readable (the one-frontend server
    turns away a second connection).  A rejected message is answered with a failure when the frontend
    asked for a reply, else the connection ends.  Fds of each message that the session did not keep
    are closed here.  The caller closes ``session`` and ``conn``.
    """
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    poller.register(stop_fd, select.POLLIN)
    if idle_fd is not None:
        poller.register(idle_fd, select.POLLIN)
    while not owner.stopping:
        events = dict(poller.poll())
        if owner.stopping:
            return "backend stopping"
        if conn.fileno() not in events:
            # Only while our frontend is quiet: one that just closed its connection (EOF
            # pending on conn) and reconnected is served next, not turned away.
            if idle_fd is not None and idle_fd in events:
                on_idle()
            continue
        try:
            msg = recv_message(conn, io_timeout)
        except PeerClosed:
            return "closed the connection"
        except TooManyFds as t:
            if not _refuse(conn, session, owner, t.msg, str(t)):
                return "protocol error"
            continue
        except (FramingError, OSError) as e:
            owner.errors += 1
            log.warning("%s: %s; closing the connection", session.name, e)
            return "protocol error"
        owner.messages += 1
        try:
            log.debug("%s: <- %s flags %#x size %d fds %d", session.name, msg.name, msg.flags,
                      len(msg.payload), len(msg.fds))
            try:
                reply = session.handle(msg)
            except ProtocolError as e:
                if not _refuse(conn, session, owner, msg, str(e)):
                    return "protocol error"
                continue
            if reply is not None:
                conn.sendall(reply)
        except OSError as e:
            return f"socket error: {e}"
        finally:
            for fd in msg.fds:
                os.close(fd)
            msg.fds = []
    return "backend stopping"


def _refuse(conn: socket.socket, session: VhostUserBackend, owner, msg: Message, why: str) -> bool:
    """Answer a rejected message; False if the connection must be closed instead."""
    owner.errors += 1
    reply = session.error_reply(msg)
    if reply is None:
        log.warning("%s: %s; closing the connection", session.name, why)
        return False
    log.warning("%s: %s; replied with a failure", session.name, why)
    try:
        conn.sendall(reply)
    except OSError:
        return False
    return True
