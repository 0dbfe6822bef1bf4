"""``exitless bench soak`` at a tiny size: the JSON's structure and no lost acknowledged write
(structure, not performance), plus the host-side check catching a lost write."""
import json
import subprocess
import sys

import pytest

from exitless.bench import soak


def test_lost_sectors_counts_a_stale_sector(tmp_path):
    image = tmp_path / "d.img"
    data = bytearray(soak.pattern(7, 0, soak.SOAK_BYTES))
    assert soak.lost_sectors_of(bytes(data), 7) == 0
    data[3 * 512 + 5] ^= 1                                          # one torn sector
    data[9 * 512:10 * 512] = soak.pattern(6, 9 * 512, 512)          # one write lost: the previous generation
    image.write_bytes(data)
    assert soak.lost_sectors(image, 7) == 2


@pytest.mark.kvm
def test_soak_tiny_run_json():
    r = subprocess.run([sys.executable, "-m", "exitless.cli", "bench", "soak", "--minutes", "0.01", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)          # --json alone: only JSON on stdout
    *cycles, summary = rows
    assert summary["summary"] is True and summary["cycles"] == len(cycles) >= 1
    for key in ("minutes", "vm_restarts", "ops", "flushes", "errors", "verify_errors", "lost_acked_writes",
                "disconnects", "mid_io_disconnects", "qemu_sigkills", "backend_survived", "vmm_fds", "vmm_threads",
                "backend_fds", "backend_threads"):
        assert key in summary, key
    assert summary["lost_acked_writes"] == 0 and summary["verify_errors"] == 0 and summary["errors"] == 0
    assert summary["ops"] > 0 and summary["flushes"] > 0 and summary["vm_restarts"] == 4 * len(cycles)
    assert len(summary["vmm_fds"]) == len(cycles)
    for row in cycles:
        assert {"cycle", "t_s", "kind", "path", "generation", "ops", "lost_acked_writes", "vmm_fds",
                "vmm_threads"} <= set(row)
    if summary["with_vhost"]:
        assert summary["backend_survived"] and any(r["kind"] == "vhost-user" for r in cycles)
        # the cut-off random writes end by SIGKILL to QEMU (no vhost-user teardown), and serve blk goes on
        assert summary["qemu_sigkills"] == summary["mid_io_disconnects"] >= 1, summary
