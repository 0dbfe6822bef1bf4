"""Two vCPUs keep the user FS base their kernel wrote: a ring-0 test guest that runs in seconds.

Issue 9: a 2-vCPU Linux boot on kvm_pvm ran /init, then the command's busybox died on
CPU 1 at its first ``%fs:`` access with FS base 0.  A Linux boot to that point takes
15-40 minutes here, so this guest does, on each vCPU, what Linux does around a user
FS base, and checks it every time:

* the bootstrap CPU starts the second with INIT and a start-up IPI through its local
  APIC (a real-mode trampoline at ``TRAMP``, then 32-bit and long mode, its own GDT and
  TSS, and its own SYSCALL MSRs), as Linux's SMP boot does;
* each CPU keeps a per-CPU area in IA32_KERNEL_GS_BASE and enters user mode; there,
  ``ITER`` times, it asks its kernel for a new FS base by SYSCALL (on kvm_pvm each goes
  through exitless's repair, exitless/x86/pvm_syscall.py: an emulation-failure exit
  handled by the VMM) and reads ``%fs:0`` ``SPIN`` times, which must give the base back
  (each candidate quadword holds its own address);
* the kernel's SYSCALL entry does SWAPGS and checks the per-CPU area is this CPU's,
  checks the FS selector is still null and IA32_FS_BASE still holds the base it wrote
  last (what Linux's ``save_fsgs()``/``load_seg_legacy()`` rely on at a context
  switch), then loads a null FS selector and WRMSRs the new base (``ARCH_SET_FS``);
* a periodic local-APIC timer (vector 31) interrupts user mode and does the same
  checks; each tick sends an IPI (vector 30) to the other CPU, so KVM kicks the other
  vCPU's thread from this one, as guest IPIs and device interrupts do under Linux;
* meanwhile the VMM's own sampler (``EXITLESS_SAMPLE_RIP``'s ``request_sample``) reads
  each vCPU's registers between its runs.

The exit status says what failed: 0x200 + cpu a wrong ``%fs:0`` in user mode, 0x300 /
0x310 a wrong per-CPU area (timer / SYSCALL), 0x320 + cpu a non-null FS selector,
0x330 + cpu a changed IA32_FS_BASE; 0x100 + vector an unexpected exception in ring 0.
"""
import threading

import pytest
from elftools.elf.elffile import ELFFile

from exitless.doctor import kvm_flavour
from exitless.vm import Machine, VmConfig
from tests.asmguest import build_guest

pytestmark = pytest.mark.kvm
PVM = kvm_flavour() == "pvm"
OK = 0x42
ITERATIONS = 100          # system calls per CPU, each with a new FS base
SPIN = 200_000            # %fs:0 reads in user mode after each
TIMER_NS = 1_000_000      # local-APIC timer period (KVM's APIC bus runs at 1 GHz, divide by 1)

