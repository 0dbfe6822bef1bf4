"""``--nvme PATH[,ro][,direct][,io=PATH][,queues=N][,lba=512|4096]``: an NVMe controller on PCI with one
namespace, its doorbells on the chosen I/O path (:mod:`exitless.devices.nvme.pci`)."""
from __future__ import annotations

from dataclasses import dataclass

from .devices.nvme.namespace import LBA_SIZES
from .errors import ExitlessError
from .sidecore.paths import PATHS

SYNTAX = f"PATH[,ro][,direct][,io={'|'.join(PATHS)}][,queues=1..64][,lba=512|4096]"


class NvmeSpecError(ExitlessError, ValueError):
    pass


@dataclass
class NvmeSpec:
    path: str
    read_only: bool = False
    direct: bool = False
    io: str = "ioeventfd"
    queues: int = 4
    lba: int = 512

    @classmethod
    def parse(cls, text: str) -> "NvmeSpec":
        """Parse one ``--nvme`` value; raises :class:`NvmeSpecError` naming the bad option and the syntax."""
        path, *opts = text.split(",")
        if not path:
            raise NvmeSpecError(f"--nvme {text!r}: no path ({SYNTAX})")
        spec = cls(path)
        for opt in opts:
            key, _, value = opt.partition("=")
            if key == "ro" and not value:
                spec.read_only = True
            elif key == "direct" and not value:
                spec.direct = True
            elif key == "io" and value in PATHS:
                spec.io = value
            elif key == "queues" and value.isdigit() and 1 <= int(value) <= 64:
                spec.queues = int(value)
            elif key == "lba" and value.isdigit() and int(value) in LBA_SIZES:
                spec.lba = int(value)
            else:
                raise NvmeSpecError(f"--nvme {text!r}: bad option {opt!r} ({SYNTAX})")
        return spec


def add_nvme(machine, spec: NvmeSpec, sidecore=None):
    """Open the namespace's backing file and plug an NVMe controller into ``machine``'s PCI bus.

    Raises :class:`~exitless.devices.nvme.namespace.NamespaceError` for a missing or unusable file.
    """
    from .devices.nvme.namespace import Namespace
    from .devices.nvme.pci import NvmePci

    ns = Namespace(spec.path, lba_size=spec.lba, read_only=spec.read_only, direct=spec.direct)
    try:
        return NvmePci(machine, ns, spec.io, queues=spec.queues, sidecore=sidecore)
    except BaseException:
        ns.close()
        raise


def add_nvmes(machine, specs: list[NvmeSpec], *, one_sidecore: bool = False) -> list:
    """Plug every controller; with ``one_sidecore`` those of each polling path share one sidecore."""
    from .sidecore.loop import SidecoreGroup
    from .sidecore.paths import MODE_OF_PATH

    groups = {}
    devices = []
    for spec in specs:
        group = None
        if one_sidecore and spec.io != "trap":
            mode = MODE_OF_PATH[spec.io]
            group = groups.setdefault(mode, SidecoreGroup(mode, name=f"sidecore-nvme-{mode}"))
        devices.append(add_nvme(machine, spec, group))
    for group in groups.values():
        group.start_on(machine)
    return devices
