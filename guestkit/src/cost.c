/* guestkit app "cost": what guest primitives cost on this platform (a nested,
 * software KVM backend may emulate some of them).  Reports picoseconds per op. */
#include "gk.h"

static volatile u32 cell;

static u64 ps_per_op(u64 cycles, u64 n) { return n ? tsc_to_ns(cycles) * 1000 / n : 0; }

#define TIME_LOOP(n, body)                         \
    ({                                             \
        u64 _t0 = rdtsc();                         \
        for (u64 _i = 0; _i < (n); _i++) {         \
            body;                                  \
        }                                          \
        rdtsc() - _t0;                             \
    })

static inline u64 rdtsc_plain(void)
{
    u32 lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi)::"memory");
    return ((u64)hi << 32) | lo;
}

void app_cost(void)
{
    static const char *const keys[] = {"n", "io_n", "mark", NULL};
    args_allow(keys);
    /* mark=service|inb|lapic: that loop alone between the bench marks (port 0x511), so the VMM
     * reports its exits and vCPU CPU time per op (`run --stats`), not wall time */
    const char *mark = arg_str("mark", "");
    if (*mark && strcmp(mark, "service") && strcmp(mark, "inb") && strcmp(mark, "lapic"))
        usage_error("mark must be service, inb or lapic");
    u64 n = arg_u64("n", 100000);
    u64 io_n = arg_u64("io_n", 1000);
    u64 sink = 0;
    lapic_init();
    json_begin("cost");
    json_u64("ring", in_ring3() ? 3 : 0);
    json_u64("n", n);
    json_u64("loop_ps", ps_per_op(TIME_LOOP(n, barrier()), n));
    json_u64("load_ps", ps_per_op(TIME_LOOP(n, sink += cell), n));
    json_u64("pause_ps", ps_per_op(TIME_LOOP(n, cpu_pause()), n));
    json_u64("rdtsc_ps", ps_per_op(TIME_LOOP(n, sink += rdtsc_plain()), n));
    json_u64("lfence_rdtsc_ps", ps_per_op(TIME_LOOP(n, sink += rdtsc()), n));
    json_u64("mfence_ps", ps_per_op(TIME_LOOP(n, mfence()), n));
    json_u64("store_mfence_load_ps", ps_per_op(TIME_LOOP(n, { cell = (u32)_i; mfence(); sink += cell; }), n));
    if (!in_ring3()) /* IOPL may be 0 in ring 3 (software-nested KVM ignores it) */
        json_u64("cli_sti_ps", ps_per_op(TIME_LOOP(io_n, { cli(); sti(); }), io_n));
    irq_flag = 1;
#define MARKED(name, t) ({ bool _m = !strcmp(mark, name); if (_m) bench_mark(BENCH_MARK_START); \
                           u64 _c = (t); if (_m) bench_mark(BENCH_MARK_END); _c; })
    json_u64("service_ps", ps_per_op(MARKED("service", TIME_LOOP(io_n, wait_for_irq(&irq_flag))), io_n));
    json_u64("inb_0x61_ps", ps_per_op(MARKED("inb", TIME_LOOP(io_n, sink += inb(0x61))), io_n));
    json_u64("lapic_id_read_ps", ps_per_op(MARKED("lapic", TIME_LOOP(io_n, sink += lapic_id())), io_n));
    json_u64("tsc_khz", tsc_khz);
    json_u64("sink", sink & 1);
    json_end();
    gk_exit(EXIT_OK);
}
