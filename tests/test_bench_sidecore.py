"""``exitless bench sidecore`` at a tiny scale: the rows' shape and that every VM's data was verified;
the guest kit's start gate; the targets' verdicts computed from the rows.  No figure is asserted."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from exitless.bench import sidecore
from exitless.guestkit import guestkit_path
from exitless.bench.sidecore import METRICS, targets
from tests.test_bench_cli import QEMU, assert_rounds, bench

ROW_KEYS = {"vmm", "layout", "mode", "vms", "iops_total", "p50_us_slowest", "p99_us_slowest", "p50_us_fastest",
            "p99_us_fastest", "host_cpu_pct", "io_cpu_pct", "exits_per_s", "vms_verified", "per_vm", "errors"}


@pytest.mark.kvm
def test_bench_sidecore_rows_and_every_vm_verified():
    """1 and 2 VMs in every layout this tree has, one short round: one row per (layout, mode, VM count),
    each VM's reads checked against the host's pattern, CPU and exits counted."""
    layouts = ["shared", "per-vm"] + (["qemu"] if QEMU else [])
    rows, err, rc = bench("sidecore", "--vms", "1,2", "--rounds", "1", "--seconds", "0.3", "--layouts", *layouts,
                          timeout=600)
    assert rc == 0, err
    shared = "shared" if sidecore.sidecore_service_available() else "shared-1proc"
    want = {(shared, m, n) for m in ("poll", "adaptive") for n in (1, 2)} | \
           {("per-vm", m, n) for m in ("poll", "adaptive") for n in (1, 2)}
    if QEMU:
        want |= {("qemu", f"poll-max-ns={sidecore.QEMU_IOTHREAD_POLL_NS}", n) for n in (1, 2)}
    assert {(r["layout"], r["mode"], r["vms"]) for r in rows} == want
    assert_rounds(rows, 1, METRICS)
    for r in rows:
        assert ROW_KEYS <= set(r), r.keys()
        assert r["vmm"] == ("qemu" if r["layout"] == "qemu" else "exitless")
        assert len(r["per_vm"]) == r["vms"] and all(vm["verified"] and vm["ops"] > 0 for vm in r["per_vm"])
        assert r["vms_verified"] == r["vms"] and r["errors"] == 0
        assert r["iops_total"] == sum(vm["iops"] for vm in r["per_vm"])
        assert r["host_cpu_pct"] > 0 and r["exits_per_s"] is not None and r["exits_per_s"] > 0
        # the vCPU threads are told apart by their kernel names (vcpu0 / CPU 0/KVM): they ran the guest
        assert 0 <= r["io_cpu_pct"] < r["host_cpu_pct"], r
        assert r["p99_us_slowest"] >= r["p50_us_slowest"] > 0 and r["p99_us_fastest"] >= r["p50_us_fastest"] > 0
    assert "4 KiB random reads" in err and "targets: not evaluated" in err    # no 4-VM rows here


@pytest.mark.kvm
def test_gate_keeps_the_loop_closed_until_the_token(tmp_path):
    """A guest whose gate never opens does no measured I/O and fails; with the token there it runs."""
    image, = sidecore.make_images(1, str(tmp_path))
    app = sidecore.guest_app(0.1, 1, 0xABC)

    def run(extra: str, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()),
                               "--mem", "64M", "--disk", f"{image},io=poll", "--append", app + extra, *flags],
                              capture_output=True, text=True, timeout=120)

    closed = run(" gate_ms=300")
    assert closed.returncode == 1 and "gate: the token never appeared" in closed.stdout
    assert sidecore.GATE_LINE.decode() in closed.stdout
    sidecore.set_gate([image], 0xABC)
    stats = tmp_path / "stats.json"
    opened = run("", "--stats", str(stats))
    assert opened.returncode == 0, opened.stdout
    assert '"verify":1' in opened.stdout and '"verify_errors":0' in opened.stdout
    # run --stats: KVM's counters over the guest's loop (after the gate), as bench sidecore reads them
    saved = json.loads(stats.read_text())
    assert saved["exit"] == "debug-exit" and saved["window"]["kvm"]["exits"] > 0
    assert 0.05 < saved["window"]["wall"] < 60


@pytest.mark.kvm
def test_run_stats_to_an_unwritable_file_is_a_usage_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "exitless", "run", "--kernel", str(guestkit_path()), "--append", "info",
                        "--stats", str(tmp_path / "no" / "such.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--stats" in r.stderr and "Traceback" not in r.stderr


def _row(layout, mode, vmm, iops, cpu, p99_ratio, io_cpu=None):
    """A 4-VM row with two rounds (as aggregate() leaves it); ``io_cpu`` defaults to ``cpu``."""
    io_cpu = io_cpu or cpu
    return {"vms": 4, "layout": layout, "mode": mode, "vmm": vmm, "iops_total": iops[0], "host_cpu_pct": cpu[0],
            "io_cpu_pct": io_cpu[0], "p99_slowest_over_fastest": p99_ratio,
            "per_round": {"iops_total": list(iops), "host_cpu_pct": list(cpu), "io_cpu_pct": list(io_cpu)},
            "spread": {"p99_slowest_over_fastest": {"min": p99_ratio, "max": p99_ratio}}}


def test_targets_are_computed_from_the_rows():
    q = _row("qemu", "x", "qemu", (1000, 1000), (100, 100), 1.0, io_cpu=(40, 40))
    good = _row("shared", "poll", "exitless", (2500, 2100), (40, 50), 1.5, io_cpu=(10, 15))
    bad = _row("shared", "adaptive", "exitless", (1500, 1900), (60, 70), 3.0, io_cpu=(30, 30))
    verdicts = {(t["rows"], t["target"].split(": ", 1)[1]): t for t in targets([q, good, bad])}
    assert {k: v["pass"] for k, v in verdicts.items()} == {
        ("shared/poll vs qemu", "shared/poll aggregate IOPS / QEMU's ≥ 2"): True,
        ("shared/poll vs qemu", "shared/poll I/O CPU / QEMU's ≤ 0.5"): True,
        ("shared/poll vs qemu", "shared/poll host CPU / QEMU's ≤ 0.5"): True,
        ("shared/poll", "shared/poll slowest VM's p99 / fastest's ≤ 2"): True,
        ("shared/adaptive vs qemu", "shared/adaptive aggregate IOPS / QEMU's ≥ 2"): False,
        ("shared/adaptive vs qemu", "shared/adaptive I/O CPU / QEMU's ≤ 0.5"): False,
        ("shared/adaptive vs qemu", "shared/adaptive host CPU / QEMU's ≤ 0.5"): False,
        ("shared/adaptive", "shared/adaptive slowest VM's p99 / fastest's ≤ 2"): False}
    iops = verdicts[("shared/poll vs qemu", "shared/poll aggregate IOPS / QEMU's ≥ 2")]
    assert (iops["value"], iops["min"], iops["max"]) == (2.3, 2.1, 2.5)      # median of the rounds' ratios
    # the one-process rows stand in only when the service rows are missing
    one = dict(good, layout="shared-1proc")
    assert {t["rows"] for t in targets([q, one])} == {"shared-1proc/poll vs qemu", "shared-1proc/poll"}
    assert {t["rows"] for t in targets([q, good, one])} == {"shared/poll vs qemu", "shared/poll"}
    assert targets([good]) == [t for t in targets([good]) if "qemu" not in t["rows"]]   # no QEMU row: p99 only


@pytest.mark.parametrize("text", ["0", "1,x", "", "1,,2", "65"])
def test_bad_vm_counts_are_a_usage_error(text):
    r = subprocess.run([sys.executable, "-m", "exitless", "bench", "sidecore", "--vms", text], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--vms" in r.stderr and "Traceback" not in r.stderr


def test_plot_has_a_panel_per_vm_count_and_metric(tmp_path):
    """Two VM counts → 2×2 panels (IOPS over host CPU) written as a PNG; the rows are left as they were."""
    rows = []
    for n in (1, 4):
        for layout, vmm in (("shared", "exitless"), ("qemu", "qemu")):
            r = _row(layout, "poll", vmm, (1000.0 * n, 1100.0 * n), (50.0, 60.0), 1.0)
            r["vms"] = n
            r["spread"].update(iops_total={"min": 1000.0 * n, "max": 1100.0 * n},
                               host_cpu_pct={"min": 50.0, "max": 60.0})
            rows.append(r)
    before = [dict(r) for r in rows]
    sidecore.plot(rows, str(tmp_path / "p.png"))
    from PIL import Image

    w, h = Image.open(tmp_path / "p.png").size
    assert rows == before and w / 2 < h < w   # two panels to a line, two lines (one line of 4 would be 4.5:1)


def test_service_variants_are_rows_of_the_shared_layout():
    """`--modes poll --service-args '' --service-args '--idle-yield-us 20'`: two shared rows side by side, the
    variant's options in its mode (and passed to `exitless sidecore`), one QEMU row."""
    rows = sidecore.layouts(["shared", "qemu"], ["poll"], ["", "--idle-yield-us 20"])
    assert [(r.layout, r.mode, r.service_args) for r in rows] == [
        ("shared", "poll", ""), ("shared", "poll --idle-yield-us 20", "--idle-yield-us 20"),
        ("qemu", f"poll-max-ns={sidecore.QEMU_IOTHREAD_POLL_NS}", "")]


@pytest.mark.parametrize("text", ["--socket /tmp/x", "--mode=poll", "20", "'unclosed"])
def test_bad_service_args_are_a_usage_error(text):
    r = subprocess.run([sys.executable, "-m", "exitless", "bench", "sidecore", "--service-args", text],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--service-args" in r.stderr and "Traceback" not in r.stderr, r.stderr
