"""The sidecore engine: one loop that serves many devices' shared registers and queues.

Modes:
- ``notify``: never poll; sleep on the devices' eventfds (the ``ioeventfd`` path's
  device thread).
- ``poll``: poll forever; between polls spin *in C with the GIL released* until a
  watched word changes, so a sidecore thread never stalls the vCPU threads.  Optionally
  (:data:`SPIN_YIELD_NS`, off by default) the spin yields the CPU between checks after an idle spell.
- ``adaptive``: poll while busy.  Each pollable (queue) keeps its own idle window: once it
  has had no work for its window it is armed on its own (publish EventIdx / clear
  NO_NOTIFY, fence, re-check: a request that slipped in keeps it polled), and it is
  disarmed again as soon as it has work.  The loop sleeps only when *every* pollable is
  armed, on all their eventfds at once, so any one of them wakes it (and then all start a
  fresh window) -- one busy VM's
  queue keeps the sidecore polling without keeping an idle VM's queue from being armed
  (its driver kicks; the kick is picked up by the next round).  A window adapts like
  QEMU's IOThread polling: it doubles when the queue's armed spell ended within the
  longest window (polling longer would have caught that request) and halves after a
  longer one.

Fairness: one round of the loop visits every pollable once, and a queue pollable takes at most
:data:`QUEUE_BUDGET` chains per visit (``handle_queue(index, budget)``), then the next one gets its
turn: a queue flooded at QD128 delays a QD1 queue on the same sidecore by at most one round of
``QUEUE_BUDGET`` requests per other queue, never by the whole flood.  A pollable left with work
keeps a watch that is already "changed", so the GIL-free spin returns at once and the next round
comes straight back to it.

A *pollable* has ``poll() -> bool`` (do available work, at most a round's budget), ``watches()`` (the
``(address, consumed value)`` words whose change means new work), ``arm() ->
bool`` (enable guest notifications; True if work arrived meanwhile),
``disarm()``, ``drain()`` and ``wake_fd``.
"""
from __future__ import annotations

import logging
import traceback
import os
import select
import threading
import time
from typing import Protocol

from ..errors import ExitlessError
from . import breakdown as _breakdown
from .spin import wait_for_change

log = logging.getLogger(__name__)

MODES = ("notify", "poll", "adaptive")
SPIN_SLICE_NS = 1_000_000        # how long one GIL-free spin lasts before Python looks around
# Off by default (0): a polling sidecore may yield the CPU between checks (sched_yield) after this
# many ns without a change.  Measured on the loaded 2-core host (docs/results/net-flood.md): at 20 us
# it cut the sidecore's CPU ~10x and raised polled flood-64 ~2.5x, but a sidecore that gave its CPU
# away was then late for the next request: rr-64 p50 on ``shared`` went from 8.6 us to 12 ms.
SPIN_YIELD_NS = 0
SPIN_YIELD_ENV = "EXITLESS_SPIN_YIELD_NS"     # override in ns (0: never yield), for side-by-side runs


def spin_yield_ns() -> int:
    """The idle spin (ns) after which a polling sidecore yields the CPU between checks: ``SPIN_YIELD_NS``
    (0: never), or ``$EXITLESS_SPIN_YIELD_NS``.  Raises :class:`ExitlessError` for a value that is not a
    non-negative integer."""
    text = os.environ.get(SPIN_YIELD_ENV)
    if text is None:
        return SPIN_YIELD_NS
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ExitlessError(f"{SPIN_YIELD_ENV}={text!r}: a non-negative number of nanoseconds")
    return value


ADAPTIVE_MIN_NS = 16_000
ADAPTIVE_MAX_NS = 512_000
#: Chains one queue may complete per round of the loop (the rest wait for the next round).
QUEUE_BUDGET = 32


class Pollable(Protocol):
    wake_fd: int | None

    def poll(self) -> bool: ...
    def watches(self) -> list[tuple[int, int]]: ...
    def arm(self) -> bool: ...
    def disarm(self) -> None: ...
    def drain(self) -> None: ...


