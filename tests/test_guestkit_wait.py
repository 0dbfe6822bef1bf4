"""The guest kit's interrupt-driven wait under the exitless VMM, counted by KVM (``run --stats``).

The ring-3 wait has its own UD2 and a short ring-0 path; an interrupt that ends its HLT returns
straight to ring 3 (one IRETQ per wake-up).  On kvm_pvm, where guest ring 0 is emulated, KVM's
counters show it: per interrupt-driven I/O one emulation failure (the IRETQ; KVM's emulator has no
protected-mode IRET) and 17 emulated instructions, where there were 2 and 22.  Elsewhere ring 0
runs natively and only the I/O's correctness and the window's presence are checked.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exitless.guestkit import guestkit_path

pytestmark = pytest.mark.kvm
ON_KVM_PVM = Path("/sys/module/kvm_pvm").exists()


def run_stats(tmp_path: Path, append: str, *extra: str) -> tuple[dict, dict | None]:
    """(the guest's result JSON, the --stats window) of one guest-kit run under exitless."""
    stats = tmp_path / "stats.json"
    r = subprocess.run([sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()), "--timeout", "120",
                        "--append", append, "--stats", str(stats), *extra],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ))
    line = [x for x in r.stdout.splitlines() if x.startswith('{"app":')][-1]
    return json.loads(line), json.loads(stats.read_text())["window"]


def test_blk_wait_by_interrupt_costs_one_emulation_failure_per_io(tmp_path):
    """QD1 reads completed by MSI-X: every I/O halts once and is woken by its interrupt; on kvm_pvm the
    wake-up's way back to ring 3 is one IRETQ (emulation failure), the ring-0 path 17 instructions."""
    img = tmp_path / "d.img"
    img.write_bytes(bytes(8 << 20))
    res, win = run_stats(tmp_path, "blk rw=randread bs=4096 qd=1 ms=400 seed=1 irq=msix",
                         "--disk", f"{img},io=poll")
    assert res["errors"] == 0 and res["ops"] > 20, res
    assert res["irqs"] >= res["ops"], res              # completions came by interrupt
    kvm, ops = win["kvm"], res["ops"]
    assert ops <= kvm["halt_exits"] <= ops + res["timer_irqs"] + 5, (kvm, res)
    assert win["vcpu_cpu"] > 0 and win["wall"] > 0
    if ON_KVM_PVM:
        assert kvm["insn_emulation_fail"] <= ops + res["timer_irqs"] + 5, (kvm, res)
        assert kvm["insn_emulation"] <= 17 * (ops + res["timer_irqs"] + 5), (kvm, res)


def test_idle_wakeups_are_between_the_marks(tmp_path):
    """`idle`: the sleep loop is the measured window, one halt per wake-up."""
    res, win = run_stats(tmp_path, "idle ms=200 tick_ms=2")
    assert res["wakeups"] >= 50 and res["timer_irqs"] >= 50, res
    assert res["wakeups"] <= win["kvm"]["halt_exits"] <= res["wakeups"] + 3, (win, res)


def test_cost_mark_measures_one_loop(tmp_path):
    """`cost mark=service`: the window holds the service loop alone -- io_n wait calls that return at once
    (flag already set: no halt)."""
    res, win = run_stats(tmp_path, "cost n=100 io_n=300 mark=service")
    assert res["service_ps"] > 0, res
    assert win["kvm"]["halt_exits"] == 0 and win["vcpu_cpu"] > 0, win
    if ON_KVM_PVM:   # each call: #UD into emulated ring 0, then the IRETQ back (host interrupts add exits)
        assert 300 <= win["kvm"]["insn_emulation_fail"] <= 310, win
        assert 2 * 300 <= win["kvm"]["exits"] <= 2 * 300 + 100, win


def test_cost_mark_must_name_a_loop(tmp_path):
    r = subprocess.run([sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()), "--timeout", "60",
                        "--append", "cost mark=nope"], capture_output=True, text=True, timeout=120)
    assert "mark must be service, inb or lapic" in r.stdout, r.stdout[-500:]
    assert r.returncode != 0
