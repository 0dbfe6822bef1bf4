"""The ``exitless`` command line: package layout, the ``--disk`` grammar, errors, ``--one-sidecore``, progress.

Guests here never reach userspace (this kind of host cannot run Linux userspace):
where a test needs the devices a ``run`` attaches, ``Machine.run`` is replaced by a
probe that looks at the machine and stops it.
"""
from __future__ import annotations

import argparse
import errno
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitless import cli
from exitless.disk import MAX_QUEUES, DiskSpec, DiskSpecError, syntax
from exitless.errors import ExitlessError
from exitless.exits import VmExit
from exitless.sidecore.paths import PATHS

ROOT = Path(__file__).resolve().parents[1]


def exitless(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exitless", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, cwd=ROOT)


# --------------------------------------------------------------------------- layout


def _import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at any depth of the file: function-level imports count)."""
    mods = {}
    for f in package.rglob("*.py"):
        parts = list(f.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = f
    graph = {}
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:        # `from . import x` imports the submodule x, not the package
                    dep = f"{mod}.{alias.name}" if f"{mod}.{alias.name}" in mods else mod
                    if dep in mods and dep != name:
                        deps.add(dep)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods and a.name != name)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cli_package_has_no_import_cycles() -> None:
    """No cycle through the CLI or the guest planner (bench/boot.py and the CLI both use the planner)."""
    graph = _import_graph(ROOT / "exitless")
    assert "exitless.cli.run" in graph and "exitless.guest.plan" in graph
    involved = [c for c in _cycles(graph)
                if any(m.startswith(("exitless.cli", "exitless.guest")) or m == "exitless.bench.boot" for m in c)]
    assert involved == []
    # the command modules import nothing from the package's __init__ (it imports them)
    assert [m for m in graph if m.startswith("exitless.cli.") and "exitless.cli" in graph[m]] == ["exitless.cli.__main__"]


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_entry_points() -> None:
    for args in (["-m", "exitless", "--version"], ["-m", "exitless.cli", "--version"]):
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 0 and r.stdout.startswith("exitless "), r.stderr
    assert 'exitless = "exitless.cli:main"' in (ROOT / "pyproject.toml").read_text()


# --------------------------------------------------------------------------- the --disk grammar

# paths full of the grammar's own characters: commas (written ',,'), '=', option names
paths = st.lists(st.one_of(st.sampled_from([",", "=", "ro", "io=poll", "/"]),
                           st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")),
                 min_size=1, max_size=20).map("".join)
specs = st.builds(DiskSpec, path=paths, read_only=st.booleans(), direct=st.booleans(), io=st.sampled_from(PATHS),
                  queues=st.integers(1, MAX_QUEUES))


def _fields(spec: DiskSpec) -> tuple[str, list[str]]:
    """(the path as written, the option fields) of ``spec.format()``."""
    head = spec.path.replace(",", ",,")
    text = spec.format()
    assert text.startswith(head)
    return head, text[len(head):].split(",")[1:]


@given(specs, st.randoms(use_true_random=False))
def test_disk_spec_round_trips(spec: DiskSpec, rnd) -> None:
    assert DiskSpec.parse(spec.format()) == spec
    head, opts = _fields(spec)
    rnd.shuffle(opts)                                  # options in any order mean the same disk
    assert DiskSpec.parse(",".join([head, *opts])) == spec


def _good(opt: str) -> bool:
    key, _, value = opt.partition("=")
    return (opt in ("ro", "direct") or (key == "io" and value in PATHS)
            or (key == "queues" and value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_QUEUES))


def _bad_options() -> st.SearchStrategy[str]:
    other = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=",\0"), min_size=1, max_size=12)
    near = st.one_of(st.sampled_from(["ro=1", "direct=yes", "io=", "io=fast", "queues=0", "queues=17", "queues=x",
                                      "queues=-1", "queues=\uff11", "RO", "io"]),
                     other.map(lambda s: f"io={s}"), other.map(lambda s: f"queues={s}"), other)
    return near.filter(lambda o: not _good(o))


@given(specs, _bad_options(), st.data())
def test_disk_spec_refuses_a_bad_option_and_names_it(spec: DiskSpec, bad: str, data) -> None:
    head, opts = _fields(spec)
    opts.insert(data.draw(st.integers(0, len(opts))), bad)
    with pytest.raises(DiskSpecError) as ei:
        DiskSpec.parse(",".join([head, *opts]))
    assert repr(bad) in str(ei.value), str(ei.value)


@given(specs.filter(lambda s: s.read_only or s.direct or s.io != "ioeventfd" or s.queues != 1))
def test_disk_spec_refuses_repeats_and_unaccepted_options(spec: DiskSpec) -> None:
    head, opts = _fields(spec)
    with pytest.raises(DiskSpecError, match="given twice"):
        DiskSpec.parse(",".join([head, *opts, opts[0]]))
    serve = ("ro", "direct")
    if spec.io != "ioeventfd" or spec.queues != 1:
        with pytest.raises(DiskSpecError, match="not accepted here"):
            DiskSpec.parse(spec.format(), serve)
    else:
        assert DiskSpec.parse(spec.format(), serve) == spec


def test_disk_spec_refuses_no_path_and_empty_options() -> None:
    for text, what in ((",ro", "no path"), ("", "no path"), ("x,", "empty option"), ("x,,,", "empty option")):
        with pytest.raises(DiskSpecError, match=what):
            DiskSpec.parse(text)
    assert DiskSpec.parse("a,,b,ro") == DiskSpec("a,b", read_only=True)


def _subparsers(parser: argparse.ArgumentParser, prefix: str = ""):
    yield prefix.strip(), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, f"{prefix} {name}")


def test_every_disk_option_uses_the_one_grammar_and_shows_its_syntax() -> None:
    with_disk = {}
    for name, parser in _subparsers(cli.build_parser()):
        disk = [a for a in parser._actions if "--disk" in a.option_strings]
        if disk:
            with_disk[name] = disk[0]
            assert "SPEC is PATH[,ro][,direct]" in disk[0].help, name
            assert isinstance(disk[0].type("img,ro"), DiskSpec), name
    assert {"run", "serve blk"} <= set(with_disk)
    assert syntax() in with_disk["run"].help and syntax(("ro", "direct", "lock")) + " " in with_disk["serve blk"].help
    with pytest.raises(argparse.ArgumentTypeError, match="'img,io=poll': option 'io=poll' is not accepted here"):
        with_disk["serve blk"].type("img,io=poll")


def test_bad_disk_spec_exits_2_naming_the_part() -> None:
    r = exitless("run", "--kernel", "k", "--disk", "img,ro,queues=99")
    assert r.returncode == 2 and "option 'queues=99'" in r.stderr and "Traceback" not in r.stderr
    r = exitless("serve", "blk", "--socket", "s", "--disk", "img,io=poll")
    assert r.returncode == 2 and "option 'io=poll' is not accepted here" in r.stderr


# --------------------------------------------------------------------------- errors


def test_user_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    """Bad input is reported in one line naming it, exit 2 (no VM needed for these)."""
    r = exitless("run", "--kernel", str(tmp_path / "nope.elf"), "--cpus", "0")
    assert (r.returncode, r.stderr) == (2, "exitless run: error: argument --cpus: 0 must be > 0 (see exitless run --help)\n")
    from exitless.guestkit import guestkit_path

    r = exitless("run", "--kernel", str(guestkit_path()), "--cpus", "65")
    assert (r.returncode, r.stderr) == (2, "exitless: --cpus 65: between 1 and 64\n")
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    r = exitless("serve", "blk", "--socket", str(tmp_path / "no-such-dir" / "s.sock"), "--disk", str(disk))
    assert r.returncode == 2 and r.stderr.startswith("exitless: ") and "cannot listen here" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
    r = exitless("serve", "blk", "--socket", str(tmp_path / "s.sock"), "--disk", str(tmp_path / "nope.img"))
    assert r.returncode == 2 and f"{tmp_path / 'nope.img'}: virtio-blk backing file does not exist" in r.stderr


@pytest.mark.kvm
def test_missing_files_given_to_run_exit_2(tmp_path: Path) -> None:
    from exitless.guestkit import guestkit_path

    kit = str(guestkit_path())
    for args, msg in ((["--kernel", str(tmp_path / "nope")], "nope: No such file or directory"),
                      (["--kernel", kit, "--initrd", str(tmp_path / "rd")], "initrd"),
                      (["--kernel", kit, "--disk", str(tmp_path / "d.img")], "backing file does not exist")):
        r = exitless("run", *args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_errors_are_exitless_errors() -> None:
    """The classes the CLI reports as the user's mistake all derive from ExitlessError."""
    from exitless.devices.pci.root import PciResourceError
    from exitless.devices.virtio.blk import BackingFileError, BackingFileMissing
    from exitless.guest.plan import GuestPlanError
    from exitless.vm import VmConfigError

    for cls in (PciResourceError, BackingFileError, BackingFileMissing, GuestPlanError, VmConfigError, DiskSpecError):
        assert issubclass(cls, ExitlessError), cls
    assert issubclass(BackingFileMissing, FileNotFoundError)


