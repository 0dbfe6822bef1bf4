"""vhost-user wire format (QEMU ``docs/interop/vhost-user.rst``): constants, framing, payloads.

Everything here is pure (bytes in, values out) so that it can be driven by
property tests: a frontend is untrusted, and every decoder raises
:class:`ProtocolError` -- and nothing else -- for input it does not accept.

A message is a 12-byte header -- u32 ``request``, u32 ``flags`` (version 1 in
bits 0-1, bit 2 *reply*, bit 3 *need_reply*), u32 ``size`` -- and ``size``
bytes of payload, in native (little-endian) byte order; up to 8 file
descriptors travel beside it as SCM_RIGHTS ancillary data.
"""
from __future__ import annotations

from ..errors import ExitlessError
import struct
from dataclasses import dataclass, field

# -- header ------------------------------------------------------------------------
HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
#: Largest payload accepted: the biggest request we know is SET_MEM_TABLE (8 + 8*32 bytes) and
#: GET/SET_CONFIG (12 + 256).  Anything larger is not a vhost-user message we serve.
MAX_PAYLOAD = 4096
MAX_FDS = 8
MAX_REGIONS = 8
MAX_CONFIG_SIZE = 256

# -- feature bits ---------------------------------------------------------------------
F_PROTOCOL_FEATURES = 30          # VHOST_USER_F_PROTOCOL_FEATURES (a virtio-reserved bit)
F_LOG_ALL = 26                    # VHOST_F_LOG_ALL (migration dirty logging; not offered)

PROTOCOL_F_MQ = 0
PROTOCOL_F_LOG_SHMFD = 1
PROTOCOL_F_RARP = 2
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_MTU = 4
PROTOCOL_F_SLAVE_REQ = 5
PROTOCOL_F_CROSS_ENDIAN = 6
PROTOCOL_F_CRYPTO_SESSION = 7
PROTOCOL_F_PAGEFAULT = 8
PROTOCOL_F_CONFIG = 9
PROTOCOL_F_SLAVE_SEND_FD = 10
PROTOCOL_F_HOST_NOTIFIER = 11
PROTOCOL_F_INFLIGHT_SHMFD = 12
PROTOCOL_F_RESET_DEVICE = 13
PROTOCOL_F_INBAND_NOTIFICATIONS = 14
PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15
PROTOCOL_F_STATUS = 16

# -- vring u64 payloads (SET_VRING_KICK/CALL/ERR) --------------------------------------------
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

# -- requests (front-end -> back-end) -----------------------------------------------------------
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
SEND_RARP = 19
NET_SET_MTU = 20
SET_SLAVE_REQ_FD = 21
IOTLB_MSG = 22
SET_VRING_ENDIAN = 23
GET_CONFIG = 24
SET_CONFIG = 25
CREATE_CRYPTO_SESSION = 26
CLOSE_CRYPTO_SESSION = 27
POSTCOPY_ADVISE = 28
POSTCOPY_LISTEN = 29
POSTCOPY_END = 30
GET_INFLIGHT_FD = 31
SET_INFLIGHT_FD = 32
GPU_SET_SOCKET = 33
RESET_DEVICE = 34
VRING_KICK = 35
GET_MAX_MEM_SLOTS = 36
ADD_MEM_REG = 37
REM_MEM_REG = 38
SET_STATUS = 39
GET_STATUS = 40

_REQUESTS = (
    "GET_FEATURES SET_FEATURES SET_OWNER RESET_OWNER SET_MEM_TABLE SET_LOG_BASE SET_LOG_FD SET_VRING_NUM "
    "SET_VRING_ADDR SET_VRING_BASE GET_VRING_BASE SET_VRING_KICK SET_VRING_CALL SET_VRING_ERR "
    "GET_PROTOCOL_FEATURES SET_PROTOCOL_FEATURES GET_QUEUE_NUM SET_VRING_ENABLE SEND_RARP NET_SET_MTU "
    "SET_SLAVE_REQ_FD IOTLB_MSG SET_VRING_ENDIAN GET_CONFIG SET_CONFIG CREATE_CRYPTO_SESSION "
    "CLOSE_CRYPTO_SESSION POSTCOPY_ADVISE POSTCOPY_LISTEN POSTCOPY_END GET_INFLIGHT_FD SET_INFLIGHT_FD "
    "GPU_SET_SOCKET RESET_DEVICE VRING_KICK GET_MAX_MEM_SLOTS ADD_MEM_REG REM_MEM_REG SET_STATUS GET_STATUS"
).split()
REQUEST_NAMES = {globals()[n]: n for n in _REQUESTS}

