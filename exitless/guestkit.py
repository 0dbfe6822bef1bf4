"""Where the guest kit binary is: the client OS of benchmarks and end-to-end tests."""
from __future__ import annotations

from .errors import ExitlessError
import os
from pathlib import Path

_PACKAGED = Path(__file__).parent / "_guest" / "guestkit.elf"
_SOURCE_TREE = Path(__file__).parent.parent / "guestkit" / "build" / "guestkit.elf"


class GuestKitMissing(ExitlessError, FileNotFoundError):
    pass


def guestkit_path() -> Path:
    """$EXITLESS_GUESTKIT, else the source tree's fresh build, else the copy installed with the package."""
    env = os.environ.get("EXITLESS_GUESTKIT")
    if env:
        if not Path(env).is_file():
            raise GuestKitMissing(f"EXITLESS_GUESTKIT={env} does not exist")
        return Path(env)
    for p in (_SOURCE_TREE, _PACKAGED):
        if p.is_file():
            return p
    raise GuestKitMissing("the guest kit is not built: run `make -C guestkit` (or reinstall exitless with pip)")


def with_tsc_khz(append: str, tsc_khz: int | None) -> str:
    """The guest kit's command line ``append`` with ``tsc_khz=`` (kHz) added, so the guest does not calibrate.

    The guest kit calibrates its TSC against the PIT when not told the rate, and on a loaded
    (or software-nested) host that calibration is off by up to 3x, skewing every latency the
    guest reports.  The user's explicit ``tsc_khz=`` wins; an empty command line stays empty
    (the guest kit's usage message); ``tsc_khz`` None or 0 (unknown: TCG) leaves calibration on.
    """
    words = append.split()
    if not words or not tsc_khz or any(w.startswith("tsc_khz=") for w in words[1:]):
        return append
    return f"{append.rstrip()} tsc_khz={tsc_khz}"


_host_tsc_khz: int | None = None


def host_tsc_khz() -> int | None:
    """The guest TSC rate KVM gives a vCPU by default (``KVM_GET_TSC_KHZ``, kHz): the host's TSC rate.

    The one place the rate is computed, for exitless and for QEMU under KVM (whose guest TSC runs
    at this rate unless ``-cpu ...,tsc-frequency=`` says otherwise).  None when /dev/kvm is unusable.
    Cached: a throwaway VM with one vCPU is created once per process.
    """
    global _host_tsc_khz
    if _host_tsc_khz is None:
        from .kvm.api import Kvm

        try:
            kvm = Kvm()
        except OSError:
            return None
        try:
            vm = kvm.create_vm()
            try:
                vcpu = vm.create_vcpu(0)
                try:
                    _host_tsc_khz = vcpu.tsc_khz()
                finally:
                    vcpu.close()
            finally:
                vm.close()
        except OSError:
            return None
        finally:
            kvm.close()
    return _host_tsc_khz


def guestkit_cmdline(append: str) -> str:
    """``append`` for a guest kit booted on KVM (exitless, or QEMU with ``-accel kvm``): the true TSC rate added."""
    return with_tsc_khz(append, host_tsc_khz())
