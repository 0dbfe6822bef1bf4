"""``exitless bench boot``: how long a Linux guest takes to boot, in exitless and in QEMU.

The same kernel (the fetched Debian cloud kernel) and the same initramfs
(busybox, the virtio modules, an /init that runs ``true`` and powers off) are
booted by each VMM, with 1 vCPU or each of ``--cpus N…``.  The milestones are timed from the
moment the VMM is started (exitless: before the VM is created; QEMU: the process spawn) and read
from the serial console by one parser (:mod:`exitless.boot.milestones`):

* ``first_line_s``: the console shows "Linux version" (the kernel's first line);
* ``init_s``: the kernel says "Run /init as init process" (userspace starts);
* ``userspace_s``: /init printed its READY marker (filesystems mounted, modules loaded);
* ``poweroff_s``: the VM powered off (ACPI S5: exitless stops, QEMU exits) after /init reported
  the command's status.

Boots alternate (exitless, QEMU, exitless, QEMU, …: ``--rounds`` of each; default 3, 1 on
``kvm_pvm``) and a row reports each milestone's median with its per-round values and min–max; a
median is ``None`` unless every round reached the milestone.  A milestone a run never reaches is
``None`` -- never estimated.  ``reached`` says how far every run got (one of
:data:`exitless.boot.milestones.REACHED`), ``stop`` why the VM stopped, ``kernel_time_s`` the last
printk timestamp (how far into its own boot the kernel got), ``last_line`` the last console line.
Every row says which ``host`` it ran on (its KVM module: ``kvm_pvm``, or ``kvm_intel``/``kvm_amd``
for VMX/SVM hardware KVM; ``host_note`` says what that means): on ``kvm_pvm`` guest ring-0 code is
emulated instruction by instruction (see :data:`exitless.boot.linux.PVM_LIMIT`), a boot to power-off
takes minutes and each boot may take :data:`PVM_BOOT_TIMEOUT` seconds (``--timeout`` overrides);
exitless's runs also count what its instruction fallback finished (``fallback``).

QEMU runs ``-machine q35`` (SeaBIOS, ``-kernel``/``-initrd``).  ``--qemu auto`` on ``kvm_pvm`` gives two
QEMU rows, ``-accel kvm`` (the same host KVM, with the same kernel parameters exitless adds there) and
``-accel tcg`` (the reference); elsewhere it checks ``-accel kvm`` (the first kernel line within a probe
timeout) and falls back to TCG, saying why.
"""
from __future__ import annotations

import functools
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from ..boot.initramfs import EXIT_MARKER, parse_exit_status
from ..boot.linux import BootConsole, boot_linux, host_kernel_params
from ..boot.milestones import REACHED, BootMilestones

BASE_CMDLINE = "console=ttyS0 earlyprintk=serial panic=-1"
COMMAND = ["true"]
KVM_PROBE_S = 30.0
#: seconds one boot may take on kvm_pvm (``--timeout`` overrides): 4-8 min to power-off on a quiet
#: machine, 27 min to userspace measured on one loaded by others
PVM_BOOT_TIMEOUT = 3600.0
#: Parameters of QEMU TCG rows only: on a loaded machine TCG's timer IRQ can miss check_timer()'s window, and the
#: kernel panics ("IO-APIC + timer doesn't work!", seen here); no_timer_check skips that check.
TCG_PARAMS = ["no_timer_check"]
#: how QEMU's stderr starts the report of an error after which the VM never runs again
QEMU_HALTED = ("KVM internal error",)
#: QEMU's last console (and stderr) lines kept: /init prints its exit marker a few lines before QEMU exits
EXIT_LINES = 64


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def boot_exitless(kernel: Path, initrd: bytes, cmdline: str, *, mem: int, cpus: int, timeout: float,
                  decompress: str) -> dict:
    """One exitless boot; returns its milestones (seconds from before VM creation, see
    :class:`exitless.boot.milestones.BootMilestones`), how and when it stopped, and the
    instruction fallback's counts (``fallback``: what exitless finished for KVM's emulator; empty on VMX/SVM)."""
    from ..vm import Machine, VmConfig

    console = BootConsole()
    console.restart_clock()
    t0 = console.t0
    with Machine(VmConfig(mem_mib=mem, cpus=cpus, console=console)) as m:
        boot_linux(m, kernel, cmdline, initrd, decompress=decompress)
        exit = m.run(timeout=timeout)
        t_end = time.monotonic() - t0          # before the VM's teardown
        fallback = dict(sorted(m.fallback_counts().items()))
    status = parse_exit_status(console.text, EXIT_MARKER)
    off = t_end if exit.kind == "shutdown" and status is not None else None
    msg = exit.message.split(" [")[0].split(" (")[0]       # "KVM internal error: emulation failure"
    return {**console.milestones.row(off), "stopped_after_s": t_end, "stop": f"{exit.kind}: {msg}"[:160],
            "status": status, "fallback": fallback}


