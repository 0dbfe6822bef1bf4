"""The ``--disk`` grammar, one for every command that takes a disk, and plugging disks into a machine.

    PATH[,ro][,direct][,io=trap|ioeventfd|shared|poll|adaptive][,queues=1..16][,lock=off]

``PATH`` comes first; a comma inside it is written ``,,`` (QEMU's convention), so
every path can be spelled.  Each option appears at most once, in any order.  A
command accepts a subset of the options (``serve blk`` takes ``ro``, ``direct`` and
``lock``); :func:`syntax` gives its syntax string for ``--help``.  ``lock=off``: the
image is opened without its image lock (:mod:`exitless.devices.imagelock`), for back-ends
kept up side by side that take turns on one image (``bench vhost``, as its
qemu-storage-daemon's ``locking=off``); only ``serve blk`` takes it.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .errors import ExitlessError
from .sidecore.paths import PATHS, REMOTE_PATHS

#: Every option of the grammar.
GRAMMAR = ("ro", "direct", "io", "queues", "lock")
#: The options of ``run --disk``.
OPTIONS = ("ro", "direct", "io", "queues")
MAX_QUEUES = 16
DEFAULT_IO = "ioeventfd"

_VALUES = {"io": "|".join(PATHS), "queues": f"1..{MAX_QUEUES}", "lock": "off"}


class DiskSpecError(ExitlessError, ValueError):
    """A ``--disk`` spec does not parse; the message quotes the spec and names the bad part."""


def syntax(options: tuple[str, ...] = OPTIONS) -> str:
    """The syntax string of a spec taking ``options``: ``PATH[,ro][,direct]…``."""
    return "PATH" + "".join(f"[,{o}={_VALUES[o]}]" if o in _VALUES else f"[,{o}]" for o in options)


@dataclass(frozen=True)
class DiskSpec:
    """One disk: its backing file (or block device), access mode, I/O path, number of virtqueues and
    whether it takes its image lock."""

    path: str
    read_only: bool = False
    direct: bool = False
    io: str = DEFAULT_IO
    queues: int = 1
    lock: bool = True

    @classmethod
    def parse(cls, text: str, options: tuple[str, ...] = OPTIONS) -> "DiskSpec":
        """Parse ``text`` (see the module docstring), accepting only ``options``.

        Raises :class:`DiskSpecError` naming the spec and the bad part: no path, an
        empty, unknown, repeated or here-unaccepted option, or a bad value.
        """
        path, *opts = split_spec(text)
        if not path:
            raise DiskSpecError(f"{text!r}: no path (syntax: {syntax(options)})")
        fields: dict[str, object] = {}
        seen: set[str] = set()
        for opt in opts:
            key, eq, value = opt.partition("=")
            if not opt:
                raise DiskSpecError(f"{text!r}: empty option (a comma in PATH is written ',,')")
            if key not in GRAMMAR:
                raise DiskSpecError(f"{text!r}: unknown option {opt!r} (syntax: {syntax(options)})")
            if key not in options:
                raise DiskSpecError(f"{text!r}: option {opt!r} is not accepted here (syntax: {syntax(options)})")
            if key in seen:
                raise DiskSpecError(f"{text!r}: option {opt!r} given twice")
            seen.add(key)
            if key in ("ro", "direct"):
                if eq:
                    raise DiskSpecError(f"{text!r}: option {opt!r}: {key} takes no value")
                fields["read_only" if key == "ro" else "direct"] = True
            elif key == "io":
                if value not in PATHS:
                    raise DiskSpecError(f"{text!r}: option {opt!r}: the I/O path is one of {', '.join(PATHS)}")
                fields["io"] = value
            elif key == "lock":
                if value != "off":
                    raise DiskSpecError(f"{text!r}: option {opt!r}: lock takes only off (lock=off)")
                fields["lock"] = False
            else:  # queues
                if not (value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_QUEUES):
                    raise DiskSpecError(f"{text!r}: option {opt!r}: queues is a number in 1..{MAX_QUEUES}")
                fields["queues"] = int(value)
        return cls(path, **fields)

    def format(self) -> str:
        """The spec as text (defaults left out); ``DiskSpec.parse(spec.format()) == spec``."""
        parts = [self.path.replace(",", ",,")]
        if self.read_only:
            parts.append("ro")
        if self.direct:
            parts.append("direct")
        if self.io != DEFAULT_IO:
            parts.append(f"io={self.io}")
        if self.queues != 1:
            parts.append(f"queues={self.queues}")
        if not self.lock:
            parts.append("lock=off")
        return ",".join(parts)


def split_spec(text: str) -> list[str]:
    """Split a device spec at single commas; ``,,`` is a literal comma (scanned left to right).

    The one splitting rule of every device option (``--disk``, ``--nvme``)."""
    fields, cur, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text.startswith(",,", i):
                cur.append(",")
                i += 2
                continue
            fields.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    fields.append("".join(cur))
    return fields


def add_disk(machine, spec: DiskSpec, sidecore=None, service: str | None = None):
    """Open the backing file and plug a virtio-blk-pci device into ``machine``.

    ``service``: the socket of an ``exitless sidecore`` service that serves the disk's queues if its
    path polls (``shared``, ``poll``, ``adaptive``); ``trap`` and ``ioeventfd`` disks stay in this VMM.
    Raises :class:`exitless.devices.virtio.blk.BackingFileError` if the file cannot be used,
    :class:`exitless.sidecore.remote.RemoteSidecoreError` if the service cannot be reached.
    """
    from .devices.virtio.blk import VirtioBlk
    from .devices.virtio.pci import VirtioPci

    dev = VirtioBlk(spec.path, read_only=spec.read_only, direct=spec.direct, num_queues=spec.queues)
    remote = service if spec.io in REMOTE_PATHS else None
    return VirtioPci(machine, dev, spec.io, sidecore=None if remote else sidecore, service=remote)


def add_disks(machine, specs: list[DiskSpec], *, one_sidecore: bool = False, groups: dict | None = None,
              service: str | None = None) -> list:
    """Plug every disk (``/dev/vda``, ``vdb``… in the guest); returns their ``VirtioPci`` functions.

    With ``one_sidecore`` the disks of each polling mode (every path but ``trap``) share one
    :class:`exitless.sidecore.engine.SidecoreGroup`, started on ``machine`` once all are added;
    otherwise each disk gets its own sidecore.  ``groups`` (a dict from :func:`sidecore_group`)
    shares the groups with other devices (NVMe): the caller starts them after the last device.
    ``service``: see :func:`add_disk`.  Every command that plugs disks goes through here.
    """
    own = groups is None
    groups = {} if own else groups
    devices = [add_disk(machine, spec, None if service and spec.io in REMOTE_PATHS else
                        sidecore_group(groups, spec.io) if one_sidecore or not own else None, service)
               for spec in specs]
    if own:
        for group in groups.values():
            group.start_on(machine)
    return devices


class SharedImageError(ExitlessError, ValueError):
    """One image backs two devices and one of them may write it; the message names both."""


def refuse_shared_images(specs) -> None:
    """Refuse one file (or block device) given to two devices -- ``--disk``, ``--nvme``, ``serve blk
    --disk`` -- unless every one of them is read-only: two writers with their own caches (the
    guest's, one per device) corrupt the file system on it silently.  QEMU refuses the same with
    its image locks.  ``specs`` have ``path`` and ``read_only``; a path that does not exist is left
    to the device to report.  Raises :class:`SharedImageError`.
    """
    seen: dict[tuple[int, int], tuple[str, bool]] = {}
    for spec in specs:
        try:
            st = os.stat(spec.path)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino) if not stat.S_ISBLK(st.st_mode) else (-1, st.st_rdev)
        if key in seen:
            other, other_ro = seen[key]
            if not (spec.read_only and other_ro):
                raise SharedImageError(f"{spec.path}: the same image as {other} given to two devices, not both "
                                       "read-only (add ,ro to both, or use a copy)")
        else:
            seen[key] = (spec.path, spec.read_only)


def sidecore_group(groups: dict, io: str):
    """The shared sidecore of I/O path ``io``'s mode in ``groups`` (created on first use); None for ``trap``."""
    from .sidecore.engine import SidecoreGroup
    from .sidecore.paths import MODE_OF_PATH

    if io == "trap":
        return None
    mode = MODE_OF_PATH[io]
    return groups.setdefault(mode, SidecoreGroup(mode, name=f"sidecore-{mode}"))
