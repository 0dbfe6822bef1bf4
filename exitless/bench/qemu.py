"""QEMU as the peer: the same guest-kit binary on ``qemu-system-x86_64``, with its stats over QMP.

KVM is used when QEMU can use it here; otherwise TCG, and the rows say which.
Exits per I/O come from QMP ``query-stats`` (KVM only); CPU is QEMU's process
CPU minus its vCPU threads, the same accounting as for exitless.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

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


class _Qmp:
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


def _kvm_exits(qmp: _Qmp) -> int | None:
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


def _thread_cpu(tid: int) -> float:
    return time.clock_gettime((~tid << 3) | 6)      # CPUCLOCK_PERTHREAD | CPUCLOCK_SCHED


def qemu_cpu(pid: int) -> tuple[float, float]:
    """(QEMU's process CPU seconds, its vCPU threads' CPU seconds)."""
    vcpu = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().startswith("CPU "):
                vcpu += _thread_cpu(int(task.name))
        except OSError:
            continue
    return process_cpu(pid), vcpu


def builtin_device(image: Path, iothread: bool, cache: str = "writeback") -> list[str]:
    """QEMU's own virtio-blk-pci on ``image``; ``cache=writeback`` is the host page cache, as exitless's
    virtio-blk uses by default (buffered I/O)."""
    dev = "virtio-blk-pci,drive=d0,disable-legacy=on,ioeventfd=on,event_idx=on"
    extra = []
    if iothread:
        extra = ["-object", "iothread,id=io0,poll-max-ns=32768"]
        dev += ",iothread=io0"
    return extra + ["-drive", f"file={image},if=none,id=d0,format=raw,cache={cache},aio=threads", "-device", dev]


def kvm_works() -> bool:
    """Can QEMU use KVM on this host for a bare guest?  (Not for Linux on kvm_pvm, but the guest kit.)"""
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def run_guestkit(kernel: Path, append: str, *, device_args: list[str] = (), shared_memory: bool = False,
                 accel: str = "auto", mem_mib: int = 128, timeout: float = 300,
                 extra_cpu: Callable[[], float] | None = None, pass_fds: tuple[int, ...] = ()) -> QemuResult:
    """Boot the guest kit under QEMU and measure it.

    QEMU starts paused (``-S``) so the exit counter is read before the guest runs;
    there is no isa-debug-exit device, so when the guest has printed its result it
    halts instead of ending QEMU, and the counters and CPU are read before ``quit``.
    ``shared_memory`` backs guest RAM with a shared memfd (vhost-user needs it);
    ``extra_cpu`` adds another process's CPU (a vhost-user back-end) to QEMU's own;
    ``pass_fds`` are inherited by QEMU (e.g. a TAP fd for ``-netdev tap,fd=N``).
    """
    if accel == "auto":
        accel = "kvm" if kvm_works() else "tcg"
    tmp = tempfile.mkdtemp(prefix="exitless-qemu-")
    qmp_path = os.path.join(tmp, "qmp.sock")
    # QEMU's default CPU model under KVM: `-cpu host` asks for MSRs a software-nested KVM refuses
    cpu = ["-cpu", "max"] if accel == "tcg" else []
    machine = ["-machine", "q35"]
    if shared_memory:
        machine = ["-machine", "q35,memory-backend=mem",
                   "-object", f"memory-backend-memfd,id=mem,size={mem_mib}M,share=on"]
    cmd = [QEMU, *machine, "-accel", accel, *cpu, "-m", f"{mem_mib}M", "-S",
           "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
           "-kernel", str(kernel), "-append", append, "-qmp", f"unix:{qmp_path},server=on,wait=off", *device_args]
    extra = extra_cpu or (lambda: 0.0)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds)
    out = bytearray()
    exits = None
    vmm_cpu = 0.0
    status = None
    try:
        qmp = _Qmp(qmp_path)
        try:
            exits0 = _kvm_exits(qmp) if accel == "kvm" else None
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
                exits1 = _kvm_exits(qmp) if accel == "kvm" else None
                if exits0 is not None and exits1 is not None:
                    exits = exits1 - exits0
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
    return QemuResult(status, bytes(out), accel, exits, vmm_cpu, time.monotonic() - t0, err)
