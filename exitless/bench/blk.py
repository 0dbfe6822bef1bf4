"""``exitless bench blk``: one block workload under every exitless I/O path and under QEMU.

The client is the guest kit's virtio-blk driver — the same binary in exitless
and in QEMU — on the same image.  Latency and IOPS are measured in the guest
(TSC).  Exits and host CPU per I/O: in exitless, over exactly the guest's
measured loop (it marks start and end on port 0x511, where the VMM snapshots
KVM's counters); in QEMU, differential — a run with ``n`` operations minus a
run with ``n/10``, divided by the difference — so boot and PCI probing drop
out.  Host CPU excludes the vCPU threads (the guest's own running time).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..devices.virtio.blk import VirtioBlk
from ..devices.virtio.pci import VirtioPci
from ..guestkit import guestkit_path
from ..vm import Machine, VmConfig
from . import qemu
from .common import BenchError, guest_result

EXITLESS_PATHS = ("trap", "ioeventfd", "shared", "poll", "adaptive")
IMAGE_BYTES = 64 << 20


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


def _app(test: Test, n: int, irq: str = "msix") -> str:
    return f"blk rw={test.rw} bs={test.bs} qd={test.qd} n={n} seed=5 irq={irq}"


# How the guest driver waits for completions: an interrupt (msix), or by polling the used ring
# (poll: like NVMe polled queues; with a polling device this is the fully exitless pairing).
IRQ_MODES_BY_PATH = {"trap": ("msix",), "ioeventfd": ("msix",), "shared": ("msix", "poll"),
                     "poll": ("msix", "poll"), "adaptive": ("msix", "poll")}


def _exitless_run(image: Path, path: str, app: str, timeout: float) -> dict:
    console = bytearray()
    with Machine(VmConfig(mem_mib=128, console=console.extend)) as m:
        VirtioPci(m, VirtioBlk(image), path)
        m.boot_pvh(guestkit_path(), app)
        exit = m.run(timeout=timeout)
        window = m.bench_marker.window()
    if exit.kind != "debug-exit" or exit.status != 0 or window is None:
        raise BenchError(f"exitless/{path}: {app}: {exit.kind} {exit.status} {exit.message}\n"
                         f"{console.decode(errors='replace')[-600:]}")
    res = guest_result(bytes(console), "blk")
    return {"res": res, "exits": window["kvm"]["exits"], "cpu": window["vmm_cpu"], "windowed": True}


def _qemu_run(image: Path, iothread: bool, app: str, timeout: float) -> dict:
    r = qemu.run_guestkit(guestkit_path(), app, device_args=qemu.builtin_device(image, iothread), timeout=timeout)
    if r.exit_status != 0:
        raise BenchError(f"qemu ({r.accel}): {app}: exit {r.exit_status}\n{r.console.decode(errors='replace')[-600:]}")
    return {"res": guest_result(r.console, "blk"), "exits": r.exits, "cpu": r.vmm_cpu_s, "accel": r.accel}


def _row(vmm: str, path: str, test: Test, full: dict, base: dict | None, irq: str) -> dict:
    """Per-I/O figures: over the guest's marked window (exitless), or full minus base run (QEMU)."""
    res = full["res"]
    if base is None:
        base = {"res": {"ops": 0}, "exits": 0, "cpu": 0.0}
    dops = res["ops"] - base["res"]["ops"]
    exits = None if full["exits"] is None or base["exits"] is None else (full["exits"] - base["exits"]) / dops
    return {
        "vmm": vmm, "path": path, "test": test.name, "irq": irq,
        "iops": res["iops"], "p50_us": res["p50_ns"] / 1000, "p99_us": res["p99_ns"] / 1000,
        "mbps": res["kib_s"] * 1024 / 1e6, "exits_per_io": exits,
        "cpu_us_per_io": max(0.0, full["cpu"] - base["cpu"]) * 1e6 / dops,
        "errors": res["errors"] + res["verify_errors"], "ops": res["ops"],
    }


