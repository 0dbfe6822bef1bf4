"""A Linux TAP device as the host side of virtio-net (``Documentation/networking/tuntap.rst``).

Each queue is one file descriptor on ``/dev/net/tun``, attached with
``TUNSETIFF`` and ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` (plus ``IFF_MULTI_QUEUE``
when there are several queues: the kernel then spreads flows over the fds).
``TUNSETVNETHDRSZ 12`` makes every frame read or written start with the
12-byte ``struct virtio_net_hdr_v1`` a VERSION_1 driver uses, so TX frames go
to the kernel with the guest's checksum/GSO request and RX frames arrive with
the kernel's (``tun_get_user``/``tun_put_user``).  Note that on read the
kernel writes only the first 10 bytes of that header and skips the last two
(``num_buffers``): the device must fill them.

``TUNSETOFFLOAD`` says what the *reader* (the guest) accepts: ``TUN_F_CSUM``
(partial checksums, from VIRTIO_NET_F_GUEST_CSUM) and ``TUN_F_TSO4/6/ECN``
(GSO frames, from GUEST_TSO4/6/ECN; the kernel refuses TSO without CSUM).
With no offload the kernel hands over only complete, checksummed frames.

The fds are non-blocking: the sidecore never sleeps in a read or a write.

A TAP that :meth:`Tap.open` creates (no interface of that name existed) lives
as long as its fds and is brought up at once (``SIOCSIFFLAGS IFF_UP``): a down
interface drops every frame, which looked like a dead NIC.  It has no address;
:attr:`Tap.created` is True and :meth:`Tap.hint` says how to give it one.  A TAP
that existed is left as it was.

Network namespaces: :func:`Tap.open` with ``netns="NAME"`` attaches (or
creates) the TAP inside ``/run/netns/NAME``: a TUNSETIFF names an interface of
the calling thread's namespace, so the fds are opened by a short-lived thread
that ``setns(2)``-ed into it (the fds keep working from any namespace).
:func:`create_tap` makes a persistent TAP there with pyroute2.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import threading

from ..errors import ExitlessError
from ..interrupts import uninterruptible

__all__ = ["ReceivedTap", "Tap", "TapError", "create_tap", "TUN_F_CSUM", "TUN_F_TSO4", "TUN_F_TSO6", "TUN_F_TSO_ECN",
           "VNET_HDR_LEN"]

# <linux/if_tun.h>: _IOW('T', nr, int) = 0x40045400 | nr
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 16
#: struct virtio_net_hdr_v1 (VERSION_1 or MRG_RXBUF): flags, gso_type, hdr_len, gso_size, csum_start,
#: csum_offset, num_buffers.
VNET_HDR_LEN = 12
NETNS_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


class TapError(ExitlessError, OSError):
    """A TAP device cannot be opened, attached or configured (the message says which and why)."""


def _ifreq(name: str, flags: int) -> bytes:
    return struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), flags)


def check_name(name: str) -> str:
    """An interface name the kernel accepts (``dev_valid_name``): 1..15 bytes, no '/', ':' or whitespace, not
    '.' or '..' -- and UTF-8 (pyroute2 and our ioctls take text).  Raises :class:`TapError` otherwise (the
    kernel's EINVAL for such a name read as "exists with other flags")."""
    try:
        raw = name.encode()
    except UnicodeEncodeError:
        raw = b""
    if not raw or len(raw) >= IFNAMSIZ or "/" in name or ":" in name or any(c.isspace() for c in name) \
            or name in (".", ".."):
        raise TapError(errno.EINVAL, f"{name!r} is not a valid interface name (1..15 bytes of UTF-8, no '/', ':' "
                                     "or spaces)")
    return name


def _in_netns(netns: str | None, fn):
    """Run ``fn()`` in a thread that entered network namespace ``netns`` (None: here); return its result."""
    if netns is None:
        return fn()
    path = netns if "/" in netns else os.path.join(NETNS_DIR, netns)
    try:
        nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise TapError(e.errno, f"network namespace {netns!r}: {e.strerror}") from None
    box: dict = {}

    def body():
        try:
            if _libc.setns(nsfd, CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise TapError(e, f"setns into network namespace {netns!r}: {os.strerror(e)}")
            box["result"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    try:
        # not unwound half way by SIGTERM/Ctrl-C: closing nsfd under the thread that is entering it
        with uninterruptible():
            t = threading.Thread(target=body, name=f"netns-{netns}")   # the thread dies with its namespace
            t.start()
            t.join()
    finally:
        os.close(nsfd)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _flags(queues: int) -> int:
    return IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)


def _attach_fds(name: str, flags: int, queues: int) -> list[int]:
    """``queues`` non-blocking fds on ``/dev/net/tun`` attached to TAP ``name`` (of the calling thread's
    namespace) with the 12-byte vnet header and no offloads.  Raises :class:`TapError`."""
    fds: list[int] = []
    try:
        for _ in range(queues):
            try:
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                raise TapError(e.errno, f"/dev/net/tun: {e.strerror}") from None
            fds.append(fd)
            try:
                fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags))
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
            except OSError as e:
                why = {errno.EINVAL: "exists with other flags (not a TAP, or single/multi-queue mismatch)",
                       errno.EBUSY: "is already attached by another process (or has fewer queues)",
                       errno.EPERM: "permission denied (CAP_NET_ADMIN or the TAP's owner needed)"}
                raise TapError(e.errno, f"TAP {name}: {why.get(e.errno, e.strerror)}") from None
        return fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _set_up(name: str) -> None:
    """``IFF_UP`` on interface ``name`` of the calling thread's namespace.  Raises :class:`TapError`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            flags = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(name, 0)), IFNAMSIZ)[0]
            if not flags & IFF_UP:
                fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(name, flags | IFF_UP))
        except OSError as e:
            raise TapError(e.errno, f"TAP {name}: cannot bring it up: {e.strerror}") from None


def _attach_or_create(name: str, flags: int, queues: int) -> tuple[list[int], bool]:
    """:func:`_attach_fds`, and whether the TAP was created by it (then it is brought up)."""
    try:
        socket.if_nametoindex(name)
        created = False
    except OSError:
        created = True
    fds = _attach_fds(name, flags, queues)
    if created:
        try:
            _set_up(name)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
    return fds, created


class Tap:
    """An attached TAP interface: ``fds[i]`` is queue ``i`` (non-blocking, close-on-exec).

    Use :meth:`open`; :meth:`close` detaches (a TAP that exitless created without
    persistence disappears with its last fd).  :attr:`created`: :meth:`open` made it (and brought it
    up, with no address: see :meth:`hint`).
    """

    def __init__(self, name: str, fds: list[int], netns: str | None, created: bool = False):
        self.name = name
        self.fds = fds
        self.netns = netns
        self.offloads = 0
        self.created = created

    @classmethod
    def open(cls, name: str, queues: int = 1, netns: str | None = None) -> "Tap":
        """Attach ``queues`` fds to TAP ``name`` (created if it does not exist) in ``netns``.

        A TAP created here is brought up (see the module docstring).  Raises :class:`TapError` if
        ``/dev/net/tun`` cannot be opened, the name is taken by a non-TAP interface or by a TAP with other
        flags (single- vs multi-queue, no vnet header), the namespace does not exist, or a created TAP
        cannot be brought up.
        """
        check_name(name)
        if not 1 <= queues <= 256:
            raise TapError(errno.EINVAL, f"TAP {name}: {queues} queues (1..256)")
        flags = _flags(queues)
        fds, created = _in_netns(netns, lambda: _attach_or_create(name, flags, queues))
        return cls(name, fds, netns, created)

    def hint(self) -> str | None:
        """For a TAP :meth:`open` created: one line saying so and how to give it an address; else None."""
        if not self.created:
            return None
        where = f"ip -n {self.netns} " if self.netns else "ip "
        return (f"created TAP {self.name}" + (f" in network namespace {self.netns}" if self.netns else "")
                + f" (up, no address; it goes away with exitless): e.g. `{where}addr add 10.0.0.1/24 dev {self.name}`"
                + " -- or create a persistent one first (`ip tuntap add dev NAME mode tap vnet_hdr`) and attach to it")

    def reattach(self) -> None:
        """Attach every queue again to TAP :attr:`name`, which was deleted and has been created again
        (the fds of a deleted TAP only ever say EBADFD).  The new attachments take the old fd numbers
        (``dup2``), so whoever holds ``fds[i]`` (an AIO poll, the C data path) keeps using them; the
        offloads are set again.  Raises :class:`TapError` if there is no interface of that name (yet) --
        it is never created here: a TUNSETIFF on a missing name would make a TAP of our own -- or it
        cannot be attached (another kind of interface, other flags)."""
        name, n = self.name, len(self.fds)

        def attach() -> list[int]:
            try:
                socket.if_nametoindex(name)
            except OSError:
                raise TapError(errno.ENODEV, f"TAP {name}: no such interface") from None
            return _attach_fds(name, _flags(n), n)

        new = _in_netns(self.netns, attach)
        try:
            for fd in new:
                if self.offloads:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, self.offloads)
        except OSError as e:
            for fd in new:
                os.close(fd)
            raise TapError(e.errno, f"TAP {name}: TUNSETOFFLOAD {self.offloads:#x}: {e.strerror}") from None
        for old, fd in zip(self.fds, new):
            os.dup2(fd, old, inheritable=False)
            os.close(fd)


    def set_offload(self, offloads: int) -> None:
        """``TUNSETOFFLOAD`` on every queue: the TUN_F_* set the guest accepts on receive.

        TSO flags without TUN_F_CSUM are dropped (the kernel refuses them).
        """
        if not offloads & TUN_F_CSUM:
            offloads = 0
        if offloads == self.offloads:
            return
        for fd in self.fds:
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)
            except OSError as e:
                raise TapError(e.errno, f"TAP {self.name}: TUNSETOFFLOAD {offloads:#x}: {e.strerror}") from None
        self.offloads = offloads

    def set_queue_enabled(self, index: int, enabled: bool) -> None:
        """Attach or detach queue ``index`` (multi-queue TAPs): the kernel steers no flow to a detached one."""
        if len(self.fds) < 2:
            return
        try:
            fcntl.ioctl(self.fds[index], TUNSETQUEUE, _ifreq("", IFF_ATTACH_QUEUE if enabled else IFF_DETACH_QUEUE))
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EBADFD):   # already in that state / interface gone
                raise TapError(e.errno, f"TAP {self.name}: queue {index}: {e.strerror}") from None

    def runtime_ioctls(self) -> list[tuple[int, int]]:
        """``(fd, request)`` of every ioctl the TAP may need after :meth:`open`: TUNSETOFFLOAD
        (:meth:`set_offload`) and TUNSETQUEUE (:meth:`set_queue_enabled`) on each queue fd --
        what a confined back-end must still be allowed (:func:`exitless.confine.confine`)."""
        return [(fd, request) for fd in self.fds for request in (TUNSETOFFLOAD, TUNSETQUEUE)]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self) -> "Tap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f" in netns {self.netns}" if self.netns else ""
        return f"Tap({self.name!r}{where}, queues={len(self.fds)})"


class ReceivedTap:
    """The queue fds of a TAP that another process attached and handed over (SCM_RIGHTS): the sidecore
    service's side of a VM's NIC.  It offers what :class:`Tap` does after :meth:`Tap.open` --
    :meth:`set_offload`, :meth:`set_queue_enabled`, :meth:`close` -- but no ``reattach``: the interface's
    name means nothing in this process's network namespace (and re-attaching needs privileges the service
    has dropped), so a deleted TAP stays down here.  Use :meth:`adopt`, which checks the fds."""

    set_offload = Tap.set_offload
    set_queue_enabled = Tap.set_queue_enabled
    close = Tap.close

    def __init__(self, name: str, fds: list[int]):
        self.name = name
        self.fds = fds
        self.offloads = 0

    @classmethod
    def adopt(cls, fds: list[int]) -> "ReceivedTap":
        """Take ``fds`` (queue ``i`` is ``fds[i]``) after checking that each is a queue of one and the same
        TAP (TUNGETIFF: IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE exactly when there are several)
        with the 12-byte header (TUNGETVNETHDRSZ), and making them non-blocking.  The fds are the caller's
        to close if this raises :class:`TapError` (a socket, a file, a TUN device, another TAP per queue...)."""
        name = None
        for i, fd in enumerate(fds):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError as e:
                raise TapError(e.errno, f"queue {i}: bad fd: {e.strerror}") from None
            if target != "/dev/net/tun":        # no TUN ioctl reaches another kind of file
                raise TapError(errno.EINVAL, f"queue {i}: the fd is {target!r}, not a TAP queue (/dev/net/tun)")
            try:
                raw = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
                hdr = struct.unpack("i", fcntl.ioctl(fd, TUNGETVNETHDRSZ, bytes(4)))[0]
            except OSError as e:
                raise TapError(e.errno, f"queue {i}: the fd is not an attached TAP queue ({e.strerror})") from None
            ifname, flags = struct.unpack_from(f"{IFNAMSIZ}sH", raw)
            ifname = ifname.split(b"\0", 1)[0].decode(errors="replace")
            want = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if len(fds) > 1 else 0)
            mask = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE
            if flags & mask != want:
                raise TapError(errno.EINVAL, f"queue {i}: {ifname} has flags {flags:#x}, not {want:#x} (a TAP "
                                             "with the vnet header, multi-queue for several queues)")
            if hdr != VNET_HDR_LEN:
                raise TapError(errno.EINVAL, f"queue {i}: {ifname}'s vnet header is {hdr} bytes, not {VNET_HDR_LEN}")
            if name is not None and ifname != name:
                raise TapError(errno.EINVAL, f"queue {i} is on {ifname}, queue 0 on {name}: one TAP per NIC")
            name = ifname
        for fd in fds:
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
            if not fl & os.O_NONBLOCK:        # a blocking read would stop the loop of every VM the service serves
                fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        return cls(name or "?", list(fds))

    def __repr__(self) -> str:
        return f"ReceivedTap({self.name!r}, queues={len(self.fds)})"


def create_tap(name: str, netns: str | None = None, *, queues: int = 1, address: str | None = None,
               up: bool = True) -> None:
    """Create a persistent TAP ``name`` (vnet header; multi-queue if ``queues`` > 1) with pyroute2,
    in network namespace ``netns`` (which must exist), optionally with ``address`` ("10.0.0.1/24") and up.

    Raises :class:`TapError` if the namespace is missing or the interface cannot be made.
    """
    check_name(name)
    from pyroute2 import IPRoute, NetNS
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipr = NetNS(netns, flags=0) if netns else IPRoute()
    except (OSError, NetlinkError) as e:
        raise TapError(errno.ENOENT, f"network namespace {netns!r}: {e}") from None
    try:
        ipr.link("add", ifname=name, kind="tuntap", mode="tap",
                 ifr={"no_pi": True, "vnet_hdr": True, "multi_queue": queues > 1})
        (idx,) = ipr.link_lookup(ifname=name)
        if address:
            ip, _, plen = address.partition("/")
            ipr.addr("add", index=idx, address=ip, prefixlen=int(plen or 24))
        if up:
            ipr.link("set", index=idx, state="up")
    except (OSError, NetlinkError, ValueError) as e:
        raise TapError(errno.EINVAL, f"creating TAP {name}" + (f" in {netns}" if netns else "") + f": {e}") from None
    finally:
        ipr.close()
