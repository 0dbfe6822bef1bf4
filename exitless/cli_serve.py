"""``exitless serve blk``: an exitless virtio-blk device served to QEMU over vhost-user.

    exitless serve blk --socket /tmp/vhost.sock --disk disk.img[,ro] [--io kick|poll|adaptive]
    qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on \\
        -machine q35,memory-backend=mem -chardev socket,id=c0,path=/tmp/vhost.sock \\
        -device vhost-user-blk-pci,chardev=c0,num-queues=1

Runs until SIGINT/SIGTERM, one frontend at a time, logging connections.
Exit status 2 if the socket path is taken by a live listener (or is not a
socket) or the disk cannot be opened.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys


def _parse_disk(text: str) -> tuple[str, bool, bool]:
    path, *opts = text.split(",")
    if not path:
        raise argparse.ArgumentTypeError(f"--disk {text!r}: no path")
    ro = direct = False
    for opt in opts:
        if opt == "ro":
            ro = True
        elif opt == "direct":
            direct = True
        else:
            raise argparse.ArgumentTypeError(f"--disk {text!r}: bad option {opt!r} (ro, direct)")
    return path, ro, direct


def _pow2(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= v <= 32768 or v & (v - 1):
        raise argparse.ArgumentTypeError(f"{v} is not a power of two in 1..32768")
    return v


def cmd_serve_blk(args) -> int:
    from .devices.virtio.blk import VirtioBlk
    from .vhost_user import SocketPathError, VhostUserServer

    logging.getLogger("exitless.vhost_user").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="exitless: %(levelname)s %(name)s: %(message)s")
    path, ro, direct = args.disk
    try:
        dev = VirtioBlk(path, read_only=ro, direct=direct, num_queues=args.queues, queue_size=args.queue_size)
    except (OSError, ValueError) as e:
        print(f"exitless serve: disk: {e}", file=sys.stderr)
        return 2
    server = VhostUserServer(args.socket, dev, args.io, poll_ns=int(args.poll_us * 1000), name="vhost-user-blk")
    try:
        server.listen()
    except (SocketPathError, OSError) as e:
        dev.close()
        print(f"exitless serve: socket: {e}", file=sys.stderr)
        return 2

    def _stop(signum, _frame):
        logging.getLogger("exitless.vhost_user").info("vhost-user-blk: %s: stopping",
                                                      signal.Signals(signum).name)
        server.request_stop()

    old = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    from .confine import ConfinementError, confine, unlink_on_exit
    remove_socket = unlink_on_exit(args.socket)    # a confined process may not unlink it itself
    try:
        confined = confine(user=args.user) if not args.no_confine else False
    except ConfinementError as e:
        server.close()
        dev.close()
        remove_socket()
        print(f"exitless serve: confinement: {e} (--no-confine to run without)", file=sys.stderr)
        return 2
    logging.getLogger("exitless.vhost_user").info(
        "vhost-user-blk: serving %s (%d sectors%s, %d queue(s) of %d) on %s, io=%s, %s", path, dev.capacity,
        ", read-only" if ro else "", dev.num_queues, dev.queue_max_size, args.socket, args.io,
        "confined (seccomp)" if confined else "NOT confined")
    try:
        server.serve_forever()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        server.close()
        dev.close()
        remove_socket()
    return 0


def cmd_bench_vhost(args) -> int:
    from .bench import vhost as V
    from .bench.common import print_table, write_json

    rows = V.run(tests=args.tests, modes=args.io, with_builtin=not args.no_builtin, scale=args.scale,
                 accel=args.accel, min_seconds=args.min_seconds, cache=args.cache,
                 repeat=args.repeat,
                 log=lambda msg: print(msg, file=sys.stderr))
    print_table(f"virtio-blk through QEMU ({rows[0].get('accel') if rows else '?'}, cache={args.cache}): "
                "exitless vhost-user back-end vs QEMU's own", rows, [
                    ("vmm", "vmm"), ("path", "path"), ("irq", "guest waits by"), ("test", "test"), ("iops", "IOPS"),
                    ("p50_us", "p50 µs"),
                    ("p99_us", "p99 µs"), ("mbps", "MB/s"), ("exits_per_io", "exits/IO"),
                    ("cpu_us_per_io", "host CPU µs/IO"), ("errors", "errors")])
    if args.json:
        write_json(rows, args.json)
    return 1 if any(r.get("errors") for r in rows) else 0


def register(sub, *, bench=None) -> None:
    """Add ``serve`` to the top-level subparsers, and ``bench vhost`` to ``bench``'s."""
    from .vhost_user import IO_MODES

    serve = sub.add_parser("serve", help="serve an exitless device to another VMM (vhost-user)")
    ssub = serve.add_subparsers(dest="serve", required=True)
    blk = ssub.add_parser("blk", help="virtio-blk over vhost-user (QEMU: -device vhost-user-blk-pci)",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    blk.add_argument("--socket", required=True, metavar="PATH", help="unix socket to listen on")
    blk.add_argument("--disk", required=True, type=_parse_disk, metavar="FILE[,ro][,direct]")
    blk.add_argument("--io", choices=IO_MODES, default="kick",
                     help="kick: sleep on kick eventfds; poll: poll the avail rings (no kicks); adaptive: both")
    blk.add_argument("--queues", type=int, default=1, choices=range(1, 17), metavar="N",
                     help="virtqueues offered (QEMU's num-queues must not exceed it; default 1)")
    blk.add_argument("--queue-size", type=_pow2, default=256, metavar="N", help="maximum ring size (default 256)")
    blk.add_argument("--poll-us", type=float, default=64.0, help="adaptive: initial busy-poll window (µs)")
    blk.add_argument("--no-confine", action="store_true",
                     help="do not install the seccomp filter (debugging: strace, profilers)")
    blk.add_argument("--user", metavar="USER", help="drop to this user after setup (needs root)")
    blk.set_defaults(func=cmd_serve_blk)

    if bench is not None:
        bv = bench.add_parser("vhost", help="virtio-blk in QEMU: exitless vhost-user back-end vs QEMU's own")
        bv.add_argument("--io", nargs="+", default=list(IO_MODES), choices=IO_MODES)
        bv.add_argument("--tests", nargs="+", help="subset of the bench blk tests (names)")
        bv.add_argument("--scale", type=float, default=1.0, help="multiply the operation counts")
        bv.add_argument("--min-seconds", type=float, default=0.5,
                        help="raise the operation count so each measured run lasts at least this long")
        bv.add_argument("--accel", choices=["auto", "tcg", "kvm"], default="tcg",
                        help="QEMU accelerator (default tcg: QEMU's KVM cannot run Linux on this kind of host)")
        bv.add_argument("--cache", choices=["writeback", "none"], default="writeback",
                        help="writeback: page cache on both sides; none: O_DIRECT on both sides")
        bv.add_argument("--repeat", type=int, default=1, help="repeat each measured run, keep the median")
        bv.add_argument("--no-builtin", action="store_true", help="skip QEMU's built-in virtio-blk rows")
        bv.add_argument("--json", nargs="?", const="-", help="write rows as JSON (to a file, or stdout)")
        bv.set_defaults(func=cmd_bench_vhost)
