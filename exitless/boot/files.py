"""Reading the kernel and initrd files a user names: regular files only, of a size that can fit.

``Path.read_bytes()`` on what a user passes as ``--kernel`` or ``--initrd`` blocks forever on a FIFO
(and on opening it), and reads without end from ``/dev/zero`` until the VMM is killed for memory.
Every loader reads through :func:`read_image`, which opens without blocking, refuses anything but
a regular file, and refuses a file larger than the guest RAM it is meant for before reading a byte.
"""
from __future__ import annotations

import os
import stat

from .pvh import KernelImageError


def _name(path, what: str) -> str:
    return f"{what} {path}" if what else str(path)


def _open_image(path, what: str, max_bytes: int | None) -> tuple[int, int]:
    """(an fd of the regular file ``path``, its size); the checks of :func:`read_image`."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (the fstat below then refuses it)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise KernelImageError(f"{_name(path, what)}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise KernelImageError(f"{_name(path, what)}: Is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise KernelImageError(f"{_name(path, what)}: not a regular file (a FIFO, socket or device cannot be "
                                   "read as an image)")
        if max_bytes is not None and st.st_size > max_bytes:
            raise KernelImageError(f"{_name(path, what)}: {st.st_size / (1 << 20):.1f} MiB does not fit in "
                                   f"{max_bytes >> 20} MiB of guest RAM")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def check_image(path: str | os.PathLike, what: str = "", max_bytes: int | None = None) -> None:
    """Raise what :func:`read_image` would for ``path``, without reading it (a command checks its files
    before it decides anything from them)."""
    os.close(_open_image(path, what, max_bytes)[0])


def read_image(path: str | os.PathLike, what: str = "", max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (a kernel or an initrd, ``what`` names it in messages).

    ``max_bytes``: the most it may hold (the guest RAM, bytes); None: no limit beyond the file's size.
    Raises :class:`~exitless.boot.pvh.KernelImageError`: the file cannot be opened, is not a regular
    file (a directory, FIFO, socket or device), or is larger than ``max_bytes``.
    """
    fd, size = _open_image(path, what, max_bytes)
    try:
        os.set_blocking(fd, True)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(size)
    except OSError as e:
        raise KernelImageError(f"{_name(path, what)}: {e.strerror}") from e
    finally:
        os.close(fd)
    if len(data) != size:
        raise KernelImageError(f"{_name(path, what)}: changed size while it was read")
    return data


def is_regular_file(path: str | os.PathLike) -> bool:
    """Is ``path`` a regular file (following symlinks)?  False if it cannot be stat'ed."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False
