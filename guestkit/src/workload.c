/* guestkit: the storage workload shared by the blk and nvme apps (see workload.h). */
#include "workload.h"

#define GOLDEN 0x9E3779B97F4A7C15ULL

const char *const rw_names[RW_MODES] = {"read", "write", "randread", "randwrite", "fill", "verify", "flush",
                                        "ident", "malformed", "discard", "write_zeroes"};

struct workload wl = {.lat_min = ~0ULL, .first_error_status = 0xFFFFFFFF, .first_bad_sector = ~0ULL};

const char *wl_parse(void)
{
    const char *rw = arg_str("rw", "randread");
    int m = -1;
    for (u32 i = 0; i < RW_MODES; i++)
        if (!strcmp(rw, rw_names[i]))
            m = (int)i;
    if (m < 0)
        usage_error("bad rw '%s' (read|write|randread|randwrite|fill|verify|flush|ident|malformed|"
                    "discard|write_zeroes)", rw);
    wl.mode = (enum rw_mode)m;
    wl.bs = (u32)arg_u64("bs", 4096);
    if (!wl.bs || wl.bs % WL_SECTOR || wl.bs > WL_MAX_BS)
        usage_error("bs=%u must be a multiple of 512 up to 131072", wl.bs);
    u64 qd = arg_u64("qd", 1);
    if (qd < 1 || qd > WL_MAX_QD)
        usage_error("qd must be 1..%u", WL_MAX_QD);
    wl.qd = wl.qd_requested = (u32)qd;
    wl.seed = arg_u64("seed", 1);
    wl.seed_mix = wl.seed * GOLDEN;
    wl.rng = wl.seed ^ 0x2545F4914F6CDD1DULL;
    if (!wl.rng)
        wl.rng = 1; /* xorshift's one fixed point */
    wl.verify_reads = arg_u64("verify", 0) != 0 || wl.mode == RW_VERIFY;
    const char *expect = arg_str("expect", "pattern");
    if (strcmp(expect, "pattern") && strcmp(expect, "zero"))
        usage_error("expect must be pattern or zero");
    wl.expect_zero = !strcmp(expect, "zero");
    wl.flush_every = arg_u64("flush_every", 0);
    if (arg_u64("fua", 0))
        wl.flush_every = 1; /* no FUA in the drivers: a flush after each write gives its guarantee */
    u64 ms = arg_u64("ms", 0);
    wl.duration_cyc = ms ? ns_to_tsc(ms * 1000000ULL) : 0;
    return rw;
}

bool wl_writes(void)
{
    return wl.mode == RW_WRITE || wl.mode == RW_RANDWRITE || wl.mode == RW_FILL || wl.flush_every ||
           wl.mode == RW_DISCARD || wl.mode == RW_WRITE_ZEROES;
}

static bool one_pass(void)
{
    return wl.mode == RW_FILL || wl.mode == RW_VERIFY || wl.mode == RW_DISCARD || wl.mode == RW_WRITE_ZEROES;
}

const char *wl_plan(void)
{
    u64 per = wl.bs / wl.block_bytes;
    if ((wl.mode == RW_READ || wl.mode == RW_WRITE || wl.mode == RW_RANDREAD || wl.mode == RW_RANDWRITE) &&
        wl.range_blocks < per)
        return "size is smaller than bs";
    u64 ndef = 1000;
    if (wl.mode == RW_FILL || wl.mode == RW_VERIFY)
        ndef = (wl.range_blocks + per - 1) / per;
    else if (wl.mode == RW_DISCARD || wl.mode == RW_WRITE_ZEROES)
        ndef = (wl.range_blocks + wl.chunk_blocks - 1) / wl.chunk_blocks;
    else if (wl.mode == RW_FLUSH || wl.mode == RW_IDENT)
        ndef = 1;
    wl.n_ops = arg_u64("n", ndef);
    if (one_pass()) {
        wl.n_ops = ndef; /* exactly one pass over the range */
        wl.duration_cyc = 0;
    }
    wl.max_samples = wl.duration_cyc ? WL_MAX_SAMPLES
                                     : MIN(wl.n_ops + wl.n_ops / MAX(wl.flush_every, 1) + 2, (u64)WL_MAX_SAMPLES);
    wl.samples = heap_alloc(wl.max_samples * sizeof(u64), 64);
    return NULL;
}

static u64 xorshift(void)
{
    wl.rng ^= wl.rng << 13;
    wl.rng ^= wl.rng >> 7;
    wl.rng ^= wl.rng << 17;
    return wl.rng;
}

/* the next stretch of a one-pass mode: up to `most` blocks from where the last one ended */
static void next_stretch(struct io_next *io, u32 most)
{
    u64 left = wl.range_blocks - wl.gen_pos;
    io->blocks = left < most ? (u32)left : most;
    io->block = wl.range_start + wl.gen_pos;
    wl.gen_pos += io->blocks;
}

