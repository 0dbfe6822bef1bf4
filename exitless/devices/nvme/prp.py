"""Physical Region Page walking (NVMe 1.4 §4.3): PRP1/PRP2 and PRP lists into guest-physical segments.

A transfer of ``length`` bytes starts at PRP1, which may have a dword-aligned
offset into its page.  If it ends within two pages, PRP2 is the second page;
otherwise PRP2 points to a PRP list, which may itself start mid-page (Linux
allocates lists from 256-byte pools): the entries up to the end of that page
are data pages, except that when more entries are needed than fit, the last
one of the page points to the next list page (chaining).  Entries after the
transfer's last page are never read (a list longer than the transfer is legal).

Every data page and every list entry is checked against guest RAM; what the
spec prescribes for a bad one is a status, never an access outside RAM.
"""
from __future__ import annotations

from ...memory import GuestMemory
from .constants import PAGE_SIZE, SC_DATA_TRANSFER_ERROR, SC_PRP_OFFSET_INVALID


class PrpError(Exception):
    """A PRP layout the command must fail with ``status`` (NVMe status, SCT << 8 | SC)."""

    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status = status


def prp_segments(mem: GuestMemory, prp1: int, prp2: int, length: int) -> list[tuple[int, int]]:
    """The ``(gpa, nbytes)`` segments of a ``length``-byte transfer, adjacent pages merged.

    Raises :class:`PrpError`: PRP Offset Invalid for a PRP1 not dword-aligned, a
    list pointer not qword-aligned or a data or chain entry with a page offset;
    Data Transfer Error for a list page or data page outside guest RAM.
    """
    if length <= 0:
        return []
    if prp1 & 0x3:
        raise PrpError(SC_PRP_OFFSET_INVALID, f"PRP1 {prp1:#x} is not dword-aligned")
    first = min(length, PAGE_SIZE - (prp1 % PAGE_SIZE))
    pages = [(prp1, first)]
    left = length - first
    if left:
        if left <= PAGE_SIZE:
            if prp2 % PAGE_SIZE:
                raise PrpError(SC_PRP_OFFSET_INVALID, f"PRP2 {prp2:#x} has a page offset")
            pages.append((prp2, left))
        else:
            pages += _walk_list(mem, prp2, left)
    segs: list[tuple[int, int]] = []
    for gpa, n in pages:
        if not mem.contains(gpa, n):
            raise PrpError(SC_DATA_TRANSFER_ERROR, f"data page {gpa:#x}+{n:#x} is outside guest RAM")
        if segs and segs[-1][0] + segs[-1][1] == gpa and mem.contains(segs[-1][0], segs[-1][1] + n):
            segs[-1] = (segs[-1][0], segs[-1][1] + n)
        else:
            segs.append((gpa, n))
    return segs


def _walk_list(mem: GuestMemory, list_ptr: int, left: int) -> list[tuple[int, int]]:
    if list_ptr & 0x7:
        raise PrpError(SC_PRP_OFFSET_INVALID, f"PRP list pointer {list_ptr:#x} is not qword-aligned")
    pages = []
    need = (left + PAGE_SIZE - 1) // PAGE_SIZE   # data entries still to read; bounds the walk
    while need:
        room = (PAGE_SIZE - list_ptr % PAGE_SIZE) // 8
        take = need if need <= room else room - 1   # the last entry of a full page chains on
        if not mem.contains(list_ptr, 8 * (take + (need > room))):
            raise PrpError(SC_DATA_TRANSFER_ERROR, f"PRP list at {list_ptr:#x} is outside guest RAM")
        entries = mem.view(list_ptr, 8 * (take + (need > room))).cast("Q")
        for i in range(take):
            e = entries[i]
            if e % PAGE_SIZE:
                raise PrpError(SC_PRP_OFFSET_INVALID, f"PRP list entry {e:#x} has a page offset")
            n = min(left, PAGE_SIZE)
            pages.append((e, n))
            left -= n
        need -= take
        if need:
            nxt = entries[take]
            if nxt % PAGE_SIZE:
                raise PrpError(SC_PRP_OFFSET_INVALID, f"PRP list chain pointer {nxt:#x} has a page offset")
            list_ptr = nxt
    return pages
