"""One NVMe namespace on a host file or block device: LBA geometry and the host I/O behind the commands.

The namespace is LBA-addressed (``lba_size`` 512 or 4096 bytes); a partial
last LBA of the backing file is not exposed.  Data moves zero-copy between the
file and memoryviews onto guest RAM (the PRP segments).  With ``direct=True``
the file is opened ``O_DIRECT``; a command whose guest pages are not aligned
for it goes through an aligned bounce buffer (PRP1 may start at any dword).
Deallocate and Write Zeroes punch holes (``fallocate``), falling back to
zero-range, then to writing zeroes.
"""
from __future__ import annotations

import errno
import hashlib
import mmap
import os

from ...sidecore.spin import address_of
from ..hostio import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, BackingError,
                      StickySync, backing_size, check_handed_fds, fallocate, lock_backing, open_backing, transfer,
                      zero_range)

LBA_SIZES = (512, 4096)


class NamespaceError(BackingError):
    """The backing file cannot serve as a namespace (missing, wrong type, smaller than one LBA, no O_DIRECT);
    shown as ``PATH: WHY``."""


class Namespace:
    """``Namespace(path, lba_size=512, read_only=False, direct=False)``; ``nsze`` is the size in LBAs.

    ``fds``: the backing file already open, as ``(fd, buffered fd or -1)`` (the fd opened O_DIRECT
    when ``direct``, then a buffered one of the same file); the namespace owns them from here on,
    even when it raises, and ``path`` only names it in messages (``exitless sidecore`` receives them
    from a VM).  Raises :class:`NamespaceError` for a file that cannot serve (or fds whose access
    mode does not fit ``read_only``/``direct``).
    """

    def __init__(self, path: str | os.PathLike, *, lba_size: int = 512, read_only: bool = False,
                 direct: bool = False, fds: tuple[int, int] | None = None):
        self.fd, self._fd_buffered = fds if fds is not None else (-1, -1)
        self.path = os.fspath(path)
        self._flusher = StickySync("NVMe")
        try:
            if lba_size not in LBA_SIZES:
                raise NamespaceError(errno.EINVAL, f"NVMe LBA size {lba_size}: one of 512, 4096")
            self.lba_size = lba_size
            self.read_only = read_only
            self.direct = direct
            # O_NONBLOCK: opening a FIFO must fail the type check below, not wait for a writer
            flags = os.O_CLOEXEC | os.O_NONBLOCK | (os.O_RDONLY if read_only else os.O_RDWR)
            if fds is None:
                self.fd = self._open(flags | (os.O_DIRECT if direct else 0), lock=True)
            else:
                check_handed_fds(self.fd, self._fd_buffered, read_only=read_only, direct=direct, what="NVMe",
                                 path=self.path, error=NamespaceError)
                # a no-op on the VM's own locked file description; an fd opened without the lock gets it here
                lock_backing(self.fd, self.path, read_only, "NVMe", NamespaceError)
            size = backing_size(self.fd, self.path, "NVMe", lba_size, NamespaceError)
            self.nsze = size // lba_size
            if fds is None:
                self._fd_buffered = self._open(flags) if direct else self.fd
            elif not direct:
                self._fd_buffered = self.fd
        except BaseException:
            self.close()
            raise
        digest = hashlib.sha1(os.fsencode(os.path.abspath(self.path))).digest()
        self.nguid = digest[:16]
        self.eui64 = digest[16:20] + digest[:4]
        self.serial = "EXL" + digest.hex()[:17]

    def _open(self, flags: int, lock: bool = False) -> int:
        return open_backing(self.path, flags, "NVMe", NamespaceError, lock=lock)

    def close(self) -> None:
        if self._fd_buffered >= 0 and self._fd_buffered != self.fd:
            os.close(self._fd_buffered)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = self._fd_buffered = -1
        self._flusher = StickySync("NVMe")

    # -- data --------------------------------------------------------------------------------
    def read(self, views: list[memoryview], slba: int, nbytes: int) -> None:
        """Read ``nbytes`` from LBA ``slba`` into ``views`` (raises OSError)."""
        self._io(os.preadv, views, slba * self.lba_size, nbytes)

    def write(self, views: list[memoryview], slba: int, nbytes: int) -> None:
        self._io(os.pwritev, views, slba * self.lba_size, nbytes)

    def _io(self, fn, views: list[memoryview], offset: int, nbytes: int) -> None:
        if not self.direct or all(_aligned(v) for v in views):
            transfer(fn, self.fd, views, offset, nbytes)
            return
        buf = mmap.mmap(-1, nbytes)  # page-aligned bounce buffer
        try:
            with memoryview(buf) as mv:
                if fn is os.pwritev:
                    pos = 0
                    for v in views:
                        mv[pos:pos + len(v)] = v
                        pos += len(v)
                    transfer(fn, self.fd, [mv], offset, nbytes)
                else:
                    transfer(fn, self.fd, [mv], offset, nbytes)
                    pos = 0
                    for v in views:
                        v[:] = mv[pos:pos + len(v)]
                        pos += len(v)
        finally:
            buf.close()

    def flush(self) -> None:
        """``fdatasync`` the backing file (Flush, FUA, write-through); OSError if it fails -- and on
        every later flush once one has failed (:class:`~exitless.devices.hostio.StickySync` says why)."""
        self._flusher.sync(self.fd)

    def zero(self, slba: int, nlb: int, deallocate: bool) -> None:
        """Make LBAs [slba, slba+nlb) read as zeroes: punch a hole (``deallocate``) or zero the range."""
        zero_range(self.fd, slba * self.lba_size, nlb * self.lba_size, unmap=deallocate)

    def deallocate(self, slba: int, nlb: int) -> None:
        """Dataset Management deallocate: punch a hole; advisory, so no support is not an error."""
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, slba * self.lba_size,
                      nlb * self.lba_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENODEV):
                raise


def _aligned(view: memoryview) -> bool:
    """O_DIRECT needs 512-byte aligned addresses and lengths (guest RAM is mapped page-aligned)."""
    return len(view) % 512 == 0 and address_of(view) % 512 == 0
