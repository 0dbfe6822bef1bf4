"""Arguments shared by several commands: argparse ``type=`` callables, ``--disk`` and ``--nvme`` in their grammars."""
from __future__ import annotations

import argparse

from ..argtypes import host_ram_mib, mem_size, non_negative_int, positive_float, positive_int  # noqa: F401
from ..disk import OPTIONS, DiskSpec, DiskSpecError, syntax
from ..nvme import SYNTAX as NVME_SYNTAX
from ..nvme import NvmeSpec, NvmeSpecError


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
