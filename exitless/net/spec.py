"""``--net tap=NAME[,mac=MAC][,io=PATH][,queues=N][,netns=NS]``: a virtio-net NIC on PCI over a TAP.

``io`` is one of the five I/O paths (as for disks; default ``ioeventfd``); ``queues`` is the
number of queue pairs (a multi-queue TAP when > 1); ``netns`` attaches the TAP in that network
namespace (``/run/netns/NS``); ``mac`` defaults to 52:54:00 plus a hash of the TAP's name.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import ExitlessError
from ..sidecore.paths import PATHS, REMOTE_NIC_PATHS

__all__ = ["NetSpec", "NetSpecError", "add_nic", "add_nics"]

log = logging.getLogger(__name__)


class NetSpecError(ExitlessError, ValueError):
    """A ``--net`` specification that cannot be used (the message quotes it)."""


@dataclass
class NetSpec:
    tap: str
    mac: bytes | None = None
    io: str = "ioeventfd"
    queues: int = 1
    netns: str | None = None

    @classmethod
    def parse(cls, text: str) -> "NetSpec":
        """Parse ``tap=NAME[,mac=..][,io=..][,queues=N][,netns=NS]``; raises :class:`NetSpecError`."""
        from ..devices.virtio.net import parse_mac
        from .tap import TapError, check_name

        fields: dict[str, str] = {}
        for opt in text.split(","):
            key, eq, value = opt.partition("=")
            if not opt:
                raise NetSpecError(f"{text!r}: empty option")
            if key in fields:
                raise NetSpecError(f"{text!r}: option {key!r} given twice")
            if not eq or not value:
                raise NetSpecError(f"{text!r}: bad option {opt!r} "
                                   f"(tap=NAME, mac=MAC, io={'|'.join(PATHS)}, queues=1..16, netns=NS)")
            fields[key] = value
        if "tap" not in fields:
            raise NetSpecError(f"{text!r}: tap=NAME is required")
        spec = cls(fields.pop("tap"))
        try:
            check_name(spec.tap)
        except TapError as e:
            raise NetSpecError(f"{text!r}: {e.strerror}") from None
        for key, value in fields.items():
            if key == "mac":
                try:
                    spec.mac = parse_mac(value)
                except ValueError as e:
                    raise NetSpecError(f"{text!r}: {e}") from None
            elif key == "io" and value in PATHS:
                spec.io = value
            elif key == "queues" and value.isascii() and value.isdigit() and 1 <= int(value) <= 16:
                spec.queues = int(value)
            elif key == "netns" and "/" not in value:
                spec.netns = value
            else:
                raise NetSpecError(f"{text!r}: bad option {key}={value!r} "
                                   f"(mac=MAC, io={'|'.join(PATHS)}, queues=1..16, netns=NS)")
        return spec


class _TapCloser:
    """A machine worker that closes the TAP after the NIC using it stopped (workers stop in reverse)."""

    def __init__(self, tap):
        self.tap = tap

    def stop(self) -> None:
        self.tap.close()


def add_nic(machine, spec: NetSpec, sidecore=None, service: str | None = None):
    """Attach the TAP and plug a virtio-net-pci device into ``machine``; returns the VirtioPci.

    ``service``: the socket of an ``exitless sidecore`` service that serves the NIC's queue pairs
    (io ``poll`` or ``adaptive``; the control queue stays here); ``trap`` and ``ioeventfd`` NICs stay in
    this VMM, ``shared`` is refused (:func:`refuse_shared_on_service`).
    Raises :class:`~exitless.net.tap.TapError` if the TAP cannot be attached,
    :class:`exitless.sidecore.remote.RemoteSidecoreError` if the service cannot be reached or refuses it.
    """
    from ..devices.virtio.net import VirtioNet
    from ..devices.virtio.pci import VirtioPci
    from .tap import Tap

    tap = Tap.open(spec.tap, queues=spec.queues, netns=spec.netns)
    machine.add_worker(_TapCloser(tap))
    if tap.hint():
        log.warning("%s", tap.hint())
    dev = VirtioNet(tap, mac=spec.mac, queue_pairs=spec.queues)
    remote = service if spec.io in REMOTE_NIC_PATHS else None
    return VirtioPci(machine, dev, spec.io, sidecore=None if remote else sidecore, service=remote)


def refuse_shared_on_service(specs: list[NetSpec], service: str | None) -> None:
    """Refuse, with a sidecore service, a NIC on the ``shared`` path -- its control queue stays in this
    VMM, and on that path its doorbell is a RAM page that nothing here would watch -- and one with more
    queue pairs than one hand-over carries (:data:`exitless.sidecore.service_net.MAX_PAIRS`).
    Raises :class:`NetSpecError`."""
    if not service:
        return
    from ..sidecore.service_net import MAX_PAIRS

    for spec in specs:
        if spec.io == "shared":
            raise NetSpecError(f"--net tap={spec.tap},io=shared with --sidecore: the NIC's control queue stays in "
                               f"this VMM and on the shared path nothing here sees its doorbell; use "
                               f"io={' or io='.join(REMOTE_NIC_PATHS)} (the service serves the queue pairs)")
        if spec.io in REMOTE_NIC_PATHS and spec.queues > MAX_PAIRS:
            raise NetSpecError(f"--net tap={spec.tap},queues={spec.queues} with --sidecore: at most {MAX_PAIRS} "
                               "queue pairs (their TAP fds and one more go over in one message of at most 8 fds)")


def refuse_shared_taps(specs: list[NetSpec]) -> None:
    """Refuse one TAP (a name in a network namespace) given to two NICs: the second attach would fail
    with the kernel's "busy", which reads as if another process held it.  Raises :class:`NetSpecError`."""
    seen: set[tuple[str | None, str]] = set()
    for spec in specs:
        key = (spec.netns, spec.tap)
        if key in seen:
            where = f" in netns {spec.netns}" if spec.netns else ""
            raise NetSpecError(f"--net tap={spec.tap}{where} is given to two NICs: one TAP per NIC")
        seen.add(key)


def add_nics(machine, specs: list[NetSpec], *, groups: dict | None = None, service: str | None = None) -> list:
    """Plug every NIC: each with its own sidecore, as the I/O path asks, or with ``groups`` (see
    :func:`exitless.disk.sidecore_group`) those on a polling path join the shared sidecores (with the
    disks and NVMe controllers), which the caller starts after the last device; ``service``: see
    :func:`add_nic`.  One TAP given to two NICs, and a shared-path NIC with a service, are refused first
    (:func:`refuse_shared_taps`, :func:`refuse_shared_on_service`)."""
    from ..disk import sidecore_group

    refuse_shared_taps(specs)
    refuse_shared_on_service(specs, service)
    return [add_nic(machine, spec, None if service and spec.io in REMOTE_NIC_PATHS else
                    sidecore_group(groups, spec.io) if groups is not None else None, service)
            for spec in specs]
