"""``exitless bench doorbell|blk|nvme|vhost|net|sidecore|boot|soak``: the benchmarks, rows as JSON plus a human table.

The options of each benchmark are in :mod:`exitless.bench.options` and its command
is the ``main(args)`` of its module in :mod:`exitless.bench` (interleaved rounds,
the table, ``--json``); a new benchmark is one ``add_*`` there, one entry in
:func:`register` and one ``cmd_bench_*`` here.
"""
from __future__ import annotations


def register(sub) -> None:
    """Add ``bench`` and its benchmarks to the top-level subparsers."""
    from ..bench import options

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True)
    for name, help, add, cmd in (
            ("doorbell", "register-write ping-pong under every I/O path", options.add_doorbell, cmd_bench_doorbell),
            ("blk", "virtio-blk workloads under every I/O path, and QEMU", options.add_blk, cmd_bench_blk),
            ("nvme", "NVMe workloads under every I/O path (shadow doorbells on and off), and QEMU's NVMe",
             options.add_nvme, cmd_bench_nvme),
            ("vhost", "virtio-blk in QEMU: vhost-user back-ends (exitless, qemu-storage-daemon) vs QEMU's own",
             options.add_vhost, cmd_bench_vhost),
            ("net", "virtio-net (a TAP in a private namespace) under every I/O path, QEMU's tap, and QEMU with "
                    "exitless's vhost-user-net back-end", options.add_net, cmd_bench_net),
            ("sidecore", "N VMs doing 4 KiB random reads: one shared sidecore vs one per VM vs QEMU with an iothread "
                         "per VM (IOPS, p99 of the slowest and fastest VM, host CPU, exits)", options.add_sidecore,
             cmd_bench_sidecore),
            ("boot", "time to first kernel line, userspace and power-off, beside QEMU", options.add_boot,
             cmd_bench_boot),
            ("soak", "mixed verified I/O with VM restarts and vhost-user frontend disconnects; lost acknowledged "
                     "writes, fd and thread counts over time", options.add_soak, cmd_bench_soak)):
        p = bsub.add_parser(name, help=help)
        add(p)
        p.set_defaults(func=cmd)


def cmd_bench_doorbell(args) -> int:
    from ..bench import doorbell

    return doorbell.main(args)


def cmd_bench_blk(args) -> int:
    from ..bench import blk

    return blk.main(args)


def cmd_bench_nvme(args) -> int:
    from ..bench import nvme

    return nvme.main(args)


def cmd_bench_vhost(args) -> int:
    from ..bench import vhost

    return vhost.main(args)


def cmd_bench_net(args) -> int:
    from ..bench import net

    return net.main(args)


def cmd_bench_sidecore(args) -> int:
    from ..bench import sidecore

    return sidecore.main(args)


def cmd_bench_boot(args) -> int:
    from ..bench import boot

    return boot.main(args)


def cmd_bench_soak(args) -> int:
    from ..bench import soak

    return soak.main(args)
