#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "ferry_test_shims.h"

#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif

struct ferry_cachestat_range { uint64_t off; uint64_t len; };

int ferry_test_cachestat(int fd, uint64_t offset, uint64_t length, struct ferry_cachestat *out) {
    struct ferry_cachestat_range range = { offset, length };
    long r = syscall(__NR_cachestat, fd, &range, out, 0);
    return r < 0 ? -errno : 0;
}

uint64_t ferry_test_heap_in_use(void) {
    struct mallinfo2 info = mallinfo2();
    return (uint64_t)info.uordblks + (uint64_t)info.hblkhd;
}

int ferry_test_gettid(void) { return (int)syscall(SYS_gettid); }

int ferry_test_thread_cpu_clock(int tid) {
    // include/linux/posix-timers.h: CPUCLOCK_SCHED (2) | CPUCLOCK_PERTHREAD_MASK (4).
    return (int)((~(unsigned)tid) << 3) | 6;
}
