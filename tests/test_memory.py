"""Guest memory: every access is checked, and a second process maps the same RAM."""
import gc
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitless.memory import GuestMemory, GuestMemoryError, x86_layout
from fds import open_fds

MIB = 1 << 20


@pytest.fixture
def mem():
    with GuestMemory.create([(0, 4 * MIB), (16 * MIB, 2 * MIB)]) as m:
        yield m


def test_round_trip_in_both_regions(mem):
    mem.write(0x1000, b"hello")
    mem.write_u64(16 * MIB + 8, 0x1122334455667788)
    assert mem.read(0x1000, 5) == b"hello"
    assert mem.read_u32(16 * MIB + 8) == 0x55667788
    assert mem.read_u64(16 * MIB + 8) == 0x1122334455667788


@pytest.mark.parametrize("gpa,length", [
    (4 * MIB, 1),                 # just past the first region
    (4 * MIB - 2, 4),             # straddles its end
    (8 * MIB, 16),                # in the hole
    (18 * MIB, 1),                # past the last region
    (-1, 1), (0, -1),
    (2**64 - 8, 16),              # wraps around
    (16 * MIB - 4, 8),            # straddles into the second region from the hole
])
def test_out_of_ram_raises(mem, gpa, length):
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, length)
    if length > 0:
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, b"\0" * length)


@settings(max_examples=300, deadline=None)
@given(gpa=st.integers(-2**10, 2**40), length=st.integers(-4, 2**24))
def test_any_access_is_inside_ram_or_refused(gpa, length):
    with GuestMemory.create([(0, 1 * MIB), (4 * MIB, 1 * MIB)]) as m:
        inside = length >= 0 and any(r.gpa <= gpa and gpa + length <= r.end for r in m.regions)
        try:
            view = m.view(gpa, length)
        except GuestMemoryError:
            assert not inside
        else:
            assert inside and len(view) == length


def test_added_region_is_shared_and_checked(mem):
    region = mem.add_region(0xD000_0000, 4096)
    mem.write_u32(0xD000_0000, 7)
    assert mem.read_u32(0xD000_0000) == 7
    assert region.offset == 6 * MIB
    with pytest.raises(GuestMemoryError):
        mem.add_region(0x1000, 4096)  # overlaps RAM
    with pytest.raises(GuestMemoryError):
        mem.read(0xD000_0FFE, 4)


def test_second_process_maps_the_same_ram(mem):
    """The memfd is what a sidecore process maps: its writes are the guest's RAM."""
    mem.write(0x2000, b"from-parent")
    code = (
        "import sys; from exitless.memory import GuestMemory\n"
        "m = GuestMemory.attach(int(sys.argv[1]), eval(sys.argv[2]))\n"
        "assert m.read(0x2000, 11) == b'from-parent'\n"
        "m.write(16 * 1024 * 1024 + 0x10, b'from-child')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(mem.fd), repr(mem.describe())],
                   pass_fds=[mem.fd], check=True)
    assert mem.read(16 * MIB + 0x10, 10) == b"from-child"


def test_x86_layout_leaves_the_pci_hole():
    assert x86_layout(1 << 30) == [(0, 1 << 30)]
    assert x86_layout(4 << 30) == [(0, 0xC000_0000), (1 << 32, (4 << 30) - 0xC000_0000)]


def test_dropped_memory_releases_its_memfd():
    """A GuestMemory nobody closed (a harness, a VM build that failed half-way) gives its memfd back when
    it is collected: 300 of them once pushed a test session past select()'s 1024-fd limit."""
    before = open_fds()
    for _ in range(50):
        m = GuestMemory.create([(0, 0x10000)])
        m.write(0x1000, b"x")
        del m
    gc.collect()
    assert open_fds() == before


def test_close_then_collection_closes_the_memfd_once():
    """close() and the collection-time finalizer never both close: a second close() would hit an fd
    number the process may have reused for something else."""
    m = GuestMemory.create([(0, 0x10000)])
    fd = m.fd
    m.close()
    reused = os.open("/dev/null", os.O_RDONLY)        # likely the number the memfd had
    try:
        m.close()
        del m
        gc.collect()
        os.fstat(reused)                              # still ours
    finally:
        os.close(reused)
    assert fd >= 0


def test_attached_memory_leaves_the_callers_fd_open():
    """attach() maps an fd the caller owns (passed over a socket): dropping the memory must not close it."""
    owner = GuestMemory.create([(0, 0x10000)])
    try:
        m = GuestMemory.attach(owner.fd, [(0, 0x10000, 0)])
        del m
        gc.collect()
        os.fstat(owner.fd)
    finally:
        owner.close()
