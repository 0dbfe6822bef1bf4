"""NVMe I/O queue pairs of real KVM guests served by ``exitless sidecore`` (issue 12 items 1-2 for NVMe).

Three guest-kit VMs -- separate ``python3 -m exitless run … --nvme IMG,io=… --sidecore PATH`` processes,
on the ``shared``, ``poll`` and ``adaptive`` paths -- on one confined service: one is SIGKILLed mid-I/O,
the other two fill their namespaces while deleting and re-creating their queue pairs and resetting
their controller mid-run (``cycle=N``: each time the pairs come back from the service and go to it
again), and their data is checked byte for byte on the host and read back by the guest through the
service; once every VM has gone the service is back to the fds and threads it had when it started.
"""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from exitless import confine
from exitless.guestkit import guestkit_path

try:
    from test_nvme_e2e import pattern
    from test_sidecore_service_vms import Vm, confined_service, counts, images, wait_for
except ImportError:  # run from the repository root as a package
    from tests.test_nvme_e2e import pattern
    from tests.test_sidecore_service_vms import Vm, confined_service, counts, images, wait_for

pytestmark = pytest.mark.kvm
DISK_BYTES = 4 << 20


def nvme_vm(image, io, app, sock) -> Vm:
    return Vm(image, io, app, sock, device="--nvme", options=",queues=2")


@pytest.mark.skipif(not confine.status()[0], reason=confine.status()[1])
@pytest.mark.parametrize("mode", ["poll", "adaptive"])
def test_three_nvme_vms_on_one_service_cycles_and_one_killed(tmp_path, mode):
    a_img, b_img, v_img = images(tmp_path, ("a", "b", "victim"), DISK_BYTES)
    with confined_service(tmp_path, mode) as (svc, sock, vms):
        base = counts(svc.proc.pid)
        victim = nvme_vm(v_img, "shared", "nvme rw=randwrite bs=4096 qd=16 queues=2 ms=60000 seed=3", sock)
        vms.append(victim)
        victim.wait_probed()
        # a: two pairs, 64 KiB writes through PRP lists that start mid-page and chain; b: one pair, 4 KiB
        a = nvme_vm(a_img, "poll", "nvme rw=fill bs=65536 qd=8 queues=2 prp_off=4000 cycle=16 seed=11", sock)
        b = nvme_vm(b_img, "adaptive", "nvme rw=fill bs=4096 qd=4 queues=1 cycle=200 seed=22", sock)
        vms += [a, b]
        a.wait_probed()
        b.wait_probed()
        assert counts(svc.proc.pid)[0] > base[0]          # each VM's memfd, eventfds and disk fd are in the service
        victim.kill()                                      # SIGKILL, mid-I/O: no goodbye on the socket
        assert victim.proc.returncode == -signal.SIGKILL
        wait_for(lambda: "vm#1 detached" in svc.text(), 30, svc.text)
        for vm, img, seed, bs in ((a, a_img, 11, 65536), (b, b_img, 22, 4096)):
            res = vm.result()
            assert res["errors"] == 0 and res["ops"] == DISK_BYTES // bs and res["flushes"] == 1, res
            assert res["cycles"] >= 3 and res["resets"] >= 1 and res["dbbuf"] == 1, res
            assert img.read_bytes() == pattern(seed, DISK_BYTES)          # byte for byte on the host
        text = svc.text()
        assert text.count("vm#2 serves NVMe SQ 1 ") >= 4 and text.count("vm#3 serves NVMe SQ 1 ") >= 4, text
        checks = [nvme_vm(img, io, f"nvme rw=verify bs=16384 qd=4 queues=2 seed={seed}", sock)
                  for img, io, seed in ((a_img, "adaptive", 11), (b_img, "shared", 22))]
        vms += checks
        for vm in checks:
            res = vm.result()
            assert res["errors"] == 0 and res["verify_errors"] == 0, res
        wait_for(lambda: svc.text().count(" detached ") == 5, 30, svc.text)
        assert svc.proc.poll() is None                     # every VM gone, the service still serves
        wait_for(lambda: counts(svc.proc.pid) == base, 30,
                 lambda: f"service fds/threads {counts(svc.proc.pid)} != {base} at start\n{svc.text()}")


def test_run_nvme_sidecore_usage_errors(tmp_path):
    """``run --nvme …,io=ioeventfd --sidecore``: nothing polled to hand over (exit 2, one line); a polled
    controller with no service there: exit 2, before the guest boots."""
    img = tmp_path / "n.img"
    img.write_bytes(bytes(1 << 20))
    run = [sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()), "--sidecore",
           str(tmp_path / "none.sock"), "--append", "nvme rw=ident"]
    for io in ("trap", "ioeventfd"):
        r = subprocess.run(run + ["--nvme", f"{img},io={io}"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "no --disk, --nvme or --net on a polled path" in r.stderr, r.stderr
    r = subprocess.run(run + ["--nvme", f"{img},io=poll"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot reach the sidecore service" in r.stderr and "Traceback" not in r.stderr
