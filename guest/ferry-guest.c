/*
 * ferry-guest: the workload and self-checker of Ferry's test guest.
 *
 * Runs as the only program of a tiny Linux guest (started by guest/init) and checks that the
 * guest's memory and disk stay consistent with each other and with themselves while Ferry
 * live-migrates the guest. It prints its verdict on the console (fd 1, the serial port).
 *
 * Parameters (arguments, each `name=value` or `ferry.name=value`; defaults in brackets):
 *   mem=MiB      memory kept and checked [64]        dirty=MB/s  memory rewritten [8]
 *   disk=MB/s    disk written [2]; 0 = no disk        diskset=MiB disk area the writer cycles over [32]
 *   dev=PATH     block device [/dev/vda] (a regular file works too, for trying it on a host)
 *   diskio=KiB   size of one disk read or write [32]: up to diskio/4 consecutive blocks per I/O
 *   echo=PORT    TCP echo server on 0.0.0.0:PORT [0 = none] (the network itself is set up by guest/init
 *                from ferry.ip=ADDR/PREFIX, which is not passed on to ferry-guest)
 *
 * Memory. An anonymous region of `mem` MiB; every 4 KiB page holds a header
 * {magic "FRYPAGE1", boot id, page index, pass} and 508 words derived from (boot, page, pass).
 * A sweeper thread walks the pages in order at `dirty` MB/s; before it rewrites page i for
 * pass p+1 it checks that the page holds exactly pass p (header and every word), else it reports
 * FAIL stale-page. After the last page the pass counter increments and a verdict line is printed.
 *
 * Disk. A writer thread cycles a cursor over the first `diskset` MiB of `dev` in 4 KiB blocks at
 * `disk` MB/s, with O_DIRECT. For each block it reads and checks it, then writes a new record
 * with the next global step number (blocks are read, checked and written in runs of up to
 * diskio/4 consecutive blocks, one pread and one pwrite a run, so that the rate holds under TCG
 * and over a slow NBD link; each block still is a record of its own). A record is
 *   {magic "FRYBLK01", boot id, block index, step, checksum of the payload}   (5 x u64)
 *   payload: 506 words derived from (boot, block, step)
 *   the step again in the block's last 8 bytes.
 * The guest keeps expected_step[block] in its own memory (0 = not yet written by this boot).
 * Checks, in this order:
 *   all zero:            fine if expected = 0, else lost-write (found step 0)
 *   wrong magic:         corrupt-block
 *   other boot's record: fine if expected = 0 (a previous boot's leftover, not checked further),
 *                        else corrupt-block
 *   wrong block index:   corrupt-block
 *   head step != tail step, or checksum wrong: torn-write
 *   checksum right but payload not the pattern of (block, step): corrupt-block
 *   step < expected:     lost-write;  step > expected: disk-newer-than-memory
 * So the disk need not be zeroed between boots: a block this boot has not written yet must read
 * as zeroes or as a record of another boot (anything else is reported). A fresh zeroed disk is
 * the simplest start. Every full cycle of the cursor is a disk sweep.
 * An I/O error (or a device that cannot be opened) is reported as FAIL io-error; blocks whose
 * write failed are not checked on their next visit (their content is unknown).
 *
 * Echo. With echo=PORT a thread of its own serves TCP on PORT: every byte a client sends comes back,
 * unchanged and in order, on the same connection. One epoll loop, non-blocking sockets, TCP_NODELAY,
 * a 4 KiB buffer per connection (reading stops while it is full: back-pressure, nothing dropped), at
 * most ECHO_MAX_CONN connections at once (more wait in the listen backlog). A client's error or
 * reset only closes that connection. It sleeps in epoll_wait when idle and touches none of the
 * checker's memory, so the memory and disk checks go on undisturbed. Echo failures are not
 * checker failures (they do not count in failures=).
 *
 * Console lines (one write(2) per line, so lines of different threads never interleave):
 *   ferry-guest: start boot=<8 hex> mem_mib=.. dirty_mbs=.. disk_mbs=.. diskset_mib=.. dev=..
 *   ferry-guest: ready boot=.. pages=.. blocks=.. diskio_kib=..   (memory filled, disk opened)
 *   ferry-guest: status boot=<8 hex> uptime_ms=<n> mem_pass=<n> mem_pages_checked=<n>
 *                disk_step=<n> disk_blocks_checked=<n> disk_sweeps=<n> failures=<n>   (one line, ~1/s)
 *   ferry-guest: FAIL <kind> ...                  kind: stale-page lost-write disk-newer-than-memory
 *                                                 torn-write corrupt-block io-error (at most 20 lines;
 *                                                 failures= keeps counting)
 *   ferry-guest: verdict ok|FAIL boot=.. mem_pass=.. disk_step=.. failures=..   (end of every memory
 *                sweep; every 10 s if there is no memory sweeper)
 *   ferry-guest: note: ... / ferry-guest: error: ...  (a clamped disk set; a bad parameter: exit 2)
 *   ferry-guest: echo listening on <port>                  (once, with echo=)
 *   ferry-guest: echo open <addr>:<port> n=<open conns>    (a connection accepted)
 *   ferry-guest: echo close <addr>:<port> in=<bytes> out=<bytes> eof|reset|error <errno text>
 * The boot id is random, so a reboot is recognisable; counters that keep growing across a
 * migration show the guest did not reboot.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef GRND_INSECURE
#define GRND_INSECURE 0x0004
#endif

#define PAGE 4096u
#define PAGE_MAGIC 0x3145474150595246ull  /* "FRYPAGE1" little-endian */
#define BLOCK_MAGIC 0x31304b4c42595246ull /* "FRYBLK01" little-endian */
#define WEYL 0x9e3779b97f4a7c15ull
#define MAX_FAIL_LINES 20
#define SLICE_NS 10000000L /* pacing slice: 10 ms */
#define BURST_S 0.2        /* at most 200 ms of work after a stall (e.g. a migration pause) */

