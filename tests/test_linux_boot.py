"""Booting Linux in exitless: the 64-bit boot protocol, PVH, and what early boot shows through COM1.

The guest is Debian's cloud kernel from ``fetch_guest()`` (cached; ``$EXITLESS_CACHE``
honoured).  The early-boot tests run everywhere /dev/kvm works: they boot with
``console=ttyS0 earlyprintk=serial``, wait until the kernel has printed the
lines that prove the VMM's boot data reached it (its banner, the command line,
the e820 map, the ACPI tables, the MADT's CPU count) and stop the VM there.

On a ``kvm_pvm`` host guest ring-0 code is emulated instruction by instruction
(exitless's instruction fallback and system-call repair take the kernel to
userspace, see ``exitless.boot.linux.PVM_LIMIT``); a boot to userspace took
20 minutes there on a loaded host, so one boot serves every userspace test of this module.
"""
from __future__ import annotations

import re
import struct
import time
from pathlib import Path

import pytest

from exitless.boot import linux as LX
from exitless.boot.bzimage import parse_bzimage
from exitless.boot.e820 import build_e820
from exitless.boot.initramfs import EXIT_MARKER, build_initramfs, parse_exit_status
from exitless.boot.pvh import KernelImageError
from exitless.doctor import kvm_flavour
from exitless.guest.fetch import GuestArtifacts, fetch_guest
from exitless.x86 import layout as L
from exitless.x86 import long_mode as LM

FLAVOUR = kvm_flavour()
PVM = FLAVOUR == "pvm"
#: seconds until early boot has printed the lines below (pvm: ~25 s measured; generous bound)
EARLY_BOUND = 150.0 if PVM else 30.0
BASE = "console=ttyS0 earlyprintk=serial"
E820_NAMES = {1: "usable", 2: "reserved", 3: "ACPI data", 4: "ACPI NVS", 5: "unusable"}


@pytest.fixture(scope="session")
def guest() -> GuestArtifacts:
    return fetch_guest()      # $EXITLESS_CACHE or ~/.cache/exitless/guest


@pytest.fixture(scope="session")
def initrd(guest: GuestArtifacts) -> bytes:
    return build_initramfs(guest.busybox, modules=["virtio_pci", "virtio_blk"], modules_root=guest.modules_root,
                           kver=guest.kernel_version, command="echo hello from the guest; exit 3")


