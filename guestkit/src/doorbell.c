/* guestkit apps "doorbell" (register-write ping-pong over several I/O paths)
 * and "idle" (sleep with sti;hlt, woken by the LAPIC timer). */
#include "gk.h"

#define SHM_SHADOW 0x00
#define SHM_EVENT_IDX 0x40
#define SHM_ACK 0x80
#define SHM_STATUS 0x84

enum path { P_TRAP, P_IOEVENTFD, P_SHARED, P_POLL, P_ADAPTIVE };
static const char *const path_names[] = {"trap", "ioeventfd", "shared", "poll", "adaptive"};

#define DOORBELL_MAX_N (16ULL << 20)

void app_doorbell(void)
{
    static const char *const keys[] = {"path", "n", "warmup", "mmio", "shm", "timeout_ms",
                                       "max_timeouts", "shm_cache", NULL};
    args_allow(keys);
    const char *pname = arg_str("path", "trap");
    int path = -1;
    for (u32 i = 0; i < ARRAY_SIZE(path_names); i++)
        if (!strcmp(pname, path_names[i]))
            path = (int)i;
    if (path < 0)
        usage_error("bad path '%s' (trap|ioeventfd|shared|poll|adaptive)", pname);
    u64 n = arg_u64("n", 10000);
    u64 warmup = arg_u64("warmup", 100);
    u64 mmio = arg_hex("mmio", 0xd0000000);
    u64 shm = arg_hex("shm", 0xd0001000);
    u64 timeout_ms = arg_u64("timeout_ms", 2000);
    u64 max_timeouts = arg_u64("max_timeouts", 3);
    const char *cache = arg_str("shm_cache", "wb");
    if (mmio >= 0x100000000ULL || (mmio & 3))
        usage_error("mmio=%#llx must be 4-byte aligned and below 4 GiB", mmio);
    if (shm >= 0x100000000ULL || (shm & 0xfff))
        usage_error("shm=%#llx must be 4 KiB aligned and below 4 GiB", shm);
    if (strcmp(cache, "wb") && strcmp(cache, "uc"))
        usage_error("shm_cache must be wb or uc");
    if (n + warmup > 0xFFFFFFFFULL)
        usage_error("n + warmup must fit in u32");

    /* sample array from the heap; cap n if memory (or the hard limit) is short */
    u64 n_req = n;
    u64 cap = (heap_free_bytes() - 65536) / sizeof(u64);
    if (heap_free_bytes() < 65536)
        cap = 0;
    if (cap > DOORBELL_MAX_N)
        cap = DOORBELL_MAX_N;
    if (n > cap)
        n = cap;
    u64 *samples = heap_alloc(MAX(n, 1) * sizeof(u64), 64);

    if (!strcmp(cache, "wb"))
        paging_set_wb_4k(shm);

    volatile u32 *mreg = (volatile u32 *)(uptr)mmio;
    volatile u32 *shadow = (volatile u32 *)(uptr)(shm + SHM_SHADOW);
    volatile u32 *event_idx = (volatile u32 *)(uptr)(shm + SHM_EVENT_IDX);
    volatile u32 *ack = (volatile u32 *)(uptr)(shm + SHM_ACK);
    volatile u32 *status = (volatile u32 *)(uptr)(shm + SHM_STATUS);

    const u64 timeout_cyc = ns_to_tsc(timeout_ms * 1000000ULL);
    u64 errors = 0, timeouts = 0, doorbells = 0, nsamples = 0, ops = 0;
    u64 sum = 0, mn = ~0ULL, mx = 0;
    bool aborted = false;

    printf("guestkit: doorbell path=%s n=%llu warmup=%llu mmio=%#llx shm=%#llx\n",
           pname, n, warmup, mmio, shm);

    const u64 total = warmup + n;
    for (u64 i = 0; i < total; i++) {
        const u32 v = (u32)(i + 1);
        bool timed_out = false;
        if (i == warmup)
            bench_mark(BENCH_MARK_START);
        u64 t0 = rdtsc();
        switch (path) {
        case P_TRAP:
            *mreg = v;
            doorbells++;
            break;
        case P_IOEVENTFD:
            *shadow = v;
            *mreg = v;
            doorbells++;
            break;
        case P_SHARED:
        case P_POLL:
            *shadow = v;
            break;
        case P_ADAPTIVE: {
            *shadow = v;
            mfence();
            u32 e = *event_idx;
            if ((u32)(v - e - 1) < (u32)(v - (v - 1))) {
                *mreg = v;
                doorbells++;
            }
            break;
        }
        }
        /* wait for the device's answer */
        u32 spins = 0;
        while (*ack != v) {
            cpu_pause();
            if ((++spins & 63) == 0 && rdtsc() - t0 > timeout_cyc) {
                timed_out = true;
                break;
            }
        }
        u64 t1 = rdtsc();
        if (i >= warmup)
            ops++;
        if (timed_out) {
            timeouts++;
            if (max_timeouts && timeouts >= max_timeouts) {
                aborted = true;
                break;
            }
            continue;
        }
        if (*status != 0)
            errors++;
        if (i >= warmup) {
            u64 d = t1 - t0;
            samples[nsamples++] = d;
            sum += d;
            if (d < mn)
                mn = d;
            if (d > mx)
                mx = d;
        }
    }

    bench_mark(BENCH_MARK_END);
    sort_u64(samples, nsamples);
    json_begin("doorbell");
    json_str("path", pname);
    json_u64("ops", ops);
    json_u64("errors", errors);
    json_u64("timeouts", timeouts);
    json_u64("doorbells", doorbells);
    json_u64("tsc_khz", tsc_khz);
    json_u64("p50_ns", tsc_to_ns(percentile_sorted(samples, nsamples, 500)));
    json_u64("p99_ns", tsc_to_ns(percentile_sorted(samples, nsamples, 990)));
    json_u64("mean_ns", nsamples ? tsc_to_ns(sum) / nsamples : 0);
    json_u64("min_ns", nsamples ? tsc_to_ns(mn) : 0);
    json_u64("max_ns", tsc_to_ns(mx));
    json_u64("p90_ns", tsc_to_ns(percentile_sorted(samples, nsamples, 900)));
    json_u64("p999_ns", tsc_to_ns(percentile_sorted(samples, nsamples, 999)));
    json_u64("samples", nsamples);
    json_u64("warmup", warmup);
    if (n != n_req)
        json_u64("n_capped_from", n_req);
    if (aborted)
        json_u64("aborted", 1);
    json_end();
    gk_exit(errors == 0 && timeouts == 0 ? EXIT_OK : EXIT_FAIL);
}

