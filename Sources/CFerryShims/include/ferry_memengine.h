#include <sys/select.h>
// Ferry's C shim for the memory migration engine (MigrationEngine/Memory): lock-free page bitmaps
// shared between the link reader threads and the fault-service thread, and a fast zero-page test.
#ifndef FERRY_MEMENGINE_H
#define FERRY_MEMENGINE_H
#include <stdint.h>

/// Tests bit `index` with acquire ordering (pairs with ferry_bitmap_set_release).
static inline int ferry_bitmap_test_acquire(const uint64_t *words, uint64_t index) {
    return (__atomic_load_n(&words[index >> 6], __ATOMIC_ACQUIRE) >> (index & 63)) & 1;
}

/// Sets bit `index` with release ordering; returns its previous value.
static inline int ferry_bitmap_set_release(uint64_t *words, uint64_t index) {
    uint64_t bit = (uint64_t)1 << (index & 63);
    return (__atomic_fetch_or(&words[index >> 6], bit, __ATOMIC_ACQ_REL) & bit) != 0;
}

/// Clears bit `index`; returns its previous value.
static inline int ferry_bitmap_clear(uint64_t *words, uint64_t index) {
    uint64_t bit = (uint64_t)1 << (index & 63);
    return (__atomic_fetch_and(&words[index >> 6], ~bit, __ATOMIC_ACQ_REL) & bit) != 0;
}

/// Atomically adds to a 64-bit counter (relaxed); returns the previous value.
static inline uint64_t ferry_counter_add(uint64_t *counter, uint64_t n) {
    return __atomic_fetch_add(counter, n, __ATOMIC_RELAXED);
}

/// Reads a 64-bit counter (relaxed).
static inline uint64_t ferry_counter_load(const uint64_t *counter) {
    return __atomic_load_n(counter, __ATOMIC_RELAXED);
}

/// Stores a 64-bit counter (relaxed).
static inline void ferry_counter_store(uint64_t *counter, uint64_t value) {
    __atomic_store_n(counter, value, __ATOMIC_RELAXED);
}

/// Stores a 32-bit value with release ordering.
static inline void ferry_store_i32_release(int32_t *cell, int32_t value) {
    __atomic_store_n(cell, value, __ATOMIC_RELEASE);
}

/// Loads a 32-bit value with acquire ordering.
static inline int32_t ferry_load_i32_acquire(const int32_t *cell) {
    return __atomic_load_n(cell, __ATOMIC_ACQUIRE);
}

/// Whether `len` bytes (a multiple of 64) at `p` (8-byte aligned) are all zero.
int ferry_is_zero(const void *p, uint64_t len);

/// Monotonic clock in nanoseconds (CLOCK_MONOTONIC).
uint64_t ferry_monotonic_ns(void);

#endif
