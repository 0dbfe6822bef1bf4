"""The block workloads that ``bench blk`` and ``bench vhost`` run, and how their rows are measured.

One *cell* is a (test, set-up) pair: the test says what the guest kit's
virtio-blk driver does (``rw``, block size in bytes, queue depth, operation
count); the set-up says who serves the I/O (exitless on one I/O path, QEMU's own
virtio-blk, QEMU in front of a vhost-user back-end) and how the guest waits for
completions (``msix`` interrupt, or ``poll`` on the used ring).  Every cell is
measured in interleaved rounds (:func:`exitless.bench.common.interleave`) and
reported as the median with its spread; within each test the best p50, IOPS and
host CPU per I/O are marked, and the rows within their spread.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from ..guestkit import guestkit_cmdline, guestkit_path
from ..vm import Machine, VmConfig
from .common import BenchError, Progress, aggregate, differential_per_op, guest_result, interleave, mark_best, no_progress, \
    ratio_over_rounds

IMAGE_BYTES = 64 << 20
#: Writes the whole image once, so that reads hit allocated blocks in every VMM.
FILL_APP = "blk rw=fill bs=131072 qd=4 seed=5"
#: Per-I/O figures of a row: medians over the rounds, each with its per-round values and spread.
METRICS = ("iops", "p50_us", "p99_us", "mbps", "exits_per_io", "cpu_us_per_io")
#: (metric, higher is better) marked best / within the best's spread, per test.
RANKED = (("p50_us", False), ("iops", True), ("cpu_us_per_io", False))


@dataclass(frozen=True)
class Test:
    name: str
    rw: str
    bs: int       # bytes per request
    qd: int       # requests in flight
    n: int        # requests at scale 1


TESTS = (
    Test("randread-4k-qd1", "randread", 4096, 1, 4000),
    Test("randread-4k-qd32", "randread", 4096, 32, 20000),
    Test("read-128k", "read", 131072, 4, 1000),
    Test("randwrite-4k-qd1", "randwrite", 4096, 1, 4000),
    Test("randwrite-4k-qd32", "randwrite", 4096, 32, 20000),
    Test("write-128k", "write", 131072, 4, 1000),
)


def select_tests(names: Sequence[str | Test] | None) -> list[Test]:
    """The tests named (all of them for None or empty); BenchError names the unknown ones."""
    if not names:
        return list(TESTS)
    known = {t.name: t for t in TESTS}
    missing = [n for n in names if isinstance(n, str) and n not in known]
    if missing:
        raise BenchError(f"unknown tests {missing}; known: {', '.join(known)}")
    return [known[n] if isinstance(n, str) else n for n in names]


def app(test: Test, n: int, irq: str) -> str:
    """The guest kit's command line for ``n`` requests of ``test``, completions by ``irq`` (msix or poll)."""
    return f"blk rw={test.rw} bs={test.bs} qd={test.qd} n={n} seed=5 irq={irq}"


def make_image(directory: str | None = None) -> Path:
    """A sparse IMAGE_BYTES file in ``directory`` (default /var/tmp: a real file system, not tmpfs)."""
    fd, name = tempfile.mkstemp(prefix="exitless-bench-", suffix=".img", dir=directory or "/var/tmp")
    os.ftruncate(fd, IMAGE_BYTES)
    os.close(fd)
    return Path(name)


def exitless_guest_run(attach: Callable[[Machine], object], app_name: str, append: str, label: str,
                       timeout: float) -> dict:
    """One guest-kit run in exitless's own VMM: ``attach(machine)`` adds the device, the guest kit runs
    ``append`` (its ``app_name`` app) with the bench's marks around its loop.

    Returns ``{"res": the app's JSON result, "exits": KVM exits in the marked loop, "cpu": VMM CPU
    seconds in it}``; raises :class:`BenchError` (with the console's tail) unless the guest passed and
    marked its loop.  ``timeout``: seconds for the whole run.
    """
    console = bytearray()
    with Machine(VmConfig(mem_mib=128, console=console.extend)) as m:
        attach(m)
        m.boot_pvh(guestkit_path(), guestkit_cmdline(append))
        exit = m.run(timeout=timeout)
        window = m.bench_marker.window()
    if exit.kind != "debug-exit" or exit.status != 0 or window is None:
        raise BenchError(f"{label}: {append}: {exit.kind} {exit.status} {exit.message}\n"
                         f"{console.decode(errors='replace')[-600:]}")
    return {"res": guest_result(bytes(console), app_name), "exits": window["kvm"]["exits"], "cpu": window["vmm_cpu"]}


