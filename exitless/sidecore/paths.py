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
from dataclasses import dataclass, field

from ..devices.base import SHARED_PAGE_SIZE, RegisterDevice
from .loop import SidecoreLoop, SidecoreThread
from .process import DeviceSpec, SidecoreProcess, build_pollables

PATHS = ("trap", "ioeventfd", "shared", "poll", "adaptive")
PLACEMENTS = ("thread", "process")
MODE_OF_PATH = {"ioeventfd": "notify", "shared": "poll", "poll": "poll", "adaptive": "adaptive"}


@dataclass
class _Member:
    device: RegisterDevice
    shared_gpa: int
    wake_fd: int | None


@dataclass
class Sidecore:
    """One polling (or sleeping) agent serving several devices; a Worker of the VM."""

    machine: object
    mode: str
    placement: str = "thread"
    poll_ns: int = 64_000
    members: list[_Member] = field(default_factory=list)
    worker: SidecoreThread | SidecoreProcess | None = None

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"sidecore placement {self.placement!r}: one of {', '.join(PLACEMENTS)}")

    def add(self, device: RegisterDevice, shared_gpa: int, wake_fd: int | None) -> None:
        if self.worker is not None:
            raise RuntimeError("add devices before starting the sidecore")
        self.members.append(_Member(device, shared_gpa, wake_fd))

    def start(self) -> "Sidecore":
        mem = self.machine.mem
        if self.placement == "thread":
            pollables = [p for m in self.members for p in build_pollables(mem, m.device, m.shared_gpa, m.wake_fd)]
            self.worker = SidecoreThread(SidecoreLoop(pollables, self.mode, poll_ns=self.poll_ns)).start()
        else:
            specs = [DeviceSpec(f"{type(m.device).__module__}:{type(m.device).__qualname__}", m.shared_gpa,
                                m.wake_fd) for m in self.members]
            self.worker = SidecoreProcess(mem, specs, self.mode, self.poll_ns)
        self.machine.add_worker(self)
        return self

    def cpu_seconds(self) -> float | None:
        """CPU spent outside the VMM process (None for a thread: it is in the VMM's own time)."""
        return self.worker.cpu_seconds() if self.worker else None

    def device_stats(self) -> list[dict]:
        if isinstance(self.worker, SidecoreProcess):
            return self.worker.report.get("devices", [])
        return [m.device.stats() for m in self.members]

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()


@dataclass
class Attachment:
    device: RegisterDevice
    path: str
    mmio_gpa: int
    shared_gpa: int
    sidecore: Sidecore | None
    wake_fd: int | None

    def stop(self) -> None:
        if self.wake_fd is not None:
            os.close(self.wake_fd)
            self.wake_fd = None


def attach(machine, device: RegisterDevice, *, mmio_gpa: int, shared_gpa: int, path: str,
           placement: str = "thread", sidecore: Sidecore | None = None, poll_ns: int = 64_000) -> Attachment:
    """Put ``device`` on the MMIO bus and wire its doorbells through ``path``.

    Pass ``sidecore`` to share one sidecore between devices (it must be started
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
        att.sidecore = sidecore or Sidecore(machine, MODE_OF_PATH[path], placement, poll_ns)
        if att.sidecore.mode != MODE_OF_PATH[path]:
            raise ValueError(f"a {att.sidecore.mode} sidecore cannot serve the {path} path")
        att.sidecore.add(device, shared_gpa, wake_fd)
        if own:
            att.sidecore.start()
    return att
