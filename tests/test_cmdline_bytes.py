"""A command line or command that is not UTF-8 reaches the guest byte for byte (no UnicodeEncodeError).

Python decodes argv with ``surrogateescape``: ``--append $'info \\xff'`` (or ``run -- printf $'\\xff'``)
arrives as a str holding ``'\\udcff'``, and ``str.encode()`` raised a traceback.  The kernel
command line and the initramfs take bytes: ``os.fsencode`` gives the user's bytes back.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitless.boot.bzimage import BzImageError, encode_cmdline, parse_setup_header
from exitless.boot.initramfs import build_initramfs, read_cpio
from exitless.boot.pvh import KernelImageError, pvh_cmdline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bzimage import make_image  # noqa: E402

_ARGV_BYTES = st.binary(max_size=300).filter(lambda b: b"\0" not in b)     # what a shell can pass


@settings(max_examples=200, deadline=None)
@given(raw=_ARGV_BYTES)
def test_kernel_command_lines_keep_the_users_bytes(raw: bytes) -> None:
    text = os.fsdecode(raw)                  # what argparse hands over
    assert pvh_cmdline(text) == raw + b"\0"
    assert encode_cmdline(text, parse_setup_header(make_image())) == raw + b"\0"


def test_a_nul_is_refused_by_both_loaders() -> None:
    with pytest.raises(KernelImageError, match="NUL"):
        pvh_cmdline("a\0b")
    with pytest.raises(BzImageError, match="NUL"):
        encode_cmdline("a\0b", parse_setup_header(make_image()))


@settings(max_examples=50, deadline=None)
@given(raw=_ARGV_BYTES)
def test_the_easy_forms_command_keeps_the_users_bytes(tmp_path_factory, raw: bytes) -> None:
    busybox = tmp_path_factory.getbasetemp() / "busybox"
    busybox.write_bytes(b"\x7fELF" + bytes(60))
    archive = build_initramfs(busybox, command=os.fsdecode(raw), applets=["sh"], compress=False)
    files = {e.name: e.data for e in read_cpio(archive)}
    assert files["etc/exitless/command.sh"] == raw + b"\n"


@pytest.mark.kvm
def test_run_passes_a_non_utf8_append_to_the_guest_kit() -> None:
    from exitless.guestkit import guestkit_path

    r = subprocess.run([sys.executable.encode(), b"-m", b"exitless", b"run", b"--kernel", bytes(guestkit_path()),
                        b"--append", b"info \x01\xff"], capture_output=True, timeout=60, cwd=ROOT)
    # the guest kit refuses the key it does not know: its own error, in JSON, not a host traceback
    assert b"Traceback" not in r.stderr, r.stderr
    assert b'"error":"unknown key' in r.stdout, r.stdout
