/* guestkit: PVH start info, memory map, heap, command line, TSC, dispatch */
#include "gk.h"

#define HVM_START_MAGIC 0x336ec578

struct hvm_start_info {
    u32 magic;
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;
    u32 memmap_entries;
    u32 reserved;
};

struct hvm_memmap_table_entry {
    u64 addr;
    u64 size;
    u32 type;
    u32 reserved;
};

#define MAX_MEMMAP 64
#define MAX_ARGS 48
#define CMDLINE_MAX 1024
#define MAP_LIMIT 0x100000000ULL /* identity map covers the first 4 GiB */

extern char __image_start[], __image_end[];

static struct hvm_memmap_table_entry memmap[MAX_MEMMAP];
static u32 memmap_n;
static char cmdline[CMDLINE_MAX];
static struct arg args[MAX_ARGS];
static bool arg_used[MAX_ARGS];
static u32 nargs;
const char *app_name;
static u64 heap_cur, heap_end;
u64 tsc_khz;
static const char *tsc_source = "pit";

/* ---- RAM ---- */
u64 ram_top(void)
{
    u64 top = 0;
    for (u32 i = 0; i < memmap_n; i++)
        if (memmap[i].type == 1 && memmap[i].addr + memmap[i].size > top)
            top = memmap[i].addr + memmap[i].size;
    return top;
}

bool addr_is_ram(u64 addr, u64 len)
{
    for (u32 i = 0; i < memmap_n; i++)
        if (memmap[i].type == 1 && addr >= memmap[i].addr &&
            addr + len <= memmap[i].addr + memmap[i].size)
            return true;
    return false;
}

static void heap_setup(void)
{
    u64 start = ALIGN_UP((u64)(uptr)__image_end, 4096);
    heap_cur = start;
    heap_end = 0;
    for (u32 i = 0; i < memmap_n; i++) {
        u64 a = memmap[i].addr, e = memmap[i].addr + memmap[i].size;
        if (memmap[i].type == 1 && start >= a && start < e)
            heap_end = e;
    }
    if (!heap_end) {
        /* No usable memory map: assume 32 MiB above the image. */
        printf("guestkit: warning: no RAM entry covers the image; assuming 32 MiB\n");
        heap_end = start + (32ULL << 20);
    }
    if (heap_end > MAP_LIMIT)
        heap_end = MAP_LIMIT;
}

void *heap_alloc(u64 size, u64 align)
{
    if (align < 16)
        align = 16;
    u64 p = ALIGN_UP(heap_cur, align);
    if (p + size > heap_end || p + size < p)
        panic("out of memory: need %llu bytes, %llu free", size, heap_free_bytes());
    heap_cur = p + size;
    memset((void *)(uptr)p, 0, size);
    return (void *)(uptr)p;
}

u64 heap_free_bytes(void)
{
    return heap_end > heap_cur ? heap_end - heap_cur : 0;
}

/* ---- command line ---- */
static void usage_json(const char *msg)
{
    json_begin(app_name ? app_name : "guestkit");
    json_str("error", msg);
    json_end();
}

noreturn void usage_error(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    printf("guestkit: error: %s\n", buf);
    usage_json(buf);
    gk_exit(EXIT_USAGE);
}

static void parse_cmdline(void)
{
    char *p = cmdline;
    nargs = 0;
    app_name = NULL;
    while (*p) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
            *p++ = 0;
        if (!*p)
            break;
        char *word = p;
        while (*p && *p != ' ' && *p != '\t' && *p != '\n' && *p != '\r')
            p++;
        if (*p)
            *p++ = 0;
        if (!app_name) {
            app_name = word;
            continue;
        }
        if (nargs >= MAX_ARGS)
            usage_error("too many arguments");
        char *eq = word;
        while (*eq && *eq != '=')
            eq++;
        if (*eq) {
            *eq = 0;
            args[nargs].val = eq + 1;
        } else {
            args[nargs].val = "1"; /* bare flag */
        }
        args[nargs].key = word;
        nargs++;
    }
}

static int arg_find(const char *key)
{
    for (int i = (int)nargs - 1; i >= 0; i--)
        if (!strcmp(args[i].key, key))
            return i;
    return -1;
}

