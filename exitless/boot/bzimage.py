"""Parse a Linux x86 bzImage and build the zero page for its 64-bit entry point.

exitless enters the kernel directly in 64-bit mode (the "64-bit boot protocol"
of Documentation/arch/x86/boot.rst): no real-mode setup code runs, so the VMM
itself must do what a bootloader does with the setup header -- copy it into a
``struct boot_params`` (the "zero page"), fill in the loader fields (command
line, initrd, e820 map, RSDP) and jump to ``load_address + 0x200`` with RSI
pointing at the zero page.

Only protocol >= 2.12 is accepted: that is the first version with
``xloadflags`` and so the first whose 64-bit entry point is declared rather than
guessed (every kernel since 3.8 has it).  All offsets below are those of
boot.rst / zero-page.rst; they are ABI and never move.
"""
from __future__ import annotations

from ..errors import ExitlessError
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from exitless.boot.e820 import E820Entry

# Setup header (offsets into the image == offsets into boot_params).
SETUP_HEADER_START = 0x1F1
HDR_MAGIC = b"HdrS"
HDR_MAGIC_OFFSET = 0x202
BOOT_FLAG = 0xAA55
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags
RSDP_PROTOCOL = 0x020E  # 2.14: the kernel reads boot_params.acpi_rsdp_addr

# loadflags
LOADED_HIGH = 0x01
KASLR_FLAG = 0x02
QUIET_FLAG = 0x20
KEEP_SEGMENTS = 0x40
CAN_USE_HEAP = 0x80

# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4
XLF_5LEVEL = 1 << 5
XLF_5LEVEL_ENABLED = 1 << 6

#: The 64-bit entry point is this far into the protected-mode kernel.
ENTRY_64_OFFSET = 0x200
ZERO_PAGE_SIZE = 4096
TYPE_OF_LOADER_UNDEFINED = 0xFF
#: heap_end_ptr value: end of a (nominal) setup heap, relative to the setup code, minus 0x200.
HEAP_END_PTR = 0xFE00

# boot_params offsets outside the setup header (zero-page.rst).
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SENTINEL = 0x1EF
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128

# Setup header field offsets (absolute).
_OFF = {
    "setup_sects": 0x1F1,
    "root_flags": 0x1F2,
    "syssize": 0x1F4,
    "vid_mode": 0x1FA,
    "boot_flag": 0x1FE,
    "jump": 0x200,
    "version": 0x206,
    "kernel_version": 0x20E,
    "type_of_loader": 0x210,
    "loadflags": 0x211,
    "code32_start": 0x214,
    "ramdisk_image": 0x218,
    "ramdisk_size": 0x21C,
    "heap_end_ptr": 0x224,
    "cmd_line_ptr": 0x228,
    "initrd_addr_max": 0x22C,
    "kernel_alignment": 0x230,
    "relocatable_kernel": 0x234,
    "min_alignment": 0x235,
    "xloadflags": 0x236,
    "cmdline_size": 0x238,
    "payload_offset": 0x248,
    "payload_length": 0x24C,
    "pref_address": 0x258,
    "init_size": 0x260,
}


class BzImageError(ExitlessError, ValueError):
    """The file is not a bzImage exitless can boot (message says why)."""


@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage setup header that a 64-bit loader needs.

    ``raw`` is the header exactly as in the image, from 0x1F1 to its end
    (0x202 + the jump offset at 0x201), ready to be copied into the zero page.
    """

    version: int
    setup_sects: int
    loadflags: int
    xloadflags: int
    kernel_alignment: int
    relocatable: bool
    min_alignment: int
    cmdline_size: int
    initrd_addr_max: int
    pref_address: int
    init_size: int
    payload_offset: int
    payload_length: int
    kernel_version: str
    raw: bytes

    @property
    def version_str(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    @property
    def header_end(self) -> int:
        """Offset one past the last setup-header byte."""
        return SETUP_HEADER_START + len(self.raw)

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode setup code in front of the protected-mode kernel (incl. boot sector)."""
        return (self.setup_sects + 1) * 512

    @property
    def kernel_offset(self) -> int:
        """File offset of the protected-mode kernel: what gets loaded at the load address."""
        return self.setup_size

    @property
    def supports_64bit_entry(self) -> bool:
        return bool(self.xloadflags & XLF_KERNEL_64)

    @property
    def can_load_above_4g(self) -> bool:
        return bool(self.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G)

    @property
    def load_address(self) -> int:
        """Where to put the protected-mode kernel: ``pref_address`` (aligned, above 1 MiB)."""
        addr = self.pref_address or 0x100000
        align = self.kernel_alignment or 0x200000
        return (addr + align - 1) // align * align

    def memory_footprint(self, kernel_size: int) -> int:
        """Bytes to reserve from the load address: the larger of the file part and ``init_size``.

        The decompressor works in place, so guest RAM from the load address for
        ``init_size`` bytes must be free (no initrd, cmdline or zero page there).
        """
        return max(kernel_size, self.init_size)


