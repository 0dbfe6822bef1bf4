"""argparse ``type=`` callables for sizes and counts, shared by ``exitless run`` and the bench options.

Kept apart from :mod:`exitless.cli.options` (which imports the device models) so that
:mod:`exitless.bench.options` stays light and import-cycle free; :mod:`exitless.cli.options`
re-exports them.  Each raises :class:`argparse.ArgumentTypeError`, which the parser turns into a
one-line usage error (exit 2).
"""
from __future__ import annotations

import argparse
import os

_MEM_UNITS = {"M": 1, "G": 1 << 10, "T": 1 << 20}


def host_ram_mib() -> int:
    """The host's physical RAM in MiB: the upper bound of ``--mem`` (guest RAM is mmap'ed up front)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20


def mem_size(text: str) -> int:
    """argparse ``type=`` for ``--mem``: ``'256'``, ``'256M'``, ``'1G'``, ``'1T'`` -> MiB.

    Refuses (a usage error, exit 2) a size that is not positive or exceeds the host's RAM
    (:func:`host_ram_mib`), before any memory is mapped.  The lower bound is the VM's own
    check (``exitless.vm.MIN_MEM_MIB``).
    """
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = _MEM_UNITS.get(t[-1:], None)
    try:
        mib = int(t[:-1] if unit else t) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad memory size {text!r} (e.g. 256M, 1G)") from None
    if mib <= 0:
        raise argparse.ArgumentTypeError(f"memory size {text!r} must be positive")
    host = host_ram_mib()
    if mib > host:
        raise argparse.ArgumentTypeError(f"memory size {text} is too large: the host has {host} MiB of RAM")
    return mib


#: The largest float option: every one is a duration (seconds, minutes, µs), and a finite 1e300 still
#: overflowed time_t in a timed wait (``run --timeout 1e300`` was a traceback); 1e8 s is three years.
MAX_FLOAT = 1e8


def _number(kind, text: str, *, zero_ok: bool):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v >= 0 if zero_ok else v > 0) or v != v or v == float("inf"):
        finite = "a finite number " if kind is float else ""
        raise argparse.ArgumentTypeError(f"{text} must be {finite}{'>= 0' if zero_ok else '> 0'}")
    if kind is float and v > MAX_FLOAT:
        raise argparse.ArgumentTypeError(f"{text} is more than {MAX_FLOAT:g}")
    return v


def positive_int(text: str) -> int:
    """argparse ``type=`` for a count (operations, rounds, CPUs): an integer > 0."""
    return _number(int, text, zero_ok=False)


def non_negative_int(text: str) -> int:
    """argparse ``type=`` for a count where 0 means none (warm-up operations, a skipped measurement)."""
    return _number(int, text, zero_ok=True)


def positive_float(text: str) -> float:
    """argparse ``type=`` for a duration (a timeout, seconds; minutes): a number in (0, :data:`MAX_FLOAT`]."""
    return _number(float, text, zero_ok=False)


#: The largest ``--scale``: a run a thousand times the default is hours long already; beyond it the counts
#: overflow what the guest kit takes (and 1e308 was infinity, a traceback).
MAX_SCALE = 1000.0


def scale_factor(text: str) -> float:
    """argparse ``type=`` for ``--scale`` (a multiplier of operation or packet counts): finite, in (0, 1000]."""
    v = _number(float, text, zero_ok=False)
    if v > MAX_SCALE:
        raise argparse.ArgumentTypeError(f"{text} is more than {MAX_SCALE:g}")
    return v


def non_negative_float(text: str) -> float:
    """argparse ``type=`` for a duration where 0 means none (a minimum run time, seconds; a poll window, µs):
    a number in [0, :data:`MAX_FLOAT`]."""
    return _number(float, text, zero_ok=True)


def output_file(text: str) -> str:
    """argparse ``type=`` for a file a command writes when it is done (``--json FILE``, ``--plot PNG``):
    ``-`` (stdout) or a path that can be opened for writing -- tried up front (a file this creates is
    removed again), so that a typo fails in one line before a long benchmark, not in a traceback after
    it.  Trying beats ``os.access``, which says yes to root for a read-only file or ``/proc``."""
    if text == "-":
        return text
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    existed = os.path.lexists(text)
    try:
        fd = os.open(text, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text}: {e.strerror}") from None
    os.close(fd)
    if not existed:
        os.unlink(text)
    return text


def output_path(text: str) -> str:
    """argparse ``type=`` for a file a command writes besides its output on stdout (``run --stats FILE``:
    stdout carries the guest's console): as :func:`output_file`, but a file only."""
    if text == "-":
        raise argparse.ArgumentTypeError("give a file: stdout carries this command's own output")
    return output_file(text)


def host_user(text: str) -> str:
    """argparse ``type=`` for ``--user`` (a back-end drops to it after set-up): a user name or uid this host
    knows, checked before anything listens (the drop itself comes later, see :mod:`exitless.confine`)."""
    import pwd

    try:
        pwd.getpwuid(int(text)) if text.isdigit() else pwd.getpwnam(text)
    except (KeyError, ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"no such user: {text!r}") from None
    return text
