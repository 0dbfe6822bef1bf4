"""PCI decode and INTx as functions of config-space state (issue 14 §1, §2).

§1: whatever BAR and COMMAND writes the guest makes -- overlapping BARs of one
function or of two, sizing, decode toggles, addresses outside the host bridge's
window -- the buses hold exactly the BARs that decode, nothing stale, and once
the layout is valid every BAR decodes where config space says (PCI 3.0 §6.2.2,
§6.2.5.1).  §2: the INTx line's level is a function of the device's state across
reset, COMMAND.INTERRUPT_DISABLE, ISR reads and MSI-X enable (virtio 1.2 §2.4,
§4.1.4.5; PCI 3.0 §6.2.2-6.2.3).

The machines are real KVM VMs (config space through ports 0xCF8/0xCFC, BARs on
the real MMIO bus and KVM memory slots); no guest runs.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from exitless.devices.pci.device import CMD_INTX_DISABLE, CMD_MEMORY, STATUS_INTX
from exitless.devices.virtio.blk import VirtioBlk
from exitless.devices.virtio.constants import (VIRTIO_STATUS_ACKNOWLEDGE, VIRTIO_STATUS_DRIVER,
                                               VIRTIO_STATUS_DRIVER_OK, VIRTIO_STATUS_FEATURES_OK)
from exitless.devices.virtio.pci import BAR_CFG, BAR_MSIX, BAR_NOTIFY, ISR_OFF, VirtioPci
from exitless.vm import Machine, VmConfig
from tests.test_pci import Cfg

pytestmark = pytest.mark.kvm

COMMAND, STATUS = 0x04, 0x06
NUM_QUEUES = 0x12                      # common configuration offset of num_queues
MSIX_CONTROL = 2                       # offset in the MSI-X capability
VIRTIO_F_VERSION_1 = 1 << 32


def bar_reg(index: int) -> int:
    return 0x10 + 4 * index


class LineSpy:
    """Records the level of a function's INTx line as the VMM sets it in KVM (KVM_IRQ_LINE)."""

    def __init__(self, m: Machine, dev: VirtioPci):
        self.gsi, self.level, real = dev.config[0x3C], 0, m.vm.irq_line

        def irq_line(gsi: int, level: int) -> None:
            if gsi == self.gsi:
                self.level = level
            real(gsi, level)
        m.vm.irq_line = irq_line




class BlkMachine:
    """A real KVM machine (no guest) with one virtio-blk function per I/O path in ``paths``."""

    def __init__(self, *paths: str):
        import tempfile
        self.tmp = tempfile.TemporaryDirectory()
        imgs = [f"{self.tmp.name}/d{i}.img" for i in range(len(paths))]    # one each: a writer locks its image
        for img in imgs:
            with open(img, "wb") as f:
                f.truncate(65536)
        self.m = Machine(VmConfig(mem_mib=32))
        self.devs = [VirtioPci(self.m, VirtioBlk(img), path) for img, path in zip(imgs, paths)]
        self.cfgs = [Cfg(self.m, d.slot) for d in self.devs]

    def close(self) -> None:
        self.m.close()
        self.tmp.cleanup()


@pytest.fixture
def blk():
    vm = BlkMachine("ioeventfd")
    yield vm.m, vm.devs[0], vm.cfgs[0]
    vm.close()


def num_queues_at(m: Machine, bar0: int) -> int:
    return int.from_bytes(m.mmio.read(bar0 + NUM_QUEUES, 2), "little")


# --------------------------------------------------------------------------- §1: the inputs


def test_refused_bar_move_then_restore_decodes_again(blk) -> None:
    """BAR0 (16 KiB) at 0xC0000000, BAR2 at 0xC0004000, BAR4 at 0xC0005000, decoding on;
    BAR0 <- 0xC0004000 (overlapping BAR2), then BAR0 <- 0xC0000000."""
    m, dev, cfg = blk
    assert [cfg.read(bar_reg(i)) for i in (0, 2, 4)] == [0xC000_0000, 0xC000_4000, 0xC000_5000]
    assert num_queues_at(m, 0xC000_0000) == 1
    cfg.write(bar_reg(0), 0xC000_4000)
    assert cfg.read(bar_reg(0)) == 0xC000_4000
    cfg.write(bar_reg(0), 0xC000_0000)
    assert num_queues_at(m, 0xC000_0000) == 1
    assert dev.mapped == {BAR_CFG: 0xC000_0000, BAR_NOTIFY: 0xC000_4000, BAR_MSIX: 0xC000_5000}


