import Foundation
import Glibc
import XCTest

/// Helpers for the end-to-end memory migration tests: the real executables next to the test
/// bundle, children spawned with posix_spawn (not Foundation.Process, whose SIGCHLD reaping would
/// race the dirty tracker's ptrace waitpid), JSON lines read from pipes and files.
enum MemE2E {
    /// The build products directory (where source-agent, dest-agent and ferry-workload are).
    static var products: String {
        let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        var dir = exe.deletingLastPathComponent()
        for _ in 0..<5 {
            if FileManager.default.isExecutableFile(atPath: dir.appendingPathComponent("source-agent").path) { return dir.path }
            dir = dir.deletingLastPathComponent()
        }
        return exe.deletingLastPathComponent().path
    }

    static func tool(_ name: String) throws -> String {
        let path = products + "/" + name
        guard FileManager.default.isExecutableFile(atPath: path) else {
            throw MemTestError("\(name) not built at \(path): build all products first (swift build)")
        }
        return path
    }

    /// Skips with a printed reason, or fails when FERRY_REQUIRE_ALL=1 (CI).
    static func require(_ condition: Bool, _ reason: String, file: StaticString = #filePath, line: UInt = #line) throws {
        guard !condition else { return }
        if ProcessInfo.processInfo.environment["FERRY_REQUIRE_ALL"] == "1" {
            XCTFail("required by FERRY_REQUIRE_ALL=1 but unavailable: \(reason)", file: file, line: line)
            throw MemTestError("environment lacks: \(reason)")
        }
        print("SKIP: \(reason)")
        throw XCTSkip(reason)
    }

    /// The environment every memory test needs: root (ptrace, userfaultfd), x86-64.
    static func requireMemoryMigration() throws {
        try require(geteuid() == 0, "memory migration needs root (ptrace attach, userfaultfd of another process)")
        #if !arch(x86_64)
        try require(false, "the dirty tracker's syscall injection is x86-64 only")
        #endif
    }

    /// A TCP port that was free a moment ago on 127.0.0.1.
    static func freePort() -> UInt16 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        return UInt16(bigEndian: address.sin_port)
    }

    /// A fresh scratch directory.
    static func scratch() throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("ferry-memtest-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    /// The process's scheduler state letter from /proc/PID/stat (R, S, T, Z ...), nil when gone.
    static func state(of pid: pid_t) -> Character? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return nil }
        return stat[stat.index(close, offsetBy: 2)]
    }

    static func readJSON(_ path: String) throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        guard let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw MemTestError("\(path) is not a JSON object")
        }
        return object
    }
}

struct MemTestError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// A child process with its stdin (optional pipe) and stdout on a pipe or a file.
final class MemChild {
    let pid: pid_t
    let stdinFD: Int32
    let stdoutFD: Int32
    private var buffer: [UInt8] = []
    private var reaped = false
    private(set) var exitStatus: Int32 = 0

    /// Starts `path` with `arguments`; stdout goes to a pipe (read with ``waitFor(_:timeout:)``)
    /// unless `logPath` is given, in which case stdout and stderr go to that file.
    init(_ path: String, _ arguments: [String], logPath: String? = nil) throws {
        signal(SIGPIPE, SIG_IGN)
        var inPipe: [Int32] = [0, 0], outPipe: [Int32] = [-1, -1]
        guard pipe(&inPipe) == 0 else { throw MemTestError("pipe failed") }
        if logPath == nil { guard pipe(&outPipe) == 0 else { throw MemTestError("pipe failed") } }
        for fd in inPipe + outPipe where fd >= 0 { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, inPipe[0], 0)
        if let logPath {
            posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
        } else {
            posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        }
        let argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { (s: String) in strdup(s) } + [nil]
        defer { for a in argv { free(a) } }
        var child: pid_t = 0
        let rc = posix_spawn(&child, path, &actions, nil, argv, environ)
        close(inPipe[0])
        if outPipe[1] >= 0 { close(outPipe[1]) }
        guard rc == 0 else { throw MemTestError("posix_spawn of \(path) failed: \(rc)") }
        pid = child
        stdinFD = inPipe[1]
        stdoutFD = outPipe[0]
    }

