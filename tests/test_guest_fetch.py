"""exitless.guest.fetch: really downloads Debian's cloud kernel + busybox-static.

The download happens once per session (and once per CI run when
EXITLESS_CACHE points at a persistent directory).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from exitless.guest import GuestArtifacts, GuestFetchError, fetch_guest
from exitless.guest.fetch import CACHE_ENV, default_cache_dir


def guest_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$EXITLESS_CACHE if set (CI keeps it), else one directory shared by the whole session."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else tmp_path_factory.getbasetemp() / "exitless-guest-cache"


@pytest.fixture(scope="session")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestArtifacts:
    return fetch_guest(guest_cache_dir(tmp_path_factory))


def test_fetch_unpacks_kernel_modules_and_busybox(guest: GuestArtifacts) -> None:
    assert guest.vmlinuz.is_file()
    assert guest.vmlinuz.read_bytes()[0x202:0x206] == b"HdrS"
    assert guest.modules_dir is not None and guest.modules_dir.name == guest.kernel_version
    assert guest.kernel_version.endswith("-cloud-amd64")
    assert guest.modules_root is not None
    assert guest.modules_dir == guest.modules_root / "lib" / "modules" / guest.kernel_version
    dep = (guest.modules_dir / "modules.dep").read_text()
    line = next(l for l in dep.splitlines() if l.split(":")[0].endswith("/virtio_blk.ko"))
    assert "virtio.ko" in line and "virtio_ring.ko" in line
    assert guest.busybox.is_file() and os.access(guest.busybox, os.X_OK)
    assert {"sh", "insmod", "poweroff", "depmod", "mke2fs"} <= set(guest.busybox_applets)


def test_manifest_records_concrete_versions(guest: GuestArtifacts) -> None:
    assert guest.manifest is not None
    m = json.loads(guest.manifest.read_text())
    pkgs = {p["requested"]: p for p in m["packages"]}
    kernel = pkgs["linux-image-cloud-amd64"]
    assert kernel["package"] == f"linux-image-{guest.kernel_version}"  # the meta-package was resolved
    assert kernel["version"] and len(kernel["sha256"]) == 64
    assert pkgs["busybox-static"]["version"]
    assert m["kernel_version"] == guest.kernel_version
    assert guest.versions[kernel["package"]] == kernel["version"]


def test_second_call_uses_cache_without_apt(
    guest: GuestArtifacts, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, apt-cache or dpkg reachable
    again = fetch_guest(guest_cache_dir(tmp_path_factory))
    assert again == guest


def test_refresh_keeps_cache_when_versions_unchanged(guest: GuestArtifacts, tmp_path_factory: pytest.TempPathFactory) -> None:
    assert guest.manifest is not None
    before = guest.manifest.stat().st_mtime_ns
    again = fetch_guest(guest_cache_dir(tmp_path_factory), refresh=True)
    assert again == guest
    assert guest.manifest.stat().st_mtime_ns == before


def test_missing_package_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GuestFetchError, match=r"linux-image-no-such-kernel-exitless.*not found.*apt-get update"):
        fetch_guest(tmp_path, kernel_pkg="linux-image-no-such-kernel-exitless", allow_apt_update=False)
    assert not any(p.name.startswith(".staging") for p in tmp_path.iterdir())


def test_version_gone_from_mirror_is_a_stale_lists_error(tmp_path: Path) -> None:
    from exitless.guest.fetch import _Apt, _StaleLists

    with pytest.raises(_StaleLists, match="apt-get update"):
        _Apt(allow_update=False).download([("busybox-static", "0.0-exitless-no-such-version")], tmp_path)


def test_missing_apt_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(GuestFetchError, match=r"apt-cache not found.*kernel=.*busybox="):
        fetch_guest(tmp_path / "cache")


def test_external_kernel_and_modules(guest: GuestArtifacts, tmp_path_factory: pytest.TempPathFactory) -> None:
    assert guest.modules_dir is not None
    a = fetch_guest(guest_cache_dir(tmp_path_factory), kernel=guest.vmlinuz, modules_dir=guest.modules_dir)
    assert a.vmlinuz == guest.vmlinuz and a.modules_dir == guest.modules_dir
    assert a.kernel_version == guest.kernel_version
    assert a.busybox.is_file() and "sh" in a.busybox_applets  # busybox fetched on its own
    # modules_dir may also be the depmod root
    b = fetch_guest(guest_cache_dir(tmp_path_factory), kernel=guest.vmlinuz, modules_dir=guest.modules_root)
    assert b.modules_dir == guest.modules_dir


def test_external_modules_without_modules_dep_are_depmodded_in_a_copy(guest: GuestArtifacts, tmp_path: Path) -> None:
    assert guest.modules_dir is not None
    kver = guest.kernel_version
    tree = tmp_path / "foreign" / "lib" / "modules" / kver
    for rel in ("kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/block/virtio_blk.ko"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(guest.modules_dir / rel, tree / rel)
    a = fetch_guest(tmp_path / "cache", kernel=guest.vmlinuz, modules_dir=tree, busybox=guest.busybox)
    assert a.manifest is None  # nothing fetched
    assert not (tree / "modules.dep").exists()  # the given tree is never written to
    assert a.modules_dir is not None and a.modules_dir != tree
    dep = (a.modules_dir / "modules.dep").read_text()
    assert "kernel/drivers/block/virtio_blk.ko:" in dep
    # no modules at all: the version comes from the bzImage
    b = fetch_guest(tmp_path / "cache", kernel=guest.vmlinuz, busybox=guest.busybox)
    assert b.modules_dir is None and b.kernel_version == kver


def test_modules_without_kernel_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(GuestFetchError, match="kernel="):
        fetch_guest(tmp_path, modules_dir=tmp_path)


def test_external_files_must_exist(tmp_path: Path, guest: GuestArtifacts) -> None:
    with pytest.raises(GuestFetchError, match="kernel file"):
        fetch_guest(tmp_path, kernel=tmp_path / "nope", busybox=guest.busybox)


def test_default_cache_dir_respects_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "exitless" / "guest"


def test_cache_is_readable(guest: GuestArtifacts) -> None:
    assert guest.manifest is not None
    assert stat.S_IMODE(guest.manifest.parent.stat().st_mode) == 0o755
