"""Boot a Linux kernel: a bzImage through the 64-bit boot protocol, or an ELF vmlinux through PVH.

What the VMM does in place of firmware and a bootloader
(Documentation/arch/x86/boot.rst, "64-bit BOOT PROTOCOL"):

* the protected-mode part of the bzImage goes to ``pref_address`` (aligned to
  ``kernel_alignment``; 16 MiB for distribution kernels), and RAM from there
  for ``init_size`` bytes is left free for the in-place decompressor;
* the zero page (``struct boot_params``) at ``layout.ZERO_PAGE`` gets the
  setup header, the command line pointer (``layout.CMDLINE``), the initrd, the
  e820 map of :mod:`exitless.boot.e820` for ``machine.ram_layout`` and the
  RSDP address of the ACPI tables written at 0xE0000;
* the vCPU enters ``load + 0x200`` in long mode, RSI = zero page, with the
  identity page tables and GDT of :mod:`exitless.x86.long_mode`;
* the initrd goes as high in low RAM as the kernel allows (``initrd_addr_max``),
  above everything the kernel needs while it decompresses itself.

``decompress="host"`` (what ``auto`` picks on a ``kvm_pvm`` host, where guest
ring-0 code is emulated instruction by instruction) unpacks the bzImage's
payload -- the ELF vmlinux -- in the VMM and enters the vmlinux's own 64-bit
``startup_64`` (its ELF entry) with the same zero page, as Firecracker does with an
ELF kernel: the guest skips its decompressor (and so KASLR), nothing else changes.

An ELF file (a vmlinux with the PVH note) boots through PVH: initrd as the
first module, the RSDP in ``start_info.rsdp_paddr``.

The legacy devices Linux expects on a PC are added by :func:`add_pc_devices`.
"""
from __future__ import annotations

import io
import logging
import lzma
import shutil
import struct
import subprocess
import zlib
import bz2
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import lz4.block
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ..devices.legacy.acpi_pm import AcpiPm, ResetControl
from ..devices.legacy.i8042 import DATA_PORT as I8042_DATA, STATUS_PORT as I8042_STATUS, I8042
from ..devices.legacy.rtc import INDEX_PORT as RTC_PORT, Rtc
from ..x86 import layout as L
from ..x86 import long_mode as LM
from .acpi import (PM1A_CNT_LEN, PM1A_CNT_PORT, PM1A_EVT_LEN, PM1A_EVT_PORT, RESET_PORT, SCI_IRQ, AcpiBlob,
                   build_acpi_tables)
from .bzimage import BzImage, BzImageError, build_zero_page, encode_cmdline, parse_bzimage
from .e820 import build_e820
from .initramfs import READY_MARKER, check_initrd
from .milestones import BootMilestones
from .placement import BootFitError, check_kernel_fits, place_initrd
from .files import read_image
from .pvh import KernelImageError, elf_load_segments

if TYPE_CHECKING:
    from ..vm import Machine

log = logging.getLogger(__name__)
MIB = 1 << 20
POST_PORT = 0x80       # POST code / io_delay port: Linux's outb_p() writes it
PAGE = 4096


LinuxBootError = BootFitError  # the kernel cannot be booted in this VM as configured


@dataclass
class LinuxBoot:
    """What :func:`boot_linux` did, for the caller's messages and for tests."""

    protocol: str                  # "bzimage", "bzimage+host-decompress" or "pvh"
    entry: int
    kernel_start: int
    kernel_end: int                # end of what the kernel needs while booting (init_size included)
    cmdline: str
    initrd_gpa: int = 0
    initrd_size: int = 0
    rsdp_gpa: int = 0
    kernel_version: str = ""
    acpi: AcpiBlob | None = None


# --------------------------------------------------------------------------- devices


@dataclass
class PcDevices:
    acpi_pm: AcpiPm
    reset: ResetControl
    i8042: I8042
    rtc: Rtc


class _Sink:
    """A port that ignores writes and reads as all-ones (port 0x80: the POST code / I/O delay port)."""

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        pass


class _PciAddressAndReset:
    """Ports 0xCF8-0xCFB: PCI's CONFIG_ADDRESS dword, and at 0xCF9 the one-byte reset control register.

    As on a PC chipset, only a byte access to 0xCF9 reaches the reset register;
    everything else goes to the PCI root's address latch.
    """

    def __init__(self, address_port, reset: ResetControl, reset_offset: int):
        self.address_port, self.reset, self.reset_offset = address_port, reset, reset_offset

    def read(self, offset: int, size: int) -> bytes:
        if offset == self.reset_offset and size == 1:
            return self.reset.read(0, 1)
        return self.address_port.read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        if offset == self.reset_offset and len(data) == 1:
            self.reset.write(0, data)
        else:
            self.address_port.write(offset, data)


