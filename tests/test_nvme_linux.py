"""Linux's own nvme driver (Debian's 6.1 cloud kernel: nvme and nvme-core built in) against the controller.

Under ``trap``, ``poll`` and ``adaptive``: the namespace appears as /dev/nvme0n1, Linux enables the
shadow doorbells (no "unable to set dbbuf" in its log, and the controller saw Doorbell Buffer
Config), a pattern written with ``dd`` matches on the host, and an ext2 made by the guest's
``mke2fs`` passes the host's ``e2fsck -fn``.

Linux must reach userspace: on a ``kvm_pvm`` host (software-nested KVM, guest ring 0 emulated)
an unmodified kernel stops in early boot, so there the test is skipped with that reason.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest

from exitless.boot import linux as LX
from exitless.doctor import kvm_flavour

pytestmark = pytest.mark.kvm
IMAGE_BYTES = 64 << 20
PATTERN_AT = 32 << 20
PATTERN_BYTES = 4 << 20
FS_KIB = 16 << 10
LINE = b"exitless-nvme\n"


def linux_reaches_userspace() -> None:
    flavour = kvm_flavour()
    if flavour == "pvm":
        pytest.skip(f"KVM flavour 'pvm' (software-nested kvm_pvm): Linux cannot reach userspace here: "
                    f"{getattr(LX, 'PVM_LIMIT', 'guest ring-0 code is emulated')}")
    if shutil.which("e2fsck") is None:
        pytest.skip("e2fsck (e2fsprogs) is not installed on the host")


@pytest.mark.parametrize("path", ["trap", "poll", "adaptive"])
def test_linux_nvme_driver(tmp_path, path):
    linux_reaches_userspace()
    from exitless.boot.initramfs import EXIT_MARKER, parse_exit_status
    from exitless.boot.linux import BootConsole, boot_linux
    from exitless.guest.plan import plan_guest
    from exitless.nvme import NvmeSpec, add_nvme
    from exitless.vm import Machine, VmConfig

    image = tmp_path / "ns.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    script = (
        "ls /sys/class/nvme; cat /sys/block/nvme0n1/size; "
        f"yes exitless-nvme | head -c {PATTERN_BYTES} | "
        f"dd of=/dev/nvme0n1 bs=65536 seek={PATTERN_AT // 65536} conv=fsync 2>/dev/null && "
        f"mke2fs -q -F -b 1024 /dev/nvme0n1 {FS_KIB} && sync && "
        "dmesg | grep -i nvme; echo done")
    plan = plan_guest(None, ["sh", "-c", script], quiet=False)
    console = BootConsole(lambda data: None)
    with Machine(VmConfig(mem_mib=256, console=console)) as m:
        boot_linux(m, plan.kernel, plan.cmdline, plan.initrd, decompress=plan.decompress)
        dev = add_nvme(m, NvmeSpec(str(image), io=path, queues=2))
        exit = m.run(timeout=600)
        stats = dev.stats()
    text = console.text
    assert parse_exit_status(text, EXIT_MARKER) == 0, f"{exit}\n{console.tail(40)}"
    assert "nvme0" in text and str(IMAGE_BYTES // 512) in text
    assert "unable to set dbbuf" not in text and stats["dbbuf_configs"] >= 1, stats
    assert stats["fatal"] == 0 and stats["bad_doorbells"] == 0
    if path != "trap":
        assert stats["shadow_doorbells"] > 0
    data = image.read_bytes()
    assert data[PATTERN_AT:PATTERN_AT + PATTERN_BYTES] == (LINE * (PATTERN_BYTES // len(LINE) + 1))[:PATTERN_BYTES]
    fs = tmp_path / "fs.img"
    fs.write_bytes(data[:FS_KIB << 10])
    check = subprocess.run(["e2fsck", "-fn", str(fs)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
