// liburing, imported whole. <sys/select.h> first so that fd_set is defined once
// across every C module of the package (see DEVELOPERS.md).
#include <sys/select.h>
#include <liburing.h>
