"""Fuzz targets ``elf``, ``bzimage`` and ``initramfs``: the readers of user-supplied boot images.

They are pure functions of their input, so ``check()`` has no state to verify; the invariant
is that a bad image raises :class:`~exitless.errors.ExitlessError` (KernelImageError,
BzImageError, InitramfsError) and nothing else -- the CLI reports those as the user's mistake.
"""
from __future__ import annotations

import functools
import gzip
import struct

from elftools.elf import elffile as _elffile
from elftools.elf.structs import ELFStructs

from ..boot import bzimage as B
from ..boot import initramfs as I
from ..boot import linux as LX
from ..boot import pvh
from ..memory import GuestMemory

MIB = 1 << 20


class _Stateless:
    def __init__(self):
        self.inputs = 0

    def check(self) -> None:
        pass

    def counters(self) -> dict:
        return {"refused": 0, "inputs": self.inputs}


@functools.lru_cache(maxsize=None)
def _basic_structs(little_endian: bool, elfclass: int) -> ELFStructs:
    s = ELFStructs(little_endian=little_endian, elfclass=elfclass)
    s.create_basic_structs()
    return s


@functools.lru_cache(maxsize=256)      # e_type/e_machine/OSABI are fuzzed: bounded
def _advanced_structs(little_endian: bool, elfclass: int, e_type, e_machine, osabi) -> ELFStructs:
    s = ELFStructs(little_endian=little_endian, elfclass=elfclass)
    s.create_basic_structs()
    s.create_advanced_structs(e_type, e_machine, osabi)
    return s


class _MemoStructs:
    """What ``ELFFile.__init__`` gets instead of a fresh :class:`ELFStructs`, during the harness's
    parse only.  pyelftools builds its construct structs anew for every file (~5 ms, 90% of the
    ``elf`` target's time); they are a pure function of (endianness, class, e_type, e_machine,
    OSABI), so one built per key parses every input exactly as a fresh one would."""

    def __init__(self, little_endian: bool, elfclass: int):
        self._key = (little_endian, elfclass)
        self._structs = _basic_structs(little_endian, elfclass)

    def create_basic_structs(self) -> None:
        pass                                # built with the instance

    def create_advanced_structs(self, e_type=None, e_machine=None, e_ident_osabi=None) -> None:
        self._structs = _advanced_structs(*self._key, e_type, e_machine, e_ident_osabi)

    def __getattr__(self, name: str):
        return getattr(self._structs, name)


class ElfHarness(_Stateless):
    def __init__(self):
        super().__init__()
        self.mem = GuestMemory.create([(0, 4 * MIB)], name="exitless-fuzz-elf")

    def run(self, data: bytes) -> None:
        self.inputs += 1
        _elffile.ELFStructs = _MemoStructs   # only while this input is parsed (a replay runs inside pytest)
        try:
            if data[:1] == b"\x01":            # the Linux vmlinux reader
                LX.parse_vmlinux(data[1:])
                return
            kernel = pvh.parse_pvh_elf(data)
            pvh.load_pvh(self.mem, kernel, "console=ttyS0", [(0, 4 * MIB)])
        finally:
            _elffile.ELFStructs = ELFStructs

    def counters(self) -> dict:
        return {"refused": self.mem.refused, "inputs": self.inputs}


class BzImageHarness(_Stateless):
    def run(self, data: bytes) -> None:
        self.inputs += 1
        bz = B.parse_bzimage(data)
        B.read_kernel_version(data)
        B.build_zero_page(data, 0x20000, 0x1000000, 4096, [(0, 0x9FC00, 1), (MIB, 64 * MIB, 1)])
        if LX.payload_format(bz.image[bz.header.kernel_offset + bz.header.payload_offset:][:8]) != "zstd":
            LX.extract_vmlinux(bz)     # (zstd goes through an external program: not fuzzed here)


class InitramfsHarness(_Stateless):
    def run(self, data: bytes) -> None:
        self.inputs += 1
        if data[:1] == b"\x01":
            LX.lz4_legacy_decompress(data[1:])
        else:
            I.read_cpio(data)


def make_elf() -> ElfHarness:
    return ElfHarness()


def make_bzimage() -> BzImageHarness:
    return BzImageHarness()


def make_initramfs() -> InitramfsHarness:
    return InitramfsHarness()


# -- seeds ------------------------------------------------------------------------------------------
def _pvh_elf(entry: int = MIB) -> bytes:
    """A minimal ELF64 with one PT_LOAD at 1 MiB and a PVH entry note (what the guest kit looks like)."""
    note = struct.pack("<III", 4, 8, 18) + b"Xen\0" + struct.pack("<Q", entry)
    code = b"\xf4" * 16
    phoff, nph = 64, 2
    data_off = phoff + 56 * nph
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7), 2, 62, 1, entry, phoff, 0, 0,
                       64, 56, nph, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 7, data_off, MIB, MIB, len(code), len(code) + 64, 16)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, data_off + len(code), 0, 0, len(note), len(note), 4)
    return ehdr + load + pnote + code + note


def _bzimage(payload: bytes = b"") -> bytes:
    setup_sects = 4
    img = bytearray(512 * (setup_sects + 1) + 64 + len(payload))
    img[0x1F1] = setup_sects
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    struct.pack_into("<I", img, 0x202, 0x53726448)           # "HdrS"
    struct.pack_into("<H", img, 0x206, 0x020F)               # protocol 2.15
    img[0x211] = 1                                           # LOADED_HIGH
    struct.pack_into("<I", img, 0x214, MIB)                  # code32_start
    struct.pack_into("<I", img, 0x22C, 0x7FFFFFFF)           # initrd_addr_max
    struct.pack_into("<I", img, 0x230, 0x200000)             # kernel_alignment
    img[0x234] = 1                                           # relocatable
    struct.pack_into("<H", img, 0x236, 0x3)                  # xloadflags: 64-bit entry, above 4G
    struct.pack_into("<I", img, 0x238, 2047)                 # cmdline_size
    struct.pack_into("<II", img, 0x248, 64, len(payload))    # payload_offset, payload_length
    struct.pack_into("<I", img, 0x260, 16 * MIB)             # init_size
    off = 512 * (setup_sects + 1) + 64
    img[off:off + len(payload)] = payload
    return bytes(img)


def seeds_elf() -> list[bytes]:
    return [_pvh_elf(), _pvh_elf(0xFFFF_FFFF_0000), b"\x01" + _pvh_elf()]


def seeds_bzimage() -> list[bytes]:
    vmlinux = b"\x7fELF" + bytes(60)
    gz = gzip.compress(vmlinux, mtime=0)
    return [_bzimage(), _bzimage(gz + struct.pack("<I", len(vmlinux))),
            _bzimage(b"\x02\x21\x4c\x18" + struct.pack("<I", 5) + b"\x40abcd" + struct.pack("<I", 4))]


def seeds_initramfs() -> list[bytes]:
    w = I.CpioWriter()
    w.add_file("init", b"#!/bin/sh\necho hi\n", 0o755)
    w.add_symlink("bin/sh", "busybox")
    w.add_device("dev/console", "c", 5, 1)
    raw = w.getvalue()
    return [raw, gzip.compress(raw, mtime=0), b"\x01\x02\x21\x4c\x18" + struct.pack("<I", 8) + b"\x40abcd\x01\x00\x00"]
