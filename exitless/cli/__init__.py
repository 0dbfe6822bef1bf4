"""The ``exitless`` command: run a guest, serve a device, benchmark the I/O paths, check the host.

One module per command group; each has ``register(subparsers)`` that adds its
parser(s) and sets ``func`` (``cmd_*(args) -> exit status``).  A new group is a new
module listed in :data:`GROUPS`; a new sub-command of a group (``serve net``,
``bench nvme``) is an ``add_parser`` in that group's module.  The modules import
nothing from this package's ``__init__`` (no cycles); shared argument types live
in :mod:`exitless.cli.options`.

Errors: a command lets :class:`exitless.errors.ExitlessError` propagate; :func:`main`
prints its message on one line and exits 2 (the user's input or host is at fault).
Any other exception is a bug in exitless and surfaces with its traceback.  Ctrl-C and
SIGTERM unwind the command (its ``finally`` blocks stop VMs and child processes, delete
network namespaces and temporary files) and exit 130 and 143 in one line; a command that
handles them itself (``serve``, ``run`` of Linux) installs its own handlers.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from .. import __version__
from ..errors import ExitlessError
from . import bench, doctor, guest, run, serve, sidecore

#: The command groups, in ``--help`` order.
GROUPS = (run, guest, serve, sidecore, bench, doctor)


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors naming the (sub)command at fault; every subparser is one.

    A bad or unknown option prints ``exitless run: error: ...`` and a pointer to that
    command's ``--help`` (not the whole usage block), and exits 2.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        # a leaf command reports its own unknown options, so the message names its usage
        if extras and not any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="exitless", description="Run a guest, serve a device, benchmark the I/O paths, "
                                "check the host.")
    p.add_argument("--version", action="version", version=f"exitless {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log exitless's debug messages to stderr")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return p


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread, like ``KeyboardInterrupt`` for Ctrl-C, to unwind the command.

    A ``BaseException`` so that no ``except Exception`` on the way swallows it.
    """


_owner_pid = 0       # the process whose main() installed _raise_terminated


def _raise_terminated(signum, frame):
    if os.getpid() != _owner_pid:
        # a forked child (pyroute2's netns helper) inherits the handler and is stopped with SIGTERM:
        # it must die as it would have, not unwind a copy of our stack (and delete our netns twice)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    # one is enough: a second SIGTERM must not interrupt the clean-up the first one started
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default ``sys.argv[1:]``); return its exit status.

    2 for an :class:`~exitless.errors.ExitlessError` (its message on one line), 130 after
    Ctrl-C, 143 after SIGTERM -- both after the command's clean-up ran.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="exitless: %(levelname)s %(name)s: %(message)s")
    global _owner_pid
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_DFL:
        _owner_pid = os.getpid()       # the default would kill us without clean-up (leaking netns, temp dirs)
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.func(args)
    except ExitlessError as e:
        print(f"exitless: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nexitless: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("\nexitless: SIGTERM: stopped", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
