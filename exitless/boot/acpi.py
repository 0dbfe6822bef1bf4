"""ACPI tables for a directly-booted Linux guest, generated as bytes in Python.

Why ACPI at all: Debian's cloud kernel is built without ``CONFIG_X86_MPPARSE``,
so the MADT is its only way to find the other CPUs and the IO-APIC, and the
FADT's PM1a control block is how ``poweroff`` reaches the VMM (the guest writes
``SLP_TYP | SLP_EN`` to :data:`PM1A_CNT_PORT`; the DSDT's ``\\_S5_`` says which
SLP_TYP means "off").  The DSDT also describes the PCI host bridge and its
resource windows, without which Linux will not assign BARs in the MMIO hole.

Why generate the AML here instead of shipping ``iasl`` output:

* no build-time tool: ``acpica-tools`` is needed by nobody but the tests;
* the tables are parameterised -- CPU count, the PCI MMIO window(s), the
  base address, optional devices -- and a compiled blob would need patching
  at magic offsets, with every length and checksum fixed up by hand;
* the handful of AML constructs used (Name, Package, Device, Scope, Buffer
  with resource descriptors, integers, strings, EISA IDs) is small and fully
  specified (ACPI 6.x ch. 20 and 6.4), so the encoder is ~150 lines and is
  checked against ``iasl -d`` in the tests.

The layout is the full-hardware (not HW-reduced) model: fixed PM1a event and
control blocks at I/O ports, SCI on IRQ 9, an 8259-compatible (PCAT_COMPAT)
machine with one IO-APIC.  Addresses and ports are module constants so the
VMM's device models import the same numbers.

Everything is placed at ``base_gpa``, by default the BIOS area at 0xE0000 that
Linux scans for the RSDP, so no boot_params field is strictly needed (the
kernel also accepts ``boot_params.acpi_rsdp_addr``; see ``AcpiBlob.rsdp_gpa``).
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# --------------------------------------------------------------------------- constants

#: Default place for the tables: the BIOS area Linux scans for "RSD PTR ".
ACPI_DEFAULT_BASE = 0xE0000
BIOS_AREA_START = 0xE0000
BIOS_AREA_END = 0x100000

# Fixed-hardware I/O ports (the VMM emulates these).
PM1A_EVT_PORT = 0x600  #: PM1a event block: status (2 bytes) then enable (2 bytes).
PM1A_EVT_LEN = 4
PM1A_STS_PORT = PM1A_EVT_PORT
PM1A_EN_PORT = PM1A_EVT_PORT + 2
PM1A_CNT_PORT = 0x604  #: PM1a control block (2 bytes): SCI_EN, SLP_TYP, SLP_EN.
PM1A_CNT_LEN = 2
PM_TMR_PORT = 0x608  #: ACPI PM timer (4 bytes, 3.579545 MHz); only advertised with pm_timer=True.
PM_TMR_LEN = 4
RESET_PORT = 0xCF9  #: FADT RESET_REG: writing RESET_VALUE here resets the machine.
RESET_VALUE = 0x06
SCI_IRQ = 9  #: SCI: ISA IRQ 9 = GSI 9, level-triggered, active-high.

# PM1 control register bits.
PM1_CNT_SCI_EN = 1 << 0
PM1_CNT_SLP_TYP_SHIFT = 10
PM1_CNT_SLP_TYP_MASK = 0x7 << PM1_CNT_SLP_TYP_SHIFT
PM1_CNT_SLP_EN = 1 << 13
#: SLP_TYP value the DSDT's \\_S5_ gives for soft-off: on a PM1a_CNT write with
#: SLP_EN set and ``(value & PM1_CNT_SLP_TYP_MASK) >> 10 == SLP_TYP_S5`` the VMM powers off.
SLP_TYP_S5 = 5

# Interrupt controller addresses.
LAPIC_ADDR = 0xFEE00000
IOAPIC_ADDR = 0xFEC00000
IOAPIC_ID = 0
IOAPIC_GSI_BASE = 0
#: Largest CPU count a classic (xAPIC) MADT entry can name: APIC IDs 0..254.
MAX_CPUS = 255

# Legacy devices described in the DSDT.
COM1_PORT = 0x3F8
COM1_IRQ = 4

#: Default 32-bit PCI MMIO window (inclusive bounds, as in _CRS): up to the IO-APIC.
PCI_MMIO32_WINDOW = (0xC0000000, 0xFEBFFFFF)
PCI_CONFIG_PORT = 0xCF8  #: type-1 config mechanism: 0xCF8 address, 0xCFC data (8 ports).

OEM_ID = b"EXITLS"
OEM_TABLE_ID = b"EXITLESS"
OEM_REVISION = 1
CREATOR_ID = b"EXLS"
CREATOR_REVISION = 1

SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")

# FADT flags
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4  # set = no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # set = no fixed-feature sleep button
FADT_TMR_VAL_EXT = 1 << 8
FADT_RESET_REG_SUP = 1 << 10
# FADT IAPC_BOOT_ARCH
BOOT_ARCH_LEGACY_DEVICES = 1 << 0
BOOT_ARCH_8042 = 1 << 1
BOOT_ARCH_NO_VGA = 1 << 2
BOOT_ARCH_NO_MSI = 1 << 3
BOOT_ARCH_NO_CMOS_RTC = 1 << 5

FADT_REVISION = 6
FADT_MINOR_REVISION = 0
FADT_LENGTH = 276
MADT_REVISION = 5
DSDT_REVISION = 2  # 2 = 64-bit AML integers
FACS_LENGTH = 64

# MADT entry types
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INT_SRC_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
MADT_PCAT_COMPAT = 1
MPS_INTI_POLARITY_HIGH = 0b01
MPS_INTI_POLARITY_LOW = 0b11
MPS_INTI_TRIGGER_EDGE = 0b01 << 2
MPS_INTI_TRIGGER_LEVEL = 0b11 << 2

# Generic Address Structure
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE, GAS_ACCESS_WORD, GAS_ACCESS_DWORD = 1, 2, 3


# --------------------------------------------------------------------------- helpers


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` (with it in place of a zero) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def make_sdt(
    signature: bytes,
    revision: int,
    body: bytes,
    *,
    oem_id: bytes = OEM_ID,
    oem_table_id: bytes = OEM_TABLE_ID,
) -> bytes:
    """A complete System Description Table: 36-byte header + ``body``, checksummed.

    Public so the VMM can add tables of its own (HPET, SRAT, MCFG...) through
    ``build_acpi_tables(extra_tables=...)``.
    """
    if len(signature) != 4:
        raise ValueError(f"ACPI signature must be 4 bytes, not {signature!r}")
    hdr = SDT_HEADER.pack(
        signature, SDT_HEADER.size + len(body), revision, 0,
        oem_id.ljust(6, b" ")[:6], oem_table_id.ljust(8, b" ")[:8], OEM_REVISION, CREATOR_ID, CREATOR_REVISION,
    )
    table = bytearray(hdr + body)
    table[9] = checksum(table)
    return bytes(table)


def gas(address: int, bit_width: int, access_size: int, space: int = GAS_SYSTEM_IO) -> bytes:
    """A 12-byte Generic Address Structure (all-zero for ``address == 0``)."""
    if address == 0:
        return bytes(12)
    return struct.pack("<BBBBQ", space, bit_width, 0, access_size, address)


# --------------------------------------------------------------------------- AML encoder

AML_ZERO, AML_ONE, AML_ONES = 0x00, 0x01, 0xFF
AML_BYTE_PREFIX, AML_WORD_PREFIX, AML_DWORD_PREFIX, AML_STRING_PREFIX, AML_QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
AML_NAME_OP, AML_SCOPE_OP, AML_BUFFER_OP, AML_PACKAGE_OP = 0x08, 0x10, 0x11, 0x12
AML_EXT_PREFIX, AML_DEVICE_OP = 0x5B, 0x82
AML_ROOT_CHAR, AML_PARENT_CHAR, AML_DUAL_NAME_PREFIX, AML_MULTI_NAME_PREFIX = 0x5C, 0x5E, 0x2E, 0x2F


def aml_pkg_length(payload_len: int) -> bytes:
    """PkgLength for ``payload_len`` following bytes (the encoding counts its own bytes)."""
    if payload_len + 1 < 0x40:
        return bytes([payload_len + 1])
    for extra in (1, 2, 3):
        total = payload_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (total & 0x0F)]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"AML package too long: {payload_len} bytes")


def aml_name_seg(seg: str) -> bytes:
    """A 4-character NameSeg; shorter names are padded with ``_`` as ASL does."""
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_") or not all(
        c.isupper() or c.isdigit() or c == "_" for c in seg
    ):
        raise ValueError(f"bad ACPI name segment {seg!r}")
    return seg.ljust(4, "_").encode()


def aml_name_string(path: str) -> bytes:
    """A NameString: optional ``\\`` or ``^`` prefixes, then dot-separated segments."""
    out = bytearray()
    i = 0
    if path.startswith("\\"):
        out.append(AML_ROOT_CHAR)
        i = 1
    else:
        while path[i : i + 1] == "^":
            out.append(AML_PARENT_CHAR)
            i += 1
    segs = [s for s in path[i:].split(".") if s] if path[i:] else []
    if not segs:
        out.append(0x00)  # NullName
    elif len(segs) == 1:
        out += aml_name_seg(segs[0])
    elif len(segs) == 2:
        out.append(AML_DUAL_NAME_PREFIX)
        out += b"".join(aml_name_seg(s) for s in segs)
    else:
        out += bytes([AML_MULTI_NAME_PREFIX, len(segs)]) + b"".join(aml_name_seg(s) for s in segs)
    return bytes(out)


def aml_integer(value: int) -> bytes:
    """The shortest integer encoding: ZeroOp/OneOp or a Byte/Word/DWord/QWord constant."""
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"AML integer out of range: {value}")
    if value == 0:
        return bytes([AML_ZERO])
    if value == 1:
        return bytes([AML_ONE])
    for prefix, fmt, limit in (
        (AML_BYTE_PREFIX, "<B", 1 << 8),
        (AML_WORD_PREFIX, "<H", 1 << 16),
        (AML_DWORD_PREFIX, "<I", 1 << 32),
        (AML_QWORD_PREFIX, "<Q", 1 << 64),
    ):
        if value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    raise AssertionError


def aml_dword(value: int) -> bytes:
    """A DWordConst even for small values (EISA IDs and _PRT addresses are written this way)."""
    return bytes([AML_DWORD_PREFIX]) + struct.pack("<I", value)


def aml_string(s: str) -> bytes:
    raw = s.encode("ascii")
    if b"\0" in raw:
        raise ValueError("AML string contains NUL")
    return bytes([AML_STRING_PREFIX]) + raw + b"\0"


def eisa_id(s: str) -> int:
    """Compress a PNP ID like ``"PNP0A03"`` into its 32-bit EISA form (as ASL ``EisaId``)."""
    if len(s) != 7 or not s[:3].isalpha() or not s[:3].isupper():
        raise ValueError(f"bad EISA id {s!r}")
    v = ((ord(s[0]) - 0x40) << 26) | ((ord(s[1]) - 0x40) << 21) | ((ord(s[2]) - 0x40) << 16) | int(s[3:], 16)
    return int.from_bytes(v.to_bytes(4, "big"), "little")


def aml_eisa_id(s: str) -> bytes:
    return aml_dword(eisa_id(s))


def aml_name(name: str, value: bytes) -> bytes:
    """``Name(name, value)``; ``value`` is an already-encoded data object."""
    return bytes([AML_NAME_OP]) + aml_name_string(name) + value


def aml_package(elements: Sequence[bytes]) -> bytes:
    """``Package(){...}`` of already-encoded elements."""
    if len(elements) > 255:
        raise ValueError("AML Package holds at most 255 elements (VarPackage not supported)")
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([AML_PACKAGE_OP]) + aml_pkg_length(len(body)) + body


def aml_buffer(data: bytes) -> bytes:
    body = aml_integer(len(data)) + data
    return bytes([AML_BUFFER_OP]) + aml_pkg_length(len(body)) + body


def aml_scope(name: str, terms: Iterable[bytes]) -> bytes:
    body = aml_name_string(name) + b"".join(terms)
    return bytes([AML_SCOPE_OP]) + aml_pkg_length(len(body)) + body


def aml_device(name: str, terms: Iterable[bytes]) -> bytes:
    body = aml_name_string(name) + b"".join(terms)
    return bytes([AML_EXT_PREFIX, AML_DEVICE_OP]) + aml_pkg_length(len(body)) + body


# Resource descriptors (ACPI 6.4 "Resource Data Types").
_RES_PRODUCER_FIXED = 0x0C  # ResourceProducer, PosDecode, MinFixed, MaxFixed
_RES_TYPE_MEMORY, _RES_TYPE_IO, _RES_TYPE_BUS = 0, 1, 2


def res_io(minimum: int, maximum: int, alignment: int, length: int) -> bytes:
    """``IO(Decode16, min, max, align, len)``: small I/O port descriptor."""
    return struct.pack("<BBHHBB", 0x47, 0x01, minimum, maximum, alignment, length)


def res_irq_noflags(*irqs: int) -> bytes:
    """``IRQNoFlags(){...}``: edge-triggered, active-high ISA IRQs."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq < 16:
            raise ValueError(f"ISA IRQ out of range: {irq}")
        mask |= 1 << irq
    return struct.pack("<BH", 0x22, mask)


