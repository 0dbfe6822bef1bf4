"""OS-level thread names (``exitless.threadname``): what ``top -H`` and the benchmarks see."""
from __future__ import annotations

import threading

import pytest

from exitless import threadname


def _comm_of_thread(name: str) -> str:
    seen = []

    def body():
        threadname.set_current(name)
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            seen.append(f.read().rstrip("\n"))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return seen[0]


def test_the_kernel_sees_the_name_of_the_calling_thread_only():
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
        mine = f.read()
    assert _comm_of_thread("vcpu3") == "vcpu3"
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
        assert f.read() == mine                       # the caller's thread, not the process's main one


def test_a_long_name_keeps_its_first_15_bytes():
    assert _comm_of_thread("sidecore-service-dataplane") == "sidecore-servic"


@pytest.mark.parametrize("comm, vcpu", [("vcpu0", True), ("vcpu12", True), ("CPU 0/KVM", True), ("CPU 3/KVM", True),
                                        ("vcpu", False), ("sidecore-servic", False), ("qemu-system-x86", False),
                                        ("IO iothread0", False), ("python3", False), ("xvcpu0", False)])
def test_vcpu_threads_of_exitless_and_qemu_are_recognised(comm, vcpu):
    assert threadname.is_vcpu(comm) is vcpu
