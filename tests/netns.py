"""Test helpers: a private network namespace with a TAP, and hand-made frames (ARP, ICMP echo).

Everything lives inside a namespace the test creates and deletes; addresses are 10.0.0.0/24
inside it.  Nothing on the host's own network is touched.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import socket
import struct
import threading
import time

HOST_IP = "10.0.0.1"
GUEST_IP = "10.0.0.2"
GUEST_MAC = bytes.fromhex("525400c0ffee")
_seq = itertools.count()


def can_make_netns() -> str | None:
    """None if this process may create network namespaces and TAPs, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, /dev/net/tun)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "pyroute2 is not installed"
    return None


@contextlib.contextmanager
def netns_only():
    """Create namespace ``exl-test-<pid>-<n>`` with its loopback up; yield its name; delete it (and every
    interface made in it) afterwards."""
    from pyroute2 import netns

    name = f"exl-test-{os.getpid()}-{next(_seq)}"
    netns.create(name)
    try:
        with netns_lo_up(name):
            pass
        yield name
    finally:
        netns.remove(name)


@contextlib.contextmanager
def netns_with_tap(tap: str = "exltap0", queues: int = 1, address: str = HOST_IP + "/24"):
    """A namespace (:func:`netns_only`) with a persistent TAP (``address``, up); yields the namespace's name."""
    from exitless.net.tap import create_tap

    with netns_only() as name:
        create_tap(tap, name, queues=queues, address=address)
        yield name


class TcpResponder:
    """TCP servers on ``ip`` inside namespace ``ns``: ``up_port`` takes bytes until EOF and answers their
    MD5 (hex, a newline); ``down_port`` sends ``data`` and closes.  ``timeout``: seconds an accept may
    wait (the guest may take minutes to get there).  ``received_md5`` and ``errors`` are for the test."""

    def __init__(self, ns: str, data: bytes, *, ip: str = HOST_IP, up_port: int = 5001, down_port: int = 5002,
                 timeout: float = 180):
        from exitless.net.tap import _in_netns

        self.data = data
        self.received_md5: str | None = None
        self.errors: list[BaseException] = []

        def listen(port):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)   # belongs to the namespace it is made in
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((ip, port))
            s.listen(1)
            s.settimeout(timeout)
            return s

        self.up, self.down = _in_netns(ns, lambda: (listen(up_port), listen(down_port)))
        self.threads = [threading.Thread(target=self._guard, args=(f,), daemon=True)
                        for f in (self._serve_up, self._serve_down)]
        for t in self.threads:
            t.start()

    def _guard(self, fn):
        try:
            fn()
        except BaseException as e:  # reported by the test
            self.errors.append(e)

    def _serve_up(self):
        conn, _ = self.up.accept()
        with conn:
            conn.settimeout(120)
            h = hashlib.md5()
            while chunk := conn.recv(1 << 16):
                h.update(chunk)
            self.received_md5 = h.hexdigest()
            conn.sendall(self.received_md5.encode() + b"\n")

    def _serve_down(self):
        conn, _ = self.down.accept()
        with conn:
            conn.settimeout(120)
            conn.sendall(self.data)

    def close(self):
        self.up.close()
        self.down.close()


@contextlib.contextmanager
def netns_lo_up(name: str):
    from pyroute2 import NetNS

    with NetNS(name, flags=0) as ns:
        (lo,) = ns.link_lookup(ifname="lo")
        ns.link("set", index=lo, state="up")
        yield ns


def set_link(ns_name: str, ifname: str, up: bool) -> None:
    from pyroute2 import NetNS

    with NetNS(ns_name, flags=0) as ns:
        (idx,) = ns.link_lookup(ifname=ifname)
        ns.link("set", index=idx, state="up" if up else "down")


def delete_link(ns_name: str, ifname: str) -> None:
    from pyroute2 import NetNS

    with NetNS(ns_name, flags=0) as ns:
        (idx,) = ns.link_lookup(ifname=ifname)
        ns.link("del", index=idx)


def ip4(s: str) -> bytes:
    return bytes(int(x) for x in s.split("."))


def inet_csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def arp_request(src_mac: bytes = GUEST_MAC, src_ip: str = GUEST_IP, target_ip: str = HOST_IP) -> bytes:
    eth = b"\xff" * 6 + src_mac + b"\x08\x06"
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, src_mac, ip4(src_ip), b"\0" * 6, ip4(target_ip))
    return eth + arp


def icmp_echo(dst_mac: bytes, ident: int, seq: int, payload: bytes, src_mac: bytes = GUEST_MAC,
              src_ip: str = GUEST_IP, dst_ip: str = HOST_IP) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", inet_csum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), ident, 0x4000, 64, 1, 0, ip4(src_ip), ip4(dst_ip))
    ip = ip[:10] + struct.pack("!H", inet_csum(ip)) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + icmp


def parse_arp_reply(frame: bytes) -> bytes | None:
    """The sender MAC of an ARP reply, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06" or struct.unpack("!H", frame[20:22])[0] != 2:
        return None
    return frame[22:28]


def resolve_mac(fd: int, src_ip: str = GUEST_IP, target_ip: str = HOST_IP, timeout: float = 5.0) -> bytes | None:
    """The MAC of ``target_ip`` behind a TAP's queue ``fd`` (non-blocking, 12-byte vnet header): an ARP
    request from ``src_ip``, sent again every 20 ms until a reply comes or ``timeout`` seconds pass (None)."""
    hdr = bytes(12)
    deadline = time.monotonic() + timeout
    os.write(fd, hdr + arp_request(src_ip=src_ip, target_ip=target_ip))
    while time.monotonic() < deadline:
        try:
            mac = parse_arp_reply(os.read(fd, 4096)[12:])
            if mac is not None:
                return mac
        except BlockingIOError:
            time.sleep(0.02)
            os.write(fd, hdr + arp_request(src_ip=src_ip, target_ip=target_ip))
    return None


def parse_echo_reply(frame: bytes) -> tuple[int, int, bytes] | None:
    """(ident, seq, payload) of an ICMP echo reply, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 1:
        return None
    ihl = (frame[14] & 0xF) * 4
    total = struct.unpack("!H", frame[16:18])[0]
    icmp = frame[14 + ihl:14 + total]
    if icmp[0] != 0:
        return None
    _t, _c, _ck, ident, seq = struct.unpack("!BBHHH", icmp[:8])
    return ident, seq, icmp[8:]