# -- exitless's one extension (``exitless sidecore``; not in vhost-user.rst) ---------------------------------
#: The first message on a connection to ``exitless sidecore``: which device model the service builds for
#: this connection and its backing file, by SCM_RIGHTS.  Payload :data:`BACKEND`; fds: the disk (opened
#: O_DIRECT when ``BACKEND_F_DIRECT``), then, with ``BACKEND_F_DIRECT``, a buffered fd of the same file.
#: virtio-net (device id 1; ``num_queues`` = 2 x queue pairs, no flags, ``serial`` the MAC as text): one
#: TAP fd per queue pair, then an eventfd the service writes when the device's configuration (its link
#: status) changes -- the frontend then reads it with GET_CONFIG (:mod:`exitless.sidecore.service_net`).
#: Reply: u64 0 (accepted) or the connection is closed.  A request number far above the spec's (which
#: ends at 40) so that a later vhost-user request cannot collide with it.
EXITLESS_SET_BACKEND = 0x4558_0001
REQUEST_NAMES[EXITLESS_SET_BACKEND] = "EXITLESS_SET_BACKEND"
#: Version of the extension's payload; a service refuses any other.
BACKEND_VERSION = 1
BACKEND = struct.Struct("<IIIII20s")         # version, virtio device id, flags, num_queues, queue_size, serial
BACKEND_F_RO = 1 << 0
BACKEND_F_DIRECT = 1 << 1
BACKEND_FLAGS = BACKEND_F_RO | BACKEND_F_DIRECT
BACKEND_NET = 1                               # virtio device id of virtio-net (its fds differ: see above)


def request_name(request: int) -> str:
    return REQUEST_NAMES.get(request, f"request#{request}")


class ProtocolError(ExitlessError):
    """A message the back-end does not accept (the message says why)."""


class FramingError(ProtocolError):
    """The byte stream itself is unusable (bad header, absurd size, truncation): close the connection."""


# -- messages ---------------------------------------------------------------------------------------
@dataclass
class Message:
    request: int
    flags: int
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        return request_name(self.request)


def parse_header(data: bytes) -> tuple[int, int, int]:
    """(request, flags, size) of a 12-byte header; FramingError if it cannot start a request."""
    if len(data) != HEADER_SIZE:
        raise FramingError(f"truncated header ({len(data)} of {HEADER_SIZE} bytes)")
    request, flags, size = HEADER.unpack(data)
    if flags & VERSION_MASK != VERSION:
        raise FramingError(f"{request_name(request)}: protocol version {flags & VERSION_MASK}, not {VERSION}")
    if flags & FLAG_REPLY:
        raise FramingError(f"{request_name(request)}: a request with the reply flag set")
    if size > MAX_PAYLOAD:
        raise FramingError(f"{request_name(request)}: payload of {size} bytes (at most {MAX_PAYLOAD})")
    return request, flags, size


def encode(request: int, payload: bytes = b"", *, reply: bool = False, need_reply: bool = False) -> bytes:
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


def parse_stream(data: bytes) -> tuple[list[Message], bytes]:
    """Split a byte string into complete messages (without fds) and the unconsumed rest.

    (The server reads one message at a time from the socket; this is the same
    framing for tests and tools.)
    """
    out = []
    pos = 0
    while len(data) - pos >= HEADER_SIZE:
        request, flags, size = parse_header(data[pos:pos + HEADER_SIZE])
        if len(data) - pos - HEADER_SIZE < size:
            break
        out.append(Message(request, flags, data[pos + HEADER_SIZE:pos + HEADER_SIZE + size]))
        pos += HEADER_SIZE + size
    return out, data[pos:]


# -- payloads ---------------------------------------------------------------------------------------------
U64 = struct.Struct("<Q")
STATE = struct.Struct("<II")                 # index, num
ADDR = struct.Struct("<IIQQQQ")              # index, flags, desc, used, avail, log
MEM_HEAD = struct.Struct("<II")              # nregions, padding
MEM_REGION = struct.Struct("<QQQQ")          # guest_phys_addr, memory_size, userspace_addr, mmap_offset
CONFIG_HEAD = struct.Struct("<III")          # offset, size, flags


def _exact(msg: Message, n: int) -> None:
    if len(msg.payload) != n:
        raise ProtocolError(f"{msg.name}: payload is {len(msg.payload)} bytes, expected {n}")


def no_payload(msg: Message) -> None:
    _exact(msg, 0)


def u64(msg: Message) -> int:
    _exact(msg, U64.size)
    return U64.unpack(msg.payload)[0]


def state(msg: Message) -> tuple[int, int]:
    _exact(msg, STATE.size)
    return STATE.unpack(msg.payload)


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


def vring_addr(msg: Message) -> VringAddr:
    _exact(msg, ADDR.size)
    return VringAddr(*ADDR.unpack(msg.payload))


@dataclass(frozen=True)
class MemRegion:
    gpa: int
    size: int
    uva: int
    mmap_offset: int


