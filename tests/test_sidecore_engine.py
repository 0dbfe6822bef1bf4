"""The one sidecore engine (exitless.sidecore.engine.SidecoreGroup): register devices and virtio
queues on one loop; its rules."""
import threading
import time

import pytest

from exitless.devices.doorbell import ACK, DoorbellDevice
from exitless.devices.virtio.blk import VirtioBlk
from exitless.devices.virtio.pci import VirtioPci
from exitless.guestkit import guestkit_path
from exitless.sidecore.engine import SidecoreGroup
from exitless.sidecore.paths import attach
from exitless.vm import Machine, VmConfig

MMIO, SHM = 0xD000_0000, 0xD000_1000
DISK_BYTES = 2 << 20


def test_rules():
    with pytest.raises(ValueError, match="mode"):
        SidecoreGroup("spin")
    with pytest.raises(ValueError, match="placement"):
        SidecoreGroup("poll", placement="fiber")
    with pytest.raises(ValueError, match="cannot serve"):
        SidecoreGroup("poll").add([], "adaptive")
    with pytest.raises(ValueError, match="thread"):   # virtqueues are objects of the VMM
        SidecoreGroup("poll", placement="process").add([], "poll")
    g = SidecoreGroup("poll")
    g.add_device(DoorbellDevice(), SHM, None)
    with pytest.raises(ValueError, match="guest memory"):
        g.start()
    g.stop()                                          # never started: nothing to stop


@pytest.mark.kvm
def test_register_device_and_virtio_queues_on_one_sidecore(tmp_path):
    """One sidecore thread serves a virtio-blk disk (poll path) and a doorbell device (shared path)
    at the same time: the guest fills the disk while a host thread plays the doorbell's driver;
    the disk gets every byte and the device every doorbell write, once and in order."""
    from tests.test_virtio_blk_e2e import pattern

    image = tmp_path / "d.img"
    image.write_bytes(bytes(DISK_BYTES))
    out = bytearray()
    with Machine(VmConfig(mem_mib=128, console=out.extend)) as m:
        group = SidecoreGroup("poll", name="sidecore-mixed")
        dev = DoorbellDevice()
        att = attach(m, dev, mmio_gpa=MMIO, shared_gpa=SHM, path="shared", sidecore=group)
        disk = VirtioPci(m, VirtioBlk(image), "poll", sidecore=group)
        group.start_on(m)
        with pytest.raises(RuntimeError, match="before starting"):
            group.add_device(DoorbellDevice(), SHM, None)
        assert att.sidecore is group and disk.sidecore is None
        assert len(group.pollables) == 1 and len(group.devices) == 1 and group.loop is not None

        page = m.mem.view(SHM, 4096)
        ack_off = DoorbellDevice.shared_area_offset() + ACK
        regs = {"shadow": page[0:4].cast("I"), "ack": page[ack_off:ack_off + 4].cast("I")}
        rung, stuck = [], []

        def driver():   # the doorbell's driver, on the host: ring, wait for the ack, next
            shadow, ack = regs["shadow"], regs["ack"]
            for v in range(1, 2001):
                shadow[0] = v
                deadline = time.monotonic() + 10
                while ack[0] != v:
                    time.sleep(0)     # let the sidecore thread have the GIL
                    if time.monotonic() > deadline:
                        stuck.append(v)
                        return
                rung.append(v)

        t = threading.Thread(target=driver)
        m.boot_pvh(guestkit_path(), "blk rw=fill bs=4096 qd=16 seed=21")
        t.start()
        exit = m.run(timeout=240)
        t.join(30)
        assert not t.is_alive()
        regs.clear()
        del page
        m.close()
        group.stop()                                  # a second stop is harmless
    assert exit.kind == "debug-exit" and exit.status == 0, out.decode()[-1000:]
    assert not stuck and len(rung) == 2000
    assert group.device_stats() == [{"handled": 2000, "errors": 0, "expected": 2001}]
    assert image.read_bytes() == pattern(21, DISK_BYTES)


@pytest.mark.kvm
@pytest.mark.parametrize("mode", ["poll", "adaptive"])
def test_two_vms_on_one_sidecore(tmp_path, mode):
    """Two guest-kit VMs in one process, their virtio-blk queues on one sidecore thread (one loop,
    per-queue budget, per-queue idle windows in adaptive mode): both fill their disks at QD8 at the
    same time and every byte lands on each host file."""
    from exitless.vcpu import install_kick_handler
    from tests.test_virtio_blk_e2e import pattern

    install_kick_handler()      # from the main thread: the second VM runs on another thread
    seeds = (31, 32)
    images = [tmp_path / f"d{k}.img" for k in range(2)]
    for img in images:
        img.write_bytes(bytes(DISK_BYTES))
    outs = [bytearray(), bytearray()]
    machines = [Machine(VmConfig(mem_mib=128, console=outs[k].extend)) for k in range(2)]
    group = SidecoreGroup(mode, name="sidecore-2vms")
    exits = [None, None]
    try:
        for m, img in zip(machines, images):
            VirtioPci(m, VirtioBlk(img), mode, sidecore=group)
        assert len(group.pollables) == 2
        group.start()
        for m, seed in zip(machines, seeds):
            m.boot_pvh(guestkit_path(), f"blk rw=fill bs=4096 qd=8 seed={seed}")

        def second():
            exits[1] = machines[1].run(timeout=240)

        t = threading.Thread(target=second)
        t.start()
        exits[0] = machines[0].run(timeout=240)
        t.join(250)
        assert not t.is_alive()
        assert group.loop is not None and group.worker.error is None
    finally:
        group.stop()            # before either VM's memory goes away
        for m in machines:
            m.close()
    for k in range(2):
        assert exits[k].kind == "debug-exit" and exits[k].status == 0, outs[k].decode()[-1000:]
        assert images[k].read_bytes() == pattern(seeds[k], DISK_BYTES)
