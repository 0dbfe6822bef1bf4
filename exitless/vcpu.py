"""vCPU threads: the KVM_RUN loop and the dispatch of exits to the PIO and MMIO buses.

Each vCPU runs on its own thread.  KVM_RUN is called through ctypes, so the GIL
is released while the guest runs.  To stop a vCPU from another thread we set
``kvm_run.immediate_exit`` and send the thread a signal: KVM_RUN returns EINTR
(or does not enter the guest at all), and the loop notices the stop request.
"""
from __future__ import annotations

import errno
import logging
import traceback
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from . import threadname
from .bus import Bus
from .exits import GuestStop, VmExit
from .kvm import constants as C
from .kvm import structs as S
from .kvm.api import Vcpu
from .x86.cpu import describe_registers
from .x86.fallback import InstructionFallback

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1
_RUN_U = S.kvm_run.u.offset
_MMIO_DATA = _RUN_U + S.kvm_run_mmio.data.offset


def _kick_handler_installed() -> bool:
    return signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None)


def install_kick_handler() -> bool:
    """Make KICK_SIGNAL interrupt a blocking KVM_RUN (EINTR) instead of killing the process.

    Python installs signal handlers only from the main thread; the handler is a
    no-op at Python level, its only job is to make the kernel return EINTR.
    """
    if _kick_handler_installed():
        return True
    if threading.current_thread() is not threading.main_thread():
        log.warning("exitless: VM started outside the main thread before any in it: a vCPU spinning in the "
                    "guest without exits cannot be interrupted (call install_kick_handler() from the main thread)")
        return False
    signal.signal(KICK_SIGNAL, lambda *_: None)
    return True


@dataclass
class VcpuCounters:
    """Exits seen by this VMM (KVM's own statistics are read separately)."""

    io: int = 0
    mmio: int = 0
    intr: int = 0
    other: dict[int, int] = field(default_factory=dict)


