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
