"""``python3 -m exitless.fuzz``: run the fuzz targets (see :mod:`exitless.fuzz`)."""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..argtypes import output_file, positive_float, positive_int
from . import TARGETS, Runner

# Modules whose edges do not guide the fuzzer: the harnesses themselves, the referee of invariant 2
# (GuestMemory's bounds check runs on every guest access: instrumenting it cost 2-3x the executions
# per second of virtqueue/virtio_blk/virtio_net and adds no edge a parser does not already have), and
# plumbing no input reaches (KVM ioctl wrappers, the sidecore's loops and spinning, x86 decoding of the
# vCPU that never runs here, confinement, doctor).  Every parser -- virtio, PCI, NVMe, vhost-user,
# kernel-image readers, the buses -- stays instrumented.
NOT_INSTRUMENTED = ("exitless.fuzz", "exitless.memory", "exitless.kvm", "exitless.sidecore", "exitless.x86",
                    "exitless.confine", "exitless.doctor", "exitless.vcpu")


def not_instrumented() -> list[str]:
    """Every module name under :data:`NOT_INSTRUMENTED` (atheris excludes exact module names, not
    packages), found on disk without importing them."""
    root = Path(__file__).resolve().parent.parent          # the exitless package
    names = []
    for name in NOT_INSTRUMENTED:
        path = root.joinpath(*name.split(".")[1:])
        names.append(name)
        if path.is_dir():
            for py in sorted(path.rglob("*.py")):
                parts = py.relative_to(root.parent).with_suffix("").parts
                names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(set(names))

# libFuzzer's closing lines: "#123 DONE cov: 456 ft: 789 corp: ..." and -print_final_stats=1's "stat::..."
_DONE = re.compile(r"^#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)", re.M)
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)
_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", re.M)
REPORT_S = 30.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m exitless.fuzz", description=__doc__)
    p.add_argument("target", nargs="?", choices=sorted(TARGETS), metavar="TARGET")
    p.add_argument("--list", action="store_true", help="print the target names, one per line")
    p.add_argument("--all", action="store_true", help="run every target in turn (each in its own process)")
    p.add_argument("--only", nargs="+", choices=sorted(TARGETS), metavar="TARGET", help="with --all: just these")
    p.add_argument("--runs", type=positive_int, help="stop after N inputs (N > 0)")
    p.add_argument("--seconds", type=positive_float, help="stop after S seconds (S > 0; with --runs: whichever comes first)")
    p.add_argument("--make-seeds", action="store_true", help="(re)write the seed corpus from the targets' seeds()")
    p.add_argument("--replay", nargs="+", metavar="FILE", help="run these inputs once each, without atheris")
    p.add_argument("--corpus", metavar="DIR", help="working corpus (default: a temporary directory); the seed "
                                                   "corpus in the package is read, never written")
    p.add_argument("--artifacts", metavar="DIR", default=".", help="where crashing inputs are written")
    p.add_argument("--seed", type=int, default=0, help="libFuzzer -seed (0: random)")
    p.add_argument("--json", metavar="FILE", type=output_file,
                   help="write the summary (one object per target) as JSON")
    p.add_argument("--log", metavar="DIR", help="with --all: append each target's libFuzzer output to DIR/TARGET.log "
                                                "as it runs")
    return p


def _replay(name: str, files: list[str]) -> dict:
    runner = Runner(TARGETS[name].make())
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        runner.one(data)     # with the file closed: a harness counts its process's fds
    return runner.summary()


_keep: list = []


def _c_atexit(fn) -> None:
    callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _arg: fn())
    _keep.append(callback)
    ctypes.CDLL(None).__cxa_atexit(callback, None, None)   # what atexit(3) is in glibc


