// Kernel interfaces the test support library needs and Swift cannot call directly (variadic
// syscall(2), structures newer than the C library's headers).
#ifndef FERRY_TEST_SHIMS_H
#define FERRY_TEST_SHIMS_H
#include <stdint.h>

/// Page-cache state of a file range, from cachestat(2) (Linux 6.5+): pages cached, dirty,
/// under writeback, evicted and recently evicted.
struct ferry_cachestat {
    uint64_t nr_cache;
    uint64_t nr_dirty;
    uint64_t nr_writeback;
    uint64_t nr_evicted;
    uint64_t nr_recently_evicted;
};

/// cachestat(2) of `[offset, offset+length)` of `fd` (length 0: to the end of the file).
/// Returns 0, or -errno (-ENOSYS on a kernel without cachestat).
int ferry_test_cachestat(int fd, uint64_t offset, uint64_t length, struct ferry_cachestat *out);

/// The calling thread's kernel thread id (gettid(2)).
int ferry_test_gettid(void);

/// The CPU-time clock of thread `tid` of this process (MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)),
/// for clock_gettime(2).
int ferry_test_thread_cpu_clock(int tid);
/// Bytes the C allocator has handed out and not had back, in the calling thread's arena
/// (mallinfo2: uordblks + hblkhd).
uint64_t ferry_test_heap_in_use(void);
#endif