def res_word_bus_number(first: int, last: int) -> bytes:
    """``WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, first, last, 0, len)``."""
    return struct.pack("<BHBBBHHHHH", 0x88, 13, _RES_TYPE_BUS, _RES_PRODUCER_FIXED, 0, 0, first, last, 0, last - first + 1)


def res_word_io(first: int, last: int) -> bytes:
    """``WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)``: an I/O window."""
    return struct.pack("<BHBBBHHHHH", 0x88, 13, _RES_TYPE_IO, _RES_PRODUCER_FIXED, 0x03, 0, first, last, 0, last - first + 1)


def res_dword_memory(first: int, last: int, *, cacheable: bool = False) -> bytes:
    """``DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable|Cacheable, ReadWrite, ...)``."""
    tflags = 0x01 | (0x02 if cacheable else 0)
    return struct.pack(
        "<BHBBBIIIII", 0x87, 23, _RES_TYPE_MEMORY, _RES_PRODUCER_FIXED, tflags, 0, first, last, 0, last - first + 1
    )


def res_qword_memory(first: int, last: int, *, cacheable: bool = True) -> bytes:
    """``QWordMemory(...)``: a memory window above 4 GiB."""
    tflags = 0x01 | (0x02 if cacheable else 0)
    return struct.pack(
        "<BHBBBQQQQQ", 0x8A, 43, _RES_TYPE_MEMORY, _RES_PRODUCER_FIXED, tflags, 0, first, last, 0, last - first + 1
    )


