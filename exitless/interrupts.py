"""Stopping a command on SIGTERM (and Ctrl-C) by unwinding it, outside the sections that cannot be unwound.

Python runs a signal handler in the main thread between any two bytecodes, so an exception raised by
it can land anywhere: between a lock's acquire and its ``try`` (logging's module lock, left held:
the next thread that logs waits forever), inside a thread start/join that was handing a network
namespace over, or inside pyroute2's forked helpers.  :func:`uninterruptible` marks such a section:
a SIGTERM or SIGINT that arrives inside it is recorded and raised when the (outermost) section ends.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread, like ``KeyboardInterrupt`` for Ctrl-C, to unwind the command.

    A ``BaseException`` so that no ``except Exception`` on the way swallows it.
    """


_owner_pid = 0            # the process that installed the handlers
_depth = 0                # uninterruptible sections the main thread is in
_pending: type[BaseException] | None = None


def _raise(exc: type[BaseException]) -> None:
    global _pending
    if _depth > 0:
        _pending = _pending or exc
        return
    raise exc()


def _on_sigterm(signum, frame) -> None:
    if os.getpid() != _owner_pid:
        # a forked child (pyroute2's netns helper) inherits the handler and is stopped with SIGTERM:
        # it must die as it would have, not unwind a copy of our stack (and delete our netns twice)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    # one is enough: a second SIGTERM must not interrupt the clean-up the first one started
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _raise(Terminated)


def _on_sigint(signum, frame) -> None:
    if os.getpid() != _owner_pid:
        raise KeyboardInterrupt
    _raise(KeyboardInterrupt)


@contextmanager
def installed():
    """Within this block SIGTERM raises :class:`Terminated` and SIGINT ``KeyboardInterrupt`` in the main
    thread, except inside :func:`uninterruptible` sections.  A handler someone else installed (not the
    default) is left alone.  Must be entered in the main thread."""
    global _owner_pid
    saved = {}
    for signum, ours, default in ((signal.SIGTERM, _on_sigterm, signal.SIG_DFL),
                                  (signal.SIGINT, _on_sigint, signal.default_int_handler)):
        previous = signal.getsignal(signum)
        if previous == default:
            saved[signum] = previous
            signal.signal(signum, ours)
    _owner_pid = os.getpid()
    try:
        yield
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)


@contextmanager
def uninterruptible():
    """Defer SIGTERM/SIGINT's exception to the end of this block (outermost one, main thread only;
    in another thread this is a no-op, since only the main thread runs Python signal handlers)."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            exc, _pending = _pending, None
            raise exc()
