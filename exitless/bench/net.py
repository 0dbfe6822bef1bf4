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
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

from ..guestkit import guestkit_path
from ..net.spec import NetSpec, add_nic
from ..net.tap import Tap, create_tap
from ..vm import Machine, VmConfig
from . import qemu
from .common import BenchError, guest_result

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
        netns.create(self.name)
        try:
            from pyroute2 import NetNS

            with NetNS(self.name, flags=0) as ns:
                (lo,) = ns.link_lookup(ifname="lo")
                ns.link("set", index=lo, state="up")
            create_tap(TAP_NAME, self.name, address=HOST_ADDR)
        except BaseException:
            netns.remove(self.name)
            raise

    def close(self) -> None:
        from pyroute2 import netns

        netns.remove(self.name)


def _exitless_run(ns: Namespace, path: str, app: str, timeout: float) -> dict:
    console = bytearray()
    with Machine(VmConfig(mem_mib=128, console=console.extend)) as m:
        add_nic(m, NetSpec(TAP_NAME, io=path, netns=ns.name))
        m.boot_pvh(guestkit_path(), app)
        exit = m.run(timeout=timeout)
        window = m.bench_marker.window()
    if exit.kind != "debug-exit" or window is None:
        raise BenchError(f"exitless/{path}: {app}: {exit.kind} {exit.status} {exit.message}\n"
                         f"{console.decode(errors='replace')[-600:]}")
    return {"res": guest_result(bytes(console), "net"), "exits": window["kvm"]["exits"], "cpu": window["vmm_cpu"]}


def _qemu_run(app: str, device: list[str], *, timeout: float, pass_fds=(), backend=None) -> dict:
    r = qemu.run_guestkit(guestkit_path(), app, device_args=device, shared_memory=backend is not None,
                          timeout=timeout, pass_fds=pass_fds, extra_cpu=backend.cpu if backend else None)
    if r.exit_status != 0:
        raise BenchError(f"qemu ({r.accel}): {app}: no result\n{r.console.decode(errors='replace')[-600:]}\n"
                         f"{r.stderr[-600:]}")
    return {"res": guest_result(r.console, "net"), "exits": r.exits, "cpu": r.vmm_cpu_s, "accel": r.accel}


def _row(vmm: str, path: str, test: Test, full: dict, base: dict | None, note: str = "") -> dict:
    res = full["res"]
    if base is None:
        base = {"res": {"ops": 0}, "exits": 0, "cpu": 0.0}
    dops = res["ops"] - base["res"]["ops"]
    exits = None if full["exits"] is None or base["exits"] is None or dops <= 0 else \
        (full["exits"] - base["exits"]) / dops
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
    return row


class _ServeNet:
    """``exitless serve net`` in a child process (own GIL; its CPU is added to QEMU's)."""

    def __init__(self, ns: Namespace, io: str, directory: str):
        import subprocess
        import sys

        self.sock = os.path.join(directory, f"net-{io}.sock")
        self.log_path = os.path.join(directory, f"serve-net-{io}.log")
        with open(self.log_path, "wb") as log:
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


