/* guestkit: string functions, serial console, formatting, sorting, JSON */
#include "gk.h"

void *memset(void *d, int c, size_t n)
{
    void *r = d;
    __asm__ __volatile__("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return r;
}

void *memcpy(void *d, const void *s, size_t n)
{
    void *r = d;
    __asm__ __volatile__("rep movsb" : "+D"(d), "+S"(s), "+c"(n)::"memory");
    return r;
}

void *memmove(void *d, const void *s, size_t n)
{
    u8 *dp = d;
    const u8 *sp = s;
    if (dp <= sp || dp >= sp + n)
        return memcpy(d, s, n);
    while (n--)
        dp[n] = sp[n];
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] - y[i];
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return (u8)*a - (u8)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (u8)*a - (u8)*b;
        if (!*a)
            return 0;
    }
    return 0;
}

/* ---- 16550 COM1, polled ---- */
#define COM1 0x3f8
#define LSR_THRE 0x20

void serial_init(void)
{
    /* Firmware (SeaBIOS) or the VMM leaves the UART usable; touch nothing
     * to keep port exits minimal. */
}

/* A UART that never reports THRE (not emulated, or a broken model) would cost a
 * VM exit per poll forever: after one long wait, stop waiting altogether. */
static bool uart_nowait;

void serial_putc(char c)
{
    u32 spins = 0;
    while (!uart_nowait && !(inb(COM1 + 5) & LSR_THRE)) {
        cpu_pause();
        if (++spins > 20000)
            uart_nowait = true;
    }
    outb(COM1, (u8)c);
}

void serial_write(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\n')
            serial_putc('\r');
        serial_putc(s[i]);
    }
}

/* ---- formatting: %d %i %u %x %X %s %c %p %%, with l/ll/z, width, 0 ---- */
struct outbuf {
    char *buf;
    size_t size, len;
};

static void ob_putc(struct outbuf *o, char c)
{
    if (o->len + 1 < o->size)
        o->buf[o->len] = c;
    o->len++;
}

static void ob_num(struct outbuf *o, u64 v, unsigned base, bool neg, int width, char pad, bool upper)
{
    char tmp[24];
    int n = 0;
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    do {
        tmp[n++] = digits[v % base];
        v /= base;
    } while (v);
    if (neg)
        width--;
    if (neg && pad == '0')
        ob_putc(o, '-');
    for (int i = n; i < width; i++)
        ob_putc(o, pad);
    if (neg && pad != '0')
        ob_putc(o, '-');
    while (n)
        ob_putc(o, tmp[--n]);
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct outbuf o = {buf, size, 0};
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            ob_putc(&o, *fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, lng = 0;
        bool alt = false;
        if (*fmt == '#') {
            alt = true;
            fmt++;
        }
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l' || *fmt == 'z') {
            lng++;
            fmt++;
        }
        switch (*fmt) {
        case 'd':
        case 'i': {
            s64 v = lng ? va_arg(ap, s64) : va_arg(ap, int);
            ob_num(&o, v < 0 ? -(u64)v : (u64)v, 10, v < 0, width, pad, false);
            break;
        }
        case 'u': {
            u64 v = lng ? va_arg(ap, u64) : va_arg(ap, unsigned);
            ob_num(&o, v, 10, false, width, pad, false);
            break;
        }
        case 'x':
        case 'X': {
            u64 v = lng ? va_arg(ap, u64) : va_arg(ap, unsigned);
            if (alt) {
                ob_putc(&o, '0');
                ob_putc(&o, 'x');
            }
            ob_num(&o, v, 16, false, width, pad, *fmt == 'X');
            break;
        }
        case 'p':
            ob_putc(&o, '0');
            ob_putc(&o, 'x');
            ob_num(&o, (u64)va_arg(ap, void *), 16, false, width, pad, false);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            int l = strlen(s);
            for (int i = l; i < width; i++)
                ob_putc(&o, ' ');
            while (*s)
                ob_putc(&o, *s++);
            break;
        }
        case 'c':
            ob_putc(&o, (char)va_arg(ap, int));
            break;
        case '%':
            ob_putc(&o, '%');
            break;
        case 0:
            fmt--;
            break;
        default:
            ob_putc(&o, '%');
            ob_putc(&o, *fmt);
        }
    }
    if (size)
        buf[o.len < size ? o.len : size - 1] = 0;
    return (int)o.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

