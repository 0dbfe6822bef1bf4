"""``exitless bench doorbell``: one register-write ping-pong under every I/O path, side by side.

The guest kit's ``doorbell`` app is the driver: it rings, spins on the ack in the
shared page, and times each round trip with the TSC (percentiles computed in the
guest) after a warm-up.  Exits come from KVM's binary statistics over the guest's
marked loop, so ``exits_per_op`` and ``cpu_us_per_op`` are per ping-pong.
``cpu_us_per_op`` is the VMM's own CPU — device emulation and sidecores,
in-process or not — with the vCPU threads' time (the guest running) taken out.

Placement.  A ping-pong's latency is set less by the I/O path than by where the
scheduler puts the two ends: on this two-core host, when another process keeps
the other core busy, an unpinned sidecore is woken on the vCPU's own core
(wake-affine) and waits behind the spinning vCPU (ioeventfd: ~30 µs instead of
~3–8 µs), an adaptive sidecore sharing the vCPU's core overruns its poll window
and falls back to sleeping (~50 µs instead of ~0.5 µs), and a shared (always
polling) one gets scheduler slices (milliseconds).  On an idle machine the other
core halts (this host's kernel runs with guest_halt_poll_ns=0), and waking a
sleeping sidecore pays the wake-up of a halted vCPU.  So rows are measured with
the vCPU thread pinned to one CPU and every sidecore (thread or process) to
another (``--no-pin``: the scheduler's choice), in interleaved rounds, and the
ratios are taken round by round between rows measured side by side.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from ..devices.doorbell import DoorbellDevice
from ..guestkit import guestkit_cmdline, guestkit_path
from ..sidecore.paths import attach
from ..vm import Machine, VmConfig
from .common import (BenchError, Progress, Report, aggregate, guest_result, interleave, mark_best, no_progress,
                     process_cpu_seconds, ratio_notes, ratio_over_rounds)
from .options import DOORBELL_PATHS as PATHS, PLACEMENTS

MMIO_GPA, SHARED_GPA = 0xD000_0000, 0xD000_1000
BUSY_MMIO_GPA, BUSY_SHARED_GPA = 0xD001_0000, 0xD001_1000
METRICS = ("median_us", "p99_us", "exits_per_op", "mmio_exits_per_op", "cpu_us_per_op", "doorbells_per_op")


@dataclass(frozen=True)
class Case:
    path: str
    sidecore: str            # thread, process, or none (trap)
    busy_sidecore: bool = False

    @property
    def label(self) -> str:
        return f"{self.path}/{self.sidecore}{' +busy' if self.busy_sidecore else ''}"


def default_cases(paths=PATHS, placements=PLACEMENTS) -> list[Case]:
    cases = []
    for path in paths:
        if path == "trap":
            cases.append(Case("trap", "none"))
            cases += [Case("trap", "none", True)]  # another device's sidecore thread polls meanwhile
        else:
            cases += [Case(path, p) for p in placements]
    return cases


@dataclass(frozen=True)
class Pinning:
    """The CPU of the vCPU thread and the CPU of every sidecore (thread or process)."""
    vcpu: int
    sidecore: int


def pinning(pin: bool = True) -> Pinning | None:
    """Two distinct CPUs this process may use (the first two of its affinity), or None
    (``pin`` False, or a single CPU)."""
    cpus = sorted(os.sched_getaffinity(0))
    return Pinning(cpus[0], cpus[1]) if pin and len(cpus) >= 2 else None


@contextmanager
def on_cpu(cpu: int | None) -> Iterator[None]:
    """Run the calling thread on ``cpu`` (None: unchanged) until the block ends; threads and
    processes it starts meanwhile inherit that affinity."""
    if cpu is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def _run(case: Case, app_args: str, timeout: float, pin: Pinning | None) -> dict:
    console = bytearray()
    with Machine(VmConfig(mem_mib=64, console=console.extend)) as m:
        dev = DoorbellDevice()
        placement = case.sidecore if case.sidecore != "none" else "thread"
        with on_cpu(pin and pin.sidecore):
            att = attach(m, dev, mmio_gpa=MMIO_GPA, shared_gpa=SHARED_GPA, path=case.path, placement=placement)
            if case.busy_sidecore:
                attach(m, DoorbellDevice(), mmio_gpa=BUSY_MMIO_GPA, shared_gpa=BUSY_SHARED_GPA, path="shared")
        m.boot_pvh(guestkit_path(), guestkit_cmdline(app_args))
        cpu0, t0 = process_cpu_seconds(), time.monotonic()
        child0 = m._sidecore_process_cpu()
        with on_cpu(pin and pin.vcpu):
            exit = m.run(timeout=timeout)
        cpu1, wall = process_cpu_seconds(), time.monotonic() - t0
        child_cpu = m._sidecore_process_cpu() - child0
        vcpu_cpu = m.vcpu_cpu_seconds()
        window = m.bench_marker.window()
        m.close()  # stops the sidecores: a process sidecore reports its device counters
        device_stats = att.sidecore.device_stats()[0] if att.sidecore else dev.stats()
    if exit.kind != "debug-exit":
        raise BenchError(f"{case.label}: the guest did not finish ({exit.kind}: {exit.message})")
    return {"console": bytes(console), "window": window, "device": device_stats, "wall": wall,
            "vmm_cpu": (cpu1 - cpu0) - vcpu_cpu + child_cpu}


def measure(case: Case, n: int = 20000, warmup: int = 2000, timeout: float = 120, pin: Pinning | None = None) -> dict:
    """One round of ``case``: ``warmup`` ping-pongs, then ``n`` measured; exits and CPU over the
    guest's measured loop only.  ``pin``: where the vCPU thread and the sidecores run."""
    run = _run(case, f"doorbell path={case.path} n={n} warmup={warmup}", timeout, pin)
    res = guest_result(run["console"], "doorbell")
    ops = res["ops"]
    errors = res["errors"] + res["timeouts"] + run["device"].get("errors", 0)
    if run["device"].get("handled") not in (None, n + warmup):
        errors += 1
    win = run["window"]
    if win is None:
        raise BenchError(f"{case.label}: the guest kit sent no benchmark marks (an old build?)")
    return {
        "path": case.path, "sidecore": case.sidecore, "busy_sidecore": case.busy_sidecore,
        "median_us": res["p50_ns"] / 1000, "p99_us": res["p99_ns"] / 1000,
        "exits_per_op": win["kvm"]["exits"] / ops,
        "mmio_exits_per_op": win["kvm"]["mmio_exits"] / ops,
        "cpu_us_per_op": win["vmm_cpu"] * 1e6 / ops,
        "doorbells_per_op": res["doorbells"] / (n + warmup), "ops": ops, "errors": errors,
        "pinned": None if pin is None else {"vcpu": pin.vcpu, "sidecore": pin.sidecore},
    }


