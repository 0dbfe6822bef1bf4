"""A minimal vhost-user *frontend* (client): enough to drive a back-end from Python.

Used by the tests (a well-behaved frontend and, with :meth:`Frontend.send`, a
hostile one) and handy for poking at a running ``exitless serve``::

    with Frontend.connect("/tmp/vhost.sock") as fe:
        print(hex(fe.get_features()))
"""
from __future__ import annotations

from ..errors import ExitlessError
import array
import socket
import struct

from . import protocol as P


class FrontendError(ExitlessError, RuntimeError):
    """The back-end answered with a failure or closed the connection."""


class Frontend:
    def __init__(self, sock: socket.socket, timeout: float = 10.0):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.reply_ack = False

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0) -> "Frontend":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        s.connect(path)
        return cls(s, timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Frontend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- raw messages ----------------------------------------------------------------------------------
    def send(self, request: int, payload: bytes = b"", fds=(), *, need_reply: bool = False,
             flags: int | None = None, raw: bytes | None = None) -> None:
        """Send one message (``raw`` replaces the encoded bytes, for malformed ones)."""
        data = raw if raw is not None else P.encode(request, payload, need_reply=need_reply)
        if flags is not None and raw is None:
            data = P.HEADER.pack(request, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", list(fds)).tobytes())] if fds else []
        self.sock.sendmsg([data], anc)

    def recv(self) -> tuple[int, int, bytes]:
        head = self._exact(P.HEADER_SIZE)
        request, flags, size = P.HEADER.unpack(head)
        return request, flags, self._exact(size) if size else b""

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise FrontendError("the back-end closed the connection")
            buf += chunk
        return bytes(buf)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True if the back-end closes the connection (EOF) within ``timeout`` seconds."""
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False
        finally:
            self.sock.settimeout(old)

    def request(self, request: int, payload: bytes = b"", fds=(), *, expect_reply: bool = False) -> bytes | None:
        """Send; with REPLY_ACK negotiated ask for an ack and raise FrontendError on a failure."""
        ack = self.reply_ack and not expect_reply
        self.send(request, payload, fds, need_reply=ack)
        if not (ack or expect_reply):
            return None
        req, flags, body = self.recv()
        if req != request or not flags & P.FLAG_REPLY:
            raise FrontendError(f"reply to {P.request_name(request)} is {P.request_name(req)} flags {flags:#x}")
        if ack:
            if struct.unpack("<Q", body)[0] != 0:
                raise FrontendError(f"{P.request_name(request)} failed")
            return None
        return body

    # -- requests ----------------------------------------------------------------------------------------
    def get_u64(self, request: int) -> int:
        return struct.unpack("<Q", self.request(request, expect_reply=True))[0]

    def get_features(self) -> int:
        return self.get_u64(P.GET_FEATURES)

    def set_features(self, value: int) -> None:
        self.request(P.SET_FEATURES, P.U64.pack(value))

    def get_protocol_features(self) -> int:
        return self.get_u64(P.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, value: int) -> None:
        self.request(P.SET_PROTOCOL_FEATURES, P.U64.pack(value))
        self.reply_ack = bool(value >> P.PROTOCOL_F_REPLY_ACK & 1)

    def set_owner(self) -> None:
        self.request(P.SET_OWNER)

    def get_queue_num(self) -> int:
        return self.get_u64(P.GET_QUEUE_NUM)

    def set_mem_table(self, regions: list[tuple[int, int, int, int]], fds: list[int]) -> None:
        """``regions``: (gpa, size, uva, mmap_offset) each, with one fd per region."""
        body = P.MEM_HEAD.pack(len(regions), 0) + b"".join(P.MEM_REGION.pack(*r) for r in regions)
        self.request(P.SET_MEM_TABLE, body, fds)

    def set_vring_num(self, index: int, num: int) -> None:
        self.request(P.SET_VRING_NUM, P.STATE.pack(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.request(P.SET_VRING_BASE, P.STATE.pack(index, base))

    def get_vring_base(self, index: int) -> int:
        body = self.request(P.GET_VRING_BASE, P.STATE.pack(index, 0), expect_reply=True)
        return P.STATE.unpack(body)[1]

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, flags: int = 0, log: int = 0) -> None:
        self.request(P.SET_VRING_ADDR, P.ADDR.pack(index, flags, desc, used, avail, log))

    def _vring_fd(self, request: int, index: int, fd: int | None) -> None:
        value = index | (P.VRING_NOFD_MASK if fd is None else 0)
        self.request(request, P.U64.pack(value), () if fd is None else (fd,))

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(P.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(P.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_fd(P.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request(P.SET_VRING_ENABLE, P.STATE.pack(index, int(enable)))

    def get_config(self, offset: int, size: int) -> bytes:
        body = self.request(P.GET_CONFIG, P.CONFIG_HEAD.pack(offset, size, 0) + b"\0" * size, expect_reply=True)
        if not body:
            raise FrontendError("GET_CONFIG failed")
        return body[P.CONFIG_HEAD.size:]
