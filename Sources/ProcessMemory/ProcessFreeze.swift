import Glibc

/// Every thread of a process held still for a few milliseconds: SIGSTOP, then a wait until each thread of
/// /proc/PID/task is in state T (or t, or gone: Z, X), and SIGCONT at ``thaw()``. A process already stopped by
/// a signal is refused: whoever stopped it may continue it during the freeze. The process's parent may see the
/// stop (SIGCHLD with CLD_STOPPED); a VMM sees none of it but the time.
public struct ProcessFreeze: ~Copyable {
    public let pid: Int32

    /// Stops `pid` and waits until all its threads are stopped (at most `timeout` seconds, then SIGCONT and throw).
    public init(pid: Int32, timeout: Double = 1) throws(ProcessMemoryError) {
        let status = try ProcessStatus(pid: pid)
        guard status.state != "T" else {
            throw ProcessMemoryError("process \(pid) is stopped by a signal: not frozen (whoever stopped it may continue it)")
        }
        guard kill(pid, SIGSTOP) == 0 else {
            throw ProcessMemoryError("kill(\(pid), SIGSTOP) failed", errno: .init(rawValue: errno))
        }
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let deadline = Double(now.tv_sec) + Double(now.tv_nsec) / 1e9 + timeout
        while !Self.allThreadsStopped(pid: pid) {
            clock_gettime(CLOCK_MONOTONIC, &now)
            if Double(now.tv_sec) + Double(now.tv_nsec) / 1e9 > deadline {
                kill(pid, SIGCONT)
                throw ProcessMemoryError("process \(pid) did not stop within \(timeout) s of SIGSTOP")
            }
            usleep(100)
        }
        self.pid = pid
    }

    /// Lets the process run again.
    public consuming func thaw() {
        kill(pid, SIGCONT)
        discard self
    }

    deinit { kill(pid, SIGCONT) }

    /// Whether every thread of `pid` is in state T (stopped by a signal), t (stopped by a tracer), or Z/X (exited);
    /// false when the process is gone.
    public static func allThreadsStopped(pid: Int32) -> Bool {
        guard let dir = opendir("/proc/\(pid)/task") else { return false }
        defer { closedir(dir) }
        var buffer = [UInt8](repeating: 0, count: 1024)
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            guard let first = name.first, first.isNumber else { continue }
            let fd = open("/proc/\(pid)/task/\(name)/stat", O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { return false }
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            close(fd)
            guard n > 0 else { return false }
            // "tid (comm) S ...": the state follows the last ')'.
            guard let close = buffer[0..<n].lastIndex(of: UInt8(ascii: ")")), close + 2 < n else { return false }
            let state = buffer[close + 2]
            if !"TtZX".utf8.contains(state) { return false }
        }
        return true
    }
}