def add_pc_devices(machine: "Machine") -> PcDevices:
    """The legacy PC devices a Linux guest pokes at: ACPI PM1a, reset port, i8042, CMOS RTC, port 0x80.

    Also creates PCI bus 0 (the DSDT describes its host bridge), because its
    CONFIG_ADDRESS port 0xCF8-0xCFB shares 0xCF9 with the reset register: the
    two become one bus range.  Idempotent: a second call returns the devices of the first.
    """
    existing = getattr(machine, "pc_devices", None)
    if existing is not None:
        return existing
    vm = machine.vm
    pm = AcpiPm(lambda level: vm.irq_line(SCI_IRQ, level))
    reset = ResetControl()
    kbc = I8042(lambda irq, level: vm.irq_line(irq, level))
    rtc = Rtc(mem_size=machine.config.mem_mib * MIB)
    pio = machine.pio
    pio.insert(PM1A_EVT_PORT, PM1A_EVT_LEN, pm.event, "acpi-pm1a-evt")
    pio.insert(PM1A_CNT_PORT, PM1A_CNT_LEN, pm.control_block, "acpi-pm1a-cnt")
    getattr(machine, "pci", None)      # create PCI bus 0 (and its 0xCF8/0xCFC ports) now, not after us
    shared = pio.find(RESET_PORT)
    if shared is not None:
        pio.remove(shared.base)
        pio.insert(shared.base, shared.length, _PciAddressAndReset(shared.device, reset, RESET_PORT - shared.base),
                   f"{shared.name}+reset-cf9")
    else:
        pio.insert(RESET_PORT, 1, reset, "reset-cf9")
    pio.insert(I8042_DATA, 1, kbc.data_port, "i8042-data")
    pio.insert(I8042_STATUS, 1, kbc.command_port, "i8042-cmd")
    pio.insert(RTC_PORT, 2, rtc, "cmos-rtc")
    pio.insert(POST_PORT, 1, _Sink(), "post")
    devs = PcDevices(pm, reset, kbc, rtc)
    machine.pc_devices = devs  # type: ignore[attr-defined]
    return devs


# --------------------------------------------------------------------------- entry point


def boot_linux(machine: "Machine", kernel: str | Path | bytes, cmdline: str = "",
               initrd: str | Path | bytes | None = None, *, decompress: str = "guest") -> LinuxBoot:
    """Load ``kernel`` (bzImage or ELF vmlinux; a path or the file's bytes) and set vCPU 0 up to enter it;
    add the PC devices.

    ``decompress`` (bzImage only): ``"guest"`` runs the kernel's own decompressor,
    ``"host"`` unpacks the vmlinux in the VMM and enters it directly.  Every header of the
    kernel and the initrd is checked before guest RAM is written: :class:`KernelImageError`
    (a :class:`BzImageError` as its cause) or :class:`InitramfsError`, naming the field.
    """
    if decompress not in ("guest", "host"):
        raise ValueError(f"decompress must be 'guest' or 'host', not {decompress!r}")
    if isinstance(kernel, (bytes, bytearray)):
        path, data = Path("kernel"), bytes(kernel)
    else:
        path = Path(kernel)
        data = read_image(path, "kernel", machine.config.mem_mib << 20)
    rd = (initrd if isinstance(initrd, (bytes, bytearray)) or initrd is None
          else read_image(initrd, "initrd", machine.config.mem_mib << 20))
    if rd is not None:
        check_initrd(rd, "initrd" if isinstance(initrd, (bytes, bytearray)) else f"initrd {initrd}")
    if data[:4] == b"\x7fELF":
        info = _boot_pvh(machine, data, str(path), cmdline, rd)
    else:
        try:
            bz = parse_bzimage(data)
        except BzImageError as e:
            raise KernelImageError(f"{path}: {e}") from e
        info = _boot_bzimage(machine, bz, str(path), cmdline, rd, host_decompress=decompress == "host")
    add_pc_devices(machine)
    return info


