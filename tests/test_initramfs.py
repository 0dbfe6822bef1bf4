"""exitless.boot.initramfs: the newc writer/reader, module resolution and a real busybox initramfs."""
from __future__ import annotations

import gzip
import lzma
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from exitless.boot.initramfs import (
    DEFAULT_APPLETS,
    EXIT_MARKER,
    CpioEntry,
    CpioWriter,
    InitramfsError,
    build_initramfs,
    make_init,
    module_name,
    parse_exit_status,
    parse_modules_dep,
    read_cpio,
    resolve_modules,
)
from exitless.guest import GuestArtifacts, fetch_guest
from exitless.guest.fetch import CACHE_ENV


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestArtifacts:
    env = os.environ.get(CACHE_ENV)
    return fetch_guest(Path(env) if env else tmp_path_factory.getbasetemp() / "exitless-guest-cache")


def entries_by_name(archive: bytes) -> dict[str, CpioEntry]:
    return {e.name: e for e in read_cpio(archive)}


def cpio_list(archive: bytes, verbose: bool = False) -> list[str]:
    """``cpio -it[v]`` of the archive, with GNU cpio."""
    if shutil.which("cpio") is None:
        pytest.skip("GNU cpio not installed (apt-get install cpio)")
    raw = gzip.decompress(archive) if archive[:2] == b"\x1f\x8b" else archive
    r = subprocess.run(["cpio", "-it" + ("v" if verbose else ""), "--quiet"], input=raw, capture_output=True, check=True)
    return r.stdout.decode().splitlines()


# --------------------------------------------------------------------------- cpio format


def test_writer_round_trip_and_parents_first() -> None:
    w = CpioWriter()
    w.add_file("/a/b/c.txt", b"hello", 0o640)
    w.add_symlink("/a/link", "b/c.txt")
    w.add_device("/dev/console", "c", 5, 1, 0o600)
    w.add_device("/dev/vda", "b", 254, 0, 0o660)
    w.add_dir("/a/b")  # already there: fine
    raw = w.getvalue()
    assert raw == w.getvalue()  # idempotent finish
    es = read_cpio(raw)
    assert [e.name for e in es] == ["a", "a/b", "a/b/c.txt", "a/link", "dev", "dev/console", "dev/vda"]
    e = {x.name: x for x in es}
    assert e["a/b/c.txt"].data == b"hello" and e["a/b/c.txt"].mode == stat.S_IFREG | 0o640
    assert e["a/link"].is_symlink and e["a/link"].data == b"b/c.txt"
    assert e["dev/console"].is_chardev and (e["dev/console"].rdevmajor, e["dev/console"].rdevminor) == (5, 1)
    assert stat.S_ISBLK(e["dev/vda"].mode) and e["dev/vda"].rdevmajor == 254
    assert e["a"].is_dir and e["a"].nlink == 2
    assert len({x.ino for x in es}) == len(es)
    assert len(raw) % 4 == 0


def test_writer_layout_is_newc() -> None:
    w = CpioWriter()
    w.add_file("x", b"abc")
    raw = w.getvalue()
    assert raw[:6] == b"070701"
    # header 110 + "x\0" -> padded to 112, then data "abc" padded to 4
    assert raw[110:112] == b"x\0" and raw[112:115] == b"abc" and raw[115:116] == b"\0"
    assert raw[116:122] == b"070701" and b"TRAILER!!!\0" in raw[116:]


def test_writer_errors() -> None:
    w = CpioWriter()
    w.add_file("/f", b"")
    with pytest.raises(InitramfsError, match="twice"):
        w.add_file("/f", b"")
    with pytest.raises(InitramfsError, match="not a directory"):
        w.add_file("/f/g", b"")
    with pytest.raises(InitramfsError, match="bad guest path"):
        w.add_file("/../etc/passwd", b"")
    with pytest.raises(InitramfsError, match="kind"):
        w.add_device("/dev/x", "p", 1, 1)
    w.getvalue()
    with pytest.raises(InitramfsError, match="finished"):
        w.add_file("/late", b"")


def test_reader_rejects_garbage() -> None:
    with pytest.raises(InitramfsError, match="magic"):
        read_cpio(b"x" * 200)
    w = CpioWriter()
    w.add_file("/f", b"data" * 10)
    with pytest.raises(InitramfsError):
        read_cpio(w.getvalue()[:130])