struct page {
    uint64_t magic, boot, index, pass;
    uint64_t words[(PAGE - 32) / 8]; /* 508 */
};

struct record {
    uint64_t magic, boot, block, step, checksum;
    uint64_t payload[(PAGE - 48) / 8]; /* 506 */
    uint64_t tail_step;
};

_Static_assert(sizeof(struct page) == PAGE, "page layout");
_Static_assert(sizeof(struct record) == PAGE, "record layout");

/* Parameters. */
static unsigned long opt_mem = 64, opt_dirty = 8, opt_disk = 2, opt_diskset = 32, opt_diskio = 32, opt_echo = 0;
static const char *opt_dev = "/dev/vda";

static uint64_t boot_id;

/* Counters read by the status line. */
static _Atomic uint64_t mem_pass, mem_pages_checked;
static _Atomic uint64_t disk_step, disk_blocks_checked, disk_sweeps;
static _Atomic uint64_t failures, fail_lines;

/* ---------------------------------------------------------------- output */

static void out_line(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void out_line(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof buf - 2)
        n = sizeof buf - 2;
    buf[n++] = '\n';
    size_t off = 0;
    while (off < (size_t)n) { /* one write for the whole line; loop only on a short write */
        ssize_t w = write(1, buf + off, (size_t)n - off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        off += (size_t)w;
    }
}

static void fail(const char *kind, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(const char *kind, const char *fmt, ...)
{
    atomic_fetch_add(&failures, 1);
    uint64_t line = atomic_fetch_add(&fail_lines, 1);
    if (line > MAX_FAIL_LINES)
        return;
    if (line == MAX_FAIL_LINES) {
        out_line("ferry-guest: note: %d failure lines printed, further failures are only counted", MAX_FAIL_LINES);
        return;
    }
    char details[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(details, sizeof details, fmt, ap);
    va_end(ap);
    out_line("ferry-guest: FAIL %s boot=%08" PRIx64 " %s", kind, boot_id, details);
}

/* ---------------------------------------------------------------- time and pacing */

static double now_s(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void sleep_ns(long ns)
{
    struct timespec ts = {ns / 1000000000L, ns % 1000000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* Grants work units at `rate` per second, in time slices, with a bounded burst. */
struct pacer {
    double rate, credit, max_credit, last;
};

static void pacer_init(struct pacer *p, double rate)
{
    p->rate = rate;
    p->credit = 0;
    p->max_credit = rate * BURST_S < 1 ? 1 : rate * BURST_S;
    p->last = now_s(CLOCK_MONOTONIC);
}

static uint64_t pacer_take(struct pacer *p)
{
    double now = now_s(CLOCK_MONOTONIC);
    double dt = now - p->last;
    p->last = now;
    if (dt > 0)
        p->credit += p->rate * dt;
    if (p->credit > p->max_credit)
        p->credit = p->max_credit;
    uint64_t n = (uint64_t)p->credit;
    p->credit -= (double)n;
    return n;
}

/* ---------------------------------------------------------------- patterns */

static uint64_t mix64(uint64_t x) /* splitmix64's finaliser */
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

/* Seed of the words of a page or block: a cheap hash of (boot, index, generation). */
static uint64_t seed_of(uint64_t boot, uint64_t index, uint64_t generation)
{
    return mix64(mix64(boot * WEYL ^ index) + generation * 0xd1b54a32d192ed03ull);
}

/* Word j of a pattern with seed s is s + (j+1)*WEYL: every word differs from the same word of
 * any other (index, generation), so a page or block that is even partly stale does not match. */

static uint64_t checksum_of(const uint64_t *words, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t j = 0; j < n; j++)
        h = (h ^ words[j]) * 0x100000001b3ull;
    return mix64(h);
}

/* ---------------------------------------------------------------- memory */

static struct page *pages;
static uint64_t npages;

static void fill_page(struct page *pg, uint64_t index, uint64_t pass)
{
    uint64_t w = seed_of(boot_id, index, pass);
    pg->magic = PAGE_MAGIC;
    pg->boot = boot_id;
    pg->index = index;
    pg->pass = pass;
    for (size_t j = 0; j < sizeof pg->words / 8; j++) {
        w += WEYL;
        pg->words[j] = w;
    }
}

/* Which pass near `pass` does word j of page `index` match? -1 if none. */
static int64_t word_pass(uint64_t index, size_t j, uint64_t value, uint64_t pass)
{
    for (uint64_t q = pass > 4 ? pass - 4 : 0; q <= pass + 4; q++)
        if (seed_of(boot_id, index, q) + (j + 1) * WEYL == value)
            return (int64_t)q;
    return -1;
}

/* Checks that page i holds pass p and rewrites it for pass p+1, in one walk over the page. */
static void check_and_advance(uint64_t i, uint64_t p)
{
    struct page *pg = &pages[i];
    uint64_t magic = pg->magic, boot = pg->boot, index = pg->index, pass = pg->pass;
    uint64_t old = seed_of(boot_id, i, p), neu = seed_of(boot_id, i, p + 1);
    size_t bad = SIZE_MAX, nbad = 0;
    uint64_t badval = 0;
    for (size_t j = 0; j < sizeof pg->words / 8; j++) {
        old += WEYL;
        neu += WEYL;
        uint64_t v = pg->words[j];
        if (v != old) {
            if (bad == SIZE_MAX) {
                bad = j;
                badval = v;
            }
            nbad++;
        }
        pg->words[j] = neu;
    }
    pg->pass = p + 1;
    pg->magic = PAGE_MAGIC;
    pg->boot = boot_id;
    pg->index = i;
    atomic_fetch_add_explicit(&mem_pages_checked, 1, memory_order_relaxed);

    if (magic != PAGE_MAGIC || boot != boot_id || index != i)
        fail("stale-page", "page=%" PRIu64 " expected_pass=%" PRIu64 " found=bad-header magic=%016" PRIx64
             " boot=%016" PRIx64 " index=%" PRIu64 " pass=%" PRIu64 " bad_words=%zu",
             i, p, magic, boot, index, pass, nbad);
    else if (pass != p)
        fail("stale-page", "page=%" PRIu64 " expected_pass=%" PRIu64 " found_pass=%" PRIu64 " bad_words=%zu",
             i, p, pass, nbad);
    else if (nbad) {
        int64_t q = word_pass(i, bad, badval, p);
        fail("stale-page", "page=%" PRIu64 " expected_pass=%" PRIu64 " found_pass=%" PRIu64
             " partly: bad_words=%zu first_bad_word=%zu which_matches_pass=%" PRId64 " (-1: none)",
             i, p, pass, nbad, bad, q);
    }
}

static void print_verdict(void)
{
    uint64_t f = atomic_load(&failures);
    out_line("ferry-guest: verdict %s boot=%08" PRIx64 " mem_pass=%" PRIu64 " disk_step=%" PRIu64
             " failures=%" PRIu64,
             f ? "FAIL" : "ok", boot_id, atomic_load(&mem_pass), atomic_load(&disk_step), f);
}

static void *sweeper(void *arg)
{
    (void)arg;
    struct pacer pc;
    pacer_init(&pc, (double)opt_dirty * 1e6 / PAGE);
    uint64_t i = 0, p = 0;
    for (;;) {
        uint64_t n = pacer_take(&pc);
        while (n--) {
            check_and_advance(i, p);
            if (++i == npages) {
                i = 0;
                p++;
                atomic_store(&mem_pass, p);
                print_verdict();
            }
        }
        sleep_ns(SLICE_NS);
    }
    return NULL;
}

/* ---------------------------------------------------------------- disk */

static int disk_fd = -1;
static uint64_t nblocks;
static uint64_t *expected_step; /* in guest memory: migrates with it */
#define UNKNOWN UINT64_MAX       /* expected_step of a block whose write failed */

static void fill_record(struct record *r, uint64_t block, uint64_t step)
{
    uint64_t w = seed_of(boot_id, block, step);
    r->magic = BLOCK_MAGIC;
    r->boot = boot_id;
    r->block = block;
    r->step = step;
    for (size_t j = 0; j < sizeof r->payload / 8; j++) {
        w += WEYL;
        r->payload[j] = w;
    }
    r->checksum = checksum_of(r->payload, sizeof r->payload / 8);
    r->tail_step = step;
}

static int all_zero(const void *buf)
{
    const uint64_t *w = buf;
    for (size_t j = 0; j < PAGE / 8; j++)
        if (w[j])
            return 0;
    return 1;
}

static void check_block(uint64_t b, const struct record *r)
{
    uint64_t e = expected_step[b];
    atomic_fetch_add_explicit(&disk_blocks_checked, 1, memory_order_relaxed);
    if (e == UNKNOWN)
        return;
    if (all_zero(r)) {
        if (e)
            fail("lost-write", "block=%" PRIu64 " expected_step=%" PRIu64 " found=zeroes", b, e);
        return;
    }
    if (r->magic != BLOCK_MAGIC) {
        fail("corrupt-block", "block=%" PRIu64 " expected_step=%" PRIu64 " bad magic=%016" PRIx64
             " head_step=%" PRIu64 " tail_step=%" PRIu64, b, e, r->magic, r->step, r->tail_step);
        return;
    }
    if (r->boot != boot_id) {
        if (e)
            fail("corrupt-block", "block=%" PRIu64 " expected_step=%" PRIu64 " found a record of boot=%08" PRIx64
                 " step=%" PRIu64, b, e, r->boot, r->step);
        return; /* e == 0: a previous boot's leftover */
    }
    if (r->block != b) {
        fail("corrupt-block", "block=%" PRIu64 " expected_step=%" PRIu64 " found the record of block=%" PRIu64
             " step=%" PRIu64, b, e, r->block, r->step);
        return;
    }
    uint64_t sum = checksum_of(r->payload, sizeof r->payload / 8);
    if (r->step != r->tail_step || sum != r->checksum) {
        fail("torn-write", "block=%" PRIu64 " expected_step=%" PRIu64 " head_step=%" PRIu64 " tail_step=%" PRIu64
             " checksum=%s", b, e, r->step, r->tail_step, sum == r->checksum ? "ok" : "wrong");
        return;
    }
    uint64_t w = seed_of(boot_id, b, r->step);
    for (size_t j = 0; j < sizeof r->payload / 8; j++) {
        w += WEYL;
        if (r->payload[j] != w) {
            fail("corrupt-block", "block=%" PRIu64 " expected_step=%" PRIu64 " step=%" PRIu64
                 " checksum ok but payload word %zu is not the step's pattern", b, e, r->step, j);
            return;
        }
    }
    if (r->step < e)
        fail("lost-write", "block=%" PRIu64 " expected_step=%" PRIu64 " found_step=%" PRIu64, b, e, r->step);
    else if (r->step > e)
        fail("disk-newer-than-memory", "block=%" PRIu64 " expected_step=%" PRIu64 " found_step=%" PRIu64,
             b, e, r->step);
}

static int open_disk(void)
{
    /* The device node may appear a moment after the driver is loaded: wait up to 10 s. */
    for (int tries = 0;; tries++) {
        int fd = open(opt_dev, O_RDWR | O_DIRECT | O_CLOEXEC);
        if (fd >= 0)
            return fd;
        if (tries >= 100 || errno != ENOENT) {
            fail("io-error", "open %s: %s", opt_dev, strerror(errno));
            return -1;
        }
        sleep_ns(100000000L);
    }
}

static uint64_t disk_size(int fd)
{
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode))
        return (uint64_t)st.st_size;
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) != 0)
        return 0;
    return size;
}

static void *writer(void *arg)
{
    (void)arg;
    uint64_t run = opt_diskio / 4; /* blocks per I/O */
    char *rbuf, *wbuf;
    if (posix_memalign((void **)&rbuf, PAGE, run * PAGE) || posix_memalign((void **)&wbuf, PAGE, run * PAGE)) {
        fail("io-error", "posix_memalign failed");
        return NULL;
    }
    struct pacer pc;
    pacer_init(&pc, (double)opt_disk * 1e6 / PAGE);
    uint64_t b = 0, step = 0;
    for (;;) {
        uint64_t n = pacer_take(&pc);
        while (n) {
            uint64_t k = n < run ? n : run;
            if (k > nblocks - b)
                k = nblocks - b;
            off_t off = (off_t)(b * PAGE);
            ssize_t got = pread(disk_fd, rbuf, k * PAGE, off);
            if (got != (ssize_t)(k * PAGE)) {
                fail("io-error", "read blocks=%" PRIu64 "..%" PRIu64 ": %s", b, b + k - 1,
                     got < 0 ? strerror(errno) : "short read");
            } else {
                for (uint64_t j = 0; j < k; j++) {
                    check_block(b + j, (const struct record *)(rbuf + j * PAGE));
                    fill_record((struct record *)(wbuf + j * PAGE), b + j, step + 1 + j);
                }
                ssize_t put = pwrite(disk_fd, wbuf, k * PAGE, off);
                for (uint64_t j = 0; j < k; j++)
                    expected_step[b + j] = put == (ssize_t)(k * PAGE) ? step + 1 + j : UNKNOWN;
                if (put != (ssize_t)(k * PAGE))
                    fail("io-error", "write blocks=%" PRIu64 "..%" PRIu64 " steps=%" PRIu64 "..%" PRIu64 ": %s", b,
                         b + k - 1, step + 1, step + k, put < 0 ? strerror(errno) : "short write");
                step += k; /* even after a failed write: a step number is never reused */
                atomic_store_explicit(&disk_step, step, memory_order_relaxed);
            }
            n -= k;
            b += k;
            if (b == nblocks) {
                b = 0;
                atomic_fetch_add(&disk_sweeps, 1);
            }
        }
        sleep_ns(SLICE_NS);
    }
    return NULL;
}

/* ---------------------------------------------------------------- echo server */

#define ECHO_BUF 4096
#define ECHO_MAX_CONN 256

struct echo_conn {
    int fd;
    uint32_t start, end;       /* bytes buf[start..end) read and not yet written back */
    uint64_t in, out;
    int eof;                   /* the client shut its side: close once everything is written back */
    uint32_t events;           /* what epoll waits for */
    char peer[48];
    char buf[ECHO_BUF];
};

static int echo_epfd = -1;
static unsigned echo_open;

static void echo_close(struct echo_conn *c, const char *why, int err)
{
    epoll_ctl(echo_epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    echo_open--;
    out_line("ferry-guest: echo close %s in=%" PRIu64 " out=%" PRIu64 " %s%s%s", c->peer, c->in, c->out, why,
             err ? " " : "", err ? strerror(err) : "");
    free(c);
}

static void echo_want(struct echo_conn *c, uint32_t events)
{
    if (events == c->events)
        return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(echo_epfd, EPOLL_CTL_MOD, c->fd, &ev) == 0)
        c->events = events;
}

/* Moves what can move without blocking: writes back what is buffered, reads while there is room.
 * Returns 0 when the connection was closed (c is freed). */
static int echo_serve(struct echo_conn *c)
{
    for (;;) {
        while (c->start < c->end) {
            ssize_t w = send(c->fd, c->buf + c->start, c->end - c->start, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                echo_close(c, errno == ECONNRESET || errno == EPIPE ? "reset" : "error", errno);
                return 0;
            }
            c->start += (uint32_t)w;
            c->out += (uint64_t)w;
        }
        if (c->start == c->end)
            c->start = c->end = 0;
        if (c->eof) {
            if (c->start == c->end) {
                echo_close(c, "eof", 0);
                return 0;
            }
            echo_want(c, EPOLLOUT);
            return 1;
        }
        if (c->start > 0 && c->end == ECHO_BUF) { /* room only at the front: compact */
            memmove(c->buf, c->buf + c->start, c->end - c->start);
            c->end -= c->start;
            c->start = 0;
        }
        if (c->end == ECHO_BUF) { /* full and the client does not read: wait until it does */
            echo_want(c, EPOLLOUT);
            return 1;
        }
        ssize_t r = recv(c->fd, c->buf + c->end, ECHO_BUF - c->end, MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                echo_want(c, c->start < c->end ? EPOLLIN | EPOLLOUT : EPOLLIN);
                return 1;
            }
            echo_close(c, errno == ECONNRESET ? "reset" : "error", errno);
            return 0;
        }
        if (r == 0)
            c->eof = 1;
        c->end += (uint32_t)r;
        c->in += (uint64_t)r;
    }
}