def boot_qemu(qemu: str, accel: str, kernel: Path, initrd: Path, cmdline: str, *, mem: int, cpus: int,
              timeout: float, stop_at_first_line: bool = False) -> dict:
    """One QEMU boot, timed from the process spawn; the console is read line by line into the same
    :class:`exitless.boot.milestones.BootMilestones` as exitless's.

    The boot ends when QEMU exits, after ``timeout`` seconds, or as soon as QEMU reports a
    :data:`QEMU_HALTED` error (on an emulation failure QEMU pauses the VM for good: waiting on
    would only spend the timeout); ``stop`` says which, with QEMU's last stderr line."""
    cmd = [qemu, "-accel", accel, "-machine", "q35", "-m", str(mem), "-smp", str(cpus), "-display", "none",
           "-nodefaults", "-no-reboot", "-serial", "stdio", "-monitor", "none",
           "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline]
    seen = BootMilestones()
    tail: deque[str] = deque(maxlen=EXIT_LINES)          # the exit marker is among the last lines
    err: deque[str] = deque(maxlen=EXIT_LINES)
    halted: list[str] = []
    off = None
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done, out_done = threading.Event(), threading.Event()

    def read_out():
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            seen.feed(time.monotonic() - t0, line)
            tail.append(line)
            if stop_at_first_line and seen.first_line_s is not None:
                break
        out_done.set()
        done.set()

    def read_err():
        for raw in proc.stderr:
            line = raw.decode(errors="replace").strip()
            err.append(line)
            if not halted and line.startswith(QEMU_HALTED):
                halted.append(f"{line} after {time.monotonic() - t0:.0f} s")
                done.set()

    threading.Thread(target=read_out, daemon=True).start()
    threading.Thread(target=read_err, daemon=True).start()
    done.wait(timeout)
    if proc.poll() is None and not halted:
        try:
            proc.wait(0.5 if not stop_at_first_line or seen.first_line_s is None else 0)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        stop = ("first line seen" if stop_at_first_line and seen.first_line_s is not None
                else f"qemu: {halted[0]}" if halted else f"timeout after {timeout:.0f} s")
        proc.kill()
        proc.wait()
        out_done.wait(5)            # what QEMU wrote before it was killed is read (EOF follows the kill)
    else:
        t_exit = time.monotonic() - t0
        out_done.wait(5)            # the reader has the last lines QEMU wrote
        status = parse_exit_status("\n".join(tail), EXIT_MARKER)
        if proc.returncode == 0 and status is not None:
            off = t_exit
        stop = f"qemu exited ({proc.returncode})"
        if proc.returncode and err:
            stop += ": " + err[-1][:120]
    return {**seen.row(off), "stopped_after_s": time.monotonic() - t0, "stop": stop[:160]}


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


def qemu_accels(wanted: list[str], flavour: str, probe) -> list[tuple[str, str]]:
    """The QEMU rows' accelerators, each with the sentence that says why, in the order asked.

    ``auto`` on ``kvm_pvm``: both ``kvm`` (the same host KVM and instruction emulator exitless
    boots on, the comparison the numbers are for) and ``tcg`` (the reference that reaches
    power-off; QEMU has neither exitless's instruction fallback nor its system-call repair).
    ``auto`` elsewhere: ``probe()`` (:func:`choose_qemu_accel`: KVM if it works, else TCG).
    ``none`` alone: no QEMU rows.
    """
    out: list[tuple[str, str]] = []
    for want in wanted:
        if want == "none":
            continue
        if want == "auto" and flavour == "pvm":
            picks = [("kvm", "-accel kvm: the same kvm_pvm (and instruction emulator) exitless boots on, with "
                             "the same kernel parameters"),
                     ("tcg", "-accel tcg: the reference row (no KVM involved)")]
        elif want == "auto":
            picks = [probe()]
        else:
            picks = [(want, f"-accel {want} as asked")]
        out += [p for p in picks if p[0] not in {a for a, _ in out}]
    return out


#: the per-boot times a row reports (median over its rounds; None unless every round reached it)
MILESTONES = ("first_line_s", "init_s", "userspace_s", "poweroff_s", "stopped_after_s")


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
    row["reached"] = min((r["reached"] for r in runs), key=REACHED.index) if runs else "nothing"
    clock = [r["kernel_time_s"] for r in runs if r["kernel_time_s"] is not None]
    row["kernel_time_s"] = statistics.median(clock) if clock else None     # None, as in each run: not measured
    row["stop"] = runs[-1]["stop"] if runs else ""
    row["last_line"] = runs[-1]["last_line"] if runs else ""
    row["each"] = runs
    return row


def default_timeout(vmm: str, flavour: str) -> float:
    """Seconds one boot may take before it is stopped (``--timeout`` overrides): on ``kvm_pvm`` guest
    ring 0 is emulated and a boot to power-off takes 4-8 min on a quiet machine (2 vCPUs included),
    several times that on a loaded one; QEMU's TCG takes ~30 s here."""
    if vmm == "qemu-tcg":
        return 600.0
    return PVM_BOOT_TIMEOUT if flavour == "pvm" else 60.0


def main(args) -> int:
    from ..doctor import host_label, kvm_flavour, kvm_module
    from ..guest.fetch import GuestFetchError
    from ..guest.plan import plan_guest
    from .common import Report, interleave, mark_best

    report = Report(args.json)
    flavour = kvm_flavour()
    rounds = args.runs or (1 if flavour == "pvm" else 3)
    try:
        plan = plan_guest(None, COMMAND, append=args.append, cache=args.cache, decompress=args.decompress,
                          flavour=flavour, early_printk=True, quiet=False)
    except (GuestFetchError, ValueError, OSError) as e:
        _log(f"exitless: {e}")
        return 2
    for note in plan.notes:
        report.note(f"note: {note}")
    base = plan.cmdline
    host = {"host": kvm_module(flavour), "host_note": host_label(flavour)}
    qemu = shutil.which("qemu-system-x86_64")
    wanted = [w for w in args.qemu if w != "none"]
    if wanted and qemu is None:
        report.note("qemu-system-x86_64 not found: no QEMU rows")
    cpu_counts = list(dict.fromkeys(args.cpus))
    with tempfile.TemporaryDirectory(prefix="exitless-bench-boot-") as tmp, report.progress() as progress:
        boots: dict[tuple[str, int], object] = {}
        extra: dict[tuple[str, int], dict] = {}
        for cpus in cpu_counts:
            t = args.timeout or default_timeout("exitless", flavour)
            boots["exitless", cpus] = functools.partial(boot_exitless, plan.kernel, plan.initrd, base, mem=args.mem,
                                                        cpus=cpus, timeout=t, decompress=plan.decompress)
            extra["exitless", cpus] = {"cpus": cpus, **host, "kvm": flavour, "cmdline": base,
                                       "decompress": plan.decompress, "timeout_s": t}
        if wanted and qemu is not None:
            rd = Path(tmp) / "initrd.img"
            rd.write_bytes(plan.initrd)
            progress("choosing QEMU's accelerator", 0, 1)
            accels = qemu_accels(wanted, flavour, lambda: choose_qemu_accel(qemu, plan.kernel, rd, "auto",
                                                                             mem=args.mem, cpus=cpu_counts[0]))
            for accel, why in accels:
                report.note(f"qemu: {why}")
                # the host's parameters are for its KVM's instruction emulator: TCG needs none of them
                tcg = accel == "tcg"
                drop = set(host_kernel_params(flavour)) if tcg else set()
                cmdline = " ".join([w for w in base.split() if w not in drop] + (TCG_PARAMS if tcg else []))
                for cpus in cpu_counts:
                    t = args.timeout or default_timeout(f"qemu-{accel}", flavour)
                    boots[f"qemu-{accel}", cpus] = functools.partial(boot_qemu, qemu, accel, plan.kernel, rd, cmdline,
                                                                     mem=args.mem, cpus=cpus, timeout=t)
                    extra[f"qemu-{accel}", cpus] = {"cpus": cpus, **host, "accel": accel, "accel_note": why,
                                                    "cmdline": cmdline, "timeout_s": t}

        runs = interleave(list(boots), rounds, lambda key, _r: boots[key](), progress,
                          label=lambda key: f"{key[0]} boot, {key[1]} vCPU")
    rows = [summarize(key[0], each, extra[key]) for key, each in zip(boots, runs)]
    for key in ("first_line_s", "init_s", "poweroff_s"):
        mark_best(rows, key, higher_is_better=False, group=lambda r: r["cpus"])
    report.note(f"host: {host['host_note']}")
    report.table(f"Linux boot on {host['host']}, median (min–max) of {rounds} alternating boots "
                 "(seconds from VMM start; '-' = not reached)", rows, [
                     ("vmm", "vmm"), ("host", "host"), ("cpus", "vCPUs"), ("first_line_s", "first kernel line"),
                     ("init_s", "/init"), ("userspace_s", "userspace ready"), ("poweroff_s", "power-off"),
                     ("reached", "reached"), ("kernel_time_s", "kernel clock at end"), ("stop", "stopped because"),
                     ("other_load_pct", "other load %")],
                 spread=MILESTONES + ("other_load_pct",))
    report.ties_note(rounds, rows, polling=False)      # no sidecore in a boot
    report.json(rows)
    # the benchmark's job is exitless to power-off; a QEMU row that cannot get there is a finding, not a failure
    return 0 if all(r["reached"] == "power-off" for r in rows if r["vmm"] == "exitless") else 1
