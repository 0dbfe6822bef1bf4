"""Host-side I/O on a backing file descriptor, shared by the block devices (virtio-blk, NVMe).

``transfer`` moves a list of buffers (memoryviews onto guest RAM) with
``os.preadv``/``os.pwritev`` until every byte moved, in IOV_MAX batches and
across short transfers; ``fallocate`` is libc's (Python has only
``posix_fallocate``, which cannot punch holes).  :func:`open_backing` and
:func:`backing_size` open and size a device's backing file, so that virtio-blk
and NVMe report a bad one in the same words; :class:`StickySync` is their flush.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat

from ..errors import ExitlessError
from .imagelock import lock_image

log = logging.getLogger(__name__)

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
if _IOV_MAX <= 0:
    _IOV_MAX = 1024

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """libc ``fallocate(2)`` (Python has only ``posix_fallocate``, which cannot punch holes)."""
    if _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def transfer(fn, fd: int, views: list, offset: int, nbytes: int = -1) -> int:
    """Run ``os.preadv``/``os.pwritev`` until every byte of ``views`` moved (IOV_MAX batches, short I/O).

    ``nbytes``, if known, is the total size of ``views`` (enables the one-call fast path).
    """
    total = 0
    if 0 <= nbytes and len(views) <= _IOV_MAX:
        total = fn(fd, views, offset)
        if total == nbytes:
            return total
        if total <= 0:
            raise OSError(errno.EIO, "unexpected end of file on the backing store")
        offset += total
        views = advance(views, total)
    views = list(views)
    i = 0
    while i < len(views):
        batch = views[i:i + _IOV_MAX]
        want = 0
        for v in batch:
            want += len(v)
        n = fn(fd, batch, offset)
        if n <= 0:
            raise OSError(errno.EIO, "unexpected end of file on the backing store")
        offset += n
        total += n
        if n == want:
            i += len(batch)
            continue
        while n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]
    return total


def zero_range(fd: int, offset: int, length: int, *, unmap: bool, write_fd: int | None = None) -> None:
    """Make bytes [offset, offset+length) of ``fd`` read as zeroes (virtio-blk WRITE_ZEROES, NVMe Write
    Zeroes / deallocate): punch a hole when ``unmap`` allows it, else zero the range in place, and where
    the filesystem can do neither, write zeroes from an aligned buffer through ``write_fd`` (default
    ``fd``; a buffered descriptor for ranges O_DIRECT cannot take).  OSError on a real failure."""
    modes = ([FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if unmap else []) + [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
    for mode in modes:
        try:
            fallocate(fd, mode, offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENODEV, errno.EINVAL):
                raise
    chunk = min(length, 1 << 20)
    buf = mmap.mmap(-1, chunk)           # page-aligned: good for O_DIRECT too
    try:
        with memoryview(buf) as mv:
            while length:
                n = min(length, chunk)
                transfer(os.pwritev, fd if write_fd is None else write_fd, [mv[:n]], offset)
                offset += n
                length -= n
    finally:
        buf.close()


def advance(views: list, n: int) -> list:
    """``views`` without its first ``n`` bytes."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out


class StickySync:
    """``fdatasync`` of a block device's backing file whose first failure is sticky.

    Linux reports a writeback error to a file once (per open file description) and may drop
    the dirty pages it could not write: a *later* fdatasync then returns 0 although writes the
    guest saw completed are not on disk.  So after the first failure :meth:`sync` raises
    OSError (EIO) every time and a guest's every later flush fails, never succeeds (QEMU's
    file-posix does the same).  Only a new device on the file -- a restart -- clears it.
    ``what`` names the device in the error ("virtio-blk", "NVMe").
    """

    __slots__ = ("what", "failed")

    def __init__(self, what: str):
        self.what = what
        self.failed = False     # set by the first failed fdatasync

    def sync(self, fd: int) -> None:
        """``fdatasync(fd)``; OSError if it fails -- and ever after, once it has failed."""
        if self.failed:
            raise OSError(errno.EIO, f"{self.what}: an earlier flush failed: acknowledged writes may be lost")
        try:
            os.fdatasync(fd)
        except OSError:
            self.failed = True
            raise


