"""KVM binary statistics (``KVM_GET_STATS_FD``): the kernel's own exit counters.

Benchmarks divide these counters by completed operations, so "exits per I/O"
never depends on the VMM's own bookkeeping.
"""
from __future__ import annotations

import ctypes
import os

from . import structs as S

TYPE_MASK = 0xF
TYPE_CUMULATIVE, TYPE_INSTANT, TYPE_PEAK = 0, 1, 2


class Stats:
    """One statistics fd (of a VM or a vCPU); ``read()`` returns {name: value}."""

    def __init__(self, fd: int):
        self.fd = fd
        hdr = S.kvm_stats_header.from_buffer_copy(os.pread(fd, ctypes.sizeof(S.kvm_stats_header), 0))
        self._data_offset = hdr.data_offset
        desc_size = ctypes.sizeof(S.kvm_stats_desc) + hdr.name_size
        raw = os.pread(fd, desc_size * hdr.num_desc, hdr.desc_offset)
        self.fields: dict[str, tuple[int, int, int]] = {}  # name -> (offset, size, flags)
        for i in range(hdr.num_desc):
            base = i * desc_size
            d = S.kvm_stats_desc.from_buffer_copy(raw, base)
            name = raw[base + ctypes.sizeof(S.kvm_stats_desc): base + desc_size].split(b"\0", 1)[0].decode()
            self.fields[name] = (d.offset, d.size, d.flags)
        end = max((o + 8 * s for o, s, _ in self.fields.values()), default=0)
        self._data_len = end

    def read(self) -> dict[str, int]:
        """Scalar counters (histograms are summed)."""
        data = os.pread(self.fd, self._data_len, self._data_offset)
        out = {}
        for name, (off, size, _flags) in self.fields.items():
            vals = memoryview(data)[off:off + 8 * size].cast("Q")
            out[name] = vals[0] if size == 1 else sum(vals)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}
