"""Host cost per 64-byte frame through the bench's TAP, with no VM: one write per frame vs io_uring batches,
TX-only frames and ICMP echo round trips (the namespace's kernel answers inside the write).

Run from the source tree as root: `PYTHONPATH=. python3 scripts/net_tap_io_floor.py [MODE:N:B ...]` (makes and
removes its own namespace; compiles scripts/tap_io_floor.c with gcc into a temporary directory).  Default:
tx:300000:32 txu:300000:32 echo:200000:32 echou:200000:32 echo:100000:1.  Process CPU per frame is the figure
to read on a loaded machine; wall time is inflated by other processes.
"""
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, "tests")
import netns as N  # noqa: E402
from exitless.bench.net import Namespace, TAP_NAME  # noqa: E402
from exitless.net.tap import Tap  # noqa: E402

MODES = sys.argv[1:] or ["tx:300000:32", "txu:300000:32", "echo:200000:32", "echou:200000:32", "echo:100000:1"]
src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tap_io_floor.c")
with tempfile.TemporaryDirectory() as tmp:
    exe = os.path.join(tmp, "tap_io_floor")
    subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    ns = Namespace()
    try:
        with Tap.open(TAP_NAME, netns=ns.name) as tap:
            fd = tap.fds[0]
            hdr = bytes(12)
            mac = N.resolve_mac(fd, timeout=3)
            if mac is None:
                sys.exit("no ARP reply from the namespace")
            os.set_inheritable(fd, True)
            for spec in MODES:
                mode, n, b = spec.split(":")
                subprocess.run([exe, str(fd), mode, n, b, mac.hex()], pass_fds=(fd,), check=False)
                while True:          # what a mode left unread
                    try:
                        os.read(fd, 4096)
                    except BlockingIOError:
                        break
    finally:
        ns.close()
