#include "ferry_shims.h"

#include <errno.h>
#include <sys/prctl.h>
#include "ferry_thread.h"

int ferry_set_thread_name(const char *name) {
    return prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0) == 0 ? 0 : -errno;
}
