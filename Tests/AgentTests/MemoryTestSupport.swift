import FerryTestSupport
import Foundation
import Glibc
import XCTest

/// What the end-to-end memory migration tests need beyond FerryTestSupport (whose `ChildProcess`
/// spawns the workloads and agents with posix_spawn, not Foundation.Process, whose SIGCHLD reaping
/// would race the dirty tracker's ptrace waitpid): their one requirement, a process's scheduler
/// state, and the workload's report lines.
enum MemE2E {
    /// The environment every memory test needs: root (ptrace, userfaultfd), x86-64. Skips (or
    /// fails under FERRY_REQUIRE_ALL=1) with the reason otherwise.
    static func requireMemoryMigration(fileID: String = #fileID, filePath: String = #filePath, line: Int = #line) throws {
        try require(root: "memory migration (ptrace attach, userfaultfd of another process)", fileID: fileID, filePath: filePath, line: line)
        #if !arch(x86_64)
        try skipTest("the dirty tracker's syscall injection is x86-64 only", fileID: fileID, filePath: filePath, line: line)
        #endif
    }

    /// The process's scheduler state letter from /proc/PID/stat (R, S, T, t, Z ...), nil when gone.
    static func state(of pid: pid_t) -> Character? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return nil }
        return stat[stat.index(close, offsetBy: 2)]
    }

    /// Whether the process is stopped: by SIGSTOP (T) or, while a tracer holds it, in a tracing stop (t).
    static func isStopped(_ pid: pid_t) -> Bool {
        let state = state(of: pid)
        return state == "T" || state == "t"
    }
}

extension ChildProcess {
    /// The `ops_per_sec` of every workload report line that has already arrived (without waiting):
    /// the lines are taken, so a later ``waitFor(event:timeout:)`` sees only new ones.
    func drainReports() throws -> [Double] {
        var ops: [Double] = []
        while let object = try nextJSON(timeout: 0) {
            if object["event"] as? String == "report", let value = (object["ops_per_sec"] as? NSNumber)?.doubleValue { ops.append(value) }
        }
        return ops
    }
}

/// JSON lines appended to a file by a process the test did not spawn itself (the workload the
/// dest-agent resumes), read as they come.
final class MemLineFile {
    let path: String
    private var offset = 0
    private var pending: [UInt8] = []

    init(_ path: String) { self.path = path }

    func nextLine(timeout: Double) -> [String: Any]? {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if let nl = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Data(pending[0..<nl])
                pending.removeSubrange(0...nl)
                if let object = try? JSONSerialization.jsonObject(with: line) as? [String: Any] { return object }
                continue
            }
            if let handle = FileHandle(forReadingAtPath: path) {
                handle.seek(toFileOffset: UInt64(offset))
                let data = handle.readDataToEndOfFile()
                try? handle.close()
                offset += data.count
                pending.append(contentsOf: data)
                if !data.isEmpty { continue }
            }
            if Date() > deadline { return nil }
            usleep(20_000)
        }
    }

    /// Pages the workload reported corrupt so far (see ``waitFor(_:timeout:)``).
    private(set) var corruptPages: [Int] = []

    /// Waits for a line with this event; "corrupt" lines are collected in ``corruptPages`` (the
    /// caller judges them), "error" lines throw.
    func waitFor(_ event: String, timeout: Double) throws -> [String: Any] {
        let deadline = Date().addingTimeInterval(timeout)
        while deadline.timeIntervalSinceNow > 0 {
            guard let object = nextLine(timeout: deadline.timeIntervalSinceNow) else { break }
            let e = object["event"] as? String
            if e == event { return object }
            if e == "corrupt" { corruptPages.append((object["page"] as? NSNumber)?.intValue ?? -1) }
            if e == "error" { throw SupportError("\(path) reported \(object)") }
        }
        throw SupportError("\(path): no '\(event)' line within \(timeout) s")
    }
}

/// ferry-workload's page pattern (ProcessMemory's WorkloadPattern), re-checked here on bytes read
/// from another process.
enum MemPattern {
    /// Whether the page at `address` of process `pid` (index `index`) is a valid pattern page or zero.
    static func isIntact(pid: pid_t, address: UInt64, index: UInt64) throws -> Bool {
        let fd = open("/proc/\(pid)/mem", O_RDONLY)
        guard fd >= 0 else { throw SupportError("open /proc/\(pid)/mem failed: \(errno)") }
        defer { close(fd) }
        var words = [UInt64](repeating: 0, count: 512)
        let n = words.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 4096, off_t(Int64(bitPattern: address))) }
        guard n == 4096 else { throw SupportError("pread of page \(index) in \(pid) read \(n)") }
        if words[1] == 0 { return words.allSatisfy { $0 == 0 } }
        guard words[0] == index else { return false }
        let seed = (index &* 0x9E37_79B9_7F4A_7C15) ^ (words[1] &* 0xD6E8_FEB8_6659_FD93) ^ 0x5EED
        for w in 2..<512 where words[w] != seed ^ (UInt64(w) &* 0xA076_1D64_78BD_642F) { return false }
        return true
    }
}
