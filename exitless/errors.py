"""The one base class of exitless's own errors.

Every error the VMM raises on purpose — bad user input (a flag, a disk spec, a kernel
image), a guest or frontend breaking a protocol, a host resource that is missing —
derives from :class:`ExitlessError`.  The CLI catches exactly this class and reports it
as the user's problem (exit 2); anything else is a bug in exitless and surfaces with its
traceback.  Subclasses may also derive from a builtin (``ValueError``, ``OSError``) so
callers that catch those keep working.
"""
from __future__ import annotations


class ExitlessError(Exception):
    """Base of every error exitless raises deliberately; its message is for the user.

    A subclass that is also an ``OSError``, raised as ``(errno, message)``, prints as the message alone:
    OSError's ``[Errno 2] ...`` prefix says nothing to the user (the message names the cause).
    """

    def __str__(self) -> str:
        if isinstance(self, OSError) and self.strerror:
            return self.strerror if self.filename is None else f"{self.filename}: {self.strerror}"
        return super().__str__()
