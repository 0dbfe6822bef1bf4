"""A minimal NVMe host driver over the controller model (no KVM): queues in a GuestMemory, MMIO by calls.

Used by the NVMe unit, property and handshake tests.  It follows Linux's order
(disable, AQA/ASQ/ACQ, enable, create CQ then SQ, Doorbell Buffer Config) and
the shadow doorbell rule (store the slot, fence, read EventIdx, ring only if
``(u16)(new - eventidx - 1) < (u16)(new - old)``).
"""
from __future__ import annotations

import struct

from exitless.devices.nvme import constants as K
from exitless.devices.nvme.controller import NvmeController
from exitless.sidecore.spin import fence

ADMIN_SQ, ADMIN_CQ = 0x10000, 0x11000
IO_BASE = 0x20000          # I/O queue pair y: SQ at IO_BASE + 0x4000·y, CQ at + 0x2000
SHADOW, EVENT_IDX = 0x80000, 0x81000
DATA = 0x100000            # data pages from here
MEM_SIZE = 8 << 20


def need_event(event_idx: int, new: int, old: int) -> bool:
    return ((new - event_idx - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class Driver:
    def __init__(self, mem, ctrl: NvmeController, admin_size: int = 16):
        self.mem, self.ctrl = mem, ctrl
        self.sq = {}          # qid -> [base, size, tail]
        self.cq = {}          # qid -> [base, size, head, phase]
        self.cid = 0
        self.dbbuf = False
        self.mmio_doorbells = 0
        self.admin_size = admin_size

    # -- registers --------------------------------------------------------------------------
    def reg(self, off, size=4):
        return self.ctrl.read_register(off, size)

    def wreg(self, off, value, size=4):
        self.ctrl.write_register(off, size, value)

    def enable(self, cc_extra=0):
        self.wreg(K.REG_CC, 0)
        n = self.admin_size
        self.wreg(K.REG_AQA, (n - 1) | (n - 1) << 16)
        self.wreg(K.REG_ASQ, ADMIN_SQ, 8)
        self.wreg(K.REG_ACQ, ADMIN_CQ, 8)
        self.mem.fill(ADMIN_SQ, 0x2000)
        self.wreg(K.REG_CC, K.CC_EN | 6 << 16 | 4 << 20 | cc_extra)
        self.sq = {0: [ADMIN_SQ, n, 0]}
        self.cq = {0: [ADMIN_CQ, n, 0, 1]}
        self.dbbuf = False
        return self.reg(K.REG_CSTS)

    # -- commands -----------------------------------------------------------------------------
    def build(self, opcode, nsid=0, prp1=0, prp2=0, cdw10=0, cdw11=0, cdw12=0, cdw13=0, cdw14=0, cdw15=0,
              cid=None, flags=0):
        if cid is None:
            self.cid = (self.cid + 1) & 0xFFFF
            cid = self.cid
        return struct.pack("<IIQQQQIIIIII", opcode | flags << 8 | cid << 16, nsid, 0, 0, prp1, prp2,
                           cdw10, cdw11, cdw12, cdw13, cdw14, cdw15), cid

    def post(self, qid, raw: bytes) -> None:
        base, size, tail = self.sq[qid]
        self.mem.write(base + 64 * tail, raw)
        self.sq[qid][2] = (tail + 1) % size

    def ring_sq(self, qid, value=None):
        new = self.sq[qid][2] if value is None else value
        if self.dbbuf and qid:
            old = self.mem.read_u32(SHADOW + 8 * qid)
            self.mem.write_u32(SHADOW + 8 * qid, new)
            fence()
            if not need_event(self.mem.read_u32(EVENT_IDX + 8 * qid), new, old):
                return
        self.mmio_doorbells += 1
        self.wreg(K.DOORBELL_BASE + 8 * qid, new)

    def ring_cq(self, qid):
        new = self.cq[qid][2]
        if self.dbbuf and qid:
            old = self.mem.read_u32(SHADOW + 8 * qid + 4)
            self.mem.write_u32(SHADOW + 8 * qid + 4, new)
            fence()
            if not need_event(self.mem.read_u32(EVENT_IDX + 8 * qid + 4), new, old):
                return
        self.mmio_doorbells += 1
        self.wreg(K.DOORBELL_BASE + 8 * qid + 4, new)

    def reap(self, qid, ring=True):
        """Completed entries of CQ ``qid`` as ``(cid, status, dw0, sq_head, sqid)``."""
        base, size, head, phase = self.cq[qid]
        out = []
        while True:
            dw0, _, dw2, dw3 = struct.unpack("<IIII", self.mem.read(base + 16 * head, 16))
            if (dw3 >> 16) & 1 != phase:
                break
            status = ((dw3 >> 17) & 0xFF) | ((dw3 >> 25) & 7) << 8
            out.append((dw3 & 0xFFFF, status, dw0, dw2 & 0xFFFF, dw2 >> 16))
            head += 1
            if head == size:
                head, phase = 0, phase ^ 1
        self.cq[qid][2:] = [head, phase]
        if out and ring:
            self.ring_cq(qid)
        return out

    def cmd(self, qid, opcode, **kw):
        """Submit one command, ring, and return its ``(status, dw0)``."""
        raw, cid = self.build(opcode, **kw)
        self.post(qid, raw)
        self.ring_sq(qid)
        done = self.reap(qid)
        assert len(done) == 1 and done[0][0] == cid, done
        return done[0][1], done[0][2]

    def admin(self, opcode, **kw):
        return self.cmd(0, opcode, **kw)

    # -- set-up ---------------------------------------------------------------------------------
    def create_pair(self, qid, size=64, iv=None, ien=True):
        cq_base, sq_base = IO_BASE + 0x4000 * qid + 0x2000, IO_BASE + 0x4000 * qid
        self.mem.fill(cq_base, 0x2000)
        st, _ = self.admin(K.ADMIN_CREATE_CQ, prp1=cq_base, cdw10=qid | (size - 1) << 16,
                           cdw11=1 | ien << 1 | (qid if iv is None else iv) << 16)
        if st:
            return st
        st, _ = self.admin(K.ADMIN_CREATE_SQ, prp1=sq_base, cdw10=qid | (size - 1) << 16, cdw11=1 | qid << 16)
        if st == 0:
            self.cq[qid] = [cq_base, size, 0, 1]
            self.sq[qid] = [sq_base, size, 0]
        return st

    def enable_dbbuf(self, shadow=SHADOW, event_idx=EVENT_IDX):
        self.mem.fill(SHADOW, 0x2000)
        st, _ = self.admin(K.ADMIN_DOORBELL_BUFFER_CONFIG, prp1=shadow, prp2=event_idx)
        self.dbbuf = st == 0
        return st
