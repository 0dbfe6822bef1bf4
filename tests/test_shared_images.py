"""One image given to two devices is refused unless every one is read-only (``--disk``, ``--nvme``, ``serve blk``).

Two writable devices on one file (``--disk a.img --disk a.img``, ``--disk a.img --nvme
link-to-a.img``) were accepted silently: the guest sees two disks with their own caches and
corrupts whatever it writes on them.  QEMU refuses the same with its image locks.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitless.disk import DiskSpec, SharedImageError, refuse_shared_images
from exitless.errors import ExitlessError
from exitless.nvme import NvmeSpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[tuple[str, int]]]:
    """Three files, each under two names (the file and a symlink) and one hard link: (name, file number)."""
    d = tmp_path_factory.mktemp("images")
    names = []
    for i in range(3):
        f = d / f"img{i}.img"
        f.write_bytes(bytes(4096))
        (d / f"sym{i}.img").symlink_to(f.name)
        os.link(f, d / f"hard{i}.img")
        names += [(str(f), i), (str(d / f"sym{i}.img"), i), (str(d / f"hard{i}.img"), i)]
    names.append((str(d / "missing.img"), -1))          # left to the device to report
    return d, names


@settings(max_examples=200, deadline=None)
@given(picks=st.lists(st.tuples(st.integers(0, 9), st.booleans(), st.booleans()), max_size=6))
def test_refused_exactly_when_a_file_has_two_devices_and_a_writer(images, picks) -> None:
    _, names = images
    specs, users = [], {}
    for index, ro, nvme in picks:
        path, file = names[index]
        specs.append((NvmeSpec if nvme else DiskSpec)(path, read_only=ro))
        if file >= 0:
            users.setdefault(file, []).append(ro)
    should_refuse = any(len(ros) > 1 and not all(ros) for ros in users.values())
    if should_refuse:
        with pytest.raises(SharedImageError) as e:
            refuse_shared_images(specs)
        assert isinstance(e.value, ExitlessError) and "given to two devices" in str(e.value)
    else:
        refuse_shared_images(specs)


def test_serve_blk_refuses_one_image_on_two_sockets(images) -> None:
    d, _ = images
    r = subprocess.run([sys.executable, "-m", "exitless", "serve", "blk", "--socket", str(d / "a.sock"),
                        "--socket", str(d / "b.sock"), "--disk", str(d / "img0.img"), "--disk",
                        str(d / "sym0.img")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "the same image as" in r.stderr and not (d / "a.sock").exists()


@pytest.mark.kvm
def test_run_refuses_a_disk_and_an_nvme_on_one_image(images) -> None:
    from exitless.guestkit import guestkit_path

    d, _ = images
    r = subprocess.run([sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()), "--append", "info",
                        "--disk", str(d / "img1.img"), "--nvme", str(d / "hard1.img")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "the same image as" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()), "--append", "info",
                        "--disk", f"{d / 'img1.img'},ro", "--nvme", f"{d / 'hard1.img'},ro"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
