"""``exitless doctor``: is /dev/kvm usable, and what will guests get."""
from __future__ import annotations


def register(sub) -> None:
    """Add ``doctor`` to the top-level subparsers."""
    doc = sub.add_parser("doctor", help="check /dev/kvm and say what guests will get")
    doc.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    from ..doctor import diagnose, format_report

    rep = diagnose()
    print(format_report(rep))
    return 0 if rep.usable else 1
