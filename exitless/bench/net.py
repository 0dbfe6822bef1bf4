"""``exitless bench net``: virtio-net under every exitless I/O path, QEMU's own virtio-net on a TAP,
and QEMU with exitless's vhost-user-net back-end — the same guest kit ``net`` app, the same responder.

The bench makes a private network namespace with a TAP (10.0.0.1/24 on the host side); the
namespace's kernel is the responder (ARP, ICMP echo) and the sink of the TX-only frames.  Nothing
outside that namespace is touched, and it is deleted at the end.

Tests (guest kit ``net`` app, measured in the guest with the TSC):

* ``rr-64``: one 64-byte ICMP echo at a time: request/response latency (p50/p99);
* ``flood-64``: 32 echoes in flight: round trips per second (a frame each way per round trip);
* ``tx-64`` / ``tx-1500``: frames sent as fast as the TX ring allows: packets/s and Gbit/s;
* ``tx-tso``: 64 KiB TCP frames with a GSO header (CSUM + HOST_TSO4): the host segments them.

Exits and host CPU per packet: in exitless over exactly the guest's measured loop (port 0x511
marks); in QEMU differential, a run of ``n`` minus a run of ``n/10``.  Host CPU excludes the vCPU
threads; it includes the host kernel's work for the frames done in the VMM's threads (the TAP
writes and reads, and for echoes the namespace's ICMP reply, which runs in the writer's context),
and a vhost-user back-end process's CPU.  QEMU's TAP peer runs without vhost-net (``vhost=off``):
this host has no ``/dev/vhost-net`` (the rows say so in ``note``).

Placement (as ``bench doorbell``): exitless's vCPU thread runs pinned to one CPU and the device's
sidecore (its TAP thread on ``trap``) to another (``--no-pin``: the scheduler's choice; rows say
``pinned``).  Unpinned on a busy host, a polling sidecore lands on the spinning vCPU's CPU and every
hand-off (32 echoes out, 32 replies back in flood-64) waits for a scheduler time slice: ~1k round
trips/s instead of tens of thousands (docs/results/net-flood.md).  QEMU gets the same placement: its vCPU
thread on the vCPU's CPU, its other threads (the main loop serving the TAP, RCU, workers) on the
sidecore's CPU -- unpinned on a loaded host its rows ran up to 1.8x slower (docs/results/net-pps.md, session 5).
A vhost-user back-end process runs on the sidecore's CPU.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

from ..guestkit import guestkit_cmdline, guestkit_path
from ..interrupts import uninterruptible
from ..net.spec import NetSpec, add_nic
from ..net.tap import Tap, create_tap
from ..vm import Machine, VmConfig
from . import qemu
from .doorbell import Pinning, on_cpu, pinning
from .common import (BenchError, Progress, Report, aggregate, differential_per_op, guest_result, interleave, mark_best, no_progress,
                     plot_panels, ratio_notes, ratio_over_rounds)

EXITLESS_PATHS = ("trap", "ioeventfd", "shared", "poll", "adaptive")
VHOST_MODES = ("kick", "poll", "adaptive")
HOST_ADDR = "10.0.0.1/24"
TAP_NAME = "exlbench0"


@dataclass(frozen=True)
class Test:
    name: str
    kind: str       # rr | flood | tx
    size: int       # Ethernet frame bytes (no FCS)
    n: int
    qd: int = 1
    tso: bool = False   # 64 KiB TCP frames the host segments (CSUM + HOST_TSO4)


TESTS = (
    Test("rr-64", "rr", 64, 2000),
    Test("flood-64", "flood", 64, 20000, 32),
    Test("tx-64", "tx", 64, 50000),
    Test("tx-1500", "tx", 1514, 20000),
    Test("tx-tso", "tx", 65549, 4000, tso=True),
)


def _app(test: Test, n: int) -> str:
    qd = f" qd={test.qd}" if test.kind == "flood" else ""
    tso = " tso=1" if test.tso else ""
    return f"net test={test.kind} n={n} size={test.size}{qd}{tso} max_timeouts=0 timeout_ms=1000"


class Namespace:
    """A network namespace with the TAP, for the duration of the bench."""

    def __init__(self):
        from pyroute2 import netns

        self.name = f"exl-bench-{os.getpid()}"
        try:
            # pyroute2 forks helpers and hands sockets between threads: a SIGTERM/Ctrl-C unwinding it
            # half way left a lock held (the VM then hung); it is raised once the setup is whole
            with uninterruptible():
                netns.create(self.name)
                from pyroute2 import NetNS

                with NetNS(self.name, flags=0) as ns:
                    (lo,) = ns.link_lookup(ifname="lo")
                    ns.link("set", index=lo, state="up")
                create_tap(TAP_NAME, self.name, address=HOST_ADDR)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Delete the namespace (and its TAP), if it was made."""
        from pyroute2 import netns

        try:
            with uninterruptible():
                netns.remove(self.name)
        except FileNotFoundError:
            pass


