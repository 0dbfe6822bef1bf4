"""``exitless bench soak``: a long mixed block workload with verification, VM restarts and frontend disconnects.

A benchmark, not a test: it runs for ``--minutes`` and reports what happened.  Each *cycle*:

* boots a fresh exitless VM (a VM restart every cycle) with virtio-blk on the next I/O path of
  :data:`~exitless.bench.options.BLK_PATHS` (rotating), and runs the guest kit's ``blk`` app three
  times on the same image with generation ``g`` (the cycle number) as the pattern seed: ``fill``
  (every sector written, then FLUSH), ``randwrite`` with ``flush_every`` (random writes and flushes,
  the same position-keyed pattern), ``randread verify=1`` (reads checked in the guest);
* then the host reads the image back: every sector the guest saw acknowledged (and flushed) must
  hold generation ``g``'s pattern (word ``i`` of the disk = ``i ^ g·φ64``, the guest kit's pattern),
  so a lost or stale acknowledged write counts in ``lost_acked_writes`` (goal 0);
* meanwhile an ``exitless serve blk`` process on its own image takes vhost-user frontends
  (:class:`~exitless.vhost_user.frontend.Frontend`) that run the handshake and hang up after a
  random number of messages, and then one full handshake that must still succeed;
* samples this VMM process's open fds (/proc/self/fd) and threads, and the back-end process's.

Each sample is one JSON row; the last row (``"summary": true``) carries the totals.
"""
from __future__ import annotations

import os
import random
import struct
import tempfile
import threading
import time
from pathlib import Path

from ..devices.virtio.blk import VirtioBlk
from ..devices.virtio.pci import VirtioPci
from ..guestkit import guestkit_cmdline, guestkit_path
from ..vm import Machine, VmConfig
from .common import BenchError, Report, guest_result
from .options import BLK_PATHS
from .vhost import serve_process

#: Image bytes used by the soak (small: the host re-reads it all after every cycle).
SOAK_BYTES = 4 << 20
SECTOR = 512
#: The guest kit's pattern multiplier (guestkit/src/blk.c ``GOLDEN``).
GOLDEN = 0x9E3779B97F4A7C15
COLUMNS = [("cycle", "cycle"), ("t_s", "t (s)"), ("path", "path"), ("ops", "ops"), ("flushes", "flushes"),
           ("verify_errors", "guest verify errors"), ("lost_acked_writes", "lost acked sectors"),
           ("disconnects", "frontend disconnects"), ("vmm_fds", "VMM fds"), ("vmm_threads", "VMM threads"),
           ("backend_fds", "serve fds"), ("backend_threads", "serve threads")]


