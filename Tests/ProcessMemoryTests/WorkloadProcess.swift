import Foundation
import Glibc
import ProcessMemory
import XCTest

/// A running `ferry-workload` child, spawned with posix_spawn (not Foundation.Process, whose SIGCHLD reaping would
/// race the tracker's ptrace waitpid), with its stdin and stdout on pipes.
final class WorkloadProcess {
    let pid: pid_t
    let stdinFD: Int32
    let stdoutFD: Int32
    private var buffer: [UInt8] = []
    private var exited = false
    /// The first region line: start address and size.
    private(set) var regionStart: UInt64 = 0
    private(set) var regionSize: UInt64 = 0

    /// The ferry-workload binary next to the test bundle (the build products directory).
    static var binary: String {
        let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        var dir = exe.deletingLastPathComponent()
        // The bundle may be a directory (…/X.xctest/…) on some layouts: walk up to the products directory.
        for _ in 0..<4 {
            let candidate = dir.appendingPathComponent("ferry-workload").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            dir = dir.deletingLastPathComponent()
        }
        return exe.deletingLastPathComponent().appendingPathComponent("ferry-workload").path
    }

    /// Starts the workload and waits for its "ready" line (unless `waitReady` is false).
    init(_ arguments: [String], waitReady: Bool = true, file: StaticString = #filePath, line: UInt = #line) throws {
        signal(SIGPIPE, SIG_IGN) // a workload that died must fail the test, not kill the runner
        let path = Self.binary
        guard FileManager.default.isExecutableFile(atPath: path) else {
            throw ProcessMemoryError("ferry-workload not built at \(path): build the product 'ferry-workload' first")
        }
        var inPipe: [Int32] = [0, 0], outPipe: [Int32] = [0, 0]
        guard pipe(&inPipe) == 0, pipe(&outPipe) == 0 else {
            throw ProcessMemoryError("pipe failed", errno: .init(rawValue: errno))
        }
        for fd in inPipe + outPipe { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, inPipe[0], 0)
        posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var child: pid_t = 0
        let r = posix_spawn(&child, path, &actions, nil, argv, environ)
        close(inPipe[0]); close(outPipe[1])
        guard r == 0 else {
            close(inPipe[1]); close(outPipe[0])
            throw ProcessMemoryError("posix_spawn of \(path) failed", errno: .init(rawValue: r))
        }
        pid = child
        stdinFD = inPipe[1]
        stdoutFD = outPipe[0]
        if waitReady {
            let region = try waitFor("region", timeout: 30)
            regionStart = (region["start"] as? NSNumber)?.uint64Value ?? 0
            regionSize = (region["size"] as? NSNumber)?.uint64Value ?? 0
            _ = try waitFor("ready", timeout: 60)
        }
    }

    deinit { stop() }

    var region: AddressRange { AddressRange(start: regionStart, length: regionSize) }

    func send(_ command: String) {
        let bytes = Array((command + "\n").utf8)
        _ = bytes.withUnsafeBytes { Glibc.write(stdinFD, $0.baseAddress, $0.count) }
    }

    /// The next JSON line, or nil after `timeout` seconds (0: only what is already there).
    func nextLine(timeout: Double) throws -> [String: Any]? {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if let nl = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Data(buffer[0..<nl])
                buffer.removeSubrange(0...nl)
                if let obj = try? JSONSerialization.jsonObject(with: line) as? [String: Any] { return obj }
                continue
            }
            let left = deadline.timeIntervalSinceNow
            var p = pollfd(fd: stdoutFD, events: Int16(POLLIN), revents: 0)
            let ready = poll(&p, 1, Int32(max(0, left * 1000)))
            if ready <= 0 { if left <= 0 || ready == 0 { return nil } else { continue } }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = read(stdoutFD, &chunk, chunk.count)
            if n <= 0 { throw ProcessMemoryError("ferry-workload \(pid) closed its stdout (exited?)") }
            buffer.append(contentsOf: chunk[0..<n])
        }
    }

    /// Waits for a line with this "event", failing on an "error" or "corrupt" event.
    func waitFor(_ event: String, timeout: Double) throws -> [String: Any] {
        let deadline = Date().addingTimeInterval(timeout)
        while deadline.timeIntervalSinceNow > 0 {
            guard let obj = try nextLine(timeout: deadline.timeIntervalSinceNow) else { break }
            let e = obj["event"] as? String
            if e == event { return obj }
            if e == "error" || e == "corrupt" { throw ProcessMemoryError("ferry-workload \(pid) reported \(obj)") }
        }
        throw ProcessMemoryError("ferry-workload \(pid): no '\(event)' line within \(timeout) s")
    }

    /// Sends a command and waits for the reply event.
    @discardableResult
    func command(_ text: String, expect event: String, timeout: Double = 60) throws -> [String: Any] {
        send(text)
        return try waitFor(event, timeout: timeout)
    }

    /// Rewrites exactly these pages (page indexes within the workload's memory).
    func write(pages: [Int]) throws {
        for chunk in stride(from: 0, to: pages.count, by: 512) {
            let part = pages[chunk..<min(pages.count, chunk + 512)]
            let reply = try command("write " + part.map(String.init).joined(separator: " "), expect: "written")
            XCTAssertEqual((reply["count"] as? NSNumber)?.intValue, part.count)
            XCTAssertEqual((reply["corrupt"] as? NSNumber)?.intValue, 0)
        }
    }

    /// Asks the workload to quit; kills it if it does not within 5 s. Returns its exit status.
    @discardableResult
    func stop() -> Int32 {
        guard !exited else { return 0 }
        exited = true
        send("quit")
        close(stdinFD)
        var status: Int32 = 0
        for _ in 0..<500 {
            if waitpid(pid, &status, WNOHANG) == pid { close(stdoutFD); return status }
            usleep(10_000)
        }
        kill(pid, SIGKILL)
        waitpid(pid, &status, 0)
        close(stdoutFD)
        return status
    }
}

/// Skips a test with a printed reason, or fails it when FERRY_REQUIRE_ALL=1 (CI).
func requireEnvironment(_ condition: Bool, _ reason: String, file: StaticString = #filePath, line: UInt = #line) throws {
    guard !condition else { return }
    if ProcessInfo.processInfo.environment["FERRY_REQUIRE_ALL"] == "1" {
        XCTFail("required by FERRY_REQUIRE_ALL=1 but unavailable: \(reason)", file: file, line: line)
        throw ProcessMemoryError("environment lacks: \(reason)")
    }
    print("SKIP: \(reason)")
    throw XCTSkip(reason)
}

/// A fresh temporary directory, removed by the caller.
func makeTempDirectory() throws -> URL {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("ferry-mem-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    return url
}

/// A PID with no process behind it.
func unusedPID() -> Int32 {
    var pid: Int32 = 32000
    while kill(pid, 0) == 0 || errno != ESRCH { pid -= 1 }
    return pid
}

func percentiles(_ nanos: [UInt64]) -> (p50: Double, p90: Double, p99: Double, max: Double) {
    let s = nanos.sorted()
    func at(_ q: Double) -> Double { s.isEmpty ? 0 : Double(s[min(s.count - 1, Int(Double(s.count - 1) * q + 0.5))]) / 1000 }
    return (at(0.5), at(0.9), at(0.99), at(1))
}

/// XCTAssertThrowsError for expressions of noncopyable type.
func expectError(_ body: () throws -> Void, file: StaticString = #filePath, line: UInt = #line, _ check: (any Error) -> Void) {
    do {
        try body()
        XCTFail("expected an error", file: file, line: line)
    } catch {
        check(error)
    }
}
