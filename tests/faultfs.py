"""A FUSE pass-through filesystem that fails chosen I/O on purpose (for the disk-fault tests).

    python3 tests/faultfs.py BACKING_DIR MOUNTPOINT CONTROL_JSON

Files of BACKING_DIR appear under MOUNTPOINT.  CONTROL_JSON (re-read whenever it changes) says
what fails: ``{"eio_write": [[offset, length], ...], "eio_read": [...], "fail_fsync": false}``
-- a read or write touching one of the byte ranges returns EIO, fsync returns EIO.  Mounted
with ``direct_io`` so each guest request reaches us synchronously (no page cache between).
Built on mfusepy, the maintained ctypes binding of libfuse (fusepy's successor).
"""
from __future__ import annotations

import errno
import json
import os
import sys

import mfusepy as fuse


class FaultFs(fuse.Operations):
    use_ns = True

    def __init__(self, root: str, control: str):
        self.root, self.control = root, control
        self._stamp = None
        self.rules = {"eio_write": [], "eio_read": [], "fail_fsync": False}

    def _rules(self) -> dict:
        try:
            st = os.stat(self.control)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)   # the tests replace the file: a new inode
            if stamp != self._stamp:
                with open(self.control) as f:
                    self.rules = {**{"eio_write": [], "eio_read": [], "fail_fsync": False}, **json.load(f)}
                self._stamp = stamp
        except (OSError, ValueError):
            pass
        return self.rules

    def _hit(self, kind: str, offset: int, size: int) -> bool:
        return any(offset < o + n and o < offset + size for o, n in self._rules()[kind])

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def getattr(self, path, fh=None):
        st = os.lstat(self._path(path))
        return {k: getattr(st, k) for k in ("st_mode", "st_size", "st_uid", "st_gid", "st_nlink", "st_atime",
                                            "st_mtime", "st_ctime", "st_blocks", "st_blksize")}

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._path(path))

    def open(self, path, flags):
        return os.open(self._path(path), flags & ~os.O_DIRECT)

    def create(self, path, mode, fi=None):
        return os.open(self._path(path), os.O_CREAT | os.O_RDWR, mode)

    def read(self, path, size, offset, fh):
        if self._hit("eio_read", offset, size):
            raise fuse.FuseOSError(errno.EIO)
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        if self._hit("eio_write", offset, len(data)):
            raise fuse.FuseOSError(errno.EIO)
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        os.truncate(self._path(path), length)

    def fsync(self, path, datasync, fh):
        if self._rules()["fail_fsync"]:
            raise fuse.FuseOSError(errno.EIO)
        os.fdatasync(fh) if datasync else os.fsync(fh)
        return 0

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0

    def statfs(self, path):
        st = os.statvfs(self.root)
        return {k: getattr(st, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                                            "f_ffree", "f_favail", "f_flag", "f_namemax")}


if __name__ == "__main__":
    backing, mountpoint, control = sys.argv[1:4]
    fuse.FUSE(FaultFs(backing, control), mountpoint, foreground=True, direct_io=True, allow_other=False,
              nothreads=False)
