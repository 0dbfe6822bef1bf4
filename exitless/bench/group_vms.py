"""Several guest-kit VMs in ONE exitless process, their virtio-blk queues on ONE sidecore thread.

``python3 -m exitless.bench.group_vms --mode poll|adaptive --append APP --out DIR IMG...`` boots one VM
per image (64 MiB RAM, virtio-blk on the image), all served by one
:class:`~exitless.sidecore.engine.SidecoreGroup` thread in ``mode`` (the engine's several-VM support,
as in ``tests/test_sidecore_engine.py::test_two_vms_on_one_sidecore``), runs them concurrently and
exits 0 when every guest exited with status 0.  VM ``k``'s console goes to ``DIR/console{k}.txt`` as it
comes, and its bench-marker window to ``DIR/stats{k}.json`` (:func:`write_window`), the files
``exitless run --stats`` would write: ``bench sidecore`` reads both alike.

It is ``bench sidecore``'s ``shared-1proc`` layout: the sharing of one sidecore by several VMs without
the standalone ``exitless sidecore`` service (the VMs share one process, one GIL and one address space).
"""
from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from ..devices.legacy.bench_marker import write_window
from ..devices.virtio.blk import VirtioBlk
from ..devices.virtio.pci import VirtioPci
from ..guestkit import guestkit_cmdline, guestkit_path
from ..sidecore.engine import SidecoreGroup
from ..vcpu import install_kick_handler
from ..vm import Machine, VmConfig

MEM_MIB = 64


def run_group(images: list[Path], mode: str, append: str, out: Path, timeout: float) -> bool:
    """Boot one VM per image on one ``mode`` sidecore and run them all; True if every guest exited 0."""
    install_kick_handler()          # from the main thread: the VMs run on threads of their own
    consoles = [open(out / f"console{k}.txt", "wb", buffering=0) for k in range(len(images))]
    machines: list[Machine] = []
    group = SidecoreGroup(mode, name="sidecore-shared")
    exits: list = [None] * len(images)
    try:
        for img, con in zip(images, consoles):
            m = Machine(VmConfig(mem_mib=MEM_MIB, console=con.write))
            machines.append(m)
            VirtioPci(m, VirtioBlk(img), mode, sidecore=group)
        group.start()
        for m in machines:
            m.boot_pvh(guestkit_path(), guestkit_cmdline(append))

        def run(k: int) -> None:
            exits[k] = machines[k].run(timeout=timeout)
            write_window(str(out / f"stats{k}.json"), machines[k].bench_marker.window(), exits[k].kind)

        threads = [threading.Thread(target=run, args=(k,), name=f"vm{k}") for k in range(len(machines))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if group.worker is not None and group.worker.error is not None:
            print(f"group_vms: the sidecore failed: {group.worker.error}", file=sys.stderr)
            return False
    finally:
        group.stop()                # before any VM's memory goes away
        for m in machines:
            m.close()
        for con in consoles:
            con.close()
    return all(e is not None and e.kind == "debug-exit" and e.status == 0 for e in exits)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m exitless.bench.group_vms", description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("poll", "adaptive"), required=True)
    p.add_argument("--append", required=True, help="the guest kit's command line (every VM)")
    p.add_argument("--out", type=Path, required=True, help="directory for console{k}.txt and stats{k}.json")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per VM (default 600)")
    p.add_argument("images", nargs="+", type=Path)
    args = p.parse_args(argv)
    return 0 if run_group(args.images, args.mode, args.append, args.out, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
