"""Coverage-guided fuzzing of every parser a guest or a vhost-user frontend can reach.

    python3 -m exitless.fuzz --list                     # target names, one per line
    python3 -m exitless.fuzz TARGET --runs N            # or --seconds S; libFuzzer via atheris
    python3 -m exitless.fuzz TARGET --replay FILE...    # run inputs once, without atheris (regressions)
    python3 -m exitless.fuzz --all --seconds S --json F # every target in turn, a summary table

A target is a *harness*: a live object graph (guest memory, a device, a transport, a
vhost-user server) built once per process, fed one input at a time.  On every input
the runner checks the three invariants of the issue:

1. no exception escapes but :class:`~exitless.errors.ExitlessError` (the documented
   errors: a broken ring, a rejected message, a bad image);
2. nothing is accessed outside guest RAM: every guest-physical access goes through
   :class:`~exitless.memory.GuestMemory`, which refuses and counts the wild ones
   (``refused``), and the harness checks that the device models' own catch-alls
   (``Bus.device_errors``, ``VirtioDevice.internal_errors``) stayed at zero;
3. no state in which a later *valid* request fails: after every input the harness's
   ``check()`` drives a well-formed request through the same objects and verifies it.

Adding a target (NVMe, virtio-net, ...): write ``make_<name>() -> Harness`` and
``seeds_<name>() -> list[bytes]`` in a module and add one line to :data:`TARGETS`; ``python3 -m exitless.fuzz --make-seeds`` writes the seeds
into ``corpus/<name>/`` next to this file, where crash reproducers are kept too.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import ExitlessError

CORPUS_DIR = Path(__file__).with_name("corpus")


class InvariantViolation(AssertionError):
    """An input left exitless in a state that breaks one of the fuzzing invariants (a bug)."""


class Harness(Protocol):
    """What a target's ``make()`` returns."""

    def run(self, data: bytes) -> None:
        """Feed one input.  May raise ExitlessError (a documented rejection); nothing else."""

    def check(self) -> None:
        """Raise InvariantViolation unless a valid request still works and no catch-all fired."""

    def counters(self) -> dict:
        """Figures for the summary: at least ``refused`` (guest accesses refused by GuestMemory)."""


@dataclass(frozen=True)
class Target:
    """A fuzz target: module ``exitless.fuzz.<module>`` has ``make_<name>()`` (the harness, built
    once per process) and ``seeds_<name>()`` (seed inputs); imported only when the target runs."""

    name: str
    module: str
    doc: str
    needs_kvm: bool = False
    max_len: int = 8192   # bytes of input libFuzzer may generate

    def _fn(self, prefix: str):
        return getattr(importlib.import_module(f"exitless.fuzz.{self.module}"), f"{prefix}_{self.name}")

    def make(self) -> Harness:
        return self._fn("make")()

    def seeds(self) -> list[bytes]:
        return self._fn("seeds")()

    @property
    def corpus(self) -> Path:
        return CORPUS_DIR / self.name


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("virtqueue", "t_virtio", "split virtqueue pop/push over fuzzed guest memory and indices"),
    Target("virtio_blk", "t_virtio", "virtio-blk requests through handle_queue on a real file"),
    Target("virtio_pci", "t_pci", "virtio-pci common/device config, notify and MSI-X BAR via the MMIO bus",
           needs_kvm=True),
    Target("pci_config", "t_pci", "PCI config space via ports 0xCF8/0xCFC: BAR moves, decode, capabilities",
           needs_kvm=True),
    Target("nvme", "t_nvme", "NVMe registers, doorbells, admin and I/O SQ entries and PRP lists over guest memory",
           max_len=65536),
    Target("virtio_net", "t_net", "virtio-net TX headers, control commands and RX buffers against a fake TAP"),
    Target("vhost_user", "t_vhost", "a vhost-user message stream (with fds) against a live server and backend"),
    Target("elf", "t_boot", "the PVH ELF and vmlinux readers and the PVH loader"),
    Target("bzimage", "t_boot", "the bzImage setup header, payload unpacking and zero page"),
    Target("initramfs", "t_boot", "the newc cpio reader and the LZ4 legacy decoder"),
)}


class Runner:
    """Feeds inputs to one harness and enforces the invariants; counts what happened."""

    def __init__(self, harness: Harness):
        self.harness = harness
        self.executions = 0
        self.rejected = 0

    def one(self, data: bytes) -> None:
        self.executions += 1
        try:
            self.harness.run(data)
        except ExitlessError:
            self.rejected += 1
        self.harness.check()

    def summary(self) -> dict:
        return {"executions": self.executions, "rejected": self.rejected, **self.harness.counters()}