def run(tests=TESTS, paths=EXITLESS_PATHS, *, with_qemu: bool = True, with_vhost: bool = True,
        vhost_modes=VHOST_MODES, scale: float = 1.0, timeout: float = 600, log=print) -> list[dict]:
    """All rows of one run (see the module docstring)."""
    ns = Namespace()
    rows: list[dict] = []
    try:
        for test in tests:
            n = max(10, int(test.n * scale))
            for path in paths:
                log(f"exitless/{path} {test.name} ...")
                rows.append(_row("exitless", path, test, _exitless_run(ns, path, _app(test, n), timeout), None))
            if with_qemu and qemu.available():
                log(f"qemu/tap {test.name} ...")
                with Tap.open(TAP_NAME, netns=ns.name) as tap:
                    fd = tap.fds[0]
                    dev = ["-netdev", f"tap,id=n0,fd={fd},vhost=off",
                           "-device", "virtio-net-pci,netdev=n0,disable-legacy=on,romfile="]
                    base = _qemu_run(_app(test, max(1, n // 10)), dev, timeout=timeout, pass_fds=(fd,))
                    full = _qemu_run(_app(test, n), dev, timeout=timeout, pass_fds=(fd,))
                row = _row("qemu", "tap", test, full, base, note="vhost=off: no /dev/vhost-net on this host")
                row["accel"] = full["accel"]
                rows.append(row)
            if with_vhost and qemu.available():
                with tempfile.TemporaryDirectory(prefix="exitless-bench-net-") as tmp:
                    for io in vhost_modes:
                        log(f"qemu+exitless/{io} {test.name} ...")
                        be = _ServeNet(ns, io, tmp)
                        try:
                            # vectors=0: QEMU 7.2 + vhost-user-net + MSI-X without KVM irqfds crashes
                            # (see tests/test_vhost_user_net_qemu.py); the guest kit polls anyway.
                            dev = ["-chardev", f"socket,id=c0,path={be.sock}",
                                   "-netdev", "vhost-user,id=n0,chardev=c0",
                                   "-device", "virtio-net-pci,netdev=n0,disable-legacy=on,vectors=0,romfile="]
                            base = _qemu_run(_app(test, max(1, n // 10)), dev, timeout=timeout, backend=be)
                            full = _qemu_run(_app(test, n), dev, timeout=timeout, backend=be)
                        finally:
                            be.stop()
                        row = _row("qemu+exitless", io, test, full, base)
                        row["accel"] = full["accel"]
                        rows.append(row)
    finally:
        ns.close()
    return rows


def summarize(rows: list[dict]) -> dict:
    """The issue's targets, from this one run: rr p50 against QEMU's tap, exits per packet on the
    polled paths, 64-byte packets per second against QEMU's tap."""
    def pick(vmm, test, paths=None):
        return [r for r in rows if r["vmm"] == vmm and r["test"] == test and (paths is None or r["path"] in paths)]

    out = {}
    ours, theirs = pick("exitless", "rr-64"), pick("qemu", "rr-64")
    if ours and theirs:
        best = min(ours, key=lambda r: r["p50_us"])
        out["rr64_p50_best_over_qemu"] = best["p50_us"] / theirs[0]["p50_us"]
        out["rr64_best_path"] = best["path"]
    polled = [r["exits_per_packet"] for r in rows if r["vmm"] == "exitless" and r["path"] in ("shared", "poll")
              and r["exits_per_packet"] is not None]
    if polled:
        out["max_exits_per_packet_polled"] = max(polled)
    ours, theirs = pick("exitless", "tx-64"), pick("qemu", "tx-64")
    if ours and theirs:
        out["tx64_pps_best_over_qemu"] = max(r["pps"] for r in ours) / max(theirs[0]["pps"], 1)
    ours, theirs = pick("exitless", "flood-64"), pick("qemu", "flood-64")
    if ours and theirs:
        out["flood64_pps_best_over_qemu"] = max(r["pps"] for r in ours) / max(theirs[0]["pps"], 1)
    return out


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rr-64", "p50_us", "64 B request/response p50 (µs, lower is better)"),
              ("flood-64", "pps", "64 B round trips/s, 32 in flight"),
              ("tx-64", "pps", "64 B TX packets/s"),
              ("tx-1500", "gbit_s", "1514 B TX Gbit/s"),
              ("tx-tso", "gbit_s", "64 KiB TSO TX Gbit/s")]
    colors = {"exitless": "tab:blue", "qemu": "tab:gray", "qemu+exitless": "tab:orange"}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4))
    for ax, (test, key, title) in zip(axes, panels):
        sel = [r for r in rows if r["test"] == test and r.get(key) is not None]
        ax.bar([f"{r['vmm'].replace('exitless', 'x')}/{r['path']}" for r in sel], [r[key] for r in sel],
               color=[colors[r["vmm"]] for r in sel])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        plt.setp(ax.get_xticklabels(), rotation=60, ha="right")
    from matplotlib.patches import Patch
    axes[0].legend(handles=[Patch(color=c, label=k) for k, c in colors.items()], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
