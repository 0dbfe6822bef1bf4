"""Where an adaptive doorbell round trip spends more than a shared one (issue 8): two measurements.

``rounds``  CPU time of the sidecore loop's thread per busy round, per loop mode, with one
            always-busy pollable (its watched word is always ahead, so the C spin returns at once):
            the Python cost of a round, without a guest.  The thread's own CPU clock, not the wall
            clock, so that other processes on the machine do not count.
``cross``   the guest kit's doorbell ping-pong with the sidecore's mode and the guest's write
            protocol crossed (``shared:adaptive`` = a polling sidecore, a guest that also fences and
            loads EventIdx on every write): splits the guest's share from the sidecore's.

Usage (from the source tree, with PYTHONPATH pointing at it)::

    python3 scripts/doorbell_breakdown.py rounds [--repeat 3]
    python3 scripts/doorbell_breakdown.py cross [--rounds 5] shared:shared shared:adaptive adaptive:adaptive
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import threading
import time

from exitless.sidecore.loop import SidecoreLoop


class _AlwaysBusy:
    """A pollable with work in every round (its watch is always ahead of what was consumed)."""

    def __init__(self):
        self.word = ctypes.c_uint32(0)
        self.addr = ctypes.addressof(self.word)
        self.n = 0
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def poll(self) -> bool:
        self.n += 1
        self.word.value = self.n & 0xFFFFFFFF
        return True

    def watches(self):
        return [(self.addr, (self.n - 1) & 0xFFFFFFFF)]

    def arm(self) -> bool:
        return True

    def disarm(self) -> None:
        pass

    def drain(self) -> None:
        pass


def round_cpu_ns(mode: str, seconds: float = 1.0) -> float:
    """CPU ns of the loop's thread per busy round in ``mode`` (poll or adaptive)."""
    p = _AlwaysBusy()
    loop = SidecoreLoop([p], mode)
    t = threading.Thread(target=loop.run)
    t.start()
    try:
        time.sleep(0.05)
        clock = time.pthread_getcpuclockid(t.ident)
        c0, n0 = time.clock_gettime_ns(clock), p.n
        time.sleep(seconds)
        c1, n1 = time.clock_gettime_ns(clock), p.n
    finally:
        loop.request_stop()
        t.join()
        loop.close()
        os.close(p.wake_fd)
    return (c1 - c0) / max(n1 - n0, 1)


def cmd_rounds(args) -> None:
    got = {m: [] for m in ("poll", "adaptive")}
    for _ in range(args.repeat):
        for mode in got:
            got[mode].append(round_cpu_ns(mode))
    for mode, v in got.items():
        print(f"{mode:9s} CPU ns per busy round: min {min(v):.0f}, median {statistics.median(v):.0f} "
              f"over {len(v)} runs")
    print(f"adaptive - poll (min): {min(got['adaptive']) - min(got['poll']):+.0f} ns")


def cmd_cross(args) -> None:
    from exitless.bench import doorbell as D
    from exitless.bench.common import guest_result

    pin = D.pinning(True)
    combos = [tuple(c.split(":")) for c in args.combos]
    p50 = {c: [] for c in combos}
    for _ in range(args.rounds):          # interleaved, like the bench
        for side, guest in combos:
            run = D._run(D.Case(side, "thread"), f"doorbell path={guest} n={args.n} warmup={args.n // 10}", 120, pin)
            p50[(side, guest)].append(guest_result(run["console"], "doorbell")["p50_ns"] / 1000)
    for (side, guest), v in p50.items():
        print(f"sidecore {side:9s} guest {guest:9s} p50 µs: median {statistics.median(v):.3f} "
              f"({min(v):.3f}-{max(v):.3f}) over {len(v)} rounds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(required=True)
    r = sub.add_parser("rounds", help="sidecore loop CPU per busy round, poll vs adaptive (no guest)")
    r.add_argument("--repeat", type=int, default=3)
    r.set_defaults(func=cmd_rounds)
    c = sub.add_parser("cross", help="doorbell ping-pong, sidecore mode x guest write protocol (KVM)")
    c.add_argument("--rounds", type=int, default=5)
    c.add_argument("--n", type=int, default=20000)
    c.add_argument("combos", nargs="+", help="SIDECORE_PATH:GUEST_PATH, e.g. shared:adaptive")
    c.set_defaults(func=cmd_cross)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