def resource_template(*descriptors: bytes) -> bytes:
    """``ResourceTemplate(){...}``: the descriptors plus an End Tag, as an AML Buffer."""
    return aml_buffer(b"".join(descriptors) + b"\x79\x00")


# --------------------------------------------------------------------------- tables


def build_dsdt(
    mmio_window: tuple[int, int] = PCI_MMIO32_WINDOW,
    *,
    mmio64_window: tuple[int, int] | None = None,
    com1: bool = True,
    pcie: bool = False,
    pci_intx: Sequence[tuple[int, int, int]] | None = None,
) -> bytes:
    """The DSDT: ``\\_S5_``, the PCI host bridge ``\\_SB.PCI0`` and optionally ``\\_SB.COM1``.

    ``mmio_window``/``mmio64_window`` are inclusive ``(first, last)`` addresses.
    ``pcie`` gives ``_HID PNP0A08`` + ``_CID PNP0A03`` (a PCIe root) instead of
    plain ``PNP0A03``.  ``pci_intx`` adds a ``_PRT`` with ``(slot, pin 0-3, gsi)``
    routes for legacy INTx; without one Linux uses MSI/MSI-X only (virtio and
    NVMe are fine with that).
    """
    crs = [
        res_word_bus_number(0x00, 0xFF),
        res_word_io(0x0000, PCI_CONFIG_PORT - 1),
        res_io(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 0x01, 0x08),
        res_word_io(0x0D00, 0xFFFF),
        res_dword_memory(*mmio_window),
    ]
    if mmio64_window is not None:
        crs.append(res_qword_memory(*mmio64_window))
    pci0 = [
        aml_name("_HID", aml_eisa_id("PNP0A08" if pcie else "PNP0A03")),
        *([aml_name("_CID", aml_eisa_id("PNP0A03"))] if pcie else []),
        aml_name("_SEG", aml_integer(0)),
        aml_name("_BBN", aml_integer(0)),
        aml_name("_UID", aml_integer(0)),
        aml_name("_CRS", resource_template(*crs)),
    ]
    if pci_intx:
        routes = []
        for slot, pin, gsi in pci_intx:
            if not (0 <= slot < 32 and 0 <= pin < 4):
                raise ValueError(f"bad _PRT entry (slot {slot}, pin {pin})")
            routes.append(aml_package([aml_dword((slot << 16) | 0xFFFF), aml_integer(pin), aml_integer(0), aml_integer(gsi)]))
        pci0.append(aml_name("_PRT", aml_package(routes)))
    devices = [aml_device("PCI0", pci0)]
    if com1:
        devices.append(
            aml_device(
                "COM1",
                [
                    aml_name("_HID", aml_eisa_id("PNP0501")),
                    aml_name("_UID", aml_integer(1)),
                    aml_name("_CRS", resource_template(res_io(COM1_PORT, COM1_PORT, 0x01, 0x08), res_irq_noflags(COM1_IRQ))),
                ],
            )
        )
    body = aml_name("\\_S5_", aml_package([aml_integer(SLP_TYP_S5), aml_integer(SLP_TYP_S5), aml_integer(0), aml_integer(0)]))
    body += aml_scope("\\_SB_", devices)
    return make_sdt(b"DSDT", DSDT_REVISION, body)


