"""NVMe I/O queue pairs served by ``exitless sidecore``, in process (issue 12, items 1-2).

* the service against NVMe queue-pair peers (:class:`Peer`: the messages of
  :mod:`exitless.sidecore.nvme_protocol` by hand, queues in a memfd): two VMs' pairs on one loop, a pair
  taken back and handed over again with no completion lost or posted twice, garbage and hostile
  messages refused or detached while another VM's I/O goes on, any ATTACH payload served or refused
  (hypothesis), fds back after every detach;
* the VM's side (the split controller, :class:`~exitless.devices.nvme.pci.NvmePci` with ``service=``)
  driven register by register (tests/nvme_driver.py): handover at Doorbell Buffer Config, take-back at
  Delete I/O SQ, controller reset and a new 0x7C, a CQ shared by two SQs served by the VMM, the write
  cache setting, and a service that goes away (CSTS.CFS, then the VMM serves the pairs itself).
"""
from __future__ import annotations

import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exitless.devices.nvme import constants as K
from exitless.sidecore import nvme_protocol as N
from exitless.vhost_user import protocol as P
from exitless.vhost_user.frontend import Frontend, FrontendError

from fds import open_fds
from test_sidecore_service import Running
from test_vhost_user_backend import MIB, GuestRam

DISK_BYTES = 1 * MIB
SQ, CQ, SHADOW, EVENT_IDX, DATA = 0x10000, 0x12000, 0x14000, 0x15000, 0x20000
QSIZE = 16


def wait_for(cond, timeout: float, what) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what()
        time.sleep(0.01)


def fill(seed: int, n: int) -> bytes:
    return bytes((seed * 131 + i * 7) & 0xFF for i in range(n))


