"""``exitless serve DEVICE``: an exitless device model served to another VMM (QEMU) over vhost-user.

One ``_add_*`` function per device adds its sub-command to ``serve``; each runs until
SIGINT/SIGTERM, one frontend per socket at a time, logging connections.  ``serve blk`` takes
several ``--disk``/``--socket`` pairs: one server per pair, all their rings on one shared
sidecore loop (one polling thread, however many frontends).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from ..argtypes import host_user, non_negative_float
from ..errors import ExitlessError
from ..disk import refuse_shared_images
from .options import add_disk_argument, power_of_two

BLK_USAGE = """\
    exitless serve blk --socket /tmp/vhost.sock --disk disk.img[,ro][,direct] [--io kick|poll|adaptive]
                       [--socket /tmp/vhost2.sock --disk disk2.img ...]
    qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on \\
        -machine q35,memory-backend=mem -chardev socket,id=c0,path=/tmp/vhost.sock \\
        -device vhost-user-blk-pci,chardev=c0,num-queues=1,disable-legacy=on

Runs until SIGINT/SIGTERM, one frontend per socket at a time, logging
connections.  Several --socket/--disk pairs (paired in order) are served at
once by one polling loop; a frontend that goes away or misbehaves is detached
and the others go on.  Exit status 2 if the socket path is taken by a live listener (or is not a
socket) or the disk cannot be opened.
"""


def register(sub) -> None:
    """Add ``serve`` and its devices to the top-level subparsers."""
    serve = sub.add_parser("serve", help="serve an exitless device to another VMM (vhost-user)")
    ssub = serve.add_subparsers(dest="serve", required=True)
    _add_blk(ssub)
    _add_net(ssub)


def _add_blk(ssub) -> None:
    from ..vhost_user import IO_MODES

    blk = ssub.add_parser("blk", help="virtio-blk over vhost-user (QEMU: -device vhost-user-blk-pci)",
                          description=BLK_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    blk.add_argument("--socket", required=True, action="append", metavar="PATH",
                     help="unix socket to listen on (repeatable: the n-th --socket serves the n-th --disk)")
    add_disk_argument(blk, ("ro", "direct", "lock"), required=True, action="append",
                      help="the disk image or block device served (repeatable); lock=off: take no image lock "
                           "(back-ends that take turns on one image)")
    blk.add_argument("--io", choices=IO_MODES, default="kick",
                     help="kick: sleep on kick eventfds; poll: poll the avail rings (no kicks); adaptive: both "
                          "(default kick)")
    blk.add_argument("--queues", type=int, default=1, choices=range(1, 17), metavar="N",
                     help="virtqueues offered (QEMU's num-queues must not exceed it; default 1)")
    blk.add_argument("--queue-size", type=power_of_two, default=256, metavar="N", help="maximum ring size (default 256)")
    blk.add_argument("--poll-us", type=non_negative_float, default=64.0, help="adaptive: initial busy-poll window (µs; default 64)")
    _add_hardening_arguments(blk)
    blk.set_defaults(func=cmd_serve_blk)


def _add_hardening_arguments(parser) -> None:
    parser.add_argument("--allow-unsealed-memory", action="store_true",
                        help="accept guest memory that cannot be sealed against shrinking (QEMU's "
                             "memory-backend-file on a disk, a tmpfs file by path): a frontend that truncates it "
                             "kills this process with SIGBUS; trusted frontends only (default: refused, use "
                             "memory-backend-memfd)")
    parser.add_argument("--no-confine", action="store_true",
                        help="do not install the seccomp filter (debugging: strace, profilers)")
    parser.add_argument("--user", metavar="USER", type=host_user, help="drop to this user after setup (needs root)")


def cmd_serve_blk(args) -> int:
    from ..devices.virtio.blk import VirtioBlk

    if len(args.socket) != len(args.disk):
        raise ServeConfigError(f"{len(args.socket)} --socket for {len(args.disk)} --disk: give one socket per disk")
    if len(set(map(os.path.abspath, args.socket))) != len(args.socket):
        raise ServeConfigError("each --socket must be a different path")
    refuse_shared_images(args.disk)
    served = []
    try:
        for path, disk in zip(args.socket, args.disk):
            dev = VirtioBlk(disk.path, read_only=disk.read_only, direct=disk.direct, num_queues=args.queues,
                            queue_size=args.queue_size, lock=disk.lock)
            served.append((path, dev, f"{disk.path} ({dev.capacity} sectors{', read-only' if disk.read_only else ''}, "
                                      f"{dev.num_queues} queue(s) of {dev.queue_max_size})"))
    except BaseException:
        for _, dev, _ in served:
            dev.close()
        raise
    return serve_devices(args, served, "vhost-user-blk", confined=not args.no_confine, user=args.user)


NET_USAGE = """\
    exitless serve net --socket /tmp/net.sock --tap tap0 [--netns NS] [--io kick|poll|adaptive] [--queues N]
    qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on \\
        -machine q35,memory-backend=mem -chardev socket,id=c0,path=/tmp/net.sock \\
        -netdev vhost-user,id=n0,chardev=c0[,queues=N] -device virtio-net-pci,netdev=n0,disable-legacy=on[,mq=on]

