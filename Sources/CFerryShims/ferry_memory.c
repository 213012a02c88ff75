// ProcessMemory's C shim: see include/ferry_memory.h.
#define _GNU_SOURCE
#include "ferry_memory.h"
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/vfs.h>

#include <errno.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PAGEMAP_SCAN
#define PAGEMAP_SCAN _IOWR('f', 16, ferry_pm_scan_arg)
#endif
#ifndef __NR_pidfd_open
#define __NR_pidfd_open 434
#endif
#ifndef __NR_pidfd_getfd
#define __NR_pidfd_getfd 438
#endif
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define RET(expr) do { long _r = (long)(expr); return _r < 0 ? -errno : (int)_r; } while (0)

long ferry_pagemap_scan(int pagemap_fd, ferry_pm_scan_arg *arg) {
    arg->size = sizeof(*arg);
    long r = ioctl(pagemap_fd, PAGEMAP_SCAN, arg);
    return r < 0 ? -errno : r;
}

int ferry_userfaultfd(int flags) { RET(syscall(__NR_userfaultfd, flags)); }

int ferry_uffdio_api(int uffd, uint64_t features, uint64_t *granted, uint64_t *ioctls) {
    struct uffdio_api api = { .api = UFFD_API, .features = features };
    if (ioctl(uffd, UFFDIO_API, &api) < 0) return -errno;
    if (granted) *granted = api.features;
    if (ioctls) *ioctls = api.ioctls;
    return 0;
}

int ferry_uffdio_register(int uffd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls) {
    struct uffdio_register reg = { .range = { .start = start, .len = len }, .mode = mode };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) return -errno;
    if (ioctls) *ioctls = reg.ioctls;
    return 0;
}

int ferry_uffdio_unregister(int uffd, uint64_t start, uint64_t len) {
    struct uffdio_range range = { .start = start, .len = len };
    RET(ioctl(uffd, UFFDIO_UNREGISTER, &range));
}

int ferry_uffdio_copy(int uffd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, int64_t *copied) {
    struct uffdio_copy c = { .dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len, .mode = mode, .copy = 0 };
    int r = ioctl(uffd, UFFDIO_COPY, &c);
    if (copied) *copied = c.copy;
    return r < 0 ? -errno : 0;
}

int ferry_uffdio_zeropage(int uffd, uint64_t start, uint64_t len, uint64_t mode, int64_t *zeroed) {
    struct uffdio_zeropage z = { .range = { .start = start, .len = len }, .mode = mode, .zeropage = 0 };
    int r = ioctl(uffd, UFFDIO_ZEROPAGE, &z);
    if (zeroed) *zeroed = z.zeropage;
    return r < 0 ? -errno : 0;
}

int ferry_uffdio_wake(int uffd, uint64_t start, uint64_t len) {
    struct uffdio_range range = { .start = start, .len = len };
    RET(ioctl(uffd, UFFDIO_WAKE, &range));
}

int ferry_uffdio_writeprotect(int uffd, uint64_t start, uint64_t len, uint64_t mode) {
    struct uffdio_writeprotect wp = { .range = { .start = start, .len = len }, .mode = mode };
    RET(ioctl(uffd, UFFDIO_WRITEPROTECT, &wp));
}

int ferry_uffd_read_events(int uffd, ferry_uffd_event *out, int max) {
    struct uffd_msg msgs[64];
    if (max > 64) max = 64;
    if (max <= 0) return 0;
    ssize_t n;
    do { n = read(uffd, msgs, sizeof(struct uffd_msg) * (size_t)max); } while (n < 0 && errno == EINTR);
    if (n < 0) return errno == EAGAIN ? 0 : -errno;
    int count = (int)(n / (ssize_t)sizeof(struct uffd_msg));
    for (int i = 0; i < count; i++) {
        ferry_uffd_event *e = &out[i];
        memset(e, 0, sizeof(*e));
        e->event = msgs[i].event;
        switch (msgs[i].event) {
        case UFFD_EVENT_PAGEFAULT:
            e->flags = msgs[i].arg.pagefault.flags;
            e->address = msgs[i].arg.pagefault.address;
            e->ptid = msgs[i].arg.pagefault.feat.ptid;
            break;
        case UFFD_EVENT_REMOVE:
        case UFFD_EVENT_UNMAP:
            e->address = msgs[i].arg.remove.start;
            e->end = msgs[i].arg.remove.end;
            break;
        case UFFD_EVENT_REMAP:
            e->address = msgs[i].arg.remap.from;
            e->end = msgs[i].arg.remap.to;
            break;
        default:
            break;
        }
    }
    return count;
}