@dataclass(frozen=True)
class BzImage:
    """A parsed bzImage: header plus the protected-mode kernel to load."""

    header: SetupHeader
    image: bytes

    @property
    def kernel(self) -> memoryview:
        """The protected-mode part, to be copied to ``header.load_address``."""
        return memoryview(self.image)[self.header.kernel_offset :]

    @property
    def entry_64(self) -> int:
        """Guest-physical 64-bit entry point when loaded at ``header.load_address``."""
        return self.header.load_address + ENTRY_64_OFFSET


def _u(data: bytes, name: str, fmt: str) -> int:
    return struct.unpack_from("<" + fmt, data, _OFF[name])[0]


def parse_setup_header(data: bytes | bytearray | memoryview, *, require_64bit: bool = True) -> SetupHeader:
    """Parse and validate the setup header at the start of a bzImage.

    Raises :class:`BzImageError` for a truncated or non-kernel file, a protocol
    older than 2.12, or (``require_64bit``) a kernel without ``XLF_KERNEL_64``.
    """
    # Everything parsed (header and version string) lies in the real-mode setup
    # code, which is at most 128 KiB: copy only that much of a large image.
    data = bytes(data[:0x20000])
    if len(data) < HDR_MAGIC_OFFSET + 6:
        raise BzImageError(f"file too short for a bzImage setup header ({len(data)} bytes; need at least 0x208)")
    if data[HDR_MAGIC_OFFSET : HDR_MAGIC_OFFSET + 4] != HDR_MAGIC:
        if data[:4] == b"\x7fELF":
            raise BzImageError("this is an ELF file (a vmlinux?), not a bzImage: pass arch/x86/boot/bzImage or /boot/vmlinuz-*")
        raise BzImageError("no 'HdrS' magic at 0x202: not a Linux bzImage")
    version = struct.unpack_from("<H", data, 0x206)[0]
    if version < MIN_PROTOCOL:
        raise BzImageError(
            f"boot protocol {version >> 8}.{version & 0xFF:02d} is too old: exitless needs >= 2.12 (Linux 3.8+) for xloadflags"
        )
    header_end = 0x202 + data[0x201]
    if len(data) < max(header_end, 0x264):
        raise BzImageError(f"file truncated inside the setup header (ends at {len(data):#x}, header ends at {header_end:#x})")
    if _u(data, "boot_flag", "H") != BOOT_FLAG:
        raise BzImageError("boot_flag at 0x1FE is not 0xAA55: corrupt bzImage")
    xloadflags = _u(data, "xloadflags", "H")
    if require_64bit and not xloadflags & XLF_KERNEL_64:
        raise BzImageError("kernel lacks XLF_KERNEL_64: it has no 64-bit entry point (a 32-bit kernel?)")
    setup_sects = data[0x1F1] or 4
    setup_size = (setup_sects + 1) * 512
    if header_end > setup_size:
        raise BzImageError(f"the setup header ends at {header_end:#x} (jump at 0x200), past the setup code's "
                           f"{setup_size:#x} bytes (setup_sects {setup_sects})")
    kv_off = _u(data, "kernel_version", "H")
    if kv_off and kv_off + 0x200 >= setup_size:
        raise BzImageError(f"kernel_version {kv_off:#x} points past the setup code (setup_sects {setup_sects}: "
                           f"{setup_size:#x} bytes)")
    if not data[0x211] & LOADED_HIGH:
        raise BzImageError(f"loadflags {data[0x211]:#x} lacks LOADED_HIGH: a zImage loaded at 0x10000, not a bzImage")
    kernel_alignment = _u(data, "kernel_alignment", "I")
    if kernel_alignment & (kernel_alignment - 1) or not 0 < kernel_alignment <= 1 << 30:
        raise BzImageError(f"kernel_alignment {kernel_alignment:#x} is not a power of two up to 1 GiB")
    pref_address = _u(data, "pref_address", "Q")
    if pref_address >= 1 << 32:
        raise BzImageError(f"pref_address {pref_address:#x} is above 4 GiB: exitless loads the kernel in low RAM")
    return SetupHeader(
        version=version,
        setup_sects=setup_sects,
        loadflags=data[0x211],
        xloadflags=xloadflags,
        kernel_alignment=kernel_alignment,
        relocatable=bool(data[0x234]),
        min_alignment=data[0x235],
        cmdline_size=_u(data, "cmdline_size", "I"),
        initrd_addr_max=_u(data, "initrd_addr_max", "I"),
        pref_address=pref_address,
        init_size=_u(data, "init_size", "I"),
        payload_offset=_u(data, "payload_offset", "I"),
        payload_length=_u(data, "payload_length", "I"),
        kernel_version=_cstring(data, kv_off + 0x200) if kv_off else "",
        raw=data[SETUP_HEADER_START:header_end],
    )


