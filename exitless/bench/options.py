"""The options of the ``exitless bench`` commands, one ``add_*`` per benchmark.

Kept apart from the benchmarks (which import the VMM) so that building the
command-line parser stays light; each benchmark module's ``main(args)`` reads
what these add.  ``--json`` alone (or ``--json -``) writes the rows to stdout and
nothing else goes there; ``--rounds`` is the number of interleaved rounds.
"""
from __future__ import annotations

import argparse
import shlex

from ..argtypes import (mem_size, non_negative_float, non_negative_int, output_file, positive_float, positive_int,
                        scale_factor)
from .workload import TESTS

DOORBELL_PATHS = ("trap", "ioeventfd", "shared", "adaptive")
PLACEMENTS = ("thread", "process")
BLK_PATHS = ("trap", "ioeventfd", "shared", "poll", "adaptive")
NVME_PATHS = BLK_PATHS
#: The exitless vhost-user back-end's I/O paths (``exitless serve blk --io``).
VHOST_PATHS = ("kick", "poll", "adaptive")
#: Page-cache mode of every back-end: writeback (buffered) or none (O_DIRECT).
CACHES = ("writeback", "none")


def _common(p, rounds_help: str = "interleaved rounds per row (median and spread reported)") -> None:
    p.add_argument("--rounds", type=positive_int, default=3, help=rounds_help + " (default 3)")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE", type=output_file,
                   help="write rows as JSON to FILE, or alone: to stdout (then only JSON goes to stdout)")


def _tests(p) -> None:
    p.add_argument("--tests", nargs="+", choices=[t.name for t in TESTS], metavar="TEST",
                   help=f"subset of: {' '.join(t.name for t in TESTS)}")
    p.add_argument("--scale", type=scale_factor, default=1.0, help="multiply the operation counts (default 1.0)")


def _pin(p) -> None:
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="let the scheduler place the vCPU and the sidecores (default: pinned to two CPUs)")


def add_doorbell(p) -> None:
    p.add_argument("--n", type=positive_int, default=20000, help="measured ping-pongs per row and round (default 20000)")
    p.add_argument("--warmup", type=non_negative_int, default=2000,
                   help="ping-pongs before the measured ones (default 2000)")
    p.add_argument("--paths", nargs="+", default=list(DOORBELL_PATHS), choices=DOORBELL_PATHS,
                   help=f"doorbell I/O paths to measure (default: all: {' '.join(DOORBELL_PATHS)})")
    p.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=PLACEMENTS,
                   help="sidecore as a thread of the VMM or a separate process (default: both)")
    _pin(p)
    p.add_argument("--idle-ms", type=non_negative_int, default=2000,
                   help="idle-CPU measurement per sidecore, ms (0: skip; default 2000)")
    _common(p)


def add_blk(p) -> None:
    p.add_argument("--paths", nargs="+", default=list(BLK_PATHS), choices=BLK_PATHS,
                   help=f"exitless I/O paths to measure (default: all: {' '.join(BLK_PATHS)})")
    _tests(p)
    p.add_argument("--no-qemu", action="store_true", help="skip the QEMU rows")
    p.add_argument("--with-vhost", action="store_true",
                   help="add the bench vhost rows: QEMU frontend with exitless and qemu-storage-daemon "
                        "vhost-user back-ends")
    p.add_argument("--plot", type=output_file, metavar="PNG", help="write a PNG plot here")
    _common(p)


def add_nvme(p) -> None:
    p.add_argument("--paths", nargs="+", default=list(NVME_PATHS), choices=NVME_PATHS,
                   help=f"exitless doorbell paths to measure (default: all: {' '.join(NVME_PATHS)})")
    _tests(p)
    p.add_argument("--no-qemu", action="store_true", help="skip the QEMU rows")
    p.add_argument("--plot", type=output_file, metavar="PNG", help="write a PNG plot here")
    _common(p)


def add_vhost(p) -> None:
    p.add_argument("--io", nargs="+", default=list(VHOST_PATHS), choices=VHOST_PATHS,
                   help="exitless back-end I/O paths to measure (default: all)")
    _tests(p)
    p.add_argument("--min-seconds", type=non_negative_float, default=0.5,
                   help="raise the operation count so each measured run lasts at least this long (0: no minimum; default 0.5)")
    p.add_argument("--accel", choices=["auto", "tcg", "kvm"], default="auto",
                   help="QEMU accelerator (auto: KVM when /dev/kvm works; the guest kit runs on it; default auto)")
    p.add_argument("--cache", choices=CACHES, default="writeback",
                   help="writeback: page cache on every side; none: O_DIRECT on every side (default writeback)")
    p.add_argument("--no-builtin", action="store_true", help="skip QEMU's built-in virtio-blk rows")
    p.add_argument("--no-qsd", action="store_true", help="skip the qemu-storage-daemon rows")
    _common(p)


#: ``exitless bench net``'s tests (names; the definitions are in exitless.bench.net)
NET_TESTS = ("rr-64", "flood-64", "tx-64", "tx-1500", "tx-tso")


