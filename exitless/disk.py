"""``--disk PATH[,ro][,direct][,io=PATH][,queues=N]``: a virtio-blk disk on PCI with its I/O path."""
from __future__ import annotations

from .errors import ExitlessError
from dataclasses import dataclass

from .sidecore.paths import PATHS


class DiskSpecError(ExitlessError, ValueError):
    pass


@dataclass
class DiskSpec:
    path: str
    read_only: bool = False
    direct: bool = False
    io: str = "ioeventfd"
    queues: int = 1

    @classmethod
    def parse(cls, text: str) -> "DiskSpec":
        path, *opts = text.split(",")
        if not path:
            raise DiskSpecError(f"--disk {text!r}: no path")
        spec = cls(path)
        for opt in opts:
            key, _, value = opt.partition("=")
            if key == "ro" and not value:
                spec.read_only = True
            elif key == "direct" and not value:
                spec.direct = True
            elif key == "io" and value in PATHS:
                spec.io = value
            elif key == "queues" and value.isdigit() and 1 <= int(value) <= 16:
                spec.queues = int(value)
            else:
                raise DiskSpecError(f"--disk {text!r}: bad option {opt!r} (ro, direct, io={'|'.join(PATHS)}, "
                                    "queues=1..16)")
        return spec


def add_disk(machine, spec: DiskSpec, sidecore=None):
    """Open the backing file and plug a virtio-blk-pci device into ``machine``."""
    from .devices.virtio.blk import VirtioBlk
    from .devices.virtio.pci import VirtioPci

    dev = VirtioBlk(spec.path, read_only=spec.read_only, direct=spec.direct, num_queues=spec.queues)
    return VirtioPci(machine, dev, spec.io, sidecore=sidecore)


def add_disks(machine, specs: list[DiskSpec], *, one_sidecore: bool = False) -> list:
    """Plug every disk; with ``one_sidecore`` the disks of each polling path share one sidecore."""
    from .sidecore.engine import SidecoreGroup
    from .sidecore.paths import MODE_OF_PATH

    groups = {}
    devices = []
    for spec in specs:
        group = None
        if one_sidecore and spec.io != "trap":
            mode = MODE_OF_PATH[spec.io]
            group = groups.setdefault(mode, SidecoreGroup(mode, name=f"sidecore-{mode}"))
        devices.append(add_disk(machine, spec, group))
    for group in groups.values():
        group.start_on(machine)
    return devices
