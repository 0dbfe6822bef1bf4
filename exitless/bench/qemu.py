"""QEMU as the peer: the same guest-kit binary on ``qemu-system-x86_64``, with its stats over QMP.

KVM is used when QEMU can use it here; otherwise TCG, and the rows say which.
Exits per I/O come from QMP ``query-stats`` (KVM only); CPU is QEMU's process
CPU minus its vCPU threads, the same accounting as for exitless.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

from ..guestkit import guestkit_cmdline, guestkit_path
from ..threadname import is_vcpu
from .common import HELPER_CPU_KEY, BenchError, guest_result
from .workload import Test, app, per_io_row

QEMU = "qemu-system-x86_64"


def available() -> bool:
    return shutil.which(QEMU) is not None


@dataclass
class QemuResult:
    exit_status: int | None
    console: bytes
    accel: str
    exits: int | None
    vmm_cpu_s: float
    wall_s: float
    stderr: str = ""
    killed: bool = False      # ended by SIGKILL at the timeout (``kill_at_timeout``), not by ``quit``


class Qmp:
    """A QMP client on QEMU's Unix socket ``path`` (retried until QEMU listens, up to ``timeout`` s);
    ``cmd(name, **args)`` returns QEMU's reply ({"return": ...} or {"error": ...})."""

    def __init__(self, path: str, timeout: float = 10):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args) -> dict:
        self.file.write(json.dumps({"execute": name, "arguments": args} if args else {"execute": name}) + "\n")
        self.file.flush()
        while True:
            msg = json.loads(self.file.readline())
            if "return" in msg or "error" in msg:
                return msg

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def kvm_exits(qmp: Qmp) -> int | None:
    """KVM's ``exits`` summed over QEMU's vCPUs (QMP ``query-stats``), or None when QEMU has no KVM stats."""
    reply = qmp.cmd("query-stats", target="vcpu", providers=[{"provider": "kvm", "names": ["exits"]}])
    if "return" not in reply:
        return None
    return sum(s["value"] for entry in reply["return"] for s in entry.get("stats", []) if s["name"] == "exits")


def process_cpu(pid: int) -> float:
    """CPU seconds of another whole process, to the nanosecond (its CPU-time clock:
    ``~pid << 3 | CPUCLOCK_SCHED``); /proc's 10 ms ticks would swamp a short run."""
    try:
        return time.clock_gettime((~pid << 3) | 2)
    except OSError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu(pid: int, tid: int) -> float:
    """CPU seconds of thread ``tid`` of process ``pid``, to the nanosecond: the first field of its
    /proc schedstat (the scheduler's sum_exec_runtime).  A per-thread CPU clock
    (``clock_gettime(~tid << 3 | 6)``) would be finer, but the kernel answers it only for threads of
    the caller's own process (EINVAL otherwise)."""
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def qemu_cpu(pid: int) -> tuple[float, float]:
    """(QEMU's process CPU seconds, its vCPU threads' CPU seconds)."""
    return process_cpu(pid), vcpu_threads_cpu(pid)


def vcpu_threads_cpu(pid: int) -> float:
    """CPU seconds of process ``pid``'s vCPU threads (QEMU's ``CPU 0/KVM``…, exitless's ``vcpu0``…: by
    their kernel names, :func:`exitless.threadname.is_vcpu`), to the nanosecond; 0.0 for a process gone."""
    vcpu = 0.0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0
    for task in tasks:
        try:
            if is_vcpu((task / "comm").read_text().rstrip("\n")):
                vcpu += _thread_cpu(pid, int(task.name))
        except OSError:
            continue
    return vcpu