def _exitless_run(ns: Namespace, path: str, app: str, timeout: float, pin: Pinning | None = None) -> dict:
    """One exitless row's run; ``pin``: the device's sidecore (and TAP thread) on one CPU, the vCPU on
    another (see :mod:`exitless.bench.doorbell`: a polling sidecore that the scheduler puts on the
    spinning vCPU's CPU turns every hand-off into a scheduler time slice)."""
    console = bytearray()
    with Machine(VmConfig(mem_mib=128, console=console.extend)) as m:
        with on_cpu(pin and pin.sidecore):
            add_nic(m, NetSpec(TAP_NAME, io=path, netns=ns.name))
        m.boot_pvh(guestkit_path(), guestkit_cmdline(app))
        with on_cpu(pin and pin.vcpu):
            exit = m.run(timeout=timeout)
        window = m.bench_marker.window()
    if exit.kind != "debug-exit" or window is None:
        raise BenchError(f"exitless/{path}: {app}: {exit.kind} {exit.status} {exit.message}\n"
                         f"{console.decode(errors='replace')[-600:]}")
    return {"res": guest_result(bytes(console), "net"), "exits": window["kvm"]["exits"], "cpu": window["vmm_cpu"]}


def _qemu_run(app: str, device: list[str], *, timeout: float, pass_fds=(), backend=None,
              pin: Pinning | None = None) -> dict:
    r = qemu.run_guestkit(guestkit_path(), app, device_args=device, shared_memory=backend is not None,
                          timeout=timeout, pass_fds=pass_fds, extra_cpu=backend.cpu if backend else None,
                          pin=(pin.vcpu, pin.sidecore) if pin else None)
    if r.exit_status != 0:
        raise BenchError(f"qemu ({r.accel}): {app}: no result\n{r.console.decode(errors='replace')[-600:]}\n"
                         f"{r.stderr[-600:]}")
    return {"res": guest_result(r.console, "net"), "exits": r.exits, "cpu": r.vmm_cpu_s, "accel": r.accel}


def _row(vmm: str, path: str, test: Test, full: dict, base: dict | None, note: str = "") -> dict:
    res = full["res"]
    if base is None:
        base = {"res": {"ops": 0}, "exits": 0, "cpu": 0.0}
    dops = res["ops"] - base["res"]["ops"]
    exits, exits_note = differential_per_op(full["exits"], base["exits"], dops)
    dcpu = full["cpu"] - base["cpu"]
    row = {
        "vmm": vmm, "path": path, "test": test.name, "size": test.size,
        "p50_us": res["p50_ns"] / 1000 if "p50_ns" in res else None,
        "p99_us": res["p99_ns"] / 1000 if "p99_ns" in res else None,
        "pps": res["pps"], "gbit_s": res["pps"] * test.size * 8 / 1e9,
        "exits_per_packet": exits,
        "cpu_us_per_packet": dcpu * 1e6 / dops if dcpu >= 0 and dops > 0 else None,
        "errors": res["errors"], "timeouts": res["timeouts"], "ops": res["ops"],
    }
    if note:
        row["note"] = note
    if exits_note:
        row["exits_note"] = exits_note
    return row


