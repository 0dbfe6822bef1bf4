"""The ``exitless`` command: run a guest, benchmark the I/O paths, check the host."""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__, cli_guest, cli_serve


def _parse_mem(text: str) -> int:
    """'256', '256M', '1G' -> MiB."""
    t = text.strip().upper()
    try:
        if t.endswith("G"):
            return int(t[:-1]) * 1024
        return int(t[:-1] if t.endswith("M") else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad memory size {text!r} (e.g. 256M, 1G)") from None


def cmd_run(args) -> int:
    if cli_guest.wants_linux_loader(args):  # a Linux kernel (bzImage/vmlinux) or `run -- CMD`
        return cli_guest.cmd_run_linux(args)
    from .boot.pvh import KernelImageError
    from .disk import DiskSpec, DiskSpecError, add_disks
    from .vm import Machine, VmConfig

    try:
        disks = [DiskSpec.parse(d) for d in args.disk]
        with Machine(VmConfig(mem_mib=args.mem, cpus=args.cpus)) as m:
            add_disks(m, disks, one_sidecore=args.one_sidecore)
            m.boot_pvh(args.kernel, args.append, args.initrd)
            exit = m.run(timeout=args.timeout)
    except (KernelImageError, DiskSpecError, ValueError, OSError) as e:
        print(f"exitless: {e}", file=sys.stderr)
        return 2
    if exit.kind == "debug-exit":
        return exit.status & 0xFF
    if exit.ok:
        return 0
    print(f"\nexitless: the VM stopped: {exit.kind}: {exit.message}", file=sys.stderr)
    if exit.registers:
        print(exit.registers, file=sys.stderr)
    return 1


def cmd_doctor(args) -> int:
    from .doctor import diagnose, format_report

    rep = diagnose()
    print(format_report(rep))
    return 0 if rep.usable else 1


def cmd_bench_doorbell(args) -> int:
    from .bench import doorbell

    return doorbell.main(args)


def cmd_bench_blk(args) -> int:
    from .bench import blk

    return blk.main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exitless", description=__doc__)
    p.add_argument("--version", action="version", version=f"exitless {__version__}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot a kernel (PVH ELF: the guest kit or a vmlinux)")
    run.add_argument("--kernel", help="kernel: a bzImage, a vmlinux (PVH) or the guest kit; "
                     "default: the fetched Debian kernel")
    run.add_argument("--append", default="", help="kernel command line")
    run.add_argument("--initrd")
    run.add_argument("--mem", type=_parse_mem, default=256, help="guest RAM (default 256M)")
    run.add_argument("--cpus", type=int, default=1)
    run.add_argument("--timeout", type=float, default=None, help="stop the guest after this many seconds")
    run.add_argument("--one-sidecore", action="store_true",
                     help="disks on the same polling path share one sidecore thread (default: one each)")
    run.add_argument("--disk", action="append", default=[], metavar="PATH[,ro][,direct][,io=PATH][,queues=N]",
                     help="a virtio-blk disk; io is the I/O path: trap, ioeventfd (default), shared, poll, adaptive")
    run.set_defaults(func=cmd_run)

    doc = sub.add_parser("doctor", help="check /dev/kvm and say what guests will get")
    doc.set_defaults(func=cmd_doctor)

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True)
    from .bench import options as bench_options

    db = bsub.add_parser("doorbell", help="register-write ping-pong under every I/O path")
    bench_options.add_doorbell(db)
    db.set_defaults(func=cmd_bench_doorbell)
    bb = bsub.add_parser("blk", help="virtio-blk workloads under every I/O path, and QEMU")
    bench_options.add_blk(bb)
    bb.set_defaults(func=cmd_bench_blk)
    cli_serve.register(sub, bench=bsub)             # serve blk (vhost-user), bench vhost
    cli_guest.register(sub, run=run, bench=bsub)    # guest fetch, run -- CMD and Linux kernels, bench boot
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="exitless: %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