def _acpi(machine: "Machine") -> AcpiBlob:
    """The ACPI tables for this machine (built, not yet written: the caller writes them once all checks passed)."""
    return build_acpi_tables(L.BIOS_AREA, num_cpus=machine.config.cpus,
                             mmio_window=(L.PCI_MMIO_START, L.PCI_MMIO_END - 1), cmos_rtc=True)


def _boot_bzimage(machine: "Machine", bz: BzImage, name: str, cmdline: str, initrd: bytes | None, *,
                  host_decompress: bool) -> LinuxBoot:
    # Everything is checked and built first; guest RAM is written only at the end.
    hdr = bz.header
    load = hdr.load_address
    kernel_end = load + hdr.memory_footprint(len(bz.kernel))
    protocol = "bzimage"
    segments: list[tuple[int, bytes, int]] = [(load, bytes(bz.kernel), len(bz.kernel))]
    entry = bz.entry_64
    if host_decompress:
        elf = extract_vmlinux(bz)
        vmlinux = parse_vmlinux(elf, name)
        segments, entry = vmlinux.segments, vmlinux.entry
        kernel_end = max(kernel_end, vmlinux.end)
        load = min(p for p, _, _ in segments)
        protocol = "bzimage+host-decompress"
    check_kernel_fits(machine.ram_layout, machine.config.mem_mib, load, kernel_end, name)
    try:
        raw_cmdline = encode_cmdline(cmdline, hdr)
    except ValueError as e:
        raise LinuxBootError(str(e)) from e
    rd_gpa = rd_size = 0
    if initrd:
        rd_size = len(initrd)
        rd_gpa = place_initrd(machine.ram_layout, machine.config.mem_mib, rd_size, kernel_end, hdr.initrd_addr_max)
    acpi = _acpi(machine)
    e820 = build_e820(machine.ram_layout, pci_hole=(L.MMIO_HOLE_START, L.MMIO_HOLE_END))
    zero_page = build_zero_page(hdr, L.CMDLINE, rd_gpa, rd_size, e820, acpi_rsdp=acpi.rsdp_gpa)
    mem = machine.mem
    for paddr, blob, memsz in segments:
        mem.write(paddr, blob)
        if memsz > len(blob):
            mem.fill(paddr + len(blob), memsz - len(blob))
    if initrd:
        mem.write(rd_gpa, initrd)
    mem.write(L.CMDLINE, raw_cmdline)
    mem.write(acpi.base_gpa, acpi.data)
    mem.write(L.ZERO_PAGE, zero_page)
    LM.write_boot_tables(mem)
    LM.set_long_mode_entry(machine.vcpus[0], entry, rsi=L.ZERO_PAGE)
    return LinuxBoot(protocol, entry, load, kernel_end, cmdline, rd_gpa, rd_size, acpi.rsdp_gpa,
                     hdr.kernel_version, acpi)


def _boot_pvh(machine: "Machine", data: bytes, name: str, cmdline: str, initrd: bytes | None) -> LinuxBoot:
    acpi = _acpi(machine)
    image, rd_gpa, rd_size = machine.boot_pvh(data, cmdline, initrd, rsdp=acpi.rsdp_gpa, name=name)
    machine.mem.write(acpi.base_gpa, acpi.data)
    start = min(p for p, _, _ in image.segments)
    return LinuxBoot("pvh", image.entry, start, image.end, cmdline, rd_gpa, rd_size, acpi.rsdp_gpa, "", acpi)


# --------------------------------------------------------------------------- host-side decompression


@dataclass
class Vmlinux:
    entry: int                                  # physical address of startup_64
    segments: list[tuple[int, bytes, int]]      # (paddr, file bytes, memsz)

    @property
    def end(self) -> int:
        return max(p + m for p, _, m in self.segments)


