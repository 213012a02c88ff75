// Threads: what Swift cannot import from glibc (prctl is variadic).
#ifndef FERRY_THREAD_H
#define FERRY_THREAD_H
#include <sys/select.h>

/// Names the calling thread (prctl(PR_SET_NAME); at most 15 bytes are kept). 0 or -errno.
int ferry_set_thread_name(const char *name);
#endif