static void *echo_server(void *arg)
{
    (void)arg;
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt_echo),
                             .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(lfd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(lfd, 64) != 0) {
        out_line("ferry-guest: error: echo server on port %lu: %s", opt_echo, strerror(errno));
        if (lfd >= 0)
            close(lfd);
        return NULL;
    }
    echo_epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL}; /* NULL: the listener */
    if (echo_epfd < 0 || epoll_ctl(echo_epfd, EPOLL_CTL_ADD, lfd, &lev) != 0) {
        out_line("ferry-guest: error: echo server epoll: %s", strerror(errno));
        close(lfd);
        return NULL;
    }
    out_line("ferry-guest: echo listening on %lu", opt_echo);
    int accepting = 1;
    struct epoll_event evs[32];
    for (;;) {
        /* Not accepting (too many connections, or out of descriptors): look again in 100 ms. */
        int n = epoll_wait(echo_epfd, evs, 32, accepting ? -1 : 100);
        if (n < 0) {
            if (errno != EINTR)
                sleep_ns(SLICE_NS); /* never spin */
            continue;
        }
        for (int k = 0; k < n; k++)
            if (evs[k].data.ptr)
                echo_serve(evs[k].data.ptr);
        if (!accepting && echo_open < ECHO_MAX_CONN && epoll_ctl(echo_epfd, EPOLL_CTL_ADD, lfd, &lev) == 0)
            accepting = 1;
        while (accepting) {
            struct sockaddr_in peer;
            socklen_t plen = sizeof peer;
            int fd = accept4(lfd, (struct sockaddr *)&peer, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd < 0) {
                if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO)
                    continue;
                if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                    epoll_ctl(echo_epfd, EPOLL_CTL_DEL, lfd, NULL);
                    accepting = 0;
                }
                break; /* EAGAIN: nothing more to accept */
            }
            struct echo_conn *c = malloc(sizeof *c);
            if (!c) {
                close(fd);
                continue;
            }
            c->fd = fd;
            c->start = c->end = 0;
            c->in = c->out = 0;
            c->eof = 0;
            c->events = EPOLLIN;
            char ip[INET_ADDRSTRLEN] = "?";
            inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof ip);
            snprintf(c->peer, sizeof c->peer, "%s:%u", ip, (unsigned)ntohs(peer.sin_port));
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
            if (epoll_ctl(echo_epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
                close(fd);
                free(c);
                continue;
            }
            echo_open++;
            out_line("ferry-guest: echo open %s n=%u", c->peer, echo_open);
            echo_serve(c); /* data may have come with the connection */
            if (echo_open >= ECHO_MAX_CONN) {
                epoll_ctl(echo_epfd, EPOLL_CTL_DEL, lfd, NULL);
                accepting = 0;
            }
        }
    }
    return NULL;
}

