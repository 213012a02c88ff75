#include <sys/select.h>
// Ferry's C shim for the ProcessMemory module: the kernel interfaces Swift cannot call directly
// (variadic ptrace/syscall, ioctl request macros, CMSG macros) and the PAGEMAP_SCAN and
// userfaultfd definitions that Debian's 6.1 uapi headers lack (added in Linux 6.7).
// Every function returns 0 (or a non-negative result) on success and -errno on failure.
#ifndef FERRY_MEMORY_H
#define FERRY_MEMORY_H

#include <stdint.h>
#include <sys/types.h>
#include <sys/user.h>
#include <sys/uio.h>

// ---- userfaultfd features missing from the 6.1 headers ----
#define FERRY_UFFD_FEATURE_EVENT_REMOVE (1ULL << 3)
#define FERRY_UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1ULL << 12)
#define FERRY_UFFD_FEATURE_WP_UNPOPULATED (1ULL << 13)
#define FERRY_UFFD_FEATURE_WP_ASYNC (1ULL << 15)
#define FERRY_UFFDIO_REGISTER_MODE_MISSING (1ULL << 0)
#define FERRY_UFFDIO_REGISTER_MODE_WP (1ULL << 1)
#define FERRY_UFFD_EVENT_PAGEFAULT 0x12
#define FERRY_UFFD_EVENT_FORK 0x13
#define FERRY_UFFD_EVENT_REMAP 0x14
#define FERRY_UFFD_EVENT_REMOVE 0x15
#define FERRY_UFFD_EVENT_UNMAP 0x16
#define FERRY_UFFD_PAGEFAULT_FLAG_WRITE (1ULL << 0)
#define FERRY_UFFD_PAGEFAULT_FLAG_WP (1ULL << 1)

// ---- PAGEMAP_SCAN (Linux 6.7, include/uapi/linux/fs.h) ----
#define FERRY_PAGE_IS_WPALLOWED (1ULL << 0)
#define FERRY_PAGE_IS_WRITTEN (1ULL << 1)
#define FERRY_PAGE_IS_FILE (1ULL << 2)
#define FERRY_PAGE_IS_PRESENT (1ULL << 3)
#define FERRY_PAGE_IS_SWAPPED (1ULL << 4)
#define FERRY_PAGE_IS_PFNZERO (1ULL << 5)
#define FERRY_PAGE_IS_HUGE (1ULL << 6)
#define FERRY_PM_SCAN_WP_MATCHING (1ULL << 0)
#define FERRY_PM_SCAN_CHECK_WPASYNC (1ULL << 1)

/// One result region of PAGEMAP_SCAN (`struct page_region`).
typedef struct ferry_page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
} ferry_page_region;

/// The argument of PAGEMAP_SCAN (`struct pm_scan_arg`).
typedef struct ferry_pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
} ferry_pm_scan_arg;

/// ioctl(pagemap_fd, PAGEMAP_SCAN, arg): returns the number of regions filled or -errno.
long ferry_pagemap_scan(int pagemap_fd, ferry_pm_scan_arg *arg);

// ---- userfaultfd ----
/// A flattened `struct uffd_msg`: what a fault server needs of each event.
typedef struct ferry_uffd_event {
    uint8_t event;       // FERRY_UFFD_EVENT_*
    uint64_t flags;      // pagefault flags
    uint64_t address;    // pagefault address; REMOVE/UNMAP: start
    uint64_t end;        // REMOVE/UNMAP: end
    uint32_t ptid;       // faulting thread (if UFFD_FEATURE_THREAD_ID)
} ferry_uffd_event;

/// syscall(__NR_userfaultfd, flags): a new descriptor or -errno.
int ferry_userfaultfd(int flags);
/// ioctl UFFDIO_API; *granted receives the feature mask the kernel returned.
int ferry_uffdio_api(int uffd, uint64_t features, uint64_t *granted, uint64_t *ioctls);
/// ioctl UFFDIO_REGISTER of [start, start+len) with mode; *ioctls receives the allowed ioctls.
int ferry_uffdio_register(int uffd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls);
/// ioctl UFFDIO_UNREGISTER of [start, start+len).
int ferry_uffdio_unregister(int uffd, uint64_t start, uint64_t len);
/// ioctl UFFDIO_COPY; *copied receives the bytes copied (or the kernel's negative code).
int ferry_uffdio_copy(int uffd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, int64_t *copied);
/// ioctl UFFDIO_ZEROPAGE; *zeroed receives the bytes zeroed.
int ferry_uffdio_zeropage(int uffd, uint64_t start, uint64_t len, uint64_t mode, int64_t *zeroed);
/// ioctl UFFDIO_WAKE of [start, start+len).
int ferry_uffdio_wake(int uffd, uint64_t start, uint64_t len);
/// ioctl UFFDIO_WRITEPROTECT of [start, start+len); mode 1 = protect, 0 = unprotect.
int ferry_uffdio_writeprotect(int uffd, uint64_t start, uint64_t len, uint64_t mode);
/// read(uffd) of up to max messages into out (flattened); returns the count, 0 for none (EAGAIN), or -errno.
int ferry_uffd_read_events(int uffd, ferry_uffd_event *out, int max);

// ---- pidfd ----
/// syscall(__NR_pidfd_open, pid, 0).
int ferry_pidfd_open(pid_t pid);
/// syscall(__NR_pidfd_getfd, pidfd, targetfd, 0): our own copy of another process's descriptor.
int ferry_pidfd_getfd(int pidfd, int targetfd);