bool wl_next(struct io_next *io, u8 *buf, u64 t_start)
{
    if (wl.gen_done)
        return false;
    if (wl.flush_every && wl.writes_since_flush >= wl.flush_every) {
        wl.writes_since_flush = 0;
        *io = (struct io_next){IO_FLUSH, 0, 0}; /* not an operation of its own: gen_issued stays */
        return true;
    }
    if (wl.duration_cyc ? rdtsc() - t_start >= wl.duration_cyc : wl.gen_issued >= wl.n_ops) {
        wl.gen_done = true;
        return false;
    }
    u32 per = wl.bs / wl.block_bytes;
    switch (wl.mode) {
    case RW_FILL:
    case RW_VERIFY:
        next_stretch(io, per);
        io->op = wl.mode == RW_FILL ? IO_WRITE : IO_READ;
        break;
    case RW_DISCARD:
    case RW_WRITE_ZEROES:
        next_stretch(io, wl.chunk_blocks);
        io->op = wl.mode == RW_DISCARD ? IO_DISCARD : IO_WRITE_ZEROES;
        break;
    case RW_READ:
    case RW_WRITE:
        if (wl.gen_pos + per > wl.range_blocks)
            wl.gen_pos = 0;
        io->block = wl.range_start + wl.gen_pos;
        io->blocks = per;
        io->op = wl.mode == RW_WRITE ? IO_WRITE : IO_READ;
        wl.gen_pos += per;
        break;
    case RW_RANDREAD:
    case RW_RANDWRITE:
        io->block = wl.range_start + (xorshift() % (wl.range_blocks / per)) * per;
        io->blocks = per;
        io->op = wl.mode == RW_RANDWRITE ? IO_WRITE : IO_READ;
        break;
    case RW_FLUSH:
        *io = (struct io_next){IO_FLUSH, 0, 0};
        break;
    case RW_IDENT:
        *io = (struct io_next){IO_IDENT, 0, 0};
        break;
    default:
        return false;
    }
    wl.gen_issued++;
    u32 spb = wl.block_bytes / WL_SECTOR;
    if (io->op == IO_WRITE)
        wl_pattern_fill(buf, io->block * spb, io->blocks * spb);
    if (io->op == IO_WRITE || io->op == IO_DISCARD || io->op == IO_WRITE_ZEROES)
        wl.writes_since_flush++;
    return true;
}

void wl_complete(enum io_op op, u32 status, u64 bytes, const u8 *buf, u64 sector, u64 latency_cyc)
{
    wl.completions++;
    if (wl.nsamples < wl.max_samples)
        wl.samples[wl.nsamples++] = latency_cyc;
    wl.lat_sum += latency_cyc;
    wl.lat_min = MIN(wl.lat_min, latency_cyc);
    wl.lat_max = MAX(wl.lat_max, latency_cyc);
    if (status) {
        wl.errors++;
        if (wl.first_error_status == 0xFFFFFFFF)
            wl.first_error_status = status;
        return;
    }
    if (op == IO_FLUSH) {
        wl.flushes++;
        if (wl.mode == RW_FLUSH)
            wl.ops_done++;
        return;
    }
    if (op == IO_IDENT)
        return;
    wl.ops_done++;
    wl.bytes_done += bytes;
    if (op == IO_READ && wl.verify_reads)
        wl.verify_errors += wl_pattern_check(buf, sector, (u32)(bytes / WL_SECTOR));
}

void wl_stats_reset(void)
{
    wl.ops_done = wl.bytes_done = wl.completions = wl.flushes = 0;
    wl.nsamples = 0;
    wl.lat_sum = wl.lat_max = 0;
    wl.lat_min = ~0ULL;
}

/* word w of 512-byte sector s: (s << 6 | w) ^ seed * golden ratio (tests/ and the benches compute it too) */
void wl_pattern_fill(u8 *buf, u64 sector, u32 nsec)
{
    u64 *p = (u64 *)buf;
    for (u32 s = 0; s < nsec; s++)
        for (u32 w = 0; w < 64; w++)
            *p++ = (((sector + s) << 6) | w) ^ wl.seed_mix;
}

u64 wl_pattern_check(const u8 *buf, u64 sector, u32 nsec)
{
    const u64 *p = (const u64 *)buf;
    u64 bad = 0;
    for (u32 s = 0; s < nsec; s++, p += 64)
        for (u32 w = 0; w < 64; w++)
            if (p[w] != (wl.expect_zero ? 0 : ((((sector + s) << 6) | w) ^ wl.seed_mix))) {
                if (wl.first_bad_sector == ~0ULL)
                    wl.first_bad_sector = sector + s;
                bad++;
                break;
            }
    return bad;
}

void wl_json(u64 elapsed_cyc)
{
    u64 ens = tsc_to_ns(elapsed_cyc), n = wl.completions;
    sort_u64(wl.samples, wl.nsamples);
    json_str("rw", rw_names[wl.mode]);
    json_u64("bs", wl.bs);
    json_u64("qd", wl.qd);
    if (wl.qd_requested != wl.qd)
        json_u64("qd_requested", wl.qd_requested);
    json_u64("ops", wl.ops_done);
    json_u64("errors", wl.errors);
    json_u64("verify_errors", wl.verify_errors);
    json_u64("verify", wl.verify_reads);
    json_u64("bytes", wl.bytes_done);
    json_u64("elapsed_us", ens / 1000);
    json_u64("iops", ens ? wl.ops_done * 1000000000ULL / ens : 0);
    json_u64("kib_s", ens ? (wl.bytes_done >> 10) * 1000000000ULL / ens : 0);
    json_u64("p50_ns", tsc_to_ns(percentile_sorted(wl.samples, wl.nsamples, 500)));
    json_u64("p99_ns", tsc_to_ns(percentile_sorted(wl.samples, wl.nsamples, 990)));
    json_u64("mean_ns", n ? tsc_to_ns(wl.lat_sum) / n : 0);
    json_u64("min_ns", n ? tsc_to_ns(wl.lat_min) : 0);
    json_u64("max_ns", tsc_to_ns(wl.lat_max));
    json_u64("flushes", wl.flushes);
    json_u64("offset", wl.range_start * wl.block_bytes);
    json_u64("size", wl.range_blocks * wl.block_bytes);
    json_u64("seed", wl.seed);
    json_u64("tsc_khz", tsc_khz);
    if (wl.first_bad_sector != ~0ULL)
        json_u64("first_bad_sector", wl.first_bad_sector);
    if (wl.nsamples < n)
        json_u64("samples", wl.nsamples);
}
