"""How far a Linux boot got, read from its console line by line: the boot milestones.

One parser for every VMM a benchmark boots (exitless's :class:`exitless.boot.linux.BootConsole`
feeds it as the guest prints; ``exitless bench boot`` feeds it QEMU's serial output), so the
same console text gives the same milestones whoever printed it:

* ``first_line_s``: the line holding :data:`FIRST_LINE` ("Linux version ", the banner
  ``start_kernel`` prints first; with ``earlyprintk=serial`` it is the kernel's first console line);
* ``init_s``: the kernel's "Run /init as init process" (``run_init_process`` in init/main.c,
  ``KERN_INFO``: shown unless ``quiet``), the moment before it executes the initramfs's /init;
* ``userspace_s``: a line that is exactly the initramfs's READY marker (``/init`` printed it once
  it had mounted /proc, /sys, /dev and loaded its modules, see :func:`exitless.boot.initramfs.make_init`);
* ``kernel_time_s``: the last printk timestamp seen ("[   12.345678] ..."): how far into its own
  boot, by the guest's clock, the kernel got;
* ``last_line``: the last line (at most :data:`LAST_LINE_MAX` characters).

Times are what the caller passes with each line (seconds from the VMM's start, in the
benchmark).  Each milestone is the *first* line that matches; a later match (a command echoing
"Linux version") moves nothing.  Power-off is not on the console: the caller knows when and how
the VM stopped and passes it to :meth:`BootMilestones.row`.
"""
from __future__ import annotations

import re

from .initramfs import READY_MARKER

FIRST_LINE = "Linux version "
#: init/main.c run_init_process(): pr_info("Run %s as init process\n", init_filename)
INIT_LINE = re.compile(r"\bRun (\S+) as init process\b")
PRINTK_TIME = re.compile(r"^\[\s*(\d+\.\d+)\]")
#: how far a boot got, in order; ``row()["reached"]`` is one of these
REACHED = ("nothing", "early-boot", "init", "userspace", "power-off")
LAST_LINE_MAX = 160


class BootMilestones:
    """The milestones seen so far on one boot's console (see the module docstring).

    Feed it complete lines (no line end) with :meth:`feed`; memory stays O(1) whatever the guest prints.
    """

    def __init__(self, ready_marker: str = READY_MARKER):
        self.ready_marker = ready_marker
        self.first_line_s: float | None = None
        self.init_s: float | None = None
        self.init_path: str | None = None
        self.userspace_s: float | None = None
        self.kernel_time_s: float | None = None
        self.last_line = ""

    def feed(self, t: float, line: str) -> None:
        """One console line, ended at ``t`` seconds (the caller's clock)."""
        self.last_line = line[:LAST_LINE_MAX]
        if line.startswith("["):
            m = PRINTK_TIME.match(line)
            if m:
                self.kernel_time_s = float(m.group(1))
        if self.first_line_s is None and FIRST_LINE in line:
            self.first_line_s = t
        if self.init_s is None:
            m = INIT_LINE.search(line)
            if m:
                self.init_s, self.init_path = t, m.group(1)
        if self.userspace_s is None and line.strip() == self.ready_marker:
            self.userspace_s = t

    def feed_text(self, text: str, times=None) -> "BootMilestones":
        """Every line of captured console ``text`` (``\\r\\n`` or ``\\n``); line *i* ended at ``times[i]``
        (default: *i* itself, for a console captured without times).  Returns ``self``."""
        lines = text.replace("\r\n", "\n").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        for i, line in enumerate(lines):
            self.feed(float(i) if times is None else times[i], line)
        return self

    def reached(self, poweroff_s: float | None = None) -> str:
        """The furthest milestone seen: one of :data:`REACHED` (``power-off`` iff ``poweroff_s`` is not None)."""
        if poweroff_s is not None:
            return "power-off"
        for name, at in (("userspace", self.userspace_s), ("init", self.init_s), ("early-boot", self.first_line_s)):
            if at is not None:
                return name
        return "nothing"

    def row(self, poweroff_s: float | None = None) -> dict:
        """The milestones as a benchmark row's fields (seconds; None for a milestone never seen)."""
        return {"first_line_s": self.first_line_s, "init_s": self.init_s, "userspace_s": self.userspace_s,
                "poweroff_s": poweroff_s, "reached": self.reached(poweroff_s), "kernel_time_s": self.kernel_time_s,
                "last_line": self.last_line}
