"""The sidecore engine: one loop that serves many devices' shared registers and queues.

Modes:
- ``notify``: never poll; sleep on the devices' eventfds (the ``ioeventfd`` path's
  device thread).
- ``poll``: poll forever; between polls spin *in C with the GIL released* until a
  watched word changes, so a sidecore thread never stalls the vCPU threads.
- ``adaptive``: poll while busy.  Each pollable (queue) keeps its own idle window, from its own last
  work.  Once every pollable's window has run out, all are armed (publish EventIdx / clear NO_NOTIFY,
  fence, re-check: a request that slipped in keeps that one polled) and the loop sleeps on all their
  eventfds at once (one poll set per membership), so any one of them wakes it, and then all are
  disarmed and start a fresh window.  An idle queue is not armed alone while another keeps the loop
  polling: its driver would then kick (an exit) for a request the loop sees anyway.  A window adapts
  like QEMU's IOThread polling: it doubles when the queue's armed spell ended within ``poll_max_ns``
  (polling longer would have caught that request) and halves after a longer one.

Fairness: one round of the loop visits every pollable once, and a queue pollable takes at most
:data:`QUEUE_BUDGET` chains per visit (``handle_queue(index, budget)``), then the next one gets its
turn: a queue flooded at QD128 delays a QD1 queue on the same sidecore by at most one round of
``QUEUE_BUDGET`` requests per other queue, never by the whole flood.  A pollable left with work
keeps a watch that is already "changed", so the GIL-free spin returns at once and the next round
comes straight back to it.

The C round: a pollable that offers ``c_job()`` (a virtio-blk ring of the sidecore service,
:class:`~exitless.vhost_user.backend.VringPollable`; a virtio-net queue pair, its
:class:`~exitless.devices.virtio.net.TapRxPollable`, in the VMM and in ``serve net``) is served by
``_vring.serve`` -- a GIL-free C loop over all those queues and pairs that completes plain
reads/writes and frames, decides each interrupt (used_event / NO_INTERRUPT) and writes the queue's
irqfd itself (after each pass; a pair without one returns to Python for it), for a spin slice;
Python runs once per slice, not once per request, and no Python runs for an idle queue.  A pair's
job serves its two queues: their own pollables name it as ``served_by`` and form its *group* --
neither polled nor watched while it has a job, and armed and disarmed with it (adaptive).  A job's
``c_locks()`` (the VMM transport's :class:`~exitless.sidecore.spin.WatchedLock`, the pair's RX
lock) are held from ``c_job()`` to ``c_done()``; a lock's word is watched, so a vCPU thread that
wants it ends the round.  With ``idle_yield_ns``
set, its idle spin yields the CPU to waiting threads after that long without work
(:data:`IDLE_YIELD_NS`).  The other pollables are polled in Python and their words watched by the C
round; a chain C leaves (errors, flush, ...) goes to ``poll()`` at once.  ``c_done(result)`` takes
the queue's state back.  Both poll and adaptive mode use it; in adaptive mode a C round lasts until
the next window can run out -- pushed on, while C sees work, to the shortest window after it, up to
a slice (see :meth:`SidecoreLoop._adaptive_c_round`) --, and an armed queue
(kick-driven: its handshake is Python's) is watched, then disarmed and served in C as soon as it
has work.

A *pollable* has ``poll() -> bool`` (do available work, at most a round's budget), ``watches()`` (the
``(address, consumed value)`` words whose change means new work), ``arm() ->
bool`` (enable guest notifications; True if work arrived meanwhile),
``disarm()``, ``drain()`` and ``wake_fd``; one with a C path also ``c_job()``, ``c_done(result)`` and
``has_work()``, and may have ``c_locks()``; any may name its C-path server as ``served_by``.
"""
from __future__ import annotations

import logging
import traceback
import os
import select
import struct
import threading
import time
from typing import Protocol

from .. import threadname
from . import breakdown as _breakdown
from .spin import wait_until

try:   # the C round over many virtio-blk queues (absent when the extension is not built)
    from ..devices.virtio._vring import serve as _c_serve
