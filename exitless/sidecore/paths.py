"""I/O paths: how a driver's write to a doorbell register reaches the device model.

- ``trap``: the register is MMIO; each write exits to the vCPU thread's Python handler.
- ``ioeventfd``: KVM_IOEVENTFD on the register; the write exits only into KVM, which
  signals an eventfd; a sidecore in ``notify`` mode (the "device thread") wakes and
  reads the value from the shadow slot of the shared page.
- ``shared`` (alias ``poll``): the driver writes the shadow slot in a RAM page that
  the sidecore also maps, and nothing else: no exit at all; the sidecore polls.
- ``adaptive``: ``shared`` while busy; when idle the sidecore publishes EventIdx and
  sleeps on the ioeventfd, which the driver rings only when EventIdx says so.

The sidecore runs as a ``thread`` of the VMM or as a separate ``process`` that
maps the same memfd.  Several devices can share one sidecore.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..devices.base import SHARED_PAGE_SIZE, RegisterDevice
from .engine import SidecoreGroup

PATHS = ("trap", "ioeventfd", "shared", "poll", "adaptive")
MODE_OF_PATH = {"ioeventfd": "notify", "shared": "poll", "poll": "poll", "adaptive": "adaptive"}
#: The I/O paths whose queues ``exitless sidecore`` can serve (the polled ones; ``run --sidecore``).
REMOTE_PATHS = ("shared", "poll", "adaptive")
#: ... and those of a NIC's queue pairs: not ``shared``, whose doorbells are a RAM page -- the NIC's control
#: queue stays in the VMM (:mod:`exitless.sidecore.service_net`), and nothing there would watch its doorbell.
REMOTE_NIC_PATHS = ("poll", "adaptive")


@dataclass
class Attachment:
    device: RegisterDevice
    path: str
    mmio_gpa: int
    shared_gpa: int
    sidecore: SidecoreGroup | None
    wake_fd: int | None

    def stop(self) -> None:
        if self.wake_fd is not None:
            os.close(self.wake_fd)
            self.wake_fd = None


def attach(machine, device: RegisterDevice, *, mmio_gpa: int, shared_gpa: int, path: str,
           placement: str = "thread", sidecore: SidecoreGroup | None = None, poll_ns: int = 64_000) -> Attachment:
    """Put ``device`` on the MMIO bus and wire its doorbells through ``path``.

    Pass ``sidecore`` to share one sidecore between devices (``sidecore.start_on(machine)``
    after the last ``attach``); otherwise a dedicated one is started here.
    """
    if path not in PATHS:
        raise ValueError(f"I/O path {path!r}: one of {', '.join(PATHS)}")
    machine.add_ram_page(shared_gpa, SHARED_PAGE_SIZE)
    device.attach_shared(machine.mem.view(shared_gpa, SHARED_PAGE_SIZE))
    machine.mmio.insert(mmio_gpa, device.MMIO_SIZE, device, device.NAME)
    wake_fd = None
    if path in ("ioeventfd", "adaptive"):
        wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        for reg in device.doorbells():
            machine.vm.ioeventfd(wake_fd, mmio_gpa + reg.offset, reg.size)
    att = Attachment(device, path, mmio_gpa, shared_gpa, None, wake_fd)
    machine.add_worker(att)  # closes the eventfd after the sidecore (workers stop in reverse order)
    if path != "trap":
        own = sidecore is None
        att.sidecore = sidecore or SidecoreGroup(MODE_OF_PATH[path], placement=placement, poll_ns=poll_ns,
                                                 name=f"sidecore-{device.NAME}")
        if att.sidecore.mode != MODE_OF_PATH[path]:
            raise ValueError(f"a {att.sidecore.mode} sidecore cannot serve the {path} path")
        att.sidecore.add_device(device, shared_gpa, wake_fd)
        if own:
            att.sidecore.start_on(machine)
    return att
