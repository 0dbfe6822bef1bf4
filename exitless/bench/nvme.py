"""``exitless bench nvme``: NVMe workloads under every exitless I/O path and under QEMU's NVMe.

The client is the guest kit's NVMe driver — the same binary in exitless and in
QEMU 7.2's ``-device nvme`` (which has shadow doorbells on) — on the same image,
with ``bench blk``'s tests.  Each VMM runs with Doorbell Buffer Config
(``dbbuf=1``) and, for the peer comparison, without (``dbbuf=0``: every doorbell
an MMIO write).  Latency and IOPS are measured in the guest (TSC); MMIO doorbell
writes per I/O are counted by the guest driver (I/O queues only).  Exits and host
CPU per I/O as in ``bench blk``: over the guest's marked window in exitless,
differential (a run of ``n`` minus a run of ``n/10``) in QEMU; host CPU excludes
the vCPU threads.  Rows are measured in interleaved rounds (:mod:`.workload`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..devices.nvme.namespace import Namespace
from ..devices.nvme.pci import NvmePci
from ..guestkit import guestkit_path
from . import qemu
from .common import BenchError, Progress, Report, guest_result, no_progress, plot_panels, ratio_over_rounds
from .options import NVME_PATHS
from .workload import COLUMNS, SPREAD_COLUMNS, exitless_guest_run, TESTS, Test, make_image, per_io_row, run_rounds, select_tests

FILL_APP = "nvme rw=fill bs=131072 qd=4 seed=5"
# How the guest waits for completions (an interrupt, or polling the CQ phase tags) and whether it sends
# Doorbell Buffer Config, per exitless path.  Without it every exitless path traps its I/O doorbells.
CASES_BY_PATH = {"trap": (("msix", 1), ("msix", 0)), "ioeventfd": (("msix", 1),), "shared": (("poll", 1),),
                 "poll": (("msix", 1), ("poll", 1)), "adaptive": (("msix", 1), ("poll", 1))}
QEMU_CASES = (("msix", 1), ("poll", 1), ("msix", 0))
NVME_COLUMNS = COLUMNS[:3] + [("dbbuf", "dbbuf")] + COLUMNS[3:9] + \
    [("doorbells_per_io", "MMIO doorbells/IO")] + COLUMNS[9:]


def nvme_app(test: Test, n: int, irq: str, dbbuf: int) -> str:
    return f"nvme rw={test.rw} bs={test.bs} qd={test.qd} n={n} seed=5 irq={irq} dbbuf={dbbuf}"


def _nvme_row(vmm: str, path: str, test: Test, irq: str, dbbuf: int, full: dict, base: dict | None = None) -> dict:
    row = per_io_row(vmm, path, test, irq, full, base)
    base_doorbells = base["res"]["doorbells"] if base else 0
    row.update(dbbuf=dbbuf, doorbells_per_io=(full["res"]["doorbells"] - base_doorbells) /
               (full["res"]["ops"] - (base["res"]["ops"] if base else 0)))
    return row


def _exitless_run(image: Path, path: str, append: str, timeout: float) -> dict:
    return exitless_guest_run(lambda m: NvmePci(m, Namespace(image), path, queues=1), "nvme", append, f"exitless/{path}", timeout)


@dataclass(frozen=True)
class ExitlessNvme:
    """An exitless row (a workload.Setup): the NVMe controller's doorbells on ``path``."""
    path: str
    irq: str
    dbbuf: int
    image: Path
    timeout: float
    vmm: str = "exitless"

    def measure(self, test: Test, n: int) -> dict:
        full = _exitless_run(self.image, self.path, nvme_app(test, n, self.irq, self.dbbuf), self.timeout)
        return _nvme_row(self.vmm, self.path, test, self.irq, self.dbbuf, full)