BODY = r"""
    .set TRAMP, 0x10000                  /* the trampoline: start-up IPI vector 0x10 */
    .set ITER, %(iter)d
    .set NCPU, %(ncpu)d
    .set SPIN, %(spin)d
    .set TIMER, %(timer)d
    .set USER_RFLAGS, %(rflags)d
    lea ring0_idt+16*14(%%rip), %%rdi    /* gate 14 -> pf_handler (ENDBR64: the pvm repair plants there) */
    mov $pf_handler, %%eax
    mov %%ax, (%%rdi)
    shr $16, %%eax
    mov %%ax, 6(%%rdi)
    lea ring0_idt+16*30(%%rip), %%rdi    /* gate 30 -> ipi_handler, 31 -> timer_handler */
    mov $ipi_handler, %%eax
    mov %%ax, (%%rdi)
    shr $16, %%eax
    mov %%ax, 6(%%rdi)
    mov $timer_handler, %%eax
    mov %%ax, 16(%%rdi)
    shr $16, %%eax
    mov %%ax, 22(%%rdi)
    /* each candidate FS target holds its own address: 256 quadwords per CPU at 0x500000 + cpu * 0x10000 */
    mov $0x500000, %%edi
    mov $0x20000 / 8, %%ecx
1:  mov %%rdi, (%%rdi)
    add $8, %%rdi
    loop 1b
    mov $user_start, %%esi
    mov $0x400000, %%edi
    mov $user_end - user_start, %%ecx
    rep movsb
    andq $~4, pd(%%rip)                   /* the kernel's 2 MiB (LSTAR included): supervisor only */
    mov $apic_pd, %%eax                   /* the local APIC page, uncached, at 0xfee00000 */
    or $3, %%eax
    mov %%eax, pdpt+24(%%rip)
    mov %%cr3, %%rax
    mov %%rax, %%cr3
    out %%al, $0x80                      /* an exit: the VMM looks at the new IDT */
    mov $NCPU, %%eax
    cmp $1, %%eax
    je 2f
    mov $tramp_start, %%esi
    mov $TRAMP, %%edi
    mov $tramp_end - tramp_start, %%ecx
    rep movsb
    mov $0xfee00000, %%ebx
    movl $0x01000000, 0x310(%%rbx)      /* INIT to APIC ID 1 */
    movl $0x00004500, 0x300(%%rbx)
    movl $0x01000000, 0x310(%%rbx)      /* start-up IPI, vector TRAMP >> 12 */
    movl $0x00004600 + (TRAMP >> 12), 0x300(%%rbx)
2:  xor %%edi, %%edi
    jmp fs_test

/* ---- the second CPU: real mode at TRAMP, then 32-bit, then long mode */
    .code16
tramp_start:
    cli
    mov %%cs, %%ax
    mov %%ax, %%ds
    lgdtl tramp_gdt_ptr - tramp_start
    mov %%cr0, %%eax
    or $1, %%eax
    mov %%eax, %%cr0
    ljmpl $0x08, $ap_prot32
    .balign 8
tramp_gdt: .quad 0, 0x00cf9a000000ffff, 0x00cf92000000ffff, 0x00af9a000000ffff
tramp_gdt_ptr: .word 31
    .long TRAMP + tramp_gdt - tramp_start
tramp_end:
    .code32
ap_prot32:
    mov $0x10, %%ax
    mov %%ax, %%ds
    mov %%ax, %%ss
    mov %%ax, %%es
    mov $0x88000, %%esp
    mov $pml4, %%eax
    mov %%eax, %%cr3
    mov %%cr4, %%eax
    or $0x20, %%eax
    mov %%eax, %%cr4
    mov $0xc0000080, %%ecx
    rdmsr
    or $0x101, %%eax                     /* LME, SCE */
    wrmsr
    mov %%cr0, %%eax
    or $0x80000001, %%eax
    mov %%eax, %%cr0
    ljmp $0x18, $ap_long
    .code64
ap_long:
    lea ring0_gdt(%%rip), %%rsi
    lea ap_gdt(%%rip), %%rdi
    mov $10 * 8, %%ecx
    rep movsb
    movb $0x89, ap_gdt_tss+5(%%rip)       /* available 64-bit TSS (the copy has the BSP's busy bit) */
    lgdt ap_gdt_ptr(%%rip)
    pushq $0x10
    lea 1f(%%rip), %%rax
    pushq %%rax
    lretq
1:  mov $0x18, %%ax
    mov %%ax, %%ds
    mov %%ax, %%ss
    mov %%ax, %%es
    mov $0x88000, %%esp
    mov $ap_tss, %%eax
    mov %%ax, ap_gdt_tss+2(%%rip)
    shr $16, %%eax
    mov %%al, ap_gdt_tss+4(%%rip)
    mov %%ah, ap_gdt_tss+7(%%rip)
    mov $0x40, %%ax
    ltr %%ax
    lidt ring0_idt_ptr(%%rip)
    mov $0xc0000081, %%ecx               /* the SYSCALL MSRs are per CPU */
    xor %%eax, %%eax
    mov $0x00230010, %%edx
    wrmsr
    mov $0xc0000082, %%ecx
    mov $syscall_entry, %%eax
    xor %%edx, %%edx
    wrmsr
    mov $0xc0000084, %%ecx
    mov $0x47700, %%eax
    xor %%edx, %%edx
    wrmsr
    lock incl ap_started(%%rip)
    mov $1, %%edi

/* ---- both CPUs: %%rdi = CPU number; to user mode at 0x400000, stack 0x480000 + cpu * 0x10000 */
fs_test:
    xor %%eax, %%eax                      /* null FS and GS, as Linux's cpu_init() leaves them */
    mov %%eax, %%fs
    mov %%eax, %%gs
    mov $TIMER, %%eax
    test %%eax, %%eax
    jz 1f
    mov $0xfee00000, %%ebx
    movl $0x1ff, 0xf0(%%rbx)             /* APIC software enable */
    movl $0xb, 0x3e0(%%rbx)              /* divide by 1 */
    movl $0x2001f, 0x320(%%rbx)          /* LVT timer: periodic, vector 31 */
    mov %%eax, 0x380(%%rbx)
1:  mov %%rdi, %%rax                     /* per-CPU area at 0x520000 + cpu * 0x1000, word 0 = cpu, in KERNEL_GS_BASE */
    shl $12, %%rax
    add $0x520000, %%rax
    mov %%rdi, (%%rax)
    mov $0xc0000102, %%ecx
    xor %%edx, %%edx
    wrmsr
    mov $0xc0000101, %%ecx                /* GS_BASE: the user's, 0 */
    xor %%eax, %%eax
    wrmsr
    mov %%rdi, %%rax
    shl $16, %%rax
    add $0x480000, %%rax
    pushq $0x2b
    pushq %%rax
    pushq $USER_RFLAGS
    pushq $0x33
    pushq $0x400000
    iretq

timer_handler:                           /* vector 31 */
    pushq $0
    jmp apic_handler
ipi_handler:                             /* vector 30: the other CPU's IPI */
    pushq $1
    jmp apic_handler
apic_handler:                            /* (%%rsp) = 1 for the IPI, then the interrupt frame */
    testb $3, 16(%%rsp)                  /* SWAPGS when from user mode, as Linux */
    jz 1f
    swapgs
1:  push %%rax
    push %%rbx
    push %%rdi
    mov 24(%%rsp), %%edi
    mov $0xfee00000, %%ebx
    movl $0, 0xb0(%%rbx)                  /* EOI */
    mov 0x20(%%rbx), %%eax                /* APIC ID: the CPU */
    shr $24, %%eax
    testb $3, 40(%%rsp)                   /* the frame's CS */
    jz 2f
    cmp %%gs:0, %%rax                     /* the per-CPU area is this CPU's */
    je 3f
    mov $0x300, %%eax
    jmp exit_with_eax
3:  push %%rcx                            /* from user mode: FS as at a context switch */
    push %%rdx
    push %%r9
    push %%r10
    push %%rax
    push %%rdi
    mov %%rax, %%rdi
    call check_fs
    pop %%rdi
    pop %%rax
    pop %%r10
    pop %%r9
    pop %%rdx
    pop %%rcx
2:  test %%edi, %%edi
    jz 4f
    lea ipis(%%rip), %%rbx
    incq (%%rbx,%%rax,8)
    jmp 8f
4:  lea ticks(%%rip), %%rbx
    incq (%%rbx,%%rax,8)
    mov $NCPU, %%ebx                      /* an IPI to the other CPU: KVM kicks its vCPU thread from this one */
    cmp $1, %%ebx
    je 8f
    xor $1, %%eax
    shl $24, %%eax
    mov $0xfee00000, %%ebx
    mov %%eax, 0x310(%%rbx)
    movl $0x1e, 0x300(%%rbx)              /* fixed, vector 30 */
8:  pop %%rdi
    pop %%rbx
    pop %%rax
    testb $3, 16(%%rsp)
    jz 9f
    swapgs
9:  add $8, %%rsp
    iretq

/* %%rdi = cpu, GS = its per-CPU area: the FS selector is still null and IA32_FS_BASE still the base this
   kernel wrote last (%%gs:8), what Linux's save_fsgs() and load_seg_legacy() rely on at a context switch;
   else the VM stops with 0x320 + cpu (the selector in bad_sel) or 0x330 + cpu (bad_msr, bad_value).
   Clobbers rax rcx rdx r9 r10. */
check_fs:
    mov %%fs, %%r10d
    test %%r10d, %%r10d
    jz 1f
    lea bad_sel(%%rip), %%r9
    mov %%r10, (%%r9,%%rdi,8)
    mov $0x320, %%eax
    add %%edi, %%eax
    jmp exit_with_eax
1:  mov $0xc0000100, %%ecx
    rdmsr
    shl $32, %%rdx
    or %%rax, %%rdx
    cmp %%gs:8, %%rdx
    je 2f
    lea bad_msr(%%rip), %%r9
    mov %%rdx, (%%r9,%%rdi,8)
    mov %%gs:8, %%rdx
    lea bad_value(%%rip), %%r9
    mov %%rdx, (%%r9,%%rdi,8)
    mov $0x330, %%eax
    add %%edi, %%eax
    jmp exit_with_eax
2:  ret

pf_handler:
    endbr64
    movl $14, %%eax
    jmp ring0_fault

/* system calls: %%eax = 3 set FS base to %%rsi; 2 done; 1 wrong %%fs:0 (read value in %%rsi); %%edi = cpu */
syscall_entry:
    swapgs
    cmp %%gs:0, %%rdi                     /* the per-CPU area is this CPU's */
    je 7f
    mov $0x310, %%eax
    jmp exit_with_eax
7:  swapgs
    mov %%rcx, %%r8
    cmp $3, %%eax
    jne 1f
    lea calls(%%rip), %%r9
    incq (%%r9,%%rdi,8)
    swapgs
    call check_fs
    mov %%rsi, %%gs:8
    swapgs
    xor %%eax, %%eax
    mov %%eax, %%fs                      /* Linux's loadseg(FS, 0), then the MSR */
    mov $0xc0000100, %%ecx
    mov %%esi, %%eax
    mov %%rsi, %%rdx
    shr $32, %%rdx
    wrmsr
    mov %%r8, %%rcx
    sysretq
1:  cmp $2, %%eax
    jne 3f
    lea done(%%rip), %%r9
    movq $1, (%%r9,%%rdi,8)
    test %%edi, %%edi
    jnz 9f
    mov $NCPU, %%eax                      /* the bootstrap CPU waits for the other, then stops the VM */
    cmp $1, %%eax
    je 8f
2:  mov $TIMER, %%eax
    test %%eax, %%eax
    jz 4f
    sti
    hlt
    cli
4:  pause
    cmpq $0, done+8(%%rip)
    je 2b
8:  mov $%(ok)d, %%eax
    jmp exit_with_eax
9:  cli
    hlt
    jmp 9b
3:  lea bad_value(%%rip), %%r9
    mov %%rsi, (%%r9,%%rdi,8)
    mov $0xc0000100, %%ecx
    rdmsr
    lea bad_msr(%%rip), %%r9
    mov %%eax, (%%r9,%%rdi,8)
    mov %%edx, 4(%%r9,%%rdi,8)
    mov $0x200, %%eax
    add %%edi, %%eax
    jmp exit_with_eax

user_start:
    mov $ITER, %%r13d
1:  mov %%rdi, %%rsi
    shl $16, %%rsi
    add $0x500000, %%rsi
    mov %%r13, %%rax
    and $0xff, %%eax
    lea (%%rsi,%%rax,8), %%rsi
    mov $3, %%eax
    syscall
    mov $SPIN, %%ecx
4:  mov %%fs:0, %%rax
    cmp %%rsi, %%rax
    jne 2f
    dec %%ecx
    jnz 4b
    dec %%r13d
    jnz 1b
    mov $2, %%eax
    syscall
2:  mov %%rax, %%rsi
    mov $1, %%eax
    syscall
user_end:
"""
DATA = r"""
    .balign 4096
apic_pd: .fill 0x1f7, 8, 0
    .quad 0xfee0009b
    .fill 511 - 0x1f7, 8, 0
    .balign 16
ap_gdt: .fill 10, 8, 0                 /* a copy of ring0_gdt, with the AP's own TSS */
    .set ap_gdt_tss, ap_gdt + 0x40
ap_gdt_ptr: .word 10 * 8 - 1
    .long ap_gdt, 0
    .balign 16
ap_tss: .long 0
    .long 0x68000, 0
    .fill 23, 4, 0
ap_started: .quad 0
calls: .quad 0, 0
ticks: .quad 0, 0
ipis: .quad 0, 0
done: .quad 0, 0
bad_value: .quad 0, 0
bad_msr: .quad 0, 0
bad_sel: .quad 0, 0
"""


