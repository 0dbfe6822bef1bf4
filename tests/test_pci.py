"""PCI config space through the type-1 ports, BAR sizing and decode, MSI-X masking."""
import struct

import pytest

from exitless.devices.pci.msix import Msix
from exitless.devices.virtio.blk import VirtioBlk
from exitless.devices.virtio.pci import BAR_CFG, BAR_MSIX, VirtioPci
from exitless.vm import Machine, VmConfig


class Cfg:
    """Drive config space the way a guest does: address latch at 0xCF8, data at 0xCFC."""

    def __init__(self, m, slot):
        self.m, self.slot = m, slot

    def _latch(self, reg):
        self.m.pio.write(0xCF8, struct.pack("<I", 0x8000_0000 | (self.slot << 11) | (reg & 0xFC)))

    def read(self, reg, size=4):
        self._latch(reg)
        return int.from_bytes(self.m.pio.read(0xCFC + (reg & 3), size), "little")

    def write(self, reg, value, size=4):
        self._latch(reg)
        self.m.pio.write(0xCFC + (reg & 3), value.to_bytes(size, "little"))


@pytest.fixture
def machine(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 65536)
    with Machine(VmConfig(mem_mib=32)) as m:
        dev = VirtioPci(m, VirtioBlk(img), "ioeventfd")
        yield m, dev, Cfg(m, dev.slot)


@pytest.mark.kvm
def test_enumeration_and_absent_functions(machine):
    m, dev, cfg = machine
    host = Cfg(m, 0)
    assert host.read(0x0A, 2) == 0x0600                       # host bridge class
    assert cfg.read(0) == (0x1042 << 16) | 0x1AF4             # virtio-blk, modern
    assert Cfg(m, 7).read(0) == 0xFFFF_FFFF                   # nothing there: all ones
    m.pio.write(0xCF8, struct.pack("<I", 0x8000_0810))
    assert m.pio.read(0xCF8, 4) == struct.pack("<I", 0x8000_0810)  # the latch reads back
    # the capability list walks to the MSI-X capability and the virtio vendor capabilities
    ptr, seen = cfg.read(0x34, 1), []
    while ptr:
        seen.append(cfg.read(ptr, 1))
        ptr = cfg.read(ptr + 1, 1)
    assert seen.count(0x09) == 5 and 0x11 in seen          # common, notify, ISR, device, PCI_CFG


@pytest.mark.kvm
def test_bar_sizing_and_decode(machine):
    m, dev, cfg = machine
    bar0 = cfg.read(0x10)
    assert bar0 and bar0 % 0x4000 == 0 and m.mmio.find(bar0) is not None
    cmd = cfg.read(0x04, 2)
    cfg.write(0x04, cmd & ~0x2, 2)                            # memory decode off, as Linux does to size
    assert m.mmio.find(bar0) is None
    cfg.write(0x10, 0xFFFF_FFFF)
    assert cfg.read(0x10) == (~(0x4000 - 1)) & 0xFFFF_FFFF    # ~(size-1), memory BAR type bits 0
    new = 0xC800_0000
    cfg.write(0x10, new)
    cfg.write(0x04, cmd, 2)                                   # decode on at the new address
    assert m.mmio.find(new) is not None and m.mmio.find(bar0) is None
    assert dev.bars[BAR_CFG].address == new


class FakeRouter:
    def __init__(self):
        self.vectors = []

    def allocate_msi(self):
        router = self

        class Vec:
            def __init__(self):
                self.fired, self.programmed = 0, None

            def program(self, a, d):
                self.programmed = (a, d)

            def fire(self):
                self.fired += 1

        v = Vec()
        router.vectors.append(v)
        return v


def test_msix_masked_vector_is_pending_until_unmasked():
    msix = Msix(FakeRouter(), 2, BAR_MSIX)
    msix.write(0, struct.pack("<III", 0xFEE0_0000, 0, 0x41))   # address, data; still masked
    msix.control_written(0x8000)                              # MSI-X enable
    assert msix.fire(0) is False                              # masked: pending
    assert msix.read(0x800, 8)[0] & 1                         # the PBA shows it
    msix.write(12, struct.pack("<I", 0))                      # unmask: delivered now
    vec = msix.vectors[0]
    assert vec.programmed == (0xFEE0_0000, 0x41) and vec.fired == 1
    assert not msix.read(0x800, 8)[0] & 1
    msix.control_written(0x8000 | 0x4000)                     # function mask
    assert msix.fire(0) is False and vec.fired == 1
    msix.control_written(0x8000)
    assert vec.fired == 2
    assert msix.fire(5) is False                              # no such vector: ignored


@pytest.mark.kvm
def test_pci_cfg_capability_reaches_the_common_config(machine):
    """VIRTIO_PCI_CAP_PCI_CFG: set bar/offset/length, then pci_cfg_data accesses the BAR."""
    m, dev, cfg = machine
    cap = dev.pci_cfg_cap
    assert cfg.read(cap + 3, 1) == 5
    cfg.write(cap + 4, 0, 1)                 # BAR0
    cfg.write(cap + 8, 0x12)                 # common config: num_queues
    cfg.write(cap + 12, 2)                   # 2 bytes
    assert cfg.read(cap + 16, 2) == dev.device.num_queues
    cfg.write(cap + 8, 0x14)                 # device_status
    cfg.write(cap + 12, 1)
    cfg.write(cap + 16, 0x01, 1)             # ACKNOWLEDGE through the window
    assert dev.status == 0x01


@pytest.mark.kvm
def test_bar_moved_onto_another_window_is_not_decoded_until_moved_away(machine):
    """Found by the pci_config fuzz target: the guest placed BAR2 over BAR0 and the MMIO bus's
    overlap error escaped into the PIO bus as a device failure."""
    m, dev, cfg = machine
    bar0, bar2 = cfg.read(0x10), cfg.read(0x18)
    errors = m.pio.device_errors
    cfg.write(0x18, bar0)                                     # decoding on: BAR2 now collides with BAR0
    assert m.pio.device_errors == errors
    assert m.mmio.find(bar0).name.endswith("-cfg") and m.mmio.find(bar2) is None
    cfg.write(0x18, bar2)                                     # moved somewhere free: decodes again
    assert m.mmio.find(bar2).name == "virtio-notify" and m.pio.device_errors == errors


@pytest.mark.kvm
def test_bar_in_conflict_decodes_once_the_other_function_moves_away(machine, tmp_path):
    """Found by the pci_config fuzz target: the BAR that lost a conflict stayed dark after the
    other function's window moved away; every function decodes its own BARs, as on hardware."""
    m, dev, cfg = machine
    img = tmp_path / "e.img"
    img.write_bytes(b"\0" * 65536)
    other = VirtioPci(m, VirtioBlk(img), "trap")
    ocfg = Cfg(m, other.slot)
    bar0, obar2 = cfg.read(0x10), ocfg.read(0x18)
    cmd = cfg.read(0x04, 2)
    cfg.write(0x04, cmd & ~0x2, 2)                     # function 1 stops decoding ...
    ocfg.write(0x18, bar0)                             # ... function 2 takes its BAR0 address
    cfg.write(0x04, cmd, 2)                            # function 1 decodes again: BAR0 in conflict
    assert m.mmio.find(bar0).name == "virtio-notify"
    ocfg.write(0x18, obar2)                            # function 2 moves away: BAR0 decodes
    assert m.mmio.find(bar0).name.endswith("-cfg") and m.mmio.find(obar2).name == "virtio-notify"
