import Foundation
import Glibc
import ProcessMemory

/// How the source slows a VM's memory writers when pre-copy does not converge (`--memory-throttle`),
/// instead of giving up on the downtime: the memory counterpart of Bradford et al.'s disk write throttle.
public enum MemoryThrottleMethod: String, Sendable, CaseIterable {
    /// Never throttle: a writer faster than the link is paused at the round or time limit.
    case off
    /// A dirty limit (``DirtyLimit``): the pages not yet written since the last scan are
    /// write-protected in synchronous mode and let through at the limit's pace. Only new dirtying waits.
    case writeProtect = "wp"
    /// A CPU-time limit on the VM's process through its cgroup (``CPUQuota``), QEMU's auto-converge done
    /// by the kernel: every thread slows, whatever it writes.
    case cpu
}

/// One migration's memory write throttle: engaged by the session's decision, its limit set again each
/// round, lifted before the pause (a VMM must stop its vCPUs and save its state at full speed); it
/// measures what it cost the VM, by the VM's CPU use before and during.
final class MemoryThrottle {
    let method: MemoryThrottleMethod
    let pid: Int32
    private var quota: CPUQuota?
    private var writeProtect: DirtyLimit?
    private(set) var isEngaged = false
    private var lifted = false
    /// Engaged and not yet lifted: the writers are held now.
    var isActive: Bool { isEngaged && !lifted }
    private var summary = MigrationReport.ThrottleReport()
    private let start: (cpu: Double, wall: Double)
    private var engagedAt: (cpu: Double, wall: Double) = (0, 0)
    private var heldAtEngage = 0.0
    /// What the throttled rounds dirtied, and over how long (the report's throttled rate).
    private var throttledBytes = 0.0, throttledSeconds = 0.0
    /// Rounds not yet acted on by the CPU limit.
    private var pending: (bytes: Double, seconds: Double) = (0, 0)

    init(method: MemoryThrottleMethod, pid: Int32) {
        self.method = method
        self.pid = pid
        start = (Self.cpuSeconds(pid: pid), Self.now())
        summary.method = method.rawValue
    }

    deinit { quota?.release() }

    /// Engaged with the write-protect dirty limit already set in the tracker (`throttle` is its thread).
    func engaged(limit: UInt64, dirtyRate: Double, round: Int, writeProtect throttle: DirtyLimit?) {
        writeProtect = throttle
        markEngaged(limit: limit, dirtyRate: dirtyRate, round: round)
    }

    /// Engages the CPU limit, sized so that the VM's dirtying, if it follows its CPU time, falls to `limit`.
    func engageCPU(limit: UInt64, dirtyRate: Double, round: Int) throws {
        let quota = try CPUQuota(pid: pid)
        let used = max(0.01, cpuSince(start))
        do { try quota.limit(cpus: used * min(1, Double(limit) / max(1, dirtyRate))) } catch {
            quota.release()
            throw error
        }
        self.quota = quota
        markEngaged(limit: limit, dirtyRate: dirtyRate, round: round)
        heldAtEngage = quota.throttledSeconds
        summary.cpuLimit = quota.cpus
    }

    /// Another round with the throttle on, which dirtied `bytes` in `seconds`: the CPU limit is scaled
    /// towards the limit (by at most 2x either way), once at least half a second of rounds is measured
    /// (short rounds near the pause see the CFS period's bursts, not the rate); the write-protect limit
    /// holds by itself.
    func adjust(dirtied bytes: UInt64, in seconds: Double) throws {
        // (A failed write of the limit is the caller's to log: the limit in force stays.)
        guard isEngaged, !lifted else { return }
        throttledBytes += Double(bytes)
        throttledSeconds += seconds
        summary.dirtyRateThrottled = throttledBytes / max(0.001, throttledSeconds)
        pending.bytes += Double(bytes)
        pending.seconds += seconds
        guard let quota, pending.seconds >= 0.5, pending.bytes > 0 else { return }
        let rate = pending.bytes / pending.seconds
        pending = (0, 0)
        let factor = min(2, max(0.5, Double(summary.limitBytesPerSecond) / rate))
        try quota.limit(cpus: max(0.01, min(quota.cpus * factor, summary.cpuBefore)))
        summary.cpuLimit = quota.cpus
    }

    /// Lifts the throttle (before the pause, or when the migration ends): the CPU limit is removed; the
    /// write-protect limit goes to 0 (every write at once) and ends with the tracker.
    func lift() {
        guard isEngaged, !lifted else { return }
        lifted = true
        let now = (cpu: Self.cpuSeconds(pid: pid), wall: Self.now())
        summary.engagedMs = (now.wall - engagedAt.wall) * 1000
        summary.cpuThrottled = (now.cpu - engagedAt.cpu) / max(0.001, now.wall - engagedAt.wall)
        summary.slowdown = summary.cpuBefore > 0 ? max(0, 1 - summary.cpuThrottled / summary.cpuBefore) : 0
        if let writeProtect {
            writeProtect.limit = 0
            summary.faults = writeProtect.faults
            summary.heldMs = Double(writeProtect.heldFor) / 1e6
            self.writeProtect = nil   // the tracker ends it; this reference must not keep its descriptor open
        }
        if let quota {
            summary.heldMs = (quota.throttledSeconds - heldAtEngage) * 1000
            quota.release()
        }
    }

    /// What it did, once engaged.
    var report: MigrationReport.ThrottleReport? { isEngaged ? summary : nil }

    private func markEngaged(limit: UInt64, dirtyRate: Double, round: Int) {
        isEngaged = true
        engagedAt = (Self.cpuSeconds(pid: pid), Self.now())
        summary.engagedAfterRound = round
        summary.limitBytesPerSecond = limit
        summary.dirtyRateBefore = dirtyRate
        summary.cpuBefore = cpuSince(start)
    }

    private func cpuSince(_ from: (cpu: Double, wall: Double)) -> Double {
        (Self.cpuSeconds(pid: pid) - from.cpu) / max(0.001, Self.now() - from.wall)
    }

    private static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// User + system CPU time of every thread of `pid`, in seconds (/proc/PID/stat's utime and stime); 0 when gone.
    static func cpuSeconds(pid: Int32) -> Double {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = text.lastIndex(of: ")") else { return 0 }
        let fields = text[text.index(after: close)...].split(separator: " ")
        // After "(comm)": state is field 3, utime field 14, stime field 15.
        guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return 0 }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }
}
