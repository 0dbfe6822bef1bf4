"""Fuzz target ``nvme``: the NVMe controller's registers, doorbells, admin and I/O submission
queues and the PRP walker over fuzzed guest memory (NVMe 1.4 §3.1, §4.3, §5, §6)."""
from __future__ import annotations

import os
import struct
import tempfile

from ..devices.nvme import constants as K
from ..devices.nvme.controller import NvmeController
from ..devices.nvme.namespace import Namespace
from ..devices.nvme.prp import PrpError, prp_segments
from ..memory import GuestMemory
from . import InvariantViolation
from .data import FuzzInput
from .t_virtio import _tmpdir, clear, write_span

# Guest RAM: two adjacent regions (PRP data may straddle them), a hole, and a region of its own
# for check()'s admin and I/O queues and data page.
RAM_LAYOUT = [(0x0, 0x10000), (0x10000, 0x10000), (0x30000, 0x5000)]
FUZZ_END = 0x20000                                   # fuzzed bytes land in [0, FUZZ_END)
ASQ, ACQ = 0x0, 0x1000                               # the default admin queues of run()
C_ASQ, C_ACQ, C_IOSQ, C_IOCQ, C_DATA = 0x30000, 0x31000, 0x32000, 0x33000, 0x34000
CC_ENABLE = K.CC_EN | K.SQES_LOG2 << K.CC_IOSQES_SHIFT | K.CQES_LOG2 << K.CC_IOCQES_SHIFT
REGISTERS = (K.REG_CAP, K.REG_INTMS, K.REG_INTMC, K.REG_CC, K.REG_CSTS, K.REG_NSSR, K.REG_AQA, K.REG_ASQ,
             K.REG_ASQ + 4, K.REG_ACQ, K.REG_ACQ + 4, 0x40, 0xFFC)
MAX_OPS = 16


