"""Every I/O path delivers every doorbell write exactly once and in order, on a real KVM guest."""
import gc
import json
import os
import threading

import pytest

from exitless.devices.doorbell import DoorbellDevice
from exitless.guestkit import guestkit_path
from exitless.sidecore.paths import attach
from exitless.vm import Machine, VmConfig
from tests.asmguest import build_guest

pytestmark = pytest.mark.kvm
MMIO, SHM = 0xD000_0000, 0xD000_1000


def run_doorbell(path, placement="thread", n=20000, warmup=100, poll_ns=64_000):
    out = bytearray()
    with Machine(VmConfig(mem_mib=64, console=out.extend)) as m:
        dev = DoorbellDevice()
        att = attach(m, dev, mmio_gpa=MMIO, shared_gpa=SHM, path=path, placement=placement, poll_ns=poll_ns)
        m.boot_pvh(guestkit_path(), f"doorbell path={path} n={n} warmup={warmup}")
        exit = m.run(timeout=300)
        m.close()
        stats = att.sidecore.device_stats()[0] if att.sidecore else dev.stats()
    line = [x for x in out.decode().splitlines() if x.startswith('{"app":')]
    assert line, out.decode()[-2000:]
    return exit, json.loads(line[-1]), stats


@pytest.mark.parametrize("path,placement", [
    ("trap", "thread"), ("ioeventfd", "thread"), ("shared", "thread"), ("adaptive", "thread"),
    ("ioeventfd", "process"), ("shared", "process"), ("adaptive", "process"),
])
def test_exactly_once_in_order(path, placement):
    exit, res, dev = run_doorbell(path, placement)
    assert exit.kind == "debug-exit" and exit.status == 0, exit
    assert res["errors"] == 0 and res["timeouts"] == 0 and res["ops"] == 20000
    # the device checks the sequence itself: every value 1..n+warmup once, in order
    assert dev == {"handled": 20100, "errors": 0, "expected": 20101}
    if path == "shared":
        assert res["doorbells"] == 0          # no MMIO doorbell write at all


def test_adaptive_sleeps_and_is_woken_without_losing_writes():
    """A 1 µs idle window: the sidecore arms and sleeps between most writes, and the driver
    rings the ioeventfd whenever EventIdx asks; a lost wake-up would time out."""
    exit, res, dev = run_doorbell("adaptive", n=5000, poll_ns=1000)
    assert exit.status == 0 and res["timeouts"] == 0 and res["errors"] == 0
    assert res["doorbells"] > 0
    assert dev["handled"] == 5100 and dev["errors"] == 0


def test_garbage_gets_an_error_status_and_the_vm_goes_on(tmp_path):
    """Out-of-order, repeated and absurd values: the device answers each with an error status."""
    body = """
    xor %edi, %edi                  /* sum of statuses */
    mov $values, %esi
    mov $5, %ecx
1:  mov (%esi), %eax
    mov %eax, 0xd0000000            /* trapped doorbell write */
    add 0xd0001084, %edi            /* status in the shared page */
    add $4, %esi
    dec %ecx
    jnz 1b
    mov %edi, %eax
    jmp exit_with_eax
    """
    data = "values: .long 1, 2, 2, 0xffffffff, 7"
    elf = build_guest(tmp_path, "garbage", body, data)
    with Machine(VmConfig(mem_mib=64)) as m:
        dev = DoorbellDevice()
        attach(m, dev, mmio_gpa=MMIO, shared_gpa=SHM, path="trap")
        m.boot_pvh(elf)
        exit = m.run(timeout=30)
    assert exit.kind == "debug-exit"
    assert exit.status == 3          # 2 (repeat), 0xffffffff, 7 (skipped): three error statuses
    assert dev.stats()["errors"] == 3 and dev.stats()["handled"] == 5


def _fds():
    # a device may still hold a view of guest RAM until it is garbage: its mapping (and the fd
    # Python's mmap keeps) goes with it, so count after a collection
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_create_and_destroy_100_vms_leaks_nothing(tmp_path):
    elf = build_guest(tmp_path, "quick", "xor %eax, %eax\n jmp exit_with_eax")
    def cycle(i):
        with Machine(VmConfig(mem_mib=32)) as m:
            path = ("trap", "ioeventfd", "shared", "adaptive")[i % 4]
            attach(m, DoorbellDevice(), mmio_gpa=MMIO, shared_gpa=SHM, path=path)
            if i % 10 == 0:
                m.boot_pvh(elf)
                assert m.run(timeout=30).status == 0

    cycle(0)  # one-time process setup (the kick signal handler, imports) is not a leak
    fds0, threads0 = _fds(), threading.active_count()
    for i in range(100):
        cycle(i)
    assert _fds() == fds0
    assert threading.active_count() == threads0