def run_fs_guest(tmp_path, cpus: int, *, iterations: int = ITERATIONS, spin: int = SPIN, timer: int = TIMER_NS,
                 sample_every: float | None = 0.005, timeout: float = 120):
    """Boot the guest on ``cpus`` vCPUs (1 or 2); returns (VmExit, what the guest recorded, per-vCPU repair counts).

    ``timer``: the local-APIC timer's initial count (ns), 0 for none; ``sample_every``: seconds
    between the VMM's RIP samples of every vCPU, None for none.
    """
    body = BODY % {"iter": iterations, "ncpu": cpus, "spin": spin, "timer": timer,
                   "rflags": 0x202 if timer else 0x2, "ok": OK}
    elf = build_guest(tmp_path, f"fs{cpus}", body, DATA, ring0=True)
    with open(elf, "rb") as f:
        syms = {s.name: s["st_value"] for s in ELFFile(f).get_section_by_name(".symtab").iter_symbols() if s.name}
    with Machine(VmConfig(mem_mib=64, cpus=cpus)) as m:
        if m.syscall_repair is not None:
            m.syscall_repair.interval = 0.0
        m.boot_pvh(elf)
        stop = threading.Event()

        def sample():
            while not stop.wait(sample_every):
                for t in m.threads:
                    t.request_sample()

        sampler = threading.Thread(target=sample, daemon=True)
        if sample_every:
            sampler.start()
        try:
            result = m.run(timeout=timeout)
        finally:
            stop.set()
        out = {k: [m.mem.read_u64(syms[k] + 8 * i) for i in range(2)]
               for k in ("calls", "ticks", "ipis", "done", "bad_value", "bad_msr", "bad_sel")}
        out["ap_started"] = m.mem.read_u64(syms["ap_started"])
        out["frame"] = [m.mem.read_u64(syms["frame"] + 8 * i) for i in range(7)]
        counts = [dict(f.counts) for f in m.fallbacks]
    if sample_every:
        sampler.join()
    return result, out, counts


@pytest.mark.parametrize("cpus", [1, 2])
def test_each_cpu_keeps_the_fs_base_its_kernel_wrote(tmp_path, cpus, caplog):
    caplog.set_level("ERROR", logger="exitless.vcpu")         # the samples are warnings
    result, out, counts = run_fs_guest(tmp_path, cpus)
    assert result.status == OK, (result, out, counts)
    assert out["calls"][:cpus] == [ITERATIONS] * cpus and out["done"][:cpus] == [1] * cpus, out
    assert out["ap_started"] == (cpus == 2)
    assert all(t > 0 for t in out["ticks"][:cpus]), out
    if cpus == 2:
        assert all(i > 0 for i in out["ipis"]), out
    if PVM:    # every system call went through the VMM's repair, on its own vCPU
        assert [c.get("pvm syscall", 0) for c in counts] == [ITERATIONS + 1] * cpus, counts
