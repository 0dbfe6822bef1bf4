"""``exitless bench soak``: a long mixed block workload with verification, VM restarts and frontend disconnects.

A benchmark, not a test: it runs cycles for ``--minutes`` and reports what happened, one JSON row per
cycle and a last row (``"summary": true``) with the totals and the samples over time.  A cycle runs the
guest kit's ``blk`` app four times on one image, each in a freshly booted VM (:func:`_apps`): ``fill``
with generation ``2g`` (the pattern seed), random writes and flushes of the same pattern (a torn or
misplaced write shows), a sequential overwrite of every sector with generation ``2g+1`` with flushes
mixed in, and random verifying reads.  Then the host reads the image back: every sector must hold
generation ``2g+1``'s pattern (word ``i`` of the disk = ``i ^ seed·φ64``, the guest kit's pattern), so
an acknowledged write that was lost leaves ``2g`` there and counts in ``lost_acked_writes`` (goal 0).

Cycles alternate between

* **exitless**: the VMs are exitless VMs with virtio-blk on the next I/O path of
  :data:`~exitless.bench.options.BLK_PATHS` (rotating);
* **vhost-user** (when QEMU is installed): the VMs are QEMU, the frontend of one long-lived
  ``exitless serve blk`` process on its own image; the random writes are cut off by SIGKILL to QEMU at a
  random moment (a frontend gone mid-I/O without any vhost-user teardown), then :class:`~exitless.vhost_user.frontend.Frontend`
  connections hang up after a random number of handshake messages; the overwrite and the verifying
  reads after them must succeed.

After each cycle: open fds (/proc/PID/fd) and threads of this VMM process (also while each VM was up)
and of the ``serve`` process.
"""
from __future__ import annotations

import gc
import os
import random
import struct
import tempfile
import time
from pathlib import Path

from ..devices.virtio.blk import VirtioBlk
from ..devices.virtio.pci import VirtioPci
from ..guestkit import guestkit_cmdline, guestkit_path
from ..vm import Machine, VmConfig
from .common import Report, guest_result
from .options import BLK_PATHS
from . import qemu
from .vhost import serve_process, vhost_device

#: Image bytes used by the soak (small: the host re-reads it all after every cycle).
SOAK_BYTES = 4 << 20
SECTOR = 512
#: The guest kit's pattern multiplier (guestkit/src/blk.c ``GOLDEN``).
GOLDEN = 0x9E3779B97F4A7C15
COLUMNS = [("cycle", "cycle"), ("t_s", "t (s)"), ("kind", "VMM"), ("path", "path"), ("ops", "ops"),
           ("flushes", "flushes"), ("verify_errors", "guest verify errors"),
           ("lost_acked_writes", "lost acked sectors"), ("disconnects", "frontend disconnects"),
           ("mid_io_disconnects", "mid-I/O"), ("qemu_sigkills", "QEMU SIGKILLed"), ("vmm_fds_vm_up", "VMM fds (VM up)"),
           ("vmm_threads_vm_up", "VMM threads (VM up)"), ("vmm_fds", "VMM fds (after)"),
           ("vmm_threads", "VMM threads (after)"), ("backend_fds", "serve fds"), ("backend_threads", "serve threads")]


