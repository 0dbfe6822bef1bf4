"""Kernel images and initrds are checked, header by header, before any guest RAM is written.

ELF images are built here (a PT_LOAD and the PVH note, struct-packed: no toolchain);
the bzImage case mutates Debian's cloud kernel from the guest cache.  Hypothesis
mutates one header field at a time; whatever the value, loading either succeeds
with a self-consistent image or raises one of exitless's image errors without
having written a byte of guest RAM.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from exitless.boot import linux as LX
from exitless.boot.bzimage import BzImageError
from exitless.boot.initramfs import CpioWriter, InitramfsError, check_initrd
from exitless.boot.pvh import KernelImageError, parse_pvh_elf
from exitless.x86 import layout as L

PT_LOAD, PT_NOTE = 1, 4
EHDR, PHDR = 64, 56
CODE_OFF, NOTE_OFF = 0x1000, 0xF00


def make_elf(*, paddr: int = 0x100000, filesz: int = 0x1000, memsz: int = 0x2000, entry: int | None = None) -> bytes:
    """An x86-64 ELF with one PT_LOAD (file offset 0x1000) and a PT_NOTE holding XEN_ELFNOTE_PHYS32_ENTRY."""
    entry = paddr if entry is None else entry
    note = struct.pack("<III4sI", 4, 4, 18, b"Xen\0", entry)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, EHDR, 0, 0, EHDR, PHDR, 2, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", PT_LOAD, 5, CODE_OFF, paddr, paddr, filesz, memsz, 0x1000)
    notes = struct.pack("<IIQQQQQQ", PT_NOTE, 4, NOTE_OFF, 0, 0, len(note), len(note), 4)
    img = bytearray(CODE_OFF + filesz)
    img[:EHDR + 2 * PHDR] = ehdr + load + notes
    img[NOTE_OFF:NOTE_OFF + len(note)] = note
    img[CODE_OFF:] = bytes([0xF4]) * filesz      # hlt
    return bytes(img)


class WriteSpy:
    """Wraps guest memory's writers: counts every byte the loader would put in guest RAM."""

    def __init__(self, machine):
        self.writes = 0
        mem = machine.mem
        write, fill = mem.write, mem.fill

        def spy_write(gpa, data):
            self.writes += 1
            return write(gpa, data)

        def spy_fill(gpa, size, *a):
            self.writes += 1
            return fill(gpa, size, *a)
        mem.write, mem.fill = spy_write, spy_fill


# --------------------------------------------------------------------------- the input


@pytest.mark.kvm
def test_filesz_larger_than_memsz_is_refused_before_loading() -> None:
    """Issue 14 §4: PT_LOAD p_paddr 0x200000, p_filesz 0x2000, p_memsz 0x1000."""
    from exitless.vm import Machine, VmConfig
    elf = make_elf(paddr=0x200000, filesz=0x2000, memsz=0x1000)
    with Machine(VmConfig(mem_mib=32)) as m:
        m.mem.write(0x200000, b"\xAA" * 0x3000)
        with pytest.raises(KernelImageError, match=r"program header 0 \(PT_LOAD at p_paddr 0x200000\): "
                                                   r"p_filesz 0x2000 is larger than p_memsz 0x1000") as e:
            m.boot_pvh(elf)
        assert "--mem" not in str(e.value)
        assert m.mem.read(0x200000, 0x3000) == b"\xAA" * 0x3000     # not a byte written


def test_elf_header_errors_name_the_field() -> None:
    ok = make_elf()
    assert parse_pvh_elf(ok).segments == [(0x100000, ok[CODE_OFF:], 0x2000)]
    cases = [
        (make_elf(filesz=0x2000, memsz=0x1000), "p_filesz 0x2000 is larger than p_memsz 0x1000"),
        (make_elf(paddr=0x80000), "below 1 MiB"),
        (make_elf(paddr=0xBFFFF000), "ends at 0xc0001000, inside or above the 32-bit MMIO hole"),
        (make_elf(entry=0x300000), "PVH entry 0x300000 is not inside"),
        (ok[:CODE_OFF + 0x800], "p_offset 0x1000 \\+ p_filesz 0x1000 runs past the end"),
        (ok[:0x80], "program headers .*run past the end"),
    ]
    for data, match in cases:
        with pytest.raises(KernelImageError, match=match):
            parse_pvh_elf(data)
    phentsize = bytearray(ok)
    struct.pack_into("<H", phentsize, 0x36, 40)
    with pytest.raises(KernelImageError, match="e_phentsize is 40"):
        parse_pvh_elf(bytes(phentsize))
    overlap = bytearray(ok)                          # the note becomes a PT_LOAD over the first segment
    struct.pack_into("<IIQQQQQ", overlap, EHDR + PHDR, PT_LOAD, 4, NOTE_OFF, 0x101000, 0x101000, 0x10, 0x10)
    with pytest.raises(KernelImageError, match="overlaps program header 0"):
        parse_pvh_elf(bytes(overlap))


