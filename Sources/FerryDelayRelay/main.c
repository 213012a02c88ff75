// ferry-delay-relay: a TCP relay that adds a fixed one-way delay in each direction, for the emulated WAN
// (this kernel has no netem). scripts/wan/wan-link.sh runs it in the destination namespace.
//
//   ferry-delay-relay LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT ONE_WAY_DELAY_MS
//
// Every chunk read from one side is written to the other side DELAY ms after it was read, so a round trip
// through the relay gains 2 x DELAY. Bandwidth is not limited here (tc tbf on the veth does that). In-flight
// data per direction is capped at 64 MiB: past it the relay stops reading that side, so a stalled reader
// cannot make it grow without bound. Serves any number of connections until killed.
//
// One thread, epoll and one timerfd armed (absolute, CLOCK_MONOTONIC) for the earliest chunk due, so a chunk
// leaves within tens of microseconds of its time. It replaces a Python asyncio relay that added about a
// millisecond per chunk under load (scripts/bench-relay.sh measures both).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

enum { chunk_capacity = 256 << 10, max_pairs = 1024 };
static const uint64_t in_flight_cap = 64ull << 20;

/// A chunk read from one side, due to be written to the other at `due`.
struct chunk {
    struct chunk *next;
    uint64_t due;
    size_t length, written;
    char data[];
};

/// One direction of a relayed connection: reads `from`, writes `to` after the delay.
struct direction {
    int from, to;
    struct chunk *head, *tail;
    uint64_t in_flight;
    int eof;       // `from` said end of stream: shut `to`'s write side once the queue is empty
    int shut;      // done
    int reading;   // `from` is in the epoll set for input
    int waiting;   // `to` waits for EPOLLOUT
};

/// A client connection and the relay's connection to the target.
struct pair {
    int used;
    int client, target;
    struct direction up, down;   // client -> target, target -> client
};

static struct pair pairs[max_pairs];
static int epoll_fd, timer_fd, listener;
static uint64_t delay_ns;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "ferry-delay-relay: %s: %s\n", what, strerror(errno));
    exit(1);
}

/// The epoll interest of `fd` within its pair: input while some direction reads from it, output while some
/// direction waits to write to it. Each socket is in the epoll set once, tagged with its pair and side.
static void update_interest(struct pair *p, int fd) {
    uint32_t events = 0;
    if (p->up.from == fd && p->up.reading) events |= EPOLLIN;
    if (p->down.from == fd && p->down.reading) events |= EPOLLIN;
    if (p->up.to == fd && p->up.waiting) events |= EPOLLOUT;
    if (p->down.to == fd && p->down.waiting) events |= EPOLLOUT;
    struct epoll_event e = {.events = events, .data.u64 = ((uint64_t)(p - pairs) << 1) | (fd == p->target)};
    epoll_ctl(epoll_fd, EPOLL_CTL_MOD, fd, &e);
}

static void close_pair(struct pair *p) {
    for (struct direction *d = &p->up; d; d = d == &p->up ? &p->down : NULL) {
        while (d->head) { struct chunk *c = d->head; d->head = c->next; free(c); }
        d->tail = NULL;
    }
    close(p->client);
    close(p->target);
    p->used = 0;
}

/// Writes what is due of `d`'s queue; returns -1 when the pair failed.
static int flush_due(struct pair *p, struct direction *d, uint64_t now) {
    while (d->head && d->head->due <= now) {
        struct chunk *c = d->head;
        ssize_t n = send(d->to, c->data + c->written, c->length - c->written, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (!d->waiting) { d->waiting = 1; update_interest(p, d->to); }
                return 0;
            }
            if (errno == EINTR) continue;
            return -1;
        }
        c->written += (size_t)n;
        if (c->written < c->length) continue;
        d->head = c->next;
        if (!d->head) d->tail = NULL;
        d->in_flight -= c->length;
        free(c);
        if (!d->reading && !d->eof && d->in_flight < in_flight_cap) { d->reading = 1; update_interest(p, d->from); }
    }
    if (d->waiting && (!d->head || d->head->due > now)) { d->waiting = 0; update_interest(p, d->to); }
    if (!d->head && d->eof && !d->shut) { shutdown(d->to, SHUT_WR); d->shut = 1; }
    return 0;
}

/// Reads what `d->from` has (one chunk per call); returns -1 when the pair failed.
static int read_side(struct pair *p, struct direction *d) {
    struct chunk *c = malloc(sizeof *c + chunk_capacity);
    if (!c) return -1;
    ssize_t n;
    do { n = recv(d->from, c->data, chunk_capacity, 0); } while (n < 0 && errno == EINTR);
    if (n <= 0) {
        free(c);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
        if (n < 0) return -1;
        d->eof = 1;
        d->reading = 0;
        update_interest(p, d->from);
        return 0;
    }
    // Shrink to what arrived: a queue of mostly small chunks must not pin 256 KiB each.
    struct chunk *fit = realloc(c, sizeof *c + (size_t)n);
    if (fit) c = fit;
    c->next = NULL;
    c->due = now_ns() + delay_ns;
    c->length = (size_t)n;
    c->written = 0;
    if (d->tail) d->tail->next = c; else d->head = c;
    d->tail = c;
    d->in_flight += (uint64_t)n;
    if (d->in_flight >= in_flight_cap) { d->reading = 0; update_interest(p, d->from); }
    return 0;
}

