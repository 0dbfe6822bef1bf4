"""``exitless serve …`` as a child process for end-to-end tests: started, waited for, stopped."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


class ServeProcess:
    """``python -m exitless.cli serve DEVICE ARGS…`` with its stderr in ``log``; ready once it logs "serving".

    ``command``: the words before ``ARGS`` instead (``("sidecore",)`` runs ``exitless sidecore ARGS…``).
    """

    def __init__(self, device: str | None, args: list[str], log: Path, ready_s: float = 60.0, *,
                 command: tuple[str, ...] | None = None):
        self.log = log
        words = list(command) if command is not None else ["serve", device]
        with open(log, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "exitless.cli", *words, *args],
                                         stdout=subprocess.DEVNULL, stderr=f)
        deadline = time.monotonic() + ready_s
        try:
            while "serving" not in self.text():
                assert self.proc.poll() is None, self.text()
                assert time.monotonic() < deadline, self.text()
                time.sleep(0.05)
        except BaseException:
            self.proc.kill()            # a back-end that never got ready must not outlive its test
            self.proc.wait()
            raise

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM (a clean stop) and the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)