# --------------------------------------------------------------------------- the kind: mutated ELF headers

#: (offset, struct format) of every ELF header field the loader reads: the ELF header's, the PT_LOAD's, the PT_NOTE's
ELF_FIELDS = [(0x18, "Q"), (0x20, "Q"), (0x36, "H"), (0x38, "H"), (0x04, "B"), (0x05, "B"), (0x12, "H")] + [
    (EHDR + i * PHDR + off, fmt) for i in range(2)
    for off, fmt in ((0, "I"), (8, "Q"), (16, "Q"), (24, "Q"), (32, "Q"), (40, "Q"))] + [
    (NOTE_OFF + off, "I") for off in (0, 4, 8, 16)]

interesting = st.one_of(st.sampled_from([0, 1, 0x1000, 0xFFF, 0x100000, 0x1FFF, 0xBFFFF000, 0xC0000000,
                                         0xFFFFFFFF, 1 << 32, (1 << 63), (1 << 64) - 1]),
                        st.integers(min_value=0, max_value=(1 << 64) - 1))


@pytest.fixture(scope="module")
def small_machine():
    from exitless.vm import Machine, VmConfig
    with Machine(VmConfig(mem_mib=32)) as m:
        yield m


@pytest.mark.kvm
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(ELF_FIELDS), st.one_of(interesting, st.integers(0x100000, 0x102000))),
                min_size=1, max_size=2),
       st.one_of(st.none(), st.integers(min_value=4, max_value=CODE_OFF + 0x1000)))
def test_mutated_elf_headers_are_refused_before_loading(small_machine, mutations, cut) -> None:
    img = bytearray(make_elf())
    for (off, fmt), value in mutations:
        struct.pack_into("<" + fmt, img, off, value & ((1 << (8 * struct.calcsize(fmt))) - 1))
    data = bytes(img[:cut])
    m = small_machine
    spy = WriteSpy(m)
    try:
        try:
            image = m.boot_pvh(data)[0]
        except KernelImageError as e:
            assert spy.writes == 0, f"{spy.writes} writes to guest RAM before refusing: {e}"
            event("refused")
            return
        event("loaded")
        for paddr, blob, memsz in image.segments:     # what was loaded is what the headers promised
            assert len(blob) <= memsz and L.KERNEL_LOAD <= paddr and paddr + memsz <= L.MMIO_HOLE_START
        assert any(p <= image.entry < p + len(b) for p, b, _ in image.segments)
    finally:
        del m.mem.write, m.mem.fill


# --------------------------------------------------------------------------- bzImage: the real kernel, mutated


@pytest.fixture(scope="module")
def vmlinuz() -> bytes:
    from exitless.guest.fetch import fetch_guest
    try:
        return fetch_guest().vmlinuz.read_bytes()
    except Exception as e:  # noqa: BLE001 -- no cache and no network: nothing to mutate
        pytest.skip(f"no Debian kernel in the guest cache: {e}")


#: (offset, format) of the setup header fields a 64-bit loader reads (boot.rst)
BZ_FIELDS = {"setup_sects": (0x1F1, "B"), "syssize": (0x1F4, "I"), "boot_flag": (0x1FE, "H"),
             "jump": (0x201, "B"), "version": (0x206, "H"), "kernel_version": (0x20E, "H"),
             "loadflags": (0x211, "B"), "initrd_addr_max": (0x22C, "I"), "kernel_alignment": (0x230, "I"),
             "xloadflags": (0x236, "H"), "cmdline_size": (0x238, "I"), "payload_offset": (0x248, "I"),
             "payload_length": (0x24C, "I"), "pref_address": (0x258, "Q"), "init_size": (0x260, "I")}