class Peer:
    """A VM's side of the NVMe queue-pair messages, by hand: SET_BACKEND with ``disk``, SET_MEM_TABLE
    (two memfd regions, address = guest-physical), then pairs in that memory driven through their
    shadow doorbells (and a wake eventfd, written after each submission)."""

    def __init__(self, path, disk, *, flags: int = 0, lba: int = 512, max_qid: int = 4):
        self.ram = GuestRam()
        self.mem = self.ram.mem
        self.event, self.fatal, self.wake = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(3))
        self.fe = Frontend.connect(str(path))
        fd = os.open(disk, os.O_RDWR | os.O_CLOEXEC)
        try:
            body = self.fe.request(N.EXITLESS_NVME_SET_BACKEND, N.encode_backend(N.Backend(flags, lba, max_qid)),
                                   [fd, self.event, self.fatal], expect_reply=True)
        finally:
            os.close(fd)
        assert body == P.U64.pack(0)
        self.fe.reply_ack = True
        self.fe.set_mem_table([(0, MIB, 0, 0), (MIB, MIB, MIB, MIB)], [self.ram.fd_a, self.ram.fd_b])
        self.sq_tail = self.cq_head = 0
        self.phase = 1
        self.cid = 0
        self.completed: list[int] = []

    def attach_msg(self, **over) -> N.Attach:
        a = dict(sqid=1, cqid=1, sq_size=QSIZE, cq_size=QSIZE, sq_base=SQ, cq_base=CQ, sq_head=self.sq_tail,
                 sq_tail=self.sq_tail, sq_shadow_seen=self.sq_tail, cq_head=self.cq_head, cq_tail=self.cq_head,
                 cq_phase=self.phase, cq_shadow_seen=self.cq_head, flags=N.F_WAKE | N.F_VWC, shadow=SHADOW,
                 event_idx=EVENT_IDX)
        a.update(over)
        return N.Attach(**a)

    def attach(self, fds=None, **over) -> bool:
        a = self.attach_msg(**over)
        if fds is None:
            fds = [self.wake] if a.flags & N.F_WAKE else []
        try:
            self.fe.request(N.EXITLESS_NVME_ATTACH_QP, N.encode_attach(a), fds)
            return True
        except FrontendError:
            return False

    def detach(self, sqid: int = 1) -> N.State:
        return N.state(self.fe.request(N.EXITLESS_NVME_DETACH_QP, N.QID.pack(sqid), expect_reply=True))

    def submit(self, opcode: int, slba: int, nlb: int, gpa: int) -> int:
        self.cid = (self.cid + 1) & 0xFFFF
        self.mem.write(SQ + 64 * self.sq_tail, struct.pack("<IIQQQQIIIIII", opcode | self.cid << 16, 1, 0, 0, gpa, 0,
                                                            slba, 0, nlb - 1, 0, 0, 0))
        self.sq_tail = (self.sq_tail + 1) % QSIZE
        self.mem.write_u32(SHADOW + 8, self.sq_tail)
        os.eventfd_write(self.wake, 1)
        return self.cid

    def reap(self, timeout: float = 10.0, want: int = 1) -> list[tuple[int, int]]:
        """``want`` completions as (cid, status), the CQ head published in the shadow slot."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < want:
            dw3 = self.mem.read_u32(CQ + 16 * self.cq_head + 12)
            if (dw3 >> 16) & 1 != self.phase:
                assert time.monotonic() < deadline, f"{len(out)} of {want} completions"
                time.sleep(0.001)
                continue
            out.append((dw3 & 0xFFFF, (dw3 >> 17) & 0x7FF))
            self.cq_head += 1
            if self.cq_head == QSIZE:
                self.cq_head, self.phase = 0, self.phase ^ 1
            self.mem.write_u32(SHADOW + 12, self.cq_head)
        self.completed += [c for c, _ in out]
        return out

    def nothing_more(self) -> bool:
        """No further completion was posted (the next entry still has the old phase)."""
        return (self.mem.read_u32(CQ + 16 * self.cq_head + 12) >> 16) & 1 != self.phase

    def roundtrip(self, seed: int, slba: int = 0) -> None:
        data = fill(seed, 4096)
        self.mem.write(DATA, data)
        cid = self.submit(K.NVM_WRITE, slba, 8, DATA)
        assert self.reap() == [(cid, 0)]
        self.mem.fill(DATA, 4096)
        cid = self.submit(K.NVM_READ, slba, 8, DATA)
        assert self.reap() == [(cid, 0)]
        assert self.mem.read(DATA, 4096) == data

    def close(self) -> None:
        self.fe.close()
        for fd in (self.event, self.fatal, self.wake):
            os.close(fd)
        self.ram.close()


@pytest.fixture
def disks(tmp_path):
    out = []
    for k in range(3):
        p = tmp_path / f"ns{k}.img"
        p.write_bytes(bytes(DISK_BYTES))
        out.append(p)
    return out


@pytest.mark.parametrize("mode", ["poll", "adaptive"])
def test_two_vms_pairs_share_the_loop_taken_back_and_handed_over_again(tmp_path, disks, mode):
    fds0 = open_fds()
    run = Running(tmp_path / "s.sock", mode)
    loop = run.svc.dataplane.loop
    try:
        a, b = Peer(run.svc.path, disks[0]), Peer(run.svc.path, disks[1])
        assert a.attach() and b.attach(flags=N.F_VWC)        # b without a wake fd: polled (its own loop if adaptive)
        assert len(loop.pollables) == (2 if mode == "poll" else 1)
        for i in range(4):
            a.roundtrip(i, 8 * i)
            b.roundtrip(50 + i, 8 * i)
        got = N.counts(a.fe.request(N.EXITLESS_NVME_GET_COUNTERS, expect_reply=True))
        assert got["io_commands"] == 8 and got["write_bytes"] == got["read_bytes"] == 4 * 4096, got
        assert N.counts(a.fe.request(N.EXITLESS_NVME_GET_COUNTERS, expect_reply=True))["io_commands"] == 0
        # a batch in flight, then DETACH: the reply is where the service left the queues ...
        cids = [a.submit(K.NVM_READ, 8 * i, 8, DATA + 4096 * i) for i in range(6)]
        st = a.detach()
        assert st.counters["write_bytes"] == 0 and st.counters["read_bytes"] <= 6 * 4096   # since GET_COUNTERS
        done = a.reap(want=(st.cq_tail - a.cq_head) % QSIZE) if st.cq_tail != a.cq_head else []
        # ... and handed over again from there, the rest completes: every command exactly once
        assert a.attach(sq_head=st.sq_head, sq_tail=st.sq_tail, sq_shadow_seen=st.sq_shadow_seen,
                        cq_head=st.cq_head, cq_tail=st.cq_tail, cq_phase=st.cq_phase, cq_shadow_seen=st.cq_shadow_seen)
        done += a.reap(want=6 - len(done))
        assert sorted(c for c, _ in done) == sorted(cids) and a.nothing_more()
        a.roundtrip(9)
        assert disks[0].read_bytes()[:4096] == fill(9, 4096) and disks[1].read_bytes()[:4096] == fill(50, 4096)
        a.close()
        run.wait_detached(1)
        b.roundtrip(77, 16)                                   # b never stopped
        b.detach()
        b.close()
        run.wait_detached(2)
        assert loop.pollables == []
    finally:
        run.stop()
    assert open_fds() == fds0


def _bad_hellos(disk):
    """First messages the service must refuse (the connection is then closed): (payload, fds maker)."""
    def fds(kind="rw"):
        def make():
            disk_fd = os.open(disk, (os.O_RDWR if kind != "ro" else os.O_RDONLY) | os.O_CLOEXEC)
            evs = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
            if kind == "pipe-event":
                r, w = os.pipe()
                os.close(w)
                os.close(evs[0])
                evs[0] = r
            return [disk_fd] + evs if kind != "few" else [disk_fd]
        return make
    good = N.BACKEND.pack(N.VERSION, 0, 512, 4)
    return {
        "version 2": (N.BACKEND.pack(2, 0, 512, 4), fds()),
        "unknown flags": (N.BACKEND.pack(N.VERSION, 1 << 7, 512, 4), fds()),
        "LBA 1024": (N.BACKEND.pack(N.VERSION, 0, 1024, 4), fds()),
        "no queues": (N.BACKEND.pack(N.VERSION, 0, 512, 0), fds()),
        "65 queues": (N.BACKEND.pack(N.VERSION, 0, 512, 65), fds()),
        "truncated": (good[:-1], fds()),
        "too few fds": (good, fds("few")),
        "a pipe for the event fd": (good, fds("pipe-event")),
        "read-only fd of a writable namespace": (good, fds("ro")),
    }


@pytest.fixture
def service(tmp_path):
    run = Running(tmp_path / "s.sock", "poll", io_timeout=2.0)
    yield run
    run.stop()


@pytest.mark.parametrize("case", list(_bad_hellos("x")))
def test_bad_first_nvme_message_is_detached(service, disks, case):
    payload, make = _bad_hellos(disks[1])[case]
    good = Peer(service.svc.path, disks[0])
    assert good.attach()
    fds = make()
    fe = Frontend.connect(service.svc.path)
    try:
        fe.send(N.EXITLESS_NVME_SET_BACKEND, payload, fds)
        assert fe.closed_by_peer(10)
    finally:
        fe.close()
        for fd in fds:
            os.close(fd)
    service.wait_detached(1)
    good.roundtrip(3)
    good.close()


def _bad_attaches():
    """ATTACH_QP payloads (as overrides of a good one) the service answers with a failure."""
    return {
        "SQ outside the memfd": dict(sq_base=2 * MIB),
        "CQ straddling the end of memory": dict(cq_base=2 * MIB - 4096, cq_size=1024),
        "shadow page beyond memory": dict(shadow=1 << 40),
        "EventIdx page unaligned": dict(event_idx=EVENT_IDX + 8),
        "SQ unaligned": dict(sq_base=SQ + 64),
        "SQ id 0": dict(sqid=0),
        "CQ id beyond max_qid": dict(cqid=5),
        "queue of one entry": dict(sq_size=1),
        "queue of 1025 entries": dict(cq_size=1025),
        "SQ head beyond the queue": dict(sq_head=QSIZE),
        "CQ phase 2": dict(cq_phase=2),
        "unknown flags": dict(flags=1 << 9),
    }


@pytest.mark.parametrize("case", list(_bad_attaches()))
def test_bad_attach_is_refused_and_the_session_goes_on(service, disks, case):
    good = Peer(service.svc.path, disks[0])
    vm = Peer(service.svc.path, disks[1])
    try:
        assert good.attach()
        assert not vm.attach(**_bad_attaches()[case])        # refused: u64 1, the connection stays
        assert len(service.svc.dataplane.loop.pollables) == 1
        good.roundtrip(1)
        assert vm.attach()                                   # and the same VM's good pair is served
        vm.roundtrip(2)
    finally:
        vm.close()
        good.close()


def test_hostile_sequences_refused_or_detached(service, disks):
    """Out of order, twice, wrong fds, a second CQ user, DETACH of nothing: refused; a message of
    another family: detached; the other VM's I/O goes on throughout."""
    good = Peer(service.svc.path, disks[0])
    assert good.attach()
    vm = Peer(service.svc.path, disks[1])
    try:
        assert vm.attach(sqid=2, cqid=2)
        assert not vm.attach(sqid=2, cqid=3)                 # SQ 2 is served already
        assert not vm.attach(sqid=3, cqid=2, sq_base=0x30000, cq_base=0x32000)   # CQ 2 has an SQ already
        assert not vm.attach(sqid=3, cqid=3, sq_base=0x30000, cq_base=0x32000, shadow=0x40000)  # other pages
        r, w = os.pipe()
        try:
            assert not vm.attach(fds=[r], sqid=3, cqid=3, sq_base=0x30000, cq_base=0x32000)   # a pipe as wake fd
        finally:
            os.close(r)
            os.close(w)
        with pytest.raises(FrontendError):
            vm.fe.request(N.EXITLESS_NVME_ATTACH_QP, N.encode_attach(vm.attach_msg(sqid=3, cqid=3))[:-2], [vm.wake])
        with pytest.raises(Exception):
            vm.detach(4)                                     # never attached: a failure, not a state
        with pytest.raises(FrontendError):                   # a second memory table under a live pair
            vm.fe.set_mem_table([(0, MIB, 0, 0)], [vm.ram.fd_a])
        good.roundtrip(5)
        vm.fe.send(P.GET_FEATURES, b"")                      # not this family's: the connection ends
        assert vm.fe.closed_by_peer(10)
        service.wait_detached(1)
        assert len(service.svc.dataplane.loop.pollables) == 1
        good.roundtrip(6)
    finally:
        vm.close()
        good.close()


