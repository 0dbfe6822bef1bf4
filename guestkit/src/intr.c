/* guestkit: IDT, exception reporting, LAPIC (xAPIC or x2APIC), LAPIC timer,
 * and the one run-time page-table edit (4 KiB split of one 2 MiB page). */
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

extern const u64 isr_stub_table[256];
static struct idt_gate idt[256] __attribute__((aligned(16)));
static irq_handler_t handlers[256];
volatile u64 timer_ticks;
static volatile u64 spurious_irqs;

void idt_init(void)
{
    for (int i = 0; i < 256; i++) {
        u64 a = isr_stub_table[i];
        idt[i].off_lo = a & 0xffff;
        idt[i].sel = 0x08;
        idt[i].ist = 0;
        idt[i].type = 0x8E; /* present, DPL0, 64-bit interrupt gate */
        idt[i].off_mid = (a >> 16) & 0xffff;
        idt[i].off_hi = a >> 32;
        idt[i].zero = 0;
    }
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) d = {sizeof(idt) - 1, (u64)(uptr)idt};
    __asm__ __volatile__("lidt %0" ::"m"(d));
}

void irq_register(u32 vector, irq_handler_t h) { handlers[vector & 0xff] = h; }

static const char *const exc_names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS",
    "#NP", "#SS", "#GP", "#PF", "15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

void isr_dispatch(struct frame *f)
{
    u32 v = (u32)f->vec;
    if (v < 32) {
        u64 cr2;
        __asm__ __volatile__("mov %%cr2, %0" : "=r"(cr2));
        panic("exception %u %s err=%#llx rip=%#llx cr2=%#llx rsp=%#llx", v,
              exc_names[v] ? exc_names[v] : "?", f->err, f->rip, cr2, f->rsp);
    }
    if (v == VEC_SPURIOUS) {
        spurious_irqs++;
        return; /* no EOI for spurious */
    }
    if (handlers[v])
        handlers[v](v);
    lapic_eoi();
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

u32 lapic_id(void)
{
    u32 id = lapic_read(APIC_ID);
    return x2apic ? id : id >> 24;
}

void lapic_eoi(void) { lapic_write(APIC_EOI, 0); }

static void timer_irq(u32 v) { timer_ticks++; }

void lapic_init(void)
{
    if (lapic_ready)
        return;
    /* mask the legacy 8259 PICs so nothing arrives on firmware vectors */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    u64 base = rdmsr(APIC_BASE_MSR);
    x2apic = (base & (1u << 10)) != 0;
    if (!(base & (1u << 11))) {
        base |= 1u << 11;
        wrmsr(APIC_BASE_MSR, base);
    }
    lapic_base = (uptr)(base & 0xFFFFFF000ULL);
    if (lapic_base >= 0x100000000ULL)
        panic("LAPIC base %#lx above 4 GiB", (unsigned long)lapic_base);
    lapic_write(APIC_TPR, 0);
    lapic_write(APIC_SVR, 0x100 | VEC_SPURIOUS);
    irq_register(VEC_TIMER, timer_irq);
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
            pt[i] = (base + (i << 12)) | PTE_P | PTE_RW | attr;
        pt[(addr >> 12) & 511] &= ~(PTE_PCD | PTE_PWT);
        *(volatile u64 *)pde = (u64)(uptr)pt | PTE_P | PTE_RW;
        /* flush the whole TLB (one CR3 reload) */
        u64 cr3;
        __asm__ __volatile__("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3)::"memory");
    } else {
        pt = (u64 *)(uptr)(*pde & 0xFFFFFFFFF000ULL);
        *(volatile u64 *)&pt[(addr >> 12) & 511] &= ~(PTE_PCD | PTE_PWT);
        __asm__ __volatile__("invlpg (%0)" ::"r"((uptr)addr) : "memory");
    }
}
