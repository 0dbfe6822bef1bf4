"""The guest-physical and port map of an exitless x86 machine (one place for every address)."""

MIB = 1 << 20
GIB = 1 << 30

# low memory, used by the boot code (all below the 640 KiB EBDA line)
BOOT_GDT = 0x500
PVH_START_INFO = 0x6000
PVH_MEMMAP = 0x6800
PVH_MODLIST = 0x6C00
ZERO_PAGE = 0x7000
BOOT_STACK = 0x8FF0
PML4_START = 0x9000
CMDLINE = 0x20000
CMDLINE_MAX = 0x10000
EBDA_START = 0x9FC00
BIOS_AREA = 0xE0000          # ACPI RSDP is found by scanning here
KERNEL_LOAD = 1 * MIB

# the 32-bit hole: PCI BARs and device pages, then the irqchip
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 1 << 32
PCI_MMIO_START = 0xC000_0000
PCI_MMIO_END = 0xD000_0000
DEVICE_MMIO_START = 0xD000_0000   # platform (non-PCI) device windows, e.g. the doorbell device
DEVICE_MMIO_END = 0xE000_0000
IOAPIC_BASE = 0xFEC0_0000
LAPIC_BASE = 0xFEE0_0000
KVM_IDENTITY_MAP = 0xFEFF_C000    # one page for KVM's real-mode identity map
KVM_TSS = 0xFEFF_D000             # three pages for KVM's TSS

# ports
COM1_PORT, COM1_IRQ = 0x3F8, 4
DEBUG_EXIT_PORT = 0xF4            # QEMU's isa-debug-exit convention: guest writes its exit status