def test_too_many_pci_devices_is_the_users_mistake() -> None:
    """Slots run out after 31 devices (this raised StopIteration); a BAR too big for the window is refused too."""
    from exitless.bus import Bus
    from exitless.devices.pci.device import Bar, PciDevice
    from exitless.devices.pci.root import PciResourceError, PciRoot

    def function(bars=()):
        return PciDevice(vendor=0x1AF4, device=0x1042, class_code=0x018000, bars=list(bars), interrupt_pin=0)

    root = PciRoot(Bus("pio"))
    with pytest.raises(PciResourceError, match="window is full: no room for PciDevice's BAR0"):
        root.add(function([Bar(0, 1 << 40)]))
    for _ in range(31):
        root.add(function())
    with pytest.raises(PciResourceError, match="all 31 PCI slots are taken"):
        root.add(function())


def test_an_internal_bug_is_not_reported_as_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain ValueError deep inside (here: building the easy form's initramfs) surfaces as itself."""
    import exitless.boot.initramfs as initramfs

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(initramfs, "build_initramfs", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["run", "--", "true"])


@pytest.mark.kvm
def test_an_internal_bug_in_the_vm_surfaces_with_its_traceback(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from exitless.guestkit import guestkit_path
    from exitless.sidecore.engine import SidecoreGroup

    def broken(self):
        raise RuntimeError("sidecore bug")

    monkeypatch.setattr(SidecoreGroup, "start", broken)
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    with pytest.raises(RuntimeError, match="sidecore bug"):
        cli.main(["run", "--kernel", str(guestkit_path()), "--disk", f"{disk},io=poll"])


# --------------------------------------------------------------------------- --one-sidecore on every run path


def _serving_sidecores(machine) -> int:
    """Sidecores serving the machine's virtio devices: shared groups plus each device's own."""
    from exitless.devices.virtio.pci import VirtioPci
    from exitless.sidecore.engine import SidecoreGroup

    shared = [w for w in machine.workers if isinstance(w, SidecoreGroup)]
    own = [w for w in machine.workers if isinstance(w, VirtioPci) and w.sidecore is not None]
    assert len([w for w in machine.workers if isinstance(w, VirtioPci)]) == 2
    return len(shared) + len(own)


@pytest.mark.kvm
@pytest.mark.parametrize("kernel", ["guestkit", "linux"])
def test_one_sidecore_is_honoured_by_every_run_path(kernel: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from exitless.vm import Machine

    if kernel == "guestkit":
        from exitless.guestkit import guestkit_path

        kpath, extra = str(guestkit_path()), []
    else:
        from exitless.guest.fetch import fetch_guest

        kpath, extra = str(fetch_guest().vmlinuz), ["--decompress", "guest"]   # no host-side unpacking: fast
    seen = []

    def probe(self, timeout=None):
        seen.append(_serving_sidecores(self))
        return VmExit("debug-exit", 0)

    monkeypatch.setattr(Machine, "run", probe)
    disks = []
    for i in range(2):
        img = tmp_path / f"d{i}.img"
        img.write_bytes(bytes(1 << 16))
        disks += ["--disk", f"{img},io=poll"]
    argv = ["run", "--kernel", kpath, *extra, *disks]
    assert cli.main(argv + ["--one-sidecore"]) == 0
    assert cli.main(argv) == 0
    assert seen == [1, 2]


@pytest.mark.kvm
def test_one_sidecore_takes_nics_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--one-sidecore``: a polled NIC joins the polled disk's sidecore (one thread, not two)."""
    from exitless.devices.virtio.pci import VirtioPci
    from exitless.guestkit import guestkit_path
    from exitless.sidecore.engine import SidecoreGroup
    from exitless.vm import Machine

    try:
        import netns as N
    except ImportError:  # pragma: no cover - tests/ as a package
        from tests import netns as N
    if N.can_make_netns():
        pytest.skip(N.can_make_netns())
    seen = []

    def probe(self, timeout=None):
        groups = [w for w in self.workers if isinstance(w, SidecoreGroup)]
        own = [w for w in self.workers if isinstance(w, VirtioPci) and w.sidecore is not None]
        seen.append((len(groups), len(own), sum(len(g.pollables) for g in groups)))
        return VmExit("debug-exit", 0)

    monkeypatch.setattr(Machine, "run", probe)
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 16))
    with N.netns_with_tap("exlcli0") as ns:
        argv = ["run", "--kernel", str(guestkit_path()), "--disk", f"{img},io=poll",
                "--net", f"tap=exlcli0,io=poll,netns={ns}"]
        assert cli.main(argv + ["--one-sidecore"]) == 0
        assert cli.main(argv) == 0
    (groups, own, pollables), (groups2, own2, _) = seen
    assert (groups, own) == (1, 0) and pollables >= 3     # the disk's queue, the NIC's RX, TX and TAP
    assert (groups2, own2) == (0, 2)


# --------------------------------------------------------------------------- progress


class _Recorder:
    """A Progress that records its steps and updates."""

    def __init__(self):
        self.steps: list[str] = []
        self.updates: list[int] = []

    def step(self, description: str, total: int | None = None):
        from contextlib import contextmanager

        @contextmanager
        def cm():
            self.steps.append(description)
            yield self.updates.append
        return cm()


def test_terminal_progress_shows_finished_steps_only() -> None:
    import io

    from rich.console import Console

    from exitless.cli.progress import TerminalProgress

    out = io.StringIO()
    p = TerminalProgress(Console(file=out, force_terminal=True, width=100))
    with p.step("downloading 1 Debian package(s)", total=3000) as update:
        update(1500)
        update(3000)
    with pytest.raises(OSError):
        with p.step("unpacking a.deb"):
            raise OSError("disk full")
    text = _plain(out.getvalue())
    assert "✓ downloading 1 Debian package(s) (" in text and "✓ unpacking" not in text


def test_run_tick_sees_the_whole_download(tmp_path: Path) -> None:
    from exitless.guest.fetch import _run, _tree_bytes

    seen = []
    r = _run(["sh", "-c", "head -c 3000 /dev/zero > a; head -c 1000 /dev/zero > b"], cwd=tmp_path,
             tick=lambda: seen.append(_tree_bytes(tmp_path)))
    assert r.returncode == 0 and seen[-1] == 4000 and seen == sorted(seen)


def test_the_easy_form_reports_building_its_initramfs() -> None:
    from exitless.guest.plan import plan_guest

    rec = _Recorder()
    plan = plan_guest(None, ["true"], flavour="vmx", progress=rec)
    assert plan.initrd and any(s.startswith("building the initramfs") for s in rec.steps), rec.steps


def _plain(terminal: str) -> str:
    """Terminal output without its escape sequences."""
    import re

    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal)


