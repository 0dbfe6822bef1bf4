"""The boot-milestone parser (exitless.boot.milestones) on a console captured from a real boot, and
``bench boot``'s QEMU side on that console (a stand-in ``qemu`` prints it: no VM, no KVM).

Every tests/data/boot-console-*.txt is a capture; each holds the serial console of the kernel and
initramfs ``exitless bench boot`` boots (Debian's 6.1 cloud kernel; busybox, the virtio modules and an
/init running ``true``; ``console=ttyS0 panic=-1 earlyprintk=serial``), booted to power-off on this host:
``-tcg`` by ``qemu-system-x86_64 -accel tcg`` (``no_timer_check``, as bench boot's TCG rows).
"""
from __future__ import annotations

import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from exitless.boot.initramfs import EXIT_MARKER, READY_MARKER
from exitless.boot.linux import BootConsole
from exitless.boot.milestones import BootMilestones

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Capture:
    """A captured console and the line numbers of its milestones."""

    path: Path
    text: str
    lines: tuple[str, ...]
    first: int
    init: int
    ready: int

    @classmethod
    def load(cls, path: Path) -> "Capture":
        text = path.read_text()
        lines = tuple(text.splitlines())

        def index_of(pred) -> int:
            return next(i for i, line in enumerate(lines) if pred(line))

        return cls(path, text, lines, index_of(lambda s: "Linux version 6." in s),
                   index_of(lambda s: "Run /init as init process" in s), index_of(lambda s: s.strip() == READY_MARKER))


CAPTURES = [Capture.load(p) for p in sorted(DATA.glob("boot-console-*.txt"))]
each_capture = pytest.mark.parametrize("cap", CAPTURES, ids=[c.path.stem for c in CAPTURES])
TCG = next(c for c in CAPTURES if c.path.stem == "boot-console-tcg")


@each_capture
def test_capture_is_a_whole_boot(cap: Capture) -> None:
    """The capture holds what the tests below rely on, in boot order."""
    assert 0 <= cap.first < cap.init < cap.ready < len(cap.lines) - 1
    assert any(line.startswith(EXIT_MARKER) for line in cap.lines[cap.ready:])
    assert "reboot: Power down" in cap.lines[-1]


@each_capture
def test_milestones_of_a_captured_boot(cap: Capture) -> None:
    m = BootMilestones().feed_text(cap.text)
    assert (m.first_line_s, m.init_s, m.userspace_s) == (cap.first, cap.init, cap.ready)
    assert m.init_path == "/init"
    stamps = [line for line in cap.lines if line.startswith("[")]
    assert m.kernel_time_s == float(stamps[-1][1:stamps[-1].index("]")])
    assert m.last_line == cap.lines[-1][:160]
    assert m.reached() == "userspace"
    row = m.row(poweroff_s=float(len(cap.lines)))
    assert row["reached"] == "power-off" and row["poweroff_s"] == len(cap.lines)
    assert row["first_line_s"] < row["init_s"] < row["userspace_s"] < row["poweroff_s"]


@each_capture
def test_times_are_the_callers(cap: Capture) -> None:
    times = [100.0 + 0.5 * i for i in range(len(cap.lines))]
    m = BootMilestones().feed_text(cap.text, times)
    assert (m.first_line_s, m.init_s, m.userspace_s) == (times[cap.first], times[cap.init], times[cap.ready])


@each_capture
def test_a_boot_cut_short_reaches_only_what_it_printed(cap: Capture) -> None:
    cuts = {0: "nothing", cap.first: "nothing", cap.first + 1: "early-boot", cap.init: "early-boot",
            cap.init + 1: "init", cap.ready: "init", cap.ready + 1: "userspace"}
    for n, want in cuts.items():
        m = BootMilestones().feed_text("\n".join(cap.lines[:n]))
        assert m.reached() == want, (n, want, m.row())
        assert (m.userspace_s is None) == (want != "userspace")
    assert BootMilestones().feed_text("").row() == {
        "first_line_s": None, "init_s": None, "userspace_s": None, "poweroff_s": None, "reached": "nothing",
        "kernel_time_s": None, "last_line": ""}


