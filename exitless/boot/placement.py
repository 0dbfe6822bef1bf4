"""Where boot payloads go in guest RAM, and the clear error when they do not fit."""
from __future__ import annotations

from .pvh import KernelImageError

MIB = 1 << 20
PAGE = 4096


class BootFitError(KernelImageError):
    """The kernel cannot be booted in this VM as configured (too little memory, initrd too big...)."""


def low_ram_end(ram_layout: list[tuple[int, int]]) -> int:
    gpa, size = ram_layout[0]
    return gpa + size


def check_kernel_fits(ram_layout: list[tuple[int, int]], mem_mib: int, start: int, end: int, name: str) -> None:
    if end > low_ram_end(ram_layout):
        raise BootFitError(
            f"{name} needs guest RAM from {start / MIB:.0f} to {end / MIB:.0f} MiB while it boots, but the VM has "
            f"{mem_mib} MiB: use --mem {(end + MIB - 1) // MIB + 64}M or more")


def place_initrd(ram_layout: list[tuple[int, int]], mem_mib: int, size: int, kernel_end: int,
                 limit: int = 0xFFFFFFFF) -> int:
    """Highest page-aligned address for ``size`` bytes in low RAM, below ``limit``, above the kernel."""
    top = min(low_ram_end(ram_layout), limit + 1)
    addr = (top - size) & ~(PAGE - 1)
    if addr < kernel_end and limit + 1 < low_ram_end(ram_layout):
        raise BootFitError(
            f"initrd of {size / MIB:.1f} MiB does not fit between the kernel's end ({kernel_end:#x}) and the "
            f"kernel's initrd_addr_max {limit:#x}: more guest RAM would not help")
    if addr < kernel_end:
        need = (kernel_end + size + PAGE - 1) // MIB + 1
        raise BootFitError(
            f"initrd of {size / MIB:.1f} MiB does not fit in guest RAM ({mem_mib} MiB) above the kernel "
            f"(which needs RAM up to {kernel_end / MIB:.0f} MiB): use --mem {max(need, mem_mib + 1)}M or more")
    return addr
