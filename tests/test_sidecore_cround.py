"""The sidecore's C round (``_vring.serve``) serves virtio-blk queues exactly as ``handle_queue`` does.

Random (partly hostile) request mixes go to two copies of one disk: one side is served by
``VirtioBlk.handle_queue`` in budgeted rounds (the Python data plane with its C batch), the other by
the C round (``serve_job`` → ``_vring.serve`` → ``Virtqueue.served``, the interrupt written to an
eventfd by C), with the chains C leaves (reason 1) handed to ``handle_queue`` as the sidecore loop
does.  Used ring, data read, status bytes, disk contents and the number of interrupts must agree,
with EVENT_IDX (a random ``used_event``) or without (a random NO_INTERRUPT flag).  Also: one pass
takes at most ``budget`` chains per queue (fairness), and a watched word ends the round.  No KVM.
"""
from __future__ import annotations

import os
import shutil
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exitless.devices.virtio import queue as qmod
from exitless.devices.virtio.constants import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from exitless.sidecore.spin import address_of

try:
    from test_vring_paths import DISK_SECTORS, _req, _Side
except ImportError:  # run from the repository root as a package
    from tests.test_vring_paths import DISK_SECTORS, _req, _Side

pytestmark = pytest.mark.skipif(qmod._vring is None, reason="the C extension _vring is not built")
serve = qmod._vring.serve if qmod._vring is not None else None