def pattern(generation: int, offset: int, nbytes: int) -> bytes:
    """The guest kit blk pattern for seed ``generation`` over the disk bytes [offset, offset+nbytes)."""
    k = (generation * GOLDEN) & 0xFFFF_FFFF_FFFF_FFFF
    first = offset // 8
    return struct.pack(f"<{nbytes // 8}Q", *((first + i) ^ k for i in range(nbytes // 8)))


def lost_sectors(image: Path, generation: int) -> int:
    """Sectors of ``image`` (first SOAK_BYTES) that do not hold ``generation``'s pattern."""
    bad = 0
    chunk = 1 << 20
    with open(image, "rb") as f:
        for off in range(0, SOAK_BYTES, chunk):
            got, want = f.read(chunk), pattern(generation, off, chunk)
            if got != want:
                bad += sum(got[s:s + SECTOR] != want[s:s + SECTOR] for s in range(0, chunk, SECTOR))
    return bad


def _proc_counts(pid: int | str = "self") -> tuple[int | None, int | None]:
    """(open fds, threads) of a process, or (None, None) when it is gone."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None, None
    return fds, threads


def _guest(image: Path, path: str, app: str, timeout: float) -> dict:
    console = bytearray()
    with Machine(VmConfig(mem_mib=64, console=console.extend)) as m:
        VirtioPci(m, VirtioBlk(image), path)
        m.boot_pvh(guestkit_path(), guestkit_cmdline(app))
        exit = m.run(timeout=timeout)
    res = guest_result(bytes(console), "blk")
    if exit.kind != "debug-exit" or exit.status != 0:
        res.setdefault("errors", 1)
        res["exit"] = f"{exit.kind} {exit.status} {exit.message}"
    return res


class Disconnector(threading.Thread):
    """Frontends against ``sock`` that hang up after a random number of handshake messages, until stopped.

    ``disconnects`` counts the hang-ups, ``failures`` the full handshakes that failed afterwards.
    """

    def __init__(self, sock: str, rng: random.Random):
        super().__init__(daemon=True, name="soak-disconnector")
        self.sock, self.rng = sock, rng
        self.stop_event = threading.Event()
        self.disconnects = self.failures = 0
        self.error = ""

    def _session(self, steps: int) -> None:
        from ..vhost_user.frontend import Frontend

        with Frontend.connect(self.sock, timeout=10) as fe:
            calls = [fe.get_features, fe.get_protocol_features, fe.set_owner, fe.get_queue_num,
                     lambda: fe.get_config(0, 8)]
            for call in calls[:steps]:
                call()

    def run(self) -> None:
        while not self.stop_event.wait(self.rng.uniform(0.05, 0.5)):
            try:
                self._session(self.rng.randrange(0, 5))
                self.disconnects += 1
                self._session(5)   # the back-end still serves a whole handshake after the hang-up
            except Exception as e:  # noqa: BLE001 - reported as a failure of the back-end
                self.failures += 1
                self.error = f"{type(e).__name__}: {e}"

    def stop(self) -> None:
        self.stop_event.set()
        self.join(30)


def run(minutes: float, *, seed: int = 1, timeout: float = 300, report_row=lambda row: None) -> list[dict]:
    """Cycles until ``minutes`` have passed (at least one); one row per cycle plus a summary row."""
    rng = random.Random(seed)
    rows: list[dict] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="exitless-soak-") as tmp:
        image, served = Path(tmp, "soak.img"), Path(tmp, "served.img")
        for p in (image, served):
            with open(p, "wb") as f:
                f.truncate(SOAK_BYTES)
        backend = serve_process(served, "kick", tmp, "writeback")
        disconnector = Disconnector(backend.sock, rng)
        disconnector.start()
        try:
            cycle = 0
            while cycle == 0 or time.monotonic() - t0 < minutes * 60:
                cycle += 1
                path = BLK_PATHS[(cycle - 1) % len(BLK_PATHS)]
                gen = seed * 1000 + cycle
                common = f"seed={gen} size={SOAK_BYTES} timeout_ms=20000"
                results = [_guest(image, path, f"blk rw=fill bs=65536 qd=4 {common}", timeout),
                           _guest(image, path, f"blk rw=randwrite bs=4096 qd={rng.choice((1, 4, 16))} "
                                               f"n={rng.randrange(200, 2000)} flush_every={rng.choice((1, 8, 32))} "
                                               f"{common}", timeout),
                           _guest(image, path, f"blk rw=randread verify=1 bs=4096 qd=4 n=1000 {common}", timeout)]
                fds, threads = _proc_counts()
                bfds, bthreads = _proc_counts(backend.proc.pid)
                row = {"cycle": cycle, "t_s": round(time.monotonic() - t0, 1), "path": path, "generation": gen,
                       "ops": sum(r.get("ops", 0) for r in results),
                       "flushes": sum(r.get("flushes", 0) for r in results),
                       "errors": sum(r.get("errors", 0) + r.get("timeouts", 0) for r in results),
                       "verify_errors": sum(r.get("verify_errors", 0) for r in results),
                       "lost_acked_writes": lost_sectors(image, gen),
                       "disconnects": disconnector.disconnects, "frontend_failures": disconnector.failures,
                       "vmm_fds": fds, "vmm_threads": threads, "backend_fds": bfds, "backend_threads": bthreads}
                rows.append(row)
                report_row(row)
        finally:
            disconnector.stop()
            alive = backend.proc.poll() is None
            backend.stop()
    summary = {"summary": True, "minutes": round((time.monotonic() - t0) / 60, 2), "cycles": len(rows),
               "vm_restarts": 3 * len(rows), "ops": sum(r["ops"] for r in rows),
               "flushes": sum(r["flushes"] for r in rows), "errors": sum(r["errors"] for r in rows),
               "verify_errors": sum(r["verify_errors"] for r in rows),
               "lost_acked_writes": sum(r["lost_acked_writes"] for r in rows),
               "disconnects": disconnector.disconnects, "frontend_failures": disconnector.failures,
               "frontend_error": disconnector.error or None, "backend_survived": alive,
               "vmm_fds": [r["vmm_fds"] for r in rows], "vmm_threads": [r["vmm_threads"] for r in rows],
               "backend_fds": [r["backend_fds"] for r in rows], "backend_threads": [r["backend_threads"] for r in rows]}
    return rows + [summary]


def main(args) -> int:
    report = Report(args.json)
    with report.progress() as progress:
        rows = run(args.minutes, seed=args.seed,
                   report_row=lambda r: progress(f"soak cycle {r['cycle']} ({r['path']})", r["cycle"], None))
    s = rows[-1]
    report.table("soak (one row per cycle; each cycle = 3 VM boots on that path, then a host check)",
                 rows[:-1], COLUMNS)
    report.note(f"{s['cycles']} cycles, {s['vm_restarts']} VM restarts, {s['ops']} guest I/Os, {s['flushes']} flushes, "
                f"{s['disconnects']} frontend disconnects: lost acknowledged writes {s['lost_acked_writes']} "
                f"(goal 0), guest verify errors {s['verify_errors']}, I/O errors {s['errors']}, "
                f"frontend failures {s['frontend_failures']}, serve survived: {s['backend_survived']}")
    report.json(rows)
    bad = s["lost_acked_writes"] or s["verify_errors"] or s["errors"] or s["frontend_failures"]
    return 1 if bad or not s["backend_survived"] else 0
