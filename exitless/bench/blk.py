"""``exitless bench blk``: one block workload under every exitless I/O path and under QEMU.

The client is the guest kit's virtio-blk driver — the same binary in exitless
and in QEMU — on the same image.  Latency and IOPS are measured in the guest
(TSC).  Exits and host CPU per I/O: in exitless, over exactly the guest's
measured loop (it marks start and end on port 0x511, where the VMM snapshots
KVM's counters); in QEMU, differential — a run with ``n`` operations minus a
run with ``n/10``, divided by the difference — so boot and PCI probing drop
out.  Host CPU excludes the vCPU threads (the guest's own running time).
Every row is measured in interleaved rounds (exitless, QEMU, exitless, QEMU, …)
and reported as the median with its spread (:mod:`exitless.bench.workload`).
"""
from __future__ import annotations

import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from ..devices.virtio.blk import VirtioBlk
from ..devices.virtio.pci import VirtioPci
from . import qemu, vhost
from .common import Progress, Report, no_progress, plot_panels, ratio_notes
from .options import BLK_PATHS as EXITLESS_PATHS
from .workload import (COLUMNS, FILL_APP, SPREAD_COLUMNS, TESTS, Test, app, exitless_guest_run, make_image, per_io_row,
                       run_rounds, select_tests, target_ratios)

# How the guest driver waits for completions: an interrupt (msix), or by polling the used ring
# (poll: like NVMe polled queues; with a polling device this is the fully exitless pairing).
IRQ_MODES_BY_PATH = {"trap": ("msix",), "ioeventfd": ("msix",), "shared": ("msix", "poll"),
                     "poll": ("msix", "poll"), "adaptive": ("msix", "poll")}
QEMU_BUILTIN = (("ioeventfd", False), ("iothread-poll", True))


def _exitless_run(image: Path, path: str, append: str, timeout: float) -> dict:
    return exitless_guest_run(lambda m: VirtioPci(m, VirtioBlk(image), path), "blk", append, f"exitless/{path}", timeout)


@dataclass(frozen=True)
class ExitlessSetup:
    """An exitless row: virtio-blk on I/O ``path``, the guest waiting by ``irq`` (a workload.Setup)."""
    path: str
    irq: str
    image: Path
    timeout: float
    vmm: str = "exitless"

    def measure(self, test: Test, n: int) -> dict:
        full = _exitless_run(self.image, self.path, app(test, n, self.irq), self.timeout)
        return per_io_row(self.vmm, self.path, test, self.irq, full)


def run(tests=TESTS, paths=EXITLESS_PATHS, *, with_qemu: bool = True, scale: float = 1.0, timeout: float = 600,
        with_vhost: bool = False, rounds: int = 3, progress: Progress = no_progress,
        notes=lambda text: None) -> list[dict]:
    """The rows (medians of ``rounds`` interleaved rounds).

    ``with_vhost``: add the rows of ``bench vhost`` (QEMU frontend with the exitless and
    qemu-storage-daemon vhost-user back-ends) to the same rounds, on the same image.
    ``notes(text)`` is told which rows are left out and why.
    """
    tests = select_tests(tests)
    image = make_image()
    try:
        # write the whole image once, so that reads hit allocated blocks in both VMMs
        _exitless_run(image, "ioeventfd", FILL_APP, timeout)
        setups: list = [ExitlessSetup(p, irq, image, timeout) for p in paths for irq in IRQ_MODES_BY_PATH[p]]
        with ExitStack() as stack:
            if (with_qemu or with_vhost) and not qemu.available():
                notes(f"{qemu.QEMU} is not installed: no QEMU rows")
            elif with_qemu:
                setups += [qemu.QemuSetup("qemu", label, irq, qemu.builtin_device(image, iothread), timeout=timeout)
                           for label, iothread in QEMU_BUILTIN for irq in ("msix", "poll")]
            if with_vhost and qemu.available():
                setups += stack.enter_context(vhost.setups(image, with_builtin=False, timeout=timeout,
                                                           with_qsd=_qsd_available(notes)))
            return run_rounds(tests, setups, rounds=rounds, scale=scale, progress=progress)
    finally:
        image.unlink(missing_ok=True)


def _qsd_available(notes) -> bool:
    if shutil.which(vhost.QSD_BINARY) is None:
        notes(f"{vhost.QSD_BINARY} is not installed: no qemu+qsd rows")
        return False
    return True


def plot(rows: list[dict], path: str) -> None:
    """The QD1 latency, QD32 IOPS and 128 KiB read bandwidth panels of ``rows`` as a PNG."""
    plot_panels(rows, path, [("randread-4k-qd1", "p50_us", "QD1 4K random read p50 (µs, lower is better)"),
                             ("randread-4k-qd32", "iops", "QD32 4K random read IOPS"),
                             ("read-128k", "mbps", "128K sequential read MB/s")],
                lambda r: f"{'' if r['vmm'] == 'exitless' else r['vmm'] + ' '}{r['path']}/{r['irq']}",
                {"exitless": "tab:blue", "qemu": "tab:gray", "qemu+exitless": "tab:orange", "qemu+qsd": "tab:olive"})


# --------------------------------------------------------------------------- command line


def main(args) -> int:
    report = Report(args.json)
    with report.progress() as progress:
        rows = run(args.tests, args.paths, with_qemu=not args.no_qemu, scale=args.scale, with_vhost=args.with_vhost,
                   rounds=args.rounds, progress=progress, notes=report.note)
    report.table("virtio-blk (one run, same image, same guest driver)", rows, COLUMNS, spread=SPREAD_COLUMNS)
    report.ties_note(args.rounds, rows)
    for line in ratio_notes(target_ratios(rows)):
        report.note(line)
    report.json(rows)
    if args.plot:
        plot(rows, args.plot)
    return 1 if any(r.get("errors") for r in rows) else 0