def test_gnu_cpio_agrees(tmp_path: Path) -> None:
    w = CpioWriter()
    w.add_file("/bin/tool", b"#!/bin/sh\n", 0o755)
    w.add_symlink("/bin/sh", "busybox")
    w.add_device("/dev/console", "c", 5, 1, 0o600)
    listing = cpio_list(w.getvalue(), verbose=True)
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in listing]
    assert names == ["bin", "bin/tool", "bin/sh", "dev", "dev/console"]
    console = next(l for l in listing if l.endswith("dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console
    assert next(l for l in listing if " bin/tool" in l).startswith("-rwxr-xr-x")


# --------------------------------------------------------------------------- modules


def fake_tree(root: Path, dep: str, *, compress: dict[str, str] | None = None) -> Path:
    """A lib/modules/<kver> tree whose .ko files contain their own path (optionally compressed)."""
    mdir = root / "lib" / "modules" / "9.9.9-test"
    for line in dep.splitlines():
        for rel in line.replace(":", " ").split():
            rel = rel.replace(str(mdir) + "/", "")
            p = mdir / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            body = b"\x7fELF" + rel.encode()
            if rel.endswith(".xz"):
                body = lzma.compress(b"\x7fELF" + rel[:-3].encode())
            elif rel.endswith(".gz"):
                body = gzip.compress(b"\x7fELF" + rel[:-3].encode())
            p.write_bytes(body)
    (mdir / "modules.dep").write_text(dep)
    (mdir / "modules.builtin").write_text("kernel/drivers/nvme/host/nvme.ko\n")
    return mdir


DEP = """\
kernel/a/top.ko: kernel/a/mid.ko
kernel/a/mid.ko: kernel/a/base.ko
kernel/a/base.ko:
kernel/b/other-thing.ko: kernel/a/base.ko
kernel/b/solo.ko:
"""


def test_resolve_is_transitive_and_in_load_order(tmp_path: Path) -> None:
    mdir = fake_tree(tmp_path, DEP)
    assert resolve_modules(["top"], mdir) == ["kernel/a/base.ko", "kernel/a/mid.ko", "kernel/a/top.ko"]
    order = resolve_modules(["other_thing", "top", "solo", "nvme"], mdir)  # nvme is built in: skipped
    assert order == ["kernel/a/base.ko", "kernel/b/other-thing.ko", "kernel/a/mid.ko", "kernel/a/top.ko", "kernel/b/solo.ko"]
    assert module_name("kernel/b/other-thing.ko.xz") == "other_thing"


def test_resolve_errors(tmp_path: Path) -> None:
    mdir = fake_tree(tmp_path / "1", DEP)
    with pytest.raises(InitramfsError, match="not found.*nope"):
        resolve_modules(["nope"], mdir)
    cyc = fake_tree(tmp_path / "2", "kernel/x.ko: kernel/y.ko\nkernel/y.ko: kernel/x.ko\n")
    with pytest.raises(InitramfsError, match="cycle"):
        resolve_modules(["x"], cyc)
    with pytest.raises(InitramfsError, match="modules.dep missing"):
        resolve_modules(["x"], tmp_path)
    with pytest.raises(InitramfsError, match="malformed"):
        parse_modules_dep("no colon here")


def test_resolve_absolute_paths(tmp_path: Path) -> None:
    mdir = tmp_path / "lib" / "modules" / "9.9.9-test"
    dep = f"{mdir}/kernel/a/top.ko: {mdir}/kernel/a/base.ko\n{mdir}/kernel/a/base.ko:\n"
    fake_tree(tmp_path, dep)
    assert resolve_modules(["top"], mdir) == ["kernel/a/base.ko", "kernel/a/top.ko"]


def test_compressed_modules_are_unpacked(tmp_path: Path, guest: GuestArtifacts) -> None:
    dep = "kernel/a/top.ko.xz: kernel/a/base.ko.gz\nkernel/a/base.ko.gz:\n"
    fake_tree(tmp_path, dep)
    archive = build_initramfs(guest.busybox, modules=["top"], modules_root=tmp_path, applets=["sh"])
    es = entries_by_name(archive)
    base = "lib/modules/9.9.9-test/kernel/a/"
    assert es[base + "top.ko"].data == b"\x7fELFkernel/a/top.ko"
    assert es[base + "base.ko"].data == b"\x7fELFkernel/a/base.ko"
    assert es["lib/modules/9.9.9-test/modules.dep"].data.decode().splitlines() == [
        "kernel/a/base.ko:",
        "kernel/a/top.ko: kernel/a/base.ko",
    ]
    init = es["init"].data.decode()
    assert init.index(base + "base.ko") < init.index(base + "top.ko")


# --------------------------------------------------------------------------- init


def test_make_init_and_exit_marker() -> None:
    s = make_init(["/lib/modules/k/a.ko", "/lib/modules/k/it's.ko"], "echo hi", shutdown="reboot")
    assert s.startswith("#!/bin/sh\n")
    assert "mount -t devtmpfs devtmpfs /dev" in s
    assert s.index("a.ko") < s.index("it'\\''s.ko") < s.index("sh /etc/exitless/command.sh")
    assert f"echo {EXIT_MARKER}$rc" in s and s.rstrip().endswith("done") and "reboot -f" in s
    assert "setsid cttyhack sh" in make_init([], None)
    with pytest.raises(ValueError):
        make_init([], "x", shutdown="halt")
    out = f"boot noise\n{EXIT_MARKER}3\r\n[ 1.0] reboot: Power down\n"
    assert parse_exit_status(out) == 3
    assert parse_exit_status("no marker") is None
    assert parse_exit_status(f"echo {EXIT_MARKER}$rc\n") is None


# --------------------------------------------------------------------------- real busybox + modules


WANTED = ["virtio_blk", "virtio_net", "virtio_pci", "nvme"]  # nvme is built into the cloud kernel


@pytest.fixture(scope="module")
def real_archive(guest: GuestArtifacts, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    host_file = tmp_path_factory.mktemp("extra") / "tool.sh"
    host_file.write_text("#!/bin/sh\necho tool\n")
    host_file.chmod(0o755)
    return build_initramfs(
        guest.busybox,
        modules=WANTED,
        modules_root=guest.modules_root,
        kver=guest.kernel_version,
        command="sha256sum /init",
        extra_files={"/etc/hello": b"hi\n", "/usr/local/bin/tool": host_file, "/etc/secret": (b"x", 0o600)},
    )


def test_default_applets_exist_in_debian_busybox(guest: GuestArtifacts) -> None:
    assert set(DEFAULT_APPLETS) <= set(guest.busybox_applets)


def test_real_initramfs_contents(real_archive: bytes, guest: GuestArtifacts) -> None:
    es = entries_by_name(real_archive)
    console = es["dev/console"]
    assert console.is_chardev and (console.rdevmajor, console.rdevminor) == (5, 1)
    assert stat.S_IMODE(console.mode) == 0o600
    bb = es["bin/busybox"]
    assert bb.data == guest.busybox.read_bytes() and stat.S_IMODE(bb.mode) == 0o755
    needed = ("sh", "mount", "insmod", "mkdir", "cat", "echo", "poweroff", "reboot", "sync", "dd", "sha256sum", "md5sum")
    for applet in (*needed, "mke2fs"):
        assert es[f"bin/{applet}"].is_symlink and es[f"bin/{applet}"].data == b"busybox"
    init = es["init"]
    assert stat.S_IMODE(init.mode) == 0o755 and init.data.startswith(b"#!/bin/sh")
    assert es["etc/exitless/command.sh"].data == b"sha256sum /init\n"
    assert es["etc/hello"].data == b"hi\n" and stat.S_IMODE(es["etc/hello"].mode) == 0o644
    assert stat.S_IMODE(es["usr/local/bin/tool"].mode) == 0o755
    assert stat.S_IMODE(es["etc/secret"].mode) == 0o600
    assert stat.S_IMODE(es["tmp"].mode) == 0o1777


def test_real_module_order_respects_modules_dep(real_archive: bytes, guest: GuestArtifacts) -> None:
    assert guest.modules_dir is not None
    es = entries_by_name(real_archive)
    kdir = f"/lib/modules/{guest.kernel_version}/"
    init = es["init"].data.decode()
    loaded = [l.split("'")[1] for l in init.splitlines() if l.startswith("insmod ")]
    rel = [p[len(kdir) :] for p in loaded]
    names = [module_name(r) for r in rel]
    assert {"virtio_blk", "virtio_net", "virtio_pci", "virtio", "virtio_ring"} <= set(names)
    assert "nvme" not in names and len(set(names)) == len(names)
    deps = parse_modules_dep((guest.modules_dir / "modules.dep").read_text())
    for i, r in enumerate(rel):
        for d in deps[r]:
            assert d in rel[:i], f"{r} loaded before its dependency {d}"
        assert es[kdir[1:] + r].data == (guest.modules_dir / r).read_bytes()
    guest_dep = es[kdir[1:] + "modules.dep"].data.decode()
    assert {l.split(":")[0] for l in guest_dep.splitlines()} == set(rel)


def test_real_initramfs_with_gnu_cpio(real_archive: bytes, guest: GuestArtifacts) -> None:
    names = cpio_list(real_archive)
    assert names == [e.name for e in read_cpio(real_archive)]
    assert "init" in names and "dev/console" in names and "bin/busybox" in names
    verbose = cpio_list(real_archive, verbose=True)
    console = next(l for l in verbose if l.endswith(" dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console
    assert next(l for l in verbose if l.endswith(" init")).startswith("-rwxr-xr-x")
    assert next(l for l in verbose if " bin/sh -> " in l).startswith("lrwxrwxrwx")


def test_build_is_deterministic(guest: GuestArtifacts) -> None:
    a = build_initramfs(guest.busybox, modules=["virtio_blk"], modules_root=guest.modules_dir, command="true")
    b = build_initramfs(guest.busybox, modules=["virtio_blk"], modules_root=guest.modules_dir, command="true")
    assert a == b and a[:2] == b"\x1f\x8b"
    raw = build_initramfs(guest.busybox, "#!/bin/sh\nexec sh\n", compress=False)
    assert raw[:6] == b"070701" and entries_by_name(raw)["init"].data == b"#!/bin/sh\nexec sh\n"


def test_build_argument_errors(guest: GuestArtifacts) -> None:
    with pytest.raises(InitramfsError, match="modules_root"):
        build_initramfs(guest.busybox, modules=["virtio_blk"])
    with pytest.raises(ValueError, match="command"):
        build_initramfs(guest.busybox, "#!/bin/sh\n", command="true")
    with pytest.raises(InitramfsError, match="not found"):
        build_initramfs(guest.busybox, modules=["no_such_module"], modules_root=guest.modules_root)
