"""Build a gzip'd newc cpio initramfs: busybox, kernel modules and an /init script.

Why build it in Python rather than with ``cpio``/``mkinitramfs``:

* No host tools and no root: a cpio archive *describes* device nodes
  (``/dev/console`` must exist before ``/init`` runs or the guest has no
  console), so writing the archive ourselves creates them without ``mknod``.
* Deterministic bytes (fixed mtimes, inode numbers and order), so a cached
  initramfs is reproducible and tests can compare archives.
* Module dependencies are resolved here from ``modules.dep`` and the modules
  are loaded by the generated ``/init`` in dependency order with plain
  ``insmod``; the guest needs neither udev nor ``modprobe`` logic.  Compressed
  modules (``.ko.xz``/``.ko.gz``) are decompressed here, because busybox's
  ``insmod`` only loads raw ELF objects (Debian 12's cloud kernel ships raw
  ``.ko`` files, newer kernels may not).

The format is "newc" (``070701``), the one the kernel's
``init/initramfs.c`` unpacks: a 110-byte ASCII-hex header, the NUL-terminated
name padded to 4 bytes, the data padded to 4 bytes, ending with
``TRAILER!!!``.  Parents must precede children (the kernel does not create
missing directories), which :class:`CpioWriter` guarantees.
"""
from __future__ import annotations

from ..errors import ExitlessError
import gzip
import lzma
import os
import re
import stat
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

NEWC_MAGIC = b"070701"
NEWC_CRC_MAGIC = b"070702"
TRAILER = "TRAILER!!!"
_HDR_LEN = 110

#: The generated /init prints ``EXIT_MARKER + str(status)`` on its own line when the command ends.
EXIT_MARKER = "EXITLESS_EXIT_STATUS="
#: Printed by the generated /init just before it runs the command (the guest is up).
READY_MARKER = "EXITLESS_READY"

DeviceSpec = tuple[str, str, int, int, int]
DEFAULT_DEVICES: tuple[DeviceSpec, ...] = (
    ("/dev/console", "c", 5, 1, 0o600),
    ("/dev/null", "c", 1, 3, 0o666),
)

#: Busybox applets linked into /bin by default (all present in Debian 12's busybox-static).
DEFAULT_APPLETS: tuple[str, ...] = (
    "sh", "ash", "mount", "umount", "insmod", "modprobe", "lsmod", "rmmod", "mkdir", "rmdir",
    "cat", "echo", "printf", "ls", "cp", "mv", "rm", "ln", "touch", "poweroff", "reboot", "halt",
    "sync", "dd", "sha256sum", "md5sum", "cmp", "mke2fs", "mkdosfs", "mknod", "sleep", "uname",
    "dmesg", "head", "tail", "grep", "sed", "wc", "od", "hexdump", "stat", "df", "free", "nproc",
    "time", "env", "ps", "kill", "blockdev", "seq", "test", "[", "true", "false", "setsid",
    "cttyhack", "mdev", "ip", "ifconfig", "hostname", "date", "tr", "cut", "sort", "uniq", "xargs",
    "find", "chmod", "chown", "truncate", "fallocate", "timeout", "fstrim", "blkdiscard",
)

_COMPRESSED_SUFFIXES = (".xz", ".gz", ".zst")


class InitramfsError(ExitlessError, ValueError):
    """A module, file or path that cannot go into the initramfs (message says which)."""


