"""Every ``--net``/``--disk``/``--nvme`` spec and interface name, whatever its text, parses or raises the spec's error.

Found by trying: ``--net tap=x,queues=²`` escaped as a bare ValueError ('²'.isdigit() is True,
int('²') fails), which argparse reported as "invalid _net_spec value"; ``queues=١`` was taken as 1
(the disk grammar takes ASCII digits only); ``tap=a:b`` and a name that is not UTF-8 reached the
kernel, whose EINVAL read "TAP a:b: exists with other flags", and ``serve net --tap $'\\xff'`` was
a UnicodeEncodeError traceback.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitless.disk import DiskSpec, DiskSpecError
from exitless.net.spec import NetSpec, NetSpecError
from exitless.net.tap import IFNAMSIZ, TapError, check_name
from exitless.nvme import NvmeSpec, NvmeSpecError

ROOT = Path(__file__).resolve().parents[1]

# text that looks like a spec: keys and values from the grammar, odd digits, separators, surrogates
_ATOMS = st.sampled_from(["tap=", "mac=", "io=", "queues=", "netns=", "lba=", "ro", "direct", ",", ",,", "=",
                          "x", "t0", "1", "16", "²", "١", "５", "-1", "poll", "52:54:00:12:34:56", ":", "/",
                          " ", "\udcff", "é", "512", "4096"])
_SPEC_TEXT = st.one_of(st.lists(_ATOMS, max_size=8).map("".join), st.text(max_size=40))


@settings(max_examples=500, deadline=None)
@given(text=_SPEC_TEXT)
def test_every_spec_text_parses_or_raises_its_own_error(text: str) -> None:
    for parse, error in ((NetSpec.parse, NetSpecError), (DiskSpec.parse, DiskSpecError),
                         (NvmeSpec.parse, NvmeSpecError)):
        try:
            spec = parse(text)
        except error:
            continue
        if isinstance(spec, NetSpec):
            assert 1 <= spec.queues <= 16 and spec.io and check_name(spec.tap) == spec.tap
        else:
            assert spec.path and 1 <= spec.queues


@settings(max_examples=500, deadline=None)
@given(name=st.one_of(st.text(max_size=20), st.binary(max_size=20).map(os.fsdecode)))
def test_interface_names_follow_the_kernels_rule(name: str) -> None:
    """``dev_valid_name`` (net/core/dev.c): 1..IFNAMSIZ-1 bytes, not '.' or '..', no '/', ':' or whitespace."""
    try:
        raw = name.encode()
    except UnicodeEncodeError:
        raw = None
    valid = raw is not None and 0 < len(raw) < IFNAMSIZ and name not in (".", "..") and \
        not any(c in "/:" or c.isspace() for c in name)
    if valid:
        assert check_name(name) == name
    else:
        with pytest.raises(TapError) as e:
            check_name(name)
        assert e.value.errno == errno.EINVAL and "not a valid interface name" in str(e.value)


def test_ascii_digits_only_for_net_queues() -> None:
    for text in ("tap=x,queues=²", "tap=x,queues=١"):
        with pytest.raises(NetSpecError):
            NetSpec.parse(text)
    assert NetSpec.parse("tap=x,queues=2").queues == 2


@pytest.mark.parametrize("tap", [b"a:b", b"\xffa"])
def test_serve_net_names_a_bad_tap_in_one_line(tmp_path: Path, tap: bytes) -> None:
    r = subprocess.run([sys.executable.encode(), b"-m", b"exitless", b"serve", b"net", b"--socket",
                        os.fsencode(tmp_path / "n.sock"), b"--tap", tap], capture_output=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count(b"\n") == 1, r.stderr
    assert b"not a valid interface name" in r.stderr


@pytest.mark.parametrize("text, message", [("tap=x,,y", "'tap=x,,y': empty option"),
                                           ("tap=x,tap=y", "'tap=x,tap=y': option 'tap' given twice"),
                                           ("tap=x,mac=52:54:00:00:00:01,mac=52:54:00:00:00:02", "option 'mac' given twice"),
                                           ("tap=x,io=", "'tap=x,io=': bad option 'io='")])
def test_net_spec_errors_say_what_is_wrong_once(text: str, message: str) -> None:
    """Like the disk grammar's: the spec quoted once (argparse already says ``argument --net:``), the fault named."""
    with pytest.raises(NetSpecError) as e:
        NetSpec.parse(text)
    assert message in str(e.value) and not str(e.value).startswith("--net")
