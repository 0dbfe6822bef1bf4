"""The Linux-guest commands: ``exitless guest fetch``, ``exitless run -- CMD``, ``exitless bench boot``.

``exitless run -- CMD ARGS...`` (no ``--kernel``) is the easy form: Debian's
cloud kernel (fetched once into the cache), an initramfs with busybox, the
virtio modules and an ``/init`` that runs CMD, prints its status and powers
off.  CMD's output streams to stdout and ``exitless`` exits with CMD's status.
``exitless run --kernel bzImage|vmlinux`` boots a Linux kernel with
:func:`exitless.boot.linux.boot_linux`; the guest kit (a PVH ELF without
Linux's notes) keeps the original PVH path of :mod:`exitless.cli`.

On a ``kvm_pvm`` host the kernel parameters that host needs are added (and a
note says so), and a bzImage is unpacked on the host unless
``--decompress guest``.

Exit codes: CMD's status; 2 for a bad kernel/initrd/memory size or a failed
fetch; 1 when the guest stops without reporting a status; 143 on SIGTERM
(the VM is stopped first), 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

EASY_CMDLINE = "console=ttyS0 quiet loglevel=1 panic=-1"
DEFAULT_MODULES = ("virtio_pci", "virtio_blk", "virtio_net")


# --------------------------------------------------------------------------- parser


def register(sub: argparse._SubParsersAction, *, run: argparse.ArgumentParser,
             bench: argparse._SubParsersAction) -> None:
    """Add ``guest fetch`` and ``bench boot``, and teach ``run`` the Linux forms."""
    run.add_argument("--decompress", choices=("auto", "guest", "host"), default="auto",
                     help="bzImage: run its decompressor in the guest, or unpack it on the host "
                          "(auto: host on kvm_pvm hosts, guest elsewhere)")
    run.add_argument("--cache", help="guest cache directory (default $EXITLESS_CACHE or ~/.cache/exitless/guest)")
    run.add_argument("--modules", help="modules directory for --kernel (lib/modules/<kver> or its root)")
    run.add_argument("--boot-log", action="store_true", help="easy form: show the kernel's boot messages too")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                     help="run CMD in the fetched Linux guest and exit with its status")

    guest = sub.add_parser("guest", help="the Linux guest (kernel, modules, busybox)")
    gsub = guest.add_subparsers(dest="guest_command", required=True)
    fetch = gsub.add_parser("fetch", help="download Debian's cloud kernel and busybox into the cache")
    fetch.add_argument("--cache", help="cache directory (default $EXITLESS_CACHE or ~/.cache/exitless/guest)")
    fetch.add_argument("--kernel", help="use this kernel instead of Debian's")
    fetch.add_argument("--modules", help="its modules (lib/modules/<kver> or its root); needs --kernel")
    fetch.add_argument("--busybox", help="use this static busybox")
    fetch.add_argument("--refresh", action="store_true", help="ask apt for newer versions")
    fetch.set_defaults(func=cmd_guest_fetch)

    boot = bench.add_parser("boot", help="time to first kernel line, userspace and power-off, beside QEMU")
    boot.add_argument("--runs", type=int, default=3, help="boots per VMM (the median is reported)")
    boot.add_argument("--json", nargs="?", const="-", help="write the results as JSON (to a file, or stdout)")
    boot.add_argument("--timeout", type=float, default=None,
                      help="seconds per boot (default 60; 1800 for exitless on kvm_pvm, 600 for QEMU TCG)")
    boot.add_argument("--mem", type=int, default=256, help="guest MiB")
    boot.add_argument("--cpus", type=int, default=1)
    boot.add_argument("--cache")
    boot.add_argument("--decompress", choices=("auto", "guest", "host"), default="auto")
    boot.add_argument("--qemu", choices=("auto", "kvm", "tcg", "none"), default="auto",
                      help="QEMU accelerator (auto: try KVM, fall back to TCG and say so)")
    boot.set_defaults(func=cmd_bench_boot)


def wants_linux_loader(args) -> bool:
    """Should ``exitless run`` go through this module (a Linux kernel, or the easy form)?"""
    if getattr(args, "cmd", None) or args.kernel is None:
        return True
    try:
        with open(args.kernel, "rb") as f:
            head = f.read(4)
    except OSError:
        return False          # let the original path report it
    return head != b"\x7fELF" or is_linux_elf(args.kernel)


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


# --------------------------------------------------------------------------- exitless guest fetch


def cmd_guest_fetch(args) -> int:
    from .guest.fetch import GuestFetchError, fetch_guest

    try:
        a = fetch_guest(args.cache, kernel=args.kernel, modules_dir=args.modules, busybox=args.busybox,
                        refresh=args.refresh)
    except (GuestFetchError, ValueError, OSError) as e:
        print(f"exitless: {e}", file=sys.stderr)
        return 2
    print(f"kernel:  {a.vmlinuz} ({a.kernel_version})")
    print(f"modules: {a.modules_dir or '-'}")
    print(f"busybox: {a.busybox}")
    for pkg, ver in a.versions.items():
        print(f"  {pkg} {ver}")
    return 0


# --------------------------------------------------------------------------- exitless run (Linux)


class HostSignal(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class GuestPlan:
    """Everything ``run`` will boot, decided before any VM exists."""

    kernel: Path
    cmdline: str
    initrd: bytes | None = None
    decompress: str = "guest"
    notes: list[str] = field(default_factory=list)


def plan_guest(kernel: str | None, command: list[str], *, append: str = "", initrd: str | None = None,
               cache: str | None = None, modules: str | None = None, decompress: str = "auto",
               flavour: str | None = None, early_printk: bool = False, quiet: bool = True) -> GuestPlan:
    """Resolve kernel, initramfs and command line (fetching the guest if needed)."""
    from .boot.initramfs import build_initramfs
    from .boot.linux import PVM_LIMIT, add_params, host_kernel_params
    from .doctor import kvm_flavour
    from .guest.fetch import fetch_guest

    flavour = flavour or kvm_flavour()
    notes: list[str] = []
    rd: bytes | None = None
    if command:
        if initrd is not None:
            raise ValueError("--initrd and a command (-- CMD) do not mix: the command runs from exitless's initramfs")
        art = fetch_guest(cache, kernel=kernel, modules_dir=modules)
        kpath = art.vmlinuz
        mods = [m for m in DEFAULT_MODULES] if art.modules_root is not None else []
        # kvm_pvm: gunzip in emulated ring 0 took 3.5 minutes for this initramfs; a raw cpio is only copied
        rd = build_initramfs(art.busybox, modules=mods, modules_root=art.modules_root, kver=art.kernel_version,
                             command=shlex.join(command), applets=_applets(art), compress=flavour != "pvm")
        cmdline = EASY_CMDLINE if quiet else EASY_CMDLINE.replace(" quiet loglevel=1", "")
        cmdline = f"{cmdline} {append}".strip()
    else:
        if kernel is None:
            raise ValueError("exitless run needs --kernel, or a command to run in the fetched guest: exitless run -- CMD")
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
        if flavour == "pvm" and _is_bzimage(kpath):
            notes.append("unpacking the bzImage on the host (its decompressor would take minutes under emulation; "
                         "--decompress guest to run it anyway)")
    if flavour == "pvm":
        notes.append(PVM_LIMIT)
    return GuestPlan(kpath, cmdline, rd, decompress, notes)


def _applets(art) -> tuple[str, ...]:
    from .boot.initramfs import DEFAULT_APPLETS

    have = set(art.busybox_applets)
    return tuple(a for a in DEFAULT_APPLETS if not have or a in have)


def _read_initrd(path: str) -> bytes:
    from .boot.pvh import KernelImageError

    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise KernelImageError(f"initrd {path}: {e.strerror}") from e


def _is_bzimage(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(0x206)
    except OSError:
        return False
    return head[0x202:0x206] == b"HdrS"


def attach_disks(machine, disks: list[str]) -> None:
    """``--disk`` specs (see :mod:`exitless.disk`) -> virtio-blk PCI devices: /dev/vda, vdb... in the guest."""
    if not disks:
        return
    from .disk import DiskSpec, add_disk

    for spec in [DiskSpec.parse(d) for d in disks]:
        add_disk(machine, spec)


class CommandOutput:
    """Console filter for the easy form: only what CMD prints reaches stdout.

    Lines before the initramfs's READY marker (kernel messages) and from the
    exit-status marker on are held back (``BootConsole`` keeps them all); a
    partial line is passed through as soon as it can no longer be the marker,
    so output without newlines still streams.  ``\\r\\n`` becomes ``\\n``.
    """

    def __init__(self, write=None):
        from .boot.initramfs import EXIT_MARKER, READY_MARKER

        self.write = write or _stdout
        self.ready = READY_MARKER.encode()
        self.marker = EXIT_MARKER.encode()
        self.state = "boot"        # boot -> command -> done
        self.line = bytearray()    # boot: the current line; command: the held start of the current line
        self.passing = False       # command: the current line is being streamed
        self.cr = False

    def __call__(self, data: bytes) -> None:
        for b in data:
            if self.state == "boot":
                self._boot_byte(b)
            elif self.state == "command":
                if self.cr:
                    self.cr = False
                    if b != 0x0A:
                        self._command_byte(0x0D)
                if b == 0x0D:
                    self.cr = True
                else:
                    self._command_byte(b)

    def _boot_byte(self, b: int) -> None:
        if b == 0x0A:
            if bytes(self.line).strip() == self.ready:
                self.state = "command"
            self.line.clear()
        elif b != 0x0D:
            self.line.append(b)

    def _command_byte(self, b: int) -> None:
        if b == 0x0A:
            if not self.passing:
                if bytes(self.line).startswith(self.marker):
                    self.state = "done"
                    return
                self._emit(bytes(self.line))
            self._emit(b"\n")
            self.line.clear()
            self.passing = False
        elif self.passing:
            self._emit(bytes([b]))
        else:
            self.line.append(b)
            held = bytes(self.line)
            if not (self.marker.startswith(held) or held.startswith(self.marker)):
                self._emit(held)
                self.line.clear()
                self.passing = True

    def _emit(self, data: bytes) -> None:
        if data:
            self.write(data)


def _stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _stderr(msg: str) -> None:
    print(f"exitless: {msg}", file=sys.stderr, flush=True)


def cmd_run_linux(args) -> int:
    """``exitless run`` for Linux kernels and the easy form; see the module docstring for exit codes."""
    from .boot.bzimage import BzImageError
    from .boot.initramfs import EXIT_MARKER, InitramfsError, parse_exit_status
    from .boot.linux import BootConsole, boot_linux
    from .boot.pvh import KernelImageError
    from .guest.fetch import GuestFetchError
    from .vm import Machine, VmConfig

    command = list(getattr(args, "cmd", None) or [])
    if command and command[0] == "--":
        command = command[1:]
    easy = bool(command)
    try:
        plan = plan_guest(args.kernel, command, append=args.append, initrd=args.initrd,
                          cache=getattr(args, "cache", None), modules=getattr(args, "modules", None),
                          decompress=getattr(args, "decompress", "auto"), quiet=not getattr(args, "boot_log", False))
    except (GuestFetchError, KernelImageError, BzImageError, InitramfsError, ValueError, OSError) as e:
        _stderr(str(e))
        return 2
    for note in plan.notes:
        _stderr(f"note: {note}")

    if easy and not getattr(args, "boot_log", False):
        sink = CommandOutput()
    else:
        sink = _stdout
    console = BootConsole(sink)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(signum, frame):
        for s in previous:                # one stop is enough: the VM is torn down next
            signal.signal(s, signal.SIG_IGN)
        raise HostSignal(signum)

    exit = None
    try:
        for s in previous:
            signal.signal(s, on_signal)
        with Machine(VmConfig(mem_mib=args.mem, cpus=args.cpus, console=console)) as m:
            boot_linux(m, plan.kernel, plan.cmdline, plan.initrd, decompress=plan.decompress)
            attach_disks(m, getattr(args, "disk", []) or [])
            exit = m.run(timeout=args.timeout)
            if getattr(args, "verbose", False):
                counts = m.fallback_counts()
                _stderr(f"the VM stopped: {exit.kind}; instruction fallback: "
                        + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "never used"))
    except HostSignal as e:
        _stderr(f"{e} received: the VM was stopped" + (" (the command's status is unknown)" if easy else ""))
        return 128 + e.signum
    except (KernelImageError, BzImageError, ValueError, OSError) as e:
        _stderr(str(e))
        return 2
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

    status = parse_exit_status(console.text, EXIT_MARKER)
    if status is not None:
        return status
    if not easy:
        if exit.kind == "debug-exit":
            return exit.status & 0xFF
        if exit.ok:
            return 0
    _stderr(f"the VM stopped ({exit.kind}: {exit.message})" +
            (" before the command reported its status" if easy else ""))
    if exit.registers:
        print(exit.registers, file=sys.stderr)
    if easy and not getattr(args, "boot_log", False):
        tail = console.tail(25).strip()
        print("exitless: the console's last lines:\n" + tail if tail else
              "exitless: the console showed nothing (the kernel runs with 'quiet'; --boot-log shows its messages)",
              file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- exitless bench boot


def cmd_bench_boot(args) -> int:
    from .bench import boot as B

    return B.main(args)