@each_capture
def test_later_lines_move_no_milestone(cap: Capture) -> None:
    """A command that prints the banner or the marker again, or the marker inside a longer line,
    moves nothing: each milestone is the first line that is it."""
    echo = ["Linux version 9.9", f"{READY_MARKER} ", f"echo {READY_MARKER}", "Run /sbin/init as init process"]
    m = BootMilestones().feed_text("\n".join(cap.lines + tuple(echo)))
    assert (m.first_line_s, m.init_s, m.userspace_s, m.init_path) == (cap.first, cap.init, cap.ready, "/init")
    early = BootMilestones().feed_text("\n".join(cap.lines[:cap.init] + (f"x {READY_MARKER}",)))
    assert early.userspace_s is None and early.reached() == "early-boot"


def test_crlf_and_a_custom_marker() -> None:
    lines = list(TCG.lines[:TCG.ready]) + ["GO", READY_MARKER]
    m = BootMilestones("GO").feed_text("\r\n".join(lines) + "\r\n")
    assert m.userspace_s == TCG.ready and m.last_line == READY_MARKER


@each_capture
@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(1, 4096), max_size=200))
def test_boot_console_chunks_give_the_same_milestones(cap: Capture, cuts: list[int]) -> None:
    """However the guest's bytes arrive (any split, CR LF line ends), BootConsole's milestones are
    the parser's on the whole text."""
    data = cap.text.replace("\n", "\r\n").encode()
    ticks = iter(range(10 ** 6))
    con = BootConsole(clock=lambda: float(next(ticks)))      # t0 is tick 0, line i ends at tick i + 1
    pos = 0
    for n in cuts:
        con(data[pos:pos + n])
        pos += n
    con(data[pos:])
    m = con.milestones
    assert (m.first_line_s, m.init_s, m.userspace_s) == (cap.first + 1, cap.init + 1, cap.ready + 1)
    assert con.first_line_at == cap.first + 1 and con.ready_at == cap.ready + 1
    assert m.reached() == "userspace"


def fake_qemu(tmp_path: Path, status: int, lines: int | None = None, stderr: str = "") -> str:
    """An executable that ignores QEMU's arguments, prints the captured console's first ``lines``
    lines (all by default) and ``stderr``, then exits ``status`` (or, with ``stderr``, hangs as QEMU
    does once it paused the VM)."""
    exe = tmp_path / f"qemu-{status}-{lines}"
    end = f"sys.exit({status})" if not stderr else "time.sleep(600)"
    exe.write_text(f"#!{sys.executable}\nimport sys, time\n"
                   f"sys.stdout.write(''.join(open({str(TCG.path)!r}).readlines()[:{lines}]))\nsys.stdout.flush()\n"
                   f"sys.stderr.write({stderr!r})\nsys.stderr.flush()\n{end}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(exe)


def test_bench_boot_reads_qemus_console(tmp_path: Path) -> None:
    """bench boot's QEMU side feeds the same parser; power-off only for a clean exit after /init's status."""
    from exitless.bench.boot import boot_qemu

    args = dict(kernel=Path("/k"), initrd=Path("/i"), cmdline="", mem=256, cpus=1, timeout=60)
    r = boot_qemu(fake_qemu(tmp_path, 0), "tcg", **args)
    assert r["reached"] == "power-off", r
    assert 0 <= r["first_line_s"] <= r["init_s"] <= r["userspace_s"] <= r["poweroff_s"] <= r["stopped_after_s"]
    assert r["stop"] == "qemu exited (0)" and "reboot: Power down" in r["last_line"]
    bad = boot_qemu(fake_qemu(tmp_path, 1), "tcg", **args)
    assert bad["reached"] == "userspace" and bad["poweroff_s"] is None and bad["stop"].startswith("qemu exited (1)")


def test_bench_boot_stops_at_once_when_qemu_pauses_the_vm(tmp_path: Path) -> None:
    """On an emulation failure QEMU with KVM pauses the VM and never exits (kvm_pvm's emulator lacks
    FWAIT: Debian's kernel stops at "x86/fpu: x87 FPU will use FXSAVE"): the boot ends then, not at the
    timeout, and says why."""
    from exitless.bench.boot import boot_qemu

    t = time.monotonic()
    r = boot_qemu(fake_qemu(tmp_path, 0, lines=TCG.init, stderr="KVM internal error. Suberror: 1\nemulation failure\n"),
                  "kvm", Path("/k"), Path("/i"), "", mem=256, cpus=1, timeout=120)
    assert time.monotonic() - t < 60
    assert r["reached"] == "early-boot" and r["init_s"] is None and r["poweroff_s"] is None, r
    assert r["stop"].startswith("qemu: KVM internal error. Suberror: 1 after "), r["stop"]
    assert r["last_line"] == TCG.lines[TCG.init - 1][:160]
