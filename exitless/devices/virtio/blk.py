"""virtio-blk (VIRTIO 1.2 §5.2) backed by a host file or block device.

Data moves zero-copy: reads are ``os.preadv`` straight into the guest's
device-writable buffers, writes ``os.pwritev`` straight from its device-readable
buffers (memoryviews onto the shared guest RAM mapping).  With ``direct=True``
the backing is opened ``O_DIRECT``; a request whose guest buffers are not
aligned for it goes through an aligned bounce buffer, and one whose disk offset
or length is not aligned goes through a second, buffered descriptor (the kernel
keeps buffered and direct I/O to one file coherent: direct I/O writes back and
invalidates the page-cache range it covers).

Request validation (spec §2.7.4: no assumption is made about how the header,
data and status are split into descriptors):

* the device-writable area must be at least 1 byte: its last byte is the
  status.  A chain with no writable byte cannot be answered; it is returned
  with used length 0 and logged.
* a chain whose buffers are not all inside guest RAM (``chain.error``), a
  header shorter than 16 bytes, data not a multiple of 512 bytes or larger than
  :attr:`VirtioBlk.MAX_REQUEST_BYTES`, or a sector range beyond the capacity
  -> VIRTIO_BLK_S_IOERR.  Writes, discards and write-zeroes on a read-only
  disk -> IOERR.  An unknown request type -> VIRTIO_BLK_S_UNSUPP.

Used length = bytes written into the device-writable area: data + 1 status
byte for a successful IN / GET_ID, 1 otherwise.

Fast path: with buffered I/O, the leading run of plain, valid IN/OUT requests of
each pass over a queue is completed by ``_vring.Ring.blk_batch`` (C, GIL released:
the same checks as :meth:`VirtioBlk.process`, one preadv/pwritev per request, one
used.idx store per batch); every other request -- an error, FLUSH, GET_ID,
DISCARD, WRITE_ZEROES, write-through writes, a failed or short transfer --
stops the batch and goes through :meth:`VirtioBlk.process` (see ``_fast_batch``).

Durability: FLUSH completes only after ``fdatasync``.  If the driver did not
negotiate VIRTIO_BLK_F_FLUSH the disk is write-through (spec §5.2.6.2 case 1):
every write completes only after ``fdatasync``.  Host I/O errors (EIO, ENOSPC, ...)
complete the request with VIRTIO_BLK_S_IOERR; once an ``fdatasync`` has failed, every
later flush fails too (``VirtioBlk._sync``).
"""
from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
import struct
import time

from ..hostio import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, BackingError,
                      StickySync, backing_size, check_handed_fds, fallocate, lock_backing, open_backing, transfer,
                      zero_range)
from .constants import (
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    VIRTIO_ID_BLOCK,
)
from ...sidecore import breakdown as _breakdown
from . import queue
from .device import VirtioDevice
from .queue import DescriptorChain, Virtqueue

_blk_batch = queue._vring.Ring.blk_batch if queue._vring is not None else None

__all__ = ["VirtioBlk"]

SECTOR = 512
_HDR = struct.Struct("<IIQ")
_SEG = struct.Struct("<QII")
_CONFIG = struct.Struct("<QII HBB I BBHI BBH IIIII B3x III IIIII B3x")  # struct virtio_blk_config, 96 bytes

class BackingFileError(BackingError):
    """The disk's backing file cannot be used (missing, no permission, not a file or block device, smaller
    than a sector, no O_DIRECT).

    An ``OSError`` with ``errno`` and ``filename`` set; a missing file is also a ``FileNotFoundError``
    (:class:`BackingFileMissing`).
    """


class BackingFileMissing(BackingFileError, FileNotFoundError):
    """The disk's backing file does not exist."""


class _RequestError(Exception):
    """Internal: fail the request with ``status``."""

    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status = status


