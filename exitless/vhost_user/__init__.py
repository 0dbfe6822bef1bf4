"""vhost-user back-end: serve exitless's virtio devices to a frontend VMM (QEMU) over a unix socket.

* :mod:`.protocol` -- the wire format, pure functions (property-tested);
* :mod:`.memory` -- the frontend's memory table mapped as a checked
  :class:`~exitless.memory.GuestMemory`, plus frontend-virtual -> guest-physical translation;
* :mod:`.backend` -- one session: message handling, ring life cycle, the data plane
  (a :class:`~exitless.sidecore.loop.SidecoreLoop` in kick, poll or adaptive mode);
* :mod:`.server` -- the listening socket, one frontend at a time.

The device model is the one the built-in VMM uses (``VirtioBlk`` on ``Virtqueue``).
"""
from .backend import IO_MODES, VhostUserBackend, VringPollable
from .memory import VhostMemory
from .protocol import FramingError, Message, ProtocolError
from .server import SocketPathError, VhostUserServer, claim_socket_path

__all__ = ["IO_MODES", "FramingError", "Message", "ProtocolError", "SocketPathError", "VhostMemory",
           "VhostUserBackend", "VhostUserServer", "VringPollable", "claim_socket_path"]
