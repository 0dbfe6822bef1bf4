/*
 * guestkit boot: Xen PVH entry (32-bit protected mode, paging off),
 * switch once to long mode using static identity-mapped page tables
 * (2 MiB pages, first 4 GiB; 3..4 GiB (MMIO hole) mapped uncacheable).
 */
#define XEN_ELFNOTE_PHYS32_ENTRY 18

#define PTE_P    0x001
#define PTE_RW   0x002
#define PTE_US   0x004   /* everything is user-accessible: apps run in ring 3 */
#define PTE_PWT  0x008
#define PTE_PCD  0x010
#define PTE_PS   0x080

#define SEL_CODE64 0x08
#define SEL_DATA   0x10
#define SEL_CODE32 0x18
#define SEL_UDATA  0x20
#define SEL_UCODE  0x28
#define SEL_TSS    0x30

/* ---- PVH ELF note (name "Xen", 8-byte descriptor like Linux) ---- */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                         /* namesz */
    .long 8                         /* descsz */
    .long XEN_ELFNOTE_PHYS32_ENTRY  /* type */
    .asciz "Xen"
    .balign 4
    .quad pvh_entry32

/* ---- 32-bit entry ---- */
    .section .text.boot, "ax"
    .code32
    .globl pvh_entry32
pvh_entry32:
    cli
    cld
    /* ebx = struct hvm_start_info *; keep it in esi/edi-free regs */
    movl %ebx, %ebp

    lgdt (gdt_desc32)
    ljmp $SEL_CODE32, $1f
1:  movl $SEL_DATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs

    /* zero .bss (loaders should, but do not trust them) */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb

    /* CR4.PAE */
    movl %cr4, %eax
    orl $(1 << 5), %eax
    movl %eax, %cr4
    /* CR3 = static PML4 */
    movl $pml4, %eax
    movl %eax, %cr3
    /* EFER.LME */
    movl $0xC0000080, %ecx
    rdmsr
    orl $(1 << 8), %eax
    wrmsr
    /* CR0.PG | PE (and WP) */
    movl %cr0, %eax
    orl $0x80010001, %eax
    andl $0x9fffffff, %eax          /* clear CD/NW: caches on */
    movl %eax, %cr0
    ljmp $SEL_CODE64, $long_mode

    .code64
long_mode:
    movl $SEL_DATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    /* reload GDTR with a 64-bit base (same table) */
    lgdt (gdt_desc64)
    movq $boot_stack_top, %rsp
    xorl %eax, %eax
    pushq %rax                      /* fake return address / frame end */
    xorl %ebp, %ebp
    movl %ebx, %edi                 /* start_info paddr (zero-extended) */
    call kmain                      /* ring 0; drops to ring 3 via enter_user */
2:  cli
    hlt
    jmp 2b

/* ---- interrupt stubs ---- */
    .macro ISR_NOERR vec
    .balign 16
isr_\vec:
    pushq $0
    pushq $\vec
    jmp isr_common
    .endm
    .macro ISR_ERR vec
    .balign 16
isr_\vec:
    pushq $\vec
    jmp isr_common
    .endm

    .text
    .altmacro
    .set vec, 0
    .rept 256
      .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        ISR_ERR %vec
      .else
        ISR_NOERR %vec
      .endif
      .set vec, vec + 1
    .endr

/* Fast IRQ entry (vectors 0x20..0xFE except 0x80; installed for xAPIC only):
 * on this software-nested host every ring-0 instruction is emulated, so an
 * interrupt costs as few instructions as possible: count it, raise irq_flag,
 * EOI through the xAPIC MMIO register, return -- to ring 3 at once when it
 * ended the ring-3 wait's HLT (isr_to_user). */
    .macro ISR_FAST vec
    .balign 16
isr_fast_\vec:
    incq irq_counts + 8 * \vec(%rip)
    movl $1, irq_flag(%rip)
    pushq %rax
    movq lapic_eoi_reg(%rip), %rax
    movl $0, (%rax)
    popq %rax
    cmpq $gk_wait_woken, (%rsp)     /* woke the ring-3 wait's HLT? */
    je isr_to_user
    iretq
    .endm

    .set vec, 32
    .rept 256 - 32 - 1
      ISR_FAST %vec
      .set vec, vec + 1
    .endr

/* Ring-3 services: the app executes UD2 with rax = service, rdi/rsi = args
 * (a software-nested KVM may not run SYSCALL or INT n from ring 3 the
 * architectural way, but delivers exceptions faithfully); everything but the
 * wait goes through isr_common -> isr_dispatch -> service_call().
 *
 * The wait for an interrupt (wait_for_irq from ring 3) is the one service on
 * the I/O path, so it has its own UD2, gk_wait_ud2 in gk_wait_user(rdi =
 * u32 *flag), and the shortest ring-0 path: recognised by its return
 * address alone (only ring 3 executes it), sleep unless *flag is already
 * non-zero, with interrupts off from the #UD entry to the STI;HLT so that an
 * interrupt after the check still ends the HLT.  The return address is moved
 * past the UD2 before the HLT, so after the wake-up one IRETQ goes back. */
    .text
    .globl gk_wait_user
