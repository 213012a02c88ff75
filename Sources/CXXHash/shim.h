// xxHash (XXH3): fast non-cryptographic hashing of disk blocks and pages for verification digests.
#include <sys/select.h>
#include <xxhash.h>
