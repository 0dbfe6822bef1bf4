"""What ``exitless run`` boots with Linux: the kernel, the initramfs and the command line, decided before any VM exists.

Two forms:

* the easy form, ``run -- CMD ARGS...``: Debian's cloud kernel (fetched once into
  the cache by :mod:`exitless.guest.fetch`), an initramfs with busybox, the virtio
  modules and an ``/init`` that runs CMD, prints its status and powers off;
* ``run --kernel bzImage|vmlinux [--initrd FILE]``: the user's Linux kernel.

On a ``kvm_pvm`` host the kernel parameters that host needs are added (and a note
says so), and a bzImage is unpacked on the host unless ``decompress="guest"``.
Also here: telling a Linux kernel (bzImage, or an ELF with a ``Linux`` note) from
another PVH ELF such as the guest kit.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ExitlessError
from ..progress import QUIET, Progress

EASY_CMDLINE = "console=ttyS0 quiet loglevel=1 panic=-1"
DEFAULT_MODULES = ("virtio_pci", "virtio_blk", "virtio_net")


class GuestPlanError(ExitlessError, ValueError):
    """The options do not describe a guest that can be booted (the message says which option)."""


@dataclass
class GuestPlan:
    """Everything ``run`` will boot, decided before any VM exists.

    ``initrd`` is the initramfs image itself (bytes), ``None`` for none;
    ``decompress`` is ``"guest"`` or ``"host"`` (see :func:`exitless.boot.linux.boot_linux`);
    ``notes`` are sentences for the user about what was added or decided.
    """

    kernel: Path
    cmdline: str
    initrd: bytes | None = None
    decompress: str = "guest"
    notes: list[str] = field(default_factory=list)


def plan_guest(kernel: str | None, command: list[str], *, append: str = "", initrd: str | None = None,
               cache: str | None = None, modules: str | None = None, decompress: str = "auto",
               flavour: str | None = None, early_printk: bool = False, quiet: bool = True,
               progress: Progress = QUIET) -> GuestPlan:
    """Resolve kernel, initramfs and command line, fetching the guest if ``command`` needs it.

    ``command`` non-empty selects the easy form (``kernel``/``modules`` then replace
    Debian's); ``flavour`` is the KVM flavour (default: this host's, see
    :func:`exitless.doctor.kvm_flavour`); ``progress`` is told about the fetch and the initramfs build.
    Raises :class:`GuestPlanError` for options that do not mix,
    :class:`exitless.guest.fetch.GuestFetchError`, :class:`exitless.boot.initramfs.InitramfsError`,
    :class:`exitless.boot.pvh.KernelImageError` (an unreadable initrd).
    """
    from ..boot.initramfs import build_initramfs
    from ..boot.linux import PVM_LIMIT, add_params, host_kernel_params
    from ..doctor import kvm_flavour
    from .fetch import fetch_guest

    flavour = flavour or kvm_flavour()
    notes: list[str] = []
    rd: bytes | None = None
    if command:
        if initrd is not None:
            raise GuestPlanError("--initrd and a command (-- CMD) do not mix: "
                                 "the command runs from exitless's initramfs")
        art = fetch_guest(cache, kernel=kernel, modules_dir=modules, progress=progress)
        kpath = art.vmlinuz
        mods = list(DEFAULT_MODULES) if art.modules_root is not None else []
        with progress.step("building the initramfs (busybox, virtio modules, /init running the command)"):
            rd = build_initramfs(art.busybox, modules=mods, modules_root=art.modules_root, kver=art.kernel_version,
                                 command=shlex.join(command), applets=_applets(art),
                                 # kvm_pvm: gunzip in emulated ring 0 took 3.5 min for this initramfs; raw is copied
                                 compress=flavour != "pvm")
        cmdline = EASY_CMDLINE if quiet else EASY_CMDLINE.replace(" quiet loglevel=1", "")
        cmdline = f"{cmdline} {append}".strip()
    else:
        if kernel is None:
            raise GuestPlanError("run needs --kernel, or a command to run in the fetched guest: "
                                 "exitless run -- CMD")
        kpath = Path(kernel)
        if initrd is not None:
            rd = _read_initrd(initrd)
        cmdline = append
        if "console=" not in cmdline:
            cmdline = f"console=ttyS0 {cmdline}".strip()
    if early_printk:
        cmdline, _ = add_params(cmdline, ["earlyprintk=serial"])
    cmdline, added = add_params(cmdline, host_kernel_params(flavour))
    if added:
        notes.append(f"this host's KVM is kvm_pvm (guest ring-0 code is emulated): added kernel parameters "
                     f"'{' '.join(added)}'")
    if decompress == "auto":
        decompress = "host" if flavour == "pvm" else "guest"
        if flavour == "pvm" and is_bzimage(kpath):
            notes.append("unpacking the bzImage on the host (its decompressor would take minutes under emulation; "
                         "--decompress guest to run it anyway)")
    if flavour == "pvm":
        notes.append(PVM_LIMIT)
    return GuestPlan(kpath, cmdline, rd, decompress, notes)


def is_linux_kernel(path: str | os.PathLike) -> bool:
    """Is ``path`` a Linux kernel (a bzImage, or an ELF vmlinux) rather than another PVH ELF (the guest kit)?

    An unreadable file, or one that is not a regular file (a FIFO would block the read), counts as not
    Linux: the PVH loader then reports it.
    """
    from ..boot.files import is_regular_file

    if not is_regular_file(path):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head != b"\x7fELF" or is_linux_elf(path)


def is_linux_elf(path: str | os.PathLike) -> bool:
    """A vmlinux carries a ``Linux`` ELF note (the guest kit does not)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            for seg in ELFFile(f).iter_segments():
                if seg["p_type"] == "PT_NOTE":
                    if any(n["n_name"] == "Linux" for n in seg.iter_notes()):
                        return True
    except (ELFError, OSError, ValueError):
        return False
    return False


def is_bzimage(path: str | os.PathLike) -> bool:
    """Does ``path`` carry the boot protocol's ``HdrS`` magic at 0x202 (Documentation/arch/x86/boot.rst)?"""
    from ..boot.files import is_regular_file

    if not is_regular_file(path):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(0x206)
    except OSError:
        return False
    return head[0x202:0x206] == b"HdrS"


def _applets(art) -> tuple[str, ...]:
    from ..boot.initramfs import DEFAULT_APPLETS

    have = set(art.busybox_applets)
    return tuple(a for a in DEFAULT_APPLETS if not have or a in have)


def _read_initrd(path: str) -> bytes:
    from ..argtypes import host_ram_mib
    from ..boot.files import read_image

    # the guest RAM is not known here: no initrd larger than the host's RAM is read (boot_linux then
    # checks that it fits the guest's)
    return read_image(path, "initrd", host_ram_mib() << 20)
