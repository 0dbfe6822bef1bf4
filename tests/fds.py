"""The test process's open file descriptors, for leak checks."""
from __future__ import annotations

import gc
import os


def open_fds() -> int:
    """How many fds this process holds, after a garbage collection: objects dropped earlier (a guest
    memory, a socket) close theirs when collected, and a collection that happened to run in the middle
    of a measured section would otherwise look like that section closing fds it never opened."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))
