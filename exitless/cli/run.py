"""``exitless run``: boot a kernel with virtio-blk disks, COM1 on the terminal, and exit with the guest's status.

Three forms, dispatched by :func:`cmd_run` alone:

* ``run --kernel guestkit.elf``: a PVH ELF that is not Linux (the guest kit) boots
  through :meth:`exitless.vm.Machine.boot_pvh`; the guest's debug-exit status is
  the exit status;
* ``run --kernel bzImage|vmlinux``: a Linux kernel boots with
  :func:`exitless.boot.linux.boot_linux` (and the PC devices Linux expects);
* ``run -- CMD ARGS...`` (no ``--kernel``), the easy form: Debian's cloud kernel
  with an initramfs that runs CMD (see :mod:`exitless.guest.plan`); only CMD's
  output reaches stdout and ``exitless`` exits with CMD's status.

Every form attaches its devices through :func:`attach_devices`.

Exit codes: the guest's (or CMD's) status; 2 for a bad kernel/initrd/disk/memory
size or a failed fetch; 1 when the guest stops without reporting a status; 143 on
SIGTERM (the VM is stopped first), 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import signal
import sys

from ..errors import ExitlessError
from ..argtypes import output_path
from .options import add_disk_argument, add_nvme_argument, mem_size, positive_float, positive_int
from .progress import stderr_progress


def register(sub) -> None:
    """Add ``run`` to the top-level subparsers."""
    run = sub.add_parser("run", help="boot a kernel (the guest kit, a bzImage or a vmlinux), or run a command "
                                     "in the fetched Linux guest")
    run.add_argument("--kernel", help="kernel: a bzImage, a vmlinux (PVH) or the guest kit; "
                     "default: the fetched Debian kernel")
    run.add_argument("--append", default="", help="kernel command line (the guest kit's: APP [key=value...]; default empty)")
    run.add_argument("--initrd", help="an initramfs (cpio, optionally compressed) for a Linux --kernel (the guest kit "
                                      "reads none; -- CMD brings its own)")
    run.add_argument("--mem", type=mem_size, default=256, help="guest RAM (default 256M)")
    run.add_argument("--cpus", type=positive_int, default=1, help="guest vCPUs (default 1)")
    run.add_argument("--timeout", type=positive_float, default=None,
                     help="stop the guest after this many seconds (default: no limit)")
    run.add_argument("--one-sidecore", action="store_true",
                     help="disks, NVMe controllers and NICs on the same polling mode share one sidecore thread "
                          "(default: one each)")
    run.add_argument("--sidecore", metavar="PATH",
                     help="hand the polled disks and NVMe controllers' I/O queues (io=shared|poll|adaptive) "
                          "and the NICs' queue pairs (io=poll|adaptive) to the sidecore service listening on "
                          "PATH (exitless sidecore --socket PATH) instead of a sidecore of this VMM")
    add_disk_argument(run, action="append", default=[],
                      help="a virtio-blk disk (repeatable: /dev/vda, vdb...); io is its I/O path (default ioeventfd), "
                           "queues its number of virtqueues")
    add_nvme_argument(run, action="append", default=[],
                      help="an NVMe controller with one namespace (repeatable: /dev/nvme0n1, nvme1n1...); io is "
                           "its doorbells' I/O path (default ioeventfd; the polled paths need the driver's "
                           "shadow doorbells, which Linux uses), queues its I/O queue pairs (default 4)")
    run.add_argument("--net", type=_net_spec, action="append", default=[], metavar="SPEC",
                     help="a virtio-net NIC on a TAP (repeatable); SPEC is tap=NAME[,mac=MAC][,io=PATH]"
                          "[,queues=N][,netns=NS]: io is its I/O path (default ioeventfd), queues its queue pairs, "
                          "netns the network namespace the TAP lives in")
    run.add_argument("--decompress", choices=("auto", "guest", "host"), default="auto",
                     help="bzImage: run its decompressor in the guest, or unpack it on the host "
                          "(auto: host on kvm_pvm hosts, guest elsewhere; default auto)")
    run.add_argument("--cache", help="-- CMD: guest cache directory (default $EXITLESS_CACHE or "
                                     "~/.cache/exitless/guest)")
    run.add_argument("--modules", help="-- CMD with --kernel: that kernel's modules directory (lib/modules/<kver> or "
                                       "its root)")
    run.add_argument("--boot-log", action="store_true", help="easy form: show the kernel's boot messages too")
    run.add_argument("--stats", metavar="FILE", type=output_path,
                     help="guest kit: when the VM stops, write KVM's counters over the guest's measured loop (its "
                          "start and end marks on port 0x511) as JSON to FILE: {\"window\": {\"kvm\": {\"exits\": "
                          "...}, \"vmm_cpu\": s, \"vcpu_cpu\": s, \"wall\": s} or null, \"exit\": kind}")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                     help="run CMD in the fetched Linux guest and exit with its status")
    run.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    """The one dispatch of ``run``: a Linux kernel or the easy form, else a PVH ELF (the guest kit)."""
    from ..boot.files import check_image
    from ..guest.plan import is_linux_kernel

    if args.kernel is not None:      # a missing kernel is reported as such, not as a form it was taken for
        check_image(args.kernel, "", args.mem << 20)
    form = ("easy" if args.cmd else "linux") if wants_linux_loader(args) else "guestkit"
    if form == "easy" and args.kernel is not None and not is_linux_kernel(args.kernel):
        raise RunOptionError(f"-- CMD needs a Linux --kernel (a bzImage) to run the command in: {args.kernel} is not "
                             "Linux (the guest kit runs its own apps: --append 'APP [key=value...]', no -- CMD)")
    refuse_unused_options(args, form)
    if args.initrd is not None:
        check_image(args.initrd, "initrd", args.mem << 20)
    return _run_pvh(args) if form == "guestkit" else _run_linux(args)


class RunOptionError(ExitlessError, ValueError):
    """An option of ``run`` that the chosen form (guest kit, Linux kernel, ``-- CMD``) would ignore."""


#: The options each form of ``run`` uses, beyond the common ones: option -> (its dest, the forms that
#: use it, why the others do not).  An option a form would ignore is refused: a user who writes
#: ``--initrd`` for the guest kit, or ``--stats`` for Linux, expects it to do something.
FORM_OPTIONS = {
    "--initrd": ("initrd", ("linux",), "the guest kit reads no initramfs, and -- CMD runs from exitless's own"),
    "--modules": ("modules", ("easy",), "it is the modules directory of the -- CMD form's --kernel"),
    "--cache": ("cache", ("easy",), "only the -- CMD form boots the fetched guest"),
    "--boot-log": ("boot_log", ("easy",), "only the -- CMD form hides the kernel's messages"),
    "--decompress": ("decompress", ("linux", "easy"), "only a bzImage has a decompressor"),
    "--stats": ("stats", ("guestkit",), "only the guest kit marks its measured loop on port 0x511"),
}
FORM_NAMES = {"guestkit": "the guest kit (a PVH ELF that is not Linux)", "linux": "a Linux --kernel",
              "easy": "-- CMD"}


def refuse_unused_options(args, form: str) -> None:
    """Raise :class:`RunOptionError`, before anything boots, for an option given (not at its default)
    that ``form`` -- ``guestkit``, ``linux`` or ``easy`` -- does not use (:data:`FORM_OPTIONS`), and
    for ``--sidecore`` without a disk or NIC on a polled path (the service would serve nothing);
    :class:`~exitless.net.spec.NetSpecError` for a shared-path NIC with ``--sidecore``."""
    from ..disk import DEFAULT_IO
    from ..net.spec import refuse_shared_on_service
    from ..sidecore.paths import REMOTE_NIC_PATHS, REMOTE_PATHS

    for option, (dest, forms, why) in FORM_OPTIONS.items():
        value = getattr(args, dest)
        if form not in forms and value not in (None, False, "auto"):
            raise RunOptionError(f"{option} does nothing with {FORM_NAMES[form]}: {why}")
    refuse_shared_on_service(args.net, args.sidecore)
    if args.sidecore and not any(d.io in REMOTE_PATHS for d in [*args.disk, *args.nvme]) \
            and not any(n.io in REMOTE_NIC_PATHS for n in args.net):
        raise RunOptionError(f"--sidecore {args.sidecore}: no --disk, --nvme or --net on a polled path to hand over "
                             f"(add ,io={'|'.join(REMOTE_PATHS)} to a --disk or --nvme or ,io={'|'.join(REMOTE_NIC_PATHS)} "
                             f"to a --net; the default is io={DEFAULT_IO})")


def wants_linux_loader(args) -> bool:
    """Does ``run`` boot Linux (a bzImage or vmlinux given, or the easy form ``-- CMD``)?"""
    from ..guest.plan import is_linux_kernel

    return bool(args.cmd) or args.kernel is None or is_linux_kernel(args.kernel)


def attach_devices(machine, args) -> None:
    """Plug the devices the options ask for (``--disk``…) into ``machine``: every ``run`` form calls this.

    A new device option (``--nvme``, ``--net``) adds its argument in :func:`register` and its
    attach call here, so that the guest kit and Linux get it alike.
    """
    from ..disk import add_disks, refuse_shared_images
    from ..nvme import add_nvmes

    refuse_shared_images([*args.disk, *args.nvme])
    groups = {} if args.one_sidecore else None    # one sidecore per polling mode, for disks, NVMe and NICs alike
    add_disks(machine, args.disk, one_sidecore=args.one_sidecore, groups=groups, service=args.sidecore)
    add_nvmes(machine, args.nvme, groups=groups, service=args.sidecore)
    if args.net:
        from ..net.spec import add_nics

        add_nics(machine, args.net, groups=groups, service=args.sidecore)
    for group in (groups or {}).values():
        group.start_on(machine)


def _net_spec(text: str):
    """argparse ``type=`` for ``--net``: a :class:`~exitless.net.spec.NetSpec`, or a usage error."""
    from ..net.spec import NetSpec, NetSpecError

    try:
        return NetSpec.parse(text)
    except NetSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _run_pvh(args) -> int:
    from ..devices.legacy.bench_marker import write_window
    from ..guestkit import guestkit_cmdline
    from ..vm import Machine, VmConfig

    with Machine(VmConfig(mem_mib=args.mem, cpus=args.cpus)) as m:
        attach_devices(m, args)
        m.boot_pvh(args.kernel, guestkit_cmdline(args.append), args.initrd)
        exit = m.run(timeout=args.timeout)
        if args.stats:
            write_window(args.stats, m.bench_marker.window(), exit.kind)
    if exit.kind == "debug-exit":
        return exit.status & 0xFF
    if exit.ok:
        return 0
    print(f"\nexitless: the VM stopped: {exit.kind}: {exit.message}", file=sys.stderr)
    if exit.registers:
        print(exit.registers, file=sys.stderr)
    return 1


class HostSignal(Exception):
    """SIGTERM or SIGINT arrived while the VM ran (raised from the signal handler to tear the VM down)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _run_linux(args) -> int:
    from ..boot.initramfs import EXIT_MARKER, parse_exit_status
    from ..boot.linux import BootConsole, boot_linux
    from ..guest.plan import plan_guest
    from ..vm import Machine, VmConfig, stdout_console

    command = list(args.cmd or [])
    if command and command[0] == "--":
        command = command[1:]
    if command and not command[0].strip():
        raise RunOptionError("-- CMD: the command is an empty string")
    easy = bool(command)
    plan = plan_guest(args.kernel, command, append=args.append, initrd=args.initrd, cache=args.cache,
                      modules=args.modules, decompress=args.decompress, quiet=not args.boot_log,
                      progress=stderr_progress())

    sink = CommandOutput() if easy and not args.boot_log else stdout_console
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
            for note in plan.notes:          # after the kernel loaded: a bad image's error comes alone
                _stderr(f"note: {note}")
            attach_devices(m, args)
            exit = m.run(timeout=args.timeout)
            if args.verbose:
                counts = m.fallback_counts()
                _stderr(f"the VM stopped: {exit.kind}; instruction fallback: "
                        + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "never used"))
    except HostSignal as e:
        _stderr(f"{e} received: the VM was stopped" + (" (the command's status is unknown)" if easy else ""))
        return 128 + e.signum
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
    if easy and not args.boot_log:
        tail = console.tail(25).strip()
        print("exitless: the console's last lines:\n" + tail if tail else
              "exitless: the console showed nothing (the kernel runs with 'quiet'; --boot-log shows its messages)",
              file=sys.stderr)
    return 1