// ---- ptrace (variadic in glibc) ----
#define FERRY_PTRACE_O_TRACESYSGOOD 0x1
#define FERRY_PTRACE_EVENT_STOP 128
#define FERRY_PTRACE_SYSCALL_INFO_ENTRY 1
#define FERRY_PTRACE_SYSCALL_INFO_EXIT 2
#define FERRY_AUDIT_ARCH_X86_64 0xC000003Eu
/// PTRACE_SEIZE with these PTRACE_O_* options.
int ferry_ptrace_seize(pid_t pid, unsigned long options);
int ferry_ptrace_interrupt(pid_t pid);
int ferry_ptrace_detach(pid_t pid, int sig);
int ferry_ptrace_cont(pid_t pid, int sig);
/// PTRACE_SYSCALL: resume (delivering sig) until the next syscall-entry or syscall-exit stop.
int ferry_ptrace_syscall(pid_t pid, int sig);
/// PTRACE_GET_SYSCALL_INFO (Linux 5.3): *op is 0 (not a syscall stop), 1 (entry) or 2 (exit); *arch the AUDIT_ARCH
/// of the call (x86-64 or i386 for `int 0x80`).
int ferry_ptrace_syscall_info(pid_t pid, uint8_t *op, uint32_t *arch);
int ferry_ptrace_getregs(pid_t pid, struct user_regs_struct *regs);
int ferry_ptrace_setregs(pid_t pid, const struct user_regs_struct *regs);
/// waitpid(pid, &status, __WALL) retrying EINTR; returns pid or -errno.
int ferry_waitpid_all(pid_t pid, int *status);
/// waitpid(pid, &status, __WALL | WNOHANG) retrying EINTR; returns pid, 0 when nothing changed, or -errno.
int ferry_waitpid_nohang(pid_t pid, int *status);
/// The parts of a wait status (the W* macros).
int ferry_wifstopped(int status);
int ferry_wstopsig(int status);
int ferry_wifexited(int status);
int ferry_wifsignaled(int status);
int ferry_wexitstatus(int status);
int ferry_wtermsig(int status);
/// The PTRACE_EVENT_* of a stop (status >> 16).
int ferry_wptrace_event(int status);

// ---- process_vm_readv ----
/// process_vm_readv with one iovec array each side; returns bytes read or -errno.
long ferry_process_vm_readv(pid_t pid, const struct iovec *local, unsigned long nlocal,
                            const struct iovec *remote, unsigned long nremote);

// ---- SCM_RIGHTS ----
/// sendmsg of len bytes with one descriptor in an SCM_RIGHTS control message; returns bytes sent or -errno.
long ferry_send_with_fd(int sock, const void *buf, uint64_t len, int fd);
/// recvmsg of up to cap bytes; *fd receives a passed descriptor (CLOEXEC) or -1. Returns bytes or -errno.
long ferry_recv_with_fd(int sock, void *buf, uint64_t cap, int *fd);

/// accept4(sock, NULL, NULL, SOCK_CLOEXEC), retrying EINTR: the new connection or -errno.
int ferry_accept_cloexec(int sock);
/// The peer's PID from SO_PEERCRED, or -errno.
int ferry_peer_pid(int sock);

// ---- prctl (variadic in glibc) ----
/// prctl(option, a2, a3, a4, a5): 0 or a non-negative result, or -errno.
int ferry_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5);

// ---- mmap with flags Swift lacks ----
/// mmap(addr, len, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS[|MAP_FIXED_NOREPLACE]); NULL-safe: returns the
/// address or a negative errno cast to a pointer-sized integer.
int64_t ferry_mmap_anonymous(uint64_t addr, uint64_t len, int fixed_noreplace);

/// memfd_create(name, MFD_CLOEXEC), ftruncate(len), mmap(MAP_SHARED) read-write, close the memfd: shared memory
/// that shows as `/memfd:NAME` in /proc/PID/maps (how VMMs often hold guest RAM). Address or -errno.
int64_t ferry_mmap_memfd(const char *name, uint64_t len);
/// memfd_create(name, MFD_CLOEXEC): the descriptor or -errno.
int ferry_memfd_create(const char *name);
/// statfs(path).f_type: the filesystem's magic number (TMPFS_MAGIC 0x01021994), or -errno.
long ferry_filesystem_type(const char *path);
/// fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len): drops the pages (a tmpfs
/// file's pages leave the page cache, so a MISSING-mode userfaultfd sees them fault). 0 or -errno.
int ferry_punch_hole(int fd, uint64_t offset, uint64_t len);

// ---- a minimal KVM guest (ferry-workload --kvm) ----
/// A VM with one memory slot at guest-physical 0 and one vCPU in real mode.
typedef struct ferry_kvm_guest {
    int kvm, vm, vcpu;
    void *run;
    uint64_t run_size;
} ferry_kvm_guest;

/// Opens /dev/kvm, creates a VM whose slot 0 is [ram, ram+size) at guest-physical 0, and a vCPU that starts at
/// 0000:0000 in real mode. The caller puts code at ram. 0 or -errno.
int ferry_kvm_guest_open(uint64_t ram, uint64_t size, ferry_kvm_guest *guest);
/// One KVM_RUN; *exit_reason receives kvm_run.exit_reason (KVM_EXIT_IO = 2, KVM_EXIT_HLT = 5). 0 or -errno (EINTR).
int ferry_kvm_guest_run(ferry_kvm_guest *guest, uint32_t *exit_reason);
void ferry_kvm_guest_close(ferry_kvm_guest *guest);
#endif