class BackingError(ExitlessError, OSError):
    """A block device's backing file cannot be used: ``OSError`` with ``errno``, ``strerror`` and
    ``filename``, shown as ``PATH: WHY`` (the devices subclass it)."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}" if self.filename else str(self.strerror)


def open_backing(path: str, flags: int, what: str, error: type[BackingError],
                 missing: type[BackingError] | None = None, lock: bool = False) -> int:
    """``os.open(path, flags)`` for the backing file of device ``what`` ("virtio-blk", "NVMe").

    With ``lock``, the fd takes the image locks of a reader (``O_RDONLY``) or a writer
    (:mod:`exitless.devices.imagelock`, QEMU's protocol): the device's main fd does, once.
    Raises ``missing`` (default ``error``) when the file does not exist, else ``error`` with
    ``"<what> backing file: <strerror>"`` (``PATH: NVMe backing file: Is a directory``), a
    sentence saying the file system refuses O_DIRECT, or one naming the process whose image
    lock conflicts (errno EAGAIN).
    """
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise (missing or error)(errno.ENOENT, f"{what} backing file does not exist", path) from None
    except OSError as e:
        if flags & os.O_DIRECT and e.errno == errno.EINVAL:
            raise error(errno.EINVAL, f"the filesystem of the {what} backing file does not support O_DIRECT "
                                      "(direct)", path) from None
        raise error(e.errno, f"{what} backing file: {e.strerror}", path) from None
    if lock:
        try:
            lock_backing(fd, path, flags & os.O_ACCMODE == os.O_RDONLY, what, error)
        except BaseException:
            os.close(fd)
            raise
    return fd


def lock_backing(fd: int, path: str, read_only: bool, what: str, error: type[BackingError]) -> None:
    """Take the image locks of a reader or a writer on ``fd`` (:func:`exitless.devices.imagelock.lock_image`);
    a conflict (or a lock error) raises ``error`` naming ``path`` and the holder.  Leaves ``fd`` open."""
    try:
        lock_image(fd, path, read_only, what)
    except OSError as e:
        raise error(e.errno, e.strerror, path) from None


def backing_size(fd: int, path: str, what: str, block: int, error: type[BackingError]) -> int:
    """The size in bytes of backing file ``fd`` (a regular file or a block device) of device ``what``.

    ``block`` is the device's block size in bytes (a sector, an LBA): a file smaller than one
    block raises ``error`` (the guest would see an empty device); a partial last block is not
    visible to the guest, which a warning says.
    """
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        size = os.lseek(fd, 0, os.SEEK_END)
    elif stat.S_ISREG(st.st_mode):
        size = st.st_size
    else:
        raise error(errno.EINVAL, f"{what} backing file: not a regular file or a block device", path)
    if size < block:
        raise error(errno.EINVAL, f"{what} backing file of {size} bytes is smaller than one {block}-byte block",
                    path)
    if size % block:
        log.warning("%s: %s backing file of %d bytes is not a multiple of %d bytes: its last %d bytes are not "
                    "visible to the guest", path, what, size, block, size % block)
    return size


def check_handed_fds(fd: int, fd_buffered: int, *, read_only: bool, direct: bool, what: str, path: str,
                     error: type[BackingError]) -> None:
    """Fds of a backing file handed over by another process (``exitless sidecore``): ``fd`` open for
    reading, and for writing unless ``read_only``, O_DIRECT exactly when ``direct``; with ``direct``
    also ``fd_buffered``, the same checks without O_DIRECT (else it must be -1).  Raises ``error``
    (``what`` names the device, ``path`` the disk in the message)."""
    wanted = [(fd, direct)] + ([(fd_buffered, False)] if direct else [])
    if not direct and fd_buffered >= 0:
        raise error(errno.EINVAL, f"{what} backing file: a second fd without direct", path)
    for f, want_direct in wanted:
        try:
            flags = fcntl.fcntl(f, fcntl.F_GETFL)
        except (OSError, OverflowError) as e:
            raise error(errno.EBADF, f"{what} backing file: fd {f}: {e}", path) from None
        if not read_only and flags & os.O_ACCMODE != os.O_RDWR:
            raise error(errno.EBADF, f"{what} backing file: fd not open for reading and writing (the disk is "
                                     "not read-only)", path)
        if flags & os.O_ACCMODE == os.O_WRONLY:
            raise error(errno.EBADF, f"{what} backing file: fd not open for reading", path)
        if bool(flags & os.O_DIRECT) != want_direct:
            raise error(errno.EINVAL, f"{what} backing file: fd " + ("without O_DIRECT" if want_direct else
                                                                    "with O_DIRECT"), path)
