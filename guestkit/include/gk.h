/* guestkit common definitions */
#ifndef GK_H
#define GK_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char s8;
typedef short s16;
typedef int s32;
typedef long long s64;
typedef unsigned long uptr;
typedef unsigned long size_t;
typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define ALIGN_UP(x, a) (((x) + (a) - 1) & ~((u64)(a) - 1))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define barrier() __asm__ __volatile__("" ::: "memory")
#define noreturn __attribute__((noreturn))
#define unused __attribute__((unused))

/* exit statuses written to port 0xf4 */
#define EXIT_OK 0
#define EXIT_FAIL 1
#define EXIT_USAGE 2
#define EXIT_CRASH 3

/* ---- port I/O ---- */
static inline void outb(u16 port, u8 v) { __asm__ __volatile__("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ __volatile__("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ __volatile__("outl %0, %1" ::"a"(v), "Nd"(port)); }

/* Benchmark phase marker: the VMM snapshots its counters (KVM exits, CPU) on these writes, so
 * per-operation figures cover exactly the measured loop.  Harmless where no device listens. */
#define BENCH_MARKER_PORT 0x511
#define BENCH_MARK_START 1
#define BENCH_MARK_END 2
static inline void bench_mark(u32 phase) { outl(BENCH_MARKER_PORT, phase); }
static inline u8 inb(u16 port) { u8 v; __asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ __volatile__("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ __volatile__("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* ---- MMIO (natural width, volatile) ---- */
static inline u8 mmio_r8(uptr a) { return *(volatile u8 *)a; }
static inline u16 mmio_r16(uptr a) { return *(volatile u16 *)a; }
static inline u32 mmio_r32(uptr a) { return *(volatile u32 *)a; }
static inline void mmio_w8(uptr a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_w16(uptr a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_w32(uptr a, u32 v) { *(volatile u32 *)a = v; }

/* ---- CPU ---- */
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ __volatile__("lfence; rdtsc" : "=a"(lo), "=d"(hi)::"memory");
    return ((u64)hi << 32) | lo;
}
static inline void cpu_pause(void) { __asm__ __volatile__("pause" ::: "memory"); }
static inline void mfence(void) { __asm__ __volatile__("mfence" ::: "memory"); }
static inline void cli(void) { __asm__ __volatile__("cli" ::: "memory"); }
static inline void sti(void) { __asm__ __volatile__("sti" ::: "memory"); }
/* sti;hlt: the STI shadow makes the pair atomic w.r.t. interrupts */
static inline void sti_hlt(void) { __asm__ __volatile__("sti; hlt" ::: "memory"); }
static inline u64 raw_rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ __volatile__("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline void raw_wrmsr(u32 msr, u64 v)
{
    __asm__ __volatile__("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ __volatile__("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* ---- lib.c ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);

void serial_init(void);
void serial_putc(char c);
void serial_write(const char *s, size_t n);
typedef __builtin_va_list va_list;
#define va_start __builtin_va_start
#define va_end __builtin_va_end
#define va_arg __builtin_va_arg
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

noreturn void gk_exit(u32 status);
noreturn void panic(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

void sort_u64(u64 *a, u64 n);
u64 percentile_sorted(const u64 *a, u64 n, u32 pct_x10);

/* JSON line builder (one line, printed by json_end) */
void json_begin(const char *app);
void json_str(const char *key, const char *val);
void json_u64(const char *key, u64 val);
void json_s64(const char *key, s64 val);
void json_hex(const char *key, u64 val);
void json_raw(const char *key, const char *raw);
void json_end(void);

/* ---- platform (main.c) ---- */
extern u64 tsc_khz;
u64 tsc_to_ns(u64 cycles);
u64 ns_to_tsc(u64 ns);
void delay_us(u64 us);

/* RAM (from the PVH memory map) and a bump allocator */
void *heap_alloc(u64 size, u64 align);   /* zeroed, panics when exhausted */
u64 heap_free_bytes(void);
u64 ram_top(void);                        /* highest RAM end address */
bool addr_is_ram(u64 addr, u64 len);

/* command line arguments */
struct arg {
    const char *key;
    const char *val;
};
extern const char *app_name;
bool arg_present(const char *key);
const char *arg_str(const char *key, const char *def);
u64 arg_u64(const char *key, u64 def);       /* decimal / 0x hex, k/m/g suffix */
u64 arg_hex(const char *key, u64 def);       /* hex, 0x optional */
void args_allow(const char *const *keys);    /* exit 2 on unknown keys */
noreturn void usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- CPU tables, ring-0 services, interrupts, LAPIC (intr.c) ---- */
#define SYS_RDMSR 2
#define SYS_WRMSR 3
#define SYS_FLUSH_TLB 4
#define SYS_HALT 5
void cpu_tables_init(void);  /* ring 0: TSS, TR, IDTR */
void idt_init(void);         /* fill the IDT (any ring) */
bool in_ring3(void);
u64 rdmsr(u32 msr);          /* from ring 3 through int $0x80 */
void wrmsr(u32 msr, u64 v);
noreturn void halt_forever(void);
/* every interrupt counts in irq_counts[vector] and sets irq_flag = 1 */
extern volatile u64 irq_counts[256];
extern volatile u32 irq_flag;
/* sleep (sti;hlt) unless *flag != 0; race-free: clear the flag, re-check the
 * condition, then call this */
void wait_for_irq(volatile u32 *flag);
void lapic_init(void);
/* route IOAPIC input `gsi` (a PCI INTx line) to `vector` on this CPU, level-triggered; `ack` runs in the
 * handler before the EOI and must clear the device's condition (e.g. read its ISR) */
void ioapic_route_level(u32 gsi, u8 vector, void (*ack)(void));
u32 lapic_id(void);
bool lapic_is_x2apic(void);
void lapic_eoi(void);
void lapic_timer_oneshot_ns(u64 ns);
void lapic_timer_periodic_ns(u64 ns);
void lapic_timer_stop(void);
#define timer_ticks (irq_counts[VEC_TIMER])
#define VEC_TIMER 0x20
#define VEC_SPURIOUS 0xFF
void paging_set_wb_4k(u64 addr);  /* make one 4 KiB page cacheable (splits its 2 MiB page) */

/* ---- apps ---- */
void app_doorbell(void);
void app_idle(void);
void app_blk(void);
void app_nvme(void);
void app_net(void);
void app_selftest(void);
void app_cost(void);

#endif