@pytest.fixture(scope="session")
def vmlinux(guest: GuestArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vmlinux") / "vmlinux"
    path.write_bytes(LX.extract_vmlinux(parse_bzimage(guest.vmlinuz.read_bytes())))
    return path


def host_params(cmdline: str) -> str:
    return LX.add_params(cmdline, LX.host_kernel_params(FLAVOUR))[0]


class Boot:
    def __init__(self, console: LX.BootConsole, exit, info: LX.LinuxBoot, machine_ram, seconds: float):
        self.console, self.exit, self.info, self.ram, self.seconds = console, exit, info, machine_ram, seconds

    @property
    def lines(self) -> list[str]:
        return [line for _, line in self.console.lines]

    def line(self, pattern: str) -> str:
        for line in self.lines:
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no console line matches {pattern!r}; the console:\n" + "\n".join(self.lines[-40:]))


def boot(kernel, cmdline: str, *, initrd: bytes | None = None, cpus: int = 1, mem: int = 256,
         decompress: str | None = None, stop_after: tuple[str, ...] = (), timeout: float = EARLY_BOUND) -> Boot:
    from exitless.vm import Machine, VmConfig

    if decompress is None:
        decompress = "host" if PVM else "guest"
    console = LX.BootConsole(stop_after=stop_after)
    t0 = time.monotonic()
    with Machine(VmConfig(mem_mib=mem, cpus=cpus, console=console)) as m:
        info = LX.boot_linux(m, kernel, cmdline, initrd, decompress=decompress)
        exit = m.run(timeout=timeout)
        ram = list(m.ram_layout)
    return Boot(console, exit, info, ram, time.monotonic() - t0)


EARLY_LINES = ("Linux version ", "Command line: ", "BIOS-e820: ", "ACPI: RSDP ", "ACPI: XSDT ", "ACPI: FACP ",
               "ACPI: DSDT ", "ACPI: APIC ", "smpboot: Allowing ")


@pytest.fixture(scope="module")
def early(guest: GuestArtifacts, initrd: bytes) -> Boot:
    return boot(guest.vmlinuz, host_params(BASE), initrd=initrd, stop_after=EARLY_LINES + ("RAMDISK: ",))


# --------------------------------------------------------------------------- early boot (every KVM flavour)


@pytest.mark.kvm
def test_early_boot_shows_banner_within_bound(early: Boot, guest: GuestArtifacts) -> None:
    assert early.console.stopped_by_console, f"stopped by {early.exit}; console:\n{early.console.tail(30)}"
    assert early.seconds < EARLY_BOUND
    assert f"Linux version {guest.kernel_version} " in early.line("Linux version ")
    assert early.console.first_line_at is not None and early.console.first_line_at < early.seconds


@pytest.mark.kvm
def test_early_boot_parsed_our_command_line(early: Boot) -> None:
    assert early.line(r"\] Command line: ").split("Command line: ", 1)[1] == early.info.cmdline
    if PVM:
        for p in LX.host_kernel_params("pvm"):
            assert p in early.info.cmdline.split()


@pytest.mark.kvm
def test_early_boot_e820_is_our_map(early: Boot) -> None:
    printed = []
    for line in early.lines:
        m = re.search(r"BIOS-e820: \[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\] (.+)$", line)
        if m:
            printed.append((int(m.group(1), 16), int(m.group(2), 16), m.group(3).strip()))
    want = [(e.addr, e.end - 1, E820_NAMES[e.type])
            for e in build_e820(early.ram, pci_hole=(L.MMIO_HOLE_START, L.MMIO_HOLE_END))]
    assert printed == want
    assert printed[-1][1] == (256 << 20) - 1


@pytest.mark.kvm
def test_early_boot_found_our_acpi_tables(early: Boot) -> None:
    tables = early.info.acpi.tables
    assert early.info.rsdp_gpa == tables["RSD PTR"] == L.BIOS_AREA
    for sig, name in (("RSD PTR", "RSDP"), ("XSDT", "XSDT"), ("FACP", "FACP"), ("DSDT", "DSDT"), ("APIC", "APIC"),
                      ("FACS", "FACS")):
        line = early.line(rf"ACPI: {name} 0x")
        assert int(line.split(f"ACPI: {name} ")[1].split()[0], 16) == tables[sig], line
    assert "EXITLS" in early.line("ACPI: RSDP ")


@pytest.mark.kvm
def test_early_boot_one_cpu_and_the_initrd(early: Boot) -> None:
    assert "smpboot: Allowing 1 CPUs, 0 hotplug CPUs" in early.line("smpboot: Allowing")
    m = re.search(r"RAMDISK: \[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\]", early.line("RAMDISK: "))
    assert int(m.group(1), 16) == early.info.initrd_gpa
    assert int(m.group(2), 16) + 1 == (early.info.initrd_gpa + early.info.initrd_size + 4095) & ~4095
    assert early.info.initrd_gpa >= early.info.kernel_end


@pytest.mark.kvm
def test_two_cpus_in_the_madt(guest: GuestArtifacts) -> None:
    b = boot(guest.vmlinuz, host_params(BASE), cpus=2, stop_after=("smpboot: Allowing ",))
    assert b.console.stopped_by_console, b.console.tail(30)
    assert "smpboot: Allowing 2 CPUs, 0 hotplug CPUs" in b.line("smpboot: Allowing")
    assert b.line("ACPI: Using ACPI \\(MADT\\) for SMP configuration information")
    apic = b.line(r"ACPI: APIC 0x")
    assert int(apic.split("ACPI: APIC ")[1].split()[1], 16) == len(b.info.acpi.table("APIC"))


@pytest.mark.kvm
def test_pvh_vmlinux_early_boot(vmlinux: Path, initrd: bytes, guest: GuestArtifacts) -> None:
    cmdline = host_params(BASE + " pvh_test=1")
    b = boot(vmlinux, cmdline, initrd=initrd, stop_after=("Linux version ", "Command line: ", "ACPI: RSDP ",
                                                          "RAMDISK: "))
    assert b.info.protocol == "pvh"
    assert b.console.stopped_by_console, b.console.tail(30)
    assert f"Linux version {guest.kernel_version} " in b.line("Linux version ")
    assert b.line(r"\] Command line: ").endswith(cmdline)
    # the RSDP came through start_info.rsdp_paddr, the initrd as the first PVH module
    assert int(b.line("ACPI: RSDP ").split("ACPI: RSDP ")[1].split()[0], 16) == b.info.rsdp_gpa
    m = re.search(r"RAMDISK: \[mem (0x[0-9a-f]+)-", b.line("RAMDISK: "))
    assert int(m.group(1), 16) == b.info.initrd_gpa


@pytest.mark.kvm
def test_bzimage_through_its_own_decompressor(guest: GuestArtifacts) -> None:
    """The real 64-bit boot protocol: load+0x200, the kernel's decompressor, KASLR.  Minutes on pvm."""
    bound = 400.0 if PVM else 30.0
    cmdline = host_params(BASE)
    b = boot(guest.vmlinuz, cmdline, decompress="guest", stop_after=("Command line: ",), timeout=bound)
    hdr = parse_bzimage(guest.vmlinuz.read_bytes()).header
    assert b.info.protocol == "bzimage" and b.info.entry == hdr.load_address + 0x200
    assert b.console.stopped_by_console, f"{b.exit}; console:\n{b.console.tail(20)}"
    assert b.line(r"\] Command line: ").endswith(cmdline)


# --------------------------------------------------------------------------- errors (KVM needed: a Machine exists)


@pytest.mark.kvm
def test_truncated_and_random_kernels(guest: GuestArtifacts, tmp_path: Path) -> None:
    from exitless.vm import Machine, VmConfig

    data = guest.vmlinuz.read_bytes()
    cases = {"trunc-header": data[:0x300], "trunc-setup": data[:4096], "trunc-payload": data[: len(data) // 2],
             "random": bytes(range(256)) * 4096, "empty": b""}
    with Machine(VmConfig(mem_mib=256, console=lambda b: None)) as m:
        for name, blob in cases.items():
            p = tmp_path / name
            p.write_bytes(blob)
            with pytest.raises(KernelImageError) as e:
                LX.boot_linux(m, p, BASE)
            assert str(p) in str(e.value) and ("truncated" in str(e.value) or "not a Linux bzImage" in str(e.value)
                                               or "too short" in str(e.value)), str(e.value)
        with pytest.raises(KernelImageError, match="No such file"):
            LX.boot_linux(m, tmp_path / "absent", BASE)


@pytest.mark.kvm
def test_initrd_larger_than_memory(guest: GuestArtifacts, vmlinux: Path) -> None:
    from exitless.vm import Machine, VmConfig

    big = bytes(200 << 20)
    for kernel in (guest.vmlinuz, vmlinux):
        with Machine(VmConfig(mem_mib=128, console=lambda b: None)) as m:
            with pytest.raises(LX.LinuxBootError, match=r"initrd of 200\.0 MiB does not fit .* --mem \d+M"):
                LX.boot_linux(m, kernel, BASE, big)


@pytest.mark.kvm
def test_too_little_memory_for_the_kernel(guest: GuestArtifacts) -> None:
    from exitless.vm import Machine, VmConfig

    with Machine(VmConfig(mem_mib=48, console=lambda b: None)) as m:
        with pytest.raises(LX.LinuxBootError, match=r"needs guest RAM from 16 to \d+ MiB .* VM has 48 MiB"):
            LX.boot_linux(m, guest.vmlinuz, BASE)
    with pytest.raises(ValueError, match="too small"):
        Machine(VmConfig(mem_mib=16))


# --------------------------------------------------------------------------- userspace (every KVM flavour)

#: seconds for a boot to userspace and back (kvm_pvm: ring-0 code is emulated; 20 min measured on a loaded host)
USERSPACE_TIMEOUT = 2400.0 if PVM else 120.0


@pytest.fixture(scope="module")
def userspace(guest: GuestArtifacts, vmlinux: Path) -> Boot:
    """One boot serves the userspace checks of this module (20 min on a loaded kvm_pvm host): the PVH vmlinux,
    1 CPU, a command that prints what the tests look for and exits 3, and /init rebooting."""
    rd = build_initramfs(guest.busybox, modules=["virtio_pci", "virtio_blk"], modules_root=guest.modules_root,
                         kver=guest.kernel_version, shutdown="reboot", compress=not PVM,
                         command="echo hello from the guest; echo nproc=$(nproc); cat /sys/class/rtc/rtc0/name; "
                                 "date -u +%s; exit 3")
    return boot(vmlinux, host_params("console=ttyS0 panic=-1"), initrd=rd, timeout=USERSPACE_TIMEOUT)


@pytest.mark.kvm
def test_userspace_exit_status(userspace: Boot) -> None:
    assert userspace.console.ready_at is not None, f"{userspace.exit}; console:\n{userspace.console.tail(40)}"
    assert "hello from the guest" in userspace.console.text
    assert parse_exit_status(userspace.console.text, EXIT_MARKER) == 3
    assert userspace.line(r"^nproc=") == "nproc=1"


@pytest.mark.kvm
def test_guest_reboot_is_a_reset_exit(userspace: Boot) -> None:
    assert userspace.exit.kind == "reset", f"{userspace.exit}; console:\n{userspace.console.tail(40)}"


@pytest.mark.kvm
def test_rtc_time_reaches_the_guest(userspace: Boot) -> None:
    assert "rtc_cmos" in userspace.console.text
    stamps = [int(x) for x in re.findall(r"^(\d{9,})\s*$", userspace.console.text, re.M)]
    # the guest read the RTC at boot: its clock is the host's, give or take the boot's own length
    assert stamps and abs(stamps[-1] - time.time()) < 120 + userspace.seconds


@pytest.mark.kvm
def test_userspace_milestones(userspace: Boot) -> None:
    """The milestones ``exitless bench boot`` reports, read by the same parser from this real boot
    (which CI pays for anyway: on kvm_pvm the bench's own run to power-off is in the slow set)."""
    m = userspace.console.milestones
    assert m.reached() == "userspace", f"{m.row()}; console:\n{userspace.console.tail(40)}"
    assert 0 < m.first_line_s < m.init_s < m.userspace_s < userspace.seconds, m.row()
    assert m.init_path == "/init"
    assert m.kernel_time_s is not None and m.kernel_time_s > 0
    assert m.last_line == userspace.lines[-1][:160]


# --------------------------------------------------------------------------- pieces (no KVM)


def test_identity_page_tables() -> None:
    pages = dict(LM.identity_page_tables())
    pml4 = struct.unpack("<512Q", pages[LM.PML4_GPA])
    assert pml4[0] == LM.PDPT_GPA | 3 and not any(pml4[1:])
    pdpt = struct.unpack("<512Q", pages[LM.PDPT_GPA])
    assert [e & ~0xFFF for e in pdpt[:4]] == [LM.PD_GPA + i * 4096 for i in range(4)] and not any(pdpt[4:])
    for g in range(4):
        pd = struct.unpack("<512Q", pages[LM.PD_GPA + g * 4096])
        assert all(e == (g << 30 | i << 21 | 0x83) for i, e in enumerate(pd))
    assert max(pages) + 4096 <= L.CMDLINE and min(pages) > L.ZERO_PAGE


def test_boot_segments_match_the_gdt() -> None:
    cs, ds = LM._segment(LM.BOOT_CS), LM._segment(LM.BOOT_DS)
    assert (cs.l, cs.db, cs.type, cs.s, cs.present, cs.g) == (1, 0, 0xB, 1, 1, 1)
    assert (ds.l, ds.db, ds.type, ds.present) == (0, 1, 0x3, 1)
    assert len(LM.gdt_bytes()) == 8 * len(LM.GDT_ENTRIES) and LM.GDT_GPA + len(LM.gdt_bytes()) <= L.PVH_START_INFO


def test_host_params_and_add_params() -> None:
    assert LX.host_kernel_params("vmx") == [] and LX.host_kernel_params("svm") == []
    pvm = LX.host_kernel_params("pvm")
    assert pvm[0] == "noxsave" and "mitigations=off" in pvm and all(p for p in pvm)
    assert "cx16" in next(p for p in pvm if p.startswith("clearcpuid=")).split("=", 1)[1].split(",")
    line, added = LX.add_params("console=ttyS0 mitigations=auto", pvm)
    assert added == [p for p in pvm if p != "mitigations=off"]                  # the user's value wins
    assert line == " ".join(["console=ttyS0 mitigations=auto", *added])


def lz4_legacy_frame(*blocks: bytes, appended_size: int | None = None) -> bytes:
    """A legacy frame as ``lz4 -l`` / the kernel build writes it: magic, (u32 size, block)*, size."""
    import lz4.block
    out = bytearray(b"\x02\x21\x4c\x18")
    for raw in blocks:
        body = lz4.block.compress(raw, store_size=False)
        out += struct.pack("<I", len(body)) + body
    return bytes(out) + struct.pack("<I", appended_size if appended_size is not None else sum(map(len, blocks)))


def test_lz4_legacy_frame_walk() -> None:
    a, b = bytes(range(256)) * 100, b"exitless " * 5000
    data = lz4_legacy_frame(a, b)
    assert LX.lz4_legacy_decompress(data) == a + b
    assert LX.payload_format(data) == "lz4"
    assert LX.payload_format(b"\x1f\x8b\x08") == "gzip" and LX.payload_format(b"nonsense") == "unknown"
    # a concatenated frame (its magic repeated) goes on
    assert LX.lz4_legacy_decompress(data[:-4] + data[:-4] + data[-4:]) == (a + b) * 2


def test_lz4_bad_frame_is_a_clear_error() -> None:
    data = bytearray(lz4_legacy_frame(b"abcdefgh" * 1000))
    data[17:19] = b"\xff\xff"     # the first match offset: 65535 bytes back, before the output starts
    with pytest.raises(KernelImageError, match=r"corrupt LZ4 block of \d+ bytes at payload offset 0x4"):
        LX.lz4_legacy_decompress(bytes(data))
    with pytest.raises(KernelImageError, match="not an LZ4 legacy frame"):
        LX.lz4_legacy_decompress(b"\x04\x22\x4d\x18")   # the modern frame magic
    with pytest.raises(KernelImageError, match="more than the 100 bytes"):
        LX.lz4_legacy_decompress(lz4_legacy_frame(b"x" * 1000), max_size=100)


def test_host_unpacked_vmlinux(guest: GuestArtifacts, vmlinux: Path) -> None:
    bz = parse_bzimage(guest.vmlinuz.read_bytes())
    elf = vmlinux.read_bytes()
    assert len(elf) == struct.unpack("<I", bz.image[bz.header.kernel_offset + bz.header.payload_offset
                                                    + bz.header.payload_length - 4:][:4])[0]
    v = LX.parse_vmlinux(elf)
    assert v.entry == 0x1000000 == bz.header.pref_address          # startup_64 at LOAD_PHYSICAL_ADDR
    assert v.end <= bz.header.load_address + bz.header.init_size


def test_boot_console_stops_once_everything_was_seen() -> None:
    from exitless.exits import GuestStop

    c = LX.BootConsole(stop_after=("alpha", "beta"))
    c(b"[    0.000000] Linux version 6.1\r\nbeta first\r\n")
    assert c.first_line_at is not None and not c.stopped_by_console
    with pytest.raises(GuestStop) as stop:
        c(b"then alpha\n")
    assert stop.value.exit.kind == "stopped" and c.stopped_by_console
    assert [line for _, line in c.lines] == ["[    0.000000] Linux version 6.1", "beta first", "then alpha"]


@pytest.mark.kvm
def test_pc_devices_and_pci_share_port_0xcf8(tmp_path: Path) -> None:
    """0xCF9 (reset, a byte) lives inside PCI's CONFIG_ADDRESS dword 0xCF8: both must work, disks still attach."""
    from exitless.disk import DiskSpec, add_disk
    from exitless.exits import GuestStop
    from exitless.vm import Machine, VmConfig

    with Machine(VmConfig(mem_mib=64, console=lambda b: None)) as m:
        devs = LX.add_pc_devices(m)
        assert LX.add_pc_devices(m) is devs
        m.pio.write(0xCF8, struct.pack("<I", 0x8000_0000))        # bus 0, device 0: the host bridge
        assert m.pio.read(0xCF8, 4) == struct.pack("<I", 0x8000_0000)
        assert m.pio.read(0xCFC, 2) != b"\xff\xff"
        m.pio.write(0xCF9, b"\x02")
        assert m.pio.read(0xCF9, 1) == b"\x02"
        with pytest.raises(GuestStop) as stop:
            m.pio.write(0xCF9, b"\x06")
        assert stop.value.exit.kind == "reset"
        img = tmp_path / "d.img"
        img.write_bytes(bytes(1 << 20))
        add_disk(m, DiskSpec(str(img), io="trap"))
        names = {r.name for r in m.pio}
        assert {"acpi-pm1a-evt", "acpi-pm1a-cnt", "i8042-data", "i8042-cmd", "cmos-rtc"} <= names
