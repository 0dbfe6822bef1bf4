"""A real KVM guest exercises every exit the vCPU loop dispatches."""
import threading
import time

import pytest

from exitless.vm import Machine, VmConfig
from tests.asmguest import build_guest

pytestmark = pytest.mark.kvm


class Mailbox:
    """An MMIO test device: remembers writes, reads back the last value."""

    def __init__(self):
        self.writes = []
        self.value = b"\0" * 4

    def read(self, offset, size):
        return self.value[:size]

    def write(self, offset, data):
        self.writes.append((offset, bytes(data)))
        self.value = bytes(data).ljust(4, b"\0")


def boot(tmp_path, body, data="", setup=None, timeout=20):
    out = bytearray()
    elf = build_guest(tmp_path, "g", body, data)
    with Machine(VmConfig(mem_mib=64, console=out.extend)) as m:
        if setup:
            setup(m)
        m.boot_pvh(elf)
        result = m.run(timeout=timeout)
        return result, bytes(out), m


def test_port_exit_status(tmp_path):
    result, _, _ = boot(tmp_path, "mov $42, %eax\n jmp exit_with_eax")
    assert result.kind == "debug-exit" and result.status == 42


def test_string_out_reaches_serial(tmp_path):
    body = """
    mov $msg, %esi
    mov $msglen, %ecx
    mov $0x3f8, %dx
    rep outsb
    xor %eax, %eax
    jmp exit_with_eax
    """
    data = 'msg: .ascii "hello, exitless\\n"\n msglen = . - msg'
    result, out, _ = boot(tmp_path, body, data)
    assert result.status == 0
    assert out == b"hello, exitless\n"


def test_string_in_reads_each_element(tmp_path):
    # rep insb from the UART's scratch register after writing it: count > 1 string input
    body = """
    mov $0x3ff, %dx
    mov $0x5a, %al
    out %al, %dx
    mov $buf, %edi
    mov $4, %ecx
    rep insb
    mov buf, %eax
    jmp exit_with_eax
    """
    result, _, _ = boot(tmp_path, body, "buf: .long 0")
    assert result.status == 0x5A5A5A5A


def test_mmio_write_and_read_dispatch(tmp_path):
    box = Mailbox()
    body = """
    movl $0x12345678, 0xd0000010
    mov 0xd0000010, %eax
    mov 0xd1000000, %ebx      /* nobody claims it: all-ones */
    cmp $0xffffffff, %ebx
    jne 1f
    jmp exit_with_eax
1:  mov $1, %eax
    jmp exit_with_eax
    """
    result, _, m = boot(tmp_path, body, setup=lambda m: m.mmio.insert(0xD0000000, 0x1000, box, "mailbox"))
    assert result.status == 0x12345678
    assert box.writes == [(0x10, (0x12345678).to_bytes(4, "little"))]
    assert m.mmio.unclaimed == 1


def test_fatal_guest_fault_stops_with_registers(tmp_path):
    """int3 with an empty IDT: a triple fault (KVM_EXIT_SHUTDOWN) on VMX/SVM; the software-nested
    kvm_pvm backend reports it as an emulation failure (INTERNAL_ERROR).  Either way the
    VM stops with the guest's registers in the report, never silently."""
    body = """
    lidt idt0
    int3
    """
    result, _, _ = boot(tmp_path, body, "idt0: .word 0\n .long 0")
    assert result.kind in ("triple-fault", "error") and result.status == 1 and not result.ok
    if result.kind == "error":
        assert "KVM internal error" in result.message
    assert "rip=0x10000" in result.registers


def test_stop_from_another_thread(tmp_path):
    elf = build_guest(tmp_path, "spin", "1: jmp 1b")
    with Machine(VmConfig(mem_mib=64)) as m:
        m.boot_pvh(elf)
        threading.Timer(0.3, m.stop).start()
        t0 = time.monotonic()
        result = m.run(timeout=10)
        assert result.kind == "stopped"
        assert time.monotonic() - t0 < 5
        assert not any(t.alive for t in m.threads)


def test_timeout_stops_a_spinning_guest(tmp_path):
    elf = build_guest(tmp_path, "spin", "1: jmp 1b")
    with Machine(VmConfig(mem_mib=64)) as m:
        m.boot_pvh(elf)
        result = m.run(timeout=0.5)
        assert result.kind == "timeout"


def test_vm_run_from_another_thread_stops_cleanly(tmp_path):
    """A VM driven from a worker thread (the kick handler was installed by the main thread) still stops."""
    elf = build_guest(tmp_path, "spin2", "1: jmp 1b")
    results = []

    def worker():
        with Machine(VmConfig(mem_mib=64)) as m:
            m.boot_pvh(elf)
            results.append(m.run(timeout=0.5))

    t = threading.Thread(target=worker)
    t.start()
    t.join(15)
    assert not t.is_alive() and results and results[0].kind == "timeout"


def test_rip_sampler_logs_where_a_spinning_guest_is(tmp_path, monkeypatch, caplog):
    """EXITLESS_SAMPLE_RIP=seconds: the evidence of a hang (where each vCPU is) without stopping it."""
    elf = build_guest(tmp_path, "spin3", "spin:\n    jmp spin")
    monkeypatch.setenv("EXITLESS_SAMPLE_RIP", "0.1")
    with Machine(VmConfig(mem_mib=64)) as m:
        m.boot_pvh(elf)
        with caplog.at_level("WARNING", logger="exitless.vcpu"):
            result = m.run(timeout=1.0)
    assert result.kind == "timeout"
    samples = [r.getMessage() for r in caplog.records if "sample: rip=" in r.getMessage()]
    assert samples and all("vcpu0 sample: rip=0x10000" in s and "cpl=0" in s for s in samples)