def mem_table(msg: Message) -> list[MemRegion]:
    """The regions of SET_MEM_TABLE (1..8; the payload may be cut after the last region or full size)."""
    p = msg.payload
    if len(p) < MEM_HEAD.size:
        raise ProtocolError(f"SET_MEM_TABLE: payload of {len(p)} bytes has no region count")
    n, _pad = MEM_HEAD.unpack_from(p)
    if not 1 <= n <= MAX_REGIONS:
        raise ProtocolError(f"SET_MEM_TABLE: {n} regions (1..{MAX_REGIONS} accepted)")
    need = MEM_HEAD.size + n * MEM_REGION.size
    if not need <= len(p) <= MEM_HEAD.size + MAX_REGIONS * MEM_REGION.size:
        raise ProtocolError(f"SET_MEM_TABLE: payload of {len(p)} bytes for {n} regions")
    return [MemRegion(*MEM_REGION.unpack_from(p, MEM_HEAD.size + i * MEM_REGION.size)) for i in range(n)]


def vring_fd_index(msg: Message) -> tuple[int, bool]:
    """(ring index, no-fd flag) of a SET_VRING_KICK/CALL/ERR u64; unknown bits are an error."""
    v = u64(msg)
    if v & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
        raise ProtocolError(f"{msg.name}: unknown bits in {v:#x}")
    return v & VRING_IDX_MASK, bool(v & VRING_NOFD_MASK)


def config(msg: Message) -> tuple[int, int, int, bytes]:
    """(offset, size, flags, data) of GET/SET_CONFIG."""
    p = msg.payload
    if len(p) < CONFIG_HEAD.size:
        raise ProtocolError(f"{msg.name}: payload of {len(p)} bytes has no config header")
    offset, size, flags = CONFIG_HEAD.unpack_from(p)
    if size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE or offset + size > MAX_CONFIG_SIZE:
        raise ProtocolError(f"{msg.name}: config range [{offset}, +{size}) beyond {MAX_CONFIG_SIZE} bytes")
    if len(p) != CONFIG_HEAD.size + size:
        raise ProtocolError(f"{msg.name}: payload of {len(p)} bytes for {size} config bytes")
    return offset, size, flags, p[CONFIG_HEAD.size:]


@dataclass(frozen=True)
class Backend:
    """EXITLESS_SET_BACKEND's payload: ``device_id`` (virtio: 2 = block, 1 = net), ``flags`` (BACKEND_F_*),
    ``num_queues`` and ``queue_size`` of the device, ``serial`` (its GET_ID string, ASCII)."""
    version: int
    device_id: int
    flags: int
    num_queues: int
    queue_size: int
    serial: str


def backend(msg: Message) -> Backend:
    """Decode EXITLESS_SET_BACKEND (version, flags and serial checked; the sizes are the device's to check)."""
    _exact(msg, BACKEND.size)
    version, device_id, flags, num_queues, queue_size, serial = BACKEND.unpack(msg.payload)
    if version != BACKEND_VERSION:
        raise ProtocolError(f"{msg.name}: version {version}, this service speaks {BACKEND_VERSION}")
    if flags & ~BACKEND_FLAGS:
        raise ProtocolError(f"{msg.name}: unknown flags {flags:#x}")
    text = serial.rstrip(b"\0")
    if not text.isascii() or b"\0" in text:
        raise ProtocolError(f"{msg.name}: the serial is not ASCII")
    return Backend(version, device_id, flags, num_queues, queue_size, text.decode())


def encode_backend(b: Backend) -> bytes:
    """The payload of EXITLESS_SET_BACKEND for ``b``."""
    return BACKEND.pack(b.version, b.device_id, b.flags, b.num_queues, b.queue_size, b.serial.encode("ascii"))


#: How many fds each request carries (a function of the payload for the vring fd requests).
def expected_fds(msg: Message) -> int:
    if msg.request == EXITLESS_SET_BACKEND:
        b = backend(msg)
        if b.device_id == BACKEND_NET:
            return b.num_queues // 2 + 1          # a TAP fd per queue pair, the config eventfd
        return 2 if b.flags & BACKEND_F_DIRECT else 1
    if msg.request == SET_MEM_TABLE:
        return len(mem_table(msg))
    if msg.request in (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR):
        return 0 if vring_fd_index(msg)[1] else 1
    return 0


# -- replies ------------------------------------------------------------------------------------------------
def reply_u64(request: int, value: int) -> bytes:
    return encode(request, U64.pack(value & 0xFFFFFFFFFFFFFFFF), reply=True)


def reply_state(request: int, index: int, num: int) -> bytes:
    return encode(request, STATE.pack(index, num), reply=True)


def reply_config(offset: int, flags: int, data: bytes) -> bytes:
    return encode(GET_CONFIG, CONFIG_HEAD.pack(offset, len(data), flags) + data, reply=True)
