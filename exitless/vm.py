"""The VM: assembles KVM, guest memory, buses, legacy devices and vCPUs into one machine.

Order follows what KVM expects on x86 (see DESIGN.md): VM, TSS and identity-map
pages, in-kernel irqchip and PIT, memory slots, then vCPUs with their CPUID,
MSRs and LAPIC.  Devices attach to the buses; background workers (I/O-path
threads, sidecores) register with the VM so that ``close()`` stops them all.
"""
from __future__ import annotations

import logging
import os
import traceback
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from .argtypes import host_ram_mib
from .bus import Bus
from .devices.legacy.bench_marker import PORT as BENCH_MARKER_PORT
from .devices.legacy.bench_marker import BenchMarker
from .devices.legacy.debug_exit import DebugExit
from .devices.legacy.serial import Serial
from .errors import ExitlessError
from .exits import VmExit
from .kvm.api import Kvm, Vcpu
from .kvm.stats import Stats
from .memory import GuestMemory, Region, x86_layout
from .vcpu import VcpuThread, install_kick_handler, wait_all
from .x86 import cpu as X
from .x86 import layout as L
from .doctor import kvm_flavour
from .x86.fallback import InstructionFallback
from .x86.pvm_syscall import SyscallRepair
from .x86.irq import IrqRouter

log = logging.getLogger(__name__)
MIN_MEM_MIB = 32


class Worker(Protocol):
    """Something that runs beside the vCPUs (a device thread, a sidecore) and must be stopped."""

    def stop(self) -> None: ...


@dataclass
class VmConfig:
    mem_mib: int = 256
    cpus: int = 1
    console: Callable[[bytes], None] | None = None  # where the guest's COM1 output goes


class VmConfigError(ExitlessError, ValueError):
    """The machine's configuration (``--mem``, ``--cpus``) is out of range."""


