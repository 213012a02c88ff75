// libnbd, the reference NBD client library, used by tests to drive servers as a real client.
#include <sys/select.h>
#include <libnbd.h>
