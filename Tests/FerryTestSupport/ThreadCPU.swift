import CFerryTestShims
import Foundation
import Glibc

/// One thread of this process seen through the kernel: its CPU time (the thread's own CPU clock,
/// nanoseconds) and scheduler state (/proc/self/task/TID/stat). Measures that thread alone, so a
/// test running in parallel in the same process cannot disturb it, as whole-process figures
/// (`getrusage(RUSAGE_SELF)`) can.
public struct ThreadCPU: Sendable {
    /// The kernel thread id.
    public let tid: Int32
    public init(tid: Int32) { self.tid = tid }

    /// The calling thread's id (gettid).
    public static var currentTID: Int32 { ferry_test_gettid() }

    /// CPU time the thread has used so far, in nanoseconds; nil when the thread is gone.
    public var nanoseconds: UInt64? {
        var ts = timespec()
        guard clock_gettime(clockid_t(ferry_test_thread_cpu_clock(tid)), &ts) == 0 else { return nil }
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// The scheduler state letter (R running, S sleeping, D disk wait, ...); nil when the thread is gone.
    public var state: Character? {
        guard let stat = try? String(contentsOfFile: "/proc/self/task/\(tid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")"), stat.distance(from: close, to: stat.endIndex) > 2 else { return nil }
        return stat[stat.index(close, offsetBy: 2)]
    }
}
