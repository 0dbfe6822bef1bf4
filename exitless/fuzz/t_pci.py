"""Fuzz targets ``virtio_pci`` and ``pci_config``: a real KVM machine's buses, as a guest drives them.

Both build one :class:`~exitless.vm.Machine` (no vCPU runs) with virtio-blk functions and send
every access through ``machine.mmio`` / ``machine.pio``, the same dispatch a KVM exit takes.  The
buses catch any exception a device raises (the guest must not be able to stop the VMM), so the
harnesses read their ``device_errors`` counters instead: any non-zero count is a bug found.
"""
from __future__ import annotations

import errno
import os
import struct
import tempfile

from ..devices.pci.device import BAR0, COMMAND
from ..devices.virtio.blk import VirtioBlk
from ..devices.virtio.constants import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_F_VERSION_1,
    VIRTIO_STATUS_DRIVER_OK,
    VIRTIO_STATUS_FEATURES_OK,
)
from ..devices.virtio.pci import BAR_CFG, BAR_MSIX, BAR_NOTIFY, DEVICE_OFF, NOTIFY_MULTIPLIER, VirtioPci
from ..kvm.ioctls import KVM_IOEVENTFD
from ..kvm.syscall import KvmError
from ..vm import Machine, VmConfig
from . import InvariantViolation
from .data import FuzzInput
from .ring import DriverRing

CHECK_RING, CHECK_BUF = 0x200000, 0x201000
RAM_WINDOW = 1 << 20            # fuzzed guest RAM writes land below 1 MiB
MAX_OPS = 256
SIZES = (1, 2, 4, 8)
ACK, DRIVER = 1, 2
NO_VECTOR = 0xFFFF