/// Arms the timer for the earliest chunk due (or disarms it).
static void arm_timer(void) {
    uint64_t earliest = UINT64_MAX;
    for (int i = 0; i < max_pairs; i++) {
        if (!pairs[i].used) continue;
        // A direction waiting for its receiver to take more is woken by EPOLLOUT, not by the timer.
        struct direction *d[2] = {&pairs[i].up, &pairs[i].down};
        for (int k = 0; k < 2; k++) {
            if (d[k]->head && !d[k]->waiting && d[k]->head->due < earliest) earliest = d[k]->head->due;
        }
    }
    struct itimerspec t = {0};
    if (earliest != UINT64_MAX) {
        if (earliest == 0) earliest = 1;
        t.it_value.tv_sec = (time_t)(earliest / 1000000000ull);
        t.it_value.tv_nsec = (long)(earliest % 1000000000ull);
    }
    timerfd_settime(timer_fd, TFD_TIMER_ABSTIME, &t, NULL);
}

static int resolve(const char *host, const char *port, struct sockaddr_storage *out, socklen_t *length) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *found;
    if (getaddrinfo(host, port, &hints, &found) != 0) return -1;
    memcpy(out, found->ai_addr, found->ai_addrlen);
    *length = found->ai_addrlen;
    freeaddrinfo(found);
    return 0;
}

static void accept_one(const struct sockaddr_storage *target, socklen_t target_length) {
    int client = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (client < 0) return;
    int slot = -1;
    for (int i = 0; i < max_pairs; i++) if (!pairs[i].used) { slot = i; break; }
    int server = slot < 0 ? -1 : socket(target->ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (server < 0 || connect(server, (const struct sockaddr *)target, target_length) != 0) {
        if (server >= 0) close(server);
        close(client);
        return;
    }
    fcntl(server, F_SETFL, fcntl(server, F_GETFL) | O_NONBLOCK);
    int one = 1;
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct pair *p = &pairs[slot];
    memset(p, 0, sizeof *p);
    p->used = 1;
    p->client = client;
    p->target = server;
    p->up = (struct direction){.from = client, .to = server, .reading = 1};
    p->down = (struct direction){.from = server, .to = client, .reading = 1};
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = ((uint64_t)slot << 1)};
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, client, &e);
    e.data.u64 = ((uint64_t)slot << 1) | 1;
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, server, &e);
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: ferry-delay-relay LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT ONE_WAY_DELAY_MS\n");
        return 2;
    }
    char *end;
    double delay_ms = strtod(argv[5], &end);
    if (*end || delay_ms < 0 || delay_ms > 60000) {
        fprintf(stderr, "ferry-delay-relay: delay '%s' is not a number of milliseconds from 0 to 60000\n", argv[5]);
        return 2;
    }
    delay_ns = (uint64_t)(delay_ms * 1e6);
    signal(SIGPIPE, SIG_IGN);
    struct sockaddr_storage listen_address, target;
    socklen_t listen_length, target_length;
    if (resolve(argv[1], argv[2], &listen_address, &listen_length) != 0) { fprintf(stderr, "ferry-delay-relay: cannot resolve %s:%s\n", argv[1], argv[2]); return 2; }
    if (resolve(argv[3], argv[4], &target, &target_length) != 0) { fprintf(stderr, "ferry-delay-relay: cannot resolve %s:%s\n", argv[3], argv[4]); return 2; }
    listener = socket(listen_address.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (listener < 0 || bind(listener, (struct sockaddr *)&listen_address, listen_length) != 0 || listen(listener, 128) != 0) die("listen");
    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (epoll_fd < 0 || timer_fd < 0) die("epoll or timerfd");
    const uint64_t listener_tag = UINT64_MAX, timer_tag = UINT64_MAX - 1;
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = listener_tag};
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, listener, &e);
    e.data.u64 = timer_tag;
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, timer_fd, &e);

    struct epoll_event events[64];
    for (;;) {
        int n = epoll_wait(epoll_fd, events, 64, -1);
        if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
        for (int i = 0; i < n; i++) {
            uint64_t tag = events[i].data.u64;
            if (tag == listener_tag) { accept_one(&target, target_length); continue; }
            if (tag == timer_tag) { uint64_t expirations; (void)!read(timer_fd, &expirations, sizeof expirations); continue; }
            struct pair *p = &pairs[tag >> 1];
            if (!p->used) continue;
            int fd = (tag & 1) ? p->target : p->client;
            struct direction *reading = p->up.from == fd ? &p->up : &p->down;
            int failed = 0;
            if ((events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && reading->reading) failed = read_side(p, reading) < 0;
            if (events[i].events & EPOLLERR) failed = 1;
            if (failed) close_pair(p);
        }
        // Whatever is due goes now, on every connection; then the timer for the next.
        uint64_t now = now_ns();
        for (int i = 0; i < max_pairs; i++) {
            struct pair *p = &pairs[i];
            if (!p->used) continue;
            if (flush_due(p, &p->up, now) < 0 || flush_due(p, &p->down, now) < 0) { close_pair(p); continue; }
            if (p->up.shut && p->down.shut) close_pair(p);
        }
        arm_timer();
    }
}
