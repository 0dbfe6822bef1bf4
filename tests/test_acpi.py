"""exitless.boot.acpi: table structure, AML encoding, iasl disassembly and a real Linux boot."""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from exitless.boot import acpi
from exitless.boot.acpi import (
    AcpiBlob,
    aml_integer,
    aml_name_string,
    aml_pkg_length,
    build_acpi_tables,
    eisa_id,
    make_sdt,
)

SIGS = ("XSDT", "RSDT", "FACP", "FACS", "APIC", "DSDT")


def sdt_ok(t: bytes) -> None:
    assert struct.unpack_from("<I", t, 4)[0] == len(t)
    assert sum(t) % 256 == 0


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 44
    while off < len(madt):
        typ, ln = madt[off], madt[off + 1]
        assert ln >= 2
        out.append((typ, madt[off : off + ln]))
        off += ln
    assert off == len(madt)
    return out


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("num_cpus", [1, 2, 4, 255])
def test_tables_checksums_lengths_and_links(num_cpus: int) -> None:
    blob = build_acpi_tables(num_cpus=num_cpus)
    assert blob.base_gpa == 0xE0000 and blob.end_gpa <= 0x100000
    for sig in SIGS:
        t = blob.table(sig)
        assert t[:4] == sig.encode()
        if sig != "FACS":  # the FACS carries no checksum
            sdt_ok(t)
            assert t[10:16] == b"EXITLS"
    rsdp = blob.table("RSD PTR")
    assert rsdp[:8] == b"RSD PTR " and blob.rsdp_gpa % 16 == 0 and 0xE0000 <= blob.rsdp_gpa < 0x100000
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    assert rsdp[15] == 2 and struct.unpack_from("<I", rsdp, 20)[0] == 36
    assert struct.unpack_from("<Q", rsdp, 24)[0] == blob.xsdt_gpa
    assert struct.unpack_from("<I", rsdp, 16)[0] == blob.rsdt_gpa
    xsdt = blob.table("XSDT")
    assert struct.unpack_from("<2Q", xsdt, 36) == (blob.fadt_gpa, blob.madt_gpa)
    assert struct.unpack_from("<2I", blob.table("RSDT"), 36) == (blob.fadt_gpa, blob.madt_gpa)
    fadt = blob.table("FACP")
    assert len(fadt) == 276 and fadt[8] == 6
    assert struct.unpack_from("<I", fadt, 40)[0] == blob.dsdt_gpa
    assert struct.unpack_from("<Q", fadt, 140)[0] == blob.dsdt_gpa
    assert struct.unpack_from("<I", fadt, 36)[0] == blob.facs_gpa and struct.unpack_from("<Q", fadt, 132)[0] == 0
    assert blob.facs_gpa % 64 == 0 and struct.unpack_from("<I", blob.table("FACS"), 4)[0] == 64
    # tables do not overlap
    spans = sorted((blob.tables[s], blob.tables[s] + len(blob.table(s))) for s in ("RSD PTR", *SIGS))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_fadt_fixed_hardware() -> None:
    fadt = build_acpi_tables().table("FACP")
    assert struct.unpack_from("<H", fadt, 46)[0] == acpi.SCI_IRQ == 9
    assert struct.unpack_from("<I", fadt, 48)[0] == 0  # no SMI_CMD: always in ACPI mode
    assert struct.unpack_from("<I", fadt, 56)[0] == acpi.PM1A_EVT_PORT == 0x600
    assert struct.unpack_from("<I", fadt, 64)[0] == acpi.PM1A_CNT_PORT == 0x604
    assert struct.unpack_from("<I", fadt, 76)[0] == 0  # PM timer off by default
    assert fadt[88:92] == bytes([4, 2, 0, 0])
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert not flags & (1 << 20)  # not HW_REDUCED: PM1 blocks are in use
    assert flags & acpi.FADT_RESET_REG_SUP
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, acpi.RESET_PORT) and fadt[128] == acpi.RESET_VALUE
    assert struct.unpack_from("<BBBBQ", fadt, 148) == (1, 32, 0, 2, 0x600)
    assert struct.unpack_from("<BBBBQ", fadt, 172) == (1, 16, 0, 2, 0x604)
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert boot_arch & acpi.BOOT_ARCH_NO_CMOS_RTC and not boot_arch & acpi.BOOT_ARCH_8042
    timed = build_acpi_tables(pm_timer=True, cmos_rtc=True).table("FACP")
    assert struct.unpack_from("<I", timed, 76)[0] == acpi.PM_TMR_PORT and timed[91] == 4
    assert struct.unpack_from("<BBBBQ", timed, 208) == (1, 32, 0, 3, acpi.PM_TMR_PORT)
    assert not struct.unpack_from("<H", timed, 109)[0] & acpi.BOOT_ARCH_NO_CMOS_RTC