def measure_idle(path: str, placement: str, ms: int = 2000, timeout: float = 60, pin: Pinning | None = None) -> dict:
    """Sidecore CPU while the guest sleeps in HLT: the cost of being ready."""
    run = _run(Case(path, placement), f"idle ms={ms}", timeout, pin)
    guest_result(run["console"], "idle")
    return {"path": path, "sidecore": placement, "test": "idle",
            "idle_cpu_pct": 100.0 * run["vmm_cpu"] / run["wall"], "seconds": run["wall"]}


def run(cases: list[Case], *, n: int = 20000, warmup: int = 2000, rounds: int = 3, pin: bool = True,
        progress: Progress = no_progress) -> list[dict]:
    """Every case in ``rounds`` interleaved rounds: one row per case (medians, ``per_round``,
    ``spread``; ``vs_best`` on ``median_us``)."""
    where = pinning(pin)
    samples = interleave(cases, rounds, lambda case, _r: measure(case, n=n, warmup=warmup, pin=where), progress,
                         label=lambda case: case.label)
    rows = [aggregate(s, METRICS) for s in samples]
    mark_best(rows, "median_us", higher_is_better=False)
    return rows


def summarize(rows: list[dict]) -> dict:
    """The ratios the issue sets targets for, from rows measured in this one run: each ratio is
    taken round by round between the two rows (measured side by side), then its median and
    min–max over the rounds."""
    def row(path, sidecore="thread", busy=False):
        for r in rows:
            if r.get("test", "pingpong") == "pingpong" and r["path"] == path and r["busy_sidecore"] == busy and \
                    (path == "trap" or r["sidecore"] == sidecore):
                return r
        return None

    ratios = {"shared_over_trap": (row("shared"), row("trap")),
              "trap_busy_over_trap": (row("trap", busy=True), row("trap")),
              "adaptive_over_shared": (row("adaptive"), row("shared")),
              "adaptive_over_shared_process": (row("adaptive", "process"), row("shared", "process"))}
    out = {}
    for name, (num, den) in ratios.items():
        r = ratio_over_rounds(num, den, "median_us")
        if r is not None:
            out[name] = r
    return out


# --------------------------------------------------------------------------- command line


def main(args) -> int:
    report = Report(args.json)
    where = pinning(args.pin)
    with report.progress() as progress:
        rows = run(default_cases(args.paths, args.placements), n=args.n, warmup=args.warmup, rounds=args.rounds,
                   pin=args.pin, progress=progress)
        idle = [(path, placement) for path in ("shared", "adaptive") if path in args.paths
                for placement in args.placements] if args.idle_ms else []
        for i, (path, placement) in enumerate(idle):
            progress(f"idle {path}/{placement}", i, len(idle))
            rows.append(measure_idle(path, placement, args.idle_ms, pin=where))
    pingpong = [r for r in rows if r.get("test") != "idle"]
    report.table(f"doorbell ping-pong (one run, same machine; "
                 f"{f'vCPU on CPU {where.vcpu}, sidecores on CPU {where.sidecore}' if where else 'not pinned'})",
                 pingpong, [("path", "path"), ("sidecore", "sidecore"), ("busy_sidecore", "busy sidecore"),
                            ("median_us", "median µs"), ("p99_us", "p99 µs"), ("exits_per_op", "exits/op"),
                            ("cpu_us_per_op", "VMM CPU µs/op"), ("errors", "errors"),
                            ("other_load_pct", "other load %")], spread=("median_us", "other_load_pct"))
    report.ties_note(args.rounds, pingpong)
    idle_rows = [r for r in rows if r.get("test") == "idle"]
    if idle_rows:
        report.table("sidecore CPU while the guest is idle (one round)", idle_rows,
                     [("path", "path"), ("sidecore", "sidecore"), ("idle_cpu_pct", "% of a core")])
    for line in ratio_notes(summarize(rows)):
        report.note(line)
    report.json(rows)
    return 1 if any(r.get("errors") for r in rows) else 0