def test_linux_sequence_with_an_overlap_keeps_the_other_bars(blk) -> None:
    """Decoding off, BAR0 <- overlap, decoding on; then the same with the old address."""
    m, dev, cfg = blk
    cmd = cfg.read(COMMAND, 2)
    for bar0 in (0xC000_4000, 0xC000_0000):
        cfg.write(COMMAND, cmd & ~CMD_MEMORY, 2)
        cfg.write(bar_reg(0), bar0)
        cfg.write(COMMAND, cmd, 2)
    assert num_queues_at(m, 0xC000_0000) == 1
    ours = sorted((r.base, r.length) for r in m.mmio)
    assert ours == [(0xC000_0000, 0x4000), (0xC000_4000, 0x1000), (0xC000_5000, 0x1000)]   # nothing stale
    assert dev.mapped == {BAR_CFG: 0xC000_0000, BAR_NOTIFY: 0xC000_4000, BAR_MSIX: 0xC000_5000}


# --------------------------------------------------------------------------- §1: the kind


class BarDecode(RuleBasedStateMachine):
    """Two virtio-blk functions (a shared-page notify BAR and a trapped one) under random config writes."""

    def __init__(self):
        super().__init__()
        self.vm = None

    @initialize()
    def plug(self):
        self.vm = BlkMachine("shared", "trap")
        self.m, self.devs, self.cfgs = self.vm.m, self.vm.devs, self.vm.cfgs
        self.window = self.m.pci.window

    def teardown(self):
        if self.vm is None:
            return
        try:
            self.restore_valid_layout()
        finally:
            self.vm.close()

    def candidates(self) -> list[int]:
        here = [d.bar_address(i) for d in self.devs for i in d.bars]
        return here + [a + 0x1000 for a in here] + [0, 0xFFFF_FFFF, 0x0010_0000, 0xFEE0_0000,
                                                    self.window[1] - 0x1000, self.window[1]]

    @rule(data=st.data(), dev=st.integers(0, 1), bar=st.sampled_from([BAR_CFG, BAR_NOTIFY, BAR_MSIX]),
          size=st.sampled_from([4, 4, 2, 1]), byte=st.integers(0, 3))
    def write_bar(self, data, dev, bar, size, byte):
        value = data.draw(st.one_of(st.sampled_from(self.candidates()),
                                    st.integers(self.window[0], self.window[1]).map(lambda a: a & ~0xFFF)))
        offset = byte & ~(size - 1)
        part = (value >> (8 * offset)) & ((1 << (8 * size)) - 1)
        self.cfgs[dev].write(bar_reg(bar) + offset, part, size)

    @rule(dev=st.integers(0, 1), memory=st.booleans(), intx_disable=st.booleans())
    def write_command(self, dev, memory, intx_disable):
        cmd = self.cfgs[dev].read(COMMAND, 2) & ~(CMD_MEMORY | CMD_INTX_DISABLE)
        self.cfgs[dev].write(COMMAND, cmd | (CMD_MEMORY if memory else 0) | (CMD_INTX_DISABLE if intx_disable else 0), 2)

    def wanted(self) -> list[dict[int, int]]:
        """What decodes, read from config space as the guest sees it (PCI 3.0 §6.2.2, §6.2.5.1) --
        not from PciDevice.decoded_bars, whose memo is part of what is tested."""
        lo, hi = self.window
        out = []
        for d, cfg in zip(self.devs, self.cfgs):
            want = {}
            if cfg.read(COMMAND, 2) & CMD_MEMORY:
                for i, bar in d.bars.items():
                    a = cfg.read(bar_reg(i)) & ~0xF
                    if a and lo <= a and a + bar.size <= hi:
                        want[i] = a
            assert d.decoded_bars(self.window) == want
            out.append(want)
        return out

    @invariant()
    def buses_match_config_space(self):
        if self.vm is None:
            return
        wanted = self.wanted()
        spans = [(a, a + d.bars[i].size, (k, i)) for k, (d, w) in enumerate(zip(self.devs, wanted))
                 for i, a in w.items()]
        for k, (d, w) in enumerate(zip(self.devs, wanted)):
            for i, a in d.mapped.items():
                assert w.get(i) == a, f"dev{k} BAR{i} mapped at {a:#x}, config space says {w.get(i)}"
                r = self.m.mmio.find(a)
                assert r is not None and (r.base, r.length) == (a, d.bars[i].size)
            if d.path == "shared" and BAR_NOTIFY in d.mapped:
                assert d.notify_region.gpa == d.mapped[BAR_NOTIFY]
            for i, a in w.items():       # a BAR that overlaps no other decoding BAR is always mapped
                lone = all(b2 <= a or a + d.bars[i].size <= a2 for a2, b2, who in spans if who != (k, i))
                assert not lone or d.mapped.get(i) == a, f"dev{k} BAR{i} at {a:#x} overlaps nothing, not mapped"
        mapped = {(a, d.bars[i].size) for d in self.devs for i, a in d.mapped.items()}
        event(f"a BAR refused: {sum(map(len, wanted)) > len(mapped)}")
        assert {(r.base, r.length) for r in self.m.mmio if r.base >= self.window[0] and r.end <= self.window[1]} \
            == mapped, "a range on the bus that no BAR decodes (stale)"

    def restore_valid_layout(self):
        base = self.window[0] + 0x10_0000
        for d, cfg in zip(self.devs, self.cfgs):
            for i, bar in sorted(d.bars.items()):
                base = (base + bar.size - 1) & ~(bar.size - 1)
                cfg.write(bar_reg(i), base)
                base += bar.size
            cfg.write(COMMAND, cfg.read(COMMAND, 2) | CMD_MEMORY, 2)
        self.buses_match_config_space()
        for d, cfg in zip(self.devs, self.cfgs):
            assert d.mapped == {i: cfg.read(bar_reg(i)) for i in d.bars}
            assert num_queues_at(self.m, d.mapped[BAR_CFG]) == d.device.num_queues


