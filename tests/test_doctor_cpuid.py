"""doctor on kvm_pvm: ring 0 gets KVM_SET_CPUID's bits, ring 3 the host's (CPUID is not intercepted there)."""
import json
import subprocess
import sys

import pytest

from exitless.doctor import LEAF1_ECX, Report, diagnose, format_report, host_cpu_features


def test_host_cpu_features_uses_cpuinfo_names():
    info = "processor : 0\nflags\t\t: fpu tsc pni sse4_1 tsc_deadline_timer avx\n"
    assert host_cpu_features(info) == {"fpu", "tsc", "sse3", "sse4.1", "tsc-deadline", "avx"}


def test_format_says_which_ring_sees_what():
    vmx = format_report(Report(True, flavour="vmx", caps={"KVM_CAP_X": 1}, cpu_features=["sse3"],
                               missing_features=["avx"]))
    assert "guest CPUID lacks:  avx" in vmx and "ring 3" not in vmx
    pvm = format_report(Report(True, flavour="pvm", caps={"KVM_CAP_X": 1}, cpu_features=["fpu"],
                               missing_features=["avx"], ring3_features=["fpu", "avx"], ring3_missing=[]))
    assert "ring 0 (what KVM_SET_CPUID gives)" in pvm and "guest CPUID in ring 0 lacks:  avx" in pvm
    assert "ring 3 (not intercepted on kvm_pvm: the host's bits) offers: fpu avx" in pvm


@pytest.mark.kvm
def test_doctor_ring3_matches_what_the_guest_kit_sees():
    rep = diagnose()
    if rep.flavour != "pvm":
        assert rep.ring3_features is None
        return
    from exitless.guestkit import guestkit_path

    out = subprocess.run([sys.executable, "-m", "exitless.cli", "run", "--kernel", str(guestkit_path()),
                          "--mem", "64M", "--append", "info", "--timeout", "60"],
                         capture_output=True, text=True, timeout=120)
    res = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("{")))
    ecx = int(res["cpuid1_ecx"], 16)          # read by the guest kit in ring 3
    seen = {name for bit, name in LEAF1_ECX.items() if ecx >> bit & 1 and name != "hypervisor"}
    assert seen <= set(rep.ring3_features)
    assert {"sse3", "avx"} & set(rep.missing_features) <= seen  # ring 0 lacks them, ring 3 has them