def parse_vmlinux(data: bytes, name: str = "vmlinux") -> Vmlinux:
    """The PT_LOAD segments (at their physical addresses) and physical entry of a 64-bit vmlinux.

    Every header is checked first (:func:`exitless.boot.pvh.elf_load_segments`); raises
    :class:`KernelImageError` naming the field.
    """
    if data[:4] != b"\x7fELF" or len(data) < 64 or data[4] != 2:
        raise KernelImageError(f"{name}: the bzImage payload is not a 64-bit ELF vmlinux")
    try:
        elf = ELFFile(io.BytesIO(data))
        segments = elf_load_segments(elf, len(data), f"{name} (payload vmlinux)")
        e_entry = elf.header["e_entry"]
    except (ELFError, struct.error) as e:
        raise KernelImageError(f"{name}: malformed vmlinux in the bzImage payload ({e})") from e
    entry_phys = None
    for s in segments:
        if s.paddr <= e_entry < s.paddr + len(s.data):       # Linux links e_entry as a physical address
            entry_phys = e_entry
            break
    else:
        for s in segments:
            if s.vaddr <= e_entry < s.vaddr + len(s.data):
                entry_phys = s.paddr + (e_entry - s.vaddr)
                break
    if entry_phys is None:
        raise KernelImageError(f"{name}: vmlinux e_entry {e_entry:#x} is not inside any PT_LOAD segment's file bytes")
    return Vmlinux(entry_phys, [(s.paddr, s.data, s.memsz) for s in segments])


_MAGICS = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"),
    (b"BZh", "bzip2"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x89LZO", "lzo"),
)


def payload_format(payload: bytes) -> str:
    for magic, fmt in _MAGICS:
        if payload.startswith(magic):
            return fmt
    if payload[:4] == b"\x7fELF":
        return "none"
    return "unknown"


def extract_vmlinux(bz: BzImage) -> bytes:
    """Decompress the bzImage's payload (the kernel build appends the uncompressed size: checked)."""
    hdr = bz.header
    if not hdr.payload_length:
        raise KernelImageError("this bzImage declares no payload (payload_length = 0): cannot unpack it on the host")
    if hdr.payload_length < 8:
        raise KernelImageError(f"payload_length {hdr.payload_length} is too short for a compressed kernel and "
                               "its appended 4-byte size")
    start = hdr.kernel_offset + hdr.payload_offset
    payload = bz.image[start:start + hdr.payload_length]
    if len(payload) < 8:
        raise KernelImageError(f"bzImage payload of {len(payload)} bytes: corrupt")
    expected = struct.unpack("<I", payload[-4:])[0]
    fmt = payload_format(payload)
    try:
        out = _decompress(fmt, payload, expected)
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as e:   # a corrupt payload
        raise KernelImageError(f"bzImage payload ({fmt}) does not unpack: {e}") from None
    if fmt != "none" and len(out) != expected:
        raise KernelImageError(f"unpacked {len(out)} bytes of vmlinux, the bzImage says {expected}: corrupt payload")
    return out


def _decompress(fmt: str, payload: bytes, expected: int) -> bytes:
    """``payload`` unpacked from ``fmt``; ``expected`` is the size the bzImage declares (bytes), a bound for LZ4."""
    if fmt == "none":
        out = payload
    elif fmt == "gzip":
        out = zlib.decompressobj(wbits=31).decompress(payload)
    elif fmt in ("xz", "lzma"):
        out = lzma.LZMADecompressor(lzma.FORMAT_XZ if fmt == "xz" else lzma.FORMAT_ALONE).decompress(payload)
    elif fmt == "bzip2":
        out = bz2.BZ2Decompressor().decompress(payload)
    elif fmt == "lz4":
        out = lz4_legacy_decompress(payload, max_size=expected)
    elif fmt == "zstd":
        out = _tool(["zstd", "-d", "-c", "-q"], payload, "zstd")
    else:
        raise KernelImageError(f"bzImage payload compressed with {fmt}: exitless cannot unpack it on the host "
                               "(use --decompress guest)")
    return out


def _tool(cmd: list[str], data: bytes, name: str) -> bytes:
    if shutil.which(cmd[0]) is None:
        raise KernelImageError(f"unpacking a {name} kernel on the host needs the `{cmd[0]}` program")
    # Trailing bytes (the appended size) make some tools complain after writing everything: keep stdout.
    p = subprocess.run(cmd, input=data, capture_output=True, check=False)
    return p.stdout


LZ4_LEGACY_MAGIC = 0x184C2102
#: A legacy frame's blocks each decompress to at most 8 MiB (lz4's LEGACY_BLOCKSIZE; the kernel's unlz4 too).
LZ4_LEGACY_BLOCK_MAX = 8 << 20