def per_io_row(vmm: str, path: str, test: Test, irq: str, full: dict, base: dict | None = None) -> dict:
    """One round's row.  ``full``/``base``: {"res": the guest's result, "exits": KVM exits or None,
    "cpu": host CPU seconds}.  Exits and CPU per I/O are over the guest's marked window (``base``
    None: exitless) or ``full`` minus ``base`` (a shorter run: QEMU, whose boot cannot be marked)."""
    res = full["res"]
    if base is None:
        base = {"res": {"ops": 0}, "exits": 0, "cpu": 0.0}
    dops = res["ops"] - base["res"]["ops"]
    if dops <= 0:
        raise BenchError(f"{vmm}/{path} {test.name}: the base run did as many requests as the full one")
    exits, exits_note = differential_per_op(full["exits"], base["exits"], dops)
    dcpu = full["cpu"] - base["cpu"]
    row = {
        "vmm": vmm, "path": path, "test": test.name, "irq": irq,
        "iops": res["iops"], "p50_us": res["p50_ns"] / 1000, "p99_us": res["p99_ns"] / 1000,
        "mbps": res["kib_s"] * 1024 / 1e6, "exits_per_io": exits,
        # None: the short run cost more than the long one (noise beat the signal)
        "cpu_us_per_io": dcpu * 1e6 / dops if dcpu >= 0 else None,
        "errors": res["errors"] + res["verify_errors"], "ops": res["ops"],
    }
    if exits_note:
        row["exits_note"] = exits_note
    return row


class Setup(Protocol):
    """One comparison row without its test: who serves the I/O and how the guest waits."""
    vmm: str
    path: str
    irq: str

    def measure(self, test: Test, n: int) -> dict:
        """One round of ``test`` (about ``n`` requests): a :func:`per_io_row` dict."""


def label(setup: Setup, test: Test) -> str:
    return f"{setup.vmm}/{setup.path} irq={setup.irq} {test.name}"


def run_rounds(tests: Sequence[Test], setups: Sequence[Setup], *, rounds: int, scale: float,
               progress: Progress = no_progress) -> list[dict]:
    """Every (test, set-up) cell in ``rounds`` interleaved rounds: the aggregated rows, test by test,
    with ``vs_best`` marks per test (see :data:`RANKED`)."""
    cells = [(t, s) for t in tests for s in setups]
    samples = interleave(cells, rounds, lambda c, _r: c[1].measure(c[0], max(10, int(c[0].n * scale))), progress,
                         label=lambda c: label(c[1], c[0]))
    rows = [aggregate(s, METRICS) for s in samples]
    for metric, higher in RANKED:
        mark_best(rows, metric, higher_is_better=higher, group=lambda r: r["test"])
    return rows


#: The human table's columns for per-I/O rows, and the ones shown with their spread.
COLUMNS = [("vmm", "vmm"), ("path", "path"), ("irq", "guest waits by"), ("test", "test"), ("iops", "IOPS"),
           ("p50_us", "p50 µs"), ("p99_us", "p99 µs"), ("mbps", "MB/s"), ("exits_per_io", "exits/IO"),
           ("cpu_us_per_io", "host CPU µs/IO"), ("errors", "errors"), ("other_load_pct", "other load %")]
SPREAD_COLUMNS = ("iops", "p50_us", "cpu_us_per_io", "other_load_pct")

#: Issue 8's target ratios: (name, test, metric, higher is better, numerator's vmm, denominator's vmm).
#: Each compares the best row of one VMM with the best row of another (best by median).
TARGETS = (
    ("qd1_p50_exitless_over_qemu", "randread-4k-qd1", "p50_us", False, "exitless", "qemu"),
    ("qd32_iops_exitless_over_qemu", "randread-4k-qd32", "iops", True, "exitless", "qemu"),
    ("qd1_p50_serve_over_qsd", "randread-4k-qd1", "p50_us", False, "qemu+exitless", "qemu+qsd"),
    ("qd32_iops_serve_over_qsd", "randread-4k-qd32", "iops", True, "qemu+exitless", "qemu+qsd"),
    ("qd32_iops_serve_over_qemu", "randread-4k-qd32", "iops", True, "qemu+exitless", "qemu"),
)


def target_ratios(rows: list[dict]) -> dict[str, dict]:
    """The :data:`TARGETS` this run has rows for: {"median", "min", "max", "per_round"} taken round
    by round between the two best rows (measured side by side), and ``rows`` naming them."""
    def best(test, metric, higher, vmm):
        cands = [r for r in rows if r["test"] == test and r["vmm"] == vmm and r.get(metric) is not None]
        return (max if higher else min)(cands, key=lambda r: r[metric]) if cands else None

    out = {}
    for name, test, metric, higher, num_vmm, den_vmm in TARGETS:
        num, den = best(test, metric, higher, num_vmm), best(test, metric, higher, den_vmm)
        ratio = ratio_over_rounds(num, den, metric)
        if ratio is not None:
            ratio["rows"] = " vs ".join(f"{r['vmm']}/{r['path']} irq={r['irq']}" for r in (num, den))
            out[name] = ratio
    return out