class VcpuThread:
    def __init__(self, vcpu: Vcpu, pio: Bus, mmio: Bus, on_exit: Callable[[VmExit], None],
                 fallback: InstructionFallback | None = None):
        self.vcpu = vcpu
        self.fallback = fallback
        self.pio = pio
        self.mmio = mmio
        self.on_exit = on_exit
        self.counters = VcpuCounters()
        self._stop = threading.Event()
        self._sample = False          # log the guest's RIP at the next exit (see request_sample)
        self._thread: threading.Thread | None = None
        self.cpu_seconds = 0.0  # CPU time of this thread (guest execution included), set when it ends

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"vcpu{self.vcpu.id}", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        """Ask the vCPU to leave the guest and stop; safe from any thread."""
        self._stop.set()
        self.vcpu.run_struct.immediate_exit = 1
        t = self._thread
        # without our handler the signal's default action would end the whole process: then rely on
        # immediate_exit alone (the vCPU stops at its next exit)
        if t is not None and t.is_alive() and t.ident is not None and _kick_handler_installed():
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def request_sample(self) -> None:
        """Log where the guest is (RIP) at its next exit, forced now by the kick signal: a hang's evidence."""
        self._sample = True
        t = self._thread
        if t is not None and t.is_alive() and t.ident is not None and _kick_handler_installed():
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _main(self) -> None:
        threadname.set_current(f"vcpu{self.vcpu.id}")     # top -H, perf and benchmarks see which it is
        try:
            result = self._loop()
        except GuestStop as stop:
            result = stop.exit
        except Exception as e:  # a VMM bug: report it with the guest's state, never swallow it
            log.error("vcpu%d: unexpected error\n%s", self.vcpu.id, traceback.format_exc())
            result = VmExit("error", 1, f"{type(e).__name__}: {e}", self.vcpu.id, describe_registers(self.vcpu))
        result.vcpu = self.vcpu.id
        self.cpu_seconds = time.thread_time()
        self.on_exit(result)

    def _loop(self) -> VmExit:
        vcpu, run, page = self.vcpu, self.vcpu.run_struct, self.vcpu.run_page
        pio, mmio, counters = self.pio, self.mmio, self.counters
        fallback = self.fallback
        tick = fallback.tick if fallback is not None and fallback.breakpoints is not None else None
        while True:
            if self._stop.is_set():
                return VmExit("stopped")
            if tick is not None:       # between exits, with the last one completed
                tick()
            ret = vcpu.run()
            if ret < 0:
                if ret in (-errno.EINTR, -errno.EAGAIN):
                    counters.intr += 1
                    run.immediate_exit = 0
                    if self._sample:
                        self._sample = False
                        r, sr = vcpu.get_regs(), vcpu.get_sregs()
                        log.warning("vcpu%d sample: rip=%#x rsp=%#x cpl=%d rflags=%#x", vcpu.id, r.rip, r.rsp,
                                    sr.cs.selector & 3, r.rflags)
                    continue
                return VmExit("error", 1, f"KVM_RUN failed: {errno.errorcode.get(-ret, -ret)}",
                              registers=describe_registers(vcpu))
            reason = run.exit_reason
            if reason == C.KVM_EXIT_IO:
                counters.io += 1
                io = run.u.io
                size, port, count, off = io.size, io.port, io.count, io.data_offset
                if io.direction == C.KVM_EXIT_IO_OUT:
                    for i in range(count):
                        pio.write(port, bytes(page[off + i * size: off + (i + 1) * size]))
                else:
                    for i in range(count):
                        page[off + i * size: off + (i + 1) * size] = pio.read(port, size)
            elif reason == C.KVM_EXIT_MMIO:
                counters.mmio += 1
                m = run.u.mmio
                length = m.len
                if m.is_write:
                    mmio.write(m.phys_addr, bytes(page[_MMIO_DATA:_MMIO_DATA + length]))
                else:
                    page[_MMIO_DATA:_MMIO_DATA + length] = mmio.read(m.phys_addr, length)
            elif reason == C.KVM_EXIT_INTR:
                counters.intr += 1
            elif (reason == C.KVM_EXIT_INTERNAL_ERROR and fallback is not None
                  and run.u.internal.suberror == C.KVM_INTERNAL_ERROR_EMULATION):
                why = fallback.handle(run)
                if why is not None:
                    return VmExit("error", 1, f"KVM internal error: emulation failure: {why}",
                                  registers=describe_registers(vcpu))
            else:
                counters.other[reason] = counters.other.get(reason, 0) + 1
                result = self._terminal_exit(reason, run)
                if result is not None:
                    return result

    def _terminal_exit(self, reason: int, run: S.kvm_run) -> VmExit | None:
        name = C.EXIT_REASON_NAMES.get(reason, str(reason))
        if reason == C.KVM_EXIT_HLT:
            return VmExit("halt", 0, "the guest halted with interrupts off")
        if reason == C.KVM_EXIT_SHUTDOWN:
            # a triple fault: the guest crashed (Linux's own reboot paths use the reset port instead)
            return VmExit("triple-fault", 1, "triple fault (KVM_EXIT_SHUTDOWN)", registers=describe_registers(self.vcpu))
        if reason == C.KVM_EXIT_SYSTEM_EVENT:
            kind = {C.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown", C.KVM_SYSTEM_EVENT_RESET: "reset",
                    C.KVM_SYSTEM_EVENT_CRASH: "crash"}.get(run.u.system_event.type, "shutdown")
            return VmExit(kind, 1 if kind == "crash" else 0, f"system event {run.u.system_event.type}")
        if reason == C.KVM_EXIT_INTERNAL_ERROR:
            ie = run.u.internal
            sub = {C.KVM_INTERNAL_ERROR_EMULATION: "emulation failure (an instruction KVM cannot emulate: "
                   "is the guest using a CPU feature outside KVM_GET_SUPPORTED_CPUID?)",
                   C.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
                   C.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failure"}.get(ie.suberror, f"suberror {ie.suberror}")
            data = " ".join(f"{ie.data[i]:#x}" for i in range(min(ie.ndata, 16)))
            return VmExit("error", 1, f"KVM internal error: {sub} [{data}]", registers=describe_registers(self.vcpu))
        if reason == C.KVM_EXIT_FAIL_ENTRY:
            return VmExit("error", 1, f"VM entry failed: reason {run.u.fail_entry.hardware_entry_failure_reason:#x}",
                          registers=describe_registers(self.vcpu))
        return VmExit("error", 1, f"unhandled exit {name}", registers=describe_registers(self.vcpu))


def wait_all(threads: list[VcpuThread], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    return all(t.join(max(0.0, deadline - time.monotonic())) for t in threads)
