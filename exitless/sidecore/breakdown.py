"""Per-request cost breakdown of the polled virtio data plane (no profiler: monotonic_ns timers).

Off by default.  With ``EXITLESS_BREAKDOWN`` set in the environment (to ``1``,
or to a file path where the process writes its figures as JSON when it
exits -- how ``exitless serve blk`` in a child process reports), the sidecore
loop and :meth:`VirtioDevice.handle_queue` take a second, timed code path and
add the nanoseconds spent in each phase to :data:`ACTIVE`:

``detection``      the sidecore loop around the work: polling the doorbell or
                   avail.idx, building the watch list, the call into the
                   GIL-free spin and back (not the time spent spinning idle)
``ring_read``      avail.idx and the ring entry (the head index)
``chain_walk``     walking and validating the descriptor chain
``request_parse``  the device's own request handling (for virtio-blk: header,
                   range checks, status byte), host I/O excluded
``host_io``        the host system calls that move the data (preadv/pwritev)
``used_write``     the used element and used.idx
``interrupt``      the interrupt decision (used_event / NO_INTERRUPT) and, if
                   taken, raising the interrupt

These are wall-clock intervals: on a loaded machine they include time the
thread was preempted (``detection`` most, as it spans a return from the spin
and the GIL).  ``busy_cpu_ns_per_request`` is robust to that: the sidecore
thread's own CPU time (``CLOCK_THREAD_CPUTIME_ID``), minus its CPU time inside
the idle spin, per request -- everything the engine spends on a request,
timers included.

On the C fast path (:mod:`exitless.devices.virtio._vring`) the phases
inside a batch are timed in C the same way (``clock_gettime``).  Timers cost
~30-60 ns each in Python, so the timed path is slower than the untimed one;
the figures say where the time goes, not what an untimed run costs -- compare
``host CPU µs/IO`` of ``exitless bench blk`` for that.

``python3 -m exitless.sidecore.breakdown`` runs the guest kit's randread
workloads under the VMM's polled virtio-blk and under ``exitless serve blk``
(QEMU frontend) and prints the per-request table.
"""
from __future__ import annotations

import atexit
import json
import os

__all__ = ["ACTIVE", "Breakdown", "PHASES"]

PHASES = ("detection", "ring_read", "chain_walk", "request_parse", "host_io", "used_write", "interrupt")


class Breakdown:
    """Nanoseconds per phase, requests completed and handle_queue batches; not thread-safe
    (one sidecore thread adds to it; a lost update under a race only blurs a figure)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.ns = dict.fromkeys(PHASES, 0)
        self.requests = 0
        self.batches = 0
        self.fast_requests = 0   # completed by the C fast path
        self.thread_cpu_ns = 0   # CPU time of the sidecore loops' threads (CLOCK_THREAD_CPUTIME_ID)...
        self.idle_cpu_ns = 0     # ...of which spinning idle in the GIL-free wait (or sleeping: ~0)

    def add(self, phase: str, ns: int) -> None:
        self.ns[phase] += ns

    def report(self) -> dict:
        """``{"requests", "batches", "fast_requests", "ns_per_request": {phase: ns}, "total_ns_per_request"}``."""
        n = max(self.requests, 1)
        per = {p: self.ns[p] / n for p in PHASES}
        return {"requests": self.requests, "batches": self.batches, "fast_requests": self.fast_requests,
                "requests_per_batch": self.requests / max(self.batches, 1),
                "ns_per_request": per, "total_ns_per_request": sum(per.values()),
                "busy_cpu_ns_per_request": (self.thread_cpu_ns - self.idle_cpu_ns) / n}


def _from_env() -> Breakdown | None:
    where = os.environ.get("EXITLESS_BREAKDOWN")
    if not where:
        return None
    bd = Breakdown()
    if where not in ("1", "yes", "on"):
        def dump() -> None:
            with open(where, "w") as f:
                json.dump(bd.report(), f)
        atexit.register(dump)
    return bd


#: The process's breakdown, or None when timing is off (the normal, untimed code paths run).
ACTIVE: Breakdown | None = _from_env()


# ---------------------------------------------------------------------------
# the command: python3 -m exitless.sidecore.breakdown
# ---------------------------------------------------------------------------
IMAGE_BYTES = 64 << 20
WORKLOADS = {"randread-4k-qd1": "blk rw=randread bs=4096 qd=1 n={n} seed=5 irq=poll",
             "randread-4k-qd32": "blk rw=randread bs=4096 qd=32 n={n} seed=5 irq=poll"}


def _guest(image, app: str, path: str) -> dict:
    """The guest kit's ``app`` against the VMM's own virtio-blk on ``path``; its result line."""
    from ..bench.common import guest_result
    from ..devices.virtio.blk import VirtioBlk
    from ..devices.virtio.pci import VirtioPci
    from ..guestkit import guestkit_cmdline, guestkit_path
    from ..vm import Machine, VmConfig

    console = bytearray()
    with Machine(VmConfig(mem_mib=128, console=console.extend)) as m:
        VirtioPci(m, VirtioBlk(image), path)
        m.boot_pvh(guestkit_path(), guestkit_cmdline(app))
        ex = m.run(timeout=300)
    if ex.kind != "debug-exit" or ex.status != 0:
        raise RuntimeError(f"{app}: {ex.kind} {ex.status}\n{console.decode(errors='replace')[-600:]}")
    return guest_result(bytes(console), "blk")


def _vmm_run(image, app: str) -> dict:
    """The VMM's own virtio-blk on the ``poll`` path (sidecore thread), the guest polling for completions."""
    ACTIVE.reset()
    res = _guest(image, app, "poll")
    return {"iops": res["iops"], "p50_us": res["p50_ns"] / 1000, **ACTIVE.report()}


