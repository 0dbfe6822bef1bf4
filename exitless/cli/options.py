"""Argument types shared by several commands (argparse ``type=`` callables)."""
from __future__ import annotations

import argparse


def mem_size(text: str) -> int:
    """``'256'``, ``'256M'``, ``'1G'`` -> MiB."""
    t = text.strip().upper()
    try:
        if t.endswith("G"):
            return int(t[:-1]) * 1024
        return int(t[:-1] if t.endswith("M") else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad memory size {text!r} (e.g. 256M, 1G)") from None


def power_of_two(text: str) -> int:
    """A ring size: a power of two in 1..32768 (virtio 1.2 §2.7)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= v <= 32768 or v & (v - 1):
        raise argparse.ArgumentTypeError(f"{v} is not a power of two in 1..32768")
    return v
