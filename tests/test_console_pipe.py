"""A console reader that goes away (``exitless run … | head -c 10``) stops the output, not the VMM.

Before, every byte the guest printed after the pipe closed came back as a BrokenPipeError traceback
from the serial port's handler (one per byte: hundreds of lines), and the interpreter's exit flush
added one more.  Now the first EPIPE drops the console's output for good with one warning; the
guest runs on and ``exitless`` exits with its status, as for any reader.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.kvm


def test_a_closed_stdout_pipe_is_one_warning() -> None:
    from exitless.guestkit import guestkit_path

    proc = subprocess.Popen([sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()),
                             "--append", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout.read(10)
    proc.stdout.close()                     # the reader goes away, as head does
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    rc = proc.wait(120)
    assert rc == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.count("stdout") == 1 and "dropped" in err, err
