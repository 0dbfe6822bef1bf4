"""Linux's own virtio_net (a module of Debian's 6.1 cloud kernel) under exitless's own VMM: one NIC per
I/O path in ONE boot (the ``linux_io`` fixture shared with test_nvme_linux.py, see tests/linux_io.py),
each on its own TAP in a network namespace the fixture creates (10.0.<10+i>.0/24).

For each path: Linux finds the NIC by its MAC, configures its address, pings the namespace's kernel
and moves data over TCP both ways with busybox ``nc``; a Python responder in the namespace checks the
MD5 of what came up, the guest the MD5 of what came down.  Nothing outside the namespace is touched.
"""
from __future__ import annotations

import re

import pytest

try:
    from linux_io import NET_PATHS, SERVICE_NIC, nic_subnet
except ImportError:  # pragma: no cover - tests/ as a package
    from tests.linux_io import NET_PATHS, SERVICE_NIC, nic_subnet

pytestmark = pytest.mark.kvm


def line(linux_io, tag: str, i: int) -> list[str]:
    found = [x[1:] for x in linux_io.lines(tag) if x and x[0] == str(i)]
    assert len(found) == 1, (tag, i, linux_io.console[-3000:])
    return found[0]


def assert_pinged_and_moved_data(linux_io, i: int, nic: str, context: str = "") -> None:
    """NIC ``i`` (``nic`` names it in messages) came up in Linux with its MAC, answered 3 pings, and moved
    the responder's data both ways with matching MD5s."""
    assert line(linux_io, "NET-IF", i), f"no interface has the NIC's MAC ({nic})"
    assert line(linux_io, "NET-PING", i)[:1] == ["3"], (nic, nic_subnet(i), context)
    up = line(linux_io, "NET-UP", i)
    responder = linux_io.responders[i]
    assert not responder.errors, responder.errors
    assert len(up) == 2 and up[0] == up[1] == responder.received_md5, (up, responder.received_md5)
    assert line(linux_io, "NET-DOWN", i) == [linux_io.down_md5[i]]


@pytest.mark.parametrize("path", NET_PATHS)
def test_linux_virtio_net_pings_and_moves_data_both_ways(linux_io, path):
    if linux_io.net_skip:
        pytest.skip(linux_io.net_skip)
    assert_pinged_and_moved_data(linux_io, linux_io.net[path]["index"], path)
    stats = linux_io.net[path]
    assert stats["tx_bad"] == 0 and stats["rx_packets"] > 100 and stats["tx_packets"] > 100, stats


def test_linux_virtio_net_through_the_sidecore_service(linux_io):
    """The NIC whose queue pair ``exitless sidecore`` served (``run --sidecore``; the VMM kept the control
    queue): Linux brought it up, pinged and moved data both ways through the service -- the VMM's own model
    moved no frame, the service's did -- and the VM's exit detached it cleanly.  (Session 5, kvm_pvm, the
    whole one-boot test: 13 min at load ~4; at load ~10 the boot alone took 37 min and the VM's 3000 s ran
    out before the last NICs.)"""
    if linux_io.net_skip:
        pytest.skip(linux_io.net_skip)
    assert_pinged_and_moved_data(linux_io, linux_io.net[SERVICE_NIC]["index"], SERVICE_NIC, linux_io.service_log)
    local = linux_io.net[SERVICE_NIC]
    assert local["tx_packets"] == local["rx_packets"] == 0, local       # every frame went through the service
    assert local["ctrl_ok"] >= 1 and local["ctrl_err"] == 0, local      # Linux's control commands, here
    log = linux_io.service_log
    assert "serves its NIC" in log and "confined (seccomp)" in log, log
    nic = re.search(r"(vm#[0-9]+) serves its NIC", log)       # the VM's NVMe controller has a connection too
    served = nic and re.search(nic.group(1) + r" detached \(.*\): closed the connection after [0-9.]+ s, "
                                               r"([0-9]+) frames sent, ([0-9]+) received", log)
    assert served and int(served.group(1)) > 200 and int(served.group(2)) > 200, log   # 1 MiB each way, pings
    assert "Traceback" not in log and "): refused" not in log, log     # (its stop line counts "0 refused")


def test_no_virtio_net_errors_in_dmesg(linux_io):
    if linux_io.net_skip:
        pytest.skip(linux_io.net_skip)
    net = [" ".join(x) for x in linux_io.lines("DMESG") if "virtio" in " ".join(x).lower()]
    bad = [x for x in net if "error" in x.lower() or "timeout" in x.lower() or "fail" in x.lower()]
    assert not bad, bad