class Machine:
    def __init__(self, config: VmConfig | None = None, kvm: Kvm | None = None):
        self.config = cfg = config or VmConfig()
        if cfg.mem_mib < MIN_MEM_MIB:
            raise VmConfigError(f"--mem {cfg.mem_mib}M is too small: at least {MIN_MEM_MIB} MiB")
        if cfg.mem_mib > host_ram_mib():     # the CLI refuses it first; this guards the API (mmap would fail)
            raise VmConfigError(f"--mem {cfg.mem_mib}M is too large: the host has {host_ram_mib()} MiB of RAM")
        if not 1 <= cfg.cpus <= 64:
            raise VmConfigError(f"--cpus {cfg.cpus}: between 1 and 64")
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.workers: list[Worker] = []
        self.vcpus: list[Vcpu] = []
        self.threads: list[VcpuThread] = []
        self._closed = False
        self._exit: VmExit | None = None
        self._exit_event = threading.Event()
        self.vm = self.kvm.create_vm()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        cfg = self.config
        self.vm.set_identity_map_addr(L.KVM_IDENTITY_MAP)
        self.vm.set_tss_addr(L.KVM_TSS)
        self.vm.create_irqchip()
        self.vm.create_pit2()
        self.ram_layout = x86_layout(cfg.mem_mib << 20, L.MMIO_HOLE_START, L.MMIO_HOLE_END)
        self.mem = GuestMemory.create(self.ram_layout)
        self._next_slot = 0
        self._slots: dict[int, int] = {}  # memfd offset of a region -> KVM slot
        for region in self.mem.regions:
            self._map_region(region)
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        out = cfg.console or stdout_console
        self.serial = Serial(out, lambda level: self.vm.irq_line(L.COM1_IRQ, level))
        self.pio.insert(L.COM1_PORT, 8, self.serial, "com1")
        self.pio.insert(L.DEBUG_EXIT_PORT, 4, DebugExit(), "debug-exit")
        self._stats: VcpuStats | None = None
        self.bench_marker = BenchMarker(self._kvm_counters, self._sidecore_process_cpu)
        self.pio.insert(BENCH_MARKER_PORT, 4, self.bench_marker, "bench-marker")
        self.irq_router = IrqRouter(self.vm)
        self.irq_router.commit()
        self._pci = None
        self.cpuid = []
        pvm = kvm_flavour() == "pvm"
        for i in range(cfg.cpus):
            vcpu = self.vm.create_vcpu(i)
            self.vcpus.append(vcpu)
            # kvm_pvm: VMCALL from guest ring 0 never completes, so no hypercall-based PV features there
            self.cpuid = X.guest_cpuid(self.kvm, i, cfg.cpus, hypercalls=not pvm)
            vcpu.set_cpuid(self.cpuid)
            X.setup_msrs(vcpu)
            X.setup_lapic(vcpu)
        # kvm_pvm only: user-mode SYSCALL needs the VMM's repair (exitless/x86/pvm_syscall.py)
        self.syscall_repair = SyscallRepair(self.mem) if pvm else None
        self.fallbacks = [InstructionFallback(v, self.mem, self.syscall_repair) for v in self.vcpus]

    def _map_region(self, region: Region) -> None:
        slot = self._next_slot
        self._next_slot += 1
        self._slots[region.offset] = slot
        self.vm.set_user_memory_region(slot, region.gpa, region.size, self.mem.host_address(region))

    def unmap_ram_page(self, region: Region) -> None:
        """Take a device RAM region out of the guest's address space (its BAR stopped decoding)."""
        self.vm.set_user_memory_region(self._slots[region.offset], region.gpa, 0, 0)

    def remap_ram_page(self, region: Region, gpa: int) -> Region:
        """Put a device RAM region back, possibly at a new address (the guest moved its BAR)."""
        moved = self.mem.move_region(region, gpa) if gpa != region.gpa else region
        self.vm.set_user_memory_region(self._slots[region.offset], moved.gpa, moved.size, self.mem.host_address(moved))
        return moved

    # -- devices --------------------------------------------------------
    def add_ram_page(self, gpa: int, size: int = 4096) -> Region:
        """Map RAM at a device address (outside the e820 map): a doorbell page shared with a sidecore."""
        region = self.mem.add_region(gpa, size)
        self._map_region(region)
        return region

    @property
    def pci(self):
        """PCI bus 0 (created on first use, so a machine without PCI devices has no 0xCF8 ports)."""
        if self._pci is None:
            from .devices.pci.root import PciRoot
            self._pci = PciRoot(self.pio)
        return self._pci

    def add_worker(self, worker: Worker) -> None:
        self.workers.append(worker)

    # -- boot -----------------------------------------------------------
    def boot_pvh(self, kernel: str | Path | bytes, cmdline: str = "", initrd: str | Path | bytes | None = None,
                 *, rsdp: int = 0, name: str | None = None):
        """Load an ELF kernel with a PVH note (the guest kit, or Linux's vmlinux) and set the entry state.

        ``kernel`` and ``initrd`` are paths or the file contents; returns (image, initrd gpa, initrd size).
        """
        from .boot.files import read_image
        from .boot.placement import check_kernel_fits, place_initrd
        from .boot.pvh import load_pvh, parse_pvh_elf, pvh_cmdline

        ram = self.config.mem_mib << 20
        data = bytes(kernel) if isinstance(kernel, (bytes, bytearray)) else read_image(kernel, "", ram)
        name = name or str(kernel if not isinstance(kernel, (bytes, bytearray)) else "kernel")
        # every check before the first byte of guest RAM is written
        image = parse_pvh_elf(data, name)
        pvh_cmdline(cmdline)
        start = min(p for p, _, _ in image.segments)
        check_kernel_fits(self.ram_layout, self.config.mem_mib, start, image.end, name)
        modules = []
        rd_gpa = rd_size = 0
        blob = b""
        if initrd is not None:
            blob = bytes(initrd) if isinstance(initrd, (bytes, bytearray)) else read_image(initrd, "initrd", ram)
            rd_size = len(blob)
            if blob:
                rd_gpa = place_initrd(self.ram_layout, self.config.mem_mib, rd_size, image.end)
                modules.append((rd_gpa, rd_size))
        if blob:
            self.mem.write(rd_gpa, blob)
        start_info = load_pvh(self.mem, image, cmdline, self.ram_layout, modules, rsdp=rsdp)
        X.set_protected_mode_entry(self.vcpus[0], image.entry, rbx=start_info)
        return image, rd_gpa, rd_size

    # -- running --------------------------------------------------------
    def run(self, timeout: float | None = None) -> VmExit:
        """Run until the guest stops (or ``timeout`` seconds pass: then kind='timeout')."""
        install_kick_handler()
        self.threads = [VcpuThread(v, self.pio, self.mmio, self._vcpu_exited, f)
                        for v, f in zip(self.vcpus, self.fallbacks)]
        for t in self.threads:
            t.start()
        every = float(os.environ.get("EXITLESS_SAMPLE_RIP", "0") or 0)
        if every > 0:     # a hang's evidence: where each vCPU is, every `every` seconds (logged as warnings)
            threading.Thread(target=self._sample_rips, args=(every,), name="rip-sampler", daemon=True).start()
        try:
            if not self._exit_event.wait(timeout):
                self._set_exit(VmExit("timeout", 1, f"the guest did not stop within {timeout} s"))
        finally:      # Ctrl-C/SIGTERM raised in the wait: the vCPUs stop before the command unwinds
            self.stop()
        return self._exit

    def _sample_rips(self, every: float) -> None:
        while not self._exit_event.wait(every):
            for t in self.threads:
                t.request_sample()

    def _vcpu_exited(self, exit: VmExit) -> None:
        self._set_exit(exit)

    def _set_exit(self, exit: VmExit) -> None:
        if self._exit is None:
            self._exit = exit
        self._exit_event.set()

    def stop(self) -> None:
        for t in self.threads:
            t.kick()
        if not wait_all(self.threads, 5.0):
            log.error("a vCPU thread did not stop within 5 s")

    def vcpu_stats(self) -> "VcpuStats":
        return VcpuStats([v.stats() for v in self.vcpus])

    def _kvm_counters(self) -> dict[str, int]:
        if self._stats is None:
            self._stats = self.vcpu_stats()
        return self._stats.read()

    def _sidecore_process_cpu(self) -> float:
        return sum(w.cpu_seconds() or 0.0 for w in self.workers if getattr(w, "placement", None) == "process")

    def vcpu_cpu_seconds(self) -> float:
        """CPU time of the vCPU threads that have finished (the guest's own running time)."""
        return sum(t.cpu_seconds for t in self.threads)

    def fallback_counts(self) -> dict[str, int]:
        """What the instruction fallback did, summed over the vCPUs (empty on VMX/SVM hosts)."""
        total: Counter[str] = Counter()
        for f in self.fallbacks:
            total.update(f.counts)
        if self.syscall_repair is not None:
            total.update({f"pvm {k}": v for k, v in self.syscall_repair.counts.items() if k == "planted"})
        return dict(total)

    def tsc_khz(self) -> int:
        return self.vcpus[0].tsc_khz()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.threads:
            self.stop()
        for w in reversed(self.workers):
            try:
                w.stop()
            except Exception:
                log.error("stopping %r\n%s", w, traceback.format_exc())
        self.workers.clear()
        if getattr(self, "_stats", None) is not None:
            self._stats.close()
        if hasattr(self, "irq_router"):
            self.irq_router.close()
        for v in self.vcpus:
            v.close()
        if hasattr(self, "mem"):
            self.mem.close()
        self.vm.close()
        if self._own_kvm:
            self.kvm.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class VcpuStats:
    """KVM's own per-vCPU counters, summed over the VM's vCPUs."""

    fds: list[Stats] = field(default_factory=list)

    def read(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for s in self.fds:
            for k, v in s.read().items():
                total[k] = total.get(k, 0) + v
        return total

    def close(self) -> None:
        for s in self.fds:
            s.close()


class _StdoutConsole:
    """The guest's console on this process's stdout (``stdout_console``).

    A reader that goes away (``exitless run … | head``) must not turn each later byte into a
    traceback from the serial port's handler: the first EPIPE drops the output for good, with
    one warning, and points stdout at /dev/null so that the interpreter's exit flush is quiet
    too.  The guest runs on; its exit status is still exitless's.
    """

    def __init__(self):
        self.dropped = False
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        if self.dropped:
            return
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            with self._lock:
                if self.dropped:
                    return
                self.dropped = True
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            log.warning("stdout was closed by its reader: the guest's console output is dropped from here on")


#: ``console=`` callable writing to stdout; every command that shows the guest's console uses it.
stdout_console = _StdoutConsole()