U32, U64 = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)


@st.composite
def attaches(draw):
    near = st.one_of(st.integers(0, 2 * MIB + 8192), U64)
    return dict(sqid=draw(st.one_of(st.integers(0, 6), U32)), cqid=draw(st.one_of(st.integers(0, 6), U32)),
                sq_size=draw(st.one_of(st.integers(0, 1100), U32)), cq_size=draw(st.one_of(st.integers(0, 1100), U32)),
                sq_base=draw(near), cq_base=draw(near), sq_head=draw(st.integers(0, 40)),
                sq_tail=draw(st.integers(0, 40)), sq_shadow_seen=draw(U32), cq_head=draw(st.integers(0, 40)),
                cq_tail=draw(st.integers(0, 40)), cq_phase=draw(st.integers(0, 3)), cq_shadow_seen=draw(U32),
                flags=draw(st.sampled_from([0, N.F_VWC, N.F_WAKE, 1 << 5])), shadow=draw(near), event_idx=draw(near))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(attaches(), min_size=1, max_size=6))
def test_any_attach_is_served_or_refused(tmp_path_factory, disks, seq):
    """Whatever an ATTACH says, it is answered (served: DETACH gives it back; else a failure), the
    service never raises, the memory a served pair names is inside the table, and every fd is back."""
    fds0 = open_fds()
    run = Running(tmp_path_factory.mktemp("h") / "s.sock", "poll", io_timeout=2.0)
    try:
        vm = Peer(run.svc.path, disks[0])
        try:
            served = []
            for over in seq:
                if vm.attach(**over):
                    a = vm.attach_msg(**over)
                    assert a.sq_base + 64 * a.sq_size <= 2 * MIB and a.cq_base + 16 * a.cq_size <= 2 * MIB
                    served.append(a.sqid)
            for sqid in served:
                vm.detach(sqid)
            assert run.svc.dataplane.loop.pollables == []
        finally:
            vm.close()
        run.wait_detached(1)
    finally:
        run.stop()
    assert open_fds() == fds0


