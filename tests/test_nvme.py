"""The NVMe controller model driven directly (no KVM): registers, admin and I/O commands, PRPs, shadow
doorbells, and a hostile driver (each bad input gets its spec status or CSTS.CFS, never an exception)."""
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exitless.devices.nvme import constants as K
from exitless.devices.nvme.controller import NvmeController
from exitless.devices.nvme.namespace import Namespace, NamespaceError
from exitless.devices.nvme.prp import PrpError, prp_segments
from exitless.memory import GuestMemory
from nvme_driver import DATA, EVENT_IDX, MEM_SIZE, SHADOW, Driver

DISK = 1 << 20


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "ns.img"
    p.write_bytes(bytes(range(256)) * (DISK // 256))
    return p


class Rig:
    def __init__(self, image, *, lba=512, read_only=False, queues=4, park=False):
        self.mem = GuestMemory.create([(0, MEM_SIZE)])
        self.ns = Namespace(image, lba_size=lba, read_only=read_only)
        self.irqs = []
        self.bound = []
        rig = self

        class Listener:
            def dbbuf_bound(self, qid):
                rig.bound.append(qid)

            def dbbuf_unbound(self, qid):
                rig.bound.remove(qid)

        self.ctrl = NvmeController(self.mem, self.ns, max_io_queues=queues, num_vectors=queues + 1,
                                   irq=lambda cq: self.irqs.append(None if cq is None else cq.cqid),
                                   listener=Listener())
        self.ctrl.park_event_idx = park
        self.drv = Driver(self.mem, self.ctrl)

    def close(self):
        self.ns.close()
        self.mem.close()


@pytest.fixture
def rig(image):
    r = Rig(image)
    assert r.drv.enable() == K.CSTS_RDY
    yield r
    r.close()


def rw(drv, qid, opcode, slba, nlb, prp1, prp2=0, cdw12_extra=0):
    return drv.cmd(qid, opcode, nsid=1, prp1=prp1, prp2=prp2, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                   cdw12=(nlb - 1) | cdw12_extra)[0]


# -- registers and bring-up ----------------------------------------------------------------------
def test_registers_and_linux_probe_order(rig):
    d, c = rig.drv, rig.ctrl
    cap = d.reg(K.REG_CAP, 8)
    assert cap & 0xFFFF == c.MQES and cap >> 16 & 1 and (cap >> 37) & 1 and (cap >> 32) & 0xF == 0
    assert d.reg(K.REG_CAP) | d.reg(K.REG_CAP + 4) << 32 == cap           # two dword reads
    assert d.reg(K.REG_VS) == 0x10400 and d.reg(K.REG_CMBLOC) == 0 and d.reg(K.REG_CMBSZ) == 0
    buf = DATA
    assert d.admin(K.ADMIN_IDENTIFY, prp1=buf, cdw10=K.CNS_CONTROLLER) == (0, 0)
    ident = rig.mem.read(buf, 4096)
    assert struct.unpack_from("<H", ident, 0x100)[0] & K.OACS_DBBUF
    assert ident[0x4D] == c.MDTS and struct.unpack_from("<I", ident, 0x204)[0] == 1
    assert d.admin(K.ADMIN_IDENTIFY, prp1=buf, cdw10=K.CNS_CS_CONTROLLER)[0] == 0
    st, dw0 = d.admin(K.ADMIN_SET_FEATURES, cdw10=K.FEAT_NUMBER_OF_QUEUES, cdw11=0xFFFE_FFFE)
    assert st == 0 and dw0 == (3 << 16 | 3)
    for q in (1, 2):
        assert d.create_pair(q) == 0
    assert d.enable_dbbuf() == 0 and rig.bound == [1, 2]
    assert d.admin(K.ADMIN_IDENTIFY, prp1=buf, cdw10=K.CNS_ACTIVE_NS_LIST)[0] == 0
    assert rig.mem.read(buf, 8) == struct.pack("<II", 1, 0)
    assert d.admin(K.ADMIN_IDENTIFY, nsid=1, prp1=buf, cdw10=K.CNS_NS_ID_DESCRIPTORS)[0] == 0
    desc = rig.mem.read(buf, 40)
    assert desc[0] == K.NIDT_NGUID and desc[1] == 16 and desc[4:20] == rig.ns.nguid and desc[20] == K.NIDT_UUID
    assert d.admin(K.ADMIN_IDENTIFY, nsid=1, prp1=buf, cdw10=K.CNS_NAMESPACE)[0] == 0
    nsze, = struct.unpack_from("<Q", rig.mem.read(buf, 8))
    assert nsze == DISK // 512 and rig.mem.read(buf + 0x68, 16) == rig.ns.nguid
    assert (struct.unpack_from("<I", rig.mem.read(buf + 0x80, 4))[0] >> 16) & 0xFF == 9
    # shutdown, then disable: RDY drops, queues are gone, the shadow doorbells forgotten
    d.wreg(K.REG_CC, d.reg(K.REG_CC) | 1 << K.CC_SHN_SHIFT)
    assert (d.reg(K.REG_CSTS) >> 2) & 3 == K.SHST_COMPLETE
    d.wreg(K.REG_CC, 0)
    assert d.reg(K.REG_CSTS) == 0 and rig.ctrl.sqs == {} and rig.ctrl.shadow is None and rig.bound == []


def test_bad_enable_sets_cfs(image):
    r = Rig(image)
    try:
        assert r.drv.enable(cc_extra=1 << K.CC_MPS_SHIFT) & K.CSTS_CFS       # 8 KiB pages: unsupported
        r.drv.wreg(K.REG_CC, 0)
        assert r.drv.reg(K.REG_CSTS) == 0                                   # a reset clears it
        r.drv.wreg(K.REG_AQA, 0)                                            # 1-entry admin queues
        r.drv.wreg(K.REG_CC, K.CC_EN)
        assert r.drv.reg(K.REG_CSTS) & K.CSTS_CFS
        r.drv.wreg(K.REG_CC, 0)
        r.drv.wreg(K.REG_AQA, 0x000F000F)
        r.drv.wreg(K.REG_ASQ, 1 << 40, 8)                                   # admin SQ outside RAM
        r.drv.wreg(K.REG_CC, K.CC_EN)
        assert r.drv.reg(K.REG_CSTS) & K.CSTS_CFS
        assert r.drv.enable() == K.CSTS_RDY
    finally:
        r.close()


def test_features_logs_abort_and_aer(rig):
    d = rig.drv
    assert d.admin(K.ADMIN_GET_FEATURES, cdw10=K.FEAT_VOLATILE_WRITE_CACHE) == (0, 1)
    assert d.admin(K.ADMIN_SET_FEATURES, cdw10=K.FEAT_VOLATILE_WRITE_CACHE, cdw11=0)[0] == 0
    assert d.admin(K.ADMIN_GET_FEATURES, cdw10=K.FEAT_VOLATILE_WRITE_CACHE) == (0, 0)
    assert d.admin(K.ADMIN_SET_FEATURES, cdw10=K.FEAT_INTERRUPT_COALESCING, cdw11=0x0A05)[0] == 0
    assert d.admin(K.ADMIN_SET_FEATURES, cdw10=K.FEAT_ASYNC_EVENT_CONFIG, cdw11=0x100)[0] == 0
    assert d.admin(K.ADMIN_SET_FEATURES, cdw10=0x7E)[0] == K.SC_INVALID_FIELD
    assert d.admin(K.ADMIN_SET_FEATURES, cdw10=K.FEAT_ARBITRATION | 1 << 31)[0] == K.SC_FEATURE_NOT_SAVEABLE
    assert d.admin(K.ADMIN_GET_LOG_PAGE, prp1=DATA, cdw10=K.LOG_SMART_HEALTH | 127 << 16)[0] == 0
    assert rig.mem.read(DATA + 3, 1) == b"\x64"                              # available spare 100 %
    assert d.admin(K.ADMIN_GET_LOG_PAGE, prp1=DATA, cdw10=K.LOG_ERROR_INFORMATION | 15 << 16)[0] == 0
    assert d.admin(K.ADMIN_GET_LOG_PAGE, prp1=DATA, cdw10=0x7F | 15 << 16)[0] == K.SC_INVALID_LOG_PAGE
    assert d.admin(K.ADMIN_ABORT, cdw10=1 | 5 << 16) == (0, 1)
    # AERs are held; a fifth exceeds the limit; an invalid doorbell value completes one
    cids = []
    for _ in range(4):
        raw, cid = d.build(K.ADMIN_ASYNC_EVENT_REQUEST)
        d.post(0, raw)
        cids.append(cid)
    d.ring_sq(0)
    assert d.reap(0) == []
    assert d.admin(K.ADMIN_ASYNC_EVENT_REQUEST)[0] == K.SC_ASYNC_EVENT_LIMIT_EXCEEDED
    assert d.create_pair(1, size=16) == 0
    d.wreg(K.DOORBELL_BASE + 8, 16)                                          # tail == size
    ev = d.reap(0)
    assert len(ev) == 1 and ev[0][0] == cids[0] and ev[0][2] == (K.AER_INFO_INVALID_DOORBELL_VALUE << 8 | 1 << 16)
    assert d.admin(K.ADMIN_GET_LOG_PAGE, prp1=DATA, cdw10=K.LOG_ERROR_INFORMATION | 15 << 16)[0] == 0


def test_queue_management_statuses(rig):
    d = rig.drv
    assert d.create_pair(1) == 0
    assert d.admin(K.ADMIN_CREATE_CQ, prp1=0x40000, cdw10=1 | 15 << 16, cdw11=1)[0] == K.SC_INVALID_QUEUE_IDENTIFIER
    assert d.admin(K.ADMIN_CREATE_CQ, prp1=0x40000, cdw10=9 | 15 << 16, cdw11=1)[0] == K.SC_INVALID_QUEUE_IDENTIFIER
    assert d.admin(K.ADMIN_CREATE_CQ, prp1=0x40000, cdw10=2, cdw11=1)[0] == K.SC_INVALID_QUEUE_SIZE
    assert d.admin(K.ADMIN_CREATE_CQ, prp1=0x40000, cdw10=2 | 0xFFFF << 16, cdw11=1)[0] == K.SC_INVALID_QUEUE_SIZE
    assert d.admin(K.ADMIN_CREATE_CQ, prp1=0x40000, cdw10=2 | 15 << 16, cdw11=1 | 9 << 16)[0] == \
        K.SC_INVALID_INTERRUPT_VECTOR
    assert d.admin(K.ADMIN_CREATE_CQ, prp1=0x40010, cdw10=2 | 15 << 16, cdw11=1)[0] == K.SC_PRP_OFFSET_INVALID
    assert d.admin(K.ADMIN_CREATE_CQ, prp1=1 << 40, cdw10=2 | 15 << 16, cdw11=1)[0] == K.SC_INVALID_FIELD
    assert d.admin(K.ADMIN_CREATE_CQ, prp1=0x40000, cdw10=2 | 15 << 16, cdw11=0)[0] == K.SC_INVALID_FIELD  # PC=0
    assert d.admin(K.ADMIN_CREATE_SQ, prp1=0x40000, cdw10=2 | 15 << 16, cdw11=1 | 3 << 16)[0] == \
        K.SC_COMPLETION_QUEUE_INVALID
    assert d.admin(K.ADMIN_DELETE_CQ, cdw10=1)[0] == K.SC_INVALID_QUEUE_DELETION            # SQ 1 still uses it
    assert d.admin(K.ADMIN_DELETE_SQ, cdw10=0)[0] == K.SC_INVALID_QUEUE_IDENTIFIER
    assert d.admin(K.ADMIN_DELETE_SQ, cdw10=1)[0] == 0
    assert d.admin(K.ADMIN_DELETE_SQ, cdw10=1)[0] == K.SC_INVALID_QUEUE_IDENTIFIER
    assert d.admin(K.ADMIN_DELETE_CQ, cdw10=1)[0] == 0
    assert d.admin(0x7F)[0] == K.SC_INVALID_OPCODE
    assert d.admin(K.ADMIN_IDENTIFY, prp1=DATA, cdw10=0x55)[0] == K.SC_INVALID_FIELD
    assert d.admin(K.ADMIN_IDENTIFY, nsid=2, prp1=DATA, cdw10=K.CNS_NAMESPACE)[0] == K.SC_INVALID_NAMESPACE


@pytest.mark.parametrize("lba", [512, 4096])
def test_io_commands(image, lba):
    r = Rig(image, lba=lba)
    try:
        d = r.drv
        d.enable()
        assert d.create_pair(1) == 0
        n = 8192 // lba
        assert rw(d, 1, K.NVM_READ, 0, n, DATA, DATA + 4096) == 0
        assert r.mem.read(DATA, 8192) == image.read_bytes()[:8192]
        r.mem.write(DATA, b"\xAB" * 8192)
        assert rw(d, 1, K.NVM_WRITE, 2 * n, n, DATA, DATA + 4096, cdw12_extra=1 << 30) == 0   # FUA
        assert image.read_bytes()[16384:24576] == b"\xAB" * 8192
        assert d.cmd(1, K.NVM_FLUSH, nsid=1)[0] == 0
        assert d.cmd(1, K.NVM_WRITE_ZEROES, nsid=1, cdw10=2 * n, cdw12=(n - 1) | 1 << 25)[0] == 0
        assert image.read_bytes()[16384:24576] == bytes(8192)
        r.mem.write(DATA, struct.pack("<IIQ", 0, n, 0))                                     # one DSM range
        assert d.cmd(1, K.NVM_DATASET_MANAGEMENT, nsid=1, prp1=DATA, cdw10=0, cdw11=4)[0] == 0
        assert image.read_bytes()[:8192] == bytes(8192)
        nsze = DISK // lba
        assert rw(d, 1, K.NVM_READ, nsze - 1, 2, DATA, DATA + 4096) == K.SC_LBA_OUT_OF_RANGE
        assert rw(d, 1, K.NVM_READ, (1 << 64) - 1, 1, DATA) == K.SC_LBA_OUT_OF_RANGE
        r.mem.write(DATA, struct.pack("<IIQ", 0, 1, nsze))
        assert d.cmd(1, K.NVM_DATASET_MANAGEMENT, nsid=1, prp1=DATA, cdw11=4)[0] == K.SC_LBA_OUT_OF_RANGE
        assert d.cmd(1, 0x7E, nsid=1)[0] == K.SC_INVALID_OPCODE
        assert d.cmd(1, K.NVM_READ, nsid=2, prp1=DATA)[0] == K.SC_INVALID_NAMESPACE
        mdts = (1 << r.ctrl.MDTS) * 4096
        assert rw(d, 1, K.NVM_READ, 0, mdts // lba + 1, DATA, DATA + 4096) == K.SC_INVALID_FIELD
        assert d.cmd(1, K.NVM_READ, nsid=1, prp1=DATA, flags=1 << 6)[0] == K.SC_INVALID_FIELD   # SGL (PSDT=01b)
    finally:
        r.close()


def test_flush_fails_for_good_after_a_failed_fdatasync(rig, monkeypatch):
    """Linux reports a writeback error once: after one failed fdatasync every later Flush (and FUA
    write) fails, although fdatasync itself succeeds again -- acknowledged writes may be lost."""
    d = rig.drv
    assert d.create_pair(1) == 0
    assert d.cmd(1, K.NVM_FLUSH, nsid=1)[0] == K.SC_SUCCESS
    real, calls = os.fdatasync, []

    def fail_once(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fail_once)
    assert d.cmd(1, K.NVM_FLUSH, nsid=1)[0] == K.SC_WRITE_FAULT
    assert d.cmd(1, K.NVM_FLUSH, nsid=1)[0] == K.SC_WRITE_FAULT
    assert rw(d, 1, K.NVM_WRITE, 0, 1, DATA, cdw12_extra=1 << 30) != K.SC_SUCCESS     # FUA
    assert rw(d, 1, K.NVM_WRITE, 0, 1, DATA) == K.SC_SUCCESS       # a cached write needs no sync
    assert len(calls) == 1
    rig.ns.close()                                                 # a restart: the old device is gone
    fresh = Namespace(rig.ns.path)                                 # a new device starts clean
    try:
        fresh.flush()
    finally:
        fresh.close()


def test_read_only_namespace(image):
    before = image.read_bytes()
    r = Rig(image, read_only=True)
    try:
        r.drv.enable()
        r.drv.create_pair(1)
        assert rw(r.drv, 1, K.NVM_WRITE, 0, 1, DATA) == K.SC_NAMESPACE_WRITE_PROTECTED
        assert r.drv.cmd(1, K.NVM_WRITE_ZEROES, nsid=1)[0] == K.SC_NAMESPACE_WRITE_PROTECTED
        assert rw(r.drv, 1, K.NVM_READ, 0, 1, DATA) == 0
    finally:
        r.close()
    assert image.read_bytes() == before


def test_direct_io_aligned_and_bounced(image):
    """O_DIRECT: page-aligned PRPs go straight to the file, a PRP1 with an odd offset through a bounce buffer."""
    try:
        r = Rig(image)
        r.ns.close()
        r.ns = r.ctrl.ns = Namespace(image, direct=True)
    except NamespaceError as e:
        pytest.skip(f"no O_DIRECT here: {e}")
    try:
        d = r.drv
        d.enable()
        d.create_pair(1)
        r.mem.write(DATA, b"\x5A" * 8192)
        assert rw(d, 1, K.NVM_WRITE, 16, 16, DATA, DATA + 4096) == 0                  # aligned: direct
        r.mem.write(DATA + 0x104, b"\xA5" * 1024)
        assert rw(d, 1, K.NVM_WRITE, 40, 2, DATA + 0x104) == 0                        # dword offset: bounced
        data = image.read_bytes()
        assert data[8192:16384] == b"\x5A" * 8192 and data[40 * 512:42 * 512] == b"\xA5" * 1024
        assert rw(d, 1, K.NVM_READ, 40, 2, DATA + 0x2004) == 0
        assert r.mem.read(DATA + 0x2004, 1024) == b"\xA5" * 1024
    finally:
        r.close()


def test_namespace_errors(tmp_path):
    with pytest.raises(NamespaceError, match="does not exist"):
        Namespace(tmp_path / "missing")
    with pytest.raises(NamespaceError, match="Is a directory"):
        Namespace(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(NamespaceError, match="regular file or a block device"):
        Namespace(tmp_path / "fifo", read_only=True)
    with pytest.raises(NamespaceError, match="LBA size"):
        Namespace(tmp_path / "x", lba_size=1024)


# -- PRPs ----------------------------------------------------------------------------------------------
def test_prp_list_mid_page_and_chained():
    with GuestMemory.create([(0, MEM_SIZE)]) as mem:
        # a list starting 0xF00 into its page: 32 entries fit, the 32nd chains to the next list page
        lst, nxt = 0x50F00, 0x60000
        pages = [DATA + 0x2000 * i for i in range(40)]
        mem.write(lst, struct.pack("<31QQ", *pages[1:32], nxt))
        mem.write(nxt, struct.pack("<8Q", *pages[32:40]))
        segs = prp_segments(mem, DATA + 0x800, lst, 0x800 + 39 * 4096)
        assert segs[0] == (DATA + 0x800, 0x800) and len(segs) == 40 and segs[-1] == (pages[39], 4096)
        # a list longer than the transfer: the entries after the last page needed are never read
        mem.write(lst + 8 * 3, struct.pack("<Q", 1 << 44))
        assert len(prp_segments(mem, DATA + 0x800, lst, 0x800 + 3 * 4096)) == 4
        mem.write(lst + 8 * 3, struct.pack("<Q", pages[4]))
        with pytest.raises(PrpError) as e:
            prp_segments(mem, DATA, lst + 4, 3 * 4096)                 # list pointer not qword-aligned
        assert e.value.status == K.SC_PRP_OFFSET_INVALID
        with pytest.raises(PrpError) as e:
            prp_segments(mem, DATA + 2, 0, 512)                        # PRP1 not dword-aligned
        assert e.value.status == K.SC_PRP_OFFSET_INVALID
        mem.write(nxt, struct.pack("<Q", 1 << 44))
        with pytest.raises(PrpError) as e:
            prp_segments(mem, DATA + 0x800, lst, 0x800 + 33 * 4096)    # a data page outside RAM
        assert e.value.status == K.SC_DATA_TRANSFER_ERROR
        with pytest.raises(PrpError) as e:
            prp_segments(mem, DATA, MEM_SIZE + 0x100, 5 * 4096)        # the list is outside RAM
        assert e.value.status == K.SC_DATA_TRANSFER_ERROR


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nbytes=st.integers(1, 64).map(lambda k: 512 * k), first_off=st.integers(0, 7).map(lambda k: 512 * k),
       list_off=st.integers(0, 511).map(lambda k: 8 * k), seed=st.integers(0, 2 ** 32))
def test_prp_layouts_write_then_read(image, nbytes, first_off, list_off, seed):
    """Random PRP layouts (PRP1 offset, list start anywhere in its page, chained pages, shuffled data
    pages): a write lands byte for byte in the file and a read brings it back through another layout."""
    import random

    rnd = random.Random(seed)
    r = Rig(image)
    try:
        d = r.drv
        d.enable()
        d.create_pair(1)
        payload = bytes(rnd.getrandbits(8) for _ in range(nbytes))

        def layout(base_page):
            npages = (first_off + nbytes + 4095) // 4096
            order = list(range(npages))
            rnd.shuffle(order)
            pages = [DATA + 0x1000 * (base_page + 2 * o) for o in order]
            prp1 = pages[0] + first_off
            if npages == 1:
                return prp1, 0, pages
            if npages == 2:
                return prp1, pages[1], pages
            lst = 0x40000 + list_off
            ptr, rest = lst, pages[1:]
            chain = 0x48000
            while rest:
                room = (4096 - ptr % 4096) // 8
                if len(rest) <= room:
                    r.mem.write(ptr, struct.pack(f"<{len(rest)}Q", *rest))
                    rest = []
                else:
                    r.mem.write(ptr, struct.pack(f"<{room}Q", *rest[:room - 1], chain))
                    rest, ptr, chain = rest[room - 1:], chain, chain + 0x1000
            return prp1, lst, pages

        prp1, prp2, pages = layout(0)
        pos = 0
        for i, p in enumerate(pages):
            start = p + (first_off if i == 0 else 0)
            n = min(nbytes - pos, 4096 - (first_off if i == 0 else 0))
            r.mem.write(start, payload[pos:pos + n])
            pos += n
        assert rw(d, 1, K.NVM_WRITE, 8, nbytes // 512, prp1, prp2) == 0
        assert image.read_bytes()[4096:4096 + nbytes] == payload
        prp1, prp2, pages = layout(1)
        assert rw(d, 1, K.NVM_READ, 8, nbytes // 512, prp1, prp2) == 0
        got, pos = bytearray(), 0
        for i, p in enumerate(pages):
            start = p + (first_off if i == 0 else 0)
            n = min(nbytes - pos, 4096 - (first_off if i == 0 else 0))
            got += r.mem.read(start, n)
            pos += n
        assert bytes(got) == payload
    finally:
        r.close()


# -- hostile driver ------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.tuples(st.sampled_from([0, 1, 2, 4, 5, 6, 8, 9, 0x0A, 0x0C, 0x7C, 0x7F, 0xFF]),
                                  st.lists(st.integers(0, 2 ** 32 - 1), min_size=15, max_size=15),
                                  st.booleans()),
                        min_size=1, max_size=12))
def test_random_sq_entries_never_break_the_controller(image, entries):
    """Random admin and I/O submission entries (opcode from a set, every other dword random, or shaped
    like an I/O command with wild PRPs): every one completes with some status or the controller goes
    fatal; nothing raises, and after a reset the controller works again."""
    before = os.path.getsize(image)
    r = Rig(image)
    try:
        d = r.drv
        d.enable()
        assert d.create_pair(1) == 0
        for opcode, dws, io in entries:
            if io:
                dws[0] = 1                                     # nsid 1: reach the PRP and LBA checks
                opcode &= 0x0F
            raw = struct.pack("<I15I", opcode | (dws[0] & 0xFFFF0000) | 0, *dws)
            qid = 1 if io else 0
            d.post(qid, raw)
            d.ring_sq(qid)
            done = d.reap(qid)
            if r.ctrl.csts & K.CSTS_CFS:
                break
            # AERs are held; everything else completes exactly once
            assert len(done) == (0 if not io and opcode == K.ADMIN_ASYNC_EVENT_REQUEST else 1) or \
                opcode in (K.ADMIN_DELETE_SQ, K.ADMIN_DELETE_CQ, K.ADMIN_CREATE_SQ, K.ADMIN_CREATE_CQ,
                           K.ADMIN_DOORBELL_BUFFER_CONFIG), (opcode, done)
            if 1 not in r.ctrl.sqs or d.dbbuf:
                d.dbbuf = False
                break
        assert d.enable() == K.CSTS_RDY
        assert d.create_pair(1) == 0 and rw(d, 1, K.NVM_READ, 0, 1, DATA) == 0
    finally:
        r.close()
    assert os.path.getsize(image) == before


def test_hostile_doorbells_and_full_cq(rig):
    d, c = rig.drv, rig.ctrl
    assert d.create_pair(1, size=4) == 0
    d.wreg(K.DOORBELL_BASE + 8 * 9, 1)                      # a queue that does not exist
    d.wreg(K.DOORBELL_BASE + 8 + 4, 3)                      # CQ head past the tail
    assert c.stats["bad_doorbells"] == 2 and c.ready
    # CQ of 4 entries holds 3: post 3 reads without consuming, a 4th waits for room (not lost, not fatal)
    for _ in range(3):
        raw, _ = d.build(K.NVM_READ, nsid=1, prp1=DATA)
        d.post(1, raw)
    d.ring_sq(1)
    raw, last = d.build(K.NVM_READ, nsid=1, prp1=DATA)
    d.post(1, raw)
    d.ring_sq(1)
    first = d.reap(1, ring=False)
    assert len(first) == 3 and c.sqs[1].head == 3
    d.ring_cq(1)                                            # room again: the 4th completes
    assert [e[0] for e in d.reap(1)] == [last]
    # a CQ whose memory is no longer RAM-backed (the driver lied about it) -> fatal, not a crash
    c.cqs[1].base = MEM_SIZE - 16
    c.cqs[1].tail = 1
    raw, _ = d.build(K.NVM_FLUSH, nsid=1)
    d.post(1, raw)
    d.ring_sq(1)
    assert c.csts & K.CSTS_CFS


def test_intx_level_and_read_only_attribute(image):
    """INTx (no MSI-X): asserted while an interrupt-enabled CQ holds entries, dropped by the CQ head
    doorbell, masked by INTMS; a read-only namespace says so in NSATTR."""
    r = Rig(image, read_only=True)
    try:
        d, c = r.drv, r.ctrl
        d.enable()
        d.create_pair(1)
        raw, _ = d.build(K.NVM_READ, nsid=1, prp1=DATA)
        d.post(1, raw)
        d.ring_sq(1)
        assert c.intx_asserted()
        d.wreg(K.REG_INTMS, 1)
        assert not c.intx_asserted()
        d.wreg(K.REG_INTMC, 1)
        assert c.intx_asserted()
        assert len(d.reap(1)) == 1 and not c.intx_asserted()       # reap rings the CQ head doorbell
        assert d.admin(K.ADMIN_IDENTIFY, nsid=1, prp1=DATA, cdw10=K.CNS_NAMESPACE)[0] == 0
        assert r.mem.read(DATA + 0x63, 1) == b"\x01"
    finally:
        r.close()


def test_dbbuf_bad_addresses(rig):
    d = rig.drv
    assert d.enable_dbbuf(shadow=SHADOW + 8) == K.SC_INVALID_FIELD
    assert d.enable_dbbuf(event_idx=MEM_SIZE) == K.SC_INVALID_FIELD
    assert d.enable_dbbuf(shadow=0) == K.SC_INVALID_FIELD
    assert d.enable_dbbuf() == 0


# -- shadow doorbells ------------------------------------------------------------------------------------
@pytest.mark.parametrize("park", [False, True])
def test_shadow_doorbells_event_idx(image, park):
    """Ring mode: the driver rings once per submission and every command is seen.  Parked mode: the
    driver never rings, and a poller (service_queue) finds the work in the shadow page."""
    r = Rig(image, park=park)
    try:
        d, c = r.drv, r.ctrl
        d.enable()
        assert d.create_pair(1, size=8) == 0
        assert d.enable_dbbuf() == 0 and r.bound == [1]
        before = d.mmio_doorbells
        for i in range(20):
            raw, cid = d.build(K.NVM_READ, nsid=1, prp1=DATA, cdw10=i)
            d.post(1, raw)
            d.ring_sq(1)
            if park:
                assert c.service_queue(1) == 1
            done = d.reap(1)
            assert [e[0] for e in done] == [cid] and done[0][1] == 0
        rings = d.mmio_doorbells - before
        assert rings == (0 if park else 20)
        assert c.stats["shadow_doorbells"] >= 20
    finally:
        r.close()


def test_arm_sees_a_write_that_slipped_in(image):
    """The sleeping side's handshake: a shadow tail written just before arm() is reported, not lost."""
    r = Rig(image, park=True)
    try:
        d, c = r.drv, r.ctrl
        d.enable()
        d.create_pair(1, size=8)
        d.enable_dbbuf()
        raw, cid = d.build(K.NVM_READ, nsid=1, prp1=DATA)
        d.post(1, raw)
        r.mem.write_u32(SHADOW + 8, d.sq[1][2])             # the driver stored the slot; EventIdx parked: no ring
        assert c.arm(1) is True                             # arm re-reads after its fence and sees it
        assert c.service_queue(1) == 1
        assert c.arm(1) is False                            # nothing new: safe to sleep
        assert r.mem.read_u32(EVENT_IDX + 8) == d.sq[1][2]  # EventIdx = last seen: the next write rings
        c.disarm(1)
        assert r.mem.read_u32(EVENT_IDX + 8) == (d.sq[1][2] - 1) % 8
    finally:
        r.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(
    st.sampled_from([K.REG_CC, K.REG_AQA, K.REG_ASQ, K.REG_ASQ + 4, K.REG_ACQ, K.REG_ACQ + 4, K.REG_INTMS,
                     K.REG_INTMC, K.REG_NSSR, K.REG_CSTS, 0x3C, 0xFFC, K.DOORBELL_BASE, K.DOORBELL_BASE + 4,
                     K.DOORBELL_BASE + 8, K.DOORBELL_BASE + 12, K.DOORBELL_BASE + 0x204, K.DOORBELL_BASE + 2]),
    st.sampled_from([4, 8, 2, 1]),
    st.one_of(st.integers(0, 2 ** 32 - 1), st.sampled_from([0, 1, 0x460001, 0x4001, 0x8001, 0x000F000F])),
    st.booleans()), max_size=40))
def test_odd_register_sequences(image, ops):
    """Any sequence of register and doorbell writes and reads, of any width, with or without a working
    admin queue underneath: nothing raises, reads stay in range, and a reset then a clean bring-up works."""
    r = Rig(image)
    try:
        d, c = r.drv, r.ctrl
        if ops and ops[0][3]:
            d.enable()
            d.create_pair(1, size=4)
        for offset, size, value, read in ops:
            if read:
                v = c.read_register(offset, size)
                assert 0 <= v < 1 << (8 * size)
            else:
                c.write_register(offset, size, value & ((1 << (8 * size)) - 1))
            assert c.csts & ~0xF == 0
        assert d.enable() == K.CSTS_RDY
        assert d.create_pair(1) == 0 and rw(d, 1, K.NVM_READ, 0, 1, DATA) == 0
    finally:
        r.close()
