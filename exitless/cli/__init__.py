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
import sys

from .. import __version__, interrupts
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
    _name_subcommands(p)
    return p


def _name_subcommands(parser: argparse.ArgumentParser) -> None:
    """Give every sub-command choice a metavar listing its choices, so that a missing one reads
    "the following arguments are required: {blk,net}" rather than naming an internal ``dest``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            if action.metavar is None:
                action.metavar = "{" + ",".join(action.choices) + "}"
            for child in dict.fromkeys(action.choices.values()):
                _name_subcommands(child)


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default ``sys.argv[1:]``); return its exit status.

    2 for an :class:`~exitless.errors.ExitlessError` (its message on one line), 130 after
    Ctrl-C, 143 after SIGTERM -- both after the command's clean-up ran.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="exitless: %(levelname)s %(name)s: %(message)s")
    try:
        with interrupts.installed():
            return args.func(args)
    except ExitlessError as e:
        print(f"exitless: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nexitless: interrupted", file=sys.stderr)
        return 130
    except interrupts.Terminated:
        print("\nexitless: SIGTERM: stopped", file=sys.stderr)
        return 143