# --------------------------------------------------------------------------- the VM's side: the split controller
@pytest.mark.kvm
def test_split_controller_hands_over_takes_back_and_survives_the_service(tmp_path):
    from exitless.devices.nvme.namespace import Namespace
    from exitless.devices.nvme.pci import NvmePci
    from exitless.devices.pci.msix import CTRL_ENABLE
    from exitless.vm import Machine, VmConfig
    from nvme_driver import DATA as DDATA, EVENT_IDX as D_EVENT_IDX, SHADOW as D_SHADOW, Driver

    img = tmp_path / "ns.img"
    img.write_bytes(bytes(DISK_BYTES))
    run = Running(tmp_path / "s.sock", "poll")
    loop = run.svc.dataplane.loop
    try:
        with Machine(VmConfig(mem_mib=64, console=lambda b: None)) as m:
            dev = NvmePci(m, Namespace(img), "poll", queues=4, service=run.svc.path)
            ctrl = dev.ctrl
            dev.msix.control_written(CTRL_ENABLE)           # (vectors unprogrammed: irqfds with no route yet)
            d = Driver(m.mem, ctrl)
            written = {}

            def io(qid: int, n: int, seed: int) -> None:
                """``n`` 4 KiB writes on SQ ``qid`` in one batch, each completed exactly once."""
                cids = []
                for i in range(n):
                    lba = 8 * ((seed * 16 + i) % 256)
                    data = fill(seed + i, 4096)
                    m.mem.write(DDATA + 4096 * i, data)
                    raw, cid = d.build(K.NVM_WRITE, nsid=1, prp1=DDATA + 4096 * i, cdw10=lba, cdw12=7)
                    d.post(qid, raw)
                    cids.append(cid)
                    written[lba] = data
                d.ring_sq(qid)
                done = []
                deadline = time.monotonic() + 10
                while len(done) < n:
                    assert time.monotonic() < deadline, (done, cids)
                    done += d.reap(qid)
                assert sorted(c[0] for c in done) == sorted(cids) and all(c[1] == 0 for c in done), done
                assert not d.reap(qid, ring=False)          # nothing posted twice

            assert d.enable() & K.CSTS_RDY
            assert d.create_pair(1, size=16) == 0 and ctrl.remote == {}      # no shadow doorbells yet: here
            io(1, 3, 1)                                                     # (trapped)
            assert d.enable_dbbuf() == 0
            assert ctrl.remote == {1: 1} and dev.handovers == 1 and len(loop.pollables) == 1
            io(1, 8, 2)
            assert dev.stats()["io_commands"] == 3 + 8 and ctrl.remote == {1: 1}   # fetched from the service
            mmio = ctrl.stats["io_mmio_doorbells"]
            ctrl.write_register(K.DOORBELL_BASE + 8, 4, d.sq[1][2])          # a stray MMIO write: not run twice
            assert ctrl.stats["io_mmio_doorbells"] == mmio + 1
            io(1, 4, 3)
            assert d.admin(K.ADMIN_SET_FEATURES, cdw10=K.FEAT_VOLATILE_WRITE_CACHE, cdw11=0) == (0, 0)
            assert dev.handovers == 2 and ctrl.remote == {1: 1}             # handed over again, write-through
            io(1, 5, 4)
            # a new 0x7C (the same pages, not zeroed under a live pair): back, and over again
            assert d.admin(K.ADMIN_DOORBELL_BUFFER_CONFIG, prp1=D_SHADOW, prp2=D_EVENT_IDX) == (0, 0)
            assert dev.handovers == 3
            io(1, 12, 5)                                                     # (wraps the 16-entry queues)
            # a second SQ on CQ 1: one owner per CQ, so both are served here from now on
            assert d.admin(K.ADMIN_CREATE_SQ, prp1=0x70000, cdw10=2 | 15 << 16, cdw11=1 | 1 << 16) == (0, 0)
            assert ctrl.remote == {} and loop.pollables == []
            io(1, 6, 6)
            assert d.admin(K.ADMIN_DELETE_SQ, cdw10=2) == (0, 0)
            assert d.create_pair(2, size=16) == 0 and ctrl.remote == {2: 2}  # a new pair: to the service
            io(2, 4, 7)
            assert d.admin(K.ADMIN_DELETE_SQ, cdw10=2) == (0, 0)
            assert ctrl.remote == {} and loop.pollables == []                # gone before the command completed
            d.cq.pop(2), d.sq.pop(2)
            assert d.admin(K.ADMIN_DELETE_CQ, cdw10=2) == (0, 0)
            assert d.create_pair(2, size=16) == 0 and ctrl.remote == {2: 2}
            io(2, 3, 8)
            d.wreg(K.REG_CC, 0)                                              # reset with a pair served
            assert ctrl.remote == {} and loop.pollables == [] and not d.reg(K.REG_CSTS) & K.CSTS_RDY
            stats = dev.stats()
            assert stats["io_commands"] == 3 + 8 + 4 + 5 + 12 + 6 + 4 + 3 and stats["fatal"] == 0, stats
            assert stats["shadow_doorbells"] > 0 and stats["write_bytes"] == 4096 * stats["io_commands"]
            # the service goes away with a pair served: the controller is fatal; after a reset the VMM serves
            d.enable()
            assert d.create_pair(1, size=16) == 0 and d.enable_dbbuf() == 0 and ctrl.remote == {1: 1}
            io(1, 2, 9)
            run.stop()
            wait_for(lambda: d.reg(K.REG_CSTS) & K.CSTS_CFS, 10, lambda: f"CSTS {d.reg(K.REG_CSTS):#x}")
            d.enable()
            assert d.create_pair(1, size=16) == 0 and d.enable_dbbuf() == 0 and ctrl.remote == {}
            io(1, 4, 10)                                                     # trapped, EventIdx armed
            assert dev.handovers == 6
        image = img.read_bytes()
        for lba, data in written.items():
            assert image[512 * lba:512 * lba + 4096] == data, lba
    finally:
        run.stop()


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(N.REQUESTS), st.binary(max_size=160), st.data())
def test_payloads_decode_or_are_refused(request, payload, data):
    """Every decoder of the family takes any bytes and either decodes them or raises ProtocolError (nothing
    else); what encodes decodes back to itself."""
    msg = P.Message(request, P.VERSION, payload)
    for decode in (N.backend, N.attach, N.qid, N.expected_fds, lambda m: N.state(m.payload)):
        try:
            decode(msg)
        except P.ProtocolError:
            pass
    fields = {f: data.draw(st.integers(0, 2**32 - 1)) for f in ("sq_head", "sq_tail", "sq_shadow_seen", "cq_head",
                                                                  "cq_tail", "cq_phase", "cq_shadow_seen", "sqid",
                                                                  "cqid", "sq_size", "cq_size")}
    a = N.Attach(**fields, sq_base=data.draw(U64), cq_base=data.draw(U64), flags=data.draw(st.sampled_from([0, 7])),
                 shadow=data.draw(U64), event_idx=data.draw(U64))
    assert N.attach(P.Message(N.EXITLESS_NVME_ATTACH_QP, P.VERSION, N.encode_attach(a))) == a
