"""``exitless bench doorbell``: one register-write ping-pong under every I/O path, side by side.

The guest kit's ``doorbell`` app is the driver: it rings, spins on the ack in the
shared page, and times each round trip with the TSC (percentiles computed in the
guest).  Exits come from KVM's binary statistics; boot costs are removed by
subtracting a run with zero operations (same path, same placement), so
``exits_per_op`` and ``cpu_us_per_op`` are per ping-pong.  ``cpu_us_per_op`` is
the VMM's own CPU — device emulation and sidecores, in-process or not — with the
vCPU threads' time (the guest running) taken out.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..devices.doorbell import DoorbellDevice
from ..guestkit import guestkit_path
from ..sidecore.paths import attach
from ..vm import Machine, VmConfig
from .common import BenchError, guest_result, process_cpu_seconds

MMIO_GPA, SHARED_GPA = 0xD000_0000, 0xD000_1000
BUSY_MMIO_GPA, BUSY_SHARED_GPA = 0xD001_0000, 0xD001_1000
PATHS = ("trap", "ioeventfd", "shared", "adaptive")


@dataclass(frozen=True)
class Case:
    path: str
    sidecore: str            # thread, process, or none (trap)
    busy_sidecore: bool = False

    @property
    def label(self) -> str:
        return f"{self.path}/{self.sidecore}{' +busy' if self.busy_sidecore else ''}"


def default_cases(paths=PATHS, placements=("thread", "process")) -> list[Case]:
    cases = []
    for path in paths:
        if path == "trap":
            cases.append(Case("trap", "none"))
            cases += [Case("trap", "none", True)]  # another device's sidecore thread polls meanwhile
        else:
            cases += [Case(path, p) for p in placements]
    return cases


def _run(case: Case, app_args: str, timeout: float) -> dict:
    console = bytearray()
    with Machine(VmConfig(mem_mib=64, console=console.extend)) as m:
        dev = DoorbellDevice()
        placement = case.sidecore if case.sidecore != "none" else "thread"
        att = attach(m, dev, mmio_gpa=MMIO_GPA, shared_gpa=SHARED_GPA, path=case.path, placement=placement)
        if case.busy_sidecore:
            attach(m, DoorbellDevice(), mmio_gpa=BUSY_MMIO_GPA, shared_gpa=BUSY_SHARED_GPA, path="shared")
        m.boot_pvh(guestkit_path(), app_args)
        cpu0, t0 = process_cpu_seconds(), time.monotonic()
        child0 = m._sidecore_process_cpu()
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


def measure(case: Case, n: int = 20000, warmup: int = 200, timeout: float = 120) -> dict:
    """One benchmark row for ``case``; exits and CPU over the guest's measured loop only."""
    run = _run(case, f"doorbell path={case.path} n={n} warmup={warmup}", timeout)
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
    }


def measure_idle(path: str, placement: str, ms: int = 2000, timeout: float = 60) -> dict:
    """Sidecore CPU while the guest sleeps in HLT: the cost of being ready."""
    run = _run(Case(path, placement), f"idle ms={ms}", timeout)
    guest_result(run["console"], "idle")
    return {"path": path, "sidecore": placement, "test": "idle",
            "idle_cpu_pct": 100.0 * run["vmm_cpu"] / run["wall"], "seconds": run["wall"]}


def summarize(rows: list[dict]) -> dict:
    """The ratios the issue sets targets for, from rows measured in this one run."""
    def med(path, sidecore="thread", busy=False):
        for r in rows:
            if r.get("test", "pingpong") == "pingpong" and r["path"] == path and r["busy_sidecore"] == busy and \
                    (path == "trap" or r["sidecore"] == sidecore):
                return r["median_us"]
        return None

    out = {}
    trap, shared, adaptive = med("trap"), med("shared"), med("adaptive")
    if trap and shared:
        out["shared_over_trap"] = shared / trap
    if trap and med("trap", busy=True):
        out["trap_busy_over_trap"] = med("trap", busy=True) / trap
    if shared and adaptive:
        out["adaptive_over_shared"] = adaptive / shared
    return out