def add_net(p) -> None:
    p.add_argument("--paths", nargs="+", default=list(BLK_PATHS), choices=BLK_PATHS,
                   help=f"exitless I/O paths to measure (default: all: {' '.join(BLK_PATHS)})")
    p.add_argument("--tests", nargs="+", choices=NET_TESTS, metavar="TEST", help=f"subset of: {' '.join(NET_TESTS)}")
    p.add_argument("--scale", type=scale_factor, default=1.0, help="multiply the packet counts (default 1.0)")
    p.add_argument("--no-qemu", action="store_true", help="skip QEMU's own virtio-net (tap) rows")
    p.add_argument("--no-vhost", action="store_true", help="skip the qemu+exitless (vhost-user-net) rows")
    _pin(p)
    p.add_argument("--plot", type=output_file, metavar="PNG", help="write a PNG plot here")
    _common(p)


def add_boot(p) -> None:
    p.add_argument("--rounds", "--runs", dest="runs", type=positive_int, default=None,
                   help="boots per row, alternating exitless and QEMU (the median and min–max are reported; "
                        "default 3, 1 on kvm_pvm hosts where a boot takes minutes)")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE", type=output_file,
                   help="write the results as JSON to FILE, or alone: to stdout (then only JSON goes to stdout)")
    p.add_argument("--timeout", type=positive_float, default=None,
                   help="seconds per boot before it is stopped (default 60; 600 for QEMU TCG; 3600 on kvm_pvm "
                        "hosts, where guest ring 0 is emulated)")
    p.add_argument("--mem", type=mem_size, default=256, help="guest RAM, as run --mem (default 256M)")
    p.add_argument("--cpus", type=positive_int, nargs="+", default=[1], metavar="N",
                   help="guest vCPUs; several values give a row per VMM for each (default 1)")
    p.add_argument("--append", default="", metavar="PARAMS",
                   help="more kernel parameters for every boot (e.g. to measure what one saves; default none)")
    p.add_argument("--cache", help="guest cache directory (default $EXITLESS_CACHE or ~/.cache/exitless/guest)")
    p.add_argument("--decompress", choices=("auto", "guest", "host"), default="auto",
                   help="bzImage: run its decompressor in the guest, or unpack it on the host "
                        "(auto: host on kvm_pvm hosts, guest elsewhere; default auto)")
    p.add_argument("--qemu", choices=("auto", "kvm", "tcg", "none"), nargs="+", default=["auto"], metavar="ACCEL",
                   help="QEMU rows: auto, kvm, tcg or none; several give a row each (auto: on kvm_pvm hosts kvm "
                        "and tcg, elsewhere kvm if it works, else tcg, saying why; default auto)")


#: ``exitless bench sidecore``'s layouts (defined in exitless.bench.sidecore)
SIDECORE_LAYOUTS = ("shared", "shared-1proc", "per-vm", "qemu")


def vm_counts(text: str) -> list[int]:
    """argparse ``type=`` for ``--vms 1,2,4,8``: positive VM counts, in order, without repeats."""
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated VM counts, e.g. 1,2,4,8") from None
    if not counts or min(counts) < 1 or max(counts) > 64:
        raise argparse.ArgumentTypeError(f"{text!r}: VM counts between 1 and 64")
    return list(dict.fromkeys(counts))


def add_sidecore(p) -> None:
    p.add_argument("--vms", type=vm_counts, default=[1, 2, 4, 8], metavar="N,N,…",
                   help="VM counts, comma-separated (default 1,2,4,8)")
    p.add_argument("--layouts", nargs="+", choices=SIDECORE_LAYOUTS, default=["shared", "per-vm", "qemu"],
                   help="shared: one `exitless sidecore` service; shared-1proc: the VMs in one exitless process on one "
                        "sidecore thread; per-vm: a sidecore per VM; qemu: QEMU with an iothread per VM "
                        "(default: shared per-vm qemu)")
    p.add_argument("--seconds", type=positive_float, default=5.0,
                   help="seconds of I/O per VM and sample, all VMs at once (default 5)")
    p.add_argument("--qd", type=positive_int, default=1, help="requests in flight per VM (default 1)")
    p.add_argument("--modes", nargs="+", choices=("poll", "adaptive"), default=["poll", "adaptive"],
                   help="the exitless sidecore's modes, a row each (default: poll adaptive)")
    p.add_argument("--service-args", action="append", type=service_args, metavar="'OPTS'",
                   help="more options for `exitless sidecore` (shared layout), e.g. '--idle-yield-us 20'; repeat it "
                        "for more variants, each a row per mode measured side by side (default: none)")
    p.add_argument("--plot", type=output_file, metavar="PNG", help="write a PNG plot here")
    _common(p)


def service_args(text: str) -> str:
    """``--service-args``: options of ``exitless sidecore`` only (each token an option or its value), as
    one normalised string."""
    try:
        tokens = shlex.split(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    if tokens and not tokens[0].startswith("--"):
        raise argparse.ArgumentTypeError(f"{text!r}: options of `exitless sidecore`, e.g. '--idle-yield-us 20'")
    if any(t in ("--socket", "--mode") or t.startswith(("--socket=", "--mode=")) for t in tokens):
        raise argparse.ArgumentTypeError(f"{text!r}: the bench sets --socket and --mode itself (see --modes)")
    return shlex.join(tokens)


def add_soak(p) -> None:
    p.add_argument("--minutes", type=positive_float, default=10.0,
                   help="run cycles until this much time has passed (at least one cycle; default 10)")
    p.add_argument("--seed", type=positive_int, default=1, help="random choices and pattern generations (default 1)")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE", type=output_file,
                   help="write the rows as JSON to FILE, or alone: to stdout (then only JSON goes to stdout)")