def _disk(tmp: str, name: str) -> str:
    p = os.path.join(tmp, name)
    with open(p, "wb") as f:
        f.write(bytes((i * 7 + i // 512) & 0xFF for i in range(DISK_SECTORS * 512)))
    return p


def _eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def _place(s: _Side, batch, suppress) -> list:
    placed = []
    for k, (rtype, sector, n, layout) in enumerate(batch):
        hdr = struct.pack("<IIQ", rtype, 0, sector)
        data = bytes(((k + 1) * 31 + i) & 0xFF for i in range(n))
        if rtype == VIRTIO_BLK_T_IN:
            outs, ins = [hdr], ([n] if n else []) + [1]
        else:
            outs, ins = ([hdr[:5], hdr[5:]] if layout == 1 else [hdr]) + ([data] if n else []), [1]
        head, gpas = s.d.add(outs, ins, indirect=layout == 2, publish=False)
        placed.append((gpas, len(outs), ins))
    if s.d.event_idx:
        s.d.set_used_event((s.d.last_used + suppress) & 0xFFFF)
    else:
        s.d.set_no_interrupt(suppress % 2 == 1)
    s.d.publish()
    return placed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.tuples(st.lists(_req, min_size=1, max_size=6), st.integers(0, 7)), min_size=1,
                        max_size=4),
       event_idx=st.booleans(), budget=st.sampled_from([1, 2, 3, 32]))
def test_c_round_agrees_with_handle_queue(batches, event_idx, budget):
    tmp = tempfile.mkdtemp(prefix="exitless-cround-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    sides = []
    try:
        sides = [_Side(_disk(tmp, "py.img"), True, event_idx), _Side(_disk(tmp, "c.img"), True, event_idx)]
        for s in sides:
            s.dev.queues[0].disable_notifications()      # a polling sidecore owns the queue
        py, c = sides
        irqs = [0, 0]
        for batch, suppress in batches:
            outcome = []
            for k, s in enumerate(sides):
                placed = _place(s, batch, suppress)
                done = 0
                if s is py:
                    while True:
                        n = s.dev.handle_queue(0, budget)
                        done += n
                        if n < budget:
                            break
                    irqs[k] += len(s.signals)
                    s.signals.clear()
                else:
                    for _ in range(100):
                        job = s.dev.serve_job(0, call_fd)
                        if job is None:          # broken, or an interrupt still to decide: Python's
                            n = s.dev.handle_queue(0, budget)
                            done += n
                            if n < budget:
                                break
                            continue
                        reason, index, (result,), _idle, _yields = serve([job], [], 0, budget, None)
                        n, _t, _irqs = s.dev.queues[0].served(result)
                        done += n
                        if reason == 1:          # the next chain is for the Python device model
                            done += s.dev.handle_queue(0, budget)
                        elif n == 0:
                            break
                    irqs[k] += _eventfd_count(call_fd) + len(s.signals)
                    s.signals.clear()
                ins_bytes = [b"".join(s.mem.read(g, n) for g, n in zip(gpas[no:], ins)) for gpas, no, ins in placed]
                outcome.append((done, s.d.get_used(), ins_bytes, s.dev.needs_reset))
            assert outcome[0] == outcome[1]
            # Whether the batch interrupted must agree; how many times need not: the C round and
            # handle_queue split a batch differently (a hand-off to Python mid-batch is one more
            # decision), and with EVENT_IDX the crossing of used_event falls in exactly one part
            # of any split, with NO_INTERRUPT in none.
            assert (irqs[0] > 0) == (irqs[1] > 0)
            irqs = [0, 0]
        with open(py.dev.path, "rb") as a, open(c.dev.path, "rb") as b:
            assert a.read() == b.read()
    finally:
        for s in sides:
            s.close()
        os.close(call_fd)
        shutil.rmtree(tmp, ignore_errors=True)


def test_one_pass_takes_at_most_a_budget_per_queue_and_a_watch_ends_the_round():
    tmp = tempfile.mkdtemp(prefix="exitless-cround-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
    sides = []
    try:
        sides = [_Side(_disk(tmp, f"{k}.img"), True, True) for k in range(2)]
        flood, single = sides
        for s in sides:
            s.dev.queues[0].disable_notifications()
        for i in range(20):   # 60 descriptors of the 64
            flood.d.add([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, i % DISK_SECTORS)], [512, 1], publish=False)
        flood.d.publish()
        single.d.add([struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 3), b"\x5A" * 512], [1])
        jobs = [s.dev.serve_job(0, fd) for s, fd in zip(sides, fds)]
        reason, _index, results, _idle, _yields = serve(jobs, [], 0, 8, None)   # timeout 0: one pass
        assert reason == 0
        assert [s.dev.queues[0].served(r)[0] for s, r in zip(sides, results)] == [8, 1]
        assert [_eventfd_count(fd) for fd in fds] == [1, 1]            # first completions: signalled
        with open(single.dev.path, "rb") as f:
            f.seek(3 * 512)
            assert f.read(512) == b"\x5A" * 512
        # a watched word that differs from its expected value ends the round at once (reason 2)
        word = memoryview(bytearray(4))
        addr = address_of(word)
        jobs = [s.dev.serve_job(0, fd) for s, fd in zip(sides, fds)]
        reason, index, results, _idle, _yields = serve(jobs, [(addr, 1)], 10**9, 64, None)
        assert (reason, index) == (2, 0)
        for s, r in zip(sides, results):
            s.dev.queues[0].served(r)
        assert len(flood.d.get_used()) == 20                         # the rest of the flood went too
    finally:
        for s in sides:
            s.close()
        for fd in fds:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


def test_an_idle_round_yields_its_cpu_only_after_yield_ns_without_work():
    """With nothing to do, the round's spin calls sched_yield once ``yield_ns`` has passed since the last
    work (and never with yield_ns 0 or before it has passed); it still returns at its deadline."""
    import time

    tmp = tempfile.mkdtemp(prefix="exitless-cround-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    side = None
    try:
        side = _Side(_disk(tmp, "0.img"), True, True)
        q = side.dev.queues[0]
        q.disable_notifications()

        def round_(timeout_ns, yield_ns):
            t0 = time.monotonic_ns()
            reason, _i, (result,), _idle, yields = serve([side.dev.serve_job(0, fd)], [], timeout_ns, 8, None,
                                                         yield_ns)
            q.served(result)
            return reason, time.monotonic_ns() - t0, yields

        reason, took, yields = round_(20_000_000, 1000)
        assert reason == 0 and took >= 20_000_000 and yields > 0
        assert round_(20_000_000, 0)[2] == 0                           # never asked to
        assert round_(5_000_000, 10**12)[2] == 0                       # the idle time never reached it
    finally:
        if side is not None:
            side.close()
        os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("mode", ["poll", "adaptive"])
def test_the_loop_yields_an_idle_cpu_and_still_serves(mode):
    """A sidecore loop (both polling modes) whose only ring stays idle yields its CPU from its C round
    (``idle_yield_ns``; never with 0), and a request that then arrives is served and signalled."""
    import time

    from exitless.sidecore.loop import SidecoreLoop, SidecoreThread
    from exitless.vhost_user.backend import VringPollable

    tmp = tempfile.mkdtemp(prefix="exitless-cround-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    call, kick = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2))
    side = None
    try:
        side = _Side(_disk(tmp, "0.img"), True, True)
        side.dev.queues[0].disable_notifications()
        for k, yield_ns in enumerate((0, 1000)):
            # a 1 s idle window: the adaptive loop polls through the 0.2 s (it does not arm and sleep)
            loop = SidecoreLoop([VringPollable(side.dev, 0, kick, call)], mode, poll_ns=10**9, poll_max_ns=10**9,
                                idle_yield_ns=yield_ns)
            worker = SidecoreThread(loop).start()
            try:
                time.sleep(0.2)
                assert (loop.yields > 0) == (yield_ns > 0), (yield_ns, loop.yields)
                side.d.set_used_event(k)        # the driver wants this completion's interrupt
                kicks = side.d.kicks
                side.d.add([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 1)], [512, 1])
                if side.d.kicks > kicks:         # adaptive: the loop armed the ring and sleeps
                    os.eventfd_write(kick, 1)
                deadline = time.monotonic() + 10
                while not side.d.get_used() and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert _eventfd_count(call) == 1 and worker.error is None
            finally:
                worker.stop()
    finally:
        if side is not None:
            side.close()
        for fd in (call, kick):
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
