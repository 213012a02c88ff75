// Ferry's C shim: only what Swift cannot import directly from glibc.
// One header per concern; each is included here. <sys/select.h> comes first so that
// fd_set is defined once across every C module.
#ifndef FERRY_SHIMS_H
#define FERRY_SHIMS_H
#include <sys/select.h>
#endif