/* ---------------------------------------------------------------- main */

static int parse_ulong(const char *s, unsigned long *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-')
        return -1;
    *out = v;
    return 0;
}

static int parse_arg(const char *arg)
{
    if (strncmp(arg, "ferry.", 6) == 0)
        arg += 6;
    const char *eq = strchr(arg, '=');
    if (!eq)
        return -1;
    size_t klen = (size_t)(eq - arg);
    const char *v = eq + 1;
#define KEY(name) (klen == strlen(name) && strncmp(arg, name, klen) == 0)
    if (KEY("mem"))
        return parse_ulong(v, &opt_mem);
    if (KEY("dirty"))
        return parse_ulong(v, &opt_dirty);
    if (KEY("disk"))
        return parse_ulong(v, &opt_disk);
    if (KEY("diskset"))
        return parse_ulong(v, &opt_diskset);
    if (KEY("diskio"))
        return parse_ulong(v, &opt_diskio);
    if (KEY("echo"))
        return parse_ulong(v, &opt_echo);
    if (KEY("dev")) {
        opt_dev = v;
        return *v ? 0 : -1;
    }
#undef KEY
    return -1;
}

static uint64_t new_boot_id(void)
{
    uint32_t id = 0;
    /* GRND_INSECURE never blocks (an early-boot guest under TCG may have little entropy). */
    if (getrandom(&id, sizeof id, GRND_INSECURE) != (ssize_t)sizeof id &&
        getrandom(&id, sizeof id, GRND_NONBLOCK) != (ssize_t)sizeof id) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        id = (uint32_t)mix64(((uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec) ^ (uint64_t)getpid());
    }
    return id ? id : 1;
}

