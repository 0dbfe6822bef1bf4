"""QEMU's NVMe (``-device nvme``, shadow doorbells on in 7.2) runs the same guest kit ELF: the peer.

The two controllers must agree: what one writes the other verifies, byte for byte, with and without
Doorbell Buffer Config.  QEMU runs under TCG here: functionally the same controller, and on this
host's software-nested KVM its firmware (ring 0, emulated) alone takes ~25 s to boot, against 0.4 s
under TCG; ``exitless bench nvme`` runs QEMU with KVM.
"""
import json

import pytest

from exitless.devices.nvme.namespace import Namespace
from exitless.devices.nvme.pci import NvmePci
from exitless.guestkit import guestkit_path
from exitless.vm import Machine, VmConfig
from test_guestkit_qemu import QEMU, bad_sectors, guestkit_elf, run_guest  # noqa: F401 (fixture)

pytestmark = [pytest.mark.qemu, pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")]
ACCEL = "tcg"
DISK_BYTES = 4 << 20


def qemu_nvme(elf, img, app, *extra):
    return run_guest(elf, app, "-drive", f"file={img},if=none,id=n0,format=raw,cache=writeback",
                     "-device", "nvme,drive=n0,serial=gk0", *extra, accel=ACCEL, timeout=120)


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "ns.img"
    with open(p, "wb") as f:
        f.truncate(DISK_BYTES)
    return p


@pytest.mark.parametrize("dbbuf", [1, 0])
def test_qemu_fill_verify(guestkit_elf, img, dbbuf):
    r = qemu_nvme(guestkit_elf, img, f"nvme rw=fill bs=65536 qd=8 queues=2 prp_off=4000 dbbuf={dbbuf} seed=4")
    assert r.status == 0 and r.json["dbbuf"] == dbbuf and r.json["errors"] == 0, r
    assert bad_sectors(img, 4) == []
    r = qemu_nvme(guestkit_elf, img, f"nvme rw=verify bs=4096 qd=4 dbbuf={dbbuf} seed=4")
    assert r.status == 0 and r.json["verify_errors"] == 0, r
    if dbbuf == 0:
        assert r.json["sq_doorbells"] >= r.json["ops"] // 4 and r.json["shadow_writes"] == 0


def test_qemu_ident_and_malformed(guestkit_elf, img):
    r = qemu_nvme(guestkit_elf, img, "nvme rw=ident")
    assert r.status == 0 and int(r.json["oacs"], 16) & 0x100 and r.json["dbbuf"] == 1, r
    r = qemu_nvme(guestkit_elf, img, "nvme rw=malformed")
    # QEMU 7.2 DMAs to unassigned memory without an error and reads PRP lists at any alignment, so
    # two cases are "accepted" there (exitless fails them: see test_nvme_e2e); the rest agree.
    assert r.json["final_read"] == "ok" and r.json["cfs"] == 0, r
    for case in ("list_oob", "lba_oob", "bad_opcode", "create_bad_qid", "dbbuf_unaligned"):
        assert r.json[case].startswith("sc_"), (case, r.json)
    assert r.json["sq_tail_oob"] == "ignored"


@pytest.mark.kvm
def test_exitless_and_qemu_agree(guestkit_elf, tmp_path):
    """exitless (poll path) fills one image, QEMU another, same seed: identical; each VMM verifies the
    image the other wrote."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(DISK_BYTES)

    def exitless(img, app):
        out = bytearray()
        with Machine(VmConfig(mem_mib=128, console=out.extend)) as m:
            NvmePci(m, Namespace(img), "poll", queues=2)
            m.boot_pvh(guestkit_path(), app)
            status = m.run(timeout=240).status
        return status, json.loads([x for x in out.decode().splitlines() if x.startswith('{"app":')][-1])

    st, res = exitless(a, "nvme rw=fill bs=16384 qd=8 queues=2 seed=9")
    assert st == 0, res
    r = qemu_nvme(guestkit_elf, b, "nvme rw=fill bs=16384 qd=8 queues=2 seed=9")
    assert r.status == 0, r
    assert a.read_bytes() == b.read_bytes()
    r = qemu_nvme(guestkit_elf, a, "nvme rw=verify bs=4096 qd=4 seed=9")
    assert r.status == 0 and r.json["verify_errors"] == 0, r
    st, res = exitless(b, "nvme rw=verify bs=4096 qd=4 seed=9")
    assert st == 0 and res["verify_errors"] == 0 and res["ops"] == r.json["ops"], res
