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


def _cpu_split(pid: int) -> tuple[float, float]:
    """(process CPU seconds, vCPU threads' CPU seconds) from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = vcpu = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        t = (int(fields[11]) + int(fields[12])) / tick
        total += t
        if comm.startswith("CPU "):
            vcpu += t
    return total, vcpu


def kvm_works() -> bool:
    """Can QEMU use KVM on this host for a bare guest?  (Not for Linux on kvm_pvm, but the guest kit.)"""
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def run_guestkit(kernel: Path, append: str, *, disk: Path | None = None, iothread: bool = False,
                 accel: str = "auto", mem_mib: int = 128, timeout: float = 300) -> QemuResult:
    """Boot the guest kit under QEMU and measure it.

    QEMU starts paused (``-S``) so the exit counter is read before the guest runs;
    there is no isa-debug-exit device, so when the guest has printed its result it
    halts instead of ending QEMU, and the counters and CPU are read before ``quit``.
    """
    if accel == "auto":
        accel = "kvm" if kvm_works() else "tcg"
    tmp = tempfile.mkdtemp(prefix="exitless-qemu-")
    qmp_path = os.path.join(tmp, "qmp.sock")
    # QEMU's default CPU model under KVM: `-cpu host` asks for MSRs a software-nested KVM refuses
    cpu = ["-cpu", "max"] if accel == "tcg" else []
    cmd = [QEMU, "-machine", "q35", "-accel", accel, *cpu, "-m", str(mem_mib), "-S",
           "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
           "-kernel", str(kernel), "-append", append, "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    if disk is not None:
        # cache=writeback: the host page cache, as exitless's virtio-blk uses by default (buffered I/O)
        dev = "virtio-blk-pci,drive=d0,disable-legacy=on,ioeventfd=on,event_idx=on"
        if iothread:
            cmd += ["-object", "iothread,id=io0,poll-max-ns=32768"]
            dev += ",iothread=io0"
        cmd += ["-drive", f"file={disk},if=none,id=d0,format=raw,cache=writeback,aio=threads", "-device", dev]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = bytearray()
    exits = None
    cpu_split = (0.0, 0.0)
    status = None
    try:
        qmp = _Qmp(qmp_path)
        try:
            exits0 = _kvm_exits(qmp) if accel == "kvm" else None
            cpu0 = _cpu_split(proc.pid)
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
                cpu1 = _cpu_split(proc.pid)
                cpu_split = (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])
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
        shutil.rmtree(tmp, ignore_errors=True)
    return QemuResult(status, bytes(out), accel, exits, cpu_split[0] - cpu_split[1], time.monotonic() - t0)
