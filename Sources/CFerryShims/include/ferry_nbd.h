#include <sys/select.h>
// NBDBridge's C helpers: atomic operations on plain word arrays (the dirty bitmap and the
// throttle's per-block counters live in one allocation each, not in an array of Swift Atomics),
// and the fallocate/lseek/fadvise constants Swift cannot see through Glibc's macros.
#ifndef FERRY_NBD_H
#define FERRY_NBD_H
#include <stdint.h>
#include <stdbool.h>

/// Atomically ORs `bits` into `*word` (sequentially consistent). Returns the previous value.
static inline uint64_t ferry_nbd_atomic_or_u64(uint64_t *word, uint64_t bits) {
    return __atomic_fetch_or(word, bits, __ATOMIC_SEQ_CST);
}
/// Atomically replaces `*word` with `value`, returning the previous value.
static inline uint64_t ferry_nbd_atomic_exchange_u64(uint64_t *word, uint64_t value) {
    return __atomic_exchange_n(word, value, __ATOMIC_SEQ_CST);
}
/// Atomic load of `*word`.
static inline uint64_t ferry_nbd_atomic_load_u64(const uint64_t *word) {
    return __atomic_load_n(word, __ATOMIC_SEQ_CST);
}
/// Atomic add, returning the new value.
static inline uint64_t ferry_nbd_atomic_add_u64(uint64_t *word, uint64_t delta) {
    return __atomic_add_fetch(word, delta, __ATOMIC_SEQ_CST);
}
/// Compare-and-swap; returns true when `*word` was `expected` and is now `desired`.
static inline bool ferry_nbd_atomic_cas_u64(uint64_t *word, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n(word, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

// fallocate(2) modes and lseek(2) whences.
extern const int ferry_nbd_falloc_keep_size;   // FALLOC_FL_KEEP_SIZE
extern const int ferry_nbd_falloc_punch_hole;  // FALLOC_FL_PUNCH_HOLE

/// copy_file_range(2) of `length` bytes from `in_offset` of `in_fd` to `out_offset` of `out_fd`
/// (a reflink where the filesystem shares extents): bytes copied (0 at the input's end), or -errno.
int64_t ferry_copy_file_range(int in_fd, int64_t in_offset, int out_fd, int64_t out_offset, int64_t length);
extern const int ferry_nbd_falloc_zero_range;  // FALLOC_FL_ZERO_RANGE
extern const int ferry_nbd_seek_data;          // SEEK_DATA
extern const int ferry_nbd_seek_hole;          // SEEK_HOLE
extern const int ferry_nbd_fadv_willneed;      // POSIX_FADV_WILLNEED
extern const int ferry_nbd_o_direct;           // O_DIRECT (open(2))

/// fallocate(2), returning 0 or -errno.
int ferry_nbd_fallocate(int fd, int mode, int64_t offset, int64_t length);
/// lseek(2) with SEEK_DATA or SEEK_HOLE, returning the offset or -errno.
int64_t ferry_nbd_lseek(int fd, int64_t offset, int whence);
/// 1 when `fd` lives on tmpfs or ramfs (`fstatfs`): its I/O never waits for a device.
int ferry_nbd_is_memory_backed(int fd);
/// The calling thread's kernel thread id (gettid(2)).
int ferry_nbd_gettid(void);
#endif