TestBarDecode = BarDecode.TestCase
TestBarDecode.settings = settings(max_examples=25, stateful_step_count=25, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- §2: the inputs


def test_reset_lowers_a_pending_intx_line(blk) -> None:
    """MSI-X disabled; a config-change interrupt (ISR = 2, line raised); device_status <- 0 without reading ISR."""
    m, dev, cfg = blk
    spy = LineSpy(m, dev)
    dev.device.config_changed()
    assert spy.level == 1 and dev.isr == 2
    assert cfg.read(STATUS, 2) & STATUS_INTX
    m.mmio.write(0xC000_0000 + 0x14, b"\0")                 # device_status = 0
    assert spy.level == 0 and dev.isr == 0
    assert not cfg.read(STATUS, 2) & STATUS_INTX
    assert m.mmio.read(0xC000_0000 + ISR_OFF, 1) == b"\0"


def test_interrupt_disable_and_status_bit(blk) -> None:
    m, dev, cfg = blk
    spy = LineSpy(m, dev)
    cmd = cfg.read(COMMAND, 2)
    cfg.write(COMMAND, cmd | CMD_INTX_DISABLE, 2)
    dev.device.config_changed()
    assert spy.level == 0 and cfg.read(STATUS, 2) & STATUS_INTX     # pending, not signalled
    cfg.write(COMMAND, cmd, 2)
    assert spy.level == 1
    assert m.mmio.read(0xC000_0000 + ISR_OFF, 1) == b"\x02"
    assert spy.level == 0 and not cfg.read(STATUS, 2) & STATUS_INTX


# --------------------------------------------------------------------------- §2: the kind


class IntxLevel(RuleBasedStateMachine):
    """A model of ISR, MSI-X enable and Interrupt Disable; the line must always equal the model's level."""

    def __init__(self):
        super().__init__()
        self.vm = None

    @initialize()
    def plug(self):
        self.vm = BlkMachine("trap")
        self.m, self.dev, self.cfg = self.vm.m, self.vm.devs[0], self.vm.cfgs[0]
        self.spy = LineSpy(self.m, self.dev)
        self.bar0 = self.dev.mapped[BAR_CFG]
        self.isr = 0
        self.live = False

    def teardown(self):
        if self.vm is not None:
            self.vm.close()

    def common_write(self, offset, value, size):
        self.m.mmio.write(self.bar0 + offset, value.to_bytes(size, "little"))

    @property
    def msix(self) -> bool:
        return bool(self.cfg.read(self.dev.msix.cap_offset + MSIX_CONTROL, 2) & 0x8000)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.cfg.read(COMMAND, 2) & CMD_INTX_DISABLE)

    @rule()
    def config_change(self):
        self.dev.device.config_changed()
        self.isr |= 2

    @rule()
    def queue_interrupt(self):
        self.dev.signal_queue(0)
        if self.live and not self.msix:
            self.isr |= 1

    @rule()
    def read_isr(self):
        assert self.m.mmio.read(self.bar0 + ISR_OFF, 1)[0] == self.isr
        self.isr = 0

    @rule()
    def reset(self):
        self.common_write(0x14, 0, 1)
        self.isr, self.live = 0, False

    @precondition(lambda self: not self.live)
    @rule()
    def driver_ok(self):
        self.common_write(0x08, 1, 4)                            # driver_feature_select = 1
        self.common_write(0x0C, VIRTIO_F_VERSION_1 >> 32, 4)
        for bits in (VIRTIO_STATUS_ACKNOWLEDGE, VIRTIO_STATUS_DRIVER, VIRTIO_STATUS_FEATURES_OK,
                     VIRTIO_STATUS_DRIVER_OK):
            self.common_write(0x14, self.dev.status | bits, 1)
        self.live = bool(self.dev.status & VIRTIO_STATUS_DRIVER_OK)

    @rule(on=st.booleans())
    def interrupt_disable(self, on):
        cmd = self.cfg.read(COMMAND, 2) & ~CMD_INTX_DISABLE
        self.cfg.write(COMMAND, cmd | (CMD_INTX_DISABLE if on else 0), 2)

    @rule(on=st.booleans(), mask_all=st.booleans(), size=st.sampled_from([1, 2]))
    def msix_control(self, on, mask_all, size):
        value = (0x8000 if on else 0) | (0x4000 if mask_all else 0)
        off = self.dev.msix.cap_offset + MSIX_CONTROL
        if size == 1:
            self.cfg.write(off + 1, value >> 8, 1)
        else:
            self.cfg.write(off, value, 2)

    @invariant()
    def line_is_a_function_of_state(self):
        if self.vm is None:
            return
        pending = bool(self.isr) and not self.msix
        assert self.dev.isr == self.isr
        assert bool(self.cfg.read(STATUS, 2) & STATUS_INTX) == pending
        assert self.spy.level == (pending and not self.intx_disabled)
        assert self.dev.intx_level == self.spy.level     # the device's own view agrees
        event(f"line {self.spy.level}, pending {pending}")


