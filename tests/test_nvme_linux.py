"""Linux's own nvme driver (built into Debian's 6.1 cloud kernel) against exitless's NVMe controller,
under exitless's own VMM, one controller per I/O path in ONE boot (the ``linux_io`` fixture, see
tests/linux_io.py; 1 vCPU, which is what Linux runs with on a kvm_pvm host).

For each path: Linux probed the controller and sent Doorbell Buffer Config (0x7C), so it uses shadow
doorbells (no "unable to set dbbuf"); during its I/O (mkfs.ext4, a mount, a file written, caches
dropped, the file read back) the controller's own counters give the MMIO doorbell writes per I/O
command (trapped + caught by an ioeventfd), which drop to ~0 on the polled paths; the MD5 read back
is the one written, the host's ``e2fsck -fn`` finds the filesystem clean after poweroff and the
host's ``debugfs`` reads the same file; Linux's log has no nvme error or timeout.  The ``sidecore``
controller's I/O queue pairs were served by an ``exitless sidecore`` process (handed over after 0x7C,
taken back at Linux's Delete I/O SQ or at VM exit, its counters with them).
"""
from __future__ import annotations

import hashlib
import re
import subprocess

import pytest

try:
    from hostfs import assert_clean_with, read_file
    from linux_io import NVME_IMAGE_BYTES, NVME_PATHS
except ImportError:  # pragma: no cover - tests/ as a package
    from tests.hostfs import assert_clean_with, read_file
    from tests.linux_io import NVME_IMAGE_BYTES, NVME_PATHS

pytestmark = pytest.mark.kvm
POLLED = ("shared", "poll")
#: MMIO doorbell writes per I/O command Linux may still pay on a polled path (the first commands after
#: 0x7C may ring before the sidecore first parks EventIdx)
POLLED_MAX = 0.05


def controller(linux_io, path: str) -> str:
    """Linux's name (nvme0...) of the controller on ``path``, by its PCI address."""
    address = f"0000:00:{linux_io.nvme[path]['slot']:02x}.0"
    names = [name for name, pci, *_ in linux_io.lines("NVME-DEV") if pci == address]
    assert len(names) == 1, (address, linux_io.lines("NVME-DEV"), linux_io.console[-3000:])
    return names[0]


def io_delta(linux_io, path: str) -> tuple[int, int]:
    """(I/O commands, MMIO doorbell writes to I/O queues) during Linux's I/O phase on ``path``."""
    begin, end = linux_io.snaps["nvme-begin"][f"nvme-{path}"], linux_io.snaps["nvme-end"][f"nvme-{path}"]
    doorbells = sum(end[k] - begin[k] for k in ("io_mmio_doorbells", "ioeventfd_doorbells"))
    return end["io_commands"] - begin["io_commands"], doorbells


def test_linux_ran_every_check(linux_io):
    from exitless.boot.initramfs import parse_exit_status

    assert linux_io.ready_at is not None, f"{linux_io.exit}\n{linux_io.console[-4000:]}"
    assert parse_exit_status(linux_io.console) == 0, f"{linux_io.exit}\n{linux_io.console[-4000:]}"
    assert linux_io.exit.kind == "shutdown", linux_io.exit      # ACPI S5: Linux powered off
    assert {"nvme-begin", "nvme-end", "end"} <= set(linux_io.snaps), linux_io.snaps.keys()
    print(f"\nLinux I/O boot: userspace at {linux_io.ready_at:.0f} s, every check done and powered off "
          f"in {linux_io.seconds:.0f} s")


def test_every_controller_probed(linux_io):
    devs = linux_io.lines("NVME-DEV")
    assert len(devs) == len(NVME_PATHS), linux_io.console[-3000:]
    for path in NVME_PATHS:
        name = controller(linux_io, path)
        assert [d[2] for d in devs if d[0] == name] == [str(NVME_IMAGE_BYTES // 512)]


@pytest.mark.parametrize("path", NVME_PATHS)
def test_doorbell_buffer_config_and_shadow_doorbells(linux_io, path):
    stats = linux_io.nvme[path]
    assert "unable to set dbbuf" not in linux_io.console
    assert stats["dbbuf_configs"] >= 1, stats
    assert stats["fatal"] == 0 and stats["bad_doorbells"] == 0, stats
    assert stats["shadow_doorbells"] > 0, stats
    if path == "sidecore":
        # its pairs were served by the service (the counters fetched from it: GET_COUNTERS, DETACH_QP)
        log = linux_io.service_log
        assert stats["handovers"] >= 1, stats
        assert "serves NVMe SQ 1" in log and " detached " in log and "Traceback" not in log, log
    commands, doorbells = io_delta(linux_io, path)
    assert commands > 100, (commands, stats)                 # mkfs, mount, writes, reads
    per_io = doorbells / commands
    print(f"\nnvme {path}: {commands} I/O commands, {doorbells} MMIO doorbell writes to I/O queues, "
          f"{per_io:.3f} per I/O")
    if path in POLLED:
        assert per_io <= POLLED_MAX, (commands, doorbells)
    elif path in ("trap", "ioeventfd"):
        assert per_io >= 0.5, (commands, doorbells)          # EventIdx follows the driver: it rings


@pytest.mark.parametrize("path", NVME_PATHS)
def test_ext4_written_read_back_and_clean_on_the_host(linux_io, path, tmp_path):
    name = controller(linux_io, path)
    fs = [line for line in linux_io.lines("NVME-FS") if line[0] == name]
    assert len(fs) == 1 and re.fullmatch(r"[0-9a-f]{32}", fs[0][1]), (fs, linux_io.console[-3000:])
    written, read = fs[0][1:3]
    assert written == read
    assert not [e for e in linux_io.lines("NVME-ERR") if e[0] == name]
    image = linux_io.nvme[path]["image"]
    assert_clean_with(image, {})
    assert "ext4" in subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True).stdout \
        or "has_journal" in subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True).stdout
    assert hashlib.md5(read_file(image, "/data")).hexdigest() == written


def test_no_nvme_errors_in_dmesg(linux_io):
    nvme = [" ".join(x) for x in linux_io.lines("DMESG") if "nvme" in " ".join(x).lower()]
    assert nvme, linux_io.console[-3000:]        # the driver's probe lines are there
    bad = [x for x in nvme if re.search(r"timeout|error|abort|reset|fail|unable|I/O", x, re.I)]
    assert not bad, bad