class CommandOutput:
    """Console filter for the easy form: only what CMD prints reaches stdout.

    Lines before the initramfs's READY marker (kernel messages) and from the
    exit-status marker on are held back (``BootConsole`` keeps them all); a
    partial line is passed through as soon as it can no longer be the marker,
    so output without newlines still streams.  ``\\r\\n`` becomes ``\\n``.
    """

    def __init__(self, write=None):
        from ..boot.initramfs import EXIT_MARKER, READY_MARKER
        from ..vm import stdout_console

        self.write = write or stdout_console
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
        elif b != 0x0D and len(self.line) < _HELD_LINE_MAX:
            # a longer line cannot be the READY marker: what is held stays bounded
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
        elif len(self.line) < _HELD_LINE_MAX:
            # the held start of a line is at most the marker and its status: bounded
            self.line.append(b)
            held = bytes(self.line)
            if not (self.marker.startswith(held) or held.startswith(self.marker)):
                self._emit(held)
                self.line.clear()
                self.passing = True

    def _emit(self, data: bytes) -> None:
        if data:
            self.write(data)


_HELD_LINE_MAX = 4096      # bytes of one console line held back, whatever the guest prints


def _stderr(msg: str) -> None:
    print(f"exitless: {msg}", file=sys.stderr, flush=True)