except ImportError:  # pragma: no cover - a tree without its C extensions
    _c_serve = None

log = logging.getLogger(__name__)

MODES = ("notify", "poll", "adaptive")
SPIN_SLICE_NS = 1_000_000        # how long one GIL-free spin lasts before Python looks around
ADAPTIVE_MIN_NS = 16_000
ADAPTIVE_MAX_NS = 512_000
#: Chains one queue may complete per round of the loop (the rest wait for the next round).
QUEUE_BUDGET = 32
#: The default of ``SidecoreLoop(idle_yield_ns=…)``: 0, the C round's idle spin never yields its CPU.
#: With ``idle_yield_ns`` > 0 it calls sched_yield once no queue has had work for that long (ns): on a
#: host with fewer cores than the vCPUs it serves (4 VMs and a sidecore on 2 cores), a runnable vCPU --
#: the next request's producer -- then gets the CPU instead of the spin; with no thread waiting the
#: call returns at once (~1 µs).  Measured at 4 VMs on a loaded 2-core host (20 µs): ~20 % less host
#: CPU per I/O, but each yield with another thread waiting puts the loop behind it (EEVDF moves its
#: deadline a slice on), so under other processes' load the loop waits its turn, its guests wait for
#: their completions, and aggregate IOPS fell by about half.  A polling sidecore is there for latency:
#: yielding is the user's choice (``exitless sidecore --idle-yield-us``).
IDLE_YIELD_NS = 0


class Pollable(Protocol):
    wake_fd: int | None

    def poll(self) -> bool: ...
    def watches(self) -> list[tuple[int, int]]: ...
    def arm(self) -> bool: ...
    def disarm(self) -> None: ...
    def drain(self) -> None: ...