def build_madt(num_cpus: int) -> bytes:
    """The MADT: one enabled Local APIC per CPU (UID = APIC ID = index), the IO-APIC, ISA overrides.

    The VMM must give vCPU ``i`` APIC ID ``i`` (KVM's default: the vcpu id).
    Overrides: IRQ0 (PIT) -> GSI2 as on every PC, and the SCI (IRQ9) level /
    active-high as the ACPI spec requires.  LINT1 of every CPU is NMI.
    """
    if not 1 <= num_cpus <= MAX_CPUS:
        raise ValueError(f"num_cpus must be 1..{MAX_CPUS}, not {num_cpus}")
    body = bytearray(struct.pack("<II", LAPIC_ADDR, MADT_PCAT_COMPAT))
    for i in range(num_cpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, i, i, 1)  # flags: Enabled
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, IOAPIC_ID, 0, IOAPIC_ADDR, IOAPIC_GSI_BASE)
    body += struct.pack("<BBBBIH", MADT_INT_SRC_OVERRIDE, 10, 0, 0, 2, 0)
    body += struct.pack(
        "<BBBBIH", MADT_INT_SRC_OVERRIDE, 10, 0, SCI_IRQ, SCI_IRQ, MPS_INTI_POLARITY_HIGH | MPS_INTI_TRIGGER_LEVEL
    )
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, 0xFF, 0, 1)
    return make_sdt(b"APIC", MADT_REVISION, bytes(body))