bool arg_present(const char *key) { return arg_find(key) >= 0; }

const char *arg_str(const char *key, const char *def)
{
    int i = arg_find(key);
    return i < 0 ? def : args[i].val;
}

static bool parse_num(const char *s, u64 *out, bool hex_default)
{
    u64 v = 0;
    unsigned base = hex_default ? 16 : 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    if (!*s)
        return false;
    int ndig = 0;
    for (; *s; s++) {
        unsigned d;
        char c = *s;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (base == 16 && c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (base == 16 && c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            break;
        if (v > (~0ULL - d) / base)
            return false;
        v = v * base + d;
        ndig++;
    }
    if (!ndig)
        return false;
    if (*s && base == 10) {
        u64 mul = 0;
        switch (*s) {
        case 'k': case 'K': mul = 1ULL << 10; break;
        case 'm': case 'M': mul = 1ULL << 20; break;
        case 'g': case 'G': mul = 1ULL << 30; break;
        default: return false;
        }
        if (s[1])
            return false;
        if (v && mul > ~0ULL / v)
            return false;
        v *= mul;
    } else if (*s) {
        return false;
    }
    *out = v;
    return true;
}

u64 arg_u64(const char *key, u64 def)
{
    int i = arg_find(key);
    u64 v;
    if (i < 0)
        return def;
    if (!parse_num(args[i].val, &v, false))
        usage_error("bad number for %s: '%s'", key, args[i].val);
    return v;
}

u64 arg_hex(const char *key, u64 def)
{
    int i = arg_find(key);
    u64 v;
    if (i < 0)
        return def;
    if (!parse_num(args[i].val, &v, true))
        usage_error("bad hex number for %s: '%s'", key, args[i].val);
    return v;
}

static const char *const common_keys[] = {"tsc_khz", "ring", "x2apic", NULL};

void args_allow(const char *const *keys)
{
    for (u32 i = 0; i < nargs; i++) {
        bool ok = false;
        for (const char *const *k = keys; k && *k && !ok; k++)
            ok = !strcmp(*k, args[i].key);
        for (const char *const *k = common_keys; *k && !ok; k++)
            ok = !strcmp(*k, args[i].key);
        if (!ok)
            usage_error("unknown key '%s' for app '%s'", args[i].key, app_name);
        arg_used[i] = true;
    }
}

/* ---- TSC ---- */
u64 tsc_to_ns(u64 cycles)
{
    /* split to avoid overflow for very long intervals */
    u64 s = cycles / tsc_khz;
    u64 r = cycles % tsc_khz;
    return s * 1000000ULL + r * 1000000ULL / tsc_khz;
}

u64 ns_to_tsc(u64 ns)
{
    return ns / 1000000ULL * tsc_khz + (ns % 1000000ULL) * tsc_khz / 1000000ULL;
}

void delay_us(u64 us)
{
    u64 end = rdtsc() + ns_to_tsc(us * 1000);
    while (rdtsc() < end)
        cpu_pause();
}

/* PIT channel 2, gated by port 0x61, mode 0, ~10 ms.  The PIT starts counting
 * when the count's high byte is written and raises OUT2 (port 0x61 bit 5) at
 * terminal count; both edges are bracketed by TSC reads, so a preempted vCPU
 * shows up as a large bracket.  Returns kHz (midpoint estimate) or 0, and the
 * uncertainty in parts per million through *ppm. */
static u64 pit_calibrate_once(u64 *ppm)
{
    const u32 ms = 10;
    const u32 latch = 1193182 * ms / 1000; /* 11931 ticks = 9.999 ms */
    u8 p61 = inb(0x61);
    outb(0x61, (p61 & ~0x02) | 0x01); /* gate on, speaker off */
    outb(0x43, 0xb0);                 /* ch2, lo/hi, mode 0, binary */
    outb(0x42, latch & 0xff);
    u64 s0 = rdtsc();
    outb(0x42, latch >> 8); /* counting starts here */
    u64 s1 = rdtsc();
    u64 prev = s1, now = s1;
    u64 polls = 0;
    for (;;) {
        u8 v = inb(0x61);
        now = rdtsc();
        if (v & 0x20)
            break;
        prev = now;
        if (++polls > 20000000)
            return 0;
    }
    outb(0x61, p61);
    if (polls < 2) /* OUT2 high at once: no PIT */
        return 0;
    /* true interval within [prev - s1, now - s0] */
    u64 lo = prev - s1, hi = now - s0;
    u64 mid = (lo + hi) / 2;
    /* latch ticks at 1193182 Hz -> interval_ns = latch * 1e9 / 1193182 */
    u64 interval_ns = (u64)latch * 1000000000ULL / 1193182ULL;
    *ppm = mid ? (hi - lo) * 1000000ULL / mid : ~0ULL;
    return mid * 1000000ULL / interval_ns;
}

static u64 pit_calibrate_tsc(void)
{
    u64 best = 0, best_ppm = ~0ULL;
    for (int i = 0; i < 5; i++) {
        u64 ppm = ~0ULL;
        u64 khz = pit_calibrate_once(&ppm);
        if (!khz)
            return best;
        if (ppm < best_ppm) {
            best = khz;
            best_ppm = ppm;
        }
        if (best_ppm <= 2000) /* within 0.2 %: good enough */
            break;
    }
    return best;
}

static u64 cpuid_tsc_khz(void)
{
    u32 a, b, c, d;
    cpuid(0, 0, &a, &b, &c, &d);
    u32 maxleaf = a;
    cpuid(1, 0, &a, &b, &c, &d);
    if (c & (1u << 31)) { /* hypervisor: timing leaf 0x40000010 (KVM/VMware) */
        cpuid(0x40000000, 0, &a, &b, &c, &d);
        if (a >= 0x40000010) {
            cpuid(0x40000010, 0, &a, &b, &c, &d);
            if (a)
                return a;
        }
    }
    if (maxleaf >= 0x15) {
        cpuid(0x15, 0, &a, &b, &c, &d);
        if (a && b && c)
            return (u64)c * b / a / 1000;
    }
    return 0;
}

/* KVM pvclock: the hypervisor publishes tsc_to_system_mul/tsc_shift, i.e. the
 * TSC rate it uses, in a page we register through an MSR. */
struct pvclock_vcpu_time_info {
    u32 version;
    u32 pad0;
    u64 tsc_timestamp;
    u64 system_time;
    u32 tsc_to_system_mul;
    s8 tsc_shift;
    u8 flags;
    u8 pad[2];
} __attribute__((packed));

static struct pvclock_vcpu_time_info pvclock __attribute__((aligned(64)));

static u64 kvmclock_tsc_khz(void)
{
    u32 a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    if (!(c & (1u << 31)))
        return 0;
    cpuid(0x40000000, 0, &a, &b, &c, &d);
    if (b != 0x4b4d564b || c != 0x564b4d56 || d != 0x4d) /* "KVMKVMKVM\0\0\0" */
        return 0;
    cpuid(0x40000001, 0, &a, &b, &c, &d);
    u32 msr = (a & (1u << 3)) ? 0x4b564d01 : (a & 1u) ? 0x12 : 0;
    if (!msr)
        return 0;
    wrmsr(msr, (u64)(uptr)&pvclock | 1);
    u32 mul = *(volatile u32 *)&pvclock.tsc_to_system_mul;
    s8 shift = *(volatile s8 *)&pvclock.tsc_shift;
    wrmsr(msr, 0);
    if (!mul)
        return 0;
    u64 khz = (1000000ULL << 32) / mul;
    return shift < 0 ? khz << -shift : khz >> shift;
}

static void tsc_init(void)
{
    if (arg_present("tsc_khz")) {
        tsc_khz = arg_u64("tsc_khz", 0);
        tsc_source = "cmdline";
        if (!tsc_khz)
            usage_error("tsc_khz must be > 0");
        return;
    }
    tsc_khz = pit_calibrate_tsc();
    if (tsc_khz < 10000) { /* < 10 MHz: PIT missing or bogus */
        tsc_khz = cpuid_tsc_khz();
        tsc_source = "cpuid";
    }
    if (!tsc_khz) {
        tsc_khz = kvmclock_tsc_khz();
        tsc_source = "kvmclock";
    }
    if (!tsc_khz)
        panic("cannot determine the TSC frequency (no PIT, no CPUID/kvmclock rate); pass tsc_khz=");
}

/* ---- info app: platform facts ---- */
static void app_info(void)
{
    static const char *const keys[] = {NULL};
    args_allow(keys);
    u32 a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    printf("guestkit: memmap:\n");
    for (u32 i = 0; i < memmap_n; i++)
        printf("  %016llx-%016llx type %u\n", memmap[i].addr,
               memmap[i].addr + memmap[i].size, memmap[i].type);
    lapic_init();
    json_begin("info");
    json_u64("tsc_khz", tsc_khz);
    json_str("tsc_source", tsc_source);
    json_u64("ram_top", ram_top());
    json_u64("memmap_entries", memmap_n);
    json_u64("heap_free", heap_free_bytes());
    json_u64("apic_id", lapic_id());
    json_u64("ring", in_ring3() ? 3 : 0);
    json_u64("x2apic", lapic_is_x2apic());
    json_hex("cpuid1_ecx", c);
    json_hex("cpuid1_edx", d);
    json_end();
    gk_exit(EXIT_OK);
}

struct app {
    const char *name;
    void (*fn)(void);
};

static const struct app apps[] = {
    {"doorbell", app_doorbell},
    {"idle", app_idle},
    {"blk", app_blk},
    {"nvme", app_nvme},
    {"net", app_net},
    {"info", app_info},
    {"selftest", app_selftest},
    {"cost", app_cost},
};

static u32 start_info_pa;
extern char boot_stack_top[];
void enter_user(void (*fn)(void), void *stack_top);
static void user_main(void);

/* ring 0: CPU tables, then everything else runs in ring 3 (unless the command
 * line says ring=0, for comparisons).  Kept tiny: ring-0 code may be emulated. */
void kmain(u32 si_pa)
{
    start_info_pa = si_pa;
    /* mask the 8259s: firmware maps them onto exception vectors (IRQ0 -> 8) and
     * ring 3 runs with interrupts enabled */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    cpu_tables_init();
    const struct hvm_start_info *si = (const void *)(uptr)si_pa;
    const char *c = si && si->magic == HVM_START_MAGIC ? (const char *)(uptr)si->cmdline_paddr : NULL;
    for (u32 i = 0; c && c[i] && i < CMDLINE_MAX; i++)
        if (c[i] == 'r' && (i == 0 || c[i - 1] == ' ') && !strncmp(c + i, "ring=0", 6) &&
            (c[i + 6] == 0 || c[i + 6] == ' '))
            user_main();
    enter_user(user_main, boot_stack_top);
}

static void user_main(void)
{
    const struct hvm_start_info *si = (const void *)(uptr)start_info_pa;
    idt_init();
    serial_init();
    serial_write("\n", 1); /* start on a fresh line after firmware output */
    if (!si || si->magic != HVM_START_MAGIC) {
        printf("guestkit: bad PVH start info at %#x\n", start_info_pa);
        gk_exit(EXIT_CRASH);
    }
    if (si->cmdline_paddr) {
        const char *src = (const char *)(uptr)si->cmdline_paddr;
        u32 i;
        for (i = 0; i < CMDLINE_MAX - 1 && src[i]; i++)
            cmdline[i] = src[i];
        cmdline[i] = 0;
    }
    if (si->version >= 1 && si->memmap_paddr) {
        const struct hvm_memmap_table_entry *e = (const void *)(uptr)si->memmap_paddr;
        memmap_n = MIN(si->memmap_entries, MAX_MEMMAP);
        for (u32 i = 0; i < memmap_n; i++)
            memmap[i] = e[i];
    }
    heap_setup();
    parse_cmdline();
    if (!app_name)
        usage_error("empty command line; usage: <app> [key=value...]; apps: doorbell idle blk nvme net info selftest cost");
    const struct app *app = NULL;
    for (u32 i = 0; i < ARRAY_SIZE(apps); i++)
        if (!strcmp(apps[i].name, app_name))
            app = &apps[i];
    if (!app)
        usage_error("unknown app '%s' (apps: doorbell idle blk nvme net info selftest cost)", app_name);
    tsc_init();
    app->fn();
    gk_exit(EXIT_OK);
}
