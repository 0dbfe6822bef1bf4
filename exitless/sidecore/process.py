"""A sidecore in its own process: it maps the guest's memfd and serves devices with its own GIL.

The VMM starts ``python -m exitless.sidecore.process`` with the memfd and the
eventfds inherited (``pass_fds``) and a JSON spec on stdin naming each device
class, its shared page and its wake fd.  The child builds the same pollables
as a sidecore thread would.  On stop (an eventfd) it prints a JSON report:
its CPU time and each device's counters.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

from ..confine import confine
from ..fdwait import wait_readable
from ..memory import GuestMemory
from .loop import SidecoreLoop
from .shared_register import SharedRegister

log = logging.getLogger(__name__)


@dataclass
class DeviceSpec:
    """What a sidecore process needs to rebuild one device's pollables."""

    cls: str                  # "package.module:ClassName" of a RegisterDevice
    shared_gpa: int
    wake_fd: int | None = None
    kwargs: dict | None = None


def device_class(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def build_pollables(mem: GuestMemory, device, shared_gpa: int, wake_fd: int | None) -> list[SharedRegister]:
    page = mem.view(shared_gpa, 4096)
    device.attach_shared(page)
    return [SharedRegister(device, reg, page, wake_fd) for reg in device.doorbells()]


class SidecoreProcess:
    """Parent-side handle of a sidecore process (a Worker of the VM)."""

    def __init__(self, mem: GuestMemory, devices: list[DeviceSpec], mode: str, poll_ns: int):
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        fds = [mem.fd, self.stop_fd] + [d.wake_fd for d in devices if d.wake_fd is not None]
        spec = {"memfd": mem.fd, "regions": mem.describe(), "stop_fd": self.stop_fd, "mode": mode,
                "poll_ns": poll_ns, "devices": [d.__dict__ for d in devices]}
        self.proc = subprocess.Popen([sys.executable, "-m", "exitless.sidecore.process"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, pass_fds=fds, text=True)
        self.proc.stdin.write(json.dumps(spec))
        self.proc.stdin.close()
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            self.proc.wait(5)
            raise RuntimeError(f"sidecore process failed to start (exit {self.proc.returncode})")
        self.report: dict = {}
        self._stopping = False
        threading.Thread(target=self._watch, name="sidecore-process-watch", daemon=True).start()

    def _watch(self) -> None:
        """Report at once a sidecore process that dies while the VM runs (its devices go silent)."""
        self.proc.wait()
        if not self._stopping:
            log.error("sidecore process %d %s; its devices stopped being served", self.proc.pid, self.died())

    def cpu_seconds(self) -> float | None:
        """CPU time of the child so far, from /proc (clock ticks)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError):
            return self.report.get("cpu_s")

    def died(self) -> str | None:
        """Why the process ended before :meth:`stop`, or None while it runs."""
        code = self.proc.poll()
        if code is None:
            return None
        if code == -signal.SIGSYS:
            return "killed by its seccomp filter (SIGSYS): a forbidden system call"
        return f"exited with status {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"

    def stop(self) -> None:
        self._stopping = True
        why = self.died()
        if why is not None:
            self.report = {"error": why}
        if self.proc.poll() is None:
            os.eventfd_write(self.stop_fd, 1)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            out = self.proc.stdout.read()
            try:
                self.report = json.loads(out) if out.strip() else {}
            except json.JSONDecodeError:
                self.report = {"error": out[-500:]}
        self.proc.stdout.close()
        os.close(self.stop_fd)
        self.stop_fd = -1


def _child() -> int:
    spec = json.loads(sys.stdin.read())
    mem = GuestMemory.attach(spec["memfd"], [tuple(r) for r in spec["regions"]])
    devices, pollables = [], []
    for d in spec["devices"]:
        dev = device_class(d["cls"])(**(d.get("kwargs") or {}))
        devices.append(dev)
        pollables += build_pollables(mem, dev, d["shared_gpa"], d.get("wake_fd"))
    loop = SidecoreLoop(pollables, spec["mode"], poll_ns=spec["poll_ns"], name="sidecore-process")
    confine()        # from here on only the data plane's system calls (EXITLESS_CONFINE=0: off)

    def watch_stop():
        wait_readable(spec["stop_fd"])
        loop.request_stop()

    threading.Thread(target=watch_stop, daemon=True).start()
    print("ready", flush=True)
    loop.run()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    report = {"cpu_s": ru.ru_utime + ru.ru_stime, "sleeps": loop.sleeps, "polls": loop.polls,
              "devices": [dev.stats() for dev in devices]}
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