class SidecoreLoop:
    """Runs in a thread of the VMM or as the body of a sidecore process."""

    def __init__(self, pollables: list[Pollable], mode: str, *, poll_ns: int = 64_000,
                 poll_max_ns: int = ADAPTIVE_MAX_NS, idle_yield_ns: int = IDLE_YIELD_NS, name: str = "sidecore"):
        if mode not in MODES:
            raise ValueError(f"sidecore mode {mode!r}: one of {', '.join(MODES)}")
        if not ADAPTIVE_MIN_NS <= poll_max_ns:
            raise ValueError(f"adaptive poll_max_ns {poll_max_ns}: at least {ADAPTIVE_MIN_NS} ns")
        if idle_yield_ns < 0:
            raise ValueError(f"idle_yield_ns {idle_yield_ns}: 0 (never yield) or more")
        self.idle_yield_ns = idle_yield_ns   # the C round's idle spin yields its CPU after this long (0: never)
        if mode != "poll" and any(p.wake_fd is None for p in pollables):
            raise ValueError(f"{mode} mode needs a wake eventfd for every pollable")
        self.pollables = list(pollables)
        self.mode = mode
        self.name = name
        self.poll_max_ns = poll_max_ns   # adaptive: the longest idle window (QEMU's poll-max-ns)
        self.poll_ns = poll_ns = min(poll_ns, poll_max_ns)
        self.windows = [poll_ns] * len(pollables)   # adaptive: each pollable's idle window, ns
        self._last_work = [time.monotonic_ns()] * len(pollables)   # adaptive: each one's last work, ns
        self._armed_at: list[int | None] = [None] * len(pollables)  # adaptive: when each was armed
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)   # stop, or a membership change
        self._stopping = False
        # membership changes (attach/detach from other threads), applied between rounds
        self._cond = threading.Condition()
        self._pending: list[tuple[list, list]] = []
        self._requested = self._applied = 0
        self._running = False
        self._poller = None          # select.poll over the wake fds (adaptive/notify sleeps), per membership
        self._any_c_path = False     # does any pollable have a C round (c_job)?  per membership
        self._c_jobs: list = []      # each pollable's c_job method, or None (per membership)
        self._c_locks: list = []     # each pollable's c_locks method, or None (per membership)
        self._group: list[list[int]] = []   # each pollable's group: its server and the pollables it serves
        self.sleeps = 0
        self.polls = 0
        self.work = 0
        self.yields = 0              # sched_yield calls of the C round's idle spin

    def request_stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wake_fd, 1)

    def close(self) -> None:
        os.close(self._wake_fd)

    # -- membership: several VMs' / frontends' queues come and go on one running loop -------------------
    def attach(self, pollables: list[Pollable], timeout: float = 5.0) -> bool:
        """Serve ``pollables`` too (callable from any thread); returns True once the loop serves them,
        False if it did not reach its next round within ``timeout`` seconds (they are served from
        then on).  Raises ValueError if this mode needs a wake eventfd that one of them lacks."""
        if self.mode != "poll" and any(p.wake_fd is None for p in pollables):
            raise ValueError(f"{self.mode} mode needs a wake eventfd for every pollable")
        return self._change(list(pollables), [], timeout)

    def detach(self, pollables: list[Pollable], timeout: float = 5.0) -> bool:
        """Stop serving ``pollables``; returns True once the loop no longer touches them (their
        owner may then unmap their memory and close their fds), False if the loop did not finish
        its current round within ``timeout`` seconds (stuck in host I/O)."""
        return self._change([], list(pollables), timeout)

    def _change(self, add: list, remove: list, timeout: float) -> bool:
        with self._cond:
            self._pending.append((add, remove))
            self._requested += 1
            ticket = self._requested
            if not self._running:
                self._apply_pending()
                return True
        os.eventfd_write(self._wake_fd, 1)   # a sleeping loop looks at the change now
        with self._cond:
            return self._cond.wait_for(lambda: self._applied >= ticket, timeout)

    def _apply_pending(self) -> None:
        """Apply queued attach/detach requests (called with ``_cond`` held, between rounds)."""
        now = time.monotonic_ns()
        for add, remove in self._pending:
            gone = {id(p) for p in remove}
            keep = [i for i, p in enumerate(self.pollables) if id(p) not in gone]
            self.pollables = [self.pollables[i] for i in keep] + add
            self.windows = [self.windows[i] for i in keep] + [self.poll_ns] * len(add)
            self._last_work = [self._last_work[i] for i in keep] + [now] * len(add)
            self._armed_at = [self._armed_at[i] for i in keep] + [None] * len(add)
        self._pending.clear()
        self._poller = None          # the sleep's poll set is rebuilt for the new membership
        # looked up once per membership: a poll round without C jobs (the doorbell device, NICs) must
        # not pay a getattr per pollable per round (0.3-0.7 µs of a 1.2 µs doorbell round trip)
        self._c_jobs = [getattr(p, "c_job", None) if _c_serve is not None else None for p in self.pollables]
        self._any_c_path = any(j is not None for j in self._c_jobs)
        self._c_locks = [getattr(p, "c_locks", None) for p in self.pollables]
        # groups: a pollable whose ``served_by`` (a NIC queue's pollable: its pair's server) is a member
        # joins its server's group -- not polled nor watched while the server has a C job, and armed and
        # disarmed with it, so that a pair is kick-driven as a whole or polled as a whole
        where = {id(p): i for i, p in enumerate(self.pollables)}
        groups = [[i] for i in range(len(self.pollables))]
        self._group = list(groups)
        for i, p in enumerate(self.pollables):
            owner = where.get(id(getattr(p, "served_by", None)))
            if owner is not None and owner != i:
                groups[owner].append(i)
                self._group[i] = groups[owner]
        self._applied = self._requested
        self._cond.notify_all()

    def _between_rounds(self) -> bool:
        """Apply pending membership changes; True if there were any (the per-pollable lists changed)."""
        if not self._pending:
            return False
        with self._cond:
            self._apply_pending()
        return True

    # ------------------------------------------------------------------
    def run(self) -> None:
        bd = _breakdown.ACTIVE
        if bd is not None:
            cpu_start = time.thread_time_ns()
        with self._cond:
            self._running = True
            self._apply_pending()
        try:
            self._run(bd)
        finally:
            with self._cond:
                self._running = False
                self._apply_pending()      # a detach waiting on the loop's last round returns
            if bd is not None:
                bd.thread_cpu_ns += time.thread_time_ns() - cpu_start

    def _run(self, bd) -> None:
        if self.mode == "adaptive":
            self._run_adaptive(bd)
        elif self.mode == "poll":
            self._run_poll(bd)
        else:
            while not self._stopping:
                self._between_rounds()
                if not self._poll_once():
                    self._sleep()  # notify: the guest always rings, nothing to arm

    def _run_poll(self, bd) -> None:
        """Poll mode: a round polls every pollable, then goes straight to the GIL-free spin, which
        returns at once while a watched word is already ahead of what was consumed -- one Python pass
        over the pollables per batch, not two."""
        now = time.monotonic_ns()
        while not self._stopping:
            self._between_rounds()
            if bd is not None:   # detection = this iteration's time minus the other phases and idle waits
                t_iter, phases0 = time.monotonic_ns(), sum(bd.ns.values())
            if self._poll_round(bd):      # the C round served a slice
                now = time.monotonic_ns()
                continue
            self._poll_once()
            now = self._spin_until(now + SPIN_SLICE_NS, bd, t_iter if bd is not None else 0,
                                   phases0 if bd is not None else 0)

    def _poll_round(self, bd) -> bool:
        """Poll mode with a C round: the queues that have a C path are served by ``_vring.serve``
        (completions and interrupts included) for a spin slice; the others are polled here and their
        words watched by it.  False (nothing done) when no pollable has a C path.  A method of its own
        so that its locals (jobs pinning a detached VM's rings) die with the round."""
        if not self._any_c_path:
            return False
        jobs, at, held, lock_watches = self._take_jobs(None)
        try:
            if not jobs:
                return False
            self.polls += 1
            served = {k for i in at for k in self._group[i]}
            rest = [p for i, p in enumerate(self.pollables) if i not in served]
            for p in rest:
                if p.poll():
                    self.work += 1
            self._c_round(jobs, [self.pollables[i] for i in at], rest, lock_watches, SPIN_SLICE_NS, bd)
            return True
        finally:
            _release(held)

    def _run_adaptive(self, bd) -> None:
        """Adaptive mode, with one idle window per pollable (see the module docstring).

        A busy round costs what a poll-mode round costs: it reads no clock in Python (``now`` is
        the time the GIL-free spin returned, read in C: when the work was seen; with a C round, one
        read per C round, which serves many requests) and looks at the windows only once ``now``
        reaches ``check_at``, a time before which not every unarmed pollable's window can have run
        out (a pollable that is disarmed joins them, so ``check_at`` is then reset), and at most
        :data:`SPIN_SLICE_NS` after it was set, so that the spin returns to look at ``_stopping``
        and membership changes.  ``check_at`` may be early (a pollable that
        worked since has moved its own deadline on): then :meth:`_arm_idle` arms nothing and sets it
        afresh.
        """
        now = time.monotonic_ns()
        check_at = now
        pollables, windows, last_work, armed_at = self.pollables, self.windows, self._last_work, self._armed_at
        while not self._stopping:
            if self._between_rounds():   # the per-pollable lists were replaced: look at every window
                pollables, windows, last_work, armed_at = (self.pollables, self.windows, self._last_work,
                                                           self._armed_at)
                # the loop variable must not outlive a detached pollable: it holds that VM's ring
                # views, so its owner could not unmap the memory (with no VM left, no loop rebinds it)
                p = None
                check_at = now
            if bd is not None:
                t_iter, phases0 = time.monotonic_ns(), sum(bd.ns.values())
            self.polls += 1
            if self._any_c_path:
                # the unarmed queues with a C path are served in C until check_at (or until a watched
                # word of the others changes); the others are polled here first
                now, check_at, served = self._adaptive_c_round(now, check_at, bd)
            else:
                served = False
                for i, p in enumerate(pollables):
                    if p.poll():
                        self.work += 1
                        last_work[i] = now
                        if armed_at[i] is not None:   # busy again: back to polling it, on a window of its
                            self._disarm(i, now)      # own that check_at did not count: look at them all now
                            check_at = now
            if now >= check_at:
                check_at = self._arm_idle(now)
                if check_at is None:
                    # every pollable is armed: sleep until one of their eventfds (or stop) fires.  Then
                    # every pollable is disarmed and starts a fresh window (while the loop polls, none is
                    # armed: its driver's kicks would be exits for nothing); also, a pollable armed before
                    # its queue was live (no ring yet) had nothing to enable, so only a new arm() after
                    # the wake makes it kick-driven for real
                    self._sleep()
                    now = check_at = time.monotonic_ns()
                    for i in range(len(pollables)):
                        self._disarm(i, now)
                    continue
            if served:      # the C round spun until check_at or returned with work for Python
                continue
            now = self._spin_until(check_at, bd, t_iter if bd is not None else 0, phases0 if bd is not None else 0)

    def _adaptive_c_round(self, now: int, check_at: int, bd) -> tuple[int, int, bool]:
        """One adaptive round with the C round: poll the pollables without a C job this round (armed
        ones, which C does not serve: their handshake is Python's; pollables with no C path) -- one
        with work is disarmed --, then serve the others in C until ``check_at`` (ns), a watched word
        of the polled ones changes or a job needs Python.  Returns ``(now, check_at, served)``: the
        monotonic time after the round (ns), ``check_at`` (now, if a polled one was disarmed: its window
        must be counted) and whether the C round ran (it did the waiting, so no spin follows).
        Each C-served pollable's last work (and its group's) is its last completion's time, read in C.
        A pollable with a C path also has ``has_work() -> bool``: an armed one with work is disarmed
        (with its group) and served in C."""
        pollables, last_work, armed_at = self.pollables, self._last_work, self._armed_at
        for i, c_job in enumerate(self._c_jobs):
            if c_job is not None and armed_at[i] is not None and pollables[i].has_work():
                # an armed queue with work: disarmed first, so that C serves it this round (in Python
                # its requests would cost a handle_queue each, interrupt included)
                self._disarm(i, now)
                check_at = now
        jobs, at, held, lock_watches = self._take_jobs(armed_at)
        try:
            served = {k for i in at for k in self._group[i]}
            rest = []
            for i, p in enumerate(pollables):
                if i in served:
                    continue
                rest.append(p)
                if p.poll():
                    self.work += 1
                    last_work[i] = now
                    if armed_at[i] is not None:
                        self._disarm(i, now)
                        check_at = now
            if not jobs:
                return now, check_at, False
            # while C sees work the windows cannot run out: it goes on by the shortest window after it
            extend = min(self.windows[i] for i in at)
            last = self._c_round(jobs, [pollables[i] for i in at], rest, lock_watches, max(0, check_at - now), bd,
                                 extend)
        finally:
            _release(held)
        now = time.monotonic_ns()
        for i, t in zip(at, last):
            for k in self._group[i]:
                if t > last_work[k]:
                    last_work[k] = t
        return now, check_at, True

    def _arm_idle(self, now: int) -> int | None:
        """Once the idle window of every unarmed pollable has run out by ``now`` (ns), arm them all:
        publish, fence, re-check each -- one where work slipped in meanwhile is disarmed, its window
        starts afresh and the loop polls on.  None is armed earlier, alone, while the loop still polls
        for another: its driver would then kick (an exit) for nothing, since the loop sees its work
        anyway, and the loop can sleep only once all are armed.  Returns when to look again (ns): when
        the last unarmed window runs out, but no later than ``now`` + :data:`SPIN_SLICE_NS`; None if
        every pollable is armed (the loop sleeps)."""
        pollables, windows, last_work, armed_at = self.pollables, self.windows, self._last_work, self._armed_at
        latest = None
        for i in range(len(pollables)):
            if armed_at[i] is None:
                due = last_work[i] + windows[i]
                if latest is None or due > latest:
                    latest = due
        if latest is None:
            return None
        if latest > now:
            return min(latest, now + SPIN_SLICE_NS)
        check_at = None
        slipped = []
        for i, p in enumerate(pollables):
            if armed_at[i] is not None:
                continue
            if not p.arm():           # nothing slipped in: kick-driven from now on
                armed_at[i] = now
            else:
                slipped.append(i)
        for i in slipped:             # work arrived while arming: keep polling it and its group, look again now
            for k in self._group[i]:
                if k == i or armed_at[k] is not None:
                    pollables[k].disarm()
                    armed_at[k] = None
                    last_work[k] = now
            check_at = now
        return check_at

    def _take_jobs(self, armed_at: list | None) -> tuple[list, list[int], list, list[tuple[int, int]]]:
        """``(jobs, at, held, lock_watches)`` for one C round: each job (``p.c_job()``) with its pollable's
        index, the locks taken for them (``p.c_locks()``, held until :func:`_release`: from before the job's
        state is read until after ``c_done``), and the watches of those locks that have a word (a
        :class:`~exitless.sidecore.spin.WatchedLock`: a thread that wants one ends the round), read when
        this thread first took it.  ``armed_at``: adaptive, an armed pollable gets no job (None: poll)."""
        jobs, at, held = [], [], []
        lock_watches: dict[int, tuple[int, int]] = {}
        try:
            for i, c_job in enumerate(self._c_jobs):
                if c_job is None or (armed_at is not None and armed_at[i] is not None):
                    continue
                locks = self._c_locks[i]() if self._c_locks[i] is not None else ()
                taken = []
                try:
                    for lock in locks:
                        lock.acquire()
                        taken.append(lock)
                        addr = getattr(lock, "word_address", None)
                        if addr is not None and addr not in lock_watches:
                            lock_watches[addr] = (addr, lock.word)
                    job = c_job()
                except BaseException:
                    _release([taken])
                    raise
                if job is None:
                    _release([taken])
                    continue
                held.append(taken)
                jobs.append(job)
                at.append(i)
        except BaseException:
            _release(held)
            raise
        return jobs, at, held, list(lock_watches.values())

    def _c_round(self, jobs: list, owners: list, rest: list, lock_watches: list, timeout_ns: int, bd,
                 extend_ns: int = 0) -> list[int]:
        """Serve ``jobs`` in C (``_vring.serve``: chains, used ring, interrupt decision and irqfd write,
        ``QUEUE_BUDGET`` chains per queue or TX frames per pair per pass) for up to ``timeout_ns`` ns, or
        until a watched word of ``rest`` or ``lock_watches`` changes or a job needs the Python device model
        (its ``c_done`` does that, and the pollable is then polled here); ``extend_ns`` (adaptive): work
        seen in C moves the end to at least that long after it, up to :data:`SPIN_SLICE_NS` in all.
        Returns each owner's last completion time (CLOCK_MONOTONIC ns; 0: none)."""
        watches = [w for p in rest for w in p.watches()] + lock_watches
        times = bytearray(40) if bd is not None else None
        reason, index, results, idle_ns, yields = _c_serve(jobs, watches, timeout_ns, QUEUE_BUDGET, times,
                                                           self.idle_yield_ns, extend_ns, SPIN_SLICE_NS)
        self.yields += yields
        last = []
        done = 0
        for p, r in zip(owners, results):
            n, t = p.c_done(r)
            done += n
            self.work += n > 0
            last.append(t if n else 0)
        if reason == 1 and owners[index].poll():   # the next chain of that ring is for Python
            self.work += 1
            last[index] = time.monotonic_ns()
        if bd is not None:
            for phase, ns in zip(("ring_read", "chain_walk", "request_parse", "host_io", "used_write"),
                                 struct.unpack("<5Q", times)):
                bd.add(phase, ns)
            bd.requests += done
            bd.fast_requests += done
            bd.batches += sum(1 for t in last if t)
            bd.idle_cpu_ns += idle_ns    # CPU spent spinning with nothing to do inside the C round
        return last

    def _spin_until(self, deadline_ns: int, bd, t_iter: int, phases0: int) -> int:
        """Wait until ``deadline_ns`` (monotonic) for a watched word to change, in C without the GIL;
        returns the monotonic time at return."""
        if bd is None:
            return wait_until(self._all_watches(), deadline_ns)
        c_idle, t_idle = time.thread_time_ns(), time.monotonic_ns()
        now = wait_until(self._all_watches(), deadline_ns)
        idle = now - t_idle
        bd.idle_cpu_ns += time.thread_time_ns() - c_idle
        bd.add("detection", max(0, now - t_iter - idle - (sum(bd.ns.values()) - phases0)))
        return now

    def _poll_once(self) -> bool:
        self.polls += 1
        worked = False
        for p in self.pollables:
            if p.poll():
                worked = True
                self.work += 1
        return worked

    def _all_watches(self) -> list[tuple[int, int]]:
        return [w for p in self.pollables for w in p.watches()]

    def _sleep(self) -> set[int] | None:
        """Sleep until the loop's eventfd or a pollable's ``wake_fd`` fires; drain what fired.  Returns
        the pollables' eventfds that fired, or None when the loop's own did (stop or membership change:
        every pollable is to be looked at).  The poll set is built once per membership, not per sleep."""
        self.sleeps += 1
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self._wake_fd, select.POLLIN)
            for p in self.pollables:
                self._poller.register(p.wake_fd, select.POLLIN)
        events = self._poller.poll()
        fired: set[int] | None = {fd for fd, _ in events}
        if self._wake_fd in fired:
            if not self._stopping:
                try:
                    os.eventfd_read(self._wake_fd)   # a membership change woke us: consumed
                except BlockingIOError:
                    pass
            fired = None
        for p in self.pollables:
            if fired is None or p.wake_fd in fired:
                p.drain()
        return fired

    def _disarm(self, i: int, now: int) -> None:
        """Armed pollable ``i`` is busy again (or the loop woke) at ``now`` (ns): it and its group are
        polled from now on, each on a fresh window adapted to the armed spell that just ended."""
        armed_at = self._armed_at
        for k in self._group[i]:
            if armed_at[k] is not None:
                self.pollables[k].disarm()
                self._adapt(k, now - armed_at[k])
                armed_at[k] = None
                self._last_work[k] = now

    def _adapt(self, i: int, armed_ns: int) -> None:
        """Pollable ``i``'s window after an armed spell of ``armed_ns``.  QEMU's rule
        (util/aio-posix.c): a spell that ended within ``poll_max_ns`` would have been avoided
        by polling longer, so poll longer; a longer one was real idleness, so poll less.

        (Doubling only when a sleep was shorter than the window itself left the window stuck at its
        minimum whenever the driver's next request came 2-8 windows later -- e.g. 16 µs against a
        doorbell exit of ~50 µs on this nested host -- and every request then paid a sleep and a kick.)
        """
        if armed_ns <= self.poll_max_ns:
            self.windows[i] = min(self.windows[i] * 2, self.poll_max_ns)
        else:
            self.windows[i] = max(self.windows[i] // 2, ADAPTIVE_MIN_NS)


def _release(held: list) -> None:
    """Release the locks of :meth:`SidecoreLoop._take_jobs` (each job's, in reverse order)."""
    for locks in reversed(held):
        for lock in reversed(locks):
            lock.release()


class SidecoreThread:
    """A sidecore loop on a thread of the VMM (a Worker: ``stop()`` ends it)."""

    def __init__(self, loop: SidecoreLoop):
        self.loop = loop
        self.thread = threading.Thread(target=self._main, name=loop.name, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> "SidecoreThread":
        self.thread.start()
        return self

    def _main(self) -> None:
        threadname.set_current(self.loop.name)
        profile_dir = os.environ.get("EXITLESS_PROFILE_SIDECORE")
        try:
            if profile_dir:  # where does a sidecore's time go? (cProfile profiles only its own thread)
                import cProfile

                cProfile.runctx("self.loop.run()", globals(), {"self": self},
                                os.path.join(profile_dir, f"{self.loop.name}-{os.getpid()}.prof"))
            else:
                self.loop.run()
        except BaseException as e:  # reported by stop(); the VM keeps running without this device
            self.error = e
            log.error("%s died\n%s", self.loop.name, traceback.format_exc())

    def cpu_seconds(self) -> float | None:
        return None  # part of the VMM process's own CPU time

    def stop(self) -> None:
        self.loop.request_stop()
        self.thread.join(5)
        self.loop.close()
