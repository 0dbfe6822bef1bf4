/* guestkit: IDT, TSS, ring-0 services for ring-3 apps, exception reporting,
 * LAPIC (xAPIC or x2APIC), LAPIC timer, and the one run-time page-table edit
 * (4 KiB split of one 2 MiB page).
 *
 * Apps run in ring 3 (IOPL=3, so port I/O works there): on a software-nested
 * KVM every ring-0 instruction is emulated, so ring 0 only boots, takes
 * interrupts (fast stubs in boot.S) and serves int $0x80 requests. */
#include "gk.h"

struct idt_gate {
    u16 off_lo;
    u16 sel;
    u8 ist;
    u8 type;
    u16 off_mid;
    u32 off_hi;
    u32 zero;
} __attribute__((packed));

struct frame {
    u64 r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
    u64 vec, err, rip, cs, rflags, rsp, ss;
};

struct tss64 {
    u32 reserved0;
    u64 rsp0, rsp1, rsp2;
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
    u8 iomap[8192 + 1]; /* all ports allowed (0 bits), then the 0xFF terminator */
} __attribute__((packed));

extern const u64 isr_stub_table[256];
extern const u64 isr_fast_table[256 - 32 - 1];
extern void gk_wait_user(volatile u32 *flag); /* boot.S: the UD2 that isr_ud turns into the wait */

extern u64 gdt_tss[2];
extern char kstack_top[];
static struct idt_gate idt[256] __attribute__((aligned(16)));
static struct tss64 tss __attribute__((aligned(64)));
volatile u64 irq_counts[256];
volatile u32 irq_flag;
uptr lapic_eoi_reg = 0xFEE000B0; /* used by the fast IRQ stubs */

static void idt_set(u32 v, u64 a, u8 type)
{
    idt[v].off_lo = a & 0xffff;
    idt[v].sel = 0x08;
    idt[v].ist = 0;
    idt[v].type = type;
    idt[v].off_mid = (a >> 16) & 0xffff;
    idt[v].off_hi = a >> 32;
    idt[v].zero = 0;
}

/* ring 0, at boot: TSS (rsp0 for entries from ring 3), load TR and IDTR.
 * The IDT itself is filled by idt_init(), which may run in ring 3. */
void cpu_tables_init(void)
{
    tss.rsp0 = (u64)(uptr)kstack_top;
    /* ring 3 may use every port: IOPL=3 is requested too, but a software-nested
     * KVM may not honour it, while the I/O permission bitmap is architectural */
    tss.iomap_base = __builtin_offsetof(struct tss64, iomap);
    tss.iomap[8192] = 0xff;
    u64 base = (u64)(uptr)&tss, limit = sizeof(tss) - 1;
    gdt_tss[0] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ULL << 40) |
                 (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    gdt_tss[1] = base >> 32;
    __asm__ __volatile__("ltr %w0" ::"r"(0x30));
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) d = {sizeof(idt) - 1, (u64)(uptr)idt};
    __asm__ __volatile__("lidt %0" ::"m"(d));
}

void idt_init(void)
{
    for (int i = 0; i < 256; i++)
        idt_set(i, isr_stub_table[i], 0x8E); /* present, DPL0, interrupt gate */
}

/* xAPIC: IRQ vectors take the short path (count, flag, MMIO EOI) */
static void idt_use_fast_irqs(void)
{
    for (u32 v = 32; v < 255; v++)
        idt_set(v, isr_fast_table[v - 32], 0x8E);
}

bool in_ring3(void)
{
    u16 cs;
    __asm__ __volatile__("mov %%cs, %0" : "=r"(cs));
    return (cs & 3) == 3;
}

static u64 sys_call(u64 nr, u64 a, u64 b)
{
    u64 ret = nr;
    /* the #UD handler preserves every register but rax */
    __asm__ __volatile__("ud2" : "+a"(ret), "+D"(a), "+S"(b) : : "memory", "cc");
    return ret;
}

u64 rdmsr(u32 msr)
{
    return in_ring3() ? sys_call(SYS_RDMSR, msr, 0) : raw_rdmsr(msr);
}

void wrmsr(u32 msr, u64 v)
{
    if (in_ring3())
        sys_call(SYS_WRMSR, msr, v);
    else
        raw_wrmsr(msr, v);
}

/* sleep until an interrupt arrives, unless one arrived since *flag was cleared */
void wait_for_irq(volatile u32 *flag)
{
    if (in_ring3()) {
        gk_wait_user(flag);
        return;
    }
    __asm__ __volatile__("cli" ::: "memory");
    if (!*flag)
        __asm__ __volatile__("sti; hlt" ::: "memory");
    else
        __asm__ __volatile__("sti" ::: "memory");
}

