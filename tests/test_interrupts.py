"""SIGTERM/Ctrl-C unwind a command, but never from inside an uninterruptible section (exitless.interrupts)."""
from __future__ import annotations

import os
import signal

import pytest
from hypothesis import given, settings, strategies as st

from exitless import interrupts


def _deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])      # let it in now, in this (main) thread


@pytest.mark.parametrize("signum,exc", [(signal.SIGTERM, interrupts.Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_inside_a_section_is_raised_when_it_ends(signum, exc) -> None:
    ran_to_end = []
    with interrupts.installed():
        with pytest.raises(exc):
            with interrupts.uninterruptible():
                _deliver(signum)
                for _ in range(1000):     # many bytecodes: the handler has run by now
                    pass
                ran_to_end.append(True)
    assert ran_to_end == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@settings(max_examples=30, deadline=None)
@given(depth=st.integers(1, 4), at=st.integers(0, 3))
def test_nested_sections_raise_once_at_the_outermost_end(depth: int, at: int) -> None:
    at = min(at, depth - 1)
    exits: list[int] = []

    def nest(level: int) -> None:
        with interrupts.uninterruptible():
            if level == at:
                _deliver(signal.SIGINT)
            if level + 1 < depth:
                nest(level + 1)
            exits.append(level)

    with interrupts.installed():
        with pytest.raises(KeyboardInterrupt):
            nest(0)
    assert exits == list(reversed(range(depth)))     # every section ran to its end, inner first


def test_outside_a_section_the_signal_unwinds_at_once() -> None:
    with interrupts.installed():
        with pytest.raises(interrupts.Terminated):
            _deliver(signal.SIGTERM)
            for _ in range(1000):
                pass
            pytest.fail("SIGTERM did not unwind")
