"""Arguments shared by several commands: argparse ``type=`` callables and ``--disk`` in its one grammar."""
from __future__ import annotations

import argparse

from ..disk import OPTIONS, DiskSpec, DiskSpecError, syntax


def mem_size(text: str) -> int:
    """``'256'``, ``'256M'``, ``'1G'`` -> MiB."""
    t = text.strip().upper()
    try:
        if t.endswith("G"):
            return int(t[:-1]) * 1024
        return int(t[:-1] if t.endswith("M") else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad memory size {text!r} (e.g. 256M, 1G)") from None


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
