"""When the adaptive sidecore arms its pollables (issues 8 and 12): never one before its own idle window
has run out, nor alone while another's has not (its driver would kick for nothing while the loop
polls), and all of them in the first round after every window has run out; a busy round reads no
clock in Python (it takes the time the C spin returned).  The loop runs on a fake clock, driven round by round by a script, so the assertions are on
the order of events, never on time.  Also the C spin's ``watch_until``.  No KVM needed.

The publish/fence/re-check handshake itself is unchanged; ``test_sidecore_handshake.py`` and
``test_sidecore_fairness.py`` race it against real driver threads.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitless.sidecore import loop as loop_mod
from exitless.sidecore.loop import SidecoreLoop
from exitless.sidecore.spin import wait_until

WINDOW = 1000   # ns, the loop's starting idle window (the loop doubles / halves it on each wake)


class _Clock:
    """The loop's clock and its GIL-free spin, replaced: each spin returns after the script's next
    step, whatever its deadline (as a spin preempted past its deadline does)."""

    def __init__(self, script, pollables, loop_ref):
        self.now = 10_000
        self.script, self.pollables, self.loop_ref = list(script), pollables, loop_ref
        self.rounds = 0
        self.monotonic_calls = 0

    def monotonic_ns(self) -> int:
        self.monotonic_calls += 1
        return self.now

    def thread_time_ns(self) -> int:
        return 0

    def wait_until(self, watches, deadline_ns) -> int:
        loop = self.loop_ref[0]
        check_end_of_round(self.pollables, self.now, loop, self.rounds)
        if not self.script:
            loop.request_stop()
            return self.now
        dt, work, slips = self.script.pop(0)
        self.now += dt
        self.rounds += 1
        for k, p in enumerate(self.pollables):
            p.work_next = bool(work >> k & 1)
            p.slip_next = bool(slips >> k & 1)
        return self.now


class _Scripted:
    """A pollable whose work and arming races come from the script; it keeps the reference model
    (when it last worked, whether it is armed) and checks the loop against it."""

    def __init__(self, index: int, clock_ref: list):
        self.index, self.clock_ref = index, clock_ref
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.work_next = self.slip_next = False
        self.armed = False
        self.armed_in = None    # the round (the clock's count) in which it was armed
        self.slipped = False    # an arm this round raced a write (the loop polls it on)
        self.last_work = None   # fake ns; None until the loop's first round
        self.worked_this_round = False
        self.arms = 0
        self.errors: list[str] = []

    def poll(self) -> bool:
        now = self.clock_ref[0].now
        if self.last_work is None:
            self.last_work = now
        self.worked_this_round = self.work_next
        if self.work_next:
            self.work_next = False
            self.last_work = now
            return True
        return False

    def watches(self):
        return []

    def arm(self) -> bool:
        now, loop = self.clock_ref[0].now, self.clock_ref[1]
        window = loop.windows[loop.pollables.index(self)]
        if self.armed:
            self.errors.append(f"armed twice at {now}")
        if now < self.last_work + window:
            self.errors.append(f"armed at {now}, before its window ran out ({self.last_work} + {window})")
        self.arms += 1
        if self.slip_next:          # the driver wrote while we armed: the re-check sees it
            self.slip_next = False
            self.slipped = True
            self.last_work = now
            return True
        self.armed = True
        self.armed_in = self.clock_ref[0].rounds
        os.eventfd_write(self.wake_fd, 1)   # and it kicks at once, so the loop's sleep returns
        return False

    def disarm(self) -> None:
        if self.armed:
            self.last_work = self.clock_ref[0].now   # a fresh window from the wake (or the work)
        self.armed = False

    def drain(self) -> None:
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass

    def due(self, now: int, loop) -> bool:
        """Idle this round and its window has run out by ``now`` (or armed already)."""
        if self.armed:
            return True
        if self.last_work is None or self.worked_this_round:
            return False
        return now >= self.last_work + loop.windows[loop.pollables.index(self)]


def check_end_of_round(pollables: list, now: int, loop, round_: int) -> None:
    """The reference model at the end of a round: once every pollable is due, all must be armed; while
    one is not, none may have been armed this round (the loop polls: a kick would be for nothing).  A
    pollable whose arm raced a write this round was due when the loop armed them all."""
    if all(p.slipped or p.due(now, loop) for p in pollables):
        for p in pollables:
            if not p.armed and not p.slipped:
                p.errors.append(f"every window ran out by {now}, not armed")
    else:
        for p in pollables:
            if p.armed and p.armed_in == round_:
                p.errors.append(f"armed at {now} while another pollable's window had not run out")
    for p in pollables:
        p.slipped = False


def _run_scripted(windows: list[int], script: list[tuple[int, int, int]]):
    """Run an adaptive loop over ``len(windows)`` scripted pollables (each with its own window, ns)
    on the fake clock until the script ends; returns (clock, loop, pollables)."""
    clock_ref: list = []
    pollables = [_Scripted(k, clock_ref) for k in range(len(windows))]
    loop_ref: list = []
    clock = _Clock(script, pollables, loop_ref)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop_mod, "time", SimpleNamespace(monotonic_ns=clock.monotonic_ns,
                                                     thread_time_ns=clock.thread_time_ns))
        mp.setattr(loop_mod, "wait_until", clock.wait_until)
        loop = SidecoreLoop(pollables, "adaptive", poll_ns=WINDOW)
        loop.windows = list(windows)   # each pollable's own window, as after different histories
        loop_ref.append(loop)
        clock_ref += [clock, loop]
        try:
            loop.run()
        finally:
            loop.close()
            for p in pollables:
                os.close(p.wake_fd)
    return clock, loop, pollables


_step = st.tuples(st.sampled_from([0, 1, 300, 999, 1000, 1001, 2500, 70_000, 600_000]),
                  st.integers(0, 7), st.integers(0, 7))


@settings(max_examples=300, deadline=None)
@given(windows=st.lists(st.sampled_from([1000, 16_000, 512_000]), min_size=1, max_size=3),
       script=st.lists(_step, min_size=1, max_size=60))
def test_armed_exactly_when_the_window_has_run_out(windows, script):
    """For any script of rounds (time steps, which pollables have work, which arms race a write) and
    any mix of windows, each pollable is armed only once its window has run out since its last work
    and every other pollable's has too, and all are armed in the round in which the last one has run
    out; a raced arm keeps that one polled."""
    clock, _, pollables = _run_scripted(windows, script)
    for p in pollables:
        assert not p.errors, p.errors
    assert clock.rounds == len(script)


def test_a_busy_round_reads_no_clock():
    """Busy rounds of two pollables read the clock in Python no more often in 2000 rounds than in 20
    (the loop's start and stop do), where the per-round window bookkeeping read it twice a round."""
    short, _, _ = _run_scripted([WINDOW, WINDOW], [(100, 3, 0)] * 20)
    clock, loop, pollables = _run_scripted([WINDOW, WINDOW], [(100, 3, 0)] * 2000)
    assert clock.rounds == 2000 and loop.work == 4000 and loop.sleeps == 0
    assert clock.monotonic_calls == short.monotonic_calls
    assert all(p.arms == 0 and not p.errors for p in pollables)


# -- the C spin: watch_until -----------------------------------------------------------------------
def test_watch_until_returns_at_the_deadline_with_the_monotonic_time():
    word = ctypes.c_uint32(5)
    addr = ctypes.addressof(word)
    t0 = time.monotonic_ns()
    now = wait_until([(addr, 5)], t0 + 20_000_000)
    assert now >= t0 + 20_000_000 and now <= time.monotonic_ns()


def test_watch_until_looks_once_even_past_the_deadline():
    word = ctypes.c_uint32(6)
    addr = ctypes.addressof(word)
    t0 = time.monotonic_ns()
    assert t0 <= wait_until([(addr, 5)], 0) <= time.monotonic_ns()   # changed: returns at once
    assert t0 <= wait_until([(addr, 6)], 0) <= time.monotonic_ns()   # unchanged, deadline past: too


def test_watch_until_sees_a_change_made_by_another_thread():
    word = ctypes.c_uint32(0)
    addr = ctypes.addressof(word)
    changed_at = []

    def writer():
        time.sleep(0.05)
        changed_at.append(time.monotonic_ns())
        word.value = 1

    t = threading.Thread(target=writer)
    t.start()
    now = wait_until([(addr, 0), (addr + 0, 0)], time.monotonic_ns() + 10_000_000_000)   # GIL released
    t.join()
    assert word.value == 1 and changed_at and now >= changed_at[0]
    assert now - changed_at[0] < 5_000_000_000


def test_watch_until_without_watches_sleeps_until_the_deadline():
    t0 = time.monotonic_ns()
    assert wait_until([], t0 + 10_000_000) >= t0 + 10_000_000


def test_watch_until_refuses_a_bad_watch_list():
    from exitless.sidecore import _spin
    for bad in ([], [(1,)], [("x", 1)], 5):
        with pytest.raises((ValueError, TypeError)):
            _spin.watch_until(bad, 0)
    big = ctypes.c_uint32(1)
    assert _spin.watch_until([(ctypes.addressof(big), 0)] * 300, 0) > 0    # more than the stack holds


def test_an_idle_adaptive_sidecore_sleeps():
    """A doorbell nobody rings: once its window has run out the adaptive sidecore arms it and sleeps on
    its eventfd -- it stops polling and its thread stops using CPU -- and a ring wakes it."""
    from exitless.memory import GuestMemory
    from exitless.sidecore.loop import SidecoreThread
    from exitless.sidecore.shared_register import SharedRegister
    try:
        from test_sidecore_handshake import Recorder
    except ImportError:
        from tests.test_sidecore_handshake import Recorder

    with GuestMemory.create([(0, 1 << 20)]) as mem:
        page = mem.view(0, 4096)
        dev = Recorder()
        dev.attach_shared(page)
        reg = dev.doorbells()[0]
        wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        loop = SidecoreLoop([SharedRegister(dev, reg, page, wake)], "adaptive", poll_ns=64_000)
        worker = SidecoreThread(loop).start()
        try:
            deadline = time.monotonic() + 10
            while loop.sleeps == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert loop.sleeps == 1
            cpu = time.pthread_getcpuclockid(worker.thread.ident)
            polls, c0 = loop.polls, time.clock_gettime_ns(cpu)
            time.sleep(0.3)
            assert loop.polls == polls and loop.sleeps == 1                 # asleep, not polling
            assert time.clock_gettime_ns(cpu) - c0 < 3_000_000               # < 1% of the 0.3 s
            page.cast("I")[dev.shadow_offset(reg) // 4] = 1                  # the driver writes...
            os.eventfd_write(wake, 1)                                         # ...and rings (EventIdx said so)
            while not dev.values and time.monotonic() < deadline:
                time.sleep(0.01)
            assert dev.values == [1]
        finally:
            worker.stop()
            os.close(wake)
