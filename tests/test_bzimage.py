"""exitless.boot.bzimage and exitless.boot.e820: real Debian kernel, synthetic and broken images."""
from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitless.boot import bzimage as bz
from exitless.boot.bzimage import BzImageError, build_zero_page, encode_cmdline, parse_bzimage, parse_setup_header
from exitless.boot.e820 import (
    E820_ACPI,
    E820_RAM,
    E820_RESERVED,
    E820Entry,
    build_e820,
    ram_layout,
)
from exitless.guest import GuestArtifacts, fetch_guest
from exitless.guest.fetch import CACHE_ENV


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestArtifacts:
    env = os.environ.get(CACHE_ENV)
    return fetch_guest(Path(env) if env else tmp_path_factory.getbasetemp() / "exitless-guest-cache")


@pytest.fixture(scope="module")
def vmlinuz(guest: GuestArtifacts) -> bytes:
    return guest.vmlinuz.read_bytes()


def make_image(
    *,
    version: int = 0x020F,
    xloadflags: int = bz.XLF_KERNEL_64 | bz.XLF_CAN_BE_LOADED_ABOVE_4G,
    setup_sects: int = 4,
    payload: bytes = b"\x90" * 4096,
    kernel_version: str = "6.9.9-test (nobody@example) #1 SMP",
) -> bytes:
    """A minimal image with a well-formed setup header (no real code)."""
    img = bytearray((max(setup_sects, 4) + 1) * 512 if setup_sects == 0 else (setup_sects + 1) * 512)
    img[0x1F1] = setup_sects
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    img[0x200:0x202] = b"\xeb\x6a"  # jmp to 0x26c: header ends there
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, version)
    struct.pack_into("<H", img, 0x20E, 0x400 - 0x200)
    img[0x400 : 0x400 + len(kernel_version) + 1] = kernel_version.encode() + b"\0"
    img[0x211] = bz.LOADED_HIGH
    struct.pack_into("<I", img, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<I", img, 0x230, 0x200000)
    img[0x234] = 1
    img[0x235] = 21
    struct.pack_into("<H", img, 0x236, xloadflags)
    struct.pack_into("<I", img, 0x238, 2047)
    struct.pack_into("<Q", img, 0x258, 0x1000000)
    struct.pack_into("<I", img, 0x260, 0x800000)
    struct.pack_into("<I", img, 0x1F4, (len(payload) + 15) // 16)   # syssize
    return bytes(img) + payload


# --------------------------------------------------------------------------- the real kernel


def test_real_kernel_header(guest: GuestArtifacts, vmlinuz: bytes) -> None:
    img = parse_bzimage(vmlinuz)
    h = img.header
    assert h.version >= 0x020C
    assert h.supports_64bit_entry and h.can_load_above_4g
    assert h.setup_sects == vmlinuz[0x1F1]
    assert h.kernel_offset == (vmlinuz[0x1F1] + 1) * 512
    assert h.header_end == 0x202 + vmlinuz[0x201]
    assert h.raw == vmlinuz[0x1F1 : h.header_end]
    assert h.kernel_version.startswith(guest.kernel_version + " ")
    assert h.relocatable and h.kernel_alignment and h.kernel_alignment & (h.kernel_alignment - 1) == 0
    assert h.pref_address >= 0x100000 and h.pref_address % h.kernel_alignment == 0
    assert h.load_address == h.pref_address
    assert h.init_size > len(img.kernel)  # the decompressor needs more room than the file
    assert h.memory_footprint(len(img.kernel)) == h.init_size
    assert h.cmdline_size >= 255
    assert img.entry_64 == h.load_address + 0x200
    assert bytes(img.kernel[:16]) == vmlinuz[h.kernel_offset : h.kernel_offset + 16]
    assert bz.read_kernel_version(vmlinuz) == h.kernel_version


def test_real_kernel_zero_page(vmlinuz: bytes) -> None:
    h = parse_setup_header(vmlinuz)
    e820 = build_e820(ram_layout(1 << 30))
    zp = build_zero_page(vmlinuz, 0x20000, 0x3000000, 123456, e820, acpi_rsdp=0xE0000)
    assert len(zp) == 4096
    # the setup header is copied verbatim apart from the loader-owned fields
    loader_fields = {0x210, 0x211, 0x218, 0x219, 0x21A, 0x21B, 0x21C, 0x21D, 0x21E, 0x21F,
                     0x224, 0x225, 0x228, 0x229, 0x22A, 0x22B}
    for off in range(0x1F1, h.header_end):
        if off not in loader_fields:
            assert zp[off] == vmlinuz[off], hex(off)
    assert zp[0x202:0x206] == b"HdrS"
    assert zp[0x210] == 0xFF
    assert zp[0x211] & (bz.LOADED_HIGH | bz.CAN_USE_HEAP) == bz.LOADED_HIGH | bz.CAN_USE_HEAP
    assert struct.unpack_from("<H", zp, 0x224)[0] == bz.HEAP_END_PTR
    assert struct.unpack_from("<I", zp, 0x228)[0] == 0x20000
    assert struct.unpack_from("<II", zp, 0x218) == (0x3000000, 123456)
    assert struct.unpack_from("<Q", zp, 0x070)[0] == 0xE0000
    assert zp[0x1E8] == len(e820)
    for i, e in enumerate(e820):
        assert struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) == (e.addr, e.size, e.type)
    assert zp[0x1EF] == 0  # sentinel
    below = bytearray(zp[:0x1F1])
    below[0x070:0x078] = bytes(8)
    below[0x1E8] = 0
    assert not any(below)  # below the header only acpi_rsdp_addr and the e820 count are set
    assert zp[0x2D0 + 20 * len(e820) :].count(0) == 4096 - 0x2D0 - 20 * len(e820)


# --------------------------------------------------------------------------- synthetic images


def test_synthetic_header_fields() -> None:
    img = make_image(setup_sects=7)
    h = parse_setup_header(img)
    assert (h.version_str, h.setup_sects, h.kernel_offset) == ("2.15", 7, 0x1000)
    assert (h.cmdline_size, h.pref_address, h.init_size, h.kernel_alignment) == (2047, 0x1000000, 0x800000, 0x200000)
    assert h.kernel_version.startswith("6.9.9-test")
    assert h.raw == img[0x1F1:0x26C]


def test_setup_sects_zero_means_four() -> None:
    img = bytearray(make_image(setup_sects=4))
    img[0x1F1] = 0
    assert parse_setup_header(bytes(img)).kernel_offset == 5 * 512


def test_zero_page_high_addresses_use_ext_fields() -> None:
    img = make_image()
    zp = build_zero_page(img, 0x1_2345_6000, 0x2_0000_0000, 0x1_0000_0001, [(0, 0x9FC00, E820_RAM)])
    assert struct.unpack_from("<I", zp, 0x228)[0] == 0x23456000 and struct.unpack_from("<I", zp, 0x0C8)[0] == 1
    assert struct.unpack_from("<I", zp, 0x218)[0] == 0 and struct.unpack_from("<I", zp, 0x0C0)[0] == 2
    assert struct.unpack_from("<I", zp, 0x21C)[0] == 1 and struct.unpack_from("<I", zp, 0x0C4)[0] == 1
    assert struct.unpack_from("<Q", zp, 0x070)[0] == 0  # no RSDP given


def test_zero_page_accepts_parsed_header_or_header_slice_and_no_initrd() -> None:
    img = make_image()
    h = parse_setup_header(img)
    zp = build_zero_page(h, 0x20000, 0x5000000, 0, [])
    assert struct.unpack_from("<II", zp, 0x218) == (0, 0)
    assert zp[0x1E8] == 0
    assert build_zero_page(img[0x1F1 : h.header_end], 0x20000, 0x5000000, 0, []) == zp
    assert build_zero_page(img, 0x20000, 0x5000000, 0, []) == zp


def test_zero_page_rejects_bad_requests() -> None:
    low_only = make_image(xloadflags=bz.XLF_KERNEL_64)
    with pytest.raises(ValueError, match="above 4 GiB"):
        build_zero_page(low_only, 0x1_0000_0000, 0, 0, [])
    with pytest.raises(ValueError, match="initrd_addr_max"):
        build_zero_page(low_only, 0x20000, 0x7FFF0000, 0x20000, [])
    with pytest.raises(ValueError, match="128"):
        build_zero_page(make_image(), 0x20000, 0, 0, [(i * 4096, 4096, E820_RAM) for i in range(129)])


def test_rsdp_only_for_protocol_2_14_and_later() -> None:
    zp = build_zero_page(make_image(version=0x020D), 0x20000, 0, 0, [], acpi_rsdp=0xE0000)
    assert struct.unpack_from("<Q", zp, 0x070)[0] == 0
    zp = build_zero_page(make_image(version=0x020E), 0x20000, 0, 0, [], acpi_rsdp=0xE0000)
    assert struct.unpack_from("<Q", zp, 0x070)[0] == 0xE0000


def test_cmdline_encoding() -> None:
    h = parse_setup_header(make_image())
    assert encode_cmdline("console=ttyS0", h) == b"console=ttyS0\0"
    with pytest.raises(ValueError, match="2047"):
        encode_cmdline("x" * 2048, h)


# --------------------------------------------------------------------------- broken files


def test_truncated_files(vmlinuz: bytes) -> None:
    with pytest.raises(BzImageError, match="too short"):
        parse_setup_header(vmlinuz[:0x100])
    with pytest.raises(BzImageError, match="truncated inside the setup header"):
        parse_setup_header(vmlinuz[:0x240])
    h = parse_setup_header(vmlinuz)
    with pytest.raises(BzImageError, match="protected-mode kernel"):
        parse_bzimage(vmlinuz[: h.kernel_offset])
    with pytest.raises(BzImageError, match="payload"):
        parse_bzimage(vmlinuz[: len(vmlinuz) // 2])
    with pytest.raises(BzImageError):
        parse_bzimage(b"")


def test_random_and_foreign_files() -> None:
    rnd = random.Random(1234)
    for size in (0, 1, 0x205, 0x206, 4096, 1 << 16):
        with pytest.raises(BzImageError):
            parse_bzimage(bytes(rnd.getrandbits(8) for _ in range(size)))
    with pytest.raises(BzImageError, match="ELF"):
        parse_bzimage(b"\x7fELF" + bytes(0x1000))
    with pytest.raises(BzImageError, match="HdrS"):
        parse_bzimage(b"#!/bin/sh\n" + bytes(0x1000))


def test_old_protocol_and_32bit_kernels_rejected() -> None:
    with pytest.raises(BzImageError, match=r"2\.11 is too old"):
        parse_setup_header(make_image(version=0x020B))
    with pytest.raises(BzImageError, match="XLF_KERNEL_64"):
        parse_setup_header(make_image(xloadflags=0))
    assert parse_setup_header(make_image(xloadflags=0), require_64bit=False).xloadflags == 0
    bad = bytearray(make_image())
    bad[0x1FE] = 0
    with pytest.raises(BzImageError, match="boot_flag"):
        parse_setup_header(bytes(bad))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=0x1400), st.integers(min_value=0, max_value=0x1300))
def test_fuzz_only_bzimage_errors(noise: bytes, cut: int) -> None:
    """Mutated images either parse or raise BzImageError -- never anything else."""
    img = bytearray(make_image())
    img[0x1F1 : 0x1F1 + len(noise[:0x80])] = noise[:0x80]
    for data in (bytes(noise), bytes(img[:cut]), bytes(img)):
        try:
            parse_bzimage(data)
        except BzImageError:
            pass


# --------------------------------------------------------------------------- e820


def test_e820_small_guest() -> None:
    e = build_e820(ram_layout(512 << 20))
    assert e == [
        E820Entry(0, 0x9FC00, E820_RAM),
        E820Entry(0x9FC00, 0x400, E820_RESERVED),
        E820Entry(0xE0000, 0x20000, E820_RESERVED),
        E820Entry(0x100000, (512 << 20) - 0x100000, E820_RAM),
    ]
    assert e[0].pack() == struct.pack("<QQI", 0, 0x9FC00, 1)


def test_e820_large_guest_leaves_pci_hole_free() -> None:
    ram = ram_layout(8 << 30)
    assert ram == [(0, 0xC0000000), (1 << 32, (8 << 30) - 0xC0000000)]
    e = build_e820(ram)
    assert e[-2] == E820Entry(0x100000, 0xC0000000 - 0x100000, E820_RAM)
    assert e[-1] == E820Entry(1 << 32, (8 << 30) - 0xC0000000, E820_RAM)
    for x in e:
        assert x.end <= 0xC0000000 or x.addr >= 1 << 32


def test_e820_reserved_carve_and_errors() -> None:
    e = build_e820([(0, 64 << 20)], reserved=[(0x2000000, 0x1000, E820_ACPI)])
    assert E820Entry(0x2000000, 0x1000, E820_ACPI) in e
    assert E820Entry(0x100000, 0x2000000 - 0x100000, E820_RAM) in e
    assert E820Entry(0x2001000, (64 << 20) - 0x2001000, E820_RAM) in e
    with pytest.raises(ValueError, match="PCI hole"):
        build_e820([(0, 4 << 30)])
    with pytest.raises(ValueError, match="overlap"):
        build_e820([(0, 64 << 20), (32 << 20, 64 << 20)])
    with pytest.raises(ValueError, match="too small"):
        ram_layout(1 << 20)