def pattern(generation: int, offset: int, nbytes: int) -> bytes:
    """The guest kit blk pattern for seed ``generation`` over the disk bytes [offset, offset+nbytes)."""
    k = (generation * GOLDEN) & 0xFFFF_FFFF_FFFF_FFFF
    first = offset // 8
    return struct.pack(f"<{nbytes // 8}Q", *((first + i) ^ k for i in range(nbytes // 8)))


def lost_sectors_of(data: bytes, generation: int, offset: int = 0) -> int:
    """Sectors of ``data`` (disk bytes from ``offset``) that do not hold ``generation``'s pattern."""
    want = pattern(generation, offset, len(data))
    if data == want:
        return 0
    return sum(data[s:s + SECTOR] != want[s:s + SECTOR] for s in range(0, len(data), SECTOR))


def lost_sectors(image: Path, generation: int) -> int:
    """Sectors of ``image`` (its first SOAK_BYTES) that do not hold ``generation``'s pattern."""
    chunk = 1 << 20
    with open(image, "rb") as f:
        return sum(lost_sectors_of(f.read(chunk), generation, off) for off in range(0, SOAK_BYTES, chunk))


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
        open_fds, open_threads = _proc_counts()   # with the VM (vCPU, sidecore, eventfds) still up
    res = guest_result(bytes(console), "blk")
    res["_open"] = (open_fds, open_threads)
    if exit.kind != "debug-exit" or exit.status != 0:
        res.setdefault("errors", 1)
        res["exit"] = f"{exit.kind} {exit.status} {exit.message}"
    return res


def _hang_up(sock: str, steps: int) -> bool:
    """A vhost-user frontend that runs the first ``steps`` handshake messages and hangs up; False when
    the back-end refused or failed one of them (it must not)."""
    from ..vhost_user.frontend import Frontend, FrontendError

    try:
        with Frontend.connect(sock, timeout=10) as fe:
            calls = [fe.get_features, fe.get_protocol_features, fe.set_owner, fe.get_queue_num]
            for call in calls[:steps]:
                call()
    except (OSError, FrontendError):
        return False
    return True


def _vhost_cycle(backend, image: Path, gen: int, rng: random.Random, timeout: float) -> dict:
    """QEMU as the frontend of ``backend`` running :func:`_apps`, where the random writes are cut off by
    SIGKILL to QEMU at a random moment (a frontend gone mid-I/O with requests in flight and no
    GET_VRING_BASE; they write the fill's pattern, so a torn write shows), then a few handshake
    hang-ups; the overwrite and verify passes after them must succeed, and the host then checks the
    served image."""
    device = vhost_device(backend.sock)
    killed = []

    def qemu_run(app: str, limit: float, kill: bool = False) -> dict | None:
        r = qemu.run_guestkit(guestkit_path(), app, device_args=device, shared_memory=True, mem_mib=64,
                              timeout=limit, kill_at_timeout=kill)
        killed.append(r.killed)
        return guest_result(r.console, "blk") if r.exit_status == 0 else None

    apps = _apps(gen, rng)
    fill = qemu_run(apps["fill"], timeout)
    cut = qemu_run(apps["random"].replace(" n=", " ms=20000 n="), rng.uniform(0.5, 3.0), kill=True)
    hang_ups = rng.randrange(1, 4)
    refused = sum(not _hang_up(backend.sock, rng.randrange(0, 5)) for _ in range(hang_ups))
    after = [qemu_run(apps["overwrite"], timeout), qemu_run(apps["verify"], timeout)]
    must = [fill, *after]
    done = [r for r in (*must, cut) if r is not None]
    totals = _totals(done)
    totals["errors"] += sum(r is None for r in must) + refused
    return {**totals, "vm_boots": 4, "disconnects": hang_ups + (cut is None), "mid_io_disconnects": int(cut is None),
            "qemu_sigkills": sum(killed), "lost_acked_writes": lost_sectors(image, 2 * gen + 1)}


def _apps(gen: int, rng: random.Random) -> dict[str, str]:
    """The guest kit blk command lines of a cycle of generation ``gen``: ``fill``, ``random``
    (random writes and flushes of the same pattern: a torn or misplaced write shows), ``overwrite``
    (every sector rewritten with generation ``2·gen+1``, flushes mixed in: a lost write leaves the
    previous generation) and ``verify`` (random verifying reads of the new generation)."""
    old, new = 2 * gen, 2 * gen + 1
    common = f"size={SOAK_BYTES} timeout_ms=20000"
    flush = lambda: f"flush_every={rng.choice((1, 8, 32))}"  # noqa: E731
    return {"fill": f"blk rw=fill bs=65536 qd=4 seed={old} {common}",
            "random": f"blk rw=randwrite bs=4096 qd={rng.choice((1, 4, 16))} n={rng.randrange(200, 2000)} {flush()} "
                      f"seed={old} {common}",
            "overwrite": f"blk rw=write bs=4096 qd={rng.choice((1, 4, 16))} n={SOAK_BYTES // 4096} {flush()} "
                         f"seed={new} {common}",
            "verify": f"blk rw=randread verify=1 bs=4096 qd=4 n=1000 seed={new} {common}"}


def _totals(results: list[dict]) -> dict:
    return {"ops": sum(r.get("ops", 0) for r in results), "flushes": sum(r.get("flushes", 0) for r in results),
            "errors": sum(r.get("errors", 0) + r.get("timeouts", 0) for r in results),
            "verify_errors": sum(r.get("verify_errors", 0) for r in results)}


def _exitless_cycle(image: Path, path: str, gen: int, rng: random.Random, timeout: float) -> dict:
    """Four fresh exitless VMs on I/O ``path`` running :func:`_apps`; then the host checks the image."""
    results = [_guest(image, path, app, timeout) for app in _apps(gen, rng).values()]
    return {**_totals(results), "vm_boots": len(results), "lost_acked_writes": lost_sectors(image, 2 * gen + 1),
            "vmm_fds_vm_up": max(r["_open"][0] for r in results),
            "vmm_threads_vm_up": max(r["_open"][1] for r in results)}


SUMMED = ("ops", "flushes", "errors", "verify_errors", "lost_acked_writes", "disconnects", "mid_io_disconnects",
          "qemu_sigkills")
SAMPLED = ("vmm_fds", "vmm_threads", "vmm_fds_vm_up", "vmm_threads_vm_up", "backend_fds", "backend_threads")


def run(minutes: float, *, seed: int = 1, timeout: float = 300, report_row=lambda row: None) -> list[dict]:
    """Cycles until ``minutes`` have passed (at least one of each kind); one row per cycle, then a
    summary row (``"summary": true``) with the totals and the fd/thread samples over time.

    Cycles alternate: an exitless cycle (next path of BLK_PATHS), then a vhost-user cycle (QEMU
    frontend of ``exitless serve blk``; skipped when QEMU is not installed).
    """
    rng = random.Random(seed)
    rows: list[dict] = []
    with_vhost = qemu.available()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="exitless-soak-", dir="/var/tmp") as tmp:
        image, served = Path(tmp, "soak.img"), Path(tmp, "served.img")
        for p in (image, served):
            with open(p, "wb") as f:
                f.truncate(SOAK_BYTES)
        backend = serve_process(served, "kick", tmp, "writeback") if with_vhost else None
        try:
            cycle = 0
            while cycle < 1 + with_vhost or time.monotonic() - t0 < minutes * 60:
                cycle += 1
                gen = seed * 100000 + cycle
                if with_vhost and cycle % 2 == 0:
                    row = {"cycle": cycle, "kind": "vhost-user", "path": "serve/kick", "generation": gen,
                           "vmm_fds_vm_up": None, "vmm_threads_vm_up": None,
                           **_vhost_cycle(backend, served, gen, rng, timeout)}
                else:
                    path = BLK_PATHS[(cycle // (1 + with_vhost)) % len(BLK_PATHS)]
                    row = {"cycle": cycle, "kind": "exitless", "path": path, "generation": gen,
                           "disconnects": 0, "mid_io_disconnects": 0, "qemu_sigkills": 0,
                           **_exitless_cycle(image, path, gen, rng, timeout)}
                gc.collect()   # count the fds still held, not those awaiting the cycle collector
                row["vmm_fds"], row["vmm_threads"] = _proc_counts()
                row["backend_fds"], row["backend_threads"] = _proc_counts(backend.proc.pid) if backend else (None, None)
                row["t_s"] = round(time.monotonic() - t0, 1)
                rows.append(row)
                report_row(row)
        finally:
            alive = backend is None or backend.proc.poll() is None
            if backend:
                backend.stop()
    summary = {"summary": True, "minutes": round((time.monotonic() - t0) / 60, 2), "cycles": len(rows),
               "vm_restarts": sum(r["vm_boots"] for r in rows), "with_vhost": with_vhost, "backend_survived": alive,
               **{k: sum(r[k] for r in rows) for k in SUMMED},
               **{k: [r[k] for r in rows] for k in SAMPLED}}
    return rows + [summary]


def main(args) -> int:
    report = Report(args.json)
    with report.progress() as progress:
        rows = run(args.minutes, seed=args.seed,
                   report_row=lambda r: progress(f"soak cycle {r['cycle']} ({r['kind']} {r['path']})", r["cycle"],
                                                 None))
    s = rows[-1]
    report.table("soak (one row per cycle: 4 VM boots, then the host reads the image back)", rows[:-1], COLUMNS)
    if not s["with_vhost"]:
        report.note(f"{qemu.QEMU} is not installed: no vhost-user cycles (no frontend disconnects)")
    report.note(f"{s['cycles']} cycles in {s['minutes']} min, {s['vm_restarts']} VM restarts, {s['ops']} guest I/Os, "
                f"{s['flushes']} flushes, {s['disconnects']} frontend disconnects ({s['mid_io_disconnects']} mid-I/O, "
                f"{s['qemu_sigkills']} by SIGKILL to QEMU): "
                f"lost acknowledged writes {s['lost_acked_writes']} (goal 0), guest verify errors "
                f"{s['verify_errors']}, I/O errors {s['errors']}, serve survived: {s['backend_survived']}")
    report.json(rows)
    bad = s["lost_acked_writes"] or s["verify_errors"] or s["errors"]
    return 1 if bad or not s["backend_survived"] else 0