int ferry_pidfd_open(pid_t pid) { RET(syscall(__NR_pidfd_open, pid, 0)); }
int ferry_pidfd_getfd(int pidfd, int targetfd) { RET(syscall(__NR_pidfd_getfd, pidfd, targetfd, 0)); }

int ferry_ptrace_seize(pid_t pid, unsigned long options) { RET(ptrace(PTRACE_SEIZE, pid, 0, (void *)options)); }
int ferry_ptrace_interrupt(pid_t pid) { RET(ptrace(PTRACE_INTERRUPT, pid, 0, 0)); }
int ferry_ptrace_detach(pid_t pid, int sig) { RET(ptrace(PTRACE_DETACH, pid, 0, (void *)(long)sig)); }
int ferry_ptrace_cont(pid_t pid, int sig) { RET(ptrace(PTRACE_CONT, pid, 0, (void *)(long)sig)); }
int ferry_ptrace_syscall(pid_t pid, int sig) { RET(ptrace(PTRACE_SYSCALL, pid, 0, (void *)(long)sig)); }

/// The head of `struct ptrace_syscall_info` (include/uapi/linux/ptrace.h), declared here: <linux/ptrace.h>
/// clashes with glibc's <sys/ptrace.h>.
struct ferry_ptrace_syscall_info {
    uint8_t op;
    uint8_t reserved;
    uint16_t flags;
    uint32_t arch;
    uint64_t instruction_pointer;
    uint64_t stack_pointer;
    uint64_t data[8];
};

int ferry_ptrace_syscall_info(pid_t pid, uint8_t *op, uint32_t *arch) {
    struct ferry_ptrace_syscall_info info;
    memset(&info, 0, sizeof info);
    long r = ptrace((enum __ptrace_request)0x420e /* PTRACE_GET_SYSCALL_INFO */, pid, (void *)sizeof info, &info);
    if (r < 0) return -errno;
    *op = info.op;
    *arch = info.arch;
    return 0;
}
int ferry_ptrace_getregs(pid_t pid, struct user_regs_struct *regs) { RET(ptrace(PTRACE_GETREGS, pid, 0, regs)); }
int ferry_ptrace_setregs(pid_t pid, const struct user_regs_struct *regs) { RET(ptrace(PTRACE_SETREGS, pid, 0, regs)); }

int ferry_waitpid_all(pid_t pid, int *status) {
    pid_t r;
    do { r = waitpid(pid, status, __WALL); } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
}

int ferry_waitpid_nohang(pid_t pid, int *status) {
    pid_t r;
    do { r = waitpid(pid, status, __WALL | WNOHANG); } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
}

int ferry_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5) {
    RET(prctl(option, a2, a3, a4, a5));
}

int ferry_wifstopped(int status) { return WIFSTOPPED(status); }
int ferry_wstopsig(int status) { return WSTOPSIG(status); }
int ferry_wifexited(int status) { return WIFEXITED(status); }
int ferry_wifsignaled(int status) { return WIFSIGNALED(status); }
int ferry_wexitstatus(int status) { return WEXITSTATUS(status); }
int ferry_wtermsig(int status) { return WTERMSIG(status); }
int ferry_wptrace_event(int status) { return (status >> 16) & 0xff; }

long ferry_process_vm_readv(pid_t pid, const struct iovec *local, unsigned long nlocal,
                            const struct iovec *remote, unsigned long nremote) {
    ssize_t r = process_vm_readv(pid, local, nlocal, remote, nremote, 0);
    return r < 0 ? -errno : r;
}

long ferry_send_with_fd(int sock, const void *buf, uint64_t len, int fd) {
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } control;
    memset(&control, 0, sizeof(control));
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (fd >= 0) {
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof(control.buf);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    ssize_t r;
    do { r = sendmsg(sock, &msg, MSG_NOSIGNAL); } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
}

long ferry_recv_with_fd(int sock, void *buf, uint64_t cap, int *fd) {
    struct iovec iov = { .iov_base = buf, .iov_len = cap };
    union { char buf[CMSG_SPACE(sizeof(int) * 4)]; struct cmsghdr align; } control;
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
                          .msg_control = control.buf, .msg_controllen = sizeof(control.buf) };
    *fd = -1;
    ssize_t r;
    do { r = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC); } while (r < 0 && errno == EINTR);
    if (r < 0) return -errno;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            int fds[4];
            memcpy(fds, CMSG_DATA(c), sizeof(int) * (size_t)(n > 4 ? 4 : n));
            for (int i = 0; i < n && i < 4; i++) {
                if (*fd < 0) *fd = fds[i]; else close(fds[i]);
            }
        }
    }
    return r;
}