class NvmeHarness:
    DISK_BYTES = 64 << 10

    def __init__(self):
        self.mem = GuestMemory.create(RAM_LAYOUT, name="exitless-fuzz-nvme")
        self.tmp = tempfile.TemporaryDirectory(prefix="exitless-fuzz-", dir=_tmpdir())
        self.path = os.path.join(self.tmp.name, "disk.img")
        with open(self.path, "wb") as f:
            f.truncate(self.DISK_BYTES)
        self.ns = Namespace(self.path)
        self.ctrl = NvmeController(self.mem, self.ns, max_io_queues=4)
        self.walks = 0

    def run(self, data: bytes) -> None:
        inp, mem, ctrl = FuzzInput(data), self.mem, self.ctrl
        clear(mem)
        ctrl.write_register(K.REG_CC, 4, 0)                     # controller reset: a clean start
        flags = inp.u8()
        ctrl.write_register(K.REG_AQA, 4, inp.u32() if flags & 1 else 15 | 15 << 16)
        ctrl.write_register(K.REG_ASQ, 8, inp.u64() if flags & 2 else ASQ)
        ctrl.write_register(K.REG_ACQ, 8, inp.u64() if flags & 4 else ACQ)
        write_span(mem, 0, inp.rest(inp.u16() % FUZZ_END))     # SQ entries, PRP lists, data, shadow pages
        ctrl.write_register(K.REG_CC, 4, inp.u32() if flags & 8 else CC_ENABLE)
        for _ in range(1 + inp.u8() % MAX_OPS):
            kind = inp.u8() % 5
            if kind <= 1:                                          # the common case: a doorbell
                ctrl.write_register(K.DOORBELL_BASE + K.DOORBELL_STRIDE * (inp.u8() % 10), 4,
                                    inp.u16() if kind == 0 else inp.u32())
            elif kind == 2:
                off = inp.pick(REGISTERS)
                ctrl.write_register(off, 8 if inp.flag() else 4, inp.u64())
                ctrl.read_register(inp.pick(REGISTERS), 4)
            elif kind == 3:
                ctrl.service_queue(inp.u8() % 6)
            else:
                self._walk(inp)
        ctrl.intx_asserted()

    def _walk(self, inp: FuzzInput) -> None:
        """The PRP walker on its own: whatever it returns lies inside guest RAM, in order, and adds up."""
        prp1, prp2 = inp.u64(), inp.u64()
        if inp.flag():
            prp1 %= FUZZ_END
            prp2 %= FUZZ_END
        length = inp.u32() % (1 << 20)
        self.walks += 1
        try:
            segs = prp_segments(self.mem, prp1, prp2, length)
        except PrpError:
            return
        if sum(n for _, n in segs) != length:
            raise InvariantViolation(f"PRP walk of {length} bytes returned {segs!r}")
        for gpa, n in segs:
            if not self.mem.contains(gpa, n):
                raise InvariantViolation(f"PRP segment {gpa:#x}+{n:#x} outside guest RAM was accepted")

    # -- check(): a driver's valid initialisation and I/O --------------------------------------
    def _submit(self, sq_base: int, cq_base: int, qid: int, state: dict, cmd: bytes) -> int:
        mem, ctrl = self.mem, self.ctrl
        tail = state["sq_tail"]
        mem.write(sq_base + 64 * tail, struct.pack("<I", (cmd[0] | state["cid"] << 16)) + cmd[4:64])
        state["sq_tail"] = (tail + 1) % 4
        ctrl.write_register(K.DOORBELL_BASE + K.DOORBELL_STRIDE * 2 * qid, 4, state["sq_tail"])
        head = state["cq_head"]
        dw2, dw3 = struct.unpack("<II", mem.read(cq_base + 16 * head + 8, 8))
        if (dw3 >> 16) & 1 != state["phase"] or dw3 & 0xFFFF != state["cid"]:
            raise InvariantViolation(f"a valid command (opcode {cmd[0]:#x}, queue {qid}) was not completed: "
                                     f"CSTS {ctrl.csts:#x}")
        state["cid"] += 1
        state["cq_head"] = (head + 1) % 4
        if state["cq_head"] == 0:
            state["phase"] ^= 1
        ctrl.write_register(K.DOORBELL_BASE + K.DOORBELL_STRIDE * (2 * qid + 1), 4, state["cq_head"])
        return (dw3 >> 17) & 0x7FF

    @staticmethod
    def _cmd(opcode: int, nsid: int = 0, prp1: int = 0, cdw10: int = 0, cdw11: int = 0, cdw12: int = 0) -> bytes:
        return struct.pack("<IIQQQQIIIIII", opcode, nsid, 0, 0, prp1, 0, cdw10, cdw11, cdw12, 0, 0, 0)

    def check(self) -> None:
        mem, ctrl = self.mem, self.ctrl
        if os.stat(self.path).st_size != self.DISK_BYTES:
            raise InvariantViolation("the disk image changed size")
        ctrl.write_register(K.REG_CC, 4, 0)
        for gpa in (C_ASQ, C_ACQ, C_IOSQ, C_IOCQ, C_DATA):
            mem.fill(gpa, K.PAGE_SIZE)
        ctrl.write_register(K.REG_AQA, 4, 3 | 3 << 16)
        ctrl.write_register(K.REG_ASQ, 8, C_ASQ)
        ctrl.write_register(K.REG_ACQ, 8, C_ACQ)
        ctrl.write_register(K.REG_CC, 4, CC_ENABLE)
        if not ctrl.ready:
            raise InvariantViolation(f"a valid enable left CSTS {ctrl.csts:#x}")
        admin = {"sq_tail": 0, "cq_head": 0, "phase": 1, "cid": 1}
        io = dict(admin)
        steps = [
            (admin, 0, self._cmd(K.ADMIN_CREATE_CQ, prp1=C_IOCQ, cdw10=1 | 3 << 16, cdw11=1)),
            (admin, 0, self._cmd(K.ADMIN_CREATE_SQ, prp1=C_IOSQ, cdw10=1 | 3 << 16, cdw11=1 | 1 << 16)),
        ]
        for state, qid, cmd in steps:
            status = self._submit(C_ASQ, C_ACQ, qid, state, cmd)
            if status:
                raise InvariantViolation(f"admin opcode {cmd[0]:#x} failed with status {status:#x}")
        payload = os.urandom(512)
        mem.write(C_DATA, payload)
        for op, prp1 in ((K.NVM_WRITE, C_DATA), (K.NVM_READ, C_DATA + 0x200), (K.NVM_FLUSH, 0)):
            status = self._submit(C_IOSQ, C_IOCQ, 1, io, self._cmd(op, nsid=1, prp1=prp1, cdw10=5))
            if status:
                raise InvariantViolation(f"a valid I/O command {op:#x} failed with status {status:#x}")
        if mem.read(C_DATA + 0x200, 512) != payload:
            raise InvariantViolation("a sector read back differs from what was written")

    def counters(self) -> dict:
        return {"refused": self.mem.refused, "commands": self.ctrl.stats["commands"],
                "bad_doorbells": self.ctrl.stats["bad_doorbells"], "fatal": self.ctrl.stats["fatal"],
                "prp_walks": self.walks}


