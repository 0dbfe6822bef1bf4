"""Image locks: two processes must not open one disk image for writing (QEMU's protocol, shared with it).

Two VMMs writing one image, each with its guest's own page cache over it, corrupt the file
system on it silently.  QEMU prevents it with open-file-description locks (``F_OFD_SETLK``,
``block/file-posix.c``), and exitless takes *the same bytes*, so that exitless and QEMU (or
``qemu-storage-daemon``) also refuse each other:

* byte ``100 + i`` is read-locked (shared) by every user that holds permission ``i``;
* byte ``200 + i`` is read-locked by every user that does not share permission ``i``;

with ``i`` = 0 consistent read, 1 write (QEMU's ``BLK_PERM_*`` bit numbers).  A device that
writes holds read and write and shares only reads (QEMU's virtio-blk with ``share-rw=off``:
bytes 100, 101 and 201); a read-only device holds read and does not share write (100 and 201),
so read-only users coexist and a writer excludes everyone else.  After taking its bytes a user
checks that nobody else holds the opposite ones (``F_OFD_GETLK`` of a write lock): a lock is
only *held*, never waited for, so of two processes racing both may fail, never both succeed.

The locks belong to the open file description: they go with an fd handed to another process
(a sidecore service) and go away when its last copy is closed.  They are advisory: a process
that takes no lock (``dd``, a host-side check of the image) is not stopped.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct

log = logging.getLogger(__name__)

PERM_BASE = 100         # QEMU's RAW_LOCK_PERM_BASE
SHARED_BASE = 200       # QEMU's RAW_LOCK_SHARED_BASE
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1

# struct flock (x86-64): short l_type, short l_whence, (pad), off_t l_start, off_t l_len, pid_t l_pid, (pad)
_FLOCK = struct.Struct("hhxxxxqqixxxx")

#: errnos meaning "this file system keeps no such locks": the image is opened unlocked, with a warning
_UNSUPPORTED = (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class ImageLockError(OSError):
    """Another process holds a lock that conflicts with ours; ``filename`` is the image and
    ``strerror`` names the holder when /proc shows it."""


def _fcntl(fd: int, cmd: int, ltype: int, byte: int) -> int:
    """``fcntl(fd, cmd, struct flock{ltype, SEEK_SET, byte, 1})``; returns the l_type it gives back."""
    out = fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, byte, 1, 0))
    return _FLOCK.unpack(out)[0]


def lock_bytes(read_only: bool) -> tuple[list[int], list[int]]:
    """(bytes this user read-locks, bytes it checks nobody else holds) for a reader or a writer."""
    held = [PERM_CONSISTENT_READ] if read_only else [PERM_CONSISTENT_READ, PERM_WRITE]
    unshared = [PERM_WRITE]
    take = [PERM_BASE + p for p in held] + [SHARED_BASE + p for p in unshared]
    check = [SHARED_BASE + p for p in held] + [PERM_BASE + p for p in unshared]
    return take, check


def lock_image(fd: int, path: str, read_only: bool, what: str) -> bool:
    """Take the image locks of a ``read_only`` (or writing) device ``what`` on open fd ``fd`` of ``path``.

    Returns True if locked, False if the file system keeps no OFD locks (a warning is logged,
    as QEMU does).  Raises :class:`ImageLockError` (errno EAGAIN) naming the holder when another
    open file description -- another process, or another device of this one -- holds a
    conflicting lock; the bytes taken so far are released then.
    """
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode) and not stat.S_ISBLK(mode):
        return False            # not an image: the device's own type check reports it
    take, check = lock_bytes(read_only)
    try:
        for byte in take:
            _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)
        conflict = next((b for b in check if _fcntl(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, b) != fcntl.F_UNLCK),
                        None)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            conflict = take[0]
        elif e.errno in _UNSUPPORTED:
            log.warning("%s: the file system keeps no OFD locks (%s): the %s image is not locked against another "
                        "writer", path, e.strerror, what)
            return False
        else:
            raise
    if conflict is None:
        return True
    for byte in take:
        _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, byte)
    holders = lock_holders(fd)
    who = ", ".join(holders) if holders else "another process"
    want = "read-only" if read_only else "for writing"
    raise ImageLockError(errno.EAGAIN, f"the image is locked by {who} (QEMU's image locks): a {what} device cannot "
                                       f"also open it {want} (two VMs writing one image corrupt it: stop the other "
                                       "user, or give each its own copy)", path)


def lock_holders(fd: int) -> list[str]:
    """``"pid N (comm)"`` of each process holding an OFD lock on the file of ``fd``, read from
    ``/proc/*/fdinfo`` (whose ``lock:`` lines name the file as ``MAJ:MIN:INODE``, major and minor
    in hex); this process's own other fds count as ``"this process"``.  Best effort: empty if
    /proc does not tell."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    found: list[str] = []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    me = str(os.getpid())
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue
        for name in fds:
            if pid == me and name == str(fd):
                continue
            try:
                with open(f"/proc/{pid}/fdinfo/{name}") as f:
                    held = any(line.startswith("lock:") and key in line for line in f)
            except OSError:
                continue
            if held:
                if pid == me:
                    found.append("this process (another of its devices)")
                else:
                    found.append(f"pid {pid} ({_program(pid)})")
                break
    return found


def _program(pid: str) -> str:
    """The program name of process ``pid``: its argv[0]'s base name (``comm`` is cut at 15 bytes)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0]
        if argv0:
            return os.path.basename(os.fsdecode(argv0))
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"
