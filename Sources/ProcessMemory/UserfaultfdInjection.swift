import CFerryShims
import SystemPackage

extension Userfaultfd {
    /// Creates a userfaultfd inside `pid` (a system call run there through ptrace) and returns our
    /// copy of it, taken with `pidfd_getfd`; the target's copy is closed again, so the target never
    /// sees it. Registrations made through it act on the target's address space: dirty tracking at
    /// the source, missing-page service for a VMM that knows nothing of Ferry at the destination.
    /// With `keepInTarget` the target keeps its copy (unused by it): a restarted agent can take it
    /// back from /proc/PID/fd and go on serving the faults.
    /// Refused (``ProcessMemoryError/refusal``) for a target under seccomp, a zombie, a traced or a stopped one
    /// with caught signals pending; what the target sees, and what it is left with if we are killed half-way, is
    /// in docs/ptrace-injection.md.
    public static func inject(into pid: Int32, keepInTarget: Bool = false) throws(ProcessMemoryError) -> Userfaultfd {
        var session = try RemoteSyscallSession(pid: pid, calls: "userfaultfd (323) and close (3)")
        let remoteFD: Int64
        do {
            remoteFD = try session.call(SyscallNumber.userfaultfd, 0o2000000 | 0o4000) // O_CLOEXEC | O_NONBLOCK
        } catch {
            try? session.finish()
            throw error
        }
        guard remoteFD >= 0 else {
            try? session.finish()
            throw ProcessMemoryError("userfaultfd() injected into process \(pid) failed", negated: remoteFD)
        }
        let copied: FileDescriptor
        do {
            copied = try RemoteDescriptor.copy(Int32(remoteFD), from: pid)
        } catch {
            _ = try? session.call(SyscallNumber.close, UInt64(remoteFD))
            try? session.finish()
            throw error
        }
        if keepInTarget {
            do { try session.finish() } catch {
                try? copied.close()
                throw error
            }
            return Userfaultfd(adopting: copied)
        }
        let closed: Int64
        do {
            closed = try session.call(SyscallNumber.close, UInt64(remoteFD))
            try session.finish()
        } catch {
            try? copied.close()
            throw error
        }
        guard closed == 0 else {
            try? copied.close()
            throw ProcessMemoryError("close(\(remoteFD)) injected into process \(pid) failed", negated: closed)
        }
        return Userfaultfd(adopting: copied)
    }

}