def parse_bzimage(image: bytes) -> BzImage:
    """Parse a whole bzImage file's bytes, its header checked against the file.

    Beyond :func:`parse_setup_header`: the protected-mode part (``setup_sects``) is present,
    ``syssize`` (16-byte units, boot.rst protocol 2.04+) covers no more than the file holds,
    and the payload (``payload_offset``/``payload_length``) lies inside the protected-mode part.
    Raises :class:`BzImageError` naming the field and its value.
    """
    header = parse_setup_header(image)
    n = len(image)
    if n <= header.kernel_offset:
        raise BzImageError(
            f"file truncated: {n} bytes but the protected-mode kernel starts at {header.kernel_offset:#x} "
            f"(setup_sects {header.setup_sects})"
        )
    pm_size = n - header.kernel_offset
    if header.payload_length and header.payload_offset + header.payload_length > pm_size:
        raise BzImageError(f"file truncated: the compressed payload (payload_offset {header.payload_offset:#x}, "
                           f"payload_length {header.payload_length:#x}) runs past the end of the file "
                           f"({pm_size:#x} bytes after the setup code)")
    syssize = struct.unpack_from("<I", image, _OFF["syssize"])[0]
    if not 0 < syssize * 16 <= pm_size + 15:   # rounded up to 16 bytes
        raise BzImageError(f"syssize {syssize:#x} (x 16 = {syssize * 16:#x} bytes) does not match the "
                           f"{pm_size:#x}-byte protected-mode kernel in the file (file truncated?)")
    return BzImage(header=header, image=bytes(image))


def read_kernel_version(image: bytes) -> str:
    """The kernel's version string (``"6.1.0-56-cloud-amd64 (debian-kernel@...) #1 SMP ..."``)."""
    return parse_setup_header(image, require_64bit=False).kernel_version


def _cstring(data: bytes, off: int) -> str:
    chunk = data[off : off + 256]
    end = chunk.find(b"\0")
    return chunk[: end if end >= 0 else len(chunk)].decode("ascii", "replace")


def encode_cmdline(cmdline: str, header: SetupHeader) -> bytes:
    """The NUL-terminated command line bytes; rejects one longer than ``cmdline_size``.  The bytes are the
    user's (``os.fsencode``: an argument that is not UTF-8 comes back as given, not as an exception)."""
    raw = os.fsencode(cmdline)
    if b"\0" in raw:
        raise BzImageError("kernel command line contains a NUL byte")
    if len(raw) > header.cmdline_size:
        raise BzImageError(f"kernel command line is {len(raw)} bytes; this kernel accepts {header.cmdline_size}")
    return raw + b"\0"


