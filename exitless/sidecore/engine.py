"""The one sidecore engine: a :class:`~exitless.sidecore.loop.SidecoreLoop` serving any mix of
register devices' doorbells and virtio queues, as a thread of the VMM or as a process of its own.

What it serves (all in one mode: ``notify``, ``poll`` or ``adaptive``):

* register devices (:class:`~exitless.devices.base.RegisterDevice`, :meth:`SidecoreGroup.add_device`):
  their doorbells live in a shared page; the engine builds a
  :class:`~exitless.sidecore.shared_register.SharedRegister` per doorbell.  These can be served by
  a thread or by a sidecore *process* that maps the guest's memfd and rebuilds the device there.
* ready-made pollables (:meth:`SidecoreGroup.add`), e.g. the virtqueues of a virtio-pci device
  (``virtio.pci.QueuePollable``): objects of the VMM, so only a thread can serve them.

The same loop also runs in ``exitless sidecore`` (:mod:`exitless.sidecore.service`), a process of its
own that serves the virtqueues of many VMs, each handed over through a socket (``run --sidecore``).

A ``SidecoreGroup`` is a Worker of the VM (``stop()``); ``start_on(machine)`` starts it and registers
it after the devices it serves, so that it stops before them.
"""
from __future__ import annotations

from ..errors import ExitlessError
from .loop import MODES, Pollable, SidecoreLoop, SidecoreThread
from .process import DeviceSpec, SidecoreProcess, build_pollables

__all__ = ["PLACEMENTS", "SidecoreConfigError", "SidecoreGroup"]

PLACEMENTS = ("thread", "process")


class SidecoreConfigError(ExitlessError, ValueError):
    """A sidecore asked for something it cannot do: a bad mode or placement, mixed modes, virtio
    queues in a process."""


class _Device:
    """A register device and where its doorbells are: ``(device, shared_gpa, wake_fd)``."""

    __slots__ = ("device", "shared_gpa", "wake_fd")

    def __init__(self, device, shared_gpa: int, wake_fd: int | None):
        self.device, self.shared_gpa, self.wake_fd = device, shared_gpa, wake_fd


class SidecoreGroup:
    """One sidecore (loop + thread or process) serving register devices and virtio queues.

    ``mode``: one of :data:`~exitless.sidecore.loop.MODES`; ``placement``: ``thread`` or ``process``
    (a process serves register devices only); ``poll_ns``: the adaptive idle window, ns.
    Add everything before :meth:`start`.  Raises :class:`SidecoreConfigError` for a bad mode or
    placement, a device of another mode, or pollables given to a process sidecore; RuntimeError
    (a bug of the caller) for an add after start.
    """

    def __init__(self, mode: str, *, placement: str = "thread", poll_ns: int = 64_000, name: str = "sidecore"):
        if mode not in MODES:
            raise SidecoreConfigError(f"sidecore mode {mode!r}: one of {', '.join(MODES)}")
        if placement not in PLACEMENTS:
            raise SidecoreConfigError(f"sidecore placement {placement!r}: one of {', '.join(PLACEMENTS)}")
        self.mode = mode
        self.placement = placement
        self.poll_ns = poll_ns
        self.name = name
        self.pollables: list[Pollable] = []    # added ready-made (virtio queues)
        self.devices: list[_Device] = []       # register devices
        self.worker: SidecoreThread | SidecoreProcess | None = None
        self._stopped = False

    # -- what it serves ----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.worker is not None:
            raise RuntimeError(f"{self.name}: add devices before starting it")

    def add(self, pollables: list[Pollable], mode: str) -> None:
        """Serve ``pollables`` (objects of this process, e.g. virtqueues) that want ``mode``."""
        self._check_open()
        if mode != self.mode:
            raise SidecoreConfigError(f"a {self.mode} sidecore cannot serve a {mode} device")
        if self.placement != "thread":
            raise SidecoreConfigError("virtio queues are served by a sidecore thread, not a process")
        self.pollables += pollables

    def add_device(self, device, shared_gpa: int, wake_fd: int | None) -> None:
        """Serve the doorbells of register ``device``, whose shared page is at guest-physical
        ``shared_gpa``; ``wake_fd`` is its ioeventfd (``notify``/``adaptive`` modes), else None."""
        self._check_open()
        self.devices.append(_Device(device, shared_gpa, wake_fd))

    # -- life cycle ------------------------------------------------------------------------------
    def start(self, mem=None) -> "SidecoreGroup":
        """Start serving.  ``mem`` (the guest's :class:`~exitless.memory.GuestMemory`) is needed
        when register devices were added (their shared pages are mapped from it)."""
        self._check_open()
        if self.devices and mem is None:
            raise SidecoreConfigError(f"{self.name}: register devices need the guest memory to start")
        if self.placement == "thread":
            pollables = list(self.pollables)
            for d in self.devices:
                pollables += build_pollables(mem, d.device, d.shared_gpa, d.wake_fd)
            self.worker = SidecoreThread(SidecoreLoop(pollables, self.mode, poll_ns=self.poll_ns,
                                                      name=self.name)).start()
        else:
            specs = [DeviceSpec(f"{type(d.device).__module__}:{type(d.device).__qualname__}", d.shared_gpa,
                                d.wake_fd) for d in self.devices]
            self.worker = SidecoreProcess(mem, specs, self.mode, self.poll_ns)
        return self

    def start_on(self, machine) -> "SidecoreGroup":
        """Start, and register with the machine after its devices: workers stop in reverse order."""
        self.start(machine.mem)
        machine.add_worker(self)
        return self

    @property
    def loop(self) -> SidecoreLoop | None:
        """The loop of a running thread sidecore (None for a process, or before start)."""
        return self.worker.loop if isinstance(self.worker, SidecoreThread) and not self._stopped else None

    def cpu_seconds(self) -> float | None:
        """CPU spent outside the VMM process (None for a thread: it is in the VMM's own time)."""
        return self.worker.cpu_seconds() if self.worker else None

    def device_stats(self) -> list[dict]:
        """Each register device's counters (from the sidecore process's final report, for a process)."""
        if isinstance(self.worker, SidecoreProcess):
            return self.worker.report.get("devices", [])
        return [d.device.stats() for d in self.devices]

    def stop(self) -> None:
        """Stop serving (idempotent); a process's report stays readable."""
        if self.worker is not None and not self._stopped:
            self._stopped = True
            self.worker.stop()
