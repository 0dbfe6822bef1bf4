"""A vhost-user frontend's memory table, mapped: checked guest-physical access plus UVA translation.

SET_MEM_TABLE describes up to 8 regions, each with a guest-physical address, a
size, the *frontend's* virtual address of the same bytes and an offset into
the file descriptor passed for it (each region may come from a different
memfd).  Descriptor buffers are guest-physical addresses; ring addresses
(SET_VRING_ADDR) are frontend virtual addresses.  The regions are mapped
into one :class:`exitless.memory.GuestMemory` (per-region fds), so the
virtqueue gets exactly the checked API it has in the built-in VMM; ring
addresses are translated UVA -> GPA here, and every range is checked against
the table.

A frontend could truncate a memfd under us: touching a page beyond the end of
a file is SIGBUS, which would kill the backend (and every other frontend it
serves).  So each file must cover ``mmap_offset + memory_size`` when it is
mapped, and a memfd that may still shrink is sealed against shrinking
(``F_SEAL_SHRINK``, which QEMU's ``memory-backend-memfd`` sets itself by
default).  A region in a file that cannot be sealed -- a file on a disk file
system (QEMU's ``memory-backend-file``), or a tmpfs/hugetlbfs file opened by
path, whose seals are fixed at ``F_SEAL_SEAL`` -- is refused by default
(``sealed_only``); ``exitless serve --allow-unsealed-memory`` accepts it with a
warning, for a trusted frontend only.  (Catching the SIGBUS instead is not an
option here: the faulting load may be in the C data plane, with the GIL
released, and Python runs signal handlers only between bytecodes.)
"""
from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat

from exitless.memory import F_ADD_SEALS, F_SEAL_SHRINK, GuestMemory, GuestMemoryError, Region

from .protocol import MemRegion, ProtocolError

log = logging.getLogger("exitless.vhost_user")

F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x1)
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_U64 = 1 << 64


class VhostMemory:
    """The mapped table.  Takes ownership of ``fds`` (closed by :meth:`close`, or on error).

    ``sealed_only`` (default): refuse (ProtocolError) a region whose file cannot be sealed against
    shrinking; False accepts it with a warning (its frontend can then crash the back-end).
    """

    def __init__(self, regions: list[MemRegion], fds: list[int], *, sealed_only: bool = True):
        self.fds = list(fds)
        self.sealed_only = sealed_only
        self.guest: GuestMemory | None = None
        try:
            if len(regions) != len(fds):
                raise ProtocolError(f"SET_MEM_TABLE: {len(regions)} regions but {len(fds)} fds")
            self.table = list(regions)
            self._check_table()
            for r, fd in zip(regions, fds):
                self._check_file(r, fd, sealed_only)
            try:
                self.guest = GuestMemory(-1, [Region(r.gpa, r.size, r.mmap_offset, fd) for r, fd in zip(regions, fds)],
                                         owns_fd=False)
            except (GuestMemoryError, OSError, ValueError, OverflowError) as e:
                raise ProtocolError(f"SET_MEM_TABLE: cannot map the regions: {e}") from None
        except BaseException:
            self.close()
            raise
        # UVA -> GPA, sorted by UVA for the lookups
        self._by_uva = sorted(((r.uva, r.uva + r.size, r.gpa) for r in regions))

    def _check_table(self) -> None:
        for r in self.table:
            if r.size <= 0:
                raise ProtocolError(f"SET_MEM_TABLE: empty region at gpa {r.gpa:#x}")
            if r.gpa + r.size > _U64 or r.uva + r.size > _U64 or r.mmap_offset + r.size > _U64:
                raise ProtocolError(f"SET_MEM_TABLE: region {r} wraps around the address space")
            if r.mmap_offset % mmap.ALLOCATIONGRANULARITY:
                raise ProtocolError(f"SET_MEM_TABLE: mmap offset {r.mmap_offset:#x} is not page aligned")
        for key, name in ((lambda r: r.gpa, "guest-physical"), (lambda r: r.uva, "frontend-virtual")):
            spans = sorted((key(r), key(r) + r.size) for r in self.table)
            for (a0, a1), (b0, _b1) in zip(spans, spans[1:]):
                if b0 < a1:
                    raise ProtocolError(f"SET_MEM_TABLE: overlapping {name} ranges at {a0:#x} and {b0:#x}")

    @staticmethod
    def _check_file(r: MemRegion, fd: int, sealed_only: bool) -> None:
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise ProtocolError(f"SET_MEM_TABLE: region fd: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ProtocolError(f"SET_MEM_TABLE: region fd is not a regular file or memfd (mode {st.st_mode:#o})")
        if st.st_size < r.mmap_offset + r.size:
            raise ProtocolError(f"SET_MEM_TABLE: region [{r.mmap_offset:#x}, +{r.size:#x}) is beyond the "
                                f"end of its file ({st.st_size:#x} bytes)")
        try:
            seals = fcntl.fcntl(fd, F_GET_SEALS)
        except OSError:
            seals = None            # not a shmem/hugetlbfs file: no seals at all
        if seals is not None and not seals & F_SEAL_SHRINK:
            try:
                fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK)
                return
            except OSError as e:
                # EPERM: F_SEAL_SEAL without F_SEAL_SHRINK -- a memfd sealed that way, or a tmpfs or
                # hugetlbfs file opened by path (born with F_SEAL_SEAL): it may shrink any time
                if e.errno != errno.EPERM:
                    raise ProtocolError(f"SET_MEM_TABLE: cannot seal the region memfd: {e.strerror}") from None
        elif seals is not None:
            return                  # sealed against shrinking already
        if sealed_only:
            raise ProtocolError(f"SET_MEM_TABLE: region at gpa {r.gpa:#x} is not in a memfd that can be sealed "
                                "against shrinking (a frontend that truncates its file would crash the back-end; "
                                "QEMU: memory-backend-memfd; serve --allow-unsealed-memory trusts the frontend)")
        log.warning("memory region at gpa %#x cannot be sealed against shrinking: a frontend that truncates the "
                    "file can crash this back-end (--allow-unsealed-memory)", r.gpa)

    # -- translation -------------------------------------------------------------------------------
    def uva_to_gpa(self, uva: int, length: int = 1) -> int:
        """Guest-physical address of frontend-virtual ``[uva, uva+length)``, which must lie in one region."""
        for lo, hi, gpa in self._by_uva:
            if lo <= uva < hi:
                if length < 0 or uva + length > hi:
                    break
                return gpa + (uva - lo)
        raise ProtocolError(f"frontend address [{uva:#x}, +{length:#x}) is not inside one memory region")

    def contains_uva(self, uva: int, length: int = 1) -> bool:
        try:
            self.uva_to_gpa(uva, length)
            return True
        except ProtocolError:
            return False

    def close(self) -> None:
        if self.guest is not None:
            self.guest.close()
            self.guest = None
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
