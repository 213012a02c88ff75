import CFerryShims
import SystemPackage

/// Copies a descriptor out of another process: `pidfd_open(pid)` then `pidfd_getfd(pidfd, fd)`.
///
/// The copy refers to the same open file (for a userfaultfd: the same context, bound to the target's mm).
public enum RemoteDescriptor {
    /// Our own descriptor for descriptor `targetFD` of process `pid` (close-on-exec).
    /// The corresponding system calls are `pidfd_open` and `pidfd_getfd`.
    public static func copy(_ targetFD: Int32, from pid: Int32) throws(ProcessMemoryError) -> FileDescriptor {
        let pidfd = ferry_pidfd_open(pid)
        guard pidfd >= 0 else { throw ProcessMemoryError("pidfd_open(\(pid)) failed", negated: pidfd) }
        defer { _ = try? FileDescriptor(rawValue: pidfd).close() }
        let fd = ferry_pidfd_getfd(pidfd, targetFD)
        guard fd >= 0 else { throw ProcessMemoryError("pidfd_getfd of descriptor \(targetFD) of process \(pid) failed", negated: fd) }
        return FileDescriptor(rawValue: fd)
    }
}
