"""End-to-end tests of the guest kit (guestkit/) under QEMU.

The guest kit is booted with ``qemu-system-x86_64 -kernel guestkit.elf`` (Xen
PVH entry), talks to QEMU's virtio-blk-pci (modern only), prints one JSON line
starting with ``{"app":`` and exits through isa-debug-exit at port 0xf4, which
makes QEMU exit with ``(status << 1) | 1``.

The disk pattern is recomputed here independently of the guest:
sector s, u64 word w (little-endian) = ((s << 6) | w) ^ (seed * 0x9E3779B97F4A7C15 mod 2**64).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUESTKIT = ROOT / "guestkit"
ELF = GUESTKIT / "build" / "guestkit.elf"
QEMU = shutil.which("qemu-system-x86_64")
GOLDEN = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
]


@pytest.fixture(scope="session")
def guestkit_elf() -> Path:
    if shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.skip("make/gcc not available to build guestkit")
    subprocess.run(["make", "-s", "-C", str(GUESTKIT)], check=True, capture_output=True, text=True)
    assert ELF.exists()
    return ELF


def _kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


class Run:
    def __init__(self, rc: int, out: str):
        self.rc = rc
        self.out = out
        # isa-debug-exit: QEMU exits with (value << 1) | 1
        self.status = rc >> 1 if rc & 1 else None
        lines = [ln.strip() for ln in out.splitlines() if ln.strip().startswith('{"app":')]
        self.json = json.loads(lines[-1]) if lines else None
        self.json_lines = len(lines)

    def __repr__(self) -> str:
        return f"Run(rc={self.rc}, status={self.status}, json={self.json}, out={self.out[-2000:]!r})"


def run_guest(elf: Path, append: str | None, *extra: str, accel: str = "tcg",
              machine: str = "q35", timeout: float = 60) -> Run:
    cmd = [QEMU, "-machine", machine, "-accel", accel, "-m", "256", "-display", "none",
           "-serial", "stdio", "-monitor", "none", "-no-reboot", "-net", "none",
           "-kernel", str(elf),
           "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", *extra]
    if append is not None:
        cmd[cmd.index("-kernel"):cmd.index("-kernel")] = ["-append", append]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    out = p.stdout.decode(errors="replace").replace("\r", "") + p.stderr.decode(errors="replace")
    return Run(p.returncode, out)


def blk_args(img: Path, *, readonly: bool = False, event_idx: bool = True, extra: str = "") -> list[str]:
    drive = f"file={img},if=none,id=d0,format=raw" + (",readonly=on" if readonly else "")
    dev = f"virtio-blk-pci,drive=d0,disable-legacy=on,event_idx={'on' if event_idx else 'off'}" + extra
    return ["-drive", drive, "-device", dev]


def expected_sector(s: int, seed: int) -> bytes:
    mix = (seed * GOLDEN) & MASK64
    return struct.pack("<64Q", *[((s << 6) | w) ^ mix for w in range(64)])


def bad_sectors(img: Path, seed: int, first: int = 0, count: int | None = None) -> list[int]:
    data = img.read_bytes()
    n = len(data) // 512 if count is None else count
    return [s for s in range(first, first + n) if data[s * 512:(s + 1) * 512] != expected_sector(s, seed)]


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    return img


# ---- command line handling ----

def test_unknown_app_exits_2(guestkit_elf):
    r = run_guest(guestkit_elf, "nosuchapp")
    assert r.status == 2, r
    assert r.json["app"] == "nosuchapp" and "unknown app" in r.json["error"]


def test_unknown_key_exits_2(guestkit_elf):
    r = run_guest(guestkit_elf, "doorbell path=trap bogus=1")
    assert r.status == 2, r
    assert "unknown key" in r.json["error"]


def test_bad_value_exits_2(guestkit_elf):
    r = run_guest(guestkit_elf, "doorbell path=teleport")
    assert r.status == 2, r
    r = run_guest(guestkit_elf, "blk bs=1000")
    assert r.status == 2, r


def test_empty_cmdline_exits_2(guestkit_elf):
    r = run_guest(guestkit_elf, None)
    assert r.status == 2, r


def test_info(guestkit_elf):
    r = run_guest(guestkit_elf, "info")
    assert r.status == 0, r
    assert r.json["ram_top"] > 200 << 20
    assert 100_000 < r.json["tsc_khz"] < 10_000_000


def test_selftest(guestkit_elf):
    r = run_guest(guestkit_elf, "selftest")
    assert r.status == 0, r
    assert r.json["failed"] == 0 and r.json["passed"] >= 25
    # the guest's pattern word agrees with the formula used here
    assert int(r.json["pattern_s1000_w7_seed3"], 16) == struct.unpack_from("<Q", expected_sector(1000, 3), 7 * 8)[0]


def test_rings(guestkit_elf):
    """Apps run in ring 3; ring=0 keeps them in ring 0 (for comparisons)."""
    r = run_guest(guestkit_elf, "info")
    assert r.status == 0 and r.json["ring"] == 3, r
    r = run_guest(guestkit_elf, "info ring=0")
    assert r.status == 0 and r.json["ring"] == 0, r
    r = run_guest(guestkit_elf, "cost n=1000 io_n=20")
    assert r.status == 0 and r.json["ring"] == 3 and r.json["loop_ps"] > 0, r
    assert "cli_sti_ps" not in r.json
    r = run_guest(guestkit_elf, "cost n=1000 io_n=20 ring=0")
    assert r.status == 0 and r.json["ring"] == 0 and "cli_sti_ps" in r.json, r


@pytest.mark.parametrize("crash,vector", [("pf", 14), ("ud", 6), ("gp", 13)])
def test_exception_reporting(guestkit_elf, crash, vector):
    """A CPU exception in a ring-3 app prints a JSON error and exits with status 3."""
    r = run_guest(guestkit_elf, f"selftest crash={crash}")
    assert r.status == 3, r
    assert r.json["error"].startswith(f"exception {vector} ") and "cs=0x2b" in r.json["error"]


def test_tsc_khz_override(guestkit_elf):
    r = run_guest(guestkit_elf, "info tsc_khz=1234567")
    assert r.status == 0, r
    assert r.json["tsc_khz"] == 1234567 and r.json["tsc_source"] == "cmdline"


def test_microvm_boot(guestkit_elf):
    """microvm: different firmware (qboot), no PCI, no PIT: TSC rate from the command line."""
    r = run_guest(guestkit_elf, "idle ms=50 tsc_khz=2500000", machine="microvm")
    assert r.status == 0, r
    assert r.json["tsc_khz"] == 2500000 and r.json["wakeups"] >= 1


# ---- doorbell / idle ----

def test_doorbell_without_device_times_out(guestkit_elf):
    """QEMU has no doorbell device: each op times out; the app must still report and exit 1."""
    r = run_guest(guestkit_elf, "doorbell path=adaptive n=4 warmup=1 timeout_ms=20 max_timeouts=2")
    assert r.status == 1, r
    j = r.json
    assert r.json_lines == 1
    for key in ("path", "ops", "errors", "timeouts", "doorbells", "tsc_khz",
                "p50_ns", "p99_ns", "mean_ns", "min_ns", "max_ns"):
        assert key in j, key
    assert j["path"] == "adaptive" and j["timeouts"] == 2 and j["errors"] == 0
    # unassigned memory reads 0 as event_idx -> only op v=1 rings the doorbell
    assert j["doorbells"] == 1


@pytest.mark.parametrize("path", ["trap", "ioeventfd", "shared", "poll"])
def test_doorbell_paths_parse(guestkit_elf, path):
    r = run_guest(guestkit_elf, f"doorbell path={path} n=1 warmup=0 timeout_ms=5 max_timeouts=1")
    assert r.status == 1, r
    assert r.json["path"] == path and r.json["timeouts"] == 1
    assert r.json["doorbells"] == (1 if path in ("trap", "ioeventfd") else 0)


def test_idle(guestkit_elf):
    r = run_guest(guestkit_elf, "idle ms=100")
    assert r.status == 0, r
    assert r.json["app"] == "idle"
    assert 100_000 <= r.json["elapsed_us"] < 2_000_000
    assert r.json["timer_irqs"] >= 1


# ---- virtio-blk ----

BLK_FIELDS = ("rw", "bs", "qd", "ops", "errors", "verify_errors", "bytes", "elapsed_us", "iops",
              "kib_s", "p50_ns", "p99_ns", "mean_ns", "min_ns", "max_ns", "flushes", "notifies",
              "irqs", "irq", "event_idx", "queues", "queue_size", "capacity", "tsc_khz")


def test_blk_fill_verify_and_pattern(guestkit_elf, disk):
    r = run_guest(guestkit_elf, "blk rw=fill bs=64k qd=4 seed=7", *blk_args(disk))
    assert r.status == 0, r
    j = r.json
    for key in BLK_FIELDS:
        assert key in j, key
    assert j["rw"] == "fill" and j["ops"] == 128 and j["bytes"] == 8 << 20
    assert j["errors"] == 0 and j["flushes"] == 1 and j["capacity"] == 16384
    assert j["event_idx"] == 1 and j["irq"] == "msix"
    # byte-for-byte check of the image against the pattern formula
    assert bad_sectors(disk, 7) == []

    r = run_guest(guestkit_elf, "blk rw=verify bs=32k qd=8 seed=7", *blk_args(disk))
    assert r.status == 0, r
    assert r.json["ops"] == 256 and r.json["verify_errors"] == 0 and r.json["errors"] == 0


def test_blk_verify_detects_corruption(guestkit_elf, disk):
    r = run_guest(guestkit_elf, "blk rw=fill bs=128k qd=2 seed=3", *blk_args(disk))
    assert r.status == 0, r
    with open(disk, "r+b") as f:
        f.seek(1000 * 512 + 17)
        f.write(b"\xff")
    r = run_guest(guestkit_elf, "blk rw=verify bs=4k qd=4 seed=3", *blk_args(disk))
    assert r.status == 1, r
    assert r.json["verify_errors"] == 1 and r.json["first_bad_sector"] == 1000
    # a wrong seed fails everywhere
    r = run_guest(guestkit_elf, "blk rw=verify bs=64k qd=4 seed=4 size=1m", *blk_args(disk))
    assert r.status == 1 and r.json["verify_errors"] == 2048, r


def test_blk_partial_range_and_writes(guestkit_elf, disk):
    # fill only [1 MiB, 1.5 MiB) with a short last request; the rest stays zero
    r = run_guest(guestkit_elf, "blk rw=fill bs=48k qd=3 offset=1m size=512k seed=9",
                  *blk_args(disk))
    assert r.status == 0, r
    assert r.json["ops"] == 11 and r.json["bytes"] == 512 << 10
    data = disk.read_bytes()
    assert data[:1 << 20] == bytes(1 << 20)
    assert bad_sectors(disk, 9, first=2048, count=1024) == []
    assert data[(1 << 20) + (512 << 10):] == bytes(len(data) - (1 << 20) - (512 << 10))
    # random writes keep the pattern valid; random reads with verify=1 check it
    r = run_guest(guestkit_elf, "blk rw=randwrite bs=4k qd=16 n=300 offset=1m size=512k seed=9 "
                  "flush_every=50", *blk_args(disk))
    assert r.status == 0 and r.json["ops"] == 300 and r.json["flushes"] == 6, r
    r = run_guest(guestkit_elf, "blk rw=randread bs=8k qd=32 n=400 offset=1m size=512k seed=9 "
                  "verify=1 irq=poll", *blk_args(disk))
    assert r.status == 0 and r.json["verify_errors"] == 0 and r.json["irq"] == "poll", r
    assert bad_sectors(disk, 9, first=2048, count=1024) == []


@pytest.mark.parametrize("irq,event_idx", [("msix", False), ("poll", True), ("poll", False)])
def test_blk_irq_modes(guestkit_elf, disk, irq, event_idx):
    r = run_guest(guestkit_elf, "blk rw=fill bs=128k qd=4 size=2m", *blk_args(disk))
    assert r.status == 0, r
    r = run_guest(guestkit_elf, f"blk rw=randread bs=4k qd=8 n=300 size=2m verify=1 irq={irq} "
                  f"event_idx={int(event_idx)}", *blk_args(disk, event_idx=event_idx))
    assert r.status == 0, r
    j = r.json
    assert j["ops"] == 300 and j["verify_errors"] == 0 and j["irq"] == irq
    assert j["event_idx"] == int(event_idx)
    if irq == "poll":
        assert j["irqs"] <= 1  # QEMU may signal once before used_event is valid


def test_blk_qd128_indirect(guestkit_elf, disk):
    """qd=128 does not fit 3 descriptors per request in a 256-entry ring: indirect tables."""
    r = run_guest(guestkit_elf, "blk rw=fill bs=4k qd=128 size=2m", *blk_args(disk))
    assert r.status == 0, r
    assert r.json["qd"] == 128 and r.json["indirect"] == 1 and r.json["queue_size"] == 256
    assert bad_sectors(disk, 1, count=4096) == []
    r = run_guest(guestkit_elf, "blk rw=randread bs=4k qd=128 n=1000 size=2m verify=1 indirect=0",
                  *blk_args(disk))
    assert r.status == 0, r
    assert r.json["qd"] == 85 and r.json["qd_requested"] == 128 and r.json["indirect"] == 0
    r = run_guest(guestkit_elf, "blk rw=randread bs=4k qd=4 n=200 size=2m verify=1 indirect=1 "
                  "irq=poll", *blk_args(disk))
    assert r.status == 0 and r.json["indirect"] == 1, r


def test_blk_malformed_indirect(guestkit_elf, disk):
    r = run_guest(guestkit_elf, "blk rw=malformed indirect=1", *blk_args(disk))
    assert r.status == 0, r
    assert r.json["indirect_nested"] == "needs_reset" and r.json["indirect_len"] == "needs_reset"
    assert r.json["final_read"] == "ok"


def test_blk_multiqueue(guestkit_elf, disk):
    r = run_guest(guestkit_elf, "blk rw=fill bs=64k qd=8 queues=4 size=2m",
                  *blk_args(disk, extra=",num-queues=4"))
    assert r.status == 0 and r.json["queues"] == 4, r
    assert bad_sectors(disk, 1, count=4096) == []


def test_blk_ident_flush_readonly(guestkit_elf, disk):
    r = run_guest(guestkit_elf, "blk rw=ident", *blk_args(disk, readonly=True, extra=",serial=GK-TEST-1"))
    assert r.status == 0, r
    assert r.json["id"] == "GK-TEST-1" and r.json["capacity"] == 16384
    assert int(r.json["features"], 16) & (1 << 5)  # VIRTIO_BLK_F_RO negotiated
    r = run_guest(guestkit_elf, "blk rw=fill", *blk_args(disk, readonly=True))
    assert r.status == 1 and "read-only" in r.json["error"], r
    r = run_guest(guestkit_elf, "blk rw=flush n=3", *blk_args(disk))
    assert r.status == 0 and r.json["flushes"] == 3, r


def test_blk_malformed(guestkit_elf, disk):
    r = run_guest(guestkit_elf, "blk rw=malformed", *blk_args(disk))
    assert r.status == 0, r
    j = r.json
    assert j["final_read"] == "ok"
    for case in ("desc_oob", "chain_loop", "chain_too_long", "next_oob", "hdr_short",
                 "huge_len", "sector_oob", "bad_type", "avail_jump"):
        assert j[case] in ("ioerr", "unsupp", "needs_reset"), (case, j)
    assert j["sector_oob"] == "ioerr" and j["bad_type"] == "unsupp"


def test_blk_duration(guestkit_elf, disk):
    # fill first: random writes for a fixed time need not cover every sector of the range
    assert run_guest(guestkit_elf, "blk rw=fill bs=64k qd=4 size=1m", *blk_args(disk)).status == 0
    r = run_guest(guestkit_elf, "blk rw=randwrite bs=4k qd=4 ms=300 size=1m", *blk_args(disk))
    assert r.status == 0, r
    assert r.json["ops"] > 0 and r.json["elapsed_us"] >= 300_000
    r = run_guest(guestkit_elf, "blk rw=read bs=16k qd=2 ms=200 size=1m verify=1", *blk_args(disk))
    assert r.status == 0 and r.json["verify_errors"] == 0 and r.json["ops"] > 0, r


def test_blk_write_zeroes_and_discard(guestkit_elf, disk):
    r = run_guest(guestkit_elf, "blk rw=fill bs=128k qd=4 size=4m", *blk_args(disk))
    assert r.status == 0, r
    r = run_guest(guestkit_elf, "blk rw=write_zeroes bs=64k qd=4 offset=1m size=1m", *blk_args(disk))
    assert r.status == 0 and r.json["ops"] == 16 and r.json["bytes"] == 1 << 20, r
    r = run_guest(guestkit_elf, "blk rw=verify expect=zero bs=128k offset=1m size=1m", *blk_args(disk))
    assert r.status == 0 and r.json["verify_errors"] == 0, r
    data = disk.read_bytes()
    assert data[1 << 20:2 << 20] == bytes(1 << 20)
    assert bad_sectors(disk, 1, count=2048) == [] and bad_sectors(disk, 1, first=4096, count=4096) == []
    # discard: contents afterwards are unspecified; the request must just succeed
    r = run_guest(guestkit_elf, "blk rw=discard bs=32k qd=2 offset=2m size=256k", *blk_args(disk))
    assert r.status == 0 and r.json["ops"] == 8 and r.json["errors"] == 0, r


def test_blk_no_device(guestkit_elf):
    r = run_guest(guestkit_elf, "blk rw=read n=1")
    assert r.status == 1 and "no virtio-blk" in r.json["error"], r


@pytest.mark.kvm
@pytest.mark.skipif(not _kvm_usable(), reason="/dev/kvm not usable")
def test_blk_kvm_fill_verify(guestkit_elf, disk):
    r = run_guest(guestkit_elf, "blk rw=fill bs=128k qd=4 size=2m seed=5", *blk_args(disk),
                  accel="kvm", timeout=120)
    if r.status is None and "kvm" in r.out.lower() and "fail" in r.out.lower():
        pytest.skip(f"QEMU cannot use KVM here: {r.out[-300:]}")
    assert r.status == 0, r
    assert bad_sectors(disk, 5, count=4096) == []
    r = run_guest(guestkit_elf, "blk rw=verify bs=16k qd=16 size=2m seed=5 irq=poll",
                  *blk_args(disk), accel="kvm", timeout=120)
    assert r.status == 0 and r.json["verify_errors"] == 0, r


@pytest.mark.kvm
@pytest.mark.skipif(not _kvm_usable(), reason="/dev/kvm not usable")
def test_kvm_x2apic(guestkit_elf, disk):
    """x2APIC mode: LAPIC through MSRs (ring-0 services), IRQs through the C path."""
    r = run_guest(guestkit_elf, "idle ms=100 tick_ms=10 x2apic=1", accel="kvm")
    if r.status is None and "kvm" in r.out.lower():
        pytest.skip(f"QEMU cannot use KVM here: {r.out[-300:]}")
    assert r.status == 0 and r.json["timer_irqs"] >= 9, r
    r = run_guest(guestkit_elf, "blk rw=fill bs=64k qd=4 size=1m x2apic=1", *blk_args(disk), accel="kvm")
    assert r.status == 0 and r.json["irqs"] > 0, r
    assert bad_sectors(disk, 1, count=2048) == []