@dataclass(frozen=True)
class QemuNvme:
    """A QEMU row (a workload.Setup): ``-device nvme`` on the image through the host page cache, as
    exitless's buffered namespace; differential exits and CPU (a run of n/10, then of n)."""
    irq: str
    dbbuf: int
    image: Path
    timeout: float
    vmm: str = "qemu"
    path: str = "nvme"

    def _run(self, append: str) -> dict:
        device = ["-drive", f"file={self.image},if=none,id=n0,format=raw,cache=writeback,aio=threads",
                  "-device", "nvme,drive=n0,serial=exitless-bench"]
        r = qemu.run_guestkit(guestkit_path(), append, device_args=device, timeout=self.timeout)
        if r.exit_status != 0:
            raise BenchError(f"qemu ({r.accel}): {append}: no result\n{r.console.decode(errors='replace')[-600:]}")
        return {"res": guest_result(r.console, "nvme"), "exits": r.exits, "cpu": r.vmm_cpu_s, "accel": r.accel}

    def measure(self, test: Test, n: int) -> dict:
        base = self._run(nvme_app(test, max(1, n // 10), self.irq, self.dbbuf))
        full = self._run(nvme_app(test, n, self.irq, self.dbbuf))
        return {**_nvme_row(self.vmm, self.path, test, self.irq, self.dbbuf, full, base), "accel": full["accel"]}


def run(tests=TESTS, paths=NVME_PATHS, *, with_qemu: bool = True, scale: float = 1.0, timeout: float = 600,
        rounds: int = 3, progress: Progress = no_progress, notes=lambda text: None) -> list[dict]:
    """Rows with ``bench blk``'s keys plus ``dbbuf`` and ``doorbells_per_io`` (that of the last round)."""
    tests = select_tests(tests)
    image = make_image()
    try:
        _exitless_run(image, "ioeventfd", FILL_APP, timeout)        # allocate every block once
        setups: list = [ExitlessNvme(p, irq, db, image, timeout) for p in paths for irq, db in CASES_BY_PATH[p]]
        if with_qemu and not qemu.available():
            notes(f"{qemu.QEMU} is not installed: no QEMU rows")
        elif with_qemu:
            setups += [QemuNvme(irq, db, image, timeout) for irq, db in QEMU_CASES]
        return run_rounds(tests, setups, rounds=rounds, scale=scale, progress=progress)
    finally:
        image.unlink(missing_ok=True)


def target_ratios(rows: list[dict]) -> dict[str, dict]:
    """Issue 10's targets, round by round between the best rows: QD1 p50 and QD32 IOPS, exitless over QEMU."""
    def best(test, metric, higher, vmm):
        cands = [r for r in rows if r["test"] == test and r["vmm"] == vmm and r.get(metric) is not None]
        return (max if higher else min)(cands, key=lambda r: r[metric]) if cands else None

    out = {}
    for name, test, metric, higher in (("qd1_p50_exitless_over_qemu", "randread-4k-qd1", "p50_us", False),
                                       ("qd32_iops_exitless_over_qemu", "randread-4k-qd32", "iops", True)):
        num, den = best(test, metric, higher, "exitless"), best(test, metric, higher, "qemu")
        ratio = ratio_over_rounds(num, den, metric)
        if ratio is not None:
            ratio["rows"] = " vs ".join(f"{r['vmm']}/{r['path']} irq={r['irq']} dbbuf={r['dbbuf']}"
                                        for r in (num, den))
            out[name] = ratio
    return out


def polled_exits(rows: list[dict]) -> float | None:
    """The most exits per I/O of a row where nothing should exit: shadow doorbells polled, completions polled."""
    polled = [r["exits_per_io"] for r in rows if r["vmm"] == "exitless" and r["path"] in ("shared", "poll")
              and r["irq"] == "poll" and r["dbbuf"] and r["exits_per_io"] is not None]
    return max(polled) if polled else None


def plot(rows: list[dict], path: str) -> None:
    """The QD1 latency, QD32 IOPS and MMIO doorbells per I/O panels of ``rows`` as a PNG."""
    plot_panels(rows, path, [("randread-4k-qd1", "p50_us", "QD1 4K random read p50 (µs, lower is better)"),
                             ("randread-4k-qd32", "iops", "QD32 4K random read IOPS"),
                             ("randread-4k-qd1", "doorbells_per_io", "QD1 MMIO doorbell writes per I/O")],
                lambda r: f"{r['vmm']} {r['path']}/{r['irq']}/db{r['dbbuf']}",
                {"exitless": "tab:blue", "qemu": "tab:gray"})


def main(args) -> int:
    report = Report(args.json)
    with report.progress() as progress:
        rows = run(args.tests, args.paths, with_qemu=not args.no_qemu, scale=args.scale, rounds=args.rounds,
                   progress=progress, notes=report.note)
    report.table("NVMe (same image, same guest driver)", rows, NVME_COLUMNS, spread=SPREAD_COLUMNS)
    report.ties_note(args.rounds, rows)
    for name, r in target_ratios(rows).items():
        report.note(f"{name}: {r['median']:.3f} (min–max over the rounds {r['min']:.3f}–{r['max']:.3f}): {r['rows']}")
    exits = polled_exits(rows)
    if exits is not None:
        report.note(f"most exits per I/O on the fully polled rows (shared/poll, dbbuf=1, irq=poll): {exits:.4f}")
    report.json(rows)
    if args.plot:
        plot(rows, args.plot)
    return 1 if any(r.get("errors") for r in rows) else 0
