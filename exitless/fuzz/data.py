"""Turning a fuzzer's byte string into typed choices (reads past the end give zeros)."""
from __future__ import annotations


class FuzzInput:
    """A cursor over one input.  Little-endian integers; ``take`` pads with zero bytes at the end,
    so every input, however short, decodes to *some* sequence of operations."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return max(0, len(self.data) - self.pos)

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk if len(chunk) == n else chunk + bytes(n - len(chunk))

    def rest(self, limit: int | None = None) -> bytes:
        end = len(self.data) if limit is None else min(len(self.data), self.pos + limit)
        chunk = self.data[self.pos:end]
        self.pos = max(self.pos, end)
        return chunk

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def pick(self, seq):
        return seq[self.u8() % len(seq)]
