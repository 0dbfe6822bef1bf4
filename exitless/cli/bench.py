"""``exitless bench doorbell|blk|vhost|boot``: the benchmarks, rows as JSON plus a human table.

A new benchmark is one ``add_parser`` in :func:`register` and one ``cmd_bench_*``
function that calls into :mod:`exitless.bench`.
"""
from __future__ import annotations

import sys


def register(sub) -> None:
    """Add ``bench`` and its benchmarks to the top-level subparsers."""
    from ..vhost_user import IO_MODES

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True)

    db = bsub.add_parser("doorbell", help="register-write ping-pong under every I/O path")
    db.add_argument("--n", type=int, default=20000, help="ping-pongs per row")
    db.add_argument("--warmup", type=int, default=200)
    db.add_argument("--paths", nargs="+", default=["trap", "ioeventfd", "shared", "adaptive"],
                    choices=["trap", "ioeventfd", "shared", "adaptive"])
    db.add_argument("--placements", nargs="+", default=["thread", "process"], choices=["thread", "process"])
    db.add_argument("--idle-ms", type=int, default=2000, help="idle-CPU measurement per sidecore (0: skip)")
    db.add_argument("--json", nargs="?", const="-", help="write rows as JSON (to a file, or stdout)")
    db.set_defaults(func=cmd_bench_doorbell)

    bb = bsub.add_parser("blk", help="virtio-blk workloads under every I/O path, and QEMU")
    bb.add_argument("--paths", nargs="+", default=["trap", "ioeventfd", "shared", "poll", "adaptive"],
                    choices=["trap", "ioeventfd", "shared", "poll", "adaptive"])
    bb.add_argument("--tests", nargs="+", help="subset of: randread-4k-qd1 randread-4k-qd32 read-128k "
                    "randwrite-4k-qd1 randwrite-4k-qd32 write-128k")
    bb.add_argument("--scale", type=float, default=1.0, help="multiply the operation counts")
    bb.add_argument("--no-qemu", action="store_true", help="skip the QEMU rows")
    bb.add_argument("--with-vhost", action="store_true",
                    help="add qemu+exitless rows (QEMU frontend, exitless vhost-user back-end)")
    bb.add_argument("--json", nargs="?", const="-", help="write rows as JSON (to a file, or stdout)")
    bb.add_argument("--plot", help="write a PNG plot here")
    bb.set_defaults(func=cmd_bench_blk)

    bn = bsub.add_parser("net", help="virtio-net (TAP in a private namespace) under every I/O path, QEMU's tap "
                                     "and QEMU with exitless's vhost-user-net back-end")
    bn.add_argument("--paths", nargs="+", default=["trap", "ioeventfd", "shared", "poll", "adaptive"],
                    choices=["trap", "ioeventfd", "shared", "poll", "adaptive"])
    bn.add_argument("--tests", nargs="+", help="subset of: rr-64 flood-64 tx-64 tx-1500 tx-tso")
    bn.add_argument("--scale", type=float, default=1.0, help="multiply the packet counts")
    bn.add_argument("--no-qemu", action="store_true", help="skip QEMU's own virtio-net rows")
    bn.add_argument("--no-vhost", action="store_true", help="skip the qemu+exitless (vhost-user-net) rows")
    bn.add_argument("--json", nargs="?", const="-", help="write rows as JSON (to a file, or stdout)")
    bn.add_argument("--plot", help="write a PNG plot here")
    bn.set_defaults(func=cmd_bench_net)

    bv = bsub.add_parser("vhost", help="virtio-blk in QEMU: exitless vhost-user back-end vs QEMU's own")
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

    boot = bsub.add_parser("boot", help="time to first kernel line, userspace and power-off, beside QEMU")
    boot.add_argument("--runs", type=int, default=3, help="boots per VMM (the median is reported)")
    boot.add_argument("--json", nargs="?", const="-", help="write the results as JSON (to a file, or stdout)")
    boot.add_argument("--timeout", type=float, default=None,
                      help="seconds per boot (default 60; 240 for exitless on kvm_pvm, 600 for QEMU TCG)")
    boot.add_argument("--mem", type=int, default=256, help="guest MiB")
    boot.add_argument("--cpus", type=int, default=1)
    boot.add_argument("--cache")
    boot.add_argument("--decompress", choices=("auto", "guest", "host"), default="auto")
    boot.add_argument("--qemu", choices=("auto", "kvm", "tcg", "none"), default="auto",
                      help="QEMU accelerator (auto: try KVM, fall back to TCG and say so)")
    boot.set_defaults(func=cmd_bench_boot)