void app_idle(void)
{
    static const char *const keys[] = {"ms", "tick_ms", NULL};
    args_allow(keys);
    u64 ms = arg_u64("ms", 1000);
    u64 tick_ms = arg_u64("tick_ms", 0);
    lapic_init();
    u64 wakeups = 0;
    u64 ticks0 = timer_ticks;
    u64 start = rdtsc();
    u64 end = start + ns_to_tsc(ms * 1000000ULL);
    if (tick_ms)
        lapic_timer_periodic_ns(tick_ms * 1000000ULL);
    bench_mark(BENCH_MARK_START); /* the VMM's CPU and exit counts per wake-up */
    for (;;) {
        irq_flag = 0; /* an interrupt after this point cancels the sleep */
        u64 now = rdtsc();
        if (now >= end)
            break;
        if (!tick_ms) {
            u64 rem = tsc_to_ns(end - now);
            lapic_timer_oneshot_ns(MIN(rem, 10000000000ULL));
        }
        wait_for_irq(&irq_flag); /* sti;hlt in ring 0 */
        wakeups++;
    }
    bench_mark(BENCH_MARK_END);
    lapic_timer_stop();
    u64 elapsed = rdtsc() - start;
    json_begin("idle");
    json_u64("ms", ms);
    json_u64("elapsed_us", tsc_to_ns(elapsed) / 1000);
    json_u64("wakeups", wakeups);
    json_u64("timer_irqs", timer_ticks - ticks0);
    json_u64("tsc_khz", tsc_khz);
    json_end();
    gk_exit(EXIT_OK);
}