# --------------------------------------------------------------------------- cpio


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc archive, as read back by :func:`read_cpio`."""

    name: str
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    data: bytes
    ino: int = 0
    devmajor: int = 0
    devminor: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_chardev(self) -> bool:
        return stat.S_ISCHR(self.mode)


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


class CpioWriter:
    """Writes a newc archive in memory; parents are created implicitly, in order.

    Paths are guest paths (``/bin/sh`` or ``bin/sh``); stored without the
    leading slash, as the kernel expects.  Adding the same path twice is an
    error (the kernel would silently let the later one win).
    """

    def __init__(self, *, mtime: int = 0) -> None:
        self._chunks: list[bytes] = []
        self._names: dict[str, int] = {}  # name -> mode
        self._ino = 1
        self._mtime = mtime
        self._closed = False

    def __contains__(self, path: str) -> bool:
        return _norm(path) in self._names

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        name = _norm(path)
        if name in self._names:
            if not stat.S_ISDIR(self._names[name]):
                raise InitramfsError(f"/{name} exists and is not a directory")
            return
        self._parents(name)
        self._emit(name, stat.S_IFDIR | (mode & 0o7777), b"", nlink=2)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._new(path, stat.S_IFREG | (mode & 0o7777), bytes(data))

    def add_symlink(self, path: str, target: str) -> None:
        self._new(path, stat.S_IFLNK | 0o777, target.encode())

    def add_device(self, path: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        """A character (``kind='c'``) or block (``'b'``) special file."""
        if kind not in ("c", "b"):
            raise InitramfsError(f"device kind must be 'c' or 'b', not {kind!r}")
        fmt = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
        self._new(path, fmt | (mode & 0o7777), b"", rdev=(major, minor))

    def getvalue(self) -> bytes:
        """The archive bytes, with the trailer (the writer is closed afterwards)."""
        if not self._closed:
            self._chunks.append(_header(TRAILER, 0, 0, 1, 0, 0, (0, 0)))
            self._closed = True
        return b"".join(self._chunks)

    def _new(self, path: str, mode: int, data: bytes, rdev: tuple[int, int] = (0, 0)) -> None:
        name = _norm(path)
        if name in self._names:
            raise InitramfsError(f"/{name} added twice")
        self._parents(name)
        self._emit(name, mode, data, nlink=1, rdev=rdev)

    def _parents(self, name: str) -> None:
        parent = PurePosixPath(name).parent
        if str(parent) != ".":
            self.add_dir(str(parent))

    def _emit(self, name: str, mode: int, data: bytes, *, nlink: int, rdev: tuple[int, int] = (0, 0)) -> None:
        if self._closed:
            raise InitramfsError("archive already finished")
        self._names[name] = mode
        self._chunks.append(_header(name, self._ino, mode, nlink, self._mtime, len(data), rdev))
        self._chunks.append(data + b"\0" * _pad4(len(data)))
        self._ino += 1


def _norm(path: str) -> str:
    p = PurePosixPath("/" + path.lstrip("/"))
    if ".." in p.parts or str(p) == "/":
        raise InitramfsError(f"bad guest path {path!r}")
    return str(p)[1:]


def _header(name: str, ino: int, mode: int, nlink: int, mtime: int, size: int, rdev: tuple[int, int]) -> bytes:
    raw = os.fsencode(name) + b"\0"         # a host file name that is not UTF-8 keeps its bytes
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(raw), 0)
    for v in fields:
        if not 0 <= v <= 0xFFFFFFFF:
            raise InitramfsError(f"cpio field out of range for /{name}: {v}")
    hdr = NEWC_MAGIC + b"".join(b"%08X" % v for v in fields)
    return hdr + raw + b"\0" * _pad4(_HDR_LEN + len(raw))


_NEWC_FIELDS = ("c_ino", "c_mode", "c_uid", "c_gid", "c_nlink", "c_mtime", "c_filesize", "c_devmajor",
                "c_devminor", "c_rdevmajor", "c_rdevminor", "c_namesize", "c_check")


def _newc_member(data: bytes, off: int, what: str = "cpio") -> tuple[list[int], str, int, int]:
    """The newc header at ``off``, checked against the data: (fields, name, body offset, next offset).

    Raises :class:`InitramfsError` naming the field (``c_namesize``, ``c_filesize``...) and offset.
    """
    if off + _HDR_LEN > len(data):
        raise InitramfsError(f"{what}: truncated at offset {off:#x} (a {_HDR_LEN}-byte header, no trailer)")
    magic = data[off:off + 6]
    if magic not in (NEWC_MAGIC, NEWC_CRC_MAGIC):
        raise InitramfsError(f"{what}: bad cpio magic {magic!r} at offset {off:#x}")
    fields = []
    for i, field in enumerate(_NEWC_FIELDS):
        raw = data[off + 6 + 8 * i:off + 14 + 8 * i]
        if not re.fullmatch(rb"[0-9A-Fa-f]{8}", raw):
            raise InitramfsError(f"{what}: {field} {raw!r} of the member at {off:#x} is not 8 hex digits")
        fields.append(int(raw, 16))
    namesize, filesize = fields[11], fields[6]
    name_off = off + _HDR_LEN
    if not 1 <= namesize <= len(data) - name_off:
        raise InitramfsError(f"{what}: c_namesize {namesize:#x} of the member at {off:#x} runs past the end "
                             f"of the {len(data):#x}-byte archive (or is 0)")
    name = data[name_off:name_off + namesize - 1].decode(errors="replace")
    body = name_off + namesize
    body += _pad4(body)
    if body + filesize > len(data):
        raise InitramfsError(f"{what}: c_filesize {filesize:#x} of /{name} (member at {off:#x}) runs past the end "
                             f"of the {len(data):#x}-byte archive")
    nxt = body + filesize
    return fields, name, body, nxt + _pad4(nxt)


def read_cpio(data: bytes) -> list[CpioEntry]:
    """Parse a newc archive (gzip'd or not) up to its trailer.

    Used by the tests and handy when debugging a guest that cannot find a file.
    Raises :class:`InitramfsError` naming the bad field.
    """
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise InitramfsError(f"corrupt gzip'd cpio: {e}") from None
    out: list[CpioEntry] = []
    off = 0
    while True:
        f, name, body, off = _newc_member(data, off)
        if name == TRAILER:
            return out
        ino, mode, uid, gid, nlink, mtime, size, dmaj, dmin, rmaj, rmin, _namesize, _check = f
        out.append(CpioEntry(name, mode, uid, gid, nlink, mtime, data[body:body + size], ino, dmaj, dmin, rmaj, rmin))


#: Compressed initramfs formats the kernel unpacks itself (lib/decompress.c), by magic.
INITRD_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"\x1f\x9e", "gzip"), (b"BZh", "bzip2"), (b"\x5d\x00\x00", "lzma"),
                     (b"\xfd7zXZ\x00", "xz"), (b"\x89LZO", "lzo"), (b"\x02\x21\x4c\x18", "lz4"),
                     (b"\x28\xb5\x2f\xfd", "zstd"))


_NONZERO = re.compile(rb"[^\0]")


def check_initrd(data: bytes, name: str = "initrd") -> None:
    """Check an initrd against itself before it is loaded: what init/initramfs.c will unpack.

    An initrd is a sequence of newc cpio archives (each header's ``c_namesize`` and
    ``c_filesize`` must stay within the file, each archive must reach ``TRAILER!!!``),
    zero padding between them, and possibly a compressed archive (gzip, xz, zstd, lz4...)
    which the kernel decompresses and which is not opened here.  Anything else is refused.
    Raises :class:`InitramfsError` naming the field and offset.
    """
    if not data:
        raise InitramfsError(f"{name}: empty file")
    off = 0
    while True:
        nonzero = _NONZERO.search(data, off)           # skip the padding between concatenated archives
        if nonzero is None:
            return
        off = nonzero.start()
        rest = data[off:off + 6]
        if any(rest.startswith(m) for m, _ in INITRD_COMPRESSED):
            return
        if rest not in (NEWC_MAGIC, NEWC_CRC_MAGIC):
            raise InitramfsError(f"{name}: at offset {off:#x} neither a newc cpio archive (070701) nor a "
                                 f"compressed one ({', '.join(sorted({f for _, f in INITRD_COMPRESSED}))}): "
                                 f"starts with {rest!r}")
        member = ""
        while member != TRAILER:
            _f, member, _body, off = _newc_member(data, off, name)


# --------------------------------------------------------------------------- modules


def module_name(path: str) -> str:
    """Canonical module name of a ``.ko`` path: basename, no suffixes, ``-`` as ``_``."""
    base = PurePosixPath(path).name
    for suf in _COMPRESSED_SUFFIXES:
        if base.endswith(suf):
            base = base[: -len(suf)]
    if base.endswith(".ko"):
        base = base[:-3]
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """``modules.dep`` as ``{module path: [dependency paths]}`` (paths as written)."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        mod, sep, rest = line.partition(":")
        if not sep:
            raise InitramfsError(f"malformed modules.dep line: {line!r}")
        deps[mod.strip()] = rest.split()
    return deps


def resolve_modules(names: Iterable[str], modules_dir: str | os.PathLike[str]) -> list[str]:
    """Module paths (relative to ``modules_dir``) for ``names`` and their dependencies, in load order.

    Each module comes after everything it depends on (depth-first post-order
    over ``modules.dep``, which need not list dependencies transitively).
    Names built into the kernel (``modules.builtin``) are dropped; unknown
    names raise :class:`InitramfsError`.
    """
    mdir = Path(modules_dir)
    try:
        deps = parse_modules_dep((mdir / "modules.dep").read_text())
    except FileNotFoundError as exc:
        raise InitramfsError(f"{mdir}/modules.dep missing: run depmod (exitless.guest.fetch does)") from exc
    builtin: set[str] = set()
    if (mdir / "modules.builtin").is_file():
        builtin = {module_name(b) for b in (mdir / "modules.builtin").read_text().split()}
    prefix = str(mdir).rstrip("/") + "/"
    rel = {m: m[len(prefix) :] if m.startswith(prefix) else m.lstrip("/") for m in deps}
    by_name = {module_name(m): m for m in deps}

    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(m: str, chain: tuple[str, ...]) -> None:
        s = state.get(m)
        if s == 2:
            return
        if s == 1:
            raise InitramfsError(f"dependency cycle: {' -> '.join(module_name(c) for c in chain + (m,))}")
        state[m] = 1
        for d in deps.get(m, ()):
            if d not in deps:
                # tolerate absolute/relative mismatches between the line and its deps
                alt = by_name.get(module_name(d))
                if alt is None:
                    raise InitramfsError(f"{module_name(m)} depends on {d}, which modules.dep does not list")
                d = alt
            visit(d, chain + (m,))
        state[m] = 2
        order.append(m)

    missing = []
    for n in names:
        key = module_name(n)
        if key in by_name:
            visit(by_name[key], ())
        elif key not in builtin:
            missing.append(n)
    if missing:
        raise InitramfsError(f"modules not found in {mdir}/modules.dep: {', '.join(missing)}")
    return [rel[m] for m in order]


def read_module(path: str | os.PathLike[str]) -> bytes:
    """A module's ELF bytes, decompressing ``.ko.xz``/``.ko.gz`` (busybox insmod cannot)."""
    p = Path(path)
    raw = p.read_bytes()
    if p.name.endswith(".xz"):
        return lzma.decompress(raw)
    if p.name.endswith(".gz"):
        return gzip.decompress(raw)
    if p.name.endswith(".zst"):
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError as exc:
            raise InitramfsError(f"{p.name} is zstd-compressed: pip install zstandard to unpack it") from exc
        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return raw


def _strip_compression(rel: str) -> str:
    for suf in _COMPRESSED_SUFFIXES:
        if rel.endswith(suf):
            return rel[: -len(suf)]
    return rel


def _find_modules_dir(modules_root: Path, kver: str | None) -> tuple[Path, str]:
    """``(lib/modules/<kver> dir, kver)`` from a depmod root or from the directory itself."""
    if (modules_root / "modules.dep").is_file():
        return modules_root, kver or modules_root.name
    base = modules_root / "lib" / "modules"
    if kver is None:
        found = sorted(d.name for d in base.iterdir() if d.is_dir()) if base.is_dir() else []
        if len(found) != 1:
            raise InitramfsError(f"pass kver=: found kernel versions {found} under {base}")
        kver = found[0]
    mdir = base / kver
    if not (mdir / "modules.dep").is_file():
        raise InitramfsError(f"{mdir}/modules.dep missing: run depmod (exitless.guest.fetch does)")
    return mdir, kver


# --------------------------------------------------------------------------- init


def make_init(
    module_paths: Sequence[str] = (),
    command: str | None = None,
    *,
    shutdown: str = "poweroff",
    marker: str = EXIT_MARKER,
) -> str:
    """The default ``/init``: mount, load modules, run ``command``, report, power off.

    ``module_paths`` are guest paths, in load order.  ``command`` runs under
    ``sh`` from ``/etc/exitless/command.sh`` (so it needs no quoting); ``None``
    gives an interactive shell on the console.  When it ends the script prints
    ``<marker><status>`` on its own line, syncs, and stops the machine:
    ``shutdown="poweroff"`` (ACPI S5 via PM1a_CNT; needs ACPI) or ``"reboot"``
    (works without ACPI: a triple fault / keyboard-controller reset the VMM
    sees as a shutdown exit).
    """
    if shutdown not in ("poweroff", "reboot"):
        raise ValueError("shutdown must be 'poweroff' or 'reboot'")
    lines = [
        "#!/bin/sh",
        "# generated by exitless.boot.initramfs.make_init",
        "export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=${TERM:-linux}",
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        "mount -t devtmpfs devtmpfs /dev",
        "mkdir -p /dev/pts /dev/shm",
        "mount -t tmpfs tmpfs /tmp",
    ]
    for m in module_paths:
        q = _shquote(m)
        lines.append(f"insmod {q} || echo 'exitless-init: insmod failed: '{q}")
    lines.append(f"echo {READY_MARKER}")
    if command is None:
        lines.append("setsid cttyhack sh")
    else:
        lines.append("sh /etc/exitless/command.sh")
    lines += [
        "rc=$?",
        f"echo {marker}$rc",
        "sync",
        f"{shutdown} -f",
        "while :; do sleep 60; done",
        "",
    ]
    return "\n".join(lines)


def parse_exit_status(console_output: str, marker: str = EXIT_MARKER) -> int | None:
    """The status the default /init reported on the console, or ``None`` if it never did."""
    found = re.findall(rf"^{re.escape(marker)}(\d+)\s*$", console_output, re.MULTILINE)
    return int(found[-1]) if found else None


def _shquote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


# --------------------------------------------------------------------------- build


ExtraFile = bytes | str | os.PathLike[str] | tuple[bytes | str | os.PathLike[str], int]


def build_initramfs(
    busybox: str | os.PathLike[str],
    init_script: str | bytes | None = None,
    *,
    modules: Sequence[str] = (),
    modules_root: str | os.PathLike[str] | None = None,
    kver: str | None = None,
    extra_files: Mapping[str, ExtraFile] | None = None,
    devices: Sequence[DeviceSpec] = DEFAULT_DEVICES,
    applets: Iterable[str] = DEFAULT_APPLETS,
    command: str | None = None,
    shutdown: str = "poweroff",
    compress: bool = True,
) -> bytes:
    """Build an initramfs and return its (gzip'd) bytes.

    * ``busybox``: a *static* busybox binary; it becomes ``/bin/busybox`` and
      every name in ``applets`` a symlink to it in ``/bin``.
    * ``modules``: module names (``virtio_blk``, ``virtio-net``...);
      with their dependencies they are copied to ``/lib/modules/<kver>/`` and a
      matching ``modules.dep`` is written.  ``modules_root`` is the ``depmod -b``
      root holding ``lib/modules/<kver>`` (or that directory itself).
    * ``init_script``: the ``/init`` text; ``None`` generates one with
      :func:`make_init` that loads the modules in order and runs ``command``,
      then ``shutdown``.
    * ``extra_files``: ``{guest_path: bytes | host_path | (either, mode)}``.
    * ``devices``: ``(path, 'c'|'b', major, minor, mode)`` nodes; the default
      has ``/dev/console``, without which the kernel cannot give /init a console.
    * ``compress``: gzip the archive (the Debian kernel has ``CONFIG_RD_GZIP``);
      ``False`` returns the raw newc bytes, which the kernel accepts too.

    A hand-written ``init_script`` that should load the modules can call
    :func:`resolve_modules` for the same load order (guest paths are
    ``/lib/modules/<kver>/<path>`` with any ``.xz``/``.gz`` suffix dropped), or
    use busybox ``modprobe``, which reads the ``modules.dep`` written here.
    """
    if init_script is not None and command is not None:
        raise ValueError("command= only applies to the generated /init; put it in init_script instead")
    w = CpioWriter()
    for d, dmode in (("/bin", 0o755), ("/dev", 0o755), ("/etc", 0o755), ("/proc", 0o555), ("/sys", 0o555),
                     ("/tmp", 0o1777), ("/root", 0o700), ("/mnt", 0o755), ("/run", 0o755), ("/usr", 0o755)):
        w.add_dir(d, dmode)
    for src, dst in (("bin", "/sbin"), ("../bin", "/usr/bin"), ("../bin", "/usr/sbin")):
        w.add_symlink(dst, src)
    for path, kind, major, minor, nmode in devices:
        w.add_device(path, kind, major, minor, nmode)

    w.add_file("/bin/busybox", Path(busybox).read_bytes(), 0o755)
    for a in dict.fromkeys(applets):
        if a != "busybox":
            w.add_symlink(f"/bin/{a}", "busybox")

    guest_modules: list[str] = []
    if modules:
        if modules_root is None:
            raise InitramfsError("modules= needs modules_root=")
        mdir, kver = _find_modules_dir(Path(modules_root), kver)
        order = resolve_modules(modules, mdir)
        gbase = f"/lib/modules/{kver}"
        dep_lines = []
        for rel in order:
            w.add_file(f"{gbase}/{_strip_compression(rel)}", read_module(mdir / rel), 0o644)
            guest_modules.append(f"{gbase}/{_strip_compression(rel)}")
        all_deps = parse_modules_dep((mdir / "modules.dep").read_text())
        prefix = str(mdir).rstrip("/") + "/"
        for rel in order:
            key = next(k for k in (rel, prefix + rel, "/" + rel) if k in all_deps)
            ds = " ".join(_strip_compression(d[len(prefix):] if d.startswith(prefix) else d) for d in all_deps[key])
            dep_lines.append(f"{_strip_compression(rel)}: {ds}".rstrip())
        w.add_file(f"{gbase}/modules.dep", ("\n".join(dep_lines) + "\n").encode())
        for meta in ("modules.builtin", "modules.order"):
            if (mdir / meta).is_file():
                w.add_file(f"{gbase}/{meta}", (mdir / meta).read_bytes())

    if command is not None:
        # the user's argv bytes, also where they are not UTF-8 (os.fsencode undoes the surrogateescape)
        w.add_file("/etc/exitless/command.sh", os.fsencode(command) + b"\n", 0o755)
    if init_script is None:
        init_script = make_init(guest_modules, command, shutdown=shutdown)
    w.add_file("/init", os.fsencode(init_script) if isinstance(init_script, str) else init_script, 0o755)

    for gpath, spec in (extra_files or {}).items():
        mode: int | None = None
        if isinstance(spec, tuple):
            spec, mode = spec
        if isinstance(spec, (bytes, bytearray)):
            data = bytes(spec)
            default_mode = 0o644
        else:
            host = Path(spec)
            data = host.read_bytes()
            default_mode = 0o755 if os.access(host, os.X_OK) else 0o644
        w.add_file(gpath, data, default_mode if mode is None else mode)

    raw = w.getvalue()
    return gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw
