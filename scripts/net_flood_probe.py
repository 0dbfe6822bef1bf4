"""Where a flood-64 run's time goes on the device side: one exitless run of the bench's ``net`` app,
with counters around the virtio-net hot spots (wrapped here, not in the product).

Per run it prints: round trips/s measured in the guest; the sidecore's Python rounds; TX batches and
RX pumps (calls, frames, wall and thread-CPU ns); AIO re-arms of the TAP poll; RX buffers the device
still held after each pump (starvation shows as 0); queue notifications; and a histogram of frames per
TX batch / RX pump.  Run from the source tree as root (makes and removes its own namespace):

    PYTHONPATH=. python3 scripts/net_flood_probe.py --path shared --test flood-64 -n 6000
"""
import argparse
import collections
import os
import time

from exitless.bench import net as bench
from exitless.bench.doorbell import pinning
from exitless.devices.virtio import net as vnet
from exitless.sidecore import loop as sloop

counts = collections.Counter()
sizes = collections.Counter()


def timed(cls, name, key, frames=lambda r: r, after=None):
    """Wrap ``cls.name``: calls, frames (from its result), wall and thread-CPU ns under ``key``."""
    orig = getattr(cls, name)

    def wrapper(self, *args):
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        r = orig(self, *args)
        counts[key + "_wall_ns"] += time.perf_counter_ns() - t0
        counts[key + "_cpu_ns"] += time.thread_time_ns() - c0
        n = frames(r)
        counts[key + "_calls"] += 1
        counts[key + "_frames"] += n
        sizes[(key, min(n, 64))] += 1
        if after:
            after(self, *args)
        return r
    setattr(cls, name, wrapper)


def cpu_timed(module, name, key, frames=lambda r: 0):
    """Wrap the module-level function ``module.name``: calls, frames and thread-CPU ns under ``key``."""
    orig = getattr(module, name)

    def wrapper(*args, **kw):
        c0 = time.thread_time_ns()
        r = orig(*args, **kw)
        counts[key + "_cpu_ns"] += time.thread_time_ns() - c0
        counts[key + "_calls"] += 1
        counts[key + "_frames"] += frames(r)
        return r
    setattr(module, name, wrapper)


def counted(cls, name, key):
    orig = getattr(cls, name)

    def wrapper(self, *args):
        counts[key] += 1
        return orig(self, *args)
    setattr(cls, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default="shared", choices=bench.EXITLESS_PATHS)
    ap.add_argument("--test", default="flood-64", choices=[t.name for t in bench.TESTS])
    ap.add_argument("-n", type=int, default=6000, help="round trips / frames in the guest")
    ap.add_argument("--pin", action="store_true", help="vCPU on one CPU, sidecores on another (as bench net --pin)")
    a = ap.parse_args()
    timed(vnet.VirtioNet, "_rx_pump_locked", "rx_pump",
          after=lambda self, p: counts.update(rx_held_after_pump=p.held_count))
    timed(vnet.VirtioNet, "fast_path", "tx_batch", frames=lambda r: r[0])
    counted(vnet.VirtioNet, "_arm", "aio_arm")
    counted(vnet.VirtioNet, "notify", "notify")
    counted(vnet.VirtioNet, "_handle_rx", "rx_kick")
    counted(sloop.SidecoreLoop, "_poll_once", "python_rounds")
    # thread CPU of the sidecore: all of it, the GIL-free idle spin, and each C batch (the rest is Python)
    cpu_timed(sloop, "wait_until", "idle_spin")
    for name in ("_tx_batch", "_rx_take", "_rx_pump"):
        if getattr(vnet, name) is not None:
            cpu_timed(vnet, name, "c" + name, frames=lambda r: r[0])
    if getattr(vnet, "_serve", None) is not None:   # the pair served in C during the spin (poll mode)
        cpu_timed(vnet, "_serve", "c_serve", frames=lambda r: r[2] + r[3])
    orig_run = sloop.SidecoreLoop.run

    def run(self):
        c0 = time.thread_time_ns()
        try:
            orig_run(self)
        finally:
            counts["sidecore_cpu_ns"] += time.thread_time_ns() - c0
    sloop.SidecoreLoop.run = run
    test = next(t for t in bench.TESTS if t.name == a.test)
    ns = bench.Namespace()
    try:
        t0 = time.monotonic()
        r = bench._exitless_run(ns, a.path, bench._app(test, a.n), 120, pinning(a.pin))
        wall = time.monotonic() - t0
    finally:
        ns.close()
    res = r["res"]
    print(f"{a.path} {a.test}: {res['pps']} /s, ops {res['ops']}, timeouts {res['timeouts']}, "
          f"guest elapsed {res['elapsed_us']} us, wall {wall:.2f} s, VMM CPU in window {r['cpu']:.3f} s, "
          f"load {os.getloadavg()[0]:.1f}")
    for k in sorted(counts):
        print(f"  {k:24} {counts[k]}")
    ops = max(1, res["ops"])
    if counts["sidecore_cpu_ns"]:
        busy = counts["sidecore_cpu_ns"] - counts["idle_spin_cpu_ns"]
        c = sum(counts[f"c{n}_cpu_ns"] for n in ("_tx_batch", "_rx_take", "_rx_pump", "_serve"))
        print(f"  sidecore thread CPU per op (ns; whole run incl. ARP and set-up): total "
              f"{counts['sidecore_cpu_ns'] / ops:.0f}, idle spin {counts['idle_spin_cpu_ns'] / ops:.0f}, "
              f"busy {busy / ops:.0f} = C batches {c / ops:.0f} (TX {counts['c_tx_batch_cpu_ns'] / ops:.0f}, "
              f"RX pump {counts['c_rx_pump_cpu_ns'] / ops:.0f}, RX take {counts['c_rx_take_cpu_ns'] / ops:.0f}, "
              f"pair served in the spin {counts['c_serve_cpu_ns'] / ops:.0f}) "
              f"+ Python {(busy - c) / ops:.0f}")
    for key in ("tx_batch", "rx_pump"):
        hist = sorted((n, c) for (k, n), c in sizes.items() if k == key)
        print(f"  {key} frames per call (frames: calls): {dict(hist)}")


if __name__ == "__main__":
    main()
