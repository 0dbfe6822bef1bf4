"""The adaptive sidecore never loses a wake-up, whatever the interleaving (no KVM needed).

A Python "driver" thread plays the guest: it writes the shadow value, fences,
reads EventIdx and rings the eventfd when ``vring_need_event`` says so, exactly
as the guest kit does.  Random pauses make the sidecore arm and sleep between
writes at every possible moment; every value must be handled once, in order.
"""
import os
import random
import struct
import threading
import time

import pytest

from exitless.devices.base import Register, RegisterDevice
from exitless.memory import GuestMemory
from exitless.sidecore.loop import SidecoreLoop, SidecoreThread
from exitless.sidecore.shared_register import SharedRegister
from exitless.sidecore.spin import address_of, store_fence_load, wait_for_change


class Recorder(RegisterDevice):
    REGISTERS = (Register("bell", 0, doorbell=True),)

    def __init__(self):
        super().__init__()
        self.values = []
        self.done = threading.Event()

    def on_doorbell(self, reg, value):
        self.values.append(value)
        struct.pack_into("<I", self.shared, 0, value)  # ack


def need_event(event_idx, new, old):
    return ((new - event_idx - 1) & 0xFFFFFFFF) < ((new - old) & 0xFFFFFFFF)


@pytest.mark.parametrize("mode", ["adaptive", "poll", "notify"])
def test_every_write_delivered_once_in_order(mode):
    n = 3000
    rng = random.Random(1234)
    with GuestMemory.create([(0, 1 << 20)]) as mem:
        page = mem.view(0, 4096)
        dev = Recorder()
        dev.attach_shared(page)
        wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        reg = dev.doorbells()[0]
        loop = SidecoreLoop([SharedRegister(dev, reg, page, wake)], mode, poll_ns=2000)
        worker = SidecoreThread(loop).start()
        shadow = address_of(page[dev.shadow_offset(reg):])
        event_off = dev.event_idx_offset(reg)
        ack_off = dev.shared_area_offset()
        ack_addr = address_of(page[ack_off:])
        rings = 0
        try:
            for v in range(1, n + 1):
                event_idx = store_fence_load(shadow, v, address_of(page[event_off:]))
                if mode == "notify" or need_event(event_idx, v, v - 1):
                    os.eventfd_write(wake, 1)
                    rings += 1
                # wait for the ack without holding the GIL (the sidecore thread needs it)
                changed = wait_for_change([(ack_addr, v - 1)], 5_000_000_000)
                assert changed == 0 and struct.unpack_from("<I", page, ack_off)[0] == v, \
                    f"value {v} lost (mode {mode}, rings {rings})"
                if rng.random() < 0.05:
                    time.sleep(rng.choice([0, 0.0001, 0.001]))  # let the sidecore arm and sleep
        finally:
            worker.stop()
            os.close(wake)
        assert dev.values == list(range(1, n + 1))
        if mode == "adaptive":
            assert loop.sleeps > 0 and rings > 0  # it really slept and was woken by the driver
        if mode == "poll":
            assert rings == 0


@pytest.mark.parametrize("yield_after_ns", [0, 1, 20_000])
def test_yielding_spin_sees_a_change_and_times_out(yield_after_ns):
    """The GIL-free spin that yields the CPU between checks (after ``yield_after_ns`` idle) still returns
    the index of a word another thread changed, and -1 after its timeout when nothing changed."""
    with GuestMemory.create([(0, 1 << 20)]) as mem:
        page = mem.view(0, 4096)
        addrs = [address_of(page[off:]) for off in (0, 64)]
        assert wait_for_change([(addrs[0], 0), (addrs[1], 0)], 2_000_000, yield_after_ns) == -1
        for _ in range(20):
            t = threading.Timer(0.002, lambda: struct.pack_into("<I", page, 64, struct.unpack_from("<I", page, 64)[0] + 1))
            t.start()
            v = struct.unpack_from("<I", page, 64)[0]
            assert wait_for_change([(addrs[0], 0), (addrs[1], v)], 5_000_000_000, yield_after_ns) == 1
            t.join()
        assert wait_for_change([(addrs[0], 1)], 5_000_000_000, yield_after_ns) == 0   # already changed


def test_spin_yield_setting(monkeypatch):
    from exitless.errors import ExitlessError
    from exitless.sidecore.loop import SPIN_YIELD_ENV, SPIN_YIELD_NS, spin_yield_ns

    monkeypatch.delenv(SPIN_YIELD_ENV, raising=False)
    assert spin_yield_ns() == SPIN_YIELD_NS
    monkeypatch.setenv(SPIN_YIELD_ENV, "0")
    assert spin_yield_ns() == 0
    for bad in ("-5", "soon", ""):
        monkeypatch.setenv(SPIN_YIELD_ENV, bad)
        with pytest.raises(ExitlessError, match=SPIN_YIELD_ENV):
            spin_yield_ns()
