"""ext4 images made and checked on the host (e2fsprogs), for tests whose Linux guest writes a file system.

One place for what several end-to-end tests do around a guest: make an image holding some files
(``mke2fs -d``), and afterwards check that the host's ``e2fsck -fn`` finds it clean and that
``debugfs`` reads back exactly what the guest wrote.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

TOOLS = ("mke2fs", "e2fsck", "debugfs")


def require_e2fsprogs() -> None:
    """Fail (not skip: the check is part of the test) when e2fsprogs is missing."""
    if not all(shutil.which(t) for t in TOOLS):
        pytest.fail("e2fsprogs (mke2fs, debugfs, e2fsck) is needed: scripts/setup.sh installs it")


def make_ext4(image: Path, files: dict[str, str], size: str = "32M") -> Path:
    """An ext4 file system of ``size`` in ``image`` holding ``files`` (name in the root -> text)."""
    src = image.with_name(image.name + ".src")
    src.mkdir()
    for name, text in files.items():
        (src / name).write_text(text)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(src), "-F", str(image), size], check=True)
    return image


def read_file(image: Path, path: str) -> bytes:
    """The bytes of ``path`` in the file system on ``image``, read by the host's ``debugfs``."""
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True).stdout


def assert_clean_with(image: Path, files: dict[str, bytes | str]) -> None:
    """The host's ``e2fsck -fn`` finds ``image`` clean and each of ``files`` (path -> content) is there."""
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for path, want in files.items():
        got = read_file(image, path)
        assert got == (want.encode() if isinstance(want, str) else want), (image, path, got[:200])