static void flush_tlb(void)
{
    if (in_ring3()) {
        sys_call(SYS_FLUSH_TLB, 0, 0);
        return;
    }
    u64 cr3;
    __asm__ __volatile__("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3)::"memory");
}

noreturn void halt_forever(void)
{
    if (in_ring3())
        sys_call(SYS_HALT, 0, 0);
    for (;;)
        __asm__ __volatile__("cli; hlt");
}

/* ring 0, from the #UD handler, interrupts off */
static u64 service_call(u64 nr, u64 a, u64 b)
{
    switch (nr) {
    case SYS_RDMSR:
        return raw_rdmsr((u32)a);
    case SYS_WRMSR:
        raw_wrmsr((u32)a, b);
        return 0;
    case SYS_FLUSH_TLB:
        flush_tlb();
        return 0;
    case SYS_HALT:
        for (;;)
            __asm__ __volatile__("cli; hlt");
    default:
        panic("bad service %llu", nr);
    }
}

static const char *const exc_names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS",
    "#NP", "#SS", "#GP", "#PF", "15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

/* level-triggered lines (INTx through the IOAPIC): the device's condition is cleared by `ack` before the
 * EOI, or the IOAPIC delivers the still-asserted line again at once */
static void (*level_ack[256])(void);

void isr_dispatch(struct frame *f)
{
    u32 v = (u32)f->vec;
    if (v == 6 && (f->cs & 3) == 3 && *(volatile u16 *)(uptr)f->rip == 0x0B0F) {
        f->rax = service_call(f->rax, f->rdi, f->rsi);
        f->rip += 2;
        return;
    }
    if (v < 32) {
        u64 cr2;
        __asm__ __volatile__("mov %%cr2, %0" : "=r"(cr2));
        panic("exception %u %s err=%#llx rip=%#llx cr2=%#llx rsp=%#llx cs=%#llx", v,
              exc_names[v] ? exc_names[v] : "?", f->err, f->rip, cr2, f->rsp, f->cs);
    }
    irq_counts[v]++;
    if (v == VEC_SPURIOUS)
        return; /* no EOI for spurious */
    irq_flag = 1;
    if (level_ack[v])
        level_ack[v]();
    lapic_eoi();
}

/* ---- IOAPIC (82093AA: IOREGSEL at +0, IOWIN at +0x10; redirection entry i at registers 0x10 + 2i) ---- */
#define IOAPIC_BASE 0xFEC00000UL
#define IOAPIC_RTE_LEVEL (1u << 15)
#define IOAPIC_RTE_MASKED (1u << 16)

static void ioapic_write(u32 reg, u32 v)
{
    mmio_w32(IOAPIC_BASE, reg);
    mmio_w32(IOAPIC_BASE + 0x10, v);
}

void ioapic_route_level(u32 gsi, u8 vector, void (*ack)(void))
{
    lapic_init();
    level_ack[vector] = ack;
    idt_set(vector, isr_stub_table[vector], 0x8E);   /* the full path: the fast stubs (xAPIC) EOI without the ack */
    ioapic_write(0x11 + 2 * gsi, lapic_id() << 24);              /* physical destination: this CPU */
    ioapic_write(0x10 + 2 * gsi, vector | IOAPIC_RTE_LEVEL);     /* fixed, active high, level, unmasked */
}

/* ---- LAPIC ---- */
#define APIC_BASE_MSR 0x1B
#define APIC_ID 0x20
#define APIC_TPR 0x80
#define APIC_EOI 0xB0
#define APIC_SVR 0xF0
#define APIC_LVT_TIMER 0x320
#define APIC_LVT_LINT0 0x350
#define APIC_LVT_LINT1 0x360
#define APIC_LVT_ERROR 0x370
#define APIC_TMICT 0x380
#define APIC_TMCCT 0x390
#define APIC_TDCR 0x3E0
#define LVT_MASKED (1u << 16)
#define LVT_PERIODIC (1u << 17)

static bool lapic_ready, x2apic;
static uptr lapic_base = 0xFEE00000;
static u64 lapic_khz; /* timer ticks per ms (after divide) */

static u32 lapic_read(u32 reg)
{
    if (x2apic)
        return (u32)rdmsr(0x800 + (reg >> 4));
    return mmio_r32(lapic_base + reg);
}

static void lapic_write(u32 reg, u32 v)
{
    if (x2apic)
        wrmsr(0x800 + (reg >> 4), v);
    else
        mmio_w32(lapic_base + reg, v);
}

bool lapic_is_x2apic(void) { return x2apic; }

u32 lapic_id(void)
{
    u32 id = lapic_read(APIC_ID);
    return x2apic ? id : id >> 24;
}

void lapic_eoi(void) { lapic_write(APIC_EOI, 0); }

void lapic_init(void)
{
    if (lapic_ready)
        return;
    /* mask the legacy 8259 PICs so nothing arrives on firmware vectors */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    u64 base = rdmsr(APIC_BASE_MSR);
    if (!(base & (1u << 11))) {
        base |= 1u << 11;
        wrmsr(APIC_BASE_MSR, base);
    }
    if (arg_u64("x2apic", 0) && !(base & (1u << 10))) { /* switch to x2APIC mode */
        u32 a, b, c, d;
        cpuid(1, 0, &a, &b, &c, &d);
        if (!(c & (1u << 21)))
            panic("x2apic=1: CPU has no x2APIC");
        base |= 1u << 10;
        wrmsr(APIC_BASE_MSR, base);
    }
    x2apic = (base & (1u << 10)) != 0;
    lapic_base = (uptr)(base & 0xFFFFFF000ULL);
    if (lapic_base >= 0x100000000ULL)
        panic("LAPIC base %#lx above 4 GiB", (unsigned long)lapic_base);
    lapic_eoi_reg = lapic_base + APIC_EOI;
    if (!x2apic)
        idt_use_fast_irqs();
    lapic_write(APIC_TPR, 0);
    lapic_write(APIC_SVR, 0x100 | VEC_SPURIOUS);
    /* calibrate the timer against the TSC: divide by 16, ~2 ms */
    lapic_write(APIC_TDCR, 0x3);
    lapic_write(APIC_LVT_TIMER, LVT_MASKED | VEC_TIMER);
    lapic_write(APIC_TMICT, 0xFFFFFFFF);
    u64 t0 = rdtsc();
    u64 t1 = t0 + ns_to_tsc(2000000);
    while (rdtsc() < t1)
        cpu_pause();
    u32 cur = lapic_read(APIC_TMCCT);
    u64 t2 = rdtsc();
    lapic_write(APIC_TMICT, 0);
    u64 ticks = 0xFFFFFFFFULL - cur;
    u64 ns = tsc_to_ns(t2 - t0);
    lapic_khz = ns ? ticks * 1000000ULL / ns : 0;
    if (!lapic_khz)
        panic("LAPIC timer does not count");
    lapic_ready = true;
}

static u32 ns_to_lapic(u64 ns)
{
    u64 c = ns / 1000000ULL * lapic_khz + (ns % 1000000ULL) * lapic_khz / 1000000ULL;
    if (c < 1)
        c = 1;
    if (c > 0xFFFFFFFFULL)
        c = 0xFFFFFFFFULL;
    return (u32)c;
}

void lapic_timer_oneshot_ns(u64 ns)
{
    lapic_write(APIC_LVT_TIMER, VEC_TIMER);
    lapic_write(APIC_TMICT, ns_to_lapic(ns));
}

void lapic_timer_periodic_ns(u64 ns)
{
    lapic_write(APIC_LVT_TIMER, LVT_PERIODIC | VEC_TIMER);
    lapic_write(APIC_TMICT, ns_to_lapic(ns));
}

void lapic_timer_stop(void)
{
    lapic_write(APIC_LVT_TIMER, LVT_MASKED | VEC_TIMER);
    lapic_write(APIC_TMICT, 0);
}

/* ---- paging: split one 2 MiB page into 4 KiB pages ---- */
#define PTE_P 0x001ULL
#define PTE_RW 0x002ULL
#define PTE_PWT 0x008ULL
#define PTE_PCD 0x010ULL
#define PTE_PS 0x080ULL
#define PTE_US 0x004ULL
extern u64 pd0[]; /* 4 contiguous page directories: 2048 x 2 MiB */
static u64 split_pts[4][512] __attribute__((aligned(4096)));
static u32 split_used;

void paging_set_wb_4k(u64 addr)
{
    if (addr >= 0x100000000ULL)
        panic("paging_set_wb_4k: %#llx not mapped", addr);
    u64 *pde = &pd0[addr >> 21];
    u64 *pt;
    if (*pde & PTE_PS) {
        if (!(*pde & (PTE_PCD | PTE_PWT)))
            return; /* already cacheable */
        if (split_used >= ARRAY_SIZE(split_pts))
            panic("paging_set_wb_4k: no page tables left");
        pt = split_pts[split_used++];
        u64 base = addr & ~0x1FFFFFULL;
        u64 attr = *pde & (PTE_PCD | PTE_PWT);
        for (u64 i = 0; i < 512; i++)
            pt[i] = (base + (i << 12)) | PTE_P | PTE_RW | PTE_US | attr;
        pt[(addr >> 12) & 511] &= ~(PTE_PCD | PTE_PWT);
        *(volatile u64 *)pde = (u64)(uptr)pt | PTE_P | PTE_RW | PTE_US;
    } else {
        pt = (u64 *)(uptr)(*pde & 0xFFFFFFFFF000ULL);
        *(volatile u64 *)&pt[(addr >> 12) & 511] &= ~(PTE_PCD | PTE_PWT);
    }
    flush_tlb(); /* one CR3 reload */
}