def build_facs() -> bytes:
    """The FACS (no checksum): required by full-hardware ACPI for the global lock and waking vector."""
    return struct.pack("<4sIIIIIQB3sI24s", b"FACS", FACS_LENGTH, 0, 0, 0, 0, 0, 2, bytes(3), 0, bytes(24))


def build_fadt(
    dsdt_gpa: int,
    facs_gpa: int,
    *,
    pm_timer: bool = False,
    reset_reg: bool = True,
    cmos_rtc: bool = False,
) -> bytes:
    """The FADT (revision 6): PM1a blocks at fixed ports, SCI 9, no SMI (always in ACPI mode).

    ``SMI_CMD = 0`` tells the OS the machine is already in ACPI mode, so there is
    no ACPI_ENABLE handshake for the VMM to emulate.  ``pm_timer`` advertises
    the PM timer at :data:`PM_TMR_PORT` (only if the VMM counts it; Linux uses
    kvm-clock anyway).  ``reset_reg`` advertises :data:`RESET_PORT`.
    ``cmos_rtc=False`` tells Linux there is no CMOS RTC, and the boot
    architecture flags also say "no 8042, no VGA", so the guest does not probe
    ports nobody emulates.
    """
    f = bytearray(FADT_LENGTH - SDT_HEADER.size)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into("<" + fmt, f, offset - SDT_HEADER.size, *values)

    flags = FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON
    boot_arch = BOOT_ARCH_NO_VGA | (0 if cmos_rtc else BOOT_ARCH_NO_CMOS_RTC)
    tmr_port, tmr_len = (PM_TMR_PORT, PM_TMR_LEN) if pm_timer else (0, 0)
    if pm_timer:
        flags |= FADT_TMR_VAL_EXT
    if reset_reg:
        flags |= FADT_RESET_REG_SUP
    # FACS through exactly one of FIRMWARE_CTRL / X_FIRMWARE_CTRL: Linux installs (and
    # reserves) the FACS once per non-zero field.
    put(36, "I", facs_gpa if facs_gpa < 1 << 32 else 0)  # FIRMWARE_CTRL
    put(40, "I", dsdt_gpa if dsdt_gpa < 1 << 32 else 0)  # DSDT
    put(45, "B", 0)  # Preferred_PM_Profile: unspecified
    put(46, "H", SCI_IRQ)
    put(48, "I", 0)  # SMI_CMD: none, hardware is always in ACPI mode
    put(56, "I", PM1A_EVT_PORT)
    put(64, "I", PM1A_CNT_PORT)
    put(76, "I", tmr_port)
    put(88, "BBBB", PM1A_EVT_LEN, PM1A_CNT_LEN, 0, tmr_len)
    put(96, "HH", 101, 1001)  # P_LVL2/3_LAT > 100/1000: C2/C3 not supported
    put(109, "H", boot_arch)
    put(112, "I", flags)
    if reset_reg:
        f[116 - 36 : 128 - 36] = gas(RESET_PORT, 8, GAS_ACCESS_BYTE)
        put(128, "B", RESET_VALUE)
    put(131, "B", FADT_MINOR_REVISION)
    put(132, "Q", facs_gpa if facs_gpa >= 1 << 32 else 0)  # X_FIRMWARE_CTRL
    put(140, "Q", dsdt_gpa)  # X_DSDT
    f[148 - 36 : 160 - 36] = gas(PM1A_EVT_PORT, PM1A_EVT_LEN * 8, GAS_ACCESS_WORD)
    f[172 - 36 : 184 - 36] = gas(PM1A_CNT_PORT, PM1A_CNT_LEN * 8, GAS_ACCESS_WORD)
    if pm_timer:
        f[208 - 36 : 220 - 36] = gas(PM_TMR_PORT, PM_TMR_LEN * 8, GAS_ACCESS_DWORD)
    put(268, "8s", b"EXITLESS")  # Hypervisor Vendor Identity
    return make_sdt(b"FACP", FADT_REVISION, bytes(f))


def build_xsdt(entries: Sequence[int]) -> bytes:
    return make_sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in entries))


def build_rsdt(entries: Sequence[int]) -> bytes:
    return make_sdt(b"RSDT", 1, b"".join(struct.pack("<I", a) for a in entries))


def build_rsdp(xsdt_gpa: int, rsdt_gpa: int = 0) -> bytes:
    """The 36-byte ACPI 2.0+ RSDP, both checksums set."""
    r = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, rsdt_gpa, 36, xsdt_gpa, 0, bytes(3)))
    r[8] = checksum(r[:20])
    r[32] = checksum(r)
    return bytes(r)


# --------------------------------------------------------------------------- the blob


@dataclass(frozen=True)
class AcpiBlob:
    """All tables laid out contiguously for guest memory at ``base_gpa``.

    Copy ``data`` to ``base_gpa``; mark that range reserved (or ACPI) in e820
    -- the default BIOS-area base already is.  ``tables`` maps each signature
    (``RSD PTR``, ``XSDT``, ``RSDT``, ``FACP``, ``FACS``, ``APIC``, ``DSDT``,
    extras) to its guest-physical address.
    """

    base_gpa: int
    data: bytes
    tables: dict[str, int] = field(default_factory=dict)

    @property
    def rsdp_gpa(self) -> int:
        return self.tables["RSD PTR"]

    @property
    def xsdt_gpa(self) -> int:
        return self.tables["XSDT"]

    @property
    def rsdt_gpa(self) -> int:
        return self.tables["RSDT"]

    @property
    def fadt_gpa(self) -> int:
        return self.tables["FACP"]

    @property
    def facs_gpa(self) -> int:
        return self.tables["FACS"]

    @property
    def madt_gpa(self) -> int:
        return self.tables["APIC"]

    @property
    def dsdt_gpa(self) -> int:
        return self.tables["DSDT"]

    @property
    def end_gpa(self) -> int:
        return self.base_gpa + len(self.data)

    def table(self, signature: str) -> bytes:
        """The bytes of one table, by signature."""
        off = self.tables[signature] - self.base_gpa
        if signature == "RSD PTR":
            return self.data[off : off + 36]
        (length,) = struct.unpack_from("<I", self.data, off + 4)
        return self.data[off : off + length]