def pin_threads(pid: int, vcpu_cpu: int, other_cpu: int) -> None:
    """Pin process ``pid``'s vCPU threads (:func:`exitless.threadname.is_vcpu`) to CPU ``vcpu_cpu`` and its
    other threads (QEMU's main loop, which serves a ``-netdev tap``, its RCU and worker threads) to CPU
    ``other_cpu``: the placement the benches give exitless (vCPU on one CPU, the device's sidecore on the
    other).  Threads QEMU starts later inherit their creator's CPU.  A thread that ends meanwhile is skipped."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return
    for task in tasks:
        try:
            comm = (task / "comm").read_text().rstrip("\n")
            os.sched_setaffinity(int(task.name), {vcpu_cpu} if is_vcpu(comm) else {other_cpu})
        except OSError:
            continue


def builtin_device(image: Path, iothread: bool, cache: str = "writeback") -> list[str]:
    """QEMU's own virtio-blk-pci on ``image``; ``cache=writeback`` is the host page cache, as exitless's
    virtio-blk uses by default (buffered I/O)."""
    dev = "virtio-blk-pci,drive=d0,disable-legacy=on,ioeventfd=on,event_idx=on"
    extra = []
    if iothread:
        extra = ["-object", "iothread,id=io0,poll-max-ns=32768"]
        dev += ",iothread=io0"
    return extra + ["-drive", f"file={image},if=none,id=d0,format=raw,cache={cache},aio=threads", "-device", dev]


#: QEMU's minimal firmware: it boots the guest kit in ~0.4 s where SeaBIOS takes ~13 s under a software-nested
#: KVM (its ring-0 code is emulated); firmware runs only before the kernel, so the I/O measured is the same.
QBOOT = "qboot.rom"
QEMU_DATA_DIRS = ("/usr/share/qemu", "/usr/local/share/qemu")


def firmware_args() -> list[str]:
    """``-bios qboot.rom`` when QEMU ships it, else nothing (SeaBIOS, QEMU's default)."""
    return ["-bios", QBOOT] if any(os.path.exists(os.path.join(d, QBOOT)) for d in QEMU_DATA_DIRS) else []


def kvm_works() -> bool:
    """Can QEMU use KVM on this host for a bare guest?  (Not for Linux on kvm_pvm, but the guest kit.)"""
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def resolve_accel(accel: str) -> str:
    """``auto`` → ``kvm`` when QEMU can use /dev/kvm here, else ``tcg``; others unchanged."""
    if accel == "auto":
        return "kvm" if kvm_works() else "tcg"
    return accel


def guestkit_command(kernel: Path, append: str, qmp_path: str, *, device_args: list[str] = (),
                     shared_memory: bool = False, accel: str = "kvm", mem_mib: int = 128,
                     paused: bool = False) -> list[str]:
    """QEMU's command line for the guest kit: q35, qboot where installed, COM1 on stdio, QMP on ``qmp_path``,
    threads named (``debug-threads=on``), ``device_args`` appended; ``accel`` is ``kvm`` or ``tcg`` (:func:`resolve_accel`); ``paused``: ``-S``."""
    if accel == "kvm":       # guest TSC at the host's rate under KVM; under TCG the guest calibrates
        append = guestkit_cmdline(append)
    # QEMU's default CPU model under KVM: `-cpu host` asks for MSRs a software-nested KVM refuses
    cpu = ["-cpu", "max"] if accel == "tcg" else []
    machine = ["-machine", "q35"]
    if shared_memory:
        machine = ["-machine", "q35,memory-backend=mem",
                   "-object", f"memory-backend-memfd,id=mem,size={mem_mib}M,share=on"]
    # debug-threads=on: QEMU names its threads (vCPUs "CPU 0/KVM", iothreads "IO …"); without it every
    # thread is "qemu-system-x86" and vcpu_threads_cpu() finds none, so QEMU's guest time would count as
    # its VMM CPU
    return [QEMU, "-name", "exitless-bench,debug-threads=on", *machine, "-accel", accel, *cpu, *firmware_args(),
            "-m", f"{mem_mib}M", *(["-S"] if paused else []),
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", str(kernel), "-append", append, "-qmp", f"unix:{qmp_path},server=on,wait=off", *device_args]


def run_guestkit(kernel: Path, append: str, *, device_args: list[str] = (), shared_memory: bool = False,
                 accel: str = "auto", mem_mib: int = 128, timeout: float = 300,
                 extra_cpu: Callable[[], float] | None = None, pass_fds: tuple[int, ...] = (),
                 kill_at_timeout: bool = False, pin: tuple[int, int] | None = None) -> QemuResult:
    """Boot the guest kit under QEMU and measure it.

    The firmware is qboot where installed (:func:`firmware_args`).  QEMU starts paused
    (``-S``) so the exit counter is read before the guest runs; there is no
    isa-debug-exit device, so when the guest has printed its result it
    halts instead of ending QEMU, and the counters and CPU are read before ``quit``.
    ``shared_memory`` backs guest RAM with a shared memfd (vhost-user needs it);
    ``extra_cpu`` adds another process's CPU (a vhost-user back-end) to QEMU's own;
    ``pass_fds`` are inherited by QEMU (e.g. a TAP fd for ``-netdev tap,fd=N``).
    ``kill_at_timeout``: a guest still running after ``timeout`` seconds ends with SIGKILL to QEMU
    instead of a QMP ``quit`` -- no vhost-user teardown, the back-end just sees its socket close
    (``killed`` in the result says it happened).
    ``pin``: (vCPU CPU, other CPU) -- QEMU's threads pinned by :func:`pin_threads` before the guest runs
    (None: the scheduler's choice).
    """
    accel = resolve_accel(accel)
    tmp = tempfile.mkdtemp(prefix="exitless-qemu-")
    qmp_path = os.path.join(tmp, "qmp.sock")
    cmd = guestkit_command(kernel, append, qmp_path, device_args=device_args, shared_memory=shared_memory,
                           accel=accel, mem_mib=mem_mib, paused=True)
    extra = extra_cpu or (lambda: 0.0)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds)
    out = bytearray()
    exits = None
    vmm_cpu = 0.0
    status = None
    try:
        qmp = Qmp(qmp_path)
        try:
            if pin is not None:
                pin_threads(proc.pid, *pin)
            exits0 = kvm_exits(qmp) if accel == "kvm" else None
            (q0, v0), e0 = qemu_cpu(proc.pid), extra()
            qmp.cmd("cont")
            os.set_blocking(proc.stdout.fileno(), False)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                chunk = proc.stdout.read()
                if chunk:
                    out += chunk
                    if b'{"app":' in out and out.rstrip().endswith(b"}"):
                        status = 0
                        break
                time.sleep(0.002)
            if status == 0:
                (q1, v1), e1 = qemu_cpu(proc.pid), extra()
                vmm_cpu = (q1 - q0) - (v1 - v0) + (e1 - e0)
                exits1 = kvm_exits(qmp) if accel == "kvm" else None
                if exits0 is not None and exits1 is not None:
                    exits = exits1 - exits0
            if status is None and kill_at_timeout and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            else:
                qmp.cmd("quit")
        finally:
            qmp.close()
    except OSError:
        pass
    finally:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err = proc.stderr.read().decode(errors="replace")
        shutil.rmtree(tmp, ignore_errors=True)
    return QemuResult(status, bytes(out), accel, exits, vmm_cpu, time.monotonic() - t0, err,
                      killed=proc.returncode == -signal.SIGKILL)


class QemuSetup:
    """A bench row served through QEMU (a :class:`exitless.bench.workload.Setup`): QEMU's own
    virtio-blk, or QEMU as the frontend of a vhost-user back-end process (``backend``: its
    ``cpu()`` is added to QEMU's and its ``log()`` shown on failure).

    Exits and host CPU per I/O are differential: each round runs ``n/10`` requests, then
    ``n``, and divides the difference, so boot and PCI probing drop out.  In the first round
    ``n`` is raised so that the full run lasts ``min_seconds`` or more (then kept for every
    round, so that the rounds measure the same thing).
    """

    def __init__(self, vmm: str, path: str, irq: str, device_args: list[str], *, accel: str = "auto",
                 shared_memory: bool = False, backend=None, min_seconds: float = 0.0, timeout: float = 300,
                 mem_mib: int = 128, extra: dict | None = None):
        self.vmm, self.path, self.irq = vmm, path, irq
        self.device_args, self.shared_memory, self.backend = device_args, shared_memory, backend
        self.accel = ("kvm" if kvm_works() else "tcg") if accel == "auto" else accel
        self.min_seconds, self.timeout, self.mem_mib = min_seconds, timeout, mem_mib
        self.extra = extra or {}
        self._n: dict[str, int] = {}

    def run(self, append: str) -> dict:
        """One boot of the guest kit with ``append``: {"res", "exits", "cpu"}."""
        r = run_guestkit(guestkit_path(), append, device_args=self.device_args, shared_memory=self.shared_memory,
                         accel=self.accel, mem_mib=self.mem_mib, timeout=self.timeout,
                         extra_cpu=self.backend.cpu if self.backend else None)
        if r.exit_status != 0:
            raise BenchError(f"qemu ({self.accel}): {append}: no result\n{r.console.decode(errors='replace')[-600:]}"
                             f"\n{r.stderr[-600:]}" + (f"\nback-end log:\n{self.backend.log()[-800:]}"
                                                       if self.backend else ""))
        return {"res": guest_result(r.console, "blk"), "exits": r.exits, "cpu": r.vmm_cpu_s}

    def measure(self, test: Test, n: int) -> dict:
        helper0 = self.backend.cpu() if self.backend else 0.0
        base = self.run(app(test, max(1, n // 10), self.irq))
        if test.name not in self._n:
            iops = base["res"]["iops"] or 1
            self._n[test.name] = max(n, min(int(iops * self.min_seconds), 50 * n))
        full = self.run(app(test, self._n[test.name], self.irq))
        helper = self.backend.cpu() - helper0 if self.backend else 0.0
        return {**per_io_row(self.vmm, self.path, test, self.irq, full, base), "accel": self.accel, **self.extra,
                HELPER_CPU_KEY: helper}
