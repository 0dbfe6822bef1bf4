"""README.md's `run` examples work as written (with `exitless` as `python3 -m exitless.cli` of this tree)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _example_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"Examples \(from the source tree.*?```sh\n(.*?)```", text, re.S)
    assert block, "README.md lost its run examples"
    return [line for line in block.group(1).splitlines() if line.strip()]


@pytest.mark.kvm
def test_readme_run_examples_work(tmp_path):
    lines = _example_lines()
    assert any("exitless run" in line for line in lines)
    for line in lines:
        cmd = line.replace("exitless ", f"{sys.executable} -m exitless.cli ", 1).replace("/tmp/", f"{tmp_path}/")
        r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, (line, r.stderr[-800:])
        if "exitless run" in line:
            assert '"errors":0' in r.stdout or '"app":"info"' in r.stdout, (line, r.stdout[-800:])