int printf(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    serial_write(buf, MIN((size_t)n, sizeof(buf) - 1));
    return n;
}

noreturn void gk_exit(u32 status)
{
    outl(0xf4, status);
    halt_forever();
}

noreturn void panic(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    printf("guestkit: PANIC: %s\n", buf);
    json_begin(app_name ? app_name : "guestkit");
    json_str("error", buf);
    json_end();
    gk_exit(EXIT_CRASH);
}

/* ---- heapsort (in place, O(n log n), no recursion) ---- */
static void sift_down(u64 *a, u64 start, u64 end)
{
    u64 root = start;
    for (;;) {
        u64 child = 2 * root + 1;
        if (child >= end)
            return;
        if (child + 1 < end && a[child] < a[child + 1])
            child++;
        if (a[root] >= a[child])
            return;
        u64 t = a[root];
        a[root] = a[child];
        a[child] = t;
        root = child;
    }
}

void sort_u64(u64 *a, u64 n)
{
    if (n < 2)
        return;
    for (u64 s = n / 2; s-- > 0;)
        sift_down(a, s, n);
    for (u64 end = n - 1; end > 0; end--) {
        u64 t = a[0];
        a[0] = a[end];
        a[end] = t;
        sift_down(a, 0, end);
    }
}

/* nearest-rank percentile; pct_x10 = percentile * 10 (p50 = 500, p99 = 990) */
u64 percentile_sorted(const u64 *a, u64 n, u32 pct_x10)
{
    if (!n)
        return 0;
    u64 rank = (n * pct_x10 + 999) / 1000; /* ceil(p/100 * n) */
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return a[rank - 1];
}

/* ---- JSON line builder ---- */
static char json_buf[2048];
static size_t json_len;

static void json_putc(char c)
{
    if (json_len + 1 < sizeof(json_buf))
        json_buf[json_len++] = c;
}

static void json_puts(const char *s)
{
    while (*s)
        json_putc(*s++);
}

static void json_quoted(const char *s)
{
    json_putc('"');
    for (; *s; s++) {
        u8 c = (u8)*s;
        if (c == '"' || c == '\\') {
            json_putc('\\');
            json_putc(c);
        } else if (c < 0x20 || c >= 0x7f) {
            char t[8];
            snprintf(t, sizeof(t), "\\u%04x", c);
            json_puts(t);
        } else {
            json_putc(c);
        }
    }
    json_putc('"');
}

static void json_key(const char *key)
{
    json_putc(',');
    json_quoted(key);
    json_putc(':');
}

void json_begin(const char *app)
{
    json_len = 0;
    json_puts("{\"app\":");
    json_quoted(app);
}

void json_str(const char *key, const char *val)
{
    json_key(key);
    json_quoted(val);
}

void json_u64(const char *key, u64 val)
{
    char t[24];
    json_key(key);
    snprintf(t, sizeof(t), "%llu", val);
    json_puts(t);
}

void json_s64(const char *key, s64 val)
{
    char t[24];
    json_key(key);
    snprintf(t, sizeof(t), "%lld", val);
    json_puts(t);
}

void json_hex(const char *key, u64 val)
{
    char t[24];
    snprintf(t, sizeof(t), "0x%llx", val);
    json_str(key, t);
}

void json_raw(const char *key, const char *raw)
{
    json_key(key);
    json_puts(raw);
}

void json_end(void)
{
    json_putc('}');
    json_buf[json_len] = 0;
    serial_write(json_buf, json_len);
    serial_write("\n", 1);
}
