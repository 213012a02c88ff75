#include "ferry_memengine.h"
#include <time.h>

int ferry_is_zero(const void *p, uint64_t len) {
    const uint64_t *w = (const uint64_t *)p;
    uint64_t n = len / 8;
    for (uint64_t i = 0; i < n; i += 8) {
        if ((w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7]) != 0) return 0;
    }
    return 1;
}

uint64_t ferry_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
