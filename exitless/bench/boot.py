"""``exitless bench boot``: how long a Linux guest takes to boot, in exitless and in QEMU.

The same kernel (the fetched Debian cloud kernel) and the same initramfs
(busybox, the virtio modules, an /init that runs ``true`` and powers off) are
booted N times by each VMM.  Three milestones are timed from the moment the
VMM is started (exitless: before the VM is created; QEMU: the process spawn):

* ``first_line_s``: the console shows "Linux version" (the kernel's first line);
* ``userspace_s``: /init printed its READY marker (userspace runs);
* ``poweroff_s``: the VM powered off (ACPI S5: exitless stops, QEMU exits).

Boots alternate (exitless, QEMU, exitless, QEMU, …: ``--rounds`` of each, QEMU's
accelerator chosen first) and a row reports each milestone's median with its
per-round values and min–max; a median is ``None`` unless every round reached
the milestone.  A milestone a run never reaches is ``None`` -- never estimated.  ``reached``
says how far every run got (``power-off``, ``userspace``, ``early-boot``,
``nothing``), ``stop`` why the VM stopped, ``kernel_time_s`` the last printk
timestamp (how far into its own boot the kernel got), ``last_line`` the last
console line.  On a ``kvm_pvm`` host guest ring-0 code is emulated and a boot
takes minutes (see :data:`exitless.boot.linux.PVM_LIMIT`): pass ``--timeout``.

QEMU runs ``-machine q35`` (SeaBIOS, ``-kernel``/``-initrd``).  ``--qemu auto`` first
checks ``-accel kvm`` (the first kernel line within a probe timeout) and falls
back to TCG, saying why.
"""
from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..boot.initramfs import EXIT_MARKER, READY_MARKER, parse_exit_status
from ..boot.linux import FIRST_LINE, BootConsole, boot_linux, host_kernel_params

BASE_CMDLINE = "console=ttyS0 earlyprintk=serial panic=-1"
COMMAND = ["true"]
KVM_PROBE_S = 30.0
_PRINTK_TIME = re.compile(r"^\[\s*(\d+\.\d+)\]")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _kernel_time(lines: list[str]) -> float | None:
    for line in reversed(lines):
        m = _PRINTK_TIME.match(line)
        if m:
            return float(m.group(1))
    return None


def _reached(first: float | None, ready: float | None, off: float | None) -> str:
    if off is not None:
        return "power-off"
    if ready is not None:
        return "userspace"
    if first is not None:
        return "early-boot"
    return "nothing"


def boot_exitless(kernel: Path, initrd: bytes, cmdline: str, *, mem: int, cpus: int, timeout: float,
                  decompress: str) -> dict:
    """One exitless boot; returns its milestones (seconds from before VM creation)."""
    from ..vm import Machine, VmConfig

    console = BootConsole()
    console.restart_clock()
    t0 = console.t0
    with Machine(VmConfig(mem_mib=mem, cpus=cpus, console=console)) as m:
        boot_linux(m, kernel, cmdline, initrd, decompress=decompress)
        exit = m.run(timeout=timeout)
        t_end = time.monotonic() - t0
    status = parse_exit_status(console.text, EXIT_MARKER)
    off = t_end if exit.kind == "shutdown" and status is not None else None
    lines = [line for _, line in console.lines]
    msg = exit.message.split(" [")[0].split(" (")[0]       # "KVM internal error: emulation failure"
    return {"first_line_s": console.first_line_at, "userspace_s": console.ready_at, "poweroff_s": off,
            "stopped_after_s": t_end,
            "reached": _reached(console.first_line_at, console.ready_at, off),
            "stop": f"{exit.kind}: {msg}"[:160], "status": status, "kernel_time_s": _kernel_time(lines),
            "last_line": lines[-1][:160] if lines else ""}


def boot_qemu(qemu: str, accel: str, kernel: Path, initrd: Path, cmdline: str, *, mem: int, cpus: int,
              timeout: float, stop_at_first_line: bool = False) -> dict:
    """One QEMU boot, timed from the process spawn; the console is read line by line."""
    cmd = [qemu, "-accel", accel, "-machine", "q35", "-m", str(mem), "-smp", str(cpus), "-display", "none",
           "-nodefaults", "-no-reboot", "-serial", "stdio", "-monitor", "none",
           "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline]
    first = ready = off = None
    lines: list[str] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err: list[bytes] = []
    threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True).start()
    done = threading.Event()

    def reader():
        nonlocal first, ready
        for raw in proc.stdout:
            t = time.monotonic() - t0
            line = raw.decode(errors="replace").rstrip("\r\n")
            lines.append(line)
            if first is None and FIRST_LINE in line:
                first = t
                if stop_at_first_line:
                    break
            if ready is None and line.strip() == READY_MARKER:
                ready = t
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    done.wait(timeout)
    stop = ""
    if proc.poll() is None:
        try:
            proc.wait(0.5 if not stop_at_first_line or first is None else 0)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        stop = "first line seen" if stop_at_first_line and first is not None else f"timeout after {timeout:.0f} s"
        proc.kill()
        proc.wait()
    else:
        t_exit = time.monotonic() - t0
        status = parse_exit_status("\n".join(lines), EXIT_MARKER)
        if proc.returncode == 0 and status is not None:
            off = t_exit
        stop = f"qemu exited ({proc.returncode})"
        tail = b"".join(err).decode(errors="replace").strip().splitlines()
        if proc.returncode and tail:
            stop += ": " + tail[-1][:120]
    return {"first_line_s": first, "userspace_s": ready, "poweroff_s": off, "reached": _reached(first, ready, off),
            "stopped_after_s": time.monotonic() - t0, "stop": stop, "kernel_time_s": _kernel_time(lines), "last_line": lines[-1][:160] if lines else ""}