def _serve_run(image, app: str, tmp: str) -> dict:
    """``exitless serve blk --io poll`` in a child process behind QEMU's vhost-user-blk-pci."""
    from ..bench import qemu, vhost
    from ..bench.common import BenchError, guest_result
    from ..guestkit import guestkit_path

    out = os.path.join(tmp, "serve-breakdown.json")
    os.environ["EXITLESS_BREAKDOWN"] = out
    try:
        # unconfined: the breakdown file is written at exit, which the seccomp filter forbids
        be = vhost.serve_process(image, "poll", tmp, "writeback", confine=False)
    finally:
        del os.environ["EXITLESS_BREAKDOWN"]
    try:
        r = qemu.run_guestkit(guestkit_path(), app, device_args=vhost.vhost_device(be.sock), shared_memory=True,
                              extra_cpu=be.cpu)
    finally:
        be.stop()
    if r.exit_status != 0:
        raise BenchError(f"qemu ({r.accel}) + exitless serve blk: {app}: no result\n"
                         f"{r.console.decode(errors='replace')[-600:]}")
    res = guest_result(r.console, "blk")
    with open(out) as f:
        rep = json.load(f)
    return {"iops": res["iops"], "p50_us": res["p50_ns"] / 1000, **rep}


def _vring_c() -> bool:
    from ..devices.virtio import queue

    return queue.C_VRING


def build_parser():
    """This tool's options (every number through :mod:`exitless.argtypes`)."""
    import argparse

    from ..argtypes import output_path, positive_int

    ap = argparse.ArgumentParser(prog="python3 -m exitless.sidecore.breakdown",
                                 description="per-request cost of the polled virtio-blk data plane, by phase "
                                             "(EXITLESS_VRING=python: without the C fast path)")
    ap.add_argument("--tests", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--where", nargs="+", default=["vmm", "serve"], choices=["vmm", "serve"],
                    help="vmm: the VMM's virtio-blk (poll path); serve: exitless serve blk --io poll behind QEMU")
    ap.add_argument("-n", type=positive_int, default=20000, help="requests per workload")
    ap.add_argument("--json", type=output_path, help="write the rows here")
    return ap


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from rich.console import Console
    from rich.table import Table

    ap = build_parser()
    args = ap.parse_args(argv)
    global ACTIVE
    if ACTIVE is None:   # this process's own sidecore threads (the vmm rows) report here
        ACTIVE = Breakdown()
    from pathlib import Path

    fd, name = tempfile.mkstemp(prefix="exitless-breakdown-", suffix=".img", dir="/var/tmp")
    os.ftruncate(fd, IMAGE_BYTES)
    os.close(fd)
    image = Path(name)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="exitless-breakdown-") as tmp:
            _guest(image, "blk rw=fill bs=131072 qd=4 seed=5", "ioeventfd")   # reads hit written blocks
            ACTIVE.reset()
            for test in args.tests:
                app = WORKLOADS[test].format(n=args.n)
                for where in args.where:
                    r = _vmm_run(image, app) if where == "vmm" else _serve_run(image, app, tmp)
                    rows.append({"where": where, "test": test, **r, "loadavg_1min": os.getloadavg()[0],
                                 "vring": "c" if _vring_c() else "python"})
    finally:
        image.unlink(missing_ok=True)
    table = Table(title="polled virtio-blk: ns per request, by phase (timed run; guest polls for completions)")
    for h in ("where", "test", "IOPS", "p50 µs", "req/batch", "fast %", *PHASES, "total", "busy CPU"):
        table.add_column(h, justify="right")
    for r in rows:
        per = r["ns_per_request"]
        table.add_row(r["where"], r["test"], f"{r['iops']:.0f}", f"{r['p50_us']:.2f}",
                      f"{r['requests_per_batch']:.1f}", f"{100 * r['fast_requests'] / max(r['requests'], 1):.0f}",
                      *(f"{per[p]:.0f}" for p in PHASES), f"{r['total_ns_per_request']:.0f}",
                      f"{r['busy_cpu_ns_per_request']:.0f}")
    Console(width=200).print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":  # run main() in the module the engine imports, not in a __main__ copy of it
    from exitless.sidecore.breakdown import main as _main

    raise SystemExit(_main())
