"""Where the guest kit binary is: the client OS of benchmarks and end-to-end tests."""
from __future__ import annotations

from .errors import ExitlessError
import os
from pathlib import Path

_PACKAGED = Path(__file__).parent / "_guest" / "guestkit.elf"
_SOURCE_TREE = Path(__file__).parent.parent / "guestkit" / "build" / "guestkit.elf"


class GuestKitMissing(ExitlessError, FileNotFoundError):
    pass


def guestkit_path() -> Path:
    """$EXITLESS_GUESTKIT, else the source tree's fresh build, else the copy installed with the package."""
    env = os.environ.get("EXITLESS_GUESTKIT")
    if env:
        if not Path(env).is_file():
            raise GuestKitMissing(f"EXITLESS_GUESTKIT={env} does not exist")
        return Path(env)
    for p in (_SOURCE_TREE, _PACKAGED):
        if p.is_file():
            return p
    raise GuestKitMissing("the guest kit is not built: run `make -C guestkit` (or reinstall exitless with pip)")