def lz4_legacy_decompress(data: bytes, max_size: int | None = None) -> bytes:
    """Decompress an LZ4 legacy frame (what ``CONFIG_KERNEL_LZ4`` appends to a bzImage).

    Layout (lib/decompress_unlz4.c): magic 0x184C2102, then ``(u32 compressed size, block)``
    repeated, a repeated magic starting a concatenated frame; the walk stops at a word that
    cannot be a block (the kernel build's appended uncompressed size, or the end).  Each block
    is handed to python-lz4's ``lz4.block.decompress``.  ``max_size`` (bytes) bounds the output.

    Raises :class:`KernelImageError` naming the block's file offset when a block is corrupt,
    or when the output would exceed ``max_size``.
    """
    if len(data) < 4 or struct.unpack_from("<I", data)[0] != LZ4_LEGACY_MAGIC:
        raise KernelImageError("not an LZ4 legacy frame (no magic 0x184c2102)")
    out = bytearray()
    pos = 4
    n = len(data)
    while pos + 4 <= n:
        (bsize,) = struct.unpack_from("<I", data, pos)
        if bsize == LZ4_LEGACY_MAGIC:          # concatenated frame
            pos += 4
            continue
        if bsize == 0 or pos + 4 + bsize > n:
            break                              # the appended uncompressed size, or the end
        try:
            out += lz4.block.decompress(data[pos + 4:pos + 4 + bsize], uncompressed_size=LZ4_LEGACY_BLOCK_MAX)
        except lz4.block.LZ4BlockError as e:
            raise KernelImageError(f"corrupt LZ4 block of {bsize} bytes at payload offset {pos:#x}: {e}") from e
        if max_size is not None and len(out) > max_size:
            raise KernelImageError(f"LZ4 payload unpacks to more than the {max_size} bytes it declares")
        pos += 4 + bsize
    return bytes(out)


# --------------------------------------------------------------------------- host-specific kernel parameters

#: Kernel parameters a ``kvm_pvm`` host needs, and why (found by booting Debian's 6.1 cloud kernel here):
#: guest ring-0 code runs through KVM's instruction emulator, which cannot emulate some instructions.
PVM_KERNEL_PARAMS: tuple[tuple[str, str], ...] = (
    ("noxsave", "KVM's emulator has no XSAVE/XRSTOR: the FPU init's first XRSTOR is an emulation failure"),
    ("clearcpuid=smap,cx16,popcnt,rdrand,rdseed,fsgsbase,rdpid,invpcid,pcid,rdtscp,ssse3,sse4_1,sse4_2,pclmulqdq,"
     "aes,sha_ni,avx,avx2,avx512f,gfni,vaes,vpclmulqdq,movbe",
     "the kernel sees host CPUID bits KVM_GET_SUPPORTED_CPUID does not list, and KVM's emulator lacks their "
     "instructions: CMPXCHG16B (SLUB's cmpxchg_double, right after 'Memory:'), CLAC/STAC (smap), POPCNT, "
     "SSE/AVX (crypto and blake2s), RDRAND/RDSEED/RDPID, FSGSBASE, INVPCID/PCID.  Not erms/fsrm: REP MOVSB/"
     "STOSB cost 6x REP MOVSQ/STOSQ per 4 KiB in ring 0 here (21 vs 3.7 ms, 13 vs 2.0 ms), but a boot with "
     "clearcpuid+=erms,fsrm beside one without (session 4, loaded) was no faster: unpacking the initramfs "
     "took 855 s against 642 s"),
    ("mitigations=off", "no speculation mitigations to patch in: early boot runs ~1/3 faster under emulation, "
     "and no VERW (which the emulator lacks)"),
    ("initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init,tracer_init_tracefs",
     "tracing set-up that runs for minutes under emulation and serves only tracing: "
     "ftrace_check_for_weak_functions makes tens of thousands of kallsyms look-ups; trace_eval_init's work "
     "(eval_map_work_func: every trace event's format against every enum map; late_initcall_sync waits for it) "
     "showed as soft lockups in trace_event_update_all; tracer_init_tracefs (a file per trace event in tracefs) "
     "had not returned after 8 minutes"),
    ("cryptomgr.notests", "the crypto self-tests run for minutes under emulation; a request that waits for one "
     "gives up after 60 s ('Problem loading in-kernel X.509 certificate (-110)', a minute lost)"),
    ("rodata=off", "after the last late initcall ('evm: HMAC attrs') the kernel went silent for more than 4 minutes "
     "(6 in an earlier run, and under QEMU with KVM here): mark_rodata_ro() splits the kernel mapping and "
     "the W+X check walks every kernel page table, all emulated; rodata=off skips both (the guest kernel's "
     "text and read-only data stay writable)"),
    ("nowatchdog", "a vCPU under emulation is 'stuck' by the lockup detectors' measure: their reports (oopses "
     "printed through the emulated UART) cost more time"),
)
#: What an unmodified kernel meets on kvm_pvm, after the parameters above, and what exitless does about it.
PVM_LIMIT = ("guest ring-0 code is emulated here, so Linux boots slowly (minutes to userspace); exitless finishes "
             "the instructions KVM's emulator cannot (INT3, FWAIT, LDMXCSR...: exitless/x86/fallback.py, "
             "'exitless -v run' counts them) and turns the page fault kvm_pvm makes of a user-mode SYSCALL back "
             "into a system call (exitless/x86/pvm_syscall.py)")


