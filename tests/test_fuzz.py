"""The fuzz targets: every seed and every crash reproducer in the corpus replays clean (the
regression tests of past crashes), and each target runs briefly under atheris/libFuzzer."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from exitless.fuzz import TARGETS, Runner

KVM = {n for n, t in TARGETS.items() if t.needs_kvm}
RUNS = {"pci_config": 1000, "vhost_user": 1000}     # the slowest per input (docs/results/fuzz.md)


def _marks(name):
    return [pytest.mark.kvm] if name in KVM else []


def test_list_prints_every_target():
    out = subprocess.run([sys.executable, "-m", "exitless.fuzz", "--list"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == list(TARGETS)


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in TARGETS])
def test_corpus_replays_clean(name):
    """Seeds and the inputs of every crash found so far: no exception but ExitlessError, invariants hold."""
    target = TARGETS[name]
    files = sorted(target.corpus.iterdir())
    assert files, f"no corpus for {name}"
    runner = Runner(target.make())
    for f in files:
        runner.one(f.read_bytes())
    assert runner.executions == len(files)


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in TARGETS])
def test_fuzz_briefly(name, tmp_path):
    """A few thousand coverage-guided inputs per target (CI: about a minute for all of them)."""
    pytest.importorskip("atheris")
    runs = RUNS.get(name, 3000)
    p = subprocess.run([sys.executable, "-m", "exitless.fuzz", name, "--runs", str(runs), "--seed", "1",
                        "--artifacts", str(tmp_path), "--corpus", str(tmp_path / "corpus")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    summary = json.loads(next(line for line in p.stderr.splitlines()
                              if line.startswith("exitless-fuzz-summary ")).split(" ", 1)[1])
    assert summary["executions"] >= runs


def test_cli_replay_of_the_fd_counting_target():
    """``--replay FILE…`` runs each input with its file closed: vhost_user counts its process's fds
    after every input, and an open reproducer file used to read as a leak."""
    files = [str(f) for f in sorted(TARGETS["vhost_user"].corpus.iterdir())]
    p = subprocess.run([sys.executable, "-m", "exitless.fuzz", "vhost_user", "--replay", *files],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["executions"] == len(files)


@pytest.mark.kvm
def test_ioeventfd_ledger_refuses_what_kvm_refuses():
    """pci_config's model of KVM's ioeventfd table (IoeventfdLedger) answers every assignment and
    deassignment of a sequence -- collisions by length 0, by datamatch, wrong fd, twice -- as the
    real KVM_IOEVENTFD on a fresh VM does (success, EEXIST or ENOENT)."""
    import errno
    import os

    from exitless.fuzz.t_pci import IoeventfdLedger
    from exitless.kvm.api import Kvm
    from exitless.kvm.syscall import KvmError

    a, b = 0xC000_0000, 0xC000_1000
    ops = [  # (fd index, address, length, datamatch, deassign)
        (0, a, 0, None, False), (0, a, 0, None, False), (1, a, 4, None, False), (1, a, 4, 7, False),
        (0, b, 4, 7, False), (1, b, 4, 8, False), (1, b, 4, None, False), (0, b, 0, None, False),
        (1, b, 4, 7, True), (0, b, 4, 8, True), (0, b, 4, 7, True), (0, b, 4, 7, True),
        (0, a, 4, None, True), (1, a, 0, None, True), (0, a, 0, None, True), (1, a, 4, None, False),
        (0, a, 4, 3, False), (0, a, 2, None, False), (1, a, 4, None, True), (0, a, 2, None, False),
    ]
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
    kvm = Kvm()
    vm = kvm.create_vm()
    ledger = IoeventfdLedger()

    def outcome(call, fd, addr, length, dm, deassign):
        try:
            call(fds[fd], addr, length, datamatch=dm, deassign=deassign)
            return 0
        except KvmError as e:
            return e.errno

    try:
        got = [(outcome(vm.ioeventfd, *op), outcome(ledger.ioeventfd, *op)) for op in ops]
    finally:
        vm.close()
        kvm.close()
        for fd in fds:
            os.close(fd)
    assert [real for real, _ in got] == [model for _, model in got], list(zip(ops, got))
    assert {real for real, _ in got} == {0, errno.EEXIST, errno.ENOENT}     # every answer was exercised
