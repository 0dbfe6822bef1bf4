"""Ctrl-C and SIGTERM end a command in one line after its clean-up; numeric flags refuse nonsense.

A user stops ``exitless run`` or a bench with Ctrl-C or ``kill``: the command must not print a
traceback (Ctrl-C) or die without its ``finally`` blocks (SIGTERM: a bench's network namespace
and temporary directory were left behind).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exitless.fdwait import wait_readable

ROOT = Path(__file__).resolve().parents[1]


def _spawn(*args: str) -> subprocess.Popen:
    # SIGINT at its default: a background job of a non-interactive shell would inherit SIG_IGN
    return subprocess.Popen([sys.executable, "-m", "exitless", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not wait_readable(proc.stdout, deadline - time.monotonic()):
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return
    proc.kill()
    pytest.fail(f"no line starting with {prefix!r}: {proc.communicate()[1]}")


@pytest.mark.kvm
@pytest.mark.parametrize("signum, status, message", [(signal.SIGINT, 130, "exitless: interrupted"),
                                                     (signal.SIGTERM, 143, "exitless: SIGTERM: stopped")])
def test_a_signal_stops_run_in_one_line(tmp_path: Path, signum: int, status: int, message: str) -> None:
    from exitless.guestkit import guestkit_path

    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    proc = _spawn("run", "--kernel", str(guestkit_path()), "--disk", f"{disk},io=poll",
                  "--append", "blk rw=randread bs=4096 qd=1 ms=60000")
    _wait_for_line(proc, "guestkit: virtio-blk")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == status, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == message, err


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3])     # in netns.create, the namespace's set-up, the first VM
def test_sigterm_during_bench_net_removes_its_namespace(tmp_path: Path, delay: float) -> None:
    """``bench net`` makes ``/run/netns/exl-bench-PID`` and a temporary directory; SIGTERM must remove both.

    pyroute2 forks helpers that inherit the handler and are themselves stopped with SIGTERM: they
    must die, not unwind a copy of the bench (which printed a second error and removed the
    namespace twice).
    """
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "exitless", "bench", "net", "--paths", "shared", "--tests",
                             "rr-64", "--scale", "0.5", "--rounds", "1", "--no-qemu", "--no-vhost"], cwd=ROOT,
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    netns = Path(f"/run/netns/exl-bench-{proc.pid}")
    deadline = time.monotonic() + 60
    while not netns.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert netns.exists(), proc.communicate()[1]
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "exitless: SIGTERM: stopped", err
    assert "Traceback" not in err, err
    assert not netns.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("exitless-bench-net-")]


def _exitless(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, cwd=ROOT)


@pytest.mark.parametrize("args", [("exitless.fuzz", "elf", "--runs", "-1"),       # libFuzzer: -1 is forever
                                  ("exitless.fuzz", "elf", "--runs", "0"),
                                  ("exitless.fuzz", "elf", "--seconds", "0"),
                                  ("exitless.fuzz", "--all", "--json", "/nonexistent-exitless/f.json"),
                                  ("exitless", "serve", "blk", "--socket", "/tmp/x.sock", "--disk", "d.img",
                                   "--poll-us", "-5"),
                                  ("exitless", "serve", "net", "--socket", "/tmp/x.sock", "--tap", "t0",
                                   "--poll-us", "nan"),
                                  # an output that cannot be written: refused before the bench, not after it
                                  ("exitless", "bench", "blk", "--json", "/nonexistent-exitless/x.json"),
                                  ("exitless", "bench", "nvme", "--plot", "/nonexistent-exitless/x.png"),
                                  ("exitless", "bench", "net", "--plot", "/tmp"),
                                  ("exitless", "bench", "doorbell", "--json", "/etc/hostname/x.json"),
                                  ("exitless", "bench", "boot", "--json", "/proc/exitless-x.json"),
                                  ("exitless", "bench", "soak", "--json", "/nonexistent-exitless/x.json")])
def test_numeric_flags_refuse_nonsense(args) -> None:
    r = _exitless(*args)
    assert r.returncode == 2 and "error: argument" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_an_unknown_user_is_named_without_errno() -> None:
    from exitless.confine import ConfinementError, drop_user

    with pytest.raises(ConfinementError) as e:
        drop_user("no-such-user-exitless")
    assert str(e.value) == "--user 'no-such-user-exitless': no such user"


def test_an_uncreatable_guest_cache_names_the_flag() -> None:
    r = _exitless("exitless", "guest", "fetch", "--cache", "/proc/exitless-no-such-cache")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr == ("exitless: cannot create the guest cache /proc/exitless-no-such-cache: No such file or "
                        "directory; choose another with --cache DIR (cache_dir=) or $EXITLESS_CACHE\n")
