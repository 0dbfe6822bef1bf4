"""A new user's mistakes get an error that says what to do (found trying the commands from README.md).

``run --sidecore PATH`` with no service there said only "Connection refused" -- also for a regular
file at PATH -- without saying that a service must be started first, or that PATH is not a socket.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.kvm
def test_run_sidecore_without_a_service_says_how_to_start_one(tmp_path) -> None:
    from exitless.guestkit import guestkit_path

    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    for target, says in ((tmp_path / "none.sock", "exitless sidecore --socket"),
                         (img, "is not a socket")):
        r = subprocess.run([sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()),
                            "--disk", f"{img},io=poll,ro", "--sidecore", str(target), "--append", "info"],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "cannot reach the sidecore service" in r.stderr and says in r.stderr, r.stderr


def test_a_command_for_the_guest_kit_is_refused_as_such(tmp_path) -> None:
    """``run --kernel guestkit.elf -- CMD`` said "... is not a usable bzImage: this is an ELF file (a
    vmlinux?)", after looking for a Linux guest to fetch: the guest kit runs no command."""
    from exitless.guestkit import guestkit_path

    r = subprocess.run([sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()), "--cache",
                        str(tmp_path / "cache"), "--", "true"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "-- CMD needs a Linux --kernel" in r.stderr and "--append" in r.stderr, r.stderr
    assert not (tmp_path / "cache").exists()            # nothing fetched for it
