"""Arguments shared by several commands: argparse ``type=`` callables, ``--disk`` and ``--nvme`` in their grammars."""
from __future__ import annotations

import argparse
import os

from ..disk import OPTIONS, DiskSpec, DiskSpecError, syntax
from ..nvme import SYNTAX as NVME_SYNTAX
from ..nvme import NvmeSpec, NvmeSpecError


_MEM_UNITS = {"M": 1, "G": 1 << 10, "T": 1 << 20}


def host_ram_mib() -> int:
    """The host's physical RAM in MiB: the upper bound of ``--mem`` (guest RAM is mmap'ed up front)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20


def mem_size(text: str) -> int:
    """argparse ``type=`` for ``--mem``: ``'256'``, ``'256M'``, ``'1G'``, ``'1T'`` -> MiB.

    Refuses (a usage error, exit 2) a size that is not positive or exceeds the host's RAM
    (:func:`host_ram_mib`), before any memory is mapped.  The lower bound is the VM's own
    check (``exitless.vm.MIN_MEM_MIB``).
    """
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = _MEM_UNITS.get(t[-1:], None)
    try:
        mib = int(t[:-1] if unit else t) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad memory size {text!r} (e.g. 256M, 1G)") from None
    if mib <= 0:
        raise argparse.ArgumentTypeError(f"memory size {text!r} must be positive")
    host = host_ram_mib()
    if mib > host:
        raise argparse.ArgumentTypeError(f"memory size {text} is too large: the host has {host} MiB of RAM")
    return mib


def _number(kind, text: str, *, zero_ok: bool):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v >= 0 if zero_ok else v > 0) or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be {'>= 0' if zero_ok else '> 0'}")
    return v


def positive_int(text: str) -> int:
    """argparse ``type=`` for a count (operations, rounds, CPUs): an integer > 0."""
    return _number(int, text, zero_ok=False)


def non_negative_int(text: str) -> int:
    """argparse ``type=`` for a count where 0 means none (warm-up operations, a skipped measurement)."""
    return _number(int, text, zero_ok=True)


def positive_float(text: str) -> float:
    """argparse ``type=`` for a scale factor or a timeout (seconds): a finite number > 0."""
    return _number(float, text, zero_ok=False)


def power_of_two(text: str) -> int:
    """A ring size: a power of two in 1..32768 (virtio 1.2 §2.7)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= v <= 32768 or v & (v - 1):
        raise argparse.ArgumentTypeError(f"{v} is not a power of two in 1..32768")
    return v


def add_disk_argument(parser: argparse.ArgumentParser, options: tuple[str, ...] = OPTIONS, *, help: str,
                      **kwargs) -> None:
    """Add ``--disk`` in the one grammar of :mod:`exitless.disk`, taking ``options``, its syntax in the help.

    The parsed value is a :class:`exitless.disk.DiskSpec` (a list with ``action="append"``);
    a bad spec exits 2 with argparse's usage and the :class:`~exitless.disk.DiskSpecError` message.
    """
    def disk(text: str) -> DiskSpec:
        try:
            return DiskSpec.parse(text, options)
        except DiskSpecError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parser.add_argument("--disk", type=disk, metavar="SPEC",
                        help=f"{help}; SPEC is {syntax(options)} (a comma in PATH is written ',,')", **kwargs)


def add_nvme_argument(parser: argparse.ArgumentParser, *, help: str, **kwargs) -> None:
    """Add ``--nvme`` in the grammar of :mod:`exitless.nvme`; the value is a :class:`exitless.nvme.NvmeSpec`."""
    def nvme(text: str) -> NvmeSpec:
        try:
            return NvmeSpec.parse(text)
        except NvmeSpecError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parser.add_argument("--nvme", type=nvme, metavar="SPEC",
                        help=f"{help}; SPEC is {NVME_SYNTAX} (a comma in PATH is written ',,')", **kwargs)