gk_wait_user:
    .globl gk_wait_ud2
gk_wait_ud2:
    ud2
    ret

    .balign 16
isr_ud:
    cmpq $gk_wait_ud2, (%rsp)       /* frame: rip, cs, rflags, rsp, ss */
    jne 9f
    addq $2, (%rsp)
    cmpl $0, (%rdi)
    jne 1f
    sti
    hlt
    .globl gk_wait_woken
gk_wait_woken:
1:  iretq
/* an interrupt that ended the wait's HLT returns straight to ring 3: its own
 * frame (rip = gk_wait_woken, cs, rflags, rsp, ss) is dropped by going back
 * to the RSP it saved (the frame's start was aligned down to 16 bytes, so
 * that RSP, not a fixed offset, finds the #UD frame), whose rip is already
 * past the UD2: one IRETQ per wake-up instead of two */
isr_to_user:
    movq 24(%rsp), %rsp
    iretq
9:  pushq $0
    pushq $6
    jmp isr_common

isr_common:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    movq %rsp, %rdi
    cld
    call isr_dispatch
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $16, %rsp
    iretq

    .macro ISR_ADDR vec
    .quad isr_\vec
    .endm
    .macro ISR_FAST_ADDR vec
    .quad isr_fast_\vec
    .endm

    .section .rodata
    .balign 8
    .globl isr_stub_table
isr_stub_table:
    .set vec, 0
    .rept 256
      .if vec == 6
        .quad isr_ud
      .else
        ISR_ADDR %vec
      .endif
      .set vec, vec + 1
    .endr
    .globl isr_fast_table
isr_fast_table:                     /* [v - 32] for v in 32..254 */
    .set vec, 32
    .rept 256 - 32 - 1
      ISR_FAST_ADDR %vec
      .set vec, vec + 1
    .endr

/* enter_user(fn rdi, stack top rsi): iretq to ring 3 with IOPL=3 and IF=1 */
    .text
    .globl enter_user
enter_user:
    pushq $(SEL_UDATA | 3)
    pushq %rsi
    pushq $0x3202
    pushq $(SEL_UCODE | 3)
    pushq %rdi
    xorl %eax, %eax
    movl %eax, %ds
    movl %eax, %es
    xorl %ebp, %ebp
    iretq

/* ---- GDT (in .data: ltr writes the TSS busy bit) ---- */
    .data
    .balign 16
gdt:
    .quad 0
    .quad 0x00209A0000000000        /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF        /* 0x10: flat data */
    .quad 0x00CF9A000000FFFF        /* 0x18: flat 32-bit code */
    .quad 0x00CFF2000000FFFF        /* 0x20: user data, DPL3 */
    .quad 0x0020FA0000000000        /* 0x28: user 64-bit code, DPL3 */
    .globl gdt_tss
gdt_tss:
    .quad 0, 0                      /* 0x30: TSS, filled in by tss_init() */
gdt_end:
gdt_desc32:
    .word gdt_end - gdt - 1
    .long gdt
    .balign 8
gdt_desc64:
    .word gdt_end - gdt - 1
    .quad gdt

/* ---- static page tables (never written at run time, except by
 *      paging_split_2m() which redirects one PD entry) ---- */
    .section .data.pagetables, "aw"
    .balign 4096
    .globl pml4
pml4:
    .quad pdpt + (PTE_P | PTE_RW | PTE_US)
    .fill 511, 8, 0
    .globl pdpt
pdpt:
    .quad pd0 + (PTE_P | PTE_RW | PTE_US)
    .quad pd1 + (PTE_P | PTE_RW | PTE_US)
    .quad pd2 + (PTE_P | PTE_RW | PTE_US)
    .quad pd3 + (PTE_P | PTE_RW | PTE_US)
    .fill 508, 8, 0
    .globl pd0
pd0:
    .set i, 0
    .rept 512 * 3
      .quad (i << 21) + (PTE_P | PTE_RW | PTE_US | PTE_PS)
      .set i, i + 1
    .endr
    /* 0xC0000000 - 0xFFFFFFFF: MMIO hole, uncacheable */
pd3:
    .rept 512
      .quad (i << 21) + (PTE_P | PTE_RW | PTE_US | PTE_PS | PTE_PCD | PTE_PWT)
      .set i, i + 1
    .endr
    .set pd1, pd0 + 4096
    .set pd2, pd0 + 8192

/* ---- stack ---- */
    .section .bss

    .balign 4096
    .globl boot_stack
boot_stack:
    .skip 65536
    .globl boot_stack_top
boot_stack_top:
    /* ring-0 stack for interrupts and services taken from ring 3 (TSS.rsp0) */
    .balign 4096
    .skip 16384
    .globl kstack_top
kstack_top:
