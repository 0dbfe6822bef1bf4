"""Argument parsing of every command: bad values are one-line usage errors (exit 2) naming the command."""
import argparse

import pytest

from exitless import cli
from exitless.cli.options import host_ram_mib, mem_size, positive_float, positive_int


def _parse_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err, err
    return err


def test_mem_size_units_and_upper_bound():
    assert mem_size("256") == 256 and mem_size("1G") == 1024 and mem_size("1g") == 1024
    assert mem_size("512MiB") == 512
    with pytest.raises(argparse.ArgumentTypeError, match="too large"):
        mem_size("1T" if host_ram_mib() < 1 << 20 else "100000T")
    for bad in ("100000G", "5000G", f"{host_ram_mib() + 1}M"):
        with pytest.raises(argparse.ArgumentTypeError, match="too large"):
            mem_size(bad)
    for bad in ("0", "-1G", "lots"):
        with pytest.raises(argparse.ArgumentTypeError):
            mem_size(bad)


def test_bench_boot_mem_parses_like_run():
    args = cli.build_parser().parse_args(["bench", "boot", "--mem", "1G"])
    assert args.mem == 1024


def test_positive_types():
    assert positive_int("3") == 3 and positive_float("0.5") == 0.5
    for bad in ("0", "-5", "x", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            (positive_float if bad in ("nan", "inf") else positive_int)(bad)


@pytest.mark.parametrize("argv", [
    ("bench", "doorbell", "--n", "-5"), ("bench", "doorbell", "--n", "0"), ("bench", "blk", "--scale", "0"),
    ("bench", "blk", "--scale", "-1"), ("bench", "nvme", "--rounds", "0"), ("bench", "net", "--scale", "-1"),
    ("bench", "vhost", "--min-seconds", "-1"), ("bench", "boot", "--runs", "0"), ("bench", "boot", "--timeout", "-1"),
    ("bench", "boot", "--mem", "100000G"), ("run", "--timeout", "-1"), ("run", "--timeout", "0"),
    ("run", "--mem", "100000G"), ("run", "--mem", "5000G"),
])
def test_bad_numbers_are_one_line_usage_errors(capsys, argv):
    err = _parse_error(capsys, *argv)
    prog = "exitless " + " ".join(argv[:2] if argv[0] == "bench" else argv[:1])
    assert err.startswith(f"{prog}: error: ") and f"(see {prog} --help)" in err, err


def test_unknown_flag_names_the_subcommand(capsys):
    err = _parse_error(capsys, "run", "--frob")
    assert err.startswith("exitless run: error: unrecognized arguments: --frob"), err


@pytest.mark.kvm
def test_not_a_kernel_reports_only_the_error(tmp_path):
    """A disk image given as --kernel: one line, the real error, no note about Linux on this host first."""
    import subprocess
    import sys

    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 16))
    r = subprocess.run([sys.executable, "-m", "exitless.cli", "run", "--kernel", str(img)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "note:" not in r.stderr, r.stderr
    assert str(img) in r.stderr


def test_serve_help_qemu_examples_use_modern_virtio_pci():
    """The guest kit drives modern virtio-pci only: the QEMU lines in serve's help say disable-legacy=on,
    as the benchmarks' device arguments do."""
    from exitless.bench import vhost
    from exitless.cli.serve import BLK_USAGE, NET_USAGE

    for usage, device in ((BLK_USAGE, "vhost-user-blk-pci"), (NET_USAGE, "virtio-net-pci")):
        line = next(w for w in usage.split() if w.startswith(device + ","))
        assert "disable-legacy=on" in line, line
    assert "disable-legacy=on" in open(vhost.__file__).read()


def test_every_option_has_help_and_names_its_default():
    missing = []

    def walk(parser, name):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub, p in a.choices.items():
                    walk(p, f"{name} {sub}")
            elif isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
                continue
            elif not a.help or (a.default not in (None, False, [], argparse.SUPPRESS)
                                and not isinstance(a, argparse._StoreTrueAction) and "default" not in a.help):
                missing.append(f"{name} {a.option_strings or a.dest}")

    walk(cli.build_parser(), "exitless")
    assert missing == []


@pytest.mark.kvm
def test_machine_refuses_more_ram_than_the_host_has():
    from exitless.vm import Machine, VmConfig, VmConfigError

    with pytest.raises(VmConfigError, match="too large"):
        Machine(VmConfig(mem_mib=host_ram_mib() + 1024))
