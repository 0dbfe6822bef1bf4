"""Fetch a Debian guest kernel, its modules and a static busybox into a local cache.

Why this shape:

* The guest is Debian's ``linux-image-cloud-amd64``: a small, stock, signed-off
  kernel whose virtio drivers are modules and whose NVMe driver is built in.
  Using the distribution's kernel means exitless is tested against what users
  actually run, not against a kernel configured to suit it.
* ``apt-get download`` + ``dpkg -x`` fetch and unpack ``.deb`` files into a
  directory of our choosing.  Nothing is installed into the host (no maintainer
  scripts run, no initramfs-tools, no bootloader hooks), so it is safe on a
  developer's machine and needs no root (except for the ``apt-get update`` that a
  host with stale package lists may need; see ``allow_apt_update``).
* The meta-package is resolved to its concrete ``linux-image-<kver>`` dependency
  with ``apt-cache``, because only the concrete package carries the files.
* The ``.deb`` ships no ``modules.dep`` (the host's ``depmod`` normally writes it
  at install time), so the unpacked busybox's own ``depmod`` generates it: that
  needs no ``kmod`` on the host and understands exactly the module format the
  guest's busybox will later load.
* Results are cached (default ``~/.cache/exitless/guest``, or ``$EXITLESS_CACHE``)
  behind a JSON manifest recording package versions, so a second call costs no
  network and no apt at all, and CI downloads once.

A kernel and modules from elsewhere (a self-built kernel, another distribution)
are accepted with ``kernel=PATH, modules_dir=PATH`` (and ``busybox=PATH``); then
only what is missing is fetched.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ExitlessError
from ..progress import QUIET, Progress

log = logging.getLogger(__name__)

DEFAULT_KERNEL_PKG = "linux-image-cloud-amd64"
DEFAULT_BUSYBOX_PKG = "busybox-static"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
CACHE_ENV = "EXITLESS_CACHE"

#: Seconds allowed for one apt/dpkg command (a kernel .deb is ~30 MB).
COMMAND_TIMEOUT = 900


class GuestFetchError(ExitlessError, RuntimeError):
    """The guest could not be fetched; the message says what to do about it."""


class _StaleLists(GuestFetchError):
    """apt-get download found no such version on the mirror: the package lists are outdated."""


@dataclass(frozen=True)
class GuestArtifacts:
    """Where the pieces of a bootable guest are on the host.

    ``modules_dir`` is the ``lib/modules/<kver>`` directory (it holds
    ``modules.dep``); ``modules_root`` is the directory above ``lib/modules``,
    i.e. what ``depmod -b`` and :func:`exitless.boot.initramfs.build_initramfs`
    call the modules root.  ``manifest`` is ``None`` only when nothing was
    fetched (every piece was given by path).
    """

    vmlinuz: Path
    modules_dir: Path | None
    kernel_version: str
    busybox: Path
    manifest: Path | None
    versions: Mapping[str, str] = field(default_factory=dict, hash=False)
    busybox_applets: tuple[str, ...] = field(default=(), repr=False)

    @property
    def modules_root(self) -> Path | None:
        """The ``depmod -b`` base: ``modules_dir`` is ``<root>/lib/modules/<kver>``."""
        if self.modules_dir is None:
            return None
        return self.modules_dir.parent.parent.parent


def default_cache_dir() -> Path:
    """``$EXITLESS_CACHE``, else ``$XDG_CACHE_HOME/exitless/guest`` (``~/.cache/...``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "exitless" / "guest"


def fetch_guest(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    kernel_pkg: str = DEFAULT_KERNEL_PKG,
    busybox_pkg: str = DEFAULT_BUSYBOX_PKG,
    kernel: str | os.PathLike[str] | None = None,
    modules_dir: str | os.PathLike[str] | None = None,
    busybox: str | os.PathLike[str] | None = None,
    allow_apt_update: bool = True,
    refresh: bool = False,
    progress: Progress = QUIET,
) -> GuestArtifacts:
    """Return a guest kernel, its modules and busybox, downloading them if not cached.

    ``kernel_pkg`` may be a meta-package (it is resolved to the concrete
    ``linux-image-<kver>`` package it depends on).  ``kernel``/``modules_dir``/
    ``busybox`` use files from elsewhere instead; ``modules_dir`` may be either
    ``.../lib/modules/<kver>`` or a root holding ``lib/modules/<kver>``; if it has
    no ``modules.dep`` a copy is made in the cache and ``depmod`` run there (the
    given tree is never written to).

    A cached result is used as is, without consulting apt, unless ``refresh`` is
    true; then apt is asked for the current candidate versions and the cache is
    replaced if they changed.  If apt does not know a package, or the mirror no
    longer has the version apt's lists name (a 404), ``apt-get update`` is run
    once -- logged as a warning, never silently -- when ``allow_apt_update``
    and we are root; otherwise :class:`GuestFetchError` says to run it.

    ``progress`` is told about the long steps (apt, the download in bytes, unpacking, depmod).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if modules_dir is not None and kernel is None:
        raise GuestFetchError("--modules (modules_dir=) needs --kernel (kernel=) too: modules only load into the "
                              "kernel they were built for")
    for given, what in ((kernel, "kernel"), (busybox, "busybox")):
        if given is not None:       # before any download: a typo fails at once
            _existing_file(given, what)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GuestFetchError(f"cannot create the guest cache {cache}: {exc.strerror}; choose another with "
                              f"--cache DIR (cache_dir=) or ${CACHE_ENV}") from exc

    want_kernel = kernel is None
    want_busybox = busybox is None
    manifest_path: Path | None = None
    info: dict[str, Any] = {}
    if want_kernel or want_busybox:
        # A fetched kernel always comes with the busybox package: its depmod writes modules.dep.
        key = _slug(f"{kernel_pkg}+{busybox_pkg}" if want_kernel else busybox_pkg)
        with _locked(cache):
            key_dir, info = _ensure(
                cache,
                key,
                kernel_pkg if want_kernel else None,
                busybox_pkg,
                allow_apt_update=allow_apt_update,
                refresh=refresh,
                progress=progress,
            )
        manifest_path = key_dir / MANIFEST_NAME

    versions = {p["package"]: p["version"] for p in info.get("packages", [])}
    if want_busybox:
        bb = manifest_path.parent / info["busybox"]  # type: ignore[union-attr]
        applets = tuple(info.get("busybox_applets", ()))
    else:
        bb = _existing_file(busybox, "busybox")
        applets = _busybox_applets(bb)

    if want_kernel:
        root = manifest_path.parent  # type: ignore[union-attr]
        return GuestArtifacts(
            vmlinuz=root / info["vmlinuz"],
            modules_dir=root / info["modules_dir"],
            kernel_version=info["kernel_version"],
            busybox=bb,
            manifest=manifest_path,
            versions=versions,
            busybox_applets=applets,
        )

    vmlinuz = _existing_file(kernel, "kernel")
    mods: Path | None = None
    kver: str | None = None
    if modules_dir is not None:
        mods = _locate_modules_dir(Path(modules_dir).expanduser())
        kver = mods.name
        if not (mods / "modules.dep").is_file():
            with _locked(cache):
                mods = _depmod_copy(cache, mods, bb, progress)
    if kver is None:
        kver = _kernel_version_from_image(vmlinuz)
    return GuestArtifacts(
        vmlinuz=vmlinuz,
        modules_dir=mods,
        kernel_version=kver,
        busybox=bb,
        manifest=manifest_path,
        versions=versions,
        busybox_applets=applets,
    )


# --------------------------------------------------------------------------- cache


def _ensure(
    cache: Path,
    key: str,
    kernel_pkg: str | None,
    busybox_pkg: str,
    *,
    allow_apt_update: bool,
    refresh: bool,
    progress: Progress,
) -> tuple[Path, dict[str, Any]]:
    """Return ``(dir, manifest)`` for the packages, fetching and unpacking if needed."""
    key_dir = cache / key
    cached = _load_manifest(key_dir)
    if cached is not None and not refresh:
        log.debug("guest cache hit: %s", key_dir)
        return key_dir, cached

    for stale in cache.glob(".staging-*"):  # left by a killed run; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    for stale in cache.glob(".trash-*"):
        shutil.rmtree(stale, ignore_errors=True)

    apt = _Apt(allow_update=allow_apt_update, progress=progress)
    for attempt in (1, 2):
        wanted: list[tuple[str, str, str]] = []  # (requested, concrete, version)
        with progress.step(f"asking apt for {', '.join(p for p in (kernel_pkg, busybox_pkg) if p)}"):
            if kernel_pkg is not None:
                wanted.append((kernel_pkg, *apt.resolve_kernel(kernel_pkg)))
            wanted.append((busybox_pkg, busybox_pkg, apt.candidate(busybox_pkg)["Version"]))

        if cached is not None:
            have = {(p["package"], p["version"]) for p in cached.get("packages", [])}
            if have == {(c, v) for _, c, v in wanted}:
                return key_dir, cached
        try:
            return key_dir, _install(cache, key, wanted, apt, kernel=kernel_pkg is not None)
        except _StaleLists:
            if attempt == 1 and apt.can_update():
                log.warning("the Debian mirror no longer has these versions; running 'apt-get update' once and retrying")
                apt.update()
                continue
            raise
    raise AssertionError("unreachable")


def _install(cache: Path, key: str, wanted: list[tuple[str, str, str]], apt: "_Apt", *, kernel: bool) -> dict[str, Any]:
    """Fetch and unpack into a staging dir, then atomically replace ``cache/key``."""
    key_dir = cache / key
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{key}-", dir=cache))
    staging.chmod(0o755)
    try:
        manifest = _fetch_and_unpack(staging, wanted, apt, kernel=kernel)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        trash = None
        if key_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".trash-{key}-", dir=cache))
            key_dir.rename(trash / "old")
        staging.rename(key_dir)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _fetch_and_unpack(
    dest: Path, wanted: list[tuple[str, str, str]], apt: "_Apt", *, kernel: bool
) -> dict[str, Any]:
    """Download the exact package versions into a temp dir and ``dpkg -x`` them into ``dest/root``."""
    dpkg = _require_tool("dpkg", "to unpack .deb files (dpkg -x)")
    root = dest / "root"
    root.mkdir()
    packages: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="exitless-debs-") as tmp:
        debs = apt.download([(c, v) for _, c, v in wanted], Path(tmp))
        for (requested, concrete, version), deb in zip(wanted, debs, strict=True):
            with apt.progress.step(f"unpacking {deb.name}"):
                r = _run([dpkg, "-x", str(deb), str(root)])
            if r.returncode != 0:
                raise GuestFetchError(f"dpkg -x {deb.name} failed (exit {r.returncode}): {r.stderr.strip()}")
            packages.append(
                {
                    "requested": requested,
                    "package": concrete,
                    "version": version,
                    "deb": deb.name,
                    "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
                }
            )

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "packages": packages,
    }
    busybox = next((p for p in (root / "bin/busybox", root / "usr/bin/busybox") if p.is_file()), None)
    if kernel:
        mods = _find_modules_dir(root)
        kver = mods.name
        vmlinuz = next((p for p in (root / f"boot/vmlinuz-{kver}", root / f"usr/lib/linux/vmlinuz-{kver}") if p.is_file()), None)
        if vmlinuz is None:
            raise GuestFetchError(
                f"the kernel package unpacked no boot/vmlinuz-{kver}; is {wanted[0][1]} a kernel image package?"
            )
        if busybox is None:
            raise GuestFetchError(f"package {wanted[-1][1]} unpacked no bin/busybox, whose depmod is needed")
        with apt.progress.step(f"generating modules.dep for {kver} (busybox depmod)"):
            _depmod(busybox, mods)
        manifest.update(
            kernel_version=kver,
            vmlinuz=str(vmlinuz.relative_to(dest)),
            modules_dir=str(mods.relative_to(dest)),
        )
    if busybox is None:
        raise GuestFetchError(f"package {wanted[-1][1]} unpacked no bin/busybox; is it a busybox-static package?")
    manifest["busybox"] = str(busybox.relative_to(dest))
    manifest["busybox_applets"] = list(_busybox_applets(busybox))
    return manifest


def _load_manifest(key_dir: Path) -> dict[str, Any] | None:
    """The manifest of a complete cache entry, or ``None`` (missing, stale format, files gone)."""
    try:
        manifest = json.loads((key_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    for k in ("vmlinuz", "busybox"):
        if k in manifest and not (key_dir / manifest[k]).is_file():
            return None
    if "modules_dir" in manifest and not (key_dir / manifest["modules_dir"] / "modules.dep").is_file():
        return None
    return manifest


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """Serialise cache writers (parallel test workers, two CLIs) with a lock file."""
    with open(cache / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


# --------------------------------------------------------------------------- apt


class _Apt:
    """The few apt queries we need, with a single lazy ``apt-get update`` retry."""

    def __init__(self, *, allow_update: bool, progress: Progress = QUIET) -> None:
        self.allow_update = allow_update
        self.updated = False
        self.progress = progress

    def can_update(self) -> bool:
        """Whether a one-off ``apt-get update`` is allowed and possible (needs root)."""
        return self.allow_update and not self.updated and os.geteuid() == 0

    def candidate(self, pkg: str) -> dict[str, str]:
        """The ``apt-cache show`` stanza of the candidate version of ``pkg``."""
        info = self._show(pkg)
        if info is None and self.can_update():
            log.warning("apt does not know %r; running 'apt-get update' once and retrying", pkg)
            self.update()
            info = self._show(pkg)
        if info is None:
            hint = (
                "run 'apt-get update' (as root) first"
                if not self.updated
                else "apt-get update did not help: check the name and that the host's apt sources include Debian main"
            )
            raise GuestFetchError(f"Debian package {pkg!r} not found by apt-cache; {hint}")
        return info

    def resolve_kernel(self, pkg: str) -> tuple[str, str]:
        """Follow a ``linux-image-*`` meta-package to the concrete package; ``(name, version)``."""
        name, info = pkg, self.candidate(pkg)
        for _ in range(8):
            nxt = [d for d in _depends(info) if d.startswith("linux-image-") and d != name]
            if len(nxt) != 1:
                break
            name, info = nxt[0], self.candidate(nxt[0])
        return info.get("Package", name), info["Version"]

    def download(self, pkgs: list[tuple[str, str]], into: Path) -> list[Path]:
        """``apt-get download name=version ...`` into ``into``; returns the .deb paths in order."""
        apt_get = _require_tool("apt-get", "to download Debian packages")
        cmd = [apt_get, "-q"]
        if os.geteuid() == 0:
            # apt drops to the _apt user, who cannot write into our private temp dir.
            cmd += ["-o", "APT::Sandbox::User=root"]
        cmd += ["download", *(f"{n}={v}" for n, v in pkgs)]
        total = sum(int(self.candidate(n).get("Size", "0") or 0) for n, _ in pkgs)
        with self.progress.step(f"downloading {len(pkgs)} Debian package(s)", total=total or None) as update:
            r = _run(cmd, cwd=into, tick=lambda: update(_tree_bytes(into)))
        if r.returncode != 0:
            stale = re.search(r"\b404\b|Unable to locate|Can't find a source|Version '.*' for '.*' was not found", r.stderr)
            raise (_StaleLists if stale else GuestFetchError)(
                f"apt-get download {' '.join(n for n, _ in pkgs)} failed (exit {r.returncode}): "
                f"{r.stderr.strip()[-2000:]} -- is the network to the Debian mirror up? "
                "A stale package list gives 404s: run 'apt-get update'."
            )
        out = []
        for n, _ in pkgs:
            found = sorted(into.glob(f"{n}_*.deb"))
            if len(found) != 1:
                raise GuestFetchError(f"apt-get download left {len(found)} files for {n} in {into}")
            out.append(found[0])
        return out

    def _show(self, pkg: str) -> dict[str, str] | None:
        apt_cache = _require_tool("apt-cache", "to look up Debian packages")
        r = _run([apt_cache, "show", "--no-all-versions", pkg])
        if r.returncode != 0:
            return None
        info = _parse_stanza(r.stdout)
        return info if "Version" in info else None

    def update(self) -> None:
        apt_get = _require_tool("apt-get", "to refresh the package lists")
        with self.progress.step("apt-get update"):
            r = _run([apt_get, "-q", "update"])
        self.updated = True
        if r.returncode != 0:
            raise GuestFetchError(f"apt-get update failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")


def _parse_stanza(text: str) -> dict[str, str]:
    """The first RFC822-style stanza of ``apt-cache show`` output."""
    fields: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t" and last is not None:
            fields[last] += "\n" + line.strip()
            continue
        k, sep, v = line.partition(":")
        if sep:
            last = k.strip()
            fields[last] = v.strip()
    return fields


def _depends(info: Mapping[str, str]) -> list[str]:
    """Package names in Pre-Depends/Depends (first alternative of each, no versions)."""
    names = []
    for key in ("Pre-Depends", "Depends"):
        for clause in info.get(key, "").split(","):
            alt = clause.split("|")[0].strip()
            if alt:
                names.append(re.split(r"[\s(:]", alt, maxsplit=1)[0])
    return names


# --------------------------------------------------------------------------- kernel tree


def _find_modules_dir(root: Path) -> Path:
    """The single ``lib/modules/<kver>`` (or ``usr/lib/modules/<kver>``) under an unpacked tree."""
    bases = [root / b for b in ("lib/modules", "usr/lib/modules") if (root / b).is_dir()]
    found = [d for base in bases for d in base.iterdir() if d.is_dir()]
    if len(found) != 1:
        raise GuestFetchError(f"expected one kernel module tree under {root}/lib/modules, found {[str(f) for f in found]}")
    return found[0]


def _locate_modules_dir(p: Path) -> Path:
    """Accept either ``.../lib/modules/<kver>`` or a root that holds exactly one of those."""
    if not p.is_dir():
        raise GuestFetchError(f"modules_dir {p} is not a directory")
    if (p / "modules.order").is_file() or (p / "modules.dep").is_file() or (p / "kernel").is_dir():
        return p
    return _find_modules_dir(p)


def _depmod(busybox: Path, mods: Path) -> None:
    """Write ``modules.dep`` with the guest's busybox (``depmod -b ROOT KVER``)."""
    r = _run([str(busybox), "depmod", "-b", str(mods.parent.parent.parent), mods.name])
    if r.returncode != 0 or not (mods / "modules.dep").is_file():
        raise GuestFetchError(f"busybox depmod failed for {mods} (exit {r.returncode}): {r.stderr.strip()}")


def _depmod_copy(cache: Path, mods: Path, busybox: Path, progress: Progress = QUIET) -> Path:
    """Copy a foreign module tree lacking ``modules.dep`` into the cache and depmod the copy."""
    digest = hashlib.sha256(str(mods.resolve()).encode()).hexdigest()[:16]
    dest = cache / "custom-modules" / digest / "lib" / "modules" / mods.name
    if (dest / "modules.dep").is_file():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    with progress.step(f"copying the {mods.name} modules into the cache, generating modules.dep"):
        shutil.copytree(mods, dest, symlinks=False, ignore=shutil.ignore_patterns("build", "source"))
        _depmod(busybox, dest)
    return dest


def _kernel_version_from_image(vmlinuz: Path) -> str:
    from exitless.boot.bzimage import BzImageError, read_kernel_version

    try:
        kver = read_kernel_version(vmlinuz.read_bytes())
    except BzImageError as exc:
        raise GuestFetchError(f"{vmlinuz} is not a usable bzImage: {exc}") from exc
    if not kver:
        raise GuestFetchError(f"{vmlinuz} carries no version string; pass modules_dir=.../lib/modules/<kver>")
    return kver.split()[0]


def _busybox_applets(busybox: Path) -> tuple[str, ...]:
    r = _run([str(busybox), "--list"])
    if r.returncode != 0:
        raise GuestFetchError(f"{busybox} --list failed (exit {r.returncode}); is it a static x86-64 busybox?")
    return tuple(r.stdout.split())


# --------------------------------------------------------------------------- helpers


def _existing_file(p: str | os.PathLike[str] | None, what: str) -> Path:
    """``p`` as a Path if it names a regular file; GuestFetchError saying what it is instead."""
    path = Path(p).expanduser() if p is not None else None
    if path is None or not path.exists():
        raise GuestFetchError(f"{what} file {p} does not exist")
    if not path.is_file():
        raise GuestFetchError(f"{what} file {p} is not a regular file")
    return path


def _require_tool(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise GuestFetchError(
            f"{name} not found on PATH; it is needed {why}. exitless fetches its guest from Debian "
            "packages, so run on Debian/Ubuntu, or pass kernel=, modules_dir= and busybox= paths"
        )
    return path


def _run(cmd: list[str], *, cwd: Path | None = None,
         tick: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (output captured, ``LC_ALL=C``), calling ``tick`` every 0.2 s while it runs and once at its end."""
    env = dict(os.environ, LC_ALL="C")
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
    except OSError as exc:          # missing, not executable (a --busybox that is no program), not a binary
        raise GuestFetchError(f"cannot run {cmd[0]}: {exc.strerror or exc}") from exc
    deadline = time.monotonic() + COMMAND_TIMEOUT
    with proc:
        while True:
            try:
                out, err = proc.communicate(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired as exc:
                if time.monotonic() >= deadline:
                    proc.kill()
                    proc.communicate()
                    raise GuestFetchError(f"{' '.join(cmd[:3])} ... timed out after {COMMAND_TIMEOUT}s") from exc
                if tick is not None:
                    tick()
    if tick is not None:
        tick()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _tree_bytes(root: Path) -> int:
    """Bytes in the regular files under ``root`` (a download in progress)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass                        # renamed or removed meanwhile
    return total
