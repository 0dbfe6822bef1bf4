"""Guest RAM: one memfd, mapped into the VM and into any process that emulates devices.

Guest-physical addresses are translated region by region and every access is
bounds-checked, so a wild address from a guest driver raises GuestMemoryError
instead of touching host memory outside guest RAM.  The backing is a memfd so
that a sidecore *process* -- or ``exitless sidecore``, which gets the fd over a
socket -- can map exactly the same pages (``GuestMemory.attach``).  The memfd is
sealed against shrinking (``F_SEAL_SHRINK``): a process mapping it can rely on
every page it mapped staying there (touching a page past the end of a file is
SIGBUS), and ``exitless sidecore`` refuses memory that could shrink.  It may grow
(``add_region``).
"""
from __future__ import annotations

from .errors import ExitlessError
import ctypes
import fcntl
import mmap
import os
import weakref
from dataclasses import dataclass

PAGE_SIZE = 4096
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x2)
F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)


class GuestMemoryError(ExitlessError, ValueError):
    """A guest-physical access that falls (partly) outside guest RAM."""


@dataclass(frozen=True)
class Region:
    """A contiguous run of guest-physical RAM backed by ``[offset, offset+size)`` of the memfd.

    ``fd`` (optional, ``-1`` = the memory's own fd) names another file to map
    the region from: a vhost-user frontend may back each region by a
    different memfd.  It is not part of :meth:`as_tuple`/``describe()``.
    """

    gpa: int
    size: int
    offset: int
    fd: int = -1

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.gpa, self.size, self.offset)


class GuestMemory:
    """Checked guest-physical access to RAM held in a memfd.

    Regions with their own ``fd`` are mapped from it (``GuestMemory(-1, regions,
    owns_fd=False)`` maps RAM that lives in several files; the caller keeps
    those fds open as long as the memory and closes them).
    """

    def __init__(self, fd: int, regions: list[Region], *, owns_fd: bool = True):
        if not regions:
            raise GuestMemoryError("guest memory needs at least one region")
        self.fd = fd
        self._owns_fd = owns_fd
        self._fd_finalizer = None
        #: Accesses refused because they fell (partly) outside guest RAM -- each one a guest (or
        #: frontend) handing us a wild address.  The fuzz targets report it and tests assert on it.
        self.refused = 0
        self.regions = sorted(regions, key=lambda r: r.gpa)
        for a, b in zip(self.regions, self.regions[1:]):
            if a.end > b.gpa:
                raise GuestMemoryError(f"regions overlap: {a} and {b}")
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        try:
            for r in self.regions:
                src = r.fd if r.fd >= 0 else fd
                if src < 0:
                    raise GuestMemoryError(f"region {r} has no file to map")
                m = mmap.mmap(src, r.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=r.offset)
                self._maps.append(m)
                self._views.append(memoryview(m))
        except BaseException:
            for v in self._views:
                v.release()
            for m in self._maps:
                m.close()
            raise
        # An owned memfd is closed when this object is collected even if nobody called close(): a
        # harness or a failed VM build that drops its memory must not keep the fd (and the RAM) alive.
        # Armed only once construction succeeded: until then the caller still owns the fd.
        if owns_fd and fd >= 0:
            self._fd_finalizer = weakref.finalize(self, os.close, fd)

    # -- construction -------------------------------------------------
    @classmethod
    def create(cls, layout: list[tuple[int, int]], name: str = "exitless-guest-ram") -> "GuestMemory":
        """Allocate a memfd big enough for ``layout`` (a list of (gpa, size)) and map it."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        regions, offset = [], 0
        for gpa, size in layout:
            if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
                os.close(fd)
                raise GuestMemoryError(f"region gpa={gpa:#x} size={size:#x} is not page aligned")
            regions.append(Region(gpa, size, offset))
            offset += size
        try:
            os.ftruncate(fd, offset)
            fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK)     # grow yes (add_region), shrink never
            return cls(fd, regions)
        except BaseException:
            os.close(fd)            # not adopted: the object was never built
            raise

    @classmethod
    def attach(cls, fd: int, regions: list[tuple[int, int, int]]) -> "GuestMemory":
        """Map RAM that another process created (the fd was inherited or passed over a socket)."""
        return cls(fd, [Region(*r) for r in regions], owns_fd=False)

    def add_region(self, gpa: int, size: int) -> Region:
        """Grow the memfd by ``size`` bytes and map them at ``gpa``.

        Used for device pages that are RAM but not in the guest's e820 map: a
        doorbell page shared with the sidecore lives in the MMIO hole this way.
        """
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
            raise GuestMemoryError(f"region gpa={gpa:#x} size={size:#x} is not page aligned")
        if any(r.gpa < gpa + size and gpa < r.end for r in self.regions):
            raise GuestMemoryError(f"region gpa={gpa:#x} size={size:#x} overlaps guest memory")
        offset = max(r.offset + r.size for r in self.regions)
        os.ftruncate(self.fd, offset + size)
        region = Region(gpa, size, offset)
        m = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        pairs = sorted(zip(self.regions + [region], self._maps + [m]), key=lambda p: p[0].gpa)
        self.regions = [p[0] for p in pairs]
        self._maps = [p[1] for p in pairs]
        self._views = [memoryview(x) for x in self._maps]
        return region

    def move_region(self, region: Region, gpa: int) -> Region:
        """Re-address a device region (its BAR moved); the host mapping and views stay valid."""
        if any(r is not region and r.gpa < gpa + region.size and gpa < r.end for r in self.regions):
            raise GuestMemoryError(f"moving {region} to {gpa:#x} overlaps guest memory")
        i = self.regions.index(region)
        moved = Region(gpa, region.size, region.offset, region.fd)
        pairs = sorted(zip(self.regions[:i] + [moved] + self.regions[i + 1:], self._maps), key=lambda p: p[0].gpa)
        self.regions = [p[0] for p in pairs]
        self._maps = [p[1] for p in pairs]
        self._views = [memoryview(x) for x in self._maps]
        return moved

    def describe(self) -> list[tuple[int, int, int]]:
        """What a second process needs, beside the fd, to ``attach`` the same RAM."""
        return [r.as_tuple() for r in self.regions]

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    # -- translation --------------------------------------------------
    def _find(self, gpa: int, length: int) -> tuple[int, int] | None:
        """(region index, offset in it) of ``[gpa, gpa+length)``, or None if it is not inside one region."""
        if length < 0 or gpa < 0:
            return None
        for i, r in enumerate(self.regions):
            if r.gpa <= gpa < r.end or (length == 0 and gpa == r.end):
                if gpa + length > r.end:
                    return None
                return i, gpa - r.gpa
        return None

    def _locate(self, gpa: int, length: int) -> tuple[int, int]:
        found = self._find(gpa, length)
        if found is None:
            self.refused += 1
            raise GuestMemoryError(f"guest access gpa={gpa:#x} len={length:#x} is outside guest RAM")
        return found

    def contains(self, gpa: int, length: int = 1) -> bool:
        """Is ``[gpa, gpa+length)`` inside one RAM region?  (A question, not an access: not counted.)"""
        return self._find(gpa, length) is not None

    def host_address(self, region: Region) -> int:
        """Host virtual address of a region's mapping (for KVM_SET_USER_MEMORY_REGION)."""
        i = self.regions.index(region)
        return ctypes.addressof(ctypes.c_char.from_buffer(self._maps[i]))

    # -- access -------------------------------------------------------
    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy window onto guest RAM; it must not cross a region boundary."""
        i, off = self._locate(gpa, length)
        return self._views[i][off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        # Bounds first, then at most 1 MiB of pattern at a time: ``length`` may come from a guest
        # or an image (a segment's p_memsz) and must not size an allocation before it is checked.
        view = self.view(gpa, length)
        chunk = bytes([byte]) * min(length, 1 << 20)
        for off in range(0, length, len(chunk) or 1):
            view[off:off + len(chunk)] = chunk[:length - off]

    def read_u8(self, gpa: int) -> int:
        return self.view(gpa, 1)[0]

    # Multi-byte fields go through memoryview.cast, which loads or stores the whole
    # field at once; struct.pack_into writes byte by byte, so a guest on another CPU
    # could see a torn value (a half-written index or EventIdx).
    def read_u16(self, gpa: int) -> int:
        return self.view(gpa, 2).cast("H")[0]

    def read_u32(self, gpa: int) -> int:
        return self.view(gpa, 4).cast("I")[0]

    def read_u64(self, gpa: int) -> int:
        return self.view(gpa, 8).cast("Q")[0]

    def write_u8(self, gpa: int, value: int) -> None:
        self.view(gpa, 1)[0] = value & 0xFF

    def write_u16(self, gpa: int, value: int) -> None:
        self.view(gpa, 2).cast("H")[0] = value & 0xFFFF

    def write_u32(self, gpa: int, value: int) -> None:
        self.view(gpa, 4).cast("I")[0] = value & 0xFFFFFFFF

    def write_u64(self, gpa: int, value: int) -> None:
        self.view(gpa, 8).cast("Q")[0] = value & 0xFFFFFFFFFFFFFFFF

    # -- lifetime -----------------------------------------------------
    def close(self) -> None:
        for v in self._views:
            v.release()
        self._views.clear()
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                # A caller still holds a view; the mapping dies with the last reference.
                pass
        self._maps.clear()
        if self._fd_finalizer is not None:
            self._fd_finalizer()        # closes the owned fd once, and never again at collection
        self.fd = -1

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def x86_layout(mem_size: int, hole_start: int = 0xC000_0000, hole_end: int = 1 << 32) -> list[tuple[int, int]]:
    """Split ``mem_size`` bytes of RAM around the 32-bit PCI/MMIO hole, as PC firmware does."""
    low = min(mem_size, hole_start)
    layout = [(0, low)]
    if mem_size > low:
        layout.append((hole_end, mem_size - low))
    return layout
