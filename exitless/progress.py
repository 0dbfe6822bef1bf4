"""Progress of long steps (fetching the guest, building an image), reported to whoever shows it.

Library code takes a :class:`Progress` (default :data:`QUIET`) and wraps each long step::

    with progress.step("downloading linux-image-6.1.0-cloud-amd64", total=nbytes) as update:
        ...
        update(bytes_so_far)

``total`` and the values given to ``update`` share one unit (bytes for downloads); without
``total`` the step is shown as running, with its elapsed time.  :data:`QUIET` shows nothing
(it logs the step at DEBUG level); :mod:`exitless.cli.progress` shows steps with rich on a
terminal.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class Progress:
    """Reports nothing; subclasses show the steps (override :meth:`step`)."""

    @contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """Run the body as one step; yields ``update(completed)`` (same unit as ``total``)."""
        log.debug("%s ...", description)
        yield _ignore


def _ignore(completed: int) -> None:
    pass


#: The default: no output.
QUIET = Progress()
