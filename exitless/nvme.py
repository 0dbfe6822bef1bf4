"""The ``--nvme`` grammar and plugging NVMe controllers into a machine.

    PATH[,ro][,direct][,io=trap|ioeventfd|shared|poll|adaptive][,queues=1..64][,lba=512|4096]

One controller per ``--nvme``, with one namespace backed by ``PATH`` (a file or
block device), ``queues`` I/O queue pairs (default 4) and ``lba``-byte logical
blocks (default 512); ``io`` is its doorbells' I/O path (default ioeventfd, see
:mod:`exitless.devices.nvme.pci`).  The splitting rules are ``--disk``'s: a
comma in PATH is written ``,,``; each option at most once.
"""
from __future__ import annotations

from dataclasses import dataclass

from .devices.nvme.namespace import LBA_SIZES
from .disk import sidecore_group, split_spec
from .errors import ExitlessError
from .sidecore.paths import PATHS, REMOTE_PATHS

MAX_QUEUES = 64
DEFAULT_IO = "ioeventfd"
SYNTAX = f"PATH[,ro][,direct][,io={'|'.join(PATHS)}][,queues=1..{MAX_QUEUES}][,lba=512|4096]"


class NvmeSpecError(ExitlessError, ValueError):
    """A ``--nvme`` spec does not parse; the message quotes the spec and names the bad part."""


@dataclass(frozen=True)
class NvmeSpec:
    path: str
    read_only: bool = False
    direct: bool = False
    io: str = DEFAULT_IO
    queues: int = 4
    lba: int = 512

    @classmethod
    def parse(cls, text: str) -> "NvmeSpec":
        """Parse one ``--nvme`` value; raises :class:`NvmeSpecError` naming the bad part and the syntax."""
        path, *opts = split_spec(text)
        if not path:
            raise NvmeSpecError(f"{text!r}: no path (syntax: {SYNTAX})")
        fields: dict[str, object] = {}
        for opt in opts:
            key, eq, value = opt.partition("=")
            name = {"ro": "read_only", "direct": "direct", "io": "io", "queues": "queues", "lba": "lba"}.get(key)
            if name is None:
                raise NvmeSpecError(f"{text!r}: unknown option {opt!r} (syntax: {SYNTAX})")
            if name in fields:
                raise NvmeSpecError(f"{text!r}: option {opt!r} given twice")
            if key in ("ro", "direct"):
                if eq:
                    raise NvmeSpecError(f"{text!r}: option {opt!r}: {key} takes no value")
                fields[name] = True
            elif key == "io":
                if value not in PATHS:
                    raise NvmeSpecError(f"{text!r}: option {opt!r}: the I/O path is one of {', '.join(PATHS)}")
                fields[name] = value
            else:
                number = int(value) if value.isascii() and value.isdigit() else 0
                ok = 1 <= number <= MAX_QUEUES if key == "queues" else number in LBA_SIZES
                if not ok:
                    want = f"a number in 1..{MAX_QUEUES}" if key == "queues" else "512 or 4096"
                    raise NvmeSpecError(f"{text!r}: option {opt!r}: {key} is {want}")
                fields[name] = number
        return cls(path, **fields)


def add_nvme(machine, spec: NvmeSpec, sidecore=None, service: str | None = None):
    """Open the namespace's backing file and plug an NVMe controller into ``machine``'s PCI bus.

    ``service``: the socket of an ``exitless sidecore`` that serves the controller's I/O queue pairs
    if its path polls (``shared``, ``poll``, ``adaptive``); ``trap`` and ``ioeventfd`` stay in this VMM.
    Raises :class:`~exitless.devices.nvme.namespace.NamespaceError` for a missing or unusable file,
    :class:`exitless.sidecore.remote.RemoteSidecoreError` if the service cannot be reached.
    """
    from .devices.nvme.namespace import Namespace
    from .devices.nvme.pci import NvmePci

    ns = Namespace(spec.path, lba_size=spec.lba, read_only=spec.read_only, direct=spec.direct)
    try:
        remote = service if spec.io in REMOTE_PATHS else None
        return NvmePci(machine, ns, spec.io, queues=spec.queues, sidecore=None if remote else sidecore,
                       service=remote)
    except BaseException:
        ns.close()
        raise


def add_nvmes(machine, specs: list[NvmeSpec], *, groups: dict | None = None, service: str | None = None) -> list:
    """Plug every controller; with ``groups`` (see :func:`exitless.disk.sidecore_group`) those on a
    polling path join the shared sidecores, which the caller starts after the last device; with
    ``service`` (see :func:`add_nvme`) those on a polled path are served by that sidecore service."""
    return [add_nvme(machine, spec, None if service and spec.io in REMOTE_PATHS else
                     sidecore_group(groups, spec.io) if groups is not None else None, service)
            for spec in specs]