class IoeventfdLedger:
    """KVM's ioeventfd table, as a model: what ``Vm.ioeventfd`` would register, without the ioctl.

    A real ``KVM_IOEVENTFD`` costs ~4 ms (KVM waits for an SRCU grace period on every change of
    the MMIO bus), which held ``pci_config`` to ~60 executions per second.  The fuzzed code --
    config-space decode, ``map_bar``/``unmap_bar`` of the ioeventfd-path function -- is the same;
    only the kernel's table is this dict, refusing what KVM refuses (virt/kvm/eventfd.c):
    ``EEXIST`` for an assignment that collides with a registered one (same bus and address, and
    either of length 0, or the same length with the same datamatch or either without one), ``ENOENT``
    for a deassignment of nothing registered with exactly those fields.  ``check()`` then asks
    for more than KVM would have: the table must be exactly the notify addresses of the function
    where its BAR decodes (nothing stale, nothing missing).  Real KVM with BAR moves is
    tests/test_pci_state.py's business.

    ``table``: ``(pio, gpa, length, datamatch) -> fd``."""

    def __init__(self):
        self.table: dict[tuple[bool, int, int, int | None], int] = {}
        self.calls = 0

    def ioeventfd(self, fd: int, addr: int, length: int, *, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        self.calls += 1
        key = (pio, addr, length, datamatch)
        if deassign:
            if self.table.get(key) != fd:
                raise KvmError(KVM_IOEVENTFD, errno.ENOENT, f"mmio {addr:#x}/{length} (ledger)")
            del self.table[key]
            return
        for (p, a, n, dm) in self.table:      # ioeventfd_check_collision()
            if p == pio and a == addr and (0 in (n, length) or
                                           (n == length and (None in (dm, datamatch) or dm == datamatch))):
                raise KvmError(KVM_IOEVENTFD, errno.EEXIST, f"mmio {addr:#x}/{length} (ledger)")
        self.table[key] = fd


class _MachineHarness:
    """A machine with ``paths`` virtio-blk functions on bus 0; the shared part of both targets."""

    def __init__(self, paths: tuple[str, ...]):
        self.tmp = tempfile.TemporaryDirectory(prefix="exitless-fuzz-")
        imgs = [os.path.join(self.tmp.name, f"disk{i}.img") for i in range(len(paths))]   # a writer locks its image
        for img in imgs:
            with open(img, "wb") as f:
                f.truncate(1 << 20)
        self.m = Machine(VmConfig(mem_mib=32, console=lambda b: None))
        self.ioeventfds = IoeventfdLedger()
        self.m.vm.ioeventfd = self.ioeventfds.ioeventfd    # before any function registers one
        self.devs = [VirtioPci(self.m, VirtioBlk(img, queue_size=16), path) for img, path in zip(imgs, paths)]
        for d in self.devs:
            # The harness runs the queues itself (driver_session), on this thread: a live sidecore
            # thread would race it for the GIL on every wake-up (0.5 ms per eventfd write under
            # load) and make the coverage libFuzzer sees depend on thread timing.
            if d.sidecore is not None:
                d.sidecore.stop()
                d.sidecore = None
        self.bars = [{i: d.bar_address(i) for i in d.bars} for d in self.devs]
        self.commands = [d.command for d in self.devs]
        self.accesses = 0

    # config space through the type-1 mechanism, as a guest does
    def cfg_write(self, slot: int, reg: int, size: int, value: int) -> None:
        self.m.pio.write(0xCF8, struct.pack("<I", 0x8000_0000 | (slot << 11) | (reg & 0xFC)))
        self.m.pio.write(0xCFC + (reg & 3), (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def cfg_read(self, slot: int, reg: int, size: int) -> int:
        self.m.pio.write(0xCF8, struct.pack("<I", 0x8000_0000 | (slot << 11) | (reg & 0xFC)))
        return int.from_bytes(self.m.pio.read(0xCFC + (reg & 3), size), "little")

    def check_ioeventfds(self) -> None:
        """The (modelled) KVM ioeventfd table holds exactly each decoding ioeventfd-path function's
        notify addresses, one per queue (VirtioPci.map_bar), and nothing else."""
        want = {}
        for d in self.devs:
            notify = d.bar_address(BAR_NOTIFY)
            r = self.m.mmio.find(notify)
            if d.path == "ioeventfd" and r is not None and r.base == notify and r.name == "virtio-notify" \
                    and r.device.t is d:
                for q, fd in enumerate(d.wake_fds):
                    want[(False, notify + q * NOTIFY_MULTIPLIER, 0, None)] = fd
        if self.ioeventfds.table != want:
            raise InvariantViolation(f"ioeventfds registered {self.ioeventfds.table}, expected {want}")

    def check_counters(self) -> None:
        errors = (self.m.mmio.device_errors, self.m.pio.device_errors, *(d.device.internal_errors for d in self.devs))
        if any(errors):
            raise InvariantViolation(f"a device model raised (mmio, pio, devices: {errors}); see the log")

    def _decodes(self, d: VirtioPci, addr: int) -> bool:
        """Does a window of ``d`` (config, notify, MSI-X) start at ``addr`` on the MMIO bus?"""
        r = self.m.mmio.find(addr)
        return r is not None and r.base == addr and (r.device is d.msix or getattr(r.device, "t", None) is d)

    def restore_decoding(self) -> None:
        """Put every BAR back where the bus assigned it, decoding on (the firmware state)."""
        for d, bars, cmd in zip(self.devs, self.bars, self.commands):
            if d.command == cmd and all(d.bar_address(i) == a and self._decodes(d, a) for i, a in bars.items()):
                continue     # untouched: nothing to re-map
            # as firmware would: decoding off while BARs move (only the moved ones are rewritten)
            self.cfg_write(d.slot, COMMAND, 2, 0)
            for i, addr in bars.items():
                if d.bar_address(i) != addr:
                    self.cfg_write(d.slot, BAR0 + 4 * i, 4, addr)
            self.cfg_write(d.slot, COMMAND, 2, cmd)
        for d, bars in zip(self.devs, self.bars):   # (a BAR restored over another still-moved one
            for i, addr in bars.items():            # decodes once that one is back: check at the end)
                if not self._decodes(d, addr):
                    r = self.m.mmio.find(addr)
                    raise InvariantViolation(f"BAR{i} of slot {d.slot} does not decode at {addr:#x} after a reset "
                                             f"of its address (found {r})")

    def driver_session(self, d: VirtioPci) -> None:
        """Initialise ``d`` as a guest driver would and read one sector (VIRTIO 1.2 §3.1.1, §4.1.4)."""
        mmio, base = self.m.mmio, d.bar_address(BAR_CFG)

        def w(off, size, value):
            mmio.write(base + off, value.to_bytes(size, "little"))

        def r(off, size):
            return int.from_bytes(mmio.read(base + off, size), "little")

        w(0x14, 1, 0)
        if r(0x14, 1) != 0:
            raise InvariantViolation("device status does not read 0 after a reset")
        w(0x14, 1, ACK | DRIVER)
        w(0x08, 4, 1)
        w(0x0C, 4, 1 << (VIRTIO_F_VERSION_1 - 32))
        w(0x08, 4, 0)
        w(0x0C, 4, 0)
        w(0x14, 1, ACK | DRIVER | VIRTIO_STATUS_FEATURES_OK)
        if not r(0x14, 1) & VIRTIO_STATUS_FEATURES_OK:
            raise InvariantViolation("FEATURES_OK refused for VERSION_1 alone")
        mem = self.m.mem
        ring = DriverRing(mem, CHECK_RING, 4)
        w(0x16, 2, 0)
        w(0x18, 2, 4)
        w(0x1A, 2, NO_VECTOR)
        for off, addr in ((0x20, ring.desc), (0x28, ring.avail), (0x30, ring.used)):
            w(off, 4, addr & 0xFFFFFFFF)
            w(off + 4, 4, addr >> 32)
        w(0x1C, 2, 1)
        w(0x14, 1, ACK | DRIVER | VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK)
        hdr, data, status = CHECK_BUF, CHECK_BUF + 0x200, CHECK_BUF + 0x100
        mem.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 1))
        mem.write_u8(status, 0xFF)
        ring.offer([(hdr, 16, False), (data, 512, True), (status, 1, True)])
        mmio.write(d.bar_address(BAR_NOTIFY), struct.pack("<I", 0))
        if d.path != "trap":
            d.device.handle_queue(0)    # the ioeventfd path's sidecore would do this (the vCPU never runs here)
        used = ring.used_elements()
        if len(used) != 1 or mem.read_u8(status) != VIRTIO_BLK_S_OK:
            raise InvariantViolation(f"a valid read failed: used {used}, status {mem.read_u8(status)}, "
                                     f"device status {r(0x14, 1):#x}")
        w(0x14, 1, 0)

    def counters(self) -> dict:
        return {"refused": self.m.mem.refused, "accesses": self.accesses}


class VirtioPciHarness(_MachineHarness):
    def __init__(self):
        super().__init__(("trap",))
        self.d = self.devs[0]

    def run(self, data: bytes) -> None:
        inp, d, mmio = FuzzInput(data), self.d, self.m.mmio
        cfg, notify, msix = d.bar_address(BAR_CFG), d.bar_address(BAR_NOTIFY), d.bar_address(BAR_MSIX)
        for _ in range(MAX_OPS):
            if not inp.remaining:
                break
            self.accesses += 1
            op = inp.u8() % 10
            size = inp.pick(SIZES)
            if op == 0:       # common configuration
                mmio.write(cfg + inp.u8() % 0x40, inp.take(size))
            elif op == 1:     # anywhere in BAR0 (common, ISR, device config, gaps)
                mmio.read(cfg + inp.u16() % 0x4000, size)
            elif op == 2:
                mmio.write(cfg + DEVICE_OFF + inp.u16() % 0x1000, inp.take(size))
            elif op == 3:     # MSI-X table / PBA
                mmio.write(msix + inp.u16() % 0x1000, inp.take(size))
            elif op == 4:
                mmio.read(msix + inp.u16() % 0x1000, size)
            elif op == 5:     # a doorbell (the trap path runs the queue right here)
                mmio.write(notify + inp.u16() % d.bars[BAR_NOTIFY].size, inp.take(4))
            elif op == 6:
                mmio.read(cfg + 0x1000, 1)
            elif op == 7:     # capabilities: MSI-X enable/mask-all, the VIRTIO_PCI_CAP_PCI_CFG window
                self.cfg_write(d.slot, 0x40 + inp.u8() % 0xC0, min(size, 4), inp.u32())
            elif op == 8:
                self.cfg_read(d.slot, 0x40 + inp.u8() % 0xC0, min(size, 4))
            else:             # the rings and buffers the device will read
                self.m.mem.write(inp.u32() % (RAM_WINDOW - 256), inp.take(inp.u8()))

    def check(self) -> None:
        self.check_counters()
        self.driver_session(self.d)
        self.check_counters()


class PciConfigHarness(_MachineHarness):
    def __init__(self):
        super().__init__(("trap", "ioeventfd"))

    def run(self, data: bytes) -> None:
        inp, pio = FuzzInput(data), self.m.pio
        slots = (0, *(d.slot for d in self.devs))
        for _ in range(MAX_OPS):
            if not inp.remaining:
                break
            self.accesses += 1
            op = inp.u8() % 5
            if op == 0:
                pio.write(0xCF8 + inp.u8() % 4, inp.take(inp.pick((1, 2, 4))))
            elif op == 1:     # a well-formed address: a present slot (or not), any function and register
                slot = inp.pick(slots) if inp.u8() & 1 else inp.u8() % 32
                pio.write(0xCF8, struct.pack("<I", 0x8000_0000 | (slot << 11) | ((inp.u8() & 7) << 8) | (inp.u8() & 0xFC)))
            elif op == 2:
                pio.read(0xCFC + inp.u8() % 4, inp.pick((1, 2, 4)))
            elif op == 3:
                size = inp.pick((1, 2, 4))
                pio.write(0xCFC + inp.u8() % 4, inp.take(size))
            else:
                pio.read(0xCF8 + inp.u8() % 4, inp.pick((1, 2, 4)))

    def check(self) -> None:
        self.check_counters()
        self.check_ioeventfds()      # right after the input, as well as after the firmware state is back
        d = self.devs[0]             # BAR sizing, as Linux does it (on the trap-path function), from
        self.cfg_write(d.slot, COMMAND, 2, 0)           # wherever the input left it: the restore
        self.cfg_write(d.slot, BAR0, 4, 0xFFFF_FFFF)    # below then puts back its BAR0 with the rest
        if self.cfg_read(d.slot, BAR0, 4) != (~(d.bars[0].size - 1)) & 0xFFFF_FFFF:
            raise InvariantViolation(f"slot {d.slot}: BAR0 sizing reads back wrong")
        self.restore_decoding()
        for d in self.devs:
            if self.cfg_read(d.slot, 0, 4) != (d.config_read(2, 2) << 16 | 0x1AF4):
                raise InvariantViolation(f"slot {d.slot}: identity changed")
        self.check_ioeventfds()
        for d in self.devs:
            self.driver_session(d)
        self.check_counters()


def make_virtio_pci() -> VirtioPciHarness:
    return VirtioPciHarness()


def make_pci_config() -> PciConfigHarness:
    return PciConfigHarness()


def seeds_virtio_pci() -> list[bytes]:
    def common(off, size, value):
        return bytes([0, SIZES.index(size), off]) + value.to_bytes(size, "little")

    init = (common(0x14, 1, 0) + common(0x14, 1, 3) + common(0x08, 4, 1) + common(0x0C, 4, 1)
            + common(0x14, 1, 11) + common(0x16, 2, 0) + common(0x18, 2, 8) + common(0x20, 8, 0x1000)
            + common(0x28, 8, 0x2000) + common(0x30, 8, 0x3000) + common(0x1C, 2, 1) + common(0x14, 1, 15))
    msix = bytes([7, 1, 0x40 - 0x40 + 2]) + struct.pack("<I", 0x8000)      # cap header guess: fuzzer refines
    table = bytes([3, 2]) + struct.pack("<H", 0) + struct.pack("<I", 0xFEE00000)
    kick = bytes([5, 2]) + struct.pack("<H", 0) + struct.pack("<I", 0)
    ring = bytes([9, 0]) + struct.pack("<I", 0x2000) + bytes([6]) + struct.pack("<HHH", 0, 1, 0)
    return [init, init + ring + kick, init + msix + table + bytes([4, 2, 0, 0]), common(0x16, 2, 5) + common(0x18, 2, 3)]


def seeds_pci_config() -> list[bytes]:
    def addr(slot_sel, reg):
        return bytes([1, 0, slot_sel, 0, reg])

    def write(off, size, value):
        return bytes([3, (1, 2, 4).index(size), off]) + value.to_bytes(size, "little")

    move = addr(1, COMMAND) + write(0, 2, 0) + addr(1, BAR0) + write(0, 4, 0xFFFF_FFFF) + bytes([2, 2, 0]) \
        + write(0, 4, 0xC800_0000) + addr(1, COMMAND) + write(0, 2, 6)
    overlap = addr(2, BAR0 + 8) + write(0, 4, 0xC800_0000) + move
    return [move, overlap, addr(1, 0) + bytes([2, 2, 0]), addr(2, 0x34) + bytes([2, 0, 0])]
