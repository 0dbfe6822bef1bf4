"""bench's QEMU placement: :func:`exitless.bench.qemu.pin_threads` puts a process's vCPU threads (by their
kernel names, as QEMU names them) on one CPU and every other thread on another -- the placement bench net
gives exitless's vCPU and sidecore."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from exitless.bench.qemu import pin_threads

CHILD = r"""
import sys, threading
from exitless.threadname import set_current
ready, stop = threading.Barrier(3), threading.Event()
def body(name):
    set_current(name)
    ready.wait()
    stop.wait()
for name in ("CPU 0/KVM", "IO mon_iothread"):
    threading.Thread(target=body, args=(name,), daemon=True).start()
ready.wait()
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_pin_threads_puts_vcpus_on_one_cpu_and_the_rest_on_another():
    vcpu_cpu, other_cpu = sorted(os.sched_getaffinity(0))[:2]
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        pin_threads(proc.pid, vcpu_cpu, other_cpu)
        placed = {}
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{tid}/comm") as f:
                placed[f.read().strip()] = os.sched_getaffinity(int(tid))
        assert placed.pop("CPU 0/KVM") == {vcpu_cpu}
        assert placed.pop("IO mon_iothread") == {other_cpu}
        assert placed and all(cpus == {other_cpu} for cpus in placed.values())    # the main thread too
    finally:
        proc.stdin.close()
        proc.wait(10)


def test_pin_threads_of_a_process_that_is_gone_does_nothing():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    pin_threads(proc.pid, 0, 0)     # /proc/PID is gone: no error
