"""The NVMe controller on a real KVM guest: the guest kit's NVMe driver under every I/O path, host checks."""
import json
import logging
import struct

import pytest

from exitless.devices.nvme.namespace import Namespace
from exitless.devices.nvme.pci import NvmePci
from exitless.guestkit import guestkit_path
from exitless.vm import Machine, VmConfig

pytestmark = pytest.mark.kvm
DISK_BYTES = 2 << 20
SEED = 13


def pattern(seed: int, nbytes: int) -> bytes:
    k = (seed * 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF
    return struct.pack(f"<{nbytes // 8}Q", *(i ^ k for i in range(nbytes // 8)))


def run_guest(image, app, path="trap", *, lba=512, read_only=False, queues=2, timeout=240):
    out = bytearray()
    with Machine(VmConfig(mem_mib=128, console=out.extend)) as m:
        dev = NvmePci(m, Namespace(image, lba_size=lba, read_only=read_only), path, queues=queues)
        m.boot_pvh(guestkit_path(), app)
        exit = m.run(timeout=timeout)
        stats = dev.stats()
    lines = [x for x in out.decode(errors="replace").splitlines() if x.startswith('{"app":')]
    assert lines, out.decode(errors="replace")[-2000:]
    return exit, json.loads(lines[-1]), stats


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "ns.img"
    with open(p, "wb") as f:
        f.truncate(DISK_BYTES)
    return p


@pytest.mark.parametrize("path", ["trap", "ioeventfd", "shared", "poll", "adaptive"])
def test_fill_verify_and_host_check(image, path):
    """Two queue pairs, shadow doorbells, a PRP list starting mid-page that chains (64 KiB, prp_off=4000)."""
    exit, res, stats = run_guest(image, f"nvme rw=fill bs=65536 qd=8 queues=2 prp_off=4000 seed={SEED}", path)
    assert exit.kind == "debug-exit" and exit.status == 0, res
    assert res["errors"] == 0 and res["flushes"] == 1 and res["dbbuf"] == 1 and stats["dbbuf_configs"] == 1
    assert image.read_bytes() == pattern(SEED, DISK_BYTES)            # byte for byte on the host
    exit, res, stats = run_guest(image, f"nvme rw=verify bs=4096 qd=4 queues=2 seed={SEED}", path)
    assert exit.status == 0 and res["verify_errors"] == 0 and res["errors"] == 0, res
    if path in ("shared", "poll"):
        # EventIdx parked: the driver (almost) never rings.  A fresh queue's first one or two submissions can
        # ring before the sidecore has parked its EventIdx (seen since session 3 on a quiet host: 1-2 of
        # thousands; an open item of issue 10), so the steady state is what is asserted: < 1 % of the I/Os.
        assert res["doorbells"] * 100 < res["ops"] and stats["shadow_doorbells"] > 0, res
    if path in ("trap", "ioeventfd"):
        assert res["sq_doorbells"] >= res["ops"] // 4                     # EventIdx armed: it rings


def test_lba_4096_and_detects_corruption(image):
    assert run_guest(image, f"nvme rw=fill bs=8192 qd=4 seed={SEED}", "poll", lba=4096)[0].status == 0
    assert image.read_bytes() == pattern(SEED, DISK_BYTES)
    with open(image, "r+b") as f:
        f.seek(300000)
        f.write(b"\x00")
    exit, res, _ = run_guest(image, f"nvme rw=verify bs=4096 qd=2 seed={SEED}", "poll", lba=4096)
    assert exit.status != 0 and res["verify_errors"] >= 1 and res["lba_size"] == 4096


def test_without_dbbuf_poll_falls_back_to_trapped_doorbells(image, caplog):
    with caplog.at_level(logging.WARNING, logger="exitless.devices.nvme.pci"):
        exit, res, stats = run_guest(image, f"nvme rw=fill bs=16384 qd=4 dbbuf=0 seed={SEED}", "adaptive")
    assert exit.status == 0 and res["dbbuf"] == 0 and stats["dbbuf_configs"] == 0, res
    assert res["sq_doorbells"] >= res["ops"] // 4 and stats["mmio_doorbells"] >= res["doorbells"]
    assert "has not sent Doorbell Buffer Config" in caplog.text
    assert image.read_bytes() == pattern(SEED, DISK_BYTES)


def test_read_only_write_zeroes_discard(image):
    image.write_bytes(pattern(SEED, DISK_BYTES))
    exit, res, _ = run_guest(image, "nvme rw=write n=4 bs=4096", "trap", read_only=True)
    assert exit.status == 1 and res["errors"] == 4 and res["first_error_status"] == "0x20"  # write protected
    assert image.read_bytes() == pattern(SEED, DISK_BYTES)
    exit, res, _ = run_guest(image, "nvme rw=write_zeroes bs=65536 size=1048576", "poll")
    assert exit.status == 0, res
    exit, res, _ = run_guest(image, "nvme rw=discard bs=65536 offset=1048576", "poll")
    assert exit.status == 0, res
    assert image.read_bytes() == bytes(DISK_BYTES)


@pytest.mark.parametrize("path", ["trap", "poll"])
def test_hostile_driver_malformed_commands(image, path):
    """Out-of-RAM PRPs and lists, unaligned lists, LBAs and sizes out of range, unknown opcodes, a bad
    queue id, an unaligned shadow page, an SQ tail beyond the queue: each gets its status (or is ignored),
    the controller stays alive, and a final read works."""
    exit, res, stats = run_guest(image, "nvme rw=malformed", path)
    assert exit.kind == "debug-exit" and exit.status == 0, res
    assert res == {**res, "prp_oob": "sc_0x004", "prp2_offset": "sc_0x013", "list_oob": "sc_0x004",
                   "list_unaligned": "sc_0x013", "lba_oob": "sc_0x080", "bad_opcode": "sc_0x001",
                   "bad_nsid": "sc_0x00b", "over_mdts": "sc_0x002", "create_bad_qid": "sc_0x101",
                   "dbbuf_unaligned": "sc_0x002", "sq_tail_oob": "ignored", "final_read": "ok", "cfs": 0}
    assert stats["bad_doorbells"] >= 1 and stats["fatal"] == 0


def test_one_sidecore_serves_virtio_blk_and_nvme(tmp_path, image):
    """One polling sidecore thread serves a virtio-blk disk's queue and the NVMe queue pairs (one boot
    drives the NVMe controller, another the virtio-blk disk, each with both devices on the sidecore)."""
    from exitless.devices.virtio.blk import VirtioBlk
    from exitless.devices.virtio.pci import VirtioPci
    from exitless.sidecore.engine import SidecoreGroup

    disk = tmp_path / "blk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_BYTES)
    for app in (f"nvme rw=fill bs=16384 qd=8 queues=2 seed={SEED}", f"blk rw=fill bs=16384 qd=8 seed={SEED + 1}"):
        out = bytearray()
        with Machine(VmConfig(mem_mib=128, console=out.extend)) as m:
            group = SidecoreGroup("poll", name="sidecore-both")
            blk = VirtioPci(m, VirtioBlk(disk), "poll", sidecore=group)
            nvme = NvmePci(m, Namespace(image), "poll", queues=2, sidecore=group)
            group.start_on(m)
            assert len(group.pollables) == 3 and blk.sidecore is None and nvme.sidecore is None
            m.boot_pvh(guestkit_path(), app)
            assert m.run(timeout=240).status == 0, out.decode()[-1000:]
    assert image.read_bytes() == pattern(SEED, DISK_BYTES)
    assert disk.read_bytes() == pattern(SEED + 1, DISK_BYTES)


def test_nvme_spec():
    from exitless.nvme import NvmeSpec, NvmeSpecError

    assert NvmeSpec.parse("/d.img,ro,direct,io=adaptive,queues=8,lba=4096") == \
        NvmeSpec("/d.img", True, True, "adaptive", 8, 4096)
    for bad in ("", ",ro", "/d,io=fast", "/d,queues=0", "/d,queues=65", "/d,lba=1024", "/d,ro=1", "/d,x"):
        with pytest.raises(NvmeSpecError, match="syntax|given twice|takes no value|is one of|is a number|is 512"):
            NvmeSpec.parse(bad)


def test_cli_run_nvme(image):
    """``exitless run --nvme``: the guest kit fills the namespace through the CLI; bad specs and a
    missing file are the user's errors (exit 2, one line)."""
    import subprocess
    import sys

    run = [sys.executable, "-m", "exitless.cli", "run", "--kernel", str(guestkit_path()), "--timeout", "120"]
    p = subprocess.run(run + ["--append", f"nvme rw=fill bs=65536 qd=4 queues=2 seed={SEED}",
                              "--nvme", f"{image},io=adaptive,queues=2"], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-1000:] + p.stderr[-1000:]
    assert image.read_bytes() == pattern(SEED, DISK_BYTES)
    p = subprocess.run(run + ["--append", "nvme rw=ident", "--nvme", f"{image}.missing"], capture_output=True, text=True)
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run(run + ["--append", "nvme rw=ident", "--nvme", f"{image},queues=0"], capture_output=True, text=True)
    assert p.returncode == 2 and "queues is a number in 1..64" in p.stderr


def test_bench_nvme_json_on_stdout():
    """``exitless bench nvme`` at a tiny size: only JSON on stdout, bench blk's keys plus dbbuf and MMIO
    doorbells per I/O, every row in both rounds.  Structure only: no figure is asserted."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "exitless.cli", "bench", "nvme", "--tests", "randread-4k-qd1",
                        "--scale", "0.01", "--rounds", "2", "--paths", "trap", "poll", "--no-qemu", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert [(r["path"], r["irq"], r["dbbuf"]) for r in rows] == [
        ("trap", "msix", 1), ("trap", "msix", 0), ("poll", "msix", 1), ("poll", "poll", 1)]
    keys = {"vmm", "path", "test", "irq", "p50_us", "p99_us", "iops", "exits_per_io", "cpu_us_per_io",
            "doorbells_per_io", "dbbuf"}
    assert all(keys <= set(row) and row["errors"] == 0 and row["rounds"] == 2 and row["ops"] == 40 for row in rows)
    assert rows[1]["doorbells_per_io"] == 2.0                 # no shadow doorbells: SQ tail + CQ head each I/O
    assert rows[2]["doorbells_per_io"] == 0.0                 # EventIdx parked: the driver never rings