class _ServeNet:
    """``exitless serve net`` in a child process (own GIL; its CPU is added to QEMU's); ``cpu``: the CPU it runs
    on (where exitless's sidecore runs), None: the scheduler's choice."""

    def __init__(self, ns: Namespace, io: str, directory: str, cpu: int | None = None):
        import subprocess
        import sys

        self.sock = os.path.join(directory, f"net-{io}.sock")
        self.log_path = os.path.join(directory, f"serve-net-{io}.log")
        with open(self.log_path, "wb") as log, on_cpu(cpu):     # the child inherits the CPU at fork
            self.proc = subprocess.Popen([sys.executable, "-m", "exitless.cli", "serve", "net", "--socket", self.sock,
                                          "--tap", TAP_NAME, "--netns", ns.name, "--io", io],
                                         stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"exitless serve net did not start:\n{open(self.log_path).read()[-800:]}")
            time.sleep(0.02)

    def cpu(self) -> float:
        return qemu.process_cpu(self.proc.pid)

    def stop(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass(frozen=True)
class Setup:
    """One row of the table: a VMM and its path (exitless I/O path, ``tap``, or vhost-user ``--io``)."""
    vmm: str
    path: str


METRICS = ("p50_us", "p99_us", "pps", "gbit_s", "exits_per_packet", "cpu_us_per_packet")
SPREAD_COLUMNS = ("p50_us", "pps", "gbit_s")
COLUMNS = [("vmm", "vmm"), ("path", "path"), ("test", "test"), ("p50_us", "p50 µs"), ("p99_us", "p99 µs"),
           ("pps", "packets/s"), ("gbit_s", "Gbit/s"), ("exits_per_packet", "exits/packet"),
           ("cpu_us_per_packet", "host CPU µs/packet"), ("errors", "errors"), ("timeouts", "lost"),
           ("other_load_pct", "other load %")]


def _measure(ns: Namespace, setup: Setup, test: Test, n: int, timeout: float, tmp: str,
             pin: Pinning | None = None) -> dict:
    """One sample of ``test`` on ``setup``: exitless over the guest's marked window (``pin``: see
    :func:`_exitless_run`), QEMU differential (``pin``: its vCPU thread where exitless's vCPU runs, its other
    threads where the sidecore runs)."""
    if setup.vmm == "exitless":
        row = _row("exitless", setup.path, test, _exitless_run(ns, setup.path, _app(test, n), timeout, pin), None)
        row["pinned"] = None if pin is None else {"vcpu": pin.vcpu, "sidecore": pin.sidecore}
        return row
    if setup.vmm == "qemu":
        with Tap.open(TAP_NAME, netns=ns.name) as tap:
            fd = tap.fds[0]
            dev = ["-netdev", f"tap,id=n0,fd={fd},vhost=off",
                   "-device", "virtio-net-pci,netdev=n0,disable-legacy=on,romfile="]
            base = _qemu_run(_app(test, max(1, n // 10)), dev, timeout=timeout, pass_fds=(fd,), pin=pin)
            full = _qemu_run(_app(test, n), dev, timeout=timeout, pass_fds=(fd,), pin=pin)
        row = _row("qemu", "tap", test, full, base, note="vhost=off: no /dev/vhost-net on this host")
    else:
        # a TAP queue takes one reader: one back-end at a time
        be = _ServeNet(ns, setup.path, tmp, pin and pin.sidecore)
        try:
            # vectors=0: QEMU 7.2 + vhost-user-net + MSI-X without KVM irqfds crashes
            # (see tests/test_vhost_user_net_qemu.py); the guest kit polls anyway.
            dev = ["-chardev", f"socket,id=c0,path={be.sock}", "-netdev", "vhost-user,id=n0,chardev=c0",
                   "-device", "virtio-net-pci,netdev=n0,disable-legacy=on,vectors=0,romfile="]
            base = _qemu_run(_app(test, max(1, n // 10)), dev, timeout=timeout, backend=be, pin=pin)
            full = _qemu_run(_app(test, n), dev, timeout=timeout, backend=be, pin=pin)
        finally:
            be.stop()
        row = _row("qemu+exitless", setup.path, test, full, base)
    row["accel"] = full["accel"]
    row["pinned"] = None if pin is None else {"vcpu": pin.vcpu, "other_threads": pin.sidecore}
    if pin is not None and setup.vmm == "qemu+exitless":
        row["pinned"]["backend"] = pin.sidecore
    return row


def run(tests=TESTS, paths=EXITLESS_PATHS, *, with_qemu: bool = True, with_vhost: bool = True,
        vhost_modes=VHOST_MODES, scale: float = 1.0, timeout: float = 600, rounds: int = 3, pin: bool = True,
        progress: Progress = no_progress, notes=lambda text: None) -> list[dict]:
    """The rows (medians of ``rounds`` interleaved rounds; see the module docstring).  ``pin``: exitless's
    vCPU on one CPU and the device's sidecore on another (:func:`exitless.bench.doorbell.pinning`)."""
    where = pinning(pin)
    setups = [Setup("exitless", p) for p in paths]
    if (with_qemu or with_vhost) and not qemu.available():
        notes(f"{qemu.QEMU} is not installed: no QEMU rows")
    else:
        setups += [Setup("qemu", "tap")] if with_qemu else []
        setups += [Setup("qemu+exitless", io) for io in vhost_modes] if with_vhost else []
    cells = [(s, t) for t in tests for s in setups]
    ns = Namespace()
    try:
        with tempfile.TemporaryDirectory(prefix="exitless-bench-net-") as tmp:
            samples = interleave(cells, rounds,
                                 lambda cell, _r: _measure(ns, cell[0], cell[1], max(10, int(cell[1].n * scale)),
                                                           timeout, tmp, where),
                                 progress, label=lambda cell: f"{cell[0].vmm}/{cell[0].path} {cell[1].name}")
    finally:
        ns.close()
    rows = [aggregate(s, METRICS, summed=("errors", "timeouts")) for s in samples]
    for metric, higher in (("p50_us", False), ("pps", True), ("gbit_s", True)):
        mark_best(rows, metric, higher_is_better=higher, group=lambda r: r["test"])
    return rows


def target_ratios(rows: list[dict]) -> dict[str, dict]:
    """The issue's targets, round by round between the best rows: rr p50 against QEMU's tap (≤ 0.5),
    64-byte round trips and TX packets per second against QEMU's tap (≥ 2)."""
    def best(vmm, test, key, higher):
        sel = [r for r in rows if r["vmm"] == vmm and r["test"] == test and r.get(key) is not None]
        return (max if higher else min)(sel, key=lambda r: r[key]) if sel else None

    out = {}
    for name, test, key, higher in (("rr64_p50_exitless_over_qemu", "rr-64", "p50_us", False),
                                    ("flood64_pps_exitless_over_qemu", "flood-64", "pps", True),
                                    ("tx64_pps_exitless_over_qemu", "tx-64", "pps", True)):
        ours, theirs = best("exitless", test, key, higher), best("qemu", test, key, higher)
        r = ratio_over_rounds(ours, theirs, key)
        if r is not None:
            r["rows"] = f"exitless/{ours['path']} vs qemu/{theirs['path']}"
            out[name] = r
    return out


def main(args) -> int:
    report = Report(args.json)
    tests = [t for t in TESTS if not args.tests or t.name in args.tests]
    with report.progress() as progress:
        rows = run(tests, args.paths, with_qemu=not args.no_qemu, with_vhost=not args.no_vhost, scale=args.scale,
                   rounds=args.rounds, pin=args.pin, progress=progress, notes=report.note)
    where = pinning(args.pin)
    placed = (f"vCPU on CPU {where.vcpu}, exitless's sidecore and QEMU's other threads on CPU {where.sidecore}"
              if where else "not pinned")
    report.table(f"virtio-net (same guest driver; a private namespace's kernel answers; {placed})", rows, COLUMNS,
                 spread=SPREAD_COLUMNS)
    report.ties_note(args.rounds, rows)
    polled = [r["exits_per_packet"] for r in rows if r["vmm"] == "exitless" and r["path"] in ("shared", "poll")
              and r["exits_per_packet"] is not None]
    if polled:
        report.note(f"exits per packet on the polled paths (target < 0.01): at most {max(polled):.4f}")
    for line in ratio_notes(target_ratios(rows)):
        report.note(line)
    report.json(rows)
    if args.plot:
        plot(rows, args.plot)
    return 1 if any(r.get("errors") for r in rows) else 0


def plot(rows: list[dict], path: str) -> None:
    """The latency, packet-rate and bandwidth panels of ``rows`` as a PNG."""
    plot_panels(rows, path, [("rr-64", "p50_us", "64 B request/response p50 (µs, lower is better)"),
                             ("flood-64", "pps", "64 B round trips/s, 32 in flight"),
                             ("tx-64", "pps", "64 B TX packets/s"),
                             ("tx-1500", "gbit_s", "1514 B TX Gbit/s"),
                             ("tx-tso", "gbit_s", "64 KiB TSO TX Gbit/s")],
                lambda r: f"{r['vmm'].replace('exitless', 'x')}/{r['path']}",
                {"exitless": "tab:blue", "qemu": "tab:gray", "qemu+exitless": "tab:orange"})
