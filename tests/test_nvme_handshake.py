"""The NVMe sidecore never loses a shadow doorbell, whatever the interleaving (no KVM needed).

A Python "driver" thread submits reads the way Linux does with shadow doorbells
(store the slot, fence, read EventIdx, ring the eventfd only when the window
``[old, new)`` contains it); the sidecore runs the controller's queue pair as a
pollable in every mode.  Random pauses let the adaptive sidecore arm and sleep
between submissions at every possible moment; every command must complete, in
order, and the CQ (smaller than the burst) must fill and drain without a hang.
"""
import os
import random
import time
from types import SimpleNamespace

import pytest

from exitless.devices.nvme import constants as K
from exitless.devices.nvme.controller import NvmeController
from exitless.devices.nvme.namespace import Namespace
from exitless.devices.nvme.pci import QueuePairPollable
from exitless.memory import GuestMemory
from exitless.sidecore.loop import SidecoreLoop, SidecoreThread
from exitless.sidecore.spin import address_of, store_fence_load
from nvme_driver import DATA, EVENT_IDX, MEM_SIZE, SHADOW, Driver, need_event


@pytest.mark.parametrize("mode", ["adaptive", "poll", "notify"])
def test_every_submission_completes_once_in_order(tmp_path, mode):
    image = tmp_path / "ns.img"
    image.write_bytes(bytes(1 << 20))
    rng = random.Random(99)
    n = 1500
    with GuestMemory.create([(0, MEM_SIZE)]) as mem:
        ns = Namespace(image)
        wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        ctrl = NvmeController(mem, ns, max_io_queues=1, num_vectors=2)
        ctrl.park_event_idx = mode != "notify"
        drv = Driver(mem, ctrl)
        drv.enable()
        assert drv.create_pair(1, size=8) == 0 and drv.enable_dbbuf() == 0
        loop = SidecoreLoop([QueuePairPollable(ctrl, 1, wake, SimpleNamespace(ioeventfd_doorbells=0))], mode,
                            poll_ns=2000)
        worker = SidecoreThread(loop).start()
        rings = 0

        def ring(slot, new, old):
            nonlocal rings
            ev = store_fence_load(address_of(mem.view(SHADOW + 4 * slot, 4)), new,
                                  address_of(mem.view(EVENT_IDX + 4 * slot, 4)))
            if mode == "notify" or need_event(ev, new, old):
                os.eventfd_write(wake, 1)
                rings += 1

        try:
            sent = got = 0
            expect = []
            deadline = time.monotonic() + 60
            while got < n:
                burst = min(rng.choice([1, 1, 2, 5, 7]), n - sent, 7 - (sent - got))
                for _ in range(burst):
                    raw, cid = drv.build(K.NVM_READ, nsid=1, prp1=DATA, cdw10=sent % 64)
                    drv.post(1, raw)
                    expect.append(cid)
                    sent += 1
                if burst:
                    old = mem.read_u32(SHADOW + 8)
                    ring(2, drv.sq[1][2], old)
                done = drv.reap(1, ring=False)
                if done:
                    assert [e[0] for e in done] == expect[:len(done)] and all(e[1] == 0 for e in done)
                    del expect[:len(done)]
                    got += len(done)
                    ring(3, drv.cq[1][2], mem.read_u32(SHADOW + 12))
                else:
                    time.sleep(0)
                assert time.monotonic() < deadline, f"lost wake-up: {got}/{sent} done (mode {mode})"
                if rng.random() < 0.03:
                    time.sleep(rng.choice([0.0001, 0.001, 0.003]))   # let the sidecore arm and sleep
        finally:
            worker.stop()
            os.close(wake)
            ns.close()
        assert worker.error is None
        if mode == "adaptive":
            assert loop.sleeps > 0 and rings > 0
        if mode == "poll":
            assert rings == 0
