"""Host network back-ends for virtio-net: TAP devices (``/dev/net/tun``)."""
from __future__ import annotations

from .tap import Tap, TapError, create_tap

__all__ = ["Tap", "TapError", "create_tap"]
