"""Benchmark plumbing without a guest: interleaved rounds, medians and spreads, ties with the best,
where output goes (``--json`` alone: only JSON on stdout), the options, and no import cycle in bench/."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from exitless.bench import common as C
from exitless.cli import build_parser


def test_rounds_are_interleaved_round_robin():
    order, steps = [], []
    samples = C.interleave(["a", "b", "c"], 3, lambda row, r: order.append((row, r)) or {"x": r},
                           progress=lambda label, step, total: steps.append((step, total)))
    assert order == [(row, r) for r in range(3) for row in "abc"]
    assert steps == [(i, 9) for i in range(9)]
    assert [[s["x"] for s in row] for row in samples] == [[0, 1, 2]] * 3
    assert all(0 <= s["other_load_pct"] <= 100 for row in samples for s in row)   # the machine's other work
    with pytest.raises(C.BenchError):
        C.interleave(["a"], 0, lambda row, r: {})


def test_aggregate_keeps_the_keys_as_medians_with_per_round_values_and_spread():
    samples = [{"vmm": "q", "p50_us": 9.0, "iops": 100, "exits_per_io": None, "errors": 1},
               {"vmm": "q", "p50_us": 7.0, "iops": 300, "exits_per_io": None, "errors": 0},
               {"vmm": "q", "p50_us": 8.0, "iops": 200, "exits_per_io": None, "errors": 2}]
    row = C.aggregate(samples, ("p50_us", "iops", "exits_per_io"))
    assert (row["vmm"], row["p50_us"], row["iops"], row["exits_per_io"]) == ("q", 8.0, 200, None)
    assert row["rounds"] == 3 and row["errors"] == 3          # errors are totals, never a median
    assert "other_load_pct" not in row
    assert row["per_round"] == {"p50_us": [9.0, 7.0, 8.0], "iops": [100, 300, 200], "exits_per_io": [None] * 3}
    assert row["spread"] == {"p50_us": {"min": 7.0, "max": 9.0}, "iops": {"min": 100, "max": 300},
                             "exits_per_io": None}


def _row(test, lo, med, hi):
    return {"test": test, "p50_us": med, "rounds": 3, "spread": {"p50_us": {"min": lo, "max": hi}}}


def test_rows_within_the_best_rows_spread_are_marked_ties():
    best, tie, behind, other = _row("a", 1, 2, 3), _row("a", 2.9, 4, 5), _row("a", 3.1, 4, 5), _row("b", 9, 9, 9)
    C.mark_best([best, tie, behind, other], "p50_us", higher_is_better=False, group=lambda r: r["test"])
    assert [r["vs_best"]["p50_us"] for r in (best, tie, behind, other)] == [C.BEST, C.TIE, C.BEHIND, C.BEST]
    hi = [_row("a", 1, 2, 3), _row("a", 5, 6, 7)]
    C.mark_best(hi, "p50_us", higher_is_better=True)
    assert [r["vs_best"]["p50_us"] for r in hi] == [C.BEHIND, C.BEST]


def test_ratios_are_taken_round_by_round():
    num = {"per_round": {"m": [2.0, 3.0, None, 8.0]}}
    den = {"per_round": {"m": [1.0, 1.0, 1.0, 2.0]}}
    assert C.ratio_over_rounds(num, den, "m") == {"median": 3.0, "min": 2.0, "max": 4.0, "per_round": [2.0, 3.0, 4.0]}
    assert C.ratio_over_rounds(None, den, "m") is None


def test_target_ratios_compare_the_best_row_of_each_vmm_round_by_round():
    from exitless.bench.workload import target_ratios

    def row(vmm, path, iops):
        return {"vmm": vmm, "path": path, "irq": "poll", "test": "randread-4k-qd32", "iops": sorted(iops)[1],
                "per_round": {"iops": iops}}

    rows = [row("qemu+exitless", "poll", [300, 200, 400]), row("qemu+exitless", "kick", [100, 100, 100]),
            row("qemu+qsd", "iothread-poll", [100, 200, 100]), row("qemu", "ioeventfd", [150, 100, 100])]
    r = target_ratios(rows)
    assert set(r) == {"qd32_iops_serve_over_qsd", "qd32_iops_serve_over_qemu"}
    assert r["qd32_iops_serve_over_qsd"]["per_round"] == [3.0, 1.0, 4.0]
    assert r["qd32_iops_serve_over_qsd"]["median"] == 3.0
    assert r["qd32_iops_serve_over_qsd"]["rows"] == "qemu+exitless/poll irq=poll vs qemu+qsd/iothread-poll irq=poll"


ROWS = [{"path": "shared", "median_us": 0.5, "rounds": 2, "spread": {"median_us": {"min": 0.4, "max": 0.6}},
         "vs_best": {"median_us": C.BEST}}]


def test_json_alone_puts_only_json_on_stdout(capsys):
    report = C.Report("-")
    with report.progress() as step:
        step("round 1/2: shared", 0, 2)
    report.table("the table", ROWS, [("path", "path"), ("median_us", "median µs")], spread=("median_us",))
    report.ties_note(2, [{"per_round": {"other_load_pct": [3.0, 55.0]}}])
    report.note("a note")
    report.json(ROWS)
    out, err = capsys.readouterr()
    assert json.loads(out) == ROWS
    assert "the table" in err and "0.500 (0.400–0.600) ★" in err and "a note" in err and "interleaved" in err
    assert "up to 55% of the machine busy" in err


def test_json_to_a_file_leaves_the_tables_on_stdout(capsys, tmp_path: Path):
    report = C.Report(str(tmp_path / "rows.json"))
    report.table("the table", ROWS, [("path", "path")])
    report.json(ROWS)
    out, err = capsys.readouterr()
    assert "the table" in out and err == ""             # stderr is not a terminal here: no progress
    assert json.loads((tmp_path / "rows.json").read_text()) == ROWS


@pytest.mark.parametrize("command", ["doorbell", "blk", "vhost", "boot"])
def test_every_bench_command_takes_rounds_and_a_bare_json(command):
    p = build_parser()
    bare = p.parse_args(["bench", command, "--json"])
    # boot's default is the host's: None here, then 1 round on kvm_pvm (a boot takes minutes), 3 elsewhere
    assert bare.json == "-" and (bare.runs if command == "boot" else bare.rounds) == (None if command == "boot" else 3)
    dash = p.parse_args(["bench", command, "--json", "-", "--rounds", "5"])
    assert dash.json == "-" and (dash.runs if command == "boot" else dash.rounds) == 5
    assert p.parse_args(["bench", command, "--json", "out.json"]).json == "out.json"


def test_bench_modules_import_no_cycle():
    """bench/ modules import each other without a cycle (blk and vhost share bench.workload)."""
    pkg = Path(C.__file__).parent
    graph = {}
    for f in pkg.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
        graph[f.stem] = {d.split(".")[0] for d in deps} & {g.stem for g in pkg.glob("*.py")}

    def visit(mod, path):
        assert mod not in path, f"import cycle: {' -> '.join(path + [mod])}"
        for dep in graph[mod]:
            visit(dep, path + [mod])

    for mod in graph:
        visit(mod, [])


def test_doorbell_pins_vcpu_and_sidecores_to_two_cpus_and_restores_the_affinity():
    import os

    from exitless.bench.doorbell import on_cpu, pinning

    before = os.sched_getaffinity(0)
    assert pinning(False) is None
    where = pinning(True)
    if len(before) < 2:
        assert where is None
        return
    assert where.vcpu != where.sidecore and {where.vcpu, where.sidecore} <= before
    with on_cpu(where.sidecore):
        assert os.sched_getaffinity(0) == {where.sidecore}    # what the sidecore threads/processes inherit
    assert os.sched_getaffinity(0) == before


def test_differential_exits_are_never_negative():
    """QEMU rows subtract a short run from a long one: a negative difference is published as null with a reason."""
    from exitless.bench.common import aggregate, differential_per_op
    from exitless.bench.net import TESTS as NET_TESTS, _row
    from exitless.bench.workload import TESTS, per_io_row

    assert differential_per_op(1100, 100, 1000) == (1.0, None)
    value, note = differential_per_op(100, 130, 900)
    assert value is None and "noise" in note
    assert differential_per_op(None, 5, 10) == (None, None)

    res = {"ops": 1000, "iops": 1.0, "p50_ns": 1, "p99_ns": 1, "kib_s": 1, "errors": 0, "verify_errors": 0}
    base = {"res": {**res, "ops": 100}, "exits": 500, "cpu": 0.0}
    bad = per_io_row("qemu", "kvm", TESTS[0], "msix", {"res": res, "exits": 400, "cpu": 1.0}, base)
    good = per_io_row("qemu", "kvm", TESTS[0], "msix", {"res": res, "exits": 1400, "cpu": 1.0}, base)
    assert bad["exits_per_io"] is None and "noise" in bad["exits_note"]
    assert good["exits_per_io"] == 1.0 and "exits_note" not in good
    row = aggregate([good, bad], ["exits_per_io"])
    assert row["exits_per_io"] == 1.0 and row["exits_note"].startswith("1 of 2 rounds")

    nres = {"ops": 1000, "pps": 10.0, "errors": 0, "timeouts": 0}
    net = _row("qemu", "tap", NET_TESTS[0], {"res": nres, "exits": 10, "cpu": 1.0},
               {"res": {**nres, "ops": 100}, "exits": 50, "cpu": 0.0})
    assert net["exits_per_packet"] is None and "noise" in net["exits_note"]


def test_boot_rows_say_null_for_unmeasured_kernel_clock_and_no_polling_warning(capsys):
    from exitless.bench.boot import summarize

    run = {"first_line_s": None, "userspace_s": None, "poweroff_s": None, "stopped_after_s": 1.0,
           "reached": "nothing", "stop": "timeout", "kernel_time_s": None, "last_line": ""}
    row = summarize("exitless", [run, dict(run)], {})
    assert row["kernel_time_s"] is None and row["each"][0]["kernel_time_s"] is None
    assert summarize("q", [run, {**run, "kernel_time_s": 2.0}], {})["kernel_time_s"] == 2.0

    report = C.Report("-")
    report.ties_note(2, [{"per_round": {"other_load_pct": [3.0, 55.0]}}], polling=False)
    err = capsys.readouterr().err
    assert "55% of the machine busy" in err and "poll" not in err


def test_a_guest_kit_refusal_is_a_bench_error_not_a_key_error():
    """``bench doorbell --n 99999999999999999999999``: the guest kit answered {"app", "error"} and the bench
    died with KeyError 'ops'; a refusal is a BenchError quoting the guest, a result that carries an error
    beside its figures (a timeout mid-run) is still returned."""
    from exitless.bench.common import BenchError, guest_result

    with pytest.raises(BenchError, match="refused the doorbell run: bad number for n"):
        guest_result(b'boot\r\n{"app":"doorbell","error":"bad number for n: \'9999\'"}\r\n', "doorbell")
    with pytest.raises(BenchError, match="refused the blk run"):
        guest_result(b'{"app":"blk","rw":"randread","error":"unknown key"}\n', "blk")
    partial = guest_result(b'{"app":"blk","rw":"read","ops":3,"errors":0,"error":"timeout"}\n', "blk")
    assert partial["ops"] == 3