def host_kernel_params(flavour: str) -> list[str]:
    """Parameters this host's KVM flavour needs on the kernel command line (none on VMX/SVM)."""
    return [p for p, _ in PVM_KERNEL_PARAMS] if flavour == "pvm" else []


def add_params(cmdline: str, params: list[str]) -> tuple[str, list[str]]:
    """``cmdline`` with ``params`` appended unless a parameter of the same name is already there.

    Returns the new command line and the parameters actually added.
    """
    present = {w.split("=", 1)[0] for w in cmdline.split()}
    added = [p for p in params if p.split("=", 1)[0] not in present]
    return " ".join([cmdline.strip(), *added]).strip(), added


# --------------------------------------------------------------------------- watching the console

class BootConsole:
    """The guest's COM1 output: kept, split into timestamped lines, matched against patterns.

    What is kept is bounded whatever the guest prints: the last :attr:`KEEP_BYTES` bytes
    (``data``, ``text``), the last :attr:`KEEP_LINES` lines, and a line longer than
    :attr:`MAX_LINE` bytes is cut into pieces of that size.

    Use as ``VmConfig(console=BootConsole(...))``.  ``sink`` receives the raw bytes
    (e.g. a terminal).  ``milestones`` (:class:`exitless.boot.milestones.BootMilestones`) is fed
    every line with its time from :meth:`restart_clock` (s): ``first_line_at`` (the
    kernel's "Linux version"), ``ready_at`` (the initramfs's READY marker: userspace is up) are
    two of them.  ``stop_after``:
    once every one of these substrings has been seen (in any order, each
    within one line), the console raises :class:`GuestStop` from the vCPU thread that wrote
    the byte, so a test stops the VM as soon as early boot has shown what it
    looks for.
    """

    KEEP_BYTES = 1 << 20
    KEEP_LINES = 10_000
    MAX_LINE = 4096

    def __init__(self, sink=None, *, stop_after: tuple[str, ...] = (), ready_marker: str | None = None,
                 clock=None):
        import time

        self.clock = clock or time.monotonic
        self.t0 = self.clock()
        self.sink = sink
        self.data = bytearray()
        self.lines: list[tuple[float, str]] = []
        self._line = bytearray()
        self.milestones = BootMilestones(ready_marker or READY_MARKER)
        self._waiting = list(stop_after)
        self.stopped_by_console = False

    def restart_clock(self) -> None:
        self.t0 = self.clock()

    def __call__(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > 2 * self.KEEP_BYTES:       # trimmed in halves: amortised O(1) per byte
            del self.data[:-self.KEEP_BYTES]
        if self.sink is not None:
            self.sink(data)
        for b in data:
            if b == 0x0A:
                self._end_line()
            elif b != 0x0D:
                self._line.append(b)
                if len(self._line) >= self.MAX_LINE:
                    self._end_line()

    def _end_line(self) -> None:
        from ..exits import GuestStop, VmExit

        line = self._line.decode(errors="replace")
        self._line.clear()
        t = self.clock() - self.t0
        self.lines.append((t, line))
        if len(self.lines) > 2 * self.KEEP_LINES:
            del self.lines[:-self.KEEP_LINES]
        self.milestones.feed(t, line)
        if self._waiting:
            self._waiting = [p for p in self._waiting if p not in line]
            if not self._waiting:
                self.stopped_by_console = True
                raise GuestStop(VmExit("stopped", 0, f"the console showed what was waited for (at {t:.1f} s)"))

    @property
    def first_line_at(self) -> float | None:
        return self.milestones.first_line_s

    @property
    def ready_at(self) -> float | None:
        return self.milestones.userspace_s

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace").replace("\r\n", "\n")

    def tail(self, n: int = 20) -> str:
        return "\n".join(line for _, line in self.lines[-n:])