def make_nvme() -> NvmeHarness:
    return NvmeHarness()


# -- seed inputs (python3 -m exitless.fuzz --make-seeds writes them to corpus/) --------------------
IOSQ, IOCQ, LISTS, DATA = 0x2000, 0x3000, 0x5000, 0x8000
CREATE_PAIR = [
    struct.pack("<IIQQQQIIIIII", K.ADMIN_CREATE_CQ | 1 << 16, 0, 0, 0, IOCQ, 0, 1 | 15 << 16, 1, 0, 0, 0, 0),
    struct.pack("<IIQQQQIIIIII", K.ADMIN_CREATE_SQ | 2 << 16, 0, 0, 0, IOSQ, 0, 1 | 15 << 16, 1 | 1 << 16, 0, 0, 0, 0),
]


def _entry(opcode: int, nsid: int = 0, prp1: int = 0, prp2: int = 0, cdw10: int = 0, cdw11: int = 0,
           cdw12: int = 0, cid: int = 3) -> bytes:
    return struct.pack("<IIQQQQIIIIII", opcode | cid << 16, nsid, 0, 0, prp1, prp2, cdw10, cdw11, cdw12, 0, 0, 0)


def _doorbell(index: int, value: int) -> bytes:
    return bytes([0, index]) + struct.pack("<H", value)


def _seed(admin: list[bytes], io: list[bytes], lists: bytes = b"", extra: list[bytes] = ()) -> bytes:
    """Admin entries at ASQ, I/O entries at IOSQ, PRP lists at LISTS; then ring both tails."""
    ram = bytearray(LISTS + len(lists))
    for base, entries in ((ASQ, admin), (IOSQ, io)):
        for i, e in enumerate(entries):
            ram[base + 64 * i:base + 64 * i + 64] = e
    ram[LISTS:] = lists
    ops = [_doorbell(0, len(admin)), _doorbell(2, len(io)), *extra]
    return bytes([0]) + struct.pack("<H", len(ram)) + bytes(ram) + bytes([len(ops) - 1]) + b"".join(ops)


def seeds_nvme() -> list[bytes]:
    rw = [_entry(K.NVM_WRITE, 1, DATA, 0, 0, 0, 7), _entry(K.NVM_READ, 1, DATA + 0x100, DATA + 0x1000, 2, 0, 15),
          _entry(K.NVM_FLUSH, 1), _entry(K.NVM_WRITE_ZEROES, 1, 0, 0, 4, 0, 3)]
    three_pages = struct.pack("<QQ", DATA + 0x1000, DATA + 0x2000)
    chained = b"".join(struct.pack("<Q", DATA + 0x1000 * (i % 8)) for i in range(511)) + struct.pack("<Q", LISTS + 0x1000)
    chained += struct.pack("<Q", DATA) * 4
    walk = bytes([4]) + struct.pack("<QQI", DATA, LISTS, 3 * 4096) + bytes([1])
    return [
        _seed(CREATE_PAIR, rw),
        _seed(CREATE_PAIR, [_entry(K.NVM_READ, 1, DATA, LISTS, 0, 0, 23)], three_pages + bytes(8)),
        _seed(CREATE_PAIR, [_entry(K.NVM_WRITE, 1, DATA + 0x10, LISTS + 0xF00, 0, 0, 511)], bytes(0xF00) + chained),
        _seed(CREATE_PAIR + [_entry(K.ADMIN_IDENTIFY, 0, DATA, 0, 1), _entry(K.ADMIN_GET_LOG_PAGE, 0, DATA, 0,
                                                                               2 | 127 << 16),
                             _entry(K.ADMIN_DOORBELL_BUFFER_CONFIG, 0, 0x6000, 0x7000),
                             _entry(K.ADMIN_ASYNC_EVENT_REQUEST)],
              [_entry(K.NVM_DATASET_MANAGEMENT, 1, LISTS, 0, 1, 4)], struct.pack("<IIQ", 0, 8, 0) * 2,
              [_doorbell(2, 40), bytes([3, 1]), _doorbell(3, 1)]),
        _seed(CREATE_PAIR, rw, three_pages, [walk]),
    ]
