/* guestkit: the storage workload shared by the "blk" (virtio-blk) and "nvme" apps.
 *
 * One definition of what a run does and reports, so that a blk row and an nvme row of a bench mean
 * the same thing: the options (rw, bs, qd, n, ms, seed, verify, expect, flush_every, fua), the request
 * generator, the data pattern (a function of the 512-byte disk sector and the seed, the same the host
 * checks in tests), the latency samples and the common fields of the JSON result.  The apps keep
 * what is theirs: building and posting a request, waiting, reaping, and their device's fields.
 *
 * Addresses inside the workload are in the device's *blocks* (wl.block_bytes: 512-byte sectors for
 * virtio-blk, the namespace's LBA size for NVMe); the pattern is always per 512-byte sector. */
#ifndef GK_WORKLOAD_H
#define GK_WORKLOAD_H
#include "gk.h"

#define WL_SECTOR 512
#define WL_MAX_QD 128
#define WL_MAX_BS (128u << 10)
#define WL_MAX_SAMPLES (1u << 20)

enum rw_mode { RW_READ, RW_WRITE, RW_RANDREAD, RW_RANDWRITE, RW_FILL, RW_VERIFY, RW_FLUSH,
               RW_IDENT, RW_MALFORMED, RW_DISCARD, RW_WRITE_ZEROES, RW_MODES };
extern const char *const rw_names[RW_MODES];

/* what the generator asks the app to do next */
enum io_op { IO_READ, IO_WRITE, IO_FLUSH, IO_DISCARD, IO_WRITE_ZEROES, IO_IDENT };
struct io_next {
    enum io_op op;
    u64 block;   /* first block (0 for FLUSH / IDENT) */
    u32 blocks;  /* length in blocks (0 for FLUSH / IDENT) */
};

struct workload {
    /* options (wl_parse) */
    enum rw_mode mode;
    u32 bs, qd, qd_requested;
    u64 seed, seed_mix, rng;
    bool verify_reads, expect_zero;
    u64 flush_every, n_ops, duration_cyc;
    /* the device's geometry (set by the app before wl_plan) */
    u32 block_bytes;   /* bytes per block */
    u32 chunk_blocks;  /* blocks per discard / write-zeroes request */
    u64 range_start, range_blocks;
    /* generator */
    u64 gen_issued, gen_pos, writes_since_flush;
    bool gen_done;
    /* results */
    u64 *samples, nsamples, max_samples, lat_sum, lat_min, lat_max;
    u64 ops_done, bytes_done, errors, verify_errors, flushes, completions;
    u32 first_error_status; /* 0xFFFFFFFF: none */
    u64 first_bad_sector;   /* ~0: none */
};
extern struct workload wl;

/* Parse the shared options into wl (usage_error on a bad value); returns the rw argument. */
const char *wl_parse(void);
/* Is the mode one that writes (or discards) data? */
bool wl_writes(void);
/* With wl.block_bytes, range_*, chunk_blocks set: the number of operations (one pass over the range
 * for fill / verify / discard / write_zeroes) and the latency sample buffer.  Returns an error
 * message for a range the mode cannot use, else NULL. */
const char *wl_plan(void);
/* The next operation, or false when the workload is over (n ops issued or ms elapsed since t_start,
 * TSC).  A write's data is put in buf (the pattern of its sectors). */
bool wl_next(struct io_next *io, u8 *buf, u64 t_start);
/* Account for a finished operation: status 0 is success (else errors / first_error_status);
 * bytes: the disk bytes it covered; a read's data (buf, at 512-byte sector `sector`) is checked
 * against the pattern when verifying; latency in TSC cycles. */
void wl_complete(enum io_op op, u32 status, u64 bytes, const u8 *buf, u64 sector, u64 latency_cyc);
void wl_stats_reset(void);
void wl_pattern_fill(u8 *buf, u64 sector, u32 nsec);
/* Sectors that do not hold the pattern (or zeroes with expect=zero); the first is remembered. */
u64 wl_pattern_check(const u8 *buf, u64 sector, u32 nsec);
/* The JSON fields every storage app reports (after json_begin), elapsed in TSC cycles. */
void wl_json(u64 elapsed_cyc);

#endif