def cmd_bench_doorbell(args) -> int:
    from ..bench import doorbell as B
    from ..bench.common import print_table, write_json

    cases = B.default_cases(args.paths, args.placements)
    rows = []
    for case in cases:
        print(f"measuring {case.label} ...", file=sys.stderr)
        rows.append(B.measure(case, n=args.n, warmup=args.warmup))
    if args.idle_ms:
        for path in ("shared", "adaptive"):
            if path in args.paths:
                for placement in args.placements:
                    print(f"measuring idle {path}/{placement} ...", file=sys.stderr)
                    rows.append(B.measure_idle(path, placement, args.idle_ms))
    pingpong = [r for r in rows if r.get("test") != "idle"]
    print_table("doorbell ping-pong (one run, same machine)", pingpong, [
        ("path", "path"), ("sidecore", "sidecore"), ("busy_sidecore", "busy sidecore"), ("median_us", "median µs"),
        ("p99_us", "p99 µs"), ("exits_per_op", "exits/op"), ("cpu_us_per_op", "VMM CPU µs/op"), ("errors", "errors")])
    idle = [r for r in rows if r.get("test") == "idle"]
    if idle:
        print_table("sidecore CPU while the guest is idle", idle,
                    [("path", "path"), ("sidecore", "sidecore"), ("idle_cpu_pct", "% of a core")])
    for k, v in B.summarize(rows).items():
        print(f"{k}: {v:.3f}", file=sys.stderr)
    if args.json:
        write_json(rows, args.json)
    return 1 if any(r.get("errors") for r in rows) else 0


def cmd_bench_blk(args) -> int:
    from ..bench import blk as B
    from ..bench.common import print_table, write_json

    tests = [t for t in B.TESTS if not args.tests or t.name in args.tests]
    rows = B.run(tests, args.paths, with_qemu=not args.no_qemu, scale=args.scale, with_vhost=args.with_vhost,
                 log=lambda msg: print(msg, file=sys.stderr))
    print_table("virtio-blk (one run, same image, same guest driver)", rows, [
        ("vmm", "vmm"), ("path", "path"), ("irq", "completion"), ("test", "test"), ("iops", "IOPS"), ("p50_us", "p50 µs"),
        ("p99_us", "p99 µs"), ("mbps", "MB/s"), ("exits_per_io", "exits/IO"), ("cpu_us_per_io", "host CPU µs/IO"),
        ("errors", "errors")])
    for k, v in B.summarize(rows).items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}", file=sys.stderr)
    if args.json:
        write_json(rows, args.json)
    if args.plot:
        B.plot(rows, args.plot)
    return 1 if any(r.get("errors") for r in rows) else 0


def cmd_bench_net(args) -> int:
    from ..bench import net as B
    from ..bench.common import print_table, write_json

    tests = [t for t in B.TESTS if not args.tests or t.name in args.tests]
    rows = B.run(tests, args.paths, with_qemu=not args.no_qemu, with_vhost=not args.no_vhost, scale=args.scale,
                 log=lambda msg: print(msg, file=sys.stderr))
    print_table("virtio-net (one run, same guest driver, the namespace's kernel as responder)", rows, [
        ("vmm", "vmm"), ("path", "path"), ("test", "test"), ("p50_us", "p50 µs"), ("p99_us", "p99 µs"),
        ("pps", "packets/s"), ("gbit_s", "Gbit/s"), ("exits_per_packet", "exits/packet"),
        ("cpu_us_per_packet", "host CPU µs/packet"), ("errors", "errors"), ("timeouts", "lost")])
    for k, v in B.summarize(rows).items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}", file=sys.stderr)
    if args.json:
        write_json(rows, args.json)
    if args.plot:
        B.plot(rows, args.plot)
    return 1 if any(r.get("errors") for r in rows) else 0


def cmd_bench_vhost(args) -> int:
    from ..bench import vhost as V
    from ..bench.common import print_table, write_json

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


def cmd_bench_boot(args) -> int:
    from ..bench import boot as B

    return B.main(args)
