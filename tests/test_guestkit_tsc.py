"""The guest kit is told the true TSC rate (KVM_GET_TSC_KHZ) instead of calibrating against the PIT."""
import json
import subprocess
import sys

import pytest

from exitless.guestkit import guestkit_path, host_tsc_khz, with_tsc_khz


def test_with_tsc_khz_adds_the_rate():
    assert with_tsc_khz("info", 2600000) == "info tsc_khz=2600000"
    assert with_tsc_khz("blk rw=fill ", 5) == "blk rw=fill tsc_khz=5"


def test_with_tsc_khz_user_value_wins_and_unknown_rate_leaves_calibration():
    assert with_tsc_khz("info tsc_khz=1000", 2600000) == "info tsc_khz=1000"
    assert with_tsc_khz("info", None) == "info"
    assert with_tsc_khz("", 2600000) == ""          # the guest kit's own usage error stays


@pytest.mark.kvm
def test_run_passes_kvm_tsc_rate_to_guest_kit():
    khz = host_tsc_khz()
    assert khz and khz > 10000
    out = subprocess.run([sys.executable, "-m", "exitless.cli", "run", "--kernel", str(guestkit_path()),
                          "--mem", "64M", "--append", "info", "--timeout", "60"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("{")))
    assert res["tsc_source"] == "cmdline"
    assert res["tsc_khz"] == khz


@pytest.mark.qemu
@pytest.mark.kvm
def test_qemu_rows_under_kvm_get_the_host_rate():
    from exitless.bench import qemu
    from exitless.bench.common import guest_result

    r = qemu.run_guestkit(guestkit_path(), "info", accel="kvm", timeout=60)
    res = guest_result(r.console, "info")
    assert res["tsc_source"] == "cmdline" and res["tsc_khz"] == host_tsc_khz()
