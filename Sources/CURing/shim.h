// liburing, imported whole.
// <sys/select.h> first so that fd_set is defined once across every C module of the package.
// <linux/io_uring.h> before <liburing.h>: swift-system's CSystem module includes the kernel's
// copy, and liburing bundles its own under the same include guard (LINUX_IO_URING_H). Two
// different definitions of struct io_uring_sqe in one Swift module do not merge, so liburing
// is made to use the kernel's, which is the one this kernel speaks anyway.
#include <sys/select.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <netdb.h>
#include <linux/io_uring.h>
#include <liburing.h>
