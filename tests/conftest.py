"""KVM tests are marked ``kvm``: skipped (with the reason) where /dev/kvm is unusable,
and *failed* instead when EXITLESS_REQUIRE_KVM=1, so CI can never pass them vacuously."""
import os

import pytest


def kvm_unusable_reason() -> str:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm is not usable: {e.strerror}"
    os.close(fd)
    return ""


@pytest.fixture(autouse=True)
def _kvm_guard(request):
    if request.node.get_closest_marker("kvm") is None:
        return
    why = kvm_unusable_reason()
    if why:
        if os.environ.get("EXITLESS_REQUIRE_KVM") == "1":
            pytest.fail(f"EXITLESS_REQUIRE_KVM=1 but {why}")
        pytest.skip(why)