def choose_qemu_accel(qemu: str, kernel: Path, initrd: Path, want: str, *, mem: int, cpus: int,
                      probe_s: float = KVM_PROBE_S) -> tuple[str, str]:
    """(accelerator, why): ``auto`` tries KVM (first kernel line within ``probe_s``), else TCG."""
    if want in ("kvm", "tcg"):
        return want, f"-accel {want} as asked"
    r = boot_qemu(qemu, "kvm", kernel, initrd, BASE_CMDLINE, mem=mem, cpus=cpus, timeout=probe_s,
                  stop_at_first_line=True)
    if r["first_line_s"] is not None:
        return "kvm", f"-accel kvm works (first kernel line after {r['first_line_s']:.1f} s)"
    return "tcg", (f"-accel kvm does not work here ({r['stop']}; no kernel line within {probe_s:.0f} s, "
                   f"last output {r['last_line']!r}): falling back to TCG")


MILESTONES = ("first_line_s", "userspace_s", "poweroff_s", "stopped_after_s")


def summarize(vmm: str, runs: list[dict], extra: dict) -> dict:
    """One row from a VMM's boots: per milestone the median (None unless every run reached it),
    ``per_round`` and ``spread`` (min–max of the runs that reached it); ``each``: the runs."""
    row = {"vmm": vmm, **extra, "runs": len(runs), "rounds": len(runs), "per_round": {}, "spread": {}}
    for key in MILESTONES + ("other_load_pct",):
        vals = [r.get(key) for r in runs]
        known = [v for v in vals if v is not None]
        row[key] = statistics.median(vals) if vals and len(known) == len(vals) else None
        row["per_round"][key] = vals
        row["spread"][key] = {"min": min(known), "max": max(known)} if known else None
    order = ["nothing", "early-boot", "userspace", "power-off"]
    row["reached"] = min((r["reached"] for r in runs), key=order.index) if runs else "nothing"
    clock = [r["kernel_time_s"] for r in runs if r["kernel_time_s"] is not None]
    row["kernel_time_s"] = statistics.median(clock) if clock else None     # None, as in each run: not measured
    row["stop"] = runs[-1]["stop"] if runs else ""
    row["last_line"] = runs[-1]["last_line"] if runs else ""
    row["each"] = runs
    return row


def main(args) -> int:
    from ..doctor import kvm_flavour
    from ..guest.fetch import GuestFetchError
    from ..guest.plan import plan_guest
    from .common import Report, interleave, mark_best

    report = Report(args.json)
    flavour = kvm_flavour()
    try:
        plan = plan_guest(None, COMMAND, append="", cache=args.cache, decompress=args.decompress,
                          flavour=flavour, early_printk=True, quiet=False)
    except (GuestFetchError, ValueError, OSError) as e:
        _log(f"exitless: {e}")
        return 2
    for note in plan.notes:
        report.note(f"note: {note}")
    base = plan.cmdline
    timeout = args.timeout or (1800.0 if flavour == "pvm" else 60.0)
    qemu = shutil.which("qemu-system-x86_64")
    if args.qemu != "none" and qemu is None:
        report.note("qemu-system-x86_64 not found: no QEMU rows")
    with tempfile.TemporaryDirectory(prefix="exitless-bench-boot-") as tmp, report.progress() as progress:
        vmms = {"exitless": lambda: boot_exitless(plan.kernel, plan.initrd, base, mem=args.mem, cpus=args.cpus,
                                                  timeout=timeout, decompress=plan.decompress)}
        extra = {"exitless": {"kvm": flavour, "cmdline": base, "decompress": plan.decompress}}
        if args.qemu != "none" and qemu is not None:
            pvm_only = set(host_kernel_params("pvm"))      # QEMU's accelerator needs none of them
            qemu_cmdline = " ".join(w for w in base.split() if w not in pvm_only)
            rd = Path(tmp) / "initrd.img"
            rd.write_bytes(plan.initrd)
            progress("probing QEMU's accelerator", 0, 1)
            accel, why = choose_qemu_accel(qemu, plan.kernel, rd, args.qemu, mem=args.mem, cpus=args.cpus)
            report.note(f"qemu: {why}")
            qtimeout = args.timeout or (600.0 if accel == "tcg" else 60.0)
            vmms[f"qemu-{accel}"] = lambda: boot_qemu(qemu, accel, plan.kernel, rd, qemu_cmdline, mem=args.mem,
                                                       cpus=args.cpus, timeout=qtimeout)
            extra[f"qemu-{accel}"] = {"accel": accel, "accel_note": why, "cmdline": qemu_cmdline}

        runs = interleave(list(vmms), args.runs, lambda vmm, _r: vmms[vmm](), progress,
                          label=lambda vmm: f"{vmm} boot")
    rows = [summarize(vmm, each, extra[vmm]) for vmm, each in zip(vmms, runs)]
    for key in ("first_line_s", "poweroff_s"):
        mark_best(rows, key, higher_is_better=False)
    report.table(f"Linux boot, median (min–max) of {args.runs} alternating boots (seconds from VMM start; "
                 "'-' = not reached)", rows, [
                     ("vmm", "vmm"), ("first_line_s", "first kernel line"), ("userspace_s", "userspace"),
                     ("poweroff_s", "power-off"), ("reached", "reached"), ("stopped_after_s", "stopped after"),
                     ("kernel_time_s", "kernel clock at end"), ("stop", "stopped because"),
                     ("other_load_pct", "other load %")],
                 spread=MILESTONES + ("other_load_pct",))
    report.ties_note(args.runs, rows, polling=False)      # no sidecore in a boot
    report.json(rows)
    return 0 if rows and rows[0]["first_line_s"] is not None else 1
