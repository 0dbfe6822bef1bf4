"""Argument parsing of every command: bad values are one-line usage errors (exit 2) naming the command."""
import argparse

from hypothesis import given, settings
from hypothesis import strategies as st

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
    ("run", "--mem", "100000G"), ("run", "--mem", "5000G"), ("bench", "blk", "--scale", "1e308"),
    ("bench", "net", "--scale", "1001"), ("bench", "nvme", "--scale", "inf"), ("run", "--timeout", "1e300"),
    ("sidecore", "--socket", "s", "--poll-us", "1e300"), ("bench", "soak", "--minutes", "1e20"),
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


def _leaf_parsers(parser: argparse.ArgumentParser):
    """Every (sub)command's parser that takes options, its sub-commands' included."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for sub in dict.fromkeys(action.choices.values()):
            yield from _leaf_parsers(sub)


def _numeric_options():
    from exitless.sidecore import breakdown

    parsers = [*_leaf_parsers(cli.build_parser()), breakdown.build_parser()]
    return [(p.prog, a) for p in parsers for a in p._actions
            if a.option_strings and a.type is not None and a.choices is None
            and getattr(a.type, "__name__", "") in ("int", "float", "positive_int", "non_negative_int",
                                                   "positive_float", "non_negative_float", "mem_size", "scale_factor")]


def test_no_option_takes_a_bare_int_or_float():
    """``type=float`` takes 'nan' and 'inf' (``sidecore --poll-us nan`` was a traceback), ``type=int``
    takes negative counts: every number option of every command goes through exitless.argtypes."""
    bare = [f"{prog} {a.option_strings[0]}" for prog, a in _numeric_options() if a.type in (int, float)]
    assert not bare, bare


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=12), st.sampled_from(["nan", "-nan", "inf", "-inf", "1e309", "1e300", "-0", "0",
                                                              "-1", "1e-400", "0x10", "1_000", " 5 "])))
def test_every_number_option_gives_a_finite_positive_value_or_a_usage_error(text):
    """Whatever the text, a number option's type either gives a finite value >= 0 or raises one of the
    errors argparse turns into a one-line usage error (exit 2)."""
    for prog, action in _numeric_options():
        try:
            v = action.type(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            continue
        assert v == v and v not in (float("inf"), float("-inf")) and v >= 0, (prog, action.option_strings, text, v)
        assert isinstance(v, int) or v <= 1e8, (prog, action.option_strings, text, v)   # durations: no overflow


_FORM_VALUES = {"--initrd": ["rd.img"], "--modules": ["mods"], "--cache": ["cache"], "--boot-log": [],
                "--decompress": ["host"], "--stats": ["stats.json"]}


def _form_argv(form: str, tmp_path) -> tuple[list[str], list[str]]:
    """(the words before the option, the words after it) of a ``run`` of ``form``."""
    from exitless.guestkit import guestkit_path

    if form == "guestkit":
        return ["run", "--kernel", str(guestkit_path())], ["--append", "info"]
    if form == "linux":
        kernel = tmp_path / "bzImage"
        kernel.write_bytes(b"not an ELF: taken for a bzImage")
        return ["run", "--kernel", str(kernel)], []
    return ["run"], ["--", "true"]


@pytest.mark.parametrize("form", ["guestkit", "linux", "easy"])
def test_an_option_the_form_would_ignore_is_refused(tmp_path, capsys, monkeypatch, form):
    """``run --kernel guestkit.elf --initrd X`` booted without the initramfs, ``--stats`` with Linux wrote
    nothing: each option a form does not use is one line, exit 2, naming the option, before anything boots."""
    from exitless.cli.run import FORM_OPTIONS

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rd.img").write_bytes(b"an initrd")     # (a missing file would be reported first)
    assert set(FORM_OPTIONS) == set(_FORM_VALUES)
    before, after = _form_argv(form, tmp_path)
    for option, (_, forms, _) in FORM_OPTIONS.items():
        if form in forms:
            continue
        assert cli.main([*before, option, *_FORM_VALUES[option], *after]) == 2, option
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"exitless: {option} does nothing with"), err


def test_sidecore_without_a_polled_disk_is_refused(tmp_path, capsys):
    """``run --disk a.img --sidecore S`` (io defaults to ioeventfd) would never use the service."""
    from exitless.guestkit import guestkit_path

    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    for disks in ([], ["--disk", str(img)], ["--disk", f"{img},io=trap"]):
        assert cli.main(["run", "--kernel", str(guestkit_path()), *disks, "--sidecore", str(tmp_path / "s.sock"),
                         "--append", "info"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no --disk, --nvme or --net on a polled path" in err, err


def test_a_missing_subcommand_names_the_choices(capsys):
    """``exitless serve`` said "required: serve" (argparse's internal dest): every command group names its
    sub-commands instead."""
    for argv in ([], ["serve"], ["bench"], ["guest"]):
        err = _parse_error(capsys, *argv)
        assert "the following arguments are required: {" in err, err
        group = cli.build_parser() if not argv else next(
            a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
        sub = next(a for a in group._actions if isinstance(a, argparse._SubParsersAction))
        assert all(name in err for name in sub.choices), err


@pytest.mark.parametrize("command", ["", " ", "\t"])
def test_an_empty_command_is_refused_before_the_boot(capsys, command):
    """``run -- ''`` booted Linux for minutes to run nothing."""
    assert cli.main(["run", "--", command]) == 2
    err = capsys.readouterr().err
    assert err == "exitless: -- CMD: the command is an empty string\n", err


@pytest.mark.parametrize("argv", [("sidecore", "--socket", "s.sock"), ("serve", "blk", "--socket", "s.sock", "--disk", "d"),
                                  ("serve", "net", "--socket", "s.sock", "--tap", "t0")])
@pytest.mark.parametrize("user", ["no-such-user-exitless", "4294967296", "99999999999999999999999"])
def test_an_unknown_user_is_a_usage_error_before_anything_listens(capsys, argv, user):
    """``sidecore --user nosuch`` listened, then logged "stopped" and the error: two lines.  Every back-end's
    --user is checked by argparse."""
    err = _parse_error(capsys, *argv, "--user", user)
    assert "argument --user: no such user" in err, err