@pytest.fixture(scope="module")
def linux_machine():
    from exitless.vm import Machine, VmConfig
    with Machine(VmConfig(mem_mib=128)) as m:
        yield m


@pytest.mark.kvm
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(sorted(BZ_FIELDS)), interesting), min_size=1, max_size=2))
def test_mutated_bzimage_headers_are_refused_before_loading(linux_machine, vmlinuz, mutations) -> None:
    img = bytearray(vmlinuz)
    for field, value in mutations:
        off, fmt = BZ_FIELDS[field]
        struct.pack_into("<" + fmt, img, off, value & ((1 << (8 * struct.calcsize(fmt))) - 1))
    m = linux_machine
    spy = WriteSpy(m)
    try:
        try:
            LX.boot_linux(m, bytes(img), "console=ttyS0", initrd=CpioWriter().getvalue())
            event("loaded")
        except (KernelImageError, InitramfsError) as e:
            assert spy.writes == 0, f"{spy.writes} writes to guest RAM before refusing: {e}"
            assert isinstance(e, KernelImageError)
            event("refused")
    finally:
        del m.mem.write, m.mem.fill


def test_bzimage_header_errors_name_the_field(vmlinuz: bytes) -> None:
    from exitless.boot.bzimage import parse_bzimage

    def mutated(field: str, value: int) -> bytes:
        img = bytearray(vmlinuz)
        off, fmt = BZ_FIELDS[field]
        struct.pack_into("<" + fmt, img, off, value)
        return bytes(img)
    for field, value, match in (("syssize", 0x10000000, "syssize 0x10000000"),
                                ("syssize", 0, "syssize 0x0"),
                                ("payload_length", 0x7FFFFFFF, "payload_length 0x7fffffff"),
                                ("kernel_alignment", 0x30000, "kernel_alignment 0x30000"),
                                ("pref_address", 1 << 40, "pref_address 0x10000000000"),
                                ("kernel_version", 0xFFF0, "kernel_version 0xfff0"),
                                ("loadflags", 0, "loadflags 0x0 lacks LOADED_HIGH"),
                                ("setup_sects", 1, r"kernel_version 0x42c0 points past the setup code \(setup_sects 1")):
        with pytest.raises(BzImageError, match=match):
            parse_bzimage(mutated(field, value))


# --------------------------------------------------------------------------- initrds


def test_initrd_headers_are_checked() -> None:
    w = CpioWriter()
    w.add_file("/init", b"#!/bin/sh\n" * 10, mode=0o755)
    good = w.getvalue()
    check_initrd(good)
    check_initrd(good + bytes(512) + good)                 # concatenated, zero-padded
    check_initrd(good + b"\x1f\x8b\x08" + bytes(20))       # then a compressed archive
    with pytest.raises(InitramfsError, match="c_filesize 0x64 of /init"):
        check_initrd(good[:200])
    bad = bytearray(good)
    bad[6 + 8 * 11:6 + 8 * 12] = b"7FFFFFFF"               # the first member's c_namesize
    with pytest.raises(InitramfsError, match="c_namesize 0x7fffffff"):
        check_initrd(bytes(bad))
    bad[6 + 8 * 11:6 + 8 * 12] = b"zzzzzzzz"
    with pytest.raises(InitramfsError, match="c_namesize b'zzzzzzzz'.* is not 8 hex digits"):
        check_initrd(bytes(bad))
    with pytest.raises(InitramfsError, match="neither a newc cpio archive"):
        check_initrd(b"hello, this is not an initrd")
    with pytest.raises(InitramfsError, match="empty"):
        check_initrd(b"")
    with pytest.raises(InitramfsError, match="no trailer"):
        check_initrd(good[:good.index(b"TRAILER!!!") - 110])     # cut before the trailer's 110-byte header


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=500))
def test_mutated_initrds_raise_only_initramfs_errors(noise: bytes, at: int, cut: int) -> None:
    w = CpioWriter()
    w.add_file("/init", b"x" * 100, mode=0o755)
    img = bytearray(w.getvalue())
    img[at:at + len(noise)] = noise
    try:
        check_initrd(bytes(img[:cut] if cut < len(img) else img))
    except InitramfsError:
        pass