@pytest.mark.parametrize("n", [1, 3, 16, 255])
def test_madt_has_one_lapic_per_cpu(n: int) -> None:
    madt = build_acpi_tables(num_cpus=n).table("APIC")
    assert struct.unpack_from("<II", madt, 36) == (0xFEE00000, 1)  # LAPIC address, PCAT_COMPAT
    entries = madt_entries(madt)
    lapics = [e for t, e in entries if t == 0]
    assert len(lapics) == n
    assert [(e[2], e[3], struct.unpack_from("<I", e, 4)[0]) for e in lapics] == [(i, i, 1) for i in range(n)]
    (ioapic,) = [e for t, e in entries if t == 1]
    assert struct.unpack("<BBBBII", ioapic) == (1, 12, 0, 0, 0xFEC00000, 0)
    isos = {e[3]: struct.unpack("<BBBBIH", e) for t, e in entries if t == 2}
    assert isos[0][4:] == (2, 0)
    assert isos[9][4:] == (9, 0b1101)  # active-high, level
    assert [e for t, e in entries if t == 4] == [bytes([4, 6, 0xFF, 0, 0, 1])]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        build_acpi_tables(num_cpus=0)
    with pytest.raises(ValueError):
        build_acpi_tables(num_cpus=256)
    with pytest.raises(ValueError, match="inclusive"):
        build_acpi_tables(mmio_window=(0xC0000000, 0xFEC00000 - 0x1000 + 0x10))
    with pytest.raises(ValueError, match="IO-APIC"):
        build_acpi_tables(mmio_window=(0xC0000000, 0xFEFFFFFF))
    with pytest.raises(ValueError, match="aligned"):
        build_acpi_tables(base_gpa=0xE0008)
    with pytest.raises(ValueError, match="BIOS area"):
        build_acpi_tables(base_gpa=0xFFF00, num_cpus=200)


def test_other_base_and_extra_tables() -> None:
    extra = make_sdt(b"TEST", 1, b"payload!")
    blob = build_acpi_tables(0x1000_0000, 2, extra_tables=[extra])
    assert blob.rsdp_gpa == 0x1000_0000
    assert blob.table("TEST") == extra
    n = (len(blob.table("XSDT")) - 36) // 8
    assert struct.unpack_from(f"<{n}Q", blob.table("XSDT"), 36) == (blob.fadt_gpa, blob.madt_gpa, blob.tables["TEST"])
    assert blob.data[blob.tables["TEST"] - blob.base_gpa :].startswith(extra)


# --------------------------------------------------------------------------- AML encoder


def test_pkg_length_boundaries() -> None:
    assert aml_pkg_length(0) == b"\x01"
    assert aml_pkg_length(0x3E) == b"\x3f"
    assert aml_pkg_length(0x3F) == bytes([0x40 | 1, 0x04])  # 0x41 total
    assert aml_pkg_length(0xFFD) == bytes([0x4F, 0xFF])  # 0xFFF total
    assert aml_pkg_length(0xFFE) == bytes([0x81, 0x00, 0x01])  # 0x1001 total
    with pytest.raises(ValueError):
        aml_pkg_length(1 << 28)


