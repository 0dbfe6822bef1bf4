"""Host-side I/O on a backing file descriptor, shared by the block devices (virtio-blk, NVMe).

``transfer`` moves a list of buffers (memoryviews onto guest RAM) with
``os.preadv``/``os.pwritev`` until every byte moved, in IOV_MAX batches and
across short transfers; ``fallocate`` is libc's (Python has only
``posix_fallocate``, which cannot punch holes).
"""
from __future__ import annotations

import ctypes
import errno
import os

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
