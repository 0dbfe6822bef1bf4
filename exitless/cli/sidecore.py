"""``exitless sidecore``: the sidecore service (:mod:`exitless.sidecore.service`) as a command.

Runs until SIGINT/SIGTERM; logs each VM that connects and each that is detached (with why) on
stderr, and ``serving`` with the socket path once it listens.  After setup it confines itself
(:mod:`exitless.confine`): from then on it receives fds and maps guest memory, nothing more.
"""
from __future__ import annotations

import argparse
import logging
import signal

from ..argtypes import host_user, non_negative_float, positive_int

USAGE = """\
    exitless sidecore --socket /tmp/sidecore.sock [--mode poll|adaptive]
    exitless run --kernel guestkit/build/guestkit.elf --disk a.img,io=poll --sidecore /tmp/sidecore.sock \\
        --append "blk rw=randread qd=1"
    exitless run --kernel guestkit/build/guestkit.elf --disk b.img,io=poll --sidecore /tmp/sidecore.sock ...

    exitless run --kernel guestkit/build/guestkit.elf --nvme c.img,io=adaptive --sidecore /tmp/sidecore.sock \
        --append "nvme rw=randread qd=1"
    exitless run --kernel guestkit/build/guestkit.elf --net tap=tap0,io=poll --sidecore /tmp/sidecore.sock ...

One polling loop serves the polled disks and NVMe I/O queue pairs (io=shared|poll|adaptive) and the
NICs' RX/TX queue pairs (io=poll|adaptive; the VM keeps the control queue) of every VM started with
--sidecore PATH.  A NIC whose TAP goes down, or whose service goes away, shows link down in the guest.
A VM that exits, is killed or misbehaves is detached; the others go on.
Exit status 2 if the socket path is taken by a live listener (or is not a socket).
"""


def register(sub) -> None:
    """Add ``sidecore`` to the top-level subparsers."""
    p = sub.add_parser("sidecore", help="a sidecore service: one polling loop for the polled disks, NVMe queues and NICs of many VMs "
                                        "(run --sidecore PATH)",
                       description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", required=True, metavar="PATH", help="unix socket the VMs connect to")
    p.add_argument("--mode", choices=("poll", "adaptive"), default="poll",
                   help="poll: poll every ring; adaptive: poll while busy, sleep on the VMs' ioeventfds when "
                        "every ring is idle (default poll)")
    p.add_argument("--poll-us", type=non_negative_float, default=64.0,
                   help="adaptive: initial busy-poll window (µs; default 64)")
    from ..sidecore.loop import ADAPTIVE_MAX_NS, IDLE_YIELD_NS

    p.add_argument("--poll-max-us", type=non_negative_float, default=ADAPTIVE_MAX_NS / 1000,
                   help="adaptive: the longest busy-poll window (µs; default %(default)g; QEMU's iothread poll-max-ns "
                        "is 32 µs): a longer one catches more requests without a kick, a shorter one lets the "
                        "service sleep between them")
    p.add_argument("--idle-yield-us", type=non_negative_float, default=IDLE_YIELD_NS / 1000,
                   help="once no ring has had work for this long, the polling spin yields its CPU to any thread "
                        "waiting for it (often a vCPU of a VM it serves, when the host has fewer cores than "
                        "threads): less CPU per I/O, but under other processes' load the service waits its "
                        "turn (µs; default %(default)g: never)")
    p.add_argument("--max-vms", type=positive_int, default=64, metavar="N",
                   help="disks and NVMe controllers (connections) served at once; more are refused (default 64)")
    p.add_argument("--no-confine", action="store_true",
                   help="do not install the seccomp filter (debugging: strace, profilers)")
    p.add_argument("--user", metavar="USER", type=host_user, help="drop to this user after setup (needs root)")
    p.set_defaults(func=cmd_sidecore)


def cmd_sidecore(args) -> int:
    from ..confine import confine, unlink_on_exit
    from ..sidecore.aio_poll import SYSCALLS as AIO_SYSCALLS
    from ..sidecore.service import SidecoreService
    from ..sidecore.service_net import SERVICE_IOCTLS

    log = logging.getLogger("exitless.sidecore.service")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("exitless.vhost_user").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="exitless: %(levelname)s %(name)s: %(message)s")
    service = SidecoreService(args.socket, args.mode, poll_ns=int(args.poll_us * 1000),
                              poll_max_ns=int(args.poll_max_us * 1000), idle_yield_ns=int(args.idle_yield_us * 1000),
                              max_clients=args.max_vms).listen()

    def _stop(signum, _frame):
        log.info("sidecore: %s: stopping", signal.Signals(signum).name)
        service.request_stop()

    old = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    remove = None
    try:
        if not args.no_confine:
            remove = unlink_on_exit(args.socket)     # a confined process may not unlink its socket
        # a NIC's TAP fds arrive with the VM: the TUN ioctls on any fd, and the AIO polls on them
        confined = not args.no_confine and confine(user=args.user, ioctls=SERVICE_IOCTLS, extra=AIO_SYSCALLS)
        log.info("sidecore: serving on %s, mode %s, at most %d VMs, %s", args.socket, args.mode, args.max_vms,
                 "confined (seccomp)" if confined else "NOT confined")
        service.serve_forever()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        service.close()
        if remove is not None:
            remove()
        loop = service.dataplane.loop
        log.info("sidecore: stopped: %d connections, %d refused, %d protocol errors; the loop made %d rounds, "
                 "did work in %d, slept %d times and yielded its CPU %d times", service.connections,
                 service.refused, service.errors, loop.polls, loop.work, loop.sleeps, loop.yields)
    return 0