The back-end serves the RX/TX queue pairs; QEMU keeps the control queue (RX mode, MAC
filter, MQ: it enables and disables the pairs' rings).  The TAP is attached by name (in
network namespace NS), or created without persistence if it does not exist; with N > 1
it must be a multi-queue TAP.  Exit status 2 if the TAP cannot be attached or the
socket path is taken.  QEMU 7.2 under TCG: add vectors=0 to virtio-net-pci (its MSI-X
path for vhost-user-net needs KVM irqfds and crashes without them).  disable-legacy=on:
the guest kit drives modern (virtio 1.x) virtio-pci only.  Once the TAP is attached the process
is confined as serve blk is (--no-confine, --user); with --user and N > 1 the TAP must belong to
that user (re-attaching a queue needs CAP_NET_ADMIN or the TAP's owner).
"""


def _mac(text: str) -> bytes:
    from ..devices.virtio.net import parse_mac

    try:
        return parse_mac(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_net(ssub) -> None:
    from ..vhost_user import IO_MODES

    net = ssub.add_parser("net", help="virtio-net on a TAP over vhost-user (QEMU: -netdev vhost-user)",
                          description=NET_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    net.add_argument("--socket", required=True, metavar="PATH", help="unix socket to listen on")
    net.add_argument("--tap", required=True, metavar="NAME", help="TAP interface")
    net.add_argument("--netns", metavar="NS", help="the TAP lives in network namespace NS (/run/netns/NS)")
    net.add_argument("--io", choices=IO_MODES, default="kick",
                     help="kick: sleep on kick eventfds and the TAP; poll: poll rings and TAP; adaptive: both "
                          "(default kick)")
    net.add_argument("--queues", type=int, default=1, choices=range(1, 17), metavar="N",
                     help="queue pairs (QEMU's queues= must not exceed it; default 1)")
    net.add_argument("--queue-size", type=power_of_two, default=256, metavar="N", help="maximum ring size (default 256)")
    net.add_argument("--mac", type=_mac, metavar="MAC", help="the device's MAC (QEMU's mac= is what the guest sees)")
    net.add_argument("--poll-us", type=non_negative_float, default=64.0, help="adaptive: initial busy-poll window (µs; default 64)")
    _add_hardening_arguments(net)
    net.set_defaults(func=cmd_serve_net)


def cmd_serve_net(args) -> int:
    from ..devices.virtio.net import VirtioNet
    from ..net.tap import Tap
    from ..sidecore.aio_poll import SYSCALLS as AIO_SYSCALLS

    tap = Tap.open(args.tap, queues=args.queues, netns=args.netns)
    if tap.hint():
        print(f"exitless: {tap.hint()}", file=sys.stderr)
    try:
        dev = VirtioNet(tap, mac=args.mac, queue_pairs=args.queues, queue_size=args.queue_size, ctrl_queue=False)
        where = f" in netns {args.netns}" if args.netns else ""
        what = f"TAP {args.tap}{where} ({args.queues} queue pair(s) of {dev.queue_max_size})"
        # the TAP is attached (in its namespace) before confinement; afterwards only its offload and
        # queue ioctls, on its own fds, are left, and the AIO polls that report its frames
        return serve_devices(args, [(args.socket, dev, what)], "vhost-user-net", confined=not args.no_confine,
                             user=args.user, ioctls=tuple(tap.runtime_ioctls()), extra=AIO_SYSCALLS)
    finally:
        tap.close()
        if "dev" in locals():
            logging.getLogger("exitless.vhost_user").info(
                "vhost-user-net: %s", ", ".join(f"{k} {v}" for k, v in dev.stats.items()))


def serve_devices(args, served: list[tuple[str, object, str]], name: str, *, confined: bool = False,
                  user: str | None = None, ioctls: tuple[tuple[int, int], ...] = (), extra: tuple[str, ...] = ()) -> int:
    """Serve each ``(socket path, device, description)`` of ``served`` (devices closed at the end)
    with ``args.io`` / ``args.poll_us`` until SIGINT or SIGTERM; returns 0.  One device: its
    sessions run their own data plane.  Several: one server thread per socket (control plane) and
    one shared sidecore loop for every session's rings (data plane).

    With ``confined`` the process installs the seccomp allow-list of :mod:`exitless.confine`
    (dropping to ``user`` first; ``ioctls``: the ``(fd, request)`` device ioctls still allowed,
    ``extra``: more system calls by name) once
    its listeners are up, before the first frontend is served;
    the socket files are then removed by a helper forked beforehand (a confined process may not
    unlink).  Raises :class:`~exitless.confine.ConfinementError` if the filter cannot be installed.
    """
    from ..confine import confine, unlink_on_exit
    from ..sidecore.loop import SidecoreLoop, SidecoreThread
    from ..vhost_user import VhostUserServer
    from ..vhost_user.backend import LOOP_MODE

    log = logging.getLogger("exitless.vhost_user")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="exitless: %(levelname)s %(name)s: %(message)s")
    poll_ns = int(args.poll_us * 1000)
    shared = None
    if len(served) > 1:
        shared = SidecoreThread(SidecoreLoop([], LOOP_MODE[args.io], poll_ns=poll_ns, name=f"{name}-dataplane"))
    servers = []
    try:
        for i, (path, dev, _) in enumerate(served):
            servers.append(VhostUserServer(path, dev, args.io, poll_ns=poll_ns, dataplane=shared and shared.loop,
                                           sealed_only=not args.allow_unsealed_memory,
                                           name=name if len(served) == 1 else f"{name}{i}").listen())
    except BaseException:
        for srv in servers:
            srv.close()
        for _, dev, _ in served:
            dev.close()
        if shared is not None:
            shared.loop.close()
        raise
    stop = threading.Event()

    def _stop(signum, _frame):
        log.info("%s: %s: stopping", name, signal.Signals(signum).name)
        for srv in servers:
            srv.request_stop()
        stop.set()

    old = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    removers = [unlink_on_exit(path) for path, _, _ in served] if confined else []
    try:
        is_confined = confined and confine(user=user, ioctls=ioctls, extra=extra)
    except BaseException:
        for s, h in old.items():
            signal.signal(s, h)
        for srv in servers:
            srv.close()
        for _, dev, _ in served:
            dev.close()
        if shared is not None:
            shared.loop.close()
        for remove in removers:
            remove()
        raise
    for srv, (path, _, what) in zip(servers, served):
        log.info("%s: serving %s on %s, io=%s, %s", srv.name, what, path, args.io,
                 "confined (seccomp)" if is_confined else "NOT confined")
    try:
        if shared is None:
            servers[0].serve_forever()
        else:
            shared.start()
            for srv in servers:
                srv.start()
            while not stop.wait(1.0):
                if shared.error is not None:    # a bug in the data plane: say so, do not serve a dead loop
                    raise shared.error
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for srv in servers:
            srv.stop() if shared is not None else srv.close()
        if shared is not None:
            if shared.thread.ident is not None:
                shared.stop()
            else:
                shared.loop.close()
        for _, dev, _ in served:
            dev.close()
        for remove in removers:
            remove()
    return 0


class ServeConfigError(ExitlessError, ValueError):
    """``serve`` was given options that do not fit together (sockets and disks do not pair up)."""
