"""Port 0x511: the guest kit marks the start and end of a measured loop here.

On each mark the VMM snapshots KVM's exit counters and the CPU clocks, from the
vCPU thread that took the exit, so benchmarks divide by operations over exactly
the measured phase — no boot, no PCI probing, no printing.  Under QEMU the
same writes go to an unclaimed port and cost one exit each.
"""
from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from typing import Callable

from ...errors import ExitlessError

PORT = 0x511
START, END = 1, 2


@dataclass
class Snapshot:
    phase: int
    kvm: dict[str, int]
    process_cpu: float       # the whole VMM process (user + system)
    vcpu_cpu: float          # the vCPU thread that hit the mark (the guest's own running time)
    extra_cpu: float         # sidecore processes, from the callback
    wall: float


@dataclass
class BenchMarker:
    """Keeps the last START and the last END mark only: a guest writing the port in a loop
    costs the VMM no memory; other values are ignored."""

    read_stats: Callable[[], dict[str, int]]
    extra_cpu: Callable[[], float] = lambda: 0.0
    start: Snapshot | None = None
    end: Snapshot | None = None

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        phase = int.from_bytes(data, "little")
        if phase not in (START, END):
            return
        ru = resource.getrusage(resource.RUSAGE_SELF)
        mark = Snapshot(phase, self.read_stats(), ru.ru_utime + ru.ru_stime, time.thread_time(),
                        self.extra_cpu(), time.monotonic())
        if phase == START:
            self.start = mark
        else:
            self.end = mark

    def window(self) -> dict | None:
        """Counters over the last START..END pair: exits (less the END mark's own), CPU outside vCPUs
        (``vmm_cpu``) and of the marking vCPU thread (``vcpu_cpu``: the guest's running time plus KVM's
        work on its behalf), in seconds."""
        start, end = self.start, self.end
        if start is None or end is None or end.wall < start.wall:
            return None
        kvm = {k: end.kvm[k] - start.kvm.get(k, 0) for k in end.kvm}
        kvm["exits"] -= 1
        kvm["io_exits"] -= 1
        vmm_cpu = (end.process_cpu - start.process_cpu) - (end.vcpu_cpu - start.vcpu_cpu) + \
                  (end.extra_cpu - start.extra_cpu)
        return {"kvm": kvm, "vmm_cpu": max(0.0, vmm_cpu), "vcpu_cpu": end.vcpu_cpu - start.vcpu_cpu,
                "wall": end.wall - start.wall}


class WindowFileError(ExitlessError, OSError):
    """The window's JSON file (``run --stats FILE``) could not be written."""


def write_window(path: str, window: dict | None, exit_kind: str) -> None:
    """Write ``{"window": window, "exit": exit_kind}`` as JSON to ``path``: a :meth:`BenchMarker.window`
    (KVM counters, VMM CPU seconds outside the vCPUs, the marking vCPU thread's CPU seconds, wall seconds; None when the guest marked no start
    and end) and how the VM stopped (``VmExit.kind``).  Raises WindowFileError when ``path`` cannot be
    written (``run --stats``: exit status 2)."""
    try:
        with open(path, "w") as f:
            json.dump({"window": window, "exit": exit_kind}, f)
    except OSError as e:
        raise WindowFileError(f"--stats {path}: {e.strerror}") from None