int main(int argc, char **argv)
{
    for (int a = 1; a < argc; a++)
        if (parse_arg(argv[a]) != 0) {
            out_line("ferry-guest: error: bad parameter '%s' (expected mem= dirty= disk= diskset= dev= diskio= echo=)", argv[a]);
            return 2;
        }
    if (opt_mem > (1ul << 20) || opt_dirty > 100000 || opt_disk > 100000 || opt_diskset > (1ul << 30) ||
        opt_diskio < 4 || opt_diskio > 1024 || opt_diskio % 4 || opt_echo > 65535) {
        out_line("ferry-guest: error: parameter out of range (diskio: a multiple of 4 from 4 to 1024; echo: a port)");
        return 2;
    }
    boot_id = new_boot_id();
    out_line("ferry-guest: start boot=%08" PRIx64 " mem_mib=%lu dirty_mbs=%lu disk_mbs=%lu diskset_mib=%lu dev=%s",
             boot_id, opt_mem, opt_dirty, opt_disk, opt_diskset, opt_dev);

    /* The echo server first: it needs none of the memory and answers while the pages are filled. */
    pthread_t echo_thread;
    if (opt_echo && pthread_create(&echo_thread, NULL, echo_server, NULL) != 0)
        out_line("ferry-guest: error: cannot start the echo server");

    npages = (uint64_t)opt_mem * (1u << 20) / PAGE;
    if (npages) {
        pages = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (pages == MAP_FAILED) {
            out_line("ferry-guest: error: mmap %lu MiB: %s", opt_mem, strerror(errno));
            return 1;
        }
        for (uint64_t i = 0; i < npages; i++) /* touch it all: pass 0 */
            fill_page(&pages[i], i, 0);
    }

    if (opt_disk && opt_diskset) {
        disk_fd = open_disk();
        if (disk_fd >= 0) {
            uint64_t size = disk_size(disk_fd);
            uint64_t want = (uint64_t)opt_diskset << 20;
            if (size < want) {
                out_line("ferry-guest: note: %s has %" PRIu64 " bytes, less than diskset=%lu MiB: using all of it",
                         opt_dev, size, opt_diskset);
                want = size;
            }
            nblocks = want / PAGE;
            expected_step = calloc(nblocks ? nblocks : 1, sizeof *expected_step);
            if (!expected_step) {
                out_line("ferry-guest: error: no memory for %" PRIu64 " blocks", nblocks);
                return 1;
            }
        }
    }
    out_line("ferry-guest: ready boot=%08" PRIx64 " pages=%" PRIu64 " blocks=%" PRIu64 " diskio_kib=%lu", boot_id,
             npages, nblocks, opt_diskio);

    pthread_t t;
    int sweeping = npages && opt_dirty;
    if (sweeping && pthread_create(&t, NULL, sweeper, NULL) != 0) {
        out_line("ferry-guest: error: cannot start the memory sweeper");
        return 1;
    }
    if (disk_fd >= 0 && nblocks && pthread_create(&t, NULL, writer, NULL) != 0) {
        out_line("ferry-guest: error: cannot start the disk writer");
        return 1;
    }

    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (uint64_t tick = 1;; tick++) {
        next.tv_sec += 1;
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > next.tv_sec + 1) /* after a long stall, do not print a burst of lines */
            next = now;
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR) {
        }
        struct timespec up;
        clock_gettime(CLOCK_BOOTTIME, &up);
        out_line("ferry-guest: status boot=%08" PRIx64 " uptime_ms=%" PRIu64 " mem_pass=%" PRIu64
                 " mem_pages_checked=%" PRIu64 " disk_step=%" PRIu64 " disk_blocks_checked=%" PRIu64
                 " disk_sweeps=%" PRIu64 " failures=%" PRIu64,
                 boot_id, (uint64_t)up.tv_sec * 1000 + (uint64_t)up.tv_nsec / 1000000, atomic_load(&mem_pass),
                 atomic_load(&mem_pages_checked), atomic_load(&disk_step), atomic_load(&disk_blocks_checked),
                 atomic_load(&disk_sweeps), atomic_load(&failures));
        if (!sweeping && tick % 10 == 0)
            print_verdict();
    }
}