    deinit { kill(pid, SIGKILL); _ = wait(timeout: 5) }

    func send(_ line: String) {
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { Glibc.write(stdinFD, $0.baseAddress, $0.count) }
    }

    /// The next JSON line within `timeout` seconds, or nil.
    func nextLine(timeout: Double) -> [String: Any]? {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if let nl = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Data(buffer[0..<nl])
                buffer.removeSubrange(0...nl)
                if let object = try? JSONSerialization.jsonObject(with: line) as? [String: Any] { return object }
                continue
            }
            let left = deadline.timeIntervalSinceNow
            if left <= 0 || stdoutFD < 0 { return nil }
            var p = pollfd(fd: stdoutFD, events: Int16(POLLIN), revents: 0)
            let ready = poll(&p, 1, Int32(left * 1000))
            if ready <= 0 { if ready == 0 { return nil } else { continue } }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = read(stdoutFD, &chunk, chunk.count)
            if n <= 0 { return nil }
            buffer.append(contentsOf: chunk[0..<n])
        }
    }

    /// Waits for a line whose "event" is `event`; throws on "error" / "corrupt" or timeout.
    func waitFor(_ event: String, timeout: Double) throws -> [String: Any] {
        let deadline = Date().addingTimeInterval(timeout)
        while deadline.timeIntervalSinceNow > 0 {
            guard let object = nextLine(timeout: deadline.timeIntervalSinceNow) else { break }
            let e = object["event"] as? String
            if e == event { return object }
            if e == "error" || e == "corrupt" { throw MemTestError("process \(pid) reported \(object)") }
        }
        throw MemTestError("process \(pid): no '\(event)' line within \(timeout) s")
    }

    /// Every report line's ops_per_sec available now (without waiting).
    func drainOps() -> [Double] {
        var ops: [Double] = []
        while let object = nextLine(timeout: 0.01) {
            if object["event"] as? String == "report", let v = (object["ops_per_sec"] as? NSNumber)?.doubleValue { ops.append(v) }
        }
        return ops
    }

    /// Waits up to `timeout` seconds for the child to exit; returns its exit code (or 128+signal), nil on timeout.
    func wait(timeout: Double) -> Int32? {
        if reaped { return exitStatus }
        let deadline = Date().addingTimeInterval(timeout)
        var status: Int32 = 0
        while true {
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid {
                reaped = true
                exitStatus = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
                return exitStatus
            }
            if r < 0 { reaped = true; return exitStatus }
            if Date() > deadline { return nil }
            usleep(20_000)
        }
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
            if e == "error" { throw MemTestError("\(path) reported \(object)") }
        }
        throw MemTestError("\(path): no '\(event)' line within \(timeout) s")
    }
}

/// ferry-workload's page pattern (ProcessMemory's WorkloadPattern), re-checked here on bytes read
/// from another process.
enum MemPattern {
    /// Whether the page at `address` of process `pid` (index `index`) is a valid pattern page or zero.
    static func isIntact(pid: pid_t, address: UInt64, index: UInt64) throws -> Bool {
        let fd = open("/proc/\(pid)/mem", O_RDONLY)
        guard fd >= 0 else { throw MemTestError("open /proc/\(pid)/mem failed: \(errno)") }
        defer { close(fd) }
        var words = [UInt64](repeating: 0, count: 512)
        let n = words.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 4096, off_t(Int64(bitPattern: address))) }
        guard n == 4096 else { throw MemTestError("pread of page \(index) in \(pid) read \(n)") }
        if words[1] == 0 { return words.allSatisfy { $0 == 0 } }
        guard words[0] == index else { return false }
        let seed = (index &* 0x9E37_79B9_7F4A_7C15) ^ (words[1] &* 0xD6E8_FEB8_6659_FD93) ^ 0x5EED
        for w in 2..<512 where words[w] != seed ^ (UInt64(w) &* 0xA076_1D64_78BD_642F) { return false }
        return true
    }
}
