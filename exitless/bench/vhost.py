"""``exitless bench vhost``: QEMU as the frontend of vhost-user-blk back-ends, beside QEMU's own virtio-blk.

Rows, with the same keys as ``exitless bench blk``:

* ``vmm="qemu+exitless"``: ``exitless serve blk`` as the back-end (path = its I/O
  path: kick, poll, adaptive);
* ``vmm="qemu+qsd"``: qemu-storage-daemon's ``--export type=vhost-user-blk`` on
  an iothread, with polling (path ``iothread-poll``: ``poll-max-ns=32768``,
  QEMU's default for an iothread) and without (``iothread``: ``poll-max-ns=0``);
* ``vmm="qemu"``: QEMU's built-in virtio-blk (``ioeventfd`` on the main loop,
  ``iothread-poll``).

The client is the same guest kit binary driving the same image through
``vhost-user-blk-pci`` or ``virtio-blk-pci`` -- to the guest both are a modern
virtio-blk PCI function -- and every QEMU here runs with the same machine,
accelerator (KVM when /dev/kvm works: the guest kit runs on it) and memory (a
shared memfd, which vhost-user needs).  Every back-end uses the same
page-cache mode: ``writeback`` (buffered I/O: exitless's default,
``cache.direct=off`` for qsd, ``cache=writeback`` for QEMU) or ``none``
(O_DIRECT everywhere).  QEMU's and qsd's block layers use ``aio=threads``.

Accounting (:class:`exitless.bench.qemu.QemuSetup`): latency and IOPS are
measured by the guest (TSC); exits and host CPU per I/O are differential (a run
of ``n`` minus a run of ``n/10``; ``n`` raised so that the run lasts at least
``min_seconds``).  Host CPU is QEMU's process CPU minus its vCPU threads, plus
all of the back-end process's CPU (read from the processes' CPU-time clocks).
Exits come from QMP ``query-stats`` and exist only under KVM.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from . import qemu as Q
from .common import BenchError, Progress, Report, no_progress, ratio_notes
from .options import CACHES, VHOST_PATHS as IO_PATHS
from .workload import (COLUMNS, FILL_APP, SPREAD_COLUMNS, make_image, run_rounds, select_tests,
                       target_ratios)

#: How the guest waits for completions under each exitless back-end path (poll: the guest polls the used ring).
IRQ_BY_PATH = {"kick": ("msix",), "poll": ("msix", "poll"), "adaptive": ("msix", "poll")}
BUILTIN = (("ioeventfd", False), ("iothread-poll", True))
#: qemu-storage-daemon's iothread: (path label, poll-max-ns).  32768 ns is QEMU's default for an iothread.
QSD = (("iothread-poll", 32768), ("iothread", 0))
QSD_BINARY = "qemu-storage-daemon"
MEM_MIB = 128


class BackendProcess:
    """A vhost-user-blk back-end in a child process, listening on ``sock`` (its CPU accounted separately)."""

    def __init__(self, cmd: list[str], sock: str, log_path: str, what: str):
        self.sock, self.log_path, self.what = sock, log_path, what
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"{what} did not start:\n{self.log()}")
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


def serve_process(image: Path, io: str, directory: str, cache: str, *, confine: bool = True) -> BackendProcess:
    """``exitless serve blk`` on ``image`` with I/O path ``io`` (under its seccomp filter unless not ``confine``).
    It takes no image lock (``lock=off``): it stays up while the other rows, one at a time, use the same image."""
    sock = os.path.join(directory, f"exitless-{io}.sock")
    disk = f"{image},direct,lock=off" if cache == "none" else f"{image},lock=off"
    return BackendProcess([sys.executable, "-m", "exitless.cli", "serve", "blk", "--socket", sock, "--disk", disk,
                           "--io", io] + ([] if confine else ["--no-confine"]), sock, os.path.join(directory, f"exitless-{io}.log"), "exitless serve blk")


def qsd_process(image: Path, poll_max_ns: int, directory: str, cache: str) -> BackendProcess:
    """qemu-storage-daemon exporting ``image`` (raw, ``aio=threads``) as vhost-user-blk on an iothread
    with ``poll-max-ns`` (0: no polling), one queue, writable.  It takes no image lock
    (``locking=off``): it stays up while the other rows, one at a time, use the same image."""
    sock = os.path.join(directory, f"qsd-{poll_max_ns}.sock")
    direct = "on" if cache == "none" else "off"
    cmd = [QSD_BINARY,
           "--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct={direct},aio=threads,"
                           "locking=off",
           "--blockdev", "driver=raw,node-name=disk0,file=file0",
           "--object", f"iothread,id=io0,poll-max-ns={poll_max_ns}",
           "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},"
                       "writable=on,num-queues=1,iothread=io0"]
    return BackendProcess(cmd, sock, os.path.join(directory, f"qsd-{poll_max_ns}.log"), QSD_BINARY)


def vhost_device(sock: str) -> list[str]:
    return ["-chardev", f"socket,id=c0,path={sock}",
            "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1,disable-legacy=on"]


@contextmanager
def setups(image: Path, modes=IO_PATHS, *, with_qsd: bool = True, with_builtin: bool = True, accel: str = "auto",
           cache: str = "writeback", min_seconds: float = 0.5, timeout: float = 300,
           fill: bool = False) -> Iterator[list[Q.QemuSetup]]:
    """The rows' set-ups, their back-end processes running until the block ends.

    ``fill``: first write the whole image through the first back-end (so that reads hit
    allocated blocks); leave it False when the image is filled already.
    """
    if cache not in CACHES:
        raise BenchError(f"cache {cache!r}: writeback or none")
    if not Q.available():
        raise BenchError(f"{Q.QEMU} is not installed")
    if with_qsd and shutil.which(QSD_BINARY) is None:
        raise BenchError(f"{QSD_BINARY} is not installed (apt-get install qemu-system-x86 ... or pass --no-qsd)")
    kw = dict(accel=accel, shared_memory=True, min_seconds=min_seconds, timeout=timeout, mem_mib=MEM_MIB,
              extra={"cache": cache})
    with ExitStack() as stack:
        tmp = tempfile.mkdtemp(prefix="exitless-bench-vhost-")
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)

        def start(backend: BackendProcess) -> BackendProcess:
            stack.callback(backend.stop)
            return backend

        out: list[Q.QemuSetup] = []
        for io in modes:
            be = start(serve_process(image, io, tmp, cache))
            out += [Q.QemuSetup("qemu+exitless", io, irq, vhost_device(be.sock), backend=be, **kw)
                    for irq in IRQ_BY_PATH[io]]
        if with_qsd:
            for label, poll_max_ns in QSD:
                be = start(qsd_process(image, poll_max_ns, tmp, cache))
                out += [Q.QemuSetup("qemu+qsd", label, irq, vhost_device(be.sock), backend=be, **kw)
                        for irq in ("msix", "poll")]
        if with_builtin:
            for label, iothread in BUILTIN:
                out += [Q.QemuSetup("qemu", label, irq, Q.builtin_device(image, iothread, cache), **kw)
                        for irq in ("msix", "poll")]
        if fill and out:
            out[0].run(f"{FILL_APP} irq=msix")
        yield out


def run(tests=None, modes=IO_PATHS, *, with_builtin: bool = True, with_qsd: bool = True, scale: float = 1.0,
        accel: str = "auto", timeout: float = 600, image: Path | None = None, min_seconds: float = 0.5,
        cache: str = "writeback", rounds: int = 3, progress: Progress = no_progress) -> list[dict]:
    """The rows (medians of ``rounds`` interleaved rounds).  ``image`` (a bench blk image, already
    filled) is used if given, else one is made and filled here."""
    tests = select_tests(tests)
    own_image = image is None
    image = make_image() if own_image else image
    try:
        with setups(image, modes, with_qsd=with_qsd, with_builtin=with_builtin, accel=accel, cache=cache,
                    min_seconds=min_seconds, timeout=timeout, fill=own_image) as rows:
            return run_rounds(tests, rows, rounds=rounds, scale=scale, progress=progress)
    finally:
        if own_image:
            image.unlink(missing_ok=True)


# --------------------------------------------------------------------------- command line


def main(args) -> int:
    report = Report(args.json)
    with report.progress() as progress:
        rows = run(args.tests, args.io, with_builtin=not args.no_builtin, with_qsd=not args.no_qsd, scale=args.scale,
                   accel=args.accel, min_seconds=args.min_seconds, cache=args.cache, rounds=args.rounds,
                   progress=progress)
    report.table(f"virtio-blk through QEMU ({rows[0].get('accel') if rows else '?'}, cache={args.cache}): "
                 "vhost-user back-ends (exitless, qemu-storage-daemon) and QEMU's own", rows, COLUMNS,
                 spread=SPREAD_COLUMNS)
    report.ties_note(args.rounds, rows)
    for line in ratio_notes(target_ratios(rows)):
        report.note(line)
    report.json(rows)
    return 1 if any(r.get("errors") for r in rows) else 0
