"""``exitless bench nvme``: NVMe workloads under every exitless I/O path and under QEMU's NVMe.

The client is the guest kit's NVMe driver — the same binary in exitless and in
QEMU 7.2's ``-device nvme`` (which has shadow doorbells on) — on the same image.
Each VMM runs with Doorbell Buffer Config (``dbbuf=1``) and, for the peer
comparison, without (``dbbuf=0``: every doorbell an MMIO write).  Latency and
IOPS are measured in the guest (TSC); MMIO doorbell writes per I/O are counted
by the guest driver (I/O queues only).  Exits and host CPU per I/O as in
``bench blk``: over the guest's marked window in exitless, differential (a run
of ``n`` minus a run of ``n/10``) in QEMU; host CPU excludes the vCPU threads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..devices.nvme.namespace import Namespace
from ..devices.nvme.pci import NvmePci
from ..guestkit import guestkit_path
from ..vm import Machine, VmConfig
from . import qemu
from .blk import make_image
from .common import BenchError, guest_result


@dataclass(frozen=True)
class Test:
    name: str
    rw: str
    bs: int
    qd: int
    n: int


TESTS = (
    Test("randread-4k-qd1", "randread", 4096, 1, 4000),
    Test("randread-4k-qd32", "randread", 4096, 32, 20000),
    Test("read-128k", "read", 131072, 4, 1000),
    Test("randwrite-4k-qd1", "randwrite", 4096, 1, 4000),
    Test("randwrite-4k-qd32", "randwrite", 4096, 32, 20000),
    Test("write-128k", "write", 131072, 4, 1000),
)

# (path, irq, dbbuf): how the guest waits (an interrupt, or polling the CQ phase tags) and whether it
# sends Doorbell Buffer Config.  Without it every exitless path traps its I/O doorbells.
EXITLESS_CASES = (("trap", "msix", 1), ("ioeventfd", "msix", 1), ("shared", "poll", 1), ("poll", "msix", 1),
                  ("poll", "poll", 1), ("adaptive", "msix", 1), ("adaptive", "poll", 1), ("trap", "msix", 0))
QEMU_CASES = (("msix", 1), ("poll", 1), ("msix", 0))


def _app(test: Test, n: int, irq: str, dbbuf: int) -> str:
    return f"nvme rw={test.rw} bs={test.bs} qd={test.qd} n={n} seed=5 irq={irq} dbbuf={dbbuf}"


def _exitless_run(image: Path, path: str, app: str, timeout: float) -> dict:
    console = bytearray()
    with Machine(VmConfig(mem_mib=128, console=console.extend)) as m:
        NvmePci(m, Namespace(image), path, queues=1)
        m.boot_pvh(guestkit_path(), app)
        exit = m.run(timeout=timeout)
        window = m.bench_marker.window()
    if exit.kind != "debug-exit" or exit.status != 0 or window is None:
        raise BenchError(f"exitless/{path}: {app}: {exit.kind} {exit.status} {exit.message}\n"
                         f"{console.decode(errors='replace')[-600:]}")
    return {"res": guest_result(bytes(console), "nvme"), "exits": window["kvm"]["exits"], "cpu": window["vmm_cpu"]}


def qemu_device(image: Path) -> list[str]:
    """QEMU's NVMe on ``image`` through the host page cache, as exitless's buffered namespace."""
    return ["-drive", f"file={image},if=none,id=n0,format=raw,cache=writeback,aio=threads",
            "-device", "nvme,drive=n0,serial=exitless-bench"]


def _qemu_run(image: Path, app: str, timeout: float) -> dict:
    r = qemu.run_guestkit(guestkit_path(), app, device_args=qemu_device(image), timeout=timeout)
    if r.exit_status != 0:
        raise BenchError(f"qemu ({r.accel}): {app}: exit {r.exit_status}\n{r.console.decode(errors='replace')[-600:]}")
    return {"res": guest_result(r.console, "nvme"), "exits": r.exits, "cpu": r.vmm_cpu_s, "accel": r.accel}


def _row(vmm: str, path: str, test: Test, irq: str, dbbuf: int, full: dict, base: dict | None) -> dict:
    res = full["res"]
    if base is None:
        base = {"res": {"ops": 0, "doorbells": 0}, "exits": 0, "cpu": 0.0}
    dops = res["ops"] - base["res"]["ops"]
    exits = None if full["exits"] is None or base["exits"] is None else (full["exits"] - base["exits"]) / dops
    return {
        "vmm": vmm, "path": path, "test": test.name, "irq": irq, "dbbuf": dbbuf,
        "iops": res["iops"], "p50_us": res["p50_ns"] / 1000, "p99_us": res["p99_ns"] / 1000,
        "mbps": res["kib_s"] * 1024 / 1e6, "exits_per_io": exits,
        "doorbells_per_io": (res["doorbells"] - base["res"]["doorbells"]) / dops,
        "cpu_us_per_io": max(0.0, full["cpu"] - base["cpu"]) * 1e6 / dops,
        "errors": res["errors"] + res["verify_errors"], "ops": res["ops"],
    }


def run(tests=TESTS, exitless_cases=EXITLESS_CASES, qemu_cases=QEMU_CASES, *, with_qemu: bool = True,
        scale: float = 1.0, timeout: float = 600, log=print) -> list[dict]:
    """Rows with ``bench blk``'s keys plus ``dbbuf`` and ``doorbells_per_io``; one image for every run."""
    image = make_image()
    rows = []
    try:
        _exitless_run(image, "ioeventfd", "nvme rw=fill bs=131072 qd=4 seed=5", timeout)  # allocate every block
        for test in tests:
            n = max(10, int(test.n * scale))
            for path, irq, dbbuf in exitless_cases:
                log(f"exitless/{path} irq={irq} dbbuf={dbbuf} {test.name} ...")
                rows.append(_row("exitless", path, test, irq, dbbuf,
                                 _exitless_run(image, path, _app(test, n, irq, dbbuf), timeout), None))
            if with_qemu and qemu.available():
                for irq, dbbuf in qemu_cases:
                    log(f"qemu/nvme irq={irq} dbbuf={dbbuf} {test.name} ...")
                    base = _qemu_run(image, _app(test, max(1, n // 10), irq, dbbuf), timeout)
                    full = _qemu_run(image, _app(test, n, irq, dbbuf), timeout)
                    row = _row("qemu", "nvme", test, irq, dbbuf, full, base)
                    row["accel"] = full["accel"]
                    rows.append(row)
    finally:
        image.unlink(missing_ok=True)
    return rows


COLUMNS = [("vmm", "VMM"), ("path", "path"), ("irq", "irq"), ("dbbuf", "dbbuf"), ("test", "test"),
           ("p50_us", "p50 µs"), ("p99_us", "p99 µs"), ("iops", "IOPS"), ("mbps", "MB/s"),
           ("exits_per_io", "exits/IO"), ("doorbells_per_io", "MMIO doorbells/IO"),
           ("cpu_us_per_io", "host CPU µs/IO"), ("errors", "errors")]


def summarize(rows: list[dict]) -> dict:
    """The issue's targets as ratios of this one run: QD1 p50, exits per I/O on polled paths, QD32 IOPS."""
    out = {}

    def best(sel, key, low=True):
        return (min if low else max)(sel, key=lambda r: r[key]) if sel else None

    for test, key, low, name in (("randread-4k-qd1", "p50_us", True, "qd1_p50_exitless_best_over_qemu_best"),
                                 ("randread-4k-qd32", "iops", False, "qd32_iops_exitless_best_over_qemu_best")):
        ours = best([r for r in rows if r["test"] == test and r["vmm"] == "exitless"], key, low)
        theirs = best([r for r in rows if r["test"] == test and r["vmm"] == "qemu"], key, low)
        if ours and theirs and theirs[key]:
            out[name] = ours[key] / theirs[key]
            out[name + "_rows"] = (f"exitless/{ours['path']} irq={ours['irq']} dbbuf={ours['dbbuf']} vs "
                                   f"qemu irq={theirs['irq']} dbbuf={theirs['dbbuf']}")
    polled = [r["exits_per_io"] for r in rows if r["vmm"] == "exitless" and r["path"] in ("shared", "poll")
              and r["irq"] == "poll"
              and r["dbbuf"] and r["exits_per_io"] is not None]
    if polled:
        out["max_exits_per_io_polled_paths"] = max(polled)
    return out


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("randread-4k-qd1", "p50_us", "QD1 4K random read p50 (µs, lower is better)"),
              ("randread-4k-qd32", "iops", "QD32 4K random read IOPS"),
              ("randread-4k-qd1", "doorbells_per_io", "QD1 MMIO doorbell writes per I/O")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (test, key, title) in zip(axes, panels):
        sel = [r for r in rows if r["test"] == test]
        ax.bar([f"{r['vmm']} {r['path']}/{r['irq']}/db{r['dbbuf']}" for r in sel], [r[key] for r in sel],
               color=["tab:blue" if r["vmm"] == "exitless" else "tab:gray" for r in sel])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        plt.setp(ax.get_xticklabels(), rotation=60, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
