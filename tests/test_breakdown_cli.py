"""`python3 -m exitless.sidecore.breakdown` (a README command) runs, the `serve` rows included."""
import json
import subprocess
import sys

import pytest


@pytest.mark.kvm
@pytest.mark.qemu
def test_breakdown_serve_row(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, "-m", "exitless.sidecore.breakdown", "-n", "200", "--tests",
                        "randread-4k-qd1", "--where", "serve", "--json", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-1500:]
    (row,) = json.loads(out.read_text())
    assert row["where"] == "serve" and row["iops"] > 0 and row["requests"] > 0