def _fuzz(args) -> int:
    """Run one target under libFuzzer in this process (libFuzzer exits the process when done)."""
    import atheris

    target = TARGETS[args.target]
    with atheris.instrument_imports(include=["exitless"], exclude=not_instrumented()):
        harness = target.make()
    runner = Runner(harness)
    t0 = time.monotonic()

    def report() -> None:
        summary = {"target": target.name, "seconds": round(time.monotonic() - t0, 1), **runner.summary()}
        print("exitless-fuzz-summary " + json.dumps(summary), file=sys.stderr, flush=True)

    # libFuzzer ends the process with C exit(), which skips Python's atexit: register with libc.
    _c_atexit(report)
    # A graceful stop (SIGUSR1: libFuzzer prints its stats, then _Exit()s past every atexit) keeps
    # the figures of the last report: one every REPORT_S seconds.
    one, last = runner.one, [t0]

    def one_and_report(data: bytes) -> None:
        one(data)
        if not runner.executions & 1023 and time.monotonic() - last[0] > REPORT_S:
            last[0] = time.monotonic()
            report()
    corpus = args.corpus or tempfile.mkdtemp(prefix=f"exitless-fuzz-{target.name}-")
    os.makedirs(corpus, exist_ok=True)
    argv = [sys.argv[0], corpus, "-print_final_stats=1", f"-seed={args.seed}",
            f"-artifact_prefix={os.path.join(args.artifacts, target.name + '-')}", "-rss_limit_mb=4096",
            f"-max_len={target.max_len}"]
    if target.corpus.is_dir():
        argv.insert(2, str(target.corpus))
    if args.runs is not None:
        argv.append(f"-runs={args.runs}")
    if args.seconds is not None:
        argv.append(f"-max_total_time={max(1, int(args.seconds))}")
    atheris.Setup(argv, one_and_report)
    atheris.Fuzz()
    return 0  # not reached


def _run_child(name: str, args) -> dict:
    """Fuzz one target in a child process; parse libFuzzer's and our closing figures."""
    cmd = [sys.executable, "-m", "exitless.fuzz", name, "--artifacts", args.artifacts, "--seed", str(args.seed)]
    if args.runs is not None:
        cmd += ["--runs", str(args.runs)]
    if args.seconds is not None:
        cmd += ["--seconds", str(args.seconds)]
    if args.corpus:
        cmd += ["--corpus", os.path.join(args.corpus, name)]
    t0 = time.monotonic()
    lines = []
    log = open(os.path.join(args.log, f"{name}.log"), "a") if args.log else None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        for line in proc.stdout:      # libFuzzer's progress, followed as it comes (a campaign runs for hours)
            lines.append(line)
            if log:
                log.write(line)
                log.flush()
    if log:
        log.close()
    out = "".join(lines)
    row = {"target": name, "exit": proc.returncode, "wall_s": round(time.monotonic() - t0, 1)}
    for line in out.splitlines():
        if line.startswith("exitless-fuzz-summary "):
            row.update(json.loads(line.split(" ", 1)[1]))
    stats = dict((k, int(v)) for k, v in _STAT.findall(out))
    done = _DONE.findall(out) or _STATUS.findall(out)     # a graceful stop (SIGUSR1) prints no DONE line
    if done:
        row["cov"], row["ft"], row["corpus"] = int(done[-1][1]), int(done[-1][2]), int(done[-1][3])
    row["libfuzzer_execs"] = stats.get("number_of_executed_units")
    row["peak_rss_mb"] = stats.get("peak_rss_mb")
    row["crashes"] = 0 if proc.returncode == 0 else 1
    if proc.returncode != 0:
        row["log_tail"] = out[-3000:]
    return row


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        print("\n".join(TARGETS))
        return 0
    if args.make_seeds:
        import hashlib
        for t in TARGETS.values():
            t.corpus.mkdir(parents=True, exist_ok=True)
            for data in t.seeds():
                (t.corpus / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)
        return 0
    logging.getLogger("exitless").setLevel(logging.CRITICAL)   # every guest mistake is logged; not here
    if args.all:
        rows = []
        for name in args.only or TARGETS:
            row = _run_child(name, args)
            rows.append(row)
            print(f"{name:12} exit {row['exit']:>3}  execs {row.get('executions', '?'):>9}  "
                  f"cov {row.get('cov', '?'):>6}  ft {row.get('ft', '?'):>6}  rejected {row.get('rejected', '?'):>8}  "
                  f"refused {row.get('refused', '?'):>8}  {row['wall_s']:>7} s", flush=True)
            if row["exit"]:
                print(row["log_tail"], file=sys.stderr)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 1 if any(r["exit"] for r in rows) else 0
    if args.target is None:
        _parser().error("a TARGET, --list or --all")
    if args.replay:
        print(json.dumps({"target": args.target, **_replay(args.target, args.replay)}))
        return 0
    return _fuzz(args)


if __name__ == "__main__":
    sys.exit(main())