def make_image(directory: str | None = None) -> Path:
    fd, name = tempfile.mkstemp(prefix="exitless-bench-", suffix=".img", dir=directory or "/var/tmp")
    os.ftruncate(fd, IMAGE_BYTES)
    os.close(fd)
    return Path(name)


def run(tests=TESTS, paths=EXITLESS_PATHS, *, with_qemu: bool = True, scale: float = 1.0,
        timeout: float = 600, log=print, with_vhost: bool = False) -> list[dict]:
    """``with_vhost``: add ``qemu+exitless`` rows (QEMU frontend, exitless vhost-user back-end; bench.vhost)."""
    image = make_image()
    rows = []
    try:
        # write the whole image once, so that reads hit allocated blocks in both VMMs
        _exitless_run(image, "ioeventfd", "blk rw=fill bs=131072 qd=4 seed=5", timeout)
        for test in tests:
            n = max(10, int(test.n * scale))
            for path in paths:
                for irq in IRQ_MODES_BY_PATH[path]:
                    log(f"exitless/{path} irq={irq} {test.name} ...")
                    full = _exitless_run(image, path, _app(test, n, irq), timeout)
                    rows.append(_row("exitless", path, test, full, None, irq))
            if with_qemu and qemu.available():
                for iothread in (False, True):
                    for irq in ("msix", "poll"):
                        label = "iothread-poll" if iothread else "ioeventfd"
                        log(f"qemu/{label} irq={irq} {test.name} ...")
                        base = _qemu_run(image, iothread, _app(test, n // 10, irq), timeout)
                        full = _qemu_run(image, iothread, _app(test, n, irq), timeout)
                        row = _row("qemu", label, test, full, base, irq)
                        row["accel"] = full["accel"]
                        rows.append(row)
        if with_vhost and qemu.available():
            from . import vhost
            rows += vhost.run(list(tests), scale=scale, timeout=timeout, log=log, image=image, with_builtin=False,
                              accel="auto")
    finally:
        image.unlink(missing_ok=True)
    return rows


def summarize(rows: list[dict]) -> dict:
    """QD1 latency of the best exitless shared-memory path against QEMU's best, from this one run."""
    qd1 = [r for r in rows if r["test"] == "randread-4k-qd1"]
    ours = [r for r in qd1 if r["vmm"] == "exitless" and r["path"] in ("poll", "shared")]
    theirs = [r for r in qd1 if r["vmm"] == "qemu"]
    out = {}
    if ours and theirs:
        best = min(ours, key=lambda r: r["p50_us"])
        peer = min(theirs, key=lambda r: r["p50_us"])
        out["qd1_p50_best_shared_over_qemu_best"] = best["p50_us"] / peer["p50_us"]
        out["qd1_best_path"] = (f"exitless/{best['path']} irq={best['irq']} vs qemu/{peer['path']} "
                                f"irq={peer['irq']} ({peer.get('accel')})")
        out["qd1_exits_per_io"] = best["exits_per_io"]
    return out


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("randread-4k-qd1", "p50_us", "QD1 4K random read p50 (µs, lower is better)"),
              ("randread-4k-qd32", "iops", "QD32 4K random read IOPS"),
              ("read-128k", "mbps", "128K sequential read MB/s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (test, key, title) in zip(axes, panels):
        sel = [r for r in rows if r["test"] == test]
        ax.bar([f"{'qemu ' if r['vmm'] == 'qemu' else ''}{r['path']}/{r['irq']}" for r in sel], [r[key] for r in sel],
               color=["tab:blue" if r["vmm"] == "exitless" else "tab:gray" for r in sel])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        plt.setp(ax.get_xticklabels(), rotation=60, ha="right")
    from matplotlib.patches import Patch
    axes[0].legend(handles=[Patch(color="tab:blue", label="exitless"), Patch(color="tab:gray", label="QEMU")],
                   fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
