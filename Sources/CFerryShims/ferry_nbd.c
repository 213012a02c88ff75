// NBDBridge's C helpers (see include/ferry_nbd.h).
#define _GNU_SOURCE
#include "ferry_nbd.h"
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <linux/falloc.h>

const int ferry_nbd_falloc_keep_size = FALLOC_FL_KEEP_SIZE;
const int ferry_nbd_falloc_punch_hole = FALLOC_FL_PUNCH_HOLE;
const int ferry_nbd_falloc_zero_range = FALLOC_FL_ZERO_RANGE;
const int ferry_nbd_seek_data = SEEK_DATA;
const int ferry_nbd_o_direct = O_DIRECT;
const int ferry_nbd_seek_hole = SEEK_HOLE;
const int ferry_nbd_fadv_willneed = POSIX_FADV_WILLNEED;

int ferry_nbd_fallocate(int fd, int mode, int64_t offset, int64_t length) {
    return fallocate(fd, mode, offset, length) == 0 ? 0 : -errno;
}

int64_t ferry_nbd_lseek(int fd, int64_t offset, int whence) {
    off_t r = lseek(fd, offset, whence);
    return r < 0 ? -(int64_t)errno : (int64_t)r;
}

#include <sys/vfs.h>
int ferry_nbd_gettid(void) { return (int)gettid(); }

int ferry_nbd_is_memory_backed(int fd) {
    struct statfs fs;
    if (fstatfs(fd, &fs) != 0) return 0;
    return fs.f_type == 0x01021994 /* TMPFS_MAGIC */ || fs.f_type == 0x858458f6 /* RAMFS_MAGIC */;
}

int64_t ferry_copy_file_range(int in_fd, int64_t in_offset, int out_fd, int64_t out_offset, int64_t length) {
    off_t in = in_offset, out = out_offset;
    ssize_t n = copy_file_range(in_fd, &in, out_fd, &out, (size_t)length, 0);
    return n < 0 ? -errno : n;
}