class SidecoreLoop:
    """Runs in a thread of the VMM or as the body of a sidecore process."""

    def __init__(self, pollables: list[Pollable], mode: str, *, poll_ns: int = 64_000, name: str = "sidecore"):
        if mode not in MODES:
            raise ValueError(f"sidecore mode {mode!r}: one of {', '.join(MODES)}")
        if mode != "poll" and any(p.wake_fd is None for p in pollables):
            raise ValueError(f"{mode} mode needs a wake eventfd for every pollable")
        self.pollables = list(pollables)
        self.mode = mode
        self.name = name
        self.poll_ns = poll_ns
        self.yield_ns = spin_yield_ns()
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
        self.sleeps = 0
        self.polls = 0
        self.work = 0

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
        self._applied = self._requested
        self._cond.notify_all()

    def _between_rounds(self) -> None:
        if self._pending:
            with self._cond:
                self._apply_pending()

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
            return
        while not self._stopping:
            self._between_rounds()
            if bd is not None:   # detection = this iteration's time minus the other phases and idle waits
                t_iter, phases0 = time.monotonic_ns(), sum(bd.ns.values())
            worked = self._poll_once()
            if self.mode == "poll":
                # polling: straight to the spin, which returns at once while a watched word is already
                # ahead of what was consumed -- one Python pass over the pollables per batch, not two
                self._spin(SPIN_SLICE_NS, bd, t_iter if bd is not None else 0, phases0 if bd is not None else 0)
            elif not worked:
                self._sleep()  # notify: the guest always rings, nothing to arm

    def _run_adaptive(self, bd) -> None:
        """Adaptive mode, with one idle window per pollable (see the module docstring)."""
        while not self._stopping:
            self._between_rounds()   # the per-pollable lists of a round are replaced by a membership change
            # One round per call: its locals (the pollables it iterated) die with it.  A loop variable
            # left bound to a detached pollable kept that VM's ring views, so its owner could not unmap
            # the memory (the mmap and its fd lived on until another VM's round rebound the variable).
            self._adaptive_round(bd)

    def _adaptive_round(self, bd) -> None:
        """One round of adaptive mode: poll everything, arm what stayed idle for its window, and sleep
        when everything is armed."""
        pollables, windows, last_work, armed_at = self.pollables, self.windows, self._last_work, self._armed_at
        if bd is not None:
            t_iter, phases0 = time.monotonic_ns(), sum(bd.ns.values())
        self.polls += 1
        now = time.monotonic_ns()
        for i, p in enumerate(pollables):
            if p.poll():
                self.work += 1
                last_work[i] = now
                if armed_at[i] is not None:   # busy again: back to polling it
                    p.disarm()
                    self._adapt(i, now - armed_at[i])
                    armed_at[i] = None
        now = time.monotonic_ns()
        wait_ns = None      # the shortest idle window still running
        for i, p in enumerate(pollables):
            if armed_at[i] is not None:
                continue
            left = windows[i] - (now - last_work[i])
            if left <= 0:
                if not p.arm():       # publish, fence, re-check: nothing slipped in
                    armed_at[i] = now
                    continue
                p.disarm()            # work arrived while arming: keep polling it
                last_work[i], left = now, 0
            wait_ns = left if wait_ns is None else min(wait_ns, left)
        if wait_ns is not None:
            if wait_ns > 0:
                self._spin(min(wait_ns, SPIN_SLICE_NS), bd, t_iter if bd is not None else 0,
                           phases0 if bd is not None else 0)
            return
        # every pollable is armed: sleep until one of their eventfds (or stop) fires.  Then every
        # pollable is disarmed and starts a fresh window: a pollable armed before its queue was
        # live (no ring yet) had nothing to enable, so only a new arm() after the wake makes it
        # kick-driven for real
        self._sleep()
        now = time.monotonic_ns()
        for i, p in enumerate(pollables):
            p.disarm()
            self._adapt(i, now - armed_at[i])
            armed_at[i], last_work[i] = None, now

    def _spin(self, budget_ns: int, bd, t_iter: int, phases0: int) -> None:
        """Wait up to ``budget_ns`` for a watched word to change, in C without the GIL."""
        watches = self._all_watches()
        if bd is not None:
            c_idle = time.thread_time_ns()
        t_idle = time.monotonic_ns()
        if watches:
            wait_for_change(watches, budget_ns, self.yield_ns)   # the GIL-free spin
        else:  # nothing to watch yet (no queue is live): look again shortly
            time.sleep(budget_ns / 1e9)
        if bd is not None:
            idle = time.monotonic_ns() - t_idle
            bd.idle_cpu_ns += time.thread_time_ns() - c_idle
            bd.add("detection", max(0, time.monotonic_ns() - t_iter - idle - (sum(bd.ns.values()) - phases0)))

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

    def _sleep(self) -> int:
        self.sleeps += 1
        poller = select.poll()
        poller.register(self._wake_fd, select.POLLIN)
        for p in self.pollables:
            poller.register(p.wake_fd, select.POLLIN)
        t0 = time.monotonic_ns()
        poller.poll()
        if not self._stopping:
            try:
                os.eventfd_read(self._wake_fd)   # a membership change woke us: consumed
            except BlockingIOError:
                pass
        for p in self.pollables:
            p.drain()
        return time.monotonic_ns() - t0

    def _adapt(self, i: int, armed_ns: int) -> None:
        """Pollable ``i``'s window after an armed spell of ``armed_ns``.  QEMU's rule
        (util/aio-posix.c): a spell that ended within ``ADAPTIVE_MAX_NS`` would have been avoided
        by polling longer, so poll longer; a longer one was real idleness, so poll less.

        (Doubling only when a sleep was shorter than the window itself left the window stuck at its
        minimum whenever the driver's next request came 2-8 windows later -- e.g. 16 µs against a
        doorbell exit of ~50 µs on this nested host -- and every request then paid a sleep and a kick.)
        """
        if armed_ns <= ADAPTIVE_MAX_NS:
            self.windows[i] = min(self.windows[i] * 2, ADAPTIVE_MAX_NS)
        else:
            self.windows[i] = max(self.windows[i] // 2, ADAPTIVE_MIN_NS)


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
