/* The host's cost of 64-byte frames through a TAP fd (with the 12-byte vnet header), per frame, with no VM:
 * what a virtio-net device thread cannot go below.  Built and run by scripts/net_tap_io_floor.py.
 *
 *   tap_io_floor FD MODE N B PEERMAC(12 hex digits)
 *   tx     B raw frames (EtherType 0x88B5, dropped by the host stack) with one write(2) each
 *   txu    the same through io_uring: B IORING_OP_WRITE per io_uring_enter (a TAP takes one frame per write)
 *   echo   B ICMP echo requests (the host kernel answers inside the write), then read(2) the B replies
 *   echou  the same through io_uring: B writes per enter, then the reads, B per enter
 * Prints wall and process CPU ns per frame (round trip for echo; for echo also the CPU of each phase). */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <unistd.h>
#include <errno.h>
#include <time.h>
#include <sys/syscall.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <linux/io_uring.h>

static uint64_t ns(clockid_t c) { struct timespec t; clock_gettime(c, &t); return t.tv_sec * 1000000000ull + t.tv_nsec; }
static uint8_t peer[6], me[6] = {0x52,0x54,0,0xc0,0xff,0xee};
static uint16_t csum(const uint8_t *p, int n) { uint32_t s = 0; for (int i = 0; i + 1 < n; i += 2) s += (p[i] << 8) | p[i+1]; if (n & 1) s += p[n-1] << 8; while (s >> 16) s = (s & 0xffff) + (s >> 16); return ~s; }
static int mkframe(uint8_t *f, int echo, int seq) {
    memset(f, 0, 12); uint8_t *e = f + 12;
    memcpy(e, peer, 6); memcpy(e + 6, me, 6);
    if (!echo) { e[12] = 0x88; e[13] = 0xB5; for (int i = 14; i < 64; i++) e[i] = i; return 12 + 64; }
    e[12] = 8; e[13] = 0; uint8_t *ip = e + 14; memset(ip, 0, 50);
    ip[0] = 0x45; ip[3] = 50; ip[6] = 0x40; ip[8] = 64; ip[9] = 1;
    ip[12] = 10; ip[15] = 2; ip[16] = 10; ip[19] = 1;
    uint16_t c = csum(ip, 20); ip[10] = c >> 8; ip[11] = c;
    uint8_t *ic = ip + 20; ic[0] = 8; ic[4] = 0x47; ic[5] = 0x58; ic[6] = seq >> 8; ic[7] = seq;
    c = csum(ic, 30); ic[2] = c >> 8; ic[3] = c;
    return 12 + 64;
}
struct ring { int fd; unsigned *sq_tail, *sq_head, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask; struct io_uring_sqe *sqes; struct io_uring_cqe *cqes; };
static int ring_init(struct ring *r, unsigned entries) {
    struct io_uring_params p; memset(&p, 0, sizeof p);
    r->fd = syscall(__NR_io_uring_setup, entries, &p); if (r->fd < 0) { perror("io_uring_setup"); return -1; }
    size_t sqsz = p.sq_off.array + p.sq_entries * 4, cqsz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    uint8_t *sq = mmap(0, sqsz, PROT_READ|PROT_WRITE, MAP_SHARED|MAP_POPULATE, r->fd, IORING_OFF_SQ_RING);
    uint8_t *cq = (p.features & IORING_FEAT_SINGLE_MMAP) ? sq : mmap(0, cqsz, PROT_READ|PROT_WRITE, MAP_SHARED|MAP_POPULATE, r->fd, IORING_OFF_CQ_RING);
    if (p.features & IORING_FEAT_SINGLE_MMAP && cqsz > sqsz) { munmap(sq, sqsz); sq = cq = mmap(0, cqsz, PROT_READ|PROT_WRITE, MAP_SHARED|MAP_POPULATE, r->fd, IORING_OFF_SQ_RING); }
    r->sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ|PROT_WRITE, MAP_SHARED|MAP_POPULATE, r->fd, IORING_OFF_SQES);
    r->sq_tail = (void*)(sq + p.sq_off.tail); r->sq_head = (void*)(sq + p.sq_off.head); r->sq_mask = (void*)(sq + p.sq_off.ring_mask); r->sq_array = (void*)(sq + p.sq_off.array);
    r->cq_head = (void*)(cq + p.cq_off.head); r->cq_tail = (void*)(cq + p.cq_off.tail); r->cq_mask = (void*)(cq + p.cq_off.ring_mask); r->cqes = (void*)(cq + p.cq_off.cqes);
    return 0;
}
static void sqe_rw(struct ring *r, int op, int fd, void *buf, unsigned len, uint64_t ud) {
    unsigned t = *r->sq_tail, i = t & *r->sq_mask; struct io_uring_sqe *s = &r->sqes[i]; memset(s, 0, sizeof *s);
    s->opcode = op; s->fd = fd; s->addr = (uint64_t)buf; s->len = len; s->off = -1; s->user_data = ud;
    r->sq_array[i] = i; __atomic_store_n(r->sq_tail, t + 1, __ATOMIC_RELEASE);
}
static int enter(struct ring *r, unsigned sub, unsigned wait) { return syscall(__NR_io_uring_enter, r->fd, sub, wait, wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0); }
static int reap(struct ring *r, int *bad, int *eagain) { int n = 0; unsigned h = *r->cq_head; while (h != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) { int res = r->cqes[h & *r->cq_mask].res; if (res == -EAGAIN) (*eagain)++; else if (res < 0) (*bad)++; h++; n++; } __atomic_store_n(r->cq_head, h, __ATOMIC_RELEASE); return n; }

