/* guestkit app "selftest": in-guest unit checks of the library code the other
 * apps rely on (sorting, percentiles, event-index rule, time conversion,
 * formatting).  Prints failures, then one JSON line. */
#include "virtio.h"

static u32 passed, failed;

#define CHECK(cond)                                                   \
    do {                                                              \
        if (cond) {                                                   \
            passed++;                                                 \
        } else {                                                      \
            failed++;                                                 \
            printf("guestkit: selftest FAILED line %d: %s\n", __LINE__, #cond); \
        }                                                             \
    } while (0)

static u64 rs = 88172645463325252ULL;
static u64 rnd(void)
{
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return rs;
}

static bool sorted_ok(const u64 *a, u64 n)
{
    for (u64 i = 1; i < n; i++)
        if (a[i - 1] > a[i])
            return false;
    return true;
}

/* doorbell's adaptive rule, on u32 */
static bool need_u32(u32 e, u32 v) { return (u32)(v - e - 1) < (u32)(v - (v - 1)); }

void app_selftest(void)
{
    static const char *const keys[] = {"crash", NULL};
    args_allow(keys);
    const char *crash = arg_str("crash", NULL);
    if (crash) { /* exercise the exception path (expect status 3 and a JSON error) */
        if (!strcmp(crash, "pf"))
            (void)*(volatile u32 *)0x4000000000ULL; /* beyond the 4 GiB identity map */
        else if (!strcmp(crash, "ud"))
            __asm__ __volatile__(".byte 0x0f, 0xff"); /* UD0 */
        else if (!strcmp(crash, "gp"))
            __asm__ __volatile__("mov %%cr0, %%rax" ::: "rax"); /* privileged in ring 3 */
        else
            usage_error("crash must be pf, ud or gp");
        panic("crash=%s did not fault", crash);
    }

    /* heapsort: random, duplicates, sorted, reversed, tiny */
    const u64 n = 50000;
    u64 *a = heap_alloc(n * sizeof(u64), 64);
    u64 sum0 = 0, sum1 = 0;
    for (u64 i = 0; i < n; i++)
        sum0 += a[i] = rnd() % 1000003;
    sort_u64(a, n);
    for (u64 i = 0; i < n; i++)
        sum1 += a[i];
    CHECK(sorted_ok(a, n) && sum0 == sum1);
    for (u64 i = 0; i < n; i++)
        a[i] = rnd() & 7;
    sort_u64(a, n);
    CHECK(sorted_ok(a, n));
    for (u64 i = 0; i < n; i++)
        a[i] = n - i;
    sort_u64(a, n);
    CHECK(sorted_ok(a, n) && a[0] == 1 && a[n - 1] == n);
    sort_u64(a, n);
    CHECK(sorted_ok(a, n));
    a[0] = 5;
    sort_u64(a, 0);
    sort_u64(a, 1);
    CHECK(a[0] == 5);
    a[0] = 9, a[1] = 3;
    sort_u64(a, 2);
    CHECK(a[0] == 3 && a[1] == 9);

    /* nearest-rank percentiles */
    for (u64 i = 0; i < 100; i++)
        a[i] = i + 1;
    CHECK(percentile_sorted(a, 100, 500) == 50);
    CHECK(percentile_sorted(a, 100, 990) == 99);
    CHECK(percentile_sorted(a, 100, 999) == 100);
    CHECK(percentile_sorted(a, 100, 1000) == 100);
    CHECK(percentile_sorted(a, 1, 990) == 1);
    CHECK(percentile_sorted(a, 0, 500) == 0);
    CHECK(percentile_sorted(a, 10, 500) == 5);

    /* vring_need_event (u16) and the doorbell rule (u32) */
    CHECK(vring_need_event(5, 6, 5));
    CHECK(!vring_need_event(6, 6, 5));
    CHECK(!vring_need_event(4, 6, 5));
    CHECK(vring_need_event(5, 8, 4));
    CHECK(vring_need_event(0xffff, 0, 0xffff));
    CHECK(!vring_need_event(0x7fff + 3, 5, 3));
    CHECK(need_u32(0, 1) && !need_u32(0, 2) && need_u32(41, 42) && !need_u32(42, 42));
    CHECK(need_u32(0xffffffffu, 0));

    /* TSC conversions */
    u64 khz = tsc_khz;
    tsc_khz = 2500000;
    CHECK(tsc_to_ns(2500) == 1000);
    CHECK(ns_to_tsc(1000) == 2500);
    CHECK(tsc_to_ns(2500000000ULL * 3600) == 3600ULL * 1000000000ULL);
    CHECK(tsc_to_ns(ns_to_tsc(123456000)) == 123456000);
    CHECK(tsc_to_ns(ns_to_tsc(123456789)) + 1 >= 123456789);
    tsc_khz = 3;
    CHECK(tsc_to_ns(3) == 1000000 && tsc_to_ns(~0ULL / 2) > 0);
    tsc_khz = khz;

    /* formatting */
    char b[128];
    snprintf(b, sizeof(b), "%d|%u|%05u|%x|%#x|%llu|%lld|%s|%c|%%", -42, 7u, 42u, 0xbeefu, 0x10u,
             18446744073709551615ULL, -9223372036854775807LL - 1, "ok", 'z');
    if (strcmp(b, "-42|7|00042|beef|0x10|18446744073709551615|-9223372036854775808|ok|z|%"))
        printf("guestkit: selftest got '%s'\n", b);
    CHECK(!strcmp(b, "-42|7|00042|beef|0x10|18446744073709551615|-9223372036854775808|ok|z|%"));
    CHECK(snprintf(b, 4, "%s", "abcdef") == 6 && !strcmp(b, "abc"));

    /* the disk pattern: host tests recompute this value */
    u64 pat = ((1000ULL << 6) | 7) ^ (3ULL * 0x9E3779B97F4A7C15ULL);

    json_begin("selftest");
    json_u64("passed", passed);
    json_u64("failed", failed);
    json_hex("pattern_s1000_w7_seed3", pat);
    json_u64("tsc_khz", tsc_khz);
    json_end();
    gk_exit(failed ? EXIT_FAIL : EXIT_OK);
}