def build_zero_page(
    header_bytes: bytes | SetupHeader,
    cmdline_gpa: int,
    initrd_gpa: int,
    initrd_size: int,
    e820_entries: Iterable[E820Entry | tuple[int, int, int]],
    acpi_rsdp: int | None = None,
) -> bytes:
    """Build the 4 KiB ``struct boot_params`` a 64-bit entry expects in RSI.

    ``header_bytes`` is the bzImage (at least its first 0x202 + byte[0x201]
    bytes), just the setup header (the bytes from 0x1F1 on), or a parsed
    :class:`SetupHeader`.  The setup header is copied
    verbatim -- the kernel reads fields like ``kernel_alignment`` and
    ``init_size`` from boot_params, not from its own image -- then the
    loader-owned fields are set.  Pass ``initrd_size=0`` for no initrd.  The e820
    entries go in as given (at most 128, the zero page's capacity).
    ``acpi_rsdp`` is stored for kernels of protocol >= 2.14; older ones find the
    RSDP by scanning 0xE0000-0xFFFFF, where exitless puts it anyway.
    """
    if isinstance(header_bytes, SetupHeader):
        hdr = header_bytes
    else:
        data = bytes(header_bytes[:0x20000])
        magic_in_slice = HDR_MAGIC_OFFSET - SETUP_HEADER_START
        if data[magic_in_slice : magic_in_slice + 4] == HDR_MAGIC and data[HDR_MAGIC_OFFSET : HDR_MAGIC_OFFSET + 4] != HDR_MAGIC:
            data = bytes(SETUP_HEADER_START) + data  # just the header, from 0x1F1: re-base it
        hdr = parse_setup_header(data)
    entries = [e if isinstance(e, E820Entry) else E820Entry(*e) for e in e820_entries]
    if len(entries) > E820_MAX_ENTRIES_ZEROPAGE:
        raise BzImageError(f"{len(entries)} e820 entries; the zero page holds {E820_MAX_ENTRIES_ZEROPAGE}")
    high_ok = hdr.can_load_above_4g
    for name, addr, size in (("command line", cmdline_gpa, 1), ("initrd", initrd_gpa, max(initrd_size, 1))):
        if addr < 0 or addr + size > 1 << 64:
            raise BzImageError(f"{name} address {addr:#x} out of range")
        if addr + size > 1 << 32 and not high_ok:
            raise BzImageError(f"{name} at {addr:#x} is above 4 GiB but the kernel lacks XLF_CAN_BE_LOADED_ABOVE_4G")
    if initrd_size and initrd_gpa + initrd_size - 1 > hdr.initrd_addr_max and not high_ok:
        raise BzImageError(f"initrd ends above initrd_addr_max {hdr.initrd_addr_max:#x}")
    if initrd_size >= 1 << 64:
        raise BzImageError("initrd too large")

    zp = bytearray(ZERO_PAGE_SIZE)
    zp[SETUP_HEADER_START : hdr.header_end] = hdr.raw
    zp[_OFF["type_of_loader"]] = TYPE_OF_LOADER_UNDEFINED
    zp[_OFF["loadflags"]] = hdr.loadflags | LOADED_HIGH | CAN_USE_HEAP
    struct.pack_into("<H", zp, _OFF["heap_end_ptr"], HEAP_END_PTR)
    struct.pack_into("<I", zp, _OFF["cmd_line_ptr"], cmdline_gpa & 0xFFFFFFFF)
    struct.pack_into("<I", zp, BP_EXT_CMD_LINE_PTR, cmdline_gpa >> 32)
    struct.pack_into("<I", zp, _OFF["ramdisk_image"], initrd_gpa & 0xFFFFFFFF if initrd_size else 0)
    struct.pack_into("<I", zp, _OFF["ramdisk_size"], initrd_size & 0xFFFFFFFF)
    struct.pack_into("<I", zp, BP_EXT_RAMDISK_IMAGE, initrd_gpa >> 32 if initrd_size else 0)
    struct.pack_into("<I", zp, BP_EXT_RAMDISK_SIZE, initrd_size >> 32)
    if acpi_rsdp is not None and hdr.version >= RSDP_PROTOCOL:
        struct.pack_into("<Q", zp, BP_ACPI_RSDP_ADDR, acpi_rsdp)
    zp[BP_E820_ENTRIES] = len(entries)
    for i, e in enumerate(entries):
        zp[BP_E820_TABLE + 20 * i : BP_E820_TABLE + 20 * (i + 1)] = e.pack()
    assert zp[BP_SENTINEL] == 0  # a nonzero sentinel makes the kernel wipe "unset" fields
    return bytes(zp)