def build_acpi_tables(
    base_gpa: int = ACPI_DEFAULT_BASE,
    num_cpus: int = 1,
    mmio_window: tuple[int, int] = PCI_MMIO32_WINDOW,
    *,
    mmio64_window: tuple[int, int] | None = None,
    com1: bool = True,
    pcie: bool = False,
    pci_intx: Sequence[tuple[int, int, int]] | None = None,
    pm_timer: bool = False,
    reset_reg: bool = True,
    cmos_rtc: bool = False,
    extra_tables: Sequence[bytes] = (),
) -> AcpiBlob:
    """Build RSDP, XSDT, RSDT, FADT, FACS, MADT and DSDT for guest memory at ``base_gpa``.

    ``mmio_window`` is the inclusive 32-bit PCI MMIO window ``(first, last)``
    (page-granular; it must stay below the IO-APIC).  ``extra_tables`` are
    complete tables (see :func:`make_sdt`) listed in the XSDT after FADT/MADT.
    """
    _check_window("mmio_window", mmio_window, 1 << 32)
    if mmio_window[1] >= IOAPIC_ADDR:
        raise ValueError("mmio_window must end below the IO-APIC at 0xFEC00000")
    if mmio64_window is not None:
        _check_window("mmio64_window", mmio64_window, 1 << 64)
    if base_gpa % 16:
        raise ValueError("base_gpa must be 16-byte aligned (the RSDP is searched on 16-byte boundaries)")

    dsdt = build_dsdt(mmio_window, mmio64_window=mmio64_window, com1=com1, pcie=pcie, pci_intx=pci_intx)
    madt = build_madt(num_cpus)
    facs = build_facs()
    n_entries = 2 + len(extra_tables)

    # Layout: sizes do not depend on addresses, so place first, then fill pointers.
    layout: dict[str, int] = {}
    off = 0

    def place(sig: str, size: int, align: int = 16) -> None:
        nonlocal off
        off = (off + align - 1) // align * align
        layout[sig] = base_gpa + off
        off += size

    place("RSD PTR", 36)
    place("XSDT", SDT_HEADER.size + 8 * n_entries)
    place("RSDT", SDT_HEADER.size + 4 * n_entries)
    place("FACP", FADT_LENGTH)
    place("FACS", FACS_LENGTH, 64)
    place("APIC", len(madt))
    place("DSDT", len(dsdt))
    extra_addrs = []
    for i, t in enumerate(extra_tables):
        sig = t[:4].decode("ascii", "replace")
        key = sig if sig not in layout else f"{sig}#{i}"
        place(key, len(t))
        extra_addrs.append(layout[key])
    if base_gpa < BIOS_AREA_END and base_gpa + off > BIOS_AREA_END:
        raise ValueError(f"ACPI tables ({off} bytes) overflow the BIOS area at {base_gpa:#x}")

    listed = [layout["FACP"], layout["APIC"], *extra_addrs]
    rsdt_ok = all(a < 1 << 32 for a in listed)
    tables = {
        "RSD PTR": build_rsdp(layout["XSDT"], layout["RSDT"] if rsdt_ok and layout["RSDT"] < 1 << 32 else 0),
        "XSDT": build_xsdt(listed),
        "RSDT": build_rsdt([a & 0xFFFFFFFF for a in listed]),
        "FACP": build_fadt(layout["DSDT"], layout["FACS"], pm_timer=pm_timer, reset_reg=reset_reg, cmos_rtc=cmos_rtc),
        "FACS": facs,
        "APIC": madt,
        "DSDT": dsdt,
    }
    extra_keys = [k for k in layout if k not in tables]
    for key, t in zip(extra_keys, extra_tables, strict=True):
        tables[key] = t

    data = bytearray(off)
    for key, addr in layout.items():
        t = tables[key]
        data[addr - base_gpa : addr - base_gpa + len(t)] = t
    return AcpiBlob(base_gpa=base_gpa, data=bytes(data), tables=layout)


def _check_window(name: str, window: tuple[int, int], limit: int) -> None:
    first, last = window
    if not 0 <= first < last < limit:
        raise ValueError(f"{name} {first:#x}..{last:#x} is empty or out of range")
    if first % 4096 or (last + 1) % 4096:
        raise ValueError(
            f"{name} must be page-granular with an inclusive end (e.g. 0xC0000000, 0xFEBFFFFF), got {first:#x}, {last:#x}"
        )