int64_t ferry_mmap_anonymous(uint64_t addr, uint64_t len, int fixed_noreplace) {
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | (fixed_noreplace ? MAP_FIXED_NOREPLACE : 0);
    void *p = mmap((void *)(uintptr_t)addr, len, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED) return -errno;
    if (fixed_noreplace && (uint64_t)(uintptr_t)p != addr) {
        munmap(p, len);  // pre-4.17 kernels ignore the flag and pick another address
        return -EEXIST;
    }
    return (int64_t)(uintptr_t)p;
}

int ferry_accept_cloexec(int sock) {
    int r;
    do { r = accept4(sock, NULL, NULL, SOCK_CLOEXEC); } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
}

int ferry_peer_pid(int sock) {
    struct ucred cred;
    socklen_t len = sizeof(cred);
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return -errno;
    return cred.pid;
}

int64_t ferry_mmap_memfd(const char *name, uint64_t len) {
    int fd = memfd_create(name, MFD_CLOEXEC);
    if (fd < 0) return -errno;
    if (ftruncate(fd, (off_t)len) < 0) { int e = errno; close(fd); return -e; }
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    close(fd);
    if (p == MAP_FAILED) return -e;
    return (int64_t)(uintptr_t)p;
}

int ferry_memfd_create(const char *name) {
    int fd = memfd_create(name, MFD_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

long ferry_filesystem_type(const char *path) {
    struct statfs st;
    if (statfs(path, &st) < 0) return -errno;
    return (long)st.f_type;
}

int ferry_punch_hole(int fd, uint64_t offset, uint64_t len) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)len) < 0 ? -errno : 0;
}

// ---- a minimal KVM guest ----
#include <fcntl.h>
#include <linux/kvm.h>

int ferry_kvm_guest_open(uint64_t ram, uint64_t size, ferry_kvm_guest *g) {
    memset(g, 0, sizeof(*g));
    g->kvm = g->vm = g->vcpu = -1;
    int e;
    g->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (g->kvm < 0) return -errno;
    g->vm = ioctl(g->kvm, KVM_CREATE_VM, 0);
    if (g->vm < 0) goto fail;
    struct kvm_userspace_memory_region region = {
        .slot = 0, .flags = 0, .guest_phys_addr = 0, .memory_size = size, .userspace_addr = ram };
    if (ioctl(g->vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) goto fail;
    g->vcpu = ioctl(g->vm, KVM_CREATE_VCPU, 0);
    if (g->vcpu < 0) goto fail;
    int mmap_size = ioctl(g->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (mmap_size < 0) goto fail;
    g->run_size = (uint64_t)mmap_size;
    g->run = mmap(NULL, (size_t)mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, g->vcpu, 0);
    if (g->run == MAP_FAILED) { g->run = NULL; goto fail; }
    struct kvm_sregs sregs;
    if (ioctl(g->vcpu, KVM_GET_SREGS, &sregs) < 0) goto fail;
    sregs.cs.base = 0; sregs.cs.selector = 0;
    sregs.ds.base = 0; sregs.ds.selector = 0;
    if (ioctl(g->vcpu, KVM_SET_SREGS, &sregs) < 0) goto fail;
    struct kvm_regs regs;
    memset(&regs, 0, sizeof(regs));
    regs.rip = 0;
    regs.rflags = 2;
    if (ioctl(g->vcpu, KVM_SET_REGS, &regs) < 0) goto fail;
    return 0;
fail:
    e = errno;
    ferry_kvm_guest_close(g);
    return -e;
}

int ferry_kvm_guest_run(ferry_kvm_guest *g, uint32_t *exit_reason) {
    if (ioctl(g->vcpu, KVM_RUN, 0) < 0) return -errno;
    *exit_reason = ((struct kvm_run *)g->run)->exit_reason;
    return 0;
}

void ferry_kvm_guest_close(ferry_kvm_guest *g) {
    if (g->run) munmap(g->run, g->run_size);
    if (g->vcpu >= 0) close(g->vcpu);
    if (g->vm >= 0) close(g->vm);
    if (g->kvm >= 0) close(g->kvm);
    g->run = NULL;
    g->kvm = g->vm = g->vcpu = -1;
}