TestIntxLevel = IntxLevel.TestCase
TestIntxLevel.settings = settings(max_examples=30, stateful_step_count=30, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow])


def test_msix_enable_drops_intx_and_disable_restores_it(blk) -> None:
    m, dev, cfg = blk
    spy = LineSpy(m, dev)
    dev.device.config_changed()
    assert spy.level == 1
    ctrl = dev.msix.cap_offset + MSIX_CONTROL
    cfg.write(ctrl, 0x8000, 2)
    assert spy.level == 0 and not cfg.read(STATUS, 2) & STATUS_INTX
    cfg.write(ctrl, 0, 2)
    assert spy.level == 1
    assert struct.unpack("<B", m.mmio.read(dev.mapped[BAR_CFG] + ISR_OFF, 1))[0] == 2 and spy.level == 0


# --------------------------------------------------------------------------- §1 end to end: a guest does it


def test_guest_moves_bar0_over_bar2_and_back(tmp_path) -> None:
    """The issue's two sequences run by a real KVM guest through ports 0xCF8/0xCFC, then it reads
    num_queues through BAR0 and the MSI-X vector control of entry 0 through BAR4."""
    from tests.asmguest import build_guest
    body = """
    .macro cfgw reg, val
    mov $(0x80000800 | \\reg), %eax     /* bus 0, device 1, function 0 */
    mov $0xcf8, %dx
    out %eax, %dx
    mov $\\val, %eax
    mov $0xcfc, %dx
    out %eax, %dx
    .endm
    cfgw 0x10, 0xC0004000              /* decoding on: BAR0 over BAR2 ... */
    cfgw 0x10, 0xC0000000              /* ... and back */
    movzwl 0xC0000012, %ebx            /* num_queues */
    cfgw 0x04, 0x4                     /* Linux: decoding off, move, decoding on */
    cfgw 0x10, 0xC0004000
    cfgw 0x04, 0x6
    cfgw 0x04, 0x4
    cfgw 0x10, 0xC0000000
    cfgw 0x04, 0x6
    movzwl 0xC0000012, %eax
    shl $8, %eax
    or %eax, %ebx
    mov 0xC000500C, %eax               /* MSI-X entry 0 vector control: 1, masked */
    shl $16, %eax
    or %ebx, %eax
    jmp exit_with_eax
    """
    elf = build_guest(tmp_path, "bars", body)
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 65536)
    with Machine(VmConfig(mem_mib=32)) as m:
        dev = VirtioPci(m, VirtioBlk(img), "shared")
        assert dev.slot == 1
        m.boot_pvh(elf)
        result = m.run(timeout=60)
        assert result.kind == "debug-exit", result
        assert result.status == 0x01_01_01
        assert dev.mapped == {BAR_CFG: 0xC000_0000, BAR_NOTIFY: 0xC000_4000, BAR_MSIX: 0xC000_5000}
        assert m.pio.device_errors == 0 and m.mmio.device_errors == 0
