"""``exitless bench sidecore``: N guest-kit VMs doing 4 KiB random reads, one shared sidecore vs one per VM vs QEMU.

Issue 12's measurement, in the manner of ELVIS: N = 1, 2, 4, 8 VMs, each running the guest kit's
virtio-blk driver (``blk rw=randread bs=4096 verify=1 irq=msix``: completions by interrupt, so a vCPU
waiting for its request halts instead of spinning) on its own image, in these layouts, on the same
images:

* ``shared``: one ``exitless sidecore --socket`` service (``--mode poll|adaptive``) serving N
  ``exitless run --disk IMG,io=poll --sidecore SOCK`` VMs;
* ``shared-1proc``: N VMs in ONE exitless process on one sidecore thread (:mod:`.group_vms`) — the
  sharing without the service, labelled as such;
* ``per-vm``: N ``exitless run`` processes, each with its own sidecore (``io=poll`` or ``io=adaptive``);
* ``qemu``: N QEMU processes (KVM), each with one iothread (``poll-max-ns=32768``) serving its
  virtio-blk-pci.

One sample runs the N VMs *concurrently*: every VM boots, sets up its device and waits at the guest
kit's start gate (``gate=TOKEN``: it reads the last 4 KiB of its disk every millisecond); when all are
there the host writes the token into every image at once, every guest then runs ``--seconds`` of
I/O, marks its loop on port 0x511, and prints its result.  Per sample:

* ``iops_total``: the sum of the VMs' IOPS (each measured in its guest over its loop, TSC);
* ``p50_us``/``p99_us`` of the slowest VM (lowest IOPS) and of the fastest (highest), and their p99 ratio;
* ``host_cpu_pct``: all host CPU of the VMM / QEMU / service processes (and their children) from the
  token's write to 95 % of ``--seconds`` later (every guest is inside its loop then), from each
  process's CPU clock (/proc), in % of one core; vCPU threads included (a halted vCPU costs nothing;
  a running one is the guest's own work plus, on kvm_pvm, KVM's emulation of its interrupt path);
* ``io_cpu_pct``: the same less the vCPU threads (told apart by their kernel names, ``vcpu0``… and
  QEMU's ``CPU 0/KVM``…): the host CPU of serving the I/O -- the sidecore service, QEMU's iothreads
  and main loops, the VMMs' other threads;
* ``exits_per_s``: KVM exits per second summed over the VMs — exitless: KVM's counters over each
  guest's marked loop (``run --stats``); QEMU: QMP ``query-stats`` over the same host window;
* ``vms_verified``: VMs whose every read was checked against the pattern the host wrote (``verify``
  reported 1, no verify error, no error, at least one read).

Rows are the medians of ``--rounds`` interleaved rounds (:func:`~exitless.bench.common.interleave`).
The issue's targets are evaluated from the rows (:func:`targets`), never assumed: at 4 VMs, the shared
sidecore gives at least 2× QEMU's aggregate IOPS at no more than ½ of the host CPU of QEMU's
iothreads (``io_cpu_pct``; also reported against all of QEMU's host CPU, ``host_cpu_pct``), and its
slowest VM's p99 is at most 2× its fastest VM's.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import random
import shlex
import signal
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..guestkit import guestkit_path
from . import qemu
from .common import BenchError, Progress, Report, aggregate, guest_result, interleave, no_progress, plot_panels, \
    ratio_over_rounds
from .options import SIDECORE_LAYOUTS
from .soak import pattern

#: Bytes of each VM's image: the workload's range and, last, the 4 KiB start gate.
IMAGE_BYTES = 16 << 20
GATE_BYTES = 4096
SEED = 5
GATE_LINE = b"waiting at the gate"
#: The guest kit's result: one whole JSON line.
RESULT_LINE = re.compile(rb'\{"app":[^\n]*\}\r?\n')
MEM_MIB = 64
#: The host CPU window ends this fraction of ``--seconds`` after the gate opened (every guest still in its loop).
WINDOW_FRACTION = 0.95
QEMU_IOTHREAD_POLL_NS = 32768

METRICS = ("iops_total", "p50_us_slowest", "p99_us_slowest", "p50_us_fastest", "p99_us_fastest",
           "p99_slowest_over_fastest", "host_cpu_pct", "io_cpu_pct", "exits_per_s")
COLUMNS = [("vmm", "vmm"), ("layout", "layout"), ("mode", "mode"), ("vms", "VMs"), ("iops_total", "IOPS (sum)"),
           ("p50_us_slowest", "slowest p50 µs"), ("p99_us_slowest", "slowest p99 µs"),
           ("p50_us_fastest", "fastest p50 µs"), ("p99_us_fastest", "fastest p99 µs"),
           ("host_cpu_pct", "host CPU %"), ("io_cpu_pct", "I/O CPU %"), ("exits_per_s", "exits/s"), ("vms_verified", "VMs verified"),
           ("errors", "errors"), ("other_load_pct", "other load %")]
SPREAD_COLUMNS = ("iops_total", "p99_us_slowest", "host_cpu_pct", "io_cpu_pct", "other_load_pct")

#: The issue's targets, at this many VMs.
TARGET_VMS = 4
TARGET_IOPS_RATIO, TARGET_CPU_RATIO, TARGET_P99_RATIO = 2.0, 0.5, 2.0


@dataclass(frozen=True)
class Layout:
    """One way of serving the N VMs' disks: ``vmm`` (exitless or qemu), ``layout`` (shared, shared-1proc,
    per-vm, qemu) and the sidecore ``mode`` (poll, adaptive; QEMU: its iothread's polling)."""
    vmm: str
    layout: str
    mode: str
    note: str = ""
    service_args: str = ""      # more options for `exitless sidecore` (shared), shell-quoted

    def label(self) -> str:
        return f"{self.vmm}/{self.layout}/{self.mode}"


EXITLESS_MODES = ("poll", "adaptive")


def layouts(names: Sequence[str], modes: Sequence[str] = EXITLESS_MODES,
            service_args: Sequence[str] = ("",)) -> list[Layout]:
    """The :class:`Layout` rows for the layout ``names`` (a subset of :data:`LAYOUTS`); the shared layout gets
    one row per mode and ``service_args`` variant (its mode then reads e.g. ``poll --idle-yield-us 20``)."""
    out = []
    for name in names:
        if name == "qemu":
            out.append(Layout("qemu", "qemu", f"poll-max-ns={QEMU_IOTHREAD_POLL_NS}",
                              "one QEMU per VM, one iothread each"))
        elif name == "shared":
            out += [Layout("exitless", "shared", f"{m} {extra}".strip(), "one `exitless sidecore` service for all VMs",
                           extra)
                    for extra in service_args for m in modes]
        elif name == "shared-1proc":
            out += [Layout("exitless", "shared-1proc", m,
                           "all VMs in ONE exitless process on one sidecore thread (not the service)") for m in modes]
        elif name == "per-vm":
            out += [Layout("exitless", "per-vm", m, "one exitless process and sidecore per VM") for m in modes]
        else:
            raise BenchError(f"unknown layout {name!r}: one of {', '.join(SIDECORE_LAYOUTS)}")
    return out


# --------------------------------------------------------------------------- images and the start gate


def make_images(n: int, directory: str | None = None) -> list[Path]:
    """``n`` images of IMAGE_BYTES in ``directory`` (default /var/tmp: a real file system), each holding the
    guest kit's pattern for seed :data:`SEED` (the reads verify it)."""
    data = pattern(SEED, 0, IMAGE_BYTES)
    images = []
    try:
        for k in range(n):
            fd, name = tempfile.mkstemp(prefix=f"exitless-sidecore-{k}-", suffix=".img", dir=directory or "/var/tmp")
            images.append(Path(name))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    except BaseException:
        for img in images:
            img.unlink(missing_ok=True)
        raise
    return images


def set_gate(images: Sequence[Path], token: int) -> None:
    """Write ``token`` (0: closed) as the first 8 bytes of every image's last 4 KiB, one image after another."""
    word = struct.pack("<Q", token)
    fds = [os.open(img, os.O_WRONLY) for img in images]
    try:
        for fd in fds:                  # opened first: the writes follow each other within microseconds
            os.pwrite(fd, word, IMAGE_BYTES - GATE_BYTES)
    finally:
        for fd in fds:
            os.close(fd)


def guest_app(seconds: float, qd: int, token: int) -> str:
    """The guest kit's command line: ``seconds`` of verified 4 KiB random reads at ``qd``, after the gate."""
    return (f"blk rw=randread bs=4096 qd={qd} ms={max(1, round(seconds * 1000))} seed={SEED} verify=1 irq=msix "
            f"gate={token:x}")


# --------------------------------------------------------------------------- running N VMs


def process_tree(pids: Sequence[int]) -> list[int]:
    """``pids`` and all their living descendants (/proc/PID/task/TID/children)."""
    seen, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return seen


def tree_cpu(pids: Sequence[int]) -> tuple[float, float]:
    """``(all, vcpu)``: CPU seconds (user + system, every thread) of the processes ``pids``, each from its
    CPU clock, and of their vCPU threads alone (:func:`~exitless.bench.qemu.vcpu_threads_cpu`);
    BenchError when one is gone (it ended inside the measured window)."""
    try:
        total = sum(qemu.process_cpu(pid) for pid in pids)
    except OSError as e:
        raise BenchError(f"a VMM process ended inside the measured window ({e})") from None
    return total, sum(qemu.vcpu_threads_cpu(pid) for pid in pids)


@dataclass
class Fleet:
    """N VMs being run: their processes (whose CPU counts), each VM's console file and, for exitless,
    each VM's bench-marker window file; ``qmps`` for QEMU."""
    vmm: str
    consoles: list[Path]
    stats: list[Path] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    qmps: list = field(default_factory=list)
    service: subprocess.Popen | None = None

    def console(self, k: int) -> bytes:
        try:
            return self.consoles[k].read_bytes()
        except FileNotFoundError:
            return b""

    def tail(self, k: int) -> str:
        return self.console(k).decode(errors="replace")[-600:]

    def all_processes(self) -> list[subprocess.Popen]:
        return self.procs + ([self.service] if self.service else [])

    def check_alive(self, what: str) -> None:
        for p in self.all_processes():
            if p.poll() is not None:
                err = Path(p.stderr_path).read_text(errors="replace")[-800:]
                raise BenchError(f"{self.vmm}: {what}: {' '.join(map(str, p.args[:4]))}… exited with "
                                 f"{p.returncode}\n{err}\n" + "\n".join(self.tail(k) for k in range(len(self.consoles))))

    def wait_all(self, seen: Callable[[bytes], bool], timeout: float, what: str, alive: bool = True) -> None:
        """Until ``seen(console)`` holds for every VM; BenchError after ``timeout`` s or (``alive``) when a
        process exited."""
        deadline = time.monotonic() + timeout
        pending = set(range(len(self.consoles)))
        while pending:
            pending = {k for k in pending if not seen(self.console(k))}
            if not pending:
                return
            if alive:
                self.check_alive(what)
            if time.monotonic() > deadline:
                raise BenchError(f"{self.vmm}: {what}: VM {min(pending)} timed out; console:\n{self.tail(min(pending))}")
            time.sleep(0.01)

    def exits(self) -> int | None:
        """QEMU: KVM exits summed over every VM (QMP query-stats); exitless: None (its windows say)."""
        if not self.qmps:
            return None
        counts = [qemu.kvm_exits(q) for q in self.qmps]
        return None if None in counts else sum(counts)


@contextmanager
def launch(layout: Layout, images: Sequence[Path], append: str, workdir: Path, timeout: float) -> Iterator[Fleet]:
    """Start one VM per image in ``layout``, each with the guest kit running ``append``; every process is
    killed on leaving."""
    n = len(images)
    consoles = [workdir / f"console{k}.txt" for k in range(n)]
    stats = [workdir / f"stats{k}.json" for k in range(n)]
    fleet = Fleet(layout.vmm, consoles)
    kernel = str(guestkit_path())
    run = [sys.executable, "-m", "exitless", "run", "--kernel", kernel, "--mem", f"{MEM_MIB}M",
           "--timeout", str(timeout), "--append", append]
    numbers = itertools.count()

    def popen(cmd: list[str], stdout) -> subprocess.Popen:
        # stderr to a file: a pipe nobody reads could fill up and stall the process
        path = workdir / f"stderr{next(numbers)}.txt"
        with open(path, "wb") as err:
            proc = subprocess.Popen(cmd, stdout=stdout, stderr=err, stdin=subprocess.DEVNULL)
        proc.stderr_path = path
        return proc

    try:
        with ExitStack() as files:
            out = [files.enter_context(open(c, "wb")) for c in consoles]
            if layout.layout == "per-vm":
                fleet.stats = stats
                fleet.procs = [popen([*run, "--disk", f"{img},io={layout.mode}", "--stats", str(st)], o)
                               for img, o, st in zip(images, out, stats)]
            elif layout.layout == "shared":
                sock = workdir / "sidecore.sock"
                fleet.service = popen([sys.executable, "-m", "exitless", "sidecore", "--socket", str(sock),
                                       "--mode", layout.mode.split()[0], *shlex.split(layout.service_args)],
                                      subprocess.DEVNULL)
                _wait_serving(fleet.service, timeout=60)
                fleet.stats = stats
                fleet.procs = [popen([*run, "--disk", f"{img},io=poll", "--sidecore", str(sock),
                                                 "--stats", str(st)], o)
                               for img, o, st in zip(images, out, stats)]
            elif layout.layout == "shared-1proc":
                for o in out:
                    o.close()
                fleet.stats = stats
                fleet.procs = [popen([sys.executable, "-m", "exitless.bench.group_vms", "--mode", layout.mode,
                                                 "--append", append, "--out", str(workdir), "--timeout", str(timeout),
                                                 *map(str, images)], subprocess.DEVNULL)]
            elif layout.layout == "qemu":
                for k, (img, o) in enumerate(zip(images, out)):
                    qmp_path = str(workdir / f"qmp{k}.sock")
                    cmd = qemu.guestkit_command(Path(kernel), append, qmp_path,
                                                device_args=qemu.builtin_device(img, iothread=True),
                                                accel="kvm", mem_mib=MEM_MIB)
                    fleet.procs.append(popen(cmd, o))
                fleet.qmps = [qemu.Qmp(str(workdir / f"qmp{k}.sock"), timeout=timeout) for k in range(n)]
            else:
                raise BenchError(f"unknown layout {layout.layout!r}")
        yield fleet
    finally:
        for q in fleet.qmps:
            try:
                q.cmd("quit")
                q.close()
            except OSError:
                pass
        for p in fleet.all_processes():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in fleet.all_processes():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait_serving(proc: subprocess.Popen, timeout: float) -> None:
    """Wait for the sidecore service's stderr line containing ``serving``."""
    deadline = time.monotonic() + timeout
    while b"serving" not in (seen := Path(proc.stderr_path).read_bytes()):
        if proc.poll() is not None:
            raise BenchError(f"exitless sidecore exited with {proc.returncode}: {seen.decode(errors='replace')[-800:]}")
        if time.monotonic() > deadline:
            raise BenchError(f"exitless sidecore did not say 'serving' within {timeout} s")
        time.sleep(0.01)


def vm_verified(res: dict) -> bool:
    """Every read of this VM was checked against the pattern, and none failed."""
    return res.get("verify") == 1 and res["ops"] > 0 and res["errors"] == 0 and res["verify_errors"] == 0


def measure(layout: Layout, images: Sequence[Path], *, seconds: float, qd: int = 1, timeout: float = 300) -> dict:
    """One sample of ``layout`` with one VM per image, all started at once through the gate (module doc)."""
    token = random.getrandbits(63) | 1
    set_gate(images, 0)
    n = len(images)
    with tempfile.TemporaryDirectory(prefix="exitless-bench-sidecore-") as tmp, \
            launch(layout, images, guest_app(seconds, qd, token), Path(tmp), timeout) as fleet:
        fleet.wait_all(lambda con: GATE_LINE in con, timeout, "boot to the start gate")
        pids = process_tree([p.pid for p in fleet.all_processes()])
        exits0, (cpu0, vcpu0), t0 = fleet.exits(), tree_cpu(pids), time.monotonic()
        set_gate(images, token)
        time.sleep(max(0.0, t0 + WINDOW_FRACTION * seconds - time.monotonic()))
        (cpu1, vcpu1), t1 = tree_cpu(pids), time.monotonic()
        exits1 = fleet.exits()
        fleet.wait_all(lambda con: RESULT_LINE.search(con) is not None, seconds + timeout, "run", alive=False)
        results = [_result(fleet, k) for k in range(n)]
        if fleet.vmm == "exitless":
            for p in fleet.procs:         # their windows are written when the VMs stop
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    raise BenchError(f"exitless: {' '.join(map(str, p.args[:4]))}… did not stop within {timeout} s "
                                     "of its guest's result") from None
            windows = [_window(path) for path in fleet.stats]
            exits_per_s = sum(w["kvm"]["exits"] / w["wall"] for w in windows)
        else:
            exits_per_s = (exits1 - exits0) / (t1 - t0) if exits0 is not None and exits1 is not None else None
    slow = min(results, key=lambda r: r["iops"])
    fast = max(results, key=lambda r: r["iops"])
    return {
        "vmm": layout.vmm, "layout": layout.layout, "mode": layout.mode, "vms": n, "qd": qd, "seconds": seconds,
        "iops_total": sum(r["iops"] for r in results),
        "p50_us_slowest": slow["p50_ns"] / 1000, "p99_us_slowest": slow["p99_ns"] / 1000,
        "p50_us_fastest": fast["p50_ns"] / 1000, "p99_us_fastest": fast["p99_ns"] / 1000,
        "p99_slowest_over_fastest": slow["p99_ns"] / fast["p99_ns"] if fast["p99_ns"] else None,
        "host_cpu_pct": 100.0 * (cpu1 - cpu0) / (t1 - t0), "cpu_window_s": t1 - t0,
        "io_cpu_pct": 100.0 * ((cpu1 - cpu0) - (vcpu1 - vcpu0)) / (t1 - t0),
        "exits_per_s": exits_per_s,
        "per_vm": [{"iops": r["iops"], "p50_us": r["p50_ns"] / 1000, "p99_us": r["p99_ns"] / 1000, "ops": r["ops"],
                    "verified": vm_verified(r)} for r in results],
        "vms_verified": sum(vm_verified(r) for r in results),
        "errors": sum(r["errors"] + r["verify_errors"] for r in results),
        "note": layout.note,
    }


def _result(fleet: Fleet, k: int) -> dict:
    try:
        return guest_result(fleet.console(k), "blk")
    except (BenchError, json.JSONDecodeError) as e:
        raise BenchError(f"{fleet.vmm}: VM {k}: {e}") from None


def _window(path: Path) -> dict:
    try:
        window = json.loads(path.read_text())["window"]
    except (OSError, ValueError, KeyError) as e:
        raise BenchError(f"{path.name}: no bench-marker window ({e})") from None
    if not window:
        raise BenchError(f"{path.name}: the guest marked no measured loop")
    return window


# --------------------------------------------------------------------------- rounds, targets, output


def run(vms: Sequence[int] = (1, 2, 4, 8), layout_names: Sequence[str] = ("shared", "per-vm", "qemu"), *,
        rounds: int = 3, seconds: float = 5.0, qd: int = 1, timeout: float = 300, progress: Progress = no_progress,
        notes=lambda text: None, modes: Sequence[str] = EXITLESS_MODES,
        service_args: Sequence[str] = ("",)) -> list[dict]:
    """Every (VM count, layout) row in ``rounds`` interleaved rounds; aggregated rows with ``per_round`` and
    ``spread`` (:func:`~exitless.bench.common.aggregate`).  Layouts that cannot run here are left out
    with a note (QEMU not installed or without KVM).  ``modes``: the exitless rows' sidecore modes;
    ``service_args``: variants of extra ``exitless sidecore`` options (shared layout only)."""
    if not vms or min(vms) < 1:
        raise BenchError(f"--vms {','.join(map(str, vms))}: positive VM counts")
    names = list(layout_names)
    if "qemu" in names and not (qemu.available() and qemu.kvm_works()):
        notes(f"{qemu.QEMU} with KVM is not available here: no qemu rows")
        names.remove("qemu")
    if "shared" in names and not sidecore_service_available():
        notes("`exitless sidecore` (the service) is not in this tree: the shared rows are shared-1proc "
              "(the VMs in ONE exitless process on one sidecore thread)")
        names[names.index("shared")] = "shared-1proc"
        names = list(dict.fromkeys(names))
    cells = [(layout, n) for n in vms for layout in layouts(names, modes, service_args)]
    if not cells:
        raise BenchError("no layout can run here")
    images = make_images(max(vms))
    try:
        samples = interleave(cells, rounds,
                             lambda c, _r: measure(c[0], images[:c[1]], seconds=seconds, qd=qd, timeout=timeout),
                             progress, label=lambda c: f"{c[0].label()} x{c[1]}")
    finally:
        for img in images:
            img.unlink(missing_ok=True)
    rows = [aggregate(s, METRICS) for s in samples]
    for row, s in zip(rows, samples):
        row["vms_verified"] = min(x["vms_verified"] for x in s)     # the worst round
    return rows


def sidecore_service_available() -> bool:
    """Does this tree have the ``exitless sidecore`` service (issue 12 item 2)?"""
    import importlib.util

    return importlib.util.find_spec("exitless.cli.sidecore") is not None


def targets(rows: list[dict], vms: int = TARGET_VMS) -> list[dict]:
    """Issue 12's targets at ``vms`` VMs for each shared row (service, else one process) against the QEMU row:
    IOPS ratio ≥ 2, I/O CPU and host CPU ratios ≤ ½ (all round by round, rows measured side by side), the shared row's
    slowest-VM p99 over its fastest's ≤ 2.  Each: {"target", "row" (the shared row), "rows", "value"
    (median), "min", "max", "limit", "pass"}; no entry when a row is missing."""
    at = [r for r in rows if r["vms"] == vms]
    qemu_row = next((r for r in at if r["vmm"] == "qemu"), None)
    shared = [r for r in at if r["layout"] == "shared"] or [r for r in at if r["layout"] == "shared-1proc"]
    out = []
    for r in shared:
        name = f"{r['layout']}/{r['mode']}"
        for target, metric, limit, higher in (("aggregate IOPS / QEMU's", "iops_total", TARGET_IOPS_RATIO, True),
                                              ("I/O CPU / QEMU's", "io_cpu_pct", TARGET_CPU_RATIO, False),
                                              ("host CPU / QEMU's", "host_cpu_pct", TARGET_CPU_RATIO, False)):
            ratio = ratio_over_rounds(r, qemu_row, metric)
            if ratio is not None:
                out.append({"target": f"{vms} VMs: {name} {target} {'≥' if higher else '≤'} {limit:g}",
                            "row": r, "rows": f"{name} vs qemu", "value": ratio["median"], "min": ratio["min"],
                            "max": ratio["max"], "limit": limit,
                            "pass": ratio["median"] >= limit if higher else ratio["median"] <= limit})
        p99 = r.get("p99_slowest_over_fastest")
        if p99 is not None:
            s = r["spread"]["p99_slowest_over_fastest"]
            out.append({"target": f"{vms} VMs: {name} slowest VM's p99 / fastest's ≤ {TARGET_P99_RATIO:g}",
                        "row": r, "rows": name, "value": p99, "min": s["min"], "max": s["max"], "limit": TARGET_P99_RATIO,
                        "pass": p99 <= TARGET_P99_RATIO})
    return out


def plot(rows: list[dict], path: str) -> None:
    """Aggregate IOPS (first line) and host CPU (second line) per layout, one panel per VM count, as a PNG."""
    def vms(n: int) -> str:
        return f"{n} VM" + ("s" if n > 1 else "")

    for r in rows:
        r["test"] = vms(r["vms"])
    counts = sorted({r["vms"] for r in rows})
    try:
        plot_panels(rows, path, [(vms(n), "iops_total", f"{vms(n)}: aggregate 4K randread IOPS") for n in counts] +
                    [(vms(n), "host_cpu_pct", f"{vms(n)}: host CPU % of one core") for n in counts],
                    lambda r: f"{r['layout']}/{r['mode']}", {"exitless": "tab:blue", "qemu": "tab:gray"},
                    ncols=len(counts))
    finally:
        for r in rows:
            del r["test"]


def main(args) -> int:
    report = Report(args.json)
    with report.progress() as progress:
        rows = run(args.vms, args.layouts, rounds=args.rounds, seconds=args.seconds, qd=args.qd, progress=progress,
                   notes=report.note, modes=getattr(args, "modes", EXITLESS_MODES),
                   service_args=getattr(args, "service_args", None) or ("",))
    report.table(f"QD{args.qd} 4 KiB random reads, N VMs side by side, completions by interrupt "
                 f"({args.seconds:g} s per VM)", rows, COLUMNS, spread=SPREAD_COLUMNS)
    report.ties_note(args.rounds, rows)
    for layout in {r["layout"]: r for r in rows}.values():
        if layout.get("note"):
            report.note(f"{layout['layout']}: {layout['note']}")
    results = targets(rows)
    for t in results:           # the JSON carries each verdict in its shared row
        t["row"].setdefault("targets", []).append({k: v for k, v in t.items() if k != "row"})
    for t in results:
        report.note(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']:.3f} "
                    f"(min–max over the rounds {t['min']:.3f}–{t['max']:.3f})")
    if not results:
        report.note(f"targets: not evaluated (they need a shared row and a qemu row at {TARGET_VMS} VMs)")
    report.json(rows)
    if args.plot:
        plot(rows, args.plot)
    bad = [r for r in rows if r.get("errors") or r["vms_verified"] != r["vms"]]
    return 1 if bad else 0