def _pty_stderr(argv: list[str]) -> tuple[int, str, str]:
    """Run ``exitless argv`` with stderr on a pseudo-terminal: (status, stdout, stderr as the terminal got it)."""
    master, slave = os.openpty()
    p = subprocess.Popen([sys.executable, "-m", "exitless", *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=slave, cwd=ROOT, env=dict(os.environ, COLUMNS="200"))   # a wide terminal: no wrap
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:          # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out = p.stdout.read().decode()
    return p.wait(60), out, b"".join(chunks).decode(errors="replace")


def test_guest_fetch_shows_progress_on_a_terminal_only(tmp_path: Path) -> None:
    """A module tree without modules.dep is copied into the cache and depmod-ed: a long step."""
    from exitless.guest.fetch import fetch_guest

    guest = fetch_guest()
    tree = tmp_path / "lib" / "modules" / guest.kernel_version
    for ko in ("kernel/drivers/block/virtio_blk.ko", "kernel/drivers/virtio/virtio.ko",
               "kernel/drivers/virtio/virtio_ring.ko"):
        src = next(guest.modules_dir.glob(ko + "*"))
        (tree / ko).parent.mkdir(parents=True, exist_ok=True)
        (tree / ko).with_name(src.name).write_bytes(src.read_bytes())
    argv = ["guest", "fetch", "--kernel", str(guest.vmlinuz), "--modules", str(tree), "--busybox", str(guest.busybox)]
    status, out, err = _pty_stderr(argv + ["--cache", str(tmp_path / "tty-cache")])
    assert status == 0 and f"kernel:  {guest.vmlinuz}" in out
    assert f"✓ copying the {guest.kernel_version} modules into the cache, generating modules.dep (" in _plain(err), err
    r = exitless(*argv, "--cache", str(tmp_path / "pipe-cache"))
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == out.replace(str(tmp_path / "tty-cache"), str(tmp_path / "pipe-cache"))


def test_command_output_holds_a_bounded_line_whatever_the_guest_prints():
    """A guest that never ends a line (before READY, or after the exit marker) cannot grow the VMM's memory."""
    from exitless.boot.initramfs import EXIT_MARKER, READY_MARKER
    from exitless.cli.run import CommandOutput

    out = []
    co = CommandOutput(out.append)
    co(b"x" * 200_000)                                    # kernel noise with no newline
    assert len(co.line) <= 4096
    co(b"\n" + READY_MARKER.encode() + b"\n")
    assert co.state == "command"
    co(EXIT_MARKER.encode() + b"7" * 200_000)            # the marker, then no newline ever
    assert len(co.line) <= 4096 and co.state == "command"
    co(b"\n")
    assert co.state == "done" and out == []


def _exitless_errors() -> list[type]:
    """Every ExitlessError subclass of the package (each module imported)."""
    import importlib
    import pkgutil

    import exitless
    from exitless.errors import ExitlessError

    for mod in pkgutil.walk_packages(exitless.__path__, "exitless."):
        if ".fuzz" in mod.name or mod.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(mod.name)
        except ImportError:
            continue
    found, todo = [], [ExitlessError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


@settings(max_examples=50, deadline=None)
@given(err=st.sampled_from([errno.ENOENT, errno.EPROTO, errno.EINVAL, errno.EACCES]),
       message=st.text(min_size=1, max_size=40).filter(str.strip))
def test_an_os_error_of_ours_prints_its_message_alone(err, message) -> None:
    """``run --sidecore /nonexistent`` printed "exitless: [Errno 2] cannot reach ...": every ExitlessError
    that is an OSError, raised as (errno, message), prints the message alone."""
    from exitless.kvm.syscall import KvmError

    oserrors = [c for c in _exitless_errors() if issubclass(c, OSError)]
    assert len(oserrors) >= 5
    for cls in oserrors:
        e = KvmError(0xAE01, err, message) if cls is KvmError else cls(err, message)
        assert "Errno" not in str(e) and message in str(e), (cls, str(e))


def _not_an_image(kind: str, tmp_path: Path) -> str:
    """A path of ``kind`` that a command must refuse where it wants a kernel, initrd or busybox file."""
    import socket as _socket

    p = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "directory":
        p.mkdir()
    elif kind == "socket":
        s = _socket.socket(_socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    elif kind == "too large":
        with open(p, "wb") as f:
            f.truncate(128 << 20)                  # sparse: 128 MiB for a 64 MiB guest
    elif kind == "char device":
        return "/dev/zero"
    return str(p)


@pytest.mark.parametrize("kind", ["fifo", "char device", "directory", "socket", "missing", "too large"])
def test_a_file_that_is_not_an_image_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    """``run --kernel FIFO`` blocked forever, ``--initrd /dev/zero`` read until the VMM was killed for its
    memory, ``guest fetch --busybox DIR`` said "does not exist" after a download: every kernel, initrd and
    busybox path is one line, exit 2, at once, whatever it names."""
    from exitless.guestkit import guestkit_path

    bad = _not_an_image(kind, tmp_path)
    fake_bzimage = tmp_path / "bzImage"
    fake_bzimage.write_bytes(b"not an ELF: taken for a bzImage" * 100)
    cache = str(tmp_path / "cache")
    argvs = [["run", "--mem", "64M", "--kernel", bad, "--append", "info"],
             ["run", "--mem", "64M", "--kernel", str(fake_bzimage), "--initrd", bad],
             ["guest", "fetch", "--cache", cache, "--kernel", str(fake_bzimage), "--busybox", bad]]
    if kind != "too large":                        # (a big file is a fine kernel for guest fetch to keep)
        argvs += [["guest", "fetch", "--cache", cache, "--kernel", bad],
                  ["guest", "fetch", "--cache", cache, "--busybox", bad]]
    for argv in argvs:
        r = exitless(*argv, timeout=30)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (argv, r.stderr)
        assert bad in r.stderr, (argv, r.stderr)
    assert str(guestkit_path())