class VirtioBlk(VirtioDevice):
    """A virtio block device on a host file or block device.

    ``VirtioBlk(path, read_only=False, direct=False, num_queues=1, queue_size=256, serial=None)``;
    ``serial`` (the GET_ID string, ASCII, at most 20 bytes) defaults to
    ``"exitless-"`` plus a hash of the backing path.

    ``fds``: the backing file already open, as ``(fd, buffered fd or -1)`` (the fd opened O_DIRECT
    when ``direct``, then a buffered one of the same file); the device owns them from here on, even
    when it raises, and ``path`` only names the disk in messages (``exitless sidecore`` receives
    these fds from a VM).  Their access mode must fit ``read_only`` and ``direct``, else
    :class:`BackingFileError`.

    ``lock``: the file it opens takes the image locks of a reader or a writer
    (:mod:`exitless.devices.imagelock`): :class:`BackingFileError` (errno EAGAIN) naming the
    holder if another open file description conflicts.  Fds handed over take them too: the
    locks belong to the open file description, so the VM's own locked fd passes as it is, and
    an fd opened without them is refused if another process uses the image.
    """

    DEVICE_ID = VIRTIO_ID_BLOCK
    #: Largest data transfer accepted in one request (bigger ones fail with IOERR).
    MAX_REQUEST_BYTES = 64 << 20
    MAX_DISCARD_SECTORS = 1 << 22      # 2 GiB per segment
    MAX_DISCARD_SEG = 32
    MAX_WRITE_ZEROES_SECTORS = 1 << 22
    MAX_WRITE_ZEROES_SEG = 32

    def __init__(self, path: str | os.PathLike, read_only: bool = False, direct: bool = False,
                 num_queues: int = 1, queue_size: int = 256, serial: str | None = None,
                 discard: bool = True, write_zeroes: bool = True, fds: tuple[int, int] | None = None,
                 lock: bool = True):
        try:
            super().__init__(num_queues=num_queues, queue_max_size=queue_size)
        except BaseException:
            for fd in fds or ():
                if fd >= 0:
                    os.close(fd)
            raise
        self.fd, self._fd_buffered = fds if fds is not None else (-1, -1)
        self.path = os.fspath(path)
        self.read_only = read_only
        self.direct = direct
        if serial is None:
            serial = "exitless-" + hashlib.sha1(os.fsencode(os.path.abspath(self.path))).hexdigest()[:11]
        sb = serial.encode("ascii", "replace")
        if len(sb) > VIRTIO_BLK_ID_BYTES or sb != serial.encode("utf-8"):
            self.close()
            raise ValueError(f"virtio-blk serial {serial!r} is not ASCII of at most {VIRTIO_BLK_ID_BYTES} bytes")
        self.serial = serial
        self._id = sb.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        base = os.O_CLOEXEC | (os.O_RDONLY if read_only else os.O_RDWR)
        try:
            if fds is None:
                self.fd = self._open(base | (os.O_DIRECT if direct else 0), lock=lock)
            else:
                check_handed_fds(self.fd, self._fd_buffered, read_only=read_only, direct=direct,
                                 what="virtio-blk", path=self.path, error=BackingFileError)
                if lock:        # a no-op on the VM's own locked file description; an unlocked fd gets it here
                    lock_backing(self.fd, self.path, read_only, "virtio-blk", BackingFileError)
            size = backing_size(self.fd, self.path, "virtio-blk", SECTOR, BackingFileError)
            self.capacity = size // SECTOR          # in 512-byte sectors; a partial tail sector is not exposed
            self.dio_align = 1
            if direct:
                if fds is None:
                    self._fd_buffered = self._open(base)
                self.dio_align = self._probe_dio_align()
        except BaseException:
            self.close()
            raise
        self.blk_size = max(SECTOR, self.dio_align)
        self.seg_max = max(1, queue_size - 2)
        self.discard = discard and not read_only
        self.write_zeroes = write_zeroes and not read_only
        self.writeback = True
        self._flusher = StickySync("virtio-blk")

    @property
    def sync_failed(self) -> bool:
        """True once an fdatasync failed: from then on every flush fails (:class:`StickySync`)."""
        return self._flusher.failed

    # -- backing store -----------------------------------------------------------------
    def _open(self, flags: int, lock: bool = False) -> int:
        return open_backing(self.path, flags, "virtio-blk", BackingFileError, BackingFileMissing, lock=lock)

    def _sync(self) -> None:
        """``fdatasync`` the backing file; OSError if it fails -- and ever after, once it has failed
        (:class:`~exitless.devices.hostio.StickySync` says why)."""
        self._flusher.sync(self.fd)

    def _probe_dio_align(self) -> int:
        """512 if an O_DIRECT read of 512 bytes at a 512-byte (not 4 KiB) aligned address works, else 4096."""
        if self.capacity == 0:
            return 4096
        buf = mmap.mmap(-1, 2 * mmap.PAGESIZE)
        try:
            with memoryview(buf) as mv:
                try:
                    n = os.preadv(self.fd, [mv[SECTOR:2 * SECTOR]], 0)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    n = 0
                return SECTOR if n == SECTOR else 4096
        finally:
            buf.close()

    def close(self) -> None:
        for name in ("fd", "_fd_buffered"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def __enter__(self) -> "VirtioBlk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- features and configuration ----------------------------------------------------
    def features(self) -> int:
        f = (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE) | (1 << VIRTIO_BLK_F_FLUSH)
        if self.read_only:
            f |= 1 << VIRTIO_BLK_F_RO
        if self.num_queues > 1:
            f |= 1 << VIRTIO_BLK_F_MQ
        if self.discard:
            f |= 1 << VIRTIO_BLK_F_DISCARD
        if self.write_zeroes:
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES
        return f

    def config_bytes(self) -> bytes:
        align = self.blk_size // SECTOR
        return _CONFIG.pack(
            self.capacity,
            0,                                   # size_max (VIRTIO_BLK_F_SIZE_MAX not offered)
            self.seg_max,
            0, 0, 0,                             # geometry (not offered)
            self.blk_size,
            0, 0, 0, 0,                          # topology (not offered)
            0, 0,                                # writeback (CONFIG_WCE not offered), unused0
            self.num_queues,
            self.MAX_DISCARD_SECTORS if self.discard else 0,
            self.MAX_DISCARD_SEG if self.discard else 0,
            align if self.discard else 0,
            self.MAX_WRITE_ZEROES_SECTORS if self.write_zeroes else 0,
            self.MAX_WRITE_ZEROES_SEG if self.write_zeroes else 0,
            1 if self.write_zeroes else 0,       # write_zeroes_may_unmap
            0, 0, 0,                             # secure erase (not offered)
            0, 0, 0, 0, 0, 0,                    # zoned (not offered)
        )

    def on_activate(self) -> None:
        # Without a negotiated FLUSH the driver assumes a write-through cache.
        self.writeback = self.has_feature(VIRTIO_BLK_F_FLUSH)
        # The C batch implements this class's process() for plain IN/OUT on buffered I/O; it is not
        # used for O_DIRECT (alignment, bounce buffers).
        self.fast_path = self._fast_batch if queue.C_VRING and not self.direct else None

    def _fast_batch(self, q: Virtqueue, index: int, limit: int) -> tuple[int, bool]:
        """The leading run of at most ``limit`` plain, valid IN/OUT requests, in C without the GIL
        (see ``_vring.c``).

        Writes are taken only with a write-back cache (write-through needs fdatasync, done in
        Python); everything the C code does not take is left for :meth:`process`.
        """
        if type(self).process is not _C_BATCH_IMPLEMENTS:  # a subclass (or a test) redefined the requests
            return 0, True
        writable = not self.read_only and self.writeback
        bd = _breakdown.ACTIVE
        if bd is None:
            return q.c_batch(_blk_batch, self.fd, self.capacity, self.MAX_REQUEST_BYTES, writable, max_batch=limit)
        times = bytearray(40)
        n, more = q.c_batch(_blk_batch, self.fd, self.capacity, self.MAX_REQUEST_BYTES, writable, times=times,
                            max_batch=limit)
        for phase, ns in zip(("ring_read", "chain_walk", "request_parse", "host_io", "used_write"),
                             struct.unpack("<5Q", times)):
            bd.add(phase, ns)
        bd.fast_requests += n
        return n, more

    def serve_job(self, index: int, call_fd: int) -> tuple | None:
        """Queue ``index`` for ``_vring.serve`` (plain IN/OUT completed in C; anything else comes back
        to :meth:`handle_queue`), or None when the C path does not apply (see :meth:`_fast_batch`)."""
        if (self.fast_path is None or type(self).process is not _C_BATCH_IMPLEMENTS or self.needs_reset
                or not self.activated or not 0 <= index < len(self.queues)):
            return None
        return self.queues[index].serve_job(self.fd, self.capacity, self.MAX_REQUEST_BYTES,
                                            not self.read_only and self.writeback, call_fd=call_fd)

    # -- requests -------------------------------------------------------------------------
    def process(self, queue_index: int, chain: DescriptorChain) -> int:
        wlen = chain.writable_len
        if wlen == 0:
            self.log(logging.WARNING, "virtio-blk: request %d has no status byte; returned unanswered", chain.head)
            return 0
        status_off = wlen - 1
        written = 1
        try:
            if chain.error:
                raise _RequestError(VIRTIO_BLK_S_IOERR, chain.error)
            if chain.readable_len < _HDR.size:
                raise _RequestError(VIRTIO_BLK_S_IOERR, f"header is {chain.readable_len} bytes, not 16")
            rtype, _reserved, sector = _HDR.unpack(chain.read(0, _HDR.size))
            if rtype == VIRTIO_BLK_T_IN:
                written += self._read(chain, sector, status_off)
            elif rtype == VIRTIO_BLK_T_OUT:
                self._write(chain, sector)
            elif rtype == VIRTIO_BLK_T_FLUSH:
                self._sync()
            elif rtype == VIRTIO_BLK_T_GET_ID:
                written += self._get_id(chain, status_off)
            elif rtype == VIRTIO_BLK_T_DISCARD and self.discard:
                self._discard_or_zero(chain, zero=False)
            elif rtype == VIRTIO_BLK_T_WRITE_ZEROES and self.write_zeroes:
                self._discard_or_zero(chain, zero=True)
            else:
                raise _RequestError(VIRTIO_BLK_S_UNSUPP, f"unsupported request type {rtype}")
            status = VIRTIO_BLK_S_OK
        except _RequestError as e:
            status = e.status
            written = 1
            if status == VIRTIO_BLK_S_IOERR:
                self.log(logging.WARNING, "virtio-blk: request %d failed: %s", chain.head, e)
        except OSError as e:
            status = VIRTIO_BLK_S_IOERR
            written = 1
            self.log(logging.ERROR, "virtio-blk: I/O error on %s: %s", self.path, e)
        try:
            chain.writable(status_off, 1)[0][0] = status
        except Exception:  # the status byte itself is outside guest RAM
            self.log(logging.WARNING, "virtio-blk: request %d: status byte is not addressable", chain.head)
            return 0
        return written

    def _check_range(self, sector: int, nbytes: int) -> int:
        if nbytes % SECTOR:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"data length {nbytes} is not a multiple of 512")
        if nbytes > self.MAX_REQUEST_BYTES:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"data length {nbytes} exceeds {self.MAX_REQUEST_BYTES}")
        if sector + nbytes // SECTOR > self.capacity:
            raise _RequestError(VIRTIO_BLK_S_IOERR,
                                f"sectors [{sector}, +{nbytes // SECTOR}) beyond capacity {self.capacity}")
        return sector * SECTOR

    def _read(self, chain: DescriptorChain, sector: int, nbytes: int) -> int:
        offset = self._check_range(sector, nbytes)
        if nbytes:
            self._io(chain, True, 0, nbytes, offset)
        return nbytes

    def _write(self, chain: DescriptorChain, sector: int) -> None:
        nbytes = chain.readable_len - _HDR.size
        if self.read_only:
            raise _RequestError(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
        offset = self._check_range(sector, nbytes)
        if nbytes:
            self._io(chain, False, _HDR.size, nbytes, offset)
            if not self.writeback:
                self._sync()

    def _io(self, chain: DescriptorChain, is_read: bool, start: int, nbytes: int, offset: int) -> None:
        bd = _breakdown.ACTIVE
        if bd is None:
            self._move(chain, is_read, start, nbytes, offset)
        else:
            t0 = time.monotonic_ns()
            self._move(chain, is_read, start, nbytes, offset)
            bd.add("host_io", time.monotonic_ns() - t0)

    def _move(self, chain: DescriptorChain, is_read: bool, start: int, nbytes: int, offset: int) -> None:
        """Data between the chain's stream bytes [start, start+nbytes) and the disk at byte ``offset``."""
        views = chain.writable(start, nbytes) if is_read else chain.readable(start, nbytes)
        fn = os.preadv if is_read else os.pwritev
        if not self.direct:
            transfer(fn, self.fd, views, offset, nbytes)
            return
        a = self.dio_align
        if offset % a or nbytes % a:
            # O_DIRECT cannot do this disk range: use the buffered descriptor.
            transfer(fn, self._fd_buffered, views, offset, nbytes)
        elif self._buffers_aligned(chain, is_read, start, nbytes, a):
            transfer(fn, self.fd, views, offset, nbytes)
        else:
            self._bounce(fn, is_read, views, nbytes, offset)

    @staticmethod
    def _buffers_aligned(chain: DescriptorChain, writable: bool, start: int, nbytes: int, align: int) -> bool:
        """Are the guest pieces of stream bytes [start, start+nbytes) aligned (address and length)?

        Guest RAM is mapped page-aligned, so a guest-physical address and its host
        address agree modulo the page size (and so modulo ``align`` <= 4096).
        """
        end = start + nbytes
        pos = 0
        for gpa, length, w in chain.segments:
            if w != writable:
                continue
            nxt = pos + length
            if nxt > start:
                lo = max(start - pos, 0)
                hi = min(end - pos, length)
                if (gpa + lo) % align or (hi - lo) % align:
                    return False
                if nxt >= end:
                    break
            pos = nxt
        return True

    def _bounce(self, fn, is_read: bool, views: list, nbytes: int, offset: int) -> None:
        buf = mmap.mmap(-1, nbytes)  # page-aligned
        try:
            with memoryview(buf) as mv:
                if is_read:
                    transfer(fn, self.fd, [mv], offset)
                    pos = 0
                    for v in views:
                        v[:] = mv[pos:pos + len(v)]
                        pos += len(v)
                else:
                    pos = 0
                    for v in views:
                        mv[pos:pos + len(v)] = v
                        pos += len(v)
                    transfer(fn, self.fd, [mv], offset)
        finally:
            buf.close()

    def _get_id(self, chain: DescriptorChain, nbytes: int) -> int:
        if nbytes > self.MAX_REQUEST_BYTES:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"GET_ID buffer of {nbytes} bytes")
        data = self._id[:nbytes] if nbytes <= VIRTIO_BLK_ID_BYTES else self._id.ljust(nbytes, b"\0")
        chain.write(0, data)
        return nbytes

    def _discard_or_zero(self, chain: DescriptorChain, zero: bool) -> None:
        if self.read_only:
            raise _RequestError(VIRTIO_BLK_S_IOERR, "discard/write-zeroes on a read-only disk")
        n = chain.readable_len - _HDR.size
        max_seg = self.MAX_WRITE_ZEROES_SEG if zero else self.MAX_DISCARD_SEG
        max_sectors = self.MAX_WRITE_ZEROES_SECTORS if zero else self.MAX_DISCARD_SECTORS
        if n <= 0 or n % _SEG.size or n // _SEG.size > max_seg:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"{n} bytes of discard/write-zeroes segments")
        raw = chain.read(_HDR.size, n)
        segs = []
        for off in range(0, n, _SEG.size):
            sector, count, flags = _SEG.unpack_from(raw, off)
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (flags and not zero):
                raise _RequestError(VIRTIO_BLK_S_UNSUPP, f"segment flags {flags:#x}")
            if count > max_sectors:
                raise _RequestError(VIRTIO_BLK_S_IOERR, f"segment of {count} sectors exceeds {max_sectors}")
            if sector + count > self.capacity:
                raise _RequestError(VIRTIO_BLK_S_IOERR, f"segment [{sector}, +{count}) beyond capacity")
            segs.append((sector * SECTOR, count * SECTOR, flags))
        for offset, length, flags in segs:
            if length == 0:
                continue
            if not zero:
                try:
                    fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENODEV):
                        raise
                    # discard is advisory (the device MAY deallocate): succeed without doing anything
            else:
                self._zero(offset, length, unmap=bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
        if not self.writeback:
            self._sync()

    def _zero(self, offset: int, length: int, unmap: bool) -> None:
        aligned = not self.direct or (offset % self.dio_align == 0 and length % self.dio_align == 0)
        zero_range(self.fd, offset, length, unmap=unmap, write_fd=self.fd if aligned else self._fd_buffered)

    def on_reset(self) -> None:
        self.writeback = True
        self.fast_path = None


#: The ``process`` that ``_vring.Ring.blk_batch`` implements for plain IN/OUT requests.
_C_BATCH_IMPLEMENTS = VirtioBlk.process
