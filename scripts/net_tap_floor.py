"""Kernel floor of one rr-64 round trip through the bench's TAP: writev(ICMP echo), then read until the reply.

Run from the source tree as root: `PYTHONPATH=. python3 scripts/net_tap_floor.py` (makes and removes its own namespace).
"""
import os, time, statistics, sys
sys.path.insert(0, "tests")
import netns as N
from exitless.bench.net import Namespace, TAP_NAME
from exitless.net.tap import Tap
ns = Namespace()
try:
    tap = Tap.open(TAP_NAME, netns=ns.name)
    fd = tap.fds[0]
    hdr = bytes(12)
    mac = N.resolve_mac(fd, timeout=3)
    w, r, tot, immediate = [], [], [], 0
    for seq in range(3000):
        f = hdr + N.icmp_echo(mac, 0x4758, seq, bytes(22))
        t0 = time.perf_counter_ns(); os.write(fd, f); t1 = time.perf_counter_ns()
        first = True
        while True:
            try:
                d = os.read(fd, 4096)
            except BlockingIOError:
                first = False
                continue
            if N.parse_echo_reply(d[12:]):
                break
        t2 = time.perf_counter_ns()
        immediate += first
        w.append(t1 - t0); r.append(t2 - t1); tot.append(t2 - t0)
    med = lambda a: statistics.median(a) / 1000
    print(f"writev {med(w):.2f} us, read-until-reply {med(r):.2f} us, total {med(tot):.2f} us; "
          f"reply already queued after writev: {immediate/30:.1f}% of echoes")
    t0 = time.perf_counter_ns()
    for _ in range(3000):
        try: os.read(fd, 4096)
        except BlockingIOError: pass
    print(f"an empty read (EAGAIN) {(time.perf_counter_ns()-t0)/3000/1000:.2f} us")
    tap.close()
finally:
    ns.close()
