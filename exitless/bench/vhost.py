"""``exitless bench vhost``: QEMU as the frontend, exitless as its vhost-user-blk back-end.

Rows ``vmm="qemu+exitless"`` (path = the back-end's I/O path: kick, poll,
adaptive) beside ``vmm="qemu"`` rows for QEMU's built-in virtio-blk
(``ioeventfd`` on the main loop, ``iothread-poll``), with the same keys as
``exitless bench blk``.  The client is the same guest kit binary driving the
same image through ``vhost-user-blk-pci`` or ``virtio-blk-pci`` -- to the
guest both are a modern virtio-blk PCI function -- and every QEMU here runs
with the same machine, accelerator and memory (a shared memfd, which
vhost-user needs).

Accounting, as in ``bench blk``: latency and IOPS are measured by the guest
(TSC); exits and host CPU per I/O are differential (a run of ``n`` minus a
run of ``n/10``; ``n`` is raised so that the difference lasts at least
``min_seconds``).  CPU times are read from the processes' CPU-time clocks (ns).  Host CPU is QEMU's process CPU minus its vCPU threads,
plus -- for qemu+exitless -- all of the back-end process's CPU.  Exits come
from QMP ``query-stats`` and exist only under KVM; under TCG (the default:
QEMU's KVM cannot run Linux guests on a software-nested host like this one)
they are ``None``, and the guest's own instructions are emulated, which
slows the client's driver and QEMU's MMIO/interrupt paths alike.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..guestkit import guestkit_path
from . import qemu as Q
from .common import BenchError, guest_result

IO_PATHS = ("kick", "poll", "adaptive")
#: How the guest waits for completions under each back-end path (poll: the guest polls the used ring).
IRQ_BY_PATH = {"kick": ("msix",), "poll": ("msix", "poll"), "adaptive": ("msix", "poll")}
BUILTIN = (("ioeventfd", False), ("iothread-poll", True))
MEM_MIB = 128


def _tests(names):
    from .blk import TESTS

    if not names:
        return list(TESTS)
    if all(isinstance(t, str) for t in names):
        known = {t.name: t for t in TESTS}
        missing = [n for n in names if n not in known]
        if missing:
            raise BenchError(f"unknown tests {missing}; known: {', '.join(known)}")
        return [known[n] for n in names]
    return list(names)


def _app(test, n: int, irq: str) -> str:
    return f"blk rw={test.rw} bs={test.bs} qd={test.qd} n={n} seed=5 irq={irq}"


class ServeProcess:
    """``exitless serve blk`` in a child process (its own GIL, its CPU accounted separately)."""

    def __init__(self, image: Path, io: str, directory: str, direct: bool = False):
        self.sock = os.path.join(directory, f"vhost-{io}.sock")
        self.log_path = os.path.join(directory, f"serve-{io}.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "exitless.cli", "serve", "blk", "--socket", self.sock,
                                          "--disk", f"{image},direct" if direct else str(image), "--io", io],
                                         stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"exitless serve did not start:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def cpu(self) -> float:
        return Q.process_cpu(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def qemu_run(app: str, device: list[str], *, accel: str, backend: ServeProcess | None = None,
             timeout: float = 300) -> dict:
    """Boot the guest kit in QEMU (shared memfd RAM) with ``device`` args, as bench blk does."""
    r = Q.run_guestkit(guestkit_path(), app, device_args=device, shared_memory=True, accel=accel, mem_mib=MEM_MIB,
                       timeout=timeout, extra_cpu=backend.cpu if backend else None)
    if r.exit_status != 0:
        raise BenchError(f"qemu ({accel}): {app}: no result\n{r.console.decode(errors='replace')[-600:]}\n"
                         f"{r.stderr[-600:]}" + (f"\nback-end log:\n{backend.log()[-800:]}" if backend else ""))
    return {"res": guest_result(r.console, "blk"), "exits": r.exits, "cpu": r.vmm_cpu_s}


def vhost_device(sock: str) -> list[str]:
    return ["-chardev", f"socket,id=c0,path={sock}",
            "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1,disable-legacy=on"]


def _row(vmm: str, path: str, test, irq: str, accel: str, cache: str, full: dict, base: dict) -> dict:
    res = full["res"]
    dops = res["ops"] - base["res"]["ops"]
    exits = None if full["exits"] is None or base["exits"] is None else (full["exits"] - base["exits"]) / dops
    dcpu = full["cpu"] - base["cpu"]
    return {
        "vmm": vmm, "path": path, "test": test.name, "irq": irq, "accel": accel, "cache": cache,
        "iops": res["iops"], "p50_us": res["p50_ns"] / 1000, "p99_us": res["p99_ns"] / 1000,
        "mbps": res["kib_s"] * 1024 / 1e6, "exits_per_io": exits,
        # None: the short run cost more than the long one (noise beat the signal; see min_seconds)
        "cpu_us_per_io": dcpu * 1e6 / dops if dcpu >= 0 else None,
        "errors": res["errors"] + res["verify_errors"], "ops": res["ops"],
    }


def _measure(test, n: int, irq: str, device: list[str], *, accel: str, backend, timeout: float,
             min_seconds: float, repeat: int) -> tuple[dict, dict]:
    """(full, base) runs; ``n`` is raised so that the full run lasts about ``min_seconds`` or more;
    with ``repeat`` > 1 the full run is repeated and the one with the median IOPS kept."""
    base = qemu_run(_app(test, max(1, n // 10), irq), device, accel=accel, backend=backend, timeout=timeout)
    iops = base["res"]["iops"] or 1
    n = max(n, min(int(iops * min_seconds), 50 * n))
    fulls = [qemu_run(_app(test, n, irq), device, accel=accel, backend=backend, timeout=timeout)
             for _ in range(max(1, repeat))]
    fulls.sort(key=lambda r: r["res"]["iops"])
    return fulls[len(fulls) // 2], base


def run(tests=None, modes=IO_PATHS, *, with_builtin: bool = True, scale: float = 1.0, accel: str = "tcg",
        timeout: float = 600, log=print, image: Path | None = None, min_seconds: float = 0.5,
        cache: str = "writeback", repeat: int = 1) -> list[dict]:
    """The rows.  ``image`` (a bench blk image, already filled) is used if given, else one is made here.

    ``cache``: ``writeback`` -- the back-end does buffered I/O and QEMU's own disk uses
    ``cache=writeback``; ``none`` -- O_DIRECT on both sides (``--disk FILE,direct``, ``cache=none``).
    Either way both sides see the same kind of storage.
    """
    if cache not in ("writeback", "none"):
        raise ValueError(f"cache {cache!r}: writeback or none")
    if not Q.available():
        raise BenchError(f"{Q.QEMU} is not installed")
    if accel == "auto":
        accel = "kvm" if Q.kvm_works() else "tcg"
    tests = _tests(tests)
    own_image = image is None
    tmp = tempfile.mkdtemp(prefix="exitless-bench-vhost-")
    rows: list[dict] = []
    backends: dict[str, ServeProcess] = {}
    kw = dict(accel=accel, timeout=timeout, min_seconds=min_seconds, repeat=repeat)
    try:
        if own_image:
            from .blk import make_image

            image = make_image()
        for io in modes:
            backends[io] = ServeProcess(image, io, tmp, direct=cache == "none")
        if own_image:   # write the whole image once (through the back-end), so reads hit allocated blocks
            be = backends.get("kick") or next(iter(backends.values()))
            qemu_run("blk rw=fill bs=131072 qd=4 seed=5 irq=msix", vhost_device(be.sock), accel=accel, backend=be,
                     timeout=timeout)
        for test in tests:
            n = max(10, int(test.n * scale))
            for io in modes:
                be = backends[io]
                for irq in IRQ_BY_PATH[io]:
                    log(f"qemu+exitless/{io} irq={irq} {test.name} ({accel}) ...")
                    full, base = _measure(test, n, irq, vhost_device(be.sock), backend=be, **kw)
                    rows.append(_row("qemu+exitless", io, test, irq, accel, cache, full, base))
            if with_builtin:
                for label, iothread in BUILTIN:
                    for irq in ("msix", "poll"):
                        log(f"qemu/{label} irq={irq} {test.name} ({accel}) ...")
                        full, base = _measure(test, n, irq, Q.builtin_device(image, iothread, cache), backend=None,
                                              **kw)
                        rows.append(_row("qemu", label, test, irq, accel, cache, full, base))
    finally:
        for be in backends.values():
            be.stop()
        if own_image and image is not None:
            image.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return rows