int main(int argc, char **argv) {
    int fd = atoi(argv[1]); const char *mode = argv[2]; long n = atol(argv[3]); int B = atoi(argv[4]);
    for (int i = 0; i < 6; i++) sscanf(argv[5] + 2 * i, "%2hhx", &peer[i]);
    static uint8_t fr[1024][128], rb[1024][2048];
    int echo = strstr(mode, "echo") != NULL;
    for (int i = 0; i < B; i++) mkframe(fr[i], echo, i);
    struct ring r; if (mode[strlen(mode)-1] == 'u' && ring_init(&r, 2 * B) < 0) return 1;
    long done = 0, bad = 0, eag = 0, reads = 0; int badi = 0, eagi = 0;
    uint64_t w0 = ns(CLOCK_MONOTONIC), c0 = ns(CLOCK_PROCESS_CPUTIME_ID), tw = 0, tr = 0;
    while (done < n) {
        if (!strcmp(mode, "tx")) { for (int i = 0; i < B; i++) if (write(fd, fr[i], 76) < 0) { if (errno == EAGAIN) eag++; else bad++; } }
        else if (!strcmp(mode, "txu")) { for (int i = 0; i < B; i++) sqe_rw(&r, IORING_OP_WRITE, fd, fr[i], 76, i); enter(&r, B, B); reap(&r, &badi, &eagi); }
        else if (!strcmp(mode, "echo")) {
            uint64_t a = ns(CLOCK_THREAD_CPUTIME_ID);
            for (int i = 0; i < B; i++) if (write(fd, fr[i], 76) < 0) bad++;
            uint64_t b = ns(CLOCK_THREAD_CPUTIME_ID);
            int got = 0; while (got < B) { ssize_t k = read(fd, rb[got], 2048); reads++; if (k > 0) got++; else if (errno != EAGAIN) { bad++; break; } }
            tw += b - a; tr += ns(CLOCK_THREAD_CPUTIME_ID) - b;
        } else if (!strcmp(mode, "echou")) {
            for (int i = 0; i < B; i++) sqe_rw(&r, IORING_OP_WRITE, fd, fr[i], 76, i);
            enter(&r, B, B); reap(&r, &badi, &eagi);
            int got = 0; while (got < B) { int k = B - got; for (int i = 0; i < k; i++) sqe_rw(&r, IORING_OP_READ, fd, rb[got + i], 2048, i); enter(&r, k, k); int e0 = eagi; reap(&r, &badi, &eagi); got += k - (eagi - e0); reads += k; }
        }
        done += B;
    }
    uint64_t w = ns(CLOCK_MONOTONIC) - w0, c = ns(CLOCK_PROCESS_CPUTIME_ID) - c0;
    printf("%-6s B=%-3d n=%ld: wall %.0f ns/frame, cpu %.0f ns/frame, errors %ld/%d eagain %ld/%d reads/frame %.2f", mode, B, n, (double)w / n, (double)c / n, bad, badi, eag, eagi, (double)reads / n);
    if (tw) printf(" (CPU: write+reply phase %.0f, read phase %.0f ns/frame)", (double)tw / n, (double)tr / n);
    printf("\n");
    return 0;
}