def test_names_and_integers() -> None:
    assert aml_name_string("_S5") == b"_S5_"
    assert aml_name_string("\\_S5_") == b"\\_S5_"
    assert aml_name_string("\\_SB.PCI0") == b"\\\x2e_SB_PCI0"
    assert aml_name_string("^^A.B.C") == b"^^\x2f\x03A___B___C___"
    with pytest.raises(ValueError):
        aml_name_string("1BAD")
    assert [aml_integer(v) for v in (0, 1, 2, 0x100, 0x10000, 1 << 32)] == [
        b"\x00", b"\x01", b"\x0a\x02", b"\x0b\x00\x01", b"\x0c\x00\x00\x01\x00", b"\x0e" + struct.pack("<Q", 1 << 32)
    ]
    assert eisa_id("PNP0A03") == 0x030AD041
    assert eisa_id("PNP0501") == 0x0105D041


# --------------------------------------------------------------------------- iasl


def iasl_disassemble(table: bytes, tmp_path: Path, name: str) -> str:
    if shutil.which("iasl") is None:
        pytest.skip("iasl not installed (apt-get install acpica-tools)")
    src = tmp_path / f"{name}.dat"
    src.write_bytes(table)
    r = subprocess.run(["iasl", "-d", str(src)], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (tmp_path / f"{name}.dsl").read_text()
    assert "Incorrect checksum" not in text and "Error" not in r.stdout + r.stderr
    return text


def test_dsdt_disassembles(tmp_path: Path) -> None:
    dsl = iasl_disassemble(build_acpi_tables(num_cpus=2).table("DSDT"), tmp_path, "dsdt")
    assert "_S5_" in dsl and re.search(r"Name \(\\_S5, Package \(0x04\)[^}]*0x05,\s*0x05,", dsl)
    assert "Device (PCI0)" in dsl and 'EisaId ("PNP0A03")' in dsl
    assert "Name (_SEG, Zero)" in dsl and "Name (_BBN, Zero)" in dsl and "Name (_UID, Zero)" in dsl
    assert "WordBusNumber" in dsl and "0x00FF,             // Range Maximum" in dsl
    assert "0x0CF7,             // Range Maximum" in dsl and "0x0D00,             // Range Minimum" in dsl
    assert "0xC0000000,         // Range Minimum" in dsl and "0xFEBFFFFF,         // Range Maximum" in dsl
    assert "Device (COM1)" in dsl and 'EisaId ("PNP0501")' in dsl and "0x03F8" in dsl and "{4}" in dsl


def test_dsdt_variants_disassemble(tmp_path: Path) -> None:
    blob = build_acpi_tables(
        mmio_window=(0x80000000, 0xDFFFFFFF),
        mmio64_window=(0x80_0000_0000, 0x8F_FFFF_FFFF),
        pcie=True,
        com1=False,
        pci_intx=[(1, 0, 16), (2, 3, 19)],
    )
    dsl = iasl_disassemble(blob.table("DSDT"), tmp_path, "dsdt")
    assert 'Name (_HID, EisaId ("PNP0A08")' in dsl and 'Name (_CID, EisaId ("PNP0A03")' in dsl
    assert "0x80000000,         // Range Minimum" in dsl and "0xDFFFFFFF,         // Range Maximum" in dsl
    assert "QWordMemory" in dsl and "0x0000008FFFFFFFFF" in dsl
    assert "COM1" not in dsl
    assert re.search(r"0x0002FFFF,\s*0x03,\s*Zero,\s*0x13", dsl)


def test_fixed_tables_disassemble(tmp_path: Path) -> None:
    blob = build_acpi_tables(num_cpus=4)
    madt = iasl_disassemble(blob.table("APIC"), tmp_path, "apic")
    assert madt.count("Subtable Type : 00 [Processor Local APIC]") == 4
    assert "Subtable Type : 01 [I/O APIC]" in madt and "Address : FEC00000" in madt
    fadt = iasl_disassemble(blob.table("FACP"), tmp_path, "facp")
    assert "PM1A Control Block Address : 00000604" in fadt
    assert re.search(r"SCI Interrupt : 0009", fadt)
    assert re.search(r"Hardware Reduced \(V5\) : 0", fadt)
    iasl_disassemble(blob.table("XSDT"), tmp_path, "xsdt")
    iasl_disassemble(blob.table("FACS"), tmp_path, "facs")


# --------------------------------------------------------------------------- Linux accepts them


@pytest.mark.qemu
def test_linux_boots_with_these_tables(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Boot Debian's cloud kernel in QEMU microvm with *our* tables (QEMU's own ACPI off).

    The kernel has no MP-table parser, so the second CPU only comes up through
    our MADT; ``poweroff`` must end in a PM1a_CNT write of SLP_EN | SLP_TYP_S5.
    Runs under TCG so it works without (nested) KVM.
    """
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed")
    from exitless.boot.initramfs import EXIT_MARKER, build_initramfs, parse_exit_status
    from exitless.guest import fetch_guest
    from exitless.guest.fetch import CACHE_ENV

    env = os.environ.get(CACHE_ENV)
    guest = fetch_guest(Path(env) if env else tmp_path_factory.getbasetemp() / "exitless-guest-cache")
    (tmp_path / "acpi.bin").write_bytes(build_acpi_tables(num_cpus=2).data)
    (tmp_path / "initrd").write_bytes(
        build_initramfs(
            guest.busybox,
            modules=["virtio_pci", "virtio_blk"],
            modules_root=guest.modules_root,
            command=(
                "grep -c ^processor /proc/cpuinfo; ls /sys/bus/acpi/devices/\n"
                "rmmod virtio_blk && modprobe virtio_blk && lsmod | grep -q '^virtio_blk' && echo MODPROBE_OK\n"
                "exit 7"
            ),
        )
    )
    console, trace = tmp_path / "console.log", tmp_path / "trace.log"
    cmd = [
        qemu, "-M", "microvm,acpi=off,rtc=off,isa-serial=on", "-accel", "tcg", "-smp", "2", "-m", "256",
        "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
        "-kernel", str(guest.vmlinuz), "-initrd", str(tmp_path / "initrd"), "-append", "console=ttyS0 panic=-1",
        "-device", f"loader,file={tmp_path / 'acpi.bin'},addr={acpi.ACPI_DEFAULT_BASE:#x},force-raw=on",
        "-trace", "memory_region_ops_write", "-D", str(trace),
    ]
    with open(console, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None:
                if b"reboot: Power down" in console.read_bytes():
                    break
                time.sleep(0.5)
        finally:
            proc.kill()
            proc.wait()
    log = console.read_text(errors="replace")
    assert parse_exit_status(log) == 7, log[-3000:]
    assert "smp: Brought up 1 node, 2 CPUs" in log
    assert "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00-ff])" in log
    assert "root bus resource [mem 0xc0000000-0xfebfffff window]" in log
    assert "ACPI: PM: (supports S0 S5)" in log
    assert "PNP0501:00" in log and "PNP0A03:00" in log
    assert "insmod failed" not in log
    assert "MODPROBE_OK" in log  # busybox modprobe works from the pruned modules.dep
    assert re.search(rf"^{EXIT_MARKER}7", log, re.M)
    writes = re.findall(r"addr 0x604 value (0x[0-9a-f]+) size 2", trace.read_text())
    assert any(
        int(v, 16) & acpi.PM1_CNT_SLP_EN
        and (int(v, 16) & acpi.PM1_CNT_SLP_TYP_MASK) >> acpi.PM1_CNT_SLP_TYP_SHIFT == acpi.SLP_TYP_S5
        for v in writes
    ), writes


def test_blob_type() -> None:
    assert isinstance(build_acpi_tables(), AcpiBlob)
